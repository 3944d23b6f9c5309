# Sourced by bench/kill_node.sh and bench/churn.sh: binaries, ports, process bookkeeping.
# Every process started with `track PID` is stopped on exit (by its pid; nginx masters
# with QUIT then KILL, their workers too); temp dirs listed in TMP_DIRS are removed.

say() { echo "${0##*/}: $*" >&2; }
die() { local code=$1; shift; echo "${0##*/}: ERROR: $*" >&2; exit "$code"; }

for bin in nginx curl ss taskset awk python3; do
    command -v "$bin" >/dev/null 2>&1 ||
        die 2 "missing $bin (apt-get install -y --no-install-recommends nginx curl iproute2 util-linux python3)"
done
[ "$(nproc)" -ge 2 ] || die 2 "needs >= 2 CPUs (servers on CPU 0, load on CPU 1)"

# shellcheck source=backends.sh
. "$HERE/lib/backends.sh"
# shellcheck source=supervised.sh
. "$HERE/lib/supervised.sh"

if [ -n "${MOONTIDE_BIN:-}" ] || [ -n "${GWLOAD_BIN:-}" ]; then
    [ -n "${MOONTIDE_BIN:-}" ] && [ -n "${GWLOAD_BIN:-}" ] || die 2 "set both MOONTIDE_BIN and GWLOAD_BIN"
else
    command -v cargo >/dev/null 2>&1 || die 2 "cargo not found; set MOONTIDE_BIN and GWLOAD_BIN"
    say "building (cargo build --release -p moontide -p moontide-load) ..."
    (cd "$REPO" && cargo build --release -p moontide -p moontide-load >&2) || die 2 "cargo build failed"
    MOONTIDE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide
    GWLOAD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide-gwload
fi
[ -x "$MOONTIDE_BIN" ] || die 2 "$MOONTIDE_BIN is not an executable"
[ -x "$GWLOAD_BIN" ] || die 2 "$GWLOAD_BIN is not an executable"

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
refuse_taken_ports() {
    local port
    for port in "$@"; do
        port_busy "$port" && die 2 "port 127.0.0.1:$port is already in use; stop whatever listens there first"
    done
    return 0
}

TRACKED=""        # pids we started (moontide, nginx masters / single processes, load)
TMP_DIRS=""
track() { TRACKED="$TRACKED $1"; }
untrack() { TRACKED=$(tr ' ' '\n' <<<"$TRACKED" | grep -vx "$1" | tr '\n' ' '); }
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in $TRACKED; do
        if [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = nginx ]; then
            stop_backend "$pid"
        else
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    for d in $TMP_DIRS; do [ -d "$d" ] && rm -rf -- "$d"; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

MT_DIR=""
MT_PID=""
MT_TOKEN_FILE=""
start_moontide_node() {  # port admin_port: moontide serve --workers 1 pinned to CPU 0
    MT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-gw.XXXXXX"); TMP_DIRS="$TMP_DIRS $MT_DIR"
    taskset -c 0 "$MOONTIDE_BIN" serve --data-dir "$MT_DIR/data" --listen "127.0.0.1:$1" \
        --admin "127.0.0.1:$2" --workers 1 >"$MT_DIR/stdout.log" 2>"$MT_DIR/stderr.log" &
    MT_PID=$!; track "$MT_PID"
    for _ in $(seq 200); do
        kill -0 "$MT_PID" 2>/dev/null || { cat "$MT_DIR/stderr.log" >&2; die 2 "moontide exited during startup"; }
        if grep -q 'data plane listening' "$MT_DIR/stdout.log" 2>/dev/null &&
           grep -q 'admin API listening' "$MT_DIR/stdout.log" 2>/dev/null; then
            MT_TOKEN_FILE=$MT_DIR/data/admin.token
            MT_ADMIN="http://127.0.0.1:$2"
            return 0
        fi
        sleep 0.05
    done
    die 2 "moontide not ready after 10 s"
}

mt_admin() {  # method path json: one admin API call; dies unless it answers 2xx
    local out
    out=$(curl -sS -m 5 -w '\n%{http_code}' -X "$1" \
        -H "Authorization: Bearer $(cat "$MT_TOKEN_FILE")" \
        -H 'Content-Type: application/json' --data-binary "$3" "$MT_ADMIN$2") ||
        die 2 "admin $1 $2 failed: $out"
    [[ ${out##*$'\n'} == 2?? ]] || die 2 "admin $1 $2 answered ${out##*$'\n'}: ${out%$'\n'*}"
}

expect_get() {  # url status body: one GET must answer exactly that
    local got
    got=$(curl -sS -m 5 -w '|%{http_code}' "$1") || die 2 "GET $1 failed"
    [ "$got" = "$3|$2" ] || die 2 "GET $1: expected $2 '$3', got '$got'"
}

other_load() {  # % of the machine used by processes other than ours over 1 s
    local a b
    read -r _ u n s i w x y z _ </proc/stat; a="$((u+n+s+x+y)) $((u+n+s+i+w+x+y+z))"
    sleep 1
    read -r _ u n s i w x y z _ </proc/stat; b="$((u+n+s+x+y)) $((u+n+s+i+w+x+y+z))"
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, p); split(b, q); t = q[2] - p[2]; if (t <= 0) t = 1
        printf "%.1f", 100 * (q[1] - p[1]) / t }'
}
