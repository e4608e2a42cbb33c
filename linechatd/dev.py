"""``linechatd dev``: ZooKeeper, a broker and N gateways on loopback, one supervisor.

A plain synchronous supervisor: it starts every child in its own process group
(so a terminal Ctrl-C reaches only us, and we stop things in order), waits for
each gateway's /readyz, prints where everything listens, and on SIGINT/SIGTERM/
SIGHUP stops the gateways (SIGTERM, bounded wait, SIGKILL), then the broker,
then ZooKeeper. Children also get SIGKILL from the kernel if this process dies
without cleaning up (see localservices.spawn).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .localservices import (
    LocalBroker,
    LocalZooKeeper,
    MissingDependency,
    ServiceError,
    log_tail,
    port_is_free,
    spawn,
)

__all__ = ["run"]

CLUSTER_NAME = "dev"
DEMO_PATH = "/"
# The admin token of the dev cluster's instances, in the working directory.
ADMIN_TOKEN_FILE = "admin.token"
READY_TIMEOUT_S = 60.0
SERVICE_START_TIMEOUT_S = 60.0
# Gateways drain within their shutdown.grace_period_s (set below); allow a little more.
INSTANCE_GRACE_S = 5.0
INSTANCE_STOP_TIMEOUT_S = INSTANCE_GRACE_S + 10.0
PROGRESS_EVERY_S = 5.0
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Requests to our own children on loopback must never go through an environment proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class _Instance:
    id: str
    http_port: int
    ws_port: int
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    exit_reported: bool = False

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def poll(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def instance_ports(base_port: int, index: int) -> tuple[int, int]:
    """(http, websocket) ports of instance ``index``."""
    return base_port + 10 + 2 * index, base_port + 11 + 2 * index


def instance_config(
    *, instance_id: str, partitions: int, http_port: int, ws_port: int, zookeeper: str, kafka: str
) -> str:
    def q(value: str) -> str:
        return json.dumps(value)  # a valid TOML basic string

    return f"""\
# Written by `linechatd dev`; regenerated at every start.
[cluster]
name = {q(CLUSTER_NAME)}
partitions = {partitions}

[instance]
id = {q(instance_id)}

[http]
listen = {q(f"127.0.0.1:{http_port}")}
demo_page = true

[websocket]
listen = {q(f"127.0.0.1:{ws_port}")}

[zookeeper]
hosts = {q(zookeeper)}

[kafka]
bootstrap_servers = {q(kafka)}

[admin]
# Written by `linechatd dev` next to this file: `linechatd drain --config` reads it.
token_file = "{ADMIN_TOKEN_FILE}"

[auth]
mode = "none"

[shutdown]
grace_period_s = {INSTANCE_GRACE_S}
"""


def run(
    instances: int = 3,
    partitions: int = 16,
    base_port: int = 7100,
    workdir: Path | None = None,
    *,
    ready_timeout: float = READY_TIMEOUT_S,
    out: TextIO | None = None,
) -> int:
    """Run the local cluster until a signal; returns the exit code (0 after Ctrl-C)."""
    stream = out if out is not None else sys.stdout

    def say(line: str = "") -> None:
        try:
            print(line, file=stream, flush=True)
        except (OSError, ValueError):
            pass  # a closed pipe (`| head`) must not stop us from stopping our children

    problem = _check_arguments(instances, partitions, base_port)
    if problem:
        say(f"linechatd dev: {problem}")
        return 2
    busy = [port for port in _all_ports(instances, base_port) if not port_is_free(port)]
    if busy:
        say(
            f"linechatd dev: port(s) {', '.join(map(str, busy))} on 127.0.0.1 already in use "
            "(another `linechatd dev`?); choose other ports with --base-port"
        )
        return 1

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="linechatd-dev-"))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_admin_token(workdir / ADMIN_TOKEN_FILE)

    zookeeper = LocalZooKeeper(workdir / "zookeeper", base_port)
    broker = LocalBroker(workdir / "broker", base_port + 1)
    gateways = []
    for index in range(instances):
        http_port, ws_port = instance_ports(base_port, index)
        instance_id = f"gw-{index}"
        gateways.append(
            _Instance(
                id=instance_id,
                http_port=http_port,
                ws_port=ws_port,
                config_path=workdir / f"{instance_id}.toml",
                log_path=workdir / f"{instance_id}.log",
            )
        )

    signals = _StopSignals(lambda: say("still stopping; children get SIGKILL after a bounded wait"))
    code = 1
    with signals:
        try:
            try:
                code = _bring_up_and_supervise(
                    workdir, partitions, zookeeper, broker, gateways, ready_timeout, say
                )
            except _StopRequested as stop:
                say(f"\n{stop.args[0]} received")
                code = 0
            except (MissingDependency, ServiceError, OSError) as exc:
                say(f"linechatd dev: {exc}")
        except _StopRequested:
            pass  # the signal came while we reported a failure: we are stopping anyway
        finally:
            try:
                signals.disarm()
            except _StopRequested:
                pass  # it arrived just now; the handler has disarmed itself
            _stop_all(gateways, broker, zookeeper, say)
            say(f"stopped; logs are in {workdir}")
    return code


def _bring_up_and_supervise(
    workdir: Path,
    partitions: int,
    zookeeper: LocalZooKeeper,
    broker: LocalBroker,
    gateways: list[_Instance],
    ready_timeout: float,
    say: Callable[[str], None],
) -> int:
    say(f"linechatd dev: work dir {workdir}")
    say(f"starting zookeeper on {zookeeper.address} ...")
    zookeeper.start(SERVICE_START_TIMEOUT_S)
    say(f"starting broker on {broker.address} ...")
    broker.start(SERVICE_START_TIMEOUT_S)
    for gateway in gateways:
        process = _start_instance(gateway, partitions, zookeeper.address, broker.address)
        say(f"started {gateway.id} (pid {process.pid})")
    if not _wait_ready(gateways, ready_timeout, say):
        return 1
    _print_summary(say, workdir, partitions, zookeeper, broker, gateways)
    return _supervise(gateways, zookeeper, broker, say)


def _stop_all(
    gateways: list[_Instance],
    broker: LocalBroker,
    zookeeper: LocalZooKeeper,
    say: Callable[[str], None],
) -> None:
    """Gateways first (they release their leases), then the broker, then ZooKeeper."""
    if any(gateway.is_running() for gateway in gateways):
        say("stopping gateways ...")
    _stop_instances(gateways, INSTANCE_STOP_TIMEOUT_S, say)
    if broker.is_running():
        say("stopping broker ...")
    broker.stop()
    if zookeeper.is_running():
        say("stopping zookeeper ...")
    zookeeper.stop()


def _check_arguments(instances: int, partitions: int, base_port: int) -> str | None:
    if instances < 0:
        return f"--instances must be >= 0, got {instances}"
    if not 1 <= partitions <= 4096:
        return f"--partitions must be between 1 and 4096, got {partitions}"
    highest = max(_all_ports(instances, base_port))
    if base_port < 1 or highest > 65535:
        return f"--base-port {base_port} with {instances} instances needs ports up to {highest}"
    return None


def _all_ports(instances: int, base_port: int) -> list[int]:
    ports = [base_port, base_port + 1]
    for index in range(instances):
        ports.extend(instance_ports(base_port, index))
    return ports


class _StopSignals:
    """While active, the first SIGINT/SIGTERM/SIGHUP raises _StopRequested; later ones only
    run ``notice``: the shutdown that follows is bounded and must not be cut short.

    The handler disarms itself before raising, so at most one _StopRequested is ever raised.
    """

    def __init__(self, notice: Callable[[], None]) -> None:
        self._notice = notice
        self._armed = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopSignals:
        # Handlers can only be set from the main thread; elsewhere, signals stay as they were.
        if threading.current_thread() is threading.main_thread():
            self._armed = True
            self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._armed = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def disarm(self) -> None:
        self._armed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False
            raise _StopRequested(signum)
        self._notice()


def _start_instance(
    gateway: _Instance, partitions: int, zookeeper: str, kafka: str
) -> subprocess.Popen[bytes]:
    gateway.config_path.write_text(
        instance_config(
            instance_id=gateway.id,
            partitions=partitions,
            http_port=gateway.http_port,
            ws_port=gateway.ws_port,
            zookeeper=zookeeper,
            kafka=kafka,
        )
    )
    with open(gateway.log_path, "ab") as log_file:
        log_file.write(f"----- {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
    gateway.process = spawn(
        [sys.executable, "-m", "linechatd", "run", "--config", str(gateway.config_path)],
        log_path=gateway.log_path,
        cwd=gateway.config_path.parent,
    )
    return gateway.process


def _readyz(gateway: _Instance) -> bool:
    try:
        with _OPENER.open(gateway.http_url + "/readyz", timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:  # refused, timed out, or an HTTPError (not ready yet: 503)
        return False


def _report_exit(gateway: _Instance, say: Callable[[str], None]) -> None:
    gateway.exit_reported = True
    say(f"{gateway.id} exited with code {gateway.poll()}; end of {gateway.log_path}:")
    for line in log_tail(gateway.log_path, 30).splitlines():
        say(f"  | {line}")


def _wait_ready(gateways: list[_Instance], timeout: float, say: Callable[[str], None]) -> bool:
    start = time.monotonic()
    pending = list(gateways)
    announced: tuple[str, float] | None = None
    while pending:
        for gateway in list(pending):
            if gateway.poll() is not None:
                _report_exit(gateway, say)
                return False
            if _readyz(gateway):
                pending.remove(gateway)
                say(f"{gateway.id} ready ({time.monotonic() - start:.1f}s)")
        if not pending:
            break
        now = time.monotonic()
        head = pending[0]
        if announced is None or announced[0] != head.id or now - announced[1] >= PROGRESS_EVERY_S:
            say(f"waiting for {head.id} (readyz)... {now - start:.0f}s")
            announced = (head.id, now)
        if now - start >= timeout:
            for gateway in pending:
                say(f"{gateway.id} not ready after {timeout:g}s; end of {gateway.log_path}:")
                for line in log_tail(gateway.log_path, 30).splitlines():
                    say(f"  | {line}")
            return False
        time.sleep(0.2)
    return True


def _write_admin_token(path: Path) -> None:
    """A fresh admin token for this run, readable by us only."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")


def _print_summary(
    say: Callable[[str], None],
    workdir: Path,
    partitions: int,
    zookeeper: LocalZooKeeper,
    broker: LocalBroker,
    gateways: list[_Instance],
) -> None:
    rows = [
        ("zookeeper", str(zookeeper.pid), zookeeper.address),
        ("broker", str(broker.pid), broker.address),
    ]
    for gateway in gateways:
        pid = str(gateway.process.pid) if gateway.process else "-"
        rows.append((gateway.id, pid, f"{gateway.http_url}  {gateway.ws_url}"))
    width = max(len(name) for name, _, _ in rows)
    say("")
    say(
        f'linechatd dev: cluster "{CLUSTER_NAME}", {partitions} partitions, {len(gateways)} instance(s)'
    )
    say(f"  {'name'.ljust(width)}  {'pid':>7}  listens on")
    for name, pid, where in rows:
        say(f"  {name.ljust(width)}  {pid:>7}  {where}")
    say(f"  logs and configs: {workdir}")
    say("")
    if gateways:
        first = gateways[0]
        say("try it:")
        say(f"  demo page:        {first.http_url}{DEMO_PATH}")
        say(f"  where alice goes: curl '{first.http_url}/api/connection-url?uid=alice'")
        say(f"  metrics:          curl {first.http_url}/metrics")
        say(f"  cluster status:   linechatd status --config {first.config_path}")
        if len(gateways) > 1:
            say(
                f"  drain one:        linechatd drain {gateways[-1].id} --config {first.config_path}"
            )
        say("  fail-over:        kill a gateway's pid and watch its partitions move")
    else:
        say("no gateways; to run the test suite against these services:")
        say(
            f"  LINECHAT_TEST_ZOOKEEPER={zookeeper.address} LINECHAT_TEST_KAFKA={broker.address} make test"
        )
    say("Ctrl-C stops everything.")


def _supervise(
    gateways: list[_Instance],
    zookeeper: LocalZooKeeper,
    broker: LocalBroker,
    say: Callable[[str], None],
) -> int:
    """Watch the children until a signal; a dead gateway is reported, the rest keep going."""
    while True:
        for service in (zookeeper, broker):
            if not service.is_running():
                say(
                    f"{service.name} exited with code {service.returncode()}; end of {service.log_path}:"
                )
                for line in service.log_tail(30).splitlines():
                    say(f"  | {line}")
                return 1
        for gateway in gateways:
            if not gateway.exit_reported and gateway.poll() is not None:
                _report_exit(gateway, say)
        if gateways and all(gateway.exit_reported for gateway in gateways):
            say("every gateway has exited")
            return 1
        time.sleep(0.5)


def _stop_instances(gateways: list[_Instance], timeout: float, say: Callable[[str], None]) -> None:
    """SIGTERM all at once (they drain in parallel), SIGKILL stragglers, reap everyone."""
    running = [g for g in gateways if g.process is not None and g.process.poll() is None]
    for gateway in running:
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(g.is_running() for g in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for gateway in gateways:
        if gateway.process is None:
            continue
        # Only while unreaped: once reaped, the pid (and group id) may belong to someone else.
        if gateway.process.poll() is None:
            say(f"{gateway.id} still running after {timeout:g}s; killing it")
            try:
                os.killpg(gateway.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                gateway.process.kill()
        gateway.process.wait()
