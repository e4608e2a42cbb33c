"""A Kafka producer in a process of its own, for tests of faults applied per process.

``python -m support.probe_producer BOOTSTRAP TOPIC`` (with tests/ on the path)
produces one record at a time, forever, and prints one JSON line per answer:
``{"seq": n, "ok": true, "offset": o, "latency_s": s}`` or
``{"seq": n, "ok": false, "error": "..."}``. One at a time, so that a line's
order is its record's order. A record the broker does not take within
``--timeout-ms`` is answered with an error, and the next one is tried.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

__all__ = ["main", "produce_one"]


def _config(bootstrap: str, timeout_ms: int) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 0,
        "message.timeout.ms": timeout_ms,
        "request.timeout.ms": timeout_ms,
        "socket.connection.setup.timeout.ms": max(1000, timeout_ms),
        # Back at once when the link returns.
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 500,
        "log_level": 0,
    }


def produce_one(producer: Producer, topic: str, seq: int) -> dict[str, Any]:
    """Produce record ``seq`` and wait for the broker's answer (or the message timeout)."""
    answer: dict[str, Any] = {}
    started = time.monotonic()

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            latency_s = time.monotonic() - started
            answer.update(seq=seq, ok=True, offset=msg.offset(), latency_s=latency_s)
        else:
            answer.update(seq=seq, ok=False, error=str(err))

    producer.produce(topic, value=str(seq).encode(), on_delivery=on_delivery)
    while not answer:
        producer.poll(0.1)
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("--timeout-ms", type=int, default=2000)
    args = parser.parse_args(argv)
    producer = Producer(_config(args.bootstrap, args.timeout_ms))
    seq = 0
    while True:
        sys.stdout.write(json.dumps(produce_one(producer, args.topic, seq)) + "\n")
        sys.stdout.flush()
        seq += 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
