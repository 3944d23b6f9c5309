//! Waiting until every node serves a write (`?wait=cluster`).
//!
//! A write is acknowledged when the store has it and the node that took it serves it.
//! A caller who needs more (a deploy pipeline that then sends traffic through any node)
//! asks to wait until every live node has reported serving the write's revision, bounded
//! by a limit; the answer names the nodes that had not by then. Draining nodes are not
//! waited for (they are leaving) but are listed.

use std::time::{Duration, Instant};

use moontide_store::{Membership, StoreError};
use serde::Serialize;

use crate::record::{NodeRecord, NodeState, records};

/// How often the registry is read while waiting.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// A node that did not serve the revision in time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lagging {
    pub name: String,
    /// The revision it last reported serving.
    pub revision: u64,
    pub state: NodeState,
}

/// What waiting for the cluster found (the `cluster` field of a write's answer).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterWait {
    pub revision: u64,
    /// `true` when every live node that is not draining serves `revision`.
    pub complete: bool,
    /// Nodes serving `revision` or later.
    pub served_by: Vec<String>,
    /// Nodes that did not within the limit.
    pub lagging: Vec<Lagging>,
    /// Draining nodes (not waited for).
    pub draining: Vec<String>,
    pub waited_ms: u64,
}

impl ClusterWait {
    fn of(revision: u64, nodes: &[NodeRecord], started: Instant) -> ClusterWait {
        let mut wait = ClusterWait {
            revision,
            complete: true,
            served_by: Vec::new(),
            lagging: Vec::new(),
            draining: Vec::new(),
            waited_ms: started.elapsed().as_millis() as u64,
        };
        for node in nodes {
            if node.revision >= revision {
                wait.served_by.push(node.name.clone());
            } else if node.state == NodeState::Draining {
                wait.draining.push(node.name.clone());
            } else {
                wait.complete = false;
                wait.lagging.push(Lagging {
                    name: node.name.clone(),
                    revision: node.revision,
                    state: node.state,
                });
            }
        }
        wait
    }
}

/// Waits until every live, non-draining node reports serving `revision`, or `limit`
/// passes; the last registry read decides the answer.
pub async fn until_served(
    membership: &dyn Membership,
    revision: u64,
    limit: Duration,
) -> Result<ClusterWait, StoreError> {
    let started = Instant::now();
    loop {
        let nodes = records(&membership.members().await?);
        let wait = ClusterWait::of(revision, &nodes, started);
        if wait.complete || started.elapsed() >= limit {
            return Ok(wait);
        }
        tokio::time::sleep(POLL_EVERY.min(limit.saturating_sub(started.elapsed()))).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use moontide_store::LocalMembership;

    use super::*;
    use crate::record::NodeLoad;

    fn record(name: &str, revision: u64, state: NodeState) -> Vec<u8> {
        NodeRecord {
            name: name.into(),
            version: "0".into(),
            state,
            data_plane: String::new(),
            admin: String::new(),
            revision,
            started_at_ms: 0,
            updated_at_ms: 0,
            load: NodeLoad::default(),
        }
        .to_bytes()
    }

    #[tokio::test]
    async fn waits_until_every_live_node_serves_the_revision() {
        let members = Arc::new(LocalMembership::new());
        let ttl = Duration::from_secs(60);
        let _a = members
            .join("a", record("a", 7, NodeState::Ready), ttl)
            .await
            .unwrap();
        let b = members
            .join("b", record("b", 5, NodeState::Ready), ttl)
            .await
            .unwrap();
        let _c = members
            .join("c", record("c", 1, NodeState::Draining), ttl)
            .await
            .unwrap();
        let waiting = {
            let members = members.clone();
            tokio::spawn(async move { until_served(&*members, 7, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "b does not serve 7 yet");
        b.update(record("b", 8, NodeState::Ready)).await.unwrap();
        let wait = waiting.await.unwrap().unwrap();
        assert!(wait.complete);
        assert_eq!(wait.served_by, ["a", "b"]);
        assert_eq!(wait.draining, ["c"]);
        assert!(wait.lagging.is_empty());
    }

    #[tokio::test]
    async fn names_the_nodes_that_lag_when_the_limit_passes() {
        let members = LocalMembership::new();
        let ttl = Duration::from_secs(60);
        let _a = members
            .join("a", record("a", 9, NodeState::Ready), ttl)
            .await
            .unwrap();
        let _b = members
            .join("b", record("b", 3, NodeState::Starting), ttl)
            .await
            .unwrap();
        let wait = until_served(&members, 9, Duration::from_millis(30))
            .await
            .unwrap();
        assert!(!wait.complete);
        assert_eq!(wait.served_by, ["a"]);
        assert_eq!(
            wait.lagging,
            [Lagging {
                name: "b".into(),
                revision: 3,
                state: NodeState::Starting
            }]
        );
    }
}
