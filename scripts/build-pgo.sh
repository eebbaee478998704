#!/usr/bin/env bash
# Builds target/pgo/pacegate: the release build, optimised with a profile of
# pacegate's own hot paths (profile-guided optimisation, PGO). The Docker
# image ships this build; BENCHMARKS.md measures it next to the plain one
# (about a fifth less CPU per proxied request on 2 cores).
#
# 1. builds pacegate instrumented (every crate again, in target/pgo/pacegate-gen);
# 2. runs it for about 30 s against the mock upstreams: pass-through (many
#    connections and one), forward, HTTPS interception, uploads, a paced
#    and cached upstream that keeps a queue, an upstream answering 429
#    (retries), chat completions under a token quota;
# 3. merges the profile with llvm-profdata of rustc's own LLVM;
# 4. builds again with the profile (target/pgo/pacegate-use) and copies the
#    binary.
#
# With --floor it also builds target/pgo/hyper_floor the same way (trained
# for 5 s of pass-through), so that the bench compares a profile-guided
# pacegate with a profile-guided floor. The floor has builds of its own
# (target/pgo/floor-gen, floor-use): an example brings in the
# dev-dependencies' features (tokio's test-util among them), which must not
# reach pacegate's binary, and they change every crate's symbols, which a
# profile is matched by.
#
# Installs what it needs when missing: rustup's llvm-tools, and wrk and curl
# from Debian when root. Does nothing for a binary that is up to date (none
# of src/, Cargo.toml, Cargo.lock, this script, and for the floor its
# source, newer than it). About 20 minutes on 2 cores from nothing, most of
# it the two builds; the floor's take as long again.
# Usage: scripts/build-pgo.sh [--floor]
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/pgo
fresh() {  # fresh BINARY SOURCES...: BINARY exists and no source is newer
  local binary=$1
  shift
  [ -x "$binary" ] && [ -z "$(find "$@" -newer "$binary" -print -quit)" ]
}
sources=(src Cargo.toml Cargo.lock scripts/build-pgo.sh)
build_pacegate=true build_floor=false
if fresh "$out/pacegate" "${sources[@]}"; then
  echo "$out/pacegate is up to date"
  build_pacegate=false
fi
if [ "${1:-}" = --floor ]; then
  if fresh "$out/hyper_floor" "${sources[@]}" examples/hyper_floor.rs; then
    echo "$out/hyper_floor is up to date"
  else
    build_floor=true
  fi
fi
if ! $build_pacegate && ! $build_floor; then
  exit 0
fi
source scripts/common.sh

host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || rustup component add llvm-tools
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
source scripts/packages.sh
need_packages "${missing[@]}"

# The upstreams are not profiled: their plain build, in the usual place.
cargo build --release --locked --quiet --example mock_upstream --example llm_mock
serve() {  # serve NAME EXAMPLE ARGS...: starts a mock upstream; $NAME is its address
  local name=$1 example=$2 line
  shift 2
  "target/release/examples/$example" --listen 127.0.0.1:0 "$@" > "$work/$name.log" 2>&1 &
  pids+=($!)
  line=$(await_line "$work/$name.log" 'listening [0-9.:]*')
  printf -v "$name" '%s' "${line#listening }"
}
load() { wrk -t1 "$@" | awk '/Requests\/sec/ {print "   ", $2, "req/s"} /Non-2xx/ {print "   ", $0}'; }
# build_pgo NAME TRAINING CARGO_TARGET...: builds the target instrumented in
# $out/NAME-gen, runs the TRAINING function, merges the profiles its run
# wrote into $out/NAME.profdata and builds again with them in $out/NAME-use.
build_pgo() {
  local name=$1 training=$2
  shift 2
  echo "== $name: instrumented build"
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PWD/$out/$name-raw" \
    cargo build --release --locked --quiet "$@" --target-dir "$out/$name-gen"
  echo "== $name: training run"
  # Only this run's counts: a fresh build's build scripts and proc macros are
  # instrumented too, and wrote theirs while it compiled.
  rm -rf "$out/$name-raw"
  "$training"
  echo "== $name: optimised build"
  "$profdata" merge -o "$out/$name.profdata" "$out/$name-raw"
  RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PWD/$out/$name.profdata" \
    cargo build --release --locked --quiet "$@" --target-dir "$out/$name-use"
}

# Not indented: it writes files from here-documents.
train_pacegate() {
serve open mock_upstream --ignore-stdin
serve paced mock_upstream --ignore-stdin
serve limited mock_upstream --ignore-stdin --limit 200/1000
serve llm llm_mock
cat > "$work/pacegate.toml" <<EOF
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 2

[[upstream]]
name = "open"
base_url = "http://$open"
route = "/open"
hosts = ["$open", "pgo.test"]
rate = "1000000/s"
burst = 100000
max_concurrency = 1024

[[upstream]]
name = "paced"
base_url = "http://$paced/paced"
route = "/paced"
hosts = []
rate = "2000/s"
queue_size = 10000

[upstream.cache]
max_size = "16MiB"

[[upstream]]
name = "limited"
base_url = "http://$limited"
route = "/limited"
hosts = []
rate = "400/s"

[[upstream]]
name = "llm"
base_url = "http://$llm"
route = "/llm"
hosts = []
rate = "1000000/s"
tokens = "100000000/min"
default_max_tokens = 256
token_accounting = "usage"
EOF
"$out/pacegate-gen/release/pacegate" --config "$work/pacegate.toml" > "$work/pacegate.log" 2>&1 &
pacegate=$!
pids+=("$pacegate")
proxy=$(await_line "$work/pacegate.log" 'listening proxy=[0-9.:]*' | cut -d= -f2)
printf 'wrk.path = "http://%s/forward"\n' "$open" > "$work/forward.lua"
printf 'wrk.method = "POST"\nwrk.body = string.rep("x", 4096)\nwrk.headers["Content-Type"] = "text/plain"\n' \
  > "$work/post.lua"
cat > "$work/chat.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Say in two sentences how this API counts its rate limits."}]}'
wrk.headers["Content-Type"] = "application/json"
EOF
load -c64 -d6s "http://$proxy/open/a?b=c"
load -c1 -d3s "http://$proxy/open/a"
load -c64 -d3s -s "$work/forward.lua" "http://$proxy/"
load -c16 -d3s -s "$work/post.lua" "http://$proxy/open/upload"
load -c32 -d3s "http://$proxy/paced/a"
load -c8 -d3s "http://$proxy/limited/a"
load -c8 -d3s -s "$work/chat.lua" "http://$proxy/llm/v1/chat/completions"
# HTTPS interception: curl keeps 8 tunnels, at most 3000 requests or 20 s.
intercepted=$(timeout 20 curl -s --no-progress-meter --http1.1 -x "http://$proxy" --cacert "$work/ca.pem" -Z \
  --parallel-max 8 -o /dev/null -w '%{http_code}\n' "https://pgo.test/[1-3000]" | grep -c '^200$' || true)
echo "    $intercepted intercepted HTTPS requests answered 200"
kill -TERM "$pacegate"
wait "$pacegate"  # the profile is written as it exits
}

train_floor() {
  serve static mock_upstream --ignore-stdin
  "$out/floor-gen/release/examples/hyper_floor" 127.0.0.1:0 "$static" 2 > "$work/floor.log" 2>&1 &
  local floor=$! line
  pids+=("$floor")
  line=$(await_line "$work/floor.log" 'listening [0-9.:]*')
  load -c64 -d3s "http://${line#listening }/"
  load -c1 -d2s "http://${line#listening }/"
  kill -TERM "$floor"
  wait "$floor"  # as pacegate's, its profile is written as it exits
}

if $build_pacegate; then
  build_pgo pacegate train_pacegate --bin pacegate
  cp "$out/pacegate-use/release/pacegate" "$out/pacegate"
  echo "built $out/pacegate"
fi
if $build_floor; then
  build_pgo floor train_floor --example hyper_floor
  cp "$out/floor-use/release/examples/hyper_floor" "$out/hyper_floor"
  echo "built $out/hyper_floor"
fi
