#!/usr/bin/env bash
# Fairness: does a neighbour notice hostile functions? (issue 3)
#
#   bench/fairness.sh                 # RUNS=2, DURATION=10s: ~2 minutes after the build
#   RUNS=3 DURATION=20s bench/fairness.sh
#   MOONTIDE_BIN=target/release/moontide bench/fairness.sh
#
# One Moontide node (`serve --workers 1`, pinned to CPU 0; load generators on CPU 1) with
# the `hello` function and four hostile functions from tests/hostile — an infinite loop,
# a pcall loop that swallows the timeout, a pattern-matching bomb and a memory bomb — each
# deployed with `--timeout 1s --max 4`. Per run, A then B:
#
#   A  solo:    wrk -t1 -c64 on /fn/hello for DURATION
#   B  hostile: the same, while each hostile function is hammered by its own wrk with
#               HOSTILE_CONNS connections (2x its max instances: every instance busy and a
#               queue behind it) for the whole measurement
#
# and reports hello's requests/s and p99 in both, the ratios (targets: throughput >= 0.5x
# solo, p99 < 10x solo), what the hostile callers were answered, the error kinds counted
# in moontide_function_errors_total, and that /readyz still answers.
# Between runs it waits until the server is idle again (runaway calls drained), so every
# solo run is solo. Output: stdout and bench/results/fairness.md; raw wrk outputs in
# bench/results/*.raw.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RUNS=${RUNS:-2}
DURATION=${DURATION:-10s}
HOSTILE_CONNS=${HOSTILE_CONNS:-8}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}
MT_PORT=${MT_PORT:-18090}
MT_ADMIN_PORT=${MT_ADMIN_PORT:-18091}
HOST=127.0.0.1
HOSTILE="cpu_loop cpu_pcall_loop cpu_pattern_bomb mem_table_growth"

say() { echo "fairness: $*" >&2; }
die() { echo "fairness: ERROR: $*" >&2; exit 2; }

for bin in wrk curl taskset awk; do
    command -v "$bin" >/dev/null 2>&1 || die "missing $bin (apt-get install -y wrk curl util-linux gawk)"
done
[ "$(nproc)" -ge 2 ] || die "needs >= 2 CPUs (server on CPU 0, load on CPU 1)"
secs=${DURATION%s}
[[ $secs =~ ^[0-9]+$ ]] || die "DURATION must be whole seconds, like 10s"

if [ -n "${MOONTIDE_BIN:-}" ]; then
    BIN=$(cd "$(dirname "$MOONTIDE_BIN")" && pwd)/$(basename "$MOONTIDE_BIN")
else
    say "building moontide ..."
    (cd "$REPO" && cargo build --release --locked -p moontide >&2)
    BIN=$REPO/target/release/moontide
fi
mkdir -p "$RESULTS_DIR"

DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-fairness.XXXXXX")
SERVER_PID=""
HOSTILE_PIDS=()
cleanup() {
    local rc=$?
    for pid in "${HOSTILE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    [ "$rc" = 0 ] || { echo "# server stderr (last 20 lines):" >&2; tail -n 20 "$DIR/stderr.log" >&2 || true; }
    rm -rf -- "$DIR"
    exit "$rc"
}
trap cleanup EXIT

taskset -c 0 "$BIN" serve --data-dir "$DIR/data" --listen "$HOST:$MT_PORT" \
    --admin "$HOST:$MT_ADMIN_PORT" --workers 1 >"$DIR/stdout.log" 2>"$DIR/stderr.log" &
SERVER_PID=$!
for _ in $(seq 200); do
    grep -q 'admin API listening' "$DIR/stdout.log" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "moontide exited during startup"
    sleep 0.05
done
export MOONTIDE_ADMIN="http://$HOST:$MT_ADMIN_PORT"
MOONTIDE_TOKEN=$(cat "$DIR/data/admin.token")
export MOONTIDE_TOKEN
mt() { taskset -c 1 "$BIN" "$@" >/dev/null; }
mt deploy hello "$HERE/functions/hello.lua"
for f in $HOSTILE; do
    mt deploy "$f" "$REPO/tests/hostile/$f.lua" --timeout 1s --max 4
done
BASE="http://$HOST:$MT_PORT/fn"
[ "$(curl -fsS "$BASE/hello")" = "Hello, World!" ] || die "hello does not answer"

# shellcheck source=lib/supervised.sh
. "$HERE/lib/supervised.sh"
NODE_PROCESS=$(node_process "$SERVER_PID")
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$NODE_PROCESS/stat"; }
wait_quiet() {  # until the server used < 5% of a CPU over half a second (at most 20 s)
    local hz before after
    hz=$(getconf CLK_TCK)
    for _ in $(seq 40); do
        before=$(cpu_ticks); sleep 0.5; after=$(cpu_ticks)
        [ $(( (after - before) * 100 * 2 / hz )) -lt 5 ] && return 0
    done
    say "the server stayed busy after the attack (runaway calls still draining)"
}

measure_hello() {  # label run -> "rps p50 p99 requests errors"
    local raw="$RESULTS_DIR/fairness-$1-run$2.raw"
    taskset -c 1 wrk -t1 -c64 -d1s "$BASE/hello" >/dev/null   # warm-up
    taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency "$BASE/hello" >"$raw"
    awk -f "$HERE/lib/wrk_parse.awk" "$raw"
}

declare -a SOLO HOSTILE_RUNS
for run in $(seq "$RUNS"); do
    say "run $run/$RUNS: hello solo"
    SOLO+=("$(measure_hello solo "$run")")
    say "run $run/$RUNS: hello while hostile functions are hammered"
    HOSTILE_PIDS=()
    for f in $HOSTILE; do
        taskset -c 1 wrk -t1 -c"$HOSTILE_CONNS" -d"$((secs + 4))s" --timeout 5s "$BASE/$f" \
            >"$RESULTS_DIR/fairness-attack-$f-run$run.raw" &
        HOSTILE_PIDS+=($!)
    done
    sleep 2   # every hostile instance busy, queues filled
    HOSTILE_RUNS+=("$(measure_hello hostile "$run")")
    for pid in "${HOSTILE_PIDS[@]}"; do wait "$pid" || true; done
    HOSTILE_PIDS=()
    wait_quiet   # the next solo run must be solo
done

ready=$(curl -s -o /dev/null -w '%{http_code}' "http://$HOST:$MT_PORT/readyz")
metrics=$(curl -fsS -H "authorization: Bearer $MOONTIDE_TOKEN" "$MOONTIDE_ADMIN/metrics" 2>/dev/null ||
          curl -fsS "$MOONTIDE_ADMIN/metrics")

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { local i=$1; shift; printf '%s\n' "$@" | awk -v i="$i" '{ print $i }'; }
solo_rps=$(field 1 "${SOLO[@]}" | median);         solo_p99=$(field 3 "${SOLO[@]}" | median)
host_rps=$(field 1 "${HOSTILE_RUNS[@]}" | median);  host_p99=$(field 3 "${HOSTILE_RUNS[@]}" | median)
solo_err=$(field 5 "${SOLO[@]}" | awk '{ s += $1 } END { print s }')
host_err=$(field 5 "${HOSTILE_RUNS[@]}" | awk '{ s += $1 } END { print s }')

{
    echo "# fairness — $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)"
    echo
    echo "Moontide \`serve --workers 1\` on CPU 0, load on CPU 1; RUNS=$RUNS DURATION=$DURATION;"
    echo "hostile: $HOSTILE, each \`--timeout 1s --max 4\`, hammered with $HOSTILE_CONNS connections."
    echo
    echo "| hello | requests/s | p99 (ms) | errors |"
    echo "|---|---:|---:|---:|"
    for i in "${!SOLO[@]}"; do
        read -r rps _ p99 _ err <<<"${SOLO[$i]}"
        echo "| solo, run $((i + 1)) | $rps | $p99 | $err |"
        read -r rps _ p99 _ err <<<"${HOSTILE_RUNS[$i]}"
        echo "| with hostile neighbours, run $((i + 1)) | $rps | $p99 | $err |"
    done
    echo
    awk -v sr="$solo_rps" -v hr="$host_rps" -v sp="$solo_p99" -v hp="$host_p99" 'BEGIN {
        printf "Medians: throughput %.0f -> %.0f requests/s (**%.2fx** solo; target >= 0.5x), ", sr, hr, hr / sr
        printf "p99 %.2f -> %.2f ms (**%.1fx** solo; target < 10x).\n", sp, hp, hp / sp }'
    echo "hello errors: solo $solo_err, with hostile neighbours $host_err."
    echo
    echo "What the hostile callers were answered (last run):"
    echo
    for f in $HOSTILE; do
        raw="$RESULTS_DIR/fairness-attack-$f-run$RUNS.raw"
        total=$(awk '/ requests in /{ print $1 }' "$raw")
        non2xx=$(awk '/Non-2xx/{ print $NF }' "$raw")
        echo "- $f: ${total:-0} answers, ${non2xx:-0} of them errors (expected: all)"
    done
    echo
    echo "Error kinds counted by the node (moontide_function_errors_total):"
    echo
    echo '```'
    grep '^moontide_function_errors_total' <<<"$metrics" || echo "(none)"
    echo '```'
    echo
    echo "/readyz after the attack: $ready"
} | tee "$RESULTS_DIR/fairness.md"
[ "$ready" = 200 ] || die "the node is not ready after the attack"
