//! Keeps this node's record in the registry for as long as the node lives.
//!
//! [`run`] joins under a lease, renews it every third of its TTL, and rewrites the record
//! at once when the served revision or the node's state changes, and every
//! [`REPORT_EVERY`] with fresh load figures; a stream of revisions is reported at most every
//! [`REVISION_EVERY`]. Writes never queue up: while one is in flight, further changes fold
//! into the next. A lease that ran out (the process was paused, or
//! the store unreachable, for longer than the TTL) is taken again by joining anew; a store
//! that fails is retried with a backoff while the node goes on serving. Each report also
//! reads the live records and hands them to the node (`on_view`: metrics).
//!
//! When `stop` turns true the node leaves: its record is deleted at once rather than
//! expiring a TTL later.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moontide_store::membership::Lease;
use moontide_store::{Membership, StoreError};
use tokio::sync::watch;
use tokio::time::sleep_until;

use crate::record::{NodeLoad, NodeRecord, NodeState, records};

/// How often a node reports its load (and reads everyone's).
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The most often a node rewrites its record for a new served revision: the first change
/// after a quiet spell goes out at once, a stream of changes at most this often (so
/// `?wait=cluster` may learn of a revision up to this late). At 50 changes/s this cuts a
/// node's registry writes from 50/s to 20/s.
pub const REVISION_EVERY: Duration = Duration::from_millis(50);
/// Retry backoff while the store fails.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// The longest leaving may take at shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// What does not change while a node lives.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub version: String,
    pub data_plane: String,
    pub admin: String,
    pub started_at_ms: u64,
}

/// What the node does with every live record after a report (sets its metrics).
pub type OnView = Box<dyn Fn(&[NodeRecord]) + Send>;

/// What the node tells the registrar.
pub struct Inputs {
    /// The config revision the node serves (`None` before its first load).
    pub revision: watch::Receiver<Option<u64>>,
    pub state: watch::Receiver<NodeState>,
    /// The node's load now (called once per report).
    pub load: Box<dyn FnMut() -> NodeLoad + Send>,
    /// Every live record, after each report.
    pub on_view: OnView,
    /// Turns true at shutdown: leave and return.
    pub stop: watch::Receiver<bool>,
}

/// Runs until `inputs.stop` turns true (then leaves the registry) or is dropped.
pub async fn run(
    membership: Arc<dyn Membership>,
    identity: Identity,
    ttl: Duration,
    mut inputs: Inputs,
) {
    let renew_every = ttl / 3;
    let mut load = (inputs.load)();
    let mut lease: Option<Box<dyn Lease>> = None;
    let mut retry = RETRY_FIRST;
    let mut next_report = tokio::time::Instant::now() + REPORT_EVERY;
    let mut next_renew = tokio::time::Instant::now() + renew_every;
    // When the record last went out, and when a newer revision must (see REVISION_EVERY).
    let mut last_revision_write = tokio::time::Instant::now() - REVISION_EVERY;
    let mut revision_due: Option<tokio::time::Instant> = None;
    loop {
        let record = |load: &NodeLoad, inputs: &Inputs| NodeRecord {
            name: identity.name.clone(),
            version: identity.version.clone(),
            state: *inputs.state.borrow(),
            data_plane: identity.data_plane.clone(),
            admin: identity.admin.clone(),
            revision: inputs.revision.borrow().unwrap_or(0),
            started_at_ms: identity.started_at_ms,
            updated_at_ms: now_ms(),
            load: load.clone(),
        };
        let Some(held) = lease.as_ref() else {
            match membership
                .join(&identity.name, record(&load, &inputs).to_bytes(), ttl)
                .await
            {
                Ok(joined) => {
                    tracing::info!(node = %identity.name, ?ttl, "joined the node registry");
                    lease = Some(joined);
                    retry = RETRY_FIRST;
                    next_renew = tokio::time::Instant::now() + renew_every;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot join the node registry; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stopped(&mut inputs.stop) => return,
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
            continue;
        };
        let mut report = false;
        let mut renew = false;
        let mut write = false;
        tokio::select! {
            // A new revision is reported at most every REVISION_EVERY (the first at once):
            // under a stream of config changes every node would otherwise write its record
            // once per change.
            changed = inputs.revision.changed() => {
                if changed.is_err() { return }
                revision_due = Some(last_revision_write + REVISION_EVERY);
            }
            _ = sleep_until(revision_due.unwrap_or(next_report)), if revision_due.is_some() => {
                write = true;
            }
            changed = inputs.state.changed() => {
                if changed.is_err() { return }
                write = true;
            }
            _ = sleep_until(next_report) => report = true,
            _ = sleep_until(next_renew) => renew = true,
            _ = stopped(&mut inputs.stop) => {
                if tokio::time::timeout(LEAVE_TIMEOUT, held.leave()).await.is_err() {
                    tracing::warn!("leaving the node registry timed out; the lease will expire");
                }
                return;
            }
        }
        let mut result = Ok(());
        if renew {
            next_renew = tokio::time::Instant::now() + renew_every;
            result = held.renew().await;
        }
        if report {
            next_report = tokio::time::Instant::now() + REPORT_EVERY;
            load = (inputs.load)();
        }
        if result.is_ok() && (write || report) {
            // Every write carries the latest revision: a pending one is done.
            revision_due = None;
            last_revision_write = tokio::time::Instant::now();
            result = held.update(record(&load, &inputs).to_bytes()).await;
        }
        match result {
            Ok(()) => {}
            Err(StoreError::LeaseExpired) => {
                tracing::warn!("this node's registry lease expired; joining again");
                lease = None;
                continue;
            }
            Err(error) => tracing::warn!(%error, "node registry write failed"),
        }
        if report {
            match membership.members().await {
                Ok(members) => (inputs.on_view)(&records(&members)),
                Err(error) => tracing::debug!(%error, "cannot read the node registry"),
            }
        }
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Milliseconds since the Unix epoch, for [`Identity::started_at_ms`].
pub fn unix_ms() -> u64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use moontide_store::LocalMembership;

    use super::*;

    async fn wait_for_record(
        members: &LocalMembership,
        check: impl Fn(Option<&NodeRecord>) -> bool,
    ) -> Option<NodeRecord> {
        for _ in 0..500 {
            let found = records(&members.members().await.unwrap())
                .into_iter()
                .next();
            if check(found.as_ref()) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the registry never reached the expected state");
    }

    #[tokio::test]
    async fn the_record_follows_the_node_and_leaves_with_it() {
        let members = LocalMembership::new();
        let (revision_tx, revision) = watch::channel(None);
        let (state_tx, state) = watch::channel(NodeState::Starting);
        let (stop_tx, stop) = watch::channel(false);
        let identity = Identity {
            name: "n1".into(),
            version: "v".into(),
            data_plane: "127.0.0.1:1".into(),
            admin: "127.0.0.1:2".into(),
            started_at_ms: 5,
        };
        let task = tokio::spawn(run(
            Arc::new(members.clone()),
            identity,
            Duration::from_secs(30),
            Inputs {
                revision,
                state,
                load: Box::new(|| NodeLoad {
                    instances: 3,
                    ..NodeLoad::default()
                }),
                on_view: Box::new(|_| {}),
                stop,
            },
        ));
        let first = wait_for_record(&members, |r| r.is_some()).await.unwrap();
        assert_eq!(first.state, NodeState::Starting);
        assert_eq!((first.revision, first.load.instances), (0, 3));
        assert_eq!(first.data_plane, "127.0.0.1:1");
        revision_tx.send(Some(42)).unwrap();
        state_tx.send(NodeState::Ready).unwrap();
        wait_for_record(&members, |r| {
            r.is_some_and(|r| r.revision == 42 && r.state == NodeState::Ready)
        })
        .await;
        state_tx.send(NodeState::Draining).unwrap();
        wait_for_record(&members, |r| {
            r.is_some_and(|r| r.state == NodeState::Draining)
        })
        .await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(members.members().await.unwrap().is_empty(), "left at stop");
    }

    #[tokio::test]
    async fn a_lost_lease_is_taken_again() {
        let members = LocalMembership::new();
        let (_revision_tx, revision) = watch::channel(Some(1));
        let (_state_tx, state) = watch::channel(NodeState::Ready);
        let (_stop_tx, stop) = watch::channel(false);
        let identity = Identity {
            name: "n1".into(),
            version: "v".into(),
            data_plane: String::new(),
            admin: String::new(),
            started_at_ms: 0,
        };
        // A TTL shorter than the report period: renewals keep it, and if a renewal comes
        // late the registrar joins again.
        let _task = tokio::spawn(run(
            Arc::new(members.clone()),
            identity,
            Duration::from_millis(300),
            Inputs {
                revision,
                state,
                load: Box::new(NodeLoad::default),
                on_view: Box::new(|_| {}),
                stop,
            },
        ));
        wait_for_record(&members, |r| r.is_some()).await;
        // Someone else's lease under the same name replaces ours, then vanishes.
        let intruder = members
            .join("n1", b"{}".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        intruder.leave().await.unwrap();
        let back = wait_for_record(&members, |r| r.is_some()).await.unwrap();
        assert_eq!(back.revision, 1, "the node joined again with its record");
    }
}
