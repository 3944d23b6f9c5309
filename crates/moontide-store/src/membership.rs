//! Membership: who is alive in a cluster, as records that vanish when their writer stops
//! renewing them.
//!
//! The config [`Store`](crate::Store) is durable; a node registry must be the opposite: a
//! node killed with `kill -9` (or cut off) has to leave it by itself. So members write
//! their records under a *lease* of a time-to-live that they renew; a record whose lease
//! is neither renewed nor revoked expires. This is etcd's lease model (and what
//! `moontide-store-etcd` maps it onto); [`LocalMembership`] is the one-process version
//! for a node on the embedded store.
//!
//! Member records are opaque bytes here, like every value of this crate. They are kept
//! apart from the config keyspace, so that writing them never wakes a config watcher.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::StoreError;

/// One live member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// What the member last wrote.
    pub record: Vec<u8>,
}

/// The registry of live members.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Writes `record` as `name`'s under a new lease of `ttl` (rounded up to whole
    /// seconds; backends may enforce a minimum). A record already under `name` is
    /// replaced.
    async fn join(
        &self,
        name: &str,
        record: Vec<u8>,
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, StoreError>;

    /// Every member whose lease is alive, sorted by name.
    async fn members(&self) -> Result<Vec<Member>, StoreError>;
}

/// A member's hold on its record.
#[async_trait]
pub trait Lease: Send + Sync {
    /// Replaces the record, under the same lease. [`StoreError::LeaseExpired`] if the
    /// lease is gone (the record too): join again.
    async fn update(&self, record: Vec<u8>) -> Result<(), StoreError>;

    /// Restarts the lease's time-to-live. [`StoreError::LeaseExpired`] if it already
    /// ran out.
    async fn renew(&self) -> Result<(), StoreError>;

    /// Removes the record now and ends the lease.
    async fn leave(&self) -> Result<(), StoreError>;
}

/// [`Membership`] inside one process: for a node on the embedded store, which is its own
/// whole cluster. Leases expire by the clock as they would on etcd.
#[derive(Debug, Clone, Default)]
pub struct LocalMembership {
    // A std mutex: every hold is one map operation, never across an await.
    members: Arc<Mutex<BTreeMap<String, Entry>>>,
}

#[derive(Debug)]
struct Entry {
    record: Vec<u8>,
    lease: u64,
    ttl: Duration,
    expires: Instant,
}

impl LocalMembership {
    pub fn new() -> LocalMembership {
        LocalMembership::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Membership for LocalMembership {
    async fn join(
        &self,
        name: &str,
        record: Vec<u8>,
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, StoreError> {
        let lease = next_lease_id();
        self.lock().insert(
            name.to_string(),
            Entry {
                record,
                lease,
                ttl,
                expires: Instant::now() + ttl,
            },
        );
        Ok(Box::new(LocalLease {
            members: self.clone(),
            name: name.to_string(),
            lease,
        }))
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let now = Instant::now();
        let mut members = self.lock();
        members.retain(|_, entry| entry.expires > now);
        Ok(members
            .iter()
            .map(|(name, entry)| Member {
                name: name.clone(),
                record: entry.record.clone(),
            })
            .collect())
    }
}

fn next_lease_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct LocalLease {
    members: LocalMembership,
    name: String,
    lease: u64,
}

impl LocalLease {
    /// Runs `change` on this lease's entry if the lease is still alive.
    fn with_entry(&self, change: impl FnOnce(&mut Entry)) -> Result<(), StoreError> {
        let mut members = self.members.lock();
        match members.get_mut(&self.name) {
            Some(entry) if entry.lease == self.lease && entry.expires > Instant::now() => {
                change(entry);
                Ok(())
            }
            _ => Err(StoreError::LeaseExpired),
        }
    }
}

#[async_trait]
impl Lease for LocalLease {
    async fn update(&self, record: Vec<u8>) -> Result<(), StoreError> {
        self.with_entry(|entry| entry.record = record)
    }

    async fn renew(&self) -> Result<(), StoreError> {
        self.with_entry(|entry| entry.expires = Instant::now() + entry.ttl)
    }

    async fn leave(&self) -> Result<(), StoreError> {
        let mut members = self.members.lock();
        if members
            .get(&self.name)
            .is_some_and(|entry| entry.lease == self.lease)
        {
            members.remove(&self.name);
        }
        Ok(())
    }
}
