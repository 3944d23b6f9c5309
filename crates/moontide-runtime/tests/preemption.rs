//! Forced yields never change what a program computes (issue 13 §2): every program of
//! `tests/hostile/forced_yield/` answers the same in a bare Luau state (no limits, no
//! interrupt), in a real instance with the production timeslice, and in one that preempts
//! at every safepoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moontide_runtime::{
    CallError, Engine, EngineConfig, FunctionSource, Instance, InstanceSpec, Limits, LogLevel,
    LogSink, UnitKind, compile,
};

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile/forced_yield");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/hostile/forced_yield exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "lua"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "the corpus is in {}", dir.display());
    files
}

/// The program's answer with no limits at all: a plain sandboxed state, handler called
/// directly, under the chunk name instances use.
fn bare(source: &str) -> String {
    let lua = mlua::Lua::new();
    lua.sandbox(true).unwrap();
    let handler: mlua::Function = lua.load(source).set_name("=main.lua").eval().unwrap();
    handler.call::<String>(()).unwrap()
}

fn spec(timeout: Duration) -> InstanceSpec {
    InstanceSpec {
        function_name: Arc::from("preempted"),
        version: 1,
        limits: Limits {
            timeout,
            ..Limits::default()
        },
        env: Arc::new(BTreeMap::new()),
        log: Arc::new(Discard),
        kind: UnitKind::Function,
        egress: moontide_runtime::FunctionEgress::none(),
    }
}

async fn limited(
    engine: &Engine,
    source: &str,
    slice: Option<Duration>,
) -> Result<String, CallError> {
    let compiled = Arc::new(compile(&FunctionSource::single(source)).expect("compiles"));
    let instance = Instance::new(engine, &compiled, &spec(Duration::from_secs(120)))
        .await
        .expect("instance");
    if let Some(slice) = slice {
        instance.set_timeslice(slice);
    }
    let json = instance.invoke_json(&serde_json::json!({}), "r").await?;
    Ok(serde_json::from_slice::<String>(&json).expect("a string result"))
}

#[tokio::test(flavor = "current_thread")]
async fn forced_yields_do_not_change_results() {
    let engine = Engine::new(&EngineConfig::default()).unwrap();
    for path in corpus() {
        let source = std::fs::read_to_string(&path).unwrap();
        let name = path.display();
        let expected = bare(&source);
        let sliced = limited(&engine, &source, None).await;
        assert_eq!(
            sliced.as_deref(),
            Ok(expected.as_str()),
            "{name}, 2 ms slices"
        );
        if !source.contains("-- tiny-slice: skip") {
            let tiny = limited(&engine, &source, Some(Duration::ZERO)).await;
            assert_eq!(
                tiny.as_deref(),
                Ok(expected.as_str()),
                "{name}, every safepoint"
            );
        }
    }
}

/// The issue's hostile variant: a wrapped coroutine that never ends is ended by the
/// deadline, instead of returning at its first forced yield.
#[tokio::test(flavor = "current_thread")]
async fn a_wrapped_spin_times_out() {
    let engine = Engine::new(&EngineConfig::default()).unwrap();
    let source = "return function() coroutine.wrap(function() while true do end end)() return 'returned' end";
    let compiled = Arc::new(compile(&FunctionSource::single(source)).unwrap());
    let instance = Instance::new(&engine, &compiled, &spec(Duration::from_millis(100)))
        .await
        .unwrap();
    let outcome = instance.invoke_json(&serde_json::json!({}), "r").await;
    assert_eq!(outcome, Err(CallError::Timeout));
}

/// An async host call inside a tenant coroutine waits for its I/O and returns its value
/// (mlua's pending marker is passed on to the host, never seen by the tenant).
#[tokio::test(flavor = "current_thread")]
async fn async_host_calls_work_inside_tenant_coroutines() {
    let engine = Engine::new(&EngineConfig::default()).unwrap();
    let source = r#"
        local time = require("time")
        return function()
          local co = coroutine.create(function()
            time.sleep(5)
            local v = coroutine.yield("slept")
            time.sleep(1)
            return v .. "!"
          end)
          local a = { coroutine.resume(co) }
          local b = { coroutine.resume(co, "again") }
          local w = coroutine.wrap(function() time.sleep(1) return "wrapped" end)()
          return table.concat({ tostring(a[1]), a[2], tostring(b[1]), b[2], w }, " ")
        end"#;
    let answer = limited(&engine, source, None).await;
    assert_eq!(answer.as_deref(), Ok("true slept true again! wrapped"));
    let answer = limited(&engine, source, Some(Duration::ZERO)).await;
    assert_eq!(answer.as_deref(), Ok("true slept true again! wrapped"));
}

/// A tenant cannot name its code like the host's preemption machinery (which forced
/// yields skip): such a chunk name is renamed.
#[tokio::test(flavor = "current_thread")]
async fn reserved_chunk_names_are_renamed() {
    let engine = Engine::new(&EngineConfig::default()).unwrap();
    let source = r#"
        return function()
          local out = {}
          for _, name in ipairs({ "=moontide:coroutine", "=__mlua_async_poll", "@moontide:x", "=mine" }) do
            local f = loadstring("error('here')", name)
            out[#out + 1] = tostring(select(2, pcall(f)))
          end
          local g = load("error('there')", "=moontide:coroutine")
          out[#out + 1] = tostring(select(2, pcall(g)))
          return table.concat(out, " | ")
        end"#;
    let answer = limited(&engine, source, None).await;
    assert_eq!(
        answer.as_deref(),
        Ok(
            "user:=moontide:coroutine:1: here | user:=__mlua_async_poll:1: here | \
            user:@moontide:x:1: here | mine:1: here | user:=moontide:coroutine:1: there"
        )
    );
}
