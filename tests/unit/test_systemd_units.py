"""The shipped unit files: systemd-analyze verify is clean, and the settings operators rely on are there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def _settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("name", ["linechatd.service", "linechatd@.service"])
def test_unit_has_the_promised_settings(name: str) -> None:
    s = _settings(UNITS / name)
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"]
    assert int(s["WatchdogSec"][0]) > 0
    # Above the default drain grace period (30 s), so a drain is never cut short.
    assert int(s["TimeoutStopSec"][0]) > 30
    assert int(s["LimitNOFILE"][0]) >= 65536
    for hardening in (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
    ):
        assert hardening in s, hardening
    assert s["CapabilityBoundingSet"] == [""]
    assert "@system-service" in s["SystemCallFilter"]
    assert s["User"] == ["linechatd"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(
    "name,instance",
    [("linechatd.service", "linechatd.service"), ("linechatd@.service", "linechatd@gw1.service")],
)
def test_systemd_analyze_verify_is_clean(tmp_path: Path, name: str, instance: str) -> None:
    # Point ExecStart at this environment's executable: verify checks that it exists.
    executable = Path(sys.executable).with_name("linechatd")
    text = (UNITS / name).read_text().replace("/opt/linechatd/bin/linechatd", str(executable))
    unit = tmp_path / instance
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if instance in line]
    assert result.returncode == 0 and not problems, result.stderr
