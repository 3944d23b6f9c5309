#!/usr/bin/env bash
# Crash containment: does a neighbour keep its service while a tenant crashes the node's
# VM over and over? (issue 13 §1: target >= 99 % of the neighbour's requests successful)
#
#   bench/crash_containment.sh                 # DURATION=20s per scenario, ~2 min after the build
#   DURATION=30s bench/crash_containment.sh
#   MOONTIDE_BIN=target/release/moontide bench/crash_containment.sh
#
# One supervised Moontide node (`serve --workers 1`, pinned to CPU 0; load on CPU 1), with
# the built-in guards turned off (MOONTIDE_UNSAFE_DISABLE_BUILTIN_GUARDS=1) so that the
# `table.move` reproduction of luau#2970 (tests/hostile/vm_crash/) really crashes the VM.
# Three scenarios, each DURATION long, on a fresh node:
#
#   solo       wrk -t1 -c16 on /fn/hello (the neighbour), nobody attacks
#   repeat     the same, while the attacker calls /fn/crasher every 50 ms: the version
#              crashes the node twice, then it is quarantined (503 function_quarantined)
#   redeploy   the same, but each time the crasher is quarantined the attacker deploys it
#              again (a new version: two more crashes each time) — the worst case for a
#              holder of the admin token
#
# Reports per scenario the neighbour's requests, failures (non-2xx + socket errors, as
# wrk counts them), success rate and requests/s, the node restarts, and the time from a
# crash until the data plane answered again (crash-to-serve). Output: stdout and
# bench/results/crash_containment.md; raw wrk outputs in bench/results/*.raw.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
DURATION=${DURATION:-20s}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}
MT_PORT=${MT_PORT:-18190}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18191}
HOST=127.0.0.1
CRASHER="$REPO/tests/hostile/vm_crash/table_move_int_min.lua"

say() { echo "crash_containment: $*" >&2; }
die() { echo "crash_containment: ERROR: $*" >&2; exit 2; }

for bin in wrk curl taskset awk; do
    command -v "$bin" >/dev/null 2>&1 || die "missing $bin (apt-get install -y wrk curl util-linux gawk)"
done
[ "$(nproc)" -ge 2 ] || die "needs >= 2 CPUs (server on CPU 0, load on CPU 1)"
secs=${DURATION%s}
[[ $secs =~ ^[0-9]+$ ]] || die "DURATION must be whole seconds, like 20s"

if [ -n "${MOONTIDE_BIN:-}" ]; then
    BIN=$(cd "$(dirname "$MOONTIDE_BIN")" && pwd)/$(basename "$MOONTIDE_BIN")
else
    say "building moontide ..."
    (cd "$REPO" && cargo build --release --locked -p moontide >&2)
    BIN=$REPO/target/release/moontide
fi
mkdir -p "$RESULTS_DIR"

DIR=""
SERVER_PID=""
ATTACKER_PID=""
stop_node() {
    [ -n "$ATTACKER_PID" ] && { kill "$ATTACKER_PID" 2>/dev/null || true; wait "$ATTACKER_PID" 2>/dev/null || true; }
    ATTACKER_PID=""
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
    [ -n "$DIR" ] && rm -rf -- "$DIR"
    DIR=""
}
trap stop_node EXIT

BASE="http://$HOST:$MT_PORT"
mt() { taskset -c 1 "$BIN" "$@" >/dev/null; }

start_node() {
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-crash.XXXXXX")
    MOONTIDE_UNSAFE_DISABLE_BUILTIN_GUARDS=1 taskset -c 0 "$BIN" serve --data-dir "$DIR/data" \
        --listen "$HOST:$MT_PORT" --admin "$HOST:$MT_ADMIN_PORT" --workers 1 \
        >"$DIR/stdout.log" 2>"$DIR/stderr.log" &
    SERVER_PID=$!
    for _ in $(seq 200); do
        grep -q 'admin API listening' "$DIR/stdout.log" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || die "moontide exited during startup"
        sleep 0.05
    done
    export MOONTIDE_ADMIN="http://$HOST:$MT_ADMIN_PORT"
    MOONTIDE_TOKEN=$(cat "$DIR/data/admin.token")
    export MOONTIDE_TOKEN
    mt deploy hello "$HERE/functions/hello.lua"
    mt deploy crasher "$CRASHER"
    [ "$(curl -fsS "$BASE/fn/hello")" = "Hello, World!" ] || die "hello does not answer"
}

now_ms() { date +%s%3N; }

# The attacker: calls the crasher every 50 ms; after a call that got no answer (the node
# died under it) it times how long until the data plane answers again. With `redeploy`,
# a quarantined crasher is deployed again.
attack() {
    local mode=$1 until=$2 out=$3 code started
    : >"$out"
    while [ "$(now_ms)" -lt "$until" ]; do
        code=$(taskset -c 1 curl -s -o /dev/null -w '%{http_code}' -m 5 "$BASE/fn/crasher" || true)
        if [ "$code" = "000" ]; then
            started=$(now_ms)
            until taskset -c 1 curl -fs -o /dev/null -m 1 "$BASE/readyz"; do sleep 0.001; done
            echo "crash $(( $(now_ms) - started ))" >>"$out"
        elif [ "$code" = "503" ] && [ "$mode" = redeploy ]; then
            # A new version each time: append a comment so the source differs.
            { cat "$CRASHER"; echo "-- $(now_ms)"; } >"$DIR/crasher.lua"
            mt deploy crasher "$DIR/crasher.lua" || true
            echo "redeploy" >>"$out"
        fi
        sleep 0.05
    done
}

metric() { curl -fsS -H "authorization: Bearer $MOONTIDE_TOKEN" "$MOONTIDE_ADMIN/metrics" |
    awk -v name="$1" '$1 == name { print $2 }'; }

declare -a ROWS
for scenario in solo repeat redeploy; do
    say "scenario $scenario ($DURATION)"
    start_node
    raw="$RESULTS_DIR/crash_containment-$scenario.raw"
    taskset -c 1 wrk -t1 -c16 -d1s "$BASE/fn/hello" >/dev/null   # warm-up
    attack_log="$DIR/attack.log"
    : >"$attack_log"
    if [ "$scenario" != solo ]; then
        attack "$scenario" $(( $(now_ms) + secs * 1000 )) "$attack_log" &
        ATTACKER_PID=$!
    fi
    taskset -c 1 wrk -t1 -c16 -d"$DURATION" --timeout 5s --latency "$BASE/fn/hello" >"$raw"
    [ -n "$ATTACKER_PID" ] && { wait "$ATTACKER_PID" || true; ATTACKER_PID=""; }
    read -r rps _p50 p99 requests errors < <(awk -f "$HERE/lib/wrk_parse.awk" "$raw")
    restarts=$(metric moontide_node_restarts_total || echo "?")
    crashes=$(grep -c '^crash' "$attack_log" || true)
    redeploys=$(grep -c '^redeploy' "$attack_log" || true)
    recover=$(awk '/^crash/ { print $2 }' "$attack_log" | sort -n |
        awk '{ v[++n] = $1 } END { if (!n) { print "-"; exit } printf "%d / %d", v[int((n + 1) / 2)], v[n] }')
    rate=$(awk -v r="$requests" -v e="$errors" 'BEGIN { printf "%.3f", 100 * (r - e) / (r + e) }')
    ROWS+=("| $scenario | $requests | $errors | $rate % | $rps | $p99 | $restarts | $crashes | $redeploys | $recover |")
    stop_node
done

{
    echo "# crash containment — $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)"
    echo
    echo "Neighbour \`hello\` under wrk -t1 -c16 for $DURATION (node pinned to CPU 0, \`--workers 1\`;"
    echo "load on CPU 1) while an attacker calls a function that crashes the VM every 50 ms."
    echo
    echo "| scenario | neighbour requests | failed | success | req/s | p99 ms | node restarts | crashes seen | redeploys | crash-to-serve ms (median / max) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$RESULTS_DIR/crash_containment.md"
