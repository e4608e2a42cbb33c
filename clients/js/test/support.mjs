// A scripted gateway for the client's tests: a fake fetch answers
// connection-url, FakeSocket plays the server side of each WebSocket.
// The tests load the one source (linechatd/static/linechat.js), not the
// package's built copy.

import { webcrypto } from "node:crypto";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach } from "node:test";
import { pathToFileURL } from "node:url";

import { SOURCE } from "../scripts/build.mjs";

// What every browser has and Node 18 keeps behind flags.
globalThis.crypto ??= webcrypto;
globalThis.CustomEvent ??= class CustomEvent extends Event {
  constructor(type, init = {}) {
    super(type, init);
    this.detail = init.detail ?? null;
  }
};

// Loaded from a .mjs copy of it: nothing marks linechatd/static as ES modules
// (no package.json there), and Node 18 would read a .js file as CommonJS.
const scratch = mkdtempSync(join(tmpdir(), "linechat-test-"));
process.on("exit", () => rmSync(scratch, { recursive: true, force: true }));
copyFileSync(SOURCE, join(scratch, "linechat.mjs"));
export const linechat = await import(pathToFileURL(join(scratch, "linechat.mjs")).href);

// Every client a test made is closed after it, passed or failed: a client left
// running (pings, reconnects) would keep the test file's process alive.
const live = new Set();
afterEach(() => {
  for (const client of live) client.close();
  live.clear();
});

/**
 * Options for every test: a bound on its time, so a promise that never settles
 * fails the test instead of hanging the run (Node's default is no bound).
 */
export const BOUNDED = Object.freeze({ timeout: 15000 });

/** One fake cluster: the sockets clients opened, and connection-url answers to give. */
export class FakeGateway {
  constructor() {
    this.sockets = [];
    this.answers = []; // {status, body, headers} given in turn, then 200s
    const gateway = this;
    this.WebSocket = class FakeSocket {
      constructor(url) {
        this.url = new URL(url);
        this.readyState = 0;
        this.sent = [];
        this.closedByClient = null;
        gateway.sockets.push(this);
      }
      send(text) {
        this.sent.push(JSON.parse(text));
      }
      close(code) {
        this.closedByClient = code;
        this.readyState = 3;
      }
      serverOpen(welcome) {
        this.readyState = 1;
        this.serverSend({
          type: "welcome",
          uid: "alice",
          device: "d",
          partition: 1,
          instance: "gw-0",
          resumed: null,
          ...welcome,
        });
      }
      serverSend(frame) {
        this.onmessage({ data: JSON.stringify(frame) });
      }
      serverClose(code, reason = "") {
        this.readyState = 3;
        this.onclose({ code, reason });
      }
      sends() {
        return this.sent.filter((frame) => frame.type === "send");
      }
    };
    this.fetch = async () => {
      const answer = this.answers.shift() ?? {
        status: 200,
        body: { url: "ws://gw/ws", partition: 1, instance: "gw-0" },
      };
      return {
        status: answer.status,
        headers: { get: (name) => (answer.headers ?? {})[name.toLowerCase()] ?? null },
        json: async () => answer.body,
      };
    };
  }

  /** Client options wired to this gateway, with fast backoff. */
  options(extra = {}) {
    return {
      uid: "alice",
      httpUrl: "http://api",
      fetch: this.fetch,
      WebSocket: this.WebSocket,
      storage: linechat.memoryStorage(),
      initialBackoffMs: 2,
      maxBackoffMs: 20,
      ...extra,
    };
  }

  /** A client of this gateway, closed after the test. */
  client(extra = {}) {
    const client = new linechat.LineChatClient(this.options(extra));
    live.add(client);
    return client;
  }

  /** A connected client (its socket welcomed at `offset`) and its recorded events. */
  async connected(extra = {}, welcome = { offset: 0 }) {
    const client = this.client(extra);
    const events = record(client);
    const before = this.sockets.length;
    const connecting = client.connect();
    await until("socket", () => this.sockets.length === before + 1);
    const socket = this.sockets.at(-1);
    socket.serverOpen(welcome);
    await connecting;
    return { client, events, socket };
  }
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

/** Wait (bounded) until `predicate()` holds. */
export async function until(what, predicate, ms = 3000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await tick();
  }
}

/** Every event the client emits, in order, as {type, ...detail}. */
export function record(client) {
  const events = [];
  for (const type of ["state", "message", "sent", "ack", "gap", "cursorreset", "servererror"]) {
    client.on(type, (detail) => events.push({ type, ...detail }));
  }
  return events;
}

/** A message frame to alice from bob's device b1. */
export function message(offset, id, extra = {}) {
  return {
    type: "message",
    from: "bob",
    from_device: "b1",
    to: "alice",
    id,
    body: { kind: "text", text: id },
    partition: 1,
    offset,
    ts: 1,
    ...extra,
  };
}
