// Group sends (a list of uids), their acks, resends and the recipients of
// group messages; messages published by the server API.

import assert from "node:assert/strict";
import { test } from "node:test";

import { BOUNDED, FakeGateway, linechat, message, until } from "./support.mjs";

const { LineChatClient, recipientProblem } = linechat;

const uids = (n, prefix = "u") => Array.from({ length: n }, (_, i) => `${prefix}${i}`);

test("a list is a group send, acked per recipient partition", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, events, socket } = await gw.connected();
  const acked = client.send(["bob", "carol", "dave"], { text: "hi all" }, { id: "g1" });
  assert.deepEqual(socket.sends(), [
    { type: "send", id: "g1", to: ["bob", "carol", "dave"], body: { text: "hi all" } },
  ]);
  const acks = [
    { partition: 3, offset: 17, to: ["bob", "dave"] },
    { partition: 5, offset: 2, to: ["carol"] },
  ];
  socket.serverSend({ type: "ack", id: "g1", acks });
  assert.deepEqual(await acked, { id: "g1", acks });
  assert.deepEqual(
    events.find((e) => e.type === "ack"),
    { type: "ack", id: "g1", acks },
  );
  assert.deepEqual(
    events.find((e) => e.type === "sent"),
    { type: "sent", id: "g1", to: ["bob", "carol", "dave"], attempt: 1 },
  );
  // A list of one is still a group send, with a group ack.
  const single = client.send(["bob"], 1, { id: "g2" });
  assert.deepEqual(socket.sends().at(-1).to, ["bob"]);
  socket.serverSend({ type: "ack", id: "g2", acks: [{ partition: 3, offset: 18, to: ["bob"] }] });
  assert.deepEqual(await single, { id: "g2", acks: [{ partition: 3, offset: 18, to: ["bob"] }] });
  // A uid alone keeps the one-to-one ack.
  const direct = client.send("bob", 2, { id: "d1" });
  assert.equal(socket.sends().at(-1).to, "bob");
  socket.serverSend({ type: "ack", id: "d1", partition: 3, offset: 19 });
  assert.deepEqual(await direct, { id: "d1", partition: 3, offset: 19 });
  client.close();
});

test("a bad list is refused locally and nothing is written", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, events, socket } = await gw.connected({ maxRecipients: 3 });
  const refusals = [
    [[], /no recipients/],
    [["a", "b", "c", "d"], /4 recipients, more than the 3 allowed/],
    [["a", "b", "a"], /recipient a is listed twice/],
    [["a", "not a uid"], /to\[1\] is not a valid uid: "not a uid"/],
    [["a", ""], /to\[1\] is not a valid uid/],
    [["a", 7], /to\[1\] is not a valid uid: 7/],
    [["a", "x".repeat(129)], /to\[1\] is not a valid uid/],
    [["a", null], /to\[1\] is not a valid uid: null/],
  ];
  for (const [to, reason] of refusals) {
    await assert.rejects(client.send(to, "hello", { id: "bad" }), (error) => {
      assert.ok(error instanceof linechat.LineChatError, String(error));
      assert.equal(error.code, "bad_recipient");
      assert.equal(error.id, "bad");
      assert.match(error.message, reason);
      return true;
    });
  }
  assert.deepEqual(socket.sends(), []);
  assert.deepEqual(
    events.filter((e) => e.type === "sent"),
    [],
  );
  // Nothing stayed pending either: the id is free, and a reconnect resends nothing.
  const ok = client.send(["a", "b", "c"], "hello", { id: "bad" });
  socket.serverSend({ type: "ack", id: "bad", acks: [{ partition: 0, offset: 0, to: ["a", "b", "c"] }] });
  assert.equal((await ok).acks.length, 1);
  socket.serverClose(1012);
  await until("second socket", () => gw.sockets.length === 2);
  gw.sockets[1].serverOpen({ offset: 1, resumed: true });
  assert.deepEqual(gw.sockets[1].sends(), []);
  client.close();
});

test("refused before connecting too, with the default limit of 100", BOUNDED, async () => {
  const gw = new FakeGateway();
  const client = gw.client();
  await assert.rejects(client.send(uids(101), 1), { code: "bad_recipient" });
  const hundred = client.send(uids(100), 1, { id: "h1" }); // waits for a connection
  client.connect();
  await until("socket", () => gw.sockets.length === 1);
  gw.sockets[0].serverOpen({ offset: 0 });
  assert.deepEqual(gw.sockets[0].sends()[0].to, uids(100));
  gw.sockets[0].serverSend({ type: "ack", id: "h1", acks: [{ partition: 0, offset: 0, to: uids(100) }] });
  assert.equal((await hundred).acks[0].to.length, 100);
  client.close();
  assert.throws(() => new LineChatClient(gw.options({ maxRecipients: 0 })), TypeError);
  assert.throws(() => new LineChatClient(gw.options({ maxRecipients: 2.5 })), TypeError);
});

test("recipientProblem", BOUNDED, () => {
  assert.equal(recipientProblem("bob"), null);
  assert.equal(recipientProblem(["bob", "carol"]), null);
  assert.equal(recipientProblem(uids(100)), null);
  assert.match(recipientProblem(uids(101)), /101 recipients/);
  assert.equal(recipientProblem(uids(5), 5), null);
  assert.match(recipientProblem(uids(6), 5), /more than the 5 allowed/);
  assert.match(recipientProblem("no spaces"), /not a valid uid/);
  assert.match(recipientProblem(undefined), /not a valid uid: undefined/);
  assert.match(recipientProblem(["b", "b"]), /listed twice/);
  // A long bad value is shortened in the message.
  assert.ok(recipientProblem(["!".repeat(500)]).length < 150);
});

test("unacked group sends go out again, same id and same list, after a reconnect", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, events, socket } = await gw.connected();
  const list = ["bob", "carol"];
  const acked = client.send(list, { text: "hi" }, { id: "g1" });
  list.push("mallory"); // the caller's array is not the message's
  const direct = client.send("bob", "second", { id: "d1" });
  socket.serverClose(1012, "partition moved");
  await until("second socket", () => gw.sockets.length === 2);
  const second = gw.sockets[1];
  second.serverOpen({ offset: 1, resumed: true });
  assert.deepEqual(second.sends(), [
    { type: "send", id: "g1", to: ["bob", "carol"], body: { text: "hi" } },
    { type: "send", id: "d1", to: "bob", body: "second" },
  ]);
  const acks = [{ partition: 3, offset: 4, to: ["bob", "carol"] }];
  second.serverSend({ type: "ack", id: "g1", acks });
  second.serverSend({ type: "ack", id: "d1", partition: 3, offset: 5 });
  assert.deepEqual(await acked, { id: "g1", acks });
  assert.deepEqual(await direct, { id: "d1", partition: 3, offset: 5 });
  assert.deepEqual(
    events.filter((e) => e.type === "sent" && e.id === "g1").map((e) => e.attempt),
    [1, 2],
  );
  client.close();
});

test("unavailable and errors for a group send", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, socket } = await gw.connected();
  const retried = client.send(["bob", "carol"], 1, { id: "u1" });
  socket.serverSend({ type: "error", id: "u1", code: "unavailable", message: "broker" });
  await until("resend after unavailable", () => socket.sends().filter((f) => f.id === "u1").length === 2);
  assert.deepEqual(socket.sends()[1].to, ["bob", "carol"]);
  socket.serverSend({ type: "ack", id: "u1", acks: [{ partition: 0, offset: 9, to: ["bob", "carol"] }] });
  assert.equal((await retried).acks[0].offset, 9);
  // The server's own check (e.g. a lower limits.max_recipients than ours).
  const refused = client.send(["bob", "carol"], 1, { id: "r1" });
  socket.serverSend({ type: "error", id: "r1", code: "bad_recipient", message: "too many" });
  await assert.rejects(refused, { code: "bad_recipient", message: "too many" });
  client.close();
});

test("a group ack in the one-to-one form still resolves with acks", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, socket } = await gw.connected();
  const acked = client.send(["bob", "carol"], 1, { id: "g1" });
  socket.serverSend({ type: "ack", id: "g1", partition: 2, offset: 7 });
  assert.deepEqual(await acked, { id: "g1", acks: [{ partition: 2, offset: 7, to: ["bob", "carol"] }] });
  client.close();
});

test("group messages carry their recipients; one-to-one messages do not", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, events, socket } = await gw.connected();
  socket.serverSend(message(1, "m1", { recipients: ["carol", "alice", "bob"] }));
  socket.serverSend(message(2, "m2"));
  const received = events.filter((e) => e.type === "message");
  assert.deepEqual(received[0].recipients, ["carol", "alice", "bob"]);
  assert.equal(received[0].to, "alice");
  assert.ok(!("recipients" in received[1]), JSON.stringify(received[1]));
  // The sender resent its group send (no ack reached it): the copy at a new offset is dropped.
  socket.serverSend(message(3, "m1", { recipients: ["carol", "alice", "bob"] }));
  assert.equal(events.filter((e) => e.type === "message").length, 2);
  assert.equal(client.duplicatesDropped, 1);
  assert.equal(client.cursor, 3);
  client.close();
});

test("server-published messages, and their retries, arrive once", BOUNDED, async () => {
  const gw = new FakeGateway();
  const { client, events, socket } = await gw.connected();
  const published = (offset, id, from = "billing") =>
    message(offset, id, { from, from_device: "server", body: { kind: "notice" } });
  socket.serverSend(published(1, "p1"));
  socket.serverSend(published(2, "p1")); // the service retried its publish
  socket.serverSend(published(3, "p1", "alerts")); // another service's p1 is another message
  socket.serverSend(message(4, "p1")); // and so is bob's own p1 from his device
  const received = events.filter((e) => e.type === "message");
  assert.deepEqual(
    received.map((e) => [e.from, e.fromDevice, e.id, e.offset]),
    [
      ["billing", "server", "p1", 1],
      ["alerts", "server", "p1", 3],
      ["bob", "b1", "p1", 4],
    ],
  );
  assert.equal(client.duplicatesDropped, 1);
  client.close();
});
