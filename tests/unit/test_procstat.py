"""How the harness sorts a gateway's threads (benchmarks/procstat.py)."""

from __future__ import annotations

import os
import threading

from benchmarks import procstat


def test_threads_are_grouped_by_the_name_the_kernel_knows() -> None:
    group = procstat._thread_group
    assert group("python", True) == "trio"
    assert group("rdk:broker111", False) == "librdkafka"
    assert group("rdk:main", False) == "librdkafka"
    assert group("_fetch_loop fro", False) == "fetch"
    assert group("Trio thread 3", False) == "trio workers"
    assert group("<lambda> from l", False) == "trio workers"
    assert group("python", False) == "other"


def test_this_process_threads_are_counted() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        groups = procstat.thread_cpu_seconds([os.getpid()])
    finally:
        stop.set()
        worker.join()
    assert "trio" in groups  # this process's main thread
    assert groups["trio"] > 0
    assert procstat.thread_cpu_seconds([2**22 + 1]) == {}  # no such process
