"""Partition leases: what ZooKeeper and the API show, and that losing or giving
back one lease ends exactly that partition's subtree and nothing else.

Balancing: a new instance gets its share, a killed instance's partitions are
re-owned, weights and caps shape the shares, a reload moves only what must move.
"""

from __future__ import annotations

import time
import tomllib
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from support.cluster import (
    ClusterNames,
    GatewayProcess,
    http_get,
    merge_sections,
    render_toml,
    start_cluster,
)
from support.leasekit import (
    FAST_SECTIONS,
    Sender,
    api_partitions,
    chat_socket,
    close_code,
    covers,
    events,
    get_json,
    handshake_refusal,
    held,
    kazoo,
    names_of,
    next_message,
    uid_in_partition,
    wait_event,
    wait_held,
    wait_shares,
)

from linechatd.protocol import CloseCode

PARTITIONS = 6
# These tests assert that nothing but what they did moved a partition; a
# loaded machine's stall of a second or two must stay well under T/2.
SESSION_TIMEOUT_S = 8.0
EVEN = {"gw-0": PARTITIONS // 2, "gw-1": PARTITIONS // 2}
SECTIONS = merge_sections(FAST_SECTIONS, {"zookeeper": {"session_timeout": SESSION_TIMEOUT_S}})


def _start(
    n: int,
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    names: ClusterNames,
    **kw: Any,
) -> Any:
    return start_cluster(
        n,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=names,
        partitions=kw.pop("partitions", PARTITIONS),
        sections=kw.pop("sections", SECTIONS),
        **kw,
    )


async def test_lease_nodes_name_the_owner_and_the_api_shows_owner_epoch_since(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(45):
        async with (
            _start(2, tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as cluster,
            kazoo(zookeeper_hosts, cluster_names.cluster) as zk,
        ):
            view = await wait_shares(cluster, EVEN)
            owner_of = names_of(view)
            nodes = await zk.owners(PARTITIONS)
            for k in range(PARTITIONS):
                node = nodes[k]
                assert node is not None, f"partition {k} has no lock node"
                data, stat = node
                gateway = cluster.by_id(owner_of[k])
                assert data["instance"] == gateway.instance_id
                assert data["ws_url"] == gateway.ws_url
                assert data["http_url"] == gateway.http_url
                assert stat.ephemeralOwner != 0, "a lease must die with its session"
                assert view[gateway.instance_id][k] == stat.czxid, "epoch = czxid of the node"

            # Every instance's cache serves the same picture (it may lag by a watch).
            for gateway in cluster:
                with trio.fail_after(5):
                    while True:
                        listed = await api_partitions(gateway)
                        if all(p["owner"] == owner_of[p["partition"]] for p in listed):
                            break
                        await trio.sleep(0.05)
                for entry in listed:
                    _data, stat = nodes[entry["partition"]]  # type: ignore[misc]
                    assert entry["epoch"] == stat.czxid
                    assert entry["since"] == pytest.approx(stat.ctime / 1000)

            # connection-url answers from the cache on any instance; the
            # handshake re-checks the instance's own leases (421 elsewhere).
            for k in range(PARTITIONS):
                uid = uid_in_partition(k, PARTITIONS)
                owner = cluster.by_id(owner_of[k])
                other = next(g for g in cluster if g is not owner)
                for gateway in cluster:
                    doc = await get_json(f"{gateway.http_url}/api/connection-url?uid={uid}")
                    assert doc == {
                        "url": owner.ws_url,
                        "partition": k,
                        "instance": owner.instance_id,
                    }
                status, body = await handshake_refusal(other.ws_url, uid)
                assert status == 421, body
                assert body["error"] == "wrong_instance"
                assert body["url"] == owner.ws_url


async def test_deleting_one_lock_node_ends_exactly_that_partition(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    sender = Sender(kafka_bootstrap, cluster_names.topic_prefix, PARTITIONS)
    with trio.fail_after(50):
        async with (
            _start(2, tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as cluster,
            kazoo(zookeeper_hosts, cluster_names.cluster) as zk,
            AsyncExitStack() as sockets,
        ):
            view = await wait_shares(cluster, EVEN)
            gateway = cluster[0]
            mine = view[gateway.instance_id]
            assert len(mine) == PARTITIONS // 2, view
            victim, *others = sorted(mine)
            uids = {k: uid_in_partition(k, PARTITIONS) for k in mine}
            victim_sockets = [
                (await sockets.enter_async_context(chat_socket(gateway.ws_url, uids[victim])))[0]
                for _ in range(2)
            ]
            other_sockets = {
                k: (await sockets.enter_async_context(chat_socket(gateway.ws_url, uids[k])))[0]
                for k in others
            }
            for k, ws in other_sockets.items():
                await sender.send(uids[k], "before")
                assert (await next_message(ws))["body"] == "before"

            deleted_at = time.time()
            await zk.call(zk.client.delete, zk.paths.owner(victim))

            for ws in victim_sockets:
                assert await close_code(ws) == CloseCode.MOVED
            ended = await wait_event(gateway, "lease_ended", partition=victim, after=deleted_at)
            assert ended["reason"] == "lease_lost" and ended["epoch"] == mine[victim]
            stopped = await wait_event(
                gateway, "partition_stopped", partition=victim, after=deleted_at
            )
            assert stopped["reason"] == "lease_lost" and stopped["epoch"] == mine[victim]
            print(f"lock node deleted -> partition stopped: {stopped['ts'] - deleted_at:.3f} s")

            # Someone (most likely the same instance) takes it again, under a newer epoch.
            regained = await wait_held(
                cluster, lambda v: any(h.get(victim, 0) > mine[victim] for h in v.values())
            )
            assert covers(PARTITIONS)(regained)

            # Every other partition: same subtree, same sockets, still delivering.
            for k, ws in other_sockets.items():
                await sender.send(uids[k], "after")
                assert (await next_message(ws))["body"] == "after"
            assert {k: e for k, e in (await held(gateway)).items() if k in others} == {
                k: mine[k] for k in others
            }
            for k in others:
                assert not events(gateway, "partition_stopped", partition=k, after=deleted_at)
            for other_gateway in cluster:
                if other_gateway is not gateway:
                    assert not events(other_gateway, "partition_stopped", after=deleted_at)


def _rewrite_config(gateway: GatewayProcess, **changes: dict[str, Any]) -> None:
    sections = tomllib.loads(gateway.config_path.read_text(encoding="utf-8"))
    gateway.config_path.write_text(render_toml(merge_sections(sections, changes)))


async def test_a_reload_with_a_lower_cap_releases_only_what_must_move(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    sender = Sender(kafka_bootstrap, cluster_names.topic_prefix, PARTITIONS)
    with trio.fail_after(50):
        async with (
            _start(2, tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as cluster,
            AsyncExitStack() as sockets,
        ):
            before = await wait_shares(cluster, EVEN)
            gateway, peer = cluster[0], cluster[1]
            mine = before[gateway.instance_id]
            keep = max(mine)
            uids = {k: uid_in_partition(k, PARTITIONS) for k in mine}
            ws_of: dict[int, list[trio_websocket.WebSocketConnection]] = {}
            for k in mine:
                # The partition with the most sessions is the one kept.
                for _ in range(2 if k == keep else 1):
                    ws, _welcome = await sockets.enter_async_context(
                        chat_socket(gateway.ws_url, uids[k])
                    )
                    ws_of.setdefault(k, []).append(ws)

            _rewrite_config(gateway, partitions={"max_per_instance": 1})
            reloaded_at = time.time()
            gateway.send_signal(__import__("signal").SIGHUP)

            after = await wait_held(
                cluster,
                lambda v: covers(PARTITIONS)(v) and len(v.get(gateway.instance_id, {})) == 1,
            )
            print(f"reload -> {len(mine) - 1} partitions moved: {time.time() - reloaded_at:.3f} s")
            assert after[gateway.instance_id] == {keep: mine[keep]}, "the kept one never moved"
            moved = set(mine) - {keep}
            for k in moved:
                for ws in ws_of[k]:
                    assert await close_code(ws) == CloseCode.MOVED
                stopped = await wait_event(
                    gateway, "partition_stopped", partition=k, after=reloaded_at
                )
                assert stopped["reason"] == "released"
                assert k in after[peer.instance_id]
            # The peer only gained partitions: its own subtrees were not touched.
            assert before[peer.instance_id].items() <= after[peer.instance_id].items()
            assert not events(peer, "partition_stopped", after=reloaded_at)
            # The kept partition's sockets carry on.
            await sender.send(uids[keep], "still here")
            for ws in ws_of[keep]:
                assert (await next_message(ws))["body"] == "still here"
            assert not events(gateway, "partition_stopped", partition=keep, after=reloaded_at)
            assert events(gateway, "reload_applied", after=reloaded_at)


async def test_a_new_instance_gets_its_share_and_a_killed_ones_partitions_are_reowned(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(60 + SESSION_TIMEOUT_S):
        async with _start(2, tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as cluster:
            before = await wait_shares(cluster, {"gw-0": 3, "gw-1": 3})

            started_at = time.monotonic()
            newcomer = cluster.add_instance()
            await newcomer.wait_ready()
            ready_at = time.monotonic()
            shared = await wait_shares(cluster, {"gw-0": 2, "gw-1": 2, "gw-2": 2})
            done_at = time.monotonic()
            print(
                f"new instance: ready {ready_at - started_at:.3f} s after start, "
                f"holds its share {done_at - ready_at:.3f} s after ready"
            )
            for name in ("gw-0", "gw-1"):
                # Only releases: what an old instance kept, it kept under the same epoch.
                assert shared[name].items() <= before[name].items()

            victim = cluster.by_id("gw-1")
            orphaned = set(shared["gw-1"])
            victim.kill()
            await victim.wait_exit(10)
            killed_at = time.monotonic()
            reowned = await wait_shares(
                cluster, {"gw-0": 3, "gw-2": 3}, timeout=SESSION_TIMEOUT_S + 15
            )
            print(
                f"SIGKILL -> its {len(orphaned)} partitions re-owned: "
                f"{time.monotonic() - killed_at:.3f} s (session timeout {SESSION_TIMEOUT_S:g} s)"
            )
            for name in ("gw-0", "gw-2"):
                assert shared[name].items() <= reowned[name].items()


async def test_weights_and_caps_shape_the_shares(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    settings = [{"weight": 2.0}, {"weight": 1.0}, {"max_per_instance": 1}]
    with trio.fail_after(45):
        async with _start(
            3,
            tmp_path,
            zookeeper_hosts,
            kafka_bootstrap,
            cluster_names,
            partitions=7,
            per_instance=lambda i: {"partitions": settings[i]},
        ) as cluster:
            # fair_shares(7, {w=2, w=1, cap 1}) = 4, 2, 1
            await wait_shares(cluster, {"gw-0": 4, "gw-1": 2, "gw-2": 1})
            status, _, doc = await http_get(cluster[0].http_url + "/api/status")
            assert status == 200 and doc["target"] == 4
