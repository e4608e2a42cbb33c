"""The fault benchmark's command line and table (the runs themselves: make bench-faults)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.faults import SCENARIOS, Row, table

ROOT = Path(__file__).resolve().parents[2]


def test_an_unknown_scenario_is_a_usage_error_naming_the_choices() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.faults", "--scenarios", "blackhole-5,meteor"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "meteor" in completed.stderr
    for key in SCENARIOS:
        assert key in completed.stderr


def test_the_table_has_one_aligned_row_per_fault_and_its_notes() -> None:
    rows = [
        Row("broker blackhole 5 s", 0, 2.7, 24, 76, 0, 0, 0),
        Row("ZooKeeper leader killed", 0, 0.46, 0, 352, 0, 0, 0, note="new leader after 0.44 s"),
    ]
    lines = table(rows).splitlines()
    assert lines[0].split()[:2] == ["fault", "stopped"]
    assert lines[1].startswith("broker blackhole 5 s ") and "2.70" in lines[1]
    assert lines[2].startswith("ZooKeeper leader killed ") and "352" in lines[2]
    # Columns line up: "stopped" starts at the same place in every row.
    column = lines[0].index("stopped")
    assert lines[1][column] == "0" and lines[2][column] == "0"
    assert lines[3] == "  ZooKeeper leader killed: new leader after 0.44 s"
