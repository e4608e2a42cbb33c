"""Simulated gateway instances: the product's control plane on a simulated ZooKeeper.

Each :class:`SimInstance` is built like ``gateway._start_infrastructure`` and
``Instance.run`` build a real one: a ZooKeeper session (here a
:class:`~benchmarks.scale.simzk.SimZooKeeper`), the cluster's records, the
ownership cache, the partition supervisor and the balancer, with the real
``Metrics`` and ``Config``; a drain runs ``Balancer.drain`` under the grace
period with the staggering ``Instance._drain`` uses, a reload replaces the
``partitions`` section and calls ``Balancer.reconfigure`` as ``Instance.reload``
does. Only Kafka (:mod:`~benchmarks.scale.fakes`) and the WebSocket and HTTP
listeners are left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import trio
from trio_util import AsyncValue

from linechatd.auth import Authenticator
from linechatd.balancer import Balancer, Member, drain_stagger
from linechatd.config import Config, parse_config
from linechatd.context import Context
from linechatd.gateway import ensure_cluster
from linechatd.metrics import Metrics
from linechatd.ownership import InstanceInfo, OwnershipCache, ZkPaths
from linechatd.partitions import PartitionSupervisor
from linechatd.zk import ZooKeeperClient, ZooKeeperError

from .fakes import FakeAdmin, FakeFetcher, FakeOffsetsPool, KafkaTiming
from .observer import Observer, current_instance
from .simzk import SimZooKeeper

CLUSTER = "sim"
TOPIC_PREFIX = "topic-"


@dataclass(frozen=True)
class Settings:
    """What every simulated instance is configured with (product defaults unless said)."""

    partitions: int
    session_timeout_s: float = 10.0
    rebalance_pause_s: float = 0.2
    settle_s: float = 2.0
    drain_stagger_s: float = 0.5
    grace_period_s: float = 30.0
    kafka: KafkaTiming = KafkaTiming()
    cluster: str = CLUSTER  # another name to share a real ZooKeeper with others

    def config(self, instance: str, *, weight: float = 1.0, cap: int = 0) -> Config:
        return parse_config(
            {
                "cluster": {"name": self.cluster, "partitions": self.partitions},
                "instance": {"id": instance},
                "http": {"advertise": f"http://{instance}.sim:8080"},
                "websocket": {"advertise": f"ws://{instance}.sim:8765/ws"},
                "zookeeper": {"hosts": "zk.sim:2181", "session_timeout": self.session_timeout_s},
                "kafka": {"bootstrap_servers": "kafka.sim:9092", "topic_prefix": TOPIC_PREFIX},
                "partitions": {
                    "rebalance_pause_s": self.rebalance_pause_s,
                    "settle_s": self.settle_s,
                    "weight": weight,
                    "max_per_instance": cap,
                },
                "shutdown": {
                    "grace_period_s": self.grace_period_s,
                    "drain_stagger_s": self.drain_stagger_s,
                },
            }
        )


class SimInstance:
    """One gateway instance's control plane; ``run`` until drained, stopped or crashed."""

    def __init__(
        self,
        instance: str,
        settings: Settings,
        zk: ZooKeeperClient,
        observer: Observer,
        *,
        weight: float = 1.0,
        cap: int = 0,
    ) -> None:
        self.id = instance
        self.member = Member(weight=weight, max_partitions=cap)
        self._settings = settings
        config = settings.config(instance, weight=weight, cap=cap)
        self.zk = zk
        paths = ZkPaths(settings.cluster)
        info = InstanceInfo(instance, config.websocket.advertise, config.http.advertise)
        self.ctx = Context(
            config=AsyncValue(config),
            auth=AsyncValue(Authenticator(config.auth)),
            info=info,
            paths=paths,
            zk=self.zk,
            cache=OwnershipCache(self.zk, paths, settings.partitions, instance=instance),
            # Never used by the control plane (sessions produce, not partitions).
            producer=cast(Any, None),
            fetcher=cast(Any, FakeFetcher(instance, observer, settings.kafka)),
            admin=cast(Any, FakeAdmin()),
            offsets=cast(Any, FakeOffsetsPool(instance, TOPIC_PREFIX, observer, settings.kafka)),
            metrics=Metrics(),
            consumer_limiter=trio.CapacityLimiter(1),
            draining=trio.Event(),
        )
        self.supervisor = PartitionSupervisor(self.ctx)
        self.balancer = Balancer(self.ctx, self.supervisor)
        self.ready = trio.Event()
        self.stopped = trio.Event()
        self.startup_failed: str | None = None
        self._drain = trio.Event()
        self._scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<SimInstance {self.id} held={len(self.supervisor.held())}>"

    async def run(self) -> None:
        current_instance.set(self.id)
        ctx = self.ctx
        try:
            with self._scope:
                async with trio.open_nursery() as infra:
                    await infra.start(self.zk.run)
                    try:
                        await ensure_cluster(self.zk, ctx.paths, ctx.config.value)
                    except ZooKeeperError as exc:
                        # gateway.py: a StartupError, the process exits (systemd may
                        # start it again; here it stays gone).
                        self.startup_failed = str(exc)
                        infra.cancel_scope.cancel()
                        return
                    await infra.start(ctx.cache.run)
                    async with trio.open_nursery() as serving:
                        await serving.start(self.supervisor.run)
                        await serving.start(self.balancer.run)
                        self.ready.set()
                        await self._drain.wait()
                        await self._drained()
                        serving.cancel_scope.cancel()
                    infra.cancel_scope.cancel()
        finally:
            self.stopped.set()

    async def _drained(self) -> None:
        config = self.ctx.config.value
        grace = config.shutdown.grace_period_s
        stagger = drain_stagger(config.shutdown.drain_stagger_s, grace, len(self.supervisor.held()))
        with trio.move_on_after(grace):
            await self.balancer.drain(stagger_s=stagger)

    def drain(self) -> None:
        """SIGTERM: a graceful drain, then the process exits (its session closed)."""
        self._drain.set()

    def crash(self) -> None:
        """SIGKILL: the process is gone this instant; its session is left to expire."""
        assert isinstance(self.zk, SimZooKeeper), "only a simulated session can be left behind"
        self.zk.crash()
        self._scope.cancel()

    def stop(self) -> None:
        """Stopped without a drain: its session is closed, its leases freed at once."""
        self._scope.cancel()

    @property
    def sim_zk(self) -> SimZooKeeper:
        assert isinstance(self.zk, SimZooKeeper)
        return self.zk

    def set_kafka_reachable(self, reachable: bool) -> None:
        """What ``Instance._monitor`` concludes from its broker probes."""
        self.supervisor.registrar.kafka_healthy.value = reachable

    def reload(self, *, weight: float, cap: int) -> None:
        """SIGHUP with new share settings (what ``Instance.reload`` does for them)."""
        old = self.ctx.config.value
        partitions = dataclasses.replace(old.partitions, max_per_instance=cap, weight=weight)
        self.ctx.config.value = dataclasses.replace(old, partitions=partitions)
        self.member = Member(weight=weight, max_partitions=cap)
        self.balancer.reconfigure()
