#!/usr/bin/env bash
# What the first request to a function with no instance costs (issue 4: "first request after
# scale to zero adds <= 1 ms at p99").
#
#   bench/scale_from_zero.sh          # N=1000 functions, ROUNDS=3
#
# One node (`serve --workers 1` pinned to CPU 0; the client pinned to CPU 1). N copies of
# bench/functions/hello.lua are deployed (none has an instance: min is 0). Then, per round:
# pass 1 calls each function once, one request at a time on one keep-alive connection —
# every call finds zero instances, so it pays the cold start on the request path (exactly
# the path of a function scaled to zero); pass 2 calls each again (warm: the instance
# stays for the idle grace). The client times each request; the report gives p50/p99 of
# both passes and their difference, and checks from /metrics that pass 1 made N cold
# starts and pass 2 none. Rounds after the first use fresh functions (redeployed names).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
N=${N:-1000}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18490}
ADMIN_PORT=${ADMIN_PORT:-18491}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}

if [ -z "${MOONTIDE_BIN:-}" ]; then
    (cd "$REPO" && cargo build --release -q -p moontide)
    MOONTIDE_BIN=$REPO/target/release/moontide
fi
# shellcheck source=lib/node.sh
. "$HERE/lib/node.sh"
start_pinned_node "$MOONTIDE_BIN" "$PORT" "$ADMIN_PORT"

mkdir -p "$RESULTS_DIR"
taskset -c 1 python3 - "$N" "$ROUNDS" "$PORT" "$ADMIN_PORT" "$NODE_TOKEN" \
    "$REPO/bench/functions/hello.lua" <<'PY' | tee "$RESULTS_DIR/scale_from_zero.md"
import http.client, json, re, sys, time
n, rounds, port, admin_port, token, path = sys.argv[1:7]
n, rounds = int(n), int(rounds)
source = open(path).read()
admin = http.client.HTTPConnection("127.0.0.1", int(admin_port))
data = http.client.HTTPConnection("127.0.0.1", int(port))
auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

def cold_starts():
    admin.request("GET", "/metrics", headers=auth)
    text = admin.getresponse().read().decode()
    return sum(float(v) for v in re.findall(r'^moontide_cold_starts_total\{[^}]*\} (\S+)$', text, re.M))

def call(name):
    started = time.perf_counter()
    data.request("GET", f"/fn/{name}")
    response = data.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        sys.exit(f"{name}: {response.status} {body[:200]!r}")
    return elapsed

def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round((len(values) - 1) * p))]

print(f"### First request to a function with no instance (`N={n} ROUNDS={rounds} bench/scale_from_zero.sh`)")
print()
print("| round | cold p50 (ms) | cold p99 (ms) | warm p50 (ms) | warm p99 (ms) | p99 added (ms) | cold starts pass 1 / pass 2 |")
print("|---:|---:|---:|---:|---:|---:|---:|")
added = []
for r in range(rounds):
    names = [f"z{r}_{i}" for i in range(n)]
    for name in names:
        admin.request("PUT", f"/v1/functions/{name}", body=json.dumps({"source": source}), headers=auth)
        response = admin.getresponse(); response.read()
        if response.status != 201:
            sys.exit(f"deploy {name}: {response.status}")
    call("z0_0")  # the connection is warm
    before = cold_starts()
    cold = [call(name) for name in names]
    middle = cold_starts()
    warm = [call(name) for name in names]
    after = cold_starts()
    ms = lambda s: s * 1e3
    added.append(ms(pct(cold, 0.99) - pct(warm, 0.99)))
    print(f"| {r + 1} | {ms(pct(cold, .5)):.3f} | {ms(pct(cold, .99)):.3f} | {ms(pct(warm, .5)):.3f} | "
          f"{ms(pct(warm, .99)):.3f} | {added[-1]:.3f} | {middle - before:.0f} / {after - middle:.0f} |")
print()
print(f"worst p99 added by the cold start: {max(added):.3f} ms (target <= 1 ms)")
PY
