"""What the parts of one gateway instance share, passed explicitly (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

import trio
from trio_util import AsyncValue

from .auth import Authenticator
from .config import Config
from .kafka import GroupOffsetsPool, KafkaAdmin, KafkaFetcher, KafkaProducer
from .metrics import Metrics
from .ownership import InstanceInfo, OwnershipCache, ZkPaths
from .zk import ZooKeeperClient


@dataclass(frozen=True)
class Context:
    # The running configuration; replaced as a whole by a successful reload.
    config: AsyncValue[Config]
    auth: AsyncValue[Authenticator]
    info: InstanceInfo
    paths: ZkPaths
    zk: ZooKeeperClient
    cache: OwnershipCache
    producer: KafkaProducer
    # The one consumer fetching every held partition's topic.
    fetcher: KafkaFetcher
    # Topics, metadata, end offsets.
    admin: KafkaAdmin
    # Each held partition's consumer group offsets (consumer-group-k).
    offsets: GroupOffsetsPool
    metrics: Metrics
    # Bounds the threads that block in the replay consumers' librdkafka calls.
    consumer_limiter: trio.CapacityLimiter
    # Set once a drain starts: no new sockets, no new leases.
    draining: trio.Event

    @property
    def partitions(self) -> int:
        return self.config.value.cluster.partitions

    def topic(self, k: int) -> str:
        return f"{self.config.value.kafka.topic_prefix}{k}"

    def group(self, k: int) -> str:
        return f"{self.config.value.kafka.group_prefix}{k}"
