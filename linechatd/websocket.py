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
from urllib.parse import unquote_plus

import trio
import trio_websocket

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
# How long a closing handshake may take before the socket is dropped.
DISCONNECT_TIMEOUT_S = 2.0
# A peer closed for abuse is not waited for: until its close reply arrives
# every byte it keeps sending would still be read and parsed.
ABUSE_CLOSE_WAIT_S = 0.1


class ConnectionClosed(Exception):
    """The peer (or the network) closed the connection."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class Connection:
    """An accepted WebSocket: text frames in and out, and a close with a code."""

    __slots__ = ("_ws", "_max_bytes", "_local_close_code")

    def __init__(self, ws: trio_websocket.WebSocketConnection, max_message_bytes: int) -> None:
        self._ws = ws
        self._max_bytes = max_message_bytes
        # The library records 1000 for every close we start; keep the real code.
        self._local_close_code: int | None = None

    async def receive(self) -> str | bytes:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise ConnectionClosed(
                getattr(reason, "code", None), getattr(reason, "reason", None)
            ) from None
        # The library bounds a text message by characters, which lets through
        # up to four times the limit in bytes; the limit is in bytes. (isascii
        # is O(1), so the common case costs no encoding.)
        if (
            isinstance(message, str)
            and len(message) * 4 > self._max_bytes
            and not message.isascii()
            and len(message.encode("utf-8", "surrogatepass")) > self._max_bytes
        ):
            await self.close(CLOSE_TOO_BIG, f"message larger than {self._max_bytes} bytes")
            raise ConnectionClosed(CLOSE_TOO_BIG, "message too big")
        return message

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_message(text)
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            raise ConnectionClosed(
                getattr(reason, "code", None), getattr(reason, "reason", None)
            ) from None

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and wait for the peer's (bounded); then drop the TCP connection.

        After 1008/1009 the wait is short: the peer misbehaves, so the
        connection is failed (RFC 6455 §7.1.7) rather than closed politely.
        """
        if self._ws.closed is None and self._local_close_code is None:
            self._local_close_code = code
        wait_s = (
            ABUSE_CLOSE_WAIT_S if code in (CLOSE_POLICY, CLOSE_TOO_BIG) else DISCONNECT_TIMEOUT_S
        )
        # Cancelled mid-close, the library still closes the TCP stream.
        with trio.move_on_after(wait_s):
            try:
                await self._ws.aclose(code, reason[:120])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    @property
    def closed_code(self) -> int | None:
        closed = self._ws.closed
        if closed is None:
            return None
        return self._local_close_code if self._local_close_code is not None else closed.code


class Handshake:
    """An upgrade request not yet answered: ``accept()`` it or ``reject()`` it.

    Built from attacker-controlled bytes, so building it never raises: an odd
    request target or a peer already gone must not reach the listener.
    """

    __slots__ = ("_request", "_max_bytes", "path", "query", "headers", "remote")

    def __init__(self, request: trio_websocket.WebSocketRequest, max_message_bytes: int) -> None:
        self._request = request
        self._max_bytes = max_message_bytes
        # Split by hand: urlsplit() raises on targets like "//[x" (h11 lets
        # any visible characters through).
        path, _, query = request.path.partition("?")
        self.path = path
        self.query, _, _fragment = query.partition("#")
        self.headers: Mapping[str, str] = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
        }
        self.remote = _remote_address(request)

    def __repr__(self) -> str:
        # Never the query string: it carries the bearer token.
        return f"<Handshake {self.path} from {self.remote}>"

    async def accept(self) -> Connection:
        return Connection(await self._request.accept(), self._max_bytes)

    async def reject(
        self, status: int, body: Mapping[str, object], headers: Mapping[str, str] | None = None
    ) -> None:
        extra = [(b"content-type", b"application/json")]
        extra += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        try:
            await self._request.reject(status, extra_headers=extra, body=json.dumps(body).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _remote_address(request: trio_websocket.WebSocketRequest) -> str:
    """The peer's IP address ("" when it cannot be known, e.g. already disconnected)."""
    try:
        remote = request.remote
    except OSError:  # getpeername() after the peer reset the connection
        return ""
    address = getattr(remote, "address", None)
    return str(address) if address is not None else ""


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
    """Listen until cancelled; ``task_status.started(port)`` once bound.

    ``handshake_timeout_s`` bounds everything before the upgrade request is
    complete, TLS handshake included: a socket that never finishes is closed.
    """

    async def on_request(request: trio_websocket.WebSocketRequest) -> None:
        # A fault boundary per connection: the library runs every connection
        # in the listener's nursery, so one that raised would stop the listener.
        try:
            await handler(Handshake(request, max_message_bytes))
        except Exception:
            log.exception("websocket_connection_failed")

    async def run(*, task_status: trio.TaskStatus[trio_websocket.WebSocketServer]) -> None:
        await trio_websocket.serve_websocket(
            on_request,
            host,
            port,
            ssl_context,
            # Larger messages are refused by the library with close code 1009.
            max_message_size=max_message_bytes,
            connect_timeout=handshake_timeout_s,
            disconnect_timeout=DISCONNECT_TIMEOUT_S,
            # Inbound backpressure: one complete message waits at most.
            message_queue_size=1,
            receive_buffer_size=65536,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run)
        task_status.started(server.port)
