"""CPU time and memory of processes, read from /proc (Linux only).

The harness measures every server from outside, the same way for each system,
so that no instrumentation inside a server changes what is measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CpuSample:
    """Cumulative user+system CPU seconds of some processes, at a monotonic time."""

    at: float
    cpu_s: float

    def rate_since(self, earlier: CpuSample) -> float:
        """Cores used between the two samples (1.0 = one core fully busy)."""
        elapsed = self.at - earlier.at
        return (self.cpu_s - earlier.cpu_s) / elapsed if elapsed > 0 else 0.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads); 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses: split after its closing one.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS_PER_S


def sample(pids: Iterable[int]) -> CpuSample:
    return CpuSample(time.monotonic(), sum(cpu_seconds(pid) for pid in pids))


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid``; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, for the load other processes add."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return float(total - idle), float(total)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (a wrapper such as setpriv execs, so usually none)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
