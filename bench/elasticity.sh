#!/usr/bin/env bash
# Elasticity benchmark: how Moontide's instance count follows a load that changes, and
# what the clients see meanwhile. The load tool is bench/loadgen (moontide-load).
#
#   bench/elasticity.sh                          # step, burst, sine: ~2 minutes after the build
#   PATTERNS=step STEP_PEAK=3000 bench/elasticity.sh
#   MOONTIDE_BIN=/path/to/moontide LOAD_BIN=/path/to/moontide-load bench/elasticity.sh
#
# For every pattern in PATTERNS:
#
#   - a fresh node: `moontide serve --workers 1` pinned to CPU 0 (so each pattern starts
#     with no instance at all), on MT_PORT / MT_ADMIN_PORT;
#   - deploy bench/functions/sleep20.lua as `sleep20` (each call sleeps 20 ms, answers
#     200 "ok") with config {"max": MAX_INSTANCES, "idle_timeout": IDLE_TIMEOUT} (the
#     scaling policy's other knobs keep their defaults);
#   - moontide-load pinned to CPU 1: open-loop GET load on /fn/sleep20 following the
#     pattern, the node's /metrics scraped every 100 ms;
#   - the node is stopped.
#
# Output, per pattern, in RESULTS_DIR/elasticity/<pattern>/: timeline.csv (one row per
# 100 ms), summary.json, summary.txt, timeline.svg, run.txt (command, machine, versions,
# load average before and after) and server.log; the plot is copied to RESULTS_DIR/elasticity-<pattern>.svg. The human
# summaries go to stdout, progress to stderr.
#
# Knobs (environment):
#   PATTERNS="step burst sine"     any of: step burst sine ramp constant
#   STEP_BASE=500 STEP_PEAK=5000 STEP_BEFORE=10s STEP_DURING=10s STEP_AFTER=10s
#   BURST_PEAK=2000 BURST_IDLE_BEFORE=3s BURST_DURING=5s BURST_IDLE_AFTER=15s
#   SINE_BASE=300 SINE_PEAK=3000 SINE_PERIOD=20s SINE_DURATION=40s
#   RAMP_BASE=100 RAMP_PEAK=3000 RAMP_DURATION=30s
#   CONSTANT_RATE=1000 CONSTANT_DURATION=10s
#   MAX_INSTANCES=500    the function's `max`
#   IDLE_TIMEOUT=5s      the function's idle grace (the default 60 s outlasts the runs)
#   EXTRA_CONFIG='{}'    more config fields as JSON, e.g. '{"stable_window": "2s"}'
#   TIMEOUT=5s           per-request timeout of the load tool (a timeout is an error)
#   TAIL=5s              keep watching the node this long after the load's end
#   MAX_CONNECTIONS=2000 the load tool's connection cap
#   MOONTIDE_BIN= LOAD_BIN=   use these binaries instead of `cargo build --release`
#   MT_PORT=18290 MT_ADMIN_PORT=18291   the node's ports
#   RESULTS_DIR=         default bench/results
#
# Exit status: 0 ok (failed requests are reported in the summaries, not by the status);
# 2 setup failed (missing tool, port taken, build or deploy failed, node did not start,
# no request succeeded).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

PATTERNS=${PATTERNS:-"step burst sine"}
STEP_BASE=${STEP_BASE:-500}; STEP_PEAK=${STEP_PEAK:-5000}
STEP_BEFORE=${STEP_BEFORE:-10s}; STEP_DURING=${STEP_DURING:-10s}; STEP_AFTER=${STEP_AFTER:-10s}
BURST_PEAK=${BURST_PEAK:-2000}; BURST_IDLE_BEFORE=${BURST_IDLE_BEFORE:-3s}
BURST_DURING=${BURST_DURING:-5s}; BURST_IDLE_AFTER=${BURST_IDLE_AFTER:-15s}
SINE_BASE=${SINE_BASE:-300}; SINE_PEAK=${SINE_PEAK:-3000}
SINE_PERIOD=${SINE_PERIOD:-20s}; SINE_DURATION=${SINE_DURATION:-40s}
RAMP_BASE=${RAMP_BASE:-100}; RAMP_PEAK=${RAMP_PEAK:-3000}; RAMP_DURATION=${RAMP_DURATION:-30s}
CONSTANT_RATE=${CONSTANT_RATE:-1000}; CONSTANT_DURATION=${CONSTANT_DURATION:-10s}
MAX_INSTANCES=${MAX_INSTANCES:-500}
IDLE_TIMEOUT=${IDLE_TIMEOUT:-5s}
EXTRA_CONFIG=${EXTRA_CONFIG:-'{}'}
TIMEOUT=${TIMEOUT:-5s}
TAIL=${TAIL:-5s}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-2000}
MT_PORT=${MT_PORT:-18290}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18291}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}

HOST=127.0.0.1
FUNCTION=sleep20
FUNCTION_FILE=$HERE/functions/$FUNCTION.lua

say() { echo "elasticity: $*" >&2; }
die() { local code=$1; shift; echo "elasticity: ERROR: $*" >&2; exit "$code"; }

# --- prerequisites -------------------------------------------------------------------
missing=()
for bin in curl jq taskset ss; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
[ ${#missing[@]} -eq 0 ] ||
    die 2 "missing: ${missing[*]}. Install with:  apt-get install -y curl jq util-linux iproute2"
[ -f "$FUNCTION_FILE" ] || die 2 "$FUNCTION_FILE is missing"
[ "$(nproc)" -ge 2 ] || die 2 "needs >= 2 CPUs (node on CPU 0, load on CPU 1)"
for p in $PATTERNS; do
    case $p in step|burst|sine|ramp|constant) ;; *) die 2 "unknown pattern '$p'";; esac
done
# The load tool may hold MAX_CONNECTIONS sockets, and the node as many again.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(( $(ulimit -n) > MAX_CONNECTIONS + 100 )) ||
    say "WARN open-file limit $(ulimit -n) is below MAX_CONNECTIONS=$MAX_CONNECTIONS (+100)"

if [ -n "${MOONTIDE_BIN:-}" ] || [ -n "${LOAD_BIN:-}" ]; then
    [ -n "${MOONTIDE_BIN:-}" ] && [ -n "${LOAD_BIN:-}" ] || die 2 "set both MOONTIDE_BIN and LOAD_BIN"
    [ -x "$MOONTIDE_BIN" ] || die 2 "MOONTIDE_BIN=$MOONTIDE_BIN is not an executable"
    [ -x "$LOAD_BIN" ] || die 2 "LOAD_BIN=$LOAD_BIN is not an executable"
    BIN=$MOONTIDE_BIN
else
    command -v cargo >/dev/null 2>&1 || die 2 "cargo not found; install Rust or set MOONTIDE_BIN and LOAD_BIN"
    say "building (cargo build --release -p moontide -p moontide-load) ..."
    (cd "$REPO" && cargo build --release -p moontide -p moontide-load >&2) || die 2 "cargo build failed"
    TARGET=${CARGO_TARGET_DIR:-$REPO/target}
    BIN=$TARGET/release/moontide
    LOAD_BIN=$TARGET/release/moontide-load
fi

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
for port in $MT_PORT $MT_ADMIN_PORT; do
    port_busy "$port" && die 2 "port $HOST:$port is already in use (set MT_PORT / MT_ADMIN_PORT)"
done

# --- the node; everything we start is stopped by its pid ---------------------------------
SERVER_PID=""
SERVER_DIR=""

alive() {  # pid is running (not a zombie)
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local i
    if alive "$SERVER_PID"; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for i in $(seq 100); do alive "$SERVER_PID" || break; sleep 0.1; done
    fi
    if alive "$SERVER_PID"; then
        say "moontide (pid $SERVER_PID) did not stop in 10 s; killing it"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    if [ -n "$SERVER_DIR" ] && [ -d "$SERVER_DIR" ]; then rm -rf -- "$SERVER_DIR"; fi
    SERVER_DIR=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$SERVER_PID" ] && [ "$rc" != 0 ] && [ -n "$SERVER_DIR" ]; then
        for f in "$SERVER_DIR"/stdout.log "$SERVER_DIR"/stderr.log; do
            [ -s "$f" ] && { echo "# moontide ${f##*/} (last 20 lines):" >&2; tail -n 20 "$f" | sed 's/^/#   /' >&2; }
        done
    fi
    stop_server
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_server() {
    SERVER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-elasticity.XXXXXX")
    taskset -c 0 "$BIN" serve --data-dir "$SERVER_DIR/data" \
        --listen "$HOST:$MT_PORT" --admin "$HOST:$MT_ADMIN_PORT" --workers 1 --metrics-public \
        >"$SERVER_DIR/stdout.log" 2>"$SERVER_DIR/stderr.log" &
    SERVER_PID=$!
    local i ready=0
    for i in $(seq 200); do
        alive "$SERVER_PID" || die 2 "moontide exited during startup"
        if grep -q "moontide: data plane listening on http://$HOST:$MT_PORT" "$SERVER_DIR/stdout.log" 2>/dev/null &&
           grep -q "moontide: admin API listening on http://$HOST:$MT_ADMIN_PORT" "$SERVER_DIR/stdout.log" 2>/dev/null; then
            ready=1; break
        fi
        sleep 0.05
    done
    [ "$ready" = 1 ] || die 2 "moontide not ready after 10 s"
    local token body code
    token=$(cat "$SERVER_DIR/data/admin.token") || die 2 "no admin token in $SERVER_DIR/data"
    body=$(jq -n --rawfile src "$FUNCTION_FILE" --argjson max "$MAX_INSTANCES" \
        --arg idle "$IDLE_TIMEOUT" --argjson extra "$EXTRA_CONFIG" \
        '{source: $src, config: ({max: $max, idle_timeout: $idle} + $extra)}')
    code=$(curl -sS -o "$SERVER_DIR/deploy.json" -w '%{http_code}' -m 10 -X PUT \
        -H "Authorization: Bearer $token" -H 'content-type: application/json' \
        --data-binary "$body" "http://$HOST:$MT_ADMIN_PORT/v1/functions/$FUNCTION") ||
        die 2 "deploy request failed"
    [[ $code == 2* ]] || die 2 "deploy of $FUNCTION answered $code: $(cat "$SERVER_DIR/deploy.json")"
}

busy_machine_warning() {  # the node and the load each want a whole core of the two
    local one
    read -r one _ </proc/loadavg
    awk -v l="$one" 'BEGIN { exit !(l > 1.0) }' &&
        say "WARN load average $one before the run: other processes share the CPUs, expect noise"
    return 0
}

knobs_of() {  # pattern -> the load tool's knob arguments
    case $1 in
        step) echo "--base $STEP_BASE --peak $STEP_PEAK --before $STEP_BEFORE --during $STEP_DURING --after $STEP_AFTER" ;;
        burst) echo "--peak $BURST_PEAK --idle-before $BURST_IDLE_BEFORE --during $BURST_DURING --idle-after $BURST_IDLE_AFTER" ;;
        sine) echo "--base $SINE_BASE --peak $SINE_PEAK --period $SINE_PERIOD --duration $SINE_DURATION" ;;
        ramp) echo "--base $RAMP_BASE --peak $RAMP_PEAK --duration $RAMP_DURATION" ;;
        constant) echo "--rate $CONSTANT_RATE --duration $CONSTANT_DURATION" ;;
    esac
}

# --- machine and versions ---------------------------------------------------------------
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MACHINE="nproc=$(nproc), \"$CPU_MODEL\", Linux $(uname -r)"
MT_VER=$("$BIN" --version 2>/dev/null || echo '?')
GIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')
GIT_DIRTY=$(cd "$REPO" && { git diff --quiet HEAD -- crates bench/loadgen Cargo.toml Cargo.lock 2>/dev/null || echo " (+ uncommitted changes)"; })
say "machine: $MACHINE"
say "versions: $MT_VER, git $GIT$GIT_DIRTY; binaries $BIN, $LOAD_BIN"

# --- the runs ----------------------------------------------------------------------------
mkdir -p "$RESULTS_DIR/elasticity"
for pattern in $PATTERNS; do
    out=$RESULTS_DIR/elasticity/$pattern
    rm -rf -- "$out"
    mkdir -p "$out"
    say "$pattern: starting a fresh node"
    start_server
    # shellcheck disable=SC2046  # the knobs are words
    cmd=(taskset -c 1 "$LOAD_BIN" --cpu 1
        --url "http://$HOST:$MT_PORT/fn/$FUNCTION"
        --metrics "http://$HOST:$MT_ADMIN_PORT/metrics"
        --function "$FUNCTION" --pattern "$pattern" $(knobs_of "$pattern")
        --timeout "$TIMEOUT" --tail "$TAIL" --max-connections "$MAX_CONNECTIONS"
        --service-time 20ms --target-concurrency 1 --out "$out")
    {
        echo "command: ${cmd[*]}"
        echo "node: taskset -c 0 moontide serve --workers 1; function $FUNCTION (bench/functions/$FUNCTION.lua), config {\"max\": $MAX_INSTANCES, \"idle_timeout\": \"$IDLE_TIMEOUT\"} + $EXTRA_CONFIG"
        echo "machine: $MACHINE"
        echo "versions: $MT_VER, git $GIT$GIT_DIRTY"
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
    } >"$out/run.txt"
    busy_machine_warning
    say "$pattern: ${cmd[*]}"
    "${cmd[@]}" | tee "$out/summary.txt" || die 2 "moontide-load failed for $pattern"
    echo
    echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/run.txt"
    cp "$SERVER_DIR/stdout.log" "$out/server.log"
    cat "$SERVER_DIR/stderr.log" >>"$out/server.log"
    stop_server
    ok=$(jq '.requests.ok' "$out/summary.json")
    [ "$ok" -gt 0 ] || die 2 "$pattern: no request succeeded; see $out/server.log"
    cp "$out/timeline.svg" "$RESULTS_DIR/elasticity-$pattern.svg"
done
say "done: $RESULTS_DIR/elasticity/<pattern>/ and $RESULTS_DIR/elasticity-<pattern>.svg"
