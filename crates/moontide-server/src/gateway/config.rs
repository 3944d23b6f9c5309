//! Gateway objects as clients send them and as they are stored: upstreams (nodes, balancer,
//! timeouts, retries, keep-alive, Host handling) and routes (matchers and a target).
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl UpstreamConfig {
    /// The per-node settings (health, breaker) the balancer applies to every node.
    pub fn node_config(&self) -> moontide_gateway::balance::NodeConfig {
        moontide_gateway::balance::NodeConfig::default()
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
        config
    }
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
