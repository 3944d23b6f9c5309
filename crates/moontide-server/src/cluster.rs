//! This node's part in the cluster (`moontide-cluster`): it keeps its record in the node
//! registry, feeds it its load, and serves what the registry knows.
//!
//! - [`ClusterNode::start`] runs the registrar on the admin runtime: the record follows
//!   the revision the registry serves and the node's state (`starting`, `ready`,
//!   `draining`), and carries the load read by [`sample`] every second;
//! - `GET /v1/nodes` ([`list_nodes`]) and `GET /v1/scaling` ([`scaling`], the KEDA
//!   `metrics-api` signal) read the registry live;
//! - `?wait=cluster` on any admin write ([`wait_layer`]): the handlers report the
//!   revision they wrote ([`acknowledged`]); the layer then waits until every live node
//!   serves it and adds what it found to the answer (`cluster`). Every write's answer
//!   carries its revision in `X-Moontide-Revision`.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moontide_cluster::demand::DEFAULT_TARGET_UTILIZATION;
use moontide_cluster::record::records;
use moontide_cluster::registrar::{self, Identity, Inputs};
use moontide_cluster::{LoadMeter, LoadSample, NodeState, Scaling, wait};
use moontide_store::Membership;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::admin::json_response;
use crate::api::{DurationInput, FieldError, parse_duration};
use crate::errors::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// The header every admin write answers with: the store revision it wrote.
pub const REVISION_HEADER: &str = "x-moontide-revision";
/// How long `?wait=cluster` waits unless `wait_timeout` says otherwise, and the most it
/// may say.
const DEFAULT_CLUSTER_WAIT: Duration = Duration::from_secs(10);
const MAX_CLUSTER_WAIT: Duration = Duration::from_secs(60);

/// This node's handle on the registry.
pub struct ClusterNode {
    pub membership: Arc<dyn Membership>,
    pub name: String,
    state: watch::Sender<NodeState>,
    stop: watch::Sender<bool>,
}

/// How this node presents itself in the registry.
pub struct ClusterConfig {
    pub name: String,
    /// Addresses others reach this node at.
    pub data_plane: String,
    pub admin: String,
    /// The registry lease's time-to-live: how long a dead node stays listed.
    pub ttl: Duration,
}

impl ClusterNode {
    /// Starts the registrar (on the calling runtime); the node shows as `starting` until
    /// [`ClusterNode::set_state`] says otherwise.
    pub fn start(
        membership: Arc<dyn Membership>,
        config: ClusterConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (Arc<ClusterNode>, tokio::task::JoinHandle<()>) {
        let (state, state_rx) = watch::channel(NodeState::Starting);
        let (stop, stop_rx) = watch::channel(false);
        let identity = Identity {
            name: config.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_plane: config.data_plane,
            admin: config.admin,
            started_at_ms: registrar::unix_ms(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut meter = LoadMeter::new(cores);
        let load_registry = registry.clone();
        let view_metrics = metrics.clone();
        let own_name = config.name.clone();
        let inputs = Inputs {
            revision: registry.subscribe(),
            state: state_rx,
            load: Box::new(move || {
                let load = meter.observe(Instant::now(), sample(&load_registry));
                metrics.node_demand.set(load.demand);
                load
            }),
            on_view: Box::new(move |nodes| {
                let scaling = Scaling::of(nodes, DEFAULT_TARGET_UTILIZATION);
                view_metrics.cluster_nodes.set(scaling.live_nodes as i64);
                view_metrics
                    .cluster_desired_nodes
                    .set(scaling.desired_nodes as i64);
                if !nodes.iter().any(|node| node.name == own_name) {
                    tracing::debug!("this node's record is not in the registry view yet");
                }
            }),
            stop: stop_rx,
        };
        let task = tokio::spawn(registrar::run(
            membership.clone(),
            identity,
            config.ttl,
            inputs,
        ));
        let node = Arc::new(ClusterNode {
            membership,
            name: config.name,
            state,
            stop,
        });
        (node, task)
    }

    pub fn set_state(&self, state: NodeState) {
        self.state.send_replace(state);
    }

    pub fn state(&self) -> NodeState {
        *self.state.borrow()
    }

    /// Leaves the registry (the registrar task ends after deleting the record).
    pub fn leave(&self) {
        self.stop.send_replace(true);
    }
}

/// The node's load counters now.
pub fn sample(registry: &Registry) -> LoadSample {
    let snapshot = registry.snapshot();
    let mut sample = LoadSample {
        instances: registry.budget.instances() as u64,
        instance_budget: registry.budget.max_instances() as u64,
        memory_bytes: registry.budget.memory() as u64,
        memory_budget: registry.budget.max_memory() as u64,
        cpu_seconds: process_cpu_seconds(),
        ..LoadSample::default()
    };
    let units = snapshot
        .functions
        .values()
        .chain(snapshot.plugins.values().map(|plugin| &plugin.unit));
    for function in units {
        let pool = function.pool.status();
        sample.desired_instances += pool.desired.max(0) as u64;
        sample.busy_instances += pool.busy.max(0) as u64;
        sample.queued_calls += pool.waiting as u64;
        sample.calls_arrived +=
            function.metrics.http_requests.get() + function.metrics.invoke_requests.get();
        sample.calls_shed += function.metrics.shed_total();
    }
    sample
}

/// CPU time this process used, user and system, in seconds (`/proc/self/stat`; 0 where
/// there is no procfs). Clock ticks are `USER_HZ`, 100 on every Linux ABI.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15: the 12th and 13th after the name.
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

type Shared = State<Arc<AdminState>>;

/// `GET /v1/nodes`: every live node's record.
pub async fn list_nodes(State(state): Shared) -> Result<Response, ApiError> {
    let nodes = records(&state.cluster.membership.members().await?);
    Ok(json_response(
        StatusCode::OK,
        json!({"nodes": nodes, "this_node": state.cluster.name}),
    ))
}

/// `GET /v1/scaling[?target_utilization=0.7]`: how many nodes the cluster needs.
pub async fn scaling(State(state): Shared, request: Request) -> Result<Response, ApiError> {
    let mut target = DEFAULT_TARGET_UTILIZATION;
    for (key, value) in query_pairs(&request) {
        match key.as_str() {
            "target_utilization" => {
                target = value
                    .parse::<f64>()
                    .ok()
                    .filter(|t| *t > 0.0 && *t <= 1.0)
                    .ok_or_else(|| {
                        ApiError::invalid(vec![FieldError::new(
                            "target_utilization",
                            format!("expected a number in (0, 1], got {value:?}"),
                        )])
                    })?;
            }
            other => {
                return Err(ApiError::invalid(vec![FieldError::new(
                    other,
                    "unknown query parameter (expected target_utilization)",
                )]));
            }
        }
    }
    let nodes = records(&state.cluster.membership.members().await?);
    Ok(json_response(
        StatusCode::OK,
        json!(Scaling::of(&nodes, target)),
    ))
}

fn query_pairs(request: &Request) -> Vec<(String, String)> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

tokio::task_local! {
    /// The revision the admin write being served wrote (see [`acknowledged`]).
    static WRITTEN: Cell<Option<u64>>;
}

/// Tells [`wait_layer`] the revision this admin write wrote. Outside the layer (tests
/// calling a handler directly) it does nothing.
pub fn acknowledged(revision: u64) {
    let _ = WRITTEN.try_with(|written| written.set(Some(revision)));
}

/// What a write asked to wait for.
struct WaitRequest {
    cluster: bool,
    limit: Duration,
}

fn wait_request(request: &Request) -> Result<WaitRequest, ApiError> {
    let mut wait = WaitRequest {
        cluster: false,
        limit: DEFAULT_CLUSTER_WAIT,
    };
    let mut errors = Vec::new();
    for (key, value) in query_pairs(request) {
        match key.as_str() {
            "wait" if value == "cluster" => wait.cluster = true,
            "wait" if value == "node" => wait.cluster = false,
            "wait" => errors.push(FieldError::new(
                "wait",
                format!("expected \"cluster\" (every live node serves the write) or \"node\" (the default), got {value:?}"),
            )),
            "wait_timeout" => match parse_duration(&DurationInput::Text(value.clone())) {
                Ok(limit) if limit <= MAX_CLUSTER_WAIT => wait.limit = limit,
                _ => errors.push(FieldError::new(
                    "wait_timeout",
                    format!("expected a duration with a unit up to 60s, e.g. 5s or 500ms, got {value:?}"),
                )),
            },
            // Other parameters belong to the handler.
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(wait)
    } else {
        Err(ApiError::invalid(errors))
    }
}

/// Wraps the admin writes: records the revision a write acknowledged, answers it in
/// `X-Moontide-Revision`, and with `?wait=cluster` waits until every live node serves it
/// (bounded by `wait_timeout`, default 10 s) and adds `cluster` to the answer: the nodes
/// that serve it, those that lagged, and whether that is all of them. A `204` answer
/// becomes `200` with `{revision, cluster}`. The write itself stands either way.
pub async fn wait_layer(State(state): Shared, request: Request, next: Next) -> Response {
    let wait = match wait_request(&request) {
        Ok(wait) => wait,
        Err(error) => return error.into_response(),
    };
    let (revision, response) = WRITTEN
        .scope(Cell::new(None), async move {
            let response = next.run(request).await;
            (WRITTEN.with(Cell::get), response)
        })
        .await;
    let Some(revision) = revision else {
        return response;
    };
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&revision.to_string()) {
        response.headers_mut().insert(REVISION_HEADER, value);
    }
    if !wait.cluster || !response.status().is_success() {
        return response;
    }
    let found = match wait::until_served(&*state.cluster.membership, revision, wait.limit).await {
        Ok(found) => json!(found),
        Err(error) => {
            // The write is stored; only the cluster view is missing.
            json!({"revision": revision, "complete": false, "error": error.to_string()})
        }
    };
    with_cluster(response, revision, found).await
}

/// The answer with `cluster` added to its JSON object (or as the body of a `204`).
async fn with_cluster(response: Response, revision: u64, cluster: Value) -> Response {
    let (mut parts, body) = response.into_parts();
    let mut value = if parts.status == StatusCode::NO_CONTENT {
        parts.status = StatusCode::OK;
        json!({"revision": revision})
    } else {
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({})),
            Err(_) => json!({}),
        }
    };
    if let Value::Object(object) = &mut value {
        object.insert("cluster".into(), cluster);
    }
    let mut answer = json_response(parts.status, value);
    for (name, value) in parts.headers {
        if let Some(name) = name
            && name != axum::http::header::CONTENT_LENGTH
            && name != axum::http::header::CONTENT_TYPE
        {
            answer.headers_mut().insert(name, value);
        }
    }
    answer
}
