"""Kafka replaced by fakes that only take time and record what the control plane did.

The simulator runs the product's control plane (balancer, supervisor,
partition lifecycle, ownership cache) for real; Kafka is not part of the
question. A partition subtree needs a committed offset, an end offset, an
assignment on the fetcher and a last commit: these fakes answer after a fixed
delay (the figures measured against the test broker, see REFERENCE.md: a
committed-offset lookup ~5 ms) and report every assignment and commit to the
:class:`~benchmarks.scale.observer.Observer`, which checks that no two
instances ever consume one partition's topic at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import trio

if TYPE_CHECKING:
    from linechatd.kafka import Record

    from .observer import Observer


@dataclass(frozen=True)
class KafkaTiming:
    """How long the fake broker takes (seconds)."""

    admin_s: float = 0.005  # committed offset, end offset, commit
    assign_s: float = 0.010  # until the fetch thread has assigned a topic


class FakeAdmin:
    """``KafkaAdmin``'s calls that the control plane makes: none but a health check."""

    async def check(self, timeout_s: float = 5.0) -> None:
        return None


class FakeOffsets:
    """``GroupOffsets``: one partition's committed offset, end offset and commit."""

    def __init__(self, instance: str, topic: str, observer: Observer, timing: KafkaTiming) -> None:
        self._instance = instance
        self._topic = topic
        self._observer = observer
        self._timing = timing

    async def committed(self, timeout_s: float = 10.0) -> int:
        await trio.sleep(self._timing.admin_s)
        return self._observer.committed.get(self._topic, -1)

    async def end_offset(self, timeout_s: float = 10.0) -> int:
        await trio.sleep(self._timing.admin_s)
        return 0

    async def commit(self, offset: int, timeout_s: float = 5.0) -> None:
        self._observer.on_commit(self._instance, self._topic, offset)
        await trio.sleep(self._timing.admin_s)


class FakeOffsetsPool:
    """``GroupOffsetsPool.of``: one :class:`FakeOffsets` per partition."""

    def __init__(
        self, instance: str, topic_prefix: str, observer: Observer, timing: KafkaTiming
    ) -> None:
        self._instance = instance
        self._topic_prefix = topic_prefix
        self._observer = observer
        self._timing = timing

    def of(self, partition: int) -> FakeOffsets:
        topic = f"{self._topic_prefix}{partition}"
        return FakeOffsets(self._instance, topic, self._observer, self._timing)


class FakeFeed:
    """An assigned topic that never delivers a record."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    def cached_watermarks(self) -> tuple[int, int]:
        return (0, 0)

    async def deliver(self, handle: Callable[[list[Record], float], object]) -> NoReturn:
        await trio.sleep_forever()


class FakeFetcher:
    """``KafkaFetcher.assignment``: records the start and the end of each assignment."""

    def __init__(self, instance: str, observer: Observer, timing: KafkaTiming) -> None:
        self._instance = instance
        self._observer = observer
        self._timing = timing

    @asynccontextmanager
    async def assignment(
        self, topic: str, start: int, timeout_s: float = 10.0
    ) -> AsyncIterator[FakeFeed]:
        await trio.sleep(self._timing.assign_s)
        self._observer.on_assign(self._instance, topic)
        try:
            yield FakeFeed(topic)
        finally:
            self._observer.on_unassign(self._instance, topic)
