#!/usr/bin/env bash
# What per-call limits cost a CPU-bound function, and how quickly a runaway call is
# stopped. See crates/moontide-runtime/examples/cpu_cost.rs for the workloads.
#
#   bench/cpu_cost.sh              # ROUNDS=9, pinned to CPU 0 (clock thread included)
#   ROUNDS=15 CPUS=0,1 bench/cpu_cost.sh
#
# Both sides run in one process, alternating call by call (A B A B ...), so drift of the
# machine hits both alike; the table reports the median per side and the ratio.
# Output: stdout and bench/results/cpu_cost.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-9}"
CPUS="${CPUS:-0}"
RESULTS_DIR="${RESULTS_DIR:-bench/results}"
mkdir -p "$RESULTS_DIR"
cargo build --release --locked -p moontide-runtime --example cpu_cost >&2
{
  echo "# cpu_cost — $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F), CPUs $CPUS, $ROUNDS rounds"
  echo
  taskset -c "$CPUS" target/release/examples/cpu_cost "$ROUNDS"
} | tee "$RESULTS_DIR/cpu_cost.md"
