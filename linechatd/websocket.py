"""The WebSocket transport, behind one narrow interface.

Its per-message cost bounds the gateway's throughput, so nothing outside this
module touches the WebSocket library: sessions see ``Handshake`` and
``Connection`` only, and a faster transport can replace this one without
touching routing or partition code.

The frames are decoded by :mod:`linechatd.wsframe` (sans-IO, a short path for
the common frame) on the trio stream; the upgrade request is read with h11.
The task that calls ``receive()`` does the reading (pings are answered
there), so a connection costs no task of its own, and writes share one lock that sends whatever else
was queued meanwhile in the same system call. ``write_now()`` writes a frame
without a task switch when nothing else is being sent: most frames leave in
the call that produced them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import logging
import math
import os
import select
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import unquote_plus

import h11
import trio

from .listeners import (
    UnfinishedRequests,
    accept_loop,
    header_list,
    open_listeners,
    receive_some,
    socket_address,
    stream_errors,
)
from .wsframe import (
    Close,
    Event,
    FrameDecoder,
    Ping,
    Violation,
    encode_close,
    encode_pong,
    encode_text,
)

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
# How long a closing handshake may take before the socket is dropped.
DISCONNECT_TIMEOUT_S = 2.0
# A peer closed for abuse is not waited for: until its close reply arrives
# every byte it keeps sending would still be read and parsed.
ABUSE_CLOSE_WAIT_S = 0.1
# While a client that sent bytes nobody reads yet is watched for leaving.
PEER_GONE_POLL_S = 0.25
# Per read: large enough for a burst of frames in one call, and the bytes
# object is shrunk to what arrived, so an idle socket holds none of it.
RECEIVE_BYTES = 65536
_STREAM_ERRORS = stream_errors
DEFAULT_PARTIAL_MESSAGE_TIMEOUT_S = 10.0
# The upgrade request's line and headers together; more is refused (431).
MAX_REQUEST_HEAD_BYTES = 16 * 1024
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FrameRefused(Exception):
    """The connection's ``frame_hook`` refused a frame: its owner closes it (1008)."""


class ConnectionClosed(Exception):
    """The peer (or the network) closed the connection."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class _State(enum.Enum):
    OPEN = "open"
    # Our close frame is out; the peer's reply is awaited.
    LOCAL_CLOSING = "local_closing"
    CLOSED = "closed"


_OPEN = _State.OPEN
_LOCAL_CLOSING = _State.LOCAL_CLOSING
_CLOSED = _State.CLOSED


class Connection:
    """An accepted WebSocket: text frames in and out, and a close with a code."""

    __slots__ = (
        "read_at",
        "_stream",
        "_decoder",
        "_state",
        "_max_bytes",
        "_partial_timeout_s",
        "_partial_deadline",
        "_partial_message",
        "_fresh_read",
        "_events",
        "_sending",
        "_send_waiters",
        "_pending",
        "_reading",
        "_socket",
        "_broken",
        "_dropped",
        "_local_close_code",
        "_closed_code",
        "_closed_reason",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        max_message_bytes: int,
        partial_message_timeout_s: float = DEFAULT_PARTIAL_MESSAGE_TIMEOUT_S,
        *,
        trailing: bytes = b"",
    ) -> None:
        # time.perf_counter() when the frames being handed out were read.
        self.read_at = time.perf_counter()
        self._stream = stream
        # Joins fragments and enforces the size limit on every frame's header.
        self._decoder = FrameDecoder(max_message_bytes)
        self._state = _OPEN
        self._max_bytes = max_message_bytes
        self._partial_timeout_s = partial_message_timeout_s
        self._partial_deadline = math.inf
        # Which fragmented message the deadline is for (FrameDecoder.messages_begun).
        self._partial_message = 0
        # Frames the client sent right behind its upgrade request come first.
        self._events: Iterator[Event] | None = self._decoder.events(trailing) if trailing else None
        self._fresh_read = True
        # Whether a write owns the socket's sending side, and (made on the
        # first contention only) the writes waiting for it: a trio.Lock and
        # its parking lot would weigh ~450 bytes on every idle connection.
        self._sending = False
        self._send_waiters: trio.lowlevel.ParkingLot | None = None
        self._pending: list[bytes] = []
        self._reading = False
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        # The stream failed: nothing more can be sent.
        self._broken = False
        self._dropped = False
        self._local_close_code: int | None = None
        self._closed_code: int | None = None
        self._closed_reason: str | None = None

    @property
    def frame_hook(self) -> Callable[[], bool] | None:
        """Called for every frame received, before it is looked at: False refuses it."""
        return self._decoder.frame_hook

    @frame_hook.setter
    def frame_hook(self, hook: Callable[[], bool] | None) -> None:
        self._decoder.frame_hook = hook

    # -- receiving -----------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; pings are answered here.

        Every frame, control frames and each fragment included, is first shown
        to ``frame_hook`` (if set) before its payload is unmasked or decoded:
        when the hook says False, the rest of what was read is dropped
        unexamined and :class:`FrameRefused` is raised (the owner closes the
        connection). A message that is not the first of its read follows a
        checkpoint, so a read full of tiny frames cannot keep other tasks waiting.
        """
        while True:
            if self._closed_code is not None or self._local_close_code is not None:
                raise ConnectionClosed(self.closed_code or CLOSE_ABNORMAL, self._closed_reason)
            events = self._events
            if events is not None:
                for event in events:
                    if type(event) is str or type(event) is bytes:
                        if self._fresh_read:
                            self._fresh_read = False
                        else:
                            await trio.lowlevel.checkpoint()
                        return event
                    if isinstance(event, Ping):
                        if self._state is _OPEN:
                            await self._write(encode_pong(event.payload))
                    elif isinstance(event, Close):
                        await self._on_close(event)
                        raise ConnectionClosed(self.closed_code, self._closed_reason)
                    elif isinstance(event, Violation):
                        await self._on_violation(event)
                    # A Pong needs nothing.
                self._events = None
                if self._decoder.refused:
                    raise FrameRefused
            if self._decoder.in_message or self._state is not _OPEN:
                # A deadline may apply (a fragmented message): the general read.
                if not await self._read():
                    raise ConnectionClosed(self.closed_code or CLOSE_ABNORMAL, self._closed_reason)
                continue
            # The common read, here rather than in _read(): an idle connection
            # waits here, and each coroutine frame on its stack costs ~250 bytes.
            self._reading = True
            try:
                data: bytes | bytearray = await self._stream.receive_some(RECEIVE_BYTES)
            except _STREAM_ERRORS:
                data = b""
            finally:
                self._reading = False
            if not await self._took(data):
                raise ConnectionClosed(self.closed_code or CLOSE_ABNORMAL, self._closed_reason)

    async def _on_violation(self, event: Violation) -> NoReturn:
        if event.code == CLOSE_TOO_BIG:
            await self.close(CLOSE_TOO_BIG, f"message larger than {self._max_bytes} bytes")
            raise ConnectionClosed(CLOSE_TOO_BIG, "message too big")
        # Bad framing or bad UTF-8: the connection is failed, not closed politely.
        await self._fail(event.code, event.reason)
        self._closed_reason = event.reason
        raise ConnectionClosed(self.closed_code, self._closed_reason)

    async def _read(self) -> bool:
        """One read from the stream into the decoder; False once the stream has ended.

        While a fragmented message is incomplete the read waits until its
        deadline at most; past it the connection is failed (1008).
        """
        decoder = self._decoder
        deadline = math.inf
        if decoder.in_message and self._state is _OPEN:
            if decoder.messages_begun != self._partial_message:
                self._partial_message = decoder.messages_begun
                self._partial_deadline = trio.current_time() + self._partial_timeout_s
            deadline = self._partial_deadline
        data: bytes | bytearray = b""
        late = False
        self._reading = True
        try:
            if deadline == math.inf:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            else:
                with trio.move_on_at(deadline) as scope:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                late = scope.cancelled_caught
        except _STREAM_ERRORS:
            data = b""
        finally:
            self._reading = False
        if late:
            await self._fail(CLOSE_POLICY, "fragmented message not completed in time")
            raise ConnectionClosed(CLOSE_POLICY, "fragmented message not completed in time")
        return await self._took(data)

    async def _took(self, data: bytes | bytearray) -> bool:
        """Hand what a read returned to the decoder; False (and the socket
        released) when it was the end of the stream."""
        if not data:
            # The peer went away without a closing handshake (or after ours).
            self._state = _CLOSED
            await self._drop()
            return False
        self.read_at = time.perf_counter()
        self._events = self._decoder.events(data)
        self._fresh_read = True
        return True

    async def _on_close(self, event: Close) -> None:
        if self._state is _OPEN:
            # The peer started it: answer, then drop the TCP connection (the
            # server closes first). 1005 (no code) is answered with no code.
            self._closed_code, self._closed_reason = event.code, event.reason
            self._state = _CLOSED
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                try:
                    await self._write(encode_close(event.code))
                except ConnectionClosed:
                    pass
        else:
            # The reply to our close.
            self._state = _CLOSED
            if self._closed_code is None:
                self._closed_code, self._closed_reason = event.code, event.reason
        await self._drop()

    async def wait_peer_gone(self) -> None:
        """Return once the peer has closed or reset its TCP connection, without reading.

        For a task that must not read (the session's reader is not running
        yet) but should stop working for a client that left. Linux reports
        the peer's FIN as POLLRDHUP even behind unread bytes; elsewhere this
        never returns. Only one task may wait at a time, and never while
        another reads.
        """
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        rdhup = getattr(select, "POLLRDHUP", None)
        if not isinstance(stream, trio.SocketStream) or rdhup is None:
            await trio.sleep_forever()
            return
        sock = stream.socket
        gone = rdhup | select.POLLHUP | select.POLLERR
        while not self._dropped:
            await trio.lowlevel.wait_readable(sock)
            fd = sock.fileno()
            if fd < 0:
                return  # closed here meanwhile
            poller = select.poll()
            poller.register(fd, gone)
            if poller.poll(0):
                return
            # Bytes from a client still there: look again now and then (a
            # readable socket would wake us at once, over and over).
            await trio.sleep(PEER_GONE_POLL_S)

    # -- sending -------------------------------------------------------------

    async def send(self, text: str | bytes) -> None:
        """Send a text frame; ``bytes`` must be UTF-8 already (a JSON encoder's output)."""
        if self._state is not _OPEN or self._broken:
            raise ConnectionClosed(self.closed_code or CLOSE_ABNORMAL, self._closed_reason)
        await self._write(encode_text(text))

    @property
    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may be used: a plain TCP socket with
        nothing queued or being written (so frames keep their order)."""
        return (
            self._socket is not None
            and not self._pending
            and not self._sending
            and not self._broken
            and not self._dropped
            and self._state is _OPEN
        )

    def write_now(self, text: str | bytes) -> None:
        """Write a text frame without waiting (only when :attr:`can_write_now`).

        What the socket does not accept at once stays queued, and
        ``unflushed`` says that ``flush()`` must follow. Raises
        ConnectionClosed on a dead stream.
        """
        self.write_many_now((text,))

    def write_many_now(self, texts: Iterable[str | bytes]) -> None:
        """Write text frames in one system call (only when :attr:`can_write_now`).

        As :meth:`write_now`, for every frame due at once: one ``write()``
        for all of them instead of one each.
        """
        sock = self._socket
        assert sock is not None, "write_now() needs can_write_now"
        fd = sock.fileno()  # -1 once closed: never a number another socket reuses
        if fd < 0:
            raise ConnectionClosed(self.closed_code or CLOSE_ABNORMAL, self._closed_reason)
        frames = [encode_text(text) for text in texts]
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken = True
            if self._closed_code is None:
                self._closed_code = CLOSE_ABNORMAL
            raise ConnectionClosed(self.closed_code, self._closed_reason) from None
        if sent < len(data):
            self._pending.append(data[sent:])

    @property
    def unflushed(self) -> bool:
        """Bytes of a frame ``write_now()`` took are still waiting for ``flush()``."""
        return bool(self._pending)

    async def flush(self) -> None:
        """Send what ``write_now()`` left queued."""
        if self._pending:
            await self._write(b"")

    async def _write(self, data: bytes) -> None:
        """Send ``data`` after anything queued before it, coalescing what waits."""
        pending = self._pending
        pending.append(data)
        if self._sending:
            if self._send_waiters is None:
                self._send_waiters = trio.lowlevel.ParkingLot()
            # Woken by _release_send() as the owner of the sending side (FIFO).
            await self._send_waiters.park()
        else:
            self._sending = True
        try:
            if self._broken:
                pending.clear()
                raise ConnectionClosed(self.closed_code or CLOSE_ABNORMAL, self._closed_reason)
            if not pending:
                return  # sent by the writer before us, with its own bytes
            out = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            try:
                await self._send_all(out)
            except _STREAM_ERRORS:
                self._broken = True
                if self._closed_code is None:
                    self._closed_code = CLOSE_ABNORMAL
                raise ConnectionClosed(self.closed_code, self._closed_reason) from None
        finally:
            self._release_send()

    def _release_send(self) -> None:
        waiters = self._send_waiters
        if waiters:
            waiters.unpark()  # ownership passes straight to the next write
        else:
            self._sending = False

    async def _send_all(self, data: bytes) -> None:
        sock = self._socket
        if sock is None:
            # TLS: a cancelled write breaks the SSLStream, and later writes say so.
            await self._stream.send_all(data)
            return
        # Plain TCP: a write cancelled part way (a send deadline) keeps what is
        # left at the head of the queue, so the next write (the close frame)
        # still lands on a frame boundary.
        sent = 0
        size = len(data)
        with memoryview(data) as view:
            try:
                while sent < size:
                    sent += await sock.send(view[sent:])
            except trio.Cancelled:
                if sent < size:
                    self._pending.insert(0, data[sent:])
                raise

    # -- closing -------------------------------------------------------------

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and wait for the peer's (bounded); then drop the TCP connection.

        After 1008/1009 the wait is short: the peer misbehaves, so the
        connection is failed (RFC 6455 §7.1.7) rather than closed politely.
        """
        abusive = code in (CLOSE_POLICY, CLOSE_TOO_BIG)
        await self._close(code, reason, ABUSE_CLOSE_WAIT_S if abusive else DISCONNECT_TIMEOUT_S)

    async def _fail(self, code: int, reason: str) -> None:
        """Close after a protocol violation: the peer is not waited for either."""
        await self._close(code, reason, ABUSE_CLOSE_WAIT_S)

    async def _close(self, code: int, reason: str, wait_s: float) -> None:
        if self._dropped:
            return
        try:
            with trio.move_on_after(wait_s):
                if self._state is _OPEN and self._local_close_code is None:
                    self._local_close_code = code
                    self._state = _LOCAL_CLOSING
                    # The budget is over: only the peer's close reply is looked for now.
                    self._decoder.frame_hook = None
                    if not self._broken:
                        try:
                            await self._write(encode_close(code, reason))
                        except ConnectionClosed:
                            return
                await self._await_close_reply()
        finally:
            await self._drop()

    async def _await_close_reply(self) -> None:
        while self._state is _LOCAL_CLOSING and not self._dropped:
            if self._reading:
                # Another task's receive() reads the reply; it drops the stream then.
                await trio.sleep(0.01)
                continue
            events = self._events
            self._events = None
            if events is not None:
                for event in events:
                    if type(event) is Close:
                        self._state = _CLOSED
                        if self._closed_code is None:
                            self._closed_code, self._closed_reason = event.code, event.reason
                        return
            if not await self._read():
                return

    async def aclose(self) -> None:
        """Release the socket now, without a closing handshake (after ``close()``,
        or when the peer is gone); safe to call more than once."""
        await self._drop()

    async def _drop(self) -> None:
        if self._dropped:
            return
        self._dropped = True
        self._events = None
        if self._closed_code is None:
            self._closed_code = CLOSE_ABNORMAL
        await trio.aclose_forcefully(self._stream)

    @property
    def closed_locally(self) -> bool:
        """This side started the close (the session, or the transport failing the peer)."""
        return self._local_close_code is not None

    @property
    def closed_code(self) -> int | None:
        if self._closed_code is None and not self._dropped:
            return None
        return self._local_close_code if self._local_close_code is not None else self._closed_code


class Handshake:
    """An upgrade request not yet answered: ``accept()`` it or ``reject()`` it.

    Built from attacker-controlled bytes, so building it never raises: an odd
    request target or a peer already gone must not reach the listener.
    """

    __slots__ = (
        "_stream",
        "_http",
        "_key",
        "_max_bytes",
        "_partial_timeout_s",
        "_detached",
        "_answered",
        "connection",
        "path",
        "query",
        "headers",
        "remote",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        http: h11.Connection,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
        key: bytes,
        remote: str,
        max_message_bytes: int,
        partial_message_timeout_s: float = DEFAULT_PARTIAL_MESSAGE_TIMEOUT_S,
    ) -> None:
        self._stream = stream
        self._http = http
        self._key = key
        self._max_bytes = max_message_bytes
        self._partial_timeout_s = partial_message_timeout_s
        self._detached = False
        self._answered = False
        self.connection: Connection | None = None
        # Split by hand: urlsplit() raises on targets like "//[x" (h11 lets
        # any visible characters through).
        path, _, query = bytes(request.target).decode("latin-1").partition("?")
        self.path = path
        self.query, _, _fragment = query.partition("#")
        self.headers: Mapping[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in headers
        }
        self.remote = remote

    def __repr__(self) -> str:
        # Never the query string: it carries the bearer token.
        return f"<Handshake {self.path} from {self.remote}>"

    async def accept(self) -> Connection:
        if self._answered:
            raise RuntimeError("the handshake was already answered")
        self._answered = True
        # No extensions: permessage-deflate invites compression oracles and zip bombs.
        response = self._http.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", _accept_token(self._key)),
                ],
            )
        )
        # Frames the client sent right behind its request wait in h11's buffer
        # (public: ``trailing_data``), and are decoded before anything read later.
        trailing, _closed = self._http.trailing_data
        conn = Connection(
            self._stream, self._max_bytes, self._partial_timeout_s, trailing=bytes(trailing)
        )
        self.connection = conn
        try:
            await conn._write(response or b"")
        except ConnectionClosed:
            pass  # the first receive() or send() reports it
        return conn

    def detach(self) -> None:
        """The accepted connection now has an owner that closes it (``Connection.aclose``).

        The listener's task for this socket then ends at once instead of
        waiting: a long-lived socket costs no task (nor handshake state) of its own.
        """
        if self.connection is None:
            raise RuntimeError("only an accepted connection can be detached")
        self._detached = True

    async def reject(
        self, status: int, body: Mapping[str, object], headers: Mapping[str, str] | None = None
    ) -> None:
        if self._answered:
            return
        self._answered = True
        await _send_rejection(self._stream, self._http, status, body, headers)


async def _send_rejection(
    stream: trio.abc.Stream,
    http: h11.Connection,
    status: int,
    body: Mapping[str, object],
    headers: Mapping[str, str] | None = None,
) -> None:
    """A JSON answer; the connection closes after it."""
    payload = json.dumps(body).encode()
    extra = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    extra += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    try:
        data = http.send(h11.Response(status_code=status, headers=extra)) or b""
        data += http.send(h11.Data(data=payload)) or b""
        data += http.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
    except (h11.LocalProtocolError, *_STREAM_ERRORS):
        pass


def _accept_token(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())


def _header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    """The comma-separated tokens of every ``name`` header, lower-cased."""
    return {
        token.strip().lower()
        for header, value in headers
        if header == name
        for token in bytes(value).split(b",")
    }


def _upgrade_problem(
    request: h11.Request, headers: list[tuple[bytes, bytes]]
) -> tuple[int, str, dict[str, str]] | None:
    """Why ``request`` is no WebSocket upgrade: (status, message, headers), or None."""
    if request.method != b"GET":
        return 405, "a WebSocket upgrade is a GET request", {"Allow": "GET"}
    if request.http_version != b"1.1":
        return 400, "a WebSocket upgrade needs HTTP/1.1", {}
    if b"websocket" not in _header_tokens(headers, b"upgrade") or b"upgrade" not in _header_tokens(
        headers, b"connection"
    ):
        return 426, "this endpoint speaks WebSocket only", {"Upgrade": "websocket"}
    if _header_tokens(headers, b"sec-websocket-version") != {b"13"}:
        return 426, "WebSocket version 13 is required", {"Sec-WebSocket-Version": "13"}
    keys = [v for k, v in headers if k == b"sec-websocket-key"]
    try:
        valid_key = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except binascii.Error:
        valid_key = False
    if not valid_key:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64", {}
    return None


def _remote_address(stream: trio.SocketStream) -> str:
    """The peer's IP address ("" when it cannot be known, e.g. already disconnected)."""
    address = socket_address(stream.socket, peer=True)
    return address[0] if address is not None else ""


def redact_query(query: str, limit: int = 512) -> str:
    """``query`` fit for a log line: every ``token`` value replaced, at most ``limit`` chars.

    Names are compared percent-decoded, as the handshake parser reads them
    (``t%6Fken=`` is a token too).
    """
    parts = []
    for part in query[: limit * 4].split("&"):
        name, sep, _value = part.partition("=")
        if sep and unquote_plus(name, errors="replace").strip().lower() == "token":
            part = f"{name}=REDACTED"
        parts.append(part)
    text = "&".join(parts)
    return text if len(text) <= limit else text[:limit] + "..."


async def _read_request(
    stream: trio.abc.Stream, remote: str, max_message_bytes: int, partial_message_timeout_s: float
) -> Handshake | None:
    """The upgrade request (parsed by h11), or None once a bad one was answered or the peer left."""
    if isinstance(stream, trio.SSLStream):
        await stream.do_handshake()
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    request: h11.Request | None = None
    headers: list[tuple[bytes, bytes]] = []
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            await _send_rejection(stream, http, exc.error_status_hint, {"error": "bad_request"})
            return None
        if event is h11.NEED_DATA:
            http.receive_data(await receive_some(stream, RECEIVE_BYTES))  # b"": the peer closed
        elif isinstance(event, h11.Request):
            headers = header_list(event)
            problem = _upgrade_problem(event, headers)
            if problem is not None:
                status, message, extra = problem
                body = {"error": "bad_request", "message": message}
                await _send_rejection(stream, http, status, body, extra)
                return None
            request = event
        elif event is h11.PAUSED and request is not None:
            # The whole request is in (h11 pauses at a protocol switch); what
            # follows belongs to the WebSocket.
            key = next(v for k, v in headers if k == b"sec-websocket-key")
            return Handshake(
                stream,
                http,
                request,
                headers,
                key,
                remote,
                max_message_bytes,
                partial_message_timeout_s,
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None
        elif isinstance(event, h11.Data):
            # A body on an upgrade request: not a WebSocket client.
            await _send_rejection(stream, http, 400, {"error": "bad_request"})
            return None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    """Keepalive settings for accepted sockets (seconds, probes)."""

    idle_s: int
    interval_s: int
    count: int
    user_timeout_s: float


def apply_tcp_keepalive(sock: trio.socket.SocketType, settings: TcpKeepalive) -> None:
    """Turn keepalive on for ``sock``, so that a peer that vanished is noticed.

    Without it an idle socket whose client lost its network stays open
    forever, and one with unacknowledged data for ~15 minutes of
    retransmissions; TCP_USER_TIMEOUT bounds both (Linux). Options the
    platform lacks are skipped; a socket already reset is left alone.
    """
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), settings.idle_s),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), settings.interval_s),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), settings.count),
        (
            socket.IPPROTO_TCP,
            getattr(socket, "TCP_USER_TIMEOUT", None),
            int(settings.user_timeout_s * 1000),
        ),
    ]
    try:
        for level, name, value in options:
            if name is not None:
                sock.setsockopt(level, name, value)
    except OSError:
        pass  # the peer is already gone: the first read says so


async def serve(
    handler: Callable[[Handshake], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    max_message_bytes: int,
    handshake_timeout_s: float,
    partial_message_timeout_s: float = DEFAULT_PARTIAL_MESSAGE_TIMEOUT_S,
    unfinished: UnfinishedRequests | None = None,
    keepalive: TcpKeepalive | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until cancelled; ``task_status.started(port)`` once bound.

    ``handshake_timeout_s`` bounds everything before the upgrade request is
    complete, TLS handshake included: a socket that never finishes is closed.
    ``unfinished`` caps how many may be at that stage at once (a socket past
    the caps is closed as soon as it is accepted); ``keepalive`` is set on
    every accepted socket.
    """

    async def on_connection(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        hs: Handshake | None = None
        # A fault boundary per connection: one that raised would stop the listener.
        try:
            remote = _remote_address(tcp)
            release = unfinished.enter(remote) if unfinished is not None else _nothing
            if release is None:
                return  # closed below, before anything is read
            if keepalive is not None:
                apply_tcp_keepalive(tcp.socket, keepalive)
            if ssl_context is not None:
                stream = trio.SSLStream(tcp, ssl_context, server_side=True, https_compatible=True)
            try:
                with trio.move_on_after(handshake_timeout_s):
                    try:
                        hs = await _read_request(
                            stream, remote, max_message_bytes, partial_message_timeout_s
                        )
                    except _STREAM_ERRORS:
                        pass
            finally:
                release()
            if hs is None:
                return
            await handler(hs)
            if hs._detached:
                return  # the connection's owner closes it
            conn = hs.connection
            if conn is not None:
                await conn.close(CLOSE_NORMAL)
        except Exception:
            log.exception("websocket_connection_failed")
        finally:
            if hs is None or not hs._detached:
                await trio.aclose_forcefully(stream)

    listeners = await open_listeners(host, port)
    bound = listeners[0].getsockname()[1]
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, on_connection, nursery, "websocket")
        task_status.started(bound)


def _nothing() -> None:
    pass
