//! Runs a route's Lua plugins at their phases for one request (the Lua side is
//! `moontide_runtime::plugin`).
//!
//! A [`Chain`] is one request's plugins: for each, in the route's order, a *share* of one
//! of its instances (a pool lease, as a function call takes; plugins default to a high
//! `concurrency`, so one instance serves many requests while they wait on their target)
//! and the request's `ctx` table inside that instance. The share is held from the first
//! phase to the log phase, so `ctx` is a real Lua table that lives across phases.
//!
//! Order: every plugin's `rewrite`, then every `access`, the target (upstream or
//! function), every `header_filter`, every `body_filter` (on the whole, buffered body),
//! then — spawned on the thread after the response is handed back — every `log`. A
//! `rewrite` or `access` that returns a response ends the request with it: later request
//! phases, the target and the filters are skipped; `log` still runs. A phase error or a
//! broken limit answers like a function failure (500, or 504 for a timeout) with the
//! request id; the details go to the plugin's log (`GET /v1/plugins/{name}/logs`); an
//! error in `log` is only logged.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use moontide_runtime::plugin::{CtxInfo, Phase, PluginCtx, PluginRequest, PluginResponse};
use moontide_runtime::{CallError, Engine, HttpResponse, InstanceError, OutputError};

use super::Route;
use crate::errors::ApiError;
use crate::metrics::Shed;
use crate::pool::{AcquireError, Lease, LocalPools};
use crate::registry::{DeployedPlugin, Snapshot};

/// One plugin of one request: its instance share and its `ctx`.
struct Member {
    // Fields drop in order: the `ctx` table before the share of its instance.
    ctx: PluginCtx,
    plugin: Arc<DeployedPlugin>,
    lease: Lease,
}

/// One request's plugins, in run order.
pub struct Chain {
    members: Vec<Member>,
    request_id: String,
    blocking_cap: Option<Duration>,
}

impl Chain {
    /// Takes a share of an instance of each of `route`'s plugins and makes each its `ctx`.
    pub async fn start(
        pools: &Rc<LocalPools>,
        engine: &Engine,
        snapshot: &Snapshot,
        route: &Route,
        request_id: &str,
        blocking_cap: Option<Duration>,
    ) -> Result<Chain, ApiError> {
        let mut members = Vec::with_capacity(route.plugins.len());
        for on_route in &route.plugins {
            let Some(plugin) = snapshot.plugins.get(on_route.name.as_str()).cloned() else {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no_plugin",
                    format!(
                        "route {} uses plugin {}, which is not deployed",
                        route.name, on_route.name
                    ),
                )
                .with_details(serde_json::json!({"request_id": request_id})));
            };
            let lease = pools
                .acquire(engine, &plugin.unit, request_id)
                .await
                .map_err(|error| acquire_failure(&plugin, error, request_id))?;
            let ctx = lease
                .instance()
                .plugin_ctx(&CtxInfo {
                    plugin_name: &plugin.name,
                    route: &route.name,
                    request_id,
                    conf: on_route.config.as_ref(),
                })
                .map_err(|error| failure(&plugin, Phase::Rewrite, &error, request_id))?;
            members.push(Member { plugin, lease, ctx });
        }
        Ok(Chain {
            members,
            request_id: request_id.to_string(),
            blocking_cap,
        })
    }

    /// `true` if any plugin of the chain has `phase`.
    pub fn has(&self, phase: Phase) -> bool {
        self.members.iter().any(|m| m.plugin.phases.has(phase))
    }

    fn running(&self, phase: Phase) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |member| {
            let runs = member.plugin.phases.has(phase);
            if runs {
                member.plugin.metrics.called(phase);
                member.lease.instance().set_blocking_cap(self.blocking_cap);
            }
            runs
        })
    }

    /// Every `rewrite`, then every `access`. `Some`: a plugin ended the request.
    pub async fn request_phases(
        &self,
        request: &mut PluginRequest,
    ) -> Result<Option<HttpResponse>, ApiError> {
        for phase in [Phase::Rewrite, Phase::Access] {
            for member in self.running(phase) {
                match member
                    .lease
                    .instance()
                    .request_phase(phase, &member.ctx, request, &self.request_id)
                    .await
                {
                    Ok(None) => {
                        // The upstream gets a path in normal form, also when a plugin
                        // wrote it (docs/edge.md): cleaned, or the plugin's bad result.
                        match moontide_gateway::path::normalize(&request.path) {
                            Ok(std::borrow::Cow::Borrowed(_)) => {}
                            Ok(std::borrow::Cow::Owned(normal)) => request.path = normal,
                            Err(rejection) => {
                                let error = CallError::BadResult(OutputError::Invalid(format!(
                                    "{}: req.path '{}' is refused by the node: {rejection}",
                                    phase.name(),
                                    request.path
                                )));
                                member.lease.instance().log(
                                    moontide_runtime::LogLevel::Error,
                                    &format!("call failed: {error}"),
                                );
                                return Err(failure(
                                    &member.plugin,
                                    phase,
                                    &error,
                                    &self.request_id,
                                ));
                            }
                        }
                    }
                    Ok(Some(response)) => return Ok(Some(response)),
                    Err(error) => {
                        return Err(failure(&member.plugin, phase, &error, &self.request_id));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Every `header_filter` (`phase` = [`Phase::HeaderFilter`]) or every `body_filter`.
    pub async fn filters(
        &self,
        phase: Phase,
        response: &mut PluginResponse,
    ) -> Result<(), ApiError> {
        for member in self.running(phase) {
            member
                .lease
                .instance()
                .filter_phase(phase, &member.ctx, response, &self.request_id)
                .await
                .map_err(|error| failure(&member.plugin, phase, &error, &self.request_id))?;
        }
        Ok(())
    }

    /// Runs every `log` in a task of its own on this thread (the response does not wait),
    /// then gives the instance shares back.
    pub fn log(self, request: PluginRequest, response: PluginResponse) {
        if !self.has(Phase::Log) {
            return;
        }
        tokio::task::spawn_local(async move {
            for member in self.running(Phase::Log) {
                let instance = member.lease.instance();
                // A plugin that broke a limit in an earlier phase of this request cannot
                // run again (its interrupt stays armed); its error is in its log.
                if instance.is_broken() {
                    continue;
                }
                if let Err(error) = instance
                    .log_phase(&member.ctx, &request, &response, &self.request_id)
                    .await
                {
                    member.plugin.metrics.error(Phase::Log, error.kind());
                }
            }
        });
    }
}

/// A failed phase as the client sees it (the details are in the plugin's log).
fn failure(plugin: &DeployedPlugin, phase: Phase, error: &CallError, request_id: &str) -> ApiError {
    plugin.metrics.error(phase, error.kind());
    let details = serde_json::json!({
        "request_id": request_id,
        "plugin": &*plugin.name,
        "phase": phase.name(),
        "kind": error.kind(),
    });
    match error {
        CallError::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "plugin_timeout",
            format!("plugin {} timed out in {}", plugin.name, phase.name()),
        ),
        CallError::MemoryLimit => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "memory_limit_exceeded",
            format!(
                "plugin {} exceeded its memory limit in {}",
                plugin.name,
                phase.name()
            ),
        ),
        CallError::Blocking(cap_ms) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_blocked",
            format!(
                "plugin {} held its thread for {cap_ms} ms inside one C call in {}",
                plugin.name,
                phase.name()
            ),
        ),
        CallError::Runtime(_) | CallError::BadResult(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_error",
            format!(
                "plugin {} failed in {}; see `GET /v1/plugins/{}/logs` for request {request_id}",
                plugin.name,
                phase.name(),
                plugin.name
            ),
        ),
    }
    .with_details(details)
}

fn acquire_failure(plugin: &DeployedPlugin, error: AcquireError, request_id: &str) -> ApiError {
    let unit = &plugin.unit;
    match error {
        AcquireError::Shed(why) => {
            unit.metrics.error("overloaded");
            unit.metrics.shed(why);
            let reason = match why {
                Shed::QueueFull => "queue_full",
                Shed::QueueTimeout => "queue_timeout",
                Shed::NodeFull => "node_full",
            };
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!("no instance of plugin {} is free; retry later", plugin.name),
            )
            .with_details(serde_json::json!({
                "request_id": request_id,
                "plugin": &*plugin.name,
                "reason": reason,
            }))
        }
        AcquireError::Init(InstanceError::Init(error)) => {
            unit.metrics.error(error.kind());
            failure(plugin, Phase::Rewrite, &error, request_id)
        }
        AcquireError::Init(error) => {
            unit.metrics.error(error.kind());
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_init_failed",
                format!(
                    "plugin {} could not start; see its logs for request {request_id}",
                    plugin.name
                ),
            )
            .with_details(serde_json::json!({"request_id": request_id, "plugin": &*plugin.name}))
        }
        AcquireError::Quarantined(record) => {
            unit.metrics.error("quarantined");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "plugin_quarantined",
                format!(
                    "plugin {} is quarantined: it crashed the node {} times (last: {}); \
                     put it again to lift it",
                    plugin.name, record.crashes, record.last_signal
                ),
            )
            .with_details(serde_json::json!({
                "request_id": request_id,
                "plugin": &*plugin.name,
                "crashes": record.crashes,
                "quarantined_since_ms": record.quarantined_since_ms,
            }))
        }
    }
}
