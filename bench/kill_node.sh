#!/usr/bin/env bash
# Kill one of three upstream nodes under load: does Moontide's proxy hide it?
#
#   bench/kill_node.sh
#   RATE=3000 DURATION=20s KILL_AT=10 bench/kill_node.sh
#   MOONTIDE_BIN=... GWLOAD_BIN=... bench/kill_node.sh        # skip the cargo build
#
# Setup (all on 127.0.0.1): three backends, each its own single-process nginx
# (`master_process off`, the OpenResty anchor's backend block: `return 200 "ok\n"`) on
# ports 18101, 18102, 18103, so that `kill -9 PID` stops that backend and nothing else;
# Moontide `serve --workers 1`; all four pinned to CPU 0. Upstream `k3` = the three nodes,
# round robin, every other field default (retries: 1 attempt more, on error/timeout/502/
# 503/504; keepalive 64); route `/k/*` -> k3.
#
# Load: `moontide-gwload steady` on CPU 1, open loop at RATE GET/s on /k/x for DURATION,
# timeout 2 s per request. KILL_AT s after the load starts, `kill -9` the backend on 18102.
# Every request is recorded (bench/results/kill_node/records.csv); the report gives
# requests, failures (transport errors, timeouts, non-2xx, wrong body) and latency before
# and after the kill, and the first second after it.
#
# Exit status: 0 no failed request; 1 some request failed (report written: that is the
# finding, see BENCHMARKS.md); 2 setup failed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

RATE=${RATE:-3000}
DURATION=${DURATION:-20s}
KILL_AT=${KILL_AT:-10}
MT_PORT=${MT_PORT:-18090}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18091}
BACKEND_PORTS=${BACKEND_PORTS:-"18101 18102 18103"}
VICTIM=${VICTIM:-2}                     # which of BACKEND_PORTS is killed (1-based)
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}/kill_node
UPSTREAM_EXTRA=${UPSTREAM_EXTRA:-}     # e.g. ', "retries": {"attempts": 2}' to compare

. "$HERE/lib/gwcommon.sh"

# shellcheck disable=SC2086
refuse_taken_ports $MT_PORT $MT_ADMIN_PORT $BACKEND_PORTS
mkdir -p "$RESULTS_DIR"
say "machine busy before start: $(other_load)% (other engineers' builds etc.)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gw-kill.XXXXXX"); TMP_DIRS="$TMP_DIRS $WORK"
declare -a BPID
i=0; nodes=""
for port in $BACKEND_PORTS; do
    i=$((i + 1))
    start_backend "$WORK/b$port" off 0 "$port" || { track "$BACKEND_PID"; die 2 "backend $port did not start"; }
    track "$BACKEND_PID"; BPID[$i]=$BACKEND_PID
    [ "$(wc -w <<<"$BACKEND_PIDS")" = 1 ] || die 2 "backend $port is not a single process: $BACKEND_PIDS"
    nodes+="${nodes:+, }{\"address\": \"127.0.0.1:$port\", \"weight\": 1}"
done
VICTIM_PORT=$(awk -v n="$VICTIM" '{ print $n }' <<<"$BACKEND_PORTS")
VICTIM_PID=${BPID[$VICTIM]}

start_moontide_node "$MT_PORT" "$MT_ADMIN_PORT"
mt_admin PUT /v1/upstreams/k3 "{\"nodes\": [$nodes]$UPSTREAM_EXTRA}"
mt_admin PUT /v1/routes/k3 '{"paths": ["/k/*"], "upstream": "k3"}'
curl -fsS -m 5 -H "Authorization: Bearer $(cat "$MT_TOKEN_FILE")" "$MT_ADMIN/v1/upstreams/k3" \
    >"$RESULTS_DIR/upstream.json" || die 2 "cannot read the upstream back"
say "upstream as stored: $(cat "$RESULTS_DIR/upstream.json")"
URL="http://127.0.0.1:$MT_PORT/k/x"
for _ in 1 2 3 4 5 6; do expect_get "$URL" 200 $'ok\n'; done

CMD="taskset -c 1 $GWLOAD_BIN --cpu 1 steady --url $URL --rate $RATE --duration $DURATION --timeout 2s --records $RESULTS_DIR/records.csv"
say "load: $CMD"
$CMD 2>"$RESULTS_DIR/load.log" &
LOAD_PID=$!; track "$LOAD_PID"
sleep "$KILL_AT"
kill -0 "$LOAD_PID" 2>/dev/null || die 2 "the load generator ended before the kill: $(cat "$RESULTS_DIR/load.log")"
KILL_US=${EPOCHREALTIME/./}
kill -KILL "$VICTIM_PID"
wait "$VICTIM_PID" 2>/dev/null || true
untrack "$VICTIM_PID"
say "killed backend 127.0.0.1:$VICTIM_PORT (pid $VICTIM_PID) at epoch_us $KILL_US"
port_busy "$VICTIM_PORT" && die 2 "port $VICTIM_PORT still listens after kill -9"
load_rc=0; wait "$LOAD_PID" || load_rc=$?; untrack "$LOAD_PID"
[ "$load_rc" = 0 ] || die 2 "load generator failed (rc $load_rc): $(cat "$RESULTS_DIR/load.log")"
cat "$RESULTS_DIR/load.log" >&2

first=$(awk -F, 'NR == 2 { print $1 }' "$RESULTS_DIR/records.csv")
last=$(tail -n 1 "$RESULTS_DIR/records.csv" | cut -d, -f1)
STATS=$(python3 "$HERE/lib/gwstats.py" "$RESULTS_DIR/records.csv" \
    "all:$first:$((last + 1))" "before:$first:$KILL_US" "after:$KILL_US:$((last + 1))" \
    "after_1s:$KILL_US:$((KILL_US + 1000000))" "after_1s_to_end:$((KILL_US + 1000000)):$((last + 1))")
{
    echo "# kill_node $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD)"
    echo "# VICTIM=$VICTIM RATE=$RATE DURATION=$DURATION KILL_AT=$KILL_AT UPSTREAM_EXTRA='$UPSTREAM_EXTRA' bench/kill_node.sh"
    echo "# upstream: $(cat "$RESULTS_DIR/upstream.json")"
    echo "# killed 127.0.0.1:$VICTIM_PORT at +$(( (KILL_US - first) / 1000 )) ms"
    printf '%s\n' "$STATS"
    grep 'failure x' "$RESULTS_DIR/load.log" | sed 's/^/# /' || true
    echo "# moontide log lines mentioning the upstream (first 10):"
    grep -ih "upstream\|18102\|$VICTIM_PORT" "$MT_DIR/stdout.log" "$MT_DIR/stderr.log" | head -n 10 | sed 's/^/#   /' || true
} | tee "$RESULTS_DIR/report.txt"
failed=$(awk -F'\t' '$1 == "all" { print $3 }' <<<"$STATS")
if [ "$failed" != 0 ]; then
    say "FAILED: $failed request(s) failed (see $RESULTS_DIR/report.txt)"
    exit 1
fi
say "no failed request"
