#!/usr/bin/env bash
# Profile of the `proxy` endpoint's front (Moontide's worker thread, or nginx's front worker
# with the backends split out as under `run.sh OR_SPLIT=1`): perf profile of that thread
# and its context switches per request. Same pinning as bench/run.sh (front + backend
# nginx on CPU 0, wrk on CPU 1).
#
#   bench/profile_gateway.sh                    # Moontide
#   SERVER=openresty bench/profile_gateway.sh   # the anchor minus its backend block
#   MOONTIDE_BIN=/path/to/moontide bench/profile_gateway.sh
#
# Needs perf (linux-perf), wrk, nginx, curl. Ports: 18080-18082 (OpenResty), 18090/18091
# (Moontide), 127.0.0.1 only; refuses taken ports; stops what it started on exit.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SERVER=${SERVER:-moontide}
BIN=${MOONTIDE_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/moontide}
ANCHOR_DIR=${ANCHOR_DIR:-$REPO/../shared/anchors/openresty}
die() { echo "profile_gateway: ERROR: $*" >&2; exit 2; }
for bin in perf wrk nginx curl taskset ss; do command -v "$bin" >/dev/null || die "missing $bin"; done
. "$HERE/lib/backends.sh"
for port in 18080 18081 18082 18090 18091; do
    ss -Hltn "sport = :$port" | grep -q . && die "port $port is in use"
done
D=$(mktemp -d "${TMPDIR:-/tmp}/gw-profile.XXXXXX"); chmod 755 "$D"; mkdir -p "$D/logs" "$D/tmp"
FRONT=""; BP=""
cleanup() {
    if [ -n "$FRONT" ]; then
        if [ "$SERVER" = moontide ]; then kill "$FRONT" 2>/dev/null || true; wait "$FRONT" 2>/dev/null || true
        else stop_backend "$FRONT"; fi
    fi
    stop_backend "$BP"; rm -rf "$D"
}
trap cleanup EXIT
start_backend "$D/b" on 0 18081 18082 || die "backends did not start"; BP=$BACKEND_PID
if [ "$SERVER" = moontide ]; then
    [ -x "$BIN" ] || die "no moontide binary at $BIN (set MOONTIDE_BIN)"
    taskset -c 0 "$BIN" serve --data-dir "$D/data" --listen 127.0.0.1:18090 --admin 127.0.0.1:18091 \
        --workers 1 >"$D/out" 2>"$D/err" & FRONT=$!
    for _ in $(seq 100); do grep -q 'admin API listening' "$D/out" 2>/dev/null && break; sleep 0.1; done
    T=$(cat "$D/data/admin.token")
    curl -fsS -o /dev/null -X PUT -H "Authorization: Bearer $T" \
        -d '{"nodes":[{"address":"127.0.0.1:18081"},{"address":"127.0.0.1:18082"}],"keepalive":{"max_idle":64}}' \
        http://127.0.0.1:18091/v1/upstreams/backends || die "PUT upstream failed"
    curl -fsS -o /dev/null -X PUT -H "Authorization: Bearer $T" -d '{"path":"/proxy","upstream":"backends"}' \
        http://127.0.0.1:18091/v1/routes/proxy || die "PUT route failed"
    URL=http://127.0.0.1:18090/proxy
    # shellcheck source=lib/supervised.sh
    . "$HERE/lib/supervised.sh"
    NODE=$(node_process "$FRONT")   # the node process under the supervisor
    TID=$(ps -L -o tid=,comm= -p "$NODE" | awk '$2 == "moontide-worker" { print $1 }')
    PROC=/proc/$NODE/task/$TID
else
    awk '/# --- backends: two ports/ { skip = 1 } /# --- front: the measured endpoints/ { skip = 0 } !skip' \
        "$ANCHOR_DIR/nginx.conf" >"$D/split.conf"
    grep -q 'listen 127.0.0.1:1808[12]' "$D/split.conf" && die "could not cut the backend block"
    taskset -c 0 nginx -p "$D" -c "$D/split.conf" -e "$D/logs/error.log" -g "worker_processes 1;" \
        >/dev/null 2>&1 & FRONT=$!
    for _ in $(seq 50); do curl -fsS -o /dev/null http://127.0.0.1:18080/proxy 2>/dev/null && break; sleep 0.1; done
    URL=http://127.0.0.1:18080/proxy
    TID=$(ps -o pid= --ppid "$FRONT" | tr -d ' ' | head -n 1)
    PROC=/proc/$TID
fi
[ "$(curl -fsS -m 5 "$URL")" = ok ] || die "$URL does not answer ok"
[ -n "$TID" ] || die "no front thread found"
ctxt() { awk '/^voluntary_ctxt_switches/ { v = $2 } /^nonvoluntary_ctxt_switches/ { n = $2 } END { print v, n }' "$PROC/status"; }
taskset -c 1 wrk -t1 -c64 -d9s "$URL" >"$D/wrk.txt" & WP=$!
sleep 2
read -r v0 n0 <<<"$(ctxt)"
perf record -q -F 2999 -g -t "$TID" -o "$D/perf.data" -- sleep 5 2>/dev/null
read -r v1 n1 <<<"$(ctxt)"
wait "$WP"
rps=$(awk '/^Requests\/sec:/ { print $2 }' "$D/wrk.txt")
echo "$SERVER front thread $TID: $rps req/s (wrk -t1 -c64 -d9s); over 5 s: voluntary switches $((v1 - v0)), involuntary $((n1 - n0))" \
     "= $(awk -v n=$((n1 - n0)) -v r="$rps" 'BEGIN { printf "%.2f", n / (5 * r) }') per request"
perf report -i "$D/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 5
perf report -i "$D/perf.data" --no-children --sort dso,sym --stdio -g none --percent-limit "${PERCENT_LIMIT:-1}" 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -n "${TOP:-25}"
