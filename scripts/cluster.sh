#!/usr/bin/env bash
# A Moontide cluster on one machine, to watch one work (issue 15): a real etcd, N nodes
# (`moontide serve --store etcd://...`) sharing it, and one more Moontide node in front of
# them as the load balancer: an upstream of the N data planes with active health checks on
# /readyz and a catch-all route to it. Everything listens on 127.0.0.1 only, on free ports.
#
#   scripts/cluster.sh [N]        # N nodes (default 3); stays in the foreground, Ctrl-C stops all
#   scripts/cluster.sh stop       # from another shell: stops the cluster running on STATE_DIR
#
# Environment:
#   MOONTIDE_BIN          a moontide binary built with `--features etcd` (default: this
#                         script runs `cargo build --release --features etcd -p moontide`)
#   STATE_DIR             data dirs, logs and cluster.env (default ${TMPDIR:-/tmp}/moontide-cluster-UID);
#                         kept after a stop, wiped at the next start (only if this script made it)
#   WORKERS               data-plane worker threads per node and for the load balancer (default 1)
#   MOONTIDE_ADMIN_TOKEN  the admin token of every node and of the load balancer (default: random)
#
# When everything is ready the script writes STATE_DIR/cluster.env (shell variables: the
# addresses, pids and token; written whole, so a reader that finds it can use it) and prints
# where everything is. A stop (Ctrl-C, SIGTERM or SIGHUP to this script, or `stop`) stops the
# load balancer and the nodes with SIGTERM, then etcd, and SIGKILLs whatever is still there
# after STOP_WAIT seconds (default 30). Each process runs in its own session, so Ctrl-C
# reaches this script only and the order holds. Linux only (/proc).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

STATE_DIR=${STATE_DIR:-${TMPDIR:-/tmp}/moontide-cluster-$(id -u)}
WORKERS=${WORKERS:-1}
STOP_WAIT=${STOP_WAIT:-30}
MARKER=.moontide-cluster        # in STATE_DIR: this script made it (so it may wipe it)
UPSTREAM=cluster                # the load balancer's upstream and route
[ -d "$STATE_DIR" ] && STATE_DIR=$(cd "$STATE_DIR" && pwd)

say() { echo "${0##*/}: $*" >&2; }
die() { echo "${0##*/}: ERROR: $*" >&2; exit 1; }

# A process is ours if it is alive (not a zombie) and its command line names STATE_DIR
# (every process this script starts has its data or log dir there): a recorded pid that
# was reused by something else is never signalled.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}
cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null; }
ours() {
    local cmd
    alive "$1" && cmd=$(cmdline "$1") && [[ $cmd == *"$STATE_DIR/"* ]]
}
script_running() {  # PID: a cluster.sh that is still running
    local cmd
    alive "$1" && [ "$1" != $$ ] && cmd=$(cmdline "$1") && [[ $cmd == *cluster.sh* ]]
}

# stop_pids CHECK PID...: stops the pids for which CHECK holds — `alive` for this shell's
# own children (a child's pid cannot be reused before it is reaped, and one that has not
# exec'd yet has no telling command line), `ours` for pids read from the state dir:
# SIGTERM to all at once, SIGKILL after STOP_WAIT seconds to any left; reaps this
# shell's children.
stop_pids() {
    local check=$1 pid left deadline=$((SECONDS + STOP_WAIT))
    shift
    for pid in "$@"; do
        if "$check" "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    while :; do
        left=""
        for pid in "$@"; do
            if "$check" "$pid"; then left+=" $pid"; fi
        done
        [ -z "$left" ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "still running after ${STOP_WAIT}s, killing:$left"
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# Stops what an earlier run left behind (its script killed with SIGKILL, say).
stop_leftovers() {
    [ -f "$STATE_DIR/pids" ] || return 0
    # shellcheck disable=SC2046
    stop_pids ours $(cat "$STATE_DIR/pids")
}

cmd_stop() {
    [ -f "$STATE_DIR/$MARKER" ] || die "no cluster in $STATE_DIR (set STATE_DIR to the one it printed)"
    local script
    script=$(cat "$STATE_DIR/cluster.pid" 2>/dev/null || true)
    if [ -n "$script" ] && script_running "$script"; then
        kill -TERM "$script"
        # The script stops its processes within two STOP_WAITs (nodes, then etcd).
        local deadline=$((SECONDS + 2 * STOP_WAIT + 10))
        while script_running "$script" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        script_running "$script" && say "cluster.sh (pid $script) did not exit; stopping its processes"
    fi
    stop_leftovers
    say "stopped (logs and data kept in $STATE_DIR)"
}

free_ports() {  # COUNT: that many free loopback TCP ports, on one line
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$1" <<'EOF'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
    else
        local ports=() port
        while [ "${#ports[@]}" -lt "$1" ]; do
            port=$((20000 + RANDOM % 30000))
            # Something answers: taken. (A refused connect: free, as far as one can tell.)
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue
            [[ " ${ports[*]} " == *" $port "* ]] || ports+=("$port")
        done
        echo "${ports[*]}"
    fi
}

PIDS=()                         # everything started, in start order
started() { PIDS+=("$1"); echo "$1" >>"$STATE_DIR/pids"; }

ETCD_PID=""
ETCD_ENDPOINT=""
start_etcd() {
    local attempt client peer
    for attempt in 1 2 3 4 5; do
        read -r client peer < <(free_ports 2)
        rm -rf "$STATE_DIR/etcd"
        setsid etcd --name moontide-cluster --data-dir "$STATE_DIR/etcd" \
            --listen-client-urls "http://127.0.0.1:$client" \
            --advertise-client-urls "http://127.0.0.1:$client" \
            --listen-peer-urls "http://127.0.0.1:$peer" \
            --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
            --initial-cluster "moontide-cluster=http://127.0.0.1:$peer" \
            </dev/null >>"$STATE_DIR/etcd.log" 2>&1 &
        ETCD_PID=$!
        started "$ETCD_PID"
        for _ in $(seq 300); do
            alive "$ETCD_PID" || break
            if curl -fsS -m 1 "http://127.0.0.1:$client/health" 2>/dev/null | grep -q true; then
                ETCD_ENDPOINT=127.0.0.1:$client
                return 0
            fi
            sleep 0.1
        done
        say "etcd attempt $attempt on ports $client/$peer failed (ports taken?)"
        stop_pids alive "$ETCD_PID"
    done
    die "etcd did not start; see $STATE_DIR/etcd.log"
}

# start_moontide NAME ARGS...: `moontide serve` on free loopback ports, data dir
# STATE_DIR/NAME/data, logs beside it. Sets LAST_PID.
LAST_PID=""
start_moontide() {
    local name=$1
    shift
    mkdir -p "$STATE_DIR/$name"
    setsid "$MOONTIDE_BIN" serve --data-dir "$STATE_DIR/$name/data" \
        --listen 127.0.0.1:0 --admin 127.0.0.1:0 --workers "$WORKERS" "$@" \
        </dev/null >"$STATE_DIR/$name/stdout.log" 2>"$STATE_DIR/$name/stderr.log" &
    LAST_PID=$!
    started "$LAST_PID"
}

# wait_moontide NAME PID: waits for its addresses (the lines `serve` prints) and /readyz.
# Sets DATA (host:port) and ADMIN (http://host:port).
DATA=""
ADMIN=""
wait_moontide() {
    local name=$1 pid=$2 out=$STATE_DIR/$1/stdout.log deadline=$((SECONDS + 60))
    DATA=""
    ADMIN=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! alive "$pid"; then
            tail -n 20 "$STATE_DIR/$name/stderr.log" >&2 || true
            die "$name exited during startup (a binary built without --features etcd refuses --store etcd://); logs in $STATE_DIR/$name"
        fi
        if [ -z "$ADMIN" ]; then
            DATA=$(sed -n 's|^moontide: data plane listening on http://||p' "$out" 2>/dev/null | head -n 1 || true)
            ADMIN=$(sed -n 's|^moontide: admin API listening on ||p' "$out" 2>/dev/null | head -n 1 || true)
            if [ -z "$DATA" ]; then ADMIN=""; fi
        fi
        if [ -n "$ADMIN" ] && curl -fsS -m 1 -o /dev/null "http://$DATA/readyz" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "$name not ready after 60 s; logs in $STATE_DIR/$name"
}

admin_put() {  # ADMIN_URL PATH JSON: one admin API PUT; dies unless it answers 2xx
    local out
    out=$(curl -sS -m 10 -w '\n%{http_code}' -X PUT \
        -H "Authorization: Bearer $MOONTIDE_ADMIN_TOKEN" -H 'Content-Type: application/json' \
        --data-binary "$3" "$1$2") || die "PUT $1$2 failed: $out"
    [[ ${out##*$'\n'} == 2?? ]] || die "PUT $1$2 answered ${out##*$'\n'}: ${out%$'\n'*}"
}

SLEEP_PID=""
cleanup() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM HUP        # a second Ctrl-C must not cut the stop short
    if [ -n "$SLEEP_PID" ]; then kill "$SLEEP_PID" 2>/dev/null || true; fi
    rm -f "$STATE_DIR/cluster.env"
    say "stopping the load balancer and the nodes ..."
    local others=() pid
    for pid in "${PIDS[@]}"; do
        if [ "$pid" != "$ETCD_PID" ]; then others+=("$pid"); fi
    done
    if [ "${#others[@]}" -gt 0 ]; then stop_pids alive "${others[@]}"; fi
    if [ -n "$ETCD_PID" ]; then
        say "stopping etcd ..."
        stop_pids alive "$ETCD_PID"
    fi
    local left=""
    for pid in "${PIDS[@]}"; do
        if alive "$pid"; then left+=" $pid"; fi
    done
    if [ -z "$left" ]; then
        rm -f "$STATE_DIR/pids" "$STATE_DIR/cluster.pid"
        say "stopped; logs and data are in $STATE_DIR"
    else
        say "could not stop:$left"
        rc=1
    fi
    exit "$rc"
}

cmd_start() {
    local n=$1
    [[ $n =~ ^[1-9][0-9]?$ ]] && [ "$n" -le 32 ] || die "N is a number of nodes, 1 to 32 (got '$n')"
    [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS is a number of threads (got '$WORKERS')"
    local tool
    for tool in etcd curl setsid; do
        command -v "$tool" >/dev/null 2>&1 ||
            die "missing $tool (Debian: apt-get install etcd-server curl util-linux; or scripts/install-test-deps.sh)"
    done

    # The state dir: refuse a running cluster or a directory this script did not make.
    if [ -d "$STATE_DIR" ]; then
        local script
        script=$(cat "$STATE_DIR/cluster.pid" 2>/dev/null || true)
        if [ -n "$script" ] && script_running "$script"; then
            die "a cluster runs on $STATE_DIR already (cluster.sh pid $script): stop it (scripts/cluster.sh stop) or set STATE_DIR"
        fi
        if [ -n "$(ls -A "$STATE_DIR")" ] && [ ! -f "$STATE_DIR/$MARKER" ]; then
            die "$STATE_DIR is not empty and not a cluster.sh state dir; set STATE_DIR to another directory"
        fi
        stop_leftovers
        find "$STATE_DIR" -mindepth 1 -delete
    fi
    mkdir -p "$STATE_DIR"
    STATE_DIR=$(cd "$STATE_DIR" && pwd)
    touch "$STATE_DIR/$MARKER"
    echo $$ >"$STATE_DIR/cluster.pid"

    if [ -z "${MOONTIDE_BIN:-}" ]; then
        command -v cargo >/dev/null 2>&1 || die "cargo not found: set MOONTIDE_BIN to a moontide built with --features etcd"
        say "building (cargo build --release --features etcd -p moontide; needs protoc) ..."
        (cd "$REPO" && cargo build --release --features etcd -p moontide >&2) || die "cargo build failed"
        MOONTIDE_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/moontide
    fi
    [ -x "$MOONTIDE_BIN" ] || die "$MOONTIDE_BIN is not an executable"
    if [ -z "${MOONTIDE_ADMIN_TOKEN:-}" ]; then
        MOONTIDE_ADMIN_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    fi
    export MOONTIDE_ADMIN_TOKEN

    trap cleanup EXIT
    trap 'exit 0' INT TERM HUP

    start_etcd
    say "etcd on $ETCD_ENDPOINT (pid $ETCD_PID)"

    # The nodes: all at once, then wait for each. `--node-name` only where this binary has it.
    local naming=0 i serve_help
    serve_help=$("$MOONTIDE_BIN" serve --help 2>&1 || true)
    if [[ $serve_help == *--node-name* ]]; then naming=1; fi
    local node_pids=() node_data=() node_admin=()
    for i in $(seq "$n"); do
        local extra=()
        if [ "$naming" = 1 ]; then extra=(--node-name "node-$i"); fi
        # Behind the load balancer every connection comes from one address: no per-address cap.
        start_moontide "node-$i" --store "etcd://$ETCD_ENDPOINT" --max-connections-per-ip 0 "${extra[@]}"
        node_pids+=("$LAST_PID")
    done
    for i in $(seq "$n"); do
        wait_moontide "node-$i" "${node_pids[$((i - 1))]}"
        node_data+=("$DATA")
        node_admin+=("$ADMIN")
        say "node-$i ready: data http://$DATA, admin $ADMIN"
    done

    # The load balancer: its own embedded store; an upstream of the nodes, health-checked.
    start_moontide lb
    local lb_pid=$LAST_PID
    wait_moontide lb "$lb_pid"
    local lb_data=$DATA lb_admin=$ADMIN nodes="" address
    for address in "${node_data[@]}"; do nodes+="${nodes:+, }{\"address\": \"$address\"}"; done
    local retries=$((n - 1))
    if [ "$retries" -gt 10 ]; then retries=10; fi
    admin_put "$lb_admin" "/v1/upstreams/$UPSTREAM" "{\"nodes\": [$nodes],
        \"retries\": {\"attempts\": $retries},
        \"health\": {\"active\": {\"type\": \"http\", \"path\": \"/readyz\", \"interval\": \"1s\",
                                 \"timeout\": \"500ms\", \"healthy_threshold\": 2,
                                 \"unhealthy_threshold\": 2}}}"
    admin_put "$lb_admin" "/v1/routes/$UPSTREAM" "{\"paths\": [\"/*\"], \"upstream\": \"$UPSTREAM\"}"
    # Ready when the load balancer sees every node healthy.
    local deadline=$((SECONDS + 60)) healthy=0
    while [ "$SECONDS" -lt "$deadline" ]; do
        healthy=$(curl -fsS -m 2 -H "Authorization: Bearer $MOONTIDE_ADMIN_TOKEN" \
            "$lb_admin/v1/upstreams/$UPSTREAM" 2>/dev/null | grep -o '"healthy":true' | wc -l || true)
        if [ "$healthy" -ge "$n" ]; then break; fi
        sleep 0.2
    done
    [ "$healthy" -ge "$n" ] || die "the load balancer sees $healthy of $n nodes healthy after 60 s"

    {
        echo "# scripts/cluster.sh $n: shell variables (source it)"
        echo "STATE_DIR='$STATE_DIR'"
        echo "CLUSTER_PID=$$"
        echo "NODES=$n"
        echo "MOONTIDE_ADMIN_TOKEN='$MOONTIDE_ADMIN_TOKEN'"
        echo "ETCD_ENDPOINT=$ETCD_ENDPOINT"
        echo "ETCD_PID=$ETCD_PID"
        echo "LB_URL=http://$lb_data"
        echo "LB_ADMIN=$lb_admin"
        echo "LB_PID=$lb_pid"
        for i in $(seq "$n"); do
            echo "NODE_${i}_URL=http://${node_data[$((i - 1))]}"
            echo "NODE_${i}_ADMIN=${node_admin[$((i - 1))]}"
            echo "NODE_${i}_PID=${node_pids[$((i - 1))]}"
        done
    } >"$STATE_DIR/cluster.env.tmp"
    mv "$STATE_DIR/cluster.env.tmp" "$STATE_DIR/cluster.env"

    local bin_hint=$MOONTIDE_BIN
    if [[ $bin_hint == "$REPO"/* ]]; then bin_hint=${bin_hint#"$REPO"/}; fi
    cat <<EOF

Moontide cluster: $n node(s) on one etcd, a Moontide load balancer in front.

  load balancer  http://$lb_data   (admin $lb_admin; upstream '$UPSTREAM' of the nodes,
                 route /*, health checks GET /readyz every 1s)
$(for i in $(seq "$n"); do
    printf '  node-%-9s data http://%s   admin %s   pid %s\n' "$i" "${node_data[$((i - 1))]}" "${node_admin[$((i - 1))]}" "${node_pids[$((i - 1))]}"
done)
  etcd           $ETCD_ENDPOINT   (pid $ETCD_PID)
  admin token    $MOONTIDE_ADMIN_TOKEN   (every node and the load balancer)

Try it (/fn/NAME is answered by the node you ask, so give functions a route):
  export MOONTIDE_ADMIN=${node_admin[0]} MOONTIDE_ADMIN_TOKEN=$MOONTIDE_ADMIN_TOKEN
  $bin_hint deploy hello examples/greeting.lua --route /hello   # on any node: all serve it
  curl http://$lb_data/hello
  kill -9 ${node_pids[$((n > 1 ? 1 : 0))]}      # a node dies; the load balancer routes around it
  curl -s -H "Authorization: Bearer \$MOONTIDE_ADMIN_TOKEN" $lb_admin/v1/upstreams/$UPSTREAM

Logs and data: $STATE_DIR (etcd.log, node-*/, lb/); addresses for scripts: $STATE_DIR/cluster.env
Stop: Ctrl-C here, or STATE_DIR=$STATE_DIR scripts/cluster.sh stop
EOF

    # Until stopped: report processes that die (a killed node is the demo, not a reason to stop).
    local reported=" " pid name
    while :; do
        for pid in "${PIDS[@]}"; do
            if [[ $reported == *" $pid "* ]]; then continue; fi
            if ! alive "$pid"; then
                local status=0
                wait "$pid" 2>/dev/null || status=$?
                name=etcd
                if [ "$pid" = "$lb_pid" ]; then name="the load balancer"; fi
                for i in $(seq "$n"); do
                    if [ "$pid" = "${node_pids[$((i - 1))]}" ]; then name=node-$i; fi
                done
                say "$name (pid $pid) exited (status $status)"
                reported+="$pid "
            fi
        done
        sleep 1 &
        SLEEP_PID=$!
        wait "$SLEEP_PID" 2>/dev/null || true   # (and no job notices: a killed node is reported above)
        SLEEP_PID=""
    done
}

case "${1:-3}" in
    stop) cmd_stop ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) cmd_start "${1:-3}" ;;
esac
