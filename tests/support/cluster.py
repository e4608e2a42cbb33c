"""Real gateway processes for integration tests.

Each gateway is ``python -m linechatd run --config PATH`` in its own process
group, logging to a file; ``start_cluster`` starts several on free loopback
ports against the session's ZooKeeper and broker and always stops them.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from linechatd.localservices import free_ports, log_tail, spawn

__all__ = [
    "Cluster",
    "ClusterNames",
    "GatewayFailed",
    "GatewayProcess",
    "http_get",
    "new_cluster_names",
    "render_toml",
    "start_cluster",
    "write_config",
]

Sections = Mapping[str, Mapping[str, Any]]


# --- names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNames:
    """Names that keep one test's state apart from every other test's."""

    cluster: str
    topic_prefix: str
    group_prefix: str

    def config_sections(self) -> dict[str, dict[str, Any]]:
        return {
            "cluster": {"name": self.cluster},
            "kafka": {"topic_prefix": self.topic_prefix, "group_prefix": self.group_prefix},
        }


def new_cluster_names() -> ClusterNames:
    token = "t" + secrets.token_hex(4)
    return ClusterNames(
        cluster=token,
        topic_prefix=f"{token}-topic-",
        group_prefix=f"{token}-consumer-group-",
    )


# --- a tiny TOML writer --------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(value: str) -> str:
    # JSON's escapes are all valid in a TOML basic string; DEL is the one control
    # character TOML requires escaped that JSON leaves alone.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: object, where: str) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # "inf", "-inf", "1e+100" and "0.5" are all TOML floats
    if isinstance(value, str | os.PathLike):
        return _toml_string(os.fspath(value))
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item, where) for item in value) + "]"
    raise TypeError(f"{where}: cannot write {type(value).__name__} to TOML")


def render_toml(sections: Sections) -> str:
    """``{"table": {"key": value}}`` as TOML; keys whose value is None are left out."""
    lines: list[str] = []
    for table, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(table)}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{_toml_key(key)} = {_toml_value(value, f'{table}.{key}')}")
    return "\n".join(lines) + "\n"


def write_config(path: str | os.PathLike[str], **sections: Mapping[str, Any]) -> Path:
    """Write ``sections`` (one keyword per TOML table) to ``path`` and return it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_toml(sections), encoding="utf-8")
    return target


def merge_sections(*layers: Sections | None) -> dict[str, dict[str, Any]]:
    """Later layers win, key by key within each table."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for table, values in (layer or {}).items():
            merged.setdefault(table, {}).update(values)
    return merged


# --- HTTP ----------------------------------------------------------------------------

# Never through a proxy from the environment: every test server is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get_blocking(
    url: str, headers: Mapping[str, str] | None, timeout: float
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, headers=dict(headers or {}), method="GET")
    try:
        response = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        response = error  # a 4xx/5xx still has a status, headers and a body
    with response:
        status = response.status
        response_headers = {name.lower(): value for name, value in response.headers.items()}
        body = response.read()
    text = body.decode("utf-8", "replace")
    if "json" in response_headers.get("content-type", ""):
        try:
            return status, response_headers, json.loads(text)
        except ValueError:
            pass
    return status, response_headers, text


async def http_get(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - the socket timeout of the blocking request
) -> tuple[int, dict[str, str], Any]:
    """GET ``url``: (status, headers with lower-cased names, parsed JSON or text).

    4xx/5xx answers are returned, not raised; connection failures raise OSError.
    """
    return await trio.to_thread.run_sync(
        _http_get_blocking, url, headers, timeout, abandon_on_cancel=True
    )


# --- one gateway ---------------------------------------------------------------------


class GatewayFailed(RuntimeError):
    """A gateway exited or never became ready; the message ends with its log."""


class GatewayProcess:
    """``linechatd run --config PATH`` as a child process.

    ``http_url`` defaults to ``http://`` + the config's ``http.listen``;
    ``command`` to ``python -m linechatd`` of this interpreter.
    Spawn from the trio (main) thread: see localservices.spawn.
    """

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        http_url: str | None = None,
        ws_url: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        instance_id: str | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        # What runs `linechatd`: this interpreter's package by default, or an
        # installed entry point (the production install test).
        self.command = list(command or [sys.executable, "-m", "linechatd"])
        config: dict[str, Any] = {}
        if http_url is None or ws_url is None or instance_id is None:
            config = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        if http_url is None:
            http_url = "http://" + config.get("http", {}).get("listen", "127.0.0.1:8080")
        if ws_url is None:
            ws_url = "ws://" + config.get("websocket", {}).get("listen", "127.0.0.1:8765") + "/ws"
        self.http_url = http_url.rstrip("/")
        self.ws_url = ws_url
        self.instance_id = (
            instance_id or config.get("instance", {}).get("id") or self.config_path.stem
        )
        self.log_path = Path(log_path) if log_path else self.config_path.with_suffix(".log")
        self.env = dict(env) if env is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<GatewayProcess {self.instance_id} {self.http_url} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        if self._process is not None:
            with self.log_path.open("ab") as log_file:
                log_file.write(b"\n----- restarted -----\n")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"  # a SIGKILLed gateway's log is still complete
        argv = [*self.command, "run", "--config", str(self.config_path)]
        self._process = spawn(argv, log_path=self.log_path, cwd=self.config_path.parent, env=env)

    # A deadline of our own (not the caller's fail_after) so that the failure carries the log.
    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Poll GET /readyz until 200; GatewayFailed if the process exits or time runs out."""
        with trio.move_on_after(timeout):
            while True:
                self._raise_if_exited("while starting")
                try:
                    status, _, _ = await http_get(self.http_url + "/readyz", timeout=2.0)
                except OSError:
                    status = None
                if status == 200:
                    return
                await trio.sleep(0.1)
        self._raise_if_exited("while starting")
        raise GatewayFailed(
            f"{self.instance_id} not ready within {timeout:g}s; end of {self.log_path}:\n"
            + self.log_tail()
        )

    def send_signal(self, sig: signal.Signals) -> None:
        if self._process is not None:
            self._process.send_signal(sig)  # a no-op once the process is reaped

    def terminate(self) -> None:
        """SIGTERM: the gateway drains and exits."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, like a crash: no goodbye to ZooKeeper, sessions expire."""
        if self._process is None:
            return
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self._process.kill()

    async def wait_exit(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109 - as wait_ready
        """The exit code (negative: killed by that signal); TimeoutError if still running."""
        if self._process is None:
            raise RuntimeError(f"{self!r} was never started")
        with trio.move_on_after(timeout):
            # Popen offers no event to await; polling a reaped-or-not flag is cheap.
            while (code := self._process.poll()) is None:  # noqa: ASYNC110
                await trio.sleep(0.02)
            return code
        raise TimeoutError(
            f"{self.instance_id} still running {timeout:g}s after it was asked to stop"
        )

    async def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; always reaps. Safe to repeat."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self.terminate()
            try:
                return await self.wait_exit(grace_s)
            except TimeoutError:
                self.kill()
        return await self.wait_exit(10.0)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def _raise_if_exited(self, when: str) -> None:
        code = self.returncode
        if self._process is None:
            raise RuntimeError(f"{self!r} was never started")
        if code is not None:
            raise GatewayFailed(
                f"{self.instance_id} exited with code {code} {when}; end of {self.log_path}:\n"
                + self.log_tail()
            )

    async def __aenter__(self) -> GatewayProcess:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await self.stop()


# --- a cluster of gateways -----------------------------------------------------------


@dataclass
class Cluster:
    """Gateways sharing one cluster name; ``instances[i]`` has id ``gw-<i>``."""

    workdir: Path
    zookeeper_hosts: str
    kafka_bootstrap: str
    names: ClusterNames
    partitions: int
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: list[GatewayProcess] = field(default_factory=list)

    def __getitem__(self, index: int) -> GatewayProcess:
        return self.instances[index]

    def __len__(self) -> int:
        return len(self.instances)

    def by_id(self, instance_id: str) -> GatewayProcess:
        for gateway in self.instances:
            if gateway.instance_id == instance_id:
                return gateway
        raise KeyError(instance_id)

    def running(self) -> list[GatewayProcess]:
        return [gateway for gateway in self.instances if gateway.is_running()]

    def config_for(
        self, instance_id: str, http_port: int, ws_port: int
    ) -> dict[str, dict[str, Any]]:
        """The TOML tables one instance starts with, before per-instance overrides."""
        return merge_sections(
            {
                "cluster": {"partitions": self.partitions},
                "instance": {"id": instance_id},
                "http": {"listen": f"127.0.0.1:{http_port}"},
                "websocket": {"listen": f"127.0.0.1:{ws_port}"},
                "zookeeper": {"hosts": self.zookeeper_hosts},
                "kafka": {"bootstrap_servers": self.kafka_bootstrap},
                "auth": {"mode": "none"},
                # Tests stop gateways often; a long drain would only slow them down.
                "shutdown": {"grace_period_s": 5.0},
            },
            self.names.config_sections(),
            self.sections,
        )

    def add_instance(self, overrides: Sections | None = None) -> GatewayProcess:
        """Write the next instance's config and start it (not waiting for readiness)."""
        instance_id = f"gw-{len(self.instances)}"
        http_port, ws_port = free_ports(2)
        sections = merge_sections(self.config_for(instance_id, http_port, ws_port), overrides)
        config_path = write_config(self.workdir / f"{instance_id}.toml", **sections)
        gateway = GatewayProcess(
            config_path,
            http_url=f"http://127.0.0.1:{http_port}",
            ws_url=f"ws://127.0.0.1:{ws_port}/ws",
            instance_id=instance_id,
        )
        self.instances.append(gateway)
        gateway.start()
        return gateway

    async def wait_ready(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - as above
        """Every running instance answers /readyz with 200 (GatewayFailed otherwise)."""
        # They start in parallel already; waiting in turn against one deadline costs
        # nothing more and reports the first failure as itself, not as a group.
        deadline = trio.current_time() + timeout
        for gateway in self.running():
            await gateway.wait_ready(max(0.0, deadline - trio.current_time()))

    async def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM them all at once, SIGKILL whoever outlives ``grace_s``."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for gateway in self.instances:
                    nursery.start_soon(gateway.stop, grace_s)

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(
            f"----- {gateway.instance_id} (exit code {gateway.returncode}) {gateway.log_path}\n"
            + gateway.log_tail(lines)
            for gateway in self.instances
        )


@asynccontextmanager
async def start_cluster(
    n: int,
    *,
    workdir: str | os.PathLike[str],
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    names: ClusterNames,
    partitions: int = 8,
    sections: Sections | None = None,
    per_instance: Callable[[int], Sections | None] | None = None,
    ready_timeout: float = 60.0,
    wait_ready: bool = True,
) -> AsyncIterator[Cluster]:
    """Start ``n`` gateways (ids gw-0..gw-<n-1>) and stop them all on exit, even on failure.

    ``sections`` overrides every instance's TOML tables, key by key;
    ``per_instance(i)`` adds overrides for instance i. On failure, the end of
    every instance's log is printed (pytest shows it with the failure).
    """
    cluster = Cluster(
        workdir=Path(workdir),
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=names,
        partitions=partitions,
        sections=merge_sections(sections),
    )
    cluster.workdir.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(n):
            cluster.add_instance(per_instance(i) if per_instance else None)
        if wait_ready:
            await cluster.wait_ready(ready_timeout)
        yield cluster
    except BaseException:
        print(cluster.log_tails(), file=sys.stderr)
        raise
    finally:
        await cluster.stop_all()
