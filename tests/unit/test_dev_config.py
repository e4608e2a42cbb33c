"""`linechatd dev` writes instance configurations that pass check-config, admin token included."""

from __future__ import annotations

import stat
from pathlib import Path

from linechatd.config import load_config, read_token_file
from linechatd.dev import ADMIN_TOKEN_FILE, _write_admin_token, instance_config
from linechatd.startup import config_findings


def test_dev_instances_get_the_runs_admin_token(tmp_path: Path) -> None:
    _write_admin_token(tmp_path / ADMIN_TOKEN_FILE)
    assert stat.S_IMODE((tmp_path / ADMIN_TOKEN_FILE).stat().st_mode) == 0o600
    path = tmp_path / "gw-0.toml"
    path.write_text(
        instance_config(
            instance_id="gw-0",
            partitions=4,
            http_port=7110,
            ws_port=7111,
            zookeeper="127.0.0.1:7100",
            kafka="127.0.0.1:7101",
        )
    )
    config = load_config(path)
    assert config.admin.token_file == tmp_path / ADMIN_TOKEN_FILE
    assert len(read_token_file(tmp_path / ADMIN_TOKEN_FILE)) == 64
    findings = config_findings(config)
    assert findings.errors == [] and findings.warnings == []
    before = read_token_file(tmp_path / ADMIN_TOKEN_FILE)
    _write_admin_token(tmp_path / ADMIN_TOKEN_FILE)  # a new run, a new token
    assert read_token_file(tmp_path / ADMIN_TOKEN_FILE) != before
