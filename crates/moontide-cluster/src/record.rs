//! What a node writes about itself in the registry (JSON, `GET /v1/nodes`).

use moontide_store::Member;
use serde::{Deserialize, Serialize};

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Loading its config; not serving yet.
    Starting,
    /// Serving.
    Ready,
    /// Shutting down: `/readyz` answers 503 so load balancers stop sending, calls in
    /// flight finish, then it leaves the registry.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
        }
    }
}

/// A node's load over its last report period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Live Lua instances, all functions together.
    pub instances: u64,
    /// Instances the per-function autoscalers want, summed.
    pub desired_instances: u64,
    /// Instances serving a call.
    pub busy_instances: u64,
    /// Calls waiting for an instance.
    pub queued_calls: u64,
    /// The node's instance budget (`serve --max-instances`).
    pub instance_budget: u64,
    /// Lua memory held by instances, and the node's budget for it.
    pub memory_bytes: u64,
    pub memory_budget: u64,
    /// CPU used by the node, as a fraction of the cores it may use (0 to 1).
    pub cpu: f64,
    /// Calls that arrived over calls served (1 when the node keeps up; more when calls
    /// pile up or are shed): how far CPU use understates demand on a saturated node.
    pub backlog: f64,
    /// The node's demand in nodes: 1.0 is one node fully used (see [`crate::demand`]).
    pub demand: f64,
}

/// One node's registry record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// The moontide version the node runs.
    pub version: String,
    pub state: NodeState,
    /// Where clients and load balancers reach its data plane, and its admin API.
    pub data_plane: String,
    pub admin: String,
    /// The config revision it serves.
    pub revision: u64,
    pub started_at_ms: u64,
    /// When it last wrote this record.
    pub updated_at_ms: u64,
    pub load: NodeLoad,
}

impl NodeRecord {
    /// The record a member wrote, or `None` if it is not one (written by an incompatible
    /// version, say): such members are skipped, with a warning.
    pub fn from_member(member: &Member) -> Option<NodeRecord> {
        match serde_json::from_slice::<NodeRecord>(&member.record) {
            Ok(record) => Some(record),
            Err(error) => {
                tracing::warn!(member = %member.name, %error, "unreadable node record; skipped");
                None
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Every readable record of `members`.
pub fn records(members: &[Member]) -> Vec<NodeRecord> {
    members.iter().filter_map(NodeRecord::from_member).collect()
}
