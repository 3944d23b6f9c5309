//! The API gateway: routes, upstreams and plugins users configure at runtime, and the
//! proxy that serves them. `config` holds the wire and stored forms with their validation,
//! `admin` their admin API; the routing table and the balancing/health/breaker logic live
//! in the `moontide-gateway` crate (no I/O); `proxy` forwards requests over keep-alive
//! connections per worker thread through `client`, Moontide's own HTTP/1.1 client, with
//! the framing rules of `http1`; `plugins` runs a route's Lua plugins at their phases.
//!
//! What serves is a [`Gateway`] inside the registry's snapshot: a persistent router
//! (`moontide_gateway::router::Router`, O(1) to clone, O(log n) to change) and the
//! upstreams by name. A store change touches only the route or upstream it names: the
//! builder clones the current router, inserts or removes one route and publishes; an
//! upstream whose stored config did not change is kept as it is, with its node state.
//!
//! `health` runs the active health checks (background tasks on the admin runtime,
//! reconciled with each snapshot) and reports node transitions (logs, metrics).

pub mod admin;
pub mod client;
pub mod config;
pub mod health;
pub mod http1;
pub mod plugins;
pub mod proxy;

use std::sync::Arc;

use moontide_gateway::balance::{self, Algorithm, NodeSpec};
use moontide_gateway::router::{RouteSpec, Router, ValueMatch};

use crate::api::FieldError;
use config::{
    BalancerKind, RouteConfig, RoutePlugin, RouteTarget, UpstreamConfig, ValueMatchConfig,
};
use proxy::Upstream;

/// A route as the data plane keeps it.
pub struct Route {
    pub name: Arc<str>,
    pub target: RouteTarget,
    /// Plugins in run order, with the route's config for each.
    pub plugins: Vec<RoutePlugin>,
}

/// The gateway part of a snapshot: immutable; changed by cloning and editing.
#[derive(Clone, Default)]
pub struct Gateway {
    pub router: Router<Arc<Route>>,
    pub upstreams: imbl::HashMap<Arc<str>, Arc<Upstream>>,
    /// Where upstreams count their nodes' transitions.
    pub events: crate::metrics::UpstreamEvents,
}

/// Turns a stored route into the router's spec, reporting problems with the paths of the
/// admin API's fields.
pub fn compile_route(config: &RouteConfig) -> Result<RouteSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let methods = config
        .methods
        .iter()
        .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
        .collect();
    let matchers = |map: &std::collections::BTreeMap<String, ValueMatchConfig>| {
        map.iter()
            .map(|(name, rule)| {
                let rule = match rule {
                    ValueMatchConfig::Exact(v) => ValueMatch::Exact(v.clone()),
                    ValueMatchConfig::Prefix(v) => ValueMatch::Prefix(v.clone()),
                    ValueMatchConfig::Present => ValueMatch::Present,
                };
                (name.clone(), rule)
            })
            .collect::<Vec<_>>()
    };
    let spec = RouteSpec {
        hosts: config.hosts.clone(),
        paths: config.paths.clone(),
        methods,
        headers: matchers(&config.headers),
        query: matchers(&config.query),
        priority: config.priority,
    };
    if let Err(problems) = spec.validate() {
        let header_names: Vec<&String> = config.headers.keys().collect();
        let query_names: Vec<&String> = config.query.keys().collect();
        for problem in problems {
            // `headers[2].name` → `headers.<name>`: the admin API takes maps.
            let path = rename_indexed(&problem.path, "headers", &header_names)
                .or_else(|| rename_indexed(&problem.path, "query", &query_names))
                .unwrap_or(problem.path);
            errors.push(FieldError::new(path, problem.message));
        }
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(errors)
    }
}

fn rename_indexed(path: &str, field: &str, names: &[&String]) -> Option<String> {
    let rest = path.strip_prefix(field)?.strip_prefix('[')?;
    let (index, _) = rest.split_once(']')?;
    let name = names.get(index.parse::<usize>().ok()?)?;
    Some(format!("{field}.{name}"))
}

impl Gateway {
    /// Adds, replaces (`Some`) or removes (`None`) the route `name`. A stored route that
    /// no longer compiles is logged and left out.
    pub fn set_route(&mut self, name: &str, config: Option<RouteConfig>) {
        let Some(config) = config else {
            self.router.remove(name);
            return;
        };
        let spec = match compile_route(&config) {
            Ok(spec) => spec,
            Err(errors) => {
                tracing::error!(route = name, ?errors, "stored route is invalid; skipped");
                self.router.remove(name);
                return;
            }
        };
        let route = Arc::new(Route {
            name: Arc::from(name),
            target: config.target,
            plugins: config.plugins,
        });
        if let Err(errors) = self.router.insert(name, spec, route) {
            tracing::error!(route = name, ?errors, "stored route is invalid; skipped");
        }
    }

    /// Adds, replaces (`Some`) or removes (`None`) the upstream `name`. An unchanged config
    /// keeps the serving upstream (connections, balancer state); a changed one keeps the
    /// state of every node whose address stays.
    pub fn set_upstream(&mut self, name: &str, config: Option<UpstreamConfig>) {
        let Some(config) = config else {
            self.upstreams.remove(name);
            return;
        };
        let current = self.upstreams.get(name).cloned();
        if let Some(current) = &current
            && current.config == config
        {
            return;
        }
        let algorithm = match config.balancer {
            BalancerKind::RoundRobin => Algorithm::RoundRobin,
            BalancerKind::Chash => Algorithm::ConsistentHash,
            BalancerKind::LeastConn => Algorithm::LeastConnections,
            BalancerKind::Ewma => Algorithm::Ewma,
        };
        let nodes: Vec<NodeSpec> = config
            .nodes
            .iter()
            .map(|node| NodeSpec::new(node.address.clone(), node.weight))
            .collect();
        let node_config = config.node_config();
        let previous = current.as_ref().map(|u| &u.balancer);
        let balancer = match balance::Upstream::new(algorithm, &nodes, &node_config, previous) {
            Ok(balancer) => balancer,
            Err(error) => {
                tracing::error!(upstream = name, %error, "stored upstream is invalid; skipped");
                self.upstreams.remove(name);
                return;
            }
        };
        let attempts = balancer
            .nodes()
            .iter()
            .map(|node| self.events.attempt_counters(name, node.key()))
            .collect();
        let name: Arc<str> = Arc::from(name);
        let upstream = Upstream {
            name: name.clone(),
            config,
            balancer,
            events: self.events.clone(),
            attempts,
        };
        self.upstreams.insert(name, Arc::new(upstream));
    }
}
