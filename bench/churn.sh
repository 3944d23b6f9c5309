#!/usr/bin/env bash
# Route churn under load (Moontide only: the issue's anchors for this, APISIX and Kong,
# are not installed on this machine).
#
#   bench/churn.sh
#   ROUTES=5000 RATE=3000 CHANGES=50 WINDOW=20s bench/churn.sh
#   MOONTIDE_BIN=... GWLOAD_BIN=... bench/churn.sh          # skip the cargo build
#
# Setup (127.0.0.1): the anchor's two "ok" backends as one nginx (master + 1 worker) on
# 18101/18102, Moontide `serve --workers 1`, both pinned to CPU 0; upstream `backends`
# (round robin over the two, defaults otherwise); ROUTES routes r<i>: path /r/<i> ->
# backends, PUT one by one through the admin API (`moontide-gwload routes`, timed).
#
# Then, on CPU 1:
#   - steady load: `moontide-gwload steady`, open loop at RATE GET/s (below saturation,
#     so that latency means something), round robin over 4 of the routes
#     (/r/0, /r/<ROUTES/3>, /r/<2*ROUTES/3>, /r/<ROUTES-1>), for the whole run;
#   - `moontide-gwload churn`: WINDOW quiet, then CHANGES route changes/s for WINDOW,
#     cycling (1) PUT a new route n<k> (/n/<k>) and poll the data plane for /n/<k> back
#     to back over one keep-alive connection until it answers 200 "ok" -> change-to-serve
#     latency (PUT acknowledged -> first served), (2) PUT an existing r<i> (random i, new
#     priority), (3) DELETE the oldest n<k>; then deletes what is left of n<k>, then
#     WINDOW quiet again.
# The latency of the steady load is compared between the windows (by send time); the
# p99 rise = p99(churn) / p99(quiet before) - 1. Polls are extra load (~1 request per
# poll, a few per new route) and count in the churn window's server work, not its load
# latencies.
#
# Output: bench/results/churn/{report.txt,records.csv,changes.csv,churn.txt,phases.txt}.
# Exit status: 0 ran and every load request succeeded; 1 a request failed or a new
# route never served; 2 setup failed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

ROUTES=${ROUTES:-5000}
RATE=${RATE:-3000}
CHANGES=${CHANGES:-50}
WINDOW=${WINDOW:-20}                 # seconds
MT_PORT=${MT_PORT:-18090}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18091}
BACKEND_PORTS=${BACKEND_PORTS:-"18101 18102"}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}/churn

. "$HERE/lib/gwcommon.sh"
[[ $WINDOW =~ ^[1-9][0-9]*$ ]] || die 2 "WINDOW is whole seconds"
[ "$ROUTES" -ge 4 ] || die 2 "ROUTES must be >= 4"

# shellcheck disable=SC2086
refuse_taken_ports $MT_PORT $MT_ADMIN_PORT $BACKEND_PORTS
mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR"/*
say "machine busy before start: $(other_load)% (other engineers' builds etc.)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gw-churn.XXXXXX"); TMP_DIRS="$TMP_DIRS $WORK"
# shellcheck disable=SC2086
start_backend "$WORK/backends" on 0 $BACKEND_PORTS || { track "$BACKEND_PID"; die 2 "backends did not start"; }
track "$BACKEND_PID"
nodes=""
for port in $BACKEND_PORTS; do nodes+="${nodes:+, }{\"address\": \"127.0.0.1:$port\", \"weight\": 1}"; done

start_moontide_node "$MT_PORT" "$MT_ADMIN_PORT"
DATA="http://127.0.0.1:$MT_PORT"
mt_admin PUT /v1/upstreams/backends "{\"nodes\": [$nodes]}"
LOADCMD="taskset -c 1 $GWLOAD_BIN --cpu 1 routes --admin $MT_ADMIN --token-file $MT_TOKEN_FILE --upstream backends --count $ROUTES"
say "loading $ROUTES routes: $LOADCMD"
ROUTES_LINE=$($LOADCMD) || die 2 "loading the routes failed"
say "$ROUTES_LINE"
n=$(curl -fsS -m 10 -H "Authorization: Bearer $(cat "$MT_TOKEN_FILE")" "$MT_ADMIN/v1/routes" |
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(len(d["items"]))') ||
    die 2 "cannot list the routes"
[ "$n" = "$ROUTES" ] || die 2 "the admin API lists $n routes, expected $ROUTES"
LOADED="0 $((ROUTES / 3)) $((2 * ROUTES / 3)) $((ROUTES - 1))"
urls=()
for i in $LOADED; do
    expect_get "$DATA/r/$i" 200 $'ok\n'
    urls+=(--url "$DATA/r/$i")
done
[ "$(curl -sS -m 5 -o /dev/null -w '%{http_code}' "$DATA/n/0")" = 404 ] || die 2 "/n/0 must be 404 before the churn"

TOTAL=$((3 * WINDOW + 8))            # 3 windows + cleanup + margins
STEADY="taskset -c 1 $GWLOAD_BIN --cpu 1 steady ${urls[*]} --rate $RATE --duration ${TOTAL}s --timeout 2s --records $RESULTS_DIR/records.csv"
CHURN="taskset -c 1 $GWLOAD_BIN --cpu 1 churn --admin $MT_ADMIN --token-file $MT_TOKEN_FILE --data $DATA --upstream backends --existing $ROUTES --rate $CHANGES --before ${WINDOW}s --duration ${WINDOW}s --after ${WINDOW}s --out $RESULTS_DIR"
say "load:  $STEADY"
say "churn: $CHURN"
# Machine sampler: once a second, the CPU ticks of the whole machine and of our own
# processes, so that every window can say how much the rest of the machine (other
# engineers' builds) took: other % = (busy - ours) / all, in % of both CPUs.
ticks_of() {  # pids -> utime+stime summed (0 for gone)
    local p line f t=0
    for p in "$@"; do
        { read -r line <"/proc/$p/stat"; } 2>/dev/null || continue
        read -r -a f <<<"${line##*) }"; t=$(( t + f[11] + f[12] ))
    done
    echo "$t"
}
sampler() {  # pids... ; one line per second: epoch_us total busy ours
    local cpu u n sy id io irq sirq st rest
    while :; do
        read -r cpu u n sy id io irq sirq st rest </proc/stat
        echo "${EPOCHREALTIME/./} $(( u + n + sy + id + io + irq + sirq + st )) $(( u + n + sy + irq + sirq )) $(ticks_of "$@")"
        sleep 1
    done
}
$STEADY 2>"$RESULTS_DIR/load.log" &
LOAD_PID=$!; track "$LOAD_PID"
sleep 3                               # warm-up (not in any window)
$CHURN &
CHURN_PID=$!; track "$CHURN_PID"
# shellcheck disable=SC2086
sampler "$MT_PID" "$(node_process "$MT_PID")" $BACKEND_PIDS "$LOAD_PID" "$CHURN_PID" >"$RESULTS_DIR/machine.txt" &
SAMPLER_PID=$!; track "$SAMPLER_PID"
churn_rc=0; wait "$CHURN_PID" || churn_rc=$?; untrack "$CHURN_PID"
load_rc=0; wait "$LOAD_PID" || load_rc=$?; untrack "$LOAD_PID"
kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; untrack "$SAMPLER_PID"
cat "$RESULTS_DIR/load.log" >&2
[ "$load_rc" = 0 ] || die 2 "load generator failed (rc $load_rc)"
[ "$churn_rc" = 0 ] || die 1 "the churn driver failed (rc $churn_rc)"

read -r _ q0 q1 <<<"$(grep '^quiet_before' "$RESULTS_DIR/phases.txt")"
read -r _ c0 c1 <<<"$(grep '^churn' "$RESULTS_DIR/phases.txt")"
read -r _ a0 a1 <<<"$(grep '^quiet_after' "$RESULTS_DIR/phases.txt")"
STATS=$(python3 "$HERE/lib/gwstats.py" "$RESULTS_DIR/records.csv" \
    "quiet_before:$q0:$q1" "churn:$c0:$c1" "quiet_after:$a0:$a1")
{
    echo "# churn $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD)"
    echo "# ROUTES=$ROUTES RATE=$RATE CHANGES=$CHANGES WINDOW=$WINDOW bench/churn.sh"
    echo "# $ROUTES_LINE"
    printf '%s\n' "$STATS"
    for w in "quiet_before $q0 $q1" "churn $c0 $c1" "quiet_after $a0 $a1"; do
        awk -v w="$w" 'BEGIN { split(w, x, " ") }
            $1 >= x[2] && $1 <= x[3] { if (!n++) { t0 = $2; b0 = $3; o0 = $4 } t1 = $2; b1 = $3; o1 = $4 }
            END { t = t1 - t0; if (t <= 0) { printf "# %s: no machine samples\n", x[1]; exit }
                  printf "# %s: rest of the machine used %.1f%% of both CPUs; our processes %.1f%%\n",
                         x[1], 100 * ((b1 - b0) - (o1 - o0)) / t, 100 * (o1 - o0) / t }' "$RESULTS_DIR/machine.txt"
    done
    awk -F'\t' '$1 == "quiet_before" { qb = $9 } $1 == "churn" { c = $9 } $1 == "quiet_after" { qa = $9 }
        END { printf "# p99 rise: churn vs quiet_before %+.1f%%, vs quiet_after %+.1f%%\n",
              100 * (c / qb - 1), 100 * (c / qa - 1) }' <<<"$STATS"
    sed 's/^/# /' "$RESULTS_DIR/churn.txt"
} | tee "$RESULTS_DIR/report.txt"
failed=$(awk -F'\t' 'NR > 1 { f += $3 } END { print f + 0 }' <<<"$STATS")
[ "$failed" = 0 ] || die 1 "$failed load request(s) failed (see $RESULTS_DIR/load.log)"
