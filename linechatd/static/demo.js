// The demo page: one LineChatClient, a message list and a connection panel.
//
// "delivered" is a demo convention, not part of the protocol: a page that gets a
// text message answers its sender with a receipt message
// ({"kind": "receipt", "ids": [...]}); the sender's page marks those ids delivered.

import { LineChatClient, isValidUid } from "./linechat.js";

const LAST_UID_KEY = "linechat-demo:uid";
const LAST_TO_KEY = "linechat-demo:to";
const MAX_EVENTS = 60;

const $ = (id) => document.getElementById(id);

let client = null;
const outgoing = new Map(); // message id -> <li>

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

function addMessageItem({ direction, id, peer, text, meta }) {
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
  item.append(head, body);
  if (direction === "out") {
    item.dataset.to = peer;
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
  const item = outgoing.get(id);
  if (!item) return;
  // The receipt can overtake the ack; never step back.
  if (item.dataset.state && STATE_RANK[item.dataset.state] >= STATE_RANK[state]) return;
  item.dataset.state = state;
  const pill = item.querySelector(".pill");
  pill.className = `pill ${state}`;
  pill.textContent = state;
  if (where) item.querySelector(".where").textContent = where;
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
    for (const id of body.ids) setMessageState(String(id), "delivered");
    return;
  }
  const item = addMessageItem({
    direction: "in",
    id: message.id,
    peer: message.from,
    text: describeBody(body),
    meta: `from ${message.from} · ${clock(message.ts)} · p${message.partition} #${message.offset}`,
  });
  item.dataset.offset = String(message.offset);
  if (message.from === client.uid) {
    setMessageState(message.id, "delivered"); // a note to self: we are the recipient
  } else if (body && typeof body === "object" && body.kind === "text") {
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
    setMessageState(d.id, "acked", `p${d.partition} #${d.offset}`);
    refreshFacts();
  });
  (isValidUid($("to").value) ? $("text") : $("to")).focus();
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
  const to = $("to").value.trim();
  const text = $("text").value;
  if (!client || !isValidUid(to) || !text) return;
  remember(LAST_TO_KEY, to);
  const id = client.newId();
  const item = addMessageItem({
    direction: "out",
    id,
    peer: to,
    text,
    meta: `to ${to} · ${clock()}`,
  });
  outgoing.set(id, item);
  setMessageState(id, "queued");
  $("text").value = "";
  $("text").focus();
  client.send(to, { kind: "text", text }, { id }).catch((error) => {
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
