"""Who owns which partition: ZooKeeper paths, lease node data, and the watched view.

A partition's owner is the session that created the ephemeral node
``/linechat/<cluster>/partitions/<k>/owner``. Its data names the owner; its
``czxid`` (the zxid of the transaction that created it) is the ownership
*epoch*: ZooKeeper assigns zxids in one total order, so every new lease on a
partition has a larger epoch than every earlier one. The owner also lists the
lease in its registration, in the same transaction (membership.py); the view
every instance keeps is built from the registrations.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import trio
from trio_util import AsyncValue

from .hashing import stable_hash
from .membership import InstanceInfo, Member, Registration, parse_registration
from .viewlog import Backoff, Change, Gone, ViewFollower, ViewPublisher
from .zk import NodeStat, NoNodeError, ZooKeeperClient, ZooKeeperError

log = logging.getLogger(__name__)

ROOT = "/linechat"
# A starting instance waits this long for the view log before it reads the
# registrations itself (a publisher that died is replaced only once its
# session has ended).
FOLLOW_WAIT_S = 3.0


@dataclass(frozen=True)
class ZkPaths:
    cluster: str

    @property
    def root(self) -> str:
        return f"{ROOT}/{self.cluster}"

    @property
    def meta(self) -> str:
        return f"{self.root}/meta"

    @property
    def partitions(self) -> str:
        return f"{self.root}/partitions"

    def partition(self, k: int) -> str:
        return f"{self.partitions}/{k}"

    def owner(self, k: int) -> str:
        return f"{self.partition(k)}/owner"

    @property
    def instances(self) -> str:
        return f"{self.root}/instances"

    def instance(self, instance_id: str) -> str:
        return f"{self.instances}/{instance_id}"

    @property
    def view(self) -> str:
        """The view log's root (viewlog.py)."""
        return f"{self.root}/view"


@dataclass(frozen=True)
class Owner:
    """One partition lease as seen in ZooKeeper."""

    info: InstanceInfo
    epoch: int  # czxid of the lease node
    since_ms: int  # ctime of the lease node
    session_id: int  # the session owning the lease node

    @property
    def instance(self) -> str:
        return self.info.instance

    def as_dict(self) -> dict[str, object]:
        """The public view (GET /api/partitions): owner, epoch and since, plus the urls."""
        return {
            "owner": self.info.instance,
            "instance": self.info.instance,
            "ws_url": self.info.ws_url,
            "http_url": self.info.http_url,
            "epoch": self.epoch,
            "since": self.since_ms / 1000,
            "since_ms": self.since_ms,
        }


def partition_view(k: int, owner: Owner | None) -> dict[str, object]:
    """One partition in GET /api/partitions; a free one has every owner field null."""
    if owner is None:
        return {
            "partition": k,
            "owner": None,
            "instance": None,
            "ws_url": None,
            "http_url": None,
            "epoch": None,
            "since": None,
            "since_ms": None,
        }
    return {"partition": k, **owner.as_dict()}


def rank_key(member: str) -> int:
    """An instance's place in the order every instance agrees on (the uid hash of its id)."""
    return stable_hash(member)


def lease_data(info: InstanceInfo) -> bytes:
    return info.to_json(acquired_at_ms=int(time.time() * 1000))


def owner_from_node(data: bytes | None, stat: NodeStat | None) -> Owner | None:
    if data is None or stat is None:
        return None
    info = InstanceInfo.from_json(data)
    if info is None:
        # Foreign or corrupt data still means "owned": never treat it as free.
        info = InstanceInfo(instance="?", ws_url="", http_url="")
    return Owner(
        info=info, epoch=stat.czxid, since_ms=stat.ctime_ms, session_id=stat.ephemeral_owner
    )


class OwnershipCache:
    """Every partition's owner and every live instance, as the registrations say.

    Fed by the view log (viewlog.py): one elected instance watches the
    registrations and publishes their changes, every instance (that one too)
    reads the log. Each registration lists the leases of its instance
    (membership.py), written in the same transaction as the lease nodes
    themselves, so this view never needs a watch per partition, and thanks to
    the log not one per instance either. Serves connection-url lookups without a ZooKeeper
    round trip and the balancer's picture of the cluster. It may lag behind
    ZooKeeper by a watch notification; correctness never depends on it being
    current (the handshake checks the instance's own live leases).

    Every update costs in proportion to what changed: the free partitions and
    each member's count of partitions are kept up to date, never recomputed.
    """

    def __init__(
        self, zk: ZooKeeperClient, paths: ZkPaths, partitions: int, *, instance: str = ""
    ) -> None:
        self._zk = zk
        self._paths = paths
        self._instance = instance
        # Who owns each partition in this view (a member id), and the others that
        # list it too, transiently (a registration read before its update).
        self._owner: list[str | None] = [None] * partitions
        self._rivals: dict[int, set[str]] = {}
        self._registrations: dict[str, Registration] = {}
        self._sessions: dict[str, int] = {}
        # The mzxid of each registration applied: a change read late (the log
        # lags a direct read) never replaces a newer one.
        self._mzxid: dict[str, int] = {}
        self._held: Counter[str] = Counter()
        self._free: set[int] = set(range(partitions))
        # When each partition was last seen losing its owner (trio clock).
        self._free_since: dict[int, float] = {}
        self._started = math.inf  # when run() began
        self._eligible: dict[str, Member] | None = None
        # The eligible members in their stable order (rank_key), kept sorted as they change.
        self._ranked: list[tuple[int, str]] = []
        self.changed = AsyncValue(0)  # bumps whenever an owner changes
        self.members_changed = AsyncValue(0)  # an instance came, went, or changed its settings
        self.publisher = ViewPublisher(
            zk, paths.view, paths.instances, instance=instance, position=self._position
        )
        self.follower = ViewFollower(zk, paths.view, apply=self.apply_change, reset=self.apply_full)

    @property
    def partitions(self) -> int:
        return len(self._owner)

    # -- partitions ---------------------------------------------------------------

    def owner(self, k: int) -> Owner | None:
        member = self._owner[k]
        if member is None:
            return None
        registration = self._registrations[member]
        lease = registration.leases[k]
        return Owner(
            info=registration.info,
            epoch=lease.epoch,
            since_ms=lease.since_ms,
            session_id=self._sessions[member],
        )

    def snapshot(self) -> list[Owner | None]:
        return [self.owner(k) for k in range(self.partitions)]

    def free(self) -> set[int]:
        """The partitions nobody lists (a copy)."""
        return set(self._free)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def free_since(self, k: int) -> float:
        """Since when (trio clock) partition ``k`` has been free in this view (inf while
        owned); one never seen owned counts from the moment this view started."""
        if self._owner[k] is not None:
            return math.inf
        return self._free_since.get(k, self._started)

    def ownerless_for(self, k: int) -> float | None:
        """Seconds since partition ``k`` was seen losing its owner (None: never seen owned)."""
        since = self._free_since.get(k)
        return None if since is None else trio.current_time() - since

    # -- instances ------------------------------------------------------------------

    def registration(self, member: str) -> Registration | None:
        return self._registrations.get(member)

    def held_by(self, member: str) -> int:
        """How many partitions ``member`` holds in this view."""
        return self._held[member]

    def eligible(self) -> dict[str, Member]:
        """The live instances that take a share (not draining), with their settings."""
        if self._eligible is None:
            self._eligible = {
                m: r.member for m, r in sorted(self._registrations.items()) if r.eligible
            }
        return self._eligible

    def members(self) -> list[str]:
        return sorted(self._registrations)

    def ranked(self) -> list[tuple[int, str]]:
        """The eligible members as (rank_key, id), in that order (do not modify)."""
        return self._ranked

    # -- updates --------------------------------------------------------------------

    def apply_change(self, member: str, change: Change) -> None:
        """One change read from the view log."""
        if isinstance(change, Gone):
            # Only the session it names: a newer one may be here already.
            if self._sessions.get(member) == change.session:
                self._on_registration(member, None, None)
        else:
            self._on_registration(member, change.data, change.stat())

    def apply_full(self, changes: Mapping[str, Change]) -> None:
        """A full entry of the view log: every registration there is."""
        for member in sorted(self._registrations.keys() - changes.keys()):
            self._on_registration(member, None, None)
        for member, change in changes.items():
            self.apply_change(member, change)

    def _on_registration(self, member: str, data: bytes | None, stat: NodeStat | None) -> None:
        if stat is not None:
            if stat.mzxid < self._mzxid.get(member, -1):
                return
            self._mzxid[member] = stat.mzxid
        else:
            self._mzxid.pop(member, None)
        old = self._registrations.get(member)
        new: Registration | None = None
        if data is not None and stat is not None:
            new = parse_registration(data, stat)
            if new is None:
                # Unreadable: an instance all the same, with the default settings.
                new = Registration(InstanceInfo(member, "", ""))
        old_leases = old.leases if old is not None else {}
        new_leases = new.leases if new is not None else {}
        moved = False
        for k in old_leases.keys() - new_leases.keys():
            moved |= self._drop(member, k)
        if new is None:
            self._registrations.pop(member, None)
            self._sessions.pop(member, None)
        else:
            assert stat is not None
            self._registrations[member] = new
            self._sessions[member] = stat.ephemeral_owner
            for k, lease in new_leases.items():
                if 0 <= k < self.partitions and old_leases.get(k) != lease:
                    moved |= self._claim(member, k)
        was = old is not None and old.eligible
        now = new is not None and new.eligible
        if was != now:
            entry = (rank_key(member), member)
            if now:
                bisect.insort(self._ranked, entry)
            else:
                self._ranked.pop(bisect.bisect_left(self._ranked, entry))
        if old is None or new is None or (old.member, old.eligible) != (new.member, new.eligible):
            self._eligible = None
            self.members_changed.value += 1
        if moved:
            self.changed.value += 1

    def _epoch(self, member: str, k: int) -> int:
        return self._registrations[member].leases[k].epoch

    def _claim(self, member: str, k: int) -> bool:
        """``member`` lists ``k``; the newest lease wins. True if the owner changed."""
        current = self._owner[k]
        if current == member:
            return False
        if current is None:
            self._free.discard(k)
            self._set_owner(k, member)
            return True
        if self._epoch(member, k) > self._epoch(current, k):
            self._rivals.setdefault(k, set()).add(current)
            self._held[current] -= 1
            self._set_owner(k, member)
            return True
        self._rivals.setdefault(k, set()).add(member)
        return False

    def _drop(self, member: str, k: int) -> bool:
        """``member`` no longer lists ``k``. True if the owner changed."""
        rivals = self._rivals.get(k)
        if self._owner[k] != member:
            if rivals is not None:
                rivals.discard(member)
                if not rivals:
                    del self._rivals[k]
            return False
        self._held[member] -= 1
        if rivals:
            best = max(rivals, key=lambda m: self._epoch(m, k))
            rivals.discard(best)
            if not rivals:
                del self._rivals[k]
            self._set_owner(k, best)
        else:
            self._owner[k] = None
            self._free.add(k)
            self._free_since[k] = trio.current_time()
        return True

    def _set_owner(self, k: int, member: str) -> None:
        self._owner[k] = member
        self._held[member] += 1

    async def refresh(self, members: Iterable[str] | None = None) -> list[str]:
        """Read registrations again, outside the watch; the members whose view differed.

        For an instance whose view looks stuck (the balancer's check): a
        notification lost on a connection that dropped would otherwise leave
        an entry stale until that registration changes again. Reads the
        directory listing, then ``members`` (None: all of them) and any
        member the listing shows arrived or gone; one read each. Raises
        ZooKeeperError or NodeError as the reads do.
        """
        path = self._paths.instances
        try:
            children = set(await self._zk.get_children(path))
        except NoNodeError:
            children = set()
        known = set(self._registrations)
        wanted = children | known if members is None else set(members) | (children ^ known)
        stale: list[str] = []
        for member in sorted(wanted):
            data: bytes | None
            stat: NodeStat | None
            try:
                data, stat = await self._zk.get(f"{path}/{member}")
            except NoNodeError:
                data, stat = None, None
            old = self._registrations.get(member)
            new = None if data is None else parse_registration(data, stat)
            if old != new:
                stale.append(member)
                self._on_registration(member, data, stat)
        return stale

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run for view publisher and follow the view log; ``started`` once a view is in place.

        That is the publisher's full entry, or, with no publisher within
        ``FOLLOW_WAIT_S`` (the last one died and its session has not ended
        yet), every registration read directly.
        """
        self._started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.publisher.run)
            nursery.start_soon(self.follower.run)
            following = self.follower.following
            with trio.move_on_after(FOLLOW_WAIT_S):
                await following.wait_value(True)
            if not following.value:
                log.info("view_log_absent", extra={"waited_s": FOLLOW_WAIT_S})
            backoff = Backoff()
            while not following.value:
                try:
                    await self.refresh()
                    break
                except ZooKeeperError as exc:
                    log.warning("view_refresh_failed", extra={"error": str(exc)})
                with trio.move_on_after(backoff.next()):
                    await following.wait_value(True)
            task_status.started()

    def _position(self) -> int | None:
        """This instance's place among the eligible members (None: not in the view)."""
        if not self._ranked:
            return 0  # nothing known yet (a cold cluster): no order to keep
        entry = (rank_key(self._instance), self._instance)
        at = bisect.bisect_left(self._ranked, entry)
        return at if at < len(self._ranked) and self._ranked[at] == entry else None
