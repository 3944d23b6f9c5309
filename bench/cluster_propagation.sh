#!/usr/bin/env bash
# Cluster propagation (issue 15): three Moontide nodes on one etcd; how long from a route
# write's acknowledgement on node A until each node serves it, under a steady stream of
# changes. Moontide only (no anchor runs a comparable cluster on this machine).
#
#   bench/cluster_propagation.sh
#   CHANGES=50 WINDOW=20 bench/cluster_propagation.sh
#   MOONTIDE_BIN=... GWLOAD_BIN=... bench/cluster_propagation.sh   # skip the cargo build
#
# Setup (127.0.0.1): one etcd (Debian's etcd-server, a temp data dir) and the anchor's two
# "ok" backends (nginx) on CPU 0 with the three nodes (`serve --workers 1 --store etcd://`);
# upstream `backends` and ROUTES routes r<i> written on node A.
# Then on CPU 1, `moontide-gwload churn` against node A's admin API with every node's
# data plane: CHANGES changes/s for WINDOW seconds, cycling (1) PUT a new route and poll
# the three nodes round robin until each serves it (per node: acknowledgement -> first
# 200 ok), (2) PUT an existing route, (3) DELETE the oldest new route.
#
# Output: bench/results/cluster/{report.txt,changes.csv,churn.txt,phases.txt}.
# Exit status: 0 ran and every new route was served by every node; 1 one was not; 2 setup.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

ROUTES=${ROUTES:-200}
CHANGES=${CHANGES:-50}
WINDOW=${WINDOW:-20}                 # seconds
NODE_PORTS=${NODE_PORTS:-"18190 18192 18194"}   # data port; admin is port + 1
ETCD_PORT=${ETCD_PORT:-18379}
BACKEND_PORTS=${BACKEND_PORTS:-"18101 18102"}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}/cluster

if [ -z "${MOONTIDE_BIN:-}" ]; then
    echo "${0##*/}: building (cargo build --release --features etcd -p moontide -p moontide-load) ..." >&2
    (cd "$REPO" && cargo build --release --features etcd -p moontide -p moontide-load >&2)
    MOONTIDE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide
    GWLOAD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide-gwload
fi
export MOONTIDE_BIN GWLOAD_BIN
. "$HERE/lib/gwcommon.sh"
command -v etcd >/dev/null 2>&1 || die 2 "missing etcd (apt-get install -y etcd-server)"
[[ $WINDOW =~ ^[1-9][0-9]*$ ]] || die 2 "WINDOW is whole seconds"

ports=()
for p in $NODE_PORTS; do ports+=("$p" "$((p + 1))"); done
# shellcheck disable=SC2086
refuse_taken_ports "${ports[@]}" "$ETCD_PORT" "$((ETCD_PORT + 1))" $BACKEND_PORTS
mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_DIR"/*
say "machine busy before start: $(other_load)% (other engineers' builds etc.)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cluster-prop.XXXXXX"); TMP_DIRS="$TMP_DIRS $WORK"
taskset -c 0 etcd --name bench --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "bench=http://127.0.0.1:$((ETCD_PORT + 1))" >"$WORK/etcd.log" 2>&1 &
ETCD_PID=$!; track "$ETCD_PID"
for _ in $(seq 100); do
    curl -fsS -m 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS -m 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null || die 2 "etcd did not start (see $WORK/etcd.log)"

# shellcheck disable=SC2086
start_backend "$WORK/backends" on 0 $BACKEND_PORTS || { track "$BACKEND_PID"; die 2 "backends did not start"; }
track "$BACKEND_PID"
upstream_nodes=""
for port in $BACKEND_PORTS; do upstream_nodes+="${upstream_nodes:+, }{\"address\": \"127.0.0.1:$port\", \"weight\": 1}"; done

MOONTIDE_ADMIN_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'); export MOONTIDE_ADMIN_TOKEN
data_urls=""
i=0
for p in $NODE_PORTS; do
    dir="$WORK/node$i"; mkdir -p "$dir"
    taskset -c 0 "$MOONTIDE_BIN" serve --store "etcd://127.0.0.1:$ETCD_PORT" --data-dir "$dir/data" \
        --listen "127.0.0.1:$p" --admin "127.0.0.1:$((p + 1))" --workers 1 \
        >"$dir/stdout.log" 2>"$dir/stderr.log" &
    pid=$!; track "$pid"
    for _ in $(seq 200); do
        grep -q 'admin API listening' "$dir/stdout.log" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/stderr.log" >&2; die 2 "node $i exited during startup"; }
        sleep 0.05
    done
    data_urls+="${data_urls:+,}http://127.0.0.1:$p"
    i=$((i + 1))
done
first_port=${NODE_PORTS%% *}
MT_ADMIN="http://127.0.0.1:$((first_port + 1))"
MT_TOKEN_FILE="$WORK/node0/data/admin.token"
mt_admin PUT /v1/upstreams/backends "{\"nodes\": [$upstream_nodes]}"
LOADCMD="taskset -c 1 $GWLOAD_BIN --cpu 1 routes --admin $MT_ADMIN --token-file $MT_TOKEN_FILE --upstream backends --count $ROUTES"
ROUTES_LINE=$($LOADCMD) || die 2 "loading the routes failed"
say "$ROUTES_LINE"
for p in $NODE_PORTS; do
    for _ in $(seq 100); do
        [ "$(curl -sS -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/r/$((ROUTES - 1))")" = 200 ] && break
        sleep 0.1
    done
    expect_get "http://127.0.0.1:$p/r/$((ROUTES - 1))" 200 $'ok\n'
done

CHURN="taskset -c 1 $GWLOAD_BIN --cpu 1 churn --admin $MT_ADMIN --token-file $MT_TOKEN_FILE --data $data_urls --upstream backends --existing $ROUTES --rate $CHANGES --before 1s --duration ${WINDOW}s --after 1s --out $RESULTS_DIR"
say "churn: $CHURN"
churn_rc=0; $CHURN || churn_rc=$?
[ "$churn_rc" = 0 ] || die 1 "the churn driver failed (rc $churn_rc)"
{
    echo "# cluster propagation $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git -C "$REPO" rev-parse --short HEAD)"
    echo "# ROUTES=$ROUTES CHANGES=$CHANGES WINDOW=$WINDOW bench/cluster_propagation.sh (3 nodes, one etcd, all on CPU 0; driver on CPU 1)"
    sed 's/^/# /' "$RESULTS_DIR/churn.txt"
} | tee "$RESULTS_DIR/report.txt"
