"""When the broker fails (CONTRACT v2 §7): outages, a slow broker, under traffic.

Each test runs two gateways against a broker of its own reached only through a
fault proxy (the ``faulty_broker`` fixture), with steady traffic
(support/traffic.py). Whatever the fault: sends that cannot be made durable
get ``unavailable`` (the client resends), never an ack that is then lost;
sockets stay open while the leases are held; ``/readyz`` says 503 while the
broker cannot be reached; delivery and acks resume by themselves; no device
gets an offset twice. Timings are printed (``-s``), never asserted as speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from support.brokerproxy import FaultyBroker
from support.cluster import Cluster, ClusterNames, http_get, start_cluster
from support.leasekit import wait_balanced
from support.traffic import Traffic

from linechatd.client import open_websocket

PARTITIONS = 8
PRODUCE_TIMEOUT_S = 2.0
SECTIONS = {
    # Nothing here is about ZooKeeper: a session a loaded machine keeps.
    "zookeeper": {"session_timeout": 10.0},
    "kafka": {"produce_timeout_s": PRODUCE_TIMEOUT_S},
    "shutdown": {"grace_period_s": 2.0, "drain_stagger_s": 0.0},
    "log": {"format": "json"},
}


def events(cluster: Cluster, name: str, after: float = 0.0) -> list[dict]:
    found = []
    for gateway in cluster.instances:
        for line in gateway.log_text().splitlines():
            if line.startswith("{") and f'"event":"{name}"' in line:
                event = json.loads(line)
                if event["ts"] >= after:
                    found.append(event)
    return found


async def readiness(cluster: Cluster) -> list[int]:
    return [(await http_get(g.http_url + "/readyz"))[0] for g in cluster.instances]


async def wait_readiness(cluster: Cluster, status: int, timeout_s: float = 30.0) -> float:
    """Until every instance answers /readyz with ``status``; seconds it took."""
    started = trio.current_time()
    with trio.fail_after(timeout_s):
        while await readiness(cluster) != [status] * len(cluster.instances):  # noqa: ASYNC110 - other processes
            await trio.sleep(0.1)
    return trio.current_time() - started


async def one_send_answer(cluster: Cluster, uid: str, to: str) -> tuple[dict, float]:
    """Send one message on a fresh socket to its owner; the answer frame and how long it took."""
    _status, _headers, doc = await http_get(f"{cluster[0].http_url}/api/connection-url?uid={uid}")
    async with open_websocket(f"{doc['url']}?uid={uid}") as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        started = trio.current_time()
        await ws.send_message(
            json.dumps({"type": "send", "id": "probe", "to": to, "body": "probe"})
        )
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] in ("ack", "error"):
                return frame, trio.current_time() - started


@pytest.mark.parametrize("outage_s", [5.0, 30.0])
async def test_a_broker_outage_under_traffic_loses_nothing_and_heals_by_itself(
    outage_s: float,
    tmp_path: Path,
    zookeeper_hosts: str,
    faulty_broker: FaultyBroker,
    cluster_names: ClusterNames,
) -> None:
    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=faulty_broker.bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=SECTIONS,
    ) as cluster:
        with trio.fail_after(120 + 2 * outage_s):
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                traffic = await nursery.start(
                    Traffic([g.http_url for g in cluster.instances], 6, "out").run
                )
                await traffic.acks(30)
                before = traffic.sent
                t0 = time.time()
                faulty_broker.proxy.blackhole()
                # A send now is answered "unavailable" within the produce timeout.
                answer, took = await one_send_answer(cluster, "probe-a", "probe-b")
                assert answer["type"] == "error" and answer["code"] == "unavailable", answer
                assert took <= PRODUCE_TIMEOUT_S + 1.0, took
                unready_after = await wait_readiness(cluster, 503, timeout_s=outage_s + 15)
                remaining = outage_s - (time.time() - t0)
                if remaining > 0:
                    await trio.sleep(remaining)  # the outage itself
                restored = time.time()
                faulty_broker.proxy.restore()
                await traffic.acks(30)  # acks resume by themselves
                resumed_after = time.time() - restored
                ready_after = await wait_readiness(cluster, 200)
                report = await traffic.stop()
                nursery.cancel_scope.cancel()
        replaced = events(cluster, "kafka_producer_replaced", after=t0)
        print(
            f"\nbroker blackhole {outage_s:g} s: unavailable answered in {took:.2f} s; "
            f"/readyz 503 after {unready_after:.1f} s; acks resumed {resumed_after:.2f} s "
            f"after the restore, ready again {ready_after:.1f} s later; producers replaced "
            f"{len(replaced)}; {before} acked before; {report.summary()}"
        )
        assert report.lost == [], report.lost[:10]
        assert report.offsets_repeated == 0
        assert report.out_of_order == 0
        # The leases were held throughout: nobody's socket was closed.
        assert report.reconnects == 0, report.summary()
        assert not events(cluster, "partition_stopped", after=t0)


async def test_a_slow_broker_delays_acks_and_loses_nothing(
    tmp_path: Path,
    zookeeper_hosts: str,
    faulty_broker: FaultyBroker,
    cluster_names: ClusterNames,
) -> None:
    sections = {**SECTIONS, "kafka": {"produce_timeout_s": 5.0}}
    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=faulty_broker.bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections,
    ) as cluster:
        with trio.fail_after(180):
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                traffic = await nursery.start(
                    Traffic([g.http_url for g in cluster.instances], 6, "slow").run
                )
                await traffic.acks(30)
                faulty_broker.proxy.delay(0.5)
                slow_answer, slow_took = await one_send_answer(cluster, "slow-a", "slow-b")
                await traffic.acks(30)
                faulty_broker.proxy.restore()
                await traffic.acks(30)
                report = await traffic.stop()
                nursery.cancel_scope.cancel()
        print(
            f"\nbroker delay 0.5 s each way: one send acked in {slow_took:.2f} s; "
            f"{report.summary()}"
        )
        assert slow_answer["type"] == "ack", slow_answer
        assert slow_took >= 1.0  # a round trip through the delay, at least
        assert report.lost == [] and report.offsets_repeated == 0 and report.out_of_order == 0
        assert report.reconnects == 0


async def test_an_owner_that_cannot_reach_the_broker_gives_its_partitions_up(
    tmp_path: Path,
    zookeeper_hosts: str,
    faulty_broker: FaultyBroker,
    cluster_names: ClusterNames,
) -> None:
    """The zombie owner: gw-0 keeps ZooKeeper but loses the broker; gw-1 does not."""
    release_s = 3.0
    sections = {**SECTIONS, "kafka": {**SECTIONS["kafka"], "unhealthy_release_s": release_s}}
    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=faulty_broker.bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections,
    ) as cluster:
        zombie, healthy = cluster[0], cluster[1]
        with trio.fail_after(180):
            shares = await wait_balanced(cluster, PARTITIONS)
            zombie_held = set(shares[zombie.instance_id])
            assert zombie_held, "the zombie must hold partitions for the test to mean anything"
            async with trio.open_nursery() as nursery:
                traffic = await nursery.start(
                    Traffic([healthy.http_url, zombie.http_url], 6, "zombie").run
                )
                await traffic.acks(30)
                t0 = time.time()
                faulty_broker.proxy.cut(pid=zombie.pid)
                # Every partition of the zombie moves to the healthy instance.
                while True:
                    _s, _h, view = await http_get(healthy.http_url + "/api/status")
                    if {p["partition"] for p in view["partitions"]} == set(range(PARTITIONS)):
                        break
                    await trio.sleep(0.1)
                moved_after = time.time() - t0
                await traffic.acks(30)
                # Health back: the zombie takes its share again.
                faulty_broker.proxy.restore(pid=zombie.pid)
                await wait_balanced(cluster, PARTITIONS, timeout=60)
                await traffic.acks(30)
                report = await traffic.stop()
                nursery.cancel_scope.cancel()
        released = [
            e
            for e in events(cluster, "partition_stopped", after=t0)
            if e["reason"] == "kafka_unreachable"
        ]
        print(
            f"\nzombie owner: its {len(zombie_held)} partitions moved {moved_after:.1f} s after "
            f"its broker link was cut (unhealthy_release_s {release_s:g}); {report.summary()}"
        )
        assert moved_after >= release_s, "a blip shorter than unhealthy_release_s moves nothing"
        assert {e["partition"] for e in released} >= zombie_held
        assert report.lost == [] and report.offsets_repeated == 0 and report.out_of_order == 0
