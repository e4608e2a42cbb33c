"""The ``faulty_broker`` fixture: a broker every connection reaches through a FaultProxy.

Producers run in processes of their own (support/probe_producer.py), as
gateways do, so that faults can be applied to one process and not another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from confluent_kafka.admin import AdminClient, NewTopic
from support.brokerproxy import FaultyBroker
from support.cluster import ClusterNames, start_cluster
from support.faultproxy import Mode
from support.leasekit import FAST_SECTIONS, uid_in_partition, wait_shares

from linechatd.client import connect

TESTS_DIR = Path(__file__).resolve().parents[1]
WAIT_S = 60
DELAY_S = 0.3


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    futures[topic].result(timeout=30)


@dataclass
class Probe:
    """A probe producer process and every answer it reported so far."""

    process: trio.Process
    answers: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    def acks(self) -> list[dict[str, Any]]:
        return [a for a in self.answers if a["ok"]]

    def failures(self) -> list[dict[str, Any]]:
        return [a for a in self.answers if not a["ok"]]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` holds, checked after each new answer."""
        while not condition():
            self.changed = trio.Event()
            await self.changed.wait()

    async def read(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async for chunk in self.process.stdout:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self.answers.extend(json.loads(line) for line in lines if line)
            self.changed.set()


@asynccontextmanager
async def probe(bootstrap: str, topic: str) -> AsyncIterator[Probe]:
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "support.probe_producer", bootstrap, topic],
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
                check=False,
            )
        )
        found = Probe(process)
        nursery.start_soon(found.read)
        yield found
        nursery.cancel_scope.cancel()


async def test_a_fault_for_everyone_reaches_every_connection(
    faulty_broker: FaultyBroker,
) -> None:
    """A client given ``bootstrap`` only ever talks to the broker through the proxy."""
    bootstrap, proxy = faulty_broker.bootstrap, faulty_broker.proxy
    assert bootstrap != faulty_broker.broker.address
    topic = "fault-everyone"
    with trio.fail_after(WAIT_S):
        await trio.to_thread.run_sync(_create_topic, bootstrap, topic)
        async with probe(bootstrap, topic) as producer:
            await producer.wait_until(lambda: len(producer.acks()) >= 5)
            assert proxy.connections_of(producer.pid) >= 1, proxy.statistics()

            # Blackhole: the producer's connections stay open and nothing is acked.
            proxy.blackhole()
            await producer.wait_until(lambda: producer.answers[-1]["ok"] is False)
            failed_at = len(producer.answers)
            await producer.wait_until(lambda: len(producer.answers) >= failed_at + 2)
            assert not any(a["ok"] for a in producer.answers[failed_at:]), producer.answers[-3:]

            # Cut: no connection of anyone passes.
            proxy.cut()
            assert proxy.statistics().open_connections == 0
            cut_at = len(producer.answers)
            await producer.wait_until(lambda: len(producer.answers) >= cut_at + 2)
            assert not any(a["ok"] for a in producer.answers[cut_at:])
            assert proxy.statistics().open_connections == 0

            proxy.restore()
            restored_at = len(producer.answers)
            await producer.wait_until(
                lambda: len(producer.acks()) >= 1 and producer.answers[-1]["ok"]
            )
            print(
                f"\neveryone: {len(producer.acks())} acked, {len(producer.failures())} failed; "
                f"acked again {len(producer.answers) - restored_at} answers after restore"
            )


async def test_delay_slows_every_round_trip_to_the_broker(faulty_broker: FaultyBroker) -> None:
    bootstrap, proxy = faulty_broker.bootstrap, faulty_broker.proxy
    topic = "fault-delay"
    with trio.fail_after(WAIT_S):
        await trio.to_thread.run_sync(_create_topic, bootstrap, topic)
        async with probe(bootstrap, topic) as producer:
            await producer.wait_until(lambda: len(producer.acks()) >= 3)
            proxy.delay(DELAY_S)
            delayed_from = len(producer.answers)
            # The record in flight when the delay began may have been sent before it.
            await producer.wait_until(lambda: len(producer.acks()) >= delayed_from + 4)
            delayed = producer.answers[delayed_from + 1 :]
            assert all(a["ok"] for a in delayed), delayed
            # Request and response each wait DELAY_S: a lower bound, never an upper one.
            assert min(a["latency_s"] for a in delayed) >= 2 * DELAY_S, delayed
            proxy.restore()
            assert proxy.mode is Mode.PASS
            print(
                f"\ndelay {DELAY_S} s each way: ack latencies "
                f"{[round(a['latency_s'], 3) for a in delayed]} s"
            )


async def test_a_fault_for_one_process_leaves_the_others_alone(
    faulty_broker: FaultyBroker,
) -> None:
    """The zombie owner's set-up: one process loses the broker, the other keeps producing."""
    bootstrap, proxy = faulty_broker.bootstrap, faulty_broker.proxy
    topic = "fault-one"
    with trio.fail_after(WAIT_S):
        await trio.to_thread.run_sync(_create_topic, bootstrap, topic)
        async with probe(bootstrap, topic) as cut_off, probe(bootstrap, topic) as healthy:
            await cut_off.wait_until(lambda: len(cut_off.acks()) >= 5)
            await healthy.wait_until(lambda: len(healthy.acks()) >= 5)
            assert cut_off.pid != healthy.pid
            assert proxy.connections_of(cut_off.pid) >= 1
            assert proxy.connections_of(healthy.pid) >= 1

            proxy.cut(pid=cut_off.pid)
            assert proxy.fault_for(cut_off.pid).mode is Mode.CUT
            assert proxy.fault_for(healthy.pid).mode is Mode.PASS
            assert proxy.connections_of(cut_off.pid) == 0
            # Sequential answers: once one failed, none after it may succeed while cut.
            await cut_off.wait_until(lambda: cut_off.answers[-1]["ok"] is False)
            first_failure = len(cut_off.answers) - 1
            healthy_then = len(healthy.acks())
            await healthy.wait_until(lambda: len(healthy.acks()) >= healthy_then + 20)
            await cut_off.wait_until(lambda: len(cut_off.answers) >= first_failure + 2)
            while_cut = cut_off.answers[first_failure:]
            assert not any(a["ok"] for a in while_cut), while_cut
            assert proxy.connections_of(cut_off.pid) == 0
            assert proxy.connections_of(healthy.pid) >= 1
            healthy_while_cut = len(healthy.acks()) - healthy_then

            proxy.restore(pid=cut_off.pid)
            restored_at = len(cut_off.answers)
            await cut_off.wait_until(lambda: any(a["ok"] for a in cut_off.answers[restored_at:]))
            print(
                f"\none process cut: {len(while_cut)} of its sends failed meanwhile, the other "
                f"got {healthy_while_cut} acks; the cut one acks again after restore"
            )


async def test_gateways_are_told_apart_and_one_can_lose_the_broker_alone(
    tmp_path: Path,
    zookeeper_hosts: str,
    cluster_names: ClusterNames,
    faulty_broker: FaultyBroker,
) -> None:
    """The zombie owner's set-up with real gateways: librdkafka's sockets are the gateway's.

    Only the infrastructure is checked here: the cut gateway's connections
    are gone and refused, the other gateway serves its users meanwhile.
    """
    proxy = faulty_broker.proxy
    with trio.fail_after(WAIT_S):
        async with start_cluster(
            2,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=faulty_broker.bootstrap,
            names=cluster_names,
            partitions=4,
            sections=FAST_SECTIONS,
        ) as cluster:
            view = await wait_shares(cluster, {"gw-0": 2, "gw-1": 2})
            cut_off, healthy = cluster[0], cluster[1]
            assert cut_off.pid is not None and healthy.pid is not None
            assert proxy.connections_of(cut_off.pid) >= 1, proxy.statistics()
            assert proxy.connections_of(healthy.pid) >= 1, proxy.statistics()

            k = min(view[healthy.instance_id])
            alice, bob = (uid_in_partition(k, 4, name) for name in ("alice", "bob"))
            async with connect(healthy.http_url, alice) as a, connect(healthy.http_url, bob) as b:
                refused_before = proxy.statistics().refused_connections
                proxy.cut(pid=cut_off.pid)
                assert proxy.connections_of(cut_off.pid) == 0
                for i in range(20):
                    ack = await a.send(bob, {"i": i}, timeout_s=20)
                    message = await b.receive(timeout_s=20)
                    assert (message.body, message.offset) == ({"i": i}, ack.offset)
                # Whatever the cut gateway retried was refused.
                assert proxy.connections_of(cut_off.pid) == 0
                assert proxy.connections_of(healthy.pid) >= 1
                refused = proxy.statistics().refused_connections - refused_before
            proxy.restore(pid=cut_off.pid)
            print(
                f"\none gateway cut: 20 messages through the other; "
                f"{refused} connections of the cut one refused meanwhile"
            )
