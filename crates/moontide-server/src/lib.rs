//! A Moontide node: the data plane, the admin API, the config snapshot that connects them,
//! instance pools, metrics and function logs.
//!
//! ```text
//!  client ──HTTP──▶ worker thread (hyper) ──▶ snapshot lookup ──▶ local pool ──▶ Lua instance
//!                        ▲                         ▲
//!  CLI ──admin API──▶ axum ──txn──▶ Store ──watch──▶ registry builder (compiles, swaps snapshot)
//!                        └──invoke job──▶ worker thread
//! ```
//!
//! [`serve`] wires it together: it opens the store (the data dir's SQLite file, or etcd with
//! [`StoreConfig::Etcd`]), makes the admin token (or takes the cluster's),
//! binds both listeners, starts the workers and the snapshot builder, and runs until the
//! shutdown future resolves; then it stops accepting, lets calls in flight finish (bounded
//! by the grace period) and returns.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod autoscale;
pub mod budget;
pub mod cluster;
pub mod dataplane;
pub mod edge;
pub mod errors;
pub mod front;
pub mod gateway;
pub mod logs;
pub mod metrics;
pub mod pool;
pub mod records;
pub mod registry;
pub mod triggers;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moontide_runtime::{Engine, EngineConfig};
use moontide_store::{LocalMembership, Membership, SqliteStore, Store};
#[cfg(feature = "etcd")]
use moontide_store_etcd::{EtcdConfig, EtcdStore};

use crate::admin::AdminState;
use crate::budget::NodeBudget;
use crate::logs::{LogHub, LogRecord};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::worker::{WorkerConfig, Workers};
use moontide_supervisor::ledger::Ledger;
use moontide_supervisor::supervise::Inherited;

/// How a node is run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Data-plane address (port 0 picks a free port; the bound address is printed).
    pub listen: SocketAddr,
    /// Admin API address.
    pub admin: SocketAddr,
    /// Data-plane worker threads (each runs its own Lua instances).
    pub workers: usize,
    /// Longest time calls in flight may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// At shutdown, how long the node keeps serving while `/readyz` answers 503 and its
    /// registry record says `draining`, so load balancers stop sending first.
    pub drain_delay: Duration,
    /// The node's name in the registry (`None`: `HOSTNAME:DATA_PORT`).
    pub node_name: Option<String>,
    /// The host others reach this node at (`None`: the listen address, or the host name
    /// when it listens on every address).
    pub advertise: Option<String>,
    /// The registry lease's time-to-live: how long a node that died stays listed.
    pub node_ttl: Duration,
    /// Largest request body the data plane reads.
    pub max_body_bytes: usize,
    /// Most Lua instances on the node, all functions together.
    pub max_instances: usize,
    /// Most Lua memory the node's instances hold together (soft: see `budget`).
    pub max_instance_memory: usize,
    /// How long clients may take to send request heads and bodies (data plane and admin).
    pub timeouts: edge::ClientTimeouts,
    /// Caps on open data-plane connections, node-wide and per client address.
    pub connections: edge::conn_limits::ConnLimitConfig,
    /// `/metrics` answers without the admin token (`serve --metrics-public`).
    pub metrics_public: bool,
    /// Where the config lives: the data dir's SQLite file, or an etcd cluster.
    pub store: StoreConfig,
    /// The admin token every node of a cluster shares (`MOONTIDE_ADMIN_TOKEN`); `None`:
    /// the data dir's token file, created on first start.
    pub admin_token: Option<String>,
    pub engine: EngineConfig,
}

/// Which [`Store`] a node uses (`serve --store`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// `store.db` in the data dir (one node).
    #[default]
    Embedded,
    /// An etcd cluster shared by every node (`etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`;
    /// the `etcd` feature).
    #[cfg(feature = "etcd")]
    Etcd(EtcdConfig),
}

impl std::str::FromStr for StoreConfig {
    type Err = String;

    /// `etcd://…` (see [`EtcdConfig::from_url`]); nothing else is a store URL yet.
    fn from_str(url: &str) -> Result<StoreConfig, String> {
        #[cfg(feature = "etcd")]
        if url.starts_with("etcd://") {
            return EtcdConfig::from_url(url)
                .map(StoreConfig::Etcd)
                .map_err(|e| e.to_string());
        }
        #[cfg(not(feature = "etcd"))]
        if url.starts_with("etcd://") {
            return Err(format!(
                "this moontide was built without etcd support, so it cannot use {url:?}: \
                 build it with `cargo build --release --features etcd` (which needs protoc: \
                 apt-get install protobuf-compiler)"
            ));
        }
        Err(format!(
            "unsupported store {url:?}: expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX] \
             (without --store the node keeps its config in the data dir)"
        ))
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("moontide-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9080)),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            node_name: None,
            advertise: None,
            node_ttl: Duration::from_secs(10),
            max_body_bytes: 6 << 20,
            max_instances: 20_000,
            max_instance_memory: budget::default_memory_budget(),
            timeouts: edge::ClientTimeouts::default(),
            connections: edge::conn_limits::ConnLimitConfig::default(),
            metrics_public: false,
            store: StoreConfig::Embedded,
            admin_token: None,
            engine: EngineConfig::default(),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] moontide_store::StoreError),
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The admin token file in the data dir.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Writes a token given from outside (`MOONTIDE_ADMIN_TOKEN`) to the data dir's token
/// file (mode 0600), so local clients (`moontide --data-dir DIR ...`) find it as before;
/// returns it trimmed.
pub fn store_token(data_dir: &Path, token: &str) -> std::io::Result<String> {
    let token = token.trim();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the admin token given is empty",
        ));
    }
    let path = token_path(data_dir);
    if std::fs::read_to_string(&path).is_ok_and(|stored| stored.trim() == token) {
        return Ok(token.to_string());
    }
    write_token(&path, token)?;
    Ok(token.to_string())
}

/// Reads the admin token, creating it (random, mode 0600) on first start.
pub fn load_or_create_token(data_dir: &Path) -> std::io::Result<String> {
    let path = token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_token(&path, &token)?;
    Ok(token)
}

/// Writes the token file atomically, mode 0600.
fn write_token(path: &Path, token: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("token.tmp");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temporary)?;
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)
}

/// Tells each function that crashed the node, in its own log, what the supervisor
/// recorded (the log of the process that crashed died with it).
fn log_crashes(logs: &LogHub, crashes: &Ledger) {
    for record in &crashes.versions {
        let quarantine = match record.quarantined_since_ms {
            Some(since) => format!(
                "; quarantined since {} (calls answer 503 function_quarantined; deploy a new \
                 version to lift it)",
                moontide_runtime::modules::time::iso8601(since as f64 / 1000.0).unwrap_or_default()
            ),
            None => format!(
                "; quarantined at {} crashes",
                moontide_supervisor::ledger::QUARANTINE_AFTER
            ),
        };
        logs.function(&record.function).push(LogRecord {
            ts_ms: record.last_crash_ms,
            level: "error",
            version: record.version,
            request_id: "supervisor".to_string(),
            message: format!(
                "version {} crashed the node {} time(s), last by {} at {}{quarantine}",
                record.version,
                record.crashes,
                record.last_signal,
                moontide_runtime::modules::time::iso8601(record.last_crash_ms as f64 / 1000.0)
                    .unwrap_or_default()
            ),
        });
    }
}

/// This machine's host name (a Kubernetes pod's name), for the default node name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The address others reach a listener at: `HOST:PORT` with the advertised host, else
/// the bound address, or the host name when it is bound to every address.
fn advertised(host: Option<&str>, bound: SocketAddr) -> String {
    match host {
        Some(host) if host.contains(':') && !host.starts_with('[') => {
            format!("[{host}]:{}", bound.port())
        }
        Some(host) => format!("{host}:{}", bound.port()),
        None if bound.ip().is_unspecified() => format!("{}:{}", host_name(), bound.port()),
        None => bound.to_string(),
    }
}

/// Runs a node until `shutdown` resolves, on the listeners the supervisor bound and handed
/// over (`moontide_supervisor::supervise`). `on_ready` receives the bound data-plane and
/// admin addresses once the first snapshot serves.
pub async fn serve(
    config: ServeConfig,
    listeners: Inherited,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), ServeError> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let token = match &config.admin_token {
        Some(token) => store_token(&config.data_dir, token),
        None => load_or_create_token(&config.data_dir),
    }
    .map_err(|source| ServeError::DataDir {
        path: token_path(&config.data_dir),
        source,
    })?;
    // The node registry lives beside the config: in this process on the embedded store
    // (the node is its whole cluster), in etcd under leases otherwise.
    let (store, membership): (Arc<dyn Store>, Arc<dyn Membership>) = match &config.store {
        StoreConfig::Embedded => (
            Arc::new(SqliteStore::open(&config.data_dir.join("store.db"))?),
            Arc::new(LocalMembership::new()),
        ),
        // Connects lazily: a node started while etcd is down waits (not ready) until it
        // can load its config.
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(etcd) => {
            let etcd = Arc::new(EtcdStore::connect(etcd).await?);
            (etcd.clone(), etcd)
        }
    };
    let metrics = Arc::new(Metrics::new());
    metrics
        .node_instance_budget
        .set(config.max_instances as i64);
    metrics
        .node_memory_budget
        .set(config.max_instance_memory as i64);
    let budget = Arc::new(NodeBudget::new(
        config.max_instances,
        config.max_instance_memory,
        metrics.node_instances.clone(),
        metrics.node_memory.clone(),
    ));
    // The crash ledger changes only between node processes (the supervisor writes it).
    let crashes = Ledger::load(&config.data_dir).unwrap_or_else(|error| {
        tracing::error!(%error, "the crash ledger is unreadable; no version is quarantined");
        Ledger::default()
    });
    metrics.load_crash_ledger(&crashes);
    let logs = Arc::new(LogHub::default());
    log_crashes(&logs, &crashes);
    let registry = Arc::new(Registry::new(metrics.clone(), logs, budget, crashes));

    let data_listener = listeners.data;
    let admin_listener = listeners.admin;
    let data_addr = data_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(%admin_addr, "the admin API listens beyond loopback; keep the token secret");
    }
    // Functions' outbound calls never reach the admin API, nor the data plane unless a
    // function's own allowlist names it (see `moontide_runtime::egress`).
    let mut engine_config = config.engine.clone();
    engine_config.egress.admin_listeners = vec![admin_addr];
    engine_config.egress.data_plane_listeners = vec![data_addr];
    engine_config.egress_observer = Some(Arc::new(metrics::EgressDenials(metrics.clone())));
    // Functions' `db` databases: `<data-dir>/db/<function>.sqlite` (the runtime is told the
    // directory, nothing else about the data dir).
    if engine_config.db.is_none() {
        engine_config.db = Some(moontide_runtime::modules::db::DbConfig::new(
            config.data_dir.join("db"),
        ));
    }
    let engine = Engine::new(&engine_config).map_err(ServeError::Runtime)?;

    let (cluster, registrar) = cluster::ClusterNode::start(
        membership,
        cluster::ClusterConfig {
            name: config
                .node_name
                .clone()
                .unwrap_or_else(|| format!("{}:{}", host_name(), data_addr.port())),
            data_plane: advertised(config.advertise.as_deref(), data_addr),
            admin: advertised(config.advertise.as_deref(), admin_addr),
            ttl: config.node_ttl,
        },
        registry.clone(),
        metrics.clone(),
    );
    let builder = tokio::spawn(registry::run_builder(registry.clone(), store.clone()));
    // Active health checks run here, on the admin runtime, never on data-plane workers.
    let checker = tokio::spawn(gateway::health::run(registry.clone()));
    // Serve nothing before the first snapshot is loaded: the listeners may already hold
    // connections (queued while a crashed node restarted), and an empty snapshot would
    // answer them 404.
    while !registry.is_ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.set_state(moontide_cluster::NodeState::Ready);
    // One statement per label: `get_or_create` returns a read guard, and a second call
    // creating a series while the first guard lives would wait for it forever.
    let refused = |refusal: edge::conn_limits::Refusal| {
        metrics
            .connections_refused
            .get_or_create(&metrics::RefusedLabels {
                reason: refusal.label(),
            })
            .clone()
    };
    let refused_total = refused(edge::conn_limits::Refusal::Total);
    let refused_per_ip = refused(edge::conn_limits::Refusal::PerIp);
    let conn_limits = Arc::new(edge::conn_limits::ConnLimits::new(
        config.connections,
        metrics.connections.clone(),
        refused_total,
        refused_per_ip,
    ));
    let (stop_workers, stopped) = tokio::sync::watch::channel(false);
    let workers = Arc::new(Workers::start(WorkerConfig {
        count: config.workers,
        listener: data_listener,
        engine,
        registry: registry.clone(),
        max_body_bytes: config.max_body_bytes,
        timeouts: config.timeouts,
        conn_limits,
        shutdown: stopped,
        shutdown_grace: config.shutdown_grace,
    })?);

    // Scheduled functions: claims and runs on this runtime, calls on the workers.
    let scheduler = tokio::spawn(triggers::scheduler::run(Arc::new(
        triggers::scheduler::SchedulerContext {
            store: store.clone(),
            membership: cluster.membership.clone(),
            registry: registry.clone(),
            workers: workers.clone(),
            node: cluster.name.clone(),
            process: rand::random(),
        },
    )));

    let state = Arc::new(AdminState {
        store,
        registry: registry.clone(),
        workers: workers.clone(),
        token,
        metrics_public: config.metrics_public,
        started,
        cluster: cluster.clone(),
        node: serde_json::json!({
            "name": cluster.name,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "restarts": listeners.restarts,
            "workers": config.workers.max(1),
            "data_plane": data_addr.to_string(),
            "admin": admin_addr.to_string(),
            "data_dir": config.data_dir.display().to_string(),
            "egress_allow": config.engine.egress.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "redis": config.engine.redis.as_ref().map(|redis| redis.redacted()),
        }),
    });
    admin_listener.set_nonblocking(true)?;
    let admin_listener = tokio::net::TcpListener::from_std(admin_listener)?;
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(edge::admin_listener::serve(
        admin_listener,
        admin::router(state),
        config.timeouts,
        async move {
            let _ = admin_stopped.await;
        },
    ));

    on_ready(data_addr, admin_addr);

    shutdown.await;
    // Draining: still serving, but `/readyz` says 503 and the registry says `draining`,
    // so load balancers (a Kubernetes Service) stop sending before the listeners close.
    registry.start_draining();
    cluster.set_state(moontide_cluster::NodeState::Draining);
    if !config.drain_delay.is_zero() {
        tracing::info!(delay = ?config.drain_delay, "draining: not ready, still serving");
        tokio::time::sleep(config.drain_delay).await;
    }
    tracing::info!("shutting down: no new connections; finishing calls in flight");
    scheduler.abort();
    let _ = stop_workers.send(true);
    let _ = stop_admin.send(());
    let joined = tokio::task::spawn_blocking(move || workers.join());
    let _ = tokio::time::timeout(config.shutdown_grace + Duration::from_secs(1), joined).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    // Last: leave the registry (the record goes now, not a lease TTL later).
    cluster.leave();
    let _ = tokio::time::timeout(Duration::from_secs(4), registrar).await;
    builder.abort();
    checker.abort();
    Ok(())
}
