"""Broker CPU per message against the gateway's Kafka client settings.

``python -m benchmarks.kafka_settings`` (``make bench-kafka``) runs linechatd
(2 instances, 64 partitions) once per combination of ``--linger`` and
``--fetch-wait`` on a fresh broker each time, and at each of ``--rates``
records: the broker's CPU-µs per delivered message and its cores with no
traffic at all, the gateways' CPU-µs per message, end-to-end latency and the
gateway's own residence (its metrics). The gateway decides how many produce
and fetch requests the broker serves per message; this shows what that
costs and what it buys. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import stack
from .loadgen import LoadGen
from .phases import Bench, Settings
from .run import _idle, linechatd_overrides, parse_args
from .systems import Linechatd


def _one(
    linger_ms: int,
    fetch_wait_ms: int,
    rates: list[float],
    step_s: float,
    partitions: int,
    loadgen: LoadGen,
    workdir: Path,
) -> dict[str, Any]:
    overrides = linechatd_overrides(parse_args([]))
    overrides["kafka"] = {"linger_ms": linger_ms, "fetch_wait_max_ms": fetch_wait_ms}
    services = stack.Services.start(workdir / f"services-{linger_ms}-{fetch_wait_ms}")
    try:
        system = Linechatd(
            workdir / f"linechatd-{linger_ms}-{fetch_wait_ms}",
            services,
            count=2,
            partitions=partitions,
            overrides=overrides,
        )
        system.start(timeout=120)
        try:
            bench = Bench(system, loadgen, replace(Settings(), step_s=step_s), print)
            idle = _idle(bench)
            bench.open_pairs()
            # Warm-up: connections, metadata and the first fetches are not what is measured.
            bench.step(rates[0], 2.0)
            steps = []
            for rate in rates:
                r = bench.step(rate, step_s)
                steps.append(
                    {
                        "rate_per_s": rate,
                        "lossless": r["lossless"],
                        "latency": r["latency"],
                        "ack_latency": r["ack_latency"],
                        "residence": r["residence"],
                        "gateway_cpu_us_per_msg": r["cpu_us_per_msg"],
                        "broker_cpu_us_per_msg": r["helper_cpu_us_per_msg"].get("broker"),
                        "broker_cores": r["cpu"]["helper_cores"].get("broker"),
                        "other_cores": r["cpu"]["other_cores"],
                    }
                )
            bench.close_pairs()
        finally:
            system.stop()
    finally:
        services.stop()
    return {
        "linger_ms": linger_ms,
        "fetch_wait_max_ms": fetch_wait_ms,
        "idle_broker_cores": idle["helper_cores"].get("broker"),
        "steps": steps,
    }


def _row(result: dict[str, Any], step: dict[str, Any]) -> str:
    lat, ack, res = step["latency"], step["ack_latency"], step["residence"]

    def stage(name: str) -> str:
        r = res.get(name) or {}
        return f"{r.get('p50_ms')}/{r.get('p99_ms')}"

    return (
        f"| {result['linger_ms']} | {result['fetch_wait_max_ms']} | {step['rate_per_s']:,.0f} "
        f"| {result['idle_broker_cores']} | {step['broker_cpu_us_per_msg']} "
        f"| {step['gateway_cpu_us_per_msg']} | {lat['p50_ms']} / {lat['p99_ms']} "
        f"| {ack['p50_ms']} / {ack['p99_ms']} | {stage('read_to_produce')} "
        f"| {stage('report_to_ack')} | {stage('fetch_to_write')} | {step['other_cores']} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kafka_settings", description=__doc__
    )
    parser.add_argument("--linger", default="0,1,5", help="linger_ms values")
    parser.add_argument("--fetch-wait", default="10,50", help="fetch_wait_max_ms values")
    parser.add_argument("--rates", default="1000,4000", help="msg/s steps")
    parser.add_argument("--step-s", type=float, default=8.0)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-results/kafka-settings.json"))
    args = parser.parse_args(argv)
    lingers = [int(x) for x in args.linger.split(",")]
    waits = [int(x) for x in args.fetch_wait.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    stack.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    results = []
    loadgen = LoadGen(2)
    try:
        for linger in lingers:
            for wait in waits:
                print(f"== linger_ms {linger}, fetch_wait_max_ms {wait}", flush=True)
                t = time.monotonic()
                results.append(
                    _one(linger, wait, rates, args.step_s, args.partitions, loadgen, workdir)
                )
                print(f"   took {time.monotonic() - t:.0f}s", flush=True)
    finally:
        loadgen.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        "| linger_ms | fetch_wait_max_ms | msg/s | broker cores idle | broker CPU-µs/msg "
        "| gateway CPU-µs/msg | send→receive p50 / p99 ms | send→ack p50 / p99 ms "
        "| read→produce p50/p99 ms | report→ack p50/p99 ms | fetched→written p50/p99 ms "
        "| other cores |"
    )
    print("| --- " * 12 + "|")
    for result in results:
        for step in result["steps"]:
            print(_row(result, step))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
