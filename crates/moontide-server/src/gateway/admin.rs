//! Admin API handlers for gateway objects: `/v1/upstreams` and `/v1/routes` (list, get,
//! put, delete). A put validates everything at once (400 with each field's path), writes
//! durably and answers once the data plane serves the change. References are checked in
//! the same store transaction as the write: a route's target must exist
//! (`Compare::Exists`), and an upstream still used by a route cannot be deleted (409).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moontide_store::{Compare, Op};
use serde_json::json;

use super::config::{RouteConfig, RouteInput, RouteTarget, UpstreamConfig, UpstreamInput};
use crate::admin::{AdminState, SERVE_WAIT, json_response, parse_body};
use crate::api::FieldError;
use crate::errors::ApiError;
use crate::records;

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
    let key = records::upstream_key(&name);
    let existed = state.store.get(&key).await?.is_some();
    let outcome = state
        .store
        .txn(Vec::new(), vec![Op::Put { key, value }])
        .await?;
    state.registry.wait_for(outcome.revision, SERVE_WAIT).await;
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

pub async fn delete_upstream(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let key = records::upstream_key(&name);
    let Some(existing) = state.store.get(&key).await? else {
        return Err(ApiError::not_found("upstream", &name));
    };
    // The routes read here are compared in the delete's transaction: a route that starts
    // using the upstream meanwhile makes the delete fail instead of leaving it dangling.
    let (routes, _) = state.store.range(records::ROUTE_PREFIX).await?;
    let mut users = Vec::new();
    let mut compares = vec![Compare::ModRevision(key.clone(), existing.mod_revision)];
    for route in &routes {
        compares.push(Compare::ModRevision(route.key.clone(), route.mod_revision));
        if let Ok(config) = serde_json::from_slice::<RouteConfig>(&route.value)
            && config.target == RouteTarget::Upstream(name.clone())
        {
            users.push(route.key[records::ROUTE_PREFIX.len()..].to_string());
        }
    }
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!(
                "upstream {name} is the target of routes: {}",
                users.join(", ")
            ),
        )
        .with_details(json!({"routes": users})));
    }
    // A route made to use the upstream after the range rewrote the upstream's key (see
    // `put_route`), so the upstream's compare fails.
    let outcome = state.store.txn(compares, vec![Op::Delete { key }]).await?;
    if !outcome.succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the upstream or its routes changed; try again",
        ));
    }
    state.registry.wait_for(outcome.revision, SERVE_WAIT).await;
    Ok(StatusCode::NO_CONTENT.into_response())
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
    let outcome = state.store.txn(vec![compare], ops).await?;
    if !outcome.succeeded {
        return Err(missing_target(field, target));
    }
    state.registry.wait_for(outcome.revision, SERVE_WAIT).await;
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
    state.registry.wait_for(outcome.revision, SERVE_WAIT).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}
