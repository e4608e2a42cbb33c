"""Resume: send a reconnecting device what it missed, from its partition's topic.

A session asking for ``resume=N`` is owed every record addressed to its uid in
[N+1, end), where ``end`` is where its live delivery starts. That range can be
replayed only if it is still in the window: at most ``replay.max_records``
records, none deleted by Kafka retention, and its first record no older than
``replay.max_age_s``. The window is decided before the welcome frame (which
tells the client ``resumed``), and once it is, every record of the range is
sent, in offset order, each once.

Each replay reads with a consumer of its own, assigned at N+1, never joining a
group nor committing: the partition's own consumer serves live delivery and
must not be disturbed (nor waited for: librdkafka calls on one consumer
serialize behind its poll).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import trio
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from .kafka import KafkaUnavailable
from .protocol import RecordError, decode_record, encode_message

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger(__name__)

SCAN_BATCH = 500
# A scan that makes no progress for this long gives up (the session closes
# with 1011 and the client resumes again later).
STALL_TIMEOUT_S = 10.0
_POLL_S = 0.2
# Out of range at the assigned offset: retention deleted it after the window check.
_GONE = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}


class ReplayTarget(Protocol):
    """Where replayed frames go (a session, before its live writer starts)."""

    uid: str

    async def send_replayed(self, offset: int, frame: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Fetched:
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


class Replay:
    """One resume of one session: decide the window, then send the range.

    async with Replay(ctx, partition, uid, resume, end) as replay:
        resumed = await replay.check()   # before the welcome frame
        ...
        if resumed:
            await replay.send_to(session)
    """

    def __init__(self, ctx: Context, partition: int, uid: str, resume: int, end: int) -> None:
        self._ctx = ctx
        self.partition = partition
        self.uid = uid
        self.start = resume + 1
        self.end = end
        self.sent = 0
        self._topic = ctx.topic(partition)
        self._key = uid.encode()
        self._consumer: Consumer | None = None
        self._first: _Fetched | None = None  # read by check(), sent first by send_to()
        self._checked: bool | None = None
        self._at_end = False  # check() already met the end of the log

    def __repr__(self) -> str:
        return f"<Replay {self._topic} [{self.start}, {self.end}) uid={self.uid}>"

    async def __aenter__(self) -> Replay:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with trio.CancelScope(shield=True):
                await self._thread(consumer.close)

    # -- the window -----------------------------------------------------------

    async def check(self) -> bool:
        """True when every record in [start, end) can still be replayed."""
        metrics = self._ctx.metrics
        cfg = self._ctx.config.value.replay
        if self.start >= self.end:
            metrics.replays.labels("nothing_missed").inc()
            self._checked = True
            return True
        if self.end - self.start > cfg.max_records:
            metrics.replays.labels("out_of_window").inc()
            self._checked = False
            return False
        consumer = self._open()
        tp = TopicPartition(self._topic, 0)
        try:
            low, _high = await self._thread(
                lambda: consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            )
        except KafkaException as exc:
            raise KafkaUnavailable(f"replay of {self._topic}: {exc}") from exc
        ok = self.start >= low
        if ok:
            consumer.assign([TopicPartition(self._topic, 0, self.start)])
            first = await self._next_batch(limit=1)
            self._at_end = not first
            if first:
                self._first = first[0]
                # Timestamps grow along the log (to clock skew between instances),
                # so the first record is the oldest the replay would send.
                oldest_ms = (time.time() - cfg.max_age_s) * 1000
                ok = self._first.timestamp_ms >= oldest_ms
        metrics.replays.labels("replayed" if ok else "out_of_window").inc()
        self._checked = ok
        return ok

    # -- the scan ---------------------------------------------------------------

    async def send_to(self, target: ReplayTarget) -> int:
        """Send ``target`` its records in [start, end), in offset order; return how many."""
        if not self._checked:
            raise RuntimeError(f"{self!r}: send_to() needs a successful check() first")
        if self.start >= self.end or self._at_end:
            return 0
        started = trio.current_time()
        pending = [self._first] if self._first is not None else []
        self._first = None
        position = self.start
        try:
            while position < self.end:
                batch = pending or await self._next_batch(limit=SCAN_BATCH)
                pending = []
                if not batch:
                    break  # the end of the log: nothing more was written before ``end``
                for fetched in batch:
                    if fetched.offset >= self.end:
                        position = self.end
                        break
                    position = fetched.offset + 1
                    await self._send_one(target, fetched)
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
                    "seconds": round(trio.current_time() - started, 3),
                },
            )
        return self.sent

    async def _send_one(self, target: ReplayTarget, fetched: _Fetched) -> None:
        if fetched.key != self._key:
            return  # another user's: the key is the recipient, no need to decode
        try:
            chat = decode_record(fetched.value)
        except RecordError:
            return  # counted and logged by the live path, which sees it too
        if chat.to != target.uid:
            return
        await target.send_replayed(
            fetched.offset, encode_message(chat, self.partition, fetched.offset)
        )
        self.sent += 1

    # -- librdkafka, in threads ---------------------------------------------------

    def _open(self) -> Consumer:
        if self._consumer is None:
            cfg = self._ctx.config.value
            self._consumer = Consumer(
                {
                    "bootstrap.servers": cfg.kafka.bootstrap_servers,
                    # Required by librdkafka; never joined nor committed to.
                    "group.id": f"{self._ctx.group(self.partition)}-replay",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # A range deleted under us is an error, never a silent skip.
                    "auto.offset.reset": "error",
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": cfg.kafka.fetch_wait_max_ms,
                    "socket.nagle.disable": True,
                    # Many replays may run at once after a failover: small prefetch each,
                    # and a short pause (not librdkafka's default second) when it is full.
                    "queued.max.messages.kbytes": 2048,
                    "fetch.queue.backoff.ms": 10,
                }
            )
        return self._consumer

    async def _thread(self, fn: Any) -> Any:
        return await trio.to_thread.run_sync(fn, limiter=self._ctx.consumer_limiter)

    async def _next_batch(self, *, limit: int) -> list[_Fetched]:
        """The next records from the assigned position; [] at the end of the log."""
        consumer = self._consumer
        assert consumer is not None
        deadline = trio.current_time() + STALL_TIMEOUT_S

        def poll() -> tuple[list[_Fetched], bool]:
            first = consumer.poll(_POLL_S)
            if first is None:
                return [], False
            messages: list[Message] = [first]
            if limit > 1:
                messages += consumer.consume(limit - 1, 0)
            batch: list[_Fetched] = []
            for m in messages:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        return batch, True
                    if err.code() in _GONE or err.fatal():
                        raise KafkaException(err)
                    continue  # transient: librdkafka retries by itself
                offset = m.offset()
                if offset is not None:
                    batch.append(_Fetched(offset, m.timestamp()[1], m.key(), m.value()))
            return batch, False

        while True:
            try:
                batch, at_end = await self._thread(poll)
            except KafkaException as exc:
                raise KafkaUnavailable(f"replay of {self._topic}: {exc}") from exc
            if batch or at_end:
                return batch
            if trio.current_time() > deadline:
                raise KafkaUnavailable(
                    f"replay of {self._topic}: no records for {STALL_TIMEOUT_S:g}s"
                )
