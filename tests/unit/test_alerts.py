"""docs/alerts.yml: valid for promtool, its tests pass, and every alert has its runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _promtool() -> str | None:
    beside = Path(sys.executable).with_name("promtool")
    return str(beside) if beside.exists() else shutil.which("promtool")


needs_promtool = pytest.mark.skipif(
    _promtool() is None, reason="promtool not installed (scripts/install.sh takes it from Debian)"
)


@needs_promtool
@pytest.mark.parametrize(
    "command", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts-test.yml"]]
)
def test_promtool_accepts_the_rules(command: list[str]) -> None:
    promtool = _promtool()
    assert promtool is not None
    result = subprocess.run(
        [promtool, *command], cwd=DOCS, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_runbook_section() -> None:
    rules = (DOCS / "alerts.yml").read_text()
    operations = (DOCS / "operations.md").read_text()
    alerts = re.findall(r"^\s+- alert: (\w+)$", rules, flags=re.M)
    runbooks = re.findall(r"^\s+runbook: docs/operations\.md#(\w+)$", rules, flags=re.M)
    assert len(alerts) >= 10 and len(runbooks) == len(alerts)
    headings = set(re.findall(r"^### (Linechatd\w+)$", operations, flags=re.M))
    for alert, anchor in zip(alerts, runbooks, strict=True):
        assert anchor == alert.lower(), alert
        assert alert in headings, f"no runbook section for {alert}"
    assert headings == set(alerts)
