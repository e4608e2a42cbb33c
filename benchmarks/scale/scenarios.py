"""The scenarios: what happens to the cluster, phase by phase, in virtual time.

A run starts with a cold start of N instances, then goes through the chosen
scenarios in order, each a *phase* measured on its own, each starting from a
balanced cluster of N instances (a scenario that removes instances for good
is followed by an unmeasured step that brings the count back):

==================  ===========================================================
``cold-start``      N instances start, at random moments within a few seconds
``grow``            +10 %: new instances start within a few seconds
``drain``           -10 %: that many instances drain (SIGTERM) at once
``crash``           5 % are killed at once; their sessions expire after T
``zk-pause``        ZooKeeper answers nobody for 0.8 T (a leader election)
``reload``          10 % reload new share settings: half weight 2, half a cap of 2
``rolling-restart`` every instance, one by one: drain, restart, wait for balance
``isolate``         5 % lose ZooKeeper for 1.5 T (a network partition), then heal
``zombie``          5 % lose the broker (and keep ZooKeeper): after
                    ``kafka.unhealthy_release_s`` their partitions move to the others
``chaos``           a minute of random starts, drains, kills, network partitions,
                    connection resets, ZooKeeper pauses and reloads, without
                    waiting in between; then everything heals (for the tests)
==================  ===========================================================
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from linechatd.balancer import Member

from .cluster import TOPIC_PREFIX, Settings, SimInstance
from .observer import Observer, PhaseResult, Violation
from .report import row
from .simzk import Latency, SimEnsemble, SimZooKeeper

SCENARIOS = (
    "cold-start",
    "grow",
    "drain",
    "crash",
    "zk-pause",
    "reload",
    "isolate",
    "zombie",
    "rolling-restart",
    "chaos",
)


@dataclass(frozen=True)
class RunOptions:
    instances: int
    settings: Settings
    scenarios: tuple[str, ...] = SCENARIOS
    seed: int = 1
    latency: Latency = Latency()
    start_spread_s: float = 10.0  # a cold start's instances start within this
    balance_timeout_s: float = 600.0  # a phase that is not balanced by then ends unbalanced
    quiet_s: float = 5.0  # observed after balance, to see that it holds
    rolling_limit: int | None = None  # restart only this many (None: all)
    progress: bool = False  # print each phase's row as it ends


class Simulation:
    """The ensemble, the observer and the instances, with the operator's actions."""

    def __init__(self, options: RunOptions, nursery: trio.Nursery) -> None:
        self.options = options
        self.settings = options.settings
        self.rng = random.Random(options.seed)
        self.ensemble = SimEnsemble(latency=options.latency, seed=options.seed)
        self.observer = Observer(self.settings.partitions, TOPIC_PREFIX, self.ensemble.stats)
        self.instances: dict[str, SimInstance] = {}
        self._leaving: set[str] = set()
        self._nursery = nursery
        self._serial = 0
        self.results: list[PhaseResult] = []

    # -- membership ----------------------------------------------------------------

    def members(self) -> dict[str, Member]:
        """Who should hold partitions: running, not draining, not crashed."""
        return {i: s.member for i, s in self.instances.items() if i not in self._leaving}

    def new_id(self) -> str:
        self._serial += 1
        return f"gw-{self._serial:05d}"

    def start(self, instance: str, *, weight: float = 1.0, cap: int = 0) -> SimInstance:
        zk = SimZooKeeper(
            self.ensemble, session_timeout_s=self.settings.session_timeout_s, name=instance
        )
        sim = SimInstance(instance, self.settings, zk, self.observer, weight=weight, cap=cap)
        self.instances[instance] = sim
        self._leaving.discard(instance)
        self._nursery.start_soon(self._run, sim)
        return sim

    async def _run(self, sim: SimInstance) -> None:
        try:
            await sim.run()
        finally:
            if self.instances.get(sim.id) is sim:
                del self.instances[sim.id]
                self._leaving.discard(sim.id)

    async def start_spread(self, ids: list[str], spread_s: float) -> None:
        """Start ``ids`` at seeded random moments within ``spread_s``."""
        moments = sorted(self.rng.uniform(0, spread_s) for _ in ids)
        began = trio.current_time()
        for instance, at in zip(ids, moments, strict=True):
            await trio.sleep_until(began + at)
            self.start(instance)

    async def drain(self, ids: list[str]) -> None:
        """SIGTERM to each of ``ids`` at once; returns once every one has exited."""
        sims = [self.instances[i] for i in ids]
        self._leaving.update(ids)
        for sim in sims:
            sim.drain()
        for sim in sims:
            await sim.stopped.wait()

    def crash(self, ids: list[str]) -> None:
        for instance in ids:
            self._leaving.add(instance)
            self.instances[instance].crash()

    # -- waiting -------------------------------------------------------------------

    def check(self) -> None:
        if self.observer.violations:
            raise Violation("; ".join(self.observer.violations[:5]))

    async def wait_balanced(self, timeout_s: float | None = None) -> bool:
        """Until every partition is served and every member holds within one of its share."""
        with trio.move_on_after(timeout_s or self.options.balance_timeout_s):
            while not self.observer.balanced:
                self.check()
                await self.observer.balanced_changed.wait_transition()
        self.check()
        return self.observer.balanced

    async def phase(
        self, name: str, members: dict[str, Member], action: Callable[[], Awaitable[object]]
    ) -> PhaseResult:
        cpu = time.process_time()
        self.observer.begin_phase(name, members)
        await action()
        if await self.wait_balanced():
            await trio.sleep(self.options.quiet_s)
        self.check()
        result = self.observer.end_phase(len(self.members()))
        result.cpu_s = time.process_time() - cpu
        self.results.append(result)
        if self.options.progress:
            print("  " + " | ".join(row(result)), flush=True)
        return result

    def sample(self, fraction: float) -> list[str]:
        ids = sorted(self.members())
        return sorted(self.rng.sample(ids, max(1, round(len(ids) * fraction))))

    # -- the scenarios ---------------------------------------------------------------

    async def cold_start(self) -> None:
        ids = [self.new_id() for _ in range(self.options.instances)]
        members = {i: Member() for i in ids}
        await self.phase(
            "cold-start", members, lambda: self.start_spread(ids, self.options.start_spread_s)
        )

    async def grow(self) -> None:
        ids = [self.new_id() for _ in range(max(1, round(self.options.instances * 0.1)))]
        members = self.members() | {i: Member() for i in ids}
        await self.phase("grow", members, lambda: self.start_spread(ids, 5.0))
        await self.restore()

    async def drain_some(self) -> None:
        leaving = self.sample(0.1)
        members = {i: m for i, m in self.members().items() if i not in leaving}
        await self.phase("drain", members, lambda: self.drain(leaving))
        await self.restore()

    async def crash_some(self) -> None:
        victims = self.sample(0.05)
        members = {i: m for i, m in self.members().items() if i not in victims}

        async def crash() -> None:
            self.crash(victims)

        await self.phase("crash", members, crash)
        await self.restore()

    async def zk_pause(self) -> None:
        pause_s = 0.8 * self.settings.session_timeout_s
        await self.phase("zk-pause", self.members(), lambda: self.ensemble.pause(pause_s))

    async def reload(self) -> None:
        chosen = self.sample(0.1)
        heavy, capped = chosen[: len(chosen) // 2], chosen[len(chosen) // 2 :]
        members = self.members()
        for i in heavy:
            members[i] = Member(weight=2.0)
        for i in capped:
            members[i] = Member(max_partitions=2)

        async def reload() -> None:
            for i in heavy:
                self.instances[i].reload(weight=2.0, cap=0)
            for i in capped:
                self.instances[i].reload(weight=1.0, cap=2)

        await self.phase("reload", members, reload)

    async def isolate(self) -> None:
        victims = self.sample(0.05)
        cut_s = 1.5 * self.settings.session_timeout_s

        async def isolate() -> None:
            for i in victims:
                self.instances[i].sim_zk.set_blackholed(True)
            await trio.sleep(cut_s)
            for i in victims:
                if i in self.instances:
                    self.instances[i].sim_zk.set_blackholed(False)

        await self.phase("isolate", self.members(), isolate)

    async def zombie(self) -> None:
        victims = self.sample(0.05)
        # While others can reach the broker, those that cannot hold nothing.
        members = {i: Member(weight=0.0) if i in victims else m for i, m in self.members().items()}

        async def lose_kafka() -> None:
            for i in victims:
                self.instances[i].set_kafka_reachable(False)

        held = sum(len(self.instances[i].supervisor.held()) for i in victims)
        result = await self.phase("zombie", members, lose_kafka)
        # Each of these must move (a zombie's quota is 0, not "within one of 0").
        result.extra["victims_held"] = held
        for i in victims:
            if i in self.instances:
                self.instances[i].set_kafka_reachable(True)
        self.observer.set_members(self.members())
        await self.wait_balanced()
        self.check()

    async def rolling_restart(self) -> None:
        ids = sorted(self.members())
        if self.options.rolling_limit is not None:
            ids = ids[: self.options.rolling_limit]
        members = self.members()
        steps: list[float] = []

        async def restart_all() -> None:
            for instance in ids:
                began = trio.current_time()
                sim = self.instances[instance]
                self.observer.add_step({i: m for i, m in members.items() if i != instance})
                await self.drain([instance])
                self.observer.add_step(members)
                self.start(instance, weight=sim.member.weight, cap=sim.member.max_partitions)
                await self.wait_balanced()
                steps.append(trio.current_time() - began)

        result = await self.phase("rolling-restart", members, restart_all)
        if steps:
            result.extra["restarted"] = float(len(steps))
            result.extra["per_restart_mean_s"] = sum(steps) / len(steps)
            result.extra["per_restart_max_s"] = max(steps)
            result.extra["all_instances_extrapolated_s"] = sum(steps) / len(steps) * len(members)

    async def chaos(self, duration_s: float = 60.0) -> None:
        """Random faults at random moments (seeded), never fewer than two instances."""
        t = self.settings.session_timeout_s
        rng = self.rng
        isolated: set[str] = set()

        async def heal(instance: str, after_s: float) -> None:
            await trio.sleep(after_s)
            isolated.discard(instance)
            if instance in self.instances:
                self.instances[instance].sim_zk.set_blackholed(False)

        async def act(nursery: trio.Nursery) -> None:
            end = trio.current_time() + duration_s
            while trio.current_time() < end:
                await trio.sleep(rng.uniform(0, 3.0))
                live = sorted(self.members())
                action = rng.choice(
                    ["start", "drain", "crash", "isolate", "reset", "pause", "reload"]
                )
                if action == "start" or len(live) <= 2:
                    if len(self.instances) < 2 * self.options.instances:
                        self.start(self.new_id())
                    continue
                victim = rng.choice(live)
                if action == "drain":
                    self._leaving.add(victim)
                    self.instances[victim].drain()
                elif action == "crash":
                    self.crash([victim])
                elif action == "isolate" and victim not in isolated:
                    isolated.add(victim)
                    self.instances[victim].sim_zk.set_blackholed(True)
                    nursery.start_soon(heal, victim, rng.uniform(0.2, 1.6) * t)
                elif action == "reset":
                    self.instances[victim].sim_zk.reset_connection()
                elif action == "pause" and not self.ensemble.paused.value:
                    nursery.start_soon(self.ensemble.pause, rng.uniform(0.1, 0.9) * t)
                elif action == "reload":
                    weight = rng.choice([0.5, 1.0, 2.0])
                    cap = rng.choice([0, 0, 1, 3])
                    self.instances[victim].reload(weight=weight, cap=cap)

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                await act(nursery)
            # Healed, paused no more; the sessions of the last ones killed expire
            # within T. From here the cluster must settle on its own.
            await trio.sleep(t)
            self.observer.set_members(self.members())

        await self.phase("chaos", self.members(), run)

    async def restore(self) -> None:
        """Unmeasured: back to N balanced instances (at-most-one is still checked)."""
        missing = self.options.instances - len(self.members())
        for _ in range(max(0, missing)):
            self.start(self.new_id())
        surplus = len(self.members()) - self.options.instances
        leaving = self.sample(surplus / len(self.members()))[:surplus] if surplus > 0 else []
        self.observer.set_members({i: m for i, m in self.members().items() if i not in leaving})
        if leaving:
            await self.drain(leaving)
        await self.wait_balanced()
        self.check()


async def simulate(options: RunOptions) -> Simulation:
    """Run the chosen scenarios; returns the simulation with its results."""
    steps: dict[str, Callable[[Simulation], Awaitable[None]]] = {
        "grow": Simulation.grow,
        "drain": Simulation.drain_some,
        "crash": Simulation.crash_some,
        "zk-pause": Simulation.zk_pause,
        "reload": Simulation.reload,
        "isolate": Simulation.isolate,
        "zombie": Simulation.zombie,
        "rolling-restart": Simulation.rolling_restart,
        "chaos": Simulation.chaos,
    }
    async with trio.open_nursery() as nursery:
        sim = Simulation(options, nursery)
        sim.observer.attach()
        try:
            await nursery.start(sim.ensemble.run)
            nursery.start_soon(sim.observer.run)
            await sim.cold_start()
            for name in options.scenarios:
                if name != "cold-start":
                    await steps[name](sim)
        finally:
            sim.observer.detach()
            nursery.cancel_scope.cancel()
    return sim
