# Shared by the scripts that run pacegate and the mock upstream as processes.
# Source it after `cd` to the checkout: it sets up $work (a temp dir) and
# $pids (killed on exit), and defines await_line.

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Reads the first line of FILE matching PATTERN, waiting at most 10 s.
await_line() {
  for _ in $(seq 100); do
    if line=$(grep -m1 -o "$2" "$1" 2>/dev/null); then echo "$line"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}
