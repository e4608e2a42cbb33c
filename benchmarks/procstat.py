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


def _thread_group(name: str, is_main: bool) -> str:
    """Which part of a gateway a thread is, by the name the kernel knows it by."""
    if is_main:
        return "trio"  # the main thread runs the trio loop
    if name.startswith("rdk:"):
        return "librdkafka"
    if name.startswith("_fetch_loop"):
        return "fetch"  # trio names its worker threads after the function they run
    if name.startswith("Trio thread") or " from " in name:
        return "trio workers"
    return "other"  # kazoo's threads and anything else Python started


def thread_cpu_seconds(pids: Iterable[int]) -> dict[str, float]:
    """utime + stime of every thread of ``pids``, summed by ``_thread_group``.

    A thread that ended between two samples takes its time with it, so the
    groups of a long step may sum to a little less than the processes' total.
    """
    groups: dict[str, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            name = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
            fields = data[data.rindex(b")") + 2 :].split()
            group = _thread_group(name, int(tid) == pid)
            groups[group] = (
                groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / _TICKS_PER_S
            )
    return groups


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
