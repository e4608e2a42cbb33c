"""The one adapter between librdkafka (confluent-kafka) and trio.

* ``KafkaProducer``: ``produce()`` enqueues on the trio thread (a cheap C call,
  no thread hop per message); the trio thread polls for delivery reports on a
  short timer while sends are unanswered, and answers each poll's worth at once.
* ``KafkaFetcher``: the instance's one consumer, fetching every held
  partition's topic; each partition reads a bounded ``TopicFeed`` of it,
  assigned at the committed offset of its group (no group join: ownership is
  fenced by the ZooKeeper lease, not by Kafka group membership).
* ``KafkaAdmin``: topic creation, metadata checks, end offsets and the
  committed offset of each partition's consumer group.
* ``ReplayReader``: a consumer that reads one topic from chosen offsets, for
  resumes (replay.py decides what to read; this reads it).

Nothing of confluent-kafka leaves this module: callers see ``Record``,
``DeliveryReceipt`` (its error as text) and ``KafkaUnavailable``.

The settings that matter for latency are chosen here, with the reasons; see
docs/performance.md for the measurements.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any, Final, NamedTuple, NoReturn

import trio
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

log = logging.getLogger(__name__)


class _LibrdkafkaLog:
    """librdkafka's own log lines into ours (confluent-kafka's ``logger`` setting).

    Without it librdkafka writes raw ``%3|…|FAIL|…`` lines to stderr, past the
    log format. Called on the thread that polls the client; it only logs.
    """

    _log = logging.getLogger("linechatd.librdkafka")

    def log(self, level: int, fmt: str, *args: object) -> None:
        facility, client, detail = (*args, "", "", "")[:3]
        self._log.log(
            level, "librdkafka", extra={"facility": facility, "client": client, "detail": detail}
        )


LIBRDKAFKA_LOG: Final = _LibrdkafkaLog()


# How often the fetch thread refreshes every feed's (low, high) watermarks.
WATERMARKS_EVERY_S = 0.1
# The metadata request made before assigning topics. It runs on the fetch
# thread (librdkafka serializes a consumer's calls behind its poll), so every
# partition's delivery waits on it: a broker that does not answer this fast
# is left to librdkafka's own metadata refresh instead.
ASSIGN_METADATA_TIMEOUT_S = 0.2
# After a failed commit every partition's commits pause this long, doubling.
_COMMIT_BACKOFF_MIN_S = 1.0
_COMMIT_BACKOFF_MAX_S = 30.0
# The offsets client's broker-level request timeout, below every request
# timeout it is given (5-10 s): a dead connection fails its requests first.
_OFFSETS_SOCKET_TIMEOUT_MS = 3000
# How long closing the group offsets' consumers may delay a stopping process.
_POOL_CLOSE_S = 5.0
# How much longer than a request's own timeout its future is awaited.
_ADMIN_GRACE_S = 1.0
# How long a hole in a topic's offsets is fetched again before it counts as real.
GAP_REFETCH_S = 1.0


class KafkaUnavailable(Exception):
    """The broker did not answer, or did not accept a record in time."""


class CommitsPaused(KafkaUnavailable):
    """A commit not attempted: commits pause for a while after one failed."""


class Record(NamedTuple):
    """One consumed record, detached from librdkafka's Message object.

    A named tuple: hundreds are built per fetched batch, on the fetch thread.
    """

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def producer_settings(bootstrap: str, *, linger_ms: int, timeout_s: float) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": LIBRDKAFKA_LOG,
        # An ack means durable: every in-sync replica has the record.
        "acks": "all",
        # Retries never duplicate or reorder within a partition.
        "enable.idempotence": True,
        # Chat is latency-bound: a tiny linger still batches bursts of sends.
        "linger.ms": linger_ms,
        "socket.nagle.disable": True,
        # librdkafka gives up (and reports an error) a little before our own
        # deadline, so the client normally hears "unavailable" from the report.
        "message.timeout.ms": max(1000, int(timeout_s * 1000) - 250),
        # Bounded memory: past this, produce() fails fast with "unavailable".
        "queue.buffering.max.messages": 100_000,
        "queue.buffering.max.kbytes": 65_536,
    }


def consumer_settings(bootstrap: str, group: str, *, fetch_wait_max_ms: int) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": LIBRDKAFKA_LOG,
        "group.id": group,
        # Offsets are committed by the owner, only while it holds the lease.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # With no commit yet, a new partition starts at its end: nobody is owed
        # older records except through a client's explicit resume.
        "auto.offset.reset": "latest",
        # The broker answers a fetch as soon as data exists or after this long.
        "fetch.wait.max.ms": fetch_wait_max_ms,
        "fetch.min.bytes": 1,
        "socket.nagle.disable": True,
        "enable.partition.eof": False,
        # Bounded prefetch per partition consumer.
        "queued.max.messages.kbytes": 8192,
        # When that prefetch queue is full librdkafka pauses fetching for this
        # long (default 1000 ms): keep it short so a drained queue refills at once.
        "fetch.queue.backoff.ms": 10,
        # After a failed fetch librdkafka waits this long (default 500 ms) before
        # the next one for that partition: a partition's delivery stalls meanwhile.
        "fetch.error.backoff.ms": 50,
    }


class DeliveryReceipt:
    """The delivery report of one send, as the trio thread learns it.

    Resolved on the trio thread; ``on_resolved`` (if set) is called right
    then, so a session can answer its acks without a task or an event per send.
    ``on_batch`` (if set) is called once per poll for all the receipts that
    name it, after all of them are resolved, with the ``time.perf_counter()``
    after which their reports arrived (the poll before): a session answers
    every ack of one poll in one write.
    """

    __slots__ = ("error", "offset", "on_batch", "on_resolved", "resolved")

    def __init__(self) -> None:
        self.resolved = False
        # Why the record was not stored (librdkafka's text, for logs), or None.
        self.error: str | None = None
        self.offset = -1
        self.on_resolved: Callable[[], object] | None = None
        self.on_batch: Callable[[float], object] | None = None

    def resolve(self, error: KafkaError | None, offset: int | None) -> None:
        self.error = None if error is None else error.str()
        self.offset = -1 if offset is None else offset
        self.resolved = True
        if self.on_resolved is not None:
            self.on_resolved()


def _resolve_all(
    reports: list[tuple[DeliveryReceipt, KafkaError | None, int | None]], reported_after: float
) -> None:
    # Runs inside whichever task polled (the report timer's, or a session's):
    # one receiver's bug is logged and the others still hear.
    batches: dict[Callable[[float], object], None] = {}
    for receipt, error, offset in reports:
        try:
            receipt.resolve(error, offset)
        except Exception:
            log.exception("delivery_report_failed")
        if receipt.on_batch is not None:
            batches[receipt.on_batch] = None
    for on_batch in batches:
        try:
            on_batch(reported_after)
        except Exception:
            log.exception("delivery_report_failed")


# Delivery errors that leave an idempotent producer unable to store anything
# more (fenced, or its sequence broken): the producer is replaced, whatever
# librdkafka's own fatal flag says.
_PRODUCER_BROKEN = {
    KafkaError._FATAL,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError.PRODUCER_FENCED,
}
# Errors meaning the broker cannot be reached (for readiness).
_UNREACHABLE = {
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TRANSPORT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
}


class _Handle:
    """One librdkafka producer, and whether it was found broken."""

    __slots__ = ("producer", "broken")

    def __init__(self) -> None:
        self.producer: Producer | None = None
        self.broken = False


# How often the trio thread asks librdkafka for delivery reports while sends
# are unanswered (at most this much is added to an ack), and while none are.
REPORT_POLL_S: Final = 0.002
IDLE_POLL_S: Final = 0.25


class KafkaProducer:
    """The instance's producer; replaced by a new one when it breaks.

    Delivery reports are served on the trio thread: while sends are
    unanswered, ``run`` polls librdkafka every ``REPORT_POLL_S`` (a timer,
    no thread, no hand-over), and every report of one poll is answered at
    once. A thread blocked in ``poll()`` would hear each report sooner, but
    each report then costs the GIL passing to that thread and back and a
    wake-up of trio through its wake-up socket (docs/performance.md, step 5).

    A fatal error of the idempotent producer (librdkafka's error callback
    says so, or a delivery report carries a fenced or broken-sequence error)
    is a state of this adapter, not of the process: the broken producer is
    retired — what it still holds is purged, and every one of its sends is
    answered with an error (``unavailable`` to the client, which sends again)
    — and a new producer, with a new producer id and idempotence kept, takes
    the following sends. Nothing that was acknowledged is affected.
    """

    def __init__(self, bootstrap: str, *, linger_ms: int, timeout_s: float) -> None:
        self._settings = producer_settings(bootstrap, linger_ms=linger_ms, timeout_s=timeout_s)
        self._current: _Handle | None = None
        # Broken producers to purge and flush (in a worker thread), then drop.
        self._retired_send, self._retired = trio.open_memory_channel[_Handle](math.inf)
        self._token: trio.lowlevel.TrioToken | None = None
        # Filled by delivery callbacks: on the trio thread inside poll(), or
        # on a worker thread flushing a retired or stopping producer.
        self._reports: deque[tuple[DeliveryReceipt, KafkaError | None, int | None]] = deque()
        # Trio thread: sends whose report has not been served yet, and where
        # the report poller waits while there are none.
        self._unanswered = 0
        self._idle = trio.lowlevel.ParkingLot()
        # Trio thread: when the last poll ran (perf_counter), when the next is
        # due (trio clock), and the report timer's scope while it waits.
        self._polled_at = time.perf_counter()
        self._poll_due = -math.inf
        self._timer: trio.CancelScope | None = None
        self._stopping = False
        # Trio thread: how many producers were replaced, and when a send last
        # failed for want of the broker (trio clock), for readiness.
        self.replacements = 0
        self.last_unreachable = -math.inf

    def _make(self) -> _Handle:
        handle = _Handle()
        settings = dict(self._settings)
        settings["error_cb"] = lambda err: self._on_error(handle, err)
        handle.producer = Producer(settings)
        return handle

    async def run(
        self, *, task_status: trio.TaskStatus[KafkaProducer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._current = self._make()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._retire_loop)
                task_status.started(self)
                await self._serve_reports()
        finally:
            with trio.CancelScope(shield=True):
                # No producer is made from here on: nothing would flush it.
                self._stopping = True
                # Give in-flight sends a bounded chance to be acknowledged
                # (flush() serves their callbacks in the worker thread).
                current = self._current.producer
                assert current is not None
                await trio.to_thread.run_sync(self._flush, current, 5.0)
                self._answer(time.perf_counter())
                while True:
                    try:
                        handle = self._retired.receive_nowait()
                    except trio.WouldBlock:
                        break
                    await self._retire(handle)

    async def _serve_reports(self) -> None:
        while True:
            if not self._unanswered:
                # Idle: error callbacks (the broker unreachable) are served
                # by poll() too, so it still runs now and then.
                with trio.move_on_after(IDLE_POLL_S):
                    await self._idle.park()
                if self._unanswered:
                    continue  # a send woke us: its report cannot be here yet
            else:
                # A task that polls at its own safe point (serve_due) moves
                # the deadline on: this timer fires only when none did.
                try:
                    with trio.CancelScope(deadline=self._poll_due) as timer:
                        self._timer = timer
                        await trio.sleep_forever()
                finally:
                    self._timer = None
            self._poll()

    def serve_due(self) -> None:
        """Serve the delivery reports now if their poll is (nearly) due.

        For a task that is awake anyway, at a point where answers to other
        sessions (and to its own earlier sends) may be written: the report
        timer then need not wake the thread for them.
        """
        if self._unanswered and trio.current_time() >= self._poll_due - REPORT_POLL_S / 2:
            self._poll()

    def _poll(self) -> None:
        handle = self._current
        assert handle is not None and handle.producer is not None
        # What this poll serves arrived after the poll before and no later
        # than now: the residence measured from the former is an upper bound.
        now = time.perf_counter()
        try:
            handle.producer.poll(0)
        except Exception:
            # confluent-kafka re-raises what a callback raised: not the
            # business of the session that happened to poll.
            log.exception("kafka_poll_failed")
        self._answer(self._polled_at)
        self._polled_at = now
        due = self._poll_due = trio.current_time() + REPORT_POLL_S
        if self._timer is not None:
            self._timer.deadline = due

    def _answer(self, reported_after: float) -> None:
        """Trio thread: resolve every report collected so far, in one batch."""
        reports = self._reports
        if not reports:
            return
        batch = []
        while reports:
            batch.append(reports.popleft())
        self._unanswered -= len(batch)
        _resolve_all(batch, reported_after)

    async def _retire_loop(self) -> None:
        async for handle in self._retired:
            await self._retire(handle)

    async def _retire(self, handle: _Handle) -> None:
        """Purge and flush a broken producer (in a worker thread), then answer its sends."""
        started = time.perf_counter()
        producer = handle.producer
        assert producer is not None
        try:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
        except KafkaException as exc:
            log.warning("kafka_producer_purge_failed", extra={"error": str(exc)})
        left = await trio.to_thread.run_sync(self._flush, producer, 5.0)
        handle.producer = None
        if left:
            # Never answered now: stop waiting for them (their sessions' send
            # deadlines close those sessions, and the clients send again).
            log.error("kafka_producer_retired_with_unanswered_sends", extra={"sends": left})
            self._unanswered -= left
        self._answer(started)

    @staticmethod
    def _flush(producer: Producer, timeout_s: float) -> int:
        """A worker thread: serve what ``producer`` still holds; how many sends are left."""
        try:
            return int(producer.flush(timeout_s))
        except Exception:
            log.exception("kafka_flush_failed")
            return int(len(producer))

    def _on_error(self, handle: _Handle, err: KafkaError) -> None:
        # Inside poll() or flush(), on whichever thread called it: hand over only.
        if err.fatal():
            self._call_trio(self._replace, handle, err.str())
        elif err.code() in _UNREACHABLE:
            self._call_trio(self._note_unreachable)

    def _call_trio(self, fn: Callable[..., object], *args: object) -> None:
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass

    def _note_unreachable(self) -> None:
        self.last_unreachable = trio.current_time()

    def _replace(self, handle: _Handle, reason: str) -> None:
        """Trio thread: retire ``handle``'s producer (if still current) and start a new one."""
        if handle is not self._current or handle.broken or self._stopping:
            return
        handle.broken = True
        # New sends go to the new producer from here on: send() runs on this
        # thread too, so none can reach the retired one after this line.
        self._current = self._make()
        self._retired_send.send_nowait(handle)
        self.replacements += 1
        log.warning(
            "kafka_producer_replaced",
            extra={"reason": reason, "replacements": self.replacements},
        )

    def send(self, topic: str, key: bytes, value: bytes) -> DeliveryReceipt:
        """Enqueue one record now (so calls keep their order); the receipt resolves on the ack.

        Raises KafkaUnavailable at once when the local queue is full. Every
        record gets its report within ``message.timeout.ms`` (set just under
        ``produce_timeout_s``): librdkafka reports a timeout as an error.
        """
        handle = self._current
        if handle is None or handle.producer is None:
            raise KafkaUnavailable("producer is not running")
        receipt = DeliveryReceipt()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            # Inside poll() or flush(): collect, and hand a broken producer
            # over for replacement.
            self._reports.append((receipt, err, msg.offset() if err is None else -1))
            if err is not None:
                if err.fatal() or err.code() in _PRODUCER_BROKEN:
                    self._call_trio(self._replace, handle, err.str())
                elif err.code() in _UNREACHABLE:
                    self._call_trio(self._note_unreachable)

        try:
            handle.producer.produce(
                topic, value=value, key=key, partition=0, on_delivery=on_delivery
            )
        except BufferError as exc:
            raise KafkaUnavailable("producer queue is full") from exc
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if error is not None and (error.fatal() or error.code() in _PRODUCER_BROKEN):
                self._replace(handle, error.str())
            raise KafkaUnavailable(str(exc)) from exc
        if not self._unanswered:
            # Its report cannot be here before a round trip to the broker,
            # nor have arrived before now.
            self._polled_at = time.perf_counter()
            self._poll_due = trio.current_time() + REPORT_POLL_S
            self._idle.unpark_all()
        self._unanswered += 1
        return receipt


async def _result(future: Future[Any], timeout_s: float, what: str) -> Any:
    """Await a librdkafka admin future without a thread: its callback wakes trio."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_future: Future[Any]) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    # A little past the request's own timeout: librdkafka then answers the
    # future itself (an abandoned request still pending in librdkafka is
    # what to avoid).
    with trio.move_on_after(timeout_s + _ADMIN_GRACE_S):
        await done.wait()
    if not future.done():
        raise KafkaUnavailable(f"{what}: no answer from the broker in {timeout_s:g} s")
    try:
        return future.result()
    except KafkaException as exc:
        raise KafkaUnavailable(f"{what}: {exc}") from exc


class KafkaAdmin:
    """Topics, metadata and end offsets.

    Group offsets go through :class:`GroupOffsets` instead: librdkafka's admin
    group operations (list/alter consumer group offsets) have aborted the
    whole process when their requests time out while the broker's connection
    keeps failing (librdkafka issues 4605 and 3663; seen here in the zombie
    owner test), and the consumer's own commit path has no such trouble.
    """

    def __init__(self, bootstrap: str) -> None:
        settings: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": LIBRDKAFKA_LOG}
        self._admin = AdminClient(settings)

    async def end_offset(self, topic: str, timeout_s: float = 10.0) -> int:
        """The offset the next record of ``topic`` will get."""
        futures = self._admin.list_offsets(
            {TopicPartition(topic, 0): OffsetSpec.latest()}, request_timeout=timeout_s
        )
        [future] = futures.values()
        answer = await _result(future, timeout_s, f"{topic}: end offset")
        return int(answer.offset)

    async def check(self, timeout_s: float = 5.0) -> None:
        """Raise KafkaUnavailable unless the cluster answers a metadata request."""

        def probe() -> None:
            # Serves the admin client's queued log lines (see _LibrdkafkaLog).
            self._admin.poll(0)
            try:
                self._admin.list_topics(timeout=timeout_s)
            except KafkaException as exc:
                raise KafkaUnavailable(str(exc)) from exc

        await trio.to_thread.run_sync(probe)

    async def ensure_topics(
        self,
        topics: Sequence[str],
        *,
        replication_factor: int,
        topic_config: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> list[str]:
        """Create the missing single-partition topics with ``topic_config``; return those created.

        Safe when several instances race: "already exists" is success. Topics
        that exist keep their settings (change those with Kafka's own tools).
        """

        def create() -> list[str]:
            existing = set(self._admin.list_topics(timeout=timeout_s).topics)
            missing = [t for t in topics if t not in existing]
            if not missing:
                return []
            futures = self._admin.create_topics(
                [
                    NewTopic(
                        t,
                        num_partitions=1,
                        replication_factor=replication_factor,
                        config=dict(topic_config or {}),
                    )
                    for t in missing
                ],
                operation_timeout=timeout_s,
                request_timeout=timeout_s,
            )
            created = []
            for topic, fut in futures.items():
                try:
                    fut.result(timeout=timeout_s)
                    created.append(topic)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise KafkaUnavailable(f"cannot create topic {topic}: {exc}") from exc
            return created

        try:
            return await trio.to_thread.run_sync(create)
        except KafkaException as exc:
            raise KafkaUnavailable(str(exc)) from exc


class TopicFeed:
    """One assigned topic's records, from the fetch thread to one trio reader.

    Read either with ``receive()`` or by ``deliver()``, which hands each batch
    to a function right in the fetcher's hand-over (no task woken per batch).
    Bounded: once ``limit`` records are handed over and not yet read, the
    fetch thread pauses the topic in librdkafka at once (it then fetches
    nothing more for it, and later resumes from the next offset not handed
    over); the reader asks for a resume once half is read. A feed holds at
    most ``limit`` + one poll's batch.
    """

    def __init__(self, fetcher: KafkaFetcher, topic: str, start: int, limit: int) -> None:
        self.topic = topic
        self.start = start
        self._fetcher = fetcher
        self._limit = limit
        self._batches: deque[tuple[float, list[Record]]] = deque()
        # time.perf_counter() when the fetch thread took the batch receive() returned last.
        self.fetched_at = 0.0
        self._buffered = 0
        self._next = start  # drops anything handed over twice
        # Fetch thread only: the next offset due, and a gap being refetched.
        self._fetch_next = start
        self._gap_at: int | None = None
        self._gap_since = 0.0
        self._arrived = trio.Event()
        self._assigned = trio.Event()
        # deliver()'s function while it runs, and what it raised in a hand-over.
        self._sink: Callable[[list[Record], float], object] | None = None
        self._sink_failure: Exception | None = None
        # Each counter has one writer: the fetch thread counts records handed
        # over and pauses made and lifted, the reader counts records taken and
        # names the pause it asked to lift. The topic is paused while
        # pauses > resumes. A stale read costs at most one needless command.
        self._handed = 0
        self._pauses = 0
        self._resumes = 0
        self._taken = 0
        self._resume_asked_for = 0
        self.closed = False
        # Written by the fetch thread only (one tuple assignment).
        self._watermarks: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"<TopicFeed {self.topic} next={self._next} buffered={self._buffered}>"

    @property
    def buffered(self) -> int:
        return self._buffered

    def cached_watermarks(self) -> tuple[int, int]:
        """(low, high) as last seen by fetches: no broker round trip, no waiting."""
        if self.closed:
            raise KafkaUnavailable(f"{self.topic}: no longer assigned")
        watermarks = self._watermarks
        if watermarks is None:
            raise KafkaUnavailable(f"{self.topic}: no fetch answered yet")
        return watermarks

    def _push(self, records: list[Record], fetched_at: float) -> None:
        # Trio thread (the fetcher's hand-over).
        if self.closed:
            return
        if records[0].offset < self._next:
            records = [r for r in records if r.offset >= self._next]
            if not records:
                return
        self._next = records[-1].offset + 1
        sink = self._sink
        if sink is not None:
            self.fetched_at = fetched_at
            self._took(len(records))
            try:
                sink(records, fetched_at)
            except Exception as exc:
                # Raised by deliver(), in its caller's task: not in the
                # hand-over, where it would end the whole run.
                self._sink = None
                self._sink_failure = exc
                self._arrived.set()
            return
        self._batches.append((fetched_at, records))
        self._buffered += len(records)
        self._arrived.set()

    async def receive(self) -> list[Record]:
        """The next batch, in offset order; waits until one arrives."""
        while not self._batches:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self._pop()

    async def deliver(self, handle: Callable[[list[Record], float], object]) -> NoReturn:
        """Call ``handle(batch, fetched_at)`` for every batch, in offset order, until cancelled.

        What is buffered goes first; after that each batch is handed over
        inside the fetcher's hand-over on the trio thread, so ``handle`` must
        not block. An exception from ``handle`` is raised here, and nothing
        more is handed to it.
        """
        if self._sink is not None:
            raise RuntimeError(f"{self.topic}: the feed is already being delivered")
        while self._batches:
            batch = self._pop()
            handle(batch, self.fetched_at)
        self._sink_failure = None
        self._sink = handle
        try:
            while self._sink_failure is None:
                self._arrived = trio.Event()
                await self._arrived.wait()
            failure, self._sink_failure = self._sink_failure, None
            raise failure
        finally:
            if self._sink is handle:
                self._sink = None
            if self._sink_failure is not None:
                # Cancelled before it could be raised: at least it is seen.
                log.error(
                    "feed_delivery_failed",
                    extra={"topic": self.topic},
                    exc_info=self._sink_failure,
                )
                self._sink_failure = None

    def _pop(self) -> list[Record]:
        self.fetched_at, batch = self._batches.popleft()
        self._buffered -= len(batch)
        self._took(len(batch))
        return batch

    def _took(self, count: int) -> None:
        self._taken += count
        pauses = self._pauses
        if (
            pauses > self._resumes
            and self._resume_asked_for < pauses
            and self._handed - self._taken <= self._limit // 2
        ):
            self._resume_asked_for = pauses
            self._fetcher._command("resume", self)


class KafkaFetcher:
    """The instance's one consumer: fetches every held partition's topic.

    One librdkafka client with one fetch request per broker per
    ``fetch.wait.max.ms`` covers every topic assigned to it, where a consumer
    per partition sent one fetch per partition (measured: 64 partitions cost
    the broker about half a core at idle). It never joins a group or commits:
    each partition's committed offset, in its own ``consumer-group-k``, is
    read and written by :class:`KafkaAdmin`.

    Only the fetch thread calls the consumer (librdkafka serializes calls on a
    consumer behind its poll); trio asks for assign/unassign/pause/resume
    through a queue the thread drains between polls.
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        *,
        fetch_wait_max_ms: int,
        batch_max: int = 500,
        feed_limit: int = 2000,
        poll_s: float = 0.05,
    ) -> None:
        self._settings = consumer_settings(bootstrap, group, fetch_wait_max_ms=fetch_wait_max_ms)
        self._batch_max = batch_max
        self._feed_limit = feed_limit
        self._poll_s = poll_s
        self._commands: queue.SimpleQueue[tuple[str, TopicFeed]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        # Hand-overs queued on trio but not yet run: the thread waits past a
        # few, so a stalled trio loop cannot make it buffer without bound.
        self._pending = threading.BoundedSemaphore(4)
        # Set while the fetch thread runs (only that thread calls it).
        self._consumer: Consumer | None = None
        # Fetch thread: time.perf_counter() when the batch being built arrived.
        self._fetched_at = 0.0

    async def run(
        self, *, task_status: trio.TaskStatus[KafkaFetcher] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        consumer = Consumer(self._settings)
        self._consumer = consumer

        async def stop_on_cancel() -> None:
            try:
                await trio.sleep_forever()
            finally:
                self._stop.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_cancel)
                task_status.started(self)
                # Not abandoned on cancel: the loop sees the stop flag within
                # one poll, and closes the consumer on its own thread.
                await trio.to_thread.run_sync(self._fetch_loop, consumer)
                # The loop returns only once stopped, i.e. cancelled: this raises Cancelled.
                await trio.lowlevel.checkpoint()
                raise KafkaUnavailable("the fetch thread stopped")
        finally:
            self._consumer = None

    @asynccontextmanager
    async def assignment(
        self, topic: str, start: int, timeout_s: float = 10.0
    ) -> AsyncIterator[TopicFeed]:
        """Fetch ``topic`` from offset ``start`` for as long as the block runs.

        Entered once the fetch thread has assigned it, after asking for the
        topic's metadata, so that fetching starts at once (a topic new to the
        consumer otherwise waits for librdkafka's next metadata scan, ~1 s).
        """
        if self._consumer is None:
            raise KafkaUnavailable("the fetcher is not running")
        feed = TopicFeed(self, topic, start, self._feed_limit)
        self._command("assign", feed)
        try:
            with trio.move_on_after(timeout_s):
                await feed._assigned.wait()
            if not feed._assigned.is_set():
                raise KafkaUnavailable(f"{topic}: not assigned within {timeout_s:g} s")
            yield feed
        finally:
            feed.closed = True
            self._command("unassign", feed)

    def _command(self, what: str, feed: TopicFeed) -> None:
        self._commands.put((what, feed))

    # -- the fetch thread -----------------------------------------------------

    def _fetch_loop(self, consumer: Consumer) -> None:
        feeds: dict[str, TopicFeed] = {}
        watermarks_at = 0.0
        try:
            while not self._stop.is_set():
                self._apply_commands(consumer, feeds)
                records = self._poll(consumer, feeds)
                now = time.monotonic()
                if now - watermarks_at >= WATERMARKS_EVERY_S:
                    watermarks_at = now
                    updated: Iterable[TopicFeed] = feeds.values()
                else:
                    # A feed's watermarks are never older than its records.
                    updated = (feed for feed, _batch in records)
                for feed in updated:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(feed.topic, 0), cached=True
                    )
                    if high >= 0:
                        feed._watermarks = (int(low), int(high))
                if records:
                    self._hand_over(records, self._fetched_at)
        finally:
            consumer.close()

    def _apply_commands(self, consumer: Consumer, feeds: dict[str, TopicFeed]) -> None:
        commands: list[tuple[str, TopicFeed]] = []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        # Metadata first: with the leaders known, fetching starts at once. A
        # failover assigns many topics at once; together they may stall the
        # thread for ASSIGN_METADATA_TIMEOUT_S at most.
        deadline = time.monotonic() + ASSIGN_METADATA_TIMEOUT_S
        for topic in dict.fromkeys(feed.topic for what, feed in commands if what == "assign"):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                consumer.list_topics(topic, timeout=left)
            except KafkaException as exc:
                log.warning("kafka_metadata_failed", extra={"topic": topic, "error": str(exc)})
                break
        for what, feed in commands:
            topic = feed.topic
            tp = TopicPartition(topic, 0)
            if what == "assign":
                if topic in feeds:
                    # A feed that ended but whose unassign is still queued behind.
                    consumer.incremental_unassign([tp])
                feeds[topic] = feed
                consumer.incremental_assign([TopicPartition(topic, 0, feed.start)])
                # A topic paused under an earlier feed would stay paused.
                consumer.resume([tp])
                self._call_trio(feed._assigned.set)
            elif feeds.get(topic) is not feed:
                continue  # about a feed that is already gone
            elif what == "unassign":
                del feeds[topic]
                consumer.incremental_unassign([tp])
            elif what == "resume" and feed._pauses > feed._resumes:
                consumer.resume([tp])
                feed._resumes = feed._pauses

    def _poll(
        self, consumer: Consumer, feeds: dict[str, TopicFeed]
    ) -> list[tuple[TopicFeed, list[Record]]]:
        # Block briefly for the first record, then take what is already there.
        first = consumer.poll(self._poll_s)
        if first is None:
            return []
        # Where the records' time inside the gateway starts (fetch_to_write).
        self._fetched_at = time.perf_counter()
        by_topic: dict[str, list[Record]] = {}
        refetching: set[str] = set()
        for m in (first, *consumer.consume(self._batch_max - 1, 0)):
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("kafka_consumer_error", extra={"topic": m.topic(), "error": err.str()})
                continue
            topic, offset = m.topic(), m.offset()
            feed = feeds.get(topic) if topic is not None else None
            if feed is None or offset is None or topic in refetching:
                continue  # fetched before its unassign took effect, or refetched below
            if offset < feed._fetch_next:
                continue  # fetched twice
            if offset > feed._fetch_next and self._refetch_gap(consumer, feed, offset):
                refetching.add(feed.topic)
                continue
            feed._fetch_next = offset + 1
            _ts_type, ts = m.timestamp()
            by_topic.setdefault(feed.topic, []).append(Record(offset, m.key(), m.value(), ts))
        handed = []
        for topic, records in by_topic.items():
            feed = feeds[topic]
            feed._handed += len(records)
            if feed._pauses == feed._resumes and feed._handed - feed._taken >= feed._limit:
                feed._pauses += 1
                consumer.pause([TopicPartition(topic, 0)])
            handed.append((feed, records))
        return handed

    def _refetch_gap(self, consumer: Consumer, feed: TopicFeed, offset: int) -> bool:
        """``offset`` arrived where ``feed._fetch_next`` was due: fetch the gap again?

        An idempotent producer leaves no holes in a partition, yet a fetch can
        skip records that become visible late (seen on the test broker with
        several producers writing one topic). Seeking back refetches them;
        a gap that stays for GAP_REFETCH_S is taken as real (compaction,
        transaction markers, retention) and skipped, once, with a warning.
        """
        expected, now = feed._fetch_next, time.monotonic()
        if feed._gap_at != expected:
            feed._gap_at, feed._gap_since = expected, now
            log.info(
                "kafka_offset_gap_refetch",
                extra={"topic": feed.topic, "missing_from": expected, "missing_to": offset - 1},
            )
        if now - feed._gap_since < GAP_REFETCH_S:
            consumer.seek(TopicPartition(feed.topic, 0, expected))
            return True
        log.warning(
            "kafka_offset_gap",
            extra={"topic": feed.topic, "missing_from": expected, "missing_to": offset - 1},
        )
        feed._gap_at = None
        return False

    def _call_trio(self, fn: Callable[[], object]) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            self._stop.set()

    def _hand_over(self, records: list[tuple[TopicFeed, list[Record]]], fetched_at: float) -> None:
        assert self._token is not None
        while not self._pending.acquire(timeout=self._poll_s):
            if self._stop.is_set():
                return
        try:
            self._token.run_sync_soon(self._deliver, records, fetched_at)
        except trio.RunFinishedError:
            self._stop.set()

    def _deliver(self, records: list[tuple[TopicFeed, list[Record]]], fetched_at: float) -> None:
        # Trio thread.
        self._pending.release()
        for feed, batch in records:
            feed._push(batch, fetched_at)


# Out of range at the assigned offset: retention deleted it after the window check.
_GONE = {KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE}
_REPLAY_POLL_S = 0.2


REPLAY_PREFETCH_RECORDS = 2000
REPLAY_PREFETCH_KIB = 4096


def replay_settings(bootstrap: str, group: str, *, fetch_wait_max_ms: int) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": LIBRDKAFKA_LOG,
        # Required by librdkafka; never joined nor committed to.
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        # A range deleted under us is an error, never a silent skip.
        "auto.offset.reset": "error",
        "enable.partition.eof": True,
        "fetch.wait.max.ms": fetch_wait_max_ms,
        "socket.nagle.disable": True,
        "fetch.queue.backoff.ms": 10,
        # Prefetch a few batches ahead, not librdkafka's default of 100,000
        # records or 64 MiB per reader: that read most of a replay window into
        # memory (two readers per partition) for a resume whose client may be
        # gone after the first batch.
        "queued.min.messages": REPLAY_PREFETCH_RECORDS,
        "queued.max.messages.kbytes": REPLAY_PREFETCH_KIB,
    }


class ReplayReader:
    """One topic read from offsets of the caller's choosing (resumes); never joins nor commits.

    Every librdkafka call runs in a worker thread bounded by ``limiter`` (they
    block for up to a poll), never on the trio thread. Not safe for two tasks
    at once: each reader has one user.
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topic: str,
        *,
        fetch_wait_max_ms: int,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.topic = topic
        self._limiter = limiter
        self._consumer = Consumer(
            replay_settings(bootstrap, group, fetch_wait_max_ms=fetch_wait_max_ms)
        )

    def __repr__(self) -> str:
        return f"<ReplayReader {self.topic}>"

    async def _thread(self, fn: Callable[[], Any]) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except KafkaException as exc:
            raise KafkaUnavailable(f"replay of {self.topic}: {exc}") from exc

    async def low_watermark(self, timeout_s: float = 5.0) -> int:
        """The first offset still in the topic (retention deletes below it)."""
        tp = TopicPartition(self.topic, 0)
        low, _high = await self._thread(
            lambda: self._consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
        )
        return int(low)

    async def seek(self, offset: int) -> None:
        """Read from ``offset`` on."""
        tp = TopicPartition(self.topic, 0, offset)
        await self._thread(lambda: self._consumer.assign([tp]))

    async def next_batch(
        self, limit: int, stall_timeout_s: float
    ) -> tuple[list[Record], int | None]:
        """The next records from the position, and the log end if they reach it.

        Raises KafkaUnavailable when nothing at all arrives (neither records
        nor the end of the log) for ``stall_timeout_s``, or the position was
        deleted by retention meanwhile.
        """
        consumer = self._consumer
        deadline = trio.current_time() + stall_timeout_s

        def poll() -> tuple[list[Record], int | None]:
            first = consumer.poll(_REPLAY_POLL_S)
            if first is None:
                return [], None
            messages: list[Message] = [first]
            if limit > 1:
                messages += consumer.consume(limit - 1, 0)
            batch: list[Record] = []
            at_end: int | None = None
            for m in messages:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # Records written since may follow in this same batch.
                        at_end = m.offset()
                        if at_end is None or at_end < 0:
                            at_end = batch[-1].offset + 1 if batch else 0
                        continue
                    if err.code() in _GONE or err.fatal():
                        raise KafkaException(err)
                    continue  # transient: librdkafka retries by itself
                offset = m.offset()
                if offset is not None:
                    at_end = None
                    batch.append(Record(offset, m.key(), m.value(), m.timestamp()[1]))
            return batch, at_end

        while True:
            batch, at_end = await self._thread(poll)
            if batch or at_end is not None:
                return batch, at_end
            if trio.current_time() > deadline:
                raise KafkaUnavailable(
                    f"replay of {self.topic}: no records for {stall_timeout_s:g} s"
                )

    async def aclose(self) -> None:
        """Close the consumer (in a thread: it may wait for librdkafka's own threads)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._consumer.close, limiter=self._limiter)


class GroupOffsets:
    """One partition's consumer group offsets (``consumer-group-k``), held while it is owned.

    Through a consumer of that group that never subscribes, is never
    assigned and never fetches: it only reads and commits the group's offset
    for the topic (librdkafka's group coordinator path). Every call runs in a
    worker thread bounded by ``limiter``. Commits are hints (where the next
    owner's live tail starts), so after a failed one the next attempts pause
    (1 s, doubling to 30 s) instead of piling up requests while the broker
    is unreachable.
    """

    def __init__(
        self, bootstrap: str, group: str, topic: str, *, limiter: trio.CapacityLimiter
    ) -> None:
        self.group = group
        self.topic = topic
        self._limiter = limiter
        # The outcome of the one commit in flight (commits of one partition
        # are sequential), set by librdkafka's callback inside poll().
        self._committed: KafkaError | None | bool = False
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "socket.nagle.disable": True,
                "on_commit": self._on_commit,
            }
        )
        self._paused_until = -math.inf
        self._backoff_s = _COMMIT_BACKOFF_MIN_S

    def _on_commit(self, err: KafkaError | None, _partitions: list[TopicPartition]) -> None:
        # A worker thread, inside poll() in _commit_within().
        self._committed = err if err is not None else True

    def _commit_within(self, offset: int, timeout_s: float) -> None:
        """Commit and wait at most ``timeout_s`` for the answer (a blocking
        commit waits as long as librdkafka retries, minutes while the broker
        is away). Raises KafkaException on a refusal or no answer."""
        self._committed = False
        self._consumer.commit(offsets=[TopicPartition(self.topic, 0, offset)], asynchronous=True)
        deadline = time.monotonic() + timeout_s
        while self._committed is False and time.monotonic() < deadline:
            self._consumer.poll(0.05)  # serves the commit callback; nothing is assigned
        outcome = self._committed
        if outcome is False:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "no answer to the commit"))
        if outcome is not True:
            raise KafkaException(outcome)

    def __repr__(self) -> str:
        return f"<GroupOffsets {self.group} {self.topic}>"

    async def _thread(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except KafkaException as exc:
            raise KafkaUnavailable(f"{self.topic}: {what} of {self.group}: {exc}") from exc

    async def committed(self, timeout_s: float = 10.0) -> int:
        """The offset the group committed for the topic, or -1 when none was."""
        tp = TopicPartition(self.topic, 0)
        [answer] = await self._thread(
            lambda: self._consumer.committed([tp], timeout=timeout_s), "committed offset"
        )
        if answer.error is not None:
            raise KafkaUnavailable(
                f"{self.topic}: committed offset of {self.group}: {answer.error}"
            )
        offset = int(answer.offset)
        return offset if offset >= 0 else -1

    async def end_offset(self, timeout_s: float = 10.0) -> int:
        """The offset the topic's next record will get."""
        tp = TopicPartition(self.topic, 0)
        _low, high = await self._thread(
            lambda: self._consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False),
            "end offset",
        )
        return int(high)

    async def commit(self, offset: int, timeout_s: float = 5.0) -> None:
        """Record ``offset`` as where the group's next reader starts.

        Raises CommitsPaused at once while commits pause after a failure.
        """
        if trio.current_time() < self._paused_until:
            raise CommitsPaused(f"{self.topic}: commit for {self.group}: paused after a failure")
        try:
            await self._thread(lambda: self._commit_within(offset, timeout_s), "commit")
        except KafkaUnavailable:
            self._paused_until = trio.current_time() + self._backoff_s
            self._backoff_s = min(_COMMIT_BACKOFF_MAX_S, 2 * self._backoff_s)
            raise
        self._backoff_s = _COMMIT_BACKOFF_MIN_S

    async def aclose(self) -> None:
        # Abandoned if its caller gives up (a stopping process): closing
        # waits for broker connections that may never answer.
        await trio.to_thread.run_sync(
            self._consumer.close, limiter=self._limiter, abandon_on_cancel=True
        )


class GroupOffsetsPool:
    """The instance's :class:`GroupOffsets`, one per partition it has held, kept until it stops.

    Kept rather than closed when a partition is given back: closing a
    consumer waits for its broker connections, up to tens of seconds while
    the broker is unreachable, which would hold up the release (and the
    move of the partition to an instance that can serve it). A partition
    held again reuses its consumer. At most one per partition, each a few
    hundred KiB.
    """

    def __init__(
        self, bootstrap: str, group_prefix: str, topic_prefix: str, *, limiter: trio.CapacityLimiter
    ) -> None:
        self._bootstrap = bootstrap
        self._group_prefix = group_prefix
        self._topic_prefix = topic_prefix
        self._limiter = limiter
        self._offsets: dict[int, GroupOffsets] = {}
        self._running = False

    def of(self, partition: int) -> GroupOffsets:
        """Partition ``partition``'s group offsets (created on first use)."""
        if not self._running:
            raise KafkaUnavailable("group offsets are not available: the instance is stopping")
        offsets = self._offsets.get(partition)
        if offsets is None:
            offsets = self._offsets[partition] = GroupOffsets(
                self._bootstrap,
                f"{self._group_prefix}{partition}",
                f"{self._topic_prefix}{partition}",
                limiter=self._limiter,
            )
        return offsets

    async def run(
        self, *, task_status: trio.TaskStatus[GroupOffsetsPool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Until cancelled; then close every consumer (bounded: the process is leaving)."""
        self._running = True
        try:
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            self._running = False
            offsets, self._offsets = list(self._offsets.values()), {}
            with trio.CancelScope(shield=True), trio.move_on_after(_POOL_CLOSE_S):
                async with trio.open_nursery() as nursery:
                    for one in offsets:
                        nursery.start_soon(one.aclose)
