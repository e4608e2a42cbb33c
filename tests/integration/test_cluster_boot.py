"""A cluster's first start: readiness, what it records in ZooKeeper, its topics,
and the refusals (a different partition count, an invalid configuration file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio
from confluent_kafka.admin import AdminClient
from support.cluster import ClusterNames, http_get, start_cluster, write_config
from support.leasekit import FAST_SECTIONS, kazoo, wait_shares

PARTITIONS = 4


async def test_two_instances_boot_and_record_the_cluster(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(45):
        async with start_cluster(
            2,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=PARTITIONS,
            sections=FAST_SECTIONS,
        ) as cluster:
            for gateway in cluster:
                status, _, doc = await http_get(gateway.http_url + "/readyz")
                assert status == 200, doc
                assert doc["ready"] is True
            # Both instances share the partitions, ceil(4 / 2) = 2 each.
            await wait_shares(cluster, {"gw-0": 2, "gw-1": 2})

            async with kazoo(zookeeper_hosts, cluster_names.cluster) as zk:
                data, _stat = await zk.call(zk.client.get, zk.paths.meta)
                meta = json.loads(data)
                assert meta["partitions"] == PARTITIONS
                assert meta["created_by"] in ("gw-0", "gw-1")
                members = await zk.call(zk.client.get_children, zk.paths.instances)
                assert sorted(members) == ["gw-0", "gw-1"]
                for member in members:
                    raw, stat = await zk.call(zk.client.get, zk.paths.instance(member))
                    registration = json.loads(raw)
                    assert registration["instance"] == member
                    assert registration["ws_url"] == cluster.by_id(member).ws_url
                    assert stat.ephemeralOwner != 0  # dies with the instance's session

            topics = await trio.to_thread.run_sync(
                lambda: (
                    AdminClient({"bootstrap.servers": kafka_bootstrap})
                    .list_topics(timeout=10)
                    .topics
                )
            )
            for k in range(PARTITIONS):
                topic = topics.get(f"{cluster_names.topic_prefix}{k}")
                assert topic is not None, f"topic for partition {k} missing"
                assert len(topic.partitions) == 1


async def test_an_instance_with_another_partition_count_refuses_to_start(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(45):
        async with start_cluster(
            1,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=PARTITIONS,
            sections=FAST_SECTIONS,
        ) as cluster:
            odd = cluster.add_instance({"cluster": {"partitions": PARTITIONS + 2}})
            code = await odd.wait_exit(30)
            output = odd.log_text()
            assert code not in (0, None), output
            assert "cluster.partitions" in output
            assert str(PARTITIONS) in output and str(PARTITIONS + 2) in output
            assert "Traceback" not in output, output
            # The running instance is not disturbed.
            status, _, _ = await http_get(cluster[0].http_url + "/readyz")
            assert status == 200


def _linechatd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linechatd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    bad = write_config(
        tmp_path / "bad.toml",
        cluster={"partitions": 0},
        websocket={"lisen": "127.0.0.1:1"},
        partitions={"max_per_instance": -1, "weight": "heavy"},
        kafka={"bootstrap_servers": "127.0.0.1:9092"},
    )
    result = await trio.to_thread.run_sync(_linechatd, "check-config", str(bad))
    assert result.returncode == 2, result
    problems = result.stderr.strip().splitlines()
    assert "zookeeper.hosts: required" in problems
    # The contract's line, followed by the key probably meant.
    assert "websocket.lisen: unknown key (did you mean 'listen'?)" in problems
    assert "cluster.partitions: must be between 1 and 4096, got 0" in problems
    assert any(p.startswith("partitions.max_per_instance: ") for p in problems), problems
    assert any(p.startswith("partitions.weight: ") for p in problems), problems
    assert "Traceback" not in result.stderr

    good = write_config(
        tmp_path / "good.toml",
        zookeeper={"hosts": "127.0.0.1:2181"},
        kafka={"bootstrap_servers": "127.0.0.1:9092"},
    )
    result = await trio.to_thread.run_sync(_linechatd, "check-config", str(good))
    assert result.returncode == 0, result

    # `run` refuses the same file the same way, before touching any server.
    result = await trio.to_thread.run_sync(_linechatd, "run", "--config", str(bad))
    assert result.returncode == 78, result  # startup.EXIT_CONFIG: systemd does not restart it
    assert "zookeeper.hosts: required" in result.stderr
    assert "Traceback" not in result.stderr
