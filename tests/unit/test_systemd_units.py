"""The shipped unit files: systemd-analyze verify is clean, and the settings operators rely on are there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linechatd.config import ShutdownConfig, ZooKeeperConfig
from linechatd.gateway import CLAIM_MARGIN_S
from linechatd.startup import EXIT_CONFIG

UNITS = Path(__file__).resolve().parents[2] / "systemd"
CONFIG_FILE = {
    "linechatd.service": "/etc/linechatd/linechatd.toml",
    "linechatd@.service": "/etc/linechatd/%i.toml",
}
# KafkaAdmin.ensure_topics' default timeout: the topic check at start.
TOPIC_CHECK_S = 30.0


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
    # A bad file fails `systemctl reload` before the running instance hears of it.
    assert s["ExecReload"] == [
        f"/opt/linechatd/bin/linechatd check-config {CONFIG_FILE[name]}",
        "/bin/kill -HUP $MAINPID",
    ]
    assert s["ExecStart"] == [f"/opt/linechatd/bin/linechatd run --config {CONFIG_FILE[name]}"]
    # run makes every check itself; a failing ExecStartPre would restart-loop.
    assert "ExecStartPre" not in s
    assert s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert int(s["WatchdogSec"][0]) > 0
    assert "PYTHONFAULTHANDLER=1" in s["Environment"]
    assert s["ConfigurationDirectoryMode"] == ["0750"]
    # Above the default drain grace period, so a drain is never cut short
    # (the daemon extends it for longer grace periods: EXTEND_TIMEOUT_USEC).
    assert int(s["TimeoutStopSec"][0]) > ShutdownConfig().grace_period_s
    # Room for the first ZooKeeper connection, the topic check and a
    # predecessor's registration to expire, at their defaults.
    zookeeper = ZooKeeperConfig(hosts="h:1")
    needed = max(
        zookeeper.connect_timeout_s + TOPIC_CHECK_S,
        zookeeper.session_timeout_s + CLAIM_MARGIN_S,
    )
    assert int(s["TimeoutStartSec"][0]) >= needed
    # Documentation= names files the production install puts there.
    assert all(d.startswith("file:///opt/linechatd/share/doc/") for d in s["Documentation"])
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
