//! The embedded, single-node [`Store`]: [`SqliteStore`], one SQLite file in WAL mode.
//!
//! This module owns the on-disk schema, the write path (compare-and-apply transactions
//! that bump the store revision), the bounded change history, and the live watch
//! fan-out.
//!
//! # Schema
//!
//! - `kv(key, value, create_revision, mod_revision)`: the current state.
//! - `meta(name, value)`: the current store `revision`, and `compacted`, the newest
//!   revision whose history was dropped (`0` = nothing dropped yet).
//! - `history(id, revision, key, value, create_revision)`: every change, in order;
//!   `value IS NULL` marks a delete. Only the most recent
//!   [`SqliteStoreOptions::history_revisions`] revisions are kept.
//!
//! # Concurrency and durability
//!
//! All SQLite work runs on tokio's blocking pool over one connection behind a mutex, so
//! writes are serialized and the async runtime never waits on disk. Every write
//! transaction is `BEGIN IMMEDIATE` and the file uses `journal_mode=WAL` with
//! `synchronous=FULL`: when [`Store::txn`] returns `Ok`, the change has been fsynced.
//!
//! # Watches
//!
//! Each committed revision is published as one batch on a `tokio::sync::broadcast`
//! channel, while the mutex is still held, so batches go out in revision order. A watch
//! subscribes first, then replays `history` after its start revision in chunks, then
//! follows the broadcast, skipping anything it already replayed. If it sees a revision
//! gap in the broadcast (another process wrote to the same file), it fills the gap from
//! `history`. A watcher that falls behind the broadcast buffer gets
//! [`StoreError::Compacted`] and must re-read; once a watch has returned an error it
//! keeps returning that error.
//!
//! Several `SqliteStore`s (or processes) may open the same file: writes stay atomic and
//! revisions stay consistent, but a watch only notices other writers' changes when its
//! own store next writes. Run one store per file per node for prompt watches.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::broadcast;

use crate::{Compare, KeyValue, Op, Revision, Store, StoreError, TxnOutcome, Watch, WatchEvent};

/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

/// How many revisions a watch replays from `history` per SQLite read.
const REPLAY_CHUNK_REVISIONS: Revision = 256;

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key             TEXT    NOT NULL PRIMARY KEY,
    value           BLOB    NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS meta (
    name  TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS history (
    id              INTEGER PRIMARY KEY,
    revision        INTEGER NOT NULL,
    key             TEXT    NOT NULL,
    value           BLOB,
    create_revision INTEGER
) STRICT;

CREATE INDEX IF NOT EXISTS history_by_revision ON history (revision, id);

INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
";

/// Tuning knobs for [`SqliteStore`]. `Default` gives the production values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteStoreOptions {
    /// How many of the most recent revisions `history` keeps for watch replay
    /// (default 10 000). Watching from an older revision returns
    /// [`StoreError::Compacted`]. Values below 1 are treated as 1.
    pub history_revisions: u64,
    /// How many committed revisions a live watcher may fall behind before it gets
    /// [`StoreError::Compacted`] (default 1024). Values below 1 are treated as 1.
    pub watch_buffer: usize,
    /// How long a write waits for another connection's lock on the same file before
    /// failing with [`StoreError::Backend`] (default 5 s).
    pub busy_timeout: Duration,
}

impl Default for SqliteStoreOptions {
    fn default() -> Self {
        SqliteStoreOptions {
            history_revisions: 10_000,
            watch_buffer: 1024,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The embedded [`Store`]: one SQLite file, one node.
///
/// Dropping the store (or calling [`SqliteStore::close`]) ends every open watch: their
/// [`Watch::next`] returns `Ok(None)` once they have drained what was already committed.
pub struct SqliteStore {
    inner: Arc<Inner>,
    /// Where the file lives, or `None` in memory. For `Debug` only.
    path: Option<PathBuf>,
}

/// Shared by the store and its in-flight blocking tasks; watches hold only a `Weak`, so
/// dropping the store drops the broadcast sender and ends them.
struct Inner {
    /// `None` once closed.
    state: Mutex<Option<Live>>,
}

/// An open store: the connection and everything that must change together with it.
struct Live {
    conn: Connection,
    events: broadcast::Sender<Arc<Batch>>,
    history_revisions: u64,
}

/// The events of one committed revision, as published to live watchers.
#[derive(Debug)]
struct Batch {
    revision: Revision,
    events: Vec<WatchEvent>,
}

impl SqliteStore {
    /// Opens (creating if missing) the store file at `path` with default options.
    ///
    /// This does blocking file I/O; call it at startup or from a blocking task.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, SqliteStoreOptions::default())
    }

    /// Opens (creating if missing) the store file at `path`.
    ///
    /// The parent directory must exist. This does blocking file I/O; call it at startup
    /// or from a blocking task.
    pub fn open_with(path: &Path, options: SqliteStoreOptions) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        conn.busy_timeout(options.busy_timeout).db()?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .db()?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "{}: could not enable WAL journal mode (got {mode:?})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL").db()?;
        let store = Self::from_connection(conn, options, Some(path.to_path_buf()))?;
        tracing::debug!(path = %path.display(), "opened sqlite store");
        Ok(store)
    }

    /// A fresh, empty store that lives in memory, with default options. For tests.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        Self::open_in_memory_with(SqliteStoreOptions::default())
    }

    /// A fresh, empty store that lives in memory. For tests.
    pub fn open_in_memory_with(options: SqliteStoreOptions) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory().db()?;
        Self::from_connection(conn, options, None)
    }

    fn from_connection(
        mut conn: Connection,
        options: SqliteStoreOptions,
        path: Option<PathBuf>,
    ) -> Result<SqliteStore, StoreError> {
        init_schema(&mut conn)?;
        let (events, _) = broadcast::channel(options.watch_buffer.max(1));
        let live = Live {
            conn,
            events,
            history_revisions: options.history_revisions.max(1),
        };
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                state: Mutex::new(Some(live)),
            }),
            path,
        })
    }

    /// Closes the store: checkpoints and closes the file, ends every watch (after they
    /// drain what was already committed), and makes later calls return
    /// [`StoreError::Closed`]. Closing twice is fine.
    pub async fn close(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        spawn_blocking(move || {
            let live = inner.lock().take();
            match live {
                Some(live) => live.conn.close().map_err(|(_, e)| backend(e)),
                None => Ok(()),
            }
        })
        .await
    }

    /// Drops the change history before `revision`, as etcd's `compact` does: a watch from
    /// an older revision then fails with [`StoreError::Compacted`]. Watches already open
    /// keep their place. (History is also bounded by
    /// [`SqliteStoreOptions::history_revisions`] on every write.)
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.with_live(move |live| {
            let tx = live
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let dropped = revision.saturating_sub(1);
            if dropped > read_meta(&tx, META_COMPACTED)? {
                tx.execute(
                    "DELETE FROM history WHERE revision <= ?1",
                    [to_sql(dropped)?],
                )
                .db()?;
                write_meta(&tx, META_COMPACTED, dropped)?;
            }
            tx.commit().db()
        })
        .await
    }

    /// Runs `f` on the open store, on the blocking pool.
    async fn with_live<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Live) -> Result<T, StoreError> + Send + 'static,
    {
        with_live(Arc::clone(&self.inner), f).await
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        // A panic while holding the lock cannot leave the database half-written: an
        // open rusqlite transaction rolls back when dropped during unwinding.
        self.state.lock().unwrap_or_else(|poisoned| {
            tracing::warn!("sqlite store mutex was poisoned by a panic; continuing");
            poisoned.into_inner()
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.with_live(move |live| get_kv(&live.conn, &key)).await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_owned();
        self.with_live(move |live| {
            // One read transaction, so the rows and the revision are a consistent snapshot
            // even if another connection writes to the same file.
            let tx = live.conn.transaction().db()?;
            let kvs = scan_prefix(&tx, &prefix)?;
            let revision = read_meta(&tx, META_REVISION)?;
            tx.commit().db()?;
            Ok((kvs, revision))
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        self.with_live(move |live| apply_txn(live, &compares, ops))
            .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Box<dyn Watch>, StoreError> {
        let (rx, current) = self
            .with_live(move |live| {
                // Subscribe before reading the revision: everything up to `current` is in
                // `history`, everything after arrives on `rx`.
                let rx = live.events.subscribe();
                let tx = live.conn.transaction().db()?;
                let current = read_meta(&tx, META_REVISION)?;
                let compacted = read_meta(&tx, META_COMPACTED)?;
                tx.commit().db()?;
                if after < compacted {
                    return Err(StoreError::Compacted(compacted + 1));
                }
                Ok((rx, current))
            })
            .await?;
        Ok(Box::new(SqliteWatch {
            prefix: prefix.to_owned(),
            store: Arc::downgrade(&self.inner),
            rx,
            last: after,
            replay_until: current.max(after),
            failed: None,
        }))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.with_live(|live| read_meta(&live.conn, META_REVISION))
            .await
    }
}

/// A watch on a [`SqliteStore`]; see the module docs.
struct SqliteWatch {
    prefix: String,
    store: Weak<Inner>,
    rx: broadcast::Receiver<Arc<Batch>>,
    /// Every revision up to this one has been delivered (or had nothing under `prefix`).
    last: Revision,
    /// Revisions in `(last, replay_until]` still have to be read from `history`.
    replay_until: Revision,
    /// Set once `next` has failed; the watch then keeps failing the same way.
    failed: Option<Revision>,
}

#[async_trait]
impl Watch for SqliteWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, StoreError> {
        if let Some(revision) = self.failed {
            return Err(StoreError::Compacted(revision));
        }
        loop {
            while self.last < self.replay_until {
                let Some(inner) = self.store.upgrade() else {
                    return Ok(None);
                };
                let (prefix, after, until) = (self.prefix.clone(), self.last, self.replay_until);
                let read = with_live(inner, move |live| {
                    read_history(&mut live.conn, &prefix, after, until)
                })
                .await;
                match read {
                    Ok((events, reached)) => {
                        self.last = reached;
                        if !events.is_empty() {
                            return Ok(Some(events));
                        }
                    }
                    Err(StoreError::Closed) => return Ok(None),
                    Err(StoreError::Compacted(revision)) => {
                        self.failed = Some(revision);
                        return Err(StoreError::Compacted(revision));
                    }
                    Err(e) => return Err(e),
                }
            }

            match self.rx.recv().await {
                Ok(batch) => {
                    if batch.revision <= self.last {
                        continue; // already replayed from history
                    }
                    if batch.revision > self.last.saturating_add(1) {
                        // Revisions we never saw (another connection wrote to the file):
                        // replay them, and this one, from history.
                        self.replay_until = batch.revision;
                        continue;
                    }
                    self.last = batch.revision;
                    let events: Vec<WatchEvent> = batch
                        .events
                        .iter()
                        .filter(|event| event.key().starts_with(&self.prefix))
                        .cloned()
                        .collect();
                    if !events.is_empty() {
                        return Ok(Some(events));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let revision = self.last.saturating_add(1);
                    tracing::warn!(
                        prefix = %self.prefix,
                        missed,
                        after = self.last,
                        "store watcher fell behind; it must re-read"
                    );
                    self.failed = Some(revision);
                    return Err(StoreError::Compacted(revision));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

/// Runs `f` on the open store behind `inner`, on the blocking pool.
async fn with_live<T, F>(inner: Arc<Inner>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut Live) -> Result<T, StoreError> + Send + 'static,
{
    spawn_blocking(move || {
        let mut state = inner.lock();
        let live = state.as_mut().ok_or(StoreError::Closed)?;
        f(live)
    })
    .await
}

async fn spawn_blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
}

/// Creates the schema if missing and checks its version.
fn init_schema(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .db()?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "store schema version {version} is newer than this build supports ({SCHEMA_VERSION})"
        )));
    }
    tx.execute_batch(SCHEMA).db()?;
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .db()?;
    }
    tx.commit().db()
}

/// Checks the compares and, if all hold, applies the ops; see [`Store::txn`].
fn apply_txn(
    live: &mut Live,
    compares: &[Compare],
    ops: Vec<Op>,
) -> Result<TxnOutcome, StoreError> {
    // IMMEDIATE takes the write lock up front, so the compares and the writes see the
    // same state even if another connection shares the file.
    let tx = live
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    let current = read_meta(&tx, META_REVISION)?;
    for compare in compares {
        if !compare_holds(&tx, compare)? {
            // Dropping `tx` rolls back; nothing was written.
            return Ok(TxnOutcome {
                succeeded: false,
                revision: current,
            });
        }
    }

    let revision = current
        .checked_add(1)
        .ok_or_else(|| StoreError::Backend("store revision overflow".to_owned()))?;
    let mut events = Vec::new();
    for op in ops {
        apply_op(&tx, revision, op, &mut events)?;
    }
    if events.is_empty() {
        // Nothing changed (e.g. deleting a missing key): no new revision.
        return Ok(TxnOutcome {
            succeeded: true,
            revision: current,
        });
    }

    write_meta(&tx, META_REVISION, revision)?;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO history (revision, key, value, create_revision) VALUES (?1, ?2, ?3, ?4)",
            )
            .db()?;
        let sql_revision = to_sql(revision)?;
        for event in &events {
            match event {
                WatchEvent::Put(kv) => insert
                    .execute(rusqlite::params![
                        sql_revision,
                        kv.key,
                        kv.value,
                        to_sql(kv.create_revision)?
                    ])
                    .db()?,
                WatchEvent::Delete { key, .. } => insert
                    .execute(rusqlite::params![
                        sql_revision,
                        key,
                        None::<Vec<u8>>,
                        None::<i64>
                    ])
                    .db()?,
            };
        }
    }
    let keep_after = revision.saturating_sub(live.history_revisions);
    if keep_after > read_meta(&tx, META_COMPACTED)? {
        tx.execute(
            "DELETE FROM history WHERE revision <= ?1",
            [to_sql(keep_after)?],
        )
        .db()?;
        write_meta(&tx, META_COMPACTED, keep_after)?;
    }
    tx.commit().db()?;

    // Published while the mutex is still held, so batches go out in revision order.
    // `send` fails only when nobody is watching.
    let _ = live.events.send(Arc::new(Batch { revision, events }));
    Ok(TxnOutcome {
        succeeded: true,
        revision,
    })
}

fn compare_holds(conn: &Connection, compare: &Compare) -> Result<bool, StoreError> {
    Ok(match compare {
        Compare::Exists(key) => mod_revision_of(conn, key)?.is_some(),
        Compare::Missing(key) => mod_revision_of(conn, key)?.is_none(),
        Compare::ModRevision(key, expected) => {
            mod_revision_of(conn, key)?.unwrap_or(0) == *expected
        }
    })
}

/// Applies one op at `revision`, appending an event for each key it changed.
fn apply_op(
    conn: &Connection,
    revision: Revision,
    op: Op,
    events: &mut Vec<WatchEvent>,
) -> Result<(), StoreError> {
    match op {
        Op::Put { key, value } => {
            let create_revision: Option<i64> = conn
                .prepare_cached("SELECT create_revision FROM kv WHERE key = ?1")
                .db()?
                .query_row([&key], |row| row.get(0))
                .optional()
                .db()?;
            let create_revision = match create_revision {
                Some(r) => from_sql(r)?,
                None => revision,
            };
            conn.prepare_cached(
                "INSERT INTO kv (key, value, create_revision, mod_revision) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision",
            )
            .db()?
            .execute(rusqlite::params![
                key,
                value,
                to_sql(create_revision)?,
                to_sql(revision)?
            ])
            .db()?;
            events.push(WatchEvent::Put(KeyValue {
                key,
                value,
                create_revision,
                mod_revision: revision,
            }));
        }
        Op::Delete { key } => {
            if delete_key(conn, &key)? {
                events.push(WatchEvent::Delete { key, revision });
            }
        }
        Op::DeletePrefix { prefix } => {
            for kv in scan_prefix(conn, &prefix)? {
                if delete_key(conn, &kv.key)? {
                    events.push(WatchEvent::Delete {
                        key: kv.key,
                        revision,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Deletes one key; `true` if it existed.
fn delete_key(conn: &Connection, key: &str) -> Result<bool, StoreError> {
    let deleted = conn
        .prepare_cached("DELETE FROM kv WHERE key = ?1")
        .db()?
        .execute([key])
        .db()?;
    Ok(deleted > 0)
}

fn mod_revision_of(conn: &Connection, key: &str) -> Result<Option<Revision>, StoreError> {
    let found: Option<i64> = conn
        .prepare_cached("SELECT mod_revision FROM kv WHERE key = ?1")
        .db()?
        .query_row([key], |row| row.get(0))
        .optional()
        .db()?;
    found.map(from_sql).transpose()
}

fn get_kv(conn: &Connection, key: &str) -> Result<Option<KeyValue>, StoreError> {
    let row: Option<(Vec<u8>, i64, i64)> = conn
        .prepare_cached("SELECT value, create_revision, mod_revision FROM kv WHERE key = ?1")
        .db()?
        .query_row([key], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()
        .db()?;
    row.map(|(value, create_revision, mod_revision)| {
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: from_sql(create_revision)?,
            mod_revision: from_sql(mod_revision)?,
        })
    })
    .transpose()
}

/// Every key starting with `prefix`, sorted by key.
///
/// Keys compare bytewise (SQLite's BINARY collation on UTF-8), so the keys with a given
/// prefix are exactly the contiguous run starting at the prefix itself.
fn scan_prefix(conn: &Connection, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT key, value, create_revision, mod_revision FROM kv WHERE key >= ?1 ORDER BY key",
        )
        .db()?;
    let mut rows = stmt.query([prefix]).db()?;
    let mut kvs = Vec::new();
    while let Some(row) = rows.next().db()? {
        let key: String = row.get(0).db()?;
        if !key.starts_with(prefix) {
            break;
        }
        kvs.push(KeyValue {
            key,
            value: row.get(1).db()?,
            create_revision: from_sql(row.get(2).db()?)?,
            mod_revision: from_sql(row.get(3).db()?)?,
        });
    }
    Ok(kvs)
}

/// Reads `history` for revisions in `(after, until]`, a chunk at a time, until it finds
/// events under `prefix` or reaches `until`. Returns the events and the revision read up
/// to; fails with [`StoreError::Compacted`] if part of the range was already dropped.
fn read_history(
    conn: &mut Connection,
    prefix: &str,
    mut after: Revision,
    until: Revision,
) -> Result<(Vec<WatchEvent>, Revision), StoreError> {
    let tx = conn.transaction().db()?;
    let compacted = read_meta(&tx, META_COMPACTED)?;
    if after < compacted {
        return Err(StoreError::Compacted(compacted + 1));
    }
    let mut stmt = tx
        .prepare_cached(
            "SELECT revision, key, value, create_revision FROM history
             WHERE revision > ?1 AND revision <= ?2 ORDER BY revision, id",
        )
        .db()?;
    let mut events = Vec::new();
    while after < until && events.is_empty() {
        let chunk_end = after.saturating_add(REPLAY_CHUNK_REVISIONS).min(until);
        let mut rows = stmt.query([to_sql(after)?, to_sql(chunk_end)?]).db()?;
        while let Some(row) = rows.next().db()? {
            let key: String = row.get(1).db()?;
            if !key.starts_with(prefix) {
                continue; // don't load values of keys nobody asked for
            }
            let revision = from_sql(row.get(0).db()?)?;
            let value: Option<Vec<u8>> = row.get(2).db()?;
            events.push(match value {
                Some(value) => {
                    let create_revision: Option<i64> = row.get(3).db()?;
                    let create_revision = create_revision.ok_or_else(|| {
                        StoreError::Backend(format!(
                            "history row for {key:?} has no create_revision"
                        ))
                    })?;
                    WatchEvent::Put(KeyValue {
                        key,
                        value,
                        create_revision: from_sql(create_revision)?,
                        mod_revision: revision,
                    })
                }
                None => WatchEvent::Delete { key, revision },
            });
        }
        after = chunk_end;
    }
    Ok((events, after))
}

fn read_meta(conn: &Connection, name: &str) -> Result<Revision, StoreError> {
    let value: i64 = conn
        .prepare_cached("SELECT value FROM meta WHERE name = ?1")
        .db()?
        .query_row([name], |row| row.get(0))
        .db()?;
    from_sql(value)
}

fn write_meta(conn: &Connection, name: &str, value: Revision) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE meta SET value = ?2 WHERE name = ?1")
        .db()?
        .execute(rusqlite::params![name, to_sql(value)?])
        .db()?;
    Ok(())
}

fn to_sql(revision: Revision) -> Result<i64, StoreError> {
    i64::try_from(revision)
        .map_err(|_| StoreError::Backend(format!("revision {revision} does not fit in SQLite")))
}

fn from_sql(value: i64) -> Result<Revision, StoreError> {
    Revision::try_from(value)
        .map_err(|_| StoreError::Backend(format!("corrupt store: negative revision {value}")))
}

fn backend(error: rusqlite::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// `.db()?` maps a rusqlite error to [`StoreError::Backend`] without making rusqlite part
/// of the crate's public API.
trait OrBackend<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> OrBackend<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(backend)
    }
}

#[cfg(test)]
mod tests;
