"""The listening sockets and the accept loop both listeners share."""

from __future__ import annotations

import errno
import socket

import h11
import pytest
import trio

from linechatd import listeners
from linechatd.listeners import accept_loop, header_list, open_listeners, socket_address


async def accept_from_clients(
    listener: socket.socket, clients: int, wanted: int
) -> list[tuple[str, int] | None]:
    """Connect ``clients`` before the loop runs, then run ``accept_loop`` until
    ``wanted`` connections came in; their peers' addresses."""
    port = listener.getsockname()[1]
    connected = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
    accepted: list[tuple[str, int] | None] = []
    enough = trio.Event()

    async def on_connection(stream: trio.SocketStream) -> None:
        accepted.append(socket_address(stream.socket, peer=True))
        stream.socket.close()
        if len(accepted) >= wanted:
            enough.set()

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_loop, listener, on_connection, nursery, "test")
                await enough.wait()
                nursery.cancel_scope.cancel()
    finally:
        for client in connected:
            client.close()
    return accepted


async def test_a_backlog_larger_than_a_batch_is_accepted_whole_and_the_listener_closed() -> None:
    (listener,) = await open_listeners("127.0.0.1", 0)
    count = 3 * listeners.ACCEPT_BATCH + 5  # queued before the loop runs: several wake-ups
    accepted = await accept_from_clients(listener, count, count)
    assert len(accepted) == count
    assert {address[0] for address in accepted if address is not None} == {"127.0.0.1"}
    assert listener.fileno() == -1  # closed when the loop ended


async def test_port_zero_binds_one_free_port_and_a_taken_port_is_refused() -> None:
    (first,) = await open_listeners("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        assert port != 0
        with pytest.raises(OSError):
            await open_listeners("127.0.0.1", port)
    finally:
        first.close()


def test_headers_are_listed_once_with_lower_case_names() -> None:
    request = h11.Request(
        method="GET", target="/", headers=[("Host", "x"), ("X-Thing", "A"), ("x-thing", "b")]
    )
    assert header_list(request) == [(b"host", b"x"), (b"x-thing", b"A"), (b"x-thing", b"b")]


async def test_an_address_nobody_can_name_is_none() -> None:
    unconnected = trio.socket.socket()  # getpeername() fails, as after a reset
    a, b = trio.socket.socketpair()  # AF_UNIX: no (host, port) to give
    try:
        assert socket_address(unconnected, peer=True) is None
        assert socket_address(a, peer=True) is None
    finally:
        for sock in (unconnected, a, b):
            sock.close()


class _AbortsFirst(socket.socket):
    """A listening socket whose first accept() fails as a reset connection does."""

    aborted = False

    def accept(self) -> tuple[socket.socket, object]:
        if not self.aborted:
            self.aborted = True
            raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
        return super().accept()


async def test_a_connection_that_failed_before_its_accept_is_skipped_not_fatal() -> None:
    (bound,) = await open_listeners("127.0.0.1", 0)
    listener = _AbortsFirst(fileno=bound.detach())
    listener.setblocking(False)
    accepted = await accept_from_clients(listener, 2, 1)
    assert listener.aborted and len(accepted) >= 1
