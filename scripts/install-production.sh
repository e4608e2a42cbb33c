#!/usr/bin/env bash
# Installs a linechatd release on a Debian VM, and nothing else: a virtualenv
# in /opt/linechatd with the wheel and its dependencies at the versions of
# requirements.lock, the docs, the system user, /etc/linechatd (mode 0750,
# with a starting configuration if there is none) and the systemd units, with
# linechatd.service enabled but not started. No browser, Java, Node.js or
# Redis: those are for development and tests (scripts/install.sh).
#
# Run as root from an unpacked sdist (or a checkout) whose dist/ holds the
# wheel, or name the wheel:
#
#   scripts/install-production.sh [--wheel PATH] [--root DIR] [--prefix DIR] [--no-enable]
#
#   --wheel PATH   the wheel to install (default: the newest dist/linechatd-*.whl)
#   --root DIR     install under DIR instead of / (tests, images); the venv is
#                  built in place there, so it runs from DIR/opt/linechatd
#   --prefix DIR   where the virtualenv goes (default /opt/linechatd)
#   --no-enable    install the units without enabling linechatd.service
#   PYTHON=python3.12  the interpreter the virtualenv is made from (>= 3.11)
#
# Idempotent: an upgrade runs it again with the new wheel; the configuration
# in /etc/linechatd is never overwritten.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3}
ROOT=""
PREFIX=/opt/linechatd
WHEEL=""
ENABLE=1

log() { printf '==> %s\n' "$*"; }
die() { printf '==> ERROR: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --wheel) WHEEL=$2; shift 2 ;;
        --root) ROOT=${2%/}; shift 2 ;;
        --prefix) PREFIX=${2%/}; shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

LOCK="$SRC/requirements.lock"
[ -f "$LOCK" ] || die "$LOCK not found: run from an unpacked sdist or a checkout"
if [ -z "$WHEEL" ]; then
    WHEEL=$(ls -t "$SRC"/dist/linechatd-*.whl 2>/dev/null | head -n 1 || true)
    [ -n "$WHEEL" ] || die "no wheel in $SRC/dist: build one with 'make dist' or pass --wheel PATH"
fi
[ -f "$WHEEL" ] || die "$WHEEL not found"
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (or with --root DIR)"
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt-get install -y python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); linechatd needs Python >= 3.11"

VENV="$ROOT$PREFIX"
log "virtualenv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (apt-get install -y python3-venv)"
fi
log "installing $(basename "$WHEEL") with the versions of requirements.lock"
"$VENV/bin/python" -m pip --disable-pip-version-check --no-input install -q --progress-bar off \
    --upgrade --constraint "$LOCK" "$WHEEL"

log "docs and examples in $VENV/share"
install -d -m 0755 "$VENV/share/doc/linechatd" "$VENV/share/linechatd"
install -m 0644 "$SRC"/docs/*.md "$SRC"/docs/alerts.yml "$SRC"/docs/grafana-dashboard.json \
    "$SRC"/README.md "$SRC"/CHANGELOG.md "$VENV/share/doc/linechatd/"
install -m 0644 "$SRC"/config/*.toml "$SRC"/systemd/*.service "$VENV/share/linechatd/"

log "system user linechatd"
install -D -m 0644 "$SRC/systemd/linechatd.sysusers" "$ROOT/usr/lib/sysusers.d/linechatd.conf"
if [ -n "$ROOT" ]; then
    install -d -m 0755 "$ROOT/etc"
    systemd-sysusers --root="$ROOT"
else
    systemd-sysusers /usr/lib/sysusers.d/linechatd.conf
fi
GID=$(awk -F: '$1 == "linechatd" { print $3 }' "$ROOT/etc/group")
[ -n "$GID" ] || die "group linechatd was not created"

log "configuration directory $ROOT/etc/linechatd (root:linechatd, 0750)"
install -d -m 0750 "$ROOT/etc/linechatd"
if [ "$(id -u)" -eq 0 ]; then
    chown "root:$GID" "$ROOT/etc/linechatd"
fi
if [ ! -e "$ROOT/etc/linechatd/linechatd.toml" ]; then
    install -m 0640 "$SRC/config/production.toml" "$ROOT/etc/linechatd/linechatd.toml"
    [ "$(id -u)" -ne 0 ] || chown "root:$GID" "$ROOT/etc/linechatd/linechatd.toml"
    log "wrote $ROOT/etc/linechatd/linechatd.toml from config/production.toml: edit the CHANGE lines"
fi

log "systemd units"
install -d -m 0755 "$ROOT/etc/systemd/system"
for unit in linechatd.service linechatd@.service; do
    sed "s|/opt/linechatd|$PREFIX|g" "$SRC/systemd/$unit" >"$ROOT/etc/systemd/system/$unit"
    chmod 0644 "$ROOT/etc/systemd/system/$unit"
done
if [ "$ENABLE" = 1 ]; then
    if [ -n "$ROOT" ]; then
        systemctl --root="$ROOT" enable linechatd.service
    else
        systemctl daemon-reload
        systemctl enable linechatd.service
    fi
fi
log "done: $("$VENV/bin/linechatd" --version) in $PREFIX"
log "next: edit /etc/linechatd/linechatd.toml, add its key files, then"
log "      $PREFIX/bin/linechatd check-config /etc/linechatd/linechatd.toml && systemctl start linechatd"
