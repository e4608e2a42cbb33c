"""When ZooKeeper fails (CONTRACT v2 §7): a leader election, the whole ensemble down, a cold start.

Gateways run against a three-server ensemble (``zookeeper_ensemble``; tickTime
500 ms) under steady traffic (support/traffic.py). A leader failover that the
ensemble completes within T/2 stops no partition; the whole ensemble down
stops every partition before the sessions could expire (1012 to their
sockets), connection-url then answers 503 with Retry-After, the processes keep
running, and once ZooKeeper is back every partition is owned again within
T + 5 s and nothing acked is lost. An instance started while ZooKeeper or the
broker is unreachable waits (logged, not ready) instead of exiting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
from support.brokerproxy import FaultyBroker
from support.cluster import Cluster, ClusterNames, http_get, start_cluster
from support.ensemble import EnsembleControl
from support.faultproxy import FaultProxy
from support.leasekit import wait_balanced
from support.traffic import Traffic

PARTITIONS = 8
SESSION_TIMEOUT_S = 6.0


def events(cluster: Cluster, name: str, after: float = 0.0) -> list[dict]:
    found = []
    for gateway in cluster.instances:
        for line in gateway.log_text().splitlines():
            if line.startswith("{") and f'"event":"{name}"' in line:
                event = json.loads(line)
                if event["ts"] >= after:
                    found.append({**event, "gateway": gateway.instance_id})
    return found


def sections(**extra: dict[str, object]) -> dict[str, dict[str, object]]:
    base: dict[str, dict[str, object]] = {
        "zookeeper": {"session_timeout": SESSION_TIMEOUT_S},
        "shutdown": {"grace_period_s": 2.0, "drain_stagger_s": 0.0},
        "log": {"format": "json"},
    }
    for table, values in extra.items():
        base.setdefault(table, {}).update(values)
    return base


async def test_a_leader_failover_within_half_the_session_timeout_stops_no_partition(
    tmp_path: Path,
    zookeeper_ensemble_control: EnsembleControl,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
) -> None:
    ensemble = zookeeper_ensemble_control
    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=ensemble.hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections(),
    ) as cluster:
        with trio.fail_after(180):
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                traffic = await nursery.start(
                    Traffic([g.http_url for g in cluster.instances], 6, "elect").run
                )
                await traffic.acks(30)
                old_leader = await ensemble.leader()
                t0 = time.time()
                ensemble.kill(old_leader)
                while True:
                    modes = await ensemble.modes()
                    if "leader" in modes.values():
                        break
                    await trio.sleep(0.05)
                elected = time.time() - t0
                await traffic.acks(30)
                await ensemble.start(old_leader)
                await traffic.acks(30)
                report = await traffic.stop()
                nursery.cancel_scope.cancel()
        stopped = events(cluster, "partition_stopped", after=t0)
        suspended = events(cluster, "zookeeper_session", after=t0)
        print(
            f"\nleader {old_leader} killed: new leader after {elected:.2f} s "
            f"(T/2 = {SESSION_TIMEOUT_S / 2:g} s); session state changes "
            f"{[e['state'] for e in suspended]}; partitions stopped {len(stopped)}; "
            f"{report.summary()}"
        )
        assert elected < SESSION_TIMEOUT_S / 2, "the election itself took longer than T/2"
        assert stopped == [], stopped
        assert report.lost == [] and report.offsets_repeated == 0 and report.out_of_order == 0
        assert report.reconnects == 0, report.summary()


async def test_the_whole_ensemble_down_stops_partitions_in_time_and_heals(
    tmp_path: Path,
    zookeeper_ensemble_control: EnsembleControl,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
) -> None:
    ensemble = zookeeper_ensemble_control
    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=ensemble.hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections(),
    ) as cluster:
        with trio.fail_after(240):
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                traffic = await nursery.start(
                    Traffic([g.http_url for g in cluster.instances], 6, "down").run
                )
                await traffic.acks(30)
                t0 = time.time()
                await ensemble.stop_all()
                stopped_at = time.time()
                # Every partition stops before a session could expire.
                while len(events(cluster, "partition_stopped", after=t0)) < PARTITIONS:  # noqa: ASYNC110 - other processes' logs
                    await trio.sleep(0.1)
                all_stopped = time.time() - t0
                # connection-url: 503 with Retry-After, from every instance.
                for gateway in cluster.instances:
                    status, headers, doc = await http_get(
                        f"{gateway.http_url}/api/connection-url?uid=someone"
                    )
                    assert (status, doc["error"]) == (503, "no_owner"), doc
                    assert int(headers["retry-after"]) >= 1
                    assert (await http_get(gateway.http_url + "/readyz"))[0] == 503
                # Down for twice the session timeout; the processes keep running.
                await trio.sleep(max(0.0, 2 * SESSION_TIMEOUT_S - (time.time() - stopped_at)))
                assert all(g.is_running() for g in cluster.instances)
                restarted = time.time()
                await ensemble.start_all()
                back = time.time()
                await wait_balanced(cluster, PARTITIONS, timeout=SESSION_TIMEOUT_S + 30)
                owned_after = time.time() - back
                await traffic.acks(30)
                report = await traffic.stop()
                nursery.cancel_scope.cancel()
        reasons = {e["reason"] for e in events(cluster, "partition_stopped", after=t0)}
        print(
            f"\nwhole ensemble down {back - t0:.1f} s (restart took {back - restarted:.1f} s): "
            f"every partition stopped {all_stopped:.2f} s after the stop (T/2 = "
            f"{SESSION_TIMEOUT_S / 2:g} s), owned again {owned_after:.2f} s after ZooKeeper "
            f"was back; {report.summary()}"
        )
        assert reasons == {"zookeeper_session"}, reasons
        assert all_stopped < SESSION_TIMEOUT_S, "a partition outlived its session's guarantee"
        assert owned_after <= SESSION_TIMEOUT_S + 5, owned_after
        assert report.lost == [] and report.offsets_repeated == 0 and report.out_of_order == 0


async def test_an_instance_started_without_zookeeper_or_broker_waits_for_them(
    tmp_path: Path,
    nursery: trio.Nursery,
    zookeeper_hosts: str,
    faulty_broker: FaultyBroker,
    cluster_names: ClusterNames,
) -> None:
    zk_proxy: FaultProxy = await nursery.start(FaultProxy.to(zookeeper_hosts).run)
    zk_proxy.cut()
    faulty_broker.proxy.cut()
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zk_proxy.address,
        kafka_bootstrap=faulty_broker.bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections(zookeeper={"connect_timeout_s": 2.0}),
        wait_ready=False,
    ) as cluster:
        gateway = cluster[0]
        with trio.fail_after(120):
            # Waiting for ZooKeeper: logged, still running, not ready.
            while not [e for e in events(cluster, "startup_waiting") if e["for"] == "zookeeper"]:
                gateway._raise_if_exited("while waiting for ZooKeeper")
                await trio.sleep(0.1)
            zk_proxy.restore()
            # Then for the broker.
            while not [e for e in events(cluster, "startup_waiting") if e["for"] == "kafka"]:
                gateway._raise_if_exited("while waiting for the broker")
                await trio.sleep(0.1)
            assert gateway.is_running()
            faulty_broker.proxy.restore()
            await gateway.wait_ready(60)
            await wait_balanced(cluster, PARTITIONS)
        waits = [e["for"] for e in events(cluster, "startup_waiting")]
        print(f"\nstarted after waiting: {waits}")
