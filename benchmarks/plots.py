"""PNG plots of results.json: throughput, latency distribution, RSS vs connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"linechatd": "tab:blue", "asyncio": "tab:green", "socketio": "tab:orange"}


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _systems(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: doc
        for name, doc in results["systems"].items()
        if isinstance(doc, dict) and "skipped" not in doc and "error" not in doc
    }


def throughput(results: dict[str, Any], path: Path) -> None:
    systems = _systems(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(systems)
    values = [
        (systems[n].get("saturation") or {}).get("delivered_per_s_per_process") or 0 for n in names
    ]
    bars = left.bar(names, values, color=[COLOURS.get(n, "grey") for n in names])
    left.bar_label(bars, fmt="%.0f")
    left.axhline(10_000, ls="--", color="grey", lw=1)
    left.text(-0.4, 10_000, "target 10k", va="bottom", fontsize=8, color="grey")
    left.set_ylabel("delivered msg/s per server process")
    left.set_title("Saturation throughput (lossless, open loop)")
    for n in names:
        steps = (systems[n].get("saturation") or {}).get("steps") or []
        if not steps:
            continue
        pts = sorted((s["offered_per_s"], s["delivered_per_s"], s["passed"]) for s in steps)
        right.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=COLOURS.get(n), label=n)
        right.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color=[COLOURS.get(n) if p[2] else "red" for p in pts],
            zorder=3,
        )
    lim = right.get_xlim()
    right.plot(lim, lim, ":", color="grey", lw=1, label="delivered = offered")
    right.set_xlabel("offered msg/s (all processes)")
    right.set_ylabel("delivered msg/s")
    right.set_title("Steps (red = lost messages or p99 over the limit)")
    _legend(right)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(results: dict[str, Any], path: Path) -> None:
    systems = _systems(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in (
        (axes[0], "at_1000", "at the fixed rate"),
        (axes[1], "at_half_max", "at 50% of each system's max"),
    ):
        for n, doc in systems.items():
            run = (doc.get("latency") or {}).get(key) or {}
            points = run.get("cdf") or []
            if not points:
                continue
            # Tail view: x = 1 / (1 - p), so p50, p90, p99, p99.9 are evenly spaced.
            xs = [1 / (1 - p) for p, _ in points]
            ax.plot(
                xs,
                [v for _, v in points],
                color=COLOURS.get(n),
                label=f"{n} ({run.get('rate_per_s', 0):,.0f}/s)",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([2, 10, 100, 1000, 10000])
        ax.set_xticklabels(["p50", "p90", "p99", "p99.9", "p99.99"])
        ax.set_xlabel("percentile")
        ax.set_title(f"send -> receive latency {title}")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    axes[0].set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rss(results: dict[str, Any], path: Path) -> None:
    systems = _systems(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for n, doc in systems.items():
        conn = doc.get("connections") or {}
        points = conn.get("points") or []
        if not points:
            continue
        base = points[0]["baseline_rss_mib"]
        xs = [0] + [p["connections"] for p in points]
        left.plot(xs, [base] + [p["rss_mib"] for p in points], "o-", color=COLOURS.get(n), label=n)
        right.plot(
            [p["connections"] for p in points],
            [p["rss_per_conn_kib"] for p in points],
            "o-",
            color=COLOURS.get(n),
            label=n,
        )
    left.set_xlabel("idle connections on one server process")
    left.set_ylabel("RSS MiB")
    left.set_title("RSS vs connections")
    _legend(left)
    right.axhline(20, ls="--", color="grey", lw=1)
    right.set_xlabel("idle connections")
    right.set_ylabel("KiB per connection (RSS growth / connections)")
    right.set_title("RSS per connection (target <= 20 KiB)")
    _legend(right)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decomposition(results: dict[str, Any], path: Path) -> None:
    """linechatd's latency beside the broker-only probe and the gateway's residence."""
    doc = results["systems"].get("linechatd") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    labels = [
        "send→receive\n(end to end)",
        "broker only\nproduce→fetched",
        "gateway\nread→produce",
        "gateway\nreport→ack",
        "gateway\nfetched→written",
    ]
    for ax, key, title in zip(
        axes, ("at_1000", "at_half_max"), ("fixed rate", "50% of max"), strict=True
    ):
        lat = (doc.get("latency") or {}).get(key) or {}
        probe = ((doc.get("broker_only") or {}).get(key) or {}).get("latency") or {}
        residence = lat.get("residence") or {}
        rows = [
            lat,
            probe,
            residence.get("read_to_produce") or {},
            residence.get("report_to_ack") or {},
            residence.get("fetch_to_write") or {},
        ]
        x = range(len(labels))
        p50 = [r.get("p50_ms") or 0 for r in rows]
        p99 = [r.get("p99_ms") or 0 for r in rows]
        ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color="tab:blue")
        ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color="tab:red")
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel("ms (symlog)")
        rate = lat.get("rate_per_s")
        ax.set_title(f"{title} ({rate:,.0f} msg/s)" if rate else title)
        _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    written = []
    plots = [("throughput", throughput), ("latency", latency), ("rss", rss)]
    if "linechatd" in results["systems"]:
        plots.append(("decomposition", decomposition))
    for name, fn in plots:
        path = out / f"{name}.png"
        fn(results, path)
        written.append(path.name)
    return written
