"""``python -m benchmarks.scale``: the control plane at scale, in virtual time.

    python -m benchmarks.scale --instances 1000 --partitions 4096 --out scale-results
    python -m benchmarks.scale --instances 50 --partitions 256 --scenarios crash,zk-pause

Prints a table per phase and writes results.json, table.md and one plot per
phase under ``--out``. Exits 1 if two instances ever held one partition at once.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import trio
import trio.testing

from .cluster import Settings
from .observer import Violation
from .report import table, write
from .scenarios import SCENARIOS, RunOptions, simulate
from .simzk import Latency


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=4096)
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, in this order: {','.join(SCENARIOS)}",
    )
    p.add_argument("--seed", type=int, default=int(os.environ.get("SCALE_SEED", "1")))
    p.add_argument("--session-timeout", type=float, default=10.0, help="T, seconds")
    p.add_argument("--rebalance-pause", type=float, default=0.2)
    p.add_argument("--drain-stagger", type=float, default=0.5)
    p.add_argument("--rtt-ms", type=float, default=0.5, help="client-server round trip")
    p.add_argument("--commit-ms", type=float, default=2.0, help="a write's quorum commit")
    p.add_argument("--writes-per-s", type=float, default=10_000, help="the leader's write rate")
    p.add_argument("--start-spread", type=float, default=10.0, help="cold start spread, s")
    p.add_argument("--rolling-limit", type=int, default=None, help="restart only this many")
    p.add_argument("--balance-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=Path("scale-results"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios: {', '.join(unknown)}", file=sys.stderr)
        return 2
    options = RunOptions(
        instances=args.instances,
        settings=Settings(
            partitions=args.partitions,
            session_timeout_s=args.session_timeout,
            rebalance_pause_s=args.rebalance_pause,
            drain_stagger_s=args.drain_stagger,
        ),
        scenarios=scenarios,
        seed=args.seed,
        latency=Latency(
            one_way_s=args.rtt_ms / 2000,
            commit_s=args.commit_ms / 1000,
            writes_per_s=args.writes_per_s,
        ),
        start_spread_s=args.start_spread,
        balance_timeout_s=args.balance_timeout,
        rolling_limit=args.rolling_limit,
        progress=True,
    )
    print(
        f"seed {args.seed}: {args.instances} instances, {args.partitions} partitions, "
        f"T = {args.session_timeout:g} s, scenarios {','.join(scenarios)}",
        flush=True,
    )
    began = time.monotonic()
    clock = trio.testing.MockClock(autojump_threshold=0)
    try:
        sim = trio.run(simulate, options, clock=clock)
    except Violation as exc:
        print(f"AT-MOST-ONE VIOLATED: {exc}", file=sys.stderr)
        return 1
    wall = time.monotonic() - began
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(table(sim.results))
    print(f"wall {wall:.0f} s, peak RSS {rss_mb:.0f} MB")
    meta = {
        "title": f"{args.instances} x {args.partitions}",
        "seed": args.seed,
        "instances": args.instances,
        "partitions": args.partitions,
        "session_timeout_s": args.session_timeout,
        "rebalance_pause_s": args.rebalance_pause,
        "drain_stagger_s": args.drain_stagger,
        "latency": vars(options.latency),
        "wall_s": wall,
        "peak_rss_mb": rss_mb,
        "python": platform.python_version(),
        "violations": sim.observer.violations,
    }
    write(args.out, sim.results, meta)
    print(f"wrote {args.out}/results.json, table.md and one plot per phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
