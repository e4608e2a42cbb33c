"""The simulated ZooKeeper agrees with the real one.

One script, run twice through the product's own control plane (balancer,
supervisor, partition lifecycle, ownership view, with Kafka faked as in the
simulator): once against benchmarks/scale's in-memory ZooKeeper in virtual
time, once against the test session's real ZooKeeper through zk.py and
kazoo. After every step, once every instance holds its quota, the partition
-> instance map is recorded; the two sequences must be the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio
import trio.testing
from support.cluster import ClusterNames

from benchmarks.scale.cluster import Settings, SimInstance
from benchmarks.scale.observer import Observer
from benchmarks.scale.simzk import ServerStats, SimEnsemble, SimZooKeeper
from linechatd.balancer import Member
from linechatd.zk import ZooKeeper, ZooKeeperClient

PARTITIONS = 16
SESSION_TIMEOUT_S = 4.0
STEP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Step:
    action: str  # start, drain, reload (cap), stop
    instance: str
    cap: int = 0


SCRIPT = [
    Step("start", "gw-0"),
    Step("start", "gw-1"),
    Step("start", "gw-2"),
    Step("start", "gw-3"),
    Step("start", "gw-4"),
    Step("drain", "gw-2"),
    Step("reload", "gw-0", cap=2),
    Step("stop", "gw-4"),
    Step("start", "gw-2"),
]


async def run_script(
    settings: Settings, make_zk: Callable[[str], ZooKeeperClient], observer: Observer
) -> list[dict[int, str]]:
    """The partition -> instance map after each step of SCRIPT, once it settled."""
    instances: dict[str, SimInstance] = {}
    snapshots: list[dict[int, str]] = []

    def settled() -> bool:
        running = [i for i in instances.values() if not i.ctx.draining.is_set()]
        return observer.unowned == 0 and all(
            len(i.supervisor.held()) == i.balancer.target() for i in running
        )

    observer.attach()
    try:
        async with trio.open_nursery() as nursery:
            for step in SCRIPT:
                if step.action == "start":
                    sim = SimInstance(step.instance, settings, make_zk(step.instance), observer)
                    instances[step.instance] = sim
                    nursery.start_soon(sim.run)
                    with trio.fail_after(STEP_TIMEOUT_S):
                        await sim.ready.wait()
                elif step.action == "drain":
                    sim = instances.pop(step.instance)
                    sim.drain()
                    with trio.fail_after(STEP_TIMEOUT_S):
                        await sim.stopped.wait()
                elif step.action == "reload":
                    instances[step.instance].reload(weight=1.0, cap=step.cap)
                else:
                    sim = instances.pop(step.instance)
                    sim.stop()
                    with trio.fail_after(STEP_TIMEOUT_S):
                        await sim.stopped.wait()
                observer.set_members({i: s.member for i, s in instances.items()})
                with trio.fail_after(STEP_TIMEOUT_S):
                    while not settled():
                        await observer.changed.wait_transition()
                assert observer.violations == []
                snapshot = {k: owner for k, owner in enumerate(observer.serving) if owner}
                snapshots.append(snapshot)
            nursery.cancel_scope.cancel()
    finally:
        observer.detach()
    return snapshots


def settings_for(cluster: str) -> Settings:
    return Settings(
        partitions=PARTITIONS,
        session_timeout_s=SESSION_TIMEOUT_S,
        rebalance_pause_s=0.05,
        settle_s=0.3,
        drain_stagger_s=0.1,
        cluster=cluster,
    )


def simulated(cluster: str) -> list[dict[int, str]]:
    settings = settings_for(cluster)

    async def main() -> list[dict[int, str]]:
        ensemble = SimEnsemble(seed=1)
        observer = Observer(PARTITIONS, "topic-", ensemble.stats)
        async with trio.open_nursery() as nursery:
            await nursery.start(ensemble.run)

            def make_zk(instance: str) -> ZooKeeperClient:
                return SimZooKeeper(ensemble, session_timeout_s=SESSION_TIMEOUT_S, name=instance)

            snapshots = await run_script(settings, make_zk, observer)
            nursery.cancel_scope.cancel()
        return snapshots

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def real(cluster: str, hosts: str) -> list[dict[int, str]]:
    settings = settings_for(cluster)

    def make_zk(_instance: str) -> ZooKeeperClient:
        return ZooKeeper(hosts, session_timeout_s=SESSION_TIMEOUT_S, connect_timeout_s=10)

    async def main() -> list[dict[int, str]]:
        with trio.fail_after(len(SCRIPT) * STEP_TIMEOUT_S):
            return await run_script(
                settings, make_zk, Observer(PARTITIONS, "topic-", ServerStats())
            )

    return trio.run(main)


def test_the_simulated_zookeeper_gives_the_same_owners_as_the_real_one(
    zookeeper_hosts: str, cluster_names: ClusterNames
) -> None:
    expected = simulated(cluster_names.cluster)
    got = real(cluster_names.cluster, zookeeper_hosts)
    assert len(expected) == len(SCRIPT)
    for step, want, have in zip(SCRIPT, expected, got, strict=True):
        assert have == want, f"after {step}: real {have} != simulated {want}"
    # The script does move partitions: the comparison is not a trivial one.
    assert len({tuple(sorted(s.items())) for s in expected}) == len(SCRIPT)
    assert set(expected[-1].values()) == {"gw-0", "gw-1", "gw-2", "gw-3"}
    assert Member() == Member(weight=1.0, max_partitions=0)
