"""What the simulator measures, from what the instances themselves report.

Each instance's partition subtrees log ``partition_started`` (serving) and
``partition_stopped`` (about to give the lease back), the events the
integration tests read from the gateways' logs; the observer reads the same
records as they are logged, tagged with the simulated instance through a
context variable that each instance's tasks inherit. The fake fetcher reports
every assignment of a partition's topic, the fake admin every commit.

At every such change it checks that at most one instance serves a partition,
at most one consumes its topic, and that nobody commits a partition's offset
while another instance holds it; a violation fails the run. It keeps, per
phase of a scenario, the time until every partition is served and every
instance holds within one of its fair share, the partitions moved against the
fewest moves that reach a balanced assignment, and each partition's total
time without an owner.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio
from trio_util import AsyncValue

from linechatd.balancer import Member

from .simzk import ServerStats

__all__ = ["Observer", "PhaseResult", "Violation", "current_instance", "fair_values"]

current_instance: contextvars.ContextVar[str] = contextvars.ContextVar("sim_instance")

SAMPLE_EVERY_S = 1.0


class Violation(AssertionError):
    """Two instances held one partition at once."""


def fair_values(partitions: int, members: Mapping[str, Member]) -> dict[str, float]:
    """Each member's exact fair share: proportional to weight, water-filled under caps."""
    fair = {m: 0.0 for m in members}
    open_ = {m: v for m, v in members.items() if v.weight > 0}
    remaining = float(partitions)
    while open_ and remaining > 0:
        total = sum(v.weight for v in open_.values())
        capped = {
            m
            for m, v in open_.items()
            if v.max_partitions and v.max_partitions < remaining * v.weight / total
        }
        if not capped:
            for m, v in open_.items():
                fair[m] = remaining * v.weight / total
            break
        for m in capped:
            fair[m] = float(open_[m].max_partitions)
            remaining -= open_.pop(m).max_partitions
    return fair


def _band(fair: float) -> tuple[int, int]:
    """Holdings within one of ``fair``."""
    return max(0, math.ceil(fair - 1 - 1e-9)), math.floor(fair + 1 + 1e-9)


@dataclass
class PhaseResult:
    name: str
    started: float
    ended: float
    instances: int
    balanced_after_s: float | None  # None: not balanced at the end of the phase
    moved: int  # acquisitions by an instance other than the partition's previous owner
    retaken: int  # acquisitions by the previous owner again (a restarted subtree)
    min_moves: int
    ownerless_max_s: float
    ownerless_p99_s: float
    ownerless_partitions: int  # partitions that were without an owner at some point
    writes_peak: int
    writes_mean: float
    failed_writes: int
    notifications_peak: int
    notifications_mean: float
    reads_peak: int
    reads_mean: float
    read_mb_peak: float  # MB/s of read answers (data and listings), the peak second
    read_mb_mean: float
    watches_peak: int
    watches_end: int
    transactions: int
    warnings: dict[str, int]
    cpu_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)


class Observer(logging.Handler):
    """See the module docstring. Attach with ``attach()``; ``run`` samples once a second."""

    def __init__(self, partitions: int, topic_prefix: str, stats: ServerStats) -> None:
        super().__init__(level=logging.INFO)
        self.partitions = partitions
        self._prefix = topic_prefix
        self.stats = stats
        self.committed: dict[str, int] = {}
        self.serving: list[str | None] = [None] * partitions
        self.last_owner: list[str | None] = [None] * partitions
        self.assigned: dict[int, str] = {}
        self.counts: Counter[str] = Counter()
        self._bands: dict[str, tuple[int, int]] = {}
        self._out_of_band = 0
        self._unservable = 0
        self.unowned = partitions
        self._ownerless_since: list[float | None] = [0.0] * partitions
        self.balanced_since: float | None = None
        self.balanced_changed = AsyncValue(0)  # bumps whenever ``balanced`` flips
        self.changed = AsyncValue(0)  # bumps whenever a partition starts or stops serving
        self.changes: list[tuple[float, int, str | None, str | None]] = []
        self.violations: list[str] = []
        self.warnings: Counter[str] = Counter()
        self._phase: _Phase | None = None
        self.samples: list[tuple[float, int, int, int]] = []  # t, unowned, out of band, watches

    # -- wiring -----------------------------------------------------------------

    def attach(self) -> None:
        logger = logging.getLogger("linechatd")
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    def detach(self) -> None:
        logging.getLogger("linechatd").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        name = record.msg
        if record.levelno >= logging.WARNING:
            self.warnings[str(name)] += 1
        if name not in ("partition_started", "partition_stopped"):
            return
        instance = current_instance.get(None)
        k = getattr(record, "partition", None)
        if instance is None or not isinstance(k, int):
            return
        if name == "partition_started":
            self._serve_start(instance, k)
        else:
            self._serve_stop(instance, k)

    async def run(self) -> None:
        while True:
            self.samples.append(
                (trio.current_time(), self.unowned, self._out_of_band, self.stats.watches_held)
            )
            await trio.sleep(SAMPLE_EVERY_S)

    # -- what the fakes report ---------------------------------------------------------

    def _partition(self, topic: str) -> int:
        return int(topic[len(self._prefix) :])

    def on_assign(self, instance: str, topic: str) -> None:
        k = self._partition(topic)
        other = self.assigned.get(k)
        if other is not None and other != instance:
            self._violation(f"partition {k}: {instance} consumes its topic while {other} does")
        self.assigned[k] = instance

    def on_unassign(self, instance: str, topic: str) -> None:
        k = self._partition(topic)
        if self.assigned.get(k) == instance:
            del self.assigned[k]

    def on_commit(self, instance: str, topic: str, offset: int) -> None:
        k = self._partition(topic)
        for who, holder in (("serves", self.serving[k]), ("consumes", self.assigned.get(k))):
            if holder is not None and holder != instance:
                self._violation(f"partition {k}: {instance} commits while {holder} {who} it")
        self.committed[topic] = offset

    # -- serving -------------------------------------------------------------------

    def _violation(self, what: str) -> None:
        message = f"t={trio.current_time():.3f}: {what}"
        self.violations.append(message)

    def _serve_start(self, instance: str, k: int) -> None:
        now = trio.current_time()
        current = self.serving[k]
        if current is not None:
            self._violation(f"partition {k}: {instance} starts serving while {current} does")
            self._serve_stop(current, k)
        phase = self._phase
        if phase is not None:
            if self.last_owner[k] == instance:
                phase.retaken += 1
            else:
                phase.moved += 1
            since = self._ownerless_since[k]
            if since is not None:
                phase.ownerless[k] += now - max(since, phase.started)
        self._ownerless_since[k] = None
        self.serving[k] = instance
        self.last_owner[k] = instance
        self.unowned -= 1
        self._count(instance, +1)
        self.changes.append((now, k, None, instance))
        self.changed.value += 1
        self._check_balanced()

    def _serve_stop(self, instance: str, k: int) -> None:
        if self.serving[k] != instance:
            return
        now = trio.current_time()
        self.serving[k] = None
        self._ownerless_since[k] = now
        self.unowned += 1
        self._count(instance, -1)
        self.changes.append((now, k, instance, None))
        self.changed.value += 1
        self._check_balanced()

    def _in_band(self, instance: str) -> bool:
        lo, hi = self._bands.get(instance, (0, 0))
        return lo <= self.counts[instance] <= hi

    def _count(self, instance: str, delta: int) -> None:
        before = self._in_band(instance)
        self.counts[instance] += delta
        after = self._in_band(instance)
        self._out_of_band += int(before) - int(after)

    def _check_balanced(self) -> None:
        balanced = self.unowned <= self._unservable and self._out_of_band == 0
        if balanced and self.balanced_since is None:
            self.balanced_since = trio.current_time()
            self.balanced_changed.value += 1
        elif not balanced and self.balanced_since is not None:
            self.balanced_since = None
            self.balanced_changed.value += 1

    @property
    def balanced(self) -> bool:
        return self.balanced_since is not None

    def set_members(self, members: Mapping[str, Member]) -> None:
        """The instances that should share the partitions from now on (the others: none)."""
        fair = fair_values(self.partitions, members)
        self._bands = {m: _band(f) for m, f in fair.items()}
        # Partitions the caps leave without an owner, whatever anyone does.
        capacity = sum(
            m.max_partitions or self.partitions for m in members.values() if m.weight > 0
        )
        self._unservable = max(0, self.partitions - capacity)
        known = set(self.counts) | set(self._bands)
        self._out_of_band = sum(1 for m in known if not self._in_band(m))
        self._check_balanced()

    def min_moves(self, members: Mapping[str, Member]) -> int:
        """The fewest acquisitions that reach a balanced assignment for ``members`` from now.

        Partitions held by non-members and a member's surplus above its band must
        move; free partitions whose last owner is a member may come back to it for
        free, other free ones need one acquisition; members below their band need
        that many. The answer is the larger of what must leave and what must arrive.
        """
        fair = fair_values(self.partitions, members)
        bands = {m: _band(f) for m, f in fair.items()}
        held: Counter[str] = Counter()
        leave = free_new = 0
        for k in range(self.partitions):
            owner = self.serving[k]
            if owner is None:
                back = self.last_owner[k]
                if back is not None and back in bands:
                    held[back] += 1
                else:
                    free_new += 1
            elif owner in bands:
                held[owner] += 1
            else:
                leave += 1
        arrive = 0
        for m, (lo, hi) in bands.items():
            leave += max(0, held[m] - hi)
            arrive += max(0, lo - held[m])
        return max(leave + free_new, arrive)

    # -- phases ------------------------------------------------------------------

    def begin_phase(self, name: str, members: Mapping[str, Member]) -> None:
        self._phase = _Phase(
            name=name,
            started=trio.current_time(),
            min_moves=self.min_moves(members),
            ownerless=[0.0] * self.partitions,
            stats_at_start=_snapshot(self.stats),
            warnings_at_start=Counter(self.warnings),
        )
        self.set_members(members)

    def add_step(self, members: Mapping[str, Member]) -> None:
        """Within a phase: the target membership changes again (a rolling restart's steps)."""
        assert self._phase is not None
        self._phase.min_moves += self.min_moves(members)
        self.set_members(members)

    def end_phase(self, instances: int) -> PhaseResult:
        phase = self._phase
        assert phase is not None
        self._phase = None
        now = trio.current_time()
        for k, since in enumerate(self._ownerless_since):
            if since is not None:
                phase.ownerless[k] += now - max(since, phase.started)
        ownerless = sorted(phase.ownerless)
        p99 = ownerless[min(len(ownerless) - 1, math.ceil(0.99 * len(ownerless)) - 1)]
        start, stats = phase.stats_at_start, self.stats
        duration = max(now - phase.started, 1e-9)
        first, last = int(phase.started), int(now)

        def peak(series: str) -> int:
            per_second = stats.per_second[series]
            return max((per_second.get(s, 0) for s in range(first, last + 1)), default=0)

        def seconds(series: str) -> list[float]:
            per_second = stats.per_second[series]
            return [float(per_second.get(s, 0)) for s in range(first, last + 1)]

        window = [s for s in self.samples if phase.started <= s[0] <= now]
        balanced_after = None
        if self.balanced_since is not None:
            balanced_after = max(0.0, self.balanced_since - phase.started)
        warnings = self.warnings - phase.warnings_at_start
        return PhaseResult(
            name=phase.name,
            started=phase.started,
            ended=now,
            instances=instances,
            balanced_after_s=balanced_after,
            moved=phase.moved,
            retaken=phase.retaken,
            min_moves=phase.min_moves,
            ownerless_max_s=ownerless[-1],
            ownerless_p99_s=p99,
            ownerless_partitions=sum(1 for t in ownerless if t > 0),
            writes_peak=peak("writes"),
            writes_mean=(stats.write_requests - start["write_requests"]) / duration,
            failed_writes=stats.failed_writes - start["failed_writes"],
            notifications_peak=peak("notifications"),
            notifications_mean=(stats.notifications - start["notifications"]) / duration,
            reads_peak=peak("reads"),
            reads_mean=(stats.reads - start["reads"]) / duration,
            read_mb_peak=peak("read_bytes") / 1e6,
            read_mb_mean=(stats.read_bytes - start["read_bytes"]) / duration / 1e6,
            watches_peak=max([s[3] for s in window] + [stats.watches_held]),
            watches_end=stats.watches_held,
            transactions=stats.transactions - start["transactions"],
            warnings=dict(warnings),
            series={
                "writes_per_s": seconds("writes"),
                "notifications_per_s": seconds("notifications"),
                "reads_per_s": seconds("reads"),
                "sample_t": [s[0] - phase.started for s in window],
                "unowned": [float(s[1]) for s in window],
                "out_of_band": [float(s[2]) for s in window],
                "watches": [float(s[3]) for s in window],
            },
        )


@dataclass
class _Phase:
    name: str
    started: float
    min_moves: int
    ownerless: list[float]
    stats_at_start: dict[str, int]
    warnings_at_start: Counter[str]
    moved: int = 0
    retaken: int = 0


def _snapshot(stats: ServerStats) -> dict[str, int]:
    return {
        "write_requests": stats.write_requests,
        "failed_writes": stats.failed_writes,
        "notifications": stats.notifications,
        "reads": stats.reads,
        "read_bytes": stats.read_bytes,
        "transactions": stats.transactions,
    }
