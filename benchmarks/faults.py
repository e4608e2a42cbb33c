"""What each dependency fault costs, measured (printed as a table, never asserted).

    python -m benchmarks.faults [--scenarios a,b] [--out DIR]   (make bench-faults)

Starts a three-server ZooKeeper ensemble and a broker of its own reached only
through a fault proxy (the test suite's fixtures, tests/support), then for
each scenario a fresh two-instance cluster (8 partitions) under steady traffic
(6 sender/recipient pairs, each resending after ``unavailable`` until acked).
Per fault it reports:

- **stopped**: partitions whose owner stopped them (``partition_stopped`` in
  the logs) from the fault's start to the end of the run;
- **resumed**: seconds from the end of the fault until every pair had a message
  delivered again; for a fault the cluster routes around (the zombie owner, a
  leader kill) from the start of the fault;
- **unavailable**: ``unavailable`` answers (each followed by a resend);
- **acked / lost**: acked sends, and acked sends never delivered (must be 0);
- **repeated**: offsets a device got twice (must be 0); **reconnects**.

About five minutes on a 2-core machine; ``--scenarios`` picks some.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

# The suite's fixtures are the harness: one fault proxy, one ensemble control.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.brokerproxy import FaultyBroker, start_faulty_broker  # noqa: E402
from support.cluster import Cluster, new_cluster_names, start_cluster  # noqa: E402
from support.ensemble import EnsembleControl  # noqa: E402
from support.leasekit import wait_balanced, wait_held  # noqa: E402
from support.traffic import Traffic, TrafficReport  # noqa: E402

from linechatd.localservices import LocalZooKeeperEnsemble  # noqa: E402

PARTITIONS = 8
PAIRS = 6
SESSION_TIMEOUT_S = 6.0
PRODUCE_TIMEOUT_S = 2.0
UNHEALTHY_RELEASE_S = 15.0  # the default: what an operator gets


@dataclass
class Row:
    fault: str
    stopped: int
    resumed_s: float
    unavailable: int
    acked: int
    lost: int
    repeated: int
    reconnects: int
    note: str = ""


@dataclass
class Bench:
    workdir: Path
    ensemble: EnsembleControl
    broker: FaultyBroker


def stopped_partitions(cluster: Cluster, after: float) -> list[dict[str, object]]:
    found = []
    for gateway in cluster.instances:
        for line in gateway.log_text().splitlines():
            if line.startswith("{") and '"event":"partition_stopped"' in line:
                event = json.loads(line)
                if event["ts"] >= after:
                    found.append(event)
    return found


def sections() -> dict[str, dict[str, object]]:
    return {
        "zookeeper": {"session_timeout": SESSION_TIMEOUT_S},
        "kafka": {
            "produce_timeout_s": PRODUCE_TIMEOUT_S,
            "unhealthy_release_s": UNHEALTHY_RELEASE_S,
        },
        "shutdown": {"grace_period_s": 2.0, "drain_stagger_s": 0.0},
        "log": {"format": "json"},
    }


@dataclass
class Outcome:
    began: float  # wall clock at the fault's start (for the logs' timestamps)
    resumed_s: float
    note: str = ""


# A fault: done to the cluster under traffic and healed; how long delivery took to resume.
Fault = Callable[[Bench, Cluster, Traffic], Awaitable[Outcome]]


async def resumed_after(traffic: Traffic, since: float) -> float:
    await traffic.every_pair_delivers()
    return time.time() - since


def broker_outage(kind: str, seconds: float) -> Fault:
    async def fault(bench: Bench, cluster: Cluster, traffic: Traffic) -> Outcome:
        began = time.time()
        getattr(bench.broker.proxy, kind)()
        await trio.sleep(seconds)  # the outage itself
        bench.broker.proxy.restore()
        return Outcome(began, await resumed_after(traffic, time.time()))

    return fault


def broker_delay(delay_s: float, seconds: float) -> Fault:
    async def fault(bench: Bench, cluster: Cluster, traffic: Traffic) -> Outcome:
        gaps_before = list(traffic.ack_gaps)
        began = time.time()
        bench.broker.proxy.delay(delay_s)
        await trio.sleep(seconds)
        bench.broker.proxy.restore()
        resumed = await resumed_after(traffic, time.time())
        worst = max(traffic.ack_gaps)
        grown = "" if worst <= max(gaps_before) else f"; longest ack wait {worst:.2f} s"
        return Outcome(began, resumed, f"acks kept coming{grown}")

    return fault


async def zombie_owner(bench: Bench, cluster: Cluster, traffic: Traffic) -> Outcome:
    zombie, healthy = cluster[0], cluster[1]
    began = time.time()
    bench.broker.proxy.cut(pid=zombie.pid)
    await wait_held(
        cluster,
        lambda view: sorted(view.get(healthy.instance_id, {})) == list(range(PARTITIONS)),
        timeout=UNHEALTHY_RELEASE_S + 60,
    )
    moved = time.time() - began
    resumed = await resumed_after(traffic, began)
    bench.broker.proxy.restore(pid=zombie.pid)
    await wait_balanced(cluster, PARTITIONS, timeout=60)
    note = (
        f"every partition on the healthy instance {moved:.1f} s after the cut "
        f"(unhealthy_release_s {UNHEALTHY_RELEASE_S:g}); resumed counts from the cut"
    )
    return Outcome(began, resumed, note)


async def leader_kill(bench: Bench, cluster: Cluster, traffic: Traffic) -> Outcome:
    leader = await bench.ensemble.leader()
    began = time.time()
    bench.ensemble.kill(leader)
    while "leader" not in (await bench.ensemble.modes()).values():  # noqa: ASYNC110 - other processes
        await trio.sleep(0.05)
    elected = time.time() - began
    resumed = await resumed_after(traffic, began)
    await bench.ensemble.start(leader)
    note = f"new leader after {elected:.2f} s (T/2 = {SESSION_TIMEOUT_S / 2:g} s); resumed counts from the kill"
    return Outcome(began, resumed, note)


async def ensemble_down(bench: Bench, cluster: Cluster, traffic: Traffic) -> Outcome:
    began = time.time()
    await bench.ensemble.stop_all()
    await trio.sleep(max(0.0, 2 * SESSION_TIMEOUT_S - (time.time() - began)))
    await bench.ensemble.start_all()
    back = time.time()
    await wait_balanced(cluster, PARTITIONS, timeout=SESSION_TIMEOUT_S + 60)
    owned = time.time() - back
    resumed = await resumed_after(traffic, back)
    note = f"down {back - began:.1f} s; every partition owned again {owned:.2f} s after it was back"
    return Outcome(began, resumed, note)


SCENARIOS: dict[str, tuple[str, Fault]] = {
    "blackhole-5": ("broker blackhole 5 s", broker_outage("blackhole", 5.0)),
    "blackhole-30": ("broker blackhole 30 s", broker_outage("blackhole", 30.0)),
    "cut-5": ("broker connections reset 5 s", broker_outage("cut", 5.0)),
    "delay": ("broker +0.5 s each way, 10 s", broker_delay(0.5, 10.0)),
    "zombie": ("one instance cut from the broker", zombie_owner),
    "leader-kill": ("ZooKeeper leader killed", leader_kill),
    "ensemble-down": ("whole ZooKeeper down 2 x T", ensemble_down),
}


async def run_scenario(bench: Bench, key: str) -> Row:
    title, fault = SCENARIOS[key]
    print(f"  {title} ...", flush=True)
    async with start_cluster(
        2,
        workdir=bench.workdir / key,
        zookeeper_hosts=bench.ensemble.hosts,
        kafka_bootstrap=bench.broker.bootstrap,
        names=new_cluster_names(),
        partitions=PARTITIONS,
        sections=sections(),
    ) as cluster:
        with trio.fail_after(300):
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                traffic: Traffic = await nursery.start(
                    Traffic([g.http_url for g in cluster.instances], PAIRS, key).run
                )
                await traffic.acks(30)
                unavailable_before = traffic.unavailable
                outcome = await fault(bench, cluster, traffic)
                await traffic.acks(30)
                report: TrafficReport = await traffic.stop()
                nursery.cancel_scope.cancel()
        stopped = stopped_partitions(cluster, outcome.began)
    return Row(
        fault=title,
        stopped=len(stopped),
        resumed_s=round(outcome.resumed_s, 2),
        unavailable=report.unavailable - unavailable_before,
        acked=report.sent,
        lost=len(report.lost),
        repeated=report.offsets_repeated,
        reconnects=report.reconnects,
        note=outcome.note,
    )


def table(rows: list[Row]) -> str:
    head = ("fault", "stopped", "resumed s", "unavailable", "acked", "lost", "repeated", "reconn.")
    lines = [
        (
            r.fault,
            r.stopped,
            f"{r.resumed_s:.2f}",
            r.unavailable,
            r.acked,
            r.lost,
            r.repeated,
            r.reconnects,
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths, strict=True))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines]
    out += [f"  {r.fault}: {r.note}" for r in rows if r.note]
    return "\n".join(out)


async def main(keys: list[str], workdir: Path, out: Path | None) -> None:
    local = LocalZooKeeperEnsemble(workdir / "zookeeper", size=3)
    print("starting a three-server ZooKeeper ensemble and a broker behind a fault proxy ...")
    local.start(timeout=120)
    rows: list[Row] = []
    try:
        async with trio.open_nursery() as nursery:
            async with start_faulty_broker(nursery, workdir / "broker", timeout=120) as broker:
                bench = Bench(workdir, EnsembleControl(local), broker)
                for key in keys:
                    rows.append(await run_scenario(bench, key))
            nursery.cancel_scope.cancel()
    finally:
        local.stop()
    print(
        f"\n2 instances, {PARTITIONS} partitions, {PAIRS} pairs; session_timeout "
        f"{SESSION_TIMEOUT_S:g} s, produce_timeout_s {PRODUCE_TIMEOUT_S:g}, "
        f"ZooKeeper tickTime 500 ms\n"
    )
    print(table(rows))
    if out is not None:
        written = await trio.Path(out / "faults.json").resolve()
        await trio.Path(out).mkdir(parents=True, exist_ok=True)
        await written.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        print(f"\nwritten: {written}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, help="also write DIR/faults.json")
    args = parser.parse_args()
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown or not keys:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="linechatd-bench-faults-") as tmp:
        trio.run(main, keys, Path(tmp), args.out)


if __name__ == "__main__":
    cli()
