//! The admin API (DESIGN.md §4): JSON over HTTP with a bearer token, served by axum on the
//! admin listener (loopback by default). It validates and stores; it never runs Lua itself
//! (`invoke` is handed to a data-plane worker) and never touches the serving snapshot
//! except to wait until a write it made is being served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use moontide_runtime::{CallError, FunctionSource, InstanceError, InstanceSpec, UnitKind, compile};
use moontide_store::{Compare, Op, Store};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::api::{DeployRequest, FieldError, RollbackRequest, validate_function_name};
use crate::errors::ApiError;
use crate::gateway::admin as gateway;
use crate::records::{self, FunctionRecord, VersionRecord};
use crate::registry::Registry;
use crate::worker::{DEPLOY_CHECK_VERSION, Job, Workers};

/// The OpenAPI document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every admin route as `(method, path)`, in the OpenAPI document's path syntax. A test
/// checks this list, the router and the document agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/status"),
    ("GET", "/v1/functions"),
    ("GET", "/v1/functions/{name}"),
    ("PUT", "/v1/functions/{name}"),
    ("DELETE", "/v1/functions/{name}"),
    ("GET", "/v1/functions/{name}/versions"),
    ("POST", "/v1/functions/{name}/rollback"),
    ("POST", "/v1/functions/{name}/invoke"),
    ("GET", "/v1/functions/{name}/logs"),
    ("GET", "/v1/upstreams"),
    ("GET", "/v1/upstreams/{name}"),
    ("PUT", "/v1/upstreams/{name}"),
    ("DELETE", "/v1/upstreams/{name}"),
    ("GET", "/v1/routes"),
    ("GET", "/v1/routes/{name}"),
    ("PUT", "/v1/routes/{name}"),
    ("DELETE", "/v1/routes/{name}"),
    ("GET", "/v1/plugins"),
    ("GET", "/v1/plugins/{name}"),
    ("PUT", "/v1/plugins/{name}"),
    ("DELETE", "/v1/plugins/{name}"),
    ("GET", "/v1/plugins/{name}/logs"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/scaling"),
];

/// Largest admin request body (a bundle is at most 8 MiB of source, JSON-escaped).
const MAX_ADMIN_BODY: usize = 24 << 20;
/// How long a write waits for the data plane to serve it before answering anyway.
pub(crate) const SERVE_WAIT: Duration = Duration::from_secs(5);

/// What the admin handlers share.
pub struct AdminState {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub workers: Arc<Workers>,
    pub token: String,
    /// `/metrics` answers without the token (`serve --metrics-public`).
    pub metrics_public: bool,
    pub started: Instant,
    pub node: serde_json::Value,
    /// This node in the node registry (`/v1/nodes`, `/v1/scaling`, `?wait=cluster`).
    pub cluster: Arc<crate::cluster::ClusterNode>,
}

impl AdminState {
    /// What every admin write does once the store has it: waits (bounded) until this
    /// node serves `revision`, and reports it to `?wait=cluster` and
    /// `X-Moontide-Revision` (`cluster::wait_layer`).
    pub(crate) async fn acknowledge(&self, revision: u64) {
        self.registry.wait_for(revision, SERVE_WAIT).await;
        crate::cluster::acknowledged(revision);
    }
}

type Shared = State<Arc<AdminState>>;

pub fn router(state: Arc<AdminState>) -> Router {
    let authed = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/functions", get(list_functions))
        .route(
            "/v1/functions/{name}",
            get(function_info).put(deploy).delete(remove_function),
        )
        .route("/v1/functions/{name}/versions", get(versions))
        .route("/v1/functions/{name}/rollback", post(rollback))
        .route("/v1/functions/{name}/invoke", post(invoke))
        .route("/v1/functions/{name}/logs", get(logs))
        .route("/v1/upstreams", get(gateway::list_upstreams))
        .route(
            "/v1/upstreams/{name}",
            get(gateway::get_upstream)
                .put(gateway::put_upstream)
                .delete(gateway::delete_upstream),
        )
        .route("/v1/routes", get(gateway::list_routes))
        .route(
            "/v1/routes/{name}",
            get(gateway::get_route)
                .put(gateway::put_route)
                .delete(gateway::delete_route),
        )
        .route("/v1/plugins", get(gateway::list_plugins))
        .route(
            "/v1/plugins/{name}",
            get(gateway::get_plugin)
                .put(gateway::put_plugin)
                .delete(gateway::delete_plugin),
        )
        .route("/v1/plugins/{name}/logs", get(gateway::plugin_logs))
        .route("/v1/nodes", get(crate::cluster::list_nodes))
        .route("/v1/scaling", get(crate::cluster::scaling))
        .route("/v1/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::cluster::wait_layer,
        ));
    // `/metrics` lists every function, upstream node and plugin: the token guards it
    // unless the operator chose to let scrapers in without one.
    let (authed, open) = if state.metrics_public {
        (authed, Router::new().route("/metrics", get(metrics)))
    } else {
        (authed.route("/metrics", get(metrics)), Router::new())
    };
    let authed = authed.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(open)
        .merge(authed)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .with_state(state)
}

async fn require_token(
    State(state): Shared,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(state.token.as_bytes())) {
        next.run(request).await
    } else {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (see <data-dir>/admin.token)",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

/// The token of an `Authorization: Bearer TOKEN` value. The scheme is case-insensitive and
/// one or more spaces may separate it from the token (RFC 9110 §11.1, §11.4); the token is
/// a token68, so it holds no spaces.
pub fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim_matches([' ', '\t']);
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    (!token.is_empty() && !token.contains([' ', '\t'])).then_some(token)
}

async fn readyz(State(state): Shared) -> Response {
    if state.registry.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does); the classic text format
/// 0.0.4 for everyone else (promtool, curl, older scrapers that ignore Content-Type).
async fn metrics(State(state): Shared, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    crate::gateway::health::export(&state.registry.metrics, &state.registry.snapshot().gateway);
    let openmetrics = state.registry.metrics.encode();
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            openmetrics,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::text_format(&openmetrics),
        )
            .into_response()
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Parses a JSON body, naming the offending field's path on error.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(vec![FieldError::new(
            "",
            "request body is empty; expected JSON",
        )]));
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        // Where the text stops being JSON, serde names no field ("?"): the path is the
        // deepest field it did name (the body itself at worst), and the message says
        // line and column.
        let path = error.path().to_string();
        let path = path
            .split('.')
            .take_while(|segment| *segment != "?")
            .filter(|segment| !segment.is_empty())
            .collect::<Vec<_>>()
            .join(".");
        // serde quotes the offending value ("invalid type: integer `1234`"); under `env`
        // that value is a secret, so say only what was expected.
        let message = if path.starts_with("config.env.") || path.starts_with("env.") {
            "environment values must be strings".to_string()
        } else {
            error.inner().to_string()
        };
        ApiError::invalid(vec![FieldError::new(path, message)])
    })
}

fn check_name(name: &str) -> Result<(), ApiError> {
    validate_function_name(name)
        .map_err(|message| ApiError::invalid(vec![FieldError::new("name", message)]))
}

/// 400 `compile_error`: the first error as the message, every one (file, line) in the
/// details; `path` is the request field of the first.
pub(crate) fn compile_failure(path: String, errors: &[moontide_runtime::CompileError]) -> ApiError {
    let message = errors
        .first()
        .map_or_else(|| "does not compile".to_string(), ToString::to_string);
    ApiError::new(StatusCode::BAD_REQUEST, "compile_error", message).with_details(json!({
        "path": path,
        "errors": errors
            .iter()
            .map(|e| json!({"file": e.file, "line": e.line, "message": e.message}))
            .collect::<Vec<_>>(),
    }))
}

/// How much longer than the unit's own timeout the admin waits for an init check: the
/// timeout ends the init on its worker; this only bounds the handler if it did not.
const INIT_CHECK_SLACK: Duration = Duration::from_secs(5);

/// Runs a unit's init once on the long-call worker ([`Job::CheckInit`]) under the unit's
/// own limits, and returns the phases it defines (none for a function) or why it failed
/// (see [`init_failure`]). Lua runs only on workers; the handler only waits, so other
/// admin requests go on.
pub(crate) async fn check_init(
    state: &AdminState,
    compiled: Arc<moontide_runtime::CompiledFunction>,
    spec: InstanceSpec,
) -> Result<Result<moontide_runtime::plugin::Phases, InstanceError>, ApiError> {
    let limits = spec.limits;
    let (reply, checked) = oneshot::channel();
    state.workers.check_init(Job::CheckInit {
        compiled,
        spec,
        reply,
    })?;
    match tokio::time::timeout(limits.timeout + INIT_CHECK_SLACK, checked).await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(_)) => Err(ApiError::internal("the worker dropped the init check")),
        Err(_) => Ok(Err(InstanceError::Init(CallError::Timeout))),
    }
}

/// 400 `init_error`: the unit's module-level code failed (or broke a limit, or returned
/// what the unit must not) when run once at deploy. Same shape as [`compile_failure`]
/// (`path`: the request field of the file that failed, from its file name), plus the
/// error's `kind`.
pub(crate) fn init_failure(
    error: &InstanceError,
    limits: &moontide_runtime::Limits,
    path: impl Fn(&str) -> String,
) -> ApiError {
    if let InstanceError::Setup(message) = error {
        return ApiError::internal(format!("could not create an instance: {message}"));
    }
    let mut site = error.source_error();
    match error {
        InstanceError::Init(CallError::Timeout) => {
            site.message = format!(
                "init timed out: module-level code must finish within the timeout ({} ms)",
                limits.timeout.as_millis()
            );
        }
        InstanceError::Init(CallError::MemoryLimit) => {
            site.message = format!(
                "init exceeded the memory limit ({} bytes)",
                limits.memory_bytes
            );
        }
        _ => {}
    }
    ApiError::new(StatusCode::BAD_REQUEST, "init_error", site.to_string()).with_details(json!({
        "path": path(&site.file),
        "kind": error.kind(),
        "errors": [{"file": site.file, "line": site.line, "message": site.message}],
    }))
}

pub(crate) fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

async fn read_head(
    store: &dyn Store,
    name: &str,
) -> Result<Option<(FunctionRecord, u64)>, ApiError> {
    let Some(kv) = store.get(&records::head_key(name)).await? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("corrupt function record: {e}")))?;
    Ok(Some((record, kv.mod_revision)))
}

async fn read_versions(store: &dyn Store, name: &str) -> Result<Vec<VersionRecord>, ApiError> {
    let (kvs, _) = store.range(&records::versions_prefix(name)).await?;
    kvs.iter()
        .map(|kv| {
            serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::internal(format!("corrupt version record: {e}")))
        })
        .collect()
}

async fn status(State(state): Shared) -> Response {
    let snapshot = state.registry.snapshot();
    let mut functions: Vec<_> = snapshot
        .functions
        .values()
        .map(|f| json!({"name": &*f.name, "version": f.version, "live_instances": f.pool.live()}))
        .collect();
    functions.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json_response(
        StatusCode::OK,
        json!({
            "node": state.node,
            "uptime_ms": state.started.elapsed().as_millis() as u64,
            "ready": state.registry.is_ready(),
            "config_revision": snapshot.revision,
            "instances": {
                "live": state.registry.budget.instances(),
                "budget": state.registry.budget.max_instances(),
                "memory_bytes": state.registry.budget.memory(),
                "memory_budget_bytes": state.registry.budget.max_memory(),
            },
            "functions": functions,
        }),
    )
}

async fn list_functions(State(state): Shared) -> Result<Response, ApiError> {
    let (heads, revision) = state.store.range(records::HEAD_PREFIX).await?;
    let snapshot = state.registry.snapshot();
    let mut list = Vec::with_capacity(heads.len());
    for kv in heads {
        let head: FunctionRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::internal(format!("corrupt function record: {e}")))?;
        let deployed = snapshot.functions.get(head.name.as_str());
        list.push(json!({
            "name": head.name,
            "active_version": head.active_version,
            "latest_version": head.latest_version,
            "updated_at_ms": head.updated_at_ms,
            "route": deployed.and_then(|f| f.config.route.clone()),
            "live_instances": deployed.map(|f| f.pool.live()).unwrap_or(0),
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        json!({"functions": list, "revision": revision}),
    ))
}

async fn function_info(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (head, _) = read_head(&*state.store, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("function", &name))?;
    let active = state
        .store
        .get(&records::version_key(&name, head.active_version))
        .await?
        .ok_or_else(|| ApiError::internal("active version record is missing"))?;
    let active: VersionRecord = serde_json::from_slice(&active.value)
        .map_err(|e| ApiError::internal(format!("corrupt version record: {e}")))?;
    let snapshot = state.registry.snapshot();
    let deployed = snapshot.functions.get(name.as_str());
    let (next_runs, recent_runs) = crate::triggers::scheduler::runs_view(
        &*state.store,
        &name,
        active.config.schedule.as_ref(),
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "name": head.name,
            "schedule": active.config.schedule,
            "next_runs": next_runs,
            "recent_runs": recent_runs,
            "active_version": head.active_version,
            "latest_version": head.latest_version,
            "created_at_ms": head.created_at_ms,
            "updated_at_ms": head.updated_at_ms,
            "active": active.summary(true),
            "serving_version": deployed.map(|f| f.version),
            "live_instances": deployed.map(|f| f.pool.live()).unwrap_or(0),
            "instances": deployed.map(|f| f.pool.status()),
            "url_path": format!("/fn/{name}"),
            // Set while the serving version is refused for crashing the node.
            "quarantine": deployed.and_then(|f| f.quarantine.as_deref()).map(|record| json!({
                "version": record.version,
                "since_ms": record.quarantined_since_ms,
                "crashes": record.crashes,
                "last_signal": record.last_signal,
                "reason": format!(
                    "version {} crashed the node {} times (last by {}); deploy a new version to \
                     lift the quarantine",
                    record.version, record.crashes, record.last_signal
                ),
            })),
            // Every version of this function that ever crashed the node.
            "crashes": state.registry.crashes.versions.iter()
                .filter(|record| record.function == name)
                .collect::<Vec<_>>(),
        }),
    ))
}

async fn deploy(
    State(state): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let request: DeployRequest = parse_body(&body)?;
    let mut errors = Vec::new();
    let config = request.config.resolve("config.", &mut errors);
    let (files, source_path) = match (request.source, request.files) {
        (Some(source), None) => (FunctionSource::single(source).files, "source"),
        (None, Some(files)) => (files, "files"),
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "source",
                "give either source or files, not both",
            ));
            (Default::default(), "source")
        }
        (None, None) => {
            errors.push(FieldError::new(
                "source",
                "required: the function's Lua source (or files)",
            ));
            (Default::default(), "source")
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let source = FunctionSource { files };
    let field = |file: &str| match (source_path, file) {
        ("source", _) | (_, "") => source_path.to_string(),
        (_, file) => format!("files.{file}"),
    };
    let compiled = compile(&source).map_err(|compile_errors| {
        compile_failure(field(&compile_errors[0].file), &compile_errors)
    })?;
    let sha256 = records::source_digest(&source.files);

    // Deploying what already serves is a no-op (no new version burns retention, no init
    // runs): this is what makes `moontide apply` idempotent.
    let head = read_head(&*state.store, &name).await?;
    if let Some(unchanged) = unchanged(&state, &name, head.as_ref(), &sha256, &config).await? {
        return Ok(unchanged);
    }
    // The init runs once now, on a worker, under the version's own limits: code whose
    // module level fails would answer every call with a 500. Not a version yet: it runs
    // as version 0 (its log lines, and the flight recorder should it crash the node).
    let spec = InstanceSpec {
        function_name: Arc::from(name.as_str()),
        version: DEPLOY_CHECK_VERSION,
        limits: config.limits(),
        env: Arc::new(config.env.clone()),
        log: Arc::new(crate::logs::VersionLogSink {
            log: state.registry.logs.function(&name),
            version: DEPLOY_CHECK_VERSION,
        }),
        kind: UnitKind::Function,
        egress: config.egress(),
    };
    let limits = spec.limits;
    if let Err(error) = check_init(&state, Arc::new(compiled), spec).await? {
        // A function never deployed keeps no log (the refusal carries the error).
        if read_head(&*state.store, &name).await?.is_none() {
            state.registry.logs.remove(&name);
        }
        return Err(init_failure(&error, &limits, field));
    }

    // Optimistic concurrency on the head record: a racing deploy retries.
    for _ in 0..8 {
        let now = records::now_ms();
        let head = read_head(&*state.store, &name).await?;
        if let Some(unchanged) = unchanged(&state, &name, head.as_ref(), &sha256, &config).await? {
            return Ok(unchanged);
        }
        let (created_at_ms, next_version, head_revision) = match &head {
            Some((record, revision)) => {
                (record.created_at_ms, record.latest_version + 1, *revision)
            }
            None => (now, 1, 0),
        };
        let version = VersionRecord {
            name: name.clone(),
            version: next_version,
            sha256: sha256.clone(),
            files: source.files.clone(),
            config: config.clone(),
            created_at_ms: now,
        };
        let head_record = FunctionRecord {
            name: name.clone(),
            active_version: next_version,
            latest_version: next_version,
            created_at_ms,
            updated_at_ms: now,
        };
        let mut ops = vec![
            Op::Put {
                key: records::version_key(&name, next_version),
                value: serde_json::to_vec(&version)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            },
            Op::Put {
                key: records::head_key(&name),
                value: serde_json::to_vec(&head_record)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            },
        ];
        // Retention: keep the newest versions (the new one included).
        if head.is_some() {
            let (existing, _) = state.store.range(&records::versions_prefix(&name)).await?;
            let excess = (existing.len() + 1).saturating_sub(records::VERSION_RETENTION);
            for kv in existing.iter().take(excess) {
                ops.push(Op::Delete {
                    key: kv.key.clone(),
                });
            }
        }
        let outcome = state
            .store
            .txn(
                vec![Compare::ModRevision(
                    records::head_key(&name),
                    head_revision,
                )],
                ops,
            )
            .await?;
        if outcome.succeeded {
            state.acknowledge(outcome.revision).await;
            return Ok(json_response(
                StatusCode::CREATED,
                json!({"name": name, "version": next_version, "revision": outcome.revision}),
            ));
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "the function kept changing while deploying; try again",
    ))
}

/// `200 {unchanged: true}` when `sha256` and `config` are what the active version serves.
async fn unchanged(
    state: &AdminState,
    name: &str,
    head: Option<&(FunctionRecord, u64)>,
    sha256: &str,
    config: &crate::api::FunctionConfig,
) -> Result<Option<Response>, ApiError> {
    let Some((record, head_revision)) = head else {
        return Ok(None);
    };
    let Some(kv) = state
        .store
        .get(&records::version_key(name, record.active_version))
        .await?
    else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<VersionRecord>(&kv.value)
        .ok()
        .filter(|active| active.sha256 == sha256 && active.config == *config)
        .map(|active| {
            // Nothing was written; `?wait=cluster` waits for what serves it already.
            crate::cluster::acknowledged(kv.mod_revision.max(*head_revision));
            json_response(
                StatusCode::OK,
                json!({"name": name, "version": active.version, "unchanged": true,
                       "revision": kv.mod_revision}),
            )
        }))
}

async fn remove_function(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some((_, head_revision)) = read_head(&*state.store, &name).await? else {
        return Err(ApiError::not_found("function", &name));
    };
    let outcome = state
        .store
        .txn(
            vec![Compare::ModRevision(
                records::head_key(&name),
                head_revision,
            )],
            vec![
                Op::Delete {
                    key: records::head_key(&name),
                },
                Op::DeletePrefix {
                    prefix: records::versions_prefix(&name),
                },
                // Its scheduled runs' records go with it.
                Op::DeletePrefix {
                    prefix: crate::triggers::runs::runs_prefix(&name),
                },
            ],
        )
        .await?;
    if !outcome.succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the function changed; try again",
        ));
    }
    state.acknowledge(outcome.revision).await;
    state.registry.logs.remove(&name);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn versions(State(state): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    let (head, _) = read_head(&*state.store, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("function", &name))?;
    let list: Vec<_> = read_versions(&*state.store, &name)
        .await?
        .iter()
        .map(|v| v.summary(v.version == head.active_version))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"name": name, "active_version": head.active_version, "versions": list}),
    ))
}

async fn rollback(
    State(state): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: RollbackRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackRequest::default()
    } else {
        parse_body(&body)?
    };
    let (head, head_revision) = read_head(&*state.store, &name)
        .await?
        .ok_or_else(|| ApiError::not_found("function", &name))?;
    let kept: Vec<u64> = read_versions(&*state.store, &name)
        .await?
        .iter()
        .map(|v| v.version)
        .collect();
    let target = match request.to {
        Some(version) if kept.contains(&version) => version,
        Some(version) => {
            return Err(ApiError::invalid(vec![FieldError::new(
                "to",
                format!("version {version} does not exist (kept: {kept:?})"),
            )]));
        }
        None => *kept
            .iter()
            .filter(|v| **v < head.active_version)
            .max()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "no_previous_version",
                    format!(
                        "version {} is the oldest kept; nothing to roll back to",
                        head.active_version
                    ),
                )
            })?,
    };
    let record = FunctionRecord {
        active_version: target,
        updated_at_ms: records::now_ms(),
        ..head.clone()
    };
    let outcome = state
        .store
        .txn(
            vec![Compare::ModRevision(
                records::head_key(&name),
                head_revision,
            )],
            vec![Op::Put {
                key: records::head_key(&name),
                value: serde_json::to_vec(&record)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            }],
        )
        .await?;
    if !outcome.succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the function changed; try again",
        ));
    }
    state.acknowledge(outcome.revision).await;
    Ok(json_response(
        StatusCode::OK,
        json!({"name": name, "version": target, "previous_version": head.active_version, "revision": outcome.revision}),
    ))
}

async fn invoke(
    State(state): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let payload: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid(vec![FieldError::new(
                "",
                format!("the event must be JSON: {e}"),
            )])
        })?
    };
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("inv-{:016x}", rand::random::<u64>()));
    let (reply, result) = oneshot::channel();
    state.workers.submit(Job::Invoke {
        name,
        payload,
        request_id: request_id.clone(),
        reply,
    })?;
    let output = result
        .await
        .map_err(|_| ApiError::internal("the worker dropped the call"))??;
    let mut response = Response::new(Body::from(output.body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-moontide-version", HeaderValue::from(output.version));
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert("x-request-id", value);
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    follow: Option<String>,
    tail: Option<usize>,
}

pub type LogsQueryInput = Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>;

async fn logs(
    State(state): Shared,
    Path(name): Path<String>,
    query: LogsQueryInput,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::invalid(vec![FieldError::new("query", e.body_text())]))?;
    let log = match state.registry.logs.get(&name) {
        Some(log) => log,
        None if read_head(&*state.store, &name).await?.is_some() => {
            state.registry.logs.function(&name)
        }
        None => return Err(ApiError::not_found("function", &name)),
    };
    Ok(log_response(log, query))
}

/// A log's tail as NDJSON, and with `follow` its new lines as they come.
pub(crate) fn log_response(log: Arc<crate::logs::FunctionLog>, query: LogsQuery) -> Response {
    let follow = matches!(query.follow.as_deref(), Some("1" | "true" | "yes"));
    let line = |record: &crate::logs::LogRecord| {
        let mut text = serde_json::to_vec(record).unwrap_or_default();
        text.push(b'\n');
        Bytes::from(text)
    };
    let backlog: Vec<Bytes> = log
        .tail(query.tail.unwrap_or(100))
        .iter()
        .map(line)
        .collect();
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !follow {
        return (ndjson, backlog.concat()).into_response();
    }
    let live = tokio_stream::wrappers::BroadcastStream::new(log.follow()).filter_map(move |item| {
        let bytes = item.ok().map(|record| line(&record));
        async move { bytes }
    });
    let stream = futures_util::stream::iter(backlog)
        .chain(live)
        .map(Ok::<_, std::convert::Infallible>);
    (ndjson, Body::from_stream(stream)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text that is not JSON names the deepest field serde reached (the body itself when it
    /// reached none), never serde's `?`, and says where the text broke.
    #[test]
    fn invalid_json_names_a_real_path() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            config: std::collections::BTreeMap<String, serde_json::Value>,
        }
        let path_and_message = |body: &str| {
            let error = parse_body::<Body>(body.as_bytes()).unwrap_err();
            (
                error.details["path"].as_str().unwrap().to_string(),
                error.message,
            )
        };
        let (path, message) = path_and_message("{\"config\": {\"timeout\": ");
        assert_eq!(path, "config.timeout");
        assert!(message.contains("line 1 column"), "{message}");
        let (path, message) = path_and_message("not json");
        assert_eq!(path, "");
        assert!(message.contains("at line 1 column"), "{message}");
        let (path, _) = path_and_message("{\"config\": 5}");
        assert_eq!(path, "config");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_spaces_are_tolerated() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc  "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Bearer a b"), None);
    }

    #[test]
    fn every_route_is_in_the_openapi_document_and_back() {
        let document: serde_json::Value =
            serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = document["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
            let operation = &paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} missing from openapi.json"))
                [method.to_ascii_lowercase()];
            assert!(
                operation.is_object(),
                "{method} {path} missing from openapi.json"
            );
        }
        let mut documented = 0;
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                    documented += 1;
                    assert!(
                        ROUTES.contains(&(method.to_ascii_uppercase().as_str(), path.as_str())),
                        "{method} {path} is documented but not served"
                    );
                }
            }
        }
        assert_eq!(documented, ROUTES.len());
    }
}
