#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need, checks formatting and
# lints, then runs every unit and integration test (real server processes on free loopback
# ports).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo nextest run --workspace --all-features --locked --no-fail-fast
# The README's first command is `cargo run --release -- serve ...`: cargo must pick the
# `moontide` binary (crates/moontide/tests/readme.rs runs the rest of it).
cargo run --locked -q -- --help >/dev/null
