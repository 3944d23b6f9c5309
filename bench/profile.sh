#!/usr/bin/env bash
# Profiles the pinned Moontide server (or the OpenResty anchor) under the same wrk load
# as bench/run.sh and prints where the server's CPU time goes (bench/lib/phases.py).
#
#   bench/profile.sh hello              # Moontide, /fn/hello
#   bench/profile.sh json
#   SERVER=openresty bench/profile.sh json   # the anchor's nginx worker, for comparison
#
# Knobs: SECONDS_PROFILED=5 (perf record window, inside an 8 s wrk run after a 2 s
# warm-up), FREQ=2999 (samples/s), MOONTIDE_BIN, ANCHOR_DIR, MT_PORT, MT_ADMIN_PORT,
# KEEP=1 keeps perf.data under bench/results/ (gitignored as *.raw: perf-<server>-<ep>.raw).
# Needs linux-perf (apt-get install linux-perf) and python3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
EP=${1:?usage: bench/profile.sh hello|json}
SERVER=${SERVER:-moontide}
ANCHOR_DIR=${ANCHOR_DIR:-$REPO/../shared/anchors/openresty}
MT_PORT=${MT_PORT:-18090}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18091}
SECONDS_PROFILED=${SECONDS_PROFILED:-5}
FREQ=${FREQ:-2999}
BIN=${MOONTIDE_BIN:-$REPO/target/release/moontide}
HOST=127.0.0.1

die() { echo "profile: ERROR: $*" >&2; exit 2; }
for bin in perf wrk taskset python3 curl ss; do
    command -v "$bin" >/dev/null 2>&1 || die "missing $bin (apt-get install linux-perf wrk curl)"
done
case $EP in hello|json) ;; *) die "endpoint must be hello or json";; esac
[ "$SERVER" = openresty ] || [ -x "$BIN" ] || die "no binary at $BIN (cargo build --release, or MOONTIDE_BIN)"

PID=""; DIR=""; WRK_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$WRK_PID" ] && kill "$WRK_PID" 2>/dev/null || true
    if [ -n "$PID" ]; then
        if [ "$SERVER" = openresty ]; then kill -QUIT "$PID" 2>/dev/null || true
        else kill -TERM "$PID" 2>/dev/null || true; fi
        for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    [ -n "$DIR" ] && rm -rf -- "$DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-profile.XXXXXX")
chmod 755 "$DIR"
if [ "$SERVER" = openresty ]; then
    for p in 18080 18081 18082; do ss -Hltn "sport = :$p" | grep -q . && die "port $p in use"; done
    mkdir -p "$DIR/logs" "$DIR/tmp"
    taskset -c 0 nginx -p "$DIR" -c "$ANCHOR_DIR/nginx.conf" -e "$DIR/logs/error.log" \
        -g "worker_processes 1;" >"$DIR/stdout.log" 2>&1 &
    PID=$!
    URL="http://$HOST:18080/$EP"
    for _ in $(seq 100); do curl -fsS -o /dev/null "$URL" 2>/dev/null && break; sleep 0.1; done
    TARGET_PIDS="$PID,$(ps -o pid= --ppid "$PID" | tr -d ' ' | paste -sd,)"
else
    for p in "$MT_PORT" "$MT_ADMIN_PORT"; do ss -Hltn "sport = :$p" | grep -q . && die "port $p in use"; done
    taskset -c 0 "$BIN" serve --data-dir "$DIR/data" --listen "$HOST:$MT_PORT" \
        --admin "$HOST:$MT_ADMIN_PORT" --workers 1 >"$DIR/stdout.log" 2>"$DIR/stderr.log" &
    PID=$!
    for _ in $(seq 200); do grep -q 'admin API listening' "$DIR/stdout.log" 2>/dev/null && break; sleep 0.05; done
    MOONTIDE_ADMIN="http://$HOST:$MT_ADMIN_PORT" MOONTIDE_TOKEN=$(cat "$DIR/data/admin.token") \
        "$BIN" deploy "$EP" "$HERE/functions/$EP.lua" >/dev/null
    URL="http://$HOST:$MT_PORT/fn/$EP"
    # shellcheck source=lib/supervised.sh
    . "$HERE/lib/supervised.sh"
    TARGET_PIDS=$(node_process "$PID")   # the node process under the supervisor
fi
SCRIPT=()
[ "$EP" = json ] && SCRIPT=(-s "$ANCHOR_DIR/json.lua")
taskset -c 1 wrk -t1 -c64 -d2s "${SCRIPT[@]}" "$URL" >/dev/null              # warm-up
taskset -c 1 wrk -t1 -c64 -d$(( SECONDS_PROFILED + 3 ))s --latency "${SCRIPT[@]}" "$URL" \
    >"$DIR/wrk.txt" &
WRK_PID=$!
sleep 1
echo "profile: perf record -F $FREQ -g --call-graph dwarf -p $TARGET_PIDS ($SERVER $EP, ${SECONDS_PROFILED}s)" >&2
taskset -c 1 perf record -q -F "$FREQ" -e cpu-clock -g --call-graph dwarf,16384 \
    -p "$TARGET_PIDS" -o "$DIR/perf.data" -- sleep "$SECONDS_PROFILED" >/dev/null 2>&1
wait "$WRK_PID"; WRK_PID=""
grep -E 'Requests/sec|^ +(50|99)%' "$DIR/wrk.txt" | sed 's/^/profile: wrk (under perf): /' >&2
if [ "${KEEP:-0}" = 1 ]; then
    mkdir -p "$HERE/results"
    cp "$DIR/perf.data" "$HERE/results/perf-$SERVER-$EP.raw"
    echo "profile: kept $HERE/results/perf-$SERVER-$EP.raw (perf report -i ...)" >&2
fi
perf script -i "$DIR/perf.data" -F comm,tid,ip,sym,dso --no-inline 2>/dev/null | python3 "$HERE/lib/phases.py"
