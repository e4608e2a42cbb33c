"""Who owns which partition: ZooKeeper paths, lease node data, and the watched cache.

A partition's owner is the session that created the ephemeral node
``/linechat/<cluster>/partitions/<k>/owner``. Its data names the owner; its
``czxid`` (the zxid of the transaction that created it) is the ownership
*epoch*: ZooKeeper assigns zxids in one total order, so every new lease on a
partition has a larger epoch than every earlier one.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from trio_util import AsyncValue

from .zk import NodeStat, ZooKeeper

log = logging.getLogger(__name__)

ROOT = "/linechat"


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


@dataclass(frozen=True)
class InstanceInfo:
    """What an instance advertises about itself (lease data and registration)."""

    instance: str
    ws_url: str
    http_url: str
    # Where `linechatd status`/`drain` reach the admin endpoints ("" from an
    # instance older than the field: use http_url).
    admin_url: str = ""

    def to_json(self, **extra: object) -> bytes:
        doc: dict[str, object] = {
            "instance": self.instance,
            "ws_url": self.ws_url,
            "http_url": self.http_url,
        }
        if self.admin_url:
            doc["admin_url"] = self.admin_url
        doc.update(extra)
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> InstanceInfo | None:
        try:
            doc = json.loads(data)
            fields = doc["instance"], doc["ws_url"], doc["http_url"]
        except (ValueError, TypeError, KeyError):
            return None
        admin_url = doc.get("admin_url", "")
        if not all(isinstance(f, str) for f in (*fields, admin_url)):
            return None
        return cls(*fields, admin_url=admin_url)


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
    """A watched, client-side copy of every partition's owner.

    Serves connection-url lookups without a ZooKeeper round trip. It may lag
    behind ZooKeeper by a watch notification; correctness never depends on it
    being current (the handshake checks the instance's own live leases).
    """

    def __init__(self, zk: ZooKeeper, paths: ZkPaths, partitions: int) -> None:
        self._zk = zk
        self._paths = paths
        self._owners: list[AsyncValue[Owner | None]] = [AsyncValue(None) for _ in range(partitions)]
        # When each partition was last seen losing its owner (trio clock).
        self._free_since: dict[int, float] = {}
        self.changed = AsyncValue(0)  # bumps on every change, for watchers of the whole map

    @property
    def partitions(self) -> int:
        return len(self._owners)

    def owner(self, k: int) -> Owner | None:
        return self._owners[k].value

    def ownerless_for(self, k: int) -> float | None:
        """Seconds since partition ``k`` was seen losing its owner (None: never seen owned)."""
        since = self._free_since.get(k)
        return None if since is None else trio.current_time() - since

    def snapshot(self) -> list[Owner | None]:
        return [v.value for v in self._owners]

    async def wait_owner(self, k: int, predicate: Callable[[Owner | None], bool]) -> Owner | None:
        return await self._owners[k].wait_value(predicate)

    def _update(self, k: int, data: bytes | None, stat: NodeStat | None) -> None:
        owner = owner_from_node(data, stat)
        if owner != self._owners[k].value:
            if owner is None:
                self._free_since[k] = trio.current_time()
            self._owners[k].value = owner
            self.changed.value += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch every partition's lease node; ``started`` once each has been read."""
        async with trio.open_nursery() as nursery:
            # All first reads in flight at once: thousands of partitions must
            # not cost thousands of sequential round trips at startup.
            pending = self.partitions
            all_read = trio.Event()

            async def watch(k: int) -> None:
                nonlocal pending
                await nursery.start(
                    self._zk.watch_data, self._paths.owner(k), functools.partial(self._update, k)
                )
                pending -= 1
                if pending == 0:
                    all_read.set()

            for k in range(self.partitions):
                nursery.start_soon(watch, k)
            await all_read.wait()
            task_status.started()
