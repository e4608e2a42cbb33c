"""A trio chat client for linechatd: what tests, benchmarks and chat programs use.

    async with connect("http://127.0.0.1:8080", "alice") as client:
        ack = await client.send("bob", {"text": "hi"})
        async for message in client.messages():
            ...

It asks any instance for the connection url, connects, follows 421 and 1012
by asking again, reconnects with exponential backoff and jitter, resumes from
the highest offset it has seen (so nothing is lost across a failover), and
drops duplicates (by offset, and by sender/device/id for resent messages).
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio
import trio_websocket
from trio_util import AsyncValue

log = logging.getLogger(__name__)

# Close codes after which reconnecting cannot help.
_FATAL_CLOSES = {1008: "protocol violation", 4401: "token expired"}
_DEDUPE_MEMORY = 10_000


class ClientError(Exception):
    """The gateway refused us in a way retrying will not fix."""


class SendFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class State(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass(frozen=True)
class Ack:
    id: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Message:
    from_uid: str
    from_device: str
    to: str
    id: str
    body: Any
    partition: int
    offset: int
    ts: int


@dataclass(frozen=True)
class Welcome:
    instance: str
    partition: int
    offset: int
    resumed: bool | None


class _Refused(Exception):
    def __init__(
        self, status: int, body: Mapping[str, Any], retry_after: float | None = None
    ) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.retry_after = retry_after


async def http_get_json(
    url: str, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0
) -> tuple[int, dict[str, str], Any]:
    """A small HTTP/1.1 GET (h11 over a trio stream) returning (status, headers, json)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = h11.Connection(h11.CLIENT)
    request_headers = [
        ("host", f"{host}:{port}"),
        ("connection", "close"),
        ("accept", "application/json"),
    ]
    request_headers += list((headers or {}).items())
    with trio.fail_after(timeout_s):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if parts.scheme == "https":
            import ssl

            stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host)
        async with stream:
            await stream.send_all(
                conn.send(h11.Request(method="GET", target=target, headers=request_headers))
            )
            await stream.send_all(conn.send(h11.EndOfMessage()))
            status, response_headers, body = 0, {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > 1 << 20:
                        raise ClientError(f"{url}: response too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = body.decode(errors="replace")
    return status, response_headers, doc


class ChatClient:
    """One device of one user; see :func:`connect`."""

    def __init__(
        self,
        http_url: str,
        uid: str,
        *,
        device: str | None = None,
        token: str | None = None,
        resume: int | None = None,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        message_buffer: int = 10_000,
    ) -> None:
        self.http_url = http_url.rstrip("/")
        self.uid = uid
        self.device = device or secrets.token_hex(8)
        self.token = token
        # The highest offset received (or known not to concern us); resume from here.
        self.cursor: int | None = resume
        self.state: AsyncValue[State] = AsyncValue(State.CONNECTING)
        self.welcome: AsyncValue[Welcome | None] = AsyncValue(None)
        self.connections = 0  # successful connects, for tests and benchmarks
        self.duplicates_dropped = 0
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[str, Any, trio.Event, list[Ack | SendFailed]]] = {}
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Message](message_buffer)
        self._connected = trio.Event()
        self._send_lock = trio.Lock()
        self.fatal: Exception | None = None

    def __repr__(self) -> str:
        return f"<ChatClient uid={self.uid} device={self.device} {self.state.value.value}>"

    # -- public API -------------------------------------------------------------

    async def send(
        self, to: str, body: Any, *, id: str | None = None, timeout_s: float = 30.0
    ) -> Ack:
        """Send and wait for the ack; resent with the same id across reconnects."""
        msg_id = id or f"{self.device}-{next(self._ids)}"
        done = trio.Event()
        outcome: list[Ack | SendFailed] = []
        self._pending[msg_id] = (to, body, done, outcome)
        try:
            with trio.fail_after(timeout_s):
                await self._transmit(msg_id)
                await done.wait()
        finally:
            self._pending.pop(msg_id, None)
        result = outcome[0]
        if isinstance(result, SendFailed):
            raise result
        return result

    async def messages(self) -> AsyncIterator[Message]:
        async for message in self._inbox_recv:
            yield message

    async def receive(self, timeout_s: float | None = None) -> Message:
        if timeout_s is None:
            return await self._inbox_recv.receive()
        with trio.fail_after(timeout_s):
            return await self._inbox_recv.receive()

    async def wait_connected(self) -> None:
        await self.state.wait_value(State.CONNECTED)

    # -- connection loop ----------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[ChatClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = self._initial_backoff_s
        started = False
        try:
            while True:
                retry_after: float | None = None
                try:
                    url = await self._connection_url()
                    await self._session(url, task_status if not started else None)
                    started = True
                    backoff = self._initial_backoff_s
                except _Refused as exc:
                    code = exc.body.get("error") if isinstance(exc.body, Mapping) else None
                    if exc.status in (400, 401, 403):
                        raise ClientError(f"refused with {exc.status}: {exc.body}") from None
                    retry_after = exc.retry_after
                    log.debug(
                        "client_refused",
                        extra={"uid": self.uid, "status": exc.status, "code": code},
                    )
                except (
                    OSError,
                    trio_websocket.HandshakeError,
                    trio.TooSlowError,
                    h11.ProtocolError,
                ) as exc:
                    log.debug("client_connect_failed", extra={"uid": self.uid, "error": repr(exc)})
                except trio_websocket.ConnectionClosed as exc:
                    code = getattr(exc.reason, "code", None)
                    if code in _FATAL_CLOSES:
                        raise ClientError(f"closed with {code}: {_FATAL_CLOSES[code]}") from None
                    backoff = self._initial_backoff_s  # 1012/1013: reconnect promptly
                self._ws = None
                self.state.value = State.RECONNECTING
                delay = retry_after if retry_after is not None else random.uniform(0, backoff)
                await trio.sleep(delay)
                backoff = min(self._max_backoff_s, backoff * 2)
        except ClientError as exc:
            self.fatal = exc
            raise
        finally:
            self.state.value = State.CLOSED
            self._inbox_send.close()

    async def _connection_url(self) -> str:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else None
        status, response_headers, doc = await http_get_json(
            f"{self.http_url}/api/connection-url?{urlencode({'uid': self.uid})}", headers
        )
        if status != 200:
            retry = response_headers.get("retry-after")
            raise _Refused(
                status, doc if isinstance(doc, dict) else {}, float(retry) if retry else None
            )
        url: str = doc["url"]
        return url

    async def _session(self, url: str, task_status: trio.TaskStatus[ChatClient] | None) -> None:
        params: dict[str, str] = {"uid": self.uid, "device": self.device}
        if self.token:
            params["token"] = self.token
        if self.cursor is not None:
            params["resume"] = str(self.cursor)
        full = f"{url}?{urlencode(params)}"
        try:
            ws_cm = trio_websocket.open_websocket_url(
                full, message_queue_size=64, max_message_size=1 << 22
            )
            async with ws_cm as ws:
                first = json.loads(await ws.get_message())
                if first.get("type") != "welcome":
                    raise ClientError(f"expected welcome, got {first.get('type')}")
                welcome = Welcome(
                    first["instance"], first["partition"], first["offset"], first["resumed"]
                )
                if self.cursor is None or welcome.resumed is False:
                    # From now on nothing before the welcome offset concerns us.
                    floor = welcome.offset - 1
                    self.cursor = floor if self.cursor is None else max(self.cursor, floor)
                self._ws = ws
                self.welcome.value = welcome
                self.connections += 1
                self.state.value = State.CONNECTED
                if task_status is not None:
                    task_status.started(self)
                # Sends that never got their ack go out again, same ids.
                for msg_id in list(self._pending):
                    await self._transmit(msg_id)
                while True:
                    self._on_frame(json.loads(await ws.get_message()))
        except trio_websocket.HandshakeError as exc:
            rejection = getattr(exc, "status_code", None)
            if rejection is not None:
                body: Any = {}
                try:
                    body = json.loads(exc.body or b"{}")  # type: ignore[attr-defined]
                except ValueError:
                    pass
                raise _Refused(rejection, body if isinstance(body, dict) else {}) from None
            raise

    async def _transmit(self, msg_id: str) -> None:
        ws = self._ws
        entry = self._pending.get(msg_id)
        if ws is None or entry is None:
            return  # sent on (re)connect
        to, body, _done, _outcome = entry
        frame = json.dumps(
            {"type": "send", "id": msg_id, "to": to, "body": body}, separators=(",", ":")
        )
        async with self._send_lock:
            try:
                await ws.send_message(frame)
            except trio_websocket.ConnectionClosed:
                pass  # resent after the reconnect

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            self._on_message(frame)
        elif kind == "ack":
            self._resolve(frame["id"], Ack(frame["id"], frame["partition"], frame["offset"]))
        elif kind == "error":
            code = frame.get("code", "")
            msg_id = frame.get("id")
            if msg_id is not None and code != "unavailable":
                self._resolve(msg_id, SendFailed(code, frame.get("message", "")))
            # "unavailable": not acked; the pending send is retried on reconnect
            # or by the caller's timeout.
        # pong and unknown future frame types are ignored

    def _resolve(self, msg_id: str, result: Ack | SendFailed) -> None:
        entry = self._pending.get(msg_id)
        if entry is not None and not entry[2].is_set():
            entry[3].append(result)
            entry[2].set()

    def _on_message(self, frame: dict[str, Any]) -> None:
        offset = frame["offset"]
        if self.cursor is not None and offset <= self.cursor:
            self.duplicates_dropped += 1
            return
        self.cursor = offset
        key = (frame["from"], frame["from_device"], frame["id"])
        if key in self._seen:
            self.duplicates_dropped += 1
            return
        self._seen[key] = None
        if len(self._seen) > _DEDUPE_MEMORY:
            self._seen.popitem(last=False)
        message = Message(
            from_uid=frame["from"],
            from_device=frame["from_device"],
            to=frame["to"],
            id=frame["id"],
            body=frame["body"],
            partition=frame["partition"],
            offset=offset,
            ts=frame["ts"],
        )
        try:
            self._inbox_send.send_nowait(message)
        except trio.WouldBlock:
            # The application is not reading: stop here and resume later
            # rather than drop a message.
            self.cursor = offset - 1
            raise trio_websocket.ConnectionClosed(None) from None


@asynccontextmanager
async def connect(http_url: str, uid: str, **kwargs: Any) -> AsyncIterator[ChatClient]:
    """Connect (waiting for the first welcome) and keep reconnecting until the block exits."""
    client = ChatClient(http_url, uid, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
