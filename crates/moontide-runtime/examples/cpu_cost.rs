//! What the per-call limits cost a CPU-bound function (issue 3: "within 5% of its speed
//! without limits").
//!
//! Each workload runs two ways in alternation (A B A B …):
//! - **bare**: a plain Luau state with the same sandbox flag, the handler called directly —
//!   no interrupt, no memory cap, no coroutine, no deadline;
//! - **limited**: a real [`Instance`] with the default limits (timeout and memory cap raised
//!   so the work fits; both are armed and enforced), called through `invoke_json` as the data plane does.
//!
//! It prints the median time per call for each and the ratio limited / bare. Run it pinned
//! to one core (`bench/cpu_cost.sh` does): `cargo run --release -p moontide-runtime
//! --example cpu_cost [rounds]`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moontide_runtime::{
    Engine, EngineConfig, FunctionSource, Instance, InstanceSpec, Limits, LogLevel, LogSink,
    compile,
};

/// CPU-bound handlers, each taking tens of milliseconds: long enough that per-call
/// overhead vanishes and the interrupt path (loop back-edges, calls) dominates.
const WORKLOADS: &[(&str, &str)] = &[
    (
        "numeric-loop",
        "return function() local s = 0 for i = 1, 20000000 do s = s + i % 7 end return s end",
    ),
    (
        "fib-recursion",
        "local function fib(n) if n < 2 then return n end return fib(n-1) + fib(n-2) end
         return function() return fib(27) end",
    ),
    (
        "while-loop",
        "return function() local i, s = 0, 0 while i < 20000000 do i = i + 1 s = s + i end return s end",
    ),
    (
        "table-sort",
        "return function()
           local t = {} local x = 1
           for i = 1, 200000 do x = (x * 1103515245 + 12345) % 2147483648 t[i] = x end
           table.sort(t, function(a, b) return a > b end)
           return t[1]
         end",
    ),
    (
        // Every resume goes through the sandbox's coroutine wrappers (`preempt`); bare
        // runs Luau's own.
        "coroutine-generator",
        "return function()
           local gen = coroutine.wrap(function() for i = 1, 300000 do coroutine.yield(i) end end)
           local s = 0
           for _ = 1, 300000 do s = s + gen() end
           return s
         end",
    ),
    (
        // Every pcall goes through the sandbox's `pcall` (`lua_errors`: a host function's
        // error reaches Lua as a string); bare runs Luau's own. One call in 16 fails.
        "pcall-loop",
        "local function f(i) if i % 16 == 0 then error('sixteenth') end return i end
         return function()
           local s = 0
           for i = 1, 1000000 do local ok, v = pcall(f, i) if ok then s = s + v end end
           return s
         end",
    ),
    (
        "strings",
        "return function()
           local parts = {}
           for i = 1, 200000 do parts[#parts + 1] = string.format('%d:%s', i, ('x'):rep(i % 16)) end
           local s = table.concat(parts, ',')
           local n = 0 for _ in s:gmatch('%d+') do n = n + 1 end
           return n
         end",
    ),
];

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn bare_handler(lua: &mlua::Lua, source: &str) -> mlua::Function {
    lua.sandbox(true).expect("sandbox");
    lua.load(source).eval().expect("workload returns a handler")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("rounds is a number"))
        .unwrap_or(9);
    let engine = Engine::new(&EngineConfig::default()).expect("engine");
    let limits = Limits {
        timeout: Duration::from_secs(60),
        // The cap is armed as in production; it is raised only so the `strings` workload's
        // garbage fits between collections.
        memory_bytes: 512 << 20,
        ..Limits::default()
    };
    let spec = InstanceSpec {
        function_name: Arc::from("cpu"),
        version: 1,
        limits,
        env: Arc::new(BTreeMap::new()),
        log: Arc::new(Discard),
        kind: moontide_runtime::UnitKind::Function,
        egress: moontide_runtime::FunctionEgress::none(),
    };
    println!("| workload | bare (ms/call) | limited (ms/call) | limited / bare |");
    println!("|---|---:|---:|---:|");
    let mut worst: f64 = 0.0;
    for (name, source) in WORKLOADS {
        let compiled = Arc::new(compile(&FunctionSource::single(*source)).expect("compiles"));
        let instance = Instance::new(&engine, &compiled, &spec)
            .await
            .expect("instance");
        let lua = mlua::Lua::new();
        let handler = bare_handler(&lua, source);
        let payload = serde_json::json!({});
        // Warm both (page in, JIT-free but caches and allocator warm).
        handler.call::<mlua::Value>(()).expect("bare call");
        instance.invoke_json(&payload, "warm").await.expect("call");
        let (mut bare, mut limited) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let started = Instant::now();
            handler.call::<mlua::Value>(()).expect("bare call");
            bare.push(started.elapsed());
            let started = Instant::now();
            instance
                .invoke_json(&payload, &format!("r{round}"))
                .await
                .expect("limited call");
            limited.push(started.elapsed());
        }
        let (bare, limited) = (median(&mut bare), median(&mut limited));
        let ratio = limited.as_secs_f64() / bare.as_secs_f64();
        worst = worst.max(ratio);
        println!(
            "| {name} | {:.2} | {:.2} | {ratio:.3} |",
            bare.as_secs_f64() * 1e3,
            limited.as_secs_f64() * 1e3
        );
    }
    println!("\nworst ratio: {worst:.3} (target ≤ 1.05)\n");
    stop_margins(&engine, rounds).await;
}

/// How far past its budget a runaway call runs before it is stopped: each CPU attack of
/// the hostile corpus (`tests/hostile/cpu_*.lua`) with a 100 ms timeout.
async fn stop_margins(engine: &Engine, rounds: usize) {
    const BUDGET: Duration = Duration::from_millis(100);
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile");
    let mut attacks: Vec<_> = std::fs::read_dir(&corpus)
        .expect("tests/hostile exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("cpu_") && name.ends_with(".lua")
        })
        .collect();
    attacks.sort();
    let spec = InstanceSpec {
        function_name: Arc::from("attack"),
        version: 1,
        limits: Limits {
            timeout: BUDGET,
            ..Limits::default()
        },
        env: Arc::new(BTreeMap::new()),
        log: Arc::new(Discard),
        kind: moontide_runtime::UnitKind::Function,
        egress: moontide_runtime::FunctionEgress::none(),
    };
    println!(
        "Stop margin: time past a {} ms budget until the call ends",
        BUDGET.as_millis()
    );
    println!("| attack | median overrun (ms) | max overrun (ms) |");
    println!("|---|---:|---:|");
    for path in attacks {
        let source = std::fs::read_to_string(&path).expect("readable attack");
        let compiled = Arc::new(compile(&FunctionSource::single(source)).expect("compiles"));
        let mut overruns = Vec::new();
        for round in 0..rounds {
            // A fresh instance each time: a timed-out instance is discarded in production.
            let instance = Instance::new(engine, &compiled, &spec)
                .await
                .expect("instance");
            let started = Instant::now();
            let outcome = instance
                .invoke_json(&serde_json::json!({}), &format!("a{round}"))
                .await;
            let elapsed = started.elapsed();
            assert!(
                matches!(outcome, Err(moontide_runtime::CallError::Timeout)),
                "{}: expected a timeout, got {outcome:?}",
                path.display()
            );
            overruns.push(elapsed.saturating_sub(BUDGET));
        }
        let max = *overruns.iter().max().expect("rounds > 0");
        let median = median(&mut overruns);
        println!(
            "| {} | {:.2} | {:.2} |",
            path.file_stem().and_then(|n| n.to_str()).unwrap_or("?"),
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
}
