"""The WebSocket transport, behind one narrow interface.

Its per-message cost bounds the gateway's throughput, so nothing outside this
module touches the WebSocket library: sessions see ``Handshake`` and
``Connection`` only, and a faster transport can replace this one without
touching routing or partition code.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import trio
import trio_websocket

log = logging.getLogger(__name__)


class ConnectionClosed(Exception):
    """The peer (or the network) closed the connection."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class Connection:
    """An accepted WebSocket: text frames in and out, and a close with a code."""

    __slots__ = ("_ws",)

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise ConnectionClosed(
                getattr(reason, "code", None), getattr(reason, "reason", None)
            ) from None

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_message(text)
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise ConnectionClosed(
                getattr(reason, "code", None), getattr(reason, "reason", None)
            ) from None

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and wait (bounded by the server's disconnect timeout)."""
        try:
            await self._ws.aclose(code, reason[:120])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    @property
    def closed_code(self) -> int | None:
        closed = self._ws.closed
        return None if closed is None else closed.code


class Handshake:
    """An upgrade request not yet answered: ``accept()`` it or ``reject()`` it."""

    __slots__ = ("_request", "path", "query", "headers", "remote")

    def __init__(self, request: trio_websocket.WebSocketRequest) -> None:
        self._request = request
        target = urlsplit(request.path)
        self.path = target.path
        self.query = target.query
        self.headers: Mapping[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
        }
        remote = request.remote
        self.remote = getattr(remote, "address", str(remote))

    async def accept(self) -> Connection:
        return Connection(await self._request.accept())

    async def reject(
        self, status: int, body: Mapping[str, object], headers: Mapping[str, str] | None = None
    ) -> None:
        extra = [(b"content-type", b"application/json")]
        extra += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        try:
            await self._request.reject(status, extra_headers=extra, body=json.dumps(body).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def serve(
    handler: Callable[[Handshake], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    max_message_bytes: int,
    handshake_timeout_s: float,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until cancelled; ``task_status.started(port)`` once bound."""

    async def on_request(request: trio_websocket.WebSocketRequest) -> None:
        await handler(Handshake(request))

    async def run(*, task_status: trio.TaskStatus[trio_websocket.WebSocketServer]) -> None:
        await trio_websocket.serve_websocket(
            on_request,
            host,
            port,
            ssl_context,
            # Larger messages are refused by the library with close code 1009.
            max_message_size=max_message_bytes,
            connect_timeout=handshake_timeout_s,
            disconnect_timeout=2.0,
            # Inbound backpressure: one complete message waits at most.
            message_queue_size=1,
            receive_buffer_size=65536,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run)
        task_status.started(server.port)
