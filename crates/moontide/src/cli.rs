//! Command-line parsing (clap) and what each command does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use moontide_runtime::egress::AllowRule;
use moontide_runtime::modules::redis::RedisConfig;
use moontide_server::ServeConfig;
use moontide_supervisor::supervise;
use serde_json::{Value, json};

use crate::client::Client;
use crate::render::Output;

#[derive(Debug, Parser)]
#[command(
    name = "moontide",
    version,
    about = "Moontide: Lua functions and an API gateway in one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Admin API URL (client commands).
    #[arg(
        long,
        global = true,
        env = "MOONTIDE_ADMIN",
        default_value = "http://127.0.0.1:9080"
    )]
    admin_url: String,
    /// Data dir: where `serve` keeps its state, and where clients find the admin token.
    #[arg(
        long,
        global = true,
        env = "MOONTIDE_DATA_DIR",
        default_value = "moontide-data"
    )]
    data_dir: PathBuf,
    /// What client commands print: aligned tables for a person, or the admin API's JSON
    /// for a script.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// The autoscaler's knobs of `deploy` (see DESIGN.md §2 and `moontide_server::autoscale`).
#[derive(Debug, clap::Args)]
struct ScalingArgs {
    /// Calls one instance serves at once, as coroutines sharing its state and memory cap
    /// (the autoscaler's target; 1 to 1000, default 1).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Idle grace: without calls this long, scale down to --min (e.g. 60s).
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Slow average of observed concurrency (scale-down follows it), e.g. 1s.
    #[arg(long)]
    stable_window: Option<String>,
    /// Fast average of observed concurrency (scale-up follows it), e.g. 100ms.
    #[arg(long)]
    panic_window: Option<String>,
    /// Most instances created per second on the node.
    #[arg(long)]
    max_scale_up_rate: Option<u32>,
    /// Most calls waiting for an instance; more are shed with 503.
    #[arg(long)]
    queue_size: Option<u32>,
    /// Longest a call waits for an instance before a 503, e.g. 1s.
    #[arg(long)]
    queue_timeout: Option<String>,
}

impl ScalingArgs {
    /// The set knobs as admin API config fields.
    fn into_config(self, config: &mut serde_json::Map<String, Value>) {
        let fields = [
            ("concurrency", self.concurrency.map(|v| json!(v))),
            ("idle_timeout", self.idle_timeout.map(|v| json!(v))),
            ("stable_window", self.stable_window.map(|v| json!(v))),
            ("panic_window", self.panic_window.map(|v| json!(v))),
            (
                "max_scale_up_rate",
                self.max_scale_up_rate.map(|v| json!(v)),
            ),
            ("queue_size", self.queue_size.map(|v| json!(v))),
            ("queue_timeout", self.queue_timeout.map(|v| json!(v))),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                config.insert(key.into(), value);
            }
        }
    }
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of `Serve` costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run a node: data plane, admin API and everything deployed.
    ///
    /// `--config FILE` reads these flags from a YAML file, one key per flag without its
    /// dashes (`store: etcd://...`, `metrics-public: true`, `egress-allow: [...]`); the
    /// command line and the flags' environment variables win over it.
    Serve {
        /// A YAML file of serve flags (see above).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data-plane address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin API address.
        #[arg(long = "admin", default_value = "127.0.0.1:9080")]
        admin_addr: SocketAddr,
        /// Data-plane worker threads (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Deploy every examples/*.lua at start (if not deployed yet).
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Most Lua instances on the node, all functions together.
        #[arg(long, default_value_t = 20_000)]
        max_instances: usize,
        /// Most Lua memory all instances hold together, e.g. 8GiB (default: half the RAM).
        #[arg(long)]
        instance_memory: Option<String>,
        /// Let every function's outbound http reach this range, denied by default
        /// (loopback, private, link-local...): CIDR[:PORT], e.g. 10.0.0.0/8,
        /// 127.0.0.1:8081, [::1]:8081; repeatable. Never opens the admin API or the data
        /// plane.
        #[arg(long = "egress-allow", value_name = "CIDR[:PORT]", value_parser = parse_allow_rule)]
        egress_allow: Vec<AllowRule>,
        /// Longest wait for a whole request head, idle keep-alive time included (data
        /// plane and admin API), e.g. 30s; then the connection is closed.
        #[arg(long, default_value = "30s", value_parser = parse_timeout)]
        header_timeout: Duration,
        /// Longest wait for each next piece of a request body (data plane and admin API),
        /// e.g. 60s; then the request is answered 408 and the connection closed.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        body_timeout: Duration,
        /// Most open data-plane connections on the node (0: no cap); more are answered
        /// 503 and closed.
        #[arg(long, default_value_t = 16_384)]
        max_connections: usize,
        /// Most open data-plane connections from one client address, IPv6 by /64 (0: no
        /// cap); more are answered 429 and closed. Behind a load balancer, raise it or 0.
        #[arg(long, default_value_t = 4_096)]
        max_connections_per_ip: usize,
        /// Serve /metrics on the admin port without the admin token (by default a
        /// scraper presents it: `Authorization: Bearer TOKEN`).
        #[arg(long)]
        metrics_public: bool,
        /// Keep the config in an etcd cluster that every node of a cluster shares:
        /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (keys under /moontide/ by default).
        /// Without it the config lives in the data dir (one node). Give every node the
        /// same admin token through MOONTIDE_ADMIN_TOKEN.
        #[arg(long, value_name = "URL")]
        store: Option<moontide_server::StoreConfig>,
        /// The Redis every function's `redis` module talks to:
        /// redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]. Not subject to the egress policy
        /// (it is the operator's address; no function can name another).
        #[arg(long, value_name = "URL", value_parser = parse_redis)]
        redis: Option<RedisConfig>,
        /// Longest one `redis` command may take (waiting for a connection included),
        /// e.g. 5s; then it returns `nil, message`.
        #[arg(long, default_value = "5s", value_parser = parse_timeout)]
        redis_timeout: Duration,
        /// Longest opening a connection to Redis may take, e.g. 1s.
        #[arg(long, default_value = "1s", value_parser = parse_timeout)]
        redis_connect_timeout: Duration,
        /// This node's name in the node registry (`moontide nodes`); default
        /// HOSTNAME:DATA_PORT.
        #[arg(long, env = "MOONTIDE_NODE_NAME", value_name = "NAME")]
        node_name: Option<String>,
        /// The host other nodes and load balancers reach this node at (e.g. a pod's IP);
        /// default: the listen address, or the host name when listening on 0.0.0.0.
        #[arg(long, env = "MOONTIDE_ADVERTISE", value_name = "HOST")]
        advertise: Option<String>,
        /// How long a node that died stays in the registry (its lease's time-to-live).
        #[arg(long, default_value = "10s", value_parser = parse_timeout)]
        node_ttl: Duration,
        /// On SIGTERM, keep serving this long with /readyz answering 503 and the registry
        /// saying `draining`, so load balancers stop sending first (e.g. 5s under
        /// Kubernetes); then stop accepting.
        #[arg(long, default_value = "0s", value_parser = parse_duration_or_zero)]
        drain_delay: Duration,
        /// Then give calls in flight this long to finish.
        #[arg(long, default_value = "30s", value_parser = parse_timeout)]
        shutdown_grace: Duration,
    },
    /// Deploy a function from a .lua file, a directory with main.lua, or a .zip bundle.
    Deploy {
        name: String,
        path: PathBuf,
        /// Extra path prefix that serves the function (besides /fn/NAME).
        #[arg(long)]
        route: Option<String>,
        /// Wall-clock budget of one call, e.g. 5s, 250ms.
        #[arg(long)]
        timeout: Option<String>,
        /// Memory cap per instance, e.g. 64MiB.
        #[arg(long)]
        memory: Option<String>,
        /// Instances kept warm.
        #[arg(long)]
        min: Option<u32>,
        /// Most instances on the node.
        #[arg(long)]
        max: Option<u32>,
        #[command(flatten)]
        scaling: ScalingArgs,
        /// Environment (secrets), KEY=VALUE; repeatable.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Let this function's outbound http reach this range, on top of the node's
        /// allowlist: CIDR[:PORT]; repeatable. ADDRESS:PORT of the node's data plane lets
        /// it call the node itself.
        #[arg(long = "egress-allow", value_name = "CIDR[:PORT]")]
        egress_allow: Vec<String>,
        /// Run the function on a schedule: a cron expression ("0 3 * * *", 6 fields with
        /// seconds first), @hourly, @daily, @weekly, @monthly, @yearly or "@every 30s".
        #[arg(long, value_name = "CRON")]
        schedule: Option<String>,
        /// The schedule's IANA time zone (default UTC), e.g. Europe/Berlin.
        #[arg(long, value_name = "ZONE", requires = "schedule")]
        schedule_timezone: Option<String>,
        /// When a run is due while the previous one still runs: skip (default) or queue.
        #[arg(long, value_name = "POLICY", requires = "schedule")]
        schedule_overlap: Option<String>,
        /// Start each scheduled run up to this long after its time (random), e.g. 30s.
        #[arg(long, value_name = "DURATION", requires = "schedule")]
        schedule_jitter: Option<String>,
        /// Return once every live node of the cluster serves the new version (at most
        /// 10s); fail, naming the nodes that do not, if some still don't.
        #[arg(long)]
        wait_cluster: bool,
    },
    /// Invoke a function with a JSON event and print its result.
    Invoke {
        name: String,
        /// The event as JSON text.
        #[arg(long, conflicts_with = "data_file")]
        data: Option<String>,
        /// A file holding the event JSON.
        #[arg(long)]
        data_file: Option<PathBuf>,
    },
    /// List functions.
    Ls,
    /// List the cluster's live nodes.
    ///
    /// From the node registry: each node's state, the config revision it serves, its
    /// addresses and load. `*` marks the node that answered.
    Nodes,
    /// Show a function.
    Info { name: String },
    /// Remove a function and all its versions.
    Rm { name: String },
    /// Serve an earlier version (default: the one before the active one).
    Rollback {
        name: String,
        #[arg(long)]
        to: Option<u64>,
    },
    /// List a function's kept versions.
    Versions { name: String },
    /// Apply a manifest: upstreams, plugins, functions and routes, in that order.
    Apply {
        /// The manifest (YAML; see `moontide apply --help` and the README).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print a function's log.
    Logs {
        name: String,
        /// Keep printing new lines.
        #[arg(long, short)]
        follow: bool,
        /// How many past lines to print first.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
}

impl Command {
    /// The function a command names, if any.
    fn function_name(&self) -> Option<&str> {
        match self {
            Command::Deploy { name, .. }
            | Command::Invoke { name, .. }
            | Command::Info { name }
            | Command::Rm { name }
            | Command::Rollback { name, .. }
            | Command::Versions { name }
            | Command::Logs { name, .. } => Some(name),
            Command::Serve { .. } | Command::Ls | Command::Nodes | Command::Apply { .. } => None,
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = || Client::new(&cli.admin_url, &cli.data_dir, cli.output);
    if let Some(name) = cli.command.function_name() {
        // Checked here, as the API checks it: a name such as `../etc` would otherwise
        // become another URL path and a confusing "no such endpoint".
        if let Err(message) = moontide_server::api::validate_function_name(name) {
            eprintln!("error: name '{name}': {message} (invalid_request)");
            return Ok(ExitCode::FAILURE);
        }
    }
    match cli.command {
        Command::Serve {
            config,
            listen,
            admin_addr,
            workers,
            examples,
            max_instances,
            instance_memory,
            egress_allow,
            header_timeout,
            body_timeout,
            max_connections,
            max_connections_per_ip,
            metrics_public,
            store,
            redis,
            redis_timeout,
            redis_connect_timeout,
            node_name,
            advertise,
            node_ttl,
            drain_delay,
            shutdown_grace,
        } => {
            if let Some(config) = config {
                // `config_file::expand` turns it into flags before clap sees it.
                bail!(
                    "--config {} was not read: give it after `serve`",
                    config.display()
                );
            }
            if let Some(name) = &node_name {
                moontide_server::api::validate_node_name(name)
                    .map_err(|message| anyhow::anyhow!("--node-name {name:?}: {message}"))?;
            }
            let mut config = ServeConfig {
                data_dir: cli.data_dir.clone(),
                listen,
                admin: admin_addr,
                max_instances,
                timeouts: moontide_server::edge::ClientTimeouts {
                    head: header_timeout,
                    body: body_timeout,
                },
                connections: moontide_server::edge::conn_limits::ConnLimitConfig {
                    total: max_connections,
                    per_ip: max_connections_per_ip,
                },
                metrics_public,
                node_name,
                advertise,
                node_ttl,
                drain_delay,
                shutdown_grace,
                store: store.unwrap_or_default(),
                // One credential for every node of a cluster (e.g. a Kubernetes Secret).
                admin_token: std::env::var("MOONTIDE_ADMIN_TOKEN")
                    .ok()
                    .filter(|token| !token.trim().is_empty()),
                ..ServeConfig::default()
            };
            config.engine.egress.allow = egress_allow;
            config.engine.redis = redis.map(|redis| RedisConfig {
                command_timeout: redis_timeout,
                connect_timeout: redis_connect_timeout,
                ..redis
            });
            if let Some(workers) = workers {
                if workers == 0 {
                    bail!("--workers must be at least 1");
                }
                config.workers = workers;
            }
            if max_instances == 0 {
                bail!("--max-instances must be at least 1");
            }
            if let Some(memory) = instance_memory {
                config.max_instance_memory = moontide_server::api::parse_size(
                    &moontide_server::api::SizeInput::Text(memory),
                )
                .map_err(|message| anyhow::anyhow!("--instance-memory: {message}"))?
                    as usize;
            }
            serve(config, examples).await
        }
        Command::Deploy {
            name,
            path,
            route,
            timeout,
            memory,
            min,
            max,
            scaling,
            env,
            egress_allow,
            schedule,
            schedule_timezone,
            schedule_overlap,
            schedule_jitter,
            wait_cluster,
        } => {
            let mut config = serde_json::Map::new();
            if let Some(cron) = schedule {
                let mut schedule = serde_json::Map::new();
                schedule.insert("cron".into(), json!(cron));
                if let Some(zone) = schedule_timezone {
                    schedule.insert("timezone".into(), json!(zone));
                }
                if let Some(overlap) = schedule_overlap {
                    schedule.insert("overlap".into(), json!(overlap));
                }
                if let Some(jitter) = schedule_jitter {
                    schedule.insert("jitter".into(), json!(jitter));
                }
                config.insert("schedule".into(), serde_json::Value::Object(schedule));
            }
            if !egress_allow.is_empty() {
                config.insert("egress_allow".into(), json!(egress_allow));
            }
            scaling.into_config(&mut config);
            if let Some(route) = route {
                config.insert("route".into(), json!(route));
            }
            if let Some(timeout) = timeout {
                config.insert("timeout".into(), json!(timeout));
            }
            if let Some(memory) = memory {
                config.insert("memory".into(), json!(memory));
            }
            if let Some(min) = min {
                config.insert("min".into(), json!(min));
            }
            if let Some(max) = max {
                config.insert("max".into(), json!(max));
            }
            if !env.is_empty() {
                let mut vars = serde_json::Map::new();
                for (index, pair) in env.iter().enumerate() {
                    // The message must not echo the argument: it may be the secret itself.
                    let (key, value) = pair
                        .split_once('=')
                        .with_context(|| format!("--env #{}: expected KEY=VALUE", index + 1))?;
                    vars.insert(key.to_string(), json!(value));
                }
                config.insert("env".into(), Value::Object(vars));
            }
            client()?
                .deploy(&name, &path, Value::Object(config), wait_cluster)
                .await
        }
        Command::Invoke {
            name,
            data,
            data_file,
        } => {
            let event = match (data, data_file) {
                (Some(data), _) => data,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                (None, None) => "{}".to_string(),
            };
            client()?.invoke(&name, event).await
        }
        Command::Ls => client()?.list().await,
        Command::Nodes => client()?.nodes().await,
        Command::Info { name } => client()?.info(&name).await,
        Command::Rm { name } => client()?.remove(&name).await,
        Command::Rollback { name, to } => client()?.rollback(&name, to).await,
        Command::Versions { name } => client()?.versions(&name).await,
        Command::Apply { file } => crate::apply::apply(&client()?, &file).await,
        Command::Logs { name, follow, tail } => client()?.logs(&name, follow, tail).await,
    }
}

/// `--header-timeout`/`--body-timeout` of `serve`: a duration such as `30s` or `250ms`,
/// more than zero.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = moontide_server::api::parse_duration(
        &moontide_server::api::DurationInput::Text(text.to_string()),
    )?;
    if duration.is_zero() {
        return Err("must be more than 0".to_string());
    }
    Ok(duration)
}

/// `--drain-delay` of `serve`: a duration with a unit, `0s` included.
fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    moontide_server::api::parse_duration(&moontide_server::api::DurationInput::Text(
        text.to_string(),
    ))
}

/// `--redis` of `serve`.
fn parse_redis(text: &str) -> Result<RedisConfig, String> {
    RedisConfig::parse(text)
}

/// `--egress-allow` of `serve`: one allowlist entry.
fn parse_allow_rule(text: &str) -> Result<AllowRule, String> {
    text.parse()
}

async fn serve(config: ServeConfig, examples: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match supervise::inherited() {
        Some(inherited) => {
            let inherited = inherited.context("taking the listeners from the supervisor")?;
            serve_node(config, inherited, examples).await
        }
        None => supervise(config).await,
    }
}

/// The supervisor (ARCHITECTURE.md, "Isolation"): binds the listeners, then runs the node
/// as a child process on them, again after each crash.
async fn supervise(config: ServeConfig) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let supervisor = supervise::Supervisor {
        data: supervise::bind(config.listen)?,
        admin: supervise::bind(config.admin)?,
        data_dir: config.data_dir,
    };
    Ok(supervisor.run().await?)
}

/// The node itself, in the supervisor's child.
async fn serve_node(
    config: ServeConfig,
    inherited: supervise::Inherited,
    examples: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let data_dir = config.data_dir.clone();
    moontide_supervisor::recorder::install(&data_dir).context("mapping the flight recorder")?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let server =
        moontide_server::serve(config, inherited, shutdown_signal(), move |data, admin| {
            // Tests and scripts read these two lines to find the ports.
            println!("moontide: data plane listening on http://{data}");
            println!("moontide: admin API listening on http://{admin}");
            let _ = ready_tx.send(admin);
        });
    let deployer = async move {
        let Ok(admin) = ready_rx.await else { return };
        if let Some(dir) = examples
            && let Err(error) = deploy_examples(&format!("http://{admin}"), &data_dir, &dir).await
        {
            eprintln!("moontide: deploying examples failed: {error:#}");
        }
    };
    let (result, ()) = tokio::join!(server, deployer);
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Deploys every `*.lua` file of `dir` under its file stem, unless a function of that
/// name exists already.
async fn deploy_examples(
    admin: &str,
    data_dir: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let client = Client::new(admin, data_dir, Output::Text)?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "lua"))
        .collect();
    entries.sort();
    for path in entries {
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if client.exists(name).await? {
            continue;
        }
        client.deploy(name, &path, json!({}), false).await?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    // Give log lines a moment to flush.
    tokio::time::sleep(Duration::from_millis(1)).await;
}
