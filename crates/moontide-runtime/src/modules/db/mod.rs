//! The `db` module (`require("db")`, also `require("database")`): SQL on the function's
//! own embedded SQLite database, `<data-dir>/db/<function>.sqlite` ([`pool`]).
//!
//! Lua API (documented in `docs/lua-api.md`):
//! - `db.query(sql, ...)` → an array of rows, each a table keyed by column name.
//! - `db.execute(sql, ...)` → `{changes = n, last_insert_id = id}`.
//! - `db.transaction(fn, ...)` → what `fn(...)` returns: `BEGIN IMMEDIATE`, `fn`, `COMMIT`;
//!   an error in `fn` rolls back and is raised again. Every `db.query`/`db.execute` of the
//!   same call inside `fn` runs on the transaction's connection; nesting is refused.
//! - `db.null`: SQL NULL in rows and parameters (the same value as `json.null`).
//!
//! Parameters are bound (`?`, `?N`, `:name` by position), never spliced into the text;
//! one statement per call. Values convert as [`value`] says. Every failure raises
//! `db.NAME: message`, SQLite's own message where it has one (`db.query: no such table:
//! users`); a result larger than the instance's free memory is a memory error.
//!
//! The calling instance yields while a statement runs on a blocking thread, so a slow
//! query holds no worker. The statement stops at the call's deadline or when the call is
//! dropped. A transaction holds its connection until it ends; if its call ends first
//! (timeout, an abandoned coroutine), the connection is rolled back and returned when the
//! call ends ([`call_ended`]).

pub mod pool;
pub mod value;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mlua::chunk::{ChunkMode, Compiler};
use mlua::{Function, Lua, MultiValue, Table, Value};

use crate::sandbox;
pub use pool::{Database, Databases, DbConfig, DbError};
use pool::{Lease, Op};
use value::SqlValue;

/// What every call raises on a node without a database directory (tests, tools).
pub const NOT_CONFIGURED: &str = "no database is configured on this node";

/// Deadline of a statement run outside any call's deadline (never in a served call).
const NO_DEADLINE: Duration = Duration::from_secs(3600);

/// How long after its call's deadline a statement stops by itself: a backstop. The call's
/// end cancels it first ([`call_ended`]), so the call fails as a timeout, not with the
/// statement's error.
const DEADLINE_GRACE: Duration = Duration::from_millis(50);

/// A transaction's connection, per call: idle between statements, or lent to one.
enum Held {
    Idle(Lease),
    InUse,
}

/// The module's per-instance state.
struct Db {
    database: Result<Arc<Database>, String>,
    memory_bytes: usize,
    /// Open transactions by call ([`sandbox::current_call`]).
    held: RefCell<HashMap<usize, Held>>,
    /// Statements in flight by call, cancelled when their call ends.
    running: RefCell<HashMap<usize, Vec<Arc<Op>>>>,
}

fn failure(function: &str, error: DbError) -> mlua::Error {
    match error {
        DbError::TooLarge(_) => mlua::Error::MemoryError(format!("db.{function}: {error}")),
        other => mlua::Error::runtime(format!("db.{function}: {other}")),
    }
}

impl Db {
    /// A connection for a statement of call `key`: its transaction's, or one of the pool.
    /// The flag says which.
    async fn acquire(
        &self,
        function: &str,
        key: usize,
        wait: Duration,
    ) -> mlua::Result<(Lease, bool)> {
        if let Some(slot) = self.held.borrow_mut().get_mut(&key) {
            return match std::mem::replace(slot, Held::InUse) {
                Held::Idle(lease) => Ok((lease, true)),
                Held::InUse => Err(mlua::Error::runtime(format!(
                    "db.{function}: the transaction's connection is busy (one statement at \
                     a time per transaction)"
                ))),
            };
        }
        let database = self
            .database
            .as_ref()
            .map_err(|message| mlua::Error::runtime(format!("db.{function}: {message}")))?;
        let lease = database
            .lease(wait)
            .await
            .map_err(|e| failure(function, e))?;
        Ok((lease, false))
    }

    /// Gives a transaction's connection back to its slot (if the call still holds one);
    /// any other lease goes back to the pool when dropped.
    fn release(&self, key: usize, lease: Option<Lease>, in_transaction: bool) {
        if !in_transaction {
            return;
        }
        let mut held = self.held.borrow_mut();
        match (held.get_mut(&key), lease) {
            (Some(slot), Some(lease)) => *slot = Held::Idle(lease),
            (Some(_), None) => {
                held.remove(&key);
            }
            (None, _) => {}
        }
    }

    /// Runs `op` for call `key` on the right connection.
    async fn statement<R, F>(&self, function: &str, lua: &Lua, op: F) -> mlua::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<R, DbError> + Send + 'static,
    {
        let (key, remaining) = sandbox::current_call(lua);
        let remaining = remaining.unwrap_or(NO_DEADLINE);
        let deadline = Instant::now() + remaining + DEADLINE_GRACE;
        let (lease, in_transaction) = self.acquire(function, key, remaining).await?;
        let (lease, result) = self.run(key, lease, deadline, op).await;
        self.release(key, lease, in_transaction);
        match result {
            Ok(value) => Ok(value),
            Err(DbError::Cancelled) => {
                // Past the deadline: the call's timeout, as the interrupt would record it.
                sandbox::check_host_limits(lua)?;
                Err(failure(function, DbError::Cancelled))
            }
            Err(e) => Err(failure(function, e)),
        }
    }

    /// [`pool::run`], with the statement registered under its call so that the call's
    /// end cancels it.
    async fn run<R, F>(
        &self,
        key: usize,
        lease: Lease,
        deadline: Instant,
        work: F,
    ) -> (Option<Lease>, Result<R, DbError>)
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<R, DbError> + Send + 'static,
    {
        let op = Arc::new(Op::default());
        self.running
            .borrow_mut()
            .entry(key)
            .or_default()
            .push(op.clone());
        let outcome = pool::run(lease, deadline, op.clone(), work).await;
        let mut running = self.running.borrow_mut();
        if let Some(ops) = running.get_mut(&key) {
            ops.retain(|other| !Arc::ptr_eq(other, &op));
            if ops.is_empty() {
                running.remove(&key);
            }
        }
        outcome
    }
}

/// SQL text and bound parameters of a `db.query`/`db.execute` call.
fn parse(function: &str, args: MultiValue) -> mlua::Result<(String, Vec<SqlValue>)> {
    let mut args = args.into_iter();
    let sql = match args.next() {
        Some(Value::String(s)) => s.to_str()?.to_string(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "db.{function}: bad argument #1: expected SQL text (string), got {}",
                other.as_ref().map_or("no value", Value::type_name)
            )));
        }
    };
    let params = args
        .enumerate()
        .map(|(i, value)| value::param(function, i + 2, &value))
        .collect::<mlua::Result<Vec<_>>>()?;
    Ok((sql, params))
}

/// Ends the transactions call `key` left open (rolled back as their connections return):
/// the instance calls it when a call ends, however it ended.
pub(crate) fn call_ended(lua: &Lua, key: usize) {
    if let Some(db) = lua.app_data_ref::<Rc<DbCalls>>() {
        db.ended(key);
    }
}

/// The instance's `db` states (one per `require`d module table; usually one), for
/// [`call_ended`].
#[derive(Default)]
pub(crate) struct DbCalls(RefCell<Vec<std::rc::Weak<Db>>>);

impl DbCalls {
    fn ended(&self, key: usize) {
        for db in self.0.borrow().iter().filter_map(std::rc::Weak::upgrade) {
            let removed = db.held.borrow_mut().remove(&key);
            drop(removed);
            let running = db.running.borrow_mut().remove(&key);
            for op in running.into_iter().flatten() {
                op.cancel();
            }
        }
    }
}

/// `db.transaction` in Lua: `fn` must run in the caller's own coroutine (so the host's
/// timeslicing and the call's deadline apply as everywhere), between two host calls.
const TRANSACTION: &str = r#"
local begin, finish, pcall, error, type, pack, unpack = ...
return function(fn, ...)
  if type(fn) ~= "function" then
    error("db.transaction: bad argument #1: expected a function, got " .. type(fn), 2)
  end
  begin()
  local results = pack(pcall(fn, ...))
  finish(results[1])
  if not results[1] then error(results[2], 0) end
  return unpack(results, 2, results.n)
end
"#;

/// Builds the `db` module table for `function` (`databases` is the node's; none on a
/// node without a data dir). `memory_bytes` is the instance's cap, which bounds a result.
pub fn module(
    lua: &Lua,
    databases: Option<&Arc<Databases>>,
    function: &str,
    memory_bytes: usize,
) -> mlua::Result<Table> {
    let database = match databases {
        Some(databases) => databases.database(function),
        None => Err(NOT_CONFIGURED.to_string()),
    };
    let db = Rc::new(Db {
        database,
        memory_bytes,
        held: RefCell::default(),
        running: RefCell::default(),
    });
    if lua.app_data_ref::<Rc<DbCalls>>().is_none() {
        lua.set_app_data(Rc::new(DbCalls::default()));
    }
    if let Some(calls) = lua.app_data_ref::<Rc<DbCalls>>() {
        calls.0.borrow_mut().push(Rc::downgrade(&db));
    }

    let table = lua.create_table_with_capacity(0, 4)?;
    table.raw_set("null", Value::NULL)?;

    let state = db.clone();
    let query = lua.create_async_function(move |lua, args: MultiValue| {
        let db = state.clone();
        let parsed = parse("query", args);
        async move {
            let (sql, params) = parsed?;
            let budget = db.memory_bytes.saturating_sub(lua.used_memory());
            let rows = db
                .statement("query", &lua, move |connection| {
                    value::query(connection, &sql, &params, budget)
                })
                .await?;
            value::to_lua(&lua, rows)
        }
    })?;
    table.raw_set("query", query)?;

    let state = db.clone();
    let execute = lua.create_async_function(move |lua, args: MultiValue| {
        let db = state.clone();
        let parsed = parse("execute", args);
        async move {
            let (sql, params) = parsed?;
            let (changes, last_insert_id) = db
                .statement("execute", &lua, move |connection| {
                    value::execute(connection, &sql, &params)
                })
                .await?;
            let result = lua.create_table_with_capacity(0, 2)?;
            result.raw_set("changes", changes as f64)?;
            result.raw_set("last_insert_id", last_insert_id as f64)?;
            Ok(result)
        }
    })?;
    table.raw_set("execute", execute)?;

    let state = db.clone();
    let begin = lua.create_async_function(move |lua, ()| {
        let db = state.clone();
        async move {
            let (key, remaining) = sandbox::current_call(&lua);
            if db.held.borrow().contains_key(&key) {
                return Err(mlua::Error::runtime(
                    "db.transaction: already in a transaction (transactions do not nest)",
                ));
            }
            db.held.borrow_mut().insert(key, Held::InUse);
            let remaining = remaining.unwrap_or(NO_DEADLINE);
            let deadline = Instant::now() + remaining + DEADLINE_GRACE;
            let lease = match db.acquire_fresh(remaining).await {
                Ok(lease) => lease,
                Err(e) => {
                    db.held.borrow_mut().remove(&key);
                    return Err(e);
                }
            };
            let (lease, result) = db
                .run(key, lease, deadline, |connection| {
                    value::batch(connection, "BEGIN IMMEDIATE")
                })
                .await;
            match result {
                Ok(()) => {
                    db.release(key, lease, true);
                    Ok(())
                }
                Err(e) => {
                    db.held.borrow_mut().remove(&key);
                    Err(failure("transaction", e))
                }
            }
        }
    })?;

    let state = db.clone();
    let finish = lua.create_async_function(move |lua, commit: bool| {
        let db = state.clone();
        async move {
            let (key, remaining) = sandbox::current_call(&lua);
            let slot = db.held.borrow_mut().remove(&key);
            let lease = match slot {
                Some(Held::Idle(lease)) => lease,
                Some(Held::InUse) | None if !commit => return Ok(()),
                _ => {
                    return Err(mlua::Error::runtime(
                        "db.transaction: the transaction's connection was lost (a statement \
                         of it is still running or failed)",
                    ));
                }
            };
            let deadline = Instant::now() + remaining.unwrap_or(NO_DEADLINE) + DEADLINE_GRACE;
            let sql = if commit { "COMMIT" } else { "ROLLBACK" };
            // The lease is dropped after: a failed COMMIT is rolled back then.
            let (_lease, result) = db
                .run(key, lease, deadline, move |connection| {
                    value::batch(connection, sql)
                })
                .await;
            result.map_err(|e| failure("transaction", e))
        }
    })?;

    let globals = lua.globals();
    let table_lib: Table = globals.get("table")?;
    let unpack: Function = match table_lib.get::<Value>("unpack")? {
        Value::Function(f) => f,
        _ => globals.get("unpack")?,
    };
    let transaction: Function = lua
        .load(transaction_bytecode())
        .set_name("=db.transaction")
        .set_mode(ChunkMode::Binary)
        .call((
            begin,
            finish,
            globals.get::<Function>("pcall")?,
            globals.get::<Function>("error")?,
            globals.get::<Function>("type")?,
            table_lib.get::<Function>("pack")?,
            unpack,
        ))?;
    table.raw_set("transaction", transaction)?;
    Ok(table)
}

fn transaction_bytecode() -> &'static [u8] {
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    BYTECODE.get_or_init(|| {
        Compiler::new()
            .compile(TRANSACTION)
            .expect("db.transaction compiles")
    })
}

impl Db {
    /// A connection from the pool (not the call's transaction's).
    async fn acquire_fresh(&self, wait: Duration) -> mlua::Result<Lease> {
        let database = self
            .database
            .as_ref()
            .map_err(|message| mlua::Error::runtime(format!("db.transaction: {message}")))?;
        database
            .lease(wait)
            .await
            .map_err(|e| failure("transaction", e))
    }
}

#[cfg(test)]
mod tests;
