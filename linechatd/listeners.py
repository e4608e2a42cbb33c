"""What the HTTP and WebSocket listeners share: accepting sockets without stopping on a full table."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

# Errors that mean the peer or the socket is gone: nothing to report.
stream_errors = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# accept() failures that mean "no room now", not "the listener is broken".
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_S = 0.1


async def accept_loop(
    listener: trio.SocketListener,
    on_connection: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
    name: str,
) -> None:
    """Like ``trio.serve_listeners``, except that the socket is closed by
    ``on_connection`` (or by whoever it hands an accepted connection to), not
    when its task returns. ``name`` tells the listeners apart in the log."""
    async with listener:
        while True:
            try:
                tcp = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of file descriptors or memory: the sockets already open
                # matter more; try again shortly rather than stop listening.
                log.error(f"{name}_accept_failed", extra={"error": exc.strerror})
                await trio.sleep(ACCEPT_RETRY_S)
            else:
                nursery.start_soon(on_connection, tcp)
