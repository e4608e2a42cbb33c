"""The browser client as an npm package (clients/js): its own checks, run here so CI runs them.

- ``tsc --noEmit`` checks linechat.d.ts and the example that uses it;
- ``node --test`` runs the client's unit tests (a scripted gateway: fake
  WebSocket, fetch and storage) against linechatd/static/linechat.js;
- ``npm pack`` makes the tarball from a copy of the package, and the client
  in it must be, byte for byte, the file the gateway serves.

scripts/install.sh installs Node.js, npm and the package's devDependencies
(``npm ci``); only a machine without node skips these.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "js"
SOURCE = ROOT / "linechatd" / "static" / "linechat.js"
TSC = PACKAGE / "node_modules" / "typescript" / "bin" / "tsc"
NODE = shutil.which("node")
NPM = shutil.which("npm")
PACKED_FILES = {"package.json", "README.md", "linechat.d.ts", "dist/linechat.js"}

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node not found: scripts/install.sh installs Node.js (>= 18)"
)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command``; fail the test with its whole output unless it exits 0."""
    # npm must not ask the network about itself while a test runs.
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}",
            pytrace=False,
        )
    return result


def npm() -> str:
    if NPM is None:
        pytest.fail("npm not found: scripts/install.sh installs it", pytrace=False)
    return NPM


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """The package and the one source it builds from, laid out as in the repository.

    npm pack runs its build step there, so a test never writes into the work tree.
    """
    copy = tmp_path / "clients" / "js"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("node_modules", "dist", "*.tgz"))
    (tmp_path / "linechatd" / "static").mkdir(parents=True)
    shutil.copy2(SOURCE, tmp_path / "linechatd" / "static" / "linechat.js")
    return copy


def test_declarations_typecheck() -> None:
    if not TSC.exists():
        pytest.fail(
            f"{TSC.relative_to(ROOT)} is missing: run scripts/install.sh "
            "(it runs `npm ci` in clients/js)",
            pytrace=False,
        )
    assert NODE is not None
    run([NODE, str(TSC), "--noEmit", "-p", "tsconfig.json"], cwd=PACKAGE)


def test_node_unit_tests() -> None:
    tests = sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "test").glob("*.test.mjs"))
    assert len(tests) >= 3, tests
    assert NODE is not None
    result = run([NODE, "--test", "--test-reporter=tap", *tests], cwd=PACKAGE)
    print(result.stdout)
    # Node's TAP summary: every test passed, and there were some.
    summary = dict(
        line[2:].split(" ", 1) for line in result.stdout.splitlines() if line.startswith("# ")
    )
    assert summary.get("fail") == "0", result.stdout
    assert int(summary.get("pass", "0")) >= 16, result.stdout


def test_npm_pack_dry_run_lists_the_package_files(package_copy: Path) -> None:
    result = run([npm(), "pack", "--dry-run", "--json"], cwd=package_copy)
    [report] = json.loads(result.stdout)
    assert report["name"] == "linechatd-client"
    assert {entry["path"] for entry in report["files"]} == PACKED_FILES


def test_the_packed_client_is_the_file_the_gateway_serves(package_copy: Path) -> None:
    out = package_copy.parent / "packed"
    out.mkdir()
    result = run([npm(), "pack", "--json", "--pack-destination", str(out)], cwd=package_copy)
    [report] = json.loads(result.stdout)
    with tarfile.open(out / report["filename"]) as tarball:
        names = {name.removeprefix("package/") for name in tarball.getnames()}
        assert names == PACKED_FILES
        packed = tarball.extractfile("package/dist/linechat.js")
        declarations = tarball.extractfile("package/linechat.d.ts")
        assert packed is not None and declarations is not None
        assert packed.read() == SOURCE.read_bytes()
        assert declarations.read() == (PACKAGE / "linechat.d.ts").read_bytes()
