#!/usr/bin/env bash
# What a huge `redis` reply costs: LRANGE of 1M and 3M short strings through the `redis`
# module, in instances of 64 MiB and 512 MiB. Prints each call's answer, its wall time and
# the node's peak RSS (VmHWM). Each function is called twice and the second call is
# reported: the first, on an I/O thread, is ended by the blocking cap while it converts
# the reply (host work the interrupt cannot stop) and moves the function to the long-call
# thread. Loopback only; needs redis-server and redis-cli (scripts/install-test-deps.sh).
#
#   bench/redis_big_reply.sh               # BIN=target/release/moontide (built first)
#   BIN=path/to/moontide bench/redis_big_reply.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
if [ -z "${BIN:-}" ]; then
    (cd "$REPO" && cargo build --release -q -p moontide)
    BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/moontide"
fi
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RPORT=$(free_port); DPORT=$(free_port); APORT=$(free_port)
DIR=$(mktemp -d)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
RPID=$!
NPID=
trap 'kill $RPID $NPID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
for n in 1000000 3000000; do
    redis-cli -p "$RPORT" eval "for i=1,$n,1000 do local t={} for j=i,math.min(i+999,$n) do t[#t+1]='item'..j end redis.call('rpush','l$n',unpack(t)) end return 1" 0 >/dev/null
done
"$BIN" serve --listen "127.0.0.1:$DPORT" --admin "127.0.0.1:$APORT" --workers 2 \
    --data-dir "$DIR/data" --redis "redis://127.0.0.1:$RPORT" >"$DIR/node.log" 2>&1 &
NPID=$!
for _ in $(seq 100); do curl -sf "localhost:$APORT/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$(cat "$DIR/data/admin.token")
for mem in 64MiB 512MiB; do
    for n in 1000000 3000000; do
        name=lr_${n}_${mem}
        curl -sf -X PUT "localhost:$APORT/v1/functions/$name" -H "authorization: Bearer $TOKEN" \
            -d "{\"source\": \"local redis = require('redis') return function() return #redis.call('LRANGE', 'l$n', 0, -1) end\", \"config\": {\"memory\": \"$mem\", \"timeout\": \"30s\"}}" >/dev/null
        node_pid=$(curl -s "localhost:$APORT/v1/status" -H "authorization: Bearer $TOKEN" \
            | python3 -c 'import json,sys;print(json.load(sys.stdin)["node"]["pid"])')
        curl -s -m 60 "localhost:$DPORT/fn/$name" >/dev/null
        start=$(date +%s.%N)
        out=$(curl -s -m 60 -w ' %{http_code}' "localhost:$DPORT/fn/$name" | cut -c1-60)
        end=$(date +%s.%N)
        hwm=$(awk '/VmHWM/ {print $2}' "/proc/$node_pid/status")
        printf '%-20s %-62s %6.2fs  node peak RSS %d MiB\n' "$name" "$out" \
            "$(echo "$end - $start" | bc)" $((hwm / 1024))
    done
done
