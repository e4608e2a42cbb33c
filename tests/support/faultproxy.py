"""A TCP proxy that injects network faults, for tests of connection loss.

Point a client (kazoo, a gateway's ``zookeeper.hosts``, a broker's advertised
listener) at the proxy instead of the server, then switch faults while it runs:

- ``pass_through()``: forward bytes both ways (the default).
- ``cut()``: reset every open connection and reset new ones at once, until
  restored, like a server that went away.
- ``blackhole()``: keep connections open but drop every byte both ways, like a
  network partition; a client only notices through its own timeouts. A stream
  that lost bytes cannot be resumed, so when its bytes flow again (pass or
  delay) the proxy resets it (as the peers' TCP timeouts eventually would);
  untouched ones carry on.
- ``delay(seconds)``: forward everything, each chunk ``seconds`` late (order kept).
- ``restore()``: everyone back to ``pass_through``, per-process faults dropped.

Faults per process. Each method takes ``pid=``: the fault then applies only to
connections opened by that process, and overrides the fault for everyone
(``restore(pid=...)`` drops the override again). Several gateways share one
target address (a broker advertises one address to all its clients), so the
proxy tells its clients apart by who owns the other end of each accepted
connection: the peer's address names the client's socket in /proc/net/tcp, its
inode names the process holding it in /proc/<pid>/fd (Linux, same user: the
test's own child processes; see support/procnet.py). A client it cannot
identify gets the fault for everyone.
"""

from __future__ import annotations

import enum
import math
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import trio

from support.procnet import socket_owner, tcp_socket

__all__ = ["Fault", "FaultProxy", "FaultProxyStatistics", "Mode"]

_CHUNK = 65536
_QUEUED_CHUNKS = 256


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    BLACKHOLE = "blackhole"


@dataclass(frozen=True)
class Fault:
    """What the proxy does to a connection: a mode, and a delay (meaningful with PASS)."""

    mode: Mode = Mode.PASS
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.delay_s >= 0 and math.isfinite(self.delay_s)):
            raise ValueError(f"delay must be a finite number >= 0, got {self.delay_s!r}")

    @property
    def forwards(self) -> bool:
        return self.mode is Mode.PASS


NO_FAULT = Fault()


@dataclass(frozen=True)
class FaultProxyStatistics:
    mode: Mode  # the fault for everyone without an override
    delay_s: float
    open_connections: int
    accepted_connections: int
    refused_connections: int  # reset at once: their process was cut
    overrides: Mapping[int, Fault]  # pid -> its own fault
    open_by_pid: Mapping[int | None, int]  # owner pid (None: unknown) -> open connections


def _abort(stream: trio.SocketStream) -> None:
    """Close with a RST, at once: no lingering FIN handshake, no TIME_WAIT."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, trio.ClosedResourceError):
        pass
    # trio's socket close is synchronous and wakes any task blocked on the socket.
    stream.socket.close()


class _AnswerWaiter:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.event = trio.Event()
        self.at = math.nan


class _Connection:
    def __init__(
        self, client: trio.SocketStream, upstream: trio.SocketStream, pid: int | None
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.pid = pid
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
        identify_clients: bool = True,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.identify_clients = identify_clients
        self._default = NO_FAULT
        self._overrides: dict[int, Fault] = {}
        self._connections: set[_Connection] = set()
        self._accepted = 0
        self._refused = 0
        self._seen_pids: dict[int, None] = {}  # insertion-ordered: the likeliest owners first
        self._answer_waiters: list[_AnswerWaiter] = []

    @classmethod
    def to(cls, address: str, *, host: str = "127.0.0.1", port: int = 0) -> FaultProxy:
        """A proxy for ``"host:port"`` (one ZooKeeper server or one broker)."""
        target_host, _, target_port = address.rpartition(":")
        return cls(target_host.strip("[]"), int(target_port), host=host, port=port)

    def __repr__(self) -> str:
        overrides = "".join(
            f" pid {pid}: {fault.mode.value}/{fault.delay_s:g}s"
            for pid, fault in self._overrides.items()
        )
        return (
            f"<FaultProxy {self.address} -> {self.target_host}:{self.target_port} "
            f"{self._default.mode.value} delay={self._default.delay_s:g}s{overrides}>"
        )

    @property
    def address(self) -> str:
        """``"host:port"`` to give clients; the real port is known once ``run`` has started."""
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        """The mode for everyone without a fault of their own."""
        return self._default.mode

    def fault_for(self, pid: int | None) -> Fault:
        """The fault applied to connections of process ``pid`` (None: unidentified)."""
        if pid is None:
            return self._default
        return self._overrides.get(pid, self._default)

    def connections_of(self, pid: int | None) -> int:
        """How many open connections process ``pid`` has through the proxy."""
        return sum(1 for conn in self._connections if conn.pid == pid)

    def statistics(self) -> FaultProxyStatistics:
        by_pid: dict[int | None, int] = {}
        for conn in self._connections:
            by_pid[conn.pid] = by_pid.get(conn.pid, 0) + 1
        return FaultProxyStatistics(
            mode=self._default.mode,
            delay_s=self._default.delay_s,
            open_connections=len(self._connections),
            accepted_connections=self._accepted,
            refused_connections=self._refused,
            overrides=MappingProxyType(dict(self._overrides)),
            open_by_pid=MappingProxyType(by_pid),
        )

    # --- switching faults ---------------------------------------------------------------

    def pass_through(self, *, pid: int | None = None) -> None:
        """Forward normally, without added delay; resets streams that lost bytes."""
        self._set(NO_FAULT, pid)

    def restore(self, *, pid: int | None = None) -> None:
        """``pid``'s override dropped; without ``pid``, everyone back to pass-through."""
        if pid is None:
            self._overrides.clear()
            self._set(NO_FAULT, None)
        else:
            self._overrides.pop(pid, None)
            self._apply()

    def cut(self, *, pid: int | None = None) -> None:
        self._set(Fault(Mode.CUT), pid)

    def blackhole(self, *, pid: int | None = None) -> None:
        self._set(Fault(Mode.BLACKHOLE), pid)

    def delay(self, seconds: float, *, pid: int | None = None) -> None:
        """Forward each chunk ``seconds`` late, both ways; resets streams that lost bytes."""
        self._set(Fault(Mode.PASS, seconds), pid)

    def _set(self, fault: Fault, pid: int | None) -> None:
        if pid is None:
            self._default = fault
        else:
            self._overrides[pid] = fault
        self._apply()

    def _apply(self) -> None:
        """Bring open connections in line: cut ones go, lossy ones go once bytes flow again."""
        for conn in list(self._connections):
            fault = self.fault_for(conn.pid)
            if fault.mode is Mode.CUT or (fault.forwards and conn.lost_bytes):
                conn.abort()
                # Gone now, not once its task has run: statistics() says so at once.
                self._connections.discard(conn)

    async def wait_answer(self, *, pid: int | None = None) -> float:
        """Wait until the target's next bytes reach a client (of ``pid``); when, by ``time.time()``.

        The target has just heard from that client: a fault set right after
        this returns starts no earlier than the client's last contact, which is
        what a test of the target's timeouts (a session expiry) measures from.
        """
        waiter = _AnswerWaiter(pid)
        self._answer_waiters.append(waiter)
        try:
            await waiter.event.wait()
        finally:
            self._answer_waiters.remove(waiter)
        return waiter.at

    def _answered(self, pid: int | None) -> None:
        now = time.time()
        for waiter in self._answer_waiters:
            if waiter.pid is None or waiter.pid == pid:
                waiter.at = now
                waiter.event.set()

    # --- serving ------------------------------------------------------------------------

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

    async def _identify(self, client: trio.SocketStream) -> int | None:
        if not self.identify_clients:
            return None
        try:
            peer = client.socket.getpeername()
            here = client.socket.getsockname()
        except OSError:
            return None
        candidates = [*self._overrides, *reversed(self._seen_pids)]

        def lookup() -> int | None:
            # The client's socket is bound to our peer's address, connected to ours.
            found = tcp_socket((peer[0], peer[1]), (here[0], here[1]))
            return None if found is None else socket_owner(found.inode, candidates)

        pid = await trio.to_thread.run_sync(lookup)
        if pid is not None:
            self._seen_pids.pop(pid, None)
            self._seen_pids[pid] = None
            while len(self._seen_pids) > 64:  # bounded: the oldest owners go first
                del self._seen_pids[next(iter(self._seen_pids))]
        return pid

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            pid = await self._identify(client)
            if self.fault_for(pid).mode is Mode.CUT:
                self._refused += 1
                _abort(client)
                return
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except BaseException as exc:
            # Refused upstream, or the proxy stopping: the client socket is ours to close.
            _abort(client)
            if isinstance(exc, OSError):
                return
            raise
        conn = _Connection(client, upstream, pid)
        if self.fault_for(pid).mode is Mode.CUT:  # cut while we were connecting upstream
            self._refused += 1
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
                nursery.start_soon(self._read, conn, source, send)
                await self._write(conn, sink, receive)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # Either side failed (the error arrives wrapped by the pump's
            # nursery): the whole connection goes, as with a real one.
            conn.scope.cancel()

    async def _read(
        self,
        conn: _Connection,
        source: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        async with send:
            while True:
                data = await source.receive_some(_CHUNK)
                delay_s = self.fault_for(conn.pid).delay_s
                await send.send((trio.current_time() + delay_s, bytes(data)))
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
                if not self.fault_for(conn.pid).forwards:
                    conn.lost_bytes = True
                    continue
                if not data:
                    await sink.send_eof()
                    conn.ends_passed += 1
                    return
                await sink.send_all(data)
                if sink is conn.client and self._answer_waiters:
                    self._answered(conn.pid)
