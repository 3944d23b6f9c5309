#!/usr/bin/env bash
# Moontide vs. the OpenResty anchor, side by side, on the anchor's `hello` and `json`
# endpoints and its gateway endpoints `proxy` and `balancer`. See BENCHMARKS.md for what
# is measured and why this way.
#
#   bench/run.sh                       # RUNS=3: ~3 minutes after the build
#   RUNS=5 DURATION=20s bench/run.sh
#   MOONTIDE_BIN=/path/to/moontide bench/run.sh      # skip the cargo build
#
# For every run r = 1..RUNS and every endpoint, it starts Moontide, measures, stops it,
# then starts OpenResty, measures, stops it (A B A B ..., a fresh server for every
# measurement, so slow drift of the host hits both servers alike). One measurement:
#
#   - server (all its processes and threads) pinned to CPU 0, wrk pinned to CPU 1;
#     Moontide `serve --workers 1`, nginx `worker_processes 1` (+ its master);
#   - smoke check of both endpoints' answers (refuses to measure a wrong answer);
#   - wait (up to QUIET_WAIT s) until the rest of the machine is quiet;
#   - WARMUP of untimed wrk load, then `wrk -t1 -c64 -dDURATION --latency`;
#   - server CPU = utime+stime from /proc/PID/stat (nginx: master + worker; Moontide:
#     the supervisor + the node process it runs; #     the one process, i.e. all its threads), delta over the measured wrk run,
#     divided by the requests wrk completed -> µs of server CPU per request.
#
# Output: progress on stderr; the summary (markdown) on stdout and in
# bench/results/latest.md; per-run numbers in bench/results/latest.tsv; raw wrk outputs in
# bench/results/<server>-<endpoint>-run<r>.raw (gitignored).
#
# Knobs (environment):
#   RUNS=3          measurements per server per endpoint
#   DURATION=10s    measured wrk run;  WARMUP=2s  untimed wrk run before it (0 = none)
#   THREADS=1 CONNS=64                wrk -t / -c
#   OR_SPLIT=0      1: for the gateway endpoints, OpenResty too gets its backends as that
#                   separate nginx (the anchor's nginx.conf minus its backend server block,
#                   written to the run's temp dir), so both fronts proxy to the very same
#                   backend process; its CPU is added to OpenResty's likewise
#   ENDPOINTS="hello json"   any of: hello json proxy balancer balancer_lc balancer_ewma
#                   proxy:    Moontide route /proxy -> upstream "backends" (round_robin) vs
#                             nginx proxy_pass (upstream, keepalive 64), anchor /proxy
#                   balancer: Moontide route /balancer -> upstream "rr" (its built-in
#                             round_robin balancer; Moontide has no Lua balancer hook) vs
#                             the anchor's balancer_by_lua_block round robin, /balancer
#                   balancer_lc, balancer_ewma: the same with Moontide's least_conn /
#                             ewma balancer, still against the anchor's /balancer
#                   For the gateway endpoints Moontide gets the anchor's two backends as a
#                   separate nginx (bench/lib/backends.sh: the anchor's backend server
#                   block alone, master + 1 worker) pinned to CPU 0 with Moontide; its
#                   CPU is added to Moontide's (in the anchor they run inside the one
#                   nginx worker, so their CPU is in OpenResty's figure already).
#   MOONTIDE_BIN=   use this binary instead of `cargo build --release` + target/release
#   ANCHOR_DIR=     the OpenResty anchor (default: <repo>/../shared/anchors/openresty)
#   MT_PORT=18090 MT_ADMIN_PORT=18091 Moontide's ports (OpenResty's are fixed by the
#                   anchor's nginx.conf: 18080, 18081, 18082)
#   OTHER_MAX=5     % of the machine that other processes may use during a run before it
#                   counts as disturbed; QUIET_WAIT=60 s to wait for a quiet machine
#                   before each run; RETRIES=2 re-measurements of a disturbed run
#   RESULTS_DIR=    default bench/results
#   KEEP_GOING=0    1: a run with non-2xx answers or socket errors (e.g. wrk's 2 s timeout)
#                   is recorded and flagged instead of aborting; the exit status is still 1
#
# Exit status: 0 ok; 1 a measurement saw non-2xx answers or socket errors (aborts at
# once unless KEEP_GOING=1); 2 setup failed (missing tool, port taken, server did not start, wrong answer);
# 3 some run stayed disturbed by other load (summary written, but flagged).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-1}
CONNS=${CONNS:-64}
ENDPOINTS=${ENDPOINTS:-"hello json"}
ANCHOR_DIR=${ANCHOR_DIR:-$REPO/../shared/anchors/openresty}
MT_PORT=${MT_PORT:-18090}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18091}
OTHER_MAX=${OTHER_MAX:-5}
QUIET_WAIT=${QUIET_WAIT:-60}
RETRIES=${RETRIES:-2}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}
KEEP_GOING=${KEEP_GOING:-0}
OR_SPLIT=${OR_SPLIT:-0}

HOST=127.0.0.1
OR_PORTS="18080 18081 18082"        # fixed by the anchor's nginx.conf
APT_HINT="apt-get update && apt-get install -y --no-install-recommends nginx libnginx-mod-http-lua lua-cjson wrk curl iproute2 util-linux procps"

say() { echo "bench: $*" >&2; }
die() { local code=$1; shift; echo "bench: ERROR: $*" >&2; exit "$code"; }

# --- prerequisites -------------------------------------------------------------------
missing=()
for bin in wrk nginx curl ss taskset awk ps; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || missing+=("libnginx-mod-http-lua")
[ -f /usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so ] || missing+=("lua-cjson")
if [ ${#missing[@]} -gt 0 ]; then
    die 2 "missing: ${missing[*]}. Install with:  $APT_HINT"
fi
[ -d "$ANCHOR_DIR" ] || die 2 "OpenResty anchor not found at $ANCHOR_DIR (set ANCHOR_DIR)"
ANCHOR_DIR=$(cd "$ANCHOR_DIR" && pwd)
for f in nginx.conf json.lua run.sh README.md; do
    [ -f "$ANCHOR_DIR/$f" ] || die 2 "anchor file $ANCHOR_DIR/$f is missing"
done
for f in hello.lua json.lua; do
    [ -f "$HERE/functions/$f" ] || die 2 "$HERE/functions/$f is missing"
done
for ep in $ENDPOINTS; do
    case $ep in
        hello|json|proxy|balancer|balancer_lc|balancer_ewma) ;;
        *) die 2 "unknown endpoint '$ep' (hello, json, proxy, balancer, balancer_lc, balancer_ewma)";;
    esac
done
NCPU=$(nproc)
[ "$NCPU" -ge 2 ] || die 2 "needs >= 2 CPUs (server on CPU 0, wrk on CPU 1); this box has $NCPU"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die 2 "RUNS must be a positive integer"
HZ=$(getconf CLK_TCK)
is_gateway() { case $1 in proxy|balancer|balancer_lc|balancer_ewma) return 0;; esac; return 1; }
# shellcheck source=lib/backends.sh
. "$HERE/lib/backends.sh"
# shellcheck source=lib/supervised.sh
. "$HERE/lib/supervised.sh"

if [ -n "${MOONTIDE_BIN:-}" ]; then
    BIN=$MOONTIDE_BIN
    [ -x "$BIN" ] || die 2 "MOONTIDE_BIN=$BIN is not an executable"
else
    command -v cargo >/dev/null 2>&1 || die 2 "cargo not found; install Rust or set MOONTIDE_BIN"
    say "building moontide (cargo build --release -p moontide) ..."
    (cd "$REPO" && cargo build --release -p moontide >&2) || die 2 "cargo build failed"
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
for port in $OR_PORTS $MT_PORT $MT_ADMIN_PORT; do
    port_busy "$port" && die 2 "port $HOST:$port is already in use; stop whatever listens there first"
done
ports_free_or_die() {  # ports... : wait up to 5 s for them to be free (our last server)
    local port i
    for port in "$@"; do
        for i in $(seq 50); do port_busy "$port" || break; sleep 0.1; done
        port_busy "$port" && die 2 "port $HOST:$port is taken (by something else?)"
    done
    return 0
}

# --- process bookkeeping; everything we start is stopped by its pid -------------------
SERVER_PID=""       # the server running now (moontide, or nginx master)
SERVER_KIND=""
SERVER_PIDS=""      # processes whose CPU is counted
SERVER_DIR=""       # its temp dir (data dir / nginx prefix)
MT_BACKEND_PID=""   # Moontide's backends (nginx master), for the gateway endpoints
MT_BACKEND_PIDS=""  # its master + worker (counted in SERVER_PIDS too)

alive() {  # pid is running (not a zombie)
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $st != Z* ]]
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    local pid=$SERVER_PID kids k i
    kids=$(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ' || true)
    if alive "$pid"; then
        if [ "$SERVER_KIND" = openresty ]; then kill -QUIT "$pid" 2>/dev/null || true
        else kill -TERM "$pid" 2>/dev/null || true; fi
        for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    fi
    if alive "$pid"; then
        say "$SERVER_KIND (pid $pid) did not stop in 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for k in $kids; do  # leftover nginx workers of OUR master only
        if alive "$k" && [ "$(ps -o comm= -p "$k" 2>/dev/null)" = nginx ]; then
            kill -KILL "$k" 2>/dev/null || true
        fi
    done
    if [ -n "$MT_BACKEND_PID" ]; then stop_backend "$MT_BACKEND_PID"; fi
    if [ -n "$SERVER_DIR" ] && [ -d "$SERVER_DIR" ]; then rm -rf -- "$SERVER_DIR"; fi
    SERVER_PID=""; SERVER_KIND=""; SERVER_PIDS=""; SERVER_DIR=""; MT_NODE_PID=""
    MT_BACKEND_PID=""; MT_BACKEND_PIDS=""
}

show_server_logs() {
    [ -n "$SERVER_DIR" ] && [ -d "$SERVER_DIR" ] || return 0
    local f
    for f in "$SERVER_DIR"/stdout.log "$SERVER_DIR"/stderr.log "$SERVER_DIR"/logs/error.log \
             "$SERVER_DIR"/backends/logs/error.log; do
        if [ -s "$f" ]; then
            echo "# $SERVER_KIND ${f##*/} (last 20 lines):" >&2
            tail -n 20 "$f" | sed 's/^/#   /' >&2
        fi
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$SERVER_PID" ] || [ -n "$MT_BACKEND_PID" ]; then
        if [ "$rc" = 1 ] || [ "$rc" = 2 ]; then show_server_logs; fi
        stop_server
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the two servers -------------------------------------------------------------------
MT_BASE="http://$HOST:$MT_PORT/fn"
OR_BASE="http://$HOST:18080"

start_moontide() {  # endpoint
    ports_free_or_die "$MT_PORT" "$MT_ADMIN_PORT"
    SERVER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-bench.XXXXXX")
    SERVER_KIND=moontide
    if is_gateway "$1"; then
        ports_free_or_die 18081 18082
        start_backend "$SERVER_DIR/backends" on 0 18081 18082 ||
            { MT_BACKEND_PID=$BACKEND_PID; die 2 "the backend nginx for Moontide did not start"; }
        MT_BACKEND_PID=$BACKEND_PID; MT_BACKEND_PIDS=$BACKEND_PIDS
        [ "$(wc -w <<<"$MT_BACKEND_PIDS")" -ge 2 ] || die 2 "the backend nginx has no worker process"
    fi
    taskset -c 0 "$BIN" serve --data-dir "$SERVER_DIR/data" \
        --listen "$HOST:$MT_PORT" --admin "$HOST:$MT_ADMIN_PORT" --workers 1 \
        >"$SERVER_DIR/stdout.log" 2>"$SERVER_DIR/stderr.log" &
    SERVER_PID=$!
    local i ready=0
    for i in $(seq 200); do
        alive "$SERVER_PID" || die 2 "moontide exited during startup"
        if grep -q 'data plane listening' "$SERVER_DIR/stdout.log" 2>/dev/null &&
           grep -q 'admin API listening' "$SERVER_DIR/stdout.log" 2>/dev/null; then
            ready=1; break
        fi
        sleep 0.05
    done
    [ "$ready" = 1 ] || die 2 "moontide not ready after 10 s"
    local token ep
    token=$(cat "$SERVER_DIR/data/admin.token")
    for ep in hello json; do
        MOONTIDE_ADMIN="http://$HOST:$MT_ADMIN_PORT" MOONTIDE_TOKEN="$token" \
            taskset -c 1 "$BIN" deploy "$ep" "$HERE/functions/$ep.lua" >/dev/null ||
            die 2 "moontide deploy $ep failed"
    done
    if is_gateway "$1"; then
        local nodes='[{"address": "127.0.0.1:18081", "weight": 1}, {"address": "127.0.0.1:18082", "weight": 1}]'
        local keep='"keepalive": {"max_idle": 64}'   # nginx: keepalive 64 (also the default)
        mt_admin PUT /v1/upstreams/backends "{\"nodes\": $nodes, \"balancer\": \"round_robin\", $keep}"
        mt_admin PUT /v1/upstreams/rr "{\"nodes\": $nodes, \"balancer\": \"round_robin\", $keep}"
        mt_admin PUT /v1/upstreams/lc "{\"nodes\": $nodes, \"balancer\": \"least_conn\", $keep}"
        mt_admin PUT /v1/upstreams/ewma "{\"nodes\": $nodes, \"balancer\": \"ewma\", $keep}"
        mt_admin PUT /v1/routes/proxy '{"path": "/proxy", "upstream": "backends"}'
        mt_admin PUT /v1/routes/balancer '{"path": "/balancer", "upstream": "rr"}'
        mt_admin PUT /v1/routes/balancer_lc '{"path": "/balancer_lc", "upstream": "lc"}'
        mt_admin PUT /v1/routes/balancer_ewma '{"path": "/balancer_ewma", "upstream": "ewma"}'
    fi
    # The supervisor (idle) and the node process it runs: both counted.
    MT_NODE_PID=$(node_process "$SERVER_PID")
    SERVER_PIDS="$SERVER_PID $MT_NODE_PID $MT_BACKEND_PIDS"
}

mt_admin() {  # method path json: one admin API call; dies unless it answers 2xx
    local out
    out=$(taskset -c 1 curl -sS -m 5 -w '\n%{http_code}' -X "$1" \
        -H "Authorization: Bearer $(cat "$SERVER_DIR/data/admin.token")" \
        -H 'Content-Type: application/json' --data-binary "$3" \
        "http://$HOST:$MT_ADMIN_PORT$2") || die 2 "admin $1 $2 failed: $out"
    [[ ${out##*$'\n'} == 2?? ]] || die 2 "admin $1 $2 answered ${out##*$'\n'}: ${out%$'\n'*}"
}

start_openresty() {  # endpoint
    ports_free_or_die $OR_PORTS
    SERVER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/openresty-bench.XXXXXX")
    SERVER_KIND=openresty
    chmod 755 "$SERVER_DIR"            # as root, the worker runs as 'nobody'
    mkdir -p "$SERVER_DIR/logs" "$SERVER_DIR/tmp"
    local conf=$ANCHOR_DIR/nginx.conf
    if [ "$OR_SPLIT" = 1 ] && is_gateway "$1"; then
        # the anchor minus its backend server block; the backends run apart, as Moontide's
        conf=$SERVER_DIR/nginx-split.conf
        awk '/# --- backends: two ports/ { skip = 1 } /# --- front: the measured endpoints/ { skip = 0 } !skip' \
            "$ANCHOR_DIR/nginx.conf" >"$conf"
        if grep -q 'listen 127.0.0.1:1808[12]' "$conf" || ! grep -q 'listen 127.0.0.1:18080' "$conf"; then
            die 2 "could not cut the backend server block out of the anchor's nginx.conf"
        fi
        start_backend "$SERVER_DIR/backends" on 0 18081 18082 ||
            { MT_BACKEND_PID=$BACKEND_PID; die 2 "the backend nginx for OpenResty did not start"; }
        MT_BACKEND_PID=$BACKEND_PID; MT_BACKEND_PIDS=$BACKEND_PIDS
    fi
    # exactly as the anchor's run.sh starts it (WORKERS=1, PIN=auto)
    taskset -c 0 nginx -p "$SERVER_DIR" -c "$conf" \
        -e "$SERVER_DIR/logs/error.log" -g "worker_processes 1;" \
        >"$SERVER_DIR/stdout.log" 2>&1 &
    SERVER_PID=$!
    local i ready=0
    for i in $(seq 200); do
        alive "$SERVER_PID" || die 2 "nginx exited during startup"
        if curl -fsS -o /dev/null -m 1 "$OR_BASE/hello" 2>/dev/null; then ready=1; break; fi
        sleep 0.05
    done
    [ "$ready" = 1 ] || die 2 "nginx not ready after 10 s"
    SERVER_PIDS="$SERVER_PID $(ps -o pid= --ppid "$SERVER_PID" | tr -d ' ' | tr '\n' ' ')"
    [ "$(wc -w <<<"$SERVER_PIDS")" -ge 2 ] || die 2 "nginx has no worker process"
    SERVER_PIDS="$SERVER_PIDS $MT_BACKEND_PIDS"
}

url_of() {  # server endpoint
    if [ "$1" = moontide ]; then
        if is_gateway "$2"; then echo "http://$HOST:$MT_PORT/$2"; else echo "$MT_BASE/$2"; fi
    else
        case $2 in balancer_*) echo "$OR_BASE/balancer";; *) echo "$OR_BASE/$2";; esac
    fi
}

# The anchor's /json body, taken from its wrk script (the same bytes wrk will POST).
JSON_BODY=$(awk '/^wrk.body/,0' "$ANCHOR_DIR/json.lua" | grep -o "'[^']*'" | tr -d "'" | tr -d '\n')
[ ${#JSON_BODY} -gt 100 ] || die 2 "could not read the JSON body from $ANCHOR_DIR/json.lua"

smoke() {  # server [endpoint]: hello and json (and a gateway endpoint) must answer exactly
          # like the anchor
    local s=$1 got ct gw
    if [ -n "${2:-}" ] && is_gateway "$2"; then
        local i
        for i in 1 2 3 4; do   # twice round both backends
            got=$(curl -sS -m 5 -w ' %{http_code}' "$(url_of "$s" "$2")") ||
                die 2 "smoke check $s $2: request failed"
            [ "$got" = $'ok\n 200' ] || die 2 "smoke check $s $2: expected 200 'ok\\n', got '$got'"
        done
    fi
    expect() {  # what got want
        [ "$2" = "$3" ] || die 2 "smoke check $s $1: expected '$3', got '$2'"
    }
    got=$(curl -fsS -m 5 "$(url_of "$s" hello)") || die 2 "smoke check $s hello: request failed"
    expect hello "$got" 'Hello, World!'
    got=$(curl -fsS -m 5 "$(url_of "$s" hello)?name=Rust") || die 2 "smoke check $s hello?name failed"
    expect 'hello?name=Rust' "$got" 'Hello, Rust!'
    got=$(curl -fsS -m 5 "$(url_of "$s" hello)?name=Ada%20L") || die 2 "smoke check $s hello?name failed"
    expect 'hello?name=Ada%20L' "$got" 'Hello, Ada L!'
    got=$(curl -fsS -m 5 "$(url_of "$s" hello)?name=") || die 2 "smoke check $s hello?name= failed"
    expect 'hello?name=' "$got" 'Hello, World!'
    got=$(curl -fsS -m 5 -D "$SERVER_DIR/json.headers" -X POST -H 'Content-Type: application/json' \
        --data-binary "$JSON_BODY" "$(url_of "$s" json)") || die 2 "smoke check $s json: request failed"
    ct=$(awk 'tolower($1) == "content-type:" { sub(/\r$/, "", $2); print $2 }' "$SERVER_DIR/json.headers")
    expect 'json content-type' "$ct" 'application/json'
    gw=$([ "$s" = moontide ] && echo moontide || echo openresty)
    for want in '"processed":true' "\"gateway\":\"$gw\"" '"id":123456' '"user":"alice@example.com"' \
                '"action":"checkout"' '"sku":"A-100"' '"qty":2' '"price":19.99' '"price":5.5' \
                '"tags":["fast","lua","bench"]' '"ua":"wrk"'; do
        [[ $got == *"$want"* ]] || die 2 "smoke check $s json: '$want' missing in '$got'"
    done
}

# --- CPU accounting (clock ticks, builtins only so that reading forks nothing) ---------
proc_ticks() {  # pid -> utime+stime of the process (all threads), 0 if gone
    local line f
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || { echo 0; return; }
    read -r -a f <<<"${line##*) }"        # f[0] = field 3 (state)
    echo $(( f[11] + f[12] ))
}
children_ticks() {  # cutime+cstime of this shell: grows by wrk's CPU once it was waited for
    local line f
    read -r line <"/proc/$$/stat"
    read -r -a f <<<"${line##*) }"
    echo $(( f[13] + f[14] ))
}
snapshot() {  # -> "wall_us total_ticks busy_ticks steal server_ticks children_ticks"
    local cpu u n sy id io irq sirq st rest srv=0 p
    read -r cpu u n sy id io irq sirq st rest </proc/stat
    for p in $SERVER_PIDS; do srv=$(( srv + $(proc_ticks "$p") )); done
    echo "${EPOCHREALTIME/./} $(( u + n + sy + id + io + irq + sirq + st ))" \
         "$(( u + n + sy + irq + sirq ))" "$st" "$srv" "$(children_ticks)"
}
thread_ticks() {  # per-thread "comm:ticks" of the (moontide) server, for the raw file
    local t line f comm out=""
    for t in /proc/"${MT_NODE_PID:-$SERVER_PID}"/task/*; do
        { read -r line <"$t/stat"; } 2>/dev/null || continue
        comm=${line#*(}; comm=${comm%%)*}
        read -r -a f <<<"${line##*) }"
        out+="${t##*/}:${comm}:$(( f[11] + f[12] )) "
    done
    echo "$out"
}

# "other" = CPU used by everything but the server and wrk, in % of the whole machine.
wait_quiet() {
    local waited=0 a b o
    while :; do
        read -r -a a <<<"$(snapshot)"; sleep 1; read -r -a b <<<"$(snapshot)"
        o=$(awk -v t=$(( b[1] - a[1] )) -v busy=$(( b[2] - a[2] )) -v s=$(( b[4] - a[4] )) \
                'BEGIN { if (t <= 0) t = 1; o = busy - s; if (o < 0) o = 0; printf "%.1f", 100 * o / t }')
        awk -v o="$o" -v l="$OTHER_MAX" 'BEGIN { exit !(o > l) }' || return 0
        (( waited == 0 )) && say "machine busy (other=$o%), waiting up to ${QUIET_WAIT}s"
        waited=$(( waited + 1 ))
        if (( waited >= QUIET_WAIT )); then
            say "WARN still busy (other=$o%) after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
    done
}

# Both backends must carry the load: count the established connections to each backend
# port (client side: the proxy's keep-alive connections; wrk talks to the front only).
backend_conns() {  # -> "n18081 n18082"
    echo "$(ss -Htn state established '( dport = :18081 )' | wc -l)" \
         "$(ss -Htn state established '( dport = :18082 )' | wc -l)"
}

run_wrk() {  # server endpoint duration
    local script=()
    [ "$2" = json ] && script=(-s "$ANCHOR_DIR/json.lua")
    taskset -c 1 wrk -t"$THREADS" -c"$CONNS" -d"$3" --latency "${script[@]}" "$(url_of "$1" "$2")"
}
wrk_cmd() {
    local script=""
    [ "$2" = json ] && script=" -s $ANCHOR_DIR/json.lua"
    echo "taskset -c 1 wrk -t$THREADS -c$CONNS -d$DURATION --latency$script $(url_of "$1" "$2")"
}

# measure server endpoint -> sets OUT (wrk output) and M (the numbers, see TSV header)
measure() {
    local a b th0="" th1=""
    local bt0=0 p
    for p in $MT_BACKEND_PIDS; do bt0=$(( bt0 + $(proc_ticks "$p") )); done
    read -r -a a <<<"$(snapshot)"
    [ "$1" = moontide ] && th0=$(thread_ticks)
    OUT=$(run_wrk "$1" "$2" "$DURATION") || die 1 "wrk failed against $1 $2: $OUT"
    [ "$1" = moontide ] && th1=$(thread_ticks)
    read -r -a b <<<"$(snapshot)"
    BACKEND_TICKS=""
    if [ -n "$MT_BACKEND_PIDS" ]; then
        local p bt=0
        for p in $MT_BACKEND_PIDS; do bt=$(( bt + $(proc_ticks "$p") )); done
        BACKEND_TICKS=$(( bt - bt0 ))
    fi
    BACKEND_CONNS=""
    is_gateway "$2" && BACKEND_CONNS=$(backend_conns)
    PARSED=$(printf '%s\n' "$OUT" | awk -f "$HERE/lib/wrk_parse.awk") ||
        die 1 "cannot parse wrk output against $1 $2:"$'\n'"$OUT"
    local rps p50 p99 reqs err
    read -r rps p50 p99 reqs err <<<"$PARSED"
    ERRORS=$err
    # wall in µs; ticks -> % of one core over the wall time; "other" in % of the machine
    M=$(awk -v wall=$(( b[0] - a[0] )) -v t=$(( b[1] - a[1] )) -v busy=$(( b[2] - a[2] )) \
            -v st=$(( b[3] - a[3] )) -v s=$(( b[4] - a[4] )) -v c=$(( b[5] - a[5] )) \
            -v hz="$HZ" -v reqs="$reqs" 'BEGIN {
        wall_ticks = wall / 1e6 * hz; if (wall_ticks <= 0) wall_ticks = 1; if (t <= 0) t = 1
        other = busy - s - c; if (other < 0) other = 0
        printf "%d %.3f %.1f %.1f %.1f %.1f", s, (reqs > 0 ? s * 1e6 / hz / reqs : 0),
            100 * s / wall_ticks, 100 * c / wall_ticks, 100 * other / t, 100 * st / t }')
    THREADS_LINE=""
    if [ -n "$th0" ]; then
        THREADS_LINE=$(awk -v a="$th0" -v b="$th1" 'BEGIN {
            n = split(a, x, " "); for (i = 1; i <= n; i++) { split(x[i], p, ":"); before[p[1]] = p[3] }
            n = split(b, y, " "); for (i = 1; i <= n; i++) { split(y[i], p, ":")
                printf "%s(%s)=%d ", p[2], p[1], p[3] - before[p[1]] } }')
    fi
}

disturbed_p() {  # other_pct server_pct wrk_pct -> true if others used the machine, or
                 # neither side was saturated (time went somewhere we cannot see)
    awk -v o="$1" -v s="$2" -v w="$3" -v l="$OTHER_MAX" -v t="$THREADS" \
        'BEGIN { exit !(o > l || (s < 90 && w < 90 * t)) }'
}

# --- machine and versions ---------------------------------------------------------------
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
MT_VER=$("$BIN" --version 2>/dev/null || echo '?')
GIT_DIRTY=$(cd "$REPO" && { git diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null && echo "" ||
    echo " + uncommitted changes, diff sha256 $(git diff HEAD -- crates Cargo.toml Cargo.lock | sha256sum | cut -c1-12)"; })
BIN_SHA=$(sha256sum "$BIN" | cut -c1-12)
if [ -n "${MOONTIDE_BIN:-}" ]; then
    BUILD_DESC="MOONTIDE_BIN=$BIN, sha256 $BIN_SHA; tree: git $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
else
    BUILD_DESC="git $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$GIT_DIRTY, binary sha256 $BIN_SHA"
fi
RUSTC=$(rustc -V 2>/dev/null || echo '?')
NGX_VER=$(nginx -v 2>&1 | sed 's/.*nginx\///')
dpkg_ver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo '?'; }
WRK_VER=$(dpkg_ver wrk)
CMD="RUNS=$RUNS DURATION=$DURATION WARMUP=$WARMUP THREADS=$THREADS CONNS=$CONNS ENDPOINTS=\"$ENDPOINTS\"$([ "$OR_SPLIT" = 1 ] && echo " OR_SPLIT=1" || true) bench/run.sh"
MACHINE="nproc=$NCPU, \"$CPU_MODEL\", $MEM RAM, Linux $(uname -r)"
VERSIONS="$MT_VER ($BUILD_DESC; $RUSTC, release profile); nginx $NGX_VER, libnginx-mod-http-lua $(dpkg_ver libnginx-mod-http-lua), libluajit2-5.1-2 $(dpkg_ver libluajit2-5.1-2), lua-cjson $(dpkg_ver lua-cjson); wrk $WRK_VER"
say "machine: $MACHINE"
say "versions: $VERSIONS"
say "command: $CMD"
say "binary: $BIN; anchor: $ANCHOR_DIR"

mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR"/moontide-*-run*.raw "$RESULTS_DIR"/openresty-*-run*.raw
TSV=$RESULTS_DIR/latest.tsv
printf 'server\tendpoint\trun\trps\tp50_ms\tp99_ms\trequests\tcpu_ticks\tcpu_us_per_req\tserver_core_pct\twrk_core_pct\tother_pct\tsteal_pct\tdisturbed\terrors\n' >"$TSV.tmp"

# --- the runs ----------------------------------------------------------------------------
STARTED=$SECONDS
busy=0
failed=""
for ((r = 1; r <= RUNS; r++)); do
    for ep in $ENDPOINTS; do
        for s in moontide openresty; do
            if [ "$s" = moontide ]; then start_moontide "$ep"; else start_openresty "$ep"; fi
            smoke "$s" "$ep"
            attempt=0
            while :; do
                (( QUIET_WAIT > 0 )) && wait_quiet
                if [ "$attempt" = 0 ] && [ "$WARMUP" != 0 ] && [ "$WARMUP" != 0s ]; then
                    run_wrk "$s" "$ep" "$WARMUP" >/dev/null || die 1 "warm-up wrk failed against $s $ep"
                fi
                measure "$s" "$ep"
                read -r ticks us_req srv_pct wrk_pct other_pct steal_pct <<<"$M"
                dist=0
                disturbed_p "$other_pct" "$srv_pct" "$wrk_pct" && dist=1
                if [ "$dist" = 1 ] && (( attempt < RETRIES )); then
                    attempt=$(( attempt + 1 ))
                    say "run $r $s $ep disturbed (server=$srv_pct% wrk=$wrk_pct% other=$other_pct%); retry $attempt/$RETRIES"
                    continue
                fi
                break
            done
            raw="$RESULTS_DIR/$s-$ep-run$r.raw"
            {
                echo "# $(wrk_cmd "$s" "$ep")   (server pinned to CPU 0; warm-up $WARMUP; attempt $((attempt + 1)))"
                printf '%s\n' "$OUT"
                echo "# server_ticks=$ticks cpu_us_per_req=$us_req server=$srv_pct% wrk=$wrk_pct% other=$other_pct% steal=$steal_pct% (HZ=$HZ)"
                [ -n "$THREADS_LINE" ] && echo "# per-thread ticks: $THREADS_LINE"
                [ -n "$BACKEND_TICKS" ] && echo "# of server_ticks, the backend nginx (master+worker): $BACKEND_TICKS"
                [ -n "$BACKEND_CONNS" ] && echo "# established connections to backends 18081 18082 after the run: $BACKEND_CONNS"
            } >"$raw"
            read -r rps p50 p99 reqs err <<<"$PARSED"
            if [ -n "$BACKEND_CONNS" ]; then
                read -r c1 c2 <<<"$BACKEND_CONNS"
                { [ "$c1" -gt 0 ] && [ "$c2" -gt 0 ]; } ||
                    die 1 "$s $ep run $r: not both backends in use (connections to 18081/18082: $c1/$c2)"
            fi
            if [ "$err" != 0 ]; then
                [ "$KEEP_GOING" = 1 ] ||
                    die 1 "$s $ep run $r: $err non-2xx responses or socket errors (see $raw)"
                show_server_logs
                say "ERROR $s $ep run $r: $err non-2xx responses or socket errors (see $raw); KEEP_GOING=1"
                failed+=" $s/$ep/run$r"
            fi
            stop_server
            printf '%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n' "$s" "$ep" "$r" \
                "$rps" "$p50" "$p99" "$reqs" "$ticks" "$us_req" "$srv_pct" "$wrk_pct" \
                "$other_pct" "$steal_pct" "$dist" "$err" >>"$TSV.tmp"
            printf 'bench: run %d/%d %-9s %-5s %9.0f req/s  p50 %6.3f ms  p99 %7.3f ms  %6.2f µs/req  server %3.0f%%  wrk %3.0f%%  other %4.1f%%%s\n' \
                "$r" "$RUNS" "$s" "$ep" "$rps" "$p50" "$p99" "$us_req" "$srv_pct" "$wrk_pct" \
                "$other_pct" "$([ "$dist" = 1 ] && echo '  DISTURBED' || true)" >&2
            [ "$dist" = 1 ] && busy=1
        done
    done
done
mv "$TSV.tmp" "$TSV"

# --- summary -----------------------------------------------------------------------------
SUMMARY=$RESULTS_DIR/latest.md
VERDICT=$RESULTS_DIR/.verdict.tmp
{
    echo "# Moontide vs. OpenResty anchor — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $MACHINE"
    echo "- versions: $VERSIONS"
    echo "- command: \`$CMD\` ($(( SECONDS - STARTED )) s)"
    echo "- per run: a fresh server pinned to CPU 0 (\`taskset -c 0\`; Moontide \`serve --workers 1\`," \
         "nginx \`worker_processes 1\` + master, the anchor's nginx.conf as is), wrk on CPU 1," \
         "$WARMUP warm-up, then \`wrk -t$THREADS -c$CONNS -d$DURATION --latency\`;" \
         "order Moontide, OpenResty, Moontide, OpenResty, …"
    echo "- server CPU µs/req = Δ(utime+stime) of the server's processes (nginx master+worker;" \
         "Moontide all threads) over the measured run / requests completed;" \
         "core % = the same Δ over wall time; other % = the rest of the machine (% of all CPUs)"
    for ep in $ENDPOINTS; do
        echo "- \`$ep\`: Moontide \`$(wrk_cmd moontide "$ep")\`; OpenResty \`$(wrk_cmd openresty "$ep")\`"
    done
    if grep -qw -e proxy -e balancer -e balancer_lc -e balancer_ewma <<<"$ENDPOINTS"; then
        echo "- gateway endpoints: Moontide's server CPU includes the separate backend nginx" \
             "(master + 1 worker, the anchor's backend server block alone, pinned to CPU 0 too);" \
             "OpenResty's backends run inside its one worker. Moontide routes: /proxy -> upstream" \
             "round_robin, /balancer -> round_robin (its built-in balancer, no Lua), /balancer_lc ->" \
             "least_conn, /balancer_ewma -> ewma; each over 127.0.0.1:18081/18082, keepalive max_idle 64." \
             "OpenResty: /proxy = proxy_pass (nginx round robin, keepalive 64), /balancer (also for" \
             "balancer_lc/_ewma) = balancer_by_lua_block round robin, keepalive 64;" \
             "$([ "$OR_SPLIT" = 1 ] && echo "**OR_SPLIT=1: OpenResty's backends too are that separate nginx (the anchor's nginx.conf minus its backend server block), CPU added likewise**" ||
                echo "its backends inside its one worker (the anchor as is)")"
    fi
    echo
    awk -F'\t' -v endpoints="$ENDPOINTS" -f "$HERE/lib/report.awk" "$TSV" 2>"$VERDICT"
} >"$SUMMARY"
cat "$SUMMARY"
sed 's/^/bench: /' "$VERDICT" >&2
rm -f "$VERDICT"
say "summary: $SUMMARY; per-run numbers: $TSV; raw wrk outputs: $RESULTS_DIR/*.raw"

if [ -n "$failed" ]; then
    say "FAILED: non-2xx responses or socket errors in:$failed (numbers of those runs are invalid)"
    exit 1
fi
if [ "$busy" = 1 ]; then
    say "WARN some runs stayed disturbed by other load (see 'other'); numbers are suspect"
    exit 3
fi
exit 0
