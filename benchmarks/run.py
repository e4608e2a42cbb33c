"""The benchmark harness: ``python -m benchmarks.run [--smoke] [--out bench-results]``.

Starts ZooKeeper and the Kafka-protocol broker (or uses the ones given), then
for each system in turn (linechatd, the plain asyncio gateway, the
python-socketio peer with Redis) starts its server processes, runs the
phases, and stops it; prints a table and writes results.json and PNG plots.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from linechatd.config import parse_config
from linechatd.localservices import LocalBroker, LocalZooKeeper, MissingDependency, ServiceError

from . import brokerprobe, stack
from .loadgen import BODY_BYTES, LoadGen
from .phases import Bench, Settings
from .systems import AsyncioPeer, Linechatd, SocketioPeer, System

SYSTEMS = ("linechatd", "asyncio", "socketio")
PHASES = ("saturation", "latency", "broker_only", "profile", "connections", "failover")
TARGETS = {
    "delivered_per_s_per_process": 10_000,
    "p99_ms_at_1000": 10.0,
    "connections_per_instance": 50_000,
    "rss_per_conn_kib": 20.0,
    "throughput_ratio_vs_socketio": 3.0,
}
SMOKE = Settings(
    pairs=8,
    step_s=1.0,
    drain_s=2.0,
    start_rate=200.0,
    max_rate=400.0,
    bisect_steps=0,
    max_steps=2,
    latency_rate=100.0,
    latency_s=1.0,
    connection_targets=(40, 80),
    connect_deadline_s=30.0,
    source_addresses=2,
    failover_timeout_s=30.0,
    profile_s=2.0,
    settle_s=0.3,
    idle_measure_s=0.5,
    smoke=True,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--smoke", action="store_true", help="tiny counts: runs in seconds")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--instances", type=int, default=2, help="server processes per system")
    parser.add_argument("--partitions", type=int, default=None, help="default 64 (smoke: 8)")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--pairs", type=int, default=None, help="sender/recipient pairs")
    parser.add_argument(
        "--connections", default=None, help="idle connection targets, e.g. 10000,50000"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=None, help="fixed rate of the latency phase"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all; smoke skips profile)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy")
    parser.add_argument("--no-failover", action="store_true", help="skip SIGTERM/SIGKILL phases")
    parser.add_argument("--zookeeper", help="use this ZooKeeper instead of starting one")
    parser.add_argument("--kafka", help="use this Kafka bootstrap instead of starting a broker")
    parser.add_argument(
        "--session-timeout", type=float, default=None, help="linechatd zookeeper.session_timeout"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a linechatd config key (TOML value), e.g. --set kafka.fetch_wait_max_ms=100",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = SMOKE if args.smoke else Settings()
    if args.pairs:
        settings = replace(settings, pairs=args.pairs)
    if args.latency_rate:
        settings = replace(settings, latency_rate=args.latency_rate)
    if args.connections:
        targets = tuple(int(x) for x in args.connections.split(",") if x.strip())
        settings = replace(settings, connection_targets=targets)
    return settings


class _GivenServices(stack.Services):
    """Services someone else runs: nothing to start or stop, no pids to measure."""

    def pids(self) -> dict[str, int]:
        return {}

    def stop(self) -> None:
        pass


def _given(zookeeper: str, kafka: str, workdir: Path) -> stack.Services:
    zk_host, zk_port = zookeeper.split("/")[0].split(",")[0].rsplit(":", 1)
    k_host, k_port = kafka.split(",")[0].rsplit(":", 1)
    zk = LocalZooKeeper(workdir / "zk-unused", int(zk_port), host=zk_host)
    broker = LocalBroker(workdir / "broker-unused", int(k_port), host=k_host)
    return _GivenServices(zk, broker)


def linechatd_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Defaults everywhere except what would make the benchmark measure a limit instead."""
    overrides: dict[str, dict[str, Any]] = {
        # The per-uid send budget (default 100/s, burst 200) and the frame budget are
        # policies, not costs: a few hundred senders at saturation would only measure
        # rate_limited errors and 1008 closes. The idle connections of the
        # connections phase send nothing, and must not be closed as idle meanwhile.
        # The handshake rate and the sockets per address are policies too: every
        # load connection comes from one of a few loopback addresses, so the
        # defaults (burst 200, 1,000 sockets) would measure 429s.
        "limits": {
            "sends_per_second": 100_000.0,
            "send_burst": 100_000,
            "max_frames_per_s": 100_000.0,
            "idle_timeout_s": 0.0,
            "handshakes_per_second_per_address": 1_000_000.0,
            "handshake_burst_per_address": 1_000_000,
            "max_connections_per_address": 1_000_000,
        },
    }
    if args.session_timeout is not None:
        overrides["zookeeper"] = {"session_timeout": args.session_timeout}
    elif args.smoke:
        overrides["zookeeper"] = {"session_timeout": 2.0}
        overrides["shutdown"] = {"drain_stagger_s": 0.05}
    for item in args.set:
        key, _, raw = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not section or not name or not raw:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        overrides.setdefault(section, {})[name] = value
    return overrides


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    settings = settings_from(args)
    partitions = args.partitions or (8 if args.smoke else 64)
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    soft, hard = stack.raise_nofile()
    results: dict[str, Any] = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "smoke": args.smoke,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
            ),
            "load_average_at_start": os.getloadavg(),
            "rlimit_nofile": [soft, hard],
            "body_bytes": BODY_BYTES,
            "partitions": partitions,
            "instances": args.instances,
            "loadgen_workers": args.workers,
            "settings": asdict(settings),
            "linechatd_config_overrides": linechatd_overrides(args),
            "versions": _versions(),
            "linechatd_tree": _git_state(),
            "notes": [],
        },
        "systems": {},
        "ratios": {},
        "targets": {},
        "profile": None,
    }
    if hard < max(settings.connection_targets) + 1024:
        results["meta"]["notes"].append(
            f"RLIMIT_NOFILE hard limit is {hard} and cannot be raised here (no "
            f"CAP_SYS_RESOURCE): each process holds at most ~{hard - 1024} connections"
        )
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    say(f"work dir {workdir} (logs); results to {out}")
    started = time.monotonic()
    loadgen: LoadGen | None = None
    try:
        loadgen = LoadGen(args.workers)
        for name in wanted:
            services: stack.Services | None = None
            try:
                if args.zookeeper and args.kafka:
                    services = _given(args.zookeeper, args.kafka, workdir)
                elif name != "socketio":
                    # Fresh per system: the broker's own CPU grows with what it
                    # stores, and one system's leftovers must not bill the next.
                    say("starting ZooKeeper and the broker ...")
                    services = stack.Services.start(workdir / f"services-{name}")
                results["systems"][name] = run_system(
                    name, args, settings, partitions, services, loadgen, workdir, out, results, say
                )
            finally:
                if services is not None:
                    services.stop()
    finally:
        if loadgen is not None:
            loadgen.close()
    results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    results["ratios"] = ratios(results["systems"])
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    try:
        from .plots import write_plots

        results["meta"]["plots"] = write_plots(results, out)
    except ImportError as exc:
        results["meta"]["notes"].append(f"no plots: {exc}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    shutil.rmtree(workdir, ignore_errors=True) if not os.environ.get("BENCH_KEEP_LOGS") else None
    return results


def make_system(
    name: str,
    args: argparse.Namespace,
    partitions: int,
    services: stack.Services | None,
    workdir: Path,
) -> System:
    if name == "socketio":
        return SocketioPeer(workdir / name, count=args.instances)
    assert services is not None
    if name == "linechatd":
        return Linechatd(
            workdir / name,
            services,
            count=args.instances,
            partitions=partitions,
            overrides=linechatd_overrides(args),
        )
    return AsyncioPeer(workdir / name, services, count=args.instances, partitions=partitions)


def run_system(
    name: str,
    args: argparse.Namespace,
    settings: Settings,
    partitions: int,
    services: stack.Services | None,
    loadgen: LoadGen,
    workdir: Path,
    out: Path,
    results: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any]:
    if name == "socketio" and shutil.which("redis-server") is None:
        message = "skipped: redis-server is not installed (Debian: apt-get install redis-server)"
        say(f"{name}: {message}")
        return {"skipped": message}
    try:
        system = make_system(name, args, partitions, services, workdir)
    except MissingDependency as exc:
        say(f"{name}: skipped: {exc}")
        return {"skipped": str(exc)}
    say(f"== {name}: starting {len(system.servers)} server processes")
    record: dict[str, Any] = {"system": system.describe()}
    try:
        system.start(timeout=120)
    except (ServiceError, TimeoutError, MissingDependency, ImportError) as exc:
        say(f"{name}: could not start: {exc}")
        return {**record, "error": f"could not start: {exc}"}
    bench = Bench(system, loadgen, settings, say)
    soft, hard = stack.raise_nofile()

    def phase(key: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        try:
            record[key] = fn()
        except Exception as exc:  # one phase failing must not lose the others
            say(f"  {name}: phase {key} failed: {exc!r}")
            record[key] = {"error": repr(exc), "trace": traceback.format_exc(limit=5)}
        say(f"  {name}: {key} took {time.monotonic() - t:.1f}s")
        return record[key]

    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if args.no_profile or settings.smoke:
        phases.discard("profile")
    if args.no_failover:
        phases.discard("failover")
    try:
        record["idle"] = _idle(bench)
        phase("pairs", bench.open_pairs)
        half = 0.0
        if "saturation" in phases:
            sat = phase("saturation", bench.saturation)
            half = (sat.get("max_offered_per_s") or 0) / 2 if isinstance(sat, dict) else 0
        if "latency" in phases:
            latency: dict[str, Any] = {}
            latency["at_1000"] = phase("latency", lambda: bench.latency(settings.latency_rate))
            if half:
                latency["at_half_max"] = phase("latency", lambda: bench.latency(half))
            record["latency"] = latency
            if name == "linechatd" and services is not None and "broker_only" in phases:
                # Right after the gateway's own steps: the broker holds the same data.
                record["broker_only"] = phase(
                    "broker_only",
                    lambda: _broker_only(
                        services, args, settings, [settings.latency_rate, half], say
                    ),
                )
        if name == "linechatd" and "profile" in phases:
            results["profile"] = phase(
                "profile", lambda: profile_under_load(bench, half or settings.latency_rate, out)
            )
            record.pop("profile", None)
        bench.close_pairs()
        # Failover before the connection phase: tens of thousands of clients
        # leaving at the end of it can cost an instance its leases (reported there).
        if name == "linechatd" and "failover" in phases and isinstance(system, Linechatd):
            phase("handover", lambda: _failover(bench, system, signal.SIGTERM))
            phase("failover", lambda: _failover(bench, system, signal.SIGKILL))
            phase("restore", lambda: _restore(system))
            record.pop("restore", None)
        if "connections" in phases:
            phase("connections", lambda: _connections(bench, system, hard))
    finally:
        say(f"== {name}: stopping")
        system.stop()
    return record


def _broker_only(
    services: stack.Services,
    args: argparse.Namespace,
    settings: Settings,
    rates: list[float],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The broker-only probe at the latency phase's rates, with the gateways' Kafka settings."""
    kafka = linechatd_overrides(args).get("kafka", {})
    defaults = parse_config(
        {"zookeeper": {"hosts": "127.0.0.1:1"}, "kafka": {"bootstrap_servers": "127.0.0.1:1"}}
    ).kafka
    out: dict[str, Any] = {}
    for key, rate in zip(("at_1000", "at_half_max"), rates, strict=True):
        if not rate:
            continue
        out[key] = brokerprobe.run(
            services.broker.address,
            rate=rate,
            duration_s=settings.latency_s,
            linger_ms=int(kafka.get("linger_ms", defaults.linger_ms)),
            fetch_wait_max_ms=int(kafka.get("fetch_wait_max_ms", defaults.fetch_wait_max_ms)),
            broker_pid=services.pids().get("broker"),
            drain_s=settings.drain_s,
            say=say,
        )
    return out


def _idle(bench: Bench) -> dict[str, Any]:
    begun = bench.cpu.start()
    time.sleep(0.5 if bench.settings.smoke else 5.0)
    cpu = bench.cpu.stop(begun)
    from . import procstat

    bench.idle_cores = cpu["server_cores"]
    bench.idle_helper_cores = dict(cpu["helper_cores"])
    return {
        "server_cores": cpu["server_cores"],
        "helper_cores": cpu["helper_cores"],
        "other_cores": cpu["other_cores"],
        "rss_mib": [round(procstat.rss_bytes(p) / 2**20, 1) for p in bench.system.server_pids()],
    }


def _restore(system: Linechatd) -> None:
    """Bring the stopped instance back and wait until the partitions are shared again."""
    victim = system.servers[-1]
    if not victim.running():
        victim.start()
        victim.wait_ready(120)
    system.refresh_owners(120)


def _connections(bench: Bench, system: System, fd_limit: int) -> dict[str, Any]:
    """The connection phase; for linechatd also whether server 0 kept its leases.

    Closing the idle clients (at ``close_per_second``) is a disconnect storm:
    the instance must keep its ZooKeeper session trusted through it.
    """
    if not isinstance(system, Linechatd):
        return bench.connections(fd_limit)
    server = system.servers[0]
    instance = server.meta["instance"]
    log_start = server.log_path.stat().st_size if server.log_path.exists() else 0
    held_before = system.owners.count(instance)
    result = bench.connections(fd_limit)
    time.sleep(max(bench.settings.settle_s, 1.0) * 5)
    try:
        owners = stack.linechatd_owners(server)
        held_after: int | None = owners.count(instance)
    except (OSError, ServiceError):
        held_after = None
    with open(server.log_path, "rb") as f:
        f.seek(log_start)
        tail = f.read().decode("utf-8", "replace")
    result["leases"] = {
        "server": server.name,
        "held_before": held_before,
        "held_after_clients_left": held_after,
        "zookeeper_degraded_events": tail.count("degraded=true"),
        "lease_ended_events": tail.count("event=lease_ended"),
    }
    if result["leases"]["lease_ended_events"]:
        bench.say(
            f"  {system.name}: {server.name} lost leases while its idle clients left "
            f"({result['leases']['zookeeper_degraded_events']} 'no answer from ZooKeeper' "
            f"events, {result['leases']['lease_ended_events']} leases ended)"
        )
    return result


def _failover(bench: Bench, system: Linechatd, how: signal.Signals) -> dict[str, Any]:
    victim = system.servers[-1]
    if not victim.running():
        victim.start()
        victim.wait_ready(120)
    # Quiet for a moment first: the ownership view must not be a stale one.
    time.sleep(bench.settings.settle_s)
    system.refresh_owners(120)
    return bench.failover(how, bench.settings.failover_timeout_s)


def profile_under_load(bench: Bench, rate: float, out: Path) -> dict[str, Any]:
    from . import profile

    if profile.have_py_spy() is None:
        return {"skipped": "py-spy is not installed"}
    duration = bench.settings.profile_s
    recordings = {}
    for server in bench.system.servers:
        path = out / f"profile-{server.name}.txt"
        recordings[server.name] = (
            path,
            profile.start_recording(server.pid, path, duration_s=duration + 1),
        )
    step = bench.step(rate, duration)
    analyses = {}
    for name, (path, process) in recordings.items():
        try:
            _out, err = process.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, err = process.communicate()
        if path.exists():
            analyses[name] = profile.analyze([path])
        else:
            analyses[name] = {"error": err.decode(errors="replace")[-500:]}
    paths = [path for path, _ in recordings.values() if path.exists()]
    combined = profile.analyze(paths) if paths else None
    return {
        "rate_per_s": rate,
        "cpu_us_per_msg": step["cpu_us_per_msg"],
        "server_cores": step["cpu"]["server_cores"],
        "latency": step["latency"],
        "lossless": step["lossless"],
        "note": "py-spy --gil --nonblocking sampling of every gateway during one step",
        "gateways": analyses,
        "combined": combined,
        # Each component's share of the gateways' Python time, applied to the
        # measured server CPU per delivered message (inclusive: shares overlap).
        "attribution": profile.attribute(combined, step["cpu_us_per_msg"]) if combined else [],
        "raw_files": [p.name for p in paths],
    }


# --- summaries ------------------------------------------------------------------------


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 2)
    return None


def ratios(systems: dict[str, Any]) -> dict[str, Any]:
    mine = systems.get("linechatd", {})
    out: dict[str, dict[str, Any]] = {}
    for peer in ("socketio", "asyncio"):
        theirs = systems.get(peer)
        if not theirs or "skipped" in theirs:
            out[f"linechatd/{peer}"] = {"skipped": True}
            continue
        out[f"linechatd/{peer}"] = {
            "throughput": _ratio(
                _get(mine, "saturation", "delivered_per_s_per_process"),
                _get(theirs, "saturation", "delivered_per_s_per_process"),
            ),
            "cpu_us_per_msg": _ratio(
                _get(mine, "saturation", "cpu_us_per_msg"),
                _get(theirs, "saturation", "cpu_us_per_msg"),
            ),
            "p99_at_1000": _ratio(
                _get(mine, "latency", "at_1000", "p99_ms"),
                _get(theirs, "latency", "at_1000", "p99_ms"),
            ),
            "p99_at_half_max": _ratio(
                _get(mine, "latency", "at_half_max", "p99_ms"),
                _get(theirs, "latency", "at_half_max", "p99_ms"),
            ),
            "rss_per_conn": _ratio(
                _get(mine, "connections", "rss_per_conn_kib"),
                _get(theirs, "connections", "rss_per_conn_kib"),
            ),
        }
    return out


def targets(results: dict[str, Any]) -> dict[str, Any]:
    mine = results["systems"].get("linechatd", {})
    throughput = _get(mine, "saturation", "delivered_per_s_per_process")
    p99 = _get(mine, "latency", "at_1000", "p99_ms")
    conns = _get(mine, "connections", "max_connections")
    rss = _get(mine, "connections", "rss_per_conn_kib")
    ratio = _get(results, "ratios", "linechatd/socketio", "throughput")
    p99_ratio = _get(results, "ratios", "linechatd/socketio", "p99_at_1000")

    def verdict(value: Any, ok: bool) -> dict[str, Any]:
        return {"value": value, "met": bool(ok) if value is not None else None}

    return {
        "delivered_per_s_per_process >= 10000": verdict(
            throughput, throughput is not None and throughput >= 10_000
        ),
        "p99_ms_at_1000 <= 10": verdict(p99, p99 is not None and p99 <= 10),
        "idle_connections_per_instance >= 50000": verdict(
            conns, conns is not None and conns >= 50_000
        ),
        "rss_per_conn_kib <= 20": verdict(rss, rss is not None and rss <= 20),
        "throughput >= 3x socketio at <= p99": verdict(
            ratio,
            ratio is not None and ratio >= 3 and p99_ratio is not None and p99_ratio <= 1,
        ),
    }


def _git_state() -> str | None:
    """The commit measured, and whether the work tree differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "linechatd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (modified)' if dirty else ''}" if head else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in (
        "linechatd",
        "trio",
        "trio-websocket",
        "wsproto",
        "confluent-kafka",
        "websockets",
        "picows",
        "uvloop",
        "python-socketio",
        "python-engineio",
        "uvicorn",
        "redis",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _helpers_cell(doc: dict[str, Any]) -> str:
    raw = _get(doc, "saturation", "helper_cpu_us_per_msg") or {}
    marginal = _get(doc, "saturation", "helper_cpu_us_per_msg_marginal") or {}
    parts = [
        f"{name} {raw[name]:,.0f} ({marginal.get(name) or 0:,.0f})"
        for name in ("broker", "redis")
        if isinstance(raw.get(name), int | float)
    ]
    return ", ".join(parts) or "-"


def table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    names = [n for n in SYSTEMS if n in systems]

    def cell(name: str, *path: str, fmt: str = "{:,.0f}") -> str:
        value = _get(systems.get(name, {}), *path)
        if value is None:
            return "skipped" if "skipped" in systems.get(name, {}) else "-"
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    rows: list[tuple[str, list[str]]] = [
        (
            "delivered msg/s per process (saturation)",
            [cell(n, "saturation", "delivered_per_s_per_process") for n in names],
        ),
        (
            "delivered msg/s, all processes",
            [cell(n, "saturation", "delivered_per_s") for n in names],
        ),
        (
            "highest lossless offered rate msg/s",
            [cell(n, "saturation", "max_offered_per_s") for n in names],
        ),
        (
            "server CPU-us per delivered msg",
            [cell(n, "saturation", "cpu_us_per_msg", fmt="{:,.1f}") for n in names],
        ),
        (
            "  same, less the idle servers' CPU (marginal)",
            [cell(n, "saturation", "cpu_us_per_msg_marginal", fmt="{:,.1f}") for n in names],
        ),
        (
            "broker / redis CPU-us per msg (marginal)",
            [_helpers_cell(systems.get(n, {})) for n in names],
        ),
        (
            "server cores busy at saturation",
            [cell(n, "saturation", "server_cores", fmt="{:.2f}") for n in names],
        ),
        (
            "loadgen cores at saturation",
            [cell(n, "saturation", "loadgen_cores", fmt="{:.2f}") for n in names],
        ),
        (
            "other processes' cores (noise)",
            [cell(n, "saturation", "other_cores", fmt="{:.2f}") for n in names],
        ),
    ]
    for label, key in (("fixed rate", "at_1000"), ("50% of max", "at_half_max")):
        rows.append(
            (f"latency @ {label}: rate", [cell(n, "latency", key, "rate_per_s") for n in names])
        )
        for q in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            rows.append(
                (
                    f"latency @ {label}: {q[:-3]} ms",
                    [cell(n, "latency", key, q, fmt="{:,.2f}") for n in names],
                )
            )
        rows.append(
            (
                f"CPU-us/msg @ {label}",
                [cell(n, "latency", key, "cpu_us_per_msg", fmt="{:,.1f}") for n in names],
            )
        )
    rows += [
        (
            "idle connections held (one process)",
            [cell(n, "connections", "max_connections") for n in names],
        ),
        (
            "RSS KiB per idle connection",
            [cell(n, "connections", "rss_per_conn_kib", fmt="{:.1f}") for n in names],
        ),
        ("handshakes per second", [cell(n, "connections", "handshakes_per_s") for n in names]),
        (
            "idle server cores (no clients)",
            [cell(n, "idle", "server_cores", fmt="{:.3f}") for n in names],
        ),
        (
            "SIGTERM handover: first / all partitions back (s)",
            [
                f"{cell(n, 'handover', 'first_back_s', fmt='{:.2f}')} / {cell(n, 'handover', 'all_back_s', fmt='{:.2f}')}"
                if n == "linechatd"
                else "n/a"
                for n in names
            ],
        ),
        (
            "SIGKILL failover: first / all partitions back (s)",
            [
                f"{cell(n, 'failover', 'first_back_s', fmt='{:.2f}')} / {cell(n, 'failover', 'all_back_s', fmt='{:.2f}')}"
                if n == "linechatd"
                else "n/a"
                for n in names
            ],
        ),
    ]
    for point_index in range(2):
        point_label: str | None = None
        values = []
        for n in names:
            points = _get(systems.get(n, {}), "connections", "points") or []
            if point_index < len(points):
                p = points[point_index]
                point_label = (
                    point_label
                    or f"RSS at connection point {point_index + 1} (conns: MiB, KiB/conn)"
                )
                values.append(f"{p['connections']}: {p['rss_mib']}, {p['rss_per_conn_kib']}")
            else:
                values.append("-")
        if point_label:
            rows.append((point_label, values))
    width = max(len(r[0]) for r in rows)
    col = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = [
        f"{'metric'.ljust(width)}  " + "  ".join(n.rjust(col[i]) for i, n in enumerate(names)),
        "-" * (width + 2 + sum(col) + 2 * len(col)),
    ]
    for label, values in rows:
        lines.append(
            f"{label.ljust(width)}  " + "  ".join(v.rjust(col[i]) for i, v in enumerate(values))
        )
    lines.append("")
    for pair, values in results.get("ratios", {}).items():
        if values.get("skipped"):
            lines.append(f"ratios {pair}: skipped")
            continue
        lines.append(
            f"ratios {pair}: throughput {values['throughput']}x, CPU/msg {values['cpu_us_per_msg']}x, "
            f"p99@1000 {values['p99_at_1000']}x, p99@50% {values['p99_at_half_max']}x, "
            f"RSS/conn {values['rss_per_conn']}x"
        )
    lines.append("")
    for name, verdict in results.get("targets", {}).items():
        mark = {True: "met", False: "NOT met", None: "not measured"}[verdict["met"]]
        lines.append(f"target {name}: {verdict['value']} -> {mark}")
    for note in results["meta"].get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def decomposition(results: dict[str, Any]) -> str:
    """linechatd's latency split into the gateway's share and the broker's, at each fixed rate."""
    doc = results["systems"].get("linechatd", {})

    def pair(d: Any, *path: str) -> str:
        p50, p99 = _get(d, *path, "p50_ms"), _get(d, *path, "p99_ms")
        if p50 is None and p99 is None:
            return "-"
        return f"{p50 if p50 is not None else '-'} / {p99 if p99 is not None else '-'}"

    def num(value: Any, fmt: str = "{:,.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    header = ["", "at 1,000 msg/s", "at 50% of max"]
    keys = ("at_1000", "at_half_max")
    lat = [_get(doc, "latency", k) or {} for k in keys]

    def by_thread(d: dict[str, Any], *groups: str) -> str:
        threads = d.get("cpu_us_per_msg_by_thread") or {}
        return " / ".join(num(threads.get(g, 0.0) if threads else None, "{:,.0f}") for g in groups)

    probe = [_get(doc, "broker_only", k) or {} for k in keys]
    rows = [
        ("rate (msg/s)", [num(d.get("rate_per_s"), "{:,.0f}") for d in lat]),
        ("end to end send->receive p50 / p99 (ms)", [pair(d) for d in lat]),
        ("end to end send->ack p50 / p99 (ms)", [pair(d, "ack") for d in lat]),
        ("broker-only produce->fetched p50 / p99 (ms)", [pair(d, "latency") for d in probe]),
        ("broker-only produce->ack p50 / p99 (ms)", [pair(d, "ack") for d in probe]),
        ("gateway: frame read->produce p50 / p99 (ms)", [pair(d, "residence", "read_to_produce") for d in lat]),
        ("gateway: report->ack written p50 / p99 (ms)", [pair(d, "residence", "report_to_ack") for d in lat]),
        ("gateway: fetched->written p50 / p99 (ms)", [pair(d, "residence", "fetch_to_write") for d in lat]),
        ("gateway CPU-us per delivered msg (both processes)", [num(d.get("cpu_us_per_msg")) for d in lat]),
        ("  of it trio / librdkafka / fetch thread", [by_thread(d, "trio", "librdkafka", "fetch") for d in lat]),
        ("  of it trio workers / other threads", [by_thread(d, "trio workers", "other") for d in lat]),
        ("broker CPU-us per msg, gateway's traffic", [num(_get(d, "helper_cpu_us_per_msg", "broker")) for d in lat]),
        ("broker CPU-us per msg, broker-only probe", [num(d.get("broker_cpu_us_per_msg")) for d in probe]),
        ("loadgen / other cores during the step", [f"{num(d.get('loadgen_cores'), '{:.2f}')} / {num(d.get('other_cores'), '{:.2f}')}" for d in lat]),
        ("probe / other cores during the probe", [f"{num(d.get('probe_cores'), '{:.2f}')} / {num(d.get('other_cores'), '{:.2f}')}" for d in probe]),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    col = [max(len(header[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(2)]
    lines = [
        "linechatd, the gateway apart from the broker:",
        f"{''.ljust(width)}  " + "  ".join(h.rjust(col[i]) for i, h in enumerate(header[1:])),
    ]
    for label, values in rows:
        lines.append(
            f"{label.ljust(width)}  " + "  ".join(v.rjust(col[i]) for i, v in enumerate(values))
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        results = run(args, say)
    except (MissingDependency, ServiceError) as exc:
        say(f"benchmark could not run: {exc}")
        return 1
    say("")
    say(table(results))
    if "linechatd" in results["systems"]:
        say("")
        say(decomposition(results))
    say(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
