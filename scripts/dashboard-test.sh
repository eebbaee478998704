#!/usr/bin/env bash
# Loads the admin dashboard in headless Chromium against a running pacegate
# that carries traffic, and checks that the upstream's name and live numbers
# appear. Needs the debug binaries (`cargo build --bin pacegate --example
# mock_upstream`), chromium, curl and redis-server. Set SCREENSHOT=path.png to also save a
# screenshot for a human to look at.
set -euo pipefail
cd "$(dirname "$0")/.."

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "dashboard test skipped: no chromium (scripts/test.sh installs it when run as root)"
  exit 0
fi
cargo build --quiet --bin pacegate --example mock_upstream

source scripts/common.sh

target/debug/examples/mock_upstream --listen 127.0.0.1:0 --ignore-stdin >"$work/mock.out" &
pids+=($!)
mock=$(await_line "$work/mock.out" 'listening [0-9.:]*' | cut -d' ' -f2)

# A Redis for shared quotas, on a loopback port nothing listens on.
for _ in $(seq 20); do
  redis_port=$((20000 + RANDOM % 30000))
  (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null || break
done
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --loglevel warning >"$work/redis.out" &
pids+=($!)

cat >"$work/pacegate.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[mitm]
enabled = false

[redis]
url = "redis://127.0.0.1:$redis_port"

[[upstream]]
name = "demo-api"
base_url = "http://$mock"
route = "/demo"
hosts = []
rate = "20/s"

[[upstream.limit]]
name = "items"
paths = ["/item/*"]
rate = "10/s"

[upstream.cache]

[[upstream]]
name = "llm"
base_url = "http://$mock"
route = "/llm"
hosts = []
rate = "20/s"
tokens = "60000/min"

[[upstream]]
name = "tunneled"
base_url = "http://$mock"
rate = "20/s"
TOML
target/debug/pacegate --config "$work/pacegate.toml" --log-format json 2>"$work/pacegate.log" &
pids+=($!)
listening=$(await_line "$work/pacegate.log" 'listening proxy=[0-9.:]* admin=[0-9.:]*')
proxy=$(echo "$listening" | sed -E 's/.*proxy=([0-9.:]+).*/\1/')
admin=$(echo "$listening" | sed -E 's/.*admin=([0-9.:]+).*/\1/')

# A few LLM calls, answered before the page loads: the mock reports no
# usage, so their reservations stand and count as sent.
for i in $(seq 3); do
  curl -s -o /dev/null --max-time 30 -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hello"}]}' \
    "http://$proxy/llm/v1/chat/completions"
done

# The same cacheable GET twice: a miss, then a hit.
for i in 1 2; do
  curl -s -o /dev/null --max-time 30 "http://$proxy/demo/cached?max_age=60"
done

# A CONNECT to the host `tunneled` claims, carrying TLS with interception
# off: a plain tunnel, not paced (plain HTTP inside would be served, paced).
# The mock speaks no TLS, so curl fails once the bytes went through.
curl -s -o /dev/null --max-time 10 --proxytunnel -x "http://$proxy" "https://$mock/through-a-tunnel" || true

# Traffic: 100 requests queue up behind the items limit (10/s, done in about 10 s).
for i in $(seq 100); do
  curl -s -o /dev/null --max-time 30 "http://$proxy/demo/item/$i" &
  pids+=($!)
done

# pacegate samples a second: wait (bounded) until its history holds more
# seconds than the page could poll itself within its virtual time budget
# (12 samples of each of the 3 upstreams).
history_points() {
  curl -s --max-time 5 "http://$admin/status/history" | grep -o '"at_unix_ms"' | wc -l
}
for _ in $(seq 60); do
  [ "$(history_points)" -ge 36 ] && break
  sleep 0.5
done

flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --user-data-dir="$work/profile" --virtual-time-budget=3000)
timeout 60 "$browser" "${flags[@]}" --dump-dom "http://$admin/" >"$work/dom.html" 2>"$work/chromium.log"
if [ -n "${SCREENSHOT:-}" ]; then
  timeout 60 "$browser" "${flags[@]}" --window-size=1200,800 --screenshot="$SCREENSHOT" "http://$admin/" 2>>"$work/chromium.log"
  echo "screenshot saved to $SCREENSHOT"
fi

fail() { echo "dashboard test FAILED: $1" >&2; head -c 4000 "$work/dom.html" >&2; exit 1; }
grep -q 'data-upstream="demo-api"' "$work/dom.html" || fail "the upstream's card is missing"
answered=$(grep -o 'data-stat="requests">[0-9]*' "$work/dom.html" | head -1 | grep -o '[0-9]*$' || true)
[ "${answered:-0}" -gt 0 ] || fail "no answered requests shown"
grep -q 'data-stat="queue">[0-9]' "$work/dom.html" || fail "no queue depth shown"
grep -q 'quota 20/s' "$work/dom.html" || fail "quota not shown"
grep -q 'data-limit="items"' "$work/dom.html" || fail "the items limit's row is missing"
grep -q 'data-tokens="tokens"' "$work/dom.html" || fail "the llm upstream's token quota row is missing"
grep -Eq 'data-stat="tokens">tokens sent last minute [1-9][0-9]*' "$work/dom.html" || fail "no tokens sent shown"
grep -q 'calibration 1.00' "$work/dom.html" || fail "no calibration shown"
grep -Eq 'data-stat="cache">cache hit ratio [0-9]+ % · 1 hits' "$work/dom.html" || fail "no cache hit ratio shown"
grep -q 'data-stat="unpaced">1 HTTPS tunnel not paced' "$work/dom.html" || fail "the unpaced tunnel is not shown"
grep -q "data-stat=\"redis\">redis server · master 127.0.0.1:$redis_port<" "$work/dom.html" ||
  fail "the Redis form and master are not named"
# Charts are drawn from the server's history on the first load: far more
# points than the page's own few polls could give (the history above holds
# at least 12 samples of every upstream; demo-api's card comes first).
points=$(grep -o 'data-chart="rate"[^>]*>.*' "$work/dom.html" | grep -o 'data-points="[0-9]*"' | head -1 | grep -o '[0-9]*' || true)
[ "${points:-0}" -ge 8 ] || fail "the rate chart has ${points:-no} points on the first load"
grep -q 'data-stat="where">route /demo' "$work/dom.html" || fail "the upstream's route is not shown"
grep -q 'data-series="queue timeout"' "$work/dom.html" || fail "no queue_timeout series"
grep -q '>-5 min<' "$work/dom.html" || fail "no time axis"
echo "dashboard test passed: demo-api card shows $answered answered requests"
