"""Group sends, server publishes and presence, measured (printed, never asserted).

    python -m benchmarks.fanout [--partitions 64] [--rounds 5]   (make bench-fanout)

Starts a ZooKeeper and the broker (or uses ``--zookeeper``/``--kafka``) and two
gateways with the server API on, then:

1. **Publish to 1,000 uids** over the partitions, 100 of them online (connected
   to both gateways): time to the durable answer, and to the last delivery.
2. **Group send vs one-to-one**: one sender sends to 100 online recipients as
   one group send, then as 100 one-to-one sends; records written (from the
   acks) and both gateways' CPU-µs per delivered message, each way.
3. **Presence of 1,000 uids** asked of one gateway (half the partitions are
   the other's): latency p50/p99 over ``--rounds`` × 20 queries.
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import trio

from linechatd.client import ChatClient

from .procstat import cpu_seconds
from .stack import Services, linechatd_servers, raise_nofile, start_all, stop_all, wait_balanced

KEY = "bench-" + secrets.token_hex(24)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, doc: Any = None) -> tuple[int, Any]:
    data = None if doc is None else json.dumps(doc).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Authorization": f"Bearer {KEY}"}
    )
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def drain_until(clients: list[ChatClient], msg_id: str) -> float:
    """Wait until every client got ``msg_id``; the trio time of the last arrival."""
    last = 0.0

    async def one(client: ChatClient) -> None:
        nonlocal last
        while (await client.receive()).id != msg_id:
            pass
        last = max(last, trio.current_time())

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(one, client)
    return last


async def measure(urls: list[str], pids: list[int], rounds: int) -> None:
    uids = [f"fan-{n}" for n in range(1000)]
    online = uids[:100]
    clients: list[ChatClient] = []
    async with trio.open_nursery() as nursery:
        for n, uid in enumerate(online):
            client = ChatClient(urls[n % len(urls)], uid, ping_interval_s=0)
            await nursery.start(client.run)
            clients.append(client)
        sender = ChatClient(urls[0], "fan-sender")
        await nursery.start(sender.run)

        print("1. publish to 1,000 uids (100 online)")
        for round_ in range(rounds):
            msg_id = f"pub-{round_}"
            started = trio.current_time()
            status, answer = await trio.to_thread.run_sync(
                http,
                "POST",
                urls[1] + "/api/publish",
                {"to": uids, "id": msg_id, "body": {"text": "notice", "pad": "x" * 60}},
            )
            durable = trio.current_time() - started
            assert status == 200, answer
            last = await drain_until(clients, msg_id)
            print(
                f"   round {round_}: {len(answer['acks'])} records; durable ack "
                f"{durable * 1000:.0f} ms, last delivery {(last - started) * 1000:.0f} ms"
            )

        print("2. one group send of 100 vs 100 one-to-one sends")
        for label, group in (("group send", True), ("one-to-one", False)):
            records = 0
            before_cpu = sum(cpu_seconds(pid) for pid in pids)
            started = trio.current_time()
            for round_ in range(rounds):
                msg_id = f"{label[:3]}-{round_}"
                if group:
                    ack = await sender.send(online, {"text": "hi all"}, id=msg_id)
                    records += len(ack.acks)
                    await drain_until(clients, msg_id)
                else:
                    records += len(online)  # one record per one-to-one send, by construction
                    async with trio.open_nursery() as sends:
                        for n, uid in enumerate(online):
                            sends.start_soon(
                                functools.partial(
                                    sender.send, uid, {"text": "hi all"}, id=f"{msg_id}-{n}"
                                )
                            )

                    # Each recipient gets its own id: wait for all of them.
                    async def got_own(client: ChatClient, m: str = msg_id) -> None:
                        while not (await client.receive()).id.startswith(m):
                            pass

                    with trio.fail_after(120):
                        async with trio.open_nursery() as waits:
                            for client in clients:
                                waits.start_soon(got_own, client)
            elapsed = trio.current_time() - started
            cpu = sum(cpu_seconds(pid) for pid in pids) - before_cpu
            delivered = rounds * len(online)
            print(
                f"   {label:11s}: {records / rounds:.0f} records per send of 100; "
                f"gateways {cpu / delivered * 1e6:.0f} CPU-µs per delivered message; "
                f"{elapsed / rounds * 1000:.0f} ms per round"
            )

        print("3. presence of 1,000 uids")
        latencies = []
        query = urls[0] + "/api/presence?" + urlencode([("uid", u) for u in uids])
        for _ in range(rounds * 20):
            started = time.perf_counter()
            status, answer = await trio.to_thread.run_sync(http, "GET", query)
            latencies.append(time.perf_counter() - started)
            assert status == 200, answer
            online_count = sum(1 for v in answer["presence"].values() if v["online"])
        print(
            f"   {len(latencies)} queries: p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, mean "
            f"{statistics.fmean(latencies) * 1000:.1f} ms; online {online_count}/100"
        )
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--zookeeper", help="host:port of a running ZooKeeper")
    parser.add_argument("--kafka", help="bootstrap host:port of a running broker")
    args = parser.parse_args()
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        workdir = Path(tmp)
        key_file = workdir / "server.key"
        key_file.write_text(KEY)
        services = Services.start(workdir) if not (args.zookeeper and args.kafka) else None
        shim: Any = services
        if services is None:
            shim = type("S", (), {})()
            shim.zookeeper = type("A", (), {"address": args.zookeeper})()
            shim.broker = type("A", (), {"address": args.kafka})()
        cluster = "fan" + secrets.token_hex(3)
        servers = linechatd_servers(
            workdir,
            count=2,
            cluster=cluster,
            partitions=args.partitions,
            services=shim,
            overrides={
                "server_api": {"key_file": str(key_file)},
                "limits": {"sends_per_second": 100_000.0, "send_burst": 100_000},
            },
        )
        try:
            start_all(servers, 60)
            wait_balanced(servers, args.partitions, 60)
            urls = [s.http_url for s in servers if s.http_url]
            trio.run(measure, urls, [s.pid for s in servers], args.rounds)
        finally:
            stop_all(servers)
            if services is not None:
                services.stop()


if __name__ == "__main__":
    main()
