"""A session's protocol rules, without I/O: events in, frames and decisions out.

Like h11 and wsproto, :class:`SessionCore` holds the whole state of one
device's session and never touches a socket, a clock or the broker. Its shell
(:class:`linechatd.session.Session`) feeds it what happened and carries out
what it decided:

- events in: a live record offered by the partition (:meth:`~SessionCore.offer`),
  a replayed record (:meth:`~SessionCore.replayed`), a frame from the client
  (:meth:`~SessionCore.on_frame`, with the time), a delivery report
  (:meth:`~SessionCore.on_report`), a deadline or an expiry
  (:meth:`~SessionCore.close`);
- out: frames to write, in order (:meth:`~SessionCore.next_frame`), records to
  produce (the :class:`ProduceRequest` that :meth:`~SessionCore.on_frame`
  returns), whether to keep reading (:attr:`~SessionCore.reading_allowed`),
  and the decision to close with a code and reason (:attr:`~SessionCore.closing`).

The rules, all here:

- **Live split.** The partition fixes ``live_from`` when it registers the
  session (:meth:`~SessionCore.start`): every record below it is the replay's
  to send, every record at or above it is offered live.
- **Never an offset twice, never one the device already has.** Live records
  are queued only above ``live_from``, above the last one queued, and above the
  device's ``resume`` cursor (whatever the partition's committed offset hint
  said when a new owner started); replayed records only in (resume, live_from),
  each once. Replay goes out before any live frame.
- **Bounded outbox.** At most ``outbox_frames`` frames and ``outbox_bytes``
  characters wait for the socket; past that the session closes with 1013 and
  the device resumes from Kafka.
- **Acks in send order.** Sends wait in an in-flight queue; a delivery report
  answers every send at its head that is done, as ``ack`` or ``error``.
  At ``max_in_flight`` the shell stops reading (TCP pushes back).
- **Budgets.** Every frame the client sends, of any kind, is counted before
  it is decoded (:meth:`~SessionCore.frame_arrived`, called by the transport
  for pings and close frames too): past ``max_frames_per_s`` sustained (bursts
  of twice that) the session closes with 1008 at once. Sends over the send
  rate (a bucket shared by the uid's devices) get ``rate_limited``; a minute
  with more refused sends than a whole burst closes with 1008; more than
  ``bad_frames_per_minute`` bad frames close with 1008.
- **Idle.** A client that sends nothing for ``idle_timeout_s`` is closed (1000).
- **Closing.** The first reason given wins; afterwards nothing more is queued.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .hashing import partition_for
from .protocol import (
    BAD_FRAME,
    DEFAULT_MAX_RECIPIENTS,
    GROUP_RECORD_KEY,
    MAX_RECORD_BYTES,
    ChatRecord,
    CloseCode,
    GroupRecord,
    GroupSend,
    Ping,
    RemoteProtocolError,
    Send,
    ack_frame,
    decode_client_frame,
    encode_error,
    encode_pong,
    encode_record,
    group_ack_frame,
)
from .ratelimit import StrikeCounter, TokenBucket

__all__ = [
    "MAX_IN_FLIGHT",
    "OUTBOX_MAX_BYTES",
    "Close",
    "CoreCounts",
    "CoreLimits",
    "ProduceRequest",
    "RecordOut",
    "Report",
    "SessionCore",
    "SessionPhase",
    "records_for",
]

# Sends waiting for their delivery report, per session: past this the shell
# stops reading, which pushes back on the client through TCP.
MAX_IN_FLIGHT = 256

# The outbox's bound in characters of frame text (about bytes: frames are
# mostly ASCII JSON), next to its bound in frames: a few large messages must
# not hold as much memory as a thousand small ones.
OUTBOX_MAX_BYTES = 4 << 20

# Recipients whose partition a session remembers (see SessionCore._partition_of).
_PARTITION_CACHE_SIZE = 64


class SessionPhase(enum.Enum):
    #: The welcome and any replay are being sent; live frames queue meanwhile.
    GREETING = "greeting"
    #: Frames go out in order as the socket takes them.
    LIVE = "live"
    #: A close code is chosen; nothing more is queued or written but the close.
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class Close:
    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class CoreLimits:
    outbox_frames: int
    bad_frames_per_minute: int
    outbox_bytes: int = OUTBOX_MAX_BYTES
    max_in_flight: int = MAX_IN_FLIGHT
    # What a stored record may weigh (the broker's own limit is about 1 MB).
    max_record_bytes: int = MAX_RECORD_BYTES
    # Frames of any kind per second, bursts of twice as many (CONTRACT.md §5).
    max_frames_per_s: float = 200.0
    # Recipients of one group send.
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    # Silence after which the session closes; 0: never.
    idle_timeout_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RecordOut:
    """One record to produce: its partition, Kafka key and value, and whom it is for."""

    partition: int
    key: bytes
    value: bytes
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProduceRequest:
    """What the shell must hand to the broker for one send, then report back with
    :meth:`SessionCore.produced`: one record, or one per recipient partition of a
    group send (answered with one ack naming each)."""

    msg_id: str
    records: tuple[RecordOut, ...]
    group: bool


def records_for(
    *,
    from_uid: str,
    from_device: str,
    msg_id: str,
    to: Sequence[str],
    body: Any,
    ts: int,
    partitions: int,
    recipients: tuple[str, ...] | None,
    max_bytes: int = MAX_RECORD_BYTES,
) -> tuple[RecordOut, ...]:
    """One version 2 record per partition of ``to``, in the order the partitions first appear.

    Raises RemoteProtocolError (``bad_frame``) when a record would be too large.
    """
    by_partition: dict[int, list[str]] = {}
    for uid in to:
        by_partition.setdefault(partition_for(uid, partitions), []).append(uid)
    out = []
    for k, uids in by_partition.items():
        record = GroupRecord(
            from_uid=from_uid,
            from_device=from_device,
            to=tuple(uids),
            id=msg_id,
            body=body,
            ts=ts,
            recipients=recipients,
        )
        out.append(
            RecordOut(k, GROUP_RECORD_KEY, encode_record(record, max_bytes=max_bytes), record.to)
        )
    return tuple(out)


class Report(Protocol):
    """A delivery report as the core reads it (``kafka.DeliveryReceipt``)."""

    @property
    def resolved(self) -> bool: ...
    @property
    def offset(self) -> int: ...
    @property
    def error(self) -> str | None: ...


class CoreCounts(Protocol):
    """What the core counts, for the shell's metrics."""

    def error(self, code: str) -> None: ...
    def acked(self) -> None: ...


class _NoCounts:
    def error(self, code: str) -> None:
        pass

    def acked(self) -> None:
        pass


# (record offset or None, frame text: str, or bytes already UTF-8)
_Outgoing = tuple[int | None, str | bytes]


class SessionCore:
    """The state of one device's session; see the module docstring for the rules."""

    __slots__ = (
        "uid",
        "device",
        "resume",
        "phase",
        "closing",
        "_limits",
        "_partitions",
        "_send_bucket",
        "_frame_bucket",
        "_heard_at",
        "_strikes",
        "_flood_strikes",
        "_counts",
        "_live_from",
        "_last_live",
        "_last_replayed",
        "_outbox",
        "_outbox_bytes",
        "_in_flight",
        "_partitions_of",
    )

    def __init__(
        self,
        *,
        uid: str,
        device: str,
        resume: int | None,
        partitions: int,
        limits: CoreLimits,
        send_bucket: TokenBucket,
        now: float,
        counts: CoreCounts | None = None,
    ) -> None:
        self.uid = uid
        self.device = device
        self.resume = resume
        self.phase = SessionPhase.GREETING
        self.closing: Close | None = None
        self._limits = limits
        self._partitions = partitions
        # Shared by every session of the uid (ratelimit.UidBuckets).
        self._send_bucket = send_bucket
        rate = limits.max_frames_per_s
        self._frame_bucket = TokenBucket(rate, max(1, int(2 * rate)), now)
        self._heard_at = now
        self._strikes = StrikeCounter(limits.bad_frames_per_minute)
        # Sustained flooding (not one burst) closes the session: a minute with
        # more refused sends than a whole burst allowance.
        self._flood_strikes = StrikeCounter(send_bucket.burst)
        self._counts: CoreCounts = counts or _NoCounts()
        self._live_from: int | None = None
        # The device has every offset up to its resume cursor already.
        self._last_live = -1 if resume is None else resume
        self._last_replayed = -1 if resume is None else resume
        # Both made at first use: an empty deque weighs about 770 bytes, and an
        # idle session needs neither.
        self._outbox: deque[_Outgoing] | None = None
        self._outbox_bytes = 0
        # Sends produced and not yet answered, in send order (a report per record).
        self._in_flight: deque[tuple[ProduceRequest, Sequence[Report]]] | None = None
        self._partitions_of: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<SessionCore uid={self.uid} device={self.device} {self.phase.value}>"

    # -- the live split -------------------------------------------------------

    def start(self, live_from: int) -> None:
        """Fix where live delivery starts: called by the partition as it registers the session."""
        if self._live_from is not None:
            raise RuntimeError(f"{self!r}: the live split is fixed once")
        self._live_from = live_from

    @property
    def live_from(self) -> int:
        if self._live_from is None:
            raise RuntimeError(f"{self!r}: not registered with a partition yet")
        return self._live_from

    def go_live(self) -> None:
        """The welcome and replay are out: queued live frames may follow."""
        if self.phase is SessionPhase.GREETING:
            self.phase = SessionPhase.LIVE

    # -- frames out -------------------------------------------------------------

    def offer(self, offset: int | None, frame: str | bytes) -> None:
        """Queue a frame: a live record at ``offset``, or (None) any other frame.

        A record the device already has, or one the replay covers, is dropped.
        """
        if self.closing is not None:
            return
        if offset is not None:
            if offset < self.live_from or offset <= self._last_live:
                return
            self._last_live = offset
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        if len(outbox) >= self._limits.outbox_frames or (
            self._outbox_bytes + len(frame) > self._limits.outbox_bytes and self._outbox_bytes > 0
        ):
            self.close(CloseCode.BEHIND, "too far behind: reconnect with resume")
            return
        outbox.append((offset, frame))
        self._outbox_bytes += len(frame)

    def replayed(self, offset: int) -> bool:
        """May the replayed record at ``offset`` be sent now (ahead of the live outbox)?"""
        if self.closing is not None or offset <= self._last_replayed or offset >= self.live_from:
            return False
        self._last_replayed = offset
        return True

    def next_frame(self) -> str | bytes | None:
        """The next frame to write, or None (nothing queued, or not live)."""
        outbox = self._outbox
        if self.phase is not SessionPhase.LIVE or not outbox:
            return None
        _offset, frame = outbox.popleft()
        self._outbox_bytes -= len(frame)
        return frame

    @property
    def backlog(self) -> int:
        """Frames queued and not yet taken by :meth:`next_frame`."""
        return len(self._outbox) if self._outbox is not None else 0

    @property
    def backlog_chars(self) -> int:
        return self._outbox_bytes

    # -- frames in -------------------------------------------------------------

    def frame_arrived(self, now: float) -> bool:
        """One frame of any kind arrived (before it is decoded); False: stop reading, closing."""
        self._heard_at = now
        if self.closing is not None:
            return False
        if self._frame_bucket.allow(now):
            return True
        self.close(CloseCode.POLICY, "too many frames")
        return False

    @property
    def idle_deadline(self) -> float | None:
        """When the session closes for silence, unless a frame arrives first."""
        idle_s = self._limits.idle_timeout_s
        return self._heard_at + idle_s if idle_s > 0 else None

    def check_idle(self, now: float) -> None:
        """Close with 1000 if nothing was heard for ``idle_timeout_s``."""
        deadline = self.idle_deadline
        if deadline is not None and now >= deadline:
            idle_s = self._limits.idle_timeout_s
            self.close(CloseCode.NORMAL, f"idle for {idle_s:g} s: send a ping more often")

    def on_frame(self, data: str | bytes, now: float, wall_ms: int) -> ProduceRequest | None:
        """A frame from the client; returns the record to produce for a valid, allowed send."""
        if self.closing is not None:
            return None
        if isinstance(data, bytes):
            self._reject(None, BAD_FRAME, "binary frames are not accepted; send JSON text", now)
            return None
        try:
            frame = decode_client_frame(data, max_recipients=self._limits.max_recipients)
        except RemoteProtocolError as exc:
            self._reject(exc.id, exc.code, exc.message, now)
            return None
        if isinstance(frame, Ping):
            self.offer(None, encode_pong())
            return None
        return self._send(frame, now, wall_ms)

    def _send(self, frame: Send | GroupSend, now: float, wall_ms: int) -> ProduceRequest | None:
        if not self._send_bucket.allow(now):
            self._error(frame.id, "rate_limited", "too many sends; slow down and send again")
            if self._flood_strikes.strike(now):
                self.close(CloseCode.POLICY, "sustained flooding")
            return None
        max_bytes = self._limits.max_record_bytes
        try:
            # The sender is who authenticated, never what the frame claims.
            if isinstance(frame, GroupSend):
                records = records_for(
                    from_uid=self.uid,
                    from_device=self.device,
                    msg_id=frame.id,
                    to=frame.to,
                    body=frame.body,
                    ts=wall_ms,
                    partitions=self._partitions,
                    recipients=frame.to,
                    max_bytes=max_bytes,
                )
                return ProduceRequest(frame.id, records, group=True)
            record = ChatRecord(self.uid, self.device, frame.to, frame.id, frame.body, wall_ms)
            value = encode_record(record, max_bytes=max_bytes)
        except RemoteProtocolError as exc:
            # Too large once stored: the client's mistake, answered like a bad frame.
            self._reject(exc.id, exc.code, exc.message, now)
            return None
        k = self._partition_of(frame.to)
        return ProduceRequest(
            frame.id, (RecordOut(k, frame.to.encode(), value, (frame.to,)),), group=False
        )

    def _partition_of(self, uid: str) -> int:
        # A device mostly writes to the same few uids: SHA-256 once per uid
        # (about 3 µs) rather than once per send; bounded by clearing.
        cache = self._partitions_of
        k = cache.get(uid)
        if k is None:
            if len(cache) >= _PARTITION_CACHE_SIZE:
                cache.clear()
            k = cache[uid] = partition_for(uid, self._partitions)
        return k

    # -- sends and their reports ---------------------------------------------------

    def produced(self, request: ProduceRequest, reports: Sequence[Report]) -> None:
        """The broker has ``request``'s records; each report resolves when its record is durable."""
        if self._in_flight is None:
            self._in_flight = deque()
        self._in_flight.append((request, reports))

    def refused(self, request: ProduceRequest, message: str) -> None:
        """The broker would not even take ``request``: answered at once, in its turn."""
        self._error(request.msg_id, "unavailable", message)

    @property
    def reading_allowed(self) -> bool:
        """False while ``max_in_flight`` sends wait for their reports."""
        in_flight = self._in_flight
        return in_flight is None or len(in_flight) < self._limits.max_in_flight

    @property
    def in_flight(self) -> int:
        return len(self._in_flight) if self._in_flight is not None else 0

    def on_report(self) -> int:
        """Answer every send at the head of the in-flight queue whose reports are all in;
        how many were answered."""
        in_flight = self._in_flight
        answered = 0
        if in_flight is None:
            return answered
        while in_flight and all(report.resolved for report in in_flight[0][1]):
            answered += 1
            request, reports = in_flight.popleft()
            if any(report.error is not None for report in reports):
                # Some records may be stored: the client sends again with the same
                # id and recipients drop the copies. The reason stays in the logs.
                self._error(request.msg_id, "unavailable", "not acknowledged in time; send again")
                continue
            self._counts.acked()
            if request.group:
                acks = [
                    (r.partition, report.offset, r.to)
                    for r, report in zip(request.records, reports, strict=True)
                ]
                self.offer(None, group_ack_frame(request.msg_id, acks))
            else:
                [record], [report] = request.records, reports
                self.offer(None, ack_frame(request.msg_id, record.partition, report.offset))
        return answered

    # -- closing -------------------------------------------------------------------

    def close(self, code: CloseCode, reason: str) -> bool:
        """Decide to close with ``code``; False if a close was already decided (it wins)."""
        if self.closing is not None:
            return False
        self.closing = Close(code, reason)
        self.phase = SessionPhase.CLOSING
        return True

    # -- errors --------------------------------------------------------------------

    def _error(self, msg_id: str | None, code: str, message: str) -> None:
        self._counts.error(code)
        self.offer(None, encode_error(msg_id, code, message))

    def _reject(self, msg_id: str | None, code: str, message: str, now: float) -> None:
        """Answer a bad frame; too many of them in a minute close the session."""
        self._error(msg_id, code, message)
        if self._strikes.strike(now):
            self.close(CloseCode.POLICY, "too many bad frames")
