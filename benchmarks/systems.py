"""The three systems under test, behind one small interface the phases drive.

* ``linechatd``: N gateway instances (ZooKeeper leases, Kafka via the broker);
* ``asyncio``: the plain asyncio reference gateway (peer_asyncio.py), same
  frames, same broker, static partition ownership;
* ``socketio``: python-socketio on uvicorn with AsyncRedisManager (peer_socketio.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from linechatd.hashing import partition_for

from . import stack


@dataclass
class System:
    name: str
    dialect: str  # the load generator's client dialect
    servers: list[stack.Server]
    workdir: Path
    extra: dict[str, int] = field(default_factory=dict)  # helper processes: name -> pid
    notes: list[str] = field(default_factory=list)

    def start(self, timeout: float) -> None:
        stack.start_all(self.servers, timeout)

    def stop(self) -> None:
        stack.stop_all(self.servers)

    def server_pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.running()]

    def accepts(self, uid: str, index: int) -> bool:
        return True

    def url(self, uid: str, index: int) -> str:
        return f"{self.servers[index].ws_url}?uid={quote(uid)}"

    def uids(self, index: int, prefix: str, count: int) -> list[str]:
        """``count`` distinct uids that server ``index`` serves."""
        found: list[str] = []
        if count <= 0:
            return found
        # Bounded: a server that owns nothing must fail the phase, not hang it.
        limit = 1000 + count * 200
        for n, uid in enumerate(_names(prefix)):
            if n >= limit:
                break
            if self.accepts(uid, index):
                found.append(uid)
                if len(found) == count:
                    return found
        raise RuntimeError(f"{self.servers[index].name} serves too few uids ({len(found)} found)")

    def describe(self) -> dict[str, Any]:
        return {"processes": len(self.servers), "dialect": self.dialect, "notes": self.notes}


def _names(prefix: str) -> Iterator[str]:
    n = 0
    while True:
        yield f"{prefix}{n}"
        n += 1


class Linechatd(System):
    def __init__(
        self,
        workdir: Path,
        services: stack.Services,
        *,
        count: int,
        partitions: int,
        overrides: dict[str, dict[str, Any]],
    ) -> None:
        cluster = f"bench-{uuid.uuid4().hex[:8]}"
        super().__init__(
            name="linechatd",
            dialect="contract",
            servers=stack.linechatd_servers(
                workdir,
                count=count,
                cluster=cluster,
                partitions=partitions,
                services=services,
                overrides=overrides,
            ),
            workdir=workdir,
            extra=services.pids(),
        )
        self.partitions = partitions
        self.overrides = overrides
        self.owners: list[str] = []

    def start(self, timeout: float) -> None:
        # One first: it records the cluster and creates the topics alone.
        stack.start_all(self.servers, timeout, one_first=True)
        self.refresh_owners(timeout)

    def refresh_owners(self, timeout: float) -> None:
        running = [s for s in self.servers if s.running()]
        self.owners = stack.wait_balanced(running, self.partitions, timeout)

    def accepts(self, uid: str, index: int) -> bool:
        return (
            self.owners[partition_for(uid, self.partitions)] == self.servers[index].meta["instance"]
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "partitions": self.partitions,
            "config_overrides": self.overrides,
        }


class AsyncioPeer(System):
    def __init__(
        self, workdir: Path, services: stack.Services, *, count: int, partitions: int
    ) -> None:
        prefix = f"apeer-{uuid.uuid4().hex[:8]}-topic-"
        super().__init__(
            name="asyncio",
            dialect="contract",
            servers=stack.asyncio_peer_servers(
                workdir,
                count=count,
                partitions=partitions,
                kafka=services.broker.address,
                prefix=prefix,
            ),
            workdir=workdir,
            extra=services.pids(),
        )
        self.partitions = partitions

    def accepts(self, uid: str, index: int) -> bool:
        return partition_for(uid, self.partitions) % len(self.servers) == index


class SocketioPeer(System):
    def __init__(self, workdir: Path, *, count: int) -> None:
        self.redis = stack.LocalRedis(workdir / "redis")
        super().__init__(
            name="socketio",
            dialect="socketio",
            servers=stack.socketio_peer_servers(
                workdir,
                count=count,
                redis_url=f"redis://{self.redis.address}/0",
            ),
            workdir=workdir,
        )

    def start(self, timeout: float) -> None:
        self.redis.start(timeout)
        if self.redis.pid is not None:
            self.extra = {"redis": self.redis.pid}
        try:
            super().start(timeout)
        except BaseException:
            self.redis.stop()
            raise

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.redis.stop()

    def url(self, uid: str, index: int) -> str:
        # The uid travels in the namespace CONNECT packet (``40{"uid":...}``).
        return self.servers[index].ws_url
