//! The node-wide runtime context shared by every instance on every thread.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::egress::{AllowRule, DenyReason, EgressObserver, NodeEgress, Outbound, Policy};
use crate::modules::db::{Databases, DbConfig};
use crate::modules::redis::{RedisClient, RedisConfig};
use crate::modules::shared::SharedDict;

/// Node-wide runtime settings.
#[derive(Clone)]
pub struct EngineConfig {
    /// Capacity of the node-wide `shared` dictionary, in bytes.
    pub shared_dict_bytes: usize,
    /// Connect timeout of the outbound `http` client.
    pub http_connect_timeout: Duration,
    /// The node's egress rules: its allowlist and its own listeners (see [`crate::egress`]).
    pub egress: NodeEgress,
    /// Told of every outbound call the egress policy refuses.
    pub egress_observer: Option<Arc<dyn EgressObserver>>,
    /// The node's Redis for the `redis` module (`serve --redis`); none: every command
    /// answers `nil, "redis is not configured ..."`.
    pub redis: Option<RedisConfig>,
    /// Where functions' `db` databases live (`<data-dir>/db`) and their size cap; none:
    /// every `db` call raises "no database is configured on this node".
    pub db: Option<DbConfig>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("shared_dict_bytes", &self.shared_dict_bytes)
            .field("http_connect_timeout", &self.http_connect_timeout)
            .field("egress", &self.egress)
            .field("redis", &self.redis)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shared_dict_bytes: 64 << 20,
            http_connect_timeout: Duration::from_secs(5),
            egress: NodeEgress::default(),
            egress_observer: None,
            redis: None,
            db: None,
        }
    }
}

/// Most distinct per-function allowlists whose clients the engine keeps; past it the
/// cache starts over (clients handed out live on with their functions).
const MAX_CACHED_POLICIES: usize = 1024;

/// What every instance on the node shares: the `shared` dictionary, the outbound HTTP
/// clients (with their connection pools): one for every function without an allowlist
/// of its own, one per distinct per-function allowlist; the Redis client (its
/// connections are pooled per thread, see `modules::redis::client`); and the functions'
/// SQLite databases (`modules::db::pool`). Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<SharedDict>,
    egress: Arc<EgressState>,
    redis: Option<Arc<RedisClient>>,
    databases: Option<Arc<Databases>>,
}

struct EgressState {
    node: Arc<NodeEgress>,
    connect_timeout: Duration,
    /// The client of functions with no allowlist of their own.
    default: Outbound,
    by_allowlist: parking_lot::Mutex<HashMap<Vec<AllowRule>, Outbound>>,
    observer: Option<Arc<dyn EgressObserver>>,
}

impl Engine {
    pub fn new(config: &EngineConfig) -> Result<Engine, String> {
        crate::clock::start();
        // reqwest is built without a default crypto provider; install ring's once.
        crate::install_crypto_provider();
        let node = Arc::new(config.egress.clone());
        let default = Outbound::build(
            Policy::new(node.clone(), Vec::new()),
            config.http_connect_timeout,
        )?;
        Ok(Engine {
            shared: Arc::new(SharedDict::new(config.shared_dict_bytes)),
            egress: Arc::new(EgressState {
                node,
                connect_timeout: config.http_connect_timeout,
                default,
                by_allowlist: parking_lot::Mutex::default(),
                observer: config.egress_observer.clone(),
            }),
            redis: config
                .redis
                .clone()
                .map(|config| Arc::new(RedisClient::new(config))),
            databases: config
                .db
                .clone()
                .map(|config| Arc::new(Databases::new(config))),
        })
    }

    /// The node's Redis client, if `serve --redis` configured one.
    pub fn redis(&self) -> Option<Arc<RedisClient>> {
        self.redis.clone()
    }

    /// The node's function databases, if it has a data dir (`EngineConfig::db`).
    pub fn databases(&self) -> Option<Arc<Databases>> {
        self.databases.clone()
    }

    pub fn shared_dict(&self) -> Arc<SharedDict> {
        self.shared.clone()
    }

    /// The outbound client for a function whose own allowlist is `allow`: the shared
    /// default one when it is empty, else one per distinct list (built on first use).
    pub fn outbound(&self, allow: &[AllowRule]) -> Result<Outbound, String> {
        if allow.is_empty() {
            return Ok(self.egress.default.clone());
        }
        let mut key = allow.to_vec();
        key.sort_unstable();
        key.dedup();
        let mut cache = self.egress.by_allowlist.lock();
        if let Some(outbound) = cache.get(&key) {
            return Ok(outbound.clone());
        }
        let outbound = Outbound::build(
            Policy::new(self.egress.node.clone(), key.clone()),
            self.egress.connect_timeout,
        )?;
        if cache.len() >= MAX_CACHED_POLICIES {
            cache.clear();
        }
        cache.insert(key, outbound.clone());
        Ok(outbound)
    }

    /// Reports a refused outbound call of `function` to the observer.
    pub fn egress_denied(&self, function: &str, reason: DenyReason) {
        if let Some(observer) = &self.egress.observer {
            observer.denied(function, reason);
        }
    }
}

/// One function's own egress allowlist (its config's `egress_allow`) and the client that
/// enforces it, looked up in the [`Engine`] by the first instance and kept here, so that
/// later instances (cold starts on the request path) take no lock. A node runs one
/// engine; the first engine asked is the one whose client is kept.
#[derive(Debug, Default)]
pub struct FunctionEgress {
    allow: Vec<AllowRule>,
    outbound: OnceLock<Outbound>,
}

impl FunctionEgress {
    pub fn new(allow: Vec<AllowRule>) -> Arc<FunctionEgress> {
        Arc::new(FunctionEgress {
            allow,
            outbound: OnceLock::new(),
        })
    }

    /// No entries of its own: the node's rules only.
    pub fn none() -> Arc<FunctionEgress> {
        Arc::default()
    }

    pub fn allow(&self) -> &[AllowRule] {
        &self.allow
    }

    pub(crate) fn outbound(&self, engine: &Engine) -> Result<Outbound, String> {
        if self.allow.is_empty() {
            return engine.outbound(&[]);
        }
        if let Some(outbound) = self.outbound.get() {
            return Ok(outbound.clone());
        }
        let outbound = engine.outbound(&self.allow)?;
        Ok(self.outbound.get_or_init(|| outbound).clone())
    }
}
