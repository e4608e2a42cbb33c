"""Where a gateway's time goes under load: py-spy samples, grouped three ways.

py-spy attaches from outside (``--nonblocking``: the process is never paused)
and writes collapsed stacks (``--format raw --threads``). Only the thread
holding the GIL is sampled (``--gil``), so the shares are of Python CPU time,
not of wall time.

* by thread: the trio thread vs the fetch thread vs trio's worker threads;
* by component (inclusive): a sample counts for every component on its stack;
* by trio task (inclusive): the task function right under trio's scheduler;
* by leaf (self): the innermost frame's package, i.e. what actually burns CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Ordered: the first match wins for a frame's component.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "websocket transport",
        ("linechatd/websocket.py", "linechatd/wsframe.py", "trio_websocket/", "wsproto/", "h11/"),
    ),
    ("session (reader, writer, acks)", ("linechatd/session.py",)),
    ("partition delivery", ("linechatd/partitions.py",)),
    ("protocol (json frames/records)", ("linechatd/protocol.py", "linechatd/jsonfast.py")),
    ("kafka adapter", ("linechatd/kafka.py",)),
    (
        "handshake / gateway",
        ("linechatd/gateway.py", "linechatd/admission.py", "linechatd/auth.py"),
    ),
    ("metrics", ("prometheus_client/", "linechatd/metrics.py")),
    ("http api", ("linechatd/httpserver.py", "linechatd/http.py")),
    ("zookeeper", ("kazoo/", "linechatd/zk.py", "linechatd/ownership.py")),
)
LEAF_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("trio scheduler (_core/_run.py)", ("trio/_core/_run.py",)),
    ("trio epoll / io", ("trio/_core/_io_epoll.py", "trio/_core/_generated_io")),
    ("trio socket", ("trio/_socket.py", "trio/_highlevel_socket.py")),
    ("trio channels / sync / timeouts", ("trio/_channel.py", "trio/_sync.py", "trio/_timeouts.py")),
    ("trio other", ("trio/",)),
    ("wsproto", ("wsproto/",)),
    ("h11", ("h11/",)),
    ("trio-websocket", ("trio_websocket/",)),
    ("json", ("json/",)),
    ("linechatd", ("linechatd/",)),
    ("confluent-kafka / librdkafka", ("confluent_kafka/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("stdlib other", ("<frozen", "threading.py", "socket.py", "selectors.py", "enum.py")),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


def have_py_spy() -> str | None:
    # Installed into the same environment as the harness, which may not be on PATH.
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_recording(
    pid: int, output: Path, *, duration_s: float, rate_hz: int = 100
) -> subprocess.Popen[bytes]:
    """Sample the thread holding the GIL only (``--gil``).

    A gateway runs well over a hundred threads (librdkafka's, trio's worker
    threads); walking all of them at every sample made py-spy fall tens of
    seconds behind here, while the GIL holder is exactly the Python CPU time
    this profile is after.
    """
    binary = have_py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(duration_s))),
            "--rate",
            str(rate_hz),
            "--format",
            "raw",
            "--threads",
            "--gil",
            "--nonblocking",
            "--output",
            str(output),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _parse(lines: Iterable[str]) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(thread name, [(function, file) root first], samples) per collapsed stack."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            samples = int(count)
        except ValueError:
            continue
        parts = stack.split(";")
        thread = parts[0].split(": ", 1)[-1] if parts and parts[0].startswith("thread") else "?"
        frames = []
        for part in parts[1:]:
            match = _FRAME.match(part)
            if match:
                frames.append((match["func"], match["file"]))
            else:
                frames.append((part, ""))
        stacks.append((thread, frames, samples))
    return stacks


def _group(file: str, groups: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for name, needles in groups:
        if any(needle in file for needle in needles):
            return name
    return None


def _share(counter: Counter[str], total: int, top: int = 12) -> list[dict[str, Any]]:
    return [
        {"name": name, "samples": n, "percent": round(100 * n / total, 1)}
        for name, n in counter.most_common(top)
    ]


def analyze(paths: Iterable[Path]) -> dict[str, Any]:
    """Group the samples of one or more recordings (several gateways add up)."""
    stacks = []
    for path in paths:
        stacks += _parse(path.read_text(encoding="utf-8", errors="replace").splitlines())
    by_thread: Counter[str] = Counter()
    components: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    main_total = 0
    for thread, frames, samples in stacks:
        kind = "trio thread" if thread == "MainThread" else re.sub(r"\s*\d+$", "", thread)
        by_thread[kind] += samples
        if thread != "MainThread":
            continue
        main_total += samples
        seen = set()
        for _func, file in frames:
            component = _group(file, COMPONENTS)
            if component and component not in seen:
                seen.add(component)
                components[component] += samples
        # The task: the first frame below trio's scheduler loop.
        task = "trio scheduler itself"
        for i, (func, _file) in enumerate(frames):
            if func == "unrolled_run" and i + 1 < len(frames):
                nxt_func, nxt_file = frames[i + 1]
                if "trio/_core" not in nxt_file:
                    task = f"{nxt_func} ({nxt_file.rsplit('/', 1)[-1]})"
                break
        tasks[task] += samples
        if frames:
            leaf_func, leaf_file = frames[-1]
            leaves[_group(leaf_file, LEAF_GROUPS) or (leaf_file or leaf_func)] += samples
            functions[f"{leaf_func} ({leaf_file.rsplit('/', 1)[-1]})"] += samples
    total = sum(by_thread.values())
    return {
        "samples": total,
        "trio_thread_samples": main_total,
        "by_thread": _share(by_thread, max(1, total)),
        "trio_thread_by_component": _share(components, max(1, main_total)),
        "trio_thread_by_task": _share(tasks, max(1, main_total)),
        "trio_thread_by_leaf": _share(leaves, max(1, main_total)),
        "trio_thread_top_functions": _share(functions, max(1, main_total), top=15),
    }


def attribute(analysis: dict[str, Any], us_per_msg: float | None) -> list[dict[str, Any]]:
    """Spread a measured CPU-µs-per-message over the trio thread's components."""
    if not us_per_msg:
        return []
    main_share = analysis["trio_thread_samples"] / max(1, analysis["samples"])
    return [
        {
            "component": row["name"],
            "percent_of_trio_thread": row["percent"],
            "us_per_msg": round(us_per_msg * main_share * row["percent"] / 100, 1),
        }
        for row in analysis["trio_thread_by_component"]
    ]
