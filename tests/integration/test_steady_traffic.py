"""Steady traffic, no faults: every acked message arrives, once, in order.

40 users on 3 gateways each send continuously to the next one, so every
partition's topic is written by several gateways' producers at once. This is
the case where a fetch was seen to skip records that became visible a moment
late (the fetcher now refetches such a gap); it must never cost a message.

Nobody may have to reconnect: the partitions are settled before the clients
connect, and the ZooKeeper session timeout is one a loaded machine keeps (a
stall of a second or two is far from T/2). The senders' pauses are random
(LINECHAT_TEST_SEED_STEADY_TRAFFIC replays a run's seed, see support/seeds.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import trio
from support.cluster import ClusterNames, start_cluster
from support.leasekit import events, wait_balanced
from support.seeds import seeded_random

from linechatd.client import ChatClient

CLIENTS = 40
PARTITIONS = 8
# A count, not a duration: a loaded machine takes longer, the test stays the same.
SENDS_PER_CLIENT = 100
SESSION_TIMEOUT_S = 10.0


async def test_steady_traffic_loses_nothing(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    rng = seeded_random("steady_traffic", 20261129)
    sections = {
        "zookeeper": {"session_timeout": SESSION_TIMEOUT_S},
        "log": {"format": "json"},
        "limits": {"sends_per_second": 1000.0, "send_burst": 1000},
        "shutdown": {"grace_period_s": 1.0, "drain_stagger_s": 0.0},
    }
    async with start_cluster(
        3,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections,
    ) as cluster:
        urls = [g.http_url for g in cluster.instances]
        clients = [ChatClient(urls, f"user-{i}") for i in range(CLIENTS)]
        acked: dict[str, list[int]] = defaultdict(list)  # recipient -> acked offsets
        received: dict[str, list[int]] = defaultdict(list)  # recipient -> offsets, in arrival order

        async def sender(i: int) -> None:
            client, to = clients[i], f"user-{(i + 1) % CLIENTS}"
            for seq in range(SENDS_PER_CLIENT):
                ack = await client.send(to, {"seq": seq}, timeout_s=20)
                acked[to].append(ack.offset)
                await trio.sleep(rng.uniform(0.005, 0.03))

        async def receiver(i: int) -> None:
            async for message in clients[i].messages():
                received[clients[i].uid].append(message.offset)

        with trio.fail_after(180):
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                for client in clients:
                    await nursery.start(client.run)
                started = trio.current_time()
                async with trio.open_nursery() as senders:
                    for i in range(CLIENTS):
                        nursery.start_soon(receiver, i)
                        senders.start_soon(sender, i)
                sending_s = trio.current_time() - started
                # Every send has its answer now; wait for the last deliveries.
                while any(len(received[to]) < len(offsets) for to, offsets in acked.items()):  # noqa: ASYNC110
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()

        refetched = sum(len(events(g, "kafka_offset_gap_refetch")) for g in cluster.instances)
        total = sum(len(offsets) for offsets in acked.values())
        print(
            f"\nsteady: {total} acked sends in {sending_s:.1f} s; fetch gaps refetched: {refetched}"
        )
        for to, offsets in acked.items():
            assert received[to] == sorted(offsets), to
        assert sum(c.duplicates_dropped + c.offsets_repeated for c in clients) == 0
        assert sum(c.connections for c in clients) == CLIENTS  # nobody had to reconnect
