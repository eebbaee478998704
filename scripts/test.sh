#!/usr/bin/env bash
# Runs every pacegate test. Installs what the tests need when it is missing
# (Debian packages through apt-get when run as root), so it works on a fresh
# machine. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Commands the tests need -> Debian package. Required ones fail the run when
# they cannot be installed; optional ones skip the tests that use them.
declare -A REQUIRED=([kill]=procps [curl]=curl [redis-server]=redis-server [redis-cli]=redis-tools
  [redis-sentinel]=redis-sentinel)
declare -A OPTIONAL=([chromium]=chromium)

can_install() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_updated=
install() {
  [ -n "$apt_updated" ] || { apt-get update -qq && apt_updated=1; }
  echo "== installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
missing_of() {
  local -n table=$1
  for cmd in "${!table[@]}"; do command -v "$cmd" >/dev/null 2>&1 || echo "${table[$cmd]}"; done
}

mapfile -t required < <(missing_of REQUIRED)
if ((${#required[@]})); then
  if can_install; then install "${required[@]}"; else
    echo "error: the tests need: ${required[*]} (install them, or run this script as root to let it apt-get them)" >&2
    exit 1
  fi
fi
mapfile -t optional < <(missing_of OPTIONAL)
if ((${#optional[@]})); then
  if can_install; then install "${optional[@]}" || echo "warning: could not install ${optional[*]}"; else
    echo "warning: ${optional[*]} missing and not root: the tests that need them are skipped"
  fi
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== tests"
# tests/soak.rs runs 30 s; the long run is PACEGATE_SOAK_SECS=120 scripts/test.sh.
cargo test --all-targets "$@"

echo "== dashboard in a real browser"
scripts/dashboard-test.sh

echo "== README's client commands"
scripts/readme-clients.sh
