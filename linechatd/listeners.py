"""What the HTTP and WebSocket listeners share: listening sockets and the loop that accepts on them.

The sockets are the standard library's, waited on with trio: a wake-up
accepts every connection already queued (a reconnect storm is many), where a
trio listener would take one per wake-up, with a checkpoint after each.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import h11
import trio

from .keyedcount import KeyedCounter

log = logging.getLogger(__name__)

# Errors that mean the peer or the socket is gone: nothing to report.
stream_errors = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# accept() failures that mean "no room now", not "the listener is broken".
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() failures about one connection only (a firewall refusing it, an early
# reset...): that connection is skipped, as trio's own listener does.
_ACCEPT_SKIP_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
}
ACCEPT_RETRY_S = 0.1
# Connections accepted per wake-up at most, so that a storm cannot hold the loop.
ACCEPT_BATCH = 64
# The kernel caps it at net.core.somaxconn.
BACKLOG = 65535


def socket_address(sock: trio.socket.SocketType, *, peer: bool) -> tuple[str, int] | None:
    """The peer's (or, ``peer=False``, this end's) address and port; None once unknowable
    (``getpeername()`` fails after the peer reset the connection)."""
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else None


def header_list(request: h11.Request) -> list[tuple[bytes, bytes]]:
    """The request's headers, names lower-cased, as a list.

    h11's ``Headers`` is a Sequence that iterates through ``__getitem__``; a
    handshake looks at its headers several times, and this list is built once.
    """
    return [(bytes(name).lower(), bytes(value)) for name, value in request.headers.raw_items()]


async def receive_some(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """``stream.receive_some``; on plain TCP the system call itself when data is waiting.

    A request head is one read: the stream's layers (a conflict detector,
    error translation, a checkpoint after the call) cost more than the read.
    Without data waiting, this waits like the stream would (a checkpoint).
    """
    if not isinstance(stream, trio.SocketStream):
        return bytes(await stream.receive_some(max_bytes))
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def open_listeners(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host`` (every address it resolves to) and ``port``.

    As ``trio.open_tcp_listeners``: SO_REUSEADDR, IPv6 sockets IPv6-only, and
    port 0 takes one free port (the first socket's) for all of them.
    """
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(listeners) > 1:
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


async def accept_loop(
    listener: socket.socket,
    on_connection: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
    name: str,
) -> None:
    """Accept until cancelled, then close ``listener``; each connection gets a task in ``nursery``.

    The accepted socket is closed by ``on_connection`` (or by whoever it hands
    the connection to), not when its task returns. ``name`` tells the
    listeners apart in the log.
    """
    try:
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _address = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIP_ERRNOS:
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of file descriptors or memory: the sockets already open
                    # matter more; try again shortly rather than stop listening.
                    log.error(f"{name}_accept_failed", extra={"error": exc.strerror})
                    await trio.sleep(ACCEPT_RETRY_S)
                    break
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                nursery.start_soon(on_connection, stream)
    finally:
        trio.lowlevel.notify_closing(listener)
        listener.close()


class UnfinishedRequests:
    """Sockets whose request (an upgrade, an HTTP request head) is not complete yet,
    capped in total and per address.

    No I/O: a listener asks :meth:`enter` before it waits for a request and
    closes the socket at once when refused, so slow or idle clients cannot
    hold more than the caps of sockets (and their buffers) however many they open.
    """

    def __init__(
        self,
        max_total: int,
        max_per_address: int,
        *,
        address_key: Callable[[str], str] = lambda remote: remote,
        on_refused: Callable[[], object] = lambda: None,
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._key = address_key
        self._on_refused = on_refused
        self.refused = 0
        self._held: KeyedCounter[str] = KeyedCounter()

    @property
    def total(self) -> int:
        return self._held.total

    def of(self, remote: str) -> int:
        return self._held.of(self._key(remote))

    def enter(self, remote: str) -> Callable[[], None] | None:
        """Count a socket from ``remote``; its release, or None when a cap is reached."""
        key, held = self._key(remote), self._held
        if held.total >= self.max_total or held.of(key) >= self.max_per_address:
            self.refused += 1
            self._on_refused()
            return None
        return held.add(key)
