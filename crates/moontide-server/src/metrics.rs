//! Prometheus metrics (prometheus-client), served at `/metrics` on the admin port.
//!
//! The request path never looks a metric up by label: each deployed function gets its
//! handles ([`FunctionMetrics`]) when the snapshot is built, and the data plane only
//! increments atomics and observes histograms through them.

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
    pub config_revision: Gauge,
    pub functions: Gauge,
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
        let config_revision = Gauge::default();
        let functions = Gauge::default();
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
            "config_revision",
            "Store revision of the config snapshot serving traffic",
            config_revision.clone(),
        );
        registry.register("functions", "Functions deployed", functions.clone());
        Metrics {
            registry,
            requests,
            errors,
            duration,
            instances,
            cold_starts,
            cold_start_seconds,
            long_calls,
            config_revision,
            functions,
        }
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
    errors: Family<ErrorLabels, Counter>,
}

impl FunctionMetrics {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        metrics.forget("greeting");
        assert!(!metrics.encode().contains(r#"trigger="http"} 1"#));
    }
}
