"""config/production.toml passes check-config once its key files exist, with no warning."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from linechatd.config import load_config

PRODUCTION = Path(__file__).resolve().parents[2] / "config" / "production.toml"


def place_key_files(directory: Path) -> None:
    """The secrets production.toml names, as placeholders: the admin token, the server
    API key and an RS256 public key."""
    (directory / "admin.token").write_text("0123456789abcdef" * 4 + "\n")
    (directory / "server-api.key").write_text("fedcba9876543210" * 4 + "\n")
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (directory / "jwt-public.pem").write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_production_config_passes_check_config(tmp_path: Path) -> None:
    config_path = tmp_path / "linechatd.toml"
    shutil.copy(PRODUCTION, config_path)
    place_key_files(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "linechatd", "check-config", "--json", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"valid": True, "errors": [], "warnings": []}
    config = load_config(config_path)
    assert config.auth.mode == "jwt" and config.auth.jwt_audience and config.auth.jwt_issuer
    assert config.cluster.environment == "production"
    assert config.kafka.topic_prefix == f"{config.cluster.name}-topic-"
    assert not config.http.listen.host.startswith("127.")
    assert config.admin.token_file == tmp_path / "admin.token"
    assert config.server_api.key_file == tmp_path / "server-api.key"


def test_production_config_without_its_key_files_names_them(tmp_path: Path) -> None:
    config_path = tmp_path / "linechatd.toml"
    shutil.copy(PRODUCTION, config_path)
    result = subprocess.run(
        [sys.executable, "-m", "linechatd", "check-config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    keys = sorted(line.split(":")[0] for line in result.stderr.splitlines())
    assert keys == ["admin.token_file", "auth.jwt_secret_file", "server_api.key_file"]
