#!/usr/bin/env bash
# Runs the client commands of README.md against a real pacegate, so the
# examples cannot rot: curl (reverse, http_proxy, https_proxy with the CA
# pacegate creates, the queue-wait header), Python requests, and httpx,
# aiohttp and Node (undici's EnvHttpProxyAgent, or NODE_USE_ENV_PROXY=1 on
# Node 24+) where installed. The upstream `github` claims api.github.com but
# its base_url is the mock upstream, so nothing leaves the machine. Every
# answer must carry x-pacegate-attempts: the request went through pacegate's
# paced path, not through a plain tunnel. Needs the debug binaries (built
# here), curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin pacegate --example mock_upstream
source scripts/common.sh
bin=$PWD/target/debug

# README: `pacegate check --config config/pacegate.toml`.
"$bin/pacegate" check --config config/pacegate.toml >/dev/null

"$bin/examples/mock_upstream" --listen 127.0.0.1:0 --ignore-stdin >"$work/mock.out" &
pids+=($!)
mock=$(await_line "$work/mock.out" 'listening [0-9.:]*' | cut -d' ' -f2)

# The layout of a checkout: config/pacegate.toml, the CA created beside it.
mkdir "$work/config"
cat >"$work/config/pacegate.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[upstream]]
name = "github"
base_url = "http://$mock"
route = "/github"
hosts = ["api.github.com"]
rate = "20/s"
TOML
cd "$work"
"$bin/pacegate" --config config/pacegate.toml --log-format json 2>pacegate.log &
pids+=($!)
listening=$(await_line pacegate.log 'listening proxy=[0-9.:]* admin=[0-9.:]*')
proxy=$(echo "$listening" | sed -E 's/.*proxy=([0-9.:]+).*/\1/')
admin=$(echo "$listening" | sed -E 's/.*admin=([0-9.:]+).*/\1/')
grep -q 'created a CA for HTTPS interception' pacegate.log
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY all_proxy no_proxy

failed=0
# NAME, then the command, which prints the x-pacegate-attempts it got.
expect_paced() {
  local name=$1 got
  shift
  if got=$("$@" 2>"$work/client.err") && [ "$(echo "$got" | tr -d '[:space:]')" = 1 ]; then
    echo "ok      $name"
  else
    echo "FAILED  $name: got '${got:-}'"; cat "$work/client.err"; failed=1
  fi
}
skip() { echo "skipped $1: $2"; }
attempts='%header{x-pacegate-attempts}'

# Reverse mode, forward mode (curl reads only the lower-case http_proxy).
expect_paced "curl, reverse" curl -sS -o /dev/null -w "$attempts" "http://$proxy/github/rate_limit"
expect_paced "curl, http_proxy" env http_proxy="http://$proxy" \
  curl -sS -o /dev/null -w "$attempts" http://api.github.com/zen
# HTTPS through the CA pacegate created beside the config.
expect_paced "curl, https_proxy --cacert" env https_proxy="http://$proxy" \
  curl -sS -o /dev/null -w "$attempts" --cacert config/ca.pem https://api.github.com/zen
expect_paced "curl, x-pacegate-max-wait" curl -sS -o /dev/null -w "$attempts" \
  --max-time 70 -H 'x-pacegate-max-wait: 60s' "http://$proxy/github/zen"

export https_proxy="http://$proxy" http_proxy="http://$proxy"
export REQUESTS_CA_BUNDLE=$PWD/config/ca.pem SSL_CERT_FILE=$PWD/config/ca.pem NODE_EXTRA_CA_CERTS=$PWD/config/ca.pem
py() { python3 -c "import $1" 2>/dev/null; }
if py requests; then
  expect_paced "python requests" python3 -c '
import requests
r = requests.get("https://api.github.com/zen", timeout=(5, 70))
print(r.headers["x-pacegate-attempts"])'
else skip "python requests" "not installed"; fi
if py httpx; then
  expect_paced "python httpx" python3 -c '
import httpx
r = httpx.Client(timeout=httpx.Timeout(5.0, read=70.0)).get("https://api.github.com/zen")
print(r.headers["x-pacegate-attempts"])'
else skip "python httpx" "not installed"; fi
if py aiohttp; then
  expect_paced "python aiohttp" python3 -c '
import asyncio, aiohttp
async def main():
    async with aiohttp.ClientSession(trust_env=True) as s:
        async with s.get("https://api.github.com/zen") as r:
            print(r.headers["x-pacegate-attempts"])
asyncio.run(main())'
else skip "python aiohttp" "not installed"; fi

fetch='fetch("https://api.github.com/zen").then(r => console.log(r.headers.get("x-pacegate-attempts")))'
if ! command -v node >/dev/null; then skip "node" "not installed"
else
  if [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 24 ]; then
    expect_paced "node fetch, NODE_USE_ENV_PROXY=1" env NODE_USE_ENV_PROXY=1 node -e "$fetch"
  else skip "node fetch, NODE_USE_ENV_PROXY=1" "Node $(node --version) is older than 24"; fi
  if node -e 'require("undici")' 2>/dev/null; then
    expect_paced "node fetch, undici EnvHttpProxyAgent" node -e "
const { EnvHttpProxyAgent, setGlobalDispatcher } = require('undici');
setGlobalDispatcher(new EnvHttpProxyAgent());
$fetch"
  else skip "node fetch, undici EnvHttpProxyAgent" "undici not installed"; fi
fi

# README: watching it (not through the proxy).
unset http_proxy https_proxy
curl -sSf -o /dev/null "http://$admin/status"
curl -sSf -o /dev/null "http://$admin/metrics"
exit $failed
