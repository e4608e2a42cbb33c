"""Runs one linechatd instance exactly as ``linechatd run --config PATH`` does.

The harness starts gateways through this module so that its processes are
recognisably the benchmark's (and are not matched by anything looking for
``linechatd run`` on a shared machine).

With ``PYTHONTRACEMALLOC`` and ``BENCH_TRACEMALLOC_OUT`` set (benchmarks/handshakes.py
``--tracemalloc``), SIGUSR2 writes the live allocations grouped by source line
to that file: where the memory of idle connections goes.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from types import FrameType

from linechatd.cli import main


def _dump_allocations(_signum: int, _frame: FrameType | None) -> None:
    path = os.environ["BENCH_TRACEMALLOC_OUT"]
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("lineno")
    total = sum(s.size for s in stats)
    with open(path, "w") as out:
        out.write(f"total traced {total / 2**20:.1f} MiB\n")
        for stat in stats[:60]:
            out.write(f"{stat.size / 1024:10.1f} KiB {stat.count:8d} blocks  {stat.traceback}\n")


if __name__ == "__main__":
    if tracemalloc.is_tracing() and os.environ.get("BENCH_TRACEMALLOC_OUT"):
        signal.signal(signal.SIGUSR2, _dump_allocations)
    sys.exit(main(["run", *sys.argv[1:]]))
