"""``linechatd status`` and ``linechatd drain``: the cluster seen from ZooKeeper and each instance.

Both read the cluster's registrations in ZooKeeper (the same TOML file as the
instances gives the hosts and cluster name), then talk to each instance's HTTP
API: ``GET /api/status`` (public) and ``POST /admin/drain`` (loopback-only,
or with the bearer token of ``[http] admin_token_file``).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from .ownership import InstanceInfo, ZkPaths, owner_from_node
from .zk import NoNodeError, ZooKeeper, ZooKeeperUnavailable

HTTP_TIMEOUT_S = 5.0


class AdminError(Exception):
    """A problem the operator can act on; printed without a traceback."""


@dataclass
class ClusterView:
    cluster: str
    partitions: int
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    owners: list[dict[str, Any] | None] = field(default_factory=list)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance -> /api/status
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "partitions": self.partitions,
            "instances": [
                {
                    "instance": i.instance,
                    "ws_url": i.ws_url,
                    "http_url": i.http_url,
                    "status": self.status.get(i.instance),
                    "error": self.errors.get(i.instance),
                }
                for i in self.instances.values()
            ],
            "owners": [
                {"partition": k, **(o or {"instance": None})} for k, o in enumerate(self.owners)
            ],
        }


def _http(method: str, url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode(errors="replace")


async def _read_zookeeper(zk: ZooKeeper, hosts: str, cluster: str) -> ClusterView:
    paths = ZkPaths(cluster)
    try:
        data, _ = await zk.get(paths.meta)
    except NoNodeError:
        raise AdminError(f"no cluster named {cluster!r} in ZooKeeper at {hosts}") from None
    view = ClusterView(cluster=cluster, partitions=int(json.loads(data)["partitions"]))
    try:
        members = await zk.get_children(paths.instances)
    except NoNodeError:
        members = []
    for member in sorted(members):
        try:
            raw, _ = await zk.get(paths.instance(member))
        except NoNodeError:
            continue
        info = InstanceInfo.from_json(raw)
        if info is not None:
            view.instances[member] = info
    for k in range(view.partitions):
        try:
            raw, stat = await zk.get(paths.owner(k))
            owner = owner_from_node(raw, stat)
            view.owners.append(owner.as_dict() if owner else None)
        except NoNodeError:
            view.owners.append(None)
    return view


async def read_cluster(hosts: str, cluster: str, *, timeout_s: float = 10.0) -> ClusterView:
    zk = ZooKeeper(hosts, session_timeout_s=10.0, connect_timeout_s=timeout_s)
    outcome: ClusterView | AdminError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(zk.run)
            outcome = await _read_zookeeper(zk, hosts, cluster)
        except ZooKeeperUnavailable as exc:
            outcome = AdminError(str(exc))
        except AdminError as exc:
            # Raised after the nursery closes, so the operator sees the
            # message rather than an exception group.
            outcome = exc
        nursery.cancel_scope.cancel()
    if isinstance(outcome, AdminError):
        raise outcome
    assert outcome is not None
    view = outcome
    for member, info in view.instances.items():
        try:
            code, doc = await trio.to_thread.run_sync(_http, "GET", f"{info.http_url}/api/status")
            if code == 200 and isinstance(doc, dict):
                view.status[member] = doc
            else:
                view.errors[member] = f"HTTP {code}"
        except OSError as exc:
            view.errors[member] = str(exc)
    return view


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def print_status(view: ClusterView, out: TextIO = sys.stdout) -> None:
    owned = sum(1 for o in view.owners if o)
    print(
        f"cluster {view.cluster}: {len(view.instances)} instances, "
        f"{owned}/{view.partitions} partitions owned",
        file=out,
    )
    print(file=out)
    rows = [["INSTANCE", "HTTP", "WEBSOCKET", "PARTITIONS", "CONNECTIONS", "STATE"]]
    for member, info in view.instances.items():
        status = view.status.get(member)
        if status is None:
            rows.append(
                [
                    member,
                    info.http_url,
                    info.ws_url,
                    "?",
                    "?",
                    view.errors.get(member, "unreachable"),
                ]
            )
            continue
        state = "draining" if status.get("draining") else f"zk {status.get('zookeeper')}"
        held = f"{len(status.get('partitions', []))}/{status.get('target')}"
        rows.append(
            [member, info.http_url, info.ws_url, held, str(status.get("connections", 0)), state]
        )
    _table(rows, out)
    print(file=out)
    lag: dict[int, tuple[int | None, int]] = {}
    for status in view.status.values():
        for p in status.get("partitions", []):
            lag[p["partition"]] = (p.get("lag"), p.get("connections", 0))
    rows = [["PARTITION", "OWNER", "EPOCH", "CONNECTIONS", "LAG"]]
    for k, owner in enumerate(view.owners):
        p_lag, conns = lag.get(k, (None, 0))
        rows.append(
            [
                str(k),
                owner["instance"] if owner else "-- none --",
                str(owner["epoch"]) if owner else "",
                str(conns) if owner else "",
                "" if p_lag is None else str(p_lag),
            ]
        )
    _table(rows, out)


def _token(token_file: Path | None) -> str | None:
    if token_file is None:
        return None
    try:
        return token_file.read_text().strip() or None
    except OSError as exc:
        raise AdminError(f"cannot read admin token file {token_file}: {exc}") from None


def status_command(hosts: str, cluster: str, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    view = trio.run(read_cluster, hosts, cluster)
    if as_json:
        json.dump(view.as_dict(), out, indent=2)
        print(file=out)
    else:
        print_status(view, out)
    return 0


def drain_command(
    hosts: str,
    cluster: str,
    instance: str,
    *,
    token_file: Path | None,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    view = trio.run(read_cluster, hosts, cluster)
    info = view.instances.get(instance)
    if info is None:
        known = ", ".join(view.instances) or "none"
        raise AdminError(f"no live instance {instance!r} in cluster {cluster!r} (live: {known})")
    try:
        code, doc = _http("POST", f"{info.http_url}/admin/drain", _token(token_file))
    except OSError as exc:
        raise AdminError(f"{info.http_url}: {exc}") from None
    if as_json:
        json.dump({"instance": instance, "status": code, "response": doc}, out)
        print(file=out)
    elif code == 202:
        print(f"{instance}: draining (its partitions move to the other instances)", file=out)
    if code == 403:
        raise AdminError(
            f"{instance} refused the drain: run this on the instance's host (loopback), "
            "or pass --admin-token-file with the token of its [http] admin_token_file"
        )
    if code != 202:
        raise AdminError(f"{instance} answered HTTP {code}: {doc}")
    return 0
