//! Gateway objects as clients send them and as they are stored: upstreams (nodes, balancer,
//! timeouts, retries, keep-alive, Host handling, health checks, circuit breaker) and routes
//! (matchers and a target).
//! Validation reports every problem at once with the JSON path of the field (STYLE.md
//! rule 7); the stored form is normalised, with every default filled in, so what `GET`
//! shows is what serves.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{DurationInput, FieldError, duration_field};

/// How an upstream picks a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Smooth weighted round robin (nginx's).
    RoundRobin,
    /// Consistent hashing (ketama) on a key taken from the request (`hash_on`).
    Chash,
    /// Fewest requests in flight per unit of weight.
    LeastConn,
    /// Peak-EWMA latency × load, best of two random nodes.
    Ewma,
}

/// Where the consistent-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    Query(String),
    ClientIp,
    Uri,
}

/// What the upstream request's `Host` header is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PassHost {
    /// The client's `Host` (default).
    Pass,
    /// The chosen node's address.
    Node,
    /// A fixed value.
    Rewrite(String),
}

/// Why a failed attempt may be retried on another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The connection could not be made (or broke before a response).
    Error,
    /// Connecting or waiting for the response timed out.
    Timeout,
}

/// One node of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// `host:port`; the host is an IP address or a DNS name resolved at connect time.
    pub address: String,
    pub weight: u32,
}

/// An upstream as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub nodes: Vec<Node>,
    pub balancer: BalancerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    pub connect_timeout_ms: u64,
    pub send_timeout_ms: u64,
    pub read_timeout_ms: u64,
    /// Further attempts after the first, each on a node not tried yet.
    pub retries: u32,
    pub retry_on: Vec<RetryOn>,
    /// Response statuses that are retried (e.g. 502, 503, 504).
    pub retry_on_statuses: Vec<u16>,
    /// Retry non-idempotent requests (POST, PATCH) too.
    pub retry_non_idempotent: bool,
    pub keepalive_idle_timeout_ms: u64,
    /// Idle connections kept per node on each worker thread.
    pub keepalive_max_idle: u32,
    pub pass_host: PassHost,
    /// Active and passive health checks (records written before they existed get the
    /// defaults: passive only).
    #[serde(default)]
    pub health: HealthSettings,
    /// The per-node circuit breaker.
    #[serde(default)]
    pub breaker: BreakerSettings,
}

/// Health-check settings as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Probes sent by the node in the background; `None`: no active checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveCheck>,
    #[serde(default)]
    pub passive: PassiveHealth,
}

/// How an active check probes a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// `GET path` over a fresh connection; healthy when the status is expected.
    Http,
    /// A TCP connect; healthy when it succeeds.
    Tcp,
}

/// An active check as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Request path (HTTP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `Host` of the probe (HTTP only; default: the node's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub interval_ms: u64,
    /// Bounds a whole probe (connect, and for HTTP the response's headers).
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy node healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy node unhealthy.
    pub unhealthy_threshold: u32,
    /// Inclusive status ranges that count as healthy (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<[u16; 2]>,
}

impl ActiveCheck {
    /// Whether an HTTP probe's `status` counts as healthy.
    pub fn expects(&self, status: u16) -> bool {
        self.statuses
            .iter()
            .any(|[low, high]| (*low..=*high).contains(&status))
    }
}

/// Passive health (outcomes of live requests) as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    /// Consecutive failed requests that eject a node; 0 disables passive ejection.
    pub unhealthy_threshold: u32,
    /// Without active checks, how long an ejected node stays out.
    pub recovery_ms: u64,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            unhealthy_threshold: 5,
            recovery_ms: 10_000,
        }
    }
}

/// Circuit-breaker settings as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker; 0 disables the rule.
    pub failures: u32,
    pub open_ms: u64,
    /// Cap of the open period, which doubles each time a half-open trial fails.
    pub max_open_ms: u64,
    pub half_open_probes: u32,
    /// Successful trials that close a half-open breaker.
    pub successes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<RatioSettings>,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open_ms: 10_000,
            max_open_ms: 300_000,
            half_open_probes: 1,
            successes: 1,
            ratio: None,
        }
    }
}

/// The breaker's failure-ratio rule as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatioSettings {
    /// Share of failed requests (0–1) above which the breaker opens.
    pub ratio: f64,
    pub min_requests: u32,
    pub window_ms: u64,
}

impl UpstreamConfig {
    /// The per-node settings (health, breaker) the balancer applies to every node.
    pub fn node_config(&self) -> moontide_gateway::balance::NodeConfig {
        use moontide_gateway::balance::{BreakerConfig, FailureRatio, HealthConfig, NodeConfig};
        let active = self.health.active.as_ref();
        let defaults = HealthConfig::default();
        let ms = Duration::from_millis;
        let breaker = &self.breaker;
        NodeConfig {
            health: HealthConfig {
                healthy_threshold: active
                    .map_or(defaults.healthy_threshold, |a| a.healthy_threshold),
                unhealthy_threshold: active
                    .map_or(defaults.unhealthy_threshold, |a| a.unhealthy_threshold),
                passive_unhealthy_threshold: self.health.passive.unhealthy_threshold,
                passive_recovery: ms(self.health.passive.recovery_ms),
                active_checks: active.is_some(),
            },
            breaker: BreakerConfig {
                failure_threshold: breaker.failures,
                failure_ratio: breaker.ratio.as_ref().map(|r| FailureRatio {
                    ratio: r.ratio,
                    min_requests: r.min_requests,
                    window: ms(r.window_ms),
                }),
                open_for: ms(breaker.open_ms),
                max_open_for: ms(breaker.max_open_ms),
                half_open_probes: breaker.half_open_probes,
                success_threshold: breaker.successes,
            },
            ..NodeConfig::default()
        }
    }

    /// Whether a response with `status` counts as a failure of its node, for passive
    /// health and the breaker: any 5xx, and any status listed to be retried (e.g. 429).
    /// Connect errors, broken connections and timeouts are failures too (see `proxy`).
    pub fn is_failure_status(&self, status: u16) -> bool {
        status >= 500 || self.retry_on_statuses.contains(&status)
    }
}

impl UpstreamConfig {
    /// This config in the shape `PUT /v1/upstreams/{name}` takes, every default spelled
    /// out (durations in milliseconds): what `GET` shows, so that a read can be edited and
    /// written back, and `resolve` of it gives this config again.
    pub fn to_input(&self) -> serde_json::Value {
        use serde_json::json;
        let hash_on = self.hash_on.as_ref().map(|on| match on {
            HashOn::Header(name) => json!({"header": name}),
            HashOn::Cookie(name) => json!({"cookie": name}),
            HashOn::Query(name) => json!({"query": name}),
            HashOn::ClientIp => json!({"client_ip": true}),
            HashOn::Uri => json!({"uri": true}),
        });
        let retry_on: Vec<serde_json::Value> = self
            .retry_on
            .iter()
            .map(|on| json!(on))
            .chain(self.retry_on_statuses.iter().map(|status| json!(status)))
            .collect();
        let host = match &self.pass_host {
            PassHost::Pass => "pass".to_string(),
            PassHost::Node => "node".to_string(),
            PassHost::Rewrite(host) => host.clone(),
        };
        let active = self.health.active.as_ref().map(|check| {
            let mut active = json!({
                "type": check.kind,
                "interval": check.interval_ms,
                "timeout": check.timeout_ms,
                "healthy_threshold": check.healthy_threshold,
                "unhealthy_threshold": check.unhealthy_threshold,
            });
            if let Some(path) = &check.path {
                active["path"] = json!(path);
            }
            if let Some(host) = &check.host {
                active["host"] = json!(host);
            }
            if check.kind == CheckKind::Http {
                active["statuses"] = check
                    .statuses
                    .iter()
                    .map(|[low, high]| json!(format!("{low}-{high}")))
                    .collect();
            }
            active
        });
        let mut health = json!({"passive": {
            "unhealthy_threshold": self.health.passive.unhealthy_threshold,
            "recovery": self.health.passive.recovery_ms,
        }});
        if let Some(active) = active {
            health["active"] = active;
        }
        let breaker = &self.breaker;
        let mut breaker_input = json!({
            "failures": breaker.failures,
            "open": breaker.open_ms,
            "max_open": breaker.max_open_ms,
            "half_open_probes": breaker.half_open_probes,
            "successes": breaker.successes,
        });
        if let Some(ratio) = &breaker.ratio {
            breaker_input["ratio"] = json!({
                "ratio": ratio.ratio,
                "min_requests": ratio.min_requests,
                "window": ratio.window_ms,
            });
        }
        let mut input = json!({
            "nodes": self.nodes,
            "balancer": self.balancer,
            "timeouts": {
                "connect": self.connect_timeout_ms,
                "send": self.send_timeout_ms,
                "read": self.read_timeout_ms,
            },
            "retries": {
                "attempts": self.retries,
                "on": retry_on,
                "non_idempotent": self.retry_non_idempotent,
            },
            "keepalive": {
                "idle_timeout": self.keepalive_idle_timeout_ms,
                "max_idle": self.keepalive_max_idle,
            },
            "host": host,
            "health": health,
            "breaker": breaker_input,
        });
        if let Some(hash_on) = hash_on {
            input["hash_on"] = hash_on;
        }
        input
    }
}

/// `PUT /v1/upstreams/{name}`: every field but `nodes` optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamInput {
    pub nodes: Option<Vec<NodeInput>>,
    pub balancer: Option<String>,
    pub hash_on: Option<HashOnInput>,
    pub timeouts: Option<TimeoutsInput>,
    pub retries: Option<RetriesInput>,
    pub keepalive: Option<KeepaliveInput>,
    /// `"pass"`, `"node"`, or any other text: that Host.
    pub host: Option<String>,
    pub health: Option<HealthInput>,
    pub breaker: Option<BreakerInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthInput {
    pub active: Option<ActiveCheckInput>,
    pub passive: Option<PassiveInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheckInput {
    /// `"http"` (default) or `"tcp"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub interval: Option<DurationInput>,
    pub timeout: Option<DurationInput>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    /// Statuses as numbers (`200`) or inclusive ranges as text (`"200-399"`).
    pub statuses: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveInput {
    pub unhealthy_threshold: Option<u32>,
    pub recovery: Option<DurationInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerInput {
    pub failures: Option<u32>,
    pub open: Option<DurationInput>,
    pub max_open: Option<DurationInput>,
    pub half_open_probes: Option<u32>,
    pub successes: Option<u32>,
    pub ratio: Option<RatioInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatioInput {
    pub ratio: Option<f64>,
    pub min_requests: Option<u32>,
    pub window: Option<DurationInput>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInput {
    pub address: Option<String>,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashOnInput {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub query: Option<String>,
    pub client_ip: Option<bool>,
    pub uri: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsInput {
    pub connect: Option<DurationInput>,
    pub send: Option<DurationInput>,
    pub read: Option<DurationInput>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesInput {
    pub attempts: Option<u32>,
    /// `"error"`, `"timeout"`, or a status code as text or number.
    pub on: Option<Vec<serde_json::Value>>,
    pub non_idempotent: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveInput {
    pub idle_timeout: Option<DurationInput>,
    pub max_idle: Option<u32>,
}

/// Most nodes in one upstream.
pub const MAX_NODES: usize = 1_000;
/// Most retries of one request.
pub const MAX_RETRIES: u32 = 10;

impl UpstreamInput {
    /// Validates and normalises, collecting every error with its path.
    pub fn resolve(&self, errors: &mut Vec<FieldError>) -> UpstreamConfig {
        let mut config = UpstreamConfig {
            nodes: Vec::new(),
            balancer: BalancerKind::RoundRobin,
            hash_on: None,
            connect_timeout_ms: 1_000,
            send_timeout_ms: 60_000,
            read_timeout_ms: 60_000,
            retries: 1,
            retry_on: vec![RetryOn::Error, RetryOn::Timeout],
            retry_on_statuses: vec![502, 503, 504],
            retry_non_idempotent: false,
            keepalive_idle_timeout_ms: 60_000,
            keepalive_max_idle: 64,
            pass_host: PassHost::Pass,
            health: HealthSettings::default(),
            breaker: BreakerSettings::default(),
        };
        match &self.nodes {
            None => errors.push(FieldError::new("nodes", "required: at least one node")),
            Some(nodes) if nodes.is_empty() => {
                errors.push(FieldError::new("nodes", "must list at least one node"))
            }
            Some(nodes) if nodes.len() > MAX_NODES => errors.push(FieldError::new(
                "nodes",
                format!("at most {MAX_NODES} nodes"),
            )),
            Some(nodes) => {
                for (i, node) in nodes.iter().enumerate() {
                    let at = |field: &str| format!("nodes[{i}].{field}");
                    let address = match &node.address {
                        None => {
                            errors.push(FieldError::new(at("address"), "required: host:port"));
                            continue;
                        }
                        Some(address) => address.trim().to_ascii_lowercase(),
                    };
                    if let Err(message) = validate_address(&address) {
                        errors.push(FieldError::new(at("address"), message));
                    } else if config.nodes.iter().any(|n| n.address == address) {
                        errors.push(FieldError::new(at("address"), "listed twice"));
                    }
                    let weight = node.weight.unwrap_or(1);
                    if !(1..=10_000).contains(&weight) {
                        errors.push(FieldError::new(at("weight"), "must be between 1 and 10000"));
                    }
                    config.nodes.push(Node { address, weight });
                }
            }
        }
        if let Some(balancer) = &self.balancer {
            match balancer.as_str() {
                "round_robin" | "roundrobin" => config.balancer = BalancerKind::RoundRobin,
                "chash" => config.balancer = BalancerKind::Chash,
                "least_conn" => config.balancer = BalancerKind::LeastConn,
                "ewma" => config.balancer = BalancerKind::Ewma,
                _ => errors.push(FieldError::new(
                    "balancer",
                    "one of round_robin, chash, least_conn, ewma",
                )),
            }
        }
        match (&self.hash_on, config.balancer) {
            (Some(hash_on), BalancerKind::Chash) => {
                config.hash_on = resolve_hash_on(hash_on, errors);
            }
            (Some(_), _) => errors.push(FieldError::new("hash_on", "only for the chash balancer")),
            (None, BalancerKind::Chash) => errors.push(FieldError::new(
                "hash_on",
                "required by the chash balancer: one of header, cookie, query, client_ip, uri",
            )),
            (None, _) => {}
        }
        if let Some(timeouts) = &self.timeouts {
            let range = (Duration::from_millis(1), Duration::from_secs(3_600));
            duration_field(
                &timeouts.connect,
                "timeouts.connect",
                range,
                &mut config.connect_timeout_ms,
                errors,
            );
            duration_field(
                &timeouts.send,
                "timeouts.send",
                range,
                &mut config.send_timeout_ms,
                errors,
            );
            duration_field(
                &timeouts.read,
                "timeouts.read",
                range,
                &mut config.read_timeout_ms,
                errors,
            );
        }
        if let Some(retries) = &self.retries {
            if let Some(attempts) = retries.attempts {
                if attempts > MAX_RETRIES {
                    errors.push(FieldError::new(
                        "retries.attempts",
                        format!("at most {MAX_RETRIES}"),
                    ));
                } else {
                    config.retries = attempts;
                }
            }
            if let Some(on) = &retries.on {
                config.retry_on.clear();
                config.retry_on_statuses.clear();
                for (i, condition) in on.iter().enumerate() {
                    let path = format!("retries.on[{i}]");
                    let status = match condition {
                        serde_json::Value::String(text) if text == "error" => {
                            config.retry_on.push(RetryOn::Error);
                            continue;
                        }
                        serde_json::Value::String(text) if text == "timeout" => {
                            config.retry_on.push(RetryOn::Timeout);
                            continue;
                        }
                        serde_json::Value::String(text) => text.parse::<u16>().ok(),
                        serde_json::Value::Number(n) => {
                            n.as_u64().and_then(|n| u16::try_from(n).ok())
                        }
                        _ => None,
                    };
                    match status {
                        Some(status) if (500..=599).contains(&status) || status == 429 => {
                            config.retry_on_statuses.push(status)
                        }
                        _ => errors.push(FieldError::new(
                            path,
                            "one of \"error\", \"timeout\", or a status 429 or 500-599",
                        )),
                    }
                }
                config.retry_on.sort();
                config.retry_on.dedup();
                config.retry_on_statuses.sort();
                config.retry_on_statuses.dedup();
            }
            if let Some(non_idempotent) = retries.non_idempotent {
                config.retry_non_idempotent = non_idempotent;
            }
        }
        if let Some(keepalive) = &self.keepalive {
            duration_field(
                &keepalive.idle_timeout,
                "keepalive.idle_timeout",
                (Duration::ZERO, Duration::from_secs(3_600)),
                &mut config.keepalive_idle_timeout_ms,
                errors,
            );
            if let Some(max_idle) = keepalive.max_idle {
                if max_idle > 10_000 {
                    errors.push(FieldError::new("keepalive.max_idle", "at most 10000"));
                } else {
                    config.keepalive_max_idle = max_idle;
                }
            }
        }
        if let Some(host) = &self.host {
            config.pass_host = match host.as_str() {
                "pass" => PassHost::Pass,
                "node" => PassHost::Node,
                other if http::HeaderValue::from_str(other).is_ok() && !other.is_empty() => {
                    PassHost::Rewrite(other.to_string())
                }
                _ => {
                    errors.push(FieldError::new(
                        "host",
                        "\"pass\", \"node\", or a valid Host header value",
                    ));
                    PassHost::Pass
                }
            };
        }
        if let Some(health) = &self.health {
            config.health = resolve_health(health, errors);
        }
        if let Some(breaker) = &self.breaker {
            config.breaker = resolve_breaker(breaker, errors);
        }
        config
    }
}

/// Thresholds of health checks and the breaker: 1 to this.
const MAX_THRESHOLD: u32 = 1_000;

fn threshold(
    input: Option<u32>,
    path: &str,
    allow_zero: bool,
    target: &mut u32,
    errors: &mut Vec<FieldError>,
) {
    let Some(value) = input else { return };
    let low = u32::from(!allow_zero);
    if (low..=MAX_THRESHOLD).contains(&value) {
        *target = value;
    } else {
        let zero = if allow_zero { " (0 disables)" } else { "" };
        errors.push(FieldError::new(
            path,
            format!("must be between {low} and {MAX_THRESHOLD}{zero}"),
        ));
    }
}

fn resolve_health(input: &HealthInput, errors: &mut Vec<FieldError>) -> HealthSettings {
    let mut health = HealthSettings::default();
    if let Some(active) = &input.active {
        health.active = Some(resolve_active(active, errors));
    }
    if let Some(passive) = &input.passive {
        threshold(
            passive.unhealthy_threshold,
            "health.passive.unhealthy_threshold",
            true,
            &mut health.passive.unhealthy_threshold,
            errors,
        );
        duration_field(
            &passive.recovery,
            "health.passive.recovery",
            (Duration::from_millis(100), Duration::from_secs(86_400)),
            &mut health.passive.recovery_ms,
            errors,
        );
    }
    health
}

fn resolve_active(input: &ActiveCheckInput, errors: &mut Vec<FieldError>) -> ActiveCheck {
    let kind = match input.kind.as_deref() {
        None | Some("http") => CheckKind::Http,
        Some("tcp") => CheckKind::Tcp,
        Some(_) => {
            errors.push(FieldError::new("health.active.type", "\"http\" or \"tcp\""));
            CheckKind::Http
        }
    };
    let mut check = ActiveCheck {
        kind,
        path: None,
        host: None,
        interval_ms: 2_000,
        timeout_ms: 1_000,
        healthy_threshold: 2,
        unhealthy_threshold: 3,
        statuses: Vec::new(),
    };
    if kind == CheckKind::Http {
        let path = input.path.clone().unwrap_or_else(|| "/healthz".into());
        let valid = path.starts_with('/')
            && path
                .parse::<http::uri::PathAndQuery>()
                .is_ok_and(|p| p.as_str() == path);
        if !valid {
            errors.push(FieldError::new(
                "health.active.path",
                "a request path starting with '/' (a query may follow)",
            ));
        }
        check.path = Some(path);
        if let Some(host) = &input.host {
            if host.is_empty() || http::HeaderValue::from_str(host).is_err() {
                errors.push(FieldError::new(
                    "health.active.host",
                    "a valid Host header value",
                ));
            } else {
                check.host = Some(host.clone());
            }
        }
        check.statuses = match &input.statuses {
            None => vec![[200, 399]],
            Some(list) if list.is_empty() => {
                errors.push(FieldError::new(
                    "health.active.statuses",
                    "must list at least one status",
                ));
                Vec::new()
            }
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let range = status_range(item);
                    if range.is_none() {
                        errors.push(FieldError::new(
                            format!("health.active.statuses[{i}]"),
                            "a status 100-599 or a range as text (\"200-399\")",
                        ));
                    }
                    range
                })
                .collect(),
        };
    } else {
        for (field, given) in [
            ("path", input.path.is_some()),
            ("host", input.host.is_some()),
            ("statuses", input.statuses.is_some()),
        ] {
            if given {
                errors.push(FieldError::new(
                    format!("health.active.{field}"),
                    "only for http checks",
                ));
            }
        }
    }
    duration_field(
        &input.interval,
        "health.active.interval",
        (Duration::from_millis(10), Duration::from_secs(3_600)),
        &mut check.interval_ms,
        errors,
    );
    duration_field(
        &input.timeout,
        "health.active.timeout",
        (Duration::from_millis(1), Duration::from_secs(600)),
        &mut check.timeout_ms,
        errors,
    );
    threshold(
        input.healthy_threshold,
        "health.active.healthy_threshold",
        false,
        &mut check.healthy_threshold,
        errors,
    );
    threshold(
        input.unhealthy_threshold,
        "health.active.unhealthy_threshold",
        false,
        &mut check.unhealthy_threshold,
        errors,
    );
    check
}

/// `200`, `"200"` or `"200-399"` → an inclusive range within 100..=599.
fn status_range(item: &serde_json::Value) -> Option<[u16; 2]> {
    let (low, high) = match item {
        serde_json::Value::Number(n) => {
            let status = u16::try_from(n.as_u64()?).ok()?;
            (status, status)
        }
        serde_json::Value::String(text) => match text.split_once('-') {
            Some((low, high)) => (low.trim().parse().ok()?, high.trim().parse().ok()?),
            None => {
                let status = text.trim().parse().ok()?;
                (status, status)
            }
        },
        _ => return None,
    };
    ((100..=599).contains(&low) && (low..=599).contains(&high)).then_some([low, high])
}

fn resolve_breaker(input: &BreakerInput, errors: &mut Vec<FieldError>) -> BreakerSettings {
    let mut breaker = BreakerSettings::default();
    threshold(
        input.failures,
        "breaker.failures",
        true,
        &mut breaker.failures,
        errors,
    );
    let range = (Duration::from_millis(1), Duration::from_secs(86_400));
    duration_field(
        &input.open,
        "breaker.open",
        range,
        &mut breaker.open_ms,
        errors,
    );
    duration_field(
        &input.max_open,
        "breaker.max_open",
        range,
        &mut breaker.max_open_ms,
        errors,
    );
    if input.max_open.is_some() && breaker.max_open_ms < breaker.open_ms {
        errors.push(FieldError::new(
            "breaker.max_open",
            "must not be shorter than open",
        ));
    } else {
        // Only `open` given, longer than the default cap: the cap follows.
        breaker.max_open_ms = breaker.max_open_ms.max(breaker.open_ms);
    }
    threshold(
        input.half_open_probes,
        "breaker.half_open_probes",
        false,
        &mut breaker.half_open_probes,
        errors,
    );
    threshold(
        input.successes,
        "breaker.successes",
        false,
        &mut breaker.successes,
        errors,
    );
    if let Some(ratio) = &input.ratio {
        let mut rule = RatioSettings {
            ratio: 0.5,
            min_requests: 20,
            window_ms: 10_000,
        };
        if let Some(value) = ratio.ratio {
            if value > 0.0 && value < 1.0 {
                rule.ratio = value;
            } else {
                errors.push(FieldError::new(
                    "breaker.ratio.ratio",
                    "a share of failures between 0 and 1 (exclusive)",
                ));
            }
        }
        threshold(
            ratio.min_requests,
            "breaker.ratio.min_requests",
            false,
            &mut rule.min_requests,
            errors,
        );
        duration_field(
            &ratio.window,
            "breaker.ratio.window",
            (Duration::from_millis(100), Duration::from_secs(3_600)),
            &mut rule.window_ms,
            errors,
        );
        breaker.ratio = Some(rule);
    }
    breaker
}

fn resolve_hash_on(input: &HashOnInput, errors: &mut Vec<FieldError>) -> Option<HashOn> {
    let mut chosen = Vec::new();
    if let Some(name) = &input.header {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(_) => chosen.push(HashOn::Header(name.to_ascii_lowercase())),
            Err(_) => errors.push(FieldError::new("hash_on.header", "not a valid header name")),
        }
    }
    if let Some(name) = &input.cookie {
        if name.is_empty() || name.contains([';', '=', ' ']) {
            errors.push(FieldError::new("hash_on.cookie", "not a valid cookie name"));
        } else {
            chosen.push(HashOn::Cookie(name.clone()));
        }
    }
    if let Some(name) = &input.query {
        if name.is_empty() {
            errors.push(FieldError::new("hash_on.query", "must not be empty"));
        } else {
            chosen.push(HashOn::Query(name.clone()));
        }
    }
    if input.client_ip == Some(true) {
        chosen.push(HashOn::ClientIp);
    }
    if input.uri == Some(true) {
        chosen.push(HashOn::Uri);
    }
    match chosen.len() {
        1 => chosen.pop(),
        0 => {
            errors.push(FieldError::new(
                "hash_on",
                "give one of header, cookie, query, client_ip: true, uri: true",
            ));
            None
        }
        _ => {
            errors.push(FieldError::new("hash_on", "give only one key source"));
            None
        }
    }
}

/// `host:port` with a port in 1..=65535 and a host that is an IP address or a DNS name.
fn validate_address(address: &str) -> Result<(), String> {
    if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
        return if socket.port() == 0 {
            Err("the port must be between 1 and 65535".into())
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("must be host:port (e.g. 127.0.0.1:8080)".into());
    };
    match port.parse::<u16>() {
        Ok(port) if port > 0 => {}
        _ => return Err("the port must be between 1 and 65535".into()),
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid_name {
        Ok(())
    } else {
        Err("the host must be an IP address (IPv6 in brackets) or a DNS name".into())
    }
}

/// What a route sends its requests to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RouteTarget {
    Function(String),
    Upstream(String),
}

/// How a header or query value is matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ValueMatchConfig {
    Exact(String),
    Prefix(String),
    Present,
}

/// A route as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, ValueMatchConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, ValueMatchConfig>,
    #[serde(default)]
    pub priority: i32,
    pub target: RouteTarget,
    /// Plugins run on the route's requests, in this order, phase by phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<RoutePlugin>,
}

impl RouteConfig {
    /// This route in the shape `PUT /v1/routes/{name}` takes (what `GET` shows).
    pub fn to_input(&self) -> serde_json::Value {
        use serde_json::json;
        let matchers = |map: &BTreeMap<String, ValueMatchConfig>| -> serde_json::Value {
            map.iter()
                .map(|(name, rule)| {
                    let rule = match rule {
                        ValueMatchConfig::Exact(value) => json!(value),
                        ValueMatchConfig::Prefix(prefix) => json!({"prefix": prefix}),
                        ValueMatchConfig::Present => json!({"present": true}),
                    };
                    (name.clone(), rule)
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let mut input = json!({
            "hosts": self.hosts,
            "paths": self.paths,
            "methods": self.methods,
            "headers": matchers(&self.headers),
            "query": matchers(&self.query),
            "priority": self.priority,
        });
        match &self.target {
            RouteTarget::Function(name) => input["function"] = json!(name),
            RouteTarget::Upstream(name) => input["upstream"] = json!(name),
        }
        input["plugins"] = json!(self.plugins);
        input
    }
}

/// A plugin on a route, with the route's config for it (`ctx.conf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePlugin {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

/// `plugins[i]` of `PUT /v1/routes/{name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePluginInput {
    pub name: Option<String>,
    pub config: Option<serde_json::Value>,
}

/// Most plugins on one route.
pub const MAX_ROUTE_PLUGINS: usize = 32;
/// Largest config object of one plugin on a route, as JSON.
pub const MAX_PLUGIN_CONF_BYTES: usize = 64 << 10;

/// A header or query matcher as sent: a string is an exact value; or
/// `{"prefix": "..."}`, `{"present": true}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ValueMatchInput {
    Exact(String),
    Rule(ValueMatchRule),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatchRule {
    pub prefix: Option<String>,
    pub present: Option<bool>,
}

/// `PUT /v1/routes/{name}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteInput {
    pub hosts: Option<Vec<String>>,
    /// One path (`path`) or several (`paths`).
    pub path: Option<String>,
    pub paths: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, ValueMatchInput>>,
    pub query: Option<BTreeMap<String, ValueMatchInput>>,
    pub priority: Option<i32>,
    pub function: Option<String>,
    pub upstream: Option<String>,
    pub plugins: Option<Vec<RoutePluginInput>>,
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

impl RouteInput {
    /// Validates the fields the server owns (the target, methods, matcher shapes); the
    /// path and host patterns are checked by the router when the route is compiled.
    pub fn resolve(&self, errors: &mut Vec<FieldError>) -> RouteConfig {
        let paths = match (&self.path, &self.paths) {
            (Some(path), None) => vec![path.clone()],
            (None, Some(paths)) => paths.clone(),
            (Some(_), Some(_)) => {
                errors.push(FieldError::new(
                    "paths",
                    "give either path or paths, not both",
                ));
                Vec::new()
            }
            (None, None) => {
                errors.push(FieldError::new("paths", "required: at least one path"));
                Vec::new()
            }
        };
        let mut methods = Vec::new();
        for (i, method) in self.methods.iter().flatten().enumerate() {
            let upper = method.to_ascii_uppercase();
            if !METHODS.contains(&upper.as_str()) {
                errors.push(FieldError::new(
                    format!("methods[{i}]"),
                    format!("unknown method; one of {}", METHODS.join(", ")),
                ));
            } else if methods.contains(&upper) {
                errors.push(FieldError::new(format!("methods[{i}]"), "listed twice"));
            } else {
                methods.push(upper);
            }
        }
        let headers = resolve_matchers("headers", self.headers.as_ref(), true, errors);
        let query = resolve_matchers("query", self.query.as_ref(), false, errors);
        let target = match (&self.function, &self.upstream) {
            (Some(function), None) => {
                if let Err(message) = crate::api::validate_function_name(function) {
                    errors.push(FieldError::new("function", message));
                }
                RouteTarget::Function(function.clone())
            }
            (None, Some(upstream)) => {
                if let Err(message) = validate_object_name(upstream) {
                    errors.push(FieldError::new("upstream", message));
                }
                RouteTarget::Upstream(upstream.clone())
            }
            (Some(_), Some(_)) => {
                errors.push(FieldError::new(
                    "upstream",
                    "give either function or upstream, not both",
                ));
                RouteTarget::Function(String::new())
            }
            (None, None) => {
                errors.push(FieldError::new(
                    "function",
                    "required: the function or the upstream this route serves",
                ));
                RouteTarget::Function(String::new())
            }
        };
        let plugins = resolve_route_plugins(self.plugins.as_deref().unwrap_or_default(), errors);
        RouteConfig {
            plugins,
            hosts: self
                .hosts
                .iter()
                .flatten()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            paths,
            methods,
            headers,
            query,
            priority: self.priority.unwrap_or(0),
            target,
        }
    }
}

fn resolve_route_plugins(
    input: &[RoutePluginInput],
    errors: &mut Vec<FieldError>,
) -> Vec<RoutePlugin> {
    if input.len() > MAX_ROUTE_PLUGINS {
        errors.push(FieldError::new(
            "plugins",
            format!("at most {MAX_ROUTE_PLUGINS} plugins on one route"),
        ));
        return Vec::new();
    }
    let mut out: Vec<RoutePlugin> = Vec::with_capacity(input.len());
    for (i, plugin) in input.iter().enumerate() {
        let name = match &plugin.name {
            None => {
                errors.push(FieldError::new(
                    format!("plugins[{i}].name"),
                    "required: the plugin's name",
                ));
                String::new()
            }
            Some(name) => {
                if let Err(message) = validate_object_name(name) {
                    errors.push(FieldError::new(format!("plugins[{i}].name"), message));
                } else if out.iter().any(|p| &p.name == name) {
                    errors.push(FieldError::new(
                        format!("plugins[{i}].name"),
                        "listed twice (one plugin runs once per request)",
                    ));
                }
                name.clone()
            }
        };
        let config = match &plugin.config {
            None | Some(serde_json::Value::Null) => None,
            Some(config @ serde_json::Value::Object(_)) => {
                if config.to_string().len() > MAX_PLUGIN_CONF_BYTES {
                    errors.push(FieldError::new(
                        format!("plugins[{i}].config"),
                        format!("at most {MAX_PLUGIN_CONF_BYTES} bytes of JSON"),
                    ));
                }
                Some(config.clone())
            }
            Some(_) => {
                errors.push(FieldError::new(
                    format!("plugins[{i}].config"),
                    "must be a JSON object",
                ));
                None
            }
        };
        out.push(RoutePlugin { name, config });
    }
    out
}

fn resolve_matchers(
    field: &str,
    input: Option<&BTreeMap<String, ValueMatchInput>>,
    header_names: bool,
    errors: &mut Vec<FieldError>,
) -> BTreeMap<String, ValueMatchConfig> {
    let mut out = BTreeMap::new();
    for (name, rule) in input.into_iter().flatten() {
        let path = format!("{field}.{name}");
        let key = if header_names {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                errors.push(FieldError::new(path, "not a valid header name"));
                continue;
            }
            name.to_ascii_lowercase()
        } else {
            name.clone()
        };
        let matcher = match rule {
            ValueMatchInput::Exact(value) => ValueMatchConfig::Exact(value.clone()),
            ValueMatchInput::Rule(ValueMatchRule {
                prefix: Some(prefix),
                present: None,
            }) => ValueMatchConfig::Prefix(prefix.clone()),
            ValueMatchInput::Rule(ValueMatchRule {
                prefix: None,
                present: Some(true),
            }) => ValueMatchConfig::Present,
            _ => {
                errors.push(FieldError::new(
                    path,
                    "a value (exact match), {\"prefix\": \"...\"} or {\"present\": true}",
                ));
                continue;
            }
        };
        if out.insert(key, matcher).is_some() {
            errors.push(FieldError::new(format!("{field}.{name}"), "listed twice"));
        }
    }
    out
}

/// Names of upstreams and routes: as function names (letters, digits, `-`, `_`, `.`).
pub fn validate_object_name(name: &str) -> Result<(), String> {
    crate::api::validate_function_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(json: serde_json::Value) -> Result<UpstreamConfig, Vec<String>> {
        let input: UpstreamInput = serde_json::from_value(json).expect("input shape");
        let mut errors = Vec::new();
        let config = input.resolve(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors.into_iter().map(|e| e.path).collect())
        }
    }

    #[test]
    fn a_route_shown_can_be_put_back_unchanged() {
        use serde_json::json;
        for input in [
            json!({"path": "/a", "function": "f"}),
            json!({"hosts": ["*.example.com"], "paths": ["/u/:id", "/v/*"], "methods": ["GET"],
                   "headers": {"x-a": "1", "x-b": {"prefix": "v"}, "x-c": {"present": true}},
                   "query": {"q": "1"}, "priority": -3, "upstream": "u",
                   "plugins": [{"name": "auth", "config": {"key": "k"}}, {"name": "log"}]}),
        ] {
            let parse = |value: serde_json::Value| {
                let input: RouteInput = serde_json::from_value(value).unwrap();
                let mut errors = Vec::new();
                let config = input.resolve(&mut errors);
                assert!(errors.is_empty(), "{errors:?}");
                config
            };
            let config = parse(input);
            assert_eq!(parse(config.to_input()), config);
        }
    }

    #[test]
    fn what_get_shows_can_be_put_back_unchanged() {
        use serde_json::json;
        let inputs = [
            json!({"nodes": [{"address": "127.0.0.1:8080"}]}),
            json!({"nodes": [{"address": "a.example:80", "weight": 3}, {"address": "127.0.0.1:81"}],
                   "balancer": "chash", "hash_on": {"cookie": "sid"},
                   "timeouts": {"connect": "2s", "read": "250ms"},
                   "retries": {"attempts": 2, "on": ["error", 429], "non_idempotent": true},
                   "keepalive": {"idle_timeout": "5s", "max_idle": 8}, "host": "node",
                   "health": {"active": {"type": "http", "path": "/healthz", "host": "h.example",
                                         "interval": "1s", "statuses": [200, "300-302"]},
                              "passive": {"unhealthy_threshold": 0}},
                   "breaker": {"failures": 3, "open": "1s",
                               "ratio": {"ratio": 0.25, "min_requests": 5, "window": "3s"}}}),
            json!({"nodes": [{"address": "127.0.0.1:8080"}], "balancer": "chash",
                   "hash_on": {"client_ip": true}, "host": "api.example",
                   "health": {"active": {"type": "tcp"}}}),
            json!({"nodes": [{"address": "127.0.0.1:8080"}], "balancer": "chash",
                   "hash_on": {"uri": true}}),
            json!({"nodes": [{"address": "127.0.0.1:8080"}], "balancer": "least_conn"}),
            json!({"nodes": [{"address": "127.0.0.1:8080"}], "balancer": "ewma"}),
        ];
        for input in inputs {
            let config = upstream(input.clone()).unwrap();
            let shown = config.to_input();
            let again = upstream(shown.clone()).unwrap_or_else(|e| panic!("{shown}: {e:?}"));
            assert_eq!(again, config, "{input} → {shown}");
        }
    }

    #[test]
    fn an_upstream_gets_defaults() {
        let config =
            upstream(serde_json::json!({"nodes": [{"address": "127.0.0.1:8080"}]})).unwrap();
        assert_eq!(
            config.nodes,
            [Node {
                address: "127.0.0.1:8080".into(),
                weight: 1
            }]
        );
        assert_eq!(config.balancer, BalancerKind::RoundRobin);
        assert_eq!(config.retries, 1);
        assert_eq!(config.retry_on_statuses, [502, 503, 504]);
        assert_eq!(config.pass_host, PassHost::Pass);
    }

    #[test]
    fn every_bad_upstream_field_is_reported_with_its_path() {
        let errors = upstream(serde_json::json!({
            "nodes": [{"address": "nope"}, {"address": "127.0.0.1:0"}, {"address": "a.b:80", "weight": 0},
                      {"address": "a.b:80"}],
            "balancer": "random",
            "hash_on": {"header": "x"},
            "timeouts": {"connect": "0ms", "read": "soon"},
            "retries": {"attempts": 99, "on": ["error", 404, "sometimes"]},
            "keepalive": {"max_idle": 1000000},
            "host": ""
        }))
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "nodes[0].address",
                "nodes[1].address",
                "nodes[2].weight",
                "nodes[3].address",
                "balancer",
                "hash_on",
                "timeouts.connect",
                "timeouts.read",
                "retries.attempts",
                "retries.on[1]",
                "retries.on[2]",
                "keepalive.max_idle",
                "host"
            ]
        );
        assert_eq!(upstream(serde_json::json!({})).unwrap_err(), ["nodes"]);
        assert_eq!(
            upstream(serde_json::json!({"nodes": [{"address": "a:1"}], "balancer": "chash"}))
                .unwrap_err(),
            ["hash_on"]
        );
    }

    #[test]
    fn health_and_breaker_settings_map_to_node_config() {
        let config = upstream(serde_json::json!({
            "nodes": [{"address": "127.0.0.1:8080"}],
            "health": {"active": {"type": "tcp", "interval": "500ms", "healthy_threshold": 4},
                       "passive": {"unhealthy_threshold": 0, "recovery": "3s"}},
            "breaker": {"failures": 7, "open": "10m", "successes": 2,
                        "ratio": {"ratio": 0.25, "window": "5s"}}
        }))
        .unwrap();
        let active = config.health.active.as_ref().unwrap();
        assert_eq!(active.kind, CheckKind::Tcp);
        assert_eq!((active.path.as_deref(), active.statuses.len()), (None, 0));
        assert_eq!(active.interval_ms, 500);
        let node = config.node_config();
        assert!(node.health.active_checks);
        assert_eq!(node.health.healthy_threshold, 4);
        assert_eq!(node.health.unhealthy_threshold, 3);
        assert_eq!(node.health.passive_unhealthy_threshold, 0);
        assert_eq!(node.health.passive_recovery, Duration::from_secs(3));
        assert_eq!(node.breaker.failure_threshold, 7);
        assert_eq!(node.breaker.open_for, Duration::from_secs(600));
        // Only `open` given, longer than the default cap: the cap follows.
        assert_eq!(node.breaker.max_open_for, Duration::from_secs(600));
        assert_eq!(node.breaker.success_threshold, 2);
        let ratio = node.breaker.failure_ratio.unwrap();
        assert_eq!((ratio.ratio, ratio.min_requests), (0.25, 20));
        assert_eq!(ratio.window, Duration::from_secs(5));

        let http = upstream(serde_json::json!({
            "nodes": [{"address": "127.0.0.1:8080"}],
            "health": {"active": {"path": "/ready?full=1", "statuses": [204, "300-302"]}}
        }))
        .unwrap();
        let active = http.health.active.unwrap();
        assert_eq!(active.path.as_deref(), Some("/ready?full=1"));
        assert!(active.expects(204) && active.expects(301));
        assert!(!active.expects(200) && !active.expects(303));
    }

    #[test]
    fn records_stored_before_health_settings_still_parse() {
        let old = serde_json::json!({
            "nodes": [{"address": "127.0.0.1:8080", "weight": 1}], "balancer": "round_robin",
            "connect_timeout_ms": 1000, "send_timeout_ms": 60000, "read_timeout_ms": 60000,
            "retries": 1, "retry_on": ["error", "timeout"], "retry_on_statuses": [502, 503, 504],
            "retry_non_idempotent": false, "keepalive_idle_timeout_ms": 60000,
            "keepalive_max_idle": 64, "pass_host": "pass"
        });
        let config: UpstreamConfig = serde_json::from_value(old).unwrap();
        assert_eq!(config.health, HealthSettings::default());
        assert_eq!(config.breaker, BreakerSettings::default());
        let node = config.node_config();
        assert!(!node.health.active_checks);
        assert_eq!(
            node.health,
            moontide_gateway::balance::HealthConfig::default()
        );
        assert_eq!(
            node.breaker,
            moontide_gateway::balance::BreakerConfig::default()
        );
        assert!(config.is_failure_status(500) && config.is_failure_status(502));
        assert!(!config.is_failure_status(404) && !config.is_failure_status(200));
    }

    #[test]
    fn routes_need_paths_and_one_target() {
        let resolve = |json| {
            let input: RouteInput = serde_json::from_value(json).unwrap();
            let mut errors = Vec::new();
            let config = input.resolve(&mut errors);
            (
                config,
                errors.into_iter().map(|e| e.path).collect::<Vec<_>>(),
            )
        };
        let (config, errors) = resolve(serde_json::json!({
            "path": "/a", "methods": ["get"], "headers": {"X-Env": "prod", "x-t": {"present": true}},
            "upstream": "api"
        }));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.methods, ["GET"]);
        assert_eq!(
            config.headers["x-env"],
            ValueMatchConfig::Exact("prod".into())
        );
        assert_eq!(config.headers["x-t"], ValueMatchConfig::Present);
        assert_eq!(config.target, RouteTarget::Upstream("api".into()));
        let (_, errors) = resolve(serde_json::json!({
            "methods": ["FETCH"], "headers": {"bad header": "x", "y": {"present": false}},
            "function": "f", "upstream": "u"
        }));
        assert_eq!(
            errors,
            [
                "paths",
                "methods[0]",
                "headers.bad header",
                "headers.y",
                "upstream"
            ]
        );
    }

    #[test]
    fn route_plugins_are_checked_with_their_paths() {
        let resolve = |json| {
            let input: RouteInput = serde_json::from_value(json).unwrap();
            let mut errors = Vec::new();
            let config = input.resolve(&mut errors);
            (
                config,
                errors.into_iter().map(|e| e.path).collect::<Vec<_>>(),
            )
        };
        let (config, errors) = resolve(serde_json::json!({
            "path": "/a", "upstream": "u",
            "plugins": [{"name": "auth", "config": {"key": 1}}, {"name": "log"}]
        }));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.plugins[0].name, "auth");
        assert_eq!(
            config.plugins[0].config,
            Some(serde_json::json!({"key": 1}))
        );
        assert_eq!(config.plugins[1].config, None);
        let (_, errors) = resolve(serde_json::json!({
            "path": "/a", "upstream": "u",
            "plugins": [{"name": "a/b"}, {"config": {}}, {"name": "x", "config": [1]},
                        {"name": "x"}]
        }));
        assert_eq!(
            errors,
            [
                "plugins[0].name",
                "plugins[1].name",
                "plugins[2].config",
                "plugins[3].name"
            ]
        );
    }
}
