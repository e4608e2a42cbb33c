"""The abuse benchmark runs end to end in smoke mode and writes abuse.json.

The shape of the results is checked, and what the attacker itself reports
(a refusal, sockets closed): latencies from a shared machine are printed,
never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("picows", reason="benchmark extra not installed: pip install -e '.[bench]'")
pytest.importorskip("uvloop", reason="benchmark extra not installed: pip install -e '.[bench]'")


def test_bench_abuse_smoke_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "bench-results"
    command = [
        sys.executable,
        "-m",
        "benchmarks.abuse",
        "--smoke",
        "--scenarios",
        "handshake_flood,half_open",
        "--out",
        str(out),
    ]
    # A blocking subprocess is fine here: the harness is synchronous and bounded.
    completed = subprocess.run(  # noqa: ASYNC221
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(completed.stdout[-4000:])
    print(completed.stderr[-3000:], file=sys.stderr)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "abuse.json").read_text())
    rows = {row["scenario"]: row for row in results["rows"]}
    assert set(rows) == {"handshake_flood", "half_open"}
    for row in rows.values():
        assert {"baseline", "attacked", "attacker", "rss_peak_mib", "gateway_cores"} <= row.keys()
        assert row["same_process"] and row["ready_after"]
        assert row["attacked"]["sent"] > 0
    assert rows["handshake_flood"]["attacker"]["statuses"].get("429", 0) > 0
    assert rows["half_open"]["attacker"]["closed_by_server"] > 0
