"""A trio chat client for linechatd: what tests, benchmarks and chat programs use.

    async with connect("http://127.0.0.1:8080", "alice") as client:
        ack = await client.send("bob", {"text": "hi"})
        async for message in client.messages():
            ...

It asks an instance for the connection url (any of those given, and the
others it learns of, when one stops answering), connects, follows 421 and 1012
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
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, overload
from urllib.parse import urlencode, urlsplit

import h11
import trio
import trio_websocket
from trio_util import AsyncValue

from .protocol import (
    DEFAULT_MAX_RECIPIENTS,
    Ack,
    CloseCode,
    ErrorFrame,
    GroupAck,
    Message,
    RemoteProtocolError,
    Welcome,
    decode_server_frame,
    encode_ping,
    encode_send,
    recipients_problem,
)

__all__ = [
    "Ack",
    "GroupAck",
    "ChatClient",
    "ClientError",
    "Message",
    "SendFailed",
    "State",
    "Welcome",
    "connect",
    "http_get_json",
    "open_websocket",
]

log = logging.getLogger(__name__)

# Close codes after which reconnecting cannot help.
_FATAL_CLOSES = {CloseCode.POLICY: "protocol violation", CloseCode.TOKEN_EXPIRED: "token expired"}
_DEDUPE_MEMORY = 10_000
# The welcome follows the handshake at once, or after the replay window check
# (a few Kafka round trips); past this the connection is given up and retried.
_WELCOME_TIMEOUT_S = 30.0
_HTTP_TIMEOUT_S = 5.0
_MAX_KNOWN_INSTANCES = 64
# Answers that say "this instance is unwell, ask another" (503 is an answer:
# nobody owns the partition right now, which every instance would say).
_UNHEALTHY_STATUSES = {500, 502, 504}


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


@dataclass
class _Pending:
    """A send waiting for its ack; transmitted once per connection."""

    to: str | tuple[str, ...]
    body: Any
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Ack | GroupAck | SendFailed | ClientError | None = None
    sent_on: int = -1  # the connection number it was last transmitted on


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


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error in a nursery's group (Cancelled only when there is none)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(real) > 1:
        return group
    return real[0] if real else leaves[0]


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    message_queue_size: int = 64,
    max_message_size: int = 1 << 22,
    connect_timeout_s: float = 10.0,
    disconnect_timeout_s: float = 2.0,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client WebSocket to ``url`` (ws:// or wss://), closed on exit.

    Like ``trio_websocket.open_websocket_url``, except that the TCP stream is
    ours and always closed: the library leaves it open when the server
    rejects the handshake (a 421 or 400 here), leaking one socket per refusal.
    A rejection raises ``trio_websocket.ConnectionRejected`` as the library does.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket url: {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if port in (80, 443) else f"{host}:{port}"
    with trio.fail_after(connect_timeout_s):
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        stream = await trio.open_tcp_stream(host, port)
    try:
        if secure:
            stream = trio.SSLStream(
                stream, ssl.create_default_context(), server_hostname=host, https_compatible=True
            )
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(connect_timeout_s):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        host_header,
                        resource,
                        message_queue_size=message_queue_size,
                        max_message_size=max_message_size,
                    )
                try:
                    yield ws
                    # A clean exit closes politely; leaving on an error or a
                    # cancellation just drops the stream (the reader task that
                    # would see the peer's reply is being cancelled too).
                    with trio.move_on_after(disconnect_timeout_s):
                        await ws.aclose()
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task's error (a rejected handshake) or the caller's own,
            # as itself rather than wrapped in this nursery's group.
            raise _first_error(group) from None
    finally:
        await trio.aclose_forcefully(stream)


class ChatClient:
    """One device of one user; see :func:`connect`.

    Incoming messages wait in a buffer of ``message_buffer`` messages; when
    the application does not read them, the client stops reading the socket
    (so a device that keeps not reading is eventually closed by the gateway
    with 1013, and reconnects with ``resume`` once it reads again).
    """

    def __init__(
        self,
        http_url: str | Sequence[str],
        uid: str,
        *,
        device: str | None = None,
        token: str | None = None,
        resume: int | None = None,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        message_buffer: int = 10_000,
        discover: bool = True,
        ping_interval_s: float = 30.0,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    ) -> None:
        urls = [http_url] if isinstance(http_url, str) else list(http_url)
        if not urls:
            raise ValueError("at least one http url is needed")
        # The instances we ask for connection urls: the given ones first, then
        # (with ``discover``) the owners any of them lists, in case ours go away.
        self._http_urls = [url.rstrip("/") for url in urls]
        self._url_index = 0
        self._discover = discover
        self._discovered = False
        self.uid = uid
        self.device = device or secrets.token_hex(8)
        self.token = token
        # The highest offset received (or known not to concern us); resume from here.
        self.cursor: int | None = resume
        self.state: AsyncValue[State] = AsyncValue(State.CONNECTING)
        self.welcome: AsyncValue[Welcome | None] = AsyncValue(None)
        self.connections = 0  # successful connects, for tests and benchmarks
        # Messages dropped as copies of one already received (a resend, a
        # retried publish: same sender, device and id, another offset).
        self.duplicates_dropped = 0
        # Offsets at or below the cursor that the server sent anyway: always 0
        # with a server that keeps the contract.
        self.offsets_repeated = 0
        # Sends answered "unavailable" (each resent with the same id).
        self.unavailable_answers = 0
        self.last_close: tuple[int | None, str | None] | None = None  # (code, reason)
        self.fatal: Exception | None = None
        # A group send's list is checked against this before it goes out.
        self.max_recipients = max_recipients
        # Well inside the gateway's default idle timeout (120 s); 0: no pings.
        self._ping_interval_s = ping_interval_s
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Message](message_buffer)
        self._send_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<ChatClient uid={self.uid} device={self.device} {self.state.value.value}>"

    @property
    def http_url(self) -> str:
        """The instance asked for connection urls (the next one after a failure)."""
        return self._http_urls[self._url_index]

    @property
    def http_urls(self) -> list[str]:
        """Every instance this client knows of, given and discovered."""
        return list(self._http_urls)

    # -- public API -------------------------------------------------------------

    @overload
    async def send(
        self, to: str, body: Any, *, id: str | None = None, timeout_s: float = 30.0
    ) -> Ack: ...

    @overload
    async def send(
        self, to: Sequence[str], body: Any, *, id: str | None = None, timeout_s: float = 30.0
    ) -> GroupAck: ...

    async def send(
        self, to: str | Sequence[str], body: Any, *, id: str | None = None, timeout_s: float = 30.0
    ) -> Ack | GroupAck:
        """Send to one uid (an :class:`Ack`) or to a list of them (a :class:`GroupAck`).

        Waits for the ack. Resent with the same id (and list) after a reconnect
        or an ``unavailable`` error, until ``timeout_s`` (trio.TooSlowError).
        Raises SendFailed when the gateway refuses the message (a bad
        recipient list is refused here first, with code ``bad_recipient``),
        ClientError when the client has stopped.
        """
        if self.state.value is State.CLOSED:
            raise ClientError(f"client is closed: {self.fatal or 'stopped'}")
        if not isinstance(to, str):
            to = tuple(to)
            problem = recipients_problem(to, self.max_recipients)
            if problem is not None:
                raise SendFailed("bad_recipient", problem)
        msg_id = id or f"{self.device}-{next(self._ids)}"
        if msg_id in self._pending:
            raise ValueError(f"a send with id {msg_id!r} is already waiting for its ack")
        entry = self._pending[msg_id] = _Pending(to, body)
        retry_s = self._initial_backoff_s
        try:
            with trio.fail_after(timeout_s):
                while True:
                    await self._transmit(msg_id)
                    await entry.done.wait()
                    result = entry.outcome
                    if isinstance(result, SendFailed) and result.code == "unavailable":
                        self.unavailable_answers += 1
                        # Not acked, so not stored: the same id may go again.
                        entry.done, entry.outcome, entry.sent_on = trio.Event(), None, -1
                        await trio.sleep(random.uniform(retry_s / 2, retry_s))
                        retry_s = min(self._max_backoff_s, retry_s * 2)
                        continue
                    break
        finally:
            self._pending.pop(msg_id, None)
        if isinstance(result, Ack | GroupAck):
            return result
        assert result is not None
        raise result

    async def messages(self) -> AsyncIterator[Message]:
        async for message in self._inbox_recv:
            yield message

    async def receive(self, timeout_s: float | None = None) -> Message:
        """The next message (trio.EndOfChannel once the client has stopped)."""
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
        """Connect and keep reconnecting until cancelled.

        Calls ``task_status.started()`` at the first welcome. A refusal that
        retrying cannot fix (400/401/403, close 1008/4401) raises ClientError
        before that; after it, it stops the client (state CLOSED, ``fatal``
        set, pending sends fail) and returns.
        """
        backoff = self._initial_backoff_s
        try:
            while True:
                retry_after: float | None = None
                try:
                    url = await self._connection_url()
                    await self._session(url, task_status)
                except _Refused as exc:
                    code = exc.body.get("error") if isinstance(exc.body, Mapping) else None
                    if exc.status in (400, 401, 403):
                        raise ClientError(f"refused with {exc.status}: {dict(exc.body)}") from None
                    retry_after = exc.retry_after
                    log.debug(
                        "client_refused",
                        extra={"uid": self.uid, "status": exc.status, "code": code},
                    )
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio_websocket.HandshakeError,
                    trio.TooSlowError,
                    h11.ProtocolError,
                    RemoteProtocolError,
                ) as exc:
                    log.debug("client_connect_failed", extra={"uid": self.uid, "error": repr(exc)})
                except trio_websocket.ConnectionClosed as exc:
                    code = getattr(exc.reason, "code", None)
                    self.last_close = (code, getattr(exc.reason, "reason", None))
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
            if self.connections == 0:
                raise
            log.warning("client_stopped", extra={"uid": self.uid, "error": str(exc)})
        finally:
            self._ws = None
            self.state.value = State.CLOSED
            self._inbox_send.close()
            reason = str(self.fatal) if self.fatal else "closed"
            for entry in self._pending.values():
                if not entry.done.is_set():
                    entry.outcome = ClientError(f"client stopped before the ack: {reason}")
                    entry.done.set()

    async def _connection_url(self) -> str:
        """Ask the instances we know, in turn, until one answers (the answer may be a refusal)."""
        headers = {"authorization": f"Bearer {self.token}"} if self.token else None
        query = urlencode({"uid": self.uid})
        for _attempt in range(len(self._http_urls)):
            base = self.http_url
            try:
                status, response_headers, doc = await http_get_json(
                    f"{base}/api/connection-url?{query}", headers, timeout_s=_HTTP_TIMEOUT_S
                )
            except (
                OSError,
                trio.BrokenResourceError,
                trio.TooSlowError,
                h11.ProtocolError,
                ClientError,
            ) as exc:
                failure: Exception = exc
            else:
                if status not in _UNHEALTHY_STATUSES:
                    break
                failure = OSError(f"{base} answered {status}")
            log.debug("client_instance_failed", extra={"url": base, "error": repr(failure)})
            # Another instance may answer; afterwards, learn the current ones again.
            self._url_index = (self._url_index + 1) % len(self._http_urls)
            self._discovered = False
        else:
            raise failure
        if self._discover and not self._discovered and status == 200:
            self._discovered = True
            await self._learn_instances(base)
        body = doc if isinstance(doc, dict) else {}
        if status == 503:
            # Nobody owns the partition right now, or this instance lost
            # ZooKeeper: the next attempt asks another instance.
            self._url_index = (self._url_index + 1) % len(self._http_urls)
        if status != 200:
            retry = response_headers.get("retry-after")
            try:
                retry_after = float(retry) if retry else None
            except ValueError:
                retry_after = None
            raise _Refused(status, body, retry_after)
        url = body.get("url")
        if not isinstance(url, str):
            raise _Refused(503, {"error": "bad_connection_url", "body": doc})
        return url

    async def _learn_instances(self, base: str) -> None:
        """Add the partition owners' http urls to ours, as fallbacks if ours go away."""
        try:
            status, _headers, doc = await http_get_json(
                f"{base}/api/partitions", timeout_s=_HTTP_TIMEOUT_S
            )
        except (
            OSError,
            trio.BrokenResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
            ClientError,
        ):
            return
        if status != 200 or not isinstance(doc, dict):
            return
        for owner in doc.get("partitions") or ():
            url = owner.get("http_url") if isinstance(owner, dict) else None
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                continue
            url = url.rstrip("/")
            if url not in self._http_urls and len(self._http_urls) < _MAX_KNOWN_INSTANCES:
                self._http_urls.append(url)

    async def _session(self, url: str, task_status: trio.TaskStatus[ChatClient]) -> None:
        params: dict[str, str] = {"uid": self.uid, "device": self.device}
        if self.token:
            params["token"] = self.token
        if self.cursor is not None:
            params["resume"] = str(self.cursor)
        full = f"{url}?{urlencode(params)}"
        try:
            async with open_websocket(full, message_queue_size=64, max_message_size=1 << 22) as ws:
                # A server that accepted but never greets (stuck, or a half-open
                # connection) must not keep the client from trying elsewhere.
                with trio.fail_after(_WELCOME_TIMEOUT_S):
                    welcome = decode_server_frame(await ws.get_message())
                if not isinstance(welcome, Welcome):
                    raise ClientError(f"expected a welcome frame, got {welcome!r}")
                if self.cursor is None or welcome.resumed is False:
                    # From now on nothing before the welcome offset concerns us.
                    floor = welcome.offset - 1
                    self.cursor = floor if self.cursor is None else max(self.cursor, floor)
                self._ws = ws
                self.welcome.value = welcome
                self.connections += 1
                self.state.value = State.CONNECTED
                if self.connections == 1:
                    task_status.started(self)
                # Sends that never got their ack go out again, same ids, in send order.
                for msg_id in list(self._pending):
                    await self._transmit(msg_id)
                try:
                    async with trio.open_nursery() as nursery:
                        if self._ping_interval_s > 0:
                            nursery.start_soon(self._keepalive, ws)
                        try:
                            while True:
                                await self._on_frame(await ws.get_message())
                        finally:
                            nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise _first_error(group) from None
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

    async def _keepalive(self, ws: trio_websocket.WebSocketConnection) -> None:
        """A ping every ``ping_interval_s``: the gateway closes silent connections."""
        while True:
            await trio.sleep(self._ping_interval_s)
            async with self._send_lock:
                try:
                    await ws.send_message(encode_ping())
                except trio_websocket.ConnectionClosed:
                    return  # the reader sees it too

    async def _transmit(self, msg_id: str) -> None:
        ws = self._ws
        entry = self._pending.get(msg_id)
        if ws is None or entry is None or entry.sent_on == self.connections:
            return  # sent on (re)connect, or already on this connection
        entry.sent_on = self.connections
        frame = encode_send(msg_id, entry.to, entry.body)
        async with self._send_lock:
            try:
                await ws.send_message(frame)
            except trio_websocket.ConnectionClosed:
                pass  # resent after the reconnect

    async def _on_frame(self, data: str | bytes) -> None:
        try:
            frame = decode_server_frame(data)
        except RemoteProtocolError as exc:
            # A frame this client cannot read is skipped, not fatal: the
            # connection and every other frame stay usable.
            log.warning("client_bad_server_frame", extra={"uid": self.uid, "error": str(exc)})
            return
        if isinstance(frame, Message):
            await self._on_message(frame)
        elif isinstance(frame, Ack | GroupAck):
            self._resolve(frame.id, frame)
        elif isinstance(frame, ErrorFrame) and frame.id is not None:
            self._resolve(frame.id, SendFailed(frame.code, frame.message))
        # pong and unknown future frame types are ignored

    def _resolve(self, msg_id: str, result: Ack | GroupAck | SendFailed) -> None:
        entry = self._pending.get(msg_id)
        if entry is not None and not entry.done.is_set():
            entry.outcome = result
            entry.done.set()

    async def _on_message(self, message: Message) -> None:
        offset = message.offset
        if self.cursor is not None and offset <= self.cursor:
            # An offset this device already has: the server must never send
            # one (CONTRACT §5); counted apart from resent duplicates.
            self.offsets_repeated += 1
            return
        key = (message.from_uid, message.from_device, message.id)
        if key in self._seen:
            self.cursor = offset
            self.duplicates_dropped += 1
            return
        self.cursor = offset
        self._seen[key] = None
        if len(self._seen) > _DEDUPE_MEMORY:
            self._seen.popitem(last=False)
        # Waits while the application is not reading: backpressure, not loss
        # (this task is the connection's only reader, so no reconnect can
        # happen meanwhile and skip the message).
        await self._inbox_send.send(message)


@asynccontextmanager
async def connect(
    http_url: str | Sequence[str], uid: str, **kwargs: Any
) -> AsyncIterator[ChatClient]:
    """Connect (waiting for the first welcome) and keep reconnecting until the block exits.

    Raises ClientError when the first connection is refused for good (bad
    uid, bad token); ``ChatClient`` keyword arguments pass through.
    """
    client = ChatClient(http_url, uid, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The refusal, or the caller's own error, as itself.
        raise _first_error(group) from None
