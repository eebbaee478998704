#!/usr/bin/env bash
# Runs every pacegate test. Installs what the tests need when it is missing
# (system packages through apt-get when run as root), so it works on a fresh
# machine. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: command -> Debian package.
declare -A NEEDED=([kill]=procps)

missing=()
for cmd in "${!NEEDED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDED[$cmd]}")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: the tests need: ${missing[*]} (install them, or run this script as root to let it apt-get them)" >&2
    exit 1
  fi
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== tests"
cargo test --all-targets "$@"
