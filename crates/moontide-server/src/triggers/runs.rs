//! Scheduled runs as the store keeps them: one record per function and due time, under
//! `t/runs/{function}/{due unix ms, 13 digits}`.
//!
//! The record *is* the claim: the node that creates it (a txn with
//! `Compare::Missing(key)`) owns that due time, so on a shared store each due time runs on
//! exactly one node. The owner rewrites it when the run ends (guarded by the record's
//! `mod_revision`, so an owner that lost the run to a takeover writes nothing). Only the
//! latest [`RETENTION`] records of a function are kept.

use serde::{Deserialize, Serialize};

/// Everything about triggers lives under this prefix; the snapshot builder ignores it.
pub const ROOT: &str = "t/";
pub const RUNS_PREFIX: &str = "t/runs/";

/// Run records kept per function (older finished ones are deleted by the claims).
pub const RETENTION: usize = 20;

pub fn runs_prefix(function: &str) -> String {
    format!("{RUNS_PREFIX}{function}/")
}

pub fn run_key(function: &str, due_ms: i64) -> String {
    format!("{RUNS_PREFIX}{function}/{due_ms:013}")
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Ok,
    Error,
    /// Not run: the previous run was still going (overlap `skip`, or a second queued).
    Skipped,
}

/// One due time of one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    /// RFC 3339, in the schedule's time zone.
    pub scheduled_time: String,
    pub scheduled_ms: i64,
    pub state: RunState,
    /// The error code of a failed run (`function_error`, `timeout`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// 1, or more when a node took over a run whose node died.
    pub attempt: u32,
    /// The node that runs (ran) it.
    pub node: String,
    /// That node's process (a random id per start): a node restarted under the same name
    /// is another process, so its earlier runs count as orphaned.
    pub process: u64,
    /// The call's request id (in the function's log).
    pub run_id: String,
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl RunRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<RunRecord> {
        serde_json::from_slice(bytes).ok()
    }
}

pub fn run_id(due_ms: i64, attempt: u32) -> String {
    format!("sch-{due_ms}-{attempt}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_due_time_and_stay_apart_across_names() {
        assert!(run_key("a", 999) < run_key("a", 1_000));
        assert!(!run_key("ab", 1).starts_with(&runs_prefix("a")));
        assert!(!run_key("a", 1).starts_with(crate::records::ROOT));
        assert!(!run_key("a", 1).starts_with(crate::records::GATEWAY_ROOT));
    }
}
