//! Cold start of one instance (issue 4: "state + init: p50 ≤ 100 µs"): times
//! `Instance::new` (Luau state, sandbox, modules, `ctx`, running the module's init code) of
//! `bench/functions/hello.lua` two ways:
//! - **growing**: `count` instances kept alive one after another, as a pool scaling up
//!   from zero on a fresh process does (every page is new to the process);
//! - **churn**: each instance dropped before the next is made, as a node that scales
//!   functions up and down does (the allocator reuses freed memory).
//!
//! Reports p50/p90/p99/max of each, the Lua heap of one instance and the process RSS each
//! live instance adds.
//!
//! `cargo run --release -p moontide-runtime --example cold_start [count]` (`bench/cold_start.sh`
//! pins it to one core).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moontide_runtime::{
    Engine, EngineConfig, FunctionSource, Instance, InstanceSpec, Limits, LogLevel, LogSink,
    compile,
};

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("count is a number"))
        .unwrap_or(5_000);
    let source = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/functions/hello.lua"),
    )
    .expect("bench/functions/hello.lua");
    let engine = Engine::new(&EngineConfig::default()).expect("engine");
    let compiled = Arc::new(compile(&FunctionSource::single(&source)).expect("compiles"));
    let spec = InstanceSpec {
        function_name: Arc::from("hello"),
        version: 1,
        limits: Limits::default(),
        env: Arc::new(BTreeMap::new()),
        log: Arc::new(Discard),
        kind: moontide_runtime::UnitKind::Function,
        egress: moontide_runtime::FunctionEgress::none(),
    };
    // Warm the allocator and code paths.
    for _ in 0..100 {
        drop(
            Instance::new(&engine, &compiled, &spec)
                .await
                .expect("instance"),
        );
    }
    let rss_before = rss_bytes();
    let mut live = Vec::with_capacity(count);
    let mut growing = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let instance = Instance::new(&engine, &compiled, &spec)
            .await
            .expect("instance");
        growing.push(started.elapsed());
        live.push(instance);
    }
    let rss_per_instance = rss_bytes().saturating_sub(rss_before) / count;
    let heap = live[0].used_memory();
    drop(live);
    let mut churn = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let instance = Instance::new(&engine, &compiled, &spec)
            .await
            .expect("instance");
        churn.push(started.elapsed());
        drop(instance);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "| mode | instances | p50 (µs) | p90 (µs) | p99 (µs) | max (µs) | Lua heap (KiB) | RSS per live instance (KiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (mode, mut times) in [("growing", growing), ("churn", churn)] {
        times.sort();
        println!(
            "| {mode} | {count} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            us(percentile(&times, 0.5)),
            us(percentile(&times, 0.9)),
            us(percentile(&times, 0.99)),
            us(times[times.len() - 1]),
            heap as f64 / 1024.0,
            rss_per_instance as f64 / 1024.0,
        );
    }
}
