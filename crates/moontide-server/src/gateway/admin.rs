//! Admin API handlers for gateway objects: `/v1/upstreams`, `/v1/routes` and
//! `/v1/plugins` (list, get, put, delete; a plugin's logs). A put validates everything at
//! once (400 with each field's path), writes durably and answers once the data plane
//! serves the change. References are checked in the same store transaction as the write:
//! a route's target and plugins must exist, and an upstream or plugin still used by a
//! route cannot be deleted (409 `in_use`). A plugin's put also runs its init once on a
//! data-plane worker, in the sandbox, to check the table it returns.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moontide_store::{Compare, Op};
use serde_json::json;

use moontide_runtime::{FunctionSource, InstanceError, InstanceSpec, UnitKind, compile};

use super::config::{RouteConfig, RouteInput, RouteTarget, UpstreamConfig, UpstreamInput};
use crate::admin::{
    AdminState, LogsQueryInput, check_init, compile_failure, init_failure, json_response,
    log_response, parse_body,
};
use crate::api::{FieldError, PluginInput};
use crate::errors::ApiError;
use crate::logs::VersionLogSink;
use crate::records::{self, PluginRecord};
use crate::registry::plugin_label;
use crate::worker::DEPLOY_CHECK_VERSION;

type Shared = State<Arc<AdminState>>;

fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    super::config::validate_object_name(name).map_err(|message| {
        ApiError::invalid(vec![FieldError::new(
            "name",
            format!("bad {kind} name: {message}"),
        )])
    })
}

/// How a stored object is shown: in the shape its `PUT` takes, so that what a `GET`
/// returns can be edited and written back.
pub trait Shown: serde::de::DeserializeOwned {
    fn shown(&self) -> serde_json::Value;
}

impl Shown for UpstreamConfig {
    fn shown(&self) -> serde_json::Value {
        self.to_input()
    }
}

impl Shown for RouteConfig {
    fn shown(&self) -> serde_json::Value {
        self.to_input()
    }
}

async fn list<T: Shown>(state: &AdminState, prefix: &str) -> Result<Response, ApiError> {
    let (items, revision) = state.store.range(prefix).await?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let config: T = serde_json::from_slice(&item.value)
            .map_err(|e| ApiError::internal(format!("unreadable {}: {e}", item.key)))?;
        out.push(json!({
            "name": &item.key[prefix.len()..],
            "config": config.shown(),
            "revision": item.mod_revision,
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        json!({"items": out, "revision": revision}),
    ))
}

async fn get_one<T: Shown>(
    state: &AdminState,
    kind: &str,
    key: &str,
    name: &str,
) -> Result<Response, ApiError> {
    let Some(item) = state.store.get(key).await? else {
        return Err(ApiError::not_found(kind, name));
    };
    let config: T = serde_json::from_slice(&item.value)
        .map_err(|e| ApiError::internal(format!("unreadable {key}: {e}")))?;
    Ok(json_response(
        StatusCode::OK,
        json!({"name": name, "config": config.shown(), "revision": item.mod_revision}),
    ))
}

pub async fn list_upstreams(State(state): Shared) -> Result<Response, ApiError> {
    list::<UpstreamConfig>(&state, records::UPSTREAM_PREFIX).await
}

/// `GET /v1/upstreams/{name}`: the stored config and, beside it (read-only, not part of
/// the config), the serving `status` of each node: `healthy`, `breaker` (`closed`, `open`,
/// `half_open`) and requests `in_flight`. `status` is absent while the upstream is not
/// serving (a stored config the node could not build).
pub async fn get_upstream(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = records::upstream_key(&name);
    let Some(item) = state.store.get(&key).await? else {
        return Err(ApiError::not_found("upstream", &name));
    };
    let config: UpstreamConfig = serde_json::from_slice(&item.value)
        .map_err(|e| ApiError::internal(format!("unreadable {key}: {e}")))?;
    let mut body =
        json!({"name": name, "config": config.to_input(), "revision": item.mod_revision});
    if let Some(upstream) = state
        .registry
        .snapshot()
        .gateway
        .upstreams
        .get(name.as_str())
    {
        let now = std::time::Instant::now();
        let nodes: Vec<_> = upstream
            .balancer
            .nodes()
            .iter()
            .map(|node| {
                let node_state = node.state();
                json!({
                    "address": node.key(),
                    "healthy": node_state.is_healthy(now),
                    "breaker": super::health::breaker_name(node_state.breaker_mode()),
                    "in_flight": node_state.in_flight(),
                })
            })
            .collect();
        body["status"] = json!({"nodes": nodes});
    }
    Ok(json_response(StatusCode::OK, body))
}

pub async fn put_upstream(
    State(state): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name("upstream", &name)?;
    let input: UpstreamInput = parse_body(&body)?;
    let mut errors = Vec::new();
    let config = input.resolve(&mut errors);
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let value = serde_json::to_vec(&config).map_err(|e| ApiError::internal(e.to_string()))?;
    let (status, revision) = put_serving(&state, records::upstream_key(&name), value).await?;
    Ok(json_response(
        status,
        json!({"name": name, "config": config.shown(), "revision": revision}),
    ))
}

/// Writes an object that nothing else refers to in the write (an upstream, a plugin),
/// waits until it serves, and says whether it was new (`201`) or replaced (`200`).
async fn put_serving(
    state: &AdminState,
    key: String,
    value: Vec<u8>,
) -> Result<(StatusCode, u64), ApiError> {
    let existed = state.store.get(&key).await?.is_some();
    let outcome = state
        .store
        .txn(Vec::new(), vec![Op::Put { key, value }])
        .await?;
    state.acknowledge(outcome.revision).await;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, outcome.revision))
}

pub async fn delete_upstream(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = records::upstream_key(&name);
    let target = RouteTarget::Upstream(name.clone());
    delete_unless_used(&state, "upstream", key, &name, |route| {
        route.target == target
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Deletes the object at `key` unless a route `uses` it (`409 in_use`, naming the routes).
/// The routes read are compared in the delete's transaction, and a route that starts
/// using the object meanwhile rewrites the object's key (see `put_route`), so a racing
/// change makes the delete fail (`409 conflict`) instead of leaving a route dangling.
async fn delete_unless_used(
    state: &AdminState,
    kind: &str,
    key: String,
    name: &str,
    uses: impl Fn(&RouteConfig) -> bool,
) -> Result<(), ApiError> {
    let Some(existing) = state.store.get(&key).await? else {
        return Err(ApiError::not_found(kind, name));
    };
    let (routes, _) = state.store.range(records::ROUTE_PREFIX).await?;
    let mut users = Vec::new();
    let mut compares = vec![Compare::ModRevision(key.clone(), existing.mod_revision)];
    for route in &routes {
        compares.push(Compare::ModRevision(route.key.clone(), route.mod_revision));
        if let Ok(config) = serde_json::from_slice::<RouteConfig>(&route.value)
            && uses(&config)
        {
            users.push(route.key[records::ROUTE_PREFIX.len()..].to_string());
        }
    }
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("{kind} {name} is used by routes: {}", users.join(", ")),
        )
        .with_details(json!({"routes": users})));
    }
    let outcome = state.store.txn(compares, vec![Op::Delete { key }]).await?;
    if !outcome.succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("the {kind} or its routes changed; try again"),
        ));
    }
    state.acknowledge(outcome.revision).await;
    Ok(())
}

pub async fn list_routes(State(state): Shared) -> Result<Response, ApiError> {
    list::<RouteConfig>(&state, records::ROUTE_PREFIX).await
}

pub async fn get_route(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    get_one::<RouteConfig>(&state, "route", &records::route_key(&name), &name).await
}

pub async fn put_route(
    State(state): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name("route", &name)?;
    let input: RouteInput = parse_body(&body)?;
    let mut errors = Vec::new();
    let config = input.resolve(&mut errors);
    if errors.is_empty() {
        errors.extend(super::compile_route(&config).err().unwrap_or_default());
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let value = serde_json::to_vec(&config).map_err(|e| ApiError::internal(e.to_string()))?;
    let key = records::route_key(&name);
    let existed = state.store.get(&key).await?.is_some();
    let mut ops = vec![Op::Put { key, value }];
    let (compare, field, target) = match &config.target {
        RouteTarget::Function(function) => (
            Compare::Exists(records::head_key(function)),
            "function",
            function,
        ),
        RouteTarget::Upstream(upstream) => {
            // Rewriting the upstream's record (same bytes) bumps its revision, so that a
            // delete of the upstream racing this write fails its compare instead of
            // leaving this route dangling. The data plane keeps an upstream whose config
            // did not change as it is (connections, balancer state).
            let upstream_key = records::upstream_key(upstream);
            let Some(current) = state.store.get(&upstream_key).await? else {
                return Err(missing_target("upstream", upstream));
            };
            ops.push(Op::Put {
                key: upstream_key.clone(),
                value: current.value,
            });
            (
                Compare::ModRevision(upstream_key, current.mod_revision),
                "upstream",
                upstream,
            )
        }
    };
    let mut compares = vec![compare];
    // Each plugin's record is rewritten (same bytes) for the same reason as an upstream's:
    // a racing delete of the plugin then fails its compare.
    let mut missing = Vec::new();
    for (i, plugin) in config.plugins.iter().enumerate() {
        let key = records::plugin_key(&plugin.name);
        match state.store.get(&key).await? {
            None => missing.push(FieldError::new(
                format!("plugins[{i}].name"),
                format!("no plugin named {}", plugin.name),
            )),
            Some(current) => {
                ops.push(Op::Put {
                    key: key.clone(),
                    value: current.value,
                });
                compares.push(Compare::ModRevision(key, current.mod_revision));
            }
        }
    }
    if !missing.is_empty() {
        return Err(ApiError::invalid(missing));
    }
    let outcome = state.store.txn(compares, ops).await?;
    if !outcome.succeeded {
        if config.plugins.is_empty() {
            return Err(missing_target(field, target));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the route's target or plugins changed meanwhile; try again",
        ));
    }
    state.acknowledge(outcome.revision).await;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(
        status,
        json!({"name": name, "config": config.shown(), "revision": outcome.revision}),
    ))
}

fn missing_target(kind: &str, name: &str) -> ApiError {
    ApiError::invalid(vec![FieldError::new(
        kind,
        format!("no {kind} named {name}"),
    )])
}

pub async fn delete_route(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = records::route_key(&name);
    if state.store.get(&key).await?.is_none() {
        return Err(ApiError::not_found("route", &name));
    }
    let outcome = state
        .store
        .txn(Vec::new(), vec![Op::Delete { key }])
        .await?;
    state.acknowledge(outcome.revision).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn list_plugins(State(state): Shared) -> Result<Response, ApiError> {
    let (items, revision) = state.store.range(records::PLUGIN_PREFIX).await?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let record: PluginRecord = serde_json::from_slice(&item.value)
            .map_err(|e| ApiError::internal(format!("unreadable {}: {e}", item.key)))?;
        out.push(json!({
            "name": &item.key[records::PLUGIN_PREFIX.len()..],
            "phases": record.phases,
            "config": record.config.redacted(),
            "revision": item.mod_revision,
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        json!({"items": out, "revision": revision}),
    ))
}

pub async fn get_plugin(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(item) = state.store.get(&records::plugin_key(&name)).await? else {
        return Err(ApiError::not_found("plugin", &name));
    };
    let record: PluginRecord = serde_json::from_slice(&item.value)
        .map_err(|e| ApiError::internal(format!("unreadable plugin {name}: {e}")))?;
    let snapshot = state.registry.snapshot();
    let serving = snapshot.plugins.get(name.as_str());
    Ok(json_response(
        StatusCode::OK,
        json!({
            "name": name,
            "source": record.source,
            "phases": record.phases,
            "config": record.config.redacted(),
            "sha256": record.sha256,
            "updated_at_ms": record.updated_at_ms,
            "revision": item.mod_revision,
            "live_instances": serving.map_or(0, |p| p.unit.pool.live()),
        }),
    ))
}

pub async fn put_plugin(
    State(state): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name("plugin", &name)?;
    let input: PluginInput = parse_body(&body)?;
    let mut errors = Vec::new();
    let config = input.resolve_config(&mut errors);
    let source = match &input.source {
        Some(source) => source.clone(),
        None => {
            errors.push(FieldError::new(
                "source",
                "required: the plugin's Lua source",
            ));
            String::new()
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let files = FunctionSource::single(source.clone()).files;
    let compiled = compile(&FunctionSource {
        files: files.clone(),
    })
    .map_err(|errors| compile_failure("source".into(), &errors))?;
    // Run the init once, in the sandbox, on the long-call worker (Lua runs only on
    // workers), to check that it runs and the table it returns. Its errors also go to the
    // plugin's log.
    let label = plugin_label(&name);
    let spec = InstanceSpec {
        function_name: Arc::from(label.as_str()),
        version: DEPLOY_CHECK_VERSION,
        limits: config.limits(),
        env: Arc::new(config.env.clone()),
        log: Arc::new(VersionLogSink {
            log: state.registry.logs.function(&label),
            version: DEPLOY_CHECK_VERSION,
        }),
        kind: UnitKind::Plugin,
        egress: config.egress(),
    };
    let limits = spec.limits;
    let phases = check_init(&state, Arc::new(compiled), spec)
        .await?
        .map_err(|error| plugin_rejected(&error, &limits))?;
    let record = PluginRecord {
        sha256: records::source_digest(&files),
        source,
        config,
        phases: phases.names().into_iter().map(str::to_string).collect(),
        updated_at_ms: records::now_ms(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    let (status, revision) = put_serving(&state, records::plugin_key(&name), value).await?;
    Ok(json_response(
        status,
        json!({
            "name": name,
            "phases": record.phases,
            "config": record.config.redacted(),
            "revision": revision,
        }),
    ))
}

/// Why a plugin's init refused it: a return value that is not a table of phases is a 400
/// `invalid_request` on `source`; a failed init a 400 `init_error` (file and line).
fn plugin_rejected(error: &InstanceError, limits: &moontide_runtime::Limits) -> ApiError {
    let message = match error {
        InstanceError::BadPlugin(message) => message.clone(),
        InstanceError::NoHandler(_) => "the plugin must return a table of phases".into(),
        _ => return init_failure(error, limits, |_| "source".to_string()),
    };
    ApiError::invalid(vec![FieldError::new("source", message)])
}

pub async fn delete_plugin(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = records::plugin_key(&name);
    delete_unless_used(&state, "plugin", key, &name, |route| {
        route.plugins.iter().any(|plugin| plugin.name == name)
    })
    .await?;
    state.registry.logs.remove(&plugin_label(&name));
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn plugin_logs(
    State(state): Shared,
    Path(name): Path<String>,
    query: LogsQueryInput,
) -> Result<Response, ApiError> {
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::invalid(vec![FieldError::new("query", e.body_text())]))?;
    let label = plugin_label(&name);
    let log = match state.registry.logs.get(&label) {
        Some(log) => log,
        None if state
            .store
            .get(&records::plugin_key(&name))
            .await?
            .is_some() =>
        {
            state.registry.logs.function(&label)
        }
        None => return Err(ApiError::not_found("plugin", &name)),
    };
    Ok(log_response(log, query))
}
