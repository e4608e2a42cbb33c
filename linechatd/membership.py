"""An instance's registration: who it is, its share settings, and the leases it holds.

Every instance keeps one ephemeral node, ``/linechat/<cluster>/instances/<id>``::

    {"instance": "gw-1", "ws_url": "...", "http_url": "...",
     "weight": 1.0, "max_partitions": 0, "kafka_ok": true, "draining": false,
     "leases": [[k, epoch, since_ms], ...]}

``leases`` lists the partitions whose lease node (``partitions/<k>/owner``)
this session holds, each with its epoch (the lease node's czxid) and since
(its ctime). A lease node and its line here are created and deleted in one
ZooKeeper transaction (``multi``), so at every zxid the registrations list
exactly the lease nodes that exist: every instance learns who owns what from
the registrations alone (through the view log, viewlog.py; not one watch per
partition), and the lease node per partition stays the lock it always was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .zk import NodeStat

__all__ = [
    "THIS_WRITE",
    "InstanceInfo",
    "Lease",
    "Member",
    "Registration",
    "member_from_json",
    "parse_registration",
]


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
class Member:
    """An instance's share settings, as the balancer sees them."""

    weight: float = 1.0
    max_partitions: int = 0  # 0 = no cap
    kafka_ok: bool = True  # it can reach the broker (as it reports in its registration)


@dataclass(frozen=True)
class Lease:
    epoch: int  # czxid of the lease node
    since_ms: int  # its ctime


# A lease listed by the very transaction that created it cannot know its own
# zxid yet: it is written as [k, 0, 0], meaning "the mzxid and mtime of this
# version of the registration node". The next write lists the real figures.
THIS_WRITE = Lease(0, 0)


@dataclass(frozen=True)
class Registration:
    """One instance's registration node, parsed."""

    info: InstanceInfo
    member: Member = Member()
    draining: bool = False
    leases: Mapping[int, Lease] = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        """Whether the instance takes a share of the partitions."""
        return not self.draining

    def to_json(self) -> bytes:
        return self.info.to_json(
            weight=self.member.weight,
            max_partitions=self.member.max_partitions,
            kafka_ok=self.member.kafka_ok,
            draining=self.draining,
            leases=[[k, lease.epoch, lease.since_ms] for k, lease in sorted(self.leases.items())],
        )


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


def _leases(value: object, stat: NodeStat | None) -> dict[int, Lease]:
    leases: dict[int, Lease] = {}
    written = THIS_WRITE if stat is None else Lease(stat.mzxid, stat.mtime_ms)
    if not isinstance(value, list):
        return leases
    for entry in value:
        if (
            isinstance(entry, list)
            and len(entry) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in entry)
            and entry[0] >= 0
        ):
            lease = Lease(entry[1], entry[2])
            leases[entry[0]] = written if lease == THIS_WRITE else lease
    return leases


def parse_registration(data: bytes, stat: NodeStat | None = None) -> Registration | None:
    """A registration node's data (and stat, for leases listed by the write itself);
    None if it does not even name an instance."""
    info = InstanceInfo.from_json(data)
    if info is None:
        return None
    doc = json.loads(data)  # valid: from_json parsed it
    return Registration(
        info=info,
        member=member_from_json(data),
        draining=doc.get("draining") is True,
        leases=_leases(doc.get("leases"), stat),
    )
