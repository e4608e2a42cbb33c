"""Metrics an operator relies on: build info, P, send->ack, process metrics without /proc/stat."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from linechatd import __version__
from linechatd.config import parse_config
from linechatd.metrics import Metrics, ProcessMetrics


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_build_info_and_configured_partitions() -> None:
    metrics = Metrics()
    metrics.describe(
        parse_config(
            {
                "cluster": {"name": "eu1", "partitions": 48},
                "zookeeper": {"hosts": "h:1"},
                "kafka": {"bootstrap_servers": "h:2"},
            }
        )
    )
    samples = _samples(metrics)
    [(labels, value)] = samples["linechatd_build_info"]
    assert value == 1 and labels["version"] == __version__ and labels["cluster_name"] == "eu1"
    assert labels["librdkafka"] and labels["python"]
    assert samples["linechatd_partitions_configured"] == [({}, 48.0)]


def test_send_ack_histogram() -> None:
    metrics = Metrics()
    metrics.send_ack.observe(0.003)
    samples = _samples(metrics)
    assert samples["linechatd_send_ack_seconds_count"] == [({}, 1.0)]


def test_process_metrics_are_exported() -> None:
    samples = _samples(Metrics())
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert samples[name][0][1] > 0, name


def test_process_metrics_need_only_the_process_own_entries(tmp_path: Path) -> None:
    # What ProcSubset=pid leaves: /proc/self, no /proc/stat. Here: a fake
    # /proc/self with statm only, no fd directory.
    (tmp_path / "statm").write_text("2500 1000 300 1 0 800 0\n")
    collected = {m.name: m for m in ProcessMetrics(str(tmp_path)).collect()}
    page = os.sysconf("SC_PAGE_SIZE")
    assert collected["process_resident_memory_bytes"].samples[0].value == 1000 * page
    assert collected["process_virtual_memory_bytes"].samples[0].value == 2500 * page
    assert "process_open_fds" not in collected  # unreadable: left out, never an error
    assert collected["process_cpu_seconds"].samples[0].value > 0


def test_dashboard_scopes_every_query_and_uses_only_real_metrics() -> None:
    import json
    import re

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text()
    )
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"cluster", "instance"} <= variables
    metrics = Metrics()
    metrics.describe(
        parse_config({"zookeeper": {"hosts": "h:1"}, "kafka": {"bootstrap_servers": "h:2"}})
    )
    # Every family the registry knows, also those without a sample yet.
    families = {family.name for family in metrics.registry.collect()}
    titles = {p["title"] for p in dashboard["panels"]}
    assert any("Handover gap" in t for t in titles) and any("Lease start" in t for t in titles)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for _name, labels in re.findall(
                r"\b((?:linechatd|process)_[a-z_]+)\{([^}]*)\}", target["expr"]
            ):
                assert 'cluster="$cluster"' in labels and 'instance=~"$instance"' in labels
            unscoped = re.sub(r"\{[^}]*\}", "", target["expr"])
            for name in re.findall(r"\b(?:linechatd|process)_[a-z_]+", unscoped):
                assert re.search(rf"\b{name}\{{", target["expr"]), f"{name} unscoped"
                family = re.sub(r"_(bucket|count|sum|total)$", "", name)
                assert family in families, name
