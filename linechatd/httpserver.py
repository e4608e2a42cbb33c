"""The HTTP/1.1 server of the HTTP API: h11 on trio streams, one task per connection.

Every client connect starts with ``GET /api/connection-url``, so what a request
costs here bounds how fast clients can (re)connect. A general ASGI server spends
most of a small request on machinery this API does not use (a task group and
timers per request, HTTP/2, lifespan, streaming): this one serves one ASGI
application's ``http`` requests on the connection's own task, keeps connections
alive, and bounds what a client can make it hold:

- a request head: ``max_head_bytes`` (431 past it), complete within
  ``HEAD_TIMEOUT_S`` of the connection or of its first byte;
- an idle kept-alive connection: ``KEEP_ALIVE_TIMEOUT_S``;
- a body: the application reads it up to its own limit, each read within
  ``BODY_READ_TIMEOUT_S``; after a response that left the body unread (a 413)
  the rest is read and dropped for at most ``LINGER_S`` and ``LINGER_BYTES``,
  then the connection closes.

Requests are answered in order (h11 holds pipelined ones until the previous
response is out). Malformed requests get a JSON error (400, 431, 505...) and
the connection closes; no error ever shows a stack trace.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote

import h11
import trio

from .config import HostPort
from .listeners import accept_loop, open_listeners, receive_some, stream_errors

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_TIMEOUT_S = 30.0
BODY_READ_TIMEOUT_S = 30.0
RECEIVE_BYTES = 65536
# After a response that left the body unread: how long, and how much, is read and dropped.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20

Message = dict[str, Any]
Application = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

_ERROR_HEADERS = [(b"content-type", b"application/json"), (b"connection", b"close")]


async def serve_http_app(
    app: Application,
    listen: HostPort,
    *,
    max_head_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until cancelled; ``task_status.started`` gets the bound URLs."""
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
                client=_address(tcp.socket, peer=True),
                server=_address(tcp.socket, peer=False),
                max_head_bytes=max_head_bytes,
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
) -> None:
    """Serve requests on one accepted connection until it closes; the caller closes ``stream``."""
    await _Connection(app, stream, scheme, client, server, max_head_bytes).serve()


def _address(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:  # the peer already reset the connection
        return None
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else None


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
        "_socket",
    )

    def __init__(
        self,
        app: Application,
        stream: trio.abc.Stream,
        scheme: str,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        max_head_bytes: int,
    ) -> None:
        self._app = app
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

    async def serve(self) -> None:
        if isinstance(self._stream, trio.SSLStream):
            with trio.move_on_after(HEAD_TIMEOUT_S) as tls:
                await self._stream.do_handshake()
            if tls.cancelled_caught:
                return
        kept_alive = False  # a new connection owes its first request at once
        while True:
            request = await self._read_head(kept_alive)
            if request is None:
                return
            await self._respond(request)
            http = self._http
            if http.their_state is h11.SEND_BODY:
                await self._linger()
                return
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return  # the client asked to close, or spoke HTTP/1.0
            http.start_next_cycle()
            kept_alive = True
            # A client pipelining requests may never make a read wait: let the others run.
            await trio.lowlevel.checkpoint()

    async def _receive(self) -> bytes:
        return await receive_some(self._stream, RECEIVE_BYTES)

    async def _send(self, data: bytes) -> None:
        sock = self._socket
        if sock is None:
            await self._stream.send_all(data)
            return
        with memoryview(data) as view:
            sent = 0
            while sent < len(data):
                try:
                    sent += os.write(sock.fileno(), view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)

    async def _linger(self) -> None:
        """Read and drop what is left of a refused body before closing.

        Closing a socket with unread bytes makes the kernel reset it, and the
        reset can reach the client before it has read the answer (a 413 the
        client never sees). Bounded in time and bytes like nginx's lingering close.
        """
        if self._socket is not None:
            self._socket.shutdown(socket.SHUT_WR)
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
        wait_s = KEEP_ALIVE_TIMEOUT_S if kept_alive else HEAD_TIMEOUT_S
        begun = False  # whether any byte of this request has arrived
        with trio.CancelScope(deadline=trio.current_time() + wait_s) as scope:
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
                    http.receive_data(bytes(data))  # b"": the client closed
                elif isinstance(event, h11.Request):
                    return await self._checked(event)
                else:  # ConnectionClosed, or PAUSED on a protocol switch nobody offered
                    return None
        if scope.cancelled_caught and begun:
            await self._refuse(408, "the request head did not arrive in time")
        return None

    async def _checked(self, request: h11.Request) -> h11.Request | None:
        """``request`` if this server takes it; otherwise it is refused (None)."""
        if request.http_version not in (b"1.1", b"1.0"):
            await self._refuse(505, "HTTP/1.1 or HTTP/1.0 only")
            return None
        # h11 bounds only a head still incomplete; one that arrived whole in a
        # read is measured here, so that the limit holds however it came.
        size = len(request.method) + len(request.target)
        size += sum(len(name) + len(value) + 4 for name, value in request.headers)
        if size > self._max_head_bytes:
            await self._refuse(431, "the request head is too large")
            return None
        if not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in request.headers
        ):
            # No body: h11 ends the request at once, and the connection can be kept.
            self._http.next_event()
        return request

    async def _refuse(self, status: int, message: str) -> None:
        """An error answer before the application saw the request; the connection closes."""
        http = self._http
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b'{"error":"bad_request","message":%s}' % _json_string(message)
        if status == 408:
            body = b'{"error":"timeout"}'
        headers = [*_ERROR_HEADERS, (b"content-length", str(len(body)).encode())]
        try:
            data = http.send(h11.Response(status_code=status, headers=headers)) or b""
            data += http.send(h11.Data(data=body)) or b""
            data += http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        with trio.move_on_after(HEAD_TIMEOUT_S):
            await self._send(data)

    async def _respond(self, request: h11.Request) -> None:
        http = self._http
        raw_target = bytes(request.target)
        raw_path, _, query = raw_target.partition(b"?")
        method = request.method.decode("ascii")
        scope: Message = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"),
            "method": method,
            "scheme": self._scheme,
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(bytes(k), bytes(v)) for k, v in request.headers],
            "client": self._client,
            "server": self._server,
        }
        head_only = method == "HEAD"
        started: list[Message] = []
        self._body_unread = http.their_state is h11.SEND_BODY

        async def receive() -> Message:
            return await self._receive_body()

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                started.append(message)
                return
            if kind != "http.response.body" or not started:
                raise RuntimeError(f"unexpected ASGI message {kind!r}")
            start = started[0]
            out = b""
            if http.our_state is h11.SEND_RESPONSE:
                headers = list(start.get("headers", ()))
                if self._body_unread:
                    headers.append((b"connection", b"close"))
                out = http.send(h11.Response(status_code=start["status"], headers=headers)) or b""
            body = message.get("body", b"")
            if body and not head_only:
                out += http.send(h11.Data(data=body)) or b""
            if not message.get("more_body", False):
                out += http.send(h11.EndOfMessage()) or b""
            await self._send(out)

        try:
            await self._app(scope, receive, send)
        except Exception:
            log.exception("http_application_failed", extra={"path": scope["path"]})
        if http.our_state is h11.SEND_RESPONSE:
            body = b'{"error":"internal"}'
            headers = [*_ERROR_HEADERS, (b"content-length", str(len(body)).encode())]
            data = http.send(h11.Response(status_code=500, headers=headers)) or b""
            data += http.send(h11.Data(data=body)) or b""
            data += http.send(h11.EndOfMessage()) or b""
            await self._send(data)

    async def _receive_body(self) -> Message:
        http = self._http
        if not self._body_unread:
            return {"type": "http.disconnect"}
        if http.they_are_waiting_for_100_continue:
            proceed = http.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            await self._send(proceed)
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError:
                self._body_unread = False
                return {"type": "http.disconnect"}
            if event is h11.NEED_DATA:
                data: bytes | bytearray = b""
                with trio.move_on_after(BODY_READ_TIMEOUT_S):
                    data = await self._receive()
                if not data:  # the client closed or stalled: the body ends here
                    self._body_unread = False
                    return {"type": "http.disconnect"}
                http.receive_data(bytes(data))
            elif isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            elif isinstance(event, h11.EndOfMessage):
                self._body_unread = False
                return {"type": "http.request", "body": b"", "more_body": False}
            else:
                self._body_unread = False
                return {"type": "http.disconnect"}


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()
