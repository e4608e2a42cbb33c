"""The HTTP/1.1 server of the HTTP API: h11 parses, answers are written here, one task per connection.

Every client connect starts with ``GET /api/connection-url``, so what a request
costs here bounds how fast clients can (re)connect. A general ASGI server spends
most of a small request on machinery this API does not use (a task group and
timers per request, HTTP/2, lifespan, streaming): this one serves one ASGI
application's ``http`` requests on the connection's own task, keeps connections
alive, and bounds what a client can make it hold:

- a request head: ``max_head_bytes`` (431 past it), complete within
  ``HEAD_TIMEOUT_S`` of the connection or of its first byte;
- an idle kept-alive connection: ``KEEP_ALIVE_TIMEOUT_S``;
- a body: the application reads it up to its own limit, the whole of it
  within ``BODY_TIMEOUT_S``; after a response that left the body unread (a
  413) the rest is read and dropped for at most ``LINGER_S`` and
  ``LINGER_BYTES``, then the connection closes (so do refusals, so that the
  answer is not lost to a reset);
- an answer: taken by the client within ``SEND_TIMEOUT_S``, or the
  connection closes.

Requests are answered in order: pipelined ones wait, unparsed, until the
previous answer is out. Malformed requests get a JSON error (400, 431,
505...) and the connection closes; no error ever shows a stack trace.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

from .config import HostPort
from .listeners import (
    UnfinishedRequests,
    accept_loop,
    header_list,
    open_listeners,
    receive_some,
    socket_address,
    stream_errors,
)

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_TIMEOUT_S = 30.0
# The whole body, from its request's head on.
BODY_TIMEOUT_S = 30.0
# An answer the client does not take within this is not waited for further.
SEND_TIMEOUT_S = 30.0
RECEIVE_BYTES = 65536
# After a response that left the body unread: how long, and how much, is read and dropped.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20

Message = dict[str, Any]
Application = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

# A response header must not break its line (CR, LF) or hold NUL.
_UNSAFE_HEADER = re.compile(rb"[\r\n\0]")


async def serve_http_app(
    app: Application,
    listen: HostPort,
    *,
    max_head_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    unfinished: UnfinishedRequests | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until cancelled; ``task_status.started`` gets the bound URLs.

    ``unfinished`` caps the connections waiting for a request head they owe
    (a new connection's first, or one whose first bytes have arrived); a
    connection past a cap is closed. Kept-alive connections waiting idle do
    not count: they hold no buffer.
    """
    scheme = "https" if ssl_context is not None else "http"
    listeners = await open_listeners(listen.host, listen.port)

    async def on_connection(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        try:
            if ssl_context is not None:
                stream = trio.SSLStream(tcp, ssl_context, server_side=True, https_compatible=True)
            await serve_connection(
                app,
                stream,
                scheme=scheme,
                client=socket_address(tcp.socket, peer=True),
                server=socket_address(tcp.socket, peer=False),
                max_head_bytes=max_head_bytes,
                unfinished=unfinished,
            )
        except stream_errors:
            pass
        except Exception:
            # A fault boundary per connection: one that raised must not stop the listener.
            log.exception("http_connection_failed")
        finally:
            if stream is tcp:
                tcp.socket.close()  # at once: the task ends here, nothing to wait for
            else:
                await trio.aclose_forcefully(stream)

    binds = []
    for listener in listeners:
        host, port = listener.getsockname()[:2]
        binds.append(f"{scheme}://{HostPort(host, port)}")
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, on_connection, nursery, "http")
        task_status.started(binds)


async def serve_connection(
    app: Application,
    stream: trio.abc.Stream,
    *,
    scheme: str,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    max_head_bytes: int,
    unfinished: UnfinishedRequests | None = None,
) -> None:
    """Serve requests on one accepted connection until it closes; the caller closes ``stream``."""
    await _Connection(app, stream, scheme, client, server, max_head_bytes, unfinished).serve()


class _Connection:
    """One client connection: requests in, the application's responses out, in turn."""

    __slots__ = (
        "_app",
        "_stream",
        "_http",
        "_scheme",
        "_client",
        "_server",
        "_max_head_bytes",
        "_body_unread",
        "_body_failed",
        "_gone",
        "_body_deadline",
        "_socket",
        "_headers",
        "_unfinished",
    )

    def __init__(
        self,
        app: Application,
        stream: trio.abc.Stream,
        scheme: str,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        max_head_bytes: int,
        unfinished: UnfinishedRequests | None,
    ) -> None:
        self._app = app
        self._unfinished = unfinished
        self._stream = stream
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._max_head_bytes = max_head_bytes
        # Plain TCP is read and written with the system calls themselves: a
        # request is a read and a write, and the stream's layers (a conflict
        # detector, error translation, a checkpoint after each call) cost more
        # than the calls. TLS goes through its stream.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._scheme = scheme
        self._client = client
        self._server = server
        self._body_unread = False
        self._body_failed = False
        self._gone = False  # the client left, or stopped taking answers
        self._body_deadline = math.inf
        self._headers: list[tuple[bytes, bytes]] = []

    async def serve(self) -> None:
        kept_alive = False  # a new connection owes its first request at once
        while True:
            request = await self._read_head(kept_alive)
            if request is None:
                return
            keep = await self._respond(request)
            if self._gone:
                return
            if self._body_unread:
                await self._linger()
                return
            if not keep:
                return
            # h11 parses; the answers are written here. The next request starts
            # a new parser with whatever the client sent after this one.
            leftover, closed = self._http.trailing_data
            self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head_bytes)
            if leftover:
                self._http.receive_data(bytes(leftover))
            if closed:
                self._http.receive_data(b"")
            kept_alive = True
            # A client pipelining requests may never make a read wait: let the others run.
            await trio.lowlevel.checkpoint()

    async def _receive(self) -> bytes:
        return await receive_some(self._stream, RECEIVE_BYTES)

    async def _send(self, data: bytes) -> None:
        """Write ``data``. A client that left, or does not take it within
        SEND_TIMEOUT_S, marks the connection gone: it closes after this request."""
        sock = self._socket
        try:
            if sock is not None:
                # Nearly always the socket takes a whole answer at once: no deadline to arm.
                try:
                    sent = os.write(sock.fileno(), data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return
                data = data[sent:]
            with trio.move_on_after(SEND_TIMEOUT_S):
                if sock is None:
                    await self._stream.send_all(data)
                    return
                with memoryview(data) as view:
                    sent = 0
                    while sent < len(view):
                        await trio.lowlevel.wait_writable(sock)
                        try:
                            sent += os.write(sock.fileno(), view[sent:])
                        except BlockingIOError:
                            pass
                return
        except stream_errors:
            pass
        self._gone = True

    async def _linger(self) -> None:
        """Read and drop what is left of a refused body before closing.

        Closing a socket with unread bytes makes the kernel reset it, and the
        reset can reach the client before it has read the answer (a 413 the
        client never sees). Bounded in time and bytes like nginx's lingering close.
        """
        stream = self._stream
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()  # the answer is complete: the client may close now
        dropped = 0
        with trio.move_on_after(LINGER_S):
            while dropped < LINGER_BYTES:
                data = await self._receive()
                if not data:
                    return
                dropped += len(data)

    async def _read_head(self, kept_alive: bool) -> h11.Request | None:
        """The next request's head, or None: the client left, timed out or was refused."""
        http = self._http
        # Usually the whole head is already here, and no deadline need be armed.
        try:
            event = self._next_arrived()
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, str(exc))
            return None
        if isinstance(event, h11.Request):
            return await self._checked(event)
        if event is not h11.NEED_DATA:
            return None  # ConnectionClosed
        begun = bool(http.trailing_data[0])  # whether any byte of this request has arrived
        wait_s = KEEP_ALIVE_TIMEOUT_S if kept_alive and not begun else HEAD_TIMEOUT_S
        release = None
        if begun or not kept_alive:
            release = self._enter_unfinished()
            if release is None:
                return None
        try:
            with trio.CancelScope(deadline=trio.current_time() + wait_s) as scope:
                if not kept_alive and isinstance(self._stream, trio.SSLStream):
                    # Counted and timed as part of the first request's head.
                    await self._stream.do_handshake()
                while True:
                    try:
                        event = http.next_event()
                    except h11.RemoteProtocolError as exc:
                        await self._refuse(exc.error_status_hint, str(exc))
                        return None
                    if event is h11.NEED_DATA:
                        data = await self._receive()
                        if data and not begun:
                            begun = True
                            if kept_alive:
                                # The request has begun: its head is owed within the head timeout.
                                scope.deadline = trio.current_time() + HEAD_TIMEOUT_S
                                release = self._enter_unfinished()
                                if release is None:
                                    return None
                        http.receive_data(bytes(data))  # b"": the client closed
                    elif isinstance(event, h11.Request):
                        return await self._checked(event)
                    else:  # ConnectionClosed, or PAUSED on a protocol switch nobody offered
                        return None
            if scope.cancelled_caught and begun:
                await self._refuse(408, "the request head did not arrive in time")
            return None
        finally:
            if release is not None:
                release()

    def _enter_unfinished(self) -> Callable[[], None] | None:
        """Count this connection as owing a head; its release, or None past a cap."""
        if self._unfinished is None:
            return _nothing
        return self._unfinished.enter(self._client[0] if self._client else "")

    def _next_arrived(self) -> Any:
        """h11's next event from what has arrived, taking (on plain TCP) what waits
        in the socket without waiting for more: NEED_DATA if that is not enough."""
        http = self._http
        while True:
            event = http.next_event()
            if event is not h11.NEED_DATA or self._socket is None:
                return event
            try:
                data = os.read(self._socket.fileno(), RECEIVE_BYTES)
            except BlockingIOError:
                return event
            http.receive_data(data)  # b"": the client closed

    async def _checked(self, request: h11.Request) -> h11.Request | None:
        """``request`` if this server takes it; otherwise it is refused (None)."""
        if request.http_version not in (b"1.1", b"1.0"):
            await self._refuse(505, "HTTP/1.1 or HTTP/1.0 only")
            return None
        # h11 bounds only a head still incomplete; one that arrived whole in a
        # read is measured here, so that the limit holds however it came.
        headers = header_list(request)
        size = len(request.method) + len(request.target)
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self._max_head_bytes:
            await self._refuse(431, "the request head is too large")
            return None
        self._headers = headers
        names = {name for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # Framed two ways: a proxy in front may have read it the other way
            # (request smuggling). Refused, and the connection closes (RFC 9112 §6.1).
            await self._refuse(400, "both Content-Length and Transfer-Encoding")
            return None
        if b"content-length" not in names and b"transfer-encoding" not in names:
            # No body: h11 ends the request at once, and the connection can be kept.
            self._http.next_event()
        return request

    async def _refuse(self, status: int, message: str) -> None:
        """An error answer before the application saw the request; the connection closes."""
        body = b'{"error":"bad_request","message":%s}' % json.dumps(message).encode()
        if status == 408:
            body = b'{"error":"timeout"}'
        head = _response_head(status, [(b"content-type", b"application/json")], len(body), True)
        await self._send(head + body)
        if not self._gone:
            # The rest of the refused request may still be arriving: a close
            # with unread input would reset the connection, and the answer with it.
            await self._linger()

    async def _respond(self, request: h11.Request) -> bool:
        """Run the application for ``request`` and write its answer; whether to keep the connection."""
        raw_target = bytes(request.target)
        raw_path, _, query = raw_target.partition(b"?")
        method = request.method.decode("ascii")
        http_version = request.http_version.decode("ascii")
        scope: Message = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": http_version,
            "method": method,
            "scheme": self._scheme,
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": self._headers,
            "client": self._client,
            "server": self._server,
        }
        keep = http_version == "1.1" and not any(
            name == b"connection" and b"close" in value.lower() for name, value in self._headers
        )
        self._body_unread = self._http.their_state is h11.SEND_BODY
        self._body_failed = False
        self._body_deadline = trio.current_time() + BODY_TIMEOUT_S
        start: Message | None = None
        body: list[bytes] = []
        done = False

        async def receive() -> Message:
            return await self._receive_body()

        async def send(message: Message) -> None:
            nonlocal start, done
            kind = message["type"]
            if kind == "http.response.start" and start is None:
                start = message
                return
            if kind != "http.response.body" or start is None or done:
                raise RuntimeError(f"unexpected ASGI message {kind!r}")
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return  # the answers of this API are small: written whole, in one write
            payload = b"".join(body)
            # The framing is this server's: the length of what was given, and
            # whether the connection stays open.
            headers = [
                (name, value)
                for name, value in (
                    (bytes(n).lower(), bytes(v)) for n, v in start.get("headers", ())
                )
                if name not in (b"content-length", b"connection")
            ]
            if self._body_unread:
                self._skip_arrived_body()
            close = not keep or self._body_unread or self._body_failed
            head = _response_head(int(start["status"]), headers, len(payload), close)
            done = True
            await self._send(head if method == "HEAD" else head + payload)

        try:
            await self._app(scope, receive, send)
        except Exception:
            log.exception("http_application_failed", extra={"path": scope["path"]})
        if self._gone:
            return False
        if not done:
            # Nothing of an answer is out yet (it is written whole): a 500 in its place.
            payload = b'{"error":"internal"}'
            headers = [(b"content-type", b"application/json")]
            await self._send(_response_head(500, headers, len(payload), True) + payload)
            return False
        return keep and not self._body_failed

    async def _receive_body(self) -> Message:
        http = self._http
        if not self._body_unread:
            return {"type": "http.disconnect"}
        if http.they_are_waiting_for_100_continue:
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self._gone:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError:
                break
            if event is h11.NEED_DATA:
                data = b""
                with trio.move_on_at(self._body_deadline):
                    try:
                        data = await self._receive()
                    except stream_errors:
                        pass
                if not data:  # the client left or was too slow: the body ends here
                    break
                http.receive_data(data)
            elif isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            elif isinstance(event, h11.EndOfMessage):
                self._body_unread = False
                return {"type": "http.request", "body": b"", "more_body": False}
            else:
                break
        self._body_unread, self._body_failed = False, True
        return {"type": "http.disconnect"}

    def _skip_arrived_body(self) -> None:
        """Drop the part of a body the application left unread that has already arrived.

        If that is all of it (``Content-Length: 0`` included), the request is
        complete and the connection can be kept; else the rest is still coming.
        """
        try:
            while True:
                event = self._http.next_event()
                if isinstance(event, h11.EndOfMessage):
                    self._body_unread = False
                    return
                if not isinstance(event, h11.Data):
                    return
        except h11.RemoteProtocolError:
            self._body_unread, self._body_failed = False, True


def _nothing() -> None:
    pass


def _response_head(
    status: int, headers: list[tuple[bytes, bytes]], length: int, close: bool
) -> bytes:
    """The status line and headers of an answer with a ``length``-byte body."""
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in headers:
        if _UNSAFE_HEADER.search(name) or _UNSAFE_HEADER.search(value):
            # Never from a client: the application's own bug, refused rather than
            # let a line break split the answer.
            raise ValueError(f"unsafe response header {name!r}")
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"content-length: %d\r\n" % length)
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
