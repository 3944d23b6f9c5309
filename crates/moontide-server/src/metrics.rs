//! Prometheus metrics (prometheus-client), served at `/metrics` on the admin port.
//!
//! The request path never looks a metric up by label: each deployed function gets its
//! handles ([`FunctionMetrics`]) when the snapshot is built, and the data plane only
//! increments atomics and observes histograms through them.
//!
//! Upstream nodes: their health and breaker gauges are set from the serving snapshot when
//! `/metrics` is scraped (`gateway::health::export`), and transitions are counted as they
//! happen ([`UpstreamEvents`], rare: a label lookup each). Series of nodes that are no
//! longer configured are removed at the next scrape.

use moontide_runtime::egress::{DenyReason, EgressObserver};
use moontide_runtime::plugin::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub function: String,
    /// `http` (data plane) or `invoke` (admin API / CLI).
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub function: String,
    /// `timeout`, `memory`, `blocking`, `runtime`, `result`, `init`, `setup`,
    /// `overloaded`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub function: String,
    /// `up` or `down`.
    pub direction: &'static str,
    /// up: `demand` (a call found no idle instance), `prewarm` (the autoscaler), `min`;
    /// down: `scale_down` (above desired), `idle` (the idle grace passed), `evicted` (the
    /// node budget), `broken` (a limit was hit), `retired` (a newer version serves),
    /// `rebalance` (released so that a call waiting on another thread may have one).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub function: String,
    /// `queue_full`, `queue_timeout` or `node_full`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `edge::conn_limits::Refusal::label`: `total` or `per_ip`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    pub function: String,
    /// `DenyReason::label`: `admin_listener`, `data_plane`, `metadata`, `unspecified`,
    /// `loopback`, `link_local`, `private`, `cgnat`, `multicast`, `broadcast`, `reserved`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub upstream: String,
    pub node: String,
    /// `ok`, `failed_status` (5xx or a status listed in `retries.on`), `error` (connect
    /// failed or the connection broke), `timeout`.
    pub outcome: &'static str,
}

/// The outcomes of one attempt on an upstream node, in [`AttemptCounters`] order.
pub const ATTEMPT_OUTCOMES: [&str; 4] = ["ok", "failed_status", "error", "timeout"];

/// One node's attempt counters, resolved when its upstream is built (the proxy then
/// only increments): indexed like [`ATTEMPT_OUTCOMES`].
pub type AttemptCounters = [Counter; 4];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub upstream: String,
    /// The node's address.
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthEventLabels {
    pub upstream: String,
    pub node: String,
    /// `healthy` or `unhealthy`.
    pub to: &'static str,
    /// `active` (checks), `passive` (live traffic) or `cooldown` (re-admitted after
    /// `health.passive.recovery`).
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerEventLabels {
    pub upstream: String,
    pub node: String,
    /// `open` or `closed`. (`half_open` is reserved: the balancer moves a breaker to
    /// half-open inside its admission and does not report it; the
    /// `upstream_node_breaker` gauge and the admin API's `status` show it.)
    pub to: &'static str,
}

/// Counters of upstream node transitions (cheap to clone: shared families).
#[derive(Clone, Default)]
pub struct UpstreamEvents {
    health: Family<HealthEventLabels, Counter>,
    breaker: Family<BreakerEventLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    /// Nodes with a counted transition (so that their series go with them).
    counted: std::sync::Arc<parking_lot::Mutex<std::collections::HashSet<NodeLabels>>>,
}

impl UpstreamEvents {
    /// Counts a health transition of `node` of `upstream`.
    pub fn health(&self, upstream: &str, node: &str, healthy: bool, cause: &'static str) {
        self.note(upstream, node);
        self.health
            .get_or_create(&HealthEventLabels {
                upstream: upstream.to_string(),
                node: node.to_string(),
                to: if healthy { "healthy" } else { "unhealthy" },
                cause,
            })
            .inc();
    }

    /// Counts a breaker transition of `node` of `upstream`.
    pub fn breaker(&self, upstream: &str, node: &str, to: &'static str) {
        self.note(upstream, node);
        self.breaker
            .get_or_create(&BreakerEventLabels {
                upstream: upstream.to_string(),
                node: node.to_string(),
                to,
            })
            .inc();
    }

    /// The attempt counters of `node` of `upstream`, to keep beside the node.
    pub fn attempt_counters(&self, upstream: &str, node: &str) -> AttemptCounters {
        self.note(upstream, node);
        ATTEMPT_OUTCOMES.map(|outcome| {
            self.attempts
                .get_or_create(&AttemptLabels {
                    upstream: upstream.to_string(),
                    node: node.to_string(),
                    outcome,
                })
                .clone()
        })
    }

    fn note(&self, upstream: &str, node: &str) {
        let labels = NodeLabels {
            upstream: upstream.to_string(),
            node: node.to_string(),
        };
        self.counted.lock().insert(labels);
    }

    fn forget(&self, labels: &NodeLabels) {
        for to in ["healthy", "unhealthy"] {
            for cause in ["active", "passive", "cooldown"] {
                self.health.remove(&HealthEventLabels {
                    upstream: labels.upstream.clone(),
                    node: labels.node.clone(),
                    to,
                    cause,
                });
            }
        }
        for outcome in ATTEMPT_OUTCOMES {
            self.attempts.remove(&AttemptLabels {
                upstream: labels.upstream.clone(),
                node: labels.node.clone(),
                outcome,
            });
        }
        for to in ["open", "half_open", "closed"] {
            self.breaker.remove(&BreakerEventLabels {
                upstream: labels.upstream.clone(),
                node: labels.node.clone(),
                to,
            });
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub plugin: String,
    /// `rewrite`, `access`, `header_filter`, `body_filter` or `log`.
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseErrorLabels {
    pub plugin: String,
    pub phase: &'static str,
    /// As `function_errors`' kinds.
    pub kind: &'static str,
}

/// Why an instance was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleUp {
    Demand,
    Prewarm,
    Min,
}

/// Why an instance was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDown {
    ScaleDown,
    Idle,
    Evicted,
    Broken,
    Retired,
    Rebalance,
}

/// Why a call was refused an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    QueueFull,
    QueueTimeout,
    NodeFull,
}

const SCALE_UP: [(ScaleUp, &str); 3] = [
    (ScaleUp::Demand, "demand"),
    (ScaleUp::Prewarm, "prewarm"),
    (ScaleUp::Min, "min"),
];
const SCALE_DOWN: [(ScaleDown, &str); 6] = [
    (ScaleDown::ScaleDown, "scale_down"),
    (ScaleDown::Idle, "idle"),
    (ScaleDown::Evicted, "evicted"),
    (ScaleDown::Broken, "broken"),
    (ScaleDown::Retired, "retired"),
    (ScaleDown::Rebalance, "rebalance"),
];
const SHED: [(Shed, &str); 3] = [
    (Shed::QueueFull, "queue_full"),
    (Shed::QueueTimeout, "queue_timeout"),
    (Shed::NodeFull, "node_full"),
];

fn latency_histogram() -> Histogram {
    // 50 µs … ~26 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 20,
    ))
}

fn cold_start_histogram() -> Histogram {
    // 10 µs … ~80 ms
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00001, 2.0, 14,
    ))
}

fn queue_wait_histogram() -> Histogram {
    // 10 µs … ~20 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00001, 2.0, 22,
    ))
}

/// Every metric family of the node.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    instances: Family<FunctionLabels, Gauge>,
    cold_starts: Family<FunctionLabels, Counter>,
    cold_start_seconds: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    long_calls: Family<FunctionLabels, Counter>,
    instances_desired: Family<FunctionLabels, Gauge>,
    instances_busy: Family<FunctionLabels, Gauge>,
    instances_idle: Family<FunctionLabels, Gauge>,
    queue_depth: Family<FunctionLabels, Gauge>,
    queue_wait: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    scale_events: Family<ScaleLabels, Counter>,
    shed: Family<ShedLabels, Counter>,
    node_healthy: Family<NodeLabels, Gauge>,
    node_breaker: Family<NodeLabels, Gauge>,
    upstream_events: UpstreamEvents,
    /// The upstream nodes whose series were last exported.
    exported_nodes: parking_lot::Mutex<std::collections::HashSet<NodeLabels>>,
    plugin_phase_calls: Family<PhaseLabels, Counter>,
    plugin_phase_errors: Family<PhaseErrorLabels, Counter>,
    crashes: Family<FunctionLabels, Counter>,
    quarantined: Family<FunctionLabels, Gauge>,
    node_restarts: Counter,
    unattributed_crashes: Counter,
    egress_denied: Family<EgressLabels, Counter>,
    /// Data-plane connections refused at accept, by cap (`edge::conn_limits`).
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Open data-plane connections (the count `edge::conn_limits` caps).
    pub connections: Gauge,
    pub config_revision: Gauge,
    pub functions: Gauge,
    pub node_instances: Gauge,
    pub node_instance_budget: Gauge,
    pub node_memory: Gauge,
    pub node_memory_budget: Gauge,
    /// Full reloads of the config after its watch history was compacted.
    pub config_reloads: Counter,
    /// The node registry's view (`moontide-cluster`): live nodes, and how many the
    /// cluster needs; and this node's own demand, in nodes.
    pub cluster_nodes: Gauge,
    pub cluster_desired_nodes: Gauge,
    pub node_demand: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("moontide");
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let instances = Family::<FunctionLabels, Gauge>::default();
        let cold_starts = Family::<FunctionLabels, Counter>::default();
        let cold_start_seconds =
            Family::new_with_constructor(cold_start_histogram as fn() -> Histogram);
        let long_calls = Family::<FunctionLabels, Counter>::default();
        let instances_desired = Family::<FunctionLabels, Gauge>::default();
        let instances_busy = Family::<FunctionLabels, Gauge>::default();
        let instances_idle = Family::<FunctionLabels, Gauge>::default();
        let queue_depth = Family::<FunctionLabels, Gauge>::default();
        let queue_wait = Family::new_with_constructor(queue_wait_histogram as fn() -> Histogram);
        let scale_events = Family::<ScaleLabels, Counter>::default();
        let shed = Family::<ShedLabels, Counter>::default();
        let node_healthy = Family::<NodeLabels, Gauge>::default();
        let node_breaker = Family::<NodeLabels, Gauge>::default();
        let upstream_events = UpstreamEvents::default();
        let plugin_phase_calls = Family::<PhaseLabels, Counter>::default();
        let plugin_phase_errors = Family::<PhaseErrorLabels, Counter>::default();
        let crashes = Family::<FunctionLabels, Counter>::default();
        let quarantined = Family::<FunctionLabels, Gauge>::default();
        let node_restarts = Counter::default();
        let unattributed_crashes = Counter::default();
        let egress_denied = Family::<EgressLabels, Counter>::default();
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        let connections = Gauge::default();
        let config_revision = Gauge::default();
        let functions = Gauge::default();
        let node_instances = Gauge::default();
        let node_instance_budget = Gauge::default();
        let node_memory = Gauge::default();
        let node_memory_budget = Gauge::default();
        let config_reloads = Counter::default();
        let cluster_nodes = Gauge::default();
        let cluster_desired_nodes = Gauge::default();
        let node_demand = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "cluster_nodes",
            "Live nodes in the node registry (this node alone on the embedded store)",
            cluster_nodes.clone(),
        );
        registry.register(
            "cluster_desired_nodes",
            "Nodes the cluster needs: the live nodes' demand over a 0.7 target utilization, rounded up (the HPA's external metric; KEDA reads the same from /v1/scaling)",
            cluster_desired_nodes.clone(),
        );
        registry.register(
            "node_demand",
            "This node's load in nodes: the largest of CPU use times backlog, desired instances over the instance budget, and memory over the memory budget",
            node_demand.clone(),
        );
        registry.register(
            "config_reloads",
            "Full reloads of the config because the store's history was compacted past the revision this node served",
            config_reloads.clone(),
        );
        registry.register(
            "requests",
            "Calls of a function, by trigger",
            requests.clone(),
        );
        registry.register(
            "function_errors",
            "Failed calls of a function, by error kind",
            errors.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response of a function call (queue wait, cold start and run)",
            duration.clone(),
        );
        registry.register(
            "instances",
            "Live Lua instances of a function (busy and idle)",
            instances.clone(),
        );
        registry.register(
            "cold_starts",
            "Instances created (state built and init code run)",
            cold_starts.clone(),
        );
        registry.register(
            "cold_start_duration_seconds",
            "Time to create an instance",
            cold_start_seconds.clone(),
        );
        registry.register(
            "long_calls",
            "Calls run on the long-call worker (the function once held a thread past a timeslice)",
            long_calls.clone(),
        );
        registry.register(
            "instances_desired",
            "Instances the autoscaler wants for a function (summed over worker threads)",
            instances_desired.clone(),
        );
        registry.register(
            "instances_busy",
            "Instances of a function serving a call (updated every autoscaler tick)",
            instances_busy.clone(),
        );
        registry.register(
            "instances_idle",
            "Warm instances of a function waiting for a call (updated every autoscaler tick)",
            instances_idle.clone(),
        );
        registry.register(
            "queue_depth",
            "Calls of a function waiting for an instance",
            queue_depth.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time calls that found no free instance waited for one (served or shed)",
            queue_wait.clone(),
        );
        registry.register(
            "scale_events",
            "Instances created (up) or dropped (down), by reason",
            scale_events.clone(),
        );
        registry.register(
            "shed",
            "Calls refused with 503 for want of an instance, by reason",
            shed.clone(),
        );
        registry.register(
            "plugin_phase_calls",
            "Calls of a plugin's phase functions",
            plugin_phase_calls.clone(),
        );
        registry.register(
            "plugin_phase_errors",
            "Failed calls of a plugin's phase functions, by phase and error kind",
            plugin_phase_errors.clone(),
        );
        registry.register(
            "egress_denied",
            "Outbound http calls of a function refused by the egress policy, by reason",
            egress_denied.clone(),
        );
        registry.register(
            "connections",
            "Open data-plane connections (serve --max-connections caps them)",
            connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Data-plane connections refused at accept, by cap (total: --max-connections, \
             per_ip: --max-connections-per-ip)",
            connections_refused.clone(),
        );
        registry.register(
            "node_instances",
            "Live Lua instances of all functions on the node",
            node_instances.clone(),
        );
        registry.register(
            "node_instance_budget",
            "Most Lua instances the node holds (serve --max-instances)",
            node_instance_budget.clone(),
        );
        registry.register(
            "node_instance_memory_bytes",
            "Lua memory of all live instances, as last measured",
            node_memory.clone(),
        );
        registry.register(
            "node_instance_memory_budget_bytes",
            "Most Lua memory the node's instances hold (serve --instance-memory)",
            node_memory_budget.clone(),
        );
        registry.register(
            "config_revision",
            "Store revision of the config snapshot serving traffic",
            config_revision.clone(),
        );
        registry.register("functions", "Functions deployed", functions.clone());
        registry.register(
            "function_crashes",
            "Times the node process died of a signal while this function's Lua ran (all \
             versions; from the crash ledger, so it survives the restarts)",
            crashes.clone(),
        );
        registry.register(
            "function_quarantined",
            "1 while the serving version of a function is quarantined for crashing the node",
            quarantined.clone(),
        );
        registry.register(
            "node_restarts",
            "Times the supervisor started the node process again after it died of a signal",
            node_restarts.clone(),
        );
        registry.register(
            "node_crashes_unattributed",
            "Node process deaths no function was blamed for (host code, or no signal handler ran)",
            unattributed_crashes.clone(),
        );
        registry.register(
            "upstream_node_healthy",
            "Whether an upstream node is healthy (1) or ejected by health checks (0)",
            node_healthy.clone(),
        );
        registry.register(
            "upstream_node_breaker",
            "An upstream node's circuit breaker: 0 closed, 1 open, 2 half-open",
            node_breaker.clone(),
        );
        registry.register(
            "upstream_health_transitions",
            "Upstream nodes marked healthy or unhealthy, by cause",
            upstream_events.health.clone(),
        );
        registry.register(
            "upstream_breaker_transitions",
            "Circuit-breaker state changes of upstream nodes",
            upstream_events.breaker.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Attempts to send a request to an upstream node (retries included), by outcome",
            upstream_events.attempts.clone(),
        );
        Metrics {
            node_healthy,
            node_breaker,
            upstream_events,
            exported_nodes: parking_lot::Mutex::default(),
            registry,
            requests,
            errors,
            duration,
            instances,
            cold_starts,
            cold_start_seconds,
            long_calls,
            instances_desired,
            instances_busy,
            instances_idle,
            queue_depth,
            queue_wait,
            scale_events,
            shed,
            plugin_phase_calls,
            plugin_phase_errors,
            crashes,
            quarantined,
            node_restarts,
            unattributed_crashes,
            egress_denied,
            connections_refused,
            connections,
            config_revision,
            functions,
            node_instances,
            node_instance_budget,
            node_memory,
            node_memory_budget,
            config_reloads,
            cluster_nodes,
            cluster_desired_nodes,
            node_demand,
        }
    }

    /// Counts what the crash ledger holds (once, when the node starts: the ledger changes
    /// only between node processes).
    pub fn load_crash_ledger(&self, ledger: &moontide_supervisor::ledger::Ledger) {
        for record in &ledger.versions {
            self.crashes
                .get_or_create(&FunctionLabels {
                    function: record.function.clone(),
                })
                .inc_by(u64::from(record.crashes));
        }
        self.node_restarts.inc_by(ledger.restarts);
        self.unattributed_crashes.inc_by(ledger.unattributed);
    }

    /// Sets whether `function`'s serving version is quarantined.
    pub fn set_quarantined(&self, function: &str, quarantined: bool) {
        self.quarantined
            .get_or_create(&FunctionLabels {
                function: function.to_string(),
            })
            .set(i64::from(quarantined));
    }

    /// The handles one function's calls use.
    pub fn function(&self, name: &str) -> FunctionMetrics {
        let labels = FunctionLabels {
            function: name.to_string(),
        };
        let request = |trigger| {
            self.requests.get_or_create_owned(&RequestLabels {
                function: name.to_string(),
                trigger,
            })
        };
        FunctionMetrics {
            name: name.to_string(),
            http_requests: request("http"),
            invoke_requests: request("invoke"),
            duration: self.duration.get_or_create_owned(&labels),
            instances: self.instances.get_or_create_owned(&labels),
            cold_starts: self.cold_starts.get_or_create_owned(&labels),
            cold_start_seconds: self.cold_start_seconds.get_or_create_owned(&labels),
            long_calls: self.long_calls.get_or_create_owned(&labels),
            instances_desired: self.instances_desired.get_or_create_owned(&labels),
            instances_busy: self.instances_busy.get_or_create_owned(&labels),
            instances_idle: self.instances_idle.get_or_create_owned(&labels),
            queue_depth: self.queue_depth.get_or_create_owned(&labels),
            queue_wait: self.queue_wait.get_or_create_owned(&labels),
            scale_up: SCALE_UP.map(|(_, reason)| {
                self.scale_events.get_or_create_owned(&ScaleLabels {
                    function: name.to_string(),
                    direction: "up",
                    reason,
                })
            }),
            scale_down: SCALE_DOWN.map(|(_, reason)| {
                self.scale_events.get_or_create_owned(&ScaleLabels {
                    function: name.to_string(),
                    direction: "down",
                    reason,
                })
            }),
            shed: SHED.map(|(_, reason)| {
                self.shed.get_or_create_owned(&ShedLabels {
                    function: name.to_string(),
                    reason,
                })
            }),
            errors: self.errors.clone(),
        }
    }

    /// Drops every series of a removed function.
    pub fn forget(&self, name: &str) {
        let labels = FunctionLabels {
            function: name.to_string(),
        };
        for trigger in ["http", "invoke"] {
            self.requests.remove(&RequestLabels {
                function: name.to_string(),
                trigger,
            });
        }
        self.duration.remove(&labels);
        self.instances.remove(&labels);
        self.cold_starts.remove(&labels);
        self.cold_start_seconds.remove(&labels);
        self.long_calls.remove(&labels);
        self.instances_desired.remove(&labels);
        self.instances_busy.remove(&labels);
        self.instances_idle.remove(&labels);
        self.queue_depth.remove(&labels);
        self.queue_wait.remove(&labels);
        for (_, reason) in SCALE_UP {
            self.scale_events.remove(&ScaleLabels {
                function: name.to_string(),
                direction: "up",
                reason,
            });
        }
        for (_, reason) in SCALE_DOWN {
            self.scale_events.remove(&ScaleLabels {
                function: name.to_string(),
                direction: "down",
                reason,
            });
        }
        for (_, reason) in SHED {
            self.shed.remove(&ShedLabels {
                function: name.to_string(),
                reason,
            });
        }
        for reason in DenyReason::ALL {
            self.egress_denied.remove(&EgressLabels {
                function: name.to_string(),
                reason: reason.label(),
            });
        }
    }

    /// Counts an outbound call of `function` the egress policy refused (rare: the label
    /// lookup is fine here).
    pub fn egress_denied(&self, function: &str, reason: DenyReason) {
        self.egress_denied
            .get_or_create(&EgressLabels {
                function: function.to_string(),
                reason: reason.label(),
            })
            .inc();
    }

    /// The counters of upstream node transitions.
    pub fn upstream_events(&self) -> UpstreamEvents {
        self.upstream_events.clone()
    }

    /// Sets the gauges of every configured upstream node — `(upstream, node, healthy,
    /// breaker code)` — and removes every series of nodes not listed.
    pub fn set_upstream_nodes(&self, nodes: impl Iterator<Item = (String, String, bool, i64)>) {
        let mut exported = self.exported_nodes.lock();
        let mut now = std::collections::HashSet::with_capacity(exported.len());
        for (upstream, node, healthy, breaker) in nodes {
            let labels = NodeLabels { upstream, node };
            self.node_healthy
                .get_or_create(&labels)
                .set(i64::from(healthy));
            self.node_breaker.get_or_create(&labels).set(breaker);
            now.insert(labels);
        }
        for gone in exported.difference(&now) {
            self.node_healthy.remove(gone);
            self.node_breaker.remove(gone);
        }
        self.upstream_events.counted.lock().retain(|labels| {
            let keep = now.contains(labels);
            if !keep {
                self.upstream_events.forget(labels);
            }
            keep
        });
        *exported = now;
    }

    /// The handles one plugin's phases use (its instances' pool metrics are
    /// [`Metrics::function`]'s, under `plugin:{name}`).
    pub fn plugin(&self, name: &str) -> PluginMetrics {
        PluginMetrics {
            name: name.to_string(),
            calls: Phase::ALL.map(|phase| {
                self.plugin_phase_calls.get_or_create_owned(&PhaseLabels {
                    plugin: name.to_string(),
                    phase: phase.name(),
                })
            }),
            errors: self.plugin_phase_errors.clone(),
        }
    }

    /// Drops the phase series of a removed plugin.
    pub fn forget_plugin(&self, name: &str) {
        for phase in Phase::ALL {
            self.plugin_phase_calls.remove(&PhaseLabels {
                plugin: name.to_string(),
                phase: phase.name(),
            });
            for kind in moontide_runtime::CallError::KINDS {
                self.plugin_phase_errors.remove(&PhaseErrorLabels {
                    plugin: name.to_string(),
                    phase: phase.name(),
                    kind,
                });
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Counts the runtime's egress denials (`moontide_egress_denied_total`).
pub struct EgressDenials(pub std::sync::Arc<Metrics>);

impl EgressObserver for EgressDenials {
    fn denied(&self, function: &str, reason: DenyReason) {
        self.0.egress_denied(function, reason);
    }
}

/// One function's metric handles (cheap clones of shared atomics).
#[derive(Clone)]
pub struct FunctionMetrics {
    name: String,
    pub http_requests: Counter,
    pub invoke_requests: Counter,
    pub duration: Histogram,
    pub instances: Gauge,
    pub cold_starts: Counter,
    pub cold_start_seconds: Histogram,
    pub long_calls: Counter,
    pub instances_desired: Gauge,
    pub instances_busy: Gauge,
    pub instances_idle: Gauge,
    pub queue_depth: Gauge,
    pub queue_wait: Histogram,
    scale_up: [Counter; 3],
    scale_down: [Counter; 6],
    shed: [Counter; 3],
    errors: Family<ErrorLabels, Counter>,
}

impl FunctionMetrics {
    pub fn scaled_up(&self, why: ScaleUp, by: u64) {
        let index = SCALE_UP.iter().position(|(w, _)| *w == why).unwrap_or(0);
        self.scale_up[index].inc_by(by);
    }

    pub fn scaled_down(&self, why: ScaleDown, by: u64) {
        let index = SCALE_DOWN.iter().position(|(w, _)| *w == why).unwrap_or(0);
        self.scale_down[index].inc_by(by);
    }

    /// Calls of this function shed so far, for every reason.
    pub fn shed_total(&self) -> u64 {
        self.shed.iter().map(Counter::get).sum()
    }

    pub fn shed(&self, why: Shed) {
        let index = SHED.iter().position(|(w, _)| *w == why).unwrap_or(0);
        self.shed[index].inc();
    }

    /// Counts a failed call (rare: the label lookup is fine here).
    pub fn error(&self, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                function: self.name.clone(),
                kind,
            })
            .inc();
    }
}

/// One plugin's phase metric handles.
#[derive(Clone)]
pub struct PluginMetrics {
    name: String,
    calls: [Counter; 5],
    errors: Family<PhaseErrorLabels, Counter>,
}

impl PluginMetrics {
    pub fn called(&self, phase: Phase) {
        let index = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.calls[index].inc();
    }

    /// Counts a failed phase call (rare: the label lookup is fine here).
    pub fn error(&self, phase: Phase, kind: &'static str) {
        self.errors
            .get_or_create(&PhaseErrorLabels {
                plugin: self.name.clone(),
                phase: phase.name(),
                kind,
            })
            .inc();
    }
}

/// Rewrites an OpenMetrics exposition (what prometheus-client writes) as the Prometheus
/// text format 0.0.4: a counter family `x` is announced as `x_total` (its samples' name),
/// and the `# UNIT` and `# EOF` lines go. Everything else — sample lines, label escaping,
/// histogram buckets — is the same in both formats for the metric types used here.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let announced = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match announced {
            Some(renamed) => text.push_str(&renamed),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let metrics = Metrics::new();
        metrics.function("f").http_requests.inc();
        let text = text_format(&metrics.encode());
        assert!(
            text.contains("# TYPE moontide_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP moontide_requests_total Calls of a function"));
        assert!(text.contains("moontide_requests_total{function=\"f\",trigger=\"http\"} 1\n"));
        assert!(text.contains("# TYPE moontide_instances gauge\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn exposition_has_function_series() {
        let metrics = Metrics::new();
        let f = metrics.function("greeting");
        f.http_requests.inc();
        f.duration.observe(0.001);
        f.error("timeout");
        let text = metrics.encode();
        assert!(
            text.contains(r#"moontide_requests_total{function="greeting",trigger="http"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"moontide_function_errors_total{function="greeting",kind="timeout"} 1"#
            )
        );
        assert!(text.contains("moontide_request_duration_seconds_bucket"));
        metrics.egress_denied("greeting", DenyReason::Metadata);
        assert!(
            metrics.encode().contains(
                r#"moontide_egress_denied_total{function="greeting",reason="metadata"} 1"#
            )
        );
        metrics.forget("greeting");
        let text = metrics.encode();
        assert!(!text.contains(r#"trigger="http"} 1"#));
        assert!(!text.contains(r#"reason="metadata""#));
    }
}
