"""A partition's feed handing fetched batches to its delivery (kafka.TopicFeed), without a broker."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from linechatd.kafka import KafkaFetcher, Record, TopicFeed


class _Fetcher:
    """The one thing a feed asks of its fetcher: commands (resume)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, TopicFeed]] = []

    def _command(self, what: str, feed: TopicFeed) -> None:
        self.commands.append((what, feed))


def _feed(start: int = 0, limit: int = 100) -> TopicFeed:
    return TopicFeed(cast(KafkaFetcher, _Fetcher()), "topic-0", start, limit)


def _records(*offsets: int) -> list[Record]:
    return [Record(o, b"k", b"v%d" % o, 0) for o in offsets]


async def test_deliver_hands_what_is_buffered_first_then_each_batch_as_it_is_pushed() -> None:
    feed = _feed()
    feed._push(_records(0, 1), 1.0)
    got: list[tuple[list[int], float, trio.lowlevel.Task]] = []

    def handle(batch: list[Record], fetched_at: float) -> None:
        got.append(([r.offset for r in batch], fetched_at, trio.lowlevel.current_task()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.deliver, handle)
        await trio.testing.wait_all_tasks_blocked()
        assert [(o, t) for o, t, _ in got] == [([0, 1], 1.0)]
        # Handed over right in the push (the fetcher's hand-over), by the caller's task.
        feed._push(_records(2), 2.0)
        feed._push(_records(2, 3), 3.0)  # 2 again: dropped
        me = trio.lowlevel.current_task()
        assert got[1:] == [([2], 2.0, me), ([3], 3.0, me)]
        assert feed.buffered == 0
        nursery.cancel_scope.cancel()
    # Cancelled: batches are buffered again, for a later reader.
    feed._push(_records(4), 4.0)
    assert feed.buffered == 1
    assert [r.offset for r in await feed.receive()] == [4]


async def test_an_exception_of_the_handler_is_raised_by_deliver_not_in_the_hand_over() -> None:
    feed = _feed()
    calls = 0

    def handle(batch: list[Record], fetched_at: float) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("delivery bug")

    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed.deliver, handle)
            await trio.testing.wait_all_tasks_blocked()
            feed._push(_records(0), 1.0)  # must not raise here
            feed._push(_records(1), 2.0)  # nothing more is handed to it
            with trio.fail_after(10):
                await trio.sleep_forever()  # until deliver() raises
    [error] = raised.value.exceptions
    assert isinstance(error, RuntimeError) and str(error) == "delivery bug"
    assert calls == 1
    assert feed.buffered == 1


async def test_a_paused_topic_is_resumed_once_delivery_has_caught_up() -> None:
    feed = _feed(limit=4)
    fetcher = cast(Any, feed._fetcher)
    # The fetch thread handed 4 records and paused the topic.
    feed._handed, feed._pauses = 4, 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.deliver, lambda batch, at: None)
        await trio.testing.wait_all_tasks_blocked()
        feed._push(_records(0, 1, 2), 1.0)
        assert fetcher.commands == [("resume", feed)]
        feed._push(_records(3), 2.0)
        assert fetcher.commands == [("resume", feed)]  # asked once per pause
        nursery.cancel_scope.cancel()


async def test_a_failing_handler_in_the_real_hand_over_ends_only_its_delivery() -> None:
    """The fetcher hands over with run_sync_soon (trio's system task), where an
    escaping exception would end the whole run."""
    feed = _feed()

    def handle(batch: list[Record], fetched_at: float) -> None:
        raise RuntimeError("delivery bug")

    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed.deliver, handle)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.current_trio_token().run_sync_soon(feed._push, _records(0), 1.0)
            with trio.fail_after(10):
                await trio.sleep_forever()  # until deliver() raises
    [error] = raised.value.exceptions
    assert isinstance(error, RuntimeError)


async def test_a_failure_after_the_cancel_is_logged_not_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed = _feed()

    def handle(batch: list[Record], fetched_at: float) -> None:
        raise RuntimeError("delivery bug")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.deliver, handle)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
        # Before deliver()'s task has run again: it still holds the handler.
        feed._push(_records(0), 1.0)
    assert [r.getMessage() for r in caplog.records] == ["feed_delivery_failed"]


async def test_records_buffered_while_paused_ask_for_the_resume_as_delivery_begins() -> None:
    feed = _feed(limit=4)
    fetcher = cast(Any, feed._fetcher)
    feed._push(_records(0, 1, 2, 3), 1.0)
    feed._handed, feed._pauses = 4, 1  # the fetch thread paused the full topic
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.deliver, lambda batch, at: None)
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher.commands == [("resume", feed)]
        nursery.cancel_scope.cancel()


async def test_one_feed_is_delivered_to_one_handler_at_a_time() -> None:
    feed = _feed()
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.deliver, lambda batch, at: got.extend(r.offset for r in batch))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already being delivered"):
            await feed.deliver(lambda batch, at: None)
        feed._push(_records(0), 1.0)  # still reaches the first
        assert got == [0]
        nursery.cancel_scope.cancel()
