"""The scale simulator's own checks: the product's control plane in virtual time.

Every run checks at each change that no two instances serve a partition, or
consume its topic, at once (a violation raises). Seeds: ``SCALE_SEED`` (the
first) and ``SCALE_SEEDS`` (how many) from the environment; each test prints
the seeds it ran.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from benchmarks.scale.cluster import Settings
from benchmarks.scale.observer import PhaseResult
from benchmarks.scale.scenarios import SCENARIOS, RunOptions, Simulation, simulate
from linechatd.zk import HEARTBEAT_EVERY

FIRST_SEED = int(os.environ.get("SCALE_SEED", "1"))
SEEDS = int(os.environ.get("SCALE_SEEDS", "8"))


def run(options: RunOptions) -> Simulation:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(simulate, options, clock=clock)


def by_name(sim: Simulation) -> dict[str, PhaseResult]:
    return {r.name: r for r in sim.results}


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
def test_every_scenario_keeps_one_owner_and_ends_balanced(seed: int) -> None:
    print(f"seed {seed} (SCALE_SEED={seed} SCALE_SEEDS=1 to run it alone)")
    sim = run(
        RunOptions(
            instances=6,
            settings=Settings(partitions=24),
            scenarios=SCENARIOS,
            seed=seed,
            start_spread_s=2.0,
            balance_timeout_s=300.0,
        )
    )
    assert sim.observer.violations == []
    phases = by_name(sim)
    assert set(phases) == set(SCENARIOS)
    for result in sim.results:
        assert result.balanced_after_s is not None, f"{result.name} never balanced"
    # What must not move, does not; what must, moves once.
    assert phases["zk-pause"].moved == 0
    assert phases["zk-pause"].retaken == 24
    for name in ("cold-start", "drain", "crash"):
        assert phases[name].moved == phases[name].min_moves, name
    # An owner cut from the broker keeps its partitions for unhealthy_release_s
    # (a blip must not move them), then every one of them moves, once.
    zombie = phases["zombie"]
    assert zombie.extra["victims_held"] > 0
    assert zombie.moved == zombie.extra["victims_held"]
    assert zombie.balanced_after_s is not None
    assert 15.0 <= zombie.balanced_after_s < 15.0 + 3.0
    # A crashed instance's partitions wait for its session to expire, no longer:
    # T after its last request, which came at most a heartbeat before the crash.
    crash = phases["crash"]
    assert crash.balanced_after_s is not None
    assert 10.0 * (1 - HEARTBEAT_EVERY) <= crash.balanced_after_s < 10.0 + 1.0


def test_fifty_instances_and_256_partitions() -> None:
    """The CI-sized run: cold start, drains, a crash and a ZooKeeper pause."""
    sim = run(
        RunOptions(
            instances=50,
            settings=Settings(partitions=256),
            scenarios=("cold-start", "drain", "crash", "zk-pause"),
            seed=FIRST_SEED,
            balance_timeout_s=300.0,
        )
    )
    assert sim.observer.violations == []
    phases = by_name(sim)
    for result in sim.results:
        assert result.balanced_after_s is not None, result.name
        assert result.moved <= result.min_moves, (result.name, result.moved, result.min_moves)
    cold = phases["cold-start"]
    assert cold.moved == 256
    # Per instance the view log's listing and the publisher node (the view
    # publisher: not always, its own watch fired when it created the node);
    # the publisher's watches of the instances directory and of each
    # registration; one per lease. Not one per registration per instance.
    publisher = 50 + 1
    assert 50 + 49 + publisher + 256 <= cold.watches_end <= 2 * 50 + publisher + 256
    assert phases["zk-pause"].moved == 0
    # The views stand still while ZooKeeper does not answer; a partition taken
    # just before the pause must not look free for long enough, after it, for
    # everyone to try it (43 failed creates here before the fallback age
    # counted only trusted time).
    assert phases["zk-pause"].failed_writes == 0
