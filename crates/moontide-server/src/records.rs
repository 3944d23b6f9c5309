//! How functions and gateway objects are laid out in the config store: keys and the JSON
//! records under them.
//!
//! - `f/head/{name}` → [`FunctionRecord`]: which version serves, the latest version number.
//! - `f/ver/{name}/{version:010}` → [`VersionRecord`]: the immutable source and config of
//!   one version.
//!
//! A deploy writes the new version and the head in one transaction, guarded by the head's
//! `mod_revision`, so two concurrent deploys of one function never both win.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::FunctionConfig;

/// Everything about functions lives under this prefix (the snapshot builder watches it).
pub const ROOT: &str = "f/";
pub const HEAD_PREFIX: &str = "f/head/";
pub const VERSION_PREFIX: &str = "f/ver/";

/// Gateway objects: `g/upstreams/{name}` → `UpstreamConfig`, `g/routes/{name}` →
/// `RouteConfig` (JSON; see `gateway::config`), `g/plugins/{name}` → [`PluginRecord`].
pub const GATEWAY_ROOT: &str = "g/";
pub const UPSTREAM_PREFIX: &str = "g/upstreams/";
pub const ROUTE_PREFIX: &str = "g/routes/";
pub const PLUGIN_PREFIX: &str = "g/plugins/";

pub fn plugin_key(name: &str) -> String {
    format!("{PLUGIN_PREFIX}{name}")
}

/// A plugin: one record, replaced whole by a `PUT` (no versions kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRecord {
    pub source: String,
    pub config: FunctionConfig,
    /// The phases its table defines, found when the `PUT` ran its init.
    pub phases: Vec<String>,
    /// sha256 of the source, hex.
    pub sha256: String,
    pub updated_at_ms: u64,
}

pub fn upstream_key(name: &str) -> String {
    format!("{UPSTREAM_PREFIX}{name}")
}

pub fn route_key(name: &str) -> String {
    format!("{ROUTE_PREFIX}{name}")
}

/// How many versions of a function are kept for rollback (the active one always is).
pub const VERSION_RETENTION: usize = 20;

pub fn head_key(name: &str) -> String {
    format!("{HEAD_PREFIX}{name}")
}

pub fn version_key(name: &str, version: u64) -> String {
    format!("{VERSION_PREFIX}{name}/{version:010}")
}

pub fn versions_prefix(name: &str) -> String {
    format!("{VERSION_PREFIX}{name}/")
}

/// The head of a function: which version serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRecord {
    pub name: String,
    pub active_version: u64,
    pub latest_version: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    pub name: String,
    pub version: u64,
    pub files: BTreeMap<String, String>,
    pub config: FunctionConfig,
    pub created_at_ms: u64,
    /// sha256 over the files (path, NUL, content, NUL, ...), hex.
    pub sha256: String,
}

impl VersionRecord {
    pub fn source_bytes(&self) -> usize {
        self.files.values().map(String::len).sum()
    }

    /// What the API shows of a version (no source, secrets reduced to names).
    pub fn summary(&self, active: bool) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "active": active,
            "created_at_ms": self.created_at_ms,
            "sha256": self.sha256,
            "source_bytes": self.source_bytes(),
            "files": self.files.keys().collect::<Vec<_>>(),
            "config": self.config.redacted(),
        })
    }
}

pub fn source_digest(files: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (path, content) in files {
        hasher.update(path.as_bytes());
        hasher.update([0]);
        hasher.update(content.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_do_not_collide_across_names() {
        assert!(!versions_prefix("ab").starts_with(&versions_prefix("a")));
        assert!(version_key("a", 2) < version_key("a", 10));
        assert!(head_key("a").starts_with(ROOT) && version_key("a", 1).starts_with(ROOT));
    }

    #[test]
    fn digest_depends_on_paths_and_content() {
        let a = BTreeMap::from([("main.lua".to_string(), "x".to_string())]);
        let b = BTreeMap::from([("main.lua".to_string(), "y".to_string())]);
        let c = BTreeMap::from([("other.lua".to_string(), "x".to_string())]);
        assert_ne!(source_digest(&a), source_digest(&b));
        assert_ne!(source_digest(&a), source_digest(&c));
        assert_eq!(source_digest(&a), source_digest(&a.clone()));
    }
}
