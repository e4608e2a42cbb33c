"""Losing ZooKeeper: an instance stops its partitions before anyone else may own them.

gw-0 reaches ZooKeeper through a FaultProxy, gw-1 directly. Each test breaks
gw-0's link (cut, blackhole, delay) and reads both instances' own reports:
gw-0 must have stopped every partition subtree before gw-1 starts one of them,
and gw-0 must come back (same session: same leases; expired: re-contending).

The numbers printed are the policy's timing: SUSPENDED is declared T/2 after
the newest answered request at the latest (zk.py), the server expires the
session T after the last request it received, T = session timeout.

Tests that assert nothing happened (the session survived, no event) use a
longer T: under a short one a loaded machine's own stall of a second or so
reaches T/2 and makes things happen that the test did not cause.
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from support.cluster import ClusterNames, GatewayProcess, http_get, merge_sections, start_cluster
from support.faultproxy import FaultProxy
from support.leasekit import (
    FAST_SECTIONS,
    Event,
    Sender,
    chat_socket,
    close_code,
    events,
    held,
    kazoo,
    next_message,
    uid_in_partition,
    wait_event,
    wait_shares,
)

from linechatd.protocol import CloseCode

PARTITIONS = 4
SESSION_TIMEOUT_S = 3.0
# For the tests in which nothing may happen but what the test does.
STALL_PROOF_SESSION_TIMEOUT_S = 8.0
EVEN = {"gw-0": 2, "gw-1": 2}


@pytest.fixture
async def zk_proxy(nursery: trio.Nursery, zookeeper_hosts: str) -> FaultProxy:
    proxy: FaultProxy = await nursery.start(FaultProxy.to(zookeeper_hosts).run)
    return proxy


def _cluster(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    names: ClusterNames,
    proxy: FaultProxy,
    session_timeout_s: float = SESSION_TIMEOUT_S,
) -> Any:
    return start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=names,
        partitions=PARTITIONS,
        sections=merge_sections(
            FAST_SECTIONS, {"zookeeper": {"session_timeout": session_timeout_s}}
        ),
        per_instance=lambda i: {"zookeeper": {"hosts": proxy.address}} if i == 0 else None,
    )


async def _handover(
    old: GatewayProcess, new: GatewayProcess, partitions: dict[int, int], since: float
) -> tuple[list[Event], list[Event]]:
    """old's partition_stopped and new's partition_started events for ``partitions``."""
    started = [
        await wait_event(new, "partition_started", partition=k, after=since, timeout=30)
        for k in partitions
    ]
    stopped = [
        await wait_event(old, "partition_stopped", partition=k, epoch=e, after=since)
        for k, e in partitions.items()
    ]
    last_stop = max(e["ts"] for e in stopped)
    first_start = min(e["ts"] for e in started)
    assert last_stop < first_start, (
        f"{old.instance_id} still ran a partition {last_stop - first_start:.3f} s "
        f"after {new.instance_id} started one"
    )
    for event in started:
        assert event["epoch"] > partitions[event["partition"]], "epochs only grow"
    return stopped, started


def _expiry(deleted: dict[int, float], partitions: dict[int, int], stopped: list[Event]) -> float:
    """When the old session's lock nodes went; the old owner had stopped before that."""
    assert set(deleted) == set(partitions), f"lock nodes deleted: {deleted}"
    expired = min(deleted.values())
    assert max(e["ts"] for e in stopped) < expired, "still running when the session expired"
    return expired


async def _sockets(
    stack: AsyncExitStack, gateway: GatewayProcess, partitions: dict[int, int]
) -> dict[int, Any]:
    return {
        k: (
            await stack.enter_async_context(
                chat_socket(gateway.ws_url, uid_in_partition(k, PARTITIONS))
            )
        )[0]
        for k in partitions
    }


async def test_blackhole_stops_partitions_before_the_session_can_expire(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
    zk_proxy: FaultProxy,
) -> None:
    with trio.fail_after(55):
        async with (
            _cluster(
                tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names, zk_proxy
            ) as cluster,
            AsyncExitStack() as stack,
        ):
            a, b = cluster[0], cluster[1]
            mine = (await wait_shares(cluster, EVEN))[a.instance_id]
            sockets = await _sockets(stack, a, mine)
            zk = await stack.enter_async_context(kazoo(zookeeper_hosts, cluster_names.cluster))
            deleted = await zk.watch_deleted(list(mine))

            t0 = time.time()
            zk_proxy.blackhole()
            suspended = await wait_event(a, "zookeeper_session", state="suspended", after=t0)
            for ws in sockets.values():
                assert await close_code(ws) == CloseCode.MOVED
            status, _, _ = await http_get(a.http_url + "/readyz")
            assert status == 503, "not ready while ZooKeeper cannot be trusted"
            stopped, started = await _handover(a, b, mine, t0)
            assert {e["reason"] for e in stopped} == {"zookeeper_session"}
            expired = _expiry(deleted, mine, stopped)
            print(
                f"blackhole (T={SESSION_TIMEOUT_S:g} s): suspended after "
                f"{suspended['ts'] - t0:.3f} s, partitions stopped after "
                f"{max(e['ts'] for e in stopped) - t0:.3f} s, session expired after "
                f"{expired - t0:.3f} s, owned by {b.instance_id} after "
                f"{min(e['ts'] for e in started) - t0:.3f} s "
                f"({min(e['ts'] for e in started) - expired:.3f} s after the expiry)"
            )

            # The session is gone: once ZooKeeper answers again gw-0 starts a
            # new one and contends from scratch.
            zk_proxy.restore()
            restored = time.time()
            await wait_event(
                a,
                "zookeeper_session",
                state="connected",
                after=t0,
                where=lambda e: e["generation"] == 2,
                timeout=20,
            )
            await wait_shares(cluster, EVEN, timeout=20)
            print(f"after restore: gw-0 holds its share again after {time.time() - restored:.3f} s")


async def test_a_short_cut_keeps_the_session_the_leases_and_the_sockets(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
    zk_proxy: FaultProxy,
) -> None:
    """A dropped connection that kazoo restores within T/2 changes nothing.

    The server cannot expire the session before T has passed since it last
    heard from it, so the leases stay trusted (the lease clock decides, not
    the connection): no partition stops, no socket closes.
    """
    with trio.fail_after(60):
        async with (
            _cluster(
                tmp_path,
                zookeeper_hosts,
                kafka_bootstrap,
                cluster_names,
                zk_proxy,
                STALL_PROOF_SESSION_TIMEOUT_S,
            ) as cluster,
            AsyncExitStack() as stack,
        ):
            a, b = cluster[0], cluster[1]
            mine = (await wait_shares(cluster, EVEN))[a.instance_id]
            sockets = await _sockets(stack, a, mine)

            t0 = time.time()
            zk_proxy.cut()
            lost = await wait_event(a, "zookeeper_connection", state="suspended", after=t0)
            await trio.sleep(0.3)  # the cut itself, well under T/2
            zk_proxy.restore()
            back = await wait_event(a, "zookeeper_connection", state="connected", after=t0)

            # Same session, same leases, every socket still open.
            assert not events(a, "partition_stopped", after=t0)
            assert not events(a, "zookeeper_session", state="suspended", after=t0)
            assert not events(b, "partition_started", after=t0)
            view = await wait_shares(cluster, EVEN)
            assert view[a.instance_id] == mine
            for ws in sockets.values():
                await ws.send_message(json.dumps({"type": "ping"}))
                assert json.loads(await ws.get_message())["type"] == "pong"
            print(
                f"cut: connection lost after {lost['ts'] - t0:.3f} s, back after "
                f"{back['ts'] - t0:.3f} s (restored at 0.3 s); nothing stopped"
            )


async def test_a_long_cut_expires_the_session_and_the_instance_recontends(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
    zk_proxy: FaultProxy,
) -> None:
    with trio.fail_after(50):
        async with (
            _cluster(
                tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names, zk_proxy
            ) as cluster,
            kazoo(zookeeper_hosts, cluster_names.cluster) as zk,
        ):
            a, b = cluster[0], cluster[1]
            mine = (await wait_shares(cluster, EVEN))[a.instance_id]
            deleted = await zk.watch_deleted(list(mine))

            # Cut just after an answer: the server has just heard from gw-0.
            heard = await zk_proxy.wait_answer()
            t0 = time.time()
            zk_proxy.cut()
            stopped, started = await _handover(a, b, mine, t0)
            first_start = min(e["ts"] for e in started)
            expired = _expiry(deleted, mine, stopped)
            print(
                f"cut for good (T={SESSION_TIMEOUT_S:g} s): partitions stopped after "
                f"{max(e['ts'] for e in stopped) - t0:.3f} s, session expired after "
                f"{expired - t0:.3f} s, owned by {b.instance_id} after {first_start - t0:.3f} s "
                f"({first_start - expired:.3f} s after the expiry)"
            )
            # The server heard gw-0 last when it answered, just before the cut
            # (within the T/6 slack, whatever stalled gw-0 before it).
            assert expired - heard >= SESSION_TIMEOUT_S * 5 / 6 - 0.1, "expired too early?"

            zk_proxy.restore()
            await wait_event(
                a,
                "zookeeper_session",
                state="connected",
                after=t0,
                where=lambda e: e["generation"] == 2,
                timeout=20,
            )
            view = await wait_shares(cluster, EVEN, timeout=20)
            assert set(view[a.instance_id]).isdisjoint(mine) or all(
                view[a.instance_id][k] > mine[k] for k in view[a.instance_id] if k in mine
            ), "new leases, new epochs"


async def test_delay_below_the_threshold_disturbs_nothing_above_it_hands_over(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
    zk_proxy: FaultProxy,
) -> None:
    session_timeout_s = STALL_PROOF_SESSION_TIMEOUT_S
    sender = Sender(kafka_bootstrap, cluster_names.topic_prefix, PARTITIONS)
    with trio.fail_after(100):
        async with (
            _cluster(
                tmp_path,
                zookeeper_hosts,
                kafka_bootstrap,
                cluster_names,
                zk_proxy,
                session_timeout_s,
            ) as cluster,
            AsyncExitStack() as stack,
        ):
            a, b = cluster[0], cluster[1]
            mine = (await wait_shares(cluster, EVEN))[a.instance_id]
            sockets = await _sockets(stack, a, mine)

            t0 = time.time()
            zk_proxy.delay(session_timeout_s / 30)  # round trips of T/15, well within T/6
            await trio.sleep(session_timeout_s * 2 / 3)
            for k, ws in sockets.items():
                uid = uid_in_partition(k, PARTITIONS)
                await sender.send(uid, "slow but fine")
                assert (await next_message(ws))["body"] == "slow but fine"
            assert await held(a) == mine
            assert not events(a, "partition_stopped", after=t0)
            assert not events(a, "zookeeper_session", after=t0)

            # Round trips of 2T/3: ZooKeeper still answers, but too late to trust
            # the session; gw-0 stops, gives the session up, gw-1 takes over.
            zk = await stack.enter_async_context(kazoo(zookeeper_hosts, cluster_names.cluster))
            deleted = await zk.watch_deleted(list(mine))
            t1 = time.time()
            zk_proxy.delay(session_timeout_s / 3)
            stopped, started = await _handover(a, b, mine, t1)
            for ws in sockets.values():
                assert await close_code(ws) == CloseCode.MOVED
            abandoned = await wait_event(a, "zookeeper_session_abandoned", after=t1)
            closed = _expiry(deleted, mine, stopped)
            print(
                f"delay {session_timeout_s / 3:.2f} s each way (T={session_timeout_s:g} s): "
                "partitions stopped after "
                f"{max(e['ts'] for e in stopped) - t1:.3f} s, session abandoned after "
                f"{abandoned['ts'] - t1:.3f} s, its lease nodes gone after {closed - t1:.3f} s, "
                f"owned by {b.instance_id} after {min(e['ts'] for e in started) - t1:.3f} s"
            )

            zk_proxy.restore()
            await wait_shares(cluster, EVEN, timeout=40)
