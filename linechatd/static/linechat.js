// linechat.js: a dependency-free browser client for linechatd (ES module).
//
//   import { LineChatClient } from "/static/linechat.js";
//   const client = new LineChatClient({ uid: "alice" });
//   client.on("message", (m) => console.log(m.from, m.body));
//   client.on("state", (s) => console.log(s.state));
//   await client.connect();
//   const ack = await client.send("bob", { text: "hi" });
//   const group = await client.send(["bob", "carol"], { text: "hi all" });
//
// It asks the HTTP API for the owner's WebSocket url, connects, follows
// 1012/1013 (and a refused handshake, which a browser sees only as a close
// before open) by asking again, reconnects with exponential backoff and full
// jitter, resumes from the highest offset seen (kept in localStorage per
// uid and device), drops duplicates (by offset, and by from/from_device/id
// for resent messages) and resends unacknowledged sends with the same id.
// A send to a list of uids is a group send (one ack with an entry per
// recipient partition); the list is checked here before anything is written.
// The protocol is described in docs/protocol.md; this module in docs/js-client.md.

export const VERSION = "2";

/** Connection states, in the order a healthy client goes through them. */
export const State = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

const UID_PATTERN = /^[A-Za-z0-9_.:@-]{1,128}$/;
const STORAGE_PREFIX = "linechat:v1:";
// Close codes after which reconnecting cannot help (4401 can, with a fresh token).
const FATAL_CLOSES = new Map([
  [1008, "protocol violation"],
  [4401, "token expired"],
]);
// HTTP answers of /api/connection-url that retrying will not change.
const FATAL_STATUSES = new Set([400, 401, 403]);
const DEDUPE_MEMORY = 10000;
// The server's default `limits.max_recipients`; a larger list is refused locally.
const DEFAULT_MAX_RECIPIENTS = 100;
const UNAVAILABLE_RESEND_MS = 1000;

/** An error with a machine-readable code, e.g. "timeout", "bad_recipient", "closed". */
export class LineChatError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "LineChatError";
    this.code = code;
    Object.assign(this, extra);
  }
}

/** The HTTP API refused the connection-url request. */
export class RefusedError extends LineChatError {
  constructor(status, body, retryAfterMs) {
    const code = (body && typeof body.error === "string" && body.error) || `http_${status}`;
    super(code, `connection-url answered ${status} ${code}`, { status, body, retryAfterMs });
    this.name = "RefusedError";
  }
}

/** Valid uid / device id: 1-128 characters of [A-Za-z0-9_.:@-]. */
export function isValidUid(value) {
  return typeof value === "string" && UID_PATTERN.test(value);
}

/**
 * Why `to` cannot be sent, or null when it can: a uid, or a list of 1 to
 * `maxRecipients` distinct uids (a group send).
 */
export function recipientProblem(to, maxRecipients = DEFAULT_MAX_RECIPIENTS) {
  if (!Array.isArray(to)) return isValidUid(to) ? null : `not a valid uid: ${describe(to)}`;
  if (to.length === 0) return "no recipients";
  if (to.length > maxRecipients) {
    return `${to.length} recipients, more than the ${maxRecipients} allowed`;
  }
  const seen = new Set();
  for (const [index, uid] of to.entries()) {
    if (!isValidUid(uid)) return `to[${index}] is not a valid uid: ${describe(uid)}`;
    if (seen.has(uid)) return `recipient ${uid} is listed twice`;
    seen.add(uid);
  }
  return null;
}

function describe(value) {
  const text = typeof value === "string" ? JSON.stringify(value) : String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function randomHex(bytes) {
  const buf = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Ask the HTTP API which instance serves `uid`: {url, partition, instance}. */
export async function fetchConnectionUrl(httpUrl, uid, options = {}) {
  const fetchImpl = options.fetch || globalThis.fetch.bind(globalThis);
  const base = String(httpUrl || "").replace(/\/+$/, "");
  const headers = { accept: "application/json" };
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  const response = await fetchImpl(
    `${base}/api/connection-url?${new URLSearchParams({ uid })}`,
    { headers, cache: "no-store", signal: options.signal },
  );
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status !== 200 || !body || typeof body.url !== "string") {
    const retry = Number.parseFloat(response.headers.get("retry-after") ?? "");
    throw new RefusedError(
      response.status,
      body,
      Number.isFinite(retry) && retry >= 0 ? retry * 1000 : null,
    );
  }
  return { url: body.url, partition: body.partition, instance: body.instance };
}

// localStorage can be missing or throw (privacy modes, sandboxed frames):
// then state lives for the page's lifetime only.
function defaultStorage() {
  try {
    const storage = globalThis.localStorage;
    const probe = `${STORAGE_PREFIX}probe`;
    storage.setItem(probe, "1");
    storage.removeItem(probe);
    return storage;
  } catch {
    return memoryStorage();
  }
}

/** A Storage-like object kept in memory (for tests, or where localStorage is unusable). */
export function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => void items.set(key, String(value)),
    removeItem: (key) => void items.delete(key),
  };
}

function storageGet(storage, key) {
  try {
    return storage.getItem(key);
  } catch {
    return null;
  }
}

function storageSet(storage, key, value) {
  try {
    storage.setItem(key, value);
  } catch {
    // Quota or privacy errors: resuming from memory is still correct for this page.
  }
}

/**
 * One device of one user. Events (listen with `on(type, fn)`, which passes the
 * detail, or with addEventListener, where it is `event.detail`):
 *
 *   state        {state, ...the detail of the specific event below}
 *   connecting   {}
 *   connected    {instance, partition, offset, resumed, url}
 *   reconnecting {attempt, delay, code, reason}
 *   closed       {code, reason, error}
 *   message      {from, fromDevice, to, id, body, partition, offset, ts, recipients?}
 *                                           recipients: the whole list of a group message
 *   sent         {id, to, attempt}          a send frame went out on a socket
 *   ack          {id, partition, offset}    for a send to one uid
 *                {id, acks: [{partition, offset, to}]}   for a group send
 *   gap          {cursor, offset}           resume was impossible: messages in between are lost to this device
 *   cursorreset  {cursor, offset}           the stored cursor was ahead of the log (a new cluster): reset
 *   servererror  {id, code, message}        an error frame
 */
export class LineChatClient extends EventTarget {
  constructor(options = {}) {
    super();
    if (!isValidUid(options.uid)) {
      throw new TypeError("uid must be 1-128 characters of [A-Za-z0-9_.:@-]");
    }
    this.uid = options.uid;
    const origin = globalThis.location ? globalThis.location.origin : "";
    this.httpUrl = String(options.httpUrl ?? origin).replace(/\/+$/, "");
    this._storage = options.storage || defaultStorage();
    this._fetch = options.fetch;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._token = options.token ?? null;
    this._initialBackoffMs = options.initialBackoffMs ?? 100;
    this._maxBackoffMs = options.maxBackoffMs ?? 5000;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this._pingIntervalMs = options.pingIntervalMs ?? 20000;
    this._sendTimeoutMs = options.sendTimeoutMs ?? 30000;
    this._maxFrameBytes = options.maxFrameBytes ?? 65536;
    this._maxRecipients = options.maxRecipients ?? DEFAULT_MAX_RECIPIENTS;
    if (!Number.isSafeInteger(this._maxRecipients) || this._maxRecipients < 1) {
      throw new TypeError("maxRecipients must be a positive integer");
    }

    this.device = options.device ?? this._storedDevice();
    if (!isValidUid(this.device)) {
      throw new TypeError("device must be 1-128 characters of [A-Za-z0-9_.:@-]");
    }
    this._cursorKey = `${STORAGE_PREFIX}cursor:${this.uid}:${this.device}`;
    /** The highest offset received (or known not to concern this device); resumed from. */
    this.cursor = options.resume !== undefined ? options.resume : this._storedCursor();

    this.state = State.IDLE;
    this.welcome = null;
    this.connections = 0;
    this.duplicatesDropped = 0;
    this.error = null;

    // Ids unique to this client object, so two tabs of one device never collide
    // (receivers drop repeats of from/from_device/id).
    this._idPrefix = randomHex(4);
    this._idCounter = 0;
    this._pending = new Map(); // id -> {id, to, group, frame, resolve, reject, timer, attempts}
    this._seen = new Map(); // "from\ndevice\nid" -> true, oldest first
    this._ws = null;
    this._running = null;
    this._stopped = false;
    this._wake = null; // resolves the current backoff sleep early
    this._abortSession = null;
    this._onOnline = () => this._wake && this._wake();
  }

  /** Subscribe to an event; the handler gets the event's detail. Returns an unsubscribe function. */
  on(type, handler) {
    const listener = (event) => handler(event.detail, event);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /**
   * Start connecting (and keep reconnecting until close()). Resolves with the
   * first `connected` detail; rejects if the client closes for good before that.
   */
  connect() {
    if (this._stopped) return Promise.reject(new LineChatError("closed", "client is closed"));
    if (!this._running) {
      this._running = new Promise((resolve, reject) => {
        this._firstConnect = { resolve, reject };
      });
      // Rejections are reported through connect()'s promise and the closed event.
      this._running.catch(() => {});
      globalThis.addEventListener?.("online", this._onOnline);
      this._loop();
    }
    return this._running;
  }

  /** Stop for good: close the socket (1000) and fail pending sends with "closed". */
  close() {
    this._finish(1000, "closed by client", null);
  }

  /** A fresh message id (1-64 characters), unique to this client object. */
  newId() {
    this._idCounter += 1;
    return `${this._idPrefix}-${this._idCounter}`;
  }

  /**
   * Send `body` (any JSON value) to `to`, a uid or a list of uids (a group send).
   * Resolves once the broker has the message: with {id, partition, offset} for a
   * uid, with {id, acks: [{partition, offset, to}]} (one entry per recipient
   * partition) for a list. Unacknowledged sends go out again, with the same id,
   * after each reconnect. Rejects with a LineChatError: "bad_recipient" (a bad
   * uid; an empty, too long or repeating list: refused before anything is
   * sent), "too_large", "timeout", "closed", or a server error code
   * ("rate_limited", ...).
   */
  send(to, body, options = {}) {
    const id = options.id ?? this.newId();
    const timeoutMs = options.timeoutMs ?? this._sendTimeoutMs;
    if (this._stopped) return Promise.reject(new LineChatError("closed", "client is closed", { id }));
    const problem = recipientProblem(to, this._maxRecipients);
    if (problem !== null) {
      return Promise.reject(new LineChatError("bad_recipient", problem, { id }));
    }
    // Our own copy: a caller changing its array later must not change a resend.
    const group = Array.isArray(to);
    if (group) to = Object.freeze([...to]);
    if (typeof id !== "string" || id.length < 1 || id.length > 64) {
      return Promise.reject(new TypeError("id must be a string of 1-64 characters"));
    }
    if (this._pending.has(id)) {
      return Promise.reject(new LineChatError("duplicate_id", `id ${id} is already pending`, { id }));
    }
    if (body === undefined) return Promise.reject(new TypeError("body must be a JSON value"));
    let frame;
    try {
      frame = JSON.stringify({ type: "send", id, to, body });
    } catch (error) {
      return Promise.reject(error);
    }
    if (new TextEncoder().encode(frame).length > this._maxFrameBytes) {
      return Promise.reject(
        new LineChatError("too_large", `frame larger than ${this._maxFrameBytes} bytes`, { id }),
      );
    }
    return new Promise((resolve, reject) => {
      const entry = { id, to, group, frame, resolve, reject, timer: null, attempts: 0 };
      entry.timer = setTimeout(() => {
        if (this._pending.get(id) === entry) {
          this._pending.delete(id);
          reject(new LineChatError("timeout", `no ack within ${timeoutMs} ms`, { id }));
        }
      }, timeoutMs);
      this._pending.set(id, entry);
      this._transmit(entry);
    });
  }

  // -- connection loop ---------------------------------------------------------

  async _loop() {
    let backoff = this._initialBackoffMs;
    let attempt = 0;
    this._setState(State.CONNECTING, {});
    while (!this._stopped) {
      let delay = null;
      let code = null;
      let reason = "";
      try {
        const target = await this._connectionUrl();
        if (this._stopped) return;
        const outcome = await this._session(target.url);
        if (this._stopped) return;
        ({ code, reason } = outcome);
        if (FATAL_CLOSES.has(code) && !(code === 4401 && typeof this._token === "function")) {
          this._finish(code, FATAL_CLOSES.get(code), new LineChatError("fatal_close", reason));
          return;
        }
        if (outcome.welcomed || code === 1012 || code === 1013) {
          // A working session ended, or the server asked us to move: come back promptly.
          backoff = this._initialBackoffMs;
          attempt = 0;
        }
      } catch (error) {
        if (this._stopped) return;
        if (error instanceof RefusedError) {
          if (FATAL_STATUSES.has(error.status)) {
            this._finish(null, error.message, error);
            return;
          }
          delay = error.retryAfterMs;
          reason = error.code;
        } else {
          reason = String(error && error.message ? error.message : error); // network failure
        }
      }
      attempt += 1;
      // Full jitter: clients dropped together by one drain spread their returns.
      if (delay === null) delay = Math.random() * backoff;
      backoff = Math.min(this._maxBackoffMs, backoff * 2);
      this._setState(State.RECONNECTING, { attempt, delay: Math.round(delay), code, reason });
      await this._sleep(delay);
    }
  }

  // Bounded: a server that accepts and never answers must not stall the loop.
  async _connectionUrl() {
    const token = await this._currentToken();
    const abort = typeof AbortController === "function" ? new AbortController() : null;
    const timer = abort && setTimeout(() => abort.abort(), this._connectTimeoutMs);
    try {
      return await fetchConnectionUrl(this.httpUrl, this.uid, {
        token,
        fetch: this._fetch,
        signal: abort ? abort.signal : undefined,
      });
    } finally {
      clearTimeout(timer);
    }
  }

  async _currentToken() {
    return typeof this._token === "function" ? await this._token() : this._token;
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this._wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this._wake = done;
    });
  }

  // One WebSocket from open to close. Resolves (never rejects) with
  // {welcomed, code, reason}; code is null when the socket never reported one.
  async _session(url) {
    const params = new URLSearchParams({ uid: this.uid, device: this.device });
    const token = await this._currentToken();
    if (this._stopped) return { welcomed: false, code: null, reason: "closed by client" };
    if (token) params.set("token", token);
    if (this.cursor !== null && this.cursor !== undefined) params.set("resume", String(this.cursor));
    return new Promise((resolve) => {
      let ws;
      let welcomed = false;
      let settled = false;
      let awaitingPong = false;
      let pinger = null;
      const finish = (code, reason) => {
        if (settled) return;
        settled = true;
        clearTimeout(opening);
        clearInterval(pinger);
        this._abortSession = null;
        if (this._ws === ws) this._ws = null;
        if (ws) {
          ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
          if (ws.readyState === 0 || ws.readyState === 1) {
            try {
              ws.close(1000);
            } catch {
              // already closing
            }
          }
        }
        resolve({ welcomed, code, reason });
      };
      // A handshake that never completes (a black-holed address) must not stall us.
      const opening = setTimeout(() => finish(null, "connect timeout"), this._connectTimeoutMs);
      this._abortSession = finish;
      try {
        ws = new this._WebSocket(`${url}?${params}`);
      } catch (error) {
        finish(null, String(error));
        return;
      }
      ws.onmessage = (event) => {
        awaitingPong = false;
        if (typeof event.data !== "string") return;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return;
        }
        if (!frame || typeof frame !== "object") return;
        if (!welcomed) {
          if (frame.type !== "welcome") {
            finish(null, `expected welcome, got ${frame.type}`);
            return;
          }
          clearTimeout(opening);
          welcomed = true;
          this._onWelcome(ws, frame, url);
          // Liveness: a frame (any, pong included) must arrive between two pings,
          // or the connection is presumed dead (a host that vanished sends no close).
          pinger = setInterval(() => {
            if (awaitingPong) {
              finish(null, "no pong");
              return;
            }
            awaitingPong = true;
            this._sendRaw(ws, '{"type":"ping"}');
          }, this._pingIntervalMs);
          return;
        }
        this._onFrame(ws, frame);
      };
      ws.onerror = () => {}; // always followed by close, which carries the code
      // A browser hides a refused handshake (421, 503 draining, ...): it shows as
      // a close (usually 1006) before open, and we ask connection-url again.
      ws.onclose = (event) => finish(event.code, event.reason || "");
    });
  }

  _onWelcome(ws, frame, url) {
    const welcome = {
      instance: frame.instance,
      partition: frame.partition,
      offset: frame.offset,
      resumed: frame.resumed,
      url,
    };
    if (Number.isInteger(welcome.offset)) {
      if (this.cursor !== null && this.cursor >= welcome.offset) {
        // Offsets we were given are always below the log end; a cursor at or past
        // it belongs to another log (a recreated cluster): start over from here.
        this._emit("cursorreset", { cursor: this.cursor, offset: welcome.offset });
        this._setCursor(welcome.offset - 1);
      } else if (this.cursor === null || welcome.resumed === false) {
        if (welcome.resumed === false) {
          this._emit("gap", { cursor: this.cursor, offset: welcome.offset });
        }
        // From now on nothing before the welcome offset concerns us.
        const floor = welcome.offset - 1;
        this._setCursor(this.cursor === null ? floor : Math.max(this.cursor, floor));
      }
    }
    this._ws = ws;
    this.welcome = welcome;
    this.connections += 1;
    this._setState(State.CONNECTED, welcome);
    if (this._firstConnect) {
      this._firstConnect.resolve(welcome);
      this._firstConnect = null;
    }
    // Sends that never got their ack go out again, same ids, in their order.
    for (const entry of this._pending.values()) this._transmit(entry);
  }

  _onFrame(ws, frame) {
    switch (frame.type) {
      case "message":
        this._onMessage(frame);
        break;
      case "ack":
        this._onAck(frame);
        break;
      case "error": {
        const detail = { id: frame.id ?? null, code: frame.code, message: frame.message };
        this._emit("servererror", detail);
        if (frame.id === null || frame.id === undefined) break;
        if (frame.code === "unavailable") {
          // Not acked and may be resent: try again shortly on this socket.
          const entry = this._pending.get(frame.id);
          if (entry) {
            setTimeout(() => {
              if (this._pending.get(frame.id) === entry && this._ws === ws) this._transmit(entry);
            }, UNAVAILABLE_RESEND_MS);
          }
        } else {
          this._resolve(frame.id, new LineChatError(frame.code, frame.message, { id: frame.id }));
        }
        break;
      }
      default:
        break; // pong, and frame types a later version may add
    }
  }

  _onAck(frame) {
    const entry = this._pending.get(frame.id);
    if (!entry) return; // an ack of a send that timed out, or of another tab's
    if (!entry.group) {
      this._resolve(frame.id, null, { id: frame.id, partition: frame.partition, offset: frame.offset });
      return;
    }
    const acks = Array.isArray(frame.acks)
      ? frame.acks.map((a) => ({
          partition: a.partition,
          offset: a.offset,
          to: Array.isArray(a.to) ? [...a.to] : [],
        }))
      : // The protocol always answers a list with `acks`; should a server use the
        // one-to-one form, the caller still gets the shape it was promised.
        [{ partition: frame.partition, offset: frame.offset, to: [...entry.to] }];
    this._resolve(frame.id, null, { id: frame.id, acks });
  }

  _onMessage(frame) {
    const offset = frame.offset;
    if (!Number.isInteger(offset)) return;
    if (this.cursor !== null && offset <= this.cursor) {
      this.duplicatesDropped += 1;
      return;
    }
    this._setCursor(offset);
    const key = `${frame.from}\n${frame.from_device}\n${frame.id}`;
    if (this._seen.has(key)) {
      this.duplicatesDropped += 1; // a resend of one we already have, at another offset
      return;
    }
    this._seen.set(key, true);
    if (this._seen.size > DEDUPE_MEMORY) this._seen.delete(this._seen.keys().next().value);
    const message = {
      from: frame.from,
      fromDevice: frame.from_device,
      to: frame.to,
      id: frame.id,
      body: frame.body,
      partition: frame.partition,
      offset,
      ts: frame.ts,
    };
    // Only group messages carry the list (in the sender's order, ours among them).
    if (Array.isArray(frame.recipients)) message.recipients = [...frame.recipients];
    this._emit("message", message);
  }

  _resolve(id, error, ack) {
    const entry = this._pending.get(id);
    if (!entry) return;
    this._pending.delete(id);
    clearTimeout(entry.timer);
    if (error) {
      entry.reject(error);
    } else {
      this._emit("ack", ack);
      entry.resolve(ack);
    }
  }

  _transmit(entry) {
    const ws = this._ws;
    if (!ws) return; // goes out on (re)connect
    if (this._sendRaw(ws, entry.frame)) {
      entry.attempts += 1;
      this._emit("sent", { id: entry.id, to: entry.to, attempt: entry.attempts });
    }
  }

  _sendRaw(ws, text) {
    if (ws.readyState !== 1) return false;
    try {
      ws.send(text);
      return true;
    } catch {
      return false; // resent after the reconnect
    }
  }

  // -- state ---------------------------------------------------------------------

  _storedDevice() {
    const key = `${STORAGE_PREFIX}device:${this.uid}`;
    const stored = storageGet(this._storage, key);
    if (isValidUid(stored)) return stored;
    const device = `web-${randomHex(8)}`;
    storageSet(this._storage, key, device);
    return device;
  }

  _storedCursor() {
    const raw = storageGet(this._storage, this._cursorKey);
    if (raw === null || !/^-?\d{1,16}$/.test(raw)) return null;
    const value = Number(raw);
    return Number.isSafeInteger(value) && value >= -1 ? value : null;
  }

  _setCursor(value) {
    this.cursor = value;
    storageSet(this._storage, this._cursorKey, String(value));
  }

  _setState(state, detail) {
    this.state = state;
    this._emit(state, detail);
    this._emit("state", { state, ...detail });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _finish(code, reason, error) {
    if (this._stopped) return;
    this._stopped = true;
    this.error = error;
    globalThis.removeEventListener?.("online", this._onOnline);
    if (this._abortSession) this._abortSession(code, reason);
    if (this._wake) this._wake();
    const failure = error || new LineChatError("closed", reason);
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(new LineChatError("closed", `client closed: ${reason}`, { id: entry.id }));
    }
    this._pending.clear();
    if (this._firstConnect) {
      this._firstConnect.reject(failure);
      this._firstConnect = null;
    }
    this._setState(State.CLOSED, { code, reason, error });
  }
}

/** Create a client and wait for its first connection. */
export async function connect(options) {
  const client = new LineChatClient(options);
  await client.connect();
  return client;
}
