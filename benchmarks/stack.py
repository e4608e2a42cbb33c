"""Starting and stopping what is measured: the shared services and each system's servers.

Everything is a child process on loopback, in its own process group, always
reaped. Servers inherit the harness's raised RLIMIT_NOFILE (see raise_nofile).
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linechatd.localservices import (
    LocalBroker,
    LocalService,
    LocalZooKeeper,
    ServiceError,
    free_ports,
    log_tail,
    spawn,
    stop_process,
)

# Past this many descriptors per process nothing here needs more.
WANTED_NOFILE = 1 << 20
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def raise_nofile(wanted: int = WANTED_NOFILE) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE as far as allowed (children inherit it); return (soft, hard).

    Raising the hard limit needs CAP_SYS_RESOURCE; without it the soft limit
    goes up to the hard one, and the connection phases stop below that.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def http_json(url: str, *, timeout: float = 2.0, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, None


def wait_until(what: str, check: Callable[[], bool], timeout: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(every)


@dataclass
class Server:
    """One server process of a system under test."""

    name: str
    argv: list[str]
    log_path: Path
    ws_url: str
    http_url: str | None = None
    ready: Callable[[Server], bool] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        self.process = spawn(self.argv, log_path=self.log_path, cwd=self.cwd)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = self.process.poll() if self.process else None
                raise ServiceError(
                    f"{self.name} exited with code {code}; end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            if self.ready is None or self.ready(self):
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"{self.name} not ready within {timeout:g}s; end of {self.log_path}:\n"
                    + log_tail(self.log_path)
                )
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)


def _readyz(server: Server) -> bool:
    try:
        status, _ = http_json(f"{server.http_url}/readyz", timeout=1.0)
    except OSError:
        return False
    return status == 200


def _accepts(server: Server) -> bool:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(server.ws_url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=0.5):
            return True
    except OSError:
        return False


# --- shared services -------------------------------------------------------------


class LocalRedis(LocalService):
    """Debian's redis-server on a free loopback port, no persistence."""

    name = "redis"

    def _command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            from linechatd.localservices import MissingDependency

            raise MissingDependency("redis-server not found (Debian: apt-get install redis-server)")
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--maxclients",
            "10000",
        ]

    def _ready(self, deadline: float) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@dataclass
class Services:
    zookeeper: LocalZooKeeper
    broker: LocalBroker

    @classmethod
    def start(cls, workdir: Path, timeout: float = 90.0) -> Services:
        zookeeper = LocalZooKeeper(workdir / "zookeeper")
        broker = LocalBroker(workdir / "broker")
        zookeeper.start(timeout)
        try:
            broker.start(timeout)
        except BaseException:
            zookeeper.stop()
            raise
        return cls(zookeeper, broker)

    def pids(self) -> dict[str, int]:
        return {
            name: pid
            for name, pid in (("zookeeper", self.zookeeper.pid), ("broker", self.broker.pid))
            if pid is not None
        }

    def stop(self) -> None:
        self.broker.stop()
        self.zookeeper.stop()


# --- the systems under test ---------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def linechatd_config(
    *,
    cluster: str,
    instance_id: str,
    partitions: int,
    http_port: int,
    ws_port: int,
    zookeeper: str,
    kafka: str,
    overrides: dict[str, dict[str, Any]],
) -> str:
    sections: dict[str, dict[str, Any]] = {
        "cluster": {"name": cluster, "partitions": partitions},
        "instance": {"id": instance_id},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "websocket": {"listen": f"127.0.0.1:{ws_port}"},
        "zookeeper": {"hosts": zookeeper},
        "kafka": {
            "bootstrap_servers": kafka,
            "topic_prefix": f"{cluster}-topic-",
            "group_prefix": f"{cluster}-group-",
        },
        "auth": {"mode": "none"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def linechatd_servers(
    workdir: Path,
    *,
    count: int,
    cluster: str,
    partitions: int,
    services: Services,
    overrides: dict[str, dict[str, Any]],
) -> list[Server]:
    servers = []
    for index in range(count):
        instance_id = f"gw-{index}"
        http_port, ws_port = free_ports(2)
        config = workdir / f"{instance_id}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            linechatd_config(
                cluster=cluster,
                instance_id=instance_id,
                partitions=partitions,
                http_port=http_port,
                ws_port=ws_port,
                zookeeper=services.zookeeper.address,
                kafka=services.broker.address,
                overrides=overrides,
            )
        )
        servers.append(
            Server(
                name=instance_id,
                argv=[sys.executable, "-m", "benchmarks.gateway_main", "--config", str(config)],
                log_path=workdir / f"{instance_id}.log",
                ws_url=f"ws://127.0.0.1:{ws_port}/ws",
                http_url=f"http://127.0.0.1:{http_port}",
                ready=_readyz,
                cwd=Path.cwd(),
                meta={"instance": instance_id},
            )
        )
    return servers


def linechatd_owners(server: Server) -> list[str | None]:
    """Partition -> owning instance id, as ``server`` sees it."""
    status, doc = http_json(f"{server.http_url}/api/partitions")
    if status != 200:
        raise ServiceError(f"{server.name}: /api/partitions answered {status}")
    return [p.get("instance") for p in doc["partitions"]]


def wait_balanced(servers: Sequence[Server], partitions: int, timeout: float) -> list[str]:
    """Wait until every partition has an owner and shares differ by at most one."""
    owners: list[str | None] = []

    def balanced() -> bool:
        nonlocal owners
        try:
            owners = linechatd_owners(servers[0])
        except (OSError, ServiceError):
            return False
        if any(o is None for o in owners):
            return False
        counts = [owners.count(s.meta["instance"]) for s in servers]
        return min(counts) > 0 and max(counts) - min(counts) <= 1

    wait_until("partitions balanced", balanced, timeout, every=0.25)
    return [o for o in owners if o is not None]


def asyncio_peer_servers(
    workdir: Path, *, count: int, partitions: int, kafka: str, prefix: str
) -> list[Server]:
    servers = []
    for index in range(count):
        (ws_port,) = free_ports(1)
        servers.append(
            Server(
                name=f"asyncio-{index}",
                argv=[
                    sys.executable,
                    "-m",
                    "benchmarks.peer_asyncio",
                    "--port",
                    str(ws_port),
                    "--kafka",
                    kafka,
                    "--partitions",
                    str(partitions),
                    "--index",
                    str(index),
                    "--count",
                    str(count),
                    "--topic-prefix",
                    prefix,
                ],
                log_path=workdir / f"asyncio-{index}.log",
                ws_url=f"ws://127.0.0.1:{ws_port}/ws",
                ready=_accepts,
                cwd=Path.cwd(),
                meta={"index": index},
            )
        )
    return servers


def socketio_peer_servers(workdir: Path, *, count: int, redis_url: str) -> list[Server]:
    servers = []
    for index in range(count):
        (port,) = free_ports(1)
        servers.append(
            Server(
                name=f"socketio-{index}",
                argv=[
                    sys.executable,
                    "-m",
                    "benchmarks.peer_socketio",
                    "--port",
                    str(port),
                    "--redis",
                    redis_url,
                ],
                log_path=workdir / f"socketio-{index}.log",
                ws_url=f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket",
                ready=_accepts,
                cwd=Path.cwd(),
                meta={"index": index},
            )
        )
    return servers


def start_all(servers: Sequence[Server], timeout: float, *, one_first: bool = False) -> None:
    """Start ``servers`` and wait until each is ready.

    ``one_first``: the first one gets ready alone before the rest start (linechatd
    instances create the Kafka topics at start-up; see the benchmarks README).
    """
    try:
        rest = list(servers)
        if one_first and rest:
            rest[0].start()
            rest[0].wait_ready(timeout)
            rest = rest[1:]
        for server in rest:
            server.start()
        for server in rest:
            server.wait_ready(timeout)
    except BaseException:
        stop_all(servers)
        raise


def stop_all(servers: Sequence[Server], timeout: float = 15.0) -> None:
    for server in servers:
        server.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for server in servers:
        server.wait_exit(max(0.1, deadline - time.monotonic()))
        server.stop(1.0)
