"""The message path end to end: three gateways on a real ZooKeeper and broker.

Sends, acks, delivery, multi-device fan-out, offline storage and resume, the
answers to bad input, and a reader that stops reading. Latencies are printed
(run with ``-s`` to see them), never asserted.

LINECHAT_TEST_LINGER_MS and LINECHAT_TEST_FETCH_WAIT_MS set ``[kafka]
linger_ms`` and ``fetch_wait_max_ms`` for every cluster started here, for
measuring their effect on the 20x50 latencies.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import trio
import trio_websocket
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from kazoo.client import KazooClient
from support.cluster import Cluster, ClusterNames, http_get, merge_sections, start_cluster
from support.leasekit import events
from support.procnet import tcp_socket

from linechatd.client import ChatClient, Message, connect, open_websocket
from linechatd.hashing import partition_for
from linechatd.ownership import ZkPaths
from linechatd.protocol import ChatRecord, CloseCode, decode_record, encode_record

PARTITIONS = 8
INSTANCES = 3
# Generous: a shared 2-core CI machine can be many times slower than a laptop.
TEST_TIMEOUT_S = 90.0

BASE_SECTIONS: dict[str, dict[str, Any]] = {
    # Nothing here kills an instance, and sessions closed by a stall of a
    # loaded machine (T/2 after its last answer) would fail these tests.
    "zookeeper": {"session_timeout": 10.0},
    "limits": {"bad_frames_per_minute": 5, "max_frame_bytes": 4096},
    # Every instance stops at once at the end of a test: nobody is left to hand
    # partitions to, so a drain would only wait out its grace period.
    "shutdown": {"grace_period_s": 1.0, "drain_stagger_s": 0.0},
}


def _kafka_overrides() -> dict[str, dict[str, Any]]:
    kafka: dict[str, Any] = {}
    if linger := os.environ.get("LINECHAT_TEST_LINGER_MS"):
        kafka["linger_ms"] = int(linger)
    if fetch_wait := os.environ.get("LINECHAT_TEST_FETCH_WAIT_MS"):
        kafka["fetch_wait_max_ms"] = int(fetch_wait)
    return {"kafka": kafka} if kafka else {}


# --- cluster helpers -------------------------------------------------------------------


async def partition_owners(cluster: Cluster) -> list[str | None]:
    """Owner instance id of each partition, as instance 0 sees it."""
    status, _headers, doc = await http_get(cluster[0].http_url + "/api/partitions")
    assert status == 200, doc
    return [p["instance"] for p in doc["partitions"]]


async def wait_balanced(cluster: Cluster) -> list[str | None]:
    """Wait until every partition has an owner and no instance is above its share.

    Past that point the balancer moves nothing, so sessions are not closed
    with 1012 under a test's feet.
    """
    ids = {gateway.instance_id for gateway in cluster.instances}
    share = math.ceil(PARTITIONS / len(ids))
    while True:
        owners = await partition_owners(cluster)
        counts = {i: owners.count(i) for i in ids}
        if None not in owners and all(0 < n <= share for n in counts.values()):
            return owners
        await trio.sleep(0.05)


async def wait_serving(cluster: Cluster, owners: list[str | None]) -> None:
    """Wait until each partition's owner accepts WebSockets for it.

    A lease shows in ZooKeeper a little before its owner's consumer is open;
    meanwhile the owner answers 421.
    """
    for k, owner in enumerate(owners):
        assert owner is not None
        url = f"{ws_url_of(cluster, owner)}?{ws_query(uid=uid_in(k, 'probe'))}"
        while True:
            try:
                async with open_websocket(url) as ws:
                    await expect_frame(ws, "welcome")
                    break
            except trio_websocket.ConnectionRejected as rejected:
                assert rejected.status_code == 421, rejected
            await trio.sleep(0.05)


@asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    names: ClusterNames,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[tuple[Cluster, list[str | None]]]:
    async with start_cluster(
        INSTANCES,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=names,
        partitions=PARTITIONS,
        sections=merge_sections(BASE_SECTIONS, _kafka_overrides(), sections),
    ) as cluster:
        with trio.fail_after(30):
            owners = await wait_balanced(cluster)
            await wait_serving(cluster, owners)
        yield cluster, owners


def uid_in(partition: int, prefix: str) -> str:
    """A fresh uid that hashes to ``partition``."""
    while True:
        uid = f"{prefix}-{secrets.token_hex(3)}"
        if partition_for(uid, PARTITIONS) == partition:
            return uid


def uid_owned_by(owners: list[str | None], instance: str, prefix: str) -> str:
    return uid_in(owners.index(instance), prefix)


def ws_url_of(cluster: Cluster, instance: str) -> str:
    return cluster.by_id(instance).ws_url


def ws_query(**params: str | int) -> str:
    return urlencode({k: str(v) for k, v in params.items()})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_line(label: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{label}: n={len(ms)} p50={percentile(ms, 0.50):.1f}ms "
        f"p99={percentile(ms, 0.99):.1f}ms max={max(ms):.1f}ms"
    )


def read_kafka_record(bootstrap: str, topic: str, offset: int) -> tuple[bytes | None, bytes | None]:
    """(key, value) of the record at ``offset`` of ``topic``, read with a plain consumer."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-test-reader",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, offset)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            assert message.offset() == offset
            return message.key(), message.value()
        raise AssertionError(f"no record at {topic}@{offset} within 20 s")
    finally:
        consumer.close()


async def metric_value(cluster: Cluster, instance: str, name: str) -> float:
    """The value of one sample (``name`` with its labels) from an instance's /metrics."""
    status, _headers, text = await http_get(cluster.by_id(instance).http_url + "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def expect_frame(ws: trio_websocket.WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next frame that is not a message, which must be of type ``kind``."""
    with trio.fail_after(10):
        frame: dict[str, Any] = json.loads(await ws.get_message())
    assert frame["type"] == kind, frame
    return frame


async def expect_close(ws: trio_websocket.WebSocketConnection, code: int) -> None:
    with trio.fail_after(10):
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    reason = closed.value.reason
    assert reason is not None and reason.code == code, reason


def check_message(message: Message, sender: ChatClient, to: str, sent: dict[str, Any]) -> None:
    """Every field of a delivered message against what was sent and acknowledged."""
    assert message.from_uid == sender.uid
    assert message.from_device == sender.device
    assert message.to == to
    assert message.id == sent["id"]
    assert message.body == sent["body"]
    assert (message.partition, message.offset) == (sent["partition"], sent["offset"])
    assert message.partition == partition_for(to, PARTITIONS)
    # ts is the gateway's wall clock when it produced the record.
    assert sent["wall"] - 1000 <= message.ts <= time.time() * 1000 + 1000


# --- tests ---------------------------------------------------------------------------------


async def test_users_on_different_instances_exchange_messages(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
            cluster,
            owners,
        ):
            alice = uid_owned_by(owners, "gw-0", "alice")
            bob = uid_owned_by(owners, "gw-1", "bob")
            # Both ask the third instance: connection-url sends each to its owner.
            async with (
                connect(cluster[2].http_url, alice) as a,
                connect(cluster[2].http_url, bob) as b,
            ):
                assert a.welcome.value is not None and a.welcome.value.instance == "gw-0"
                assert b.welcome.value is not None and b.welcome.value.instance == "gw-1"
                for sender, receiver in ((a, b), (b, a), (a, b)):
                    body = {"text": f"hello {receiver.uid}", "n": [1, 2.5, None, True]}
                    wall = time.time() * 1000
                    ack = await sender.send(receiver.uid, body, id=f"m-{secrets.token_hex(4)}")
                    message = await receiver.receive(timeout_s=10)
                    check_message(
                        message,
                        sender,
                        receiver.uid,
                        {
                            "id": ack.id,
                            "body": body,
                            "partition": ack.partition,
                            "offset": ack.offset,
                            "wall": wall,
                        },
                    )
                assert a.duplicates_dropped == b.duplicates_dropped == 0
                assert a.offsets_repeated == b.offsets_repeated == 0

                # One message at a time, across instances: the unloaded latency.
                latencies = []
                for n in range(50):
                    started = trio.current_time()
                    await a.send(bob, {"n": n})
                    assert (await b.receive(timeout_s=10)).body == {"n": n}
                    latencies.append(trio.current_time() - started)
                print(f"\none pair, one at a time (kafka {_kafka_overrides() or 'defaults'})")
                print(latency_line("send->received and acked", latencies))


async def test_twenty_pairs_fifty_messages_each(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    pairs, per_sender = 20, 50
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
            cluster,
            _owners,
        ):
            uids = [
                (f"pa{i}-{secrets.token_hex(2)}", f"pb{i}-{secrets.token_hex(2)}")
                for i in range(pairs)
            ]
            clients: dict[str, ChatClient] = {}
            sent: dict[str, list[dict[str, Any]]] = {}  # recipient -> what was sent to it
            received: dict[str, list[tuple[float, Message]]] = {}
            ack_latency: list[float] = []

            async def receive_all(client: ChatClient, expected: int) -> None:
                inbox = received.setdefault(client.uid, [])
                while len(inbox) < expected:
                    message = await client.receive()
                    inbox.append((trio.current_time(), message))

            async def send_all(client: ChatClient, to: str) -> None:
                log = sent.setdefault(to, [])
                for n in range(per_sender):
                    body = {"seq": n, "text": f"{client.uid} to {to} #{n}", "pad": "x" * (n % 7)}
                    entry: dict[str, Any] = {
                        "id": f"{client.uid}-{n}",
                        "body": body,
                        "t": trio.current_time(),
                        "wall": time.time() * 1000,
                    }
                    log.append(entry)
                    ack = await client.send(to, body, id=entry["id"])
                    ack_latency.append(trio.current_time() - entry["t"])
                    assert ack.id == entry["id"]
                    entry["partition"], entry["offset"] = ack.partition, ack.offset

            async with AsyncExitStack() as stack:
                for i, (a, b) in enumerate(uids):
                    for uid, gateway in ((a, i % INSTANCES), (b, (i + 1) % INSTANCES)):
                        clients[uid] = await stack.enter_async_context(
                            connect(cluster[gateway].http_url, uid)
                        )

                # Not measured: a fresh gateway's producer takes about half a second
                # to be ready (its idempotent producer id) before its first ack.
                async def warm_up(sender: ChatClient, receiver: ChatClient) -> None:
                    await sender.send(receiver.uid, "warm-up")
                    assert (await receiver.receive(timeout_s=20)).body == "warm-up"

                async with trio.open_nursery() as warming:
                    for a, b in uids:
                        warming.start_soon(warm_up, clients[a], clients[b])
                        warming.start_soon(warm_up, clients[b], clients[a])

                started = trio.current_time()
                async with trio.open_nursery() as traffic:
                    for a, b in uids:
                        traffic.start_soon(receive_all, clients[a], per_sender)
                        traffic.start_soon(receive_all, clients[b], per_sender)
                        traffic.start_soon(send_all, clients[a], b)
                        traffic.start_soon(send_all, clients[b], a)
                elapsed = trio.current_time() - started

            latencies: list[float] = []
            for a, b in uids:
                for sender_uid, to in ((a, b), (b, a)):
                    inbox = received[to]
                    expected = sent[to]
                    # Once each and in send order: the received ids are exactly the sent ids.
                    assert [m.id for _t, m in inbox] == [e["id"] for e in expected]
                    for (t, message), entry in zip(inbox, expected, strict=True):
                        check_message(message, clients[sender_uid], to, entry)
                        latencies.append(t - entry["t"])
                    offsets = [m.offset for _t, m in inbox]
                    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
            assert all(c.duplicates_dropped == c.offsets_repeated == 0 for c in clients.values())
            total = 2 * pairs * per_sender
            assert len(latencies) == total
            print(
                f"\n20x50 ({total} messages in {elapsed:.2f}s, {total / elapsed:.0f}/s, "
                f"kafka {_kafka_overrides() or 'defaults'})"
            )
            print(latency_line("send->receive", latencies))
            print(latency_line("send->ack", ack_latency))


async def test_every_device_of_the_recipient_gets_the_message(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
            cluster,
            owners,
        ):
            carol = uid_owned_by(owners, "gw-1", "carol")
            dave = uid_owned_by(owners, "gw-2", "dave")
            async with (
                connect(cluster[0].http_url, carol, device="phone") as phone,
                connect(cluster[2].http_url, carol, device="laptop") as laptop,
                connect(cluster[0].http_url, dave) as sender,
            ):
                sent = []
                for n in range(5):
                    wall = time.time() * 1000
                    ack = await sender.send(carol, {"n": n})
                    sent.append(
                        {
                            "id": ack.id,
                            "body": {"n": n},
                            "partition": ack.partition,
                            "offset": ack.offset,
                            "wall": wall,
                        }
                    )
                for device in (phone, laptop):
                    for entry in sent:
                        check_message(await device.receive(timeout_s=10), sender, carol, entry)
                    assert device.duplicates_dropped == device.offsets_repeated == 0
                # The sender's own devices are not recipients.
                with trio.move_on_after(0.3):
                    unexpected = await sender.receive()
                    raise AssertionError(f"the sender received {unexpected}")


async def test_offline_recipient_finds_the_message_in_kafka_and_by_resume(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(
            tmp_path,
            zookeeper_hosts,
            kafka_bootstrap,
            cluster_names,
            {"replay": {"max_records": 3}},
        ) as (cluster, owners):
            erin = uid_owned_by(owners, "gw-0", "erin")
            frank = uid_owned_by(owners, "gw-2", "frank")
            async with connect(cluster[1].http_url, frank) as sender:
                wall = time.time() * 1000
                body = {"text": "are you there?", "unicode": "h\u00e9 \u2713"}
                ack = await sender.send(erin, body, id="while-away")
                # Something else for erin's partition after it, not for erin.
                other = uid_in(ack.partition, "other")
                later = await sender.send(other, "not for erin")
            assert ack.partition == partition_for(erin, PARTITIONS)
            topic = f"{cluster_names.topic_prefix}{ack.partition}"
            key, value = await trio.to_thread.run_sync(
                read_kafka_record, kafka_bootstrap, topic, ack.offset
            )
            assert key == erin.encode()
            record = decode_record(value)
            assert (record.from_uid, record.to, record.id, record.body) == (
                frank,
                erin,
                "while-away",
                body,
            )

            started = trio.current_time()
            async with connect(cluster[2].http_url, erin, resume=ack.offset - 1) as client:
                welcome = client.welcome.value
                assert welcome is not None and welcome.resumed is True
                message = await client.receive(timeout_s=10)
                replay_s = trio.current_time() - started
                assert (message.id, message.body, message.offset) == (
                    "while-away",
                    body,
                    ack.offset,
                )
                assert message.from_uid == frank and message.ts >= wall - 1000
                # "not for erin" is skipped; the next thing erin gets is live.
                live = await sender_then_receive(cluster, frank, erin, client)
                assert live.offset > later.offset
                assert client.duplicates_dropped == client.offsets_repeated == 0
            print(f"\nresume: connect + replay of 1 record in {replay_s * 1000:.0f}ms")

            # A resume from before anything was written: everything still there, once.
            async with connect(cluster[0].http_url, erin, resume=-1) as again:
                assert again.welcome.value is not None and again.welcome.value.resumed is True
                first = await again.receive(timeout_s=10)
                second = await again.receive(timeout_s=10)
                assert [first.id, second.offset] == ["while-away", live.offset]

            # Past replay.max_records (3 here) resume=-1 still resumes: it asks for
            # what is left in the window, the last 3 records of the partition
            # ("while-away" has left it), then live delivery goes on.
            async with (
                connect(cluster[1].http_url, frank) as sender,
                connect(cluster[0].http_url, other) as bystander,
            ):
                await sender.send(other, "a fourth record in the partition")
                # Delivered: the partition has read past it.
                await bystander.receive(timeout_s=10)
                async with connect(cluster[2].http_url, erin, resume=-1) as late:
                    assert late.welcome.value is not None
                    assert late.welcome.value.resumed is True
                    replayed = await late.receive(timeout_s=10)
                    assert replayed.offset == live.offset
                    ack = await sender.send(erin, "after the gap")
                    message = await late.receive(timeout_s=10)
                    assert (message.body, message.offset) == ("after the gap", ack.offset)

            # A device further behind than the window with an explicit cursor
            # still gets "resumed": false and resyncs from its own history.
            assert ack.offset > 3  # so that offset 0 is out of the 3-record window
            async with connect(cluster[2].http_url, erin, resume=0) as behind:
                assert behind.welcome.value is not None
                assert behind.welcome.value.resumed is False


async def committed_offset(bootstrap: str, group: str, topic: str) -> int:
    """The offset ``group`` committed for ``topic`` (-1 when none)."""

    def ask() -> int:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])]
        [future] = admin.list_consumer_group_offsets(request).values()
        return int(future.result(timeout=10).topic_partitions[0].offset)

    return await trio.to_thread.run_sync(ask)


def produce_burst(
    bootstrap: str,
    topic: str,
    to: str,
    *,
    total: int,
    every: int,
    under_way: threading.Event | None = None,
) -> list[int]:
    """``total`` records into ``topic`` as fast as the broker takes them, one in
    ``every`` addressed to ``to`` (the rest to others); their offsets for ``to``.

    ``under_way`` is set once the broker has taken a fiftieth of them.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    offsets: list[int] = []
    delivered = 0

    def on_delivery(err: Any, msg: Any) -> None:
        nonlocal delivered
        assert err is None, err
        delivered += 1
        if msg.key() == to.encode():
            offsets.append(msg.offset())
        if under_way is not None and delivered >= total // 50:
            under_way.set()

    for i in range(total):
        mine = i % every == 0
        record = ChatRecord(
            from_uid="burst",
            from_device="d",
            to=to if mine else f"other-{i % 97}",
            id=f"burst-{i}",
            body=i,
            ts=int(time.time() * 1000),
        )
        producer.produce(
            topic,
            key=record.to.encode(),
            value=encode_record(record),
            partition=0,
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    return sorted(offsets)


async def test_a_device_that_connects_during_a_burst_gets_everything_after_its_welcome(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    """The welcome names where live delivery starts, not the broker's newer log end.

    While the owner works through a burst, the broker's high watermark runs
    ahead of the owner's read position; a welcome naming the former made
    clients drop the records in between as duplicates.
    """
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
            cluster,
            owners,
        ):
            zoe = uid_owned_by(owners, "gw-0", "zoe")
            topic = f"{cluster_names.topic_prefix}{partition_for(zoe, PARTITIONS)}"
            async with trio.open_nursery() as nursery:
                burst: list[int] = []
                under_way = threading.Event()

                async def run_burst() -> None:
                    burst.extend(
                        await trio.to_thread.run_sync(
                            lambda: produce_burst(
                                kafka_bootstrap,
                                topic,
                                zoe,
                                total=60_000,
                                every=50,
                                under_way=under_way,
                            )
                        )
                    )

                nursery.start_soon(run_burst)
                await trio.to_thread.run_sync(under_way.wait, abandon_on_cancel=True)
                async with connect(cluster[1].http_url, zoe) as client:
                    welcome = client.welcome.value
                    assert welcome is not None and welcome.resumed is None
                    while not burst:  # noqa: ASYNC110 - filled by a thread
                        await trio.sleep(0.05)
                    owed = [o for o in burst if o >= welcome.offset]
                    got = [(await client.receive(timeout_s=20)).offset for _ in owed]
                    assert got == owed
                    assert client.duplicates_dropped == client.offsets_repeated == 0
            print(
                f"\nburst: welcome at offset {welcome.offset} of {burst[-1] + 1}; "
                f"{len(owed)} of {len(burst)} records for the device arrived live"
            )


async def sender_then_receive(
    cluster: Cluster, sender_uid: str, to: str, receiver: ChatClient
) -> Message:
    async with connect(cluster[0].http_url, sender_uid) as sender:
        ack = await sender.send(to, "live now")
    message = await receiver.receive(timeout_s=10)
    assert (message.body, message.offset) == ("live now", ack.offset)
    return message


class Chatter:
    """Two users exchanging messages in a loop, to show other sessions are unaffected."""

    def __init__(self, a: ChatClient, b: ChatClient) -> None:
        self.a, self.b = a, b
        self.latencies: list[float] = []
        self.stop = trio.Event()
        self._progress = trio.Event()

    async def run(self) -> None:
        """Every message must arrive, in order: anything else fails the test."""
        n = 0
        while not self.stop.is_set():
            for sender, receiver in ((self.a, self.b), (self.b, self.a)):
                started = trio.current_time()
                ack = await sender.send(receiver.uid, {"n": n}, timeout_s=10)
                message = await receiver.receive(timeout_s=10)
                assert (message.body, message.offset) == ({"n": n}, ack.offset)
                self.latencies.append(trio.current_time() - started)
                self._progress.set()
                n += 1
            await trio.sleep(0.01)

    async def wait_messages(self, count: int) -> None:
        """Until ``count`` messages have made the trip in all."""
        while len(self.latencies) < count:
            self._progress = trio.Event()
            await self._progress.wait()


async def test_bad_input_gets_its_answer_and_other_sessions_carry_on(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
            cluster,
            owners,
        ):
            home = ws_url_of(cluster, "gw-0")
            mallory = uid_owned_by(owners, "gw-0", "mallory")
            peggy = uid_owned_by(owners, "gw-0", "peggy")
            victor = uid_owned_by(owners, "gw-0", "victor")
            async with (
                connect(cluster[0].http_url, peggy) as a,
                connect(cluster[0].http_url, victor) as b,
                trio.open_nursery() as nursery,
            ):
                chatter = Chatter(a, b)
                nursery.start_soon(chatter.run)
                await chatter.wait_messages(2)

                # 400: a bad uid, at connection-url and at the handshake.
                for bad in ("", "has space", "x" * 129, "caf\u00e9"):
                    status, _h, doc = await http_get(
                        f"{cluster[1].http_url}/api/connection-url?{ws_query(uid=bad)}"
                    )
                    assert (status, doc["error"]) == (400, "bad_uid"), (bad, doc)
                    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                        async with open_websocket(f"{home}?{ws_query(uid=bad)}"):
                            pass
                    assert rejected.value.status_code == 400
                    assert json.loads(rejected.value.body or b"")["error"] == "bad_uid"

                # 421 from an instance that does not own the uid, naming the owner.
                with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                    async with open_websocket(
                        f"{ws_url_of(cluster, 'gw-1')}?{ws_query(uid=mallory)}"
                    ):
                        pass
                assert rejected.value.status_code == 421
                doc = json.loads(rejected.value.body or b"")
                assert (doc["error"], doc["url"]) == ("wrong_instance", home)

                async with open_websocket(f"{home}?{ws_query(uid=mallory)}") as ws:
                    await expect_frame(ws, "welcome")
                    # Five bad frames are tolerated (bad_frames_per_minute = 5) ...
                    bad_frames: list[tuple[str | bytes, str, str | None]] = [
                        ("not json", "bad_frame", None),
                        ('{"type": "shout", "id": "s1"}', "bad_frame", "s1"),
                        ('{"type": "send", "id": "m1", "to": "' + peggy + '"}', "bad_frame", "m1"),
                        (
                            '{"type": "send", "id": "m2", "to": "no spaces!", "body": 1}',
                            "bad_recipient",
                            "m2",
                        ),
                        (b'{"type": "ping"}', "bad_frame", None),
                    ]
                    for frame, code, frame_id in bad_frames:
                        await ws.send_message(frame)
                        error = await expect_frame(ws, "error")
                        assert (error["code"], error["id"]) == (code, frame_id), (frame, error)
                        assert error["message"]
                    # ... and the connection keeps working ...
                    await ws.send_message('{"type": "ping"}')
                    await expect_frame(ws, "pong")
                    await ws.send_message(
                        json.dumps(
                            {"type": "send", "id": "ok1", "to": "walter", "body": "still here"}
                        )
                    )
                    ack = await expect_frame(ws, "ack")
                    assert ack["id"] == "ok1"
                    # ... until the sixth within a minute: 1008.
                    await ws.send_message("{")
                    await expect_close(ws, CloseCode.POLICY)

                # A frame over max_frame_bytes (4096): 1009.
                async with open_websocket(
                    f"{home}?{ws_query(uid=mallory)}", max_message_size=1 << 20
                ) as ws:
                    await expect_frame(ws, "welcome")
                    body = "y" * 5000
                    await ws.send_message(
                        json.dumps({"type": "send", "id": "big", "to": peggy, "body": body})
                    )
                    await expect_close(ws, CloseCode.TOO_BIG)

                # The chatter (two users of the same instance) went on through all
                # of it, every message in order (Chatter.run checks), and goes on still.
                await chatter.wait_messages(len(chatter.latencies) + 4)
                chatter.stop.set()
            print("\n" + latency_line("chatter beside bad input (round trip)", chatter.latencies))


async def open_stalled_websocket(
    ws_url: str, uid: str, resume: int | None = None
) -> trio.SocketStream:
    """A WebSocket client that completes the handshake and then never reads again.

    Its receive buffer is made small (before connecting, so the TCP window
    stays small) so that the server's socket fills up quickly.
    """
    parts = urlsplit(ws_url)
    assert parts.hostname is not None and parts.port is not None
    params: dict[str, str | int] = {"uid": uid, "device": "stalled"}
    if resume is not None:
        params["resume"] = resume
    query = ws_query(**params)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((parts.hostname, parts.port))
    stream = trio.SocketStream(sock)
    request = (
        f"GET {parts.path}?{query} HTTP/1.1\r\n"
        f"Host: {parts.hostname}:{parts.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await stream.send_all(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += await stream.receive_some(1)  # byte by byte: read nothing past it
    assert response.startswith(b"HTTP/1.1 101"), response
    return stream


def kernel_queues(stream: trio.SocketStream, server: tuple[str, int]) -> tuple[int, int]:
    """(server's send queue, client's receive queue) of the connection ``stream`` is the client of.

    Together: what the server wrote that the client has not read. On loopback a
    send queue that is not empty means the client's window is closed.
    """
    client = stream.socket.getsockname()
    sent = tcp_socket(server, client)
    received = tcp_socket(client, server)
    assert sent is not None and received is not None, "the stalled connection is gone"
    return sent.tx_queue, received.rx_queue


def unread_bytes(stream: trio.SocketStream, server: tuple[str, int]) -> int:
    return sum(kernel_queues(stream, server))


async def test_a_reader_that_stops_reading_is_closed_and_stalls_nobody(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    """Its socket fills, then its outbox: closed with 1013; its partition keeps delivering.

    Shown without timing. After each record flooded to the stalled device, a
    marker goes to a neighbour on the same partition and must arrive: the
    partition has delivered past the flooded record. If, when it has, the
    kernel holds less than what was offered to the stalled session by more
    than two frames, the session had frames its socket would not take (its
    outbox only shrinks until the next record is flooded): that marker passed
    a stuck session. The outbox fills one record a round, so the rounds before
    the close are such rounds, about as many as the outbox holds.
    """
    queue_messages = 32
    limits = {
        "outbound_queue_messages": queue_messages,
        # Long: the full outbox closes the session, not the send deadline, so
        # the stuck session lasts as long as the flood takes to fill its outbox.
        "send_timeout_s": 60.0,
        "sends_per_second": 100_000.0,
        "send_burst": 100_000,
        # Large messages fill the socket buffers (up to 4 MiB by default) sooner.
        "max_frame_bytes": 65536,
    }
    body = "z" * 30_000
    frame_slack = 2 * (len(body) + 1024)  # two frames with their fields and headers
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(
            tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names, {"limits": limits}
        ) as (cluster, owners):
            partition = owners.index("gw-0")
            gateway = cluster.by_id("gw-0")
            ws_port = urlsplit(gateway.ws_url).port
            assert ws_port is not None
            server = ("127.0.0.1", ws_port)
            slow = uid_in(partition, "slow")
            neighbour = uid_in(partition, "neighbour")  # shares the slow reader's partition
            friend = uid_owned_by(owners, "gw-1", "friend")
            closes_1013 = f'linechatd_closes_total{{code="{CloseCode.BEHIND}"}}'
            before_1013 = await metric_value(cluster, "gw-0", closes_1013)
            async with (
                connect(cluster[1].http_url, neighbour) as near,
                connect(cluster[1].http_url, friend) as marker_sender,
                connect(cluster[2].http_url, "flooder") as flooder,
            ):
                stalled = await open_stalled_websocket(gateway.ws_url, slow)
                rss_before = rss_bytes(gateway.pid or 0)
                acked: list[int] = []
                stuck_at: int | None = None  # records flooded when it was first seen stuck
                markers_past_stuck = 0
                started = trio.current_time()
                while True:
                    acked.append((await flooder.send(slow, body, timeout_s=20)).offset)
                    marker = await marker_sender.send(neighbour, {"after": len(acked)})
                    got = await near.receive(timeout_s=20)
                    assert (got.body, got.offset) == ({"after": len(acked)}, marker.offset)
                    # The partition has offered every flooded record to the session;
                    # an offer that overflowed its outbox logged this at once.
                    if "event=session_behind" in gateway.log_text():
                        break
                    # A lower bound of what was offered (frames carry more than the body).
                    backlog = len(acked) * len(body) - unread_bytes(stalled, server)
                    if backlog > frame_slack:
                        stuck_at = stuck_at or len(acked)
                        markers_past_stuck += 1
                flood_s = trio.current_time() - started
                # Counted once the close is done (the device never answers it).
                with trio.fail_after(20):
                    while await metric_value(cluster, "gw-0", closes_1013) == before_1013:  # noqa: ASYNC110 - another process
                        await trio.sleep(0.05)
                rss_after = rss_bytes(gateway.pid or 0)
                # The device comes back with resume and gets the whole flood, once, in order.
                replay_started = trio.current_time()
                async with connect(
                    cluster[2].http_url, slow, device="stalled", resume=min(acked) - 1
                ) as back:
                    assert back.welcome.value is not None and back.welcome.value.resumed is True
                    offsets = [(await back.receive(timeout_s=20)).offset for _ in acked]
                    assert offsets == sorted(acked)
                    assert back.duplicates_dropped == back.offsets_repeated == 0
                replay_s = trio.current_time() - replay_started

            # The server closed the stalled socket: reading it now ends (EOF or reset).
            received = 0
            with trio.fail_after(10):
                try:
                    while chunk := await stalled.receive_some(65536):
                        received += len(chunk)
                except trio.BrokenResourceError:
                    pass
            await stalled.aclose()

            behind = [
                line for line in gateway.log_text().splitlines() if "event=session_behind" in line
            ]
            assert len(behind) == 1 and f"uid={slow}" in behind[0], behind
            print(
                f"\nslow reader: stuck after {stuck_at} records of {len(body)} chars, closed "
                f"1013 after {len(acked)} ({flood_s:.1f}s); {markers_past_stuck} markers reached "
                f"its neighbour meanwhile; {received} bytes were left in its socket; resumed "
                f"and got all {len(acked)} in {replay_s:.1f}s; gateway RSS "
                f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB\n{behind[0]}"
            )
            # Nobody stalled: markers reached the neighbour while the slow session
            # was stuck, in the rounds that filled its outbox (fewer counted: the
            # estimate of what was offered runs low by a few hundred bytes a frame).
            assert markers_past_stuck >= queue_messages // 2, markers_past_stuck
            # Bounded: a queue of 32 frames and the socket buffers, not the whole flood.
            assert rss_after - rss_before < 32 * 2**20


async def test_ping_pong_and_every_ack_is_already_in_kafka(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
            cluster,
            owners,
        ):
            grace = uid_owned_by(owners, "gw-1", "grace")
            heidi = uid_owned_by(owners, "gw-2", "heidi")
            async with open_websocket(
                f"{ws_url_of(cluster, 'gw-1')}?{ws_query(uid=grace, device='d1')}"
            ) as ws:
                welcome = await expect_frame(ws, "welcome")
                assert (welcome["uid"], welcome["device"], welcome["instance"]) == (
                    grace,
                    "d1",
                    "gw-1",
                )
                assert welcome["resumed"] is None
                assert welcome["partition"] == partition_for(grace, PARTITIONS)
                for _ in range(3):
                    await ws.send_message('{"type": "ping"}')
                    assert await expect_frame(ws, "pong") == {"type": "pong"}

                # Pipelined sends: acks come back in send order, offsets growing.
                ids = [f"p{n}" for n in range(20)]
                for msg_id in ids:
                    await ws.send_message(
                        json.dumps(
                            {"type": "send", "id": msg_id, "to": heidi, "body": {"i": msg_id}}
                        )
                    )
                acks = [await expect_frame(ws, "ack") for _ in ids]
                assert [a["id"] for a in acks] == ids
                offsets = [a["offset"] for a in acks]
                assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
                assert {a["partition"] for a in acks} == {partition_for(heidi, PARTITIONS)}

                # An ack means the broker has it: read it back right away.
                topic = f"{cluster_names.topic_prefix}{acks[0]['partition']}"
                for ack in (acks[0], acks[-1]):
                    key, value = await trio.to_thread.run_sync(
                        read_kafka_record, kafka_bootstrap, topic, ack["offset"]
                    )
                    record = decode_record(value)
                    assert key == heidi.encode()
                    assert (record.from_uid, record.from_device, record.id, record.body) == (
                        grace,
                        "d1",
                        ack["id"],
                        {"i": ack["id"]},
                    )


async def test_a_session_stuck_in_its_replay_does_not_hold_its_partition(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    """Losing a lease cancels the partition's sockets, also one still being greeted.

    A device resumes a large backlog and never reads, so its session is stuck
    sending the replay (the send deadline here is a minute). The lease node is
    then deleted: the partition must stop within the closing handshake's bound
    (2 s, the device never answers it), not when the send deadline runs out.
    """
    sections: dict[str, dict[str, Any]] = {
        "limits": {"send_timeout_s": 60.0},
        "log": {"format": "json"},
    }
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_cluster(
            tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names, sections
        ) as (cluster, owners):
            uma = uid_owned_by(owners, "gw-0", "uma")
            k = partition_for(uma, PARTITIONS)
            topic = f"{cluster_names.topic_prefix}{k}"
            offsets = await trio.to_thread.run_sync(
                lambda: produce_burst(kafka_bootstrap, topic, uma, total=3000, every=1)
            )
            # The live tail past the burst before the device connects, so the
            # whole burst is the replay's (on a busy machine, or with a long
            # fetch wait, the tail may still be reading it otherwise). The
            # owner commits where its tail is once a second.
            group = f"{cluster_names.group_prefix}{k}"
            with trio.fail_after(30):
                while await committed_offset(kafka_bootstrap, group, topic) <= offsets[-1]:  # noqa: ASYNC110 - the broker's state
                    await trio.sleep(0.1)
            gateway_ws = ws_url_of(cluster, "gw-0")
            stalled = await open_stalled_websocket(gateway_ws, uma, resume=offsets[0] - 1)
            async with stalled:
                ws_port = urlsplit(gateway_ws).port
                assert ws_port is not None
                # The replay fills the socket and waits: the device's window is
                # closed, the gateway's send queue holds the rest (the
                # replay_done event below shows the replay was still under way).
                with trio.fail_after(20):
                    while kernel_queues(stalled, ("127.0.0.1", ws_port))[0] == 0:  # noqa: ASYNC110 - the kernel's queues
                        await trio.sleep(0.02)
                zk = KazooClient(hosts=zookeeper_hosts)
                await trio.to_thread.run_sync(zk.start)
                try:
                    deleted_at = time.time()

                    def stopped_events() -> list[dict[str, Any]]:
                        return events(
                            cluster[0], "partition_stopped", after=deleted_at, partition=k
                        )

                    await trio.to_thread.run_sync(
                        zk.delete, ZkPaths(cluster_names.cluster).owner(k)
                    )
                finally:
                    await trio.to_thread.run_sync(zk.stop)
                    zk.close()
                with trio.fail_after(10):
                    # Another process's log: polled.
                    while not stopped_events():  # noqa: ASYNC110
                        await trio.sleep(0.05)
                [stopped] = stopped_events()
                # The replay was still under way when the partition stopped it.
                with trio.fail_after(10):
                    while not (done := events(cluster[0], "replay_done", uid=uma)):  # noqa: ASYNC110 - another process's log
                        await trio.sleep(0.05)
                [replay] = done
                assert replay["records"] < len(offsets), replay
                print(
                    f"\npartition {k} stopped {stopped['ts'] - deleted_at:.2f} s after its lease "
                    f"node was deleted; its replay had sent {replay['records']} of {len(offsets)}"
                )


# --- group sends and the server API (CONTRACT v2 §5, §6) ------------------------------------

SERVER_KEY = "server-key-" + "k" * 40


def server_api_sections(tmp_path: Path) -> dict[str, dict[str, Any]]:
    key_file = tmp_path / "server-api.key"
    key_file.write_text(SERVER_KEY + "\n")
    return {"server_api": {"key_file": str(key_file)}}


def _http_request(
    method: str, url: str, body: bytes | None, headers: Mapping[str, str]
) -> tuple[int, dict[str, str], Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        response = opener.open(request, timeout=20)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        raw = response.read()
        answer_headers = {k.lower(): v for k, v in response.headers.items()}
        try:
            return response.status, answer_headers, json.loads(raw)
        except ValueError:
            return response.status, answer_headers, raw


async def publish(
    gateway_url: str, doc: Any, *, key: str | None = SERVER_KEY, raw: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = raw if raw is not None else json.dumps(doc).encode()
    return await trio.to_thread.run_sync(
        _http_request, "POST", gateway_url + "/api/publish", body, headers
    )


async def presence(
    gateway_url: str, uids: list[str], *, key: str | None = SERVER_KEY
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    url = gateway_url + "/api/presence?" + urlencode([("uid", uid) for uid in uids])
    status, _headers, doc = await trio.to_thread.run_sync(_http_request, "GET", url, None, headers)
    return status, doc


def end_offsets(bootstrap: str, topics: list[str]) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-end-offsets"})
    try:
        return [consumer.get_watermark_offsets(TopicPartition(t, 0), timeout=10)[1] for t in topics]
    finally:
        consumer.close()


def records_with_id(bootstrap: str, topics: list[str], msg_id: str) -> dict[str, int]:
    """How many records carry ``msg_id``, per topic (topics read from the start)."""
    counts: dict[str, int] = {}
    ends = dict(zip(topics, end_offsets(bootstrap, topics), strict=True))
    for topic in topics:
        if ends[topic] == 0:
            continue
        for offset in range(ends[topic]):
            _key, value = read_kafka_record(bootstrap, topic, offset)
            if json.loads(value or b"{}").get("id") == msg_id:
                counts[topic] = counts.get(topic, 0) + 1
    return counts


async def receive_one(client: ChatClient, msg_id: str) -> Message:
    with trio.fail_after(TEST_TIMEOUT_S):
        while True:
            message = await client.receive()
            if message.id == msg_id:
                return message


async def test_a_group_send_reaches_each_recipient_once_and_offline_ones_by_resume(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
        cluster,
        _owners,
    ):
        urls = [gw.http_url for gw in cluster.instances]
        # Ten recipients over six partitions; four of them offline during the send.
        to = [uid_in(k % 6, f"grp{n}") for n, k in enumerate(range(10))]
        online, offline = to[:6], to[6:]
        cursors: dict[str, int] = {}
        for uid in offline:  # learn where each offline device stands, then leave
            async with connect(urls, uid) as client:
                assert client.cursor is not None
                cursors[uid] = client.cursor
        async with AsyncExitStack() as stack:
            clients = {uid: await stack.enter_async_context(connect(urls, uid)) for uid in online}
            sender = await stack.enter_async_context(connect(urls, "grp-sender"))
            with trio.fail_after(TEST_TIMEOUT_S):
                ack = await sender.send(to, {"text": "hello all"}, id="g1")
            partitions = [a.partition for a in ack.acks]
            assert (
                len(partitions)
                == len(set(partitions))
                == len({partition_for(u, PARTITIONS) for u in to})
            )
            assert sorted(uid for a in ack.acks for uid in a.to) == sorted(to)
            for a in ack.acks:
                assert all(partition_for(uid, PARTITIONS) == a.partition for uid in a.to)
            for uid, client in clients.items():
                message = await receive_one(client, "g1")
                assert (message.to, message.recipients, message.from_uid) == (
                    uid,
                    tuple(to),
                    "grp-sender",
                )
                assert message.body == {"text": "hello all"}
        # The offline devices come back: the message once each, by resume.
        for uid in offline:
            async with connect(urls, uid, resume=cursors[uid]) as client:
                message = await receive_one(client, "g1")
                assert message.to == uid and message.recipients == tuple(to)
                # Nothing else with that id follows (one record per partition).
                with trio.move_on_after(1.0):
                    while True:
                        assert (await client.receive()).id != "g1"
        # One record per partition touched, none more.
        topics = [f"{cluster_names.topic_prefix}{k}" for k in range(PARTITIONS)]
        written = await trio.to_thread.run_sync(records_with_id, kafka_bootstrap, topics, "g1")
        assert written == {f"{cluster_names.topic_prefix}{k}": 1 for k in partitions}


async def test_publish_to_a_thousand_users_retries_dedupe_and_bad_requests_write_nothing(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    sections = server_api_sections(tmp_path)
    async with running_cluster(
        tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names, sections
    ) as (cluster, _owners):
        urls = [gw.http_url for gw in cluster.instances]
        to = [f"pub{n}" for n in range(1000)]
        async with AsyncExitStack() as stack:
            online = {uid: await stack.enter_async_context(connect(urls, uid)) for uid in to[:3]}
            request = {"to": to, "id": "notice-1", "from": "billing", "body": {"text": "invoice"}}
            status, _headers, answer = await publish(urls[1], request)
            assert status == 200, answer
            assert answer["id"] == "notice-1"
            assert sorted(uid for a in answer["acks"] for uid in a["to"]) == sorted(to)
            assert len(answer["acks"]) == PARTITIONS
            for uid, client in online.items():
                message = await receive_one(client, "notice-1")
                assert (message.from_uid, message.from_device, message.to) == (
                    "billing",
                    "server",
                    uid,
                )
                assert message.recipients is None and message.body == {"text": "invoice"}
            # The backend retries (it never saw the answer): clients drop the copy.
            status, _headers, _answer = await publish(urls[2], request)
            assert status == 200
            for client in online.values():
                with trio.fail_after(TEST_TIMEOUT_S):
                    while client.duplicates_dropped == 0:  # noqa: ASYNC110 - set by the reader task
                        await trio.sleep(0.02)
                with trio.move_on_after(0.5):
                    assert (await client.receive()).id != "notice-1"

        topics = [f"{cluster_names.topic_prefix}{k}" for k in range(PARTITIONS)]
        before = await trio.to_thread.run_sync(end_offsets, kafka_bootstrap, topics)
        good = {"to": ["a1"], "id": "x", "body": 1}
        bad_requests: list[tuple[dict[str, Any] | None, dict[str, Any], int, str | None]] = [
            (None, {**good, "to": []}, 400, "to"),
            (None, {**good, "to": [f"u{n}" for n in range(1001)]}, 400, "to"),
            (None, {**good, "to": ["a1", "a1"]}, 400, "to"),
            (None, {**good, "to": ["a b"]}, 400, "to"),
            (None, {**good, "id": ""}, 400, "id"),
            (None, {"to": ["a1"], "body": 1}, 400, "id"),
            (None, {**good, "from": "no spaces"}, 400, "from"),
            (None, {"to": ["a1"], "id": "x"}, 400, "body"),
            (None, {**good, "body": "x" * 5000}, 413, None),
        ]
        for _headers_unused, doc, want_status, want_field in bad_requests:
            status, _headers, answer = await publish(urls[0], doc)
            assert status == want_status, (doc if len(str(doc)) < 200 else "...", answer)
            assert answer.get("field") == want_field, answer
        status, _headers, answer = await publish(urls[0], None, raw=b"{not json")
        assert (status, answer["error"]) == (400, "bad_request")
        for key in (None, "wrong-" + "k" * 40, "eyJhbGciOiJIUzI1NiJ9.e30.sig"):
            status, _headers, answer = await publish(urls[0], good, key=key)
            assert (status, answer) == (401, {"error": "unauthorized"})
        after = await trio.to_thread.run_sync(end_offsets, kafka_bootstrap, topics)
        assert after == before, "a refused publish writes nothing"

        # The operator's command line does the same, reading the key from the config.
        config = cluster.instances[0].config_path
        command = [sys.executable, "-m", "linechatd", "publish", "--config", str(config)]
        done = await trio.run_process(
            [*command, "--to", "cli1,cli2", "--body", '{"text": "from the shell"}', "--json"],
            capture_stdout=True,
            check=False,
        )
        assert done.returncode == 0, done
        answer = json.loads(done.stdout)
        assert answer["status"] == 200 and len(answer["response"]["acks"]) >= 1
        refused = await trio.run_process(
            [*command, "--to", "cli1,cli1", "--body", "1"], capture_stderr=True, check=False
        )
        assert refused.returncode == 2 and b"listed twice" in refused.stderr


async def test_presence_is_exact_from_any_instance_and_never_shows_ghosts(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    sections = merge_sections(
        server_api_sections(tmp_path), {"zookeeper": {"session_timeout": 4.0}}
    )
    async with running_cluster(
        tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names, sections
    ) as (cluster, owners):
        urls = [gw.http_url for gw in cluster.instances]
        # Users owned by gw-0; presence is asked of gw-1 (not their owner).
        alice = uid_owned_by(owners, "gw-0", "alice")
        bob = uid_owned_by(owners, "gw-0", "bob")
        carol = uid_owned_by(owners, "gw-2", "carol")
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(connect(urls, alice, device="phone"))
            await stack.enter_async_context(connect(urls, alice, device="laptop"))
            async with connect(urls, carol, device="web"):
                status, doc = await presence(urls[1], [alice, bob, carol])
                assert status == 200, doc
                assert doc == {
                    "presence": {
                        alice: {"online": True, "devices": ["laptop", "phone"]},
                        bob: {"online": False, "devices": []},
                        carol: {"online": True, "devices": ["web"]},
                    },
                    "unknown": [],
                }
            # A closed socket is gone from presence at once (its owner answers, not a cache).
            with trio.fail_after(TEST_TIMEOUT_S):
                while True:
                    _status, doc = await presence(urls[1], [carol])
                    if doc["presence"].get(carol) == {"online": False, "devices": []}:
                        break
                    assert doc["presence"][carol]["devices"] == ["web"]
                    await trio.sleep(0.02)
            # The owner of alice dies: never a ghost. Her uid is unknown (or
            # offline) until her devices reconnect to a live owner, and a
            # device is listed only once its socket there is open.
            cluster.by_id("gw-0").kill()
            k = partition_for(alice, PARTITIONS)
            with trio.fail_after(TEST_TIMEOUT_S):
                while True:
                    _status, doc = await presence(urls[1], [alice])
                    entry = doc["presence"].get(alice)
                    if entry is None:
                        assert doc["unknown"] == [alice]
                    elif entry["devices"]:
                        assert set(entry["devices"]) <= {"laptop", "phone"}
                        _s, _h, view = await http_get(urls[1] + "/api/partitions")
                        owner = view["partitions"][k]["instance"]
                        assert owner not in (None, "gw-0"), owner
                        if entry["devices"] == ["laptop", "phone"]:
                            break
                    else:
                        assert entry == {"online": False, "devices": []}
                    await trio.sleep(0.05)
        # Bad and unauthorised queries.
        assert (await presence(urls[1], []))[0] == 400
        assert (await presence(urls[1], ["a b"]))[0] == 400
        assert (await presence(urls[1], [alice], key=None))[0] == 401
        assert (await presence(urls[1], [alice], key="x" * 40))[0] == 401


async def test_the_server_api_is_off_without_a_key(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    async with running_cluster(tmp_path, zookeeper_hosts, kafka_bootstrap, cluster_names) as (
        cluster,
        _owners,
    ):
        url = cluster[0].http_url
        assert (await publish(url, {"to": ["a"], "id": "x", "body": 1}))[0::2] == (
            404,
            {"error": "disabled"},
        )
        assert await presence(url, ["a"]) == (404, {"error": "disabled"})
        # Nor does the internal endpoint answer anyone.
        status, _headers, _doc = await http_get(url + "/internal/presence?uid=a")
        assert status == 404
