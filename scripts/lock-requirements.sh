#!/usr/bin/env bash
# Writes requirements.lock: every package of the test virtualenv (runtime,
# test and benchmark dependencies, transitively) at the version installed
# there, i.e. the versions the test suite ran with. scripts/install.sh and
# scripts/install-production.sh install with it as constraints, so a
# development machine, CI and every production VM run the same trio,
# h11, kazoo and librdkafka.
#
# To move a dependency: install the new version into the venv (for example
# `.venv/bin/pip install -U 'trio==X'` or after editing pyproject.toml
# `.venv/bin/pip install -e '.[test,bench]'`), run the tests, then `make lock`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || { echo "no $VENV: run scripts/install.sh first" >&2; exit 1; }
{
    echo "# Every dependency of linechatd (runtime, test, bench), pinned to the versions"
    echo "# the tests ran with; written by scripts/lock-requirements.sh (make lock)."
    echo "# Used as constraints by scripts/install.sh and scripts/install-production.sh."
    echo "# Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m)."
    "$VENV/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable | LC_ALL=C sort -f
} >requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
