"""A reconnect storm: every user of one partition resumes at the same moment.

After a failover all of a partition's users come back at once; their resumes
must be served by a few shared reads of the topic, not one Kafka consumer
each, and each device must still get exactly its missed messages, in offset
order, once, before anything live.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import trio
from support.cluster import ClusterNames, http_get, start_cluster

from benchmarks.resume_storm import produce_offline
from linechatd.client import open_websocket

USERS = 200
PER_USER = 10
TEST_TIMEOUT_S = 60.0

SECTIONS: dict[str, dict[str, Any]] = {
    "zookeeper": {"session_timeout": 10.0},
    "shutdown": {"grace_period_s": 1.0, "drain_stagger_s": 0.0},
}


async def resume_one(ws_url: str, uid: str, resume: int, owed: list[int]) -> list[int]:
    """Connect with ``resume`` and return the offsets received (all owed, then a short wait)."""
    got: list[int] = []
    query = urlencode({"uid": uid, "device": "d", "resume": str(resume)})
    async with open_websocket(f"{ws_url}?{query}", connect_timeout_s=30) as ws:
        welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome" and welcome["resumed"] is True, welcome
        while len(got) < len(owed):
            frame = json.loads(await ws.get_message())
            assert frame["type"] == "message", frame
            assert frame["to"] == uid and frame["id"] == f"{uid}-{len(got)}", frame
            got.append(frame["offset"])
        # Anything more would be a duplicate or another user's.
        with trio.move_on_after(0.5):
            extra = await ws.get_message()
            raise AssertionError(f"{uid} got more than it was owed: {extra}")
    return got


async def partition_next_offset(http_url: str) -> int:
    """The offset after the last record the one partition's owner has delivered (-1: none yet)."""
    status, _headers, doc = await http_get(http_url + "/api/status")
    assert status == 200, doc
    return max((p["next_offset"] for p in doc["partitions"]), default=-1)


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"{re.escape(name)}(\{{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_reconnect_storm_shares_a_few_scans(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with start_cluster(
            1,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=1,
            sections=SECTIONS,
        ) as cluster:
            gateway = cluster[0]
            uids = [f"storm-{i}" for i in range(USERS)]
            topic = f"{cluster_names.topic_prefix}0"
            owed = await trio.to_thread.run_sync(
                produce_offline, kafka_bootstrap, topic, uids, PER_USER
            )
            # Once the partition's own consumer has passed them, they are history.
            end = max(offset for offsets in owed.values() for offset in offsets) + 1
            while (await partition_next_offset(gateway.http_url)) < end:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)

            results: dict[str, list[int]] = {}
            started = trio.current_time()

            async def one(uid: str) -> None:
                # Each device resumes from its own last offset: many different starts.
                results[uid] = await resume_one(gateway.ws_url, uid, owed[uid][0] - 1, owed[uid])

            async with trio.open_nursery() as nursery:
                for uid in uids:
                    nursery.start_soon(one, uid)
            elapsed = trio.current_time() - started

            assert results == owed
            status, _headers, body = await http_get(gateway.http_url + "/metrics")
            assert status == 200
            text = str(body)
            scans = metric(text, "linechatd_replay_scans_total")
            consumers = metric(text, "linechatd_replay_consumers_total")
            print(
                f"\nresume storm: {USERS} users x {PER_USER} records in {elapsed:.2f}s, "
                f"{scans:.0f} shared reads (probes + scans), {consumers:.0f} replay consumers"
            )
            assert consumers <= 2
            assert 0 < scans <= USERS / 10
