"""Resume: send a reconnecting device what it missed, from its partition's topic.

A session asking for ``resume=N`` is owed every record addressed to its uid in
[N+1, end), where ``end`` is where its live delivery starts. That range can be
replayed only if it is still in the window: at most ``replay.max_records``
records, none deleted by Kafka retention, and its first record no older than
``replay.max_age_s``. The window is decided before the welcome frame (which
tells the client ``resumed``), and once it is, every record of the range is
sent, in offset order, each once.

After a failover every user of a partition reconnects at about the same
moment, so the reads are shared: each partition runs one :class:`ReplayHub`
with two readers of its own (``kafka.ReplayReader``: never joining a group
nor committing; the instance's fetcher serves live delivery and must not be
disturbed, nor waited for, as librdkafka calls on one consumer serialize
behind its poll).

- The probe answers window checks. Checks that arrive together are answered
  together: one watermark request, then the first record at each asked start,
  read forward in offset order (seeking only over wide gaps).
- The scan serves ranges. One pass reads from the lowest start asked for and
  hands each record to every request of its key whose range holds it, in
  offset order. A request arriving during a pass joins it when its start is
  not behind the pass; otherwise it waits for the next pass, which starts
  from the lowest waiting start.

A request whose session is gone (the client dropped during its replay: the
session closes its end of the channel) leaves the pass at the next batch,
and a pass that has no request left stops: connecting with a resume and
dropping at once costs one batch, not a read of the whole window. (The
session notices the drop without reading the socket; see
``ReplayTarget.wait_gone``.)

``resume=-1`` asks for everything still in the window: the range starts at
the newest of the low watermark and ``end - max_records``, and records
older than ``max_age_s`` are skipped (timestamps grow along the log, so they
are the first ones).

Each request has a bounded channel to its session (in records and in bytes):
the scan never waits for a socket. A request whose channel is full leaves the
pass at the first record that did not fit; its session sends what it holds,
then asks again from that record, so a slow reader costs extra passes, never
the others' time nor unbounded memory. A socket that does not take one frame
within ``limits.send_timeout_s`` still closes the session with 1013.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import trio

from .kafka import KafkaUnavailable, Record, ReplayReader
from .protocol import GROUP_RECORD_KEY, RecordError, decode_record, encode_message

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger(__name__)

SCAN_BATCH = 500
# The probe reads forward to the next asked start when it is this close, and
# seeks (one more fetch round trip) when it is farther.
PROBE_SEEK_GAP = 2000
# Bytes of record values one request may hold for its session, next to the
# record count bound (``limits.outbound_queue_messages``).
REQUEST_MAX_BYTES = 4 << 20
# A scan that makes no progress for this long gives up (the sessions close
# with 1011 and the clients resume again later).
STALL_TIMEOUT_S = 10.0


def _addressees(fetched: Record) -> tuple[bytes, ...]:
    """The request keys (uids) a fetched record is for: its key, or a group record's recipients."""
    key = fetched.key
    if key is None:
        return ()
    if key != GROUP_RECORD_KEY:
        return (key,)
    try:
        chat = decode_record(fetched.value)
    except RecordError:
        return ()  # counted and logged by the live path, which sees it too
    return tuple(uid.encode() for uid in chat.addressees)


class ReplayTarget(Protocol):
    """Where replayed frames go (a session, before its live writer starts)."""

    uid: str

    async def send_replayed(self, offset: int, frame: str) -> None: ...

    async def wait_gone(self) -> None:
        """Return once the client is gone (never, if that cannot be known without reading)."""
        ...


@dataclass(eq=False)
class _Check:
    start: int
    done: trio.Event = field(default_factory=trio.Event)
    low: int = 0
    first: Record | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Request:
    key: bytes
    start: int
    end: int
    send: trio.MemorySendChannel[Record]
    error: BaseException | None = None
    queued_bytes: int = 0
    # Set when the channel was full: the first offset it did not get.
    resume_at: int | None = None

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.send.close()

    @property
    def abandoned(self) -> bool:
        """Its session closed the receiving end: nobody will read what the pass finds."""
        return self.send.statistics().open_receive_channels == 0


class ReplayHub:
    """The shared reads of one partition's resumes; runs in the partition's nursery."""

    def __init__(self, ctx: Context, partition: int) -> None:
        self._ctx = ctx
        self.partition = partition
        self._topic = ctx.topic(partition)
        self._checks: list[_Check] = []
        self._checks_added = trio.Event()
        self._waiting: list[_Request] = []
        self._waiting_added = trio.Event()
        # The pass in progress, by key, and the offset it reads next.
        self._active: dict[bytes, list[_Request]] = {}
        self._position: int | None = None
        self._joined = 0
        # This pass so far: records read, requests dropped because their session left.
        self._scanned = 0
        self._abandoned = 0
        self._readers: list[ReplayReader] = []
        # Sessions may ask before run() has had its first turn; only an ended hub refuses.
        self._closed = False

    def __repr__(self) -> str:
        return f"<ReplayHub {self._topic}>"

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe_loop)
                nursery.start_soon(self._scan_loop)
        finally:
            self._closed = True
            failure = KafkaUnavailable(f"replay of {self._topic}: partition stopped")
            for check in self._checks:
                check.error = failure
                check.done.set()
            for request in [*self._waiting, *(r for rs in self._active.values() for r in rs)]:
                request.finish(failure)
            readers, self._readers = self._readers, []
            for reader in readers:
                await reader.aclose()

    # -- what sessions call ----------------------------------------------------

    async def probe(self, start: int) -> tuple[int, Record | None]:
        """(low watermark, first record at offset >= start or None at the log end)."""
        if self._closed:
            raise KafkaUnavailable(f"replay of {self._topic}: partition stopped")
        check = _Check(start)
        self._checks.append(check)
        self._checks_added.set()
        await check.done.wait()
        if check.error is not None:
            raise check.error
        return check.low, check.first

    def submit(
        self, uid: str, start: int, end: int
    ) -> tuple[_Request, trio.MemoryReceiveChannel[Record]]:
        """Ask for ``uid``'s records in [start, end); they arrive on the returned channel."""
        if self._closed:
            raise KafkaUnavailable(f"replay of {self._topic}: partition stopped")
        capacity = self._ctx.config.value.limits.outbound_queue_messages
        send, recv = trio.open_memory_channel[Record](capacity)
        request = _Request(uid.encode(), start, end, send)
        if self._position is not None and start >= self._position:
            self._active.setdefault(request.key, []).append(request)
            self._joined += 1
        else:
            self._waiting.append(request)
            self._waiting_added.set()
        return request, recv

    # -- the probe ---------------------------------------------------------------

    async def _probe_loop(self) -> None:
        reader: ReplayReader | None = None
        while True:
            while not self._checks:
                self._checks_added = trio.Event()
                await self._checks_added.wait()
            checks, self._checks = self._checks, []
            self._ctx.metrics.replay_scans.labels("probe").inc()
            try:
                if reader is None:
                    reader = self._open()
                await self._answer(reader, checks)
            except KafkaUnavailable as exc:
                for check in checks:
                    if not check.done.is_set():
                        check.error = exc
                        check.done.set()

    async def _answer(self, reader: ReplayReader, checks: list[_Check]) -> None:
        low = await reader.low_watermark()
        by_start: dict[int, list[_Check]] = {}
        for check in checks:
            by_start.setdefault(check.start, []).append(check)
        buffered: deque[Record] = deque()
        position: int | None = None  # every offset below it was read (since the last seek)
        at_end = False
        for start in sorted(by_start):
            first: Record | None = None
            if start >= low:
                if position is None or start > position + PROBE_SEEK_GAP:
                    await reader.seek(start)
                    position, at_end = start, False
                    buffered.clear()
                while buffered and buffered[0].offset < start:
                    buffered.popleft()
                while not buffered and not at_end:
                    batch, log_end = await reader.next_batch(SCAN_BATCH, STALL_TIMEOUT_S)
                    at_end = log_end is not None
                    if batch:
                        position = batch[-1].offset + 1
                        buffered.extend(f for f in batch if f.offset >= start)
                first = buffered[0] if buffered else None
            for check in by_start[start]:
                check.low, check.first = low, first
                check.done.set()

    # -- the scan ------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        reader: ReplayReader | None = None
        while True:
            while not self._waiting:
                self._waiting_added = trio.Event()
                await self._waiting_added.wait()
            requests, self._waiting = self._waiting, []
            left = [r for r in requests if not r.abandoned]
            for request in requests:
                if request.abandoned:
                    request.finish()
            if not left:
                continue  # every session asking left before its pass began
            requests = left
            for request in requests:
                self._active.setdefault(request.key, []).append(request)
            start = min(r.start for r in requests)
            self._ctx.metrics.replay_scans.labels("scan").inc()
            started = trio.current_time()
            self._joined = 0
            self._scanned = self._abandoned = 0
            try:
                if reader is None:
                    reader = self._open()
                # Requests arriving from here on join this pass if their start is not behind it.
                self._position = start
                await reader.seek(start)
                while self._drop_abandoned():
                    batch, log_end = await reader.next_batch(SCAN_BATCH, STALL_TIMEOUT_S)
                    self._scanned += len(batch)
                    if batch:
                        self._hand_out(batch)
                    if log_end is not None:
                        # The log end as one fetch saw it (perhaps before a request
                        # joined): ranges ending at or below it are complete, and the
                        # others wait for their records (or the stall timeout).
                        self._position = max(self._position, log_end)
                        for rs in list(self._active.values()):
                            for request in list(rs):
                                if request.end <= log_end:
                                    self._drop(request)
            except KafkaUnavailable as exc:
                for rs in self._active.values():
                    for request in rs:
                        request.finish(exc)
            finally:
                for rs in self._active.values():
                    for request in rs:
                        request.finish()
                self._active = {}
                self._position = None
            log.info(
                "replay_scan_done",
                extra={
                    "partition": self.partition,
                    "from": start,
                    "requests": len(requests) + self._joined,
                    "scanned": self._scanned,
                    "abandoned": self._abandoned,
                    "seconds": round(trio.current_time() - started, 3),
                },
            )

    def _hand_out(self, batch: list[Record]) -> None:
        """Each record to the requests that want it; no await: joins see a whole batch or none."""
        active = self._active
        for fetched in batch:
            for request in [r for key in _addressees(fetched) for r in active.get(key, ())]:
                if fetched.offset < request.start:
                    continue
                if fetched.offset >= request.end:
                    self._drop(request)
                    continue
                size = len(fetched.value or b"")
                if request.queued_bytes > 0 and request.queued_bytes + size > REQUEST_MAX_BYTES:
                    request.resume_at = fetched.offset
                    self._drop(request)
                    continue
                try:
                    request.send.send_nowait(fetched)
                except trio.WouldBlock:
                    request.resume_at = fetched.offset
                    self._drop(request)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._drop(request)  # the session is gone
                else:
                    request.queued_bytes += size
        self._position = batch[-1].offset + 1
        # Requests whose range the pass has now passed are complete.
        for requests in list(active.values()):
            for request in list(requests):
                if request.end <= self._position:
                    self._drop(request)

    def _drop_abandoned(self) -> bool:
        """Drop the requests whose sessions left; True while any request is left."""
        for requests in list(self._active.values()):
            for request in list(requests):
                if request.abandoned:
                    self._abandoned += 1
                    self._drop(request)
        return bool(self._active)

    def _drop(self, request: _Request) -> None:
        request.finish()
        requests = self._active.get(request.key)
        if requests is not None and request in requests:
            requests.remove(request)
            if not requests:
                del self._active[request.key]

    # -- the readers ---------------------------------------------------------------

    def _open(self) -> ReplayReader:
        cfg = self._ctx.config.value
        reader = ReplayReader(
            cfg.kafka.bootstrap_servers,
            f"{self._ctx.group(self.partition)}-replay",
            self._topic,
            fetch_wait_max_ms=cfg.kafka.fetch_wait_max_ms,
            limiter=self._ctx.consumer_limiter,
        )
        self._readers.append(reader)
        self._ctx.metrics.replay_consumers.inc()
        return reader


class Replay:
    """One resume of one session: decide the window, then send the range.

    async with Replay(ctx, hub, uid, resume, end) as replay:
        resumed = await replay.check()   # before the welcome frame
        ...
        if resumed:
            await replay.send_to(session)
    """

    def __init__(self, ctx: Context, hub: ReplayHub, uid: str, resume: int, end: int) -> None:
        self._ctx = ctx
        self._hub = hub
        self.partition = hub.partition
        self.uid = uid
        # resume = -1: everything still in the window (check() decides where that starts).
        self.everything = resume == -1
        self.start = resume + 1
        self.end = end
        self.sent = 0
        self.abandoned = False  # the client left while its records were being read
        self._checked: bool | None = None
        self._at_end = False  # check() already met the end of the log
        # Records older than this (ms since the epoch) are skipped (resume = -1 only).
        self._oldest_ms: float | None = None

    def __repr__(self) -> str:
        return f"<Replay {self._hub!r} [{self.start}, {self.end}) uid={self.uid}>"

    async def __aenter__(self) -> Replay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # -- the window -----------------------------------------------------------

    async def check(self) -> bool:
        """True when every record in [start, end) can still be replayed."""
        metrics = self._ctx.metrics
        cfg = self._ctx.config.value.replay
        if self.everything:
            return await self._check_everything()
        if self.start >= self.end:
            metrics.replays.labels("nothing_missed").inc()
            self._checked = True
            return True
        if self.end - self.start > cfg.max_records:
            metrics.replays.labels("out_of_window").inc()
            self._checked = False
            return False
        low, first = await self._hub.probe(self.start)
        ok = self.start >= low
        if ok:
            self._at_end = first is None
            if first is not None:
                # Timestamps grow along the log (to clock skew between instances),
                # so the first record is the oldest the replay would send.
                oldest_ms = (time.time() - cfg.max_age_s) * 1000
                ok = first.timestamp_ms >= oldest_ms
        metrics.replays.labels("replayed" if ok else "out_of_window").inc()
        self._checked = ok
        return ok

    async def _check_everything(self) -> bool:
        """``resume=-1``: the window is whatever is left of it, so it always resumes."""
        metrics = self._ctx.metrics
        cfg = self._ctx.config.value.replay
        self.start = max(0, self.end - cfg.max_records)
        if self.start >= self.end:
            metrics.replays.labels("nothing_missed").inc()
            self._checked = True
            return True
        low, first = await self._hub.probe(self.start)
        if self.start < low:
            self.start = low  # below it retention has deleted the records
            self._at_end = low >= self.end
        else:
            self._at_end = first is None
        self._oldest_ms = (time.time() - cfg.max_age_s) * 1000
        metrics.replays.labels("replayed").inc()
        self._checked = True
        return True

    # -- the range ---------------------------------------------------------------

    async def send_to(self, target: ReplayTarget) -> int:
        """Send ``target`` its records in [start, end), in offset order; return how many."""
        if not self._checked:
            raise RuntimeError(f"{self!r}: send_to() needs a successful check() first")
        if self.start >= self.end or self._at_end:
            return 0
        started = trio.current_time()
        try:
            try:
                async with trio.open_nursery() as nursery:
                    # A client that left is not waited for: the pass would read the
                    # whole range for nobody (closing our channel tells the scan).
                    nursery.start_soon(self._abandon_when_gone, target, nursery.cancel_scope)
                    await self._receive_all(target)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # Only the body raises (the watcher returns or is cancelled): the
                # caller handles a closed connection or an unavailable broker as such.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            self._ctx.metrics.replayed_records.inc(self.sent)
            log.info(
                "replay_done",
                extra={
                    "partition": self.partition,
                    "uid": self.uid,
                    "records": self.sent,
                    "from": self.start,
                    "to": self.end,
                    "abandoned": self.abandoned,
                    "seconds": round(trio.current_time() - started, 3),
                },
            )
        return self.sent

    async def _receive_all(self, target: ReplayTarget) -> None:
        start = self.start
        while True:
            request, records = self._hub.submit(self.uid, start, self.end)
            async with records:
                async for fetched in records:
                    request.queued_bytes -= len(fetched.value or b"")
                    await self._send_one(target, fetched)
            if request.error is not None:
                raise request.error
            if request.resume_at is None:
                return
            # Our channel was full: the rest comes from a later pass.
            start = request.resume_at

    async def _abandon_when_gone(self, target: ReplayTarget, scope: trio.CancelScope) -> None:
        await target.wait_gone()
        self.abandoned = True
        scope.cancel()

    async def _send_one(self, target: ReplayTarget, fetched: Record) -> None:
        if self._oldest_ms is not None and fetched.timestamp_ms < self._oldest_ms:
            return  # older than replay.max_age_s: out of the window
        try:
            chat = decode_record(fetched.value)
        except RecordError:
            return  # counted and logged by the live path, which sees it too
        if target.uid not in chat.addressees:
            return
        await target.send_replayed(
            fetched.offset, encode_message(chat, self.partition, fetched.offset, target.uid)
        )
        self.sent += 1
