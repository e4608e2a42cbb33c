"""The librdkafka adapter against the session's broker: the shared fetcher,
its per-topic bound, committed offsets through the admin client, and delivery
reports served on the trio thread in batches."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from support.cluster import ClusterNames

from linechatd.kafka import (
    REPORT_POLL_S,
    DeliveryReceipt,
    GroupOffsets,
    KafkaAdmin,
    KafkaFetcher,
    KafkaProducer,
    Record,
    TopicFeed,
)
from linechatd.localservices import free_port

WAIT_S = 30


async def _topics(admin: KafkaAdmin, names: ClusterNames, count: int) -> list[str]:
    topics = [f"{names.topic_prefix}{k}" for k in range(count)]
    await admin.ensure_topics(topics, replication_factor=1)
    return topics


async def _answered(receipts: list[DeliveryReceipt]) -> int:
    """Wait until every receipt is resolved, none with an error; how many polls answered them."""
    batches = 0
    done = trio.Event()

    def on_batch(_reported_after: float) -> None:
        nonlocal batches
        batches += 1
        if all(r.resolved for r in receipts):
            done.set()

    for receipt in receipts:
        receipt.on_batch = on_batch
    with trio.fail_after(WAIT_S):
        await done.wait()
    assert all(r.error is None for r in receipts), [r.error for r in receipts if r.error]
    return batches


async def _produce(producer: KafkaProducer, topic: str, values: list[bytes]) -> list[int]:
    """Send ``values`` in order; their offsets once every delivery report is in."""
    receipts = [producer.send(topic, b"k", v) for v in values]
    await _answered(receipts)
    return [r.offset for r in receipts]


@asynccontextmanager
async def _adapter(
    bootstrap: str, *, linger_ms: int = 1, **fetcher_options: int
) -> AsyncIterator[tuple[KafkaProducer, KafkaFetcher]]:
    """A running producer and fetcher, stopped when the block ends."""
    async with trio.open_nursery() as nursery:
        producer = await nursery.start(
            KafkaProducer(bootstrap, linger_ms=linger_ms, timeout_s=10).run
        )
        fetcher = await nursery.start(
            KafkaFetcher(bootstrap, "adapter-test", fetch_wait_max_ms=10, **fetcher_options).run
        )
        yield producer, fetcher
        nursery.cancel_scope.cancel()


async def _read(feed: TopicFeed, count: int) -> list[Record]:
    got: list[Record] = []
    with trio.fail_after(WAIT_S):
        while len(got) < count:
            got.extend(await feed.receive())
    return got


async def test_one_fetcher_serves_many_topics_each_from_its_own_offset(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    admin = KafkaAdmin(kafka_bootstrap)
    topics = await _topics(admin, cluster_names, 3)
    async with _adapter(kafka_bootstrap) as (producer, fetcher):
        offsets = {
            t: await _produce(producer, t, [f"{t}-{i}".encode() for i in range(5)]) for t in topics
        }
        async with (
            fetcher.assignment(topics[0], offsets[topics[0]][0]) as first,
            fetcher.assignment(topics[1], offsets[topics[1]][3]) as second,
        ):
            got_first = await _read(first, 5)
            got_second = await _read(second, 2)
            assert [r.value for r in got_first] == [f"{topics[0]}-{i}".encode() for i in range(5)]
            assert [r.offset for r in got_second] == offsets[topics[1]][3:]
            # Live records arrive too, and the watermarks follow them.
            [live] = await _produce(producer, topics[1], [b"live"])
            [record] = await _read(second, 1)
            assert (record.offset, record.value) == (live, b"live")
            # Set with the record's own batch, before it was handed over.
            assert second.cached_watermarks()[1] >= live + 1
        # Ended feeds refuse to pretend they still know the log.
        assert first.closed and second.closed


async def test_a_full_feed_pauses_its_topic_only_and_loses_nothing(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    admin = KafkaAdmin(kafka_bootstrap)
    slow_topic, busy_topic = await _topics(admin, cluster_names, 2)
    async with _adapter(kafka_bootstrap, linger_ms=5, batch_max=50, feed_limit=100) as (
        producer,
        fetcher,
    ):
        start = await admin.end_offset(slow_topic)
        busy_start = await admin.end_offset(busy_topic)
        async with (
            fetcher.assignment(slow_topic, start) as slow,
            fetcher.assignment(busy_topic, busy_start) as busy,
        ):
            await _produce(producer, slow_topic, [b"%d" % i for i in range(1000)])
            # Nobody reads the slow feed: it stops near its bound...
            with trio.fail_after(WAIT_S):
                while slow.buffered < 100:  # noqa: ASYNC110 - filled by the fetch thread
                    await trio.sleep(0.02)
            await _produce(producer, busy_topic, [b"%d" % i for i in range(300)])
            # ...while the other topic keeps flowing through the same fetcher.
            assert [r.value for r in await _read(busy, 300)] == [b"%d" % i for i in range(300)]
            assert slow.buffered <= 100 + 50, slow.buffered
            # Reading it resumes the fetch from where it paused: every record, once, in order.
            got = await _read(slow, 1000)
            assert [r.offset for r in got] == list(range(start, start + 1000))
            assert [r.value for r in got] == [b"%d" % i for i in range(1000)]


async def test_a_topic_can_be_assigned_again_from_another_offset(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    admin = KafkaAdmin(kafka_bootstrap)
    [topic] = await _topics(admin, cluster_names, 1)
    async with _adapter(kafka_bootstrap) as (producer, fetcher):
        offsets = await _produce(producer, topic, [b"%d" % i for i in range(10)])
        async with fetcher.assignment(topic, offsets[5]) as feed:
            assert [r.offset for r in await _read(feed, 5)] == offsets[5:]
        # Straight away, lower: nothing of the old assignment leaks into the new one.
        async with fetcher.assignment(topic, offsets[0]) as feed:
            assert [r.offset for r in await _read(feed, 10)] == offsets


async def test_committed_offsets_live_in_each_partitions_group(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    admin = KafkaAdmin(kafka_bootstrap)
    [topic] = await _topics(admin, cluster_names, 1)
    limiter = trio.CapacityLimiter(4)
    group = f"{cluster_names.group_prefix}0"
    mine = GroupOffsets(kafka_bootstrap, group, topic, limiter=limiter)
    other = GroupOffsets(kafka_bootstrap, f"{cluster_names.group_prefix}1", topic, limiter=limiter)
    try:
        assert await mine.committed() == -1
        await mine.commit(7)
        assert await mine.committed() == 7
        # A new reader of the group (the next owner) reads it back.
        again = GroupOffsets(kafka_bootstrap, group, topic, limiter=limiter)
        assert await again.committed() == 7
        await again.aclose()
        # Another group's commit is its own.
        assert await other.committed() == -1
        assert await mine.end_offset() == 0
        assert await admin.end_offset(topic) == 0
    finally:
        await mine.aclose()
        await other.aclose()


async def test_delivery_reports_answer_every_send_in_order(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    admin = KafkaAdmin(kafka_bootstrap)
    [topic] = await _topics(admin, cluster_names, 1)
    async with trio.open_nursery() as nursery:
        producer = await nursery.start(
            KafkaProducer(kafka_bootstrap, linger_ms=5, timeout_s=10).run
        )
        answered: list[int] = []
        all_answered = trio.Event()

        def answer(i: int) -> None:
            answered.append(i)
            if len(answered) == 500:
                all_answered.set()

        receipts = [producer.send(topic, b"k", b"%d" % i) for i in range(500)]
        for i, receipt in enumerate(receipts):
            receipt.on_resolved = functools.partial(answer, i)
        with trio.fail_after(WAIT_S):
            await all_answered.wait()
        assert answered == list(range(500))
        assert [r.offset for r in receipts] == list(
            range(receipts[0].offset, receipts[0].offset + 500)
        )
        assert all(r.error is None for r in receipts)
        nursery.cancel_scope.cancel()


def _parked(producer: KafkaProducer) -> bool:
    """Whether the report poller waits for a send (rather than on its timer)."""
    return producer._idle.statistics().tasks_waiting == 1


async def _burst(producer: KafkaProducer, topic: str, count: int) -> int:
    """Send ``count`` records at once; how many polls answered them all."""
    receipts = [producer.send(topic, b"k", b"%d" % i) for i in range(count)]
    # The first send woke the poller: it now waits on its timer, not in the park.
    await trio.testing.wait_all_tasks_blocked()
    assert not _parked(producer)
    return await _answered(receipts)


async def test_reports_are_answered_in_batches_and_again_after_idle(
    kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    """The trio thread polls for reports only while sends are unanswered:
    a burst is answered in a few batches, the poller then parks, and the
    next send wakes it."""
    admin = KafkaAdmin(kafka_bootstrap)
    [topic] = await _topics(admin, cluster_names, 1)
    async with trio.open_nursery() as nursery:
        producer = await nursery.start(
            KafkaProducer(kafka_bootstrap, linger_ms=5, timeout_s=10).run
        )
        for _round in range(3):
            # One call per poll that served some of them, not one per report.
            assert 1 <= await _burst(producer, topic, 200) < 50
            # Nothing is unanswered now: the poller parks until the next send.
            await trio.testing.wait_all_tasks_blocked()
            assert _parked(producer)
        nursery.cancel_scope.cancel()


async def test_an_unreachable_broker_is_noticed_while_idle_and_fails_sends() -> None:
    """Error callbacks are served by the idle poll too (readiness hears of an
    unreachable broker with no traffic), and a send that cannot be stored is
    answered with an error, not left waiting."""
    dead = f"127.0.0.1:{free_port()}"
    async with trio.open_nursery() as nursery:
        producer = await nursery.start(KafkaProducer(dead, linger_ms=1, timeout_s=2).run)
        with trio.fail_after(WAIT_S):
            while producer.last_unreachable == -math.inf:  # noqa: ASYNC110 - set by a callback
                await trio.sleep(0.05)
        receipt = producer.send("nowhere", b"k", b"v")
        answered = trio.Event()
        receipt.on_resolved = answered.set
        with trio.fail_after(WAIT_S):
            await answered.wait()
        assert receipt.error is not None
        nursery.cancel_scope.cancel()


@pytest.fixture
def still_clock() -> trio.testing.MockClock:
    """Trio's clock stands still unless the test moves it: no timer fires by itself."""
    return trio.testing.MockClock()


async def test_a_task_that_is_awake_serves_due_reports_instead_of_the_timer(
    kafka_bootstrap: str, cluster_names: ClusterNames, still_clock: trio.testing.MockClock
) -> None:
    """serve_due() does nothing before half the poll interval has passed; once
    it has, it answers what librdkafka holds and moves the timer on, so the
    timer (never reached here) is not what answers."""
    admin = KafkaAdmin(kafka_bootstrap)
    [topic] = await _topics(admin, cluster_names, 1)
    async with trio.open_nursery() as nursery:
        producer = await nursery.start(
            KafkaProducer(kafka_bootstrap, linger_ms=1, timeout_s=10).run
        )
        receipt = producer.send(topic, b"k", b"v")
        answered_in: list[trio.lowlevel.Task] = []
        receipt.on_resolved = lambda: answered_in.append(trio.lowlevel.current_task())
        # Real time for the broker's answer; trio's clock has not moved.
        await trio.to_thread.run_sync(time.sleep, 0.5)
        producer.serve_due()
        assert not receipt.resolved
        deadline = time.monotonic() + WAIT_S
        while not receipt.resolved:
            assert time.monotonic() < deadline, "the report never came"
            # Half an interval: due for serve_due(), short of the timer's deadline.
            still_clock.jump(REPORT_POLL_S / 2)
            producer.serve_due()
            # Each poll moved the timer on: it is never the one that answers.
            timer = producer._timer
            assert timer is not None and timer.deadline > trio.current_time()
            if not receipt.resolved:
                await trio.to_thread.run_sync(time.sleep, 0.01)
        assert receipt.error is None and receipt.offset >= 0
        assert answered_in == [trio.lowlevel.current_task()]
        nursery.cancel_scope.cancel()
