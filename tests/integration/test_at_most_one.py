"""At most one owner per partition, shown under a seeded storm of failures.

Four instances, each talking to ZooKeeper through its own FaultProxy. A seeded
random sequence of actions (SIGTERM, SIGKILL, restart, cutting or
blackholing one instance's ZooKeeper connection for a random while) runs for
a bounded time. Afterwards every instance's own reports (partition_started /
partition_stopped in its JSON log, wall-clock ``ts``) are turned into
intervals during which it ran a partition's subtree; no two processes may
have run the same partition at overlapping times. A SIGKILLed process ran its
partitions, as far as we know, until we saw it dead. Once the cluster is
whole again, every partition must have an owner within OWNED_WITHIN_S.

LINECHAT_TEST_SEED_AT_MOST_ONE (or LINECHAT_CHAOS_SEED, or LINECHAT_TEST_SEED)
replays another sequence (the seed is printed; see support/seeds.py).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import trio
from support.cluster import ClusterNames, GatewayProcess, merge_sections, start_cluster
from support.faultproxy import FaultProxy
from support.leasekit import FAST_SECTIONS, covers, wait_held
from support.seeds import seeded_random

INSTANCES = 4
PARTITIONS = 8
SESSION_TIMEOUT_S = 2.0
CHAOS_S = 25.0
# Cluster whole again -> every partition owned: a dead session expires within
# T, its partitions are taken at once after that (plus a balancer recheck).
OWNED_WITHIN_S = 2 * SESSION_TIMEOUT_S + 5.0
DEFAULT_SEED = 20261130
RESTART_MARK = "----- restarted -----"


@dataclass
class Interval:
    process: str  # instance id and incarnation, e.g. "gw-2#1"
    partition: int
    epoch: int
    start: float
    end: float = math.inf


@dataclass
class Tracked:
    """One instance across its restarts, as the test drives it."""

    gateway: GatewayProcess
    proxy: FaultProxy
    incarnations: int = 1
    deaths: list[float] = field(default_factory=list)  # when we saw each incarnation dead
    expected_exit: bool = False
    unexpected: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.gateway.instance_id

    def healthy(self) -> bool:
        return self.gateway.is_running() and self.proxy.mode.value == "pass"

    def check(self) -> None:
        """Note the current incarnation's death, the first time it is seen."""
        if len(self.deaths) < self.incarnations and not self.gateway.is_running():
            self.deaths.append(time.time())
            code = self.gateway.returncode
            if not self.expected_exit:
                self.unexpected.append(f"{self.name} exited with {code} unasked")
            elif code not in (0, -signal.SIGKILL, -signal.SIGTERM):
                # (-SIGTERM: asked to stop while still starting, before the
                # gateway handles signals; it held nothing yet.)
                self.unexpected.append(f"{self.name} exited with {code}")
            self.expected_exit = False

    def start(self) -> None:
        self.check()
        self.proxy.restore()
        self.gateway.start()
        self.incarnations += 1


async def _watch_exits(tracked: Tracked) -> None:
    while True:
        tracked.check()
        await trio.sleep(0.01)


def intervals_of(tracked: Tracked) -> list[Interval]:
    """What the instance's own log says it ran, incarnation by incarnation."""
    text = tracked.gateway.log_text()
    result: list[Interval] = []
    for incarnation, chunk in enumerate(text.split(RESTART_MARK)):
        death = tracked.deaths[incarnation] if incarnation < len(tracked.deaths) else math.inf
        process = f"{tracked.name}#{incarnation}"
        open_: dict[int, Interval] = {}
        for line in chunk.splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # cut short by SIGKILL
            name = event.get("event")
            if name == "partition_started":
                k = event["partition"]
                assert k not in open_, f"{process} started {k} twice"
                open_[k] = Interval(process, k, event["epoch"], event["ts"])
            elif name == "partition_stopped":
                interval = open_.pop(event["partition"])
                interval.end = event["ts"]
                result.append(interval)
        for interval in open_.values():
            interval.end = death  # ran until it died, as far as anyone can tell
            result.append(interval)
    return result


def overlaps(intervals: list[Interval]) -> list[str]:
    by_partition: dict[int, list[Interval]] = defaultdict(list)
    for interval in intervals:
        by_partition[interval.partition].append(interval)
    problems = []
    for k, runs in sorted(by_partition.items()):
        runs.sort(key=lambda i: i.start)
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                if a.process != b.process and b.start < a.end:
                    problems.append(
                        f"partition {k}: {a.process} (epoch {a.epoch}) ran until "
                        f"{a.end:.3f}, {b.process} (epoch {b.epoch}) started at {b.start:.3f}"
                    )
        epochs = [run.epoch for run in runs]
        if epochs != sorted(epochs):
            problems.append(f"partition {k}: epochs not growing in start order: {epochs}")
    return problems


async def test_at_most_one_instance_runs_each_partition(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
    nursery: trio.Nursery,
) -> None:
    rng = seeded_random("at_most_one", DEFAULT_SEED, aliases=("LINECHAT_CHAOS_SEED",))
    proxies: list[FaultProxy] = [
        await nursery.start(FaultProxy.to(zookeeper_hosts).run) for _ in range(INSTANCES)
    ]
    sections = merge_sections(
        FAST_SECTIONS,
        {
            "zookeeper": {"session_timeout": SESSION_TIMEOUT_S},
            "shutdown": {"grace_period_s": 3.0},
        },
    )
    with trio.fail_after(85):
        async with start_cluster(
            INSTANCES,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=PARTITIONS,
            sections=sections,
            per_instance=lambda i: {"zookeeper": {"hosts": proxies[i].address}},
        ) as cluster:
            fleet = [Tracked(g, p) for g, p in zip(cluster.instances, proxies, strict=True)]
            async with trio.open_nursery() as chaos:
                for tracked in fleet:
                    chaos.start_soon(_watch_exits, tracked)
                await wait_held(cluster, covers(PARTITIONS))
                actions = await _storm(rng, fleet, chaos)
                print(f"{len(actions)} actions: " + ", ".join(actions))

                # Whole again: every link restored, every instance running.
                for tracked in fleet:
                    tracked.proxy.restore()
                for tracked in fleet:
                    if tracked.expected_exit:  # asked to stop, maybe not yet gone
                        await tracked.gateway.wait_exit(15)
                    if not tracked.gateway.is_running():
                        tracked.start()
                for tracked in fleet:
                    await tracked.gateway.wait_ready()
                whole_at = time.monotonic()
                await wait_held(cluster, covers(PARTITIONS), timeout=OWNED_WITHIN_S + 5)
                owned_after = time.monotonic() - whole_at
                print(
                    f"cluster whole -> every partition owned after {owned_after:.3f} s "
                    f"(bound {OWNED_WITHIN_S:g} s)"
                )
                assert owned_after <= OWNED_WITHIN_S

                for tracked in fleet:
                    tracked.expected_exit = True
                await cluster.stop_all()
                for tracked in fleet:
                    tracked.check()
                chaos.cancel_scope.cancel()

    intervals = [interval for tracked in fleet for interval in intervals_of(tracked)]
    moves = len(intervals)
    print(f"{moves} partition runs observed across {sum(len(t.deaths) for t in fleet)} exits")
    assert moves > PARTITIONS, "the storm moved nothing"
    assert not [problem for tracked in fleet for problem in tracked.unexpected]
    problems = overlaps(intervals)
    assert not problems, "\n".join(problems)


async def _storm(rng: random.Random, fleet: list[Tracked], chaos: trio.Nursery) -> list[str]:
    """Random actions until CHAOS_S is over; always at least one healthy instance."""
    actions: list[str] = []
    deadline = time.monotonic() + CHAOS_S

    async def restore_later(proxy: FaultProxy, after: float) -> None:
        await trio.sleep(after)
        proxy.restore()

    while time.monotonic() < deadline:
        await trio.sleep(rng.uniform(0.3, 1.8))
        healthy = [t for t in fleet if t.healthy()]
        stopped = [t for t in fleet if not t.gateway.is_running()]
        choices = ["start"] if stopped else []
        if len(healthy) > 1:
            choices += ["sigterm", "sigkill", "cut", "blackhole", "cut", "blackhole"]
        if not choices:
            continue
        action = rng.choice(choices)
        if action == "start":
            tracked = rng.choice(stopped)
            tracked.start()
        else:
            tracked = rng.choice(healthy)
            if action == "sigterm":
                tracked.expected_exit = True
                tracked.gateway.terminate()
            elif action == "sigkill":
                tracked.expected_exit = True
                tracked.gateway.kill()
            else:
                # From a blip the session survives to well past its expiry.
                outage = rng.uniform(0.2, 2.5 * SESSION_TIMEOUT_S)
                getattr(tracked.proxy, action)()
                chaos.start_soon(restore_later, tracked.proxy, outage)
                action += f"({outage:.1f}s)"
        actions.append(f"{action} {tracked.name}")
    return actions


def test_the_overlap_check_sees_two_owners() -> None:
    """The observer's own check, on made-up runs."""
    clean = [
        Interval("gw-0#0", 1, 10, 100.0, 105.0),
        Interval("gw-1#0", 1, 12, 105.5, 109.0),
        Interval("gw-1#0", 1, 12, 109.5, math.inf),  # the same lease re-taken after a blip
        Interval("gw-2#0", 2, 11, 100.0, 101.0),
    ]
    assert overlaps(clean) == []
    problems = overlaps([*clean, Interval("gw-3#1", 1, 14, 104.9, 105.2)])
    assert (
        "partition 1: gw-0#0 (epoch 10) ran until 105.000, gw-3#1 (epoch 14) started at 104.900"
        in problems
    )
    older_epoch_later = [
        Interval("gw-0#0", 3, 20, 100.0, 101.0),
        Interval("gw-1#0", 3, 19, 102.0, 103.0),
    ]
    assert overlaps(older_epoch_later) == [
        "partition 3: epochs not growing in start order: [20, 19]"
    ]
