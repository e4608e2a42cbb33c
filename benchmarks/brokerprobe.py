"""The broker alone, with the gateway's client settings: what a message costs without a gateway.

``python -m benchmarks.brokerprobe --bootstrap HOST:PORT --rate 1000 --duration 10``
starts ``--processes`` probe processes (2, like the gateway instances). Each
has one producer and one consumer built from ``linechatd.kafka``'s own
``producer_settings`` / ``consumer_settings`` (same linger, fetch wait,
acks=all, idempotence), consumes its half of ``--topics`` single-partition
topics (as an instance fetches the partitions it owns) and produces its half
of the rate to the other half (as senders on one instance write to
recipients on the other). Every value carries its send time
(``time.monotonic_ns()``, one clock for every process on the machine), so
the consumer measures produce → fetched latency, and the delivery report
produce → ack latency. No trio, no WebSocket, no JSON beyond the 100-byte
body: the difference from the gateway's end-to-end figures at the same rate
is the gateway's share.

The harness (``benchmarks/run.py``) runs it right after each latency step of
linechatd on the same broker, so both see the broker holding the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Callable
from typing import Any

from . import procstat

BODY = b"x" * 100
# The probe's own topics (never the gateway's): created once per broker.
TOPIC_PREFIX = "brokerprobe-"


def _percentiles(samples_us: list[int]) -> dict[str, float | None]:
    if not samples_us:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "samples": 0}
    ordered = sorted(samples_us)
    n = len(ordered)
    return {
        "p50_ms": round(ordered[min(n - 1, int(0.5 * n))] / 1000, 3),
        "p99_ms": round(ordered[min(n - 1, int(0.99 * n))] / 1000, 3),
        "max_ms": round(ordered[-1] / 1000, 3),
        "samples": n,
    }


def ensure_topics(bootstrap: str, topics: list[str]) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    futures = admin.create_topics([NewTopic(t, num_partitions=1) for t in missing])
    for future in futures.values():
        try:
            future.result(timeout=30)
        except KafkaException:
            pass  # created meanwhile by the other probe process


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One probe process: consume ``args.consume``, produce to ``args.produce``."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from linechatd.kafka import consumer_settings, producer_settings

    produce_to = args.produce.split(",")
    consume = args.consume.split(",")
    producer = Producer(
        producer_settings(args.bootstrap, linger_ms=args.linger_ms, timeout_s=args.timeout_s)
    )
    consumer = Consumer(
        consumer_settings(
            args.bootstrap, f"brokerprobe-{uuid.uuid4().hex[:8]}", fetch_wait_max_ms=args.fetch_wait
        )
    )
    # At the log end, as an owner starts (nothing committed): no group join.
    consumer.assign([TopicPartition(t, 0, -1) for t in consume])
    latencies = array("q")
    acks = array("q")
    state = {"sent": 0, "acked": 0, "errors": 0, "received": 0}
    stop = threading.Event()

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            state["errors"] += 1
            return
        state["acked"] += 1
        sent_ns = int.from_bytes(msg.value()[:8], "big")
        acks.append((time.monotonic_ns() - sent_ns) // 1000)

    def consume_loop() -> None:
        while not stop.is_set():
            # As the gateway's fetcher: wait for the first record only, then
            # take what is already there (consume(n, t) would wait for all n).
            first = consumer.poll(0.05)
            if first is None:
                continue
            for m in (first, *consumer.consume(499, 0)):
                if m.error() is not None:
                    continue
                value = m.value()
                if value is None or len(value) < 8:
                    continue
                state["received"] += 1
                latencies.append((time.monotonic_ns() - int.from_bytes(value[:8], "big")) // 1000)

    def poll_loop() -> None:
        while not stop.is_set():
            producer.poll(0.05)

    threads = [threading.Thread(target=consume_loop), threading.Thread(target=poll_loop)]
    # Let the assignment settle (metadata, first fetch) before the clock starts.
    time.sleep(max(0.0, args.start_at - time.monotonic()))
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    interval_ns = int(1e9 / args.rate) if args.rate > 0 else 0
    begin = time.monotonic_ns()
    end = begin + int(args.duration * 1e9)
    n = 0
    while interval_ns:
        due = begin + n * interval_ns
        if due >= end:
            break
        now = time.monotonic_ns()
        if due > now:
            time.sleep((due - now) / 1e9)
        # The scheduled time: a late pacer shows as latency, not as a lower rate.
        value = due.to_bytes(8, "big") + BODY
        try:
            producer.produce(produce_to[n % len(produce_to)], value=value, partition=0,
                             on_delivery=on_delivery)  # fmt: skip
            state["sent"] += 1
        except BufferError:
            state["errors"] += 1
        n += 1
    producer.flush(args.drain)
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline and state["received"] < state["sent"]:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    cpu_s = time.process_time() - cpu0
    consumer.close()
    return {
        **state,
        "cpu_s": cpu_s,
        "latency_us": list(latencies),
        "ack_latency_us": list(acks),
    }


def run(
    bootstrap: str,
    *,
    rate: float,
    duration_s: float,
    linger_ms: int,
    fetch_wait_max_ms: int,
    broker_pid: int | None,
    processes: int = 2,
    topics: int = 16,
    drain_s: float = 5.0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the probe processes at ``rate`` in total; latencies, loss and CPU per message."""
    names = [f"{TOPIC_PREFIX}{k}" for k in range(topics)]
    ensure_topics(bootstrap, names)
    shares = [names[i::processes] for i in range(processes)]
    # Time for the processes to import and connect before the window opens:
    # their start must not count as other processes' load.
    start_at = time.monotonic() + 5.0
    procs = []
    for i in range(processes):
        consume = shares[i]
        produce = [t for j, share in enumerate(shares) if j != i for t in share] or consume
        argv = [
            sys.executable, "-m", "benchmarks.brokerprobe", "--worker",
            "--bootstrap", bootstrap, "--rate", str(rate / processes),
            "--duration", str(duration_s), "--drain", str(drain_s),
            "--linger-ms", str(linger_ms), "--fetch-wait", str(fetch_wait_max_ms),
            "--consume", ",".join(consume), "--produce", ",".join(produce),
            "--start-at", str(start_at),
        ]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=os.getcwd()))
    time.sleep(max(0.0, start_at - time.monotonic()))
    broker0 = procstat.sample([broker_pid]) if broker_pid else None
    probes0 = procstat.sample([p.pid for p in procs])
    busy0, total0 = procstat.system_busy()
    replies = []
    for p in procs:
        out, _err = p.communicate(timeout=duration_s + drain_s + 120)
        replies.append(json.loads(out))
    # The measuring window ends with the slowest process (drain included).
    broker1 = procstat.sample([broker_pid]) if broker_pid else None
    probes_cpu_s = sum(r["cpu_s"] for r in replies)
    busy1, total1 = procstat.system_busy()
    elapsed = (broker1.at if broker1 else time.monotonic()) - probes0.at
    cores = os.cpu_count() or 1
    machine_cores = (busy1 - busy0) / max(1.0, total1 - total0) * cores
    sent = sum(r["sent"] for r in replies)
    received = sum(r["received"] for r in replies)
    broker_cores = broker1.rate_since(broker0) if broker1 and broker0 else None
    latencies = [x for r in replies for x in r["latency_us"]]
    acks = [x for r in replies for x in r["ack_latency_us"]]
    result = {
        "rate_per_s": rate,
        "duration_s": duration_s,
        "sent": sent,
        "acked": sum(r["acked"] for r in replies),
        "received": received,
        "errors": sum(r["errors"] for r in replies),
        "latency": _percentiles(latencies),
        "ack": _percentiles(acks),
        "broker_cores": round(broker_cores, 3) if broker_cores is not None else None,
        "broker_cpu_us_per_msg": round(broker_cores * elapsed / received * 1e6, 1)
        if broker_cores is not None and received
        else None,
        "probe_cores": round(probes_cpu_s / elapsed, 3) if elapsed > 0 else None,
        "other_cores": round(
            max(0.0, machine_cores - (broker_cores or 0.0) - probes_cpu_s / max(elapsed, 1e-9)), 3
        ),
        "settings": {"linger_ms": linger_ms, "fetch_wait_max_ms": fetch_wait_max_ms},
    }
    lat = result["latency"]
    say(
        f"  broker-only: {rate:>8.0f} msg/s -> received {received}/{sent}, "
        f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, ack p99 {result['ack']['p99_ms']} ms, "
        f"broker {result['broker_cores']} cores ({result['broker_cpu_us_per_msg']} µs/msg), "
        f"probes {result['probe_cores']}, others {result['other_cores']}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.brokerprobe", description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="msg/s (in total, or per worker)"
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--linger-ms", type=int, default=1)
    parser.add_argument("--fetch-wait", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--topics", type=int, default=16)
    parser.add_argument("--broker-pid", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--consume", default="", help=argparse.SUPPRESS)
    parser.add_argument("--produce", default="", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        json.dump(worker(args), sys.stdout)
        return 0
    result = run(
        args.bootstrap,
        rate=args.rate,
        duration_s=args.duration,
        linger_ms=args.linger_ms,
        fetch_wait_max_ms=args.fetch_wait,
        broker_pid=args.broker_pid,
        processes=args.processes,
        topics=args.topics,
        drain_s=args.drain,
    )
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
