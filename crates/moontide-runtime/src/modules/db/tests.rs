//! The `db` module on real SQLite files in a fresh directory: values, errors, refusals,
//! transactions, and the limits (deadline, memory, size cap) against hostile SQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::DbConfig;
use crate::{
    CallError, Engine, EngineConfig, FunctionEgress, FunctionSource, Instance, InstanceSpec,
    Limits, LogLevel, LogSink, UnitKind, compile,
};

struct NoLog;

impl LogSink for NoLog {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

/// A fresh directory under the system's temp dir (removed by the test when it passes).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "moontide-db-{name}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn engine(dir: &std::path::Path, max_bytes: u64) -> Engine {
    Engine::new(&EngineConfig {
        db: Some(DbConfig {
            dir: dir.join("db"),
            max_bytes,
        }),
        ..EngineConfig::default()
    })
    .unwrap()
}

async fn instance(engine: &Engine, function: &str, source: &str, limits: Limits) -> Instance {
    let compiled = Arc::new(compile(&FunctionSource::single(source)).unwrap());
    let spec = InstanceSpec {
        function_name: Arc::from(function),
        version: 1,
        limits,
        env: Arc::new(BTreeMap::new()),
        log: Arc::new(NoLog),
        kind: UnitKind::Function,
        egress: FunctionEgress::none(),
    };
    Instance::new(engine, &compiled, &spec)
        .await
        .unwrap_or_else(|e| panic!("instance: {e}"))
}

async fn call(instance: &Instance, event: Json) -> Result<Json, CallError> {
    let out = instance.invoke_json(&event, "r").await?;
    Ok(serde_json::from_slice(&out).unwrap())
}

/// A handler that runs `event.lua` (a chunk of Lua with `db` and `json` in scope).
const EVAL: &str = r#"
local db = require("db")
local json = require("json")
return function(event)
  local chunk = assert(loadstring(event.lua))
  setfenv(chunk, setmetatable({db = db, json = json}, {__index = _G}))
  return chunk()
end
"#;

fn short(timeout_ms: u64) -> Limits {
    Limits {
        timeout: Duration::from_millis(timeout_ms),
        ..Limits::default()
    }
}

async fn eval(instance: &Instance, lua: &str) -> Result<Json, CallError> {
    call(instance, json!({ "lua": lua })).await
}

fn runtime_error(result: Result<Json, CallError>) -> String {
    match result {
        Err(CallError::Runtime(message)) => message,
        other => panic!("expected a runtime error, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn values_round_trip_and_rows_are_tables_keyed_by_column() {
    let dir = scratch("values");
    let engine = engine(&dir, super::pool::DEFAULT_MAX_BYTES);
    let instance = instance(&engine, "values", EVAL, Limits::default()).await;
    let result = eval(
        &instance,
        r#"
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT, n, f REAL, b INTEGER)")
        local r1 = db.execute("INSERT INTO t (s, n, f, b) VALUES (?, ?, ?, ?)", "a", nil, 1.5, true)
        local r2 = db.execute("INSERT INTO t (s, n, f, b) VALUES (?, ?, ?, ?)", "b", db.null, 2, false)
        local rows = db.query("SELECT * FROM t WHERE id >= ? ORDER BY id", 1)
        return {
          first = r1, second = r2, count = #rows, row = rows[1],
          null_is_json_null = rows[1].n == json.null and db.null == json.null,
          encoded = json.encode(rows[2]),
          same_module = require("database") == db,
          none = #db.query("SELECT * FROM t WHERE id = ?", 99),
        }
        "#,
    )
    .await
    .unwrap();
    assert_eq!(result["first"], json!({"changes": 1, "last_insert_id": 1}));
    assert_eq!(result["second"], json!({"changes": 1, "last_insert_id": 2}));
    assert_eq!(result["count"], 2);
    assert_eq!(
        result["row"],
        json!({"id": 1, "s": "a", "n": null, "f": 1.5, "b": 1})
    );
    assert_eq!(result["null_is_json_null"], true);
    let encoded: Json = serde_json::from_str(result["encoded"].as_str().unwrap()).unwrap();
    assert_eq!(
        encoded,
        json!({"id": 2, "s": "b", "n": null, "f": 2, "b": 0})
    );
    assert_eq!(result["same_module"], true);
    assert_eq!(result["none"], 0);
    assert!(dir.join("db/values.sqlite").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn errors_carry_sqlite_messages_and_escapes_are_refused() {
    let dir = scratch("errors");
    let engine = engine(&dir, super::pool::DEFAULT_MAX_BYTES);
    let instance = instance(&engine, "errors", EVAL, Limits::default()).await;
    let message = runtime_error(eval(&instance, r#"return db.query("SELECT * FROM users")"#).await);
    assert!(
        message.contains("db.query: no such table: users"),
        "{message}"
    );
    for (sql, expected) in [
        ("ATTACH DATABASE 'other.sqlite' AS o", "not authorized"),
        ("PRAGMA max_page_count = 100000000", "not authorized"),
        ("PRAGMA synchronous = OFF", "not authorized"),
        ("SELECT load_extension('x')", "not authorized"),
        ("VACUUM INTO 'copy.sqlite'", ""),
        ("SELECT 1; SELECT 2", "one statement per call"),
    ] {
        let lua = format!("return db.execute({sql:?})");
        let message = runtime_error(eval(&instance, &lua).await);
        assert!(
            message.contains("db.execute: ") && message.contains(expected),
            "{sql}: {message}"
        );
    }
    // Read-only schema pragmas are allowed.
    eval(
        &instance,
        r#"db.execute("CREATE TABLE k (a)") return db.query("PRAGMA table_info(k)")"#,
    )
    .await
    .unwrap();
    let message = runtime_error(eval(&instance, r#"return db.query("SELECT ?", {})"#).await);
    assert!(message.contains("db.query: bad argument #2"), "{message}");
    let message = runtime_error(eval(&instance, r#"return db.query()"#).await);
    assert!(message.contains("db.query: bad argument #1"), "{message}");
    assert!(!dir.join("db/other.sqlite").exists());
    assert!(!dir.join("db/copy.sqlite").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn transactions_commit_roll_back_and_do_not_nest() {
    let dir = scratch("tx");
    let engine = engine(&dir, super::pool::DEFAULT_MAX_BYTES);
    let instance = instance(&engine, "tx", EVAL, Limits::default()).await;
    let result = eval(
        &instance,
        r#"
        db.execute("CREATE TABLE t (v)")
        local a, b = db.transaction(function(x)
          db.execute("INSERT INTO t VALUES (?)", x)
          return x, #db.query("SELECT * FROM t")
        end, "kept")
        local ok, err = pcall(db.transaction, function()
          db.execute("INSERT INTO t VALUES ('dropped')")
          error("boom")
        end)
        local nested_ok, nested = pcall(db.transaction, function()
          db.transaction(function() end)
        end)
        local rows = db.query("SELECT v FROM t")
        return {a = a, b = b, ok = ok, err = tostring(err), nested = tostring(nested),
                nested_ok = nested_ok, rows = rows}
        "#,
    )
    .await
    .unwrap();
    assert_eq!(result["a"], "kept");
    assert_eq!(result["b"], 1);
    assert_eq!(result["ok"], false);
    assert!(result["err"].as_str().unwrap().contains("boom"), "{result}");
    assert_eq!(result["nested_ok"], false);
    assert!(
        result["nested"].as_str().unwrap().contains("do not nest"),
        "{result}"
    );
    assert_eq!(result["rows"], json!([{"v": "kept"}]));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_runaway_query_ends_at_the_deadline_and_its_transaction_is_rolled_back() {
    let dir = scratch("runaway");
    let engine = engine(&dir, super::pool::DEFAULT_MAX_BYTES);
    let setup = instance(&engine, "runaway", EVAL, Limits::default()).await;
    eval(&setup, r#"db.execute("CREATE TABLE t (v)")"#)
        .await
        .unwrap();
    let hostile = instance(&engine, "runaway", EVAL, short(300)).await;
    let forever = r#"
        db.transaction(function()
          db.execute("INSERT INTO t VALUES ('lost')")
          return db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                           SELECT count(*) FROM c")
        end)"#;
    let result = eval(&hostile, forever).await;
    assert!(matches!(result, Err(CallError::Timeout)), "{result:?}");
    // The write lock is free again and the insert was rolled back: another instance
    // writes at once (a held lock would fail after the 5 s busy timeout).
    let result = eval(
        &setup,
        r#"db.execute("INSERT INTO t VALUES ('next')") return db.query("SELECT v FROM t")"#,
    )
    .await
    .unwrap();
    assert_eq!(result, json!([{"v": "next"}]));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn rows_count_toward_the_memory_cap_and_the_size_cap_holds() {
    let dir = scratch("memory");
    let engine = engine(&dir, 256 << 10);
    let limits = Limits {
        memory_bytes: 4 << 20,
        ..Limits::default()
    };
    let instance = instance(&engine, "memory", EVAL, limits).await;
    let result = eval(
        &instance,
        r#"return db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                            SELECT x, 'some text to fill memory' AS s FROM c")"#,
    )
    .await;
    assert!(matches!(result, Err(CallError::MemoryLimit)), "{result:?}");
    let message = runtime_error(
        eval(
            &instance,
            r#"db.execute("CREATE TABLE big (b)")
               for i = 1, 100 do db.execute("INSERT INTO big VALUES (zeroblob(10000))") end"#,
        )
        .await,
    );
    assert!(
        message.contains("db.execute: the database is full"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "current_thread")]
async fn functions_have_separate_databases_and_plugins_none() {
    let dir = scratch("separate");
    let engine = engine(&dir, super::pool::DEFAULT_MAX_BYTES);
    let a = instance(&engine, "a", EVAL, Limits::default()).await;
    let b = instance(&engine, "b", EVAL, Limits::default()).await;
    eval(&a, r#"db.execute("CREATE TABLE secrets (s)")"#)
        .await
        .unwrap();
    let message = runtime_error(eval(&b, r#"return db.query("SELECT * FROM secrets")"#).await);
    assert!(message.contains("no such table: secrets"), "{message}");
    let plugin = instance(&engine, "plugin:auth", EVAL, Limits::default()).await;
    let message = runtime_error(eval(&plugin, r#"return db.query("SELECT 1")"#).await);
    assert!(message.contains("has no database"), "{message}");
    let unconfigured = Engine::new(&EngineConfig::default()).unwrap();
    let none = instance(&unconfigured, "a", EVAL, Limits::default()).await;
    let message = runtime_error(eval(&none, r#"return db.query("SELECT 1")"#).await);
    assert!(message.contains(super::NOT_CONFIGURED), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}
