//! The node-wide runtime context shared by every instance on every thread.

use std::sync::Arc;
use std::time::Duration;

use crate::modules::shared::SharedDict;

/// Node-wide runtime settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Capacity of the node-wide `shared` dictionary, in bytes.
    pub shared_dict_bytes: usize,
    /// Connect timeout of the outbound `http` client.
    pub http_connect_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shared_dict_bytes: 64 << 20,
            http_connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What every instance on the node shares: the `shared` dictionary and the outbound HTTP
/// client (with its connection pool). Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<SharedDict>,
    http: reqwest::Client,
}

impl Engine {
    pub fn new(config: &EngineConfig) -> Result<Engine, String> {
        crate::clock::start();
        // reqwest is built without a default crypto provider; install ring's once.
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(config.http_connect_timeout)
            .user_agent(concat!("moontide/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the outbound HTTP client: {e}"))?;
        Ok(Engine {
            shared: Arc::new(SharedDict::new(config.shared_dict_bytes)),
            http,
        })
    }

    pub fn shared_dict(&self) -> Arc<SharedDict> {
        self.shared.clone()
    }

    pub fn http_client(&self) -> reqwest::Client {
        self.http.clone()
    }
}
