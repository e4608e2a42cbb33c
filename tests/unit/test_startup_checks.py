"""check-config makes every check `run` makes before it connects anywhere, with the same words."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.cluster import write_config

from linechatd.config import load_config
from linechatd.gateway import _check_startup
from linechatd.startup import ConfigurationError, config_findings

BASE: dict[str, dict[str, Any]] = {
    "zookeeper": {"hosts": "127.0.0.1:2181"},
    "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
}


def _config(tmp_path: Path, **tables: dict[str, Any]) -> Path:
    sections = {name: dict(values) for name, values in BASE.items()}
    for name, values in tables.items():
        sections.setdefault(name, {}).update(values)
    return write_config(tmp_path / "linechatd.toml", **sections)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "linechatd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _bad_tls(tmp_path: Path) -> dict[str, dict[str, Any]]:
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    return {"websocket": {"tls_cert_file": "cert.pem", "tls_key_file": "key.pem"}}


def _short_hs256_key(tmp_path: Path) -> dict[str, dict[str, Any]]:
    (tmp_path / "jwt.key").write_bytes(b"ab")
    return {
        "auth": {
            "mode": "jwt",
            "jwt_secret_file": "jwt.key",
            "jwt_issuer": "https://idp.example",
            "jwt_audience": "chat",
        }
    }


CASES = {
    "auth none on every address": (
        lambda tmp: {"websocket": {"listen": "0.0.0.0:8765", "advertise": "ws://gw:8765/ws"}},
        "auth.mode",
    ),
    "a 2-byte HS256 key": (_short_hs256_key, "auth.jwt_secret_file"),
    "listen on 0.0.0.0 without advertise": (
        lambda tmp: {"http": {"listen": "0.0.0.0:8080"}, "auth": {"allow_insecure_none": True}},
        "http.advertise",
    ),
    "TLS files that do not load": (_bad_tls, "websocket.tls_cert_file"),
    "two listeners on one address": (
        lambda tmp: {"admin": {"listen": "127.0.0.1:8080"}},
        "admin.listen",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_config_and_run_refuse_alike(tmp_path: Path, case: str) -> None:
    make, key = CASES[case]
    path = _config(tmp_path, **make(tmp_path))
    result = _check_config(path)
    assert result.returncode == 2, result.stderr
    [problem] = result.stderr.splitlines()
    assert problem.startswith(f"{key}: "), problem
    # run refuses with the same words (and exits 78: a configuration fault).
    with pytest.raises(ConfigurationError) as refused:
        _check_startup(load_config(path))
    assert str(refused.value) == problem


def test_a_valid_file_passes_both(tmp_path: Path) -> None:
    path = _config(tmp_path)
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    _check_startup(load_config(path))


def test_production_durability_warnings(tmp_path: Path) -> None:
    path = _config(tmp_path, cluster={"environment": "production"})
    result = _check_config(path)
    assert result.returncode == 0
    warnings = result.stderr.splitlines()
    assert [w.split(":")[1].strip() for w in warnings] == [
        "kafka.replication_factor",
        "kafka.min_insync_replicas",
        "admin.token_file",
    ]
    assert all(w.startswith("warning: ") for w in warnings)
    durable = _config(
        tmp_path,
        cluster={"environment": "production"},
        kafka={"replication_factor": 3, "min_insync_replicas": 2},
    )
    assert [w for w in config_findings(load_config(durable)).warnings if "kafka." in w] == []


def test_development_cluster_is_not_warned_about_durability(tmp_path: Path) -> None:
    assert config_findings(load_config(_config(tmp_path))).warnings == []


def test_retention_shorter_than_the_replay_window_is_warned(tmp_path: Path) -> None:
    path = _config(tmp_path, kafka={"topic_retention_s": 3600}, replay={"max_age_s": 86400})
    [warning] = config_findings(load_config(path)).warnings
    assert warning.startswith("kafka.topic_retention_s: 3600 s is shorter than replay.max_age_s")


def test_min_insync_above_replication_is_warned(tmp_path: Path) -> None:
    path = _config(tmp_path, kafka={"replication_factor": 1, "min_insync_replicas": 2})
    [warning] = config_findings(load_config(path)).warnings
    assert "no send could be acked" in warning


def test_deprecated_key_is_a_warning_not_a_problem(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("x" * 40)
    path = _config(tmp_path, http={"admin_token_file": "admin.token"})
    result = _check_config(path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "warning: http.admin_token_file: renamed to admin.token_file; "
        "the old name will stop working"
    ]
