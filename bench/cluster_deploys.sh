#!/usr/bin/env bash
# Deploys/s and admin latency, etcd vs the embedded store (issue 15, "Measure"). The same
# admin workload (`moontide-gwload deploys`) against three setups, side by side in one run:
#
#   embedded  one node, config in SQLite in its data dir (WAL, synchronous=FULL)
#   etcd-1    one node on a real etcd (`serve --store etcd://`)
#   etcd-3    three nodes on one etcd; calls round robin over their admin APIs
#
#   bench/cluster_deploys.sh
#   ROUNDS=5 COUNT=300 CLIENTS=8 bench/cluster_deploys.sh
#   MOONTIDE_BIN=... GWLOAD_BIN=... bench/cluster_deploys.sh   # skip the cargo build
#
# Workload per setup (phases of COUNT calls each; see bench/loadgen/src/bin/gwload/deploys.rs):
# deploy_seq (new functions, one at a time), redeploy_seq (new versions of one function),
# deploy_conc (new functions from CLIENTS clients at once), route_seq and route_conc (new
# routes to those functions), get_fn (GET /v1/functions/NAME), list_fn (GET /v1/functions,
# 2×COUNT + 11 functions). Every call is timed from send to the whole answer; a deploy's
# answer comes once the node that took it serves the new version (compiled, init run,
# stored, applied by its builder).
#
# Pinning (2 CPUs): every Moontide node (`serve --workers 1`; all its threads) on CPU 0;
# etcd and the driver on CPU 1, so the store's own work does not take the server's core
# (with etcd-3, the three nodes share CPU 0). Each setup is started fresh for each round;
# the setups' order rotates between rounds. All on 127.0.0.1, on free ports; data dirs
# and etcd's under TMPDIR (the report says which filesystem, and what one fsync costs
# there).
#
# Output: bench/results/cluster_deploys/{rows.csv,report.md}; report.md has the medians
# over rounds and the ratios etcd/embedded.
# Exit status: 0 ran; 1 a call failed or a setup did not start; 2 missing tools.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-200}
CLIENTS=${CLIENTS:-8}
SETUPS=${SETUPS:-"embedded etcd-1 etcd-3"}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}/cluster_deploys

say() { echo "${0##*/}: $*" >&2; }
die() { local code=$1; shift; echo "${0##*/}: ERROR: $*" >&2; exit "$code"; }

for tool in etcd curl taskset python3 pgrep; do
    command -v "$tool" >/dev/null 2>&1 ||
        die 2 "missing $tool (apt-get install -y etcd-server curl util-linux python3 procps)"
done
[ "$(nproc)" -ge 2 ] || die 2 "needs >= 2 CPUs (servers on CPU 0, etcd and the driver on CPU 1)"
if [ -n "${MOONTIDE_BIN:-}" ] || [ -n "${GWLOAD_BIN:-}" ]; then
    [ -n "${MOONTIDE_BIN:-}" ] && [ -n "${GWLOAD_BIN:-}" ] || die 2 "set both MOONTIDE_BIN and GWLOAD_BIN"
else
    say "building (cargo build --release --features etcd -p moontide -p moontide-load) ..."
    (cd "$REPO" && cargo build --release --features etcd -p moontide -p moontide-load >&2) ||
        die 2 "cargo build failed"
    MOONTIDE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide
    GWLOAD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide-gwload
fi
[ -x "$MOONTIDE_BIN" ] || die 2 "$MOONTIDE_BIN is not an executable"
[ -x "$GWLOAD_BIN" ] || die 2 "$GWLOAD_BIN is not an executable"

PIDS=""          # what the current setup runs (stopped by pid between setups and on exit)
WORK=""
stop_setup() {
    local pid
    # shellcheck disable=SC2086
    for pid in $PIDS; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $PIDS; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=""
    if [ -n "$WORK" ]; then rm -rf -- "$WORK"; fi
    WORK=""
}
trap stop_setup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() {  # COUNT
    python3 - "$1" <<'EOF'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
}

other_load() {  # % of the machine used by processes other than ours over 1 s
    local a b
    read -r _ u n s i w x y z _ </proc/stat; a="$((u+n+s+x+y)) $((u+n+s+i+w+x+y+z))"
    sleep 1
    read -r _ u n s i w x y z _ </proc/stat; b="$((u+n+s+x+y)) $((u+n+s+i+w+x+y+z))"
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, p); split(b, q); t = q[2] - p[2]; if (t <= 0) t = 1
        printf "%.1f", 100 * (q[1] - p[1]) / t }'
}

ETCD_URL=""
ETCD_PID=""
start_etcd() {  # on CPU 1, data in $WORK/etcd
    local client peer
    read -r client peer < <(free_ports 2)
    taskset -c 1 etcd --name bench --data-dir "$WORK/etcd" \
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "bench=http://127.0.0.1:$peer" >"$WORK/etcd.log" 2>&1 &
    ETCD_PID=$!
    PIDS="$PIDS $ETCD_PID"
    ETCD_URL=http://127.0.0.1:$client
    for _ in $(seq 100); do
        curl -fsS -m 1 "$ETCD_URL/health" 2>/dev/null | grep -q true && return 0
        kill -0 "$ETCD_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$WORK/etcd.log" >&2
    die 1 "etcd did not start"
}

ADMINS=""        # comma-separated admin URLs of the setup's nodes
SERVER_PIDS=""   # comma-separated: supervisors and node processes
start_node() {  # NAME [serve flags...]: on CPU 0, free ports
    local name=$1 dir=$WORK/$1 pid admin="" node
    shift
    mkdir -p "$dir"
    taskset -c 0 "$MOONTIDE_BIN" serve --data-dir "$dir/data" --listen 127.0.0.1:0 \
        --admin 127.0.0.1:0 --workers 1 "$@" >"$dir/stdout.log" 2>"$dir/stderr.log" &
    pid=$!
    PIDS="$PIDS $pid"
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || { cat "$dir/stderr.log" >&2; die 1 "$name exited during startup"; }
        admin=$(sed -n 's|^moontide: admin API listening on ||p' "$dir/stdout.log" 2>/dev/null | head -n 1 || true)
        if [ -n "$admin" ] && curl -fsS -m 1 -o /dev/null "$admin/readyz" 2>/dev/null; then break; fi
        admin=""
        sleep 0.1
    done
    [ -n "$admin" ] || die 1 "$name not ready"
    node=$(pgrep -P "$pid" | head -n 1)
    [ -n "$node" ] || die 1 "$name: no node process under supervisor $pid"
    ADMINS+="${ADMINS:+,}$admin"
    SERVER_PIDS+="${SERVER_PIDS:+,}$pid,$node"
}

run_setup() {  # SETUP ROUND
    local setup=$1 round=$2 i
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/cluster-deploys.XXXXXX")
    ADMINS=""; SERVER_PIDS=""; ETCD_PID=""; ETCD_URL=""
    case $setup in
        embedded) start_node node ;;
        etcd-*)
            start_etcd
            for i in $(seq "${setup#etcd-}"); do start_node "node$i" --store "etcd://${ETCD_URL#http://}"; done
            ;;
        *) die 2 "unknown setup $setup (embedded, etcd-N)" ;;
    esac
    echo "$MOONTIDE_ADMIN_TOKEN" >"$WORK/token"
    local cmd=(taskset -c 1 "$GWLOAD_BIN" --cpu 1 deploys --admin "$ADMINS" --token-file "$WORK/token"
        --count "$COUNT" --clients "$CLIENTS" --prefix "r${round}" --setup "$setup" --round "$round"
        --server-pids "$SERVER_PIDS" --out "$RESULTS_DIR/rows.csv")
    if [ -n "$ETCD_PID" ]; then cmd+=(--etcd-pids "$ETCD_PID" --etcd-metrics "$ETCD_URL"); fi
    say "round $round, $setup: ${cmd[*]}"
    "${cmd[@]}" || die 1 "the driver failed on $setup (logs in $WORK)"
    stop_setup
}

mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR/rows.csv" "$RESULTS_DIR/report.md"
MOONTIDE_ADMIN_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'); export MOONTIDE_ADMIN_TOKEN

# The filesystem the data dirs live on, and what making a 4 KiB write durable costs there:
# fdatasync of a write inside a preallocated file (what etcd's WAL does, and SQLite's WAL
# once it has grown) and fsync of a write that also grows the file (metadata too).
probe=$(mktemp -d "${TMPDIR:-/tmp}/cluster-deploys-fsync.XXXXXX")
FS=$(df -T "$probe" | awk 'NR == 2 { print $2 " on " $1 }')
FSYNC=$(taskset -c 1 python3 - "$probe/f" <<'EOF'
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, bytes(1 << 20))
os.fsync(fd)
def probe(sync, offset):
    times = []
    for i in range(300):
        os.pwrite(fd, b"x" * 4096, offset(i))
        t = time.perf_counter()
        sync(fd)
        times.append(time.perf_counter() - t)
    times.sort()
    return f"p50 {times[150] * 1e3:.2f} ms, p99 {times[296] * 1e3:.2f} ms"
inside = probe(os.fdatasync, lambda i: (i % 256) * 4096)
growing = probe(os.fsync, lambda i: (1 << 20) + i * 4096)
print(f"fdatasync in place {inside}; fsync appending {growing}")
EOF
)
rm -rf -- "$probe"
LOAD=$(other_load)
say "data dirs on $FS; a 4 KiB write made durable: $FSYNC; machine busy before start: $LOAD%"

read -r -a setups <<<"$SETUPS"
for round in $(seq "$ROUNDS"); do
    for k in $(seq 0 $((${#setups[@]} - 1))); do
        run_setup "${setups[$(((k + round - 1) % ${#setups[@]}))]}" "$round"
    done
done

LOAD_AFTER=$(other_load)
{
    echo "# cluster deploys $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD)"
    echo
    echo "\`ROUNDS=$ROUNDS COUNT=$COUNT CLIENTS=$CLIENTS bench/cluster_deploys.sh\`; $(etcd --version | head -n 1);"
    echo "data dirs on $FS (a 4 KiB write made durable: $FSYNC); machine busy before start: $LOAD%, after the end: $LOAD_AFTER% (other processes: the machine is shared)."
    echo "Servers on CPU 0, etcd and the driver on CPU 1. Medians over $ROUNDS rounds."
    echo
    python3 "$HERE/lib/deploys_report.py" "$RESULTS_DIR/rows.csv"
} >"$RESULTS_DIR/report.md"
cat "$RESULTS_DIR/report.md"
