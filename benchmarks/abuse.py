"""The abuse benchmark: ``python -m benchmarks.abuse`` (``make bench-abuse``).

One gateway instance, 50 honest sender/recipient pairs exchanging 500 msg/s
(the load generator of ``make bench``, from 127.0.0.1), and, one scenario at
a time, one attacker (``benchmarks/attacker.py``, its own process, from its
own loopback address). Each scenario gets a fresh ZooKeeper, broker and
gateway, and runs the honest load twice back to back, without and with the
attacker, so that every comparison is between neighbours on a noisy shared
machine. Prints one table and writes ``abuse.json``:

- honest p50/p99 send-to-receive latency without / with the attacker, and
  honest messages lost or refused during the attack;
- what the attacker got: frames the gateway answered before closing it,
  handshakes accepted and refused, sockets held, sends acked, resumes served
  and the records the replay read for them;
- when the attacker was first closed, refused or throttled (seconds after
  it started);
- the gateway's RSS (peak during the attack) and CPU (cores), and whether
  it is still the same process, still ready.

Nothing is asserted: the numbers are the result (see docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from linechatd.hashing import partition_for

from . import procstat, stack
from .loadgen import LoadGen
from .phases import Bench, Settings
from .resume_storm import produce_offline
from .systems import Linechatd

SCENARIOS = (
    "ping_flood",
    "tiny_frames",
    "handshake_flood",
    "half_open",
    "reconnect_burst",
    "resume_and_drop",
)
# Each attacker from its own address; honest clients are on 127.0.0.1.
SOURCES = {name: f"127.0.0.{10 + i}" for i, name in enumerate(SCENARIOS)}


@dataclass(frozen=True)
class Plan:
    duration_s: float = 10.0
    drain_s: float = 5.0
    rate: float = 500.0
    pairs: int = 50
    partitions: int = 16
    # Records of other users in the resume attacker's partition: what one
    # resume from far back has to read through.
    resume_records: int = 50_000
    settle_s: float = 2.0


SMOKE = Plan(duration_s=2.0, drain_s=2.0, rate=100.0, pairs=8, resume_records=2_000, settle_s=0.5)


class RssPeak:
    """Samples a process's RSS in a thread until stopped; the peak."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid = pid
        self.peak = procstat.rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every_s,), daemon=True)

    def _sample(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, procstat.rss_bytes(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def scan_totals(log: str) -> dict[str, float]:
    """Replay passes in a gateway log: how many, records read, seconds spent."""
    lines = [line for line in log.splitlines() if "event=replay_scan_done" in line]

    def total(name: str) -> float:
        return sum(float(m[1]) for line in lines if (m := re.search(rf"\b{name}=([0-9.]+)", line)))

    logged = any(" scanned=" in line for line in lines)
    return {
        "passes": len(lines),
        # Gateways before the abandonment change do not log it.
        "scanned": total("scanned") if logged else float("nan"),
        "seconds": round(total("seconds"), 3),
    }


def honest_step(bench: Bench, plan: Plan) -> dict[str, Any]:
    result = bench.step(plan.rate, plan.duration_s)
    cpu = result["cpu"]
    return {
        "p50_ms": result["latency"]["p50_ms"],
        "p99_ms": result["latency"]["p99_ms"],
        "sent": result["sent"],
        "received": result["received"],
        "errors": result["errors"],
        "closed": result["closed"],
        "server_cores": cpu["server_cores"],
        "broker_cores": cpu["helper_cores"].get("broker"),
        # Everything else on the machine, the attacker included (see attacker_cores).
        "other_cores": cpu["other_cores"],
    }


def run_scenario(
    name: str, system: Linechatd, bench: Bench, plan: Plan, workdir: Path
) -> dict[str, Any]:
    gateway = system.servers[0]
    pid = gateway.pid
    extra: list[str] = []
    if name == "resume_and_drop":
        # Before the baseline: the broker is slower with more data, for both runs.
        extra = ["--resume-from", str(resume_cursor(system, plan))]
        time.sleep(plan.settle_s)
    baseline = honest_step(bench, plan)
    time.sleep(plan.settle_s)
    stats_path = workdir / f"attacker-{name}.json"
    port = int(gateway.ws_url.rsplit(":", 1)[1].split("/")[0])
    log_before = gateway.log_path.read_text(errors="replace")
    attacker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.attacker",
            name,
            "--port",
            str(port),
            "--source",
            SOURCES[name],
            "--uid",
            "mallory",
            "--duration",
            str(plan.duration_s + 1.0),
            "--out",
            str(stats_path),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path.cwd(),
    )
    try:
        assert attacker.stdout is not None
        ready = attacker.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"attacker {name} did not start: {ready!r}")
        with RssPeak(pid) as rss:
            cpu_before = procstat.sample([pid])
            attacker_before = procstat.sample([attacker.pid])
            attacked = honest_step(bench, plan)
            cpu = procstat.sample([pid]).rate_since(cpu_before)
            attacker_cores = procstat.sample([attacker.pid]).rate_since(attacker_before)
        attacker.wait(timeout=plan.duration_s + 60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    log_during = gateway.log_path.read_text(errors="replace")[len(log_before) :]
    status, _ = stack.http_json(f"{gateway.http_url}/readyz")
    return {
        "scenario": name,
        "baseline": baseline,
        "attacked": attacked,
        "attacker": stats,
        "replay": scan_totals(log_during),
        "rss_peak_mib": round(rss.peak / 2**20, 1),
        "gateway_cores": round(cpu, 3),
        "attacker_cores": round(attacker_cores, 3),
        "same_process": gateway.running() and gateway.pid == pid,
        "ready_after": status == 200,
    }


def resume_cursor(system: Linechatd, plan: Plan) -> int:
    """Fill mallory's partition with other users' records; a cursor before all of them."""
    config = tomllib.loads(Path(system.servers[0].argv[-1]).read_text())
    k = partition_for("mallory", system.partitions)
    topic = f"{config['kafka']['topic_prefix']}{k}"
    uids = [f"filler-{i}" for i in range(50)]
    offsets = produce_offline(
        config["kafka"]["bootstrap_servers"],
        topic,
        uids,
        max(1, plan.resume_records // len(uids)),
    )
    first = min(min(o) for o in offsets.values())
    return max(-1, first - 1)


def describe(row: dict[str, Any]) -> tuple[str, str, str]:
    """(what the attacker got, first stop, how it was stopped) for the table."""
    a = row["attacker"]
    if not a:
        return "no stats", "-", "-"
    first = "never" if a.get("first_stopped_s") is None else f"{a['first_stopped_s']:.2f}s"
    name = row["scenario"]
    statuses = a.get("statuses", {})
    if name in ("ping_flood", "tiny_frames"):
        per = a.get("answered_before_close") or []
        got = (
            f"{a['frames_answered']} answered of {a['frames_written']} sent, "
            f"{a['connections']} conns"
        )
        if per:
            got += f", max {max(per)}/conn before close"
        how = ",".join(f"{c}x{n}" for c, n in a.get("close_codes", {}).items()) or "not closed"
        return got, first, how
    if name == "handshake_flood":
        total = sum(statuses.values())
        return (
            f"{statuses.get('101', 0)} of {total} accepted",
            first,
            f"429x{statuses.get('429', 0)}",
        )
    if name == "half_open":
        return (
            f"{a['held']} of {a['connections']} held past 1 s",
            first,
            f"closed at once x{a['closed_by_server']}",
        )
    if name == "reconnect_burst":
        answers = a.get("answers", {})
        return (
            f"{answers.get('ack', 0)} acked of {a['frames_written']} sends, "
            f"{a['connections']} conns",
            first,
            ",".join(f"{k}x{v}" for k, v in answers.items() if k != "ack") or "-",
        )
    answers = a.get("answers", {})
    replay = row["replay"]
    scanned = replay["scanned"]
    scanned_text = "?" if scanned != scanned else f"{scanned:.0f}"  # NaN: not logged
    return (
        f"{answers.get('resumed_True', 0)} resumed, {scanned_text} records read "
        f"in {replay['passes']} passes, {replay['seconds']:.1f}s",
        first,
        f"429x{statuses.get('429', 0)}",
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'scenario':<16} {'honest p50 ms':>15} {'honest p99 ms':>17} {'lost':>5}  "
        f"{'attacker got':<58} {'stopped':>8} {'how':<22} {'RSS MiB':>8} {'gw CPU':>6} "
        f"{'others':>11} ok"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        b, x = row["baseline"], row["attacked"]
        got, first, how = describe(row)
        lost = x["sent"] - x["received"] + x["errors"]
        # Other processes' cores (the attacker's own excluded), without > with:
        # a busy machine makes every latency here worse.
        others = _pair(b["other_cores"], max(0.0, x["other_cores"] - row["attacker_cores"]), 2)
        print(
            f"{row['scenario']:<16} {_pair(b['p50_ms'], x['p50_ms']):>15} "
            f"{_pair(b['p99_ms'], x['p99_ms']):>17} {lost:>5}  {got[:58]:<58} {first:>8} "
            f"{how[:22]:<22} {row['rss_peak_mib']:>8} {row['gateway_cores']:>6.2f} "
            f"{others:>11} {'yes' if row['same_process'] and row['ready_after'] else 'NO'}"
        )


def _pair(before: float | None, after: float | None, digits: int = 1) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return f"{f(before)} > {f(after)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--smoke", action="store_true", help="tiny counts, a minute or so")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a linechatd config override (TOML value), e.g. limits.max_connections_per_address=10000",
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    if args.duration:
        plan = replace(plan, duration_s=args.duration)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    overrides = _overrides(args.set)
    stack.raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    loadgen = LoadGen(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-abuse-") as tmp:
            print(f"work directory {tmp}", flush=True)
            for name in names:
                print(f"== {name}", flush=True)
                try:
                    row = _fresh_run(Path(tmp) / name, loadgen, plan, name, overrides)
                except Exception as exc:  # one scenario's failure is reported, the rest run
                    print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
                    continue
                rows.append(row)
                got, first, how = describe(row)
                print(f"   {got}; first stopped {first} ({how})", flush=True)
    finally:
        loadgen.close()
    print()
    print(
        f"{plan.pairs} honest pairs at {plan.rate:.0f} msg/s for {plan.duration_s:.0f}s per run, "
        "without > with the attacker; one gateway; fresh ZooKeeper, broker and gateway "
        "per scenario"
    )
    print_table(rows)
    out = args.out / "abuse.json"
    out.write_text(
        json.dumps({"plan": plan.__dict__, "overrides": overrides, "rows": rows}, indent=1)
    )
    print(f"\nwrote {out}")
    return 0


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        found.setdefault(section, {})[name] = tomllib.loads(f"v = {value}")["v"]
    return found


def _fresh_run(
    workdir: Path,
    loadgen: LoadGen,
    plan: Plan,
    name: str,
    overrides: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """One scenario on a fresh ZooKeeper, broker and gateway: the broker slows
    down as it stores more, and one scenario's records must not slow the next."""
    services = stack.Services.start(workdir / "services")
    try:
        system = Linechatd(
            workdir / "linechatd",
            services,
            count=1,
            partitions=plan.partitions,
            overrides=overrides,
        )
        system.start(timeout=90)
        try:
            settings = Settings(pairs=plan.pairs * 2, drain_s=plan.drain_s, settle_s=plan.settle_s)
            bench = Bench(system, loadgen, settings, say=lambda line: print(line, flush=True))
            bench.open_pairs()
            try:
                return run_scenario(name, system, bench, plan, workdir)
            finally:
                bench.close_pairs()
        finally:
            system.stop()
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
