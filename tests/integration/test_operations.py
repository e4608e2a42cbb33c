"""Operating linechatd: systemd notifications, live reload, the admin CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from support.cluster import (
    ClusterNames,
    GatewayProcess,
    http_get,
    merge_sections,
    start_cluster,
    write_config,
)

from linechatd.gateway import DRAIN_STOP_MARGIN_S
from linechatd.localservices import free_ports
from linechatd.startup import EXIT_CONFIG

ADMIN_TOKEN = "operations-test-admin-token-0123456789"


class NotifyListener:
    """A NOTIFY_SOCKET of our own: collects what the daemon tells systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[dict[str, str]] = []
        self.changed = trio.Event()

    async def bind(self) -> None:
        await self.sock.bind(str(self.path))

    async def run(self) -> None:
        while True:
            data = await self.sock.recv(4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            self.changed.set()
            self.changed = trio.Event()

    def states(self) -> list[str]:
        """The sequence of state changes, watchdog pings collapsed."""
        out: list[str] = []
        for fields in self.messages:
            for key in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
                if key in fields and (not out or out[-1] != key or key != "WATCHDOG"):
                    out.append(key)
        return out

    def lifecycle(self) -> list[str]:
        return [s for s in self.states() if s != "WATCHDOG"]

    async def wait_for(self, predicate) -> None:  # type: ignore[no-untyped-def]
        while not predicate(self):
            await self.changed.wait()


def _instance_config(
    tmp_path: Path, names: ClusterNames, zookeeper_hosts: str, kafka_bootstrap: str, **extra: dict
) -> tuple[Path, str]:
    http_port, ws_port = free_ports(2)
    sections = merge_sections(
        {
            "cluster": {"partitions": 4},
            "instance": {"id": "notify-0"},
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "websocket": {"listen": f"127.0.0.1:{ws_port}"},
            "zookeeper": {"hosts": zookeeper_hosts, "session_timeout": 10.0},
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "shutdown": {"grace_period_s": 5.0},
        },
        names.config_sections(),
        extra,
    )
    return write_config(tmp_path / "notify.toml", **sections), f"http://127.0.0.1:{http_port}"


async def test_notify_ready_watchdog_reload_stopping(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    config_path, http_url = _instance_config(
        tmp_path, cluster_names, zookeeper_hosts, kafka_bootstrap
    )
    listener = NotifyListener(tmp_path / "notify.sock")
    await listener.bind()
    env = dict(os.environ, NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="600000")
    gateway = GatewayProcess(config_path, http_url=http_url, env=env)
    with listener.sock, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener.run)
            gateway.start()
            await listener.wait_for(lambda ls: "READY" in ls.states())
            # READY only once listening: the HTTP API answers at that point.
            status, _, _ = await http_get(http_url + "/healthz")
            assert status == 200
            await listener.wait_for(
                lambda ls: ls.states().count("WATCHDOG") >= 1 and len(ls.messages) >= 4
            )
            gateway.send_signal(signal.SIGHUP)
            await listener.wait_for(lambda ls: ls.lifecycle()[-2:] == ["RELOADING", "READY"])
            reloading = next(m for m in listener.messages if "RELOADING" in m)
            assert int(reloading["MONOTONIC_USEC"]) > 0
            gateway.terminate()
            assert await gateway.wait_exit(30) == 0
            await listener.wait_for(lambda ls: "STOPPING" in ls.states())
            nursery.cancel_scope.cancel()
    assert listener.lifecycle() == ["READY", "RELOADING", "READY", "STOPPING"], listener.states()
    # The stop timeout follows the grace period (5 s here) plus the margin.
    stopping = next(m for m in listener.messages if "STOPPING" in m)
    assert int(stopping["EXTEND_TIMEOUT_USEC"]) == int((5.0 + DRAIN_STOP_MARGIN_S) * 1e6)
    pings = sum(1 for m in listener.messages if "WATCHDOG" in m)
    assert pings >= 2, listener.messages


async def _held(http_url: str) -> list[int]:
    status, _, doc = await http_get(http_url + "/api/status")
    assert status == 200
    return [p["partition"] for p in doc["partitions"]]


async def _gauges(http_url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics."""
    _status, _headers, text = await http_get(http_url + "/metrics")
    samples = (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, _, value in samples if name and "{" not in name}


async def _wait_held(http_url: str, count: int) -> list[int]:
    while True:
        held = await _held(http_url)
        if len(held) == count:
            return held
        await trio.sleep(0.1)


async def test_reload_moves_partitions_without_restart(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=8,
    ) as cluster:
        a, b = cluster[0], cluster[1]
        with trio.fail_after(30):
            before_a = await _wait_held(a.http_url, 4)
            before_b = await _wait_held(b.http_url, 4)
        pid = a.pid
        # Cap gw-0 at 2: it gives two partitions back, gw-1 takes them.
        text = a.config_path.read_text()
        a.config_path.write_text(text + "\n[partitions]\nmax_per_instance = 2\n")
        a.send_signal(signal.SIGHUP)
        with trio.fail_after(30):
            after_a = await _wait_held(a.http_url, 2)
            after_b = await _wait_held(b.http_url, 6)
        assert a.pid == pid and a.is_running()
        log_text = a.log_text()
        assert re.search(r"event=reload_key_applied .*key=partitions\.max_per_instance", log_text)
        assert "event=reload_needs_restart" not in log_text
        assert set(after_a) <= set(before_a), "a reload must not move partitions needlessly"
        assert set(before_b) <= set(after_b), "partitions that do not move stay where they are"
        # The two moved partitions were taken over by gw-1: their handover gap is recorded.
        _status, _headers, metrics = await http_get(b.http_url + "/metrics")
        count = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("linechatd_handover_gap_seconds_count")
        )
        assert count >= 2, metrics
        # One publisher of the view log for the cluster; both read it.
        with trio.fail_after(15):
            while True:
                gauges = [await _gauges(x.http_url) for x in (a, b)]
                if sum(g["linechatd_view_publisher"] for g in gauges) == 1 and all(
                    g["linechatd_view_log_entries_read"] > 0 for g in gauges
                ):
                    break
                await trio.sleep(0.2)

        # An invalid file is rejected with its reasons and the running config stays.
        a.config_path.write_text(text + "\n[partitions]\nmax_per_instanse = 1\n")
        a.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while "reload_rejected" not in a.log_text():  # noqa: ASYNC110 - polling a log file
                await trio.sleep(0.1)
        assert "partitions.max_per_instanse: unknown key" in a.log_text()
        # The rejection is final once logged: the running config keeps its cap,
        # which the balancer's target shows (uncapped it would be 4).
        _status, _headers, doc = await http_get(a.http_url + "/api/status")
        assert doc["target"] == 2, doc
        assert len(await _held(a.http_url)) == 2
        assert a.log_text().count("reload_applied") == 1, "only the valid reload applied"
        assert a.is_running()


async def test_status_and_drain_commands(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")

    def per_instance(i: int) -> dict[str, dict[str, object]]:
        # Both behind "a proxy" that answers nothing; the commands must use the
        # admin listener each instance registered instead.
        (admin_port,) = free_ports(1)
        return {
            "http": {"advertise": "https://chat.invalid"},
            "admin": {"token_file": str(token_file), "listen": f"127.0.0.1:{admin_port}"},
            # auth "none" behind a public advertise url counts as exposed.
            "auth": {"allow_insecure_none": True},
        }

    async with start_cluster(
        2,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=4,
        per_instance=per_instance,
    ) as cluster:
        with trio.fail_after(30):
            await _wait_held(cluster[0].http_url, 2)
            await _wait_held(cluster[1].http_url, 2)
        config = str(cluster[0].config_path)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "linechatd", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        result = await trio.to_thread.run_sync(cli, "status", "--config", config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (
            f"cluster {cluster_names.cluster}: 2 instances, 4/4 partitions owned" in result.stdout
        )
        assert "gw-0" in result.stdout and "gw-1" in result.stdout
        assert result.stderr == "", "no library log lines"

        result = await trio.to_thread.run_sync(cli, "status", "--config", config, "--json")
        view = json.loads(result.stdout)
        assert view["healthy"] is True
        assert {i["instance"] for i in view["instances"]} == {"gw-0", "gw-1"}
        assert all(o["instance"] in ("gw-0", "gw-1") for o in view["owners"])

        result = await trio.to_thread.run_sync(cli, "drain", "gw-9", "--config", config)
        assert result.returncode == 1
        assert "no live instance 'gw-9'" in result.stderr

        # Without the token (no --config): refused, nothing happens.
        result = await trio.to_thread.run_sync(
            cli, "drain", "gw-1", "--zookeeper", zookeeper_hosts, "--cluster", cluster_names.cluster
        )
        assert result.returncode == 1 and "refused the admin token" in result.stderr
        assert cluster[1].is_running()

        result = await trio.to_thread.run_sync(
            cli, "drain", "gw-1", "--config", config, "--wait", "--timeout", "60"
        )
        assert result.returncode == 0, result.stderr
        assert "gw-1: drained" in result.stdout
        with trio.fail_after(30):
            assert await cluster[1].wait_exit(30) == 0
            await _wait_held(cluster[0].http_url, 4)

        # One instance left, every partition owned: healthy. Then gw-0 stops
        # too: ZooKeeper still has the cluster, and nothing owns anything.
        result = await trio.to_thread.run_sync(cli, "status", "--config", config)
        assert result.returncode == 0, result.stdout
        await cluster[0].stop()
        result = await trio.to_thread.run_sync(cli, "status", "--config", config)
        assert result.returncode == 1, result.stdout
        assert "problem: no live instance" in result.stdout
        assert "problem: 4 partitions without owner" in result.stdout

        result = await trio.to_thread.run_sync(
            cli, "status", "--zookeeper", zookeeper_hosts, "--cluster", "no-such-cluster"
        )
        assert result.returncode == 3 and "no cluster named" in result.stderr


async def test_stopping_every_instance_at_once_does_not_wait_the_grace_period(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    # A grace period far longer than the wait below: only a drain that sees
    # nobody left to take over can end in time.
    async with start_cluster(
        3,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=6,
        sections={"shutdown": {"grace_period_s": 600.0}},
    ) as cluster:
        with trio.fail_after(30):
            for gateway in cluster.instances:
                await _wait_held(gateway.http_url, 2)
        for gateway in cluster.instances:
            gateway.terminate()
        with trio.fail_after(120):
            codes = [await gateway.wait_exit(120) for gateway in cluster.instances]
        assert codes == [0, 0, 0], cluster.log_tails()
        assert any("drain_nobody_left" in g.log_text() for g in cluster.instances)


async def test_a_duplicate_instance_id_stops_the_newcomer(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=2,
        sections={"zookeeper": {"session_timeout": 4.0}},
    ) as cluster:
        first = cluster[0]
        # A second process with the first one's id (a copied file), own ports.
        twin = cluster.add_instance({"instance": {"id": first.instance_id}})
        with trio.fail_after(60):
            code = await twin.wait_exit(60)
        assert code == EXIT_CONFIG, twin.log_tail()
        assert f"instance.id: {first.instance_id!r} is registered by another live instance" in (
            twin.log_text()
        )
        status, _, _ = await http_get(first.http_url + "/readyz")
        assert status == 200 and first.is_running()


async def test_run_exits_78_on_an_invalid_configuration(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "bad.toml",
        zookeeper={"hosts": "127.0.0.1:1", "session_timeout_s": 5},
        kafka={"bootstrap_servers": "127.0.0.1:1"},
    )

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "linechatd", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = await trio.to_thread.run_sync(run)
    assert result.returncode == EXIT_CONFIG
    assert "zookeeper.session_timeout_s: unknown key (did you mean 'session_timeout'?)" in (
        result.stderr
    )


async def test_a_second_cluster_on_the_same_kafka_names_is_refused(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=2,
    ) as cluster:
        other = cluster_names.cluster + "-other"
        # Another cluster name, the same topic and group names on the same Kafka.
        intruder = cluster.add_instance({"cluster": {"name": other}})
        with trio.fail_after(60):
            assert await intruder.wait_exit(60) == EXIT_CONFIG, intruder.log_tail()
        assert f"kafka.topic_prefix: cluster {cluster_names.cluster!r} uses the same Kafka" in (
            intruder.log_text()
        )
        # It recorded nothing: the first cluster still starts (a second instance joins).
        joiner = cluster.add_instance()
        await joiner.wait_ready(60)
        # With names of its own (the {cluster} placeholder) the other cluster starts.
        separate = cluster.add_instance(
            {
                "cluster": {"name": other},
                "kafka": {
                    "topic_prefix": "{cluster}-topic-",
                    "group_prefix": "{cluster}-consumer-group-",
                },
            }
        )
        await separate.wait_ready(60)
