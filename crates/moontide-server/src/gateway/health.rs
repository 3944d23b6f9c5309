//! Active health checks: one background task per (upstream, node address) that probes the
//! node every `interval` and feeds the result to the node's shared state
//! ([`NodeState::record_active`]), plus the reporting of every health and breaker
//! transition (log line and counter) and the per-node gauges of `/metrics`.
//!
//! - **Where**: [`run`] follows the registry's published snapshots on the admin runtime
//!   (it is spawned by `serve`); probes never run on data-plane worker threads.
//! - **Reconcile**: whenever the gateway part of the snapshot changes, [`Checker::reconcile`]
//!   starts a task for every new (upstream, address) with an active check, restarts the
//!   task of a node whose check settings (or state, for a re-created upstream) changed, and
//!   aborts the tasks of nodes, upstreams or checks that are gone. Upstreams whose snapshot
//!   is unchanged (same `id`) cost one map lookup; a publish that touched only functions
//!   costs nothing.
//! - **State survives edits**: the balancer keeps one `Arc<NodeState>` per node address
//!   across upstream edits (`balance::Upstream::new`), and a restarted task probes that
//!   same state, so an ejected node stays ejected until its checks say otherwise.
//! - **Probes**: the first runs as soon as the task starts (an upstream is checked from
//!   the moment it is configured, even with a single node and no traffic), then every
//!   `interval` (a probe that overruns delays the next). `http`: `GET path` over a fresh
//!   connection (`Connection: close`, `Host` = the check's host or the node's address);
//!   healthy when the status is in the expected ranges. `tcp`: a connect. Both are bounded
//!   by `timeout`.
//! - **Transitions** (from probes here, and from live traffic in `proxy`) are logged with
//!   the upstream, the node and the cause, and counted in
//!   `moontide_upstream_health_transitions_total` / `moontide_upstream_breaker_transitions_total`.
//!   [`export`] sets `moontide_upstream_node_healthy` and `moontide_upstream_node_breaker`
//!   from the serving snapshot when `/metrics` is scraped, and drops the series of nodes
//!   no longer configured, so label sets stay bounded by the config.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use moontide_gateway::balance::{
    BreakerMode, BreakerTransition, HealthCause, HealthTransition, NodeState, Transitions,
};
use tokio::net::TcpStream;

use super::Gateway;
use super::config::{ActiveCheck, CheckKind};
use super::proxy::Upstream;
use crate::metrics::{Metrics, UpstreamEvents};
use crate::registry::Registry;

/// Follows the registry's snapshots and keeps one probe task per checked node, until the
/// registry goes away. Runs on the admin runtime.
pub async fn run(registry: Arc<Registry>) {
    let mut published = registry.subscribe();
    let mut checker = Checker::new(registry.metrics.upstream_events());
    loop {
        checker.reconcile(&registry.snapshot().gateway);
        if published.changed().await.is_err() {
            return;
        }
    }
}

/// The probe tasks, by upstream then node address.
pub struct Checker {
    events: UpstreamEvents,
    upstreams: HashMap<Arc<str>, CheckedUpstream>,
    /// The upstream map last reconciled (a publish that kept it costs nothing).
    last: Option<imbl::HashMap<Arc<str>, Arc<super::proxy::Upstream>>>,
}

struct CheckedUpstream {
    /// The upstream as last reconciled (held, so that identity cannot be reused).
    reconciled: Option<Arc<Upstream>>,
    nodes: HashMap<String, Probe>,
}

/// A running probe task; aborted when dropped.
struct Probe {
    check: ActiveCheck,
    state: Arc<NodeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checker {
    /// No tasks yet; transitions are counted in `events`.
    pub fn new(events: UpstreamEvents) -> Self {
        Self {
            events,
            upstreams: HashMap::new(),
            last: None,
        }
    }

    /// Brings the probe tasks in line with `gateway` (see the module doc). Must be called
    /// within a tokio runtime: new tasks are spawned on the current one.
    pub fn reconcile(&mut self, gateway: &Gateway) {
        if self
            .last
            .as_ref()
            .is_some_and(|last| last.ptr_eq(&gateway.upstreams))
        {
            return;
        }
        self.last = Some(gateway.upstreams.clone());
        self.upstreams
            .retain(|name, _| gateway.upstreams.contains_key(name));
        for (name, upstream) in &gateway.upstreams {
            let Some(check) = &upstream.config.health.active else {
                self.upstreams.remove(name);
                continue;
            };
            let checked = self
                .upstreams
                .entry(name.clone())
                .or_insert_with(|| CheckedUpstream {
                    reconciled: None,
                    nodes: HashMap::new(),
                });
            if checked
                .reconciled
                .as_ref()
                .is_some_and(|last| Arc::ptr_eq(last, upstream))
            {
                continue;
            }
            checked.reconciled = Some(upstream.clone());
            let mut nodes = HashMap::with_capacity(upstream.balancer.nodes().len());
            for node in upstream.balancer.nodes() {
                let address = node.key();
                let kept = checked.nodes.remove(address).filter(|probe| {
                    probe.check == *check && Arc::ptr_eq(&probe.state, node.state())
                });
                let probe = kept.unwrap_or_else(|| Probe {
                    check: check.clone(),
                    state: node.state().clone(),
                    task: tokio::spawn(probe_loop(
                        name.clone(),
                        Arc::from(address),
                        check.clone(),
                        node.state().clone(),
                        self.events.clone(),
                    )),
                });
                nodes.insert(address.to_string(), probe);
            }
            // Nodes left in `checked.nodes` were removed: dropping aborts their tasks.
            checked.nodes = nodes;
        }
    }

    /// How many probe tasks run (for tests).
    pub fn probes(&self) -> usize {
        self.upstreams.values().map(|u| u.nodes.len()).sum()
    }
}

async fn probe_loop(
    upstream: Arc<str>,
    node: Arc<str>,
    check: ActiveCheck,
    state: Arc<NodeState>,
    events: UpstreamEvents,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(check.interval_ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = Duration::from_millis(check.timeout_ms);
    loop {
        ticker.tick().await;
        let outcome = match tokio::time::timeout(timeout, probe(&check, &node)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        if let Err(why) = &outcome {
            tracing::debug!(%upstream, %node, cause = %why, "health check failed");
        }
        if let Some(transition) = state.record_active(outcome.is_ok(), Instant::now()) {
            let detail = outcome.err().unwrap_or_else(|| "check passed".into());
            report_health(&events, &upstream, &node, transition, &detail);
        }
    }
}

/// One probe of `address`: `Ok` when healthy, else why not.
async fn probe(check: &ActiveCheck, address: &str) -> Result<(), String> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("http: {error}"))?;
    let request = http::Request::get(check.path.as_deref().unwrap_or("/"))
        .header(header::HOST, check.host.as_deref().unwrap_or(address))
        .header(header::USER_AGENT, "moontide-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|error| format!("request: {error}"))?;
    let mut connection = std::pin::pin!(connection);
    let mut send = std::pin::pin!(sender.send_request(request));
    // The connection future does the I/O; with `Connection: close` it may finish (having
    // handed the response over) before the response future is polled again.
    let response = tokio::select! {
        response = &mut send => response,
        result = &mut connection => match result {
            Ok(()) => send.await,
            Err(error) => return Err(format!("http: {error}")),
        },
    }
    .map_err(|error| format!("http: {error}"))?;
    let status = response.status().as_u16();
    if check.expects(status) {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

fn cause_name(cause: HealthCause) -> &'static str {
    match cause {
        HealthCause::Active => "active",
        HealthCause::Passive => "passive",
        HealthCause::Cooldown => "cooldown",
    }
}

/// Logs and counts a health transition of `node` of `upstream`.
pub fn report_health(
    events: &UpstreamEvents,
    upstream: &str,
    node: &str,
    transition: HealthTransition,
    detail: &str,
) {
    let cause = cause_name(transition.cause);
    if transition.healthy {
        tracing::info!(
            upstream,
            node,
            cause,
            detail,
            "upstream node is healthy again"
        );
    } else {
        tracing::warn!(
            upstream,
            node,
            cause,
            detail,
            "upstream node marked unhealthy"
        );
    }
    events.health(upstream, node, transition.healthy, cause);
}

/// Logs and counts the transitions a finished request caused on `node` of `upstream`
/// (the proxy calls this; nothing happens for the usual empty `Transitions`).
pub fn report(events: &UpstreamEvents, upstream: &str, node: &str, transitions: Transitions) {
    if let Some(health) = transitions.health {
        report_health(events, upstream, node, health, "live traffic");
    }
    if let Some(breaker) = transitions.breaker {
        let to = match breaker {
            BreakerTransition::Opened { open_for } => {
                tracing::warn!(upstream, node, ?open_for, "circuit breaker opened");
                "open"
            }
            BreakerTransition::HalfOpen => {
                tracing::info!(upstream, node, "circuit breaker half-open: trying the node");
                "half_open"
            }
            BreakerTransition::Closed => {
                tracing::info!(upstream, node, "circuit breaker closed");
                "closed"
            }
        };
        events.breaker(upstream, node, to);
    }
}

/// `0` closed, `1` open, `2` half-open: the value of `moontide_upstream_node_breaker`.
pub fn breaker_code(mode: BreakerMode) -> i64 {
    match mode {
        BreakerMode::Closed => 0,
        BreakerMode::Open => 1,
        BreakerMode::HalfOpen => 2,
    }
}

/// The name of a breaker mode in the admin API.
pub fn breaker_name(mode: BreakerMode) -> &'static str {
    match mode {
        BreakerMode::Closed => "closed",
        BreakerMode::Open => "open",
        BreakerMode::HalfOpen => "half_open",
    }
}

/// Sets the per-node gauges from `gateway` (the serving snapshot) and drops the series of
/// nodes that are no longer configured. Called when `/metrics` is scraped.
pub fn export(metrics: &Metrics, gateway: &Gateway) {
    let now = Instant::now();
    let nodes = gateway.upstreams.iter().flat_map(|(name, upstream)| {
        upstream.balancer.nodes().iter().map(move |node| {
            let state = node.state();
            (
                name.to_string(),
                node.key().to_string(),
                state.is_healthy(now),
                breaker_code(state.breaker_mode()),
            )
        })
    });
    metrics.set_upstream_nodes(nodes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: CheckKind) -> ActiveCheck {
        ActiveCheck {
            kind,
            path: Some("/healthz".into()),
            host: None,
            interval_ms: 50,
            timeout_ms: 1_000,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            statuses: vec![[200, 299]],
        }
    }

    fn upstream(
        nodes: &[&str],
        active: Option<serde_json::Value>,
    ) -> super::super::config::UpstreamConfig {
        let nodes: Vec<_> = nodes
            .iter()
            .map(|a| serde_json::json!({"address": a}))
            .collect();
        let mut json = serde_json::json!({"nodes": nodes});
        if let Some(active) = active {
            json["health"] = serde_json::json!({"active": active});
        }
        let input: super::super::config::UpstreamInput = serde_json::from_value(json).unwrap();
        let mut errors = Vec::new();
        let config = input.resolve(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        config
    }

    fn task(checker: &Checker, address: &str) -> Option<(tokio::task::Id, Arc<NodeState>)> {
        let probe = checker.upstreams.get("u")?.nodes.get(address)?;
        Some((probe.task.id(), probe.state.clone()))
    }

    #[tokio::test]
    async fn reconcile_starts_keeps_restarts_and_stops_probe_tasks() {
        let (a, b, c) = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3");
        let slow = serde_json::json!({"type": "tcp", "interval": "1h"});
        let mut gateway = Gateway::default();
        let mut checker = Checker::new(UpstreamEvents::default());
        gateway.set_upstream("u", Some(upstream(&[a, b], Some(slow.clone()))));
        gateway.set_upstream("plain", Some(upstream(&[c], None)));
        checker.reconcile(&gateway);
        assert_eq!(checker.probes(), 2, "one task per checked node");
        let (a_task, a_state) = task(&checker, a).unwrap();

        // A new node: a's task and state stay.
        gateway.set_upstream("u", Some(upstream(&[a, b, c], Some(slow.clone()))));
        checker.reconcile(&gateway);
        assert_eq!(checker.probes(), 3);
        assert_eq!(task(&checker, a).unwrap().0, a_task);

        // Other check settings: a new task on the same node state.
        let fast = serde_json::json!({"type": "tcp", "interval": "30m"});
        gateway.set_upstream("u", Some(upstream(&[a, c], Some(fast))));
        checker.reconcile(&gateway);
        let (task_now, state_now) = task(&checker, a).unwrap();
        assert_ne!(task_now, a_task);
        assert!(Arc::ptr_eq(&state_now, &a_state));
        assert!(
            task(&checker, b).is_none(),
            "a removed node is no longer probed"
        );
        assert_eq!(checker.probes(), 2);

        // No active check, then no upstream.
        gateway.set_upstream("u", Some(upstream(&[a, c], None)));
        checker.reconcile(&gateway);
        assert_eq!(checker.probes(), 0);
        gateway.set_upstream("u", Some(upstream(&[a], Some(slow))));
        checker.reconcile(&gateway);
        assert_eq!(checker.probes(), 1);
        gateway.set_upstream("u", None);
        checker.reconcile(&gateway);
        assert_eq!(checker.probes(), 0);
    }

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut statuses = [204u16, 503].into_iter().cycle();
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let status = statuses.next().unwrap();
                let _ = socket
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        assert_eq!(probe(&check(CheckKind::Http), &address).await, Ok(()));
        assert_eq!(
            probe(&check(CheckKind::Http), &address).await,
            Err("answered 503".into())
        );
        assert_eq!(probe(&check(CheckKind::Tcp), &address).await, Ok(()));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(probe(&check(CheckKind::Tcp), &closed).await.is_err());
    }
}
