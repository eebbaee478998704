#!/usr/bin/env bash
# Measures two pacegate builds back to back, interleaved (A B A B), on the
# figures a request-path change must not make worse: pass-through req/s,
# memory per queued request, start-up with 10 000 upstreams.
# Usage: bench/compare.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]
# (bench/run.sh installs what this needs and builds the current tree.)
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 rounds=${3:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build --release --quiet --example mock_upstream --example hyper_floor
for round in $(seq "$rounds"); do
  for side in before after; do
    echo "== round $round: $side" >&2
    PACEGATE_BIN=${!side} BENCH_OUT="$out/$side-$round.json" python3 bench/bench.py overhead scale >/dev/null
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
pg = lambda r: r["overhead"]["pacegate reverse"]
rows = [("pass-through req/s", lambda r: pg(r)["rps"]),
        ("pass-through req/s, pacegate / nginx", lambda r: pg(r)["rps"] / r["overhead"]["nginx"]["rps"]),
        ("pass-through p99 µs", lambda r: pg(r)["p99_us"]),
        ("pass-through CPU µs/request (user + system)", lambda r: pg(r)["user_us"] + pg(r)["system_us"]),
        ("bytes per queued request (h2c)", lambda r: r["scale"]["multiplexed"]["bytes_per_queued_request"]),
        ("bytes per queued request (HTTP/1.1 connection each)", lambda r: r["scale"]["per_connection"]["bytes_per_queued_request"]),
        ("10 000-upstream start-up, s", lambda r: r["scale"]["startup_s"])]
runs = {side: [json.load(open(f"{out}/{side}-{i}.json")) for i in range(1, rounds + 1)] for side in ("before", "after")}
print("| figure | before | after |\n|---|---|---|")
for name, get in rows:
    fmt = lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    cell = lambda side: " / ".join(fmt(get(r)) for r in runs[side])
    print(f"| {name} | {cell('before')} | {cell('after')} |")
PY
