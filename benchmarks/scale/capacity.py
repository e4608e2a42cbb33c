"""The capacity model of docs/capacity.md: ``python -m benchmarks.scale.capacity``.

Every input is named below, as measured on the project's 2-core test machine
(``MEASURED``: docs/performance.md) or assumed (``ASSUMED``); change them
here to redo the tables for other hardware or another user base. With
``--sim results.json`` (written by ``python -m benchmarks.scale``), the
ZooKeeper figures of that run are printed alongside.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

# Measured on the project's 2-core test machine (docs/performance.md), with the
# test broker beside the gateways: pessimistic for a dedicated VM.
MEASURED = {
    # Gateway CPU per message sent and delivered (both ends), two processes at
    # 2,000-3,750 msg/s: 177-317 µs; the upper end.
    "cpu_us_per_message": 317.0,
    "rss_kib_per_connection": 9.8,  # idle connection, 5,000 per instance
    # GET /api/connection-url then the upgrade: 1,530-1,632 CPU-µs each.
    "handshakes_per_s": 1e6 / 1632,  # per process (one core)
    "idle_cores": 0.042,  # a gateway with no clients
    "resume_storm_users_per_s": 1000 / 4.7,  # one partition's users resuming at once
}

# Assumptions (not measured here).
ASSUMED = {
    "online_fraction": 0.10,  # of registered users, at the daily peak
    "devices_per_online_user": 1.5,
    "messages_per_user_per_day": 40.0,
    "peak_factor": 4.0,  # peak-hour rate over the daily mean
    "record_bytes": 400.0,  # a chat record on the wire and on disk, with overhead
    "connections_per_instance": 50_000,  # RSS 0.8 GB; needs ulimit -n well above 50k
    "cpu_target": 0.5,  # cores of a gateway busy at peak, at most
    "base_rss_gib": 0.15,  # a gateway process with no connections
    "min_instances": 3,  # one may fail, one may be drained
    "spare_fraction": 0.10,  # instances beyond the computed count
    "users_per_partition": 2000,  # at most: one partition's handover is one resume storm
    "partitions_per_instance": 8,  # at least: shares stay even within 1/8
    "partition_cap": 4096,  # cluster.partitions may not exceed this (config.py)
    "broker_mb_per_s": 50.0,  # produce + replication ingress one Kafka broker takes
    "replicas_per_broker": 4000,  # partition replicas per broker (ZooKeeper-mode Kafka)
    "replication_factor": 3,
}

SIZES = (1_000_000, 10_000_000, 100_000_000)


@dataclass(frozen=True)
class Size:
    users: int
    connections: float
    peak_msgs_per_s: float
    instances: int
    cores: float  # busy at peak, all instances
    rss_gib_per_instance: float
    partitions: int
    users_per_partition: float
    partition_handover_s: float  # one moved partition's users resuming on its new owner
    storm_s: float  # every socket of an instance reconnecting to it (a ZooKeeper blip)
    brokers: int
    zookeeper: int


def size(users: int) -> Size:
    m, a = MEASURED, ASSUMED
    connections = users * a["online_fraction"] * a["devices_per_online_user"]
    peak = users * a["messages_per_user_per_day"] / 86_400 * a["peak_factor"]
    cores = peak * m["cpu_us_per_message"] / 1e6
    by_connections = connections / a["connections_per_instance"]
    by_cpu = cores / a["cpu_target"]
    instances = math.ceil(
        max(a["min_instances"], by_connections, by_cpu) * (1 + a["spare_fraction"])
    )
    partitions = 2 ** math.ceil(
        math.log2(
            max(
                64,
                connections / a["users_per_partition"],
                instances * a["partitions_per_instance"],
            )
        )
    )
    partitions = min(partitions, int(a["partition_cap"]))
    per_partition = connections / partitions
    per_instance = connections / instances
    ingress = peak * a["record_bytes"] * a["replication_factor"] / 1e6
    brokers = max(
        3,
        math.ceil(ingress / a["broker_mb_per_s"]),
        math.ceil(partitions * a["replication_factor"] / a["replicas_per_broker"]),
    )
    return Size(
        users=users,
        connections=connections,
        peak_msgs_per_s=peak,
        instances=instances,
        cores=instances * m["idle_cores"] + cores,
        rss_gib_per_instance=a["base_rss_gib"] + per_instance * m["rss_kib_per_connection"] / 2**20,
        partitions=partitions,
        users_per_partition=per_partition,
        partition_handover_s=per_partition / m["resume_storm_users_per_s"],
        storm_s=per_instance / m["handshakes_per_s"],
        brokers=brokers,
        zookeeper=3 if instances < 100 else 5,
    )


def table() -> str:
    rows = [size(u) for u in SIZES]
    lines = [
        "| | " + " | ".join(f"{r.users / 1e6:g} M users" for r in rows) + " |",
        "| --- |" + " --- |" * len(rows),
    ]

    def line(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    line("connections at peak", [f"{r.connections:,.0f}" for r in rows])
    line("messages/s at peak", [f"{r.peak_msgs_per_s:,.0f}" for r in rows])
    line("gateway instances", [str(r.instances) for r in rows])
    line("cores busy at peak (all instances)", [f"{r.cores:.1f}" for r in rows])
    line("RSS per instance", [f"{r.rss_gib_per_instance:.2f} GiB" for r in rows])
    line("partitions P", [str(r.partitions) for r in rows])
    line("users per partition", [f"{r.users_per_partition:,.0f}" for r in rows])
    line("one partition's handover (resumes)", [f"{r.partition_handover_s:.1f} s" for r in rows])
    line("an instance's sockets reconnecting", [f"{r.storm_s:.0f} s" for r in rows])
    line("Kafka brokers (RF 3)", [str(r.brokers) for r in rows])
    line("ZooKeeper ensemble", [str(r.zookeeper) for r in rows])
    return "\n".join(lines)


def sim_summary(path: Path) -> str:
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    lines = [f"simulation: {meta['instances']} instances x {meta['partitions']} partitions"]
    for phase in doc["phases"]:
        lines.append(
            f"  {phase['name']}: writes/s {phase['writes_peak']} peak, "
            f"notifications/s {phase['notifications_peak']} peak, "
            f"watches {phase['watches_peak']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sim", type=Path, help="a results.json of python -m benchmarks.scale")
    args = parser.parse_args()
    print(table())
    if args.sim:
        print(sim_summary(args.sim))


if __name__ == "__main__":
    main()
