"""A reconnect storm: ``--users`` users of one partition resume at the same moment.

    python -m benchmarks.resume_storm [--users 1000] [--per-user 10]

Starts a ZooKeeper and the broker (or uses ``--zookeeper``/``--kafka``), one
gateway owning a single partition, writes ``--per-user`` records to each user
while nobody is connected, then connects every user at once with ``resume``
set to just before its first missed record (so each asks from its own offset,
as after a failover). Checks that each gets exactly its records, in order,
once, and prints the time until all are resumed, per-client resume time
percentiles, the number of shared replay reads and replay consumers the
gateway opened, and the gateway's CPU time during the storm.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import trio
from confluent_kafka import Producer

from linechatd.client import open_websocket
from linechatd.protocol import ChatRecord, encode_record

from .procstat import cpu_seconds
from .stack import Services, linechatd_servers, raise_nofile, start_all, stop_all


def produce_offline(
    bootstrap: str, topic: str, uids: list[str], per_user: int
) -> dict[str, list[int]]:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    offsets: dict[str, list[int]] = {uid: [] for uid in uids}
    failures: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            offsets[msg.key().decode()].append(msg.offset())

    now = int(time.time() * 1000)
    for n in range(per_user):
        for uid in uids:
            record = ChatRecord("sender", "dev", uid, f"{uid}-{n}", {"n": n, "pad": "x" * 80}, now)
            while True:
                try:
                    producer.produce(
                        topic, encode_record(record), uid.encode(), on_delivery=on_delivery
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
    if producer.flush(60) != 0 or failures:
        raise RuntimeError(f"producing failed: {failures[:3]}")
    return {uid: sorted(o) for uid, o in offsets.items()}


async def resume_one(ws_url: str, uid: str, owed: list[int]) -> float:
    """Seconds from connecting to the last owed record; raises on any wrong frame."""
    started = trio.current_time()
    query = urlencode({"uid": uid, "device": "d", "resume": str(owed[0] - 1)})
    got = 0
    async with open_websocket(f"{ws_url}?{query}", connect_timeout_s=60) as ws:
        welcome = json.loads(await ws.get_message())
        if welcome.get("type") != "welcome" or welcome.get("resumed") is not True:
            raise AssertionError(f"{uid}: {welcome}")
        while got < len(owed):
            frame = json.loads(await ws.get_message())
            if frame.get("type") != "message" or frame["offset"] != owed[got]:
                raise AssertionError(f"{uid}: expected offset {owed[got]}, got {frame}")
            got += 1
        elapsed = trio.current_time() - started
        with trio.move_on_after(0.5):
            extra = await ws.get_message()
            raise AssertionError(f"{uid} got more than it was owed: {extra}")
    return elapsed


def metric(text: str, name: str, label: str = "") -> float:
    pattern = re.compile(rf"{re.escape(name)}(\{{[^}}]*{re.escape(label)}[^}}]*\}}|)\s")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if pattern.match(line))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def storm(ws_url: str, owed: dict[str, list[int]]) -> tuple[float, list[float]]:
    times: list[float] = []
    started = trio.current_time()

    async def one(uid: str) -> None:
        times.append(await resume_one(ws_url, uid, owed[uid]))

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for uid in owed:
                nursery.start_soon(one, uid)
    return trio.current_time() - started, times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--per-user", type=int, default=10)
    parser.add_argument("--zookeeper", help="host:port of a running ZooKeeper")
    parser.add_argument("--kafka", help="bootstrap host:port of a running broker")
    args = parser.parse_args()
    raise_nofile()

    with tempfile.TemporaryDirectory(prefix="resume-storm-") as tmp:
        workdir = Path(tmp)
        services: Services | None = None
        if args.zookeeper and args.kafka:
            zookeeper, kafka = args.zookeeper, args.kafka
        else:
            services = Services.start(workdir)
            zookeeper, kafka = services.zookeeper.address, services.broker.address
        try:
            run(workdir, zookeeper, kafka, args.users, args.per_user)
        finally:
            if services is not None:
                services.stop()


def run(workdir: Path, zookeeper: str, kafka: str, users: int, per_user: int) -> None:
    cluster = "storm" + secrets.token_hex(3)
    shim = type("S", (), {})()
    shim.zookeeper = type("A", (), {"address": zookeeper})()
    shim.broker = type("A", (), {"address": kafka})()
    servers = linechatd_servers(
        workdir,
        count=1,
        cluster=cluster,
        partitions=1,
        services=shim,
        # Every user from 127.0.0.1 at the same moment: room for all of them.
        overrides={
            "limits": {
                "max_connections_per_address": users + 100,
                "handshake_burst_per_address": users + 100,
            },
            "websocket": {"max_unfinished_handshakes_per_address": users + 100},
        },
    )
    start_all(servers, 60)
    gateway = servers[0]
    try:
        uids = [f"storm-{i}" for i in range(users)]
        t0 = time.monotonic()
        owed = produce_offline(kafka, f"{cluster}-topic-0", uids, per_user)
        print(f"produced {users * per_user} records in {time.monotonic() - t0:.1f}s")
        time.sleep(1.0)  # the partition's own consumer passes them: history now
        cpu_before = cpu_seconds(gateway.pid)
        total, times = trio.run(storm, gateway.ws_url, owed)
        cpu = cpu_seconds(gateway.pid) - cpu_before
        assert gateway.http_url is not None
        with urllib.request.urlopen(gateway.http_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        print(f"users                     {users} (one partition), {per_user} records each")
        print(f"all resumed in            {total:.2f} s")
        print(f"per-client resume p50     {percentile(times, 0.5) * 1000:.0f} ms")
        print(f"per-client resume p99     {percentile(times, 0.99) * 1000:.0f} ms")
        print(f"per-client resume mean    {statistics.fmean(times) * 1000:.0f} ms")
        print(
            f"window probes             {metric(text, 'linechatd_replay_scans_total', 'probe'):.0f}"
        )
        print(
            f"range scans               {metric(text, 'linechatd_replay_scans_total', 'scan'):.0f}"
        )
        print(f"replay consumers opened   {metric(text, 'linechatd_replay_consumers_total'):.0f}")
        print(f"records replayed          {metric(text, 'linechatd_replayed_records_total'):.0f}")
        print(f"gateway CPU during storm  {cpu:.2f} s ({cpu / total * 100:.0f}% of one core)")
    finally:
        stop_all(servers)


if __name__ == "__main__":
    main()
