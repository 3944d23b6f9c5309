//! The node's `/metrics` as Prometheus itself sees it: `promtool check metrics` finds no
//! lint problems in the exposition (the classic text format, served to clients that do not
//! ask for OpenMetrics), and a real Prometheus scraping the admin port (OpenMetrics) stores
//! the calls made and every per-function and node-wide series.

mod common;

use std::time::Duration;

use common::Node;
use common::prometheus::{JOB, Prometheus, has_series, promtool_check, single_value};
use serde_json::json;

const FUNCTION: &str = "scraped";

/// Data-plane calls made before the scrape.
const CALLS: u32 = 5;

/// Bound on waiting for Prometheus to have scraped (not a timing assertion).
const SCRAPE_LIMIT: Duration = Duration::from_secs(30);

/// Per-function series (`NAME{function="..."}`) Prometheus must have stored.
const EXPECTED_SERIES: &[&str] = &[
    "moontide_requests_total",
    "moontide_request_duration_seconds_bucket",
    "moontide_instances",
    "moontide_cold_starts_total",
    "moontide_cold_start_duration_seconds_bucket",
    "moontide_long_calls_total",
    "moontide_instances_desired",
    "moontide_instances_busy",
    "moontide_instances_idle",
    "moontide_queue_depth",
    "moontide_queue_wait_seconds_bucket",
    "moontide_scale_events_total",
    "moontide_shed_total",
];

/// Node-wide series (no `function` label).
const NODE_SERIES: &[&str] = &[
    "moontide_node_instances",
    "moontide_node_instance_budget",
    "moontide_node_instance_memory_bytes",
    "moontide_node_instance_memory_budget_bytes",
    "moontide_functions",
    "moontide_config_revision",
    "moontide_connections",
];

/// A node with one function called [`CALLS`] times over the data plane.
async fn called_node() -> Node {
    let node = Node::start();
    node.deploy(FUNCTION, "return function() return 'ok' end", json!({}))
        .await;
    for _ in 0..CALLS {
        let response = node.get(&format!("/fn/{FUNCTION}")).await;
        assert_eq!(response.status(), 200, "call {FUNCTION}");
    }
    node
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let node = called_node().await;
    let exposition = node.metrics().await;
    assert!(
        exposition.contains(&format!("moontide_requests_total{{function=\"{FUNCTION}\"")),
        "the exposition has the function's series:\n{exposition}"
    );
    let report = promtool_check(&exposition);
    let problems = report.problems();
    assert!(
        report.parsed() && problems.is_empty(),
        "promtool check metrics ({}): {problems:?}\nstdout:\n{}\nstderr:\n{}\n\
         exposition:\n{exposition}",
        report.status,
        report.stdout,
        report.stderr
    );
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_port() {
    let node = called_node().await;
    let target = node
        .admin
        .strip_prefix("http://")
        .expect("admin URL is http://host:port");
    // `/metrics` needs the admin token (unless `serve --metrics-public`): Prometheus
    // presents it from the node's token file.
    let token_file = node.data_dir.join("admin.token");
    let prometheus = Prometheus::start(&[target], "/metrics", Some(&token_file)).await;

    let requests = format!("moontide_requests_total{{function=\"{FUNCTION}\",trigger=\"http\"}}");
    prometheus
        .wait_for_query(
            &requests,
            |data| single_value(data) == Some(f64::from(CALLS)),
            SCRAPE_LIMIT,
        )
        .await;

    let up = prometheus.query(&format!("up{{job=\"{JOB}\"}}")).await;
    assert_eq!(
        single_value(&up),
        Some(1.0),
        "up: {up}\ntargets: {:?}",
        prometheus.target_health().await
    );

    let mut missing = Vec::new();
    for series in EXPECTED_SERIES {
        let data = prometheus
            .query(&format!("{series}{{function=\"{FUNCTION}\"}}"))
            .await;
        if !has_series(&data) {
            missing.push(*series);
        }
    }
    for series in NODE_SERIES {
        if !has_series(&prometheus.query(series).await) {
            missing.push(*series);
        }
    }
    assert!(
        missing.is_empty(),
        "Prometheus lacks {missing:?} for {FUNCTION}; the node serves:\n{}",
        node.metrics().await
    );
}
