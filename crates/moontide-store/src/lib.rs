//! Moontide's config store: a revisioned key-value store with transactions and a watch.
//!
//! Everything users deploy (functions, their versions, and later routes, upstreams,
//! plugins, certificates) is stored as keys under this trait. The model is etcd's on
//! purpose, so that a cluster can swap the embedded [`SqliteStore`] for etcd without the
//! rest of Moontide noticing:
//!
//! - every successful write transaction bumps one store-wide [`Revision`];
//! - each key remembers the revision that created it and the one that last changed it;
//! - [`Store::txn`] applies a list of [`Op`]s atomically if every [`Compare`] holds
//!   (optimistic concurrency);
//! - [`Store::watch`] yields every change under a prefix after a given revision, in order.
//!
//! A write is acknowledged only once it is durable: a process crash or `kill -9` right
//! after `txn` returns never loses it.
//!
//! This crate must not know what the keys mean; it stores bytes.

#![forbid(unsafe_code)]

#[cfg(any(test, feature = "contract-tests"))]
pub mod contract;
pub mod membership;
mod sqlite;

pub use membership::{LocalMembership, Member, Membership};
pub use sqlite::{SqliteStore, SqliteStoreOptions};

use async_trait::async_trait;

/// A store-wide, strictly increasing change counter. `0` means "before any write".
pub type Revision = u64;

/// One stored key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the write that last changed this key.
    pub mod_revision: Revision,
}

/// A condition checked at the start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Missing(String),
    /// The key's `mod_revision` equals this value (`0` = the key does not exist).
    ModRevision(String, Revision),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Deletes every key that starts with the prefix.
    DeletePrefix {
        prefix: String,
    },
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// `false` if a compare failed; then nothing was written.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it failed or wrote nothing).
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// A live subscription to changes under a prefix.
///
/// Events arrive in revision order, each exactly once, starting after the revision the
/// watch was opened at. If the watcher falls too far behind (or the history it asked for
/// was compacted), [`Watch::next`] returns [`StoreError::Compacted`]: the watcher must
/// re-read with [`Store::range`] and open a new watch from that revision.
#[async_trait]
pub trait Watch: Send {
    /// The next batch of events (all events of one or more revisions), or `None` when the
    /// store is closed.
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, StoreError>;
}

/// The store contract. Implementations: [`SqliteStore`] (one node); `EtcdStore` in the
/// `moontide-store-etcd` crate (clusters). The `contract` module (feature
/// `contract-tests`) is the test suite every implementation passes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The value of one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key starting with `prefix`, sorted by key, and the revision they were read at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Applies `ops` atomically if every compare holds. Durable when it returns `Ok`.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;

    /// Changes under `prefix` with a revision greater than `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Box<dyn Watch>, StoreError>;

    /// The current store revision.
    async fn revision(&self) -> Result<Revision, StoreError>;
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Backend(String),
    #[error("watch history before revision {0} is no longer available; re-read and watch again")]
    Compacted(Revision),
    #[error("store is closed")]
    Closed,
    /// A [`membership::Lease`] ran out before it was renewed; its record is gone.
    #[error("the lease expired")]
    LeaseExpired,
}
