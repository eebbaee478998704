#!/usr/bin/env bash
# Fuzzes pacegate's parsers with cargo-fuzz (libFuzzer): the config file
# (`config`), what a client sends, HTTP/1 framing and request targets
# (`request`), and what an upstream answers, rate-limit and Retry-After
# headers and what pacing learns from them (`upstream_answer`). The entry points are in src/fuzz.rs; every test run already
# feeds them random input for a few seconds (tests/fuzz_smoke.rs).
#
# Usage: scripts/fuzz.sh [SECONDS per target, default 60] [TARGET...]
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Installs cargo-fuzz when missing. Crashes are saved
# in fuzz/artifacts/TARGET/; replay one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(config request upstream_answer)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# The fuzz build has its own flags (sanitizer, coverage): keep it apart.
export CARGO_TARGET_DIR="$PWD/fuzz/target"
export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
  echo "== fuzzing $target for ${seconds}s"
  cargo fuzz run "$target" -- -max_total_time="$seconds"
done
