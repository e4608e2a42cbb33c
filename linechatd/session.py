"""One device's WebSocket session: the I/O shell around its :class:`~linechatd.delivery.SessionCore`.

The core decides (what to send, in which order, when to close); this shell
moves bytes and time. One task per session, the reader; it owns the
connection from the accepted handshake to the closed socket. Frames are
written in the call that queued them while the socket takes them at once
(no task switch); a writer task runs only while there is a backlog, draining
it within ``limits.send_timeout_s`` per frame. Delivery reports need no task
either: each resolves on the trio thread and lets the core answer the sends
at the head of its in-flight queue. An idle session is one task and a
handful of objects.

A session runs in its partition's nursery (``PartitionRuntime.serve`` starts
it there), so losing the lease closes it with 1012 whoever accepted it.

Slow readers: the partition's delivery never waits for a socket. The
core's outbox is bounded; a full one, or a frame the socket has not taken
within the send deadline, closes the session with 1013. The device
reconnects with ``resume`` and gets what it missed from Kafka, not from this
process's memory.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from .delivery import CoreLimits, ProduceRequest, SessionCore
from .kafka import KafkaUnavailable
from .metrics import close_label
from .protocol import CloseCode, encode_welcome
from .ratelimit import TokenBucket
from .replay import Replay, ReplayHub
from .websocket import Connection, ConnectionClosed, FrameRefused

if TYPE_CHECKING:
    from .auth import Identity
    from .context import Context
    from .protocol import HandshakeParams

log = logging.getLogger(__name__)


class Seat(Protocol):
    """What a session needs of the partition that runs it."""

    @property
    def replay_hub(self) -> ReplayHub: ...

    def leave(self, session: Session) -> None: ...


class _SendDeadline(Exception):
    """A frame sent ahead of the outbox missed the send deadline (the core closes)."""


class _Counts:
    """The core's counts, into the instance's metrics."""

    __slots__ = ("_metrics",)

    def __init__(self, ctx: Context) -> None:
        self._metrics = ctx.metrics

    def error(self, code: str) -> None:
        self._metrics.errors.labels(code).inc()

    def acked(self) -> None:
        self._metrics.messages_acked.inc()


class Session:
    # Slots: thousands of idle sessions per process, each a handful of objects.
    __slots__ = (
        "uid",
        "device",
        "partition",
        "core",
        "_conn",
        "_identity",
        "_ctx",
        "_room",
        "_writer_active",
        "_nursery",
        "_on_end",
        "_scope",
        "_peer_closed",
        "_sent_at",
    )

    def __init__(
        self,
        *,
        conn: Connection,
        params: HandshakeParams,
        identity: Identity,
        partition: int,
        ctx: Context,
        send_bucket: TokenBucket,
        on_end: Callable[[], object] | None = None,
    ) -> None:
        self.uid = params.uid
        self.device = params.device
        self.partition = partition
        self._conn = conn
        self._identity = identity
        self._ctx = ctx
        limits = ctx.config.value.limits
        self.core = SessionCore(
            uid=params.uid,
            device=params.device,
            resume=params.resume,
            partitions=ctx.partitions,
            limits=CoreLimits(
                outbox_frames=limits.outbound_queue_messages,
                bad_frames_per_minute=limits.bad_frames_per_minute,
                max_frames_per_s=limits.max_frames_per_s,
                idle_timeout_s=limits.idle_timeout_s,
                max_recipients=limits.max_recipients,
            ),
            send_bucket=send_bucket,
            now=trio.current_time(),
            counts=_Counts(ctx),
        )
        # Every frame is counted before it is looked at (pings and closes too).
        conn.frame_hook = self._frame_arrived
        # Set when reading may go on after max_in_flight sends; made only then.
        self._room: trio.Event | None = None
        # While the writer runs it owns the socket's sending side; the
        # session's nursery (for the writer) exists only while live.
        self._writer_active = False
        self._nursery: trio.Nursery | None = None
        self._on_end = on_end
        self._scope = trio.CancelScope()
        self._peer_closed = False
        # When each send still waiting for its reports was produced, oldest
        # first (for linechatd_send_ack_seconds); made at the first send.
        self._sent_at: deque[float] | None = None

    def __repr__(self) -> str:
        return f"<Session uid={self.uid} device={self.device} partition={self.partition}>"

    # -- called by the partition ------------------------------------------------

    def join(self, live_from: int) -> None:
        """Registered with the partition: live delivery starts at ``live_from``."""
        self.core.start(live_from)

    def offer(self, offset: int | None, frame: str | bytes) -> None:
        """A live frame from the partition's delivery; never waits."""
        self.core.offer(offset, frame)
        self._carry_out()

    def queue(self, offset: int | None, frame: str | bytes) -> None:
        """Like :meth:`offer`, written at the next :meth:`write_queued` (one
        write for every frame a fetched batch brings this session)."""
        self.core.offer(offset, frame)

    def write_queued(self) -> None:
        """Write what :meth:`queue` queued (or close, if the core decided so)."""
        self._carry_out()

    def check_idle(self, now: float) -> None:
        """Close the session if its client has been silent too long (the partition sweeps)."""
        self.core.check_idle(now)
        self._carry_out()

    def _frame_arrived(self) -> bool:
        # The transport, for every frame, before it is decoded.
        if self.core.frame_arrived(trio.current_time()):
            return True
        self._carry_out()
        return False

    # -- carrying out the core's decisions ------------------------------------------

    def _carry_out(self) -> None:
        """Act on the core's state after any event: close, or write what is due."""
        core = self.core
        if core.closing is not None:
            if not self._scope.cancel_called:
                if core.closing.code == CloseCode.BEHIND:
                    log.info(
                        "session_behind",
                        extra={
                            "uid": self.uid,
                            "partition": self.partition,
                            "queued": core.backlog,
                            "queued_bytes": core.backlog_chars,
                            "reason": core.closing.reason,
                        },
                    )
                self._scope.cancel()
            return
        if self._writer_active or self._nursery is None:
            return
        conn = self._conn
        # Direct writes, without a task switch, while the socket takes frames
        # at once: everything due goes out in one system call.
        if core.backlog and conn.can_write_now:
            frames = []
            while (frame := core.next_frame()) is not None:
                frames.append(frame)
            if frames:
                try:
                    conn.write_many_now(frames)
                except ConnectionClosed:
                    self._peer_gone()
                    return
        if core.backlog or conn.unflushed:
            try:
                self._nursery.start_soon(self._writer)
            except RuntimeError:
                # The session's nursery has closed and its task has not yet
                # resumed to finish: the session is ending, nothing to write.
                return
            self._writer_active = True

    def _peer_gone(self) -> None:
        self._peer_closed = True
        self._scope.cancel()

    # -- the session task ---------------------------------------------------------

    async def run(self, seat: Seat) -> None:
        """Greet, then read until the peer or the core ends it; always releases the socket."""
        ctx, core = self._ctx, self.core
        metrics = ctx.metrics
        metrics.connections_of(self.partition).inc()
        try:
            with self._scope:
                await self._greet(seat.replay_hub)
                core.go_live()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # Live frames that arrived during the welcome and replay.
                    self._carry_out()
                    if self._identity.expires_at is not None:
                        nursery.start_soon(self._expire_at, self._identity.expires_at)
                    # The read loop is here, not in a method of its own: an idle
                    # session waits in it, and each coroutine frame on its
                    # stack costs ~250 bytes per connection.
                    conn, residence, producer = self._conn, metrics.residence, ctx.producer
                    while True:
                        try:
                            data = await conn.receive()
                        except ConnectionClosed:
                            self._peer_closed = True
                            break
                        except FrameRefused:
                            break  # the core decided to close: _carry_out() cancelled us
                        # Sends go to the broker in the order they were read.
                        now_ms = int(time.time() * 1000)
                        request = core.on_frame(data, trio.current_time(), now_ms)
                        if request is not None:
                            self._produce(request)
                            residence.observe("read_to_produce", time.perf_counter() - conn.read_at)
                        # Awake anyway: answer the acks that are due here
                        # rather than on a timer wake-up of their own (this
                        # session's own go out with its frames below).
                        producer.serve_due()
                        self._carry_out()
                        while not core.reading_allowed:
                            room = self._room = trio.Event()
                            await room.wait()
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            self._peer_closed = True
        except _SendDeadline:
            pass  # the core has decided the close
        except KafkaUnavailable as exc:
            log.warning("session_start_failed", extra={"uid": self.uid, "error": str(exc)})
            core.close(CloseCode.INTERNAL, "broker unavailable")
        except Exception:
            # A session is a fault boundary: its bug must not reach the partition.
            log.exception("session_failed", extra={"uid": self.uid, "partition": self.partition})
            core.close(CloseCode.INTERNAL, "internal error")
        finally:
            self._nursery = None
            seat.leave(self)
            # Cancelled by the partition (lease lost, released, drain): 1012.
            core.close(CloseCode.MOVED, "partition moved")
            close = core.closing
            assert close is not None
            metrics.connections_of(self.partition).dec()
            with trio.CancelScope(shield=True):
                if not self._peer_closed:
                    # The transport bounds its closing handshake itself; this is a backstop.
                    with trio.move_on_after(5):
                        await self._conn.close(close.code, close.reason)
                # Whatever happened, the socket is released here: the session owns it.
                await self._conn.aclose()
            code = self._conn.closed_code if self._peer_closed else close.code
            metrics.closes.labels(close_label(code, by_peer=not self._conn.closed_locally)).inc()
            if self._on_end is not None:
                self._on_end()

    async def _greet(self, hub: ReplayHub) -> None:
        """The welcome frame, then (when asked and possible) the missed records."""
        ctx, core = self._ctx, self.core
        # The welcome names the log end as far as this owner has read it: the
        # offset live delivery starts at. Not the broker's newer high watermark:
        # a client takes the welcome offset as its floor and drops anything
        # below it, so records between the two would be lost to it.
        live_from = core.live_from

        def welcome(resumed: bool | None) -> str:
            return encode_welcome(
                self.uid, self.device, self.partition, ctx.info.instance, live_from, resumed
            )

        if core.resume is None:
            await self._send_ahead(welcome(None), " for the welcome")
            return
        # The partition's shared replay reads: one scan serves every resume at once.
        async with Replay(ctx, hub, self.uid, core.resume, live_from) as replay:
            resumed = await replay.check()
            await self._send_ahead(welcome(resumed), " for the welcome")
            if resumed:
                await replay.send_to(self)

    async def wait_gone(self) -> None:
        """Return once the client has dropped its connection (while replaying; see replay.py)."""
        await self._conn.wait_peer_gone()

    async def send_replayed(self, offset: int, frame: str | bytes) -> None:
        """Send a replayed record now, ahead of the (still waiting) live outbox."""
        if self.core.replayed(offset):
            await self._send_ahead(frame, " during replay")

    async def _send_ahead(self, frame: str | bytes, during: str) -> None:
        """Send before the live outbox, within the send deadline; past it the core closes."""
        conn = self._conn
        queued = conn.can_write_now
        if queued:
            # The common case (every welcome): the socket takes it at once, with
            # no deadline to arm; a remainder is flushed within the deadline below.
            conn.write_many_now((frame,))
            if not conn.unflushed:
                return
        with trio.move_on_after(self._ctx.config.value.limits.send_timeout_s):
            if queued:
                await conn.flush()
            else:
                await conn.send(frame)
            return
        self.core.close(CloseCode.BEHIND, f"send deadline exceeded{during}: reconnect with resume")
        raise _SendDeadline

    async def _writer(self) -> None:
        """Drain the backlog within the send deadline per frame, then end."""
        core, conn = self.core, self._conn
        deadline_s = self._ctx.config.value.limits.send_timeout_s
        try:
            while True:
                with trio.move_on_after(deadline_s):
                    if conn.unflushed:
                        await conn.flush()
                    frame = core.next_frame()
                    if frame is None:
                        return
                    await conn.send(frame)
                    continue
                core.close(CloseCode.BEHIND, "send deadline exceeded: reconnect with resume")
                self._carry_out()
                return
        except ConnectionClosed:
            self._peer_gone()
        finally:
            # No checkpoint between the empty backlog and this: a frame queued
            # before was sent above, one queued after is written directly.
            self._writer_active = False

    def _produce(self, request: ProduceRequest) -> None:
        ctx, core = self._ctx, self.core
        receipts = []
        try:
            for record in request.records:
                receipts.append(
                    ctx.producer.send(ctx.topic(record.partition), record.key, record.value)
                )
        except KafkaUnavailable:
            # Records already handed over may still be stored: the client
            # sends again with the same id, and recipients drop the copies.
            core.refused(request, "the broker did not take the message; send again")
            return
        ctx.metrics.messages_sent.inc()
        core.produced(request, receipts)
        sent_at = self._sent_at
        if sent_at is None:
            sent_at = self._sent_at = deque()
        sent_at.append(time.perf_counter())
        on_reports = self._on_reports
        for receipt in receipts:
            receipt.on_batch = on_reports

    def _on_reports(self, reported_after: float) -> None:
        # The trio thread, once per poll that served delivery reports (however
        # many of this session's it holds): every ack due, in one write.
        answered = self.core.on_report()
        self._carry_out()
        if answered:
            now = time.perf_counter()
            metrics = self._ctx.metrics
            metrics.residence.observe("report_to_ack", now - reported_after, answered)
            # Sends are answered in the order they were produced (delivery.py).
            sent_at = self._sent_at
            assert sent_at is not None
            for _ in range(answered):
                metrics.send_ack.observe(now - sent_at.popleft())
        if self._room is not None and self.core.reading_allowed:
            self._room.set()

    async def _expire_at(self, expires_at: float) -> None:
        await trio.sleep(max(0.0, expires_at - time.time()))
        self.core.close(CloseCode.TOKEN_EXPIRED, "token expired")
        self._carry_out()
