"""The simulator's report: a table on stdout, results.json and plots under the output dir."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .observer import PhaseResult

COLUMNS = (
    ("phase", 16),
    ("inst", 5),
    ("balanced", 9),
    ("moved/min", 11),
    ("retaken", 7),
    ("ownerless max/p99 s", 19),
    ("writes/s pk/mean", 17),
    ("notif/s pk/mean", 18),
    ("reads/s mean", 12),
    ("read MB/s pk/mean", 17),
    ("watches pk", 10),
    ("failed wr", 9),
    ("cpu s", 6),
)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def row(result: PhaseResult) -> list[str]:
    return [
        result.name,
        str(result.instances),
        _seconds(result.balanced_after_s),
        f"{result.moved}/{result.min_moves}",
        str(result.retaken),
        f"{result.ownerless_max_s:.2f}/{result.ownerless_p99_s:.2f}",
        f"{result.writes_peak}/{result.writes_mean:.0f}",
        f"{result.notifications_peak}/{result.notifications_mean:.0f}",
        f"{result.reads_mean:.0f}",
        f"{result.read_mb_peak:.1f}/{result.read_mb_mean:.2f}",
        str(result.watches_peak),
        str(result.failed_writes),
        f"{result.cpu_s:.0f}",
    ]


def table(results: Sequence[PhaseResult]) -> str:
    lines = [
        " | ".join(name.ljust(width) for name, width in COLUMNS),
        "-+-".join("-" * width for _name, width in COLUMNS),
    ]
    for result in results:
        cells = row(result)
        lines.append(" | ".join(c.ljust(w) for c, (_n, w) in zip(cells, COLUMNS, strict=True)))
    for result in results:
        if result.extra:
            extra = ", ".join(f"{k}={v:.1f}" for k, v in result.extra.items())
            lines.append(f"{result.name}: {extra}")
        if result.warnings:
            top = sorted(result.warnings.items(), key=lambda kv: -kv[1])[:6]
            lines.append(f"{result.name} warnings: " + ", ".join(f"{k}={v}" for k, v in top))
    return "\n".join(lines)


def markdown(results: Sequence[PhaseResult]) -> str:
    header = [name for name, _w in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in results:
        lines.append("| " + " | ".join(row(result)) + " |")
    return "\n".join(lines)


def write(out: Path, results: Sequence[PhaseResult], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "phases": [dataclasses.asdict(r) for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "table.md").write_text(markdown(results) + "\n")
    plot(out, results, str(meta.get("title", "")))


def plot(out: Path, results: Sequence[PhaseResult], title: str) -> None:
    """One figure per phase: ZooKeeper load per second, and ownership over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: the JSON is enough
        return
    for result in results:
        series = result.series
        fig, (load, owned) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        seconds = list(range(len(series["writes_per_s"])))
        load.plot(seconds, series["writes_per_s"], label="writes/s")
        load.plot(seconds, series["notifications_per_s"], label="watch notifications/s")
        load.plot(seconds, series["reads_per_s"], label="reads/s", alpha=0.6)
        load.set_yscale("symlog")
        load.set_ylabel("per second")
        load.legend(loc="upper right", fontsize=8)
        load.set_title(f"{title} {result.name}".strip())
        owned.plot(series["sample_t"], series["unowned"], label="partitions without owner")
        owned.plot(series["sample_t"], series["out_of_band"], label="instances off their share")
        owned.set_xlabel("seconds since the phase began (virtual)")
        owned.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{result.name}.png", dpi=90)
        plt.close(fig)
