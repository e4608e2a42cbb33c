"""This instance's registration node, its only writer (see membership.py for the format)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import trio
from trio_util import AsyncValue

from .membership import THIS_WRITE, Lease, Member, Registration, parse_registration
from .ownership import lease_data
from .zk import (
    Create,
    Delete,
    NodeExistsError,
    NoNodeError,
    SessionInfo,
    SessionState,
    SetData,
    ZooKeeperError,
)

if TYPE_CHECKING:
    from .context import Context

__all__ = ["CREATE_BATCH", "Registrar"]

log = logging.getLogger(__name__)

# Leases created in one transaction at most: a batch that fails (another
# instance was faster for one of them) is retried one lease at a time.
CREATE_BATCH = 16


class Registrar:
    """This instance's registration node and the leases it lists, for one session at a time.

    The only writer of the node: every change (settings, draining, a lease
    created or given back) goes through here, one at a time, so the node
    always says what this session holds. ``leases`` is that list as last
    written; after a write whose answer was lost it is read back (``resync``).
    """

    def __init__(self, ctx: Context, kafka_healthy: AsyncValue[bool] | None = None) -> None:
        self._ctx = ctx
        # Whether this instance can reach the broker: published for the others' quotas.
        self.kafka_healthy = kafka_healthy if kafka_healthy is not None else AsyncValue(True)
        self._lock = trio.Lock()
        self._generation: int | None = None  # the session generation registered in
        self._leases: dict[int, Lease] = {}
        self._draining = False
        self._written: bytes | None = None
        self._uncertain = False  # a write's answer was lost: read the node back first
        self._id_in_use_warned: int | None = None

    @property
    def path(self) -> str:
        return self._ctx.paths.instance(self._ctx.info.instance)

    @property
    def registered(self) -> bool:
        info = self._ctx.zk.session.value
        return info.state is SessionState.CONNECTED and info.generation == self._generation

    @property
    def leases(self) -> Mapping[int, Lease]:
        """The leases this session holds (as listed in its registration)."""
        return self._leases if self.registered else {}

    def member(self) -> Member:
        cfg = self._ctx.config.value.partitions
        return Member(
            weight=cfg.weight,
            max_partitions=cfg.max_per_instance,
            kafka_ok=self.kafka_healthy.value,
        )

    def _document(self, leases: Mapping[int, Lease]) -> bytes:
        return Registration(self._ctx.info, self.member(), self._draining, leases).to_json()

    # -- registering ----------------------------------------------------------------

    async def ensure(self, info: SessionInfo) -> bool:
        """Registered in this session, with the current settings; False while another
        session (an earlier incarnation, or a duplicate id) still holds the node."""
        async with self._lock:
            return await self._ensure(info)

    async def _ensure(self, info: SessionInfo) -> bool:
        zk = self._ctx.zk
        if self._generation != info.generation:
            # A new session: the old one's lease nodes are gone, or will be once it expires.
            self._generation, self._leases, self._written = None, {}, None
            self._uncertain = False
        if self._generation is not None and self._uncertain:
            await self._resync(info)
        data = self._document(self._leases)
        if self._generation is not None and self._written == data:
            return True
        try:
            if self._generation is None:
                await zk.create(self.path, data, ephemeral=True, makepath=True)
                log.info("instance_registered", extra={"path": self.path})
            else:
                await zk.set(self.path, data)
                log.info("instance_registration_updated", extra={"path": self.path})
        except NodeExistsError:
            try:
                current, stat = await zk.get(self.path)
            except NoNodeError:
                return False  # gone meanwhile: the next attempt creates it
            if stat.ephemeral_owner != info.session_id:
                if self._id_in_use_warned != info.generation:
                    self._id_in_use_warned = info.generation
                    log.warning(
                        "instance_id_in_use",
                        extra={
                            "path": self.path,
                            "hint": "waiting for the old session to expire; ids must be unique",
                        },
                    )
                return False
            # Ours: a create whose answer was lost. What it lists is what we hold.
            registration = parse_registration(current, stat)
            self._leases = dict(registration.leases) if registration is not None else {}
            self._generation = info.generation
            self._written = self._document(self._leases)
            return await self._ensure(info)
        self._generation, self._written = info.generation, data
        return True

    async def _resync(self, info: SessionInfo) -> None:
        """After a lost answer: the node says which of our writes were applied."""
        data, stat = await self._ctx.zk.get(self.path)
        if stat.ephemeral_owner != info.session_id:
            raise ZooKeeperError(f"{self.path} belongs to another session")
        registration = parse_registration(data, stat)
        self._leases = dict(registration.leases) if registration is not None else {}
        self._written = self._document(self._leases)
        self._uncertain = False

    async def set_draining(self) -> None:
        """Tell the others that this instance takes no share any more (its leases stay listed)."""
        self._draining = True
        info = self._ctx.zk.session.value
        if info.state is SessionState.CONNECTED:
            await self.ensure(info)

    # -- leases ---------------------------------------------------------------------

    async def create_leases(self, partitions: Iterable[int]) -> dict[int, Lease]:
        """Create lease nodes for ``partitions`` and list them, in as few transactions as
        possible; returns those now held (the others belong to someone else)."""
        wanted = [k for k in partitions if k not in self._leases]
        created: dict[int, Lease] = {}
        for start in range(0, len(wanted), CREATE_BATCH):
            batch = wanted[start : start + CREATE_BATCH]
            try:
                created.update(await self._create(batch))
            except NodeExistsError:
                if len(batch) == 1:
                    continue
                for k in batch:
                    try:
                        created.update(await self._create([k]))
                    except NodeExistsError:
                        pass
        return created

    async def _create(self, batch: list[int]) -> dict[int, Lease]:
        ctx = self._ctx
        async with self._lock:
            if not self.registered or self._uncertain:
                return {}
            data = lease_data(ctx.info)
            ops: list[Create | Delete | SetData] = [
                Create(ctx.paths.owner(k), data, ephemeral=True) for k in batch
            ]
            # Listed as "created by the transaction that wrote this version":
            # their epoch and since are this node's mzxid and mtime (see THIS_WRITE).
            ops.append(
                SetData(self.path, self._document(self._leases | dict.fromkeys(batch, THIS_WRITE)))
            )
            for attempt in range(2):
                try:
                    results = await ctx.zk.multi(ops)
                    break
                except NoNodeError:
                    if attempt:
                        raise
                    # A partition never owned before has no parent node yet.
                    for k in batch:
                        await ctx.zk.ensure_path(ctx.paths.partition(k))
                except ZooKeeperError:
                    self._uncertain = True
                    raise
            stat = results[-1]
            assert stat is not None
            new = {k: Lease(stat.mzxid, stat.mtime_ms) for k in batch}
            self._leases = self._leases | new
            # What the node says now, with the placeholders resolved.
            self._written = self._document(self._leases)
            return new

    async def _write_document(self, info: SessionInfo) -> None:
        data = self._document(self._leases)
        try:
            await self._ctx.zk.set(self.path, data)
        except ZooKeeperError:
            self._uncertain = True
            raise
        self._written = data

    async def remove_leases(self, leases: Mapping[int, int]) -> list[int]:
        """Delete our lease nodes of ``leases`` (partition -> epoch) and their lines in
        our registration, all in one transaction; returns the partitions whose
        node was deleted. One that is not ours under that epoch any more is only
        taken off the list. Nothing is written unless the session is trusted."""
        ctx = self._ctx
        async with self._lock:
            for attempt in range(2):
                info = ctx.zk.session.value
                wanted = {k: e for k, e in leases.items() if k in self._leases}
                if not self.registered or not wanted:
                    return []
                deleted: list[int] = []
                ops: list[Create | Delete | SetData] = []
                for k, epoch in sorted(wanted.items()):
                    stat = await ctx.zk.exists(ctx.paths.owner(k))
                    if (
                        stat is not None
                        and stat.ephemeral_owner == info.session_id
                        and stat.czxid == epoch
                    ):
                        deleted.append(k)
                        ops.append(Delete(ctx.paths.owner(k), version=stat.version))
                kept = {j: lease for j, lease in self._leases.items() if j not in wanted}
                ops.append(SetData(self.path, self._document(kept)))
                try:
                    await ctx.zk.multi(ops)
                except NoNodeError:
                    if attempt:
                        raise
                    continue  # a node went away between the look and the transaction
                except ZooKeeperError:
                    self._uncertain = True
                    raise
                self._leases = kept
                self._written = self._document(kept)
                return deleted
            raise AssertionError("unreachable")

    async def forget_lease(self, k: int) -> None:
        """Partition ``k``'s lease node is gone or another's: take it off our list."""
        async with self._lock:
            if not self.registered or k not in self._leases:
                return
            self._leases = {j: lease for j, lease in self._leases.items() if j != k}
            await self._write_document(self._ctx.zk.session.value)
