"""A TCP proxy that injects network faults, for tests of connection loss.

Point a client (kazoo, a gateway's ``zookeeper.hosts``) at the proxy instead of
the server, then switch modes while it runs:

- ``pass_through()`` / ``restore()``: forward bytes both ways (the default).
- ``cut()``: reset every open connection and reset new ones at once, until restored,
  like a server that went away.
- ``blackhole()``: keep connections open but drop every byte both ways, like a
  network partition; a client only notices through its own timeouts. A stream
  that lost bytes cannot be resumed, so ``restore()`` resets those connections
  (as the peers' TCP timeouts eventually would); untouched ones carry on.
- ``delay(seconds)``: forward everything, each chunk ``seconds`` late (order kept).
"""

from __future__ import annotations

import enum
import math
import socket
import struct
from dataclasses import dataclass

import trio

__all__ = ["FaultProxy", "FaultProxyStatistics", "Mode"]

_CHUNK = 65536
_QUEUED_CHUNKS = 256


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    BLACKHOLE = "blackhole"


@dataclass(frozen=True)
class FaultProxyStatistics:
    mode: Mode
    delay_s: float
    open_connections: int
    accepted_connections: int


def _abort(stream: trio.SocketStream) -> None:
    """Close with a RST, at once: no lingering FIN handshake, no TIME_WAIT."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, trio.ClosedResourceError):
        pass
    # trio's socket close is synchronous and wakes any task blocked on the socket.
    stream.socket.close()


class _Connection:
    def __init__(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.client = client
        self.upstream = upstream
        self.scope = trio.CancelScope()
        self.lost_bytes = False
        self.ends_passed = 0  # half-closes forwarded; 2 means a clean end both ways

    def abort(self) -> None:
        self.scope.cancel()
        _abort(self.client)
        _abort(self.upstream)


class FaultProxy:
    """Forwards ``host:port`` (port 0: a free one) to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self._mode = Mode.PASS
        self._delay_s = 0.0
        self._connections: set[_Connection] = set()
        self._accepted = 0

    @classmethod
    def to(cls, address: str, *, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        """A proxy for ``"host:port"`` (one ZooKeeper server or one broker)."""
        target_host, _, target_port = address.rpartition(":")
        return cls(target_host.strip("[]"), int(target_port), host=host, port=port)

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.address} -> {self.target_host}:{self.target_port} "
            f"{self._mode.value} delay={self._delay_s:g}s>"
        )

    @property
    def address(self) -> str:
        """``"host:port"`` to give clients; the real port is known once ``run`` has started."""
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def statistics(self) -> FaultProxyStatistics:
        return FaultProxyStatistics(
            mode=self._mode,
            delay_s=self._delay_s,
            open_connections=len(self._connections),
            accepted_connections=self._accepted,
        )

    def pass_through(self) -> None:
        """Forward normally, without added delay; resets streams that lost bytes."""
        self._mode = Mode.PASS
        self._delay_s = 0.0
        for conn in list(self._connections):
            if conn.lost_bytes:
                conn.abort()

    restore = pass_through

    def cut(self) -> None:
        self._mode = Mode.CUT
        for conn in list(self._connections):
            conn.abort()

    def blackhole(self) -> None:
        self._mode = Mode.BLACKHOLE

    def delay(self, seconds: float) -> None:
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"delay must be a finite number >= 0, got {seconds!r}")
        self._mode = Mode.PASS
        self._delay_s = seconds

    async def run(
        self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``await nursery.start(proxy.run)`` returns once it listens."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        listener = listeners[0]
        for extra in listeners[1:]:
            await extra.aclose()
        self.port = listener.socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    stream = await listener.accept()
                    self._accepted += 1
                    nursery.start_soon(self._handle, stream)
        finally:
            for conn in list(self._connections):
                conn.abort()
            await listener.aclose()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._mode is Mode.CUT:
            _abort(client)
            return
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            _abort(client)
            return
        conn = _Connection(client, upstream)
        if self._mode is Mode.CUT:  # cut while we were connecting upstream
            conn.abort()
            return
        self._connections.add(conn)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, conn, client, upstream)
                    nursery.start_soon(self._pump, conn, upstream, client)
        finally:
            self._connections.discard(conn)
            if conn.ends_passed == 2:
                # Both sides said goodbye: close gently so no byte still in flight is lost.
                with trio.CancelScope(shield=True):
                    await client.aclose()
                    await upstream.aclose()
            else:
                conn.abort()

    async def _pump(
        self, conn: _Connection, source: trio.SocketStream, sink: trio.SocketStream
    ) -> None:
        """One direction: a reader stamps chunks, a writer sends each when its delay is up.

        b"" stands for end of stream and is passed on as a half-close.
        """
        send, receive = trio.open_memory_channel[tuple[float, bytes]](_QUEUED_CHUNKS)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, source, send)
                await self._write(conn, sink, receive)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # Either side failed (the error arrives wrapped by the pump's
            # nursery): the whole connection goes, as with a real one.
            conn.scope.cancel()

    async def _read(
        self, source: trio.SocketStream, send: trio.MemorySendChannel[tuple[float, bytes]]
    ) -> None:
        async with send:
            while True:
                data = await source.receive_some(_CHUNK)
                await send.send((trio.current_time() + self._delay_s, bytes(data)))
                if not data:
                    return

    async def _write(
        self,
        conn: _Connection,
        sink: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
    ) -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if self._mode is not Mode.PASS:
                    conn.lost_bytes = True
                    continue
                if not data:
                    await sink.send_eof()
                    conn.ends_passed += 1
                    return
                await sink.send_all(data)
