"""The one adapter between librdkafka (confluent-kafka) and trio.

* ``KafkaProducer``: ``produce()`` enqueues on the trio thread (a cheap C call,
  no thread hop per message); one poll thread serves delivery reports and hands
  each back to trio with ``TrioToken.run_sync_soon``.
* ``PartitionConsumer``: one consumer per chat partition, ``assign()``-ed at the
  committed offset of its group (no group join: ownership is fenced by the
  ZooKeeper lease, not by Kafka group membership).
* ``KafkaAdmin``: topic creation and metadata checks.

The settings that matter for latency are chosen here, with the reasons; see
docs/performance.md for the measurements.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)


class KafkaUnavailable(Exception):
    """The broker did not answer, or did not accept a record in time."""


@dataclass(frozen=True)
class Record:
    """One consumed record, detached from librdkafka's Message object."""

    offset: int
    value: bytes | None
    timestamp_ms: int


def producer_settings(bootstrap: str, *, linger_ms: int, timeout_s: float) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
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
    }


class DeliveryReceipt:
    """A delivery report on its way from librdkafka's thread to trio."""

    __slots__ = ("done", "error", "offset")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: KafkaError | None = None
        self.offset = -1

    def resolve(self, error: KafkaError | None, offset: int | None) -> None:
        self.error = error
        self.offset = -1 if offset is None else offset
        self.done.set()


class KafkaProducer:
    def __init__(self, bootstrap: str, *, linger_ms: int, timeout_s: float) -> None:
        self._settings = producer_settings(bootstrap, linger_ms=linger_ms, timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._producer: Producer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = threading.Event()

    async def run(
        self, *, task_status: trio.TaskStatus[KafkaProducer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._producer = Producer(self._settings)
        poller = threading.Thread(target=self._poll_loop, name="kafka-producer-poll", daemon=True)
        poller.start()
        try:
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                # Give in-flight sends a bounded chance to be acknowledged.
                await trio.to_thread.run_sync(self._producer.flush, 5.0)
                self._stop.set()
                await trio.to_thread.run_sync(poller.join)

    def _poll_loop(self) -> None:
        # The only thread that runs delivery callbacks.
        assert self._producer is not None
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def send(self, topic: str, key: bytes, value: bytes) -> DeliveryReceipt:
        """Enqueue one record now (so calls keep their order); await ``wait()`` for the ack.

        Raises KafkaUnavailable at once when the local queue is full.
        """
        producer, token = self._producer, self._token
        if producer is None or token is None:
            raise KafkaUnavailable("producer is not running")
        receipt = DeliveryReceipt()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            # librdkafka's poll thread: hand over only.
            offset = msg.offset() if err is None else -1
            try:
                token.run_sync_soon(receipt.resolve, err, offset)
            except trio.RunFinishedError:
                pass

        try:
            producer.produce(topic, value=value, key=key, partition=0, on_delivery=on_delivery)
        except BufferError as exc:
            raise KafkaUnavailable("producer queue is full") from exc
        except KafkaException as exc:
            raise KafkaUnavailable(str(exc)) from exc
        return receipt

    async def wait(self, receipt: DeliveryReceipt) -> int:
        """The record's offset once the broker durably has it.

        Raises KafkaUnavailable when the broker did not accept it in time: the
        record was not acknowledged and may be sent again.
        """
        with trio.move_on_after(self._timeout_s):
            await receipt.done.wait()
        if not receipt.done.is_set():
            raise KafkaUnavailable("no acknowledgement from the broker in time")
        if receipt.error is not None:
            raise KafkaUnavailable(receipt.error.str())
        return receipt.offset

    async def produce(self, topic: str, key: bytes, value: bytes) -> int:
        return await self.wait(self.send(topic, key, value))


class KafkaAdmin:
    def __init__(self, bootstrap: str) -> None:
        self._admin = AdminClient({"bootstrap.servers": bootstrap})

    async def check(self, timeout_s: float = 5.0) -> None:
        """Raise KafkaUnavailable unless the cluster answers a metadata request."""

        def probe() -> None:
            try:
                self._admin.list_topics(timeout=timeout_s)
            except KafkaException as exc:
                raise KafkaUnavailable(str(exc)) from exc

        await trio.to_thread.run_sync(probe)

    async def ensure_topics(
        self, topics: Sequence[str], *, replication_factor: int, timeout_s: float = 30.0
    ) -> list[str]:
        """Create the missing single-partition topics; return those created.

        Safe when several instances race: "already exists" is success.
        """

        def create() -> list[str]:
            existing = set(self._admin.list_topics(timeout=timeout_s).topics)
            missing = [t for t in topics if t not in existing]
            if not missing:
                return []
            futures = self._admin.create_topics(
                [
                    NewTopic(t, num_partitions=1, replication_factor=replication_factor)
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


class PartitionConsumer:
    """Reads one chat partition's topic into trio, from a chosen offset."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        *,
        fetch_wait_max_ms: int,
        limiter: trio.CapacityLimiter,
        batch_max: int = 500,
    ) -> None:
        self.topic = topic
        self.group = group
        self._settings = consumer_settings(bootstrap, group, fetch_wait_max_ms=fetch_wait_max_ms)
        self._limiter = limiter
        self._batch_max = batch_max
        self._consumer: Consumer | None = None
        self._watermarks: tuple[int, int] | None = None  # written by the poll thread only

    def __repr__(self) -> str:
        return f"<PartitionConsumer {self.topic} {self.group}>"

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def open(self, timeout_s: float = 10.0) -> int:
        """Create the consumer and assign it at the committed offset.

        Returns the first offset it will read (the log end when nothing was
        committed yet).
        """
        consumer = Consumer(self._settings)
        self._consumer = consumer
        tp = TopicPartition(self.topic, 0)
        try:
            committed = await self._thread(lambda: consumer.committed([tp], timeout=timeout_s))
            start = committed[0].offset
            if start < 0:
                _low, high = await self.watermarks(timeout_s)
                start = high
        except KafkaException as exc:
            await self.close()
            raise KafkaUnavailable(f"{self.topic}: {exc}") from exc
        consumer.assign([TopicPartition(self.topic, 0, start if start >= 0 else OFFSET_END)])
        return start

    async def watermarks(self, timeout_s: float = 5.0) -> tuple[int, int]:
        """(low, high): the oldest retained offset and the offset the next record gets."""
        consumer = self._consumer
        assert consumer is not None
        tp = TopicPartition(self.topic, 0)
        try:
            low, high = await self._thread(
                lambda: consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            )
        except KafkaException as exc:
            raise KafkaUnavailable(f"{self.topic}: {exc}") from exc
        return int(low), int(high)

    def cached_watermarks(self) -> tuple[int, int]:
        """(low, high) as last seen by fetches: no broker round trip, no waiting.

        Read from what the poll thread recorded: any call on the consumer from
        another thread would wait for the poll in progress.
        """
        if self._consumer is None:
            raise KafkaUnavailable("consumer is closed")
        if self._watermarks is None:
            raise KafkaUnavailable("no fetch answered yet")
        return self._watermarks

    def _poll_batch(self) -> list[Record]:
        # Block briefly for the first record, then take what is already there.
        consumer = self._consumer
        assert consumer is not None
        first = consumer.poll(0.1)
        low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, 0), cached=True)
        if high >= 0:
            self._watermarks = (int(low), int(high))
        if first is None:
            return []
        messages = [first, *consumer.consume(self._batch_max - 1, 0)]
        batch = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("kafka_consumer_error", extra={"topic": self.topic, "error": err.str()})
                continue
            _ts_type, ts = m.timestamp()
            offset = m.offset()
            if offset is not None:
                batch.append(Record(offset=offset, value=m.value(), timestamp_ms=ts))
        return batch

    async def records(self, send: trio.MemorySendChannel[list[Record]]) -> None:
        """Feed batches into ``send`` until cancelled (bounded by the channel)."""
        while True:
            # Not abandoned on cancel: the poll returns within 0.1 s, and
            # closing the consumer while a thread polls it is not safe.
            batch = await self._thread(self._poll_batch)
            if batch:
                await send.send(batch)

    async def commit(self, next_offset: int, timeout_s: float = 5.0) -> None:
        """Record where the next owner's live tail should start (a hint)."""
        consumer = self._consumer
        assert consumer is not None
        tp = TopicPartition(self.topic, 0, next_offset)

        def commit() -> None:
            consumer.commit(offsets=[tp], asynchronous=False)

        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
            try:
                await self._thread(commit)
            except KafkaException as exc:
                log.warning("kafka_commit_failed", extra={"topic": self.topic, "error": str(exc)})

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with trio.CancelScope(shield=True):
                await self._thread(consumer.close)
