"""``linechatd status`` and ``linechatd drain``: the cluster seen from ZooKeeper and each instance.

Both read the cluster's registrations in ZooKeeper (the same TOML file as the
instances gives the hosts and cluster name), then talk to each instance at the
admin url it registered (``[admin] advertise``; by default its admin listener,
else its HTTP listener's own address, never ``http.advertise``, which may be a
proxy that hides ``/admin``): ``GET /api/status`` and ``POST /admin/drain``
with the bearer token of ``[admin] token_file``.

Exit codes (also in each command's ``--help``): 0 all is well; 1 the cluster
is degraded (a partition without owner, an instance that did not answer) or
the drain did not happen; 2 bad arguments or configuration; 3 ZooKeeper could
not be reached or holds no such cluster.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from .config import read_token_file
from .ownership import InstanceInfo, ZkPaths, owner_from_node
from .zk import NoNodeError, ZooKeeper, ZooKeeperUnavailable

HTTP_TIMEOUT_S = 5.0
DRAIN_POLL_S = 0.5

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class AdminError(Exception):
    """A problem the operator can act on; printed without a traceback."""

    exit_code = EXIT_FAILED


class ClusterUnreachable(AdminError):
    """ZooKeeper cannot be reached, or holds no such cluster."""

    exit_code = EXIT_UNREACHABLE


def admin_url(info: InstanceInfo) -> str:
    """Where an instance's admin endpoints are (an older instance registered none)."""
    return (info.admin_url or info.http_url).rstrip("/")


@dataclass
class ClusterView:
    cluster: str
    partitions: int
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    owners: list[dict[str, Any] | None] = field(default_factory=list)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance -> /api/status
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def unowned(self) -> list[int]:
        return [k for k, owner in enumerate(self.owners) if owner is None]

    @property
    def healthy(self) -> bool:
        """Every partition owned and every registered instance answered."""
        return bool(self.instances) and not self.unowned and not self.errors

    def problems(self) -> list[str]:
        found = [f"{member}: {error}" for member, error in self.errors.items()]
        if not self.instances:
            found.append("no live instance")
        if self.unowned:
            found.append(f"{len(self.unowned)} partitions without owner: {self.unowned[:20]}")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "partitions": self.partitions,
            "healthy": self.healthy,
            "problems": self.problems(),
            "instances": [
                {
                    "instance": i.instance,
                    "ws_url": i.ws_url,
                    "http_url": i.http_url,
                    "admin_url": admin_url(i),
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
        raise ClusterUnreachable(f"no cluster named {cluster!r} in ZooKeeper at {hosts}") from None
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


async def read_cluster(
    hosts: str, cluster: str, *, timeout_s: float = 10.0, probe_instances: bool = True
) -> ClusterView:
    """The cluster from ZooKeeper, and (``probe_instances``) each instance's /api/status."""
    zk = ZooKeeper(hosts, session_timeout_s=10.0, connect_timeout_s=timeout_s)
    outcome: ClusterView | AdminError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(zk.run)
            outcome = await _read_zookeeper(zk, hosts, cluster)
        except ZooKeeperUnavailable as exc:
            outcome = ClusterUnreachable(str(exc))
        except AdminError as exc:
            # Raised after the nursery closes, so the operator sees the
            # message rather than an exception group.
            outcome = exc
        nursery.cancel_scope.cancel()
    if isinstance(outcome, AdminError):
        raise outcome
    assert outcome is not None
    view = outcome
    if not probe_instances:
        return view
    for member, info in view.instances.items():
        url = admin_url(info)
        try:
            code, doc = await trio.to_thread.run_sync(_http, "GET", f"{url}/api/status")
        except OSError as exc:
            view.errors[member] = f"{url}: {exc}"
            continue
        if code != 200 or not isinstance(doc, dict):
            view.errors[member] = f"{url}: HTTP {code}"
        elif doc.get("instance") != member:
            # A loopback admin url registered by an instance on another host
            # reaches whatever listens here: never take its answer for theirs.
            view.errors[member] = (
                f"{url} answers as {doc.get('instance')!r}: set [admin] advertise to an "
                "address reachable from here"
            )
        else:
            view.status[member] = doc
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
                    "unreachable",
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
        return read_token_file(token_file)
    except OSError as exc:
        raise AdminError(f"cannot read admin token file {token_file}: {exc}") from None
    except ValueError as exc:
        raise AdminError(f"admin token file {token_file}: {exc}") from None


def status_command(hosts: str, cluster: str, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the cluster; EXIT_OK when healthy, EXIT_FAILED when degraded."""
    view = trio.run(read_cluster, hosts, cluster)
    if as_json:
        json.dump(view.as_dict(), out, indent=2)
        print(file=out)
    else:
        print_status(view, out)
        for problem in view.problems():
            print(f"problem: {problem}", file=out)
    return EXIT_OK if view.healthy else EXIT_FAILED


def _drain_refusal(instance: str, url: str, code: int, doc: Any) -> AdminError:
    if code == 404:
        return AdminError(
            f"{instance} has no admin endpoint at {url}: it has no [admin] token_file "
            "configured (admin endpoints are off), or that url does not reach them"
        )
    if code == 401:
        return AdminError(
            f"{instance} refused the admin token: pass --admin-token-file, or --config with "
            "the [admin] token_file that instance uses"
        )
    if code == 409:
        return AdminError(f"{url} is instance {doc.get('instance')!r}, not {instance!r}")
    return AdminError(f"{instance} answered HTTP {code}: {doc}")


async def wait_drained(hosts: str, cluster: str, instance: str, timeout_s: float) -> bool:
    """Until ``instance`` is neither registered nor owns a partition; False on timeout."""
    with trio.move_on_after(timeout_s):
        while True:
            view = await read_cluster(hosts, cluster, probe_instances=False)
            owned = [o for o in view.owners if o and o.get("instance") == instance]
            if instance not in view.instances and not owned:
                return True
            await trio.sleep(DRAIN_POLL_S)
    return False


def drain_command(
    hosts: str,
    cluster: str,
    instance: str,
    *,
    token_file: Path | None,
    as_json: bool,
    wait: bool = False,
    timeout_s: float = 120.0,
    out: TextIO = sys.stdout,
) -> int:
    view = trio.run(read_cluster, hosts, cluster)
    info = view.instances.get(instance)
    if info is None:
        known = ", ".join(view.instances) or "none"
        raise AdminError(f"no live instance {instance!r} in cluster {cluster!r} (live: {known})")
    url = admin_url(info)
    query = urllib.parse.urlencode({"instance": instance})
    try:
        code, doc = _http("POST", f"{url}/admin/drain?{query}", _token(token_file))
    except OSError as exc:
        raise AdminError(f"{url}: {exc}") from None
    if code != 202:
        raise _drain_refusal(instance, url, code, doc)
    finished: bool | None = None
    if wait:
        finished = trio.run(wait_drained, hosts, cluster, instance, timeout_s)
    if as_json:
        result = {"instance": instance, "status": code, "response": doc}
        if wait:
            result["drained"] = finished
        json.dump(result, out)
        print(file=out)
    elif finished is None:
        print(f"{instance}: draining (its partitions move to the other instances)", file=out)
    elif finished:
        print(f"{instance}: drained (it owns no partition and has left the cluster)", file=out)
    if finished is False:
        raise AdminError(f"{instance} still owns partitions or is registered after {timeout_s:g} s")
    return EXIT_OK
