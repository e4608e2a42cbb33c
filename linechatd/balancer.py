"""The control plane: how many partitions this instance should hold, and moving towards it.

Instances register under ``/linechat/<cluster>/instances/<id>`` (ephemeral,
data = urls, weight, cap). Each computes the same fair share from that list
and converges on its own: it takes free partitions while below its share and
gives one back at a time while above it, pausing ``rebalance_pause_s`` between
moves so that a joining instance gets its share within seconds and no
partition stays ownerless for long.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio
from trio_util import AsyncValue, wait_any

from .partitions import EndReason, PartitionSupervisor
from .zk import NodeExistsError, NoNodeError, SessionInfo, SessionState, ZooKeeperError

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger(__name__)

IDLE_RECHECK_S = 1.0
# How often a start retries registering while its id is taken.
CLAIM_RETRY_S = 0.5
ACQUIRED = "acquired"
RELEASED = "released"


class DuplicateInstanceError(Exception):
    """Another live instance of the cluster uses this instance's id."""


@dataclass(frozen=True)
class Member:
    """One live instance as the balancer sees it."""

    weight: float = 1.0
    max_partitions: int = 0  # 0 = no cap
    kafka_ok: bool = True  # it can reach the broker (as it reports in its registration)


def effective_members(members: Mapping[str, Member]) -> dict[str, Member]:
    """The members as the fair share counts them: while any of them can reach
    Kafka, those that cannot get no share (an owner that cannot fetch nor
    produce serves nobody); when none can, nothing moves on that account."""
    if not any(m.kafka_ok for m in members.values()):
        return dict(members)
    return {k: m if m.kafka_ok else replace(m, weight=0.0) for k, m in members.items()}


def fair_shares(partitions: int, members: Mapping[str, Member]) -> dict[str, int]:
    """Each member's target: proportional to weight, rounded up, within its cap.

    Rounding up makes the shares sum to at least ``partitions`` (when caps
    allow), so every partition can find an owner. A capped member's surplus is
    spread over the others (water-filling).
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


def pick_release(candidates: Mapping[int, int]) -> int:
    """Which held partition to give back: the one with the fewest sessions."""
    return min(candidates, key=lambda k: (candidates[k], -k))


class Balancer:
    def __init__(
        self,
        ctx: Context,
        supervisor: PartitionSupervisor,
        kafka_healthy: AsyncValue[bool] | None = None,
    ) -> None:
        self._ctx = ctx
        self._supervisor = supervisor
        # Whether this instance can reach the broker (published in its registration).
        self._kafka_healthy = kafka_healthy if kafka_healthy is not None else AsyncValue(True)
        # Trio clock: since when it cannot (None while it can).
        self._unhealthy_since: float | None = None
        self.members: AsyncValue[dict[str, Member]] = AsyncValue({})
        self._member_ids: AsyncValue[tuple[str, ...]] = AsyncValue(())
        self._reconfigured = AsyncValue(0)
        self._random = random.Random()
        # (session generation, data) of our registration as last written.
        self._registered: tuple[int, bytes] | None = None
        self._id_in_use_warned: int | None = None
        self._members_known = trio.Event()

    def reconfigure(self) -> None:
        """The partition share settings changed (SIGHUP): re-register and re-balance."""
        self._reconfigured.value += 1

    def target(self) -> int:
        ctx = self._ctx
        members = dict(self.members.value)
        members[ctx.info.instance] = self._me()
        return fair_shares(ctx.partitions, effective_members(members))[ctx.info.instance]

    def _me(self) -> Member:
        cfg = self._ctx.config.value.partitions
        return Member(
            weight=cfg.weight,
            max_partitions=cfg.max_per_instance,
            kafka_ok=self._kafka_healthy.value,
        )

    def _zombie(self) -> bool:
        """Unable to reach Kafka for ``kafka.unhealthy_release_s`` while another member can."""
        since = self._unhealthy_since
        if since is None or not any(m.kafka_ok for m in self.members.value.values()):
            return False
        release_after = self._ctx.config.value.kafka.unhealthy_release_s
        return trio.current_time() - since >= release_after

    # -- registration ---------------------------------------------------------

    def _registration(self) -> bytes:
        me = self._me()
        return self._ctx.info.to_json(
            weight=me.weight, max_partitions=me.max_partitions, kafka_ok=me.kafka_ok
        )

    async def _refresh_members(self) -> None:
        # Polled, not watched: a member's weight or cap changes its node's
        # data, which a children watch does not report.
        ctx = self._ctx
        members: dict[str, Member] = {}
        for member_id in self._member_ids.value:
            try:
                data, _stat = await ctx.zk.get(ctx.paths.instance(member_id))
            except NoNodeError:
                continue
            members[member_id] = member_from_json(data)
        self.members.value = members

    async def _ensure_registered(self, info: SessionInfo) -> bool:
        """Register (or update) this instance's node; False while another session holds it."""
        ctx = self._ctx
        me = ctx.info.instance
        data = self._registration()
        if self._registered == (info.generation, data) and me in self._member_ids.value:
            return True
        path = ctx.paths.instance(me)
        try:
            await ctx.zk.create(path, data, ephemeral=True, makepath=True)
            log.info("instance_registered", extra={"path": path})
            self._registered = (info.generation, data)
            return True
        except NodeExistsError:
            pass
        try:
            current, stat = await ctx.zk.get(path)
        except NoNodeError:
            return False  # gone meanwhile: the next attempt creates it
        if stat.ephemeral_owner == info.session_id:
            if current != data:
                await ctx.zk.set(path, data)
                log.info("instance_registration_updated", extra={"path": path})
            self._registered = (info.generation, data)
            return True
        # An earlier incarnation's session (a crash moments ago) or a duplicate id.
        if self._id_in_use_warned != info.generation:
            self._id_in_use_warned = info.generation
            log.warning(
                "instance_id_in_use",
                extra={
                    "path": path,
                    "hint": "waiting for the old session to expire; ids must be unique",
                },
            )
        return False

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
                    if await self._ensure_registered(info):
                        return
                except ZooKeeperError as exc:
                    log.warning("instance_registration_failed", extra={"error": str(exc)})
            if trio.current_time() >= deadline:
                raise DuplicateInstanceError(
                    f"instance.id: {ctx.info.instance!r} is registered by another live instance "
                    f"of cluster {ctx.paths.cluster!r} ({ctx.paths.instance(ctx.info.instance)} "
                    f"still held after {wait_s:g} s); give every instance its own instance.id"
                )
            with trio.move_on_after(CLAIM_RETRY_S):
                await ctx.zk.session.wait_transition()

    # -- the loop -------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Balancer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        ctx = self._ctx
        async with trio.open_nursery() as nursery:
            # Never waits for ZooKeeper here: the watch copes with a missing
            # node and a lost connection by itself, and the first
            # registration creates the path.
            nursery.start_soon(ctx.zk.watch_children, ctx.paths.instances, self._on_members)
            task_status.started(self)
            # Shares computed without the member list would grab everything.
            await self._members_known.wait()
            while not ctx.draining.is_set():
                try:
                    move = await self._step()
                except (ZooKeeperError, NoNodeError, NodeExistsError) as exc:
                    log.warning("balancer_step_failed", extra={"error": str(exc)})
                    move = None
                if move == ACQUIRED:
                    # Free partitions are taken without a pause: every moment
                    # one has no owner its users cannot connect.
                    continue
                if move is not None:
                    # A release: one at a time, so the others can pick it up
                    # and the instance never sheds everything at once.
                    await trio.sleep(ctx.config.value.partitions.rebalance_pause_s)
                    continue
                with trio.move_on_after(IDLE_RECHECK_S):
                    await wait_any(
                        ctx.cache.changed.wait_transition,
                        self.members.wait_transition,
                        self._member_ids.wait_transition,
                        ctx.zk.session.wait_transition,
                        self._reconfigured.wait_transition,
                        self._kafka_healthy.wait_transition,
                        ctx.draining.wait,
                    )
            # Draining: the watch of members stays on for drain().

    def _on_members(self, children: list[str]) -> None:
        self._member_ids.value = tuple(sorted(children))
        self._members_known.set()

    async def _step(self) -> str | None:
        """One move towards the target: ACQUIRED, RELEASED or None."""
        ctx, sup = self._ctx, self._supervisor
        info = ctx.zk.session.value
        if info.state is not SessionState.CONNECTED:
            return None
        healthy = self._kafka_healthy.value
        if healthy:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = trio.current_time()
        await self._ensure_registered(info)
        await self._refresh_members()
        target = self.target()
        held = sup.held()
        # An instance that cannot reach Kafka takes no partition; it gives its
        # own up only once that has lasted unhealthy_release_s and another can
        # (a short blip must not move every partition).
        may_take = healthy
        may_give = healthy or self._zombie()
        owners = ctx.cache.snapshot()
        # Leases this session still holds but does not run (they survived a
        # SUSPENDED connection, or a create whose answer came too late):
        # re-take them while under target, else free them.
        for k, owner in enumerate(owners):
            if owner is not None and owner.session_id == info.session_id and k not in held:
                if len(held) < target and may_take:
                    if await sup.acquire(k):
                        return ACQUIRED
                    continue
                if await ctx.zk.delete_if_mine(ctx.paths.owner(k)):
                    log.info("lease_released", extra={"partition": k, "epoch": owner.epoch})
                return RELEASED
        if len(held) < target and may_take:
            free = [k for k, owner in enumerate(owners) if owner is None]
            self._random.shuffle(free)
            for k in free[:3]:
                if await sup.acquire(k):
                    return ACQUIRED
            return None
        if len(held) > target and may_give:
            counts = {r.partition: r.session_count for r in sup.runtimes()}
            k = pick_release(counts)
            log.info(
                "partition_rebalance_release" if healthy else "partition_unhealthy_release",
                extra={"partition": k, "held": len(held), "target": target},
            )
            await sup.release(k, EndReason.RELEASED if healthy else EndReason.KAFKA_UNREACHABLE)
            return RELEASED
        return None

    # -- drain ----------------------------------------------------------------

    async def drain(self, *, stagger_s: float) -> None:
        """Give every partition back, one at a time while another instance can take them.

        With nobody left to take over (every instance is stopping, or this is
        the last one) waiting helps no one: the rest is released at once.
        """
        ctx, sup = self._ctx, self._supervisor
        ctx.draining.set()
        me = ctx.info.instance
        try:
            await ctx.zk.delete_if_mine(ctx.paths.instance(me))
        except ZooKeeperError:
            pass
        # held() re-read each time: a lease still being acquired when the
        # drain began is given back too.
        while held := sup.held():
            if ctx.zk.connected and not await self._anyone_else():
                log.info("drain_nobody_left", extra={"partitions": len(held)})
                async with trio.open_nursery() as nursery:
                    for k in held:
                        nursery.start_soon(sup.release, k, EndReason.DRAIN)
                continue
            k = held[0]
            log.info("partition_drain_release", extra={"partition": k})
            await sup.release(k, EndReason.DRAIN)
            await trio.sleep(stagger_s)

    async def _anyone_else(self) -> bool:
        """Is another live (registered, so not draining) instance there to take partitions?"""
        try:
            await self._refresh_members()
        except (ZooKeeperError, NoNodeError) as exc:
            log.warning("drain_members_failed", extra={"error": str(exc)})
            return True  # unknown: keep the staggered hand-over
        me = self._ctx.info.instance
        return any(m != me for m in self.members.value)


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


def member_from_json(data: bytes) -> Member:
    """A registration's share settings; anything unreadable counts as the defaults."""
    try:
        doc = json.loads(data)
        weight = float(doc.get("weight", 1.0))
        cap = int(doc.get("max_partitions", 0))
        # Instances older than the health flag do not say: taken as healthy.
        kafka_ok = doc.get("kafka_ok", True) is not False
    except (ValueError, TypeError, AttributeError):
        return Member()
    if not (math.isfinite(weight) and weight >= 0) or cap < 0:
        return Member()
    return Member(weight=weight, max_partitions=cap, kafka_ok=kafka_ok)
