//! The node's embedded SQLite databases: one file per function at `<dir>/<function>.sqlite`
//! (the node passes `dir` = `<data-dir>/db` through `EngineConfig::db`), opened lazily,
//! with a pool of connections per database shared by every worker thread.
//!
//! Statements run on tokio's blocking threads (`spawn_blocking` of the calling worker's
//! current-thread runtime), so the calling instance yields and the worker serves other
//! calls meanwhile. Why not a dedicated thread per connection: a connection is only ever
//! used by one statement at a time and handed from thread to thread with it
//! (`rusqlite::Connection` is `Send`); the blocking pool already keeps idle threads for
//! reuse, so a statement costs one hand-off each way and no thread is owned by an idle
//! database.
//!
//! Every connection is set up the same way ([`Database::open`]): WAL,
//! `synchronous=FULL` (a call that answered after a write has it on disk, even after a
//! power loss — the promise the config store makes too; a WAL commit costs one fsync),
//! `busy_timeout` 5 s (writers of one database queue rather than fail), `max_page_count`
//! from the size cap, `SQLITE_LIMIT_ATTACHED = 0` and an authorizer that refuses
//! `ATTACH`/`DETACH`, `load_extension` and every `PRAGMA` but a few read-only schema
//! ones (a tenant cannot lift the size cap, turn off durability or reach another file).
//!
//! A statement stops when its call is over: the future that waits for it sets a flag when
//! dropped (the call's timeout, a client gone), and a progress handler checks that flag
//! and the call's deadline every 1000 SQLite VM steps. Chosen over `sqlite3_interrupt`
//! alone: an interrupt sent before the statement starts is lost, a flag is not.
//!
//! A connection goes back to the pool when its [`Lease`] is dropped, wherever that
//! happens (the blocking thread after a statement, a worker after a transaction); one
//! left inside a transaction (a cancelled `db.transaction`) is rolled back first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most connections open at once to one database; more statements wait for one (the
/// wait counts toward the call's timeout).
pub const MAX_CONNECTIONS_PER_DATABASE: usize = 8;

/// How long a writer waits for another connection's write lock before failing with
/// `database is locked`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The size cap of each database unless the node sets another.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// SQLite's page size for new databases (its default); the size cap is counted in pages.
const PAGE_SIZE: u64 = 4096;

/// Read-only pragmas a function may run (schema introspection).
const ALLOWED_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
];

/// Where the node keeps functions' databases and how large each may grow (node config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbConfig {
    /// The directory of the database files (`<data-dir>/db`), created on first use.
    pub dir: PathBuf,
    /// Size cap of one database, in bytes (rounded down to whole pages).
    pub max_bytes: u64,
}

impl DbConfig {
    pub fn new(dir: PathBuf) -> DbConfig {
        DbConfig {
            dir,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// Why a statement failed.
#[derive(Debug)]
pub enum DbError {
    /// SQLite's (or the module's) message.
    Sqlite(String),
    /// The rows would not fit in the instance's free memory (the budget, in bytes).
    TooLarge(usize),
    /// The database reached its size cap (in bytes).
    Full(u64),
    /// The call ended (its deadline, or the caller went away) while the statement ran.
    Cancelled,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Sqlite(message) => f.write_str(message),
            DbError::TooLarge(budget) => write!(
                f,
                "the result is larger than the instance's free memory ({budget} bytes)"
            ),
            DbError::Full(bytes) => write!(
                f,
                "the database is full (its size cap is {} MiB, or the disk is full)",
                bytes >> 20
            ),
            DbError::Cancelled => f.write_str("interrupted: the call ended"),
        }
    }
}

/// Every function's database on this node, by function name.
#[derive(Debug)]
pub struct Databases {
    config: DbConfig,
    open: parking_lot::Mutex<HashMap<String, Arc<Database>>>,
}

impl Databases {
    pub fn new(config: DbConfig) -> Databases {
        Databases {
            config,
            open: parking_lot::Mutex::default(),
        }
    }

    /// The database of `function` (its pool; the file is opened on first use). Only plain
    /// function names have one: a plugin (`plugin:NAME`) or a name that is not a file
    /// name gets an error.
    pub fn database(&self, function: &str) -> Result<Arc<Database>, String> {
        if !is_file_name(function) {
            return Err(format!("'{function}' has no database (functions only)"));
        }
        let mut open = self.open.lock();
        Ok(open
            .entry(function.to_string())
            .or_insert_with(|| {
                Arc::new(Database {
                    path: self.config.dir.join(format!("{function}.sqlite")),
                    max_bytes: self.config.max_bytes,
                    idle: parking_lot::Mutex::default(),
                    permits: Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_DATABASE)),
                })
            })
            .clone())
    }
}

/// A name usable as a file name: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// One database file and its pooled connections.
#[derive(Debug)]
pub struct Database {
    path: PathBuf,
    max_bytes: u64,
    idle: parking_lot::Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl Database {
    /// A connection of this database, waiting at most `wait` for one to be free. The
    /// connection itself is taken (or opened) on the blocking thread by [`run`].
    pub async fn lease(self: &Arc<Database>, wait: Duration) -> Result<Lease, DbError> {
        let permit = tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                DbError::Sqlite(format!(
                    "timed out waiting for a free connection ({MAX_CONNECTIONS_PER_DATABASE} \
                     per database)"
                ))
            })?
            .map_err(|_| DbError::Sqlite("the database pool is closed".into()))?;
        Ok(Lease {
            connection: None,
            database: self.clone(),
            _permit: permit,
        })
    }

    /// Opens and sets up a connection (blocking: file I/O).
    fn open(&self) -> Result<Connection, DbError> {
        let sqlite = |e: rusqlite::Error| DbError::Sqlite(e.to_string());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| DbError::Sqlite(format!("cannot create the database dir: {e}")))?;
        }
        let mut connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        connection
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                 PRAGMA foreign_keys = ON; PRAGMA max_page_count = {};",
                (self.max_bytes / PAGE_SIZE).max(1)
            ))
            .map_err(sqlite)?;
        connection
            .set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)
            .map_err(sqlite)?;
        connection.authorizer(Some(authorize)).map_err(sqlite)?;
        Ok(connection)
    }
}

/// The authorizer of tenant statements (see the module docs).
fn authorize(context: AuthContext<'_>) -> Authorization {
    match context.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Authorization::Deny,
        AuthAction::Function {
            function_name: "load_extension",
        } => Authorization::Deny,
        AuthAction::Pragma { pragma_name, .. }
            if !ALLOWED_PRAGMAS.contains(&pragma_name.to_ascii_lowercase().as_str()) =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }
}

/// A connection slot of one database (a pool permit), with its connection once taken.
/// Dropped, it rolls back any transaction left open and returns the connection.
pub struct Lease {
    connection: Option<Connection>,
    database: Arc<Database>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("database", &self.database.path)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The connection: an idle one of the pool, or a new one (blocking).
    fn connection(&mut self) -> Result<&mut Connection, DbError> {
        if self.connection.is_none() {
            let idle = self.database.idle.lock().pop();
            let connection = match idle {
                Some(connection) => connection,
                None => self.database.open()?,
            };
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("set above"))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let _ = connection.progress_handler(0, None::<fn() -> bool>);
        if !connection.is_autocommit() && connection.execute_batch("ROLLBACK").is_err() {
            return; // closed, not reused
        }
        self.database.idle.lock().push(connection);
    }
}

/// One statement in flight: its cancellation flag, and where its blocking task leaves the
/// connection when done. Why a spot and not the task's output: a call that ends (its
/// timeout) leaves its Lua coroutine, and the future waiting for the task inside it,
/// suspended until the state is collected; the connection must not wait for that.
#[derive(Default)]
pub struct Op {
    cancelled: AtomicBool,
    lease: parking_lot::Mutex<Option<Lease>>,
}

impl Op {
    /// Stops the statement (at its next progress check) and drops its connection if it
    /// is already done: rolled back and back in the pool.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let lease = self.lease.lock().take();
        drop(lease);
    }

    /// Hands back the connection the finished task left, unless cancelled.
    fn finish(&self, lease: Lease) {
        let mut spot = self.lease.lock();
        if self.cancelled.load(Ordering::SeqCst) {
            drop(spot);
            drop(lease);
        } else {
            *spot = Some(lease);
        }
    }
}

/// Cancels the statement when dropped while armed: the waiting future went away.
struct CancelOnDrop {
    op: Arc<Op>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.op.cancel();
        }
    }
}

/// Runs `work` on the lease's connection on a blocking thread, stopped by the progress
/// handler once `deadline` passes or `op` is cancelled (as it is when this future is
/// dropped). Returns the lease (none if cancelled or the task panicked) with the result.
pub async fn run<R, F>(
    mut lease: Lease,
    deadline: Instant,
    op: Arc<Op>,
    work: F,
) -> (Option<Lease>, Result<R, DbError>)
where
    R: Send + 'static,
    F: FnOnce(&Connection) -> Result<R, DbError> + Send + 'static,
{
    let mut guard = CancelOnDrop {
        op: op.clone(),
        armed: true,
    };
    let max_bytes = lease.database.max_bytes;
    let task_op = op.clone();
    let task = tokio::task::spawn_blocking(move || {
        let result = (|| {
            let connection = lease.connection()?;
            let stop = task_op.clone();
            connection
                .progress_handler(
                    1000,
                    Some(move || {
                        stop.cancelled.load(Ordering::Relaxed) || Instant::now() >= deadline
                    }),
                )
                .map_err(|e| DbError::Sqlite(e.to_string()))?;
            let result = work(connection);
            let _ = connection.progress_handler(0, None::<fn() -> bool>);
            result
        })();
        task_op.finish(lease);
        result.map_err(|error| match error {
            DbError::Sqlite(message) if message.contains("interrupted") => DbError::Cancelled,
            DbError::Sqlite(message) if message.contains("database or disk is full") => {
                DbError::Full(max_bytes)
            }
            other => other,
        })
    });
    let outcome = task.await;
    guard.armed = false;
    let lease = op.lease.lock().take();
    match outcome {
        Ok(result) => (lease, result),
        Err(e) => (
            None,
            Err(DbError::Sqlite(format!("the statement failed: {e}"))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_file_names() {
        for good in ["hello", "a-b_c.d", "X1"] {
            assert!(is_file_name(good), "{good}");
        }
        for bad in ["", ".hidden", "plugin:auth", "a/b", "..", "a b", "é"] {
            assert!(!is_file_name(bad), "{bad}");
        }
    }
}
