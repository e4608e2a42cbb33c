"""The demo page's files: how the HTTP API serves them, and the JS client's logic.

The JS client is checked under Node (when installed) against a fake WebSocket,
fetch and storage: cursor and device persistence, duplicate drops, resends
with the same id after a reconnect, backoff events, Retry-After, fatal answers.
The whole thing in a real browser is tests/integration/test_browser.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from linechatd.config import parse_config
from linechatd.http import HttpApi
from linechatd.static import CONTENT_SECURITY_POLICY, asset_for, asset_paths

STATIC_DIR = Path(__file__).resolve().parents[2] / "linechatd" / "static"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def make_api(demo_page: bool) -> HttpApi:
    config = parse_config(
        {
            "zookeeper": {"hosts": "127.0.0.1:2181"},
            "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
            "http": {"demo_page": demo_page},
        }
    )
    ctx = SimpleNamespace(config=SimpleNamespace(value=config))
    return HttpApi(ctx, instance=None)  # type: ignore[arg-type]


async def request(api: HttpApi, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await api(scope, receive, send)
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body["body"]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/linechat.js", "text/javascript; charset=utf-8"),
        ("/static/demo.js", "text/javascript; charset=utf-8"),
        ("/static/demo.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
    ],
)
async def test_demo_files_are_served_when_enabled(path: str, content_type: str) -> None:
    status, headers, body = await request(make_api(demo_page=True), "GET", path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body) > 0
    if path == "/":
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("path", ["/", "/static/linechat.js", "/static/demo.css"])
async def test_demo_files_are_not_found_when_disabled(path: str) -> None:
    status, headers, body = await request(make_api(demo_page=False), "GET", path)
    assert status == 404
    assert json.loads(body) == {"error": "not_found"}


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/__init__.py",
        "/static/../http.py",
        "/static/%2e%2e/http.py",
        "/demo.html",
        "/static/linechat.js/",
    ],
)
async def test_only_the_listed_files_are_served(path: str) -> None:
    status, _headers, _body = await request(make_api(demo_page=True), "GET", path)
    assert status == 404
    assert asset_for(path) is None


async def test_other_methods_do_not_reach_the_files() -> None:
    status, _headers, _body = await request(make_api(demo_page=True), "POST", "/")
    assert status == 404


async def test_api_routes_still_win_with_the_demo_on() -> None:
    status, headers, body = await request(make_api(demo_page=True), "GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_every_asset_exists_and_is_package_data() -> None:
    for path in asset_paths():
        asset = asset_for(path)
        assert asset is not None and asset.body, path
    package_data = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*" in package_data["linechatd"]


def test_the_page_needs_no_inline_script_or_style() -> None:
    # The CSP forbids both; an inline one would silently not run.
    html = (STATIC_DIR / "demo.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert not re.search(r"<script\b[^>]*>(?!\s*</script>)", html), "inline script"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    # Every file the page loads is one the server serves.
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert asset_for(ref) is not None, ref


# --- the JS client under Node ----------------------------------------------------------

NODE = shutil.which("node")

# A scripted gateway: fetch answers connection-url, FakeSocket plays the server.
JS_HARNESS = r"""
import assert from "node:assert/strict";
import { webcrypto } from "node:crypto";

// What every browser has and Node 18 keeps behind flags.
globalThis.crypto ??= webcrypto;
globalThis.CustomEvent ??= class CustomEvent extends Event {
  constructor(type, init = {}) { super(type, init); this.detail = init.detail ?? null; }
};
const { LineChatClient, memoryStorage } = await import(process.argv[2]);

const sockets = [];
class FakeSocket {
  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    this.closedByClient = null;
    sockets.push(this);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code) { this.closedByClient = code; this.readyState = 3; }
  serverOpen(welcome) {
    this.readyState = 1;
    this.serverSend({ type: "welcome", uid: "alice", device: "d", partition: 1,
                      instance: "gw-0", resumed: null, ...welcome });
  }
  serverSend(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
  serverClose(code, reason = "") { this.readyState = 3; this.onclose({ code, reason }); }
}

let answers = [];
async function fakeFetch(url) {
  const answer = answers.shift() ?? { status: 200, body: { url: "ws://gw/ws", partition: 1, instance: "gw-0" } };
  return {
    status: answer.status,
    headers: { get: (name) => (answer.headers ?? {})[name.toLowerCase()] ?? null },
    json: async () => answer.body,
  };
}

const tick = () => new Promise((r) => setTimeout(r, 5));
async function until(what, predicate, ms = 3000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await tick();
  }
}
function record(client) {
  const events = [];
  for (const type of ["state", "message", "sent", "ack", "gap", "cursorreset", "servererror"]) {
    client.on(type, (detail) => events.push({ type, ...detail }));
  }
  return events;
}
const options = (extra = {}) => ({ uid: "alice", httpUrl: "http://api", fetch: fakeFetch,
  WebSocket: FakeSocket, initialBackoffMs: 2, maxBackoffMs: 20, ...extra });
const message = (offset, id, extra = {}) => ({ type: "message", from: "bob", from_device: "b1",
  to: "alice", id, body: { kind: "text", text: id }, partition: 1, offset, ts: 1, ...extra });

const tests = {
  async "cursor, device and duplicates"() {
    const storage = memoryStorage();
    const client = new LineChatClient(options({ storage }));
    const events = record(client);
    const connected = client.connect();
    await until("socket", () => sockets.length === 1);
    const first = sockets[0];
    assert.equal(first.url.searchParams.get("uid"), "alice");
    assert.equal(first.url.searchParams.get("resume"), null);
    first.serverOpen({ offset: 5 });
    assert.equal((await connected).instance, "gw-0");
    assert.equal(client.cursor, 4);
    first.serverSend(message(5, "m1"));
    first.serverSend(message(5, "m1"));            // same offset again
    first.serverSend(message(7, "m1"));            // a resend of m1 at a new offset
    first.serverSend(message(8, "m2"));
    assert.deepEqual(events.filter((e) => e.type === "message").map((e) => [e.id, e.offset]),
                     [["m1", 5], ["m2", 8]]);
    assert.equal(client.duplicatesDropped, 2);
    assert.equal(client.cursor, 8);
    client.close();
    assert.equal(client.state, "closed");
    // A new page of the same browser: same device, resumes from the stored cursor.
    const again = new LineChatClient(options({ storage }));
    assert.equal(again.device, client.device);
    assert.equal(again.cursor, 8);
    again.connect();
    await until("second socket", () => sockets.length === 2);
    assert.equal(sockets[1].url.searchParams.get("resume"), "8");
    assert.equal(sockets[1].url.searchParams.get("device"), client.device);
    again.close();
  },

  async "unacked sends go out again with the same id after 1012"() {
    const client = new LineChatClient(options({ storage: memoryStorage() }));
    const events = record(client);
    client.connect();
    await until("socket", () => sockets.length === 1);
    sockets[0].serverOpen({ offset: 0 });
    const acked = client.send("bob", { text: "hi" }, { id: "x1" });
    assert.deepEqual(sockets[0].sent, [{ type: "send", id: "x1", to: "bob", body: { text: "hi" } }]);
    sockets[0].serverClose(1012, "partition moved");
    await until("reconnecting", () => client.state === "reconnecting");
    const queued = client.send("bob", "while away", { id: "x2" });
    const reconnecting = events.find((e) => e.type === "state" && e.state === "reconnecting");
    assert.equal(reconnecting.attempt, 1);
    assert.equal(reconnecting.code, 1012);
    assert.ok(reconnecting.delay >= 0 && reconnecting.delay <= 2);
    await until("second socket", () => sockets.length === 2);
    assert.equal(sockets[1].url.searchParams.get("resume"), "-1");
    sockets[1].serverOpen({ offset: 3, resumed: true, instance: "gw-1" });
    assert.deepEqual(sockets[1].sent.map((f) => f.id), ["x1", "x2"]);
    sockets[1].serverSend({ type: "ack", id: "x1", partition: 2, offset: 9 });
    sockets[1].serverSend({ type: "ack", id: "x2", partition: 2, offset: 10 });
    assert.deepEqual(await acked, { id: "x1", partition: 2, offset: 9 });
    assert.equal((await queued).offset, 10);
    const sent = events.filter((e) => e.type === "sent").map((e) => [e.id, e.attempt]);
    assert.deepEqual(sent, [["x1", 1], ["x1", 2], ["x2", 1]]);
    client.close();
  },

  async "errors, unavailable and send validation"() {
    const client = new LineChatClient(options({ storage: memoryStorage(), maxFrameBytes: 256 }));
    client.connect();
    await until("socket", () => sockets.length === 1);
    sockets[0].serverOpen({ offset: 0 });
    const limited = client.send("bob", 1, { id: "r1" });
    sockets[0].serverSend({ type: "error", id: "r1", code: "rate_limited", message: "slow down" });
    await assert.rejects(limited, { code: "rate_limited" });
    await assert.rejects(client.send("not a uid", 1), { code: "bad_recipient" });
    await assert.rejects(client.send("bob", "x".repeat(300)), { code: "too_large" });
    await assert.rejects(client.send("bob", 1, { timeoutMs: 10 }), { code: "timeout" });
    const retried = client.send("bob", 2, { id: "u1" });
    sockets[0].serverSend({ type: "error", id: "u1", code: "unavailable", message: "broker" });
    await until("resend after unavailable", () => sockets[0].sent.filter((f) => f.id === "u1").length === 2, 3000);
    sockets[0].serverSend({ type: "ack", id: "u1", partition: 1, offset: 0 });
    assert.equal((await retried).id, "u1");
    const pending = client.send("bob", 3);
    client.close();
    await assert.rejects(pending, { code: "closed" });
    assert.equal(sockets[0].closedByClient, 1000);
  },

  async "retry-after, refused handshakes and fatal answers"() {
    answers = [{ status: 503, body: { error: "no_owner", partition: 1 }, headers: { "retry-after": "0.05" } }];
    const client = new LineChatClient(options({ storage: memoryStorage() }));
    const events = record(client);
    client.connect();
    await until("socket", () => sockets.length === 1);
    const waited = events.find((e) => e.state === "reconnecting");
    assert.equal(waited.delay, 50);
    assert.equal(waited.reason, "no_owner");
    // A browser shows a refused handshake (421) as a close before open.
    sockets[0].serverClose(1006);
    await until("another try", () => sockets.length === 2);
    sockets[1].serverOpen({ offset: 0 });
    assert.equal(client.state, "connected");
    sockets[1].serverClose(1008, "too many bad frames");
    await until("closed", () => client.state === "closed");
    assert.equal(events.at(-1).code, 1008);

    answers = [{ status: 403, body: { error: "forbidden" } }];
    const refused = new LineChatClient(options({ storage: memoryStorage() }));
    await assert.rejects(refused.connect(), { status: 403, code: "forbidden" });
    assert.equal(refused.state, "closed");
  },

  async "gap, stale cursor and a silent connection"() {
    const storage = memoryStorage();
    const client = new LineChatClient(options({ storage, resume: 40, pingIntervalMs: 20 }));
    const events = record(client);
    client.connect();
    await until("socket", () => sockets.length === 1);
    assert.equal(sockets[0].url.searchParams.get("resume"), "40");
    // The log restarted below our cursor: the cursor must not hide new messages.
    sockets[0].serverOpen({ offset: 3, resumed: true });
    assert.deepEqual(events.find((e) => e.type === "cursorreset"), { type: "cursorreset", cursor: 40, offset: 3 });
    assert.equal(client.cursor, 2);
    // Nothing comes back to our pings: presumed dead, reconnect.
    await until("ping", () => sockets[0].sent.some((f) => f.type === "ping"));
    await until("second socket", () => sockets.length === 2, 2000);
    // The server could not replay from 2: a gap, and the cursor jumps to the log end.
    sockets[1].serverOpen({ offset: 50, resumed: false });
    assert.deepEqual(events.find((e) => e.type === "gap"), { type: "gap", cursor: 2, offset: 50 });
    assert.equal(client.cursor, 49);
    client.close();
  },
};

for (const [name, test] of Object.entries(tests)) {
  sockets.length = 0;
  answers = [];
  try {
    await test();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`FAILED ${name}: ${error.stack}`);
    process.exitCode = 1;
  }
}
process.exit();
"""


@pytest.mark.skipif(NODE is None, reason="node not found: the JS client tests need Node.js >= 18")
def test_js_client_logic(tmp_path: Path) -> None:
    harness = tmp_path / "harness.mjs"
    harness.write_text(JS_HARNESS, encoding="utf-8")
    assert NODE is not None
    result = subprocess.run(
        [NODE, str(harness), (STATIC_DIR / "linechat.js").as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 5, result.stdout
