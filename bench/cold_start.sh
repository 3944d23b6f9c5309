#!/usr/bin/env bash
# Cold start of a `hello` instance (Luau state, sandbox, modules, init code), pinned to one
# core: `crates/moontide-runtime/examples/cold_start.rs`.
#
#   bench/cold_start.sh            # COUNT=5000 instances, ROUNDS=3, CPU=0
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
COUNT=${COUNT:-5000}
ROUNDS=${ROUNDS:-3}
CPU=${CPU:-0}
(cd "$REPO" && cargo build --release -q -p moontide-runtime --example cold_start)
for round in $(seq "$ROUNDS"); do
    out=$(taskset -c "$CPU" "$REPO/target/release/examples/cold_start" "$COUNT")
    if [ "$round" = 1 ]; then echo "$out"; else echo "$out" | tail -2; fi
done
