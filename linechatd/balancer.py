"""The control plane: how many partitions each instance should hold, and moving there.

Instances register under ``/linechat/<cluster>/instances/<id>`` (membership.py:
urls, weight, cap, draining, and the leases each holds). Every instance sees
the same registrations (ownership.OwnershipCache) and applies the same rules,
so they agree on who should do what without talking to each other:

1. **Quotas** (``quotas``): each eligible (not draining) instance gets an exact
   number of partitions, proportional to its weight, within its cap, summing
   to the partition count whenever the caps allow. The partitions left over
   by rounding down go one each to the largest fractional parts, ties broken
   by ``rank_key`` (a stable hash of the instance id), so every instance
   computes the same numbers, and a join or a leave only ever moves the
   quotas in one direction (joins lower them, leaves raise them).
2. **Designated takers** (``plan``): the free partitions, in ascending order,
   are dealt out to the instances below their quota, in ``rank_key`` order,
   each getting as many as it lacks. An instance takes the ones dealt to it
   at once (many per ZooKeeper transaction), and no others: a freed partition
   draws one create, not one per instance. A partition left free for
   ``FALLBACK_AFTER_S`` (views disagree, caps) may be taken by any instance
   still below its ceiling share (``fair_shares``), each after its own jitter.
3. **Releases**: an instance above its quota gives back its whole surplus at
   once, the partitions with the fewest sessions first (``pick_release``), but
   only when the instances below quota lack more than the free partitions can
   give; then it pauses ``rebalance_pause_s``.
4. **A cold cluster settles first**: while more than half the partitions are
   free and an instance joined less than ``settle_s`` ago, nobody takes any,
   so a fleet starting at once deals the partitions out once, instead of the
   first instances taking everything and handing most of it on.

5. **The zombie owner**: an instance that cannot reach the broker says so in
   its registration (``kafka_ok``). While any instance can, those that cannot
   count with weight 0 (``effective_members``): they take nothing, and give
   their partitions back once they have been cut off for
   ``kafka.unhealthy_release_s`` while another could (a short blip must not
   move every partition). When none can, nothing moves on that account.

``plan`` is a pure function of a ``View`` (a snapshot of what this instance
knows). A further rule is a change to who is eligible
(``Registration.eligible``), to ``effective_members`` or to ``plan``, tested
without ZooKeeper.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio
from trio_util import AsyncValue, wait_any

from .membership import Member, member_from_json
from .ownership import OwnershipCache, rank_key
from .partitions import EndReason, PartitionSupervisor
from .zk import NodeError, SessionInfo, SessionState, ZooKeeperError

if TYPE_CHECKING:
    from .context import Context

__all__ = [
    "Balancer",
    "DuplicateInstanceError",
    "Member",
    "Plan",
    "View",
    "drain_stagger",
    "effective_members",
    "equal_quotas",
    "fair_shares",
    "member_from_json",
    "pick_release",
    "plan",
    "quotas",
]

log = logging.getLogger(__name__)

IDLE_RECHECK_S = 1.0
# Steps are at least this far apart: a burst of changes is planned once.
MIN_STEP_INTERVAL_S = 0.02
# Partitions taken per step (the transactions behind them hold CREATE_BATCH each).
TAKE_PER_STEP = 64
# A free partition nobody designated took: anyone with room tries after this
# (plus up to as much again, a jitter of each instance's own).
FALLBACK_AFTER_S = 1.0
# A free partition dealt to an instance that does not take it (it crashed
# and its registration lives until its session expires): after this many
# fallback delays, anyone with room may.
STUCK_FACTOR = 2
# A partition whose create failed (its owner is not in our view yet) is left
# alone for this long, or until the view has seen it owned.
BUSY_S = 2.0
# How often a start retries registering while its id is taken.
CLAIM_RETRY_S = 0.5
# Below quota with nothing to take for this long: read every registration
# again (a lost notification may have left the view stale), at most this often.
STUCK_REFRESH_S = 5.0
# Still below quota this long: every registration is read, at most this often.
STUCK_FULL_REFRESH_S = 20.0
# In a series of joins (each within this long of the last), surplus is given
# back only once nobody has joined for this long (or they have kept joining
# for RELEASE_SETTLE_MAX_S): every join lowers the quotas again, and a
# partition handed to one newcomer would move on to the next. A lone join is
# acted on at once.
RELEASE_SETTLE_S = 1.0
RELEASE_SETTLE_MAX_S = 5.0
ACQUIRED = "acquired"
RELEASED = "released"


class DuplicateInstanceError(Exception):
    """Another live instance of the cluster uses this instance's id."""


def effective_members(members: Mapping[str, Member]) -> dict[str, Member]:
    """The members as the quotas count them: while any of them can reach
    Kafka, those that cannot get no share (an owner that cannot fetch nor
    produce serves nobody); when none can, nothing moves on that account."""
    if not any(m.kafka_ok for m in members.values()):
        return dict(members)
    return {k: m if m.kafka_ok else replace(m, weight=0.0) for k, m in members.items()}


def fair_shares(partitions: int, members: Mapping[str, Member]) -> dict[str, int]:
    """Each member's ceiling share: proportional to weight, rounded up, within its cap.

    Rounding up makes the shares sum to at least ``partitions`` (when caps
    allow), so every partition can find an owner. A capped member's surplus is
    spread over the others (water-filling). The most an instance takes when it
    picks up a partition nobody was designated for.
    """
    shares: dict[str, int] = {}
    open_members = {m: v for m, v in members.items() if v.weight > 0}
    remaining = partitions
    while open_members:
        total = sum(v.weight for v in open_members.values())
        proposal = {m: math.ceil(remaining * v.weight / total) for m, v in open_members.items()}
        capped = {
            m: open_members[m].max_partitions
            for m, n in proposal.items()
            if 0 < open_members[m].max_partitions < n
        }
        if not capped:
            shares.update(proposal)
            break
        for m, cap in capped.items():
            shares[m] = cap
            remaining = max(0, remaining - cap)
            del open_members[m]
    for m in members:
        shares.setdefault(m, 0)
    return shares


def quotas(partitions: int, members: Mapping[str, Member]) -> dict[str, int]:
    """Each member's exact number of partitions (rule 1 of the module docstring).

    Water-filling under the caps, then the floor of each proportional share,
    then one more for the largest remainders, ties by ``rank_key``. Sums to
    ``min(partitions, total capacity)``.
    """
    result = dict.fromkeys(members, 0)
    open_members = {m: v for m, v in members.items() if v.weight > 0}
    remaining = partitions
    while open_members and remaining > 0:
        total = sum(v.weight for v in open_members.values())
        capped = [
            m
            for m, v in open_members.items()
            if v.max_partitions and v.max_partitions < remaining * v.weight / total
        ]
        if not capped:
            ideal = {m: remaining * v.weight / total for m, v in open_members.items()}
            floors = {m: math.floor(x) for m, x in ideal.items()}
            left = remaining - sum(floors.values())
            order = sorted(open_members, key=lambda m: (floors[m] - ideal[m], rank_key(m), m))
            for m in order[:left]:
                floors[m] += 1
            result.update(floors)
            break
        for m in capped:
            cap = open_members.pop(m).max_partitions
            result[m] = cap
            remaining -= cap
    return result


def equal_quotas(partitions: int, order: Sequence[str]) -> dict[str, int]:
    """``quotas`` of members with equal settings, already in rank order, without sorting:
    the floor for each and one more for the first ``partitions % n``."""
    if not order:
        return {}
    floor, extra = divmod(partitions, len(order))
    return {m: floor + (1 if i < extra else 0) for i, m in enumerate(order)}


def pick_release(candidates: Mapping[int, int]) -> int:
    """Which held partition to give back: the one with the fewest sessions."""
    return min(candidates, key=lambda k: (candidates[k], -k))


@dataclass(frozen=True)
class View:
    """What one instance knows when it decides; ``plan`` is a pure function of it."""

    me: str
    quotas: Mapping[str, int]  # every eligible member's quota (me absent: I take none)
    order: Sequence[str]  # the eligible members in rank order
    held: Mapping[str, int]  # partitions each member holds (as the registrations say)
    free: Sequence[int]  # partitions nobody holds, ascending
    mine: Mapping[int, int]  # my partitions -> their sessions
    # How long each of ``free`` has been free, and when one may be taken by an
    # instance it was not dealt to: after ``fallback_s`` if it was dealt to
    # nobody, after ``STUCK_FACTOR`` times that if its designated taker is slow.
    free_for: Sequence[float] = ()
    fallback_s: float = math.inf
    room: int = 0  # my ceiling share: how many I may hold when taking such partitions
    settling: bool = False  # a cold cluster still gaining members (rule 4)
    take_per_step: int = TAKE_PER_STEP


@dataclass(frozen=True)
class Plan:
    release: tuple[int, ...] = ()
    take: tuple[int, ...] = ()


def _deficit(view: View, member: str) -> int:
    return max(0, view.quotas[member] - view.held.get(member, 0))


def plan(view: View) -> Plan:
    """This instance's next moves (rules 2 to 4 of the module docstring)."""
    quota = view.quotas.get(view.me, 0)
    held = len(view.mine)
    if held > quota:
        wanted = sum(_deficit(view, m) for m in view.order if m != view.me)
        if wanted <= len(view.free):
            return Plan()  # the free partitions cover every deficit: nobody needs mine
        surplus = held - quota
        order = sorted(view.mine, key=lambda k: (view.mine[k], -k))
        return Plan(release=tuple(order[:surplus]))
    if view.settling or not view.free:
        return Plan()
    # Deal the free partitions out: each instance below quota, in rank order,
    # gets the next ones, as many as it lacks.
    dealt = 0
    mine: list[int] = []
    for member in view.order:
        if dealt >= len(view.free):
            break
        lacking = quota - held if member == view.me else _deficit(view, member)
        if member == view.me:
            mine = list(view.free[dealt : dealt + lacking])
        dealt += max(0, lacking)
    if not mine and held < view.room:
        # Dealt to nobody (views disagree, caps), or its taker is slow: anyone with room.
        mine = [
            k
            for i, (k, age) in enumerate(zip(view.free, view.free_for, strict=True))
            if age >= view.fallback_s * (1 if i >= dealt else STUCK_FACTOR)
        ][: view.room - held]
    return Plan(take=tuple(mine[: view.take_per_step]))


class Balancer:
    def __init__(
        self, ctx: Context, supervisor: PartitionSupervisor, *, rng: random.Random | None = None
    ) -> None:
        self._ctx = ctx
        self._supervisor = supervisor
        self._registrar = supervisor.registrar
        self._reconfigured = AsyncValue(0)
        rng = rng or random.Random()
        # This instance's share of the fallback jitter, in [1, 2) times the delay.
        self._fallback_s = FALLBACK_AFTER_S * (1 + rng.random())
        # Partition -> (until when its create is not retried, since when the view
        # had it free then): the mark ends early once the view has seen it owned.
        self._busy: dict[int, tuple[float, float]] = {}
        # (members version, quotas, eligible members in rank order), per change of the members.
        self._quotas: tuple[tuple[int, object], dict[str, int], list[str]] | None = None
        self._last_join = -math.inf  # trio clock: the last time an instance joined
        self._members_seen = 0
        # The members version last seen, when it last changed, since when it
        # has kept changing, and until when a release waits (trio clock).
        self._members_version: int | None = None
        self._members_changed_at = -math.inf
        self._unsettled_since = -math.inf
        self._release_due = -math.inf
        self._changes_in_series = 0
        self._eligible_seen = 0
        # Trio clock: since when the session has been trusted without a break.
        self._trusted_since: float | None = None
        # Trio clock: since when this instance has been below its quota with
        # nothing it may take (None otherwise), and when it may refresh its view next.
        self._wanting_since: float | None = None
        self._next_refresh = -math.inf
        self._next_full_refresh = -math.inf
        # Trio clock: since when this instance cannot reach the broker while another
        # can (None otherwise). An outage of the broker for everyone never starts it.
        self._stranded_since: float | None = None

    def reconfigure(self) -> None:
        """The partition share settings changed (SIGHUP): re-register and re-balance."""
        self._reconfigured.value += 1

    def _me(self) -> Member:
        return self._registrar.member()

    def _zombie(self, healthy: bool) -> bool:
        """Unable to reach Kafka, for ``kafka.unhealthy_release_s``, while another member can.

        Counted only while another can: when the broker comes back after an
        outage for everyone, the instances see it a moment apart, and the
        last to see it must not take itself for a zombie.
        """
        me = self._ctx.info.instance
        stranded = not healthy and any(
            m.kafka_ok for name, m in self._ctx.cache.eligible().items() if name != me
        )
        now = trio.current_time()
        if not stranded:
            self._stranded_since = None
            return False
        if self._stranded_since is None:
            self._stranded_since = now
        release_after = self._ctx.config.value.kafka.unhealthy_release_s
        return now - self._stranded_since >= release_after

    def _eligible(self) -> dict[str, Member]:
        """The eligible members as this instance should count them: itself with its own
        current settings (its registration may not show them yet)."""
        ctx = self._ctx
        members = dict(ctx.cache.eligible())
        if not ctx.draining.is_set():
            members[ctx.info.instance] = self._me()
        else:
            members.pop(ctx.info.instance, None)
        return members

    def quota_table(self) -> tuple[dict[str, int], list[str]]:
        """Every eligible member's quota and their rank order, once per change of the members."""
        ctx = self._ctx
        me, draining = self._me(), ctx.draining.is_set()
        version = (ctx.cache.members_changed.value, (me, draining))
        if self._quotas is not None and self._quotas[0] == version:
            return self._quotas[1], self._quotas[2]
        cached = ctx.cache.eligible()
        if (
            not draining
            and me == Member()
            and ctx.info.instance in cached
            and all(m == Member() for m in cached.values())
        ):
            order = [m for _key, m in ctx.cache.ranked()]
            table = equal_quotas(ctx.partitions, order)
        else:
            table = quotas(ctx.partitions, effective_members(self._eligible()))
            order = sorted(table, key=lambda m: (rank_key(m), m))
        self._quotas = (version, table, order)
        return table, order

    def target(self) -> int:
        """How many partitions this instance should hold."""
        return self.quota_table()[0].get(self._ctx.info.instance, 0)

    # -- the loop -------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Balancer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # This instance has just joined (its registration may not be in the view yet).
        self._last_join = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_trust)
            task_status.started(self)
            await self._loop()
            nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        ctx = self._ctx
        last_step = -math.inf
        while not ctx.draining.is_set():
            await trio.sleep_until(last_step + MIN_STEP_INTERVAL_S)
            last_step = trio.current_time()
            try:
                move = await self._step()
            except (ZooKeeperError, NodeError) as exc:
                log.warning("balancer_step_failed", extra={"error": str(exc)})
                move = None
            if move == ACQUIRED:
                continue
            if move == RELEASED:
                # Gives the takers a moment before this instance looks again.
                await trio.sleep(ctx.config.value.partitions.rebalance_pause_s)
                continue
            with trio.move_on_after(self._idle_timeout()):
                await wait_any(
                    ctx.cache.changed.wait_transition,
                    ctx.cache.members_changed.wait_transition,
                    ctx.zk.session.wait_transition,
                    self._reconfigured.wait_transition,
                    self._registrar.kafka_healthy.wait_transition,
                    ctx.draining.wait,
                )
        # Draining: drain() gives the partitions back.

    async def _watch_trust(self) -> None:
        """Keep ``_trusted_since``: a step may be blocked in a ZooKeeper call
        through a whole outage and never see the session untrusted."""
        session = self._ctx.zk.session
        self._note_trust(session.value)
        async for info, _old in session.transitions():
            self._note_trust(info)

    def _note_trust(self, info: SessionInfo) -> None:
        if info.state is not SessionState.CONNECTED:
            self._trusted_since = None
        elif self._trusted_since is None:
            self._trusted_since = trio.current_time()

    def _observe_members(self) -> None:
        """Note when instances join (every step looks)."""
        now = trio.current_time()
        version = self._ctx.cache.members_changed.value
        if version != self._members_version:
            self._members_version = version
            eligible = len(self._ctx.cache.ranked())
            joined = eligible > self._eligible_seen
            self._eligible_seen = eligible
            # Only joins lower the quotas of the others: a leave, a drain or a
            # restart's exit never makes a partition move twice.
            if joined:
                if now >= self._members_changed_at + RELEASE_SETTLE_S:
                    self._unsettled_since = now
                    self._changes_in_series = 0
                self._changes_in_series += 1
                self._members_changed_at = now

    def _release_settles_at(self) -> float:
        """When surplus may be given back: at once after a lone join; in a
        series of joins (each within RELEASE_SETTLE_S of the last),
        RELEASE_SETTLE_S after the last, or RELEASE_SETTLE_MAX_S after the
        first."""
        if self._changes_in_series <= 1:
            return -math.inf
        return min(
            self._members_changed_at + RELEASE_SETTLE_S,
            self._unsettled_since + RELEASE_SETTLE_MAX_S,
        )

    def _idle_timeout(self) -> float:
        """Until the next moment a partition may become ours by the fallback rule
        (or a release waiting for the members to settle is due)."""
        cache = self._ctx.cache
        wait = IDLE_RECHECK_S
        now = trio.current_time()
        if self._release_due > now:
            wait = min(wait, self._release_due - now)
        if self._settling():
            settle_s = self._ctx.config.value.partitions.settle_s
            wait = min(wait, self._last_join + settle_s - now)
        elif cache.free_count:
            settle_s = self._ctx.config.value.partitions.settle_s
            oldest = max(min(cache.free_since(k) for k in cache.free()), self._last_join + settle_s)
            # The next fallback moment not yet passed (undesignated, then stuck).
            for factor in (1, STUCK_FACTOR):
                due = oldest + self._fallback_s * factor - now
                if due > 0:
                    wait = min(wait, due)
                    break
        return max(MIN_STEP_INTERVAL_S, wait)

    def _settling(self) -> bool:
        """Rule 4: a cold cluster (most partitions free) that gained an instance lately."""
        ctx = self._ctx
        members = len(ctx.cache.members())
        if ctx.cache.registration(ctx.info.instance) is None:
            members += 1  # ourselves, registered but not seen yet
        now = trio.current_time()
        if members > self._members_seen:
            self._last_join = now
        self._members_seen = members
        settle_s = ctx.config.value.partitions.settle_s
        return 2 * ctx.cache.free_count > ctx.partitions and now < self._last_join + settle_s

    def view(self) -> View:
        """A snapshot of what this instance knows, for ``plan``."""
        ctx, sup = self._ctx, self._supervisor
        cache = ctx.cache
        now = trio.current_time()
        self._busy = {
            k: (until, since)
            for k, (until, since) in self._busy.items()
            if until > now and cache.free_since(k) == since
        }
        table, order = self.quota_table()
        free: list[int] = []
        free_for: list[float] = []
        room = 0
        if cache.free_count:
            free = sorted(k for k in cache.free() if k not in self._busy)
            # Counted from when a partition could be taken at all: not while a
            # cold cluster was settling (rule 4).
            # Nor while this session could not be trusted: the view stood still
            # then, and a partition taken meanwhile only looks free.
            eligible_since = max(
                self._last_join + ctx.config.value.partitions.settle_s,
                self._trusted_since if self._trusted_since is not None else now,
            )
            free_for = [now - max(cache.free_since(k), eligible_since) for k in free]
            if free_for and max(free_for) >= self._fallback_s:
                room = fair_shares(ctx.partitions, effective_members(self._eligible())).get(
                    ctx.info.instance, 0
                )
        counts = {r.partition: r.session_count for r in sup.runtimes()}
        mine = {k: counts.get(k, 0) for k in self._registrar.leases} | counts
        return View(
            me=ctx.info.instance,
            quotas=table,
            order=order,
            held=_HeldView(cache, ctx.info.instance, len(mine)),
            free=free,
            mine=mine,
            free_for=free_for,
            fallback_s=self._fallback_s,
            room=room,
            settling=self._settling(),
        )

    async def _step(self) -> str | None:
        """One round: register, resume or free leftovers, then act on the plan."""
        ctx, sup = self._ctx, self._supervisor
        self._observe_members()
        info = ctx.zk.session.value
        if info.state is not SessionState.CONNECTED:
            return None
        healthy = self._registrar.kafka_healthy.value
        zombie = self._zombie(healthy)
        if not await self._registrar.ensure(info):
            return None
        # An instance that cannot reach Kafka takes no partition; it gives its
        # own up only once that has lasted unhealthy_release_s and another can
        # (rule 5).
        may_take = healthy
        may_give = healthy or zombie
        # Leases this session still holds but does not run (they survived a
        # SUSPENDED connection, or a transaction whose answer came too late):
        # re-take them while under quota, else free them.
        leftovers = sup.leftovers()
        if leftovers:
            room = self.target() - len(sup.held()) if may_take else 0
            resumed = await sup.resume(dict(sorted(leftovers.items())[: max(0, room)]))
            surplus = {k: lease.epoch for k, lease in sorted(leftovers.items())[max(0, room) :]}
            for k in await self._registrar.remove_leases(surplus):
                log.info("lease_released", extra={"partition": k, "epoch": surplus[k]})
            return ACQUIRED if resumed else RELEASED
        if self._settling() and len(sup.held()) <= self.target():
            return None  # rule 4: nothing to take yet, and nothing to give back
        view = self.view()
        decided = plan(view)
        await self._check_stuck(view, decided, may_take)
        if decided.release and may_give:
            if healthy and (due := self._release_settles_at()) > trio.current_time():
                self._release_due = due
                return None
            log.info(
                "partition_rebalance_release" if healthy else "partition_unhealthy_release",
                extra={
                    "partitions": list(decided.release),
                    "held": len(sup.held()),
                    "target": self.target(),
                },
            )
            reason = EndReason.RELEASED if healthy else EndReason.KAFKA_UNREACHABLE
            await sup.release(decided.release, reason)
            return RELEASED
        if decided.take and may_take:
            taken = await sup.acquire(decided.take)
            until = trio.current_time() + BUSY_S
            for k in set(decided.take) - set(taken):
                self._busy[k] = (until, ctx.cache.free_since(k))
            return ACQUIRED if taken else None
        return None

    async def _check_stuck(self, view: View, decided: Plan, may_take: bool) -> None:
        """Below quota, able to take, and nothing to take for ``STUCK_REFRESH_S``: the
        registrations of the members above their quota are read again. Holders give
        their surplus back within ``rebalance_pause_s`` of seeing an instance lack,
        so waiting this long means a change this instance has not seen, or a holder
        that may not give yet (a zombie's grace, a staggered drain)."""
        now = trio.current_time()
        wanting = (
            may_take
            and not decided.take
            and not view.settling
            and len(view.mine) < view.quotas.get(view.me, 0)
        )
        if not wanting:
            self._wanting_since = None
            return
        if self._wanting_since is None:
            self._wanting_since = now
        if now - self._wanting_since < STUCK_REFRESH_S or now < self._next_refresh:
            return
        self._next_refresh = now + STUCK_REFRESH_S
        # Those this view says hold more than their quota are the ones that
        # should be giving partitions back: read them (not all N) again. And
        # this instance's own registration when the view credits it with
        # partitions it does not hold (as if its previous session's were there).
        cache = self._ctx.cache
        suspects = [
            m for m in cache.members() if m != view.me and cache.held_by(m) > view.quotas.get(m, 0)
        ]
        credited = cache.held_by(view.me)
        if credited != len(view.mine):
            suspects.append(view.me)
        # Waiting longer than any holder should: read them all, now and then.
        full = now - self._wanting_since >= STUCK_FULL_REFRESH_S and now >= self._next_full_refresh
        if full:
            self._next_full_refresh = now + STUCK_FULL_REFRESH_S
        stale = await cache.refresh(None if full else suspects)
        # A view found behind is worth a warning (a notification late or lost);
        # a refresh that found nothing is the normal wait for a slow holder.
        log.log(
            logging.WARNING if stale else logging.INFO,
            "ownership_view_refreshed",
            extra={
                "held": len(view.mine),
                "credited": credited,
                "all": full,
                "target": view.quotas.get(view.me, 0),
                "free": len(view.free),
                "waited_s": round(now - self._wanting_since, 1),
                "stale": stale,
            },
        )

    async def claim_registration(self, *, wait_s: float) -> None:
        """Register before serving; DuplicateInstanceError if the id stays taken ``wait_s``.

        A node left by this instance's previous run (a crash) disappears once
        its session expires, within the session timeout; one that outlives
        that belongs to a live instance with the same id, and two instances
        with one id would each believe the other's registration is its own.
        """
        ctx = self._ctx
        deadline = trio.current_time() + wait_s
        while True:
            info = ctx.zk.session.value
            if info.state is SessionState.CONNECTED:
                try:
                    if await self._registrar.ensure(info):
                        return
                except (ZooKeeperError, NodeError) as exc:
                    log.warning("instance_registration_failed", extra={"error": str(exc)})
            if trio.current_time() >= deadline:
                raise DuplicateInstanceError(
                    f"instance.id: {ctx.info.instance!r} is registered by another live instance "
                    f"of cluster {ctx.paths.cluster!r} ({ctx.paths.instance(ctx.info.instance)} "
                    f"still held after {wait_s:g} s); give every instance its own instance.id"
                )
            with trio.move_on_after(CLAIM_RETRY_S):
                await ctx.zk.session.wait_transition()

    # -- drain ----------------------------------------------------------------

    async def drain(self, *, stagger_s: float) -> None:
        """Give every partition back, one at a time while another instance can take them.

        With nobody left to take over (every instance is stopping, or this is
        the last one) waiting helps no one: the rest is released at once.
        """
        ctx, sup = self._ctx, self._supervisor
        ctx.draining.set()
        me = ctx.info.instance
        # The others stop counting this instance (it takes no share) while its
        # leases stay listed until each is handed over.
        try:
            await self._registrar.set_draining()
        except (ZooKeeperError, NodeError):
            pass
        # held() re-read each time: a lease still being acquired when the
        # drain began is given back too.
        while held := sup.held():
            if ctx.zk.connected and not any(m != me for m in ctx.cache.eligible()):
                log.info("drain_nobody_left", extra={"partitions": len(held)})
                await sup.release(list(held), EndReason.DRAIN)
                continue
            k = held[0]
            log.info("partition_drain_release", extra={"partition": k})
            await sup.release([k], EndReason.DRAIN)
            await trio.sleep(stagger_s)


class _HeldView(Mapping[str, int]):
    """The members' partition counts from the cache, with this instance's own count."""

    def __init__(self, cache: OwnershipCache, me: str, mine: int) -> None:
        self._cache = cache
        self._me = me
        self._mine = mine

    def __getitem__(self, member: str) -> int:
        return self._mine if member == self._me else self._cache.held_by(member)

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache.members())

    def __len__(self) -> int:
        return len(self._cache.members())


# The share of the grace period that staggered drain releases may take; the
# rest is for waiting on a taker and the last partition's own handover.
DRAIN_STAGGER_SHARE = 2 / 3


def drain_stagger(configured_s: float, grace_s: float, held: int) -> float:
    """Seconds between drain releases: the configured stagger, shortened so that
    ``held`` releases fit in part of the grace period (else the last ones would
    be cut off together when it runs out)."""
    if held <= 1:
        return configured_s
    return min(configured_s, grace_s * DRAIN_STAGGER_SHARE / (held - 1))
