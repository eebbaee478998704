#!/usr/bin/env bash
# bench/ is the end-to-end suite (release binaries as processes, nginx, wrk);
# benches/ holds what `cargo bench` runs in-process, with nothing to install.
#
# Runs every pacegate benchmark scenario on loopback and regenerates
# bench/results/latest.json, the SVG charts and the tables in BENCHMARKS.md.
# Installs what it needs when missing (nginx, wrk, haproxy, squid, redis-server,
# redis-tools and redis-sentinel from Debian when root, Python packages and
# mitmproxy from PyPI). Whole
# suite: about ten minutes on 2 cores, and about 20 more the first time for
# the profile-guided build the overhead scenario measures.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# The proxies the overhead scenario compares pacegate with (issue 23).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v squid >/dev/null 2>&1 || [ -x /usr/sbin/squid ] || missing+=(squid)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# Allocators the flood scenario compares with glibc's (preloaded, no rebuild).
[ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || missing+=(libjemalloc2)
[ -e /usr/lib/x86_64-linux-gnu/libmimalloc.so.2 ] || missing+=(libmimalloc2.0)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
source scripts/packages.sh
need_packages "${missing[@]}"
python3 -c "import aiohttp, aiolimiter, tenacity, matplotlib, h2" 2>/dev/null \
  || python3 -m pip install --quiet aiohttp aiolimiter tenacity matplotlib h2
command -v mitmdump >/dev/null 2>&1 || python3 -m pip install --quiet mitmproxy

# pacegate on its own, as `cargo run --release` builds it: built together
# with examples it would get the dev-dependencies' features too (tokio's
# test-util, whose clock the timer reads under a lock).
cargo build --release --quiet --bin pacegate
cargo build --release --quiet --example mock_upstream --example llm_mock --example hyper_floor
# The overhead scenario (run by default) measures the profile-guided build
# too: built once, then kept until the sources change.
case " $* " in *" overhead "* | "  ") scripts/build-pgo.sh --floor ;; esac
exec python3 bench/bench.py "$@"
