#!/usr/bin/env bash
# Density (issue 4): N distinct functions on one node.
#
#   bench/density.sh                       # N=10000, DURATION=10s, RUNS=2
#   N=1000 bench/density.sh
#   MOONTIDE_BIN=/path/to/moontide bench/density.sh
#
# One node (`serve --workers 1`, pinned to CPU 0; wrk pinned to CPU 1):
#   1. RSS of the idle node, then N copies of bench/functions/hello.lua deployed as
#      h0..h{N-1} through the admin API (no traffic yet, so no instance exists), then RSS
#      again: (after - before) / N = memory of a deployed function with no instance.
#   2. Throughput, A B A B: `single` = wrk on /fn/h0 only; `spread` = wrk round-robin over
#      all N functions. A warm-up pass over every function runs first (each function's
#      first call is a cold start; the instances then stay warm within their idle grace).
#      spread / single = the density ratio (target >= 0.5).
#   Also: live instances and their Lua heap after the spread runs (from /metrics).
#
# Output: the summary (markdown) on stdout and in bench/results/density.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
N=${N:-10000}
DURATION=${DURATION:-10s}
RUNS=${RUNS:-2}
CONNS=${CONNS:-64}
PORT=${PORT:-18390}
ADMIN_PORT=${ADMIN_PORT:-18391}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}

for tool in wrk taskset python3 curl bc; do
    command -v "$tool" >/dev/null || { echo "density.sh: $tool is required" >&2; exit 2; }
done

if [ -z "${MOONTIDE_BIN:-}" ]; then
    (cd "$REPO" && cargo build --release -q -p moontide)
    MOONTIDE_BIN=$REPO/target/release/moontide
fi

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# shellcheck source=lib/node.sh
. "$HERE/lib/node.sh"
start_pinned_node "$MOONTIDE_BIN" "$PORT" "$ADMIN_PORT"
WORK=$NODE_DIR
# shellcheck source=lib/supervised.sh
. "$HERE/lib/supervised.sh"
SERVER_PID=$(node_process "$NODE_PID")   # the node process under the supervisor
TOKEN=$NODE_TOKEN

# Let the node settle, then measure its idle RSS.
sleep 1
RSS_BEFORE=$(rss_kib "$SERVER_PID")

echo "deploying $N functions..." >&2
DEPLOY_STARTED=$(date +%s.%N)
python3 - "$N" "$ADMIN_PORT" "$TOKEN" "$REPO/bench/functions/hello.lua" <<'PY'
import http.client, json, sys
n, port, token, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
body = json.dumps({"source": open(path).read(), "config": {}})
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
for i in range(n):
    conn.request("PUT", f"/v1/functions/h{i}", body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status != 201:
        sys.exit(f"deploy h{i}: {response.status} {data[:200]!r}")
PY
DEPLOY_SECONDS=$(echo "$(date +%s.%N) - $DEPLOY_STARTED" | bc -l)
sleep 1
RSS_AFTER=$(rss_kib "$SERVER_PID")
PER_FUNCTION=$(( (RSS_AFTER - RSS_BEFORE) * 1024 / N ))
echo "RSS ${RSS_BEFORE} KiB -> ${RSS_AFTER} KiB: $PER_FUNCTION bytes per deployed function" >&2

cat >"$WORK/round_robin.lua" <<LUA
-- wrk: each request goes to the next of $N functions.
local i = 0
request = function()
  i = (i + 1) % $N
  return wrk.format("GET", "/fn/h" .. i)
end
LUA

# Warm-up: a pass over every function (cold starts), and the single path.
taskset -c 1 wrk -t1 -c"$CONNS" -d3s -s "$WORK/round_robin.lua" "http://127.0.0.1:$PORT" >/dev/null
taskset -c 1 wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PORT/fn/h0" >/dev/null

rps() { awk '/^Requests\/sec:/ {print $2}'; }
errors() { awk '/Non-2xx|Socket errors/ {found=1} END {print found ? "yes" : "no"}'; }
singles=(); spreads=()
for run in $(seq "$RUNS"); do
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$PORT/fn/h0")
    [ "$(echo "$out" | errors)" = no ] || { echo "errors in single run:" >&2; echo "$out" >&2; exit 1; }
    singles+=("$(echo "$out" | rps)")
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" -s "$WORK/round_robin.lua" "http://127.0.0.1:$PORT")
    [ "$(echo "$out" | errors)" = no ] || { echo "errors in spread run:" >&2; echo "$out" >&2; exit 1; }
    spreads+=("$(echo "$out" | rps)")
    echo "run $run: single ${singles[-1]} rps, spread ${spreads[-1]} rps" >&2
done

METRICS=$(curl -s -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN_PORT/metrics")
LIVE=$(echo "$METRICS" | awk '$1 == "moontide_node_instances" {print $2}')
HEAP=$(echo "$METRICS" | awk '$1 == "moontide_node_instance_memory_bytes" {print $2}')
RSS_END=$(rss_kib "$SERVER_PID")

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
SINGLE=$(median "${singles[@]}")
SPREAD=$(median "${spreads[@]}")
RATIO=$(echo "$SPREAD / $SINGLE" | bc -l)

mkdir -p "$RESULTS_DIR"
{
    echo "### Density: $N functions, one worker (\`N=$N RUNS=$RUNS DURATION=$DURATION bench/density.sh\`)"
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    printf '| deploy %d functions (admin API, one client, each write fsynced) | %.1f s |\n' "$N" "$DEPLOY_SECONDS"
    printf '| RSS idle node / after deploys | %d / %d KiB |\n' "$RSS_BEFORE" "$RSS_AFTER"
    printf '| **memory per deployed function with no instance** | **%d bytes** (target <= 20 KB) |\n' "$PER_FUNCTION"
    printf '| single function, wrk -c%s (median of %s) | %.0f req/s |\n' "$CONNS" "$RUNS" "$SINGLE"
    printf '| round robin over %d functions (median of %s) | %.0f req/s |\n' "$N" "$RUNS" "$SPREAD"
    printf '| **spread / single** | **%.2f** (target >= 0.5) |\n' "$RATIO"
    printf '| live instances after the spread runs / their Lua heap | %s / %.0f MiB (RSS %d MiB) |\n' "$LIVE" "$(echo "$HEAP / 1048576" | bc -l)" "$((RSS_END / 1024))"
} | tee "$RESULTS_DIR/density.md"
