"""One device's WebSocket session, living inside its partition's nursery.

One task per session, the reader (frames in, sends produced in order); it
owns the connection from the accepted handshake to the closed socket. Frames
out are written in the call that produces them while nothing is queued; a
writer task runs only while there is a backlog (a socket that did not take
everything at once), draining the bounded outbox with a send deadline.
Delivery reports need no task either: each resolves on the trio thread and
answers every send at the head of the session's in-flight queue that is done,
as ``ack``/``error`` in send order. A session ends by cancelling its own scope
after choosing a close code; when its partition is cancelled instead, it
closes with 1012. An idle session is thus one task and a handful of objects.

Slow readers: the partition's delivery task never waits for a socket. It
offers each frame to the session's outbox, bounded by
``limits.outbound_queue_messages`` frames and :data:`OUTBOX_MAX_BYTES`; a full
outbox, or one frame the socket has not taken within ``limits.send_timeout_s``,
closes the session with 1013. The device reconnects with ``resume`` and gets
what it missed from Kafka, not from this process's memory.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .hashing import partition_for
from .kafka import DeliveryReceipt, KafkaUnavailable
from .protocol import (
    ChatRecord,
    Ping,
    RemoteProtocolError,
    Send,
    decode_client_frame,
    encode_ack,
    encode_error,
    encode_pong,
    encode_record,
    encode_welcome,
)
from .ratelimit import StrikeCounter, TokenBucket
from .replay import Replay
from .websocket import Connection, ConnectionClosed

if TYPE_CHECKING:
    from .auth import Identity
    from .context import Context
    from .partitions import PartitionRuntime
    from .protocol import HandshakeParams

log = logging.getLogger(__name__)

# Close codes (CONTRACT.md §5).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_UNAVAILABLE = 1011
CLOSE_MOVED = 1012
CLOSE_BEHIND = 1013
CLOSE_TOKEN_EXPIRED = 4401

# Sends waiting for their delivery report, per session: past this the reader
# stops reading, which pushes back on the client through TCP.
MAX_IN_FLIGHT = 256

# The outbox's bound in characters of frame text (about bytes: frames are
# mostly ASCII JSON), next to its bound in frames: a few large messages must
# not hold as much memory as a thousand small ones.
OUTBOX_MAX_BYTES = 4 << 20

_Outgoing = tuple[int | None, str]  # (record offset or None, frame text)
# An outbox entry that sends no frame: the rest of one the socket took in part.
_FLUSH = ""


class Session:
    def __init__(
        self,
        *,
        conn: Connection,
        params: HandshakeParams,
        identity: Identity,
        runtime: PartitionRuntime,
        ctx: Context,
        on_end: Callable[[], object] | None = None,
    ) -> None:
        self.uid = params.uid
        self.device = params.device
        self.resume = params.resume
        self.partition = runtime.partition
        self._conn = conn
        self._identity = identity
        self._runtime = runtime
        self._ctx = ctx
        limits = ctx.config.value.limits
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_limit = limits.outbound_queue_messages
        self._outbox_bytes = 0
        self._outbox_closed = False
        # Sends produced and not yet answered, in send order.
        self._in_flight: deque[tuple[str, int, DeliveryReceipt]] = deque()
        self._room = trio.Event()
        now = trio.current_time()
        self._bucket = TokenBucket(limits.sends_per_second, limits.send_burst, now)
        self._strikes = StrikeCounter(limits.bad_frames_per_minute)
        # Sustained flooding (not one burst) closes the session: a minute with
        # more refused sends than a whole burst allowance.
        self._flood_strikes = StrikeCounter(limits.send_burst)
        # Live delivery starts here; what came before is replayed or not owed.
        self.live_from: int | None = None
        self._live_from = 0
        self._last_offset = -1
        # While the writer runs (it has the frame in flight) or the outbox holds
        # frames, new frames queue behind them (order), else they go out at once.
        self._writer_active = False
        # The session's own nursery, for the writer; None before the welcome
        # and any replay are sent (frames queue meanwhile) and after the end.
        self._nursery: trio.Nursery | None = None
        self._on_end = on_end
        self._close_code = CLOSE_MOVED
        self._close_reason = "partition moved"
        self._scope = trio.CancelScope()
        self._peer_closed = False

    def __repr__(self) -> str:
        return f"<Session uid={self.uid} device={self.device} partition={self.partition}>"

    # -- called by the partition's delivery task ---------------------------

    def offer(self, offset: int | None, frame: str) -> None:
        """Send or queue a frame without waiting; a full outbox ends the session (1013).

        With nothing queued ahead of it, the frame is written to the socket at
        once (no task switch); otherwise it joins the outbox for the writer.
        """
        if self._nursery is not None and not self._writer_active and not self._outbox:
            if offset is not None:
                if offset <= self._last_offset or offset < self._live_from:
                    return  # never one offset twice, nor one the replay covered
            try:
                taken = self._conn.try_send(frame)
            except ConnectionClosed:
                self._peer_closed = True
                self._scope.cancel()
                return
            if taken:
                if offset is not None:
                    self._last_offset = offset
                if self._conn.unflushed:
                    # The socket took part of it: the writer sends the rest
                    # (within the send deadline) before anything else.
                    self._queue(None, _FLUSH)
                return
        self._queue(offset, frame)

    def _queue(self, offset: int | None, frame: str) -> None:
        if self._outbox_closed:
            return
        if len(self._outbox) >= self._outbox_limit or (
            self._outbox_bytes + len(frame) > OUTBOX_MAX_BYTES and self._outbox_bytes > 0
        ):
            self.end(CLOSE_BEHIND, "too far behind: reconnect with resume")
            return
        self._outbox.append((offset, frame))
        self._outbox_bytes += len(frame)
        if not self._writer_active and self._nursery is not None:
            self._writer_active = True
            self._nursery.start_soon(self._writer)

    def end(self, code: int, reason: str) -> None:
        """Close this session with ``code`` (the first reason given wins)."""
        if not self._scope.cancel_called:
            self._close_code = code
            self._close_reason = reason
            self._scope.cancel()
            if code == CLOSE_BEHIND:
                log.info(
                    "session_behind",
                    extra={
                        "uid": self.uid,
                        "partition": self.partition,
                        "queued": len(self._outbox),
                        "queued_bytes": self._outbox_bytes,
                        "reason": reason,
                    },
                )

    # -- the session task ---------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx, runtime = self._ctx, self._runtime
        metrics = ctx.metrics
        runtime.register(self)
        # In the same step as registering (no checkpoint between): every record
        # below this offset was offered to sessions before this one existed,
        # every later one will be offered to it.
        self.live_from = self._live_from = runtime.next_offset
        metrics.connections.labels(str(self.partition)).inc()
        # In the partition's nursery from here on, before the welcome and any
        # replay: a task still being started there is out of the partition's
        # reach, and would hold the partition open until it finished.
        task_status.started()
        try:
            with self._scope:
                await self._greet(self.live_from)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self._outbox:
                        # Live frames that arrived during the welcome and replay.
                        self._writer_active = True
                        nursery.start_soon(self._writer)
                    if self._identity.expires_at is not None:
                        nursery.start_soon(self._expire_at, self._identity.expires_at)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            self._peer_closed = True
        except KafkaUnavailable as exc:
            log.warning("session_start_failed", extra={"uid": self.uid, "error": str(exc)})
            self._close_code, self._close_reason = CLOSE_UNAVAILABLE, "broker unavailable"
        except Exception:
            # A session is a fault boundary: its bug must not reach the partition.
            log.exception("session_failed", extra={"uid": self.uid, "partition": self.partition})
            self._close_code, self._close_reason = CLOSE_INTERNAL, "internal error"
        finally:
            self._nursery = None
            runtime.unregister(self)
            self._outbox_closed = True
            self._outbox.clear()
            metrics.connections.labels(str(self.partition)).dec()
            with trio.CancelScope(shield=True):
                if not self._peer_closed:
                    # The transport bounds its closing handshake itself; this is a backstop.
                    with trio.move_on_after(5):
                        await self._conn.close(self._close_code, self._close_reason)
                # Whatever happened, the socket is released here: the session owns it.
                await self._conn.aclose()
            code = self._conn.closed_code if self._peer_closed else self._close_code
            metrics.closes.labels(str(code)).inc()
            if self._on_end is not None:
                self._on_end()

    async def _greet(self, live_from: int) -> None:
        """The welcome frame, then (when asked and possible) the missed records."""
        ctx = self._ctx
        # The welcome names the log end as far as this owner has read it: the
        # offset live delivery starts at. Not the broker's newer high watermark:
        # a client takes the welcome offset as its floor and drops anything
        # below it, so records between the two would be lost to it.
        log_end = live_from
        welcome = encode_welcome(
            self.uid, self.device, self.partition, ctx.info.instance, log_end, None
        )
        if self.resume is None:
            await self._send_now(welcome, " for the welcome")
            return
        # The partition's shared replay reads: one scan serves every resume at once.
        hub = self._runtime.replay_hub
        async with Replay(ctx, hub, self.uid, self.resume, live_from) as replay:
            resumed = await replay.check()
            await self._send_now(
                encode_welcome(
                    self.uid, self.device, self.partition, ctx.info.instance, log_end, resumed
                ),
                " for the welcome",
            )
            if resumed:
                await replay.send_to(self)

    async def send_replayed(self, offset: int, frame: str) -> None:
        """Send a replayed record now, ahead of the (still waiting) live outbox."""
        if offset <= self._last_offset:
            return
        self._last_offset = offset
        await self._send_now(frame, " during replay")

    async def _send_now(self, frame: str, during: str) -> None:
        """Send ahead of the live outbox, within the send deadline, or end the session."""
        if not await self._send_within_deadline(frame, during):
            await trio.lowlevel.checkpoint()  # raises Cancelled: the session's scope ends it

    async def _send_within_deadline(self, frame: str, during: str = "") -> bool:
        """Send one frame within ``send_timeout_s``; past it the session ends with 1013."""
        with trio.move_on_after(self._ctx.config.value.limits.send_timeout_s):
            if frame == _FLUSH:
                await self._conn.flush()
            else:
                await self._conn.send(frame)
            return True
        self.end(CLOSE_BEHIND, f"send deadline exceeded{during}: reconnect with resume")
        return False

    async def _reader(self) -> None:
        """Read frames until the peer closes."""
        while True:
            try:
                data = await self._conn.receive()
            except ConnectionClosed:
                self._peer_closed = True
                return
            if isinstance(data, bytes):
                self._reject(None, "bad_frame", "binary frames are not accepted; send JSON text")
                continue
            try:
                frame = decode_client_frame(data)
            except RemoteProtocolError as exc:
                self._reject(exc.id, exc.code, exc.message)
                continue
            if isinstance(frame, Ping):
                self.offer(None, encode_pong())
            elif isinstance(frame, Send):
                await self._send(frame)

    async def _send(self, frame: Send) -> None:
        ctx = self._ctx
        now = trio.current_time()
        if not self._bucket.allow(now):
            self._error(frame.id, "rate_limited", "too many sends; slow down and send again")
            if self._flood_strikes.strike(now):
                self.end(CLOSE_POLICY, "sustained flooding")
            return
        record = ChatRecord(
            # The sender is who authenticated, never what the frame claims.
            from_uid=self.uid,
            from_device=self.device,
            to=frame.to,
            id=frame.id,
            body=frame.body,
            ts=int(time.time() * 1000),
        )
        k = partition_for(frame.to, ctx.partitions)
        try:
            value = encode_record(record)
        except RemoteProtocolError as exc:
            # Too large once stored: the client's mistake, answered like a bad frame.
            self._reject(exc.id, exc.code, exc.message)
            return
        try:
            receipt = ctx.producer.send(ctx.topic(k), frame.to.encode(), value)
        except KafkaUnavailable as exc:
            self._error(frame.id, "unavailable", f"not accepted, send again: {exc}")
            return
        ctx.metrics.messages_sent.inc()
        receipt.on_resolved = self._answer_sends
        self._in_flight.append((frame.id, k, receipt))
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            self._room = trio.Event()
            await self._room.wait()

    def _answer_sends(self) -> None:
        """Ack (or refuse) every send at the head of the queue whose report is in.

        Called on the trio thread as a delivery report resolves; never raises.
        """
        in_flight = self._in_flight
        while in_flight and in_flight[0][2].resolved:
            msg_id, k, receipt = in_flight.popleft()
            if receipt.error is not None:
                reason = receipt.error.str()
                self._error(msg_id, "unavailable", f"not acknowledged, send again: {reason}")
            else:
                self._ctx.metrics.messages_acked.inc()
                self.offer(None, encode_ack(msg_id, k, receipt.offset))
        if len(in_flight) < MAX_IN_FLIGHT:
            self._room.set()

    async def _writer(self) -> None:
        """Drain the outbox, then end (the next backlog starts a new writer)."""
        live_from, outbox = self._live_from, self._outbox
        try:
            while outbox:
                offset, frame = outbox.popleft()
                self._outbox_bytes -= len(frame)
                if offset is not None:
                    # Never one offset twice, nor one the replay covered.
                    if offset <= self._last_offset or offset < live_from:
                        continue
                    self._last_offset = offset
                try:
                    if not await self._send_within_deadline(frame):
                        return
                except ConnectionClosed:
                    self._peer_closed = True
                    self._scope.cancel()
                    return
        finally:
            # No checkpoint between the empty outbox and this: an offer either
            # queued before (and was sent above) or writes directly after.
            self._writer_active = False

    async def _expire_at(self, expires_at: float) -> None:
        await trio.sleep(max(0.0, expires_at - time.time()))
        self.end(CLOSE_TOKEN_EXPIRED, "token expired")

    def _error(self, msg_id: str | None, code: str, message: str) -> None:
        self._ctx.metrics.errors.labels(code).inc()
        self.offer(None, encode_error(msg_id, code, message))

    def _reject(self, msg_id: str | None, code: str, message: str) -> None:
        """Answer a bad frame; too many of them in a minute close the session."""
        self._error(msg_id, code, message)
        if self._strikes.strike(trio.current_time()):
            self.end(CLOSE_POLICY, "too many bad frames")
