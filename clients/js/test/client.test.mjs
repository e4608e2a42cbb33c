// The client's connection logic against a scripted gateway: cursor and device
// persistence, duplicate drops, resends with the same id after a reconnect,
// backoff events, Retry-After, fatal answers, gaps, a silent connection.

import assert from "node:assert/strict";
import { test } from "node:test";

import { BOUNDED, FakeGateway, linechat, message, record, until } from "./support.mjs";

const { memoryStorage } = linechat;

test("cursor, device and duplicates", BOUNDED, async () => {
  const gw = new FakeGateway();
  const storage = memoryStorage();
  const client = gw.client({ storage });
  const events = record(client);
  const connected = client.connect();
  await until("socket", () => gw.sockets.length === 1);
  const first = gw.sockets[0];
  assert.equal(first.url.searchParams.get("uid"), "alice");
  assert.equal(first.url.searchParams.get("resume"), null);
  first.serverOpen({ offset: 5 });
  assert.equal((await connected).instance, "gw-0");
  assert.equal(client.cursor, 4);
  first.serverSend(message(5, "m1"));
  first.serverSend(message(5, "m1")); // same offset again
  first.serverSend(message(7, "m1")); // a resend of m1 at a new offset
  first.serverSend(message(8, "m2"));
  assert.deepEqual(
    events.filter((e) => e.type === "message").map((e) => [e.id, e.offset]),
    [
      ["m1", 5],
      ["m2", 8],
    ],
  );
  assert.equal(client.duplicatesDropped, 2);
  assert.equal(client.cursor, 8);
  client.close();
  assert.equal(client.state, "closed");
  // A new page of the same browser: same device, resumes from the stored cursor.
  const again = gw.client({ storage });
  assert.equal(again.device, client.device);
  assert.equal(again.cursor, 8);
  again.connect();
  await until("second socket", () => gw.sockets.length === 2);
  assert.equal(gw.sockets[1].url.searchParams.get("resume"), "8");
  assert.equal(gw.sockets[1].url.searchParams.get("device"), client.device);
  again.close();
});

test("unacked sends go out again with the same id after 1012", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, events, socket } = await gw.connected();
  const acked = client.send("bob", { text: "hi" }, { id: "x1" });
  assert.deepEqual(socket.sent, [{ type: "send", id: "x1", to: "bob", body: { text: "hi" } }]);
  socket.serverClose(1012, "partition moved");
  await until("reconnecting", () => client.state === "reconnecting");
  const queued = client.send("bob", "while away", { id: "x2" });
  const reconnecting = events.find((e) => e.type === "state" && e.state === "reconnecting");
  assert.equal(reconnecting.attempt, 1);
  assert.equal(reconnecting.code, 1012);
  assert.ok(reconnecting.delay >= 0 && reconnecting.delay <= 2);
  await until("second socket", () => gw.sockets.length === 2);
  const second = gw.sockets[1];
  assert.equal(second.url.searchParams.get("resume"), "-1");
  second.serverOpen({ offset: 3, resumed: true, instance: "gw-1" });
  assert.deepEqual(
    second.sent.map((f) => f.id),
    ["x1", "x2"],
  );
  second.serverSend({ type: "ack", id: "x1", partition: 2, offset: 9 });
  second.serverSend({ type: "ack", id: "x2", partition: 2, offset: 10 });
  assert.deepEqual(await acked, { id: "x1", partition: 2, offset: 9 });
  assert.equal((await queued).offset, 10);
  const sent = events.filter((e) => e.type === "sent").map((e) => [e.id, e.attempt]);
  assert.deepEqual(sent, [
    ["x1", 1],
    ["x1", 2],
    ["x2", 1],
  ]);
  client.close();
});

test("errors, unavailable and send validation", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, socket } = await gw.connected({ maxFrameBytes: 256 });
  const limited = client.send("bob", 1, { id: "r1" });
  socket.serverSend({ type: "error", id: "r1", code: "rate_limited", message: "slow down" });
  await assert.rejects(limited, { code: "rate_limited" });
  await assert.rejects(client.send("not a uid", 1), { code: "bad_recipient" });
  await assert.rejects(client.send("bob", "x".repeat(300)), { code: "too_large" });
  await assert.rejects(client.send("bob", 1, { timeoutMs: 10 }), { code: "timeout" });
  const retried = client.send("bob", 2, { id: "u1" });
  socket.serverSend({ type: "error", id: "u1", code: "unavailable", message: "broker" });
  await until("resend after unavailable", () => socket.sent.filter((f) => f.id === "u1").length === 2);
  socket.serverSend({ type: "ack", id: "u1", partition: 1, offset: 0 });
  assert.equal((await retried).id, "u1");
  const pending = client.send("bob", 3);
  client.close();
  await assert.rejects(pending, { code: "closed" });
  assert.equal(socket.closedByClient, 1000);
});

test("retry-after, refused handshakes and fatal answers", BOUNDED, async () => {
  const gw = new FakeGateway();
  gw.answers = [
    { status: 503, body: { error: "no_owner", partition: 1 }, headers: { "retry-after": "0.05" } },
  ];
  const client = gw.client();
  const events = record(client);
  client.connect();
  await until("socket", () => gw.sockets.length === 1);
  const waited = events.find((e) => e.state === "reconnecting");
  assert.equal(waited.delay, 50);
  assert.equal(waited.reason, "no_owner");
  // A browser shows a refused handshake (421) as a close before open.
  gw.sockets[0].serverClose(1006);
  await until("another try", () => gw.sockets.length === 2);
  gw.sockets[1].serverOpen({ offset: 0 });
  assert.equal(client.state, "connected");
  gw.sockets[1].serverClose(1008, "too many bad frames");
  await until("closed", () => client.state === "closed");
  assert.equal(events.at(-1).code, 1008);

  gw.answers = [{ status: 403, body: { error: "forbidden" } }];
  const refused = gw.client();
  await assert.rejects(refused.connect(), { status: 403, code: "forbidden" });
  assert.equal(refused.state, "closed");
});

test("gap, stale cursor and a silent connection", BOUNDED, async () => {
  const gw = new FakeGateway();
  const client = gw.client({ resume: 40, pingIntervalMs: 20 });
  const events = record(client);
  client.connect();
  await until("socket", () => gw.sockets.length === 1);
  assert.equal(gw.sockets[0].url.searchParams.get("resume"), "40");
  // The log restarted below our cursor: the cursor must not hide new messages.
  gw.sockets[0].serverOpen({ offset: 3, resumed: true });
  assert.deepEqual(
    events.find((e) => e.type === "cursorreset"),
    { type: "cursorreset", cursor: 40, offset: 3 },
  );
  assert.equal(client.cursor, 2);
  // Nothing comes back to our pings: presumed dead, reconnect.
  await until("ping", () => gw.sockets[0].sent.some((f) => f.type === "ping"));
  await until("second socket", () => gw.sockets.length === 2);
  // The server could not replay from 2: a gap, and the cursor jumps to the log end.
  gw.sockets[1].serverOpen({ offset: 50, resumed: false });
  assert.deepEqual(
    events.find((e) => e.type === "gap"),
    { type: "gap", cursor: 2, offset: 50 },
  );
  assert.equal(client.cursor, 49);
  client.close();
});
