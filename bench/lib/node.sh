# Sourced by bench scripts: one Moontide node pinned to CPU 0 (`serve --workers 1`) on a
# fresh data dir, stopped and removed on exit.
#
#   start_pinned_node BIN PORT ADMIN_PORT     sets NODE_DIR (data in $NODE_DIR/data),
#                                             NODE_PID and NODE_TOKEN; exits 2 on failure
# (bench/run.sh and bench/elasticity.sh keep their own, with per-run logs.)

NODE_DIR=
NODE_PID=
stop_pinned_node() {
    if [ -n "$NODE_PID" ]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
    [ -n "$NODE_DIR" ] && rm -rf "$NODE_DIR"
    NODE_PID=
}
trap stop_pinned_node EXIT

start_pinned_node() {
    local bin=$1 port=$2 admin_port=$3
    NODE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/moontide-bench-node.XXXXXX")
    taskset -c 0 "$bin" serve --data-dir "$NODE_DIR/data" --listen "127.0.0.1:$port" \
        --admin "127.0.0.1:$admin_port" --workers 1 >"$NODE_DIR/out" 2>"$NODE_DIR/err" &
    NODE_PID=$!
    local _
    for _ in $(seq 100); do
        grep -q "admin API listening" "$NODE_DIR/out" 2>/dev/null && break
        sleep 0.1
    done
    if ! grep -q "admin API listening" "$NODE_DIR/out"; then
        echo "moontide did not start:" >&2
        cat "$NODE_DIR/err" >&2
        exit 2
    fi
    NODE_TOKEN=$(cat "$NODE_DIR/data/admin.token")
}
