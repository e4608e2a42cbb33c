// The demo page: one LineChatClient, a message list and a connection panel.
//
// "delivered" is a demo convention, not part of the protocol: a page that gets a
// text message answers its sender with a receipt message
// ({"kind": "receipt", "ids": [...]}); the sender's page marks those ids delivered
// once every recipient has answered.
//
// The "to" field takes one uid (a one-to-one send) or several, separated by
// commas or spaces (a group send).

import { LineChatClient, isValidUid, recipientProblem } from "./linechat.js";

const LAST_UID_KEY = "linechat-demo:uid";
const LAST_TO_KEY = "linechat-demo:to";
const MAX_EVENTS = 60;

const $ = (id) => document.getElementById(id);

let client = null;
const outgoing = new Map(); // message id -> {item, recipients, delivered: Set of uids}

function remember(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // the demo still works, it just forgets the uid on reload
  }
}

function recall(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function clock(ms = Date.now()) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function logEvent(text, kind = "") {
  const item = document.createElement("li");
  item.className = kind;
  const time = document.createElement("time");
  time.textContent = clock();
  item.append(time, " ", text);
  const list = $("events");
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

function setFact(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function refreshFacts() {
  if (!client) return;
  setFact("f-cursor", client.cursor);
  setFact("f-connections", client.connections);
  setFact("f-dupes", client.duplicatesDropped);
  $("conn").dataset.connections = String(client.connections);
}

function showState(detail) {
  const badge = $("conn");
  badge.dataset.state = detail.state;
  let text;
  switch (detail.state) {
    case "connecting":
      text = "connecting…";
      break;
    case "connected":
      text = `connected · ${detail.instance} · partition ${detail.partition}`;
      badge.dataset.instance = detail.instance;
      badge.dataset.partition = String(detail.partition);
      setFact("f-instance", detail.instance);
      setFact("f-partition", detail.partition);
      break;
    case "reconnecting": {
      const why = detail.code ? ` after ${detail.code}` : "";
      text = `reconnecting${why} · attempt ${detail.attempt} in ${(detail.delay / 1000).toFixed(1)} s`;
      break;
    }
    case "closed":
      text = `closed${detail.code ? ` (${detail.code})` : ""}${detail.reason ? `: ${detail.reason}` : ""}`;
      break;
    default:
      text = detail.state;
  }
  $("conn-text").textContent = text;
  setFact("f-state", detail.state);
  refreshFacts();
}

function describeBody(body) {
  if (body && typeof body === "object" && body.kind === "text" && typeof body.text === "string") {
    return body.text;
  }
  return JSON.stringify(body);
}

/** The uids typed in the "to" field, in order. */
function parseRecipients(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

/** What send() takes: a uid alone for one recipient, the list for a group. */
function addressee(recipients) {
  return recipients.length === 1 ? recipients[0] : recipients;
}

function showToError(text) {
  const box = $("to-error");
  box.textContent = text;
  box.hidden = !text;
  $("to").setCustomValidity(text);
}

/** "to you, bob, carol": a group message's recipients, this page's user marked. */
function recipientsLine(recipients) {
  const line = document.createElement("div");
  line.className = "recipients";
  line.append("to ");
  recipients.forEach((uid, index) => {
    if (index > 0) line.append(", ");
    if (client && uid === client.uid) {
      const you = document.createElement("span");
      you.className = "you";
      you.textContent = "you";
      line.append(you);
    } else {
      line.append(uid);
    }
  });
  return line;
}

function addMessageItem({ direction, id, peer, text, meta, recipients = null }) {
  const item = document.createElement("li");
  item.className = `msg ${direction}`;
  item.dataset.id = id;
  item.dataset.text = text;
  const head = document.createElement("div");
  head.className = "meta";
  head.textContent = meta;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(head);
  if (recipients) {
    item.dataset.recipients = recipients.join(",");
    item.append(recipientsLine(recipients));
  }
  item.append(body);
  if (direction === "out") {
    item.dataset.to = peer;
    if (recipients) {
      const receipts = document.createElement("div");
      receipts.className = "receipts";
      item.append(receipts);
    }
    const status = document.createElement("div");
    status.className = "status";
    const pill = document.createElement("span");
    pill.className = "pill";
    const where = document.createElement("span");
    where.className = "where";
    status.append(pill, where);
    item.append(status);
  } else {
    item.dataset.from = peer;
  }
  $("messages").append(item);
  $("empty").hidden = true;
  item.scrollIntoView({ block: "nearest" });
  return item;
}

const STATE_RANK = { queued: 0, sent: 1, acked: 2, delivered: 3, failed: 4 };

function setMessageState(id, state, where) {
  const item = outgoing.get(id)?.item;
  if (!item) return;
  // The receipt can overtake the ack; never step back.
  if (item.dataset.state && STATE_RANK[item.dataset.state] >= STATE_RANK[state]) return;
  item.dataset.state = state;
  const pill = item.querySelector(".pill");
  pill.className = `pill ${state}`;
  pill.textContent = state;
  if (where) item.querySelector(".where").textContent = where;
}

/** `uid`'s page has message `id`: delivered once every recipient's page has it. */
function markDelivered(id, uid) {
  const entry = outgoing.get(id);
  if (!entry || !entry.recipients.includes(uid)) return;
  entry.delivered.add(uid);
  const receipts = entry.item.querySelector(".receipts");
  if (receipts) {
    const who = entry.recipients.filter((r) => entry.delivered.has(r));
    receipts.textContent = `delivered to ${who.join(", ")} (${who.length} of ${entry.recipients.length})`;
  }
  if (entry.delivered.size === entry.recipients.length) setMessageState(id, "delivered");
}

function ackWhere(ack) {
  // A group send has one entry per recipient partition.
  const entries = ack.acks ?? [ack];
  return entries.map((a) => `p${a.partition} #${a.offset}`).join(" · ");
}

function sendReceipt(to, ids) {
  client.send(to, { kind: "receipt", ids }).catch((error) => {
    logEvent(`receipt to ${to} failed: ${error.code || error.message}`, "warn");
  });
}

function onMessage(message) {
  refreshFacts();
  const body = message.body;
  if (body && typeof body === "object" && body.kind === "receipt" && Array.isArray(body.ids)) {
    for (const id of body.ids) markDelivered(String(id), message.from);
    return;
  }
  // Messages from the application's backend (the server API) come from device "server".
  const sender = message.fromDevice === "server" ? `${message.from} (server)` : message.from;
  const item = addMessageItem({
    direction: "in",
    id: message.id,
    peer: message.from,
    text: describeBody(body),
    meta: `from ${sender} · ${clock(message.ts)} · p${message.partition} #${message.offset}`,
    recipients: message.recipients ?? null,
  });
  item.dataset.offset = String(message.offset);
  if (message.from === client.uid) {
    markDelivered(message.id, client.uid); // a note to self: we are a recipient
  } else if (message.fromDevice !== "server" && body && typeof body === "object" && body.kind === "text") {
    sendReceipt(message.from, [message.id]);
  }
}

function startClient(uid) {
  client = new LineChatClient({ uid });
  remember(LAST_UID_KEY, uid);
  $("me").textContent = uid;
  $("device").textContent = client.device;
  $("login").hidden = true;
  $("login-error").hidden = true;
  $("chat").hidden = false;
  document.title = `${uid} · linechatd demo`;

  client.on("state", showState);
  client.on("connected", (d) => {
    const how = { true: "resumed", false: "could not resume", null: "live" }[String(d.resumed)];
    logEvent(`connected to ${d.instance}, partition ${d.partition} (${how})`, "ok");
  });
  client.on("reconnecting", (d) =>
    logEvent(
      `reconnecting (attempt ${d.attempt}, ${Math.round(d.delay)} ms)${d.code ? `, closed ${d.code}` : ""}${d.reason ? `: ${d.reason}` : ""}`,
      "warn",
    ),
  );
  client.on("closed", (d) => logEvent(`closed ${d.code ?? ""} ${d.reason}`, "bad"));
  client.on("gap", (d) => logEvent(`could not resume from ${d.cursor}: older messages are gone`, "bad"));
  client.on("cursorreset", (d) => logEvent(`stored cursor ${d.cursor} is from another log; reset`, "warn"));
  client.on("servererror", (d) => logEvent(`server error ${d.code}: ${d.message}`, "bad"));
  client.on("message", onMessage);
  client.on("sent", (d) => {
    setMessageState(d.id, "sent");
    if (d.attempt > 1) logEvent(`resent ${d.id} (attempt ${d.attempt})`);
  });
  client.on("ack", (d) => {
    setMessageState(d.id, "acked", ackWhere(d));
    refreshFacts();
  });
  (recipientProblem(addressee(parseRecipients($("to").value))) === null ? $("text") : $("to")).focus();
  client.connect().catch((error) => {
    // Refused for good (bad uid, auth): back to the form, with the reason.
    const box = $("login-error");
    box.textContent = `Cannot connect as ${uid}: ${error.message}`;
    box.hidden = false;
    $("login").hidden = false;
    $("chat").hidden = true;
    $("uid").value = uid;
  });
}

function onSend(event) {
  event.preventDefault();
  const recipients = parseRecipients($("to").value);
  const text = $("text").value;
  if (!client || !text) return;
  // The client refuses a bad list too; checking first keeps the text and says why.
  const problem = recipients.length === 0 ? "name at least one uid" : recipientProblem(addressee(recipients));
  if (problem !== null) {
    showToError(`Cannot send: ${problem}`);
    $("to").focus();
    return;
  }
  showToError("");
  remember(LAST_TO_KEY, recipients.join(", "));
  const id = client.newId();
  const group = recipients.length > 1;
  const item = addMessageItem({
    direction: "out",
    id,
    peer: recipients.join(","),
    text,
    meta: group ? `${clock()}` : `to ${recipients[0]} · ${clock()}`,
    recipients: group ? recipients : null,
  });
  outgoing.set(id, { item, recipients, delivered: new Set() });
  setMessageState(id, "queued");
  $("text").value = "";
  $("text").focus();
  client.send(addressee(recipients), { kind: "text", text }, { id }).catch((error) => {
    setMessageState(id, "failed", error.code || error.message);
    logEvent(`send ${id} failed: ${error.code || error.message}`, "bad");
  });
}

function onLogin(event) {
  event.preventDefault();
  const uid = $("uid").value.trim();
  if (!isValidUid(uid)) return;
  const url = new URL(location.href);
  url.searchParams.set("uid", uid);
  history.replaceState(null, "", url);
  startClient(uid);
}

function onSwitch() {
  // A fresh page is the simplest way to drop every piece of the old user's state.
  const url = new URL(location.href);
  url.searchParams.delete("uid");
  location.assign(url);
}

function main() {
  $("login-form").addEventListener("submit", onLogin);
  $("send-form").addEventListener("submit", onSend);
  $("switch").addEventListener("click", onSwitch);
  $("to").addEventListener("input", () => showToError(""));
  const params = new URLSearchParams(location.search);
  const to = params.get("to") || recall(LAST_TO_KEY);
  if (to) $("to").value = to;
  const uid = params.get("uid");
  if (isValidUid(uid)) {
    startClient(uid);
  } else {
    $("uid").value = recall(LAST_UID_KEY) || "";
    $("uid").focus();
  }
}

main();
