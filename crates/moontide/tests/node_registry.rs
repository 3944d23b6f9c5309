//! The node registry and the node-count signal on one node (the embedded store: the node
//! is its whole cluster). Real `moontide serve` processes on free loopback ports.
//!
//! - `GET /v1/nodes` and `moontide nodes` list the node with its addresses, the revision
//!   it serves and its state;
//! - `GET /v1/scaling` (KEDA's `metrics-api`) and `moontide_cluster_desired_nodes` rise
//!   while calls pile up on the node and fall back when they stop;
//! - SIGTERM with `--drain-delay`: `/readyz` answers 503 while calls are still served,
//!   then the node exits;
//! - every admin write answers `X-Moontide-Revision`, and `?wait=…` is validated.
//!
//! No timings: every wait polls with a bounded number of tries.

mod common;

use std::time::Duration;

use common::Node;
use reqwest::Method;
use serde_json::{Value, json};

const TRIES: usize = 600;
const POLL: Duration = Duration::from_millis(50);

/// Polls `GET path` on the admin API until `check` holds; returns that body.
async fn wait_admin(node: &Node, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..TRIES {
        let (status, body) = node.admin_json(Method::GET, path, None).await;
        if status == 200 && check(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(POLL).await;
    }
    panic!("GET {path} never matched; last: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lists_itself_with_the_revision_it_serves() {
    let node = Node::start_with(&["--node-name", "solo-1"]);
    let (status, body) = node
        .admin_json(
            Method::PUT,
            "/v1/functions/hello",
            Some(json!({"source": "return function() return 'hi' end", "config": {}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let revision = body["revision"].as_u64().unwrap();
    let nodes = wait_admin(&node, "/v1/nodes", |body| {
        body["nodes"][0]["revision"].as_u64() >= Some(revision)
    })
    .await;
    let listed = nodes["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{nodes}");
    let me = &listed[0];
    assert_eq!(me["name"], "solo-1");
    assert_eq!(nodes["this_node"], "solo-1");
    assert_eq!(me["state"], "ready");
    assert_eq!(me["data_plane"], node.data.trim_start_matches("http://"));
    assert_eq!(me["admin"], node.admin.trim_start_matches("http://"));
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert!(me["load"]["instance_budget"].as_u64().unwrap() > 0, "{me}");

    let table = node.cli_ok(&["nodes"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{table}");
    let row = lines.next().expect("one row");
    assert!(
        row.starts_with("solo-1 *"),
        "the answering node is marked: {table}"
    );
    assert!(row.contains(" ready "), "{table}");
    let json_out: Value =
        serde_json::from_str(&node.cli_ok(&["nodes", "--output", "json"])).unwrap();
    assert_eq!(json_out["nodes"][0]["name"], "solo-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_carry_their_revision_and_wait_parameters_are_checked() {
    let node = Node::start();
    let put = |path: &'static str| {
        node.admin_request(Method::PUT, path)
            .json(&json!({"source": "return function() return 'hi' end", "config": {}}))
    };
    let response = put("/v1/functions/one").send().await.unwrap();
    assert_eq!(response.status(), 201);
    let header: u64 = response.headers()["x-moontide-revision"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["revision"].as_u64(), Some(header));

    // One node is the whole cluster: waiting for it is immediate and complete.
    let response = put("/v1/functions/two?wait=cluster").send().await.unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["cluster"]["complete"], true, "{body}");
    assert_eq!(body["cluster"]["revision"], body["revision"]);
    assert_eq!(body["cluster"]["served_by"].as_array().unwrap().len(), 1);

    // A delete asked to wait answers 200 with what it found instead of 204.
    let response = node
        .admin_request(Method::DELETE, "/v1/functions/two?wait=cluster")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["cluster"]["complete"], true, "{body}");
    let plain = node
        .admin_request(Method::DELETE, "/v1/functions/one")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 204);
    assert!(plain.headers().contains_key("x-moontide-revision"));

    for (query, field) in [
        ("wait=everyone", "wait"),
        ("wait=cluster&wait_timeout=5", "wait_timeout"),
        ("wait=cluster&wait_timeout=2h", "wait_timeout"),
    ] {
        let response = node
            .admin_request(Method::PUT, &format!("/v1/functions/three?{query}"))
            .json(&json!({"source": "return function() end", "config": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["details"]["path"], field, "{query}: {body}");
    }
    let (status, _) = node
        .admin_json(Method::GET, "/v1/functions/three", None)
        .await;
    assert_eq!(status, 404, "a refused write wrote nothing");
    let (status, body) = node
        .admin_json(Method::GET, "/v1/scaling?target_utilization=2", None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["details"]["path"], "target_utilization");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaling_signal_follows_the_load_on_the_node() {
    // A small instance budget, so a few slow calls are more than one node.
    let node = Node::start_with(&["--max-instances", "4"]);
    let idle = wait_admin(&node, "/v1/scaling", |body| body["live_nodes"] == 1).await;
    assert_eq!(idle["desired_nodes"], 1, "{idle}");
    assert_eq!(idle["target_utilization"], 0.7);
    // Keep calls in flight until the signal asks for more nodes.
    let raised = common::pile_up_until_scaling_rises(&node, &node).await;
    let raised = raised.expect("the signal never asked for a second node under load");
    assert!(raised["demand"].as_f64().unwrap() > 0.7, "{raised}");
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("moontide_cluster_desired_nodes"),
        "the gauge is exported"
    );

    // Idle again: back to one node.
    let settled = wait_admin(&node, "/v1/scaling", |body| body["desired_nodes"] == 1).await;
    assert!(settled["demand"].as_f64().unwrap() <= 0.7, "{settled}");
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "moontide_cluster_desired_nodes"),
        1.0
    );
    assert_eq!(
        common::metric_value(&metrics, "moontide_cluster_nodes"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_the_node_unready_while_it_still_serves_then_it_exits() {
    let mut node = Node::start_with(&["--drain-delay", "4s"]);
    node.deploy("hello", "return function() return 'hi' end", json!({}))
        .await;
    assert_eq!(node.get("/readyz").await.status(), 200);
    node.sigterm();
    let mut drained = false;
    for _ in 0..TRIES {
        if node.get("/readyz").await.status() == 503 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(drained, "/readyz never answered 503 after SIGTERM");
    // Draining: not ready, but serving.
    let response = node.get("/fn/hello").await;
    assert_eq!(response.status(), 200);
    wait_admin(&node, "/v1/nodes", |nodes| {
        nodes["nodes"][0]["state"] == "draining"
    })
    .await;
    let admin_ready = node
        .http
        .get(format!("{}/readyz", node.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_ready.status(), 503, "the admin port's probe agrees");

    let status = node.wait_for_exit().await;
    assert!(status.success(), "a drained node exits cleanly: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_its_flags_from_a_config_file_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("moontide.yaml");
    std::fs::write(
        &config,
        "node-name: from-file\nmax-instances: 7\nmetrics-public: true\nnode-ttl: 30s\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let node = Node::start_with(&["--config", config]);
    let nodes = wait_admin(&node, "/v1/nodes", |body| body["nodes"][0].is_object()).await;
    assert_eq!(nodes["nodes"][0]["name"], "from-file", "{nodes}");
    assert_eq!(nodes["nodes"][0]["load"]["instance_budget"], 7, "{nodes}");
    let open = node
        .http
        .get(format!("{}/metrics", node.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200, "metrics-public: true took effect");

    let node = Node::start_with(&["--config", config, "--node-name", "from-flag"]);
    let nodes = wait_admin(&node, "/v1/nodes", |body| body["nodes"][0].is_object()).await;
    assert_eq!(nodes["nodes"][0]["name"], "from-flag", "{nodes}");
    assert_eq!(nodes["nodes"][0]["load"]["instance_budget"], 7, "{nodes}");

    // A key that is no flag, and a value the flag refuses: the node does not start, and
    // says which.
    for (yaml, expected) in [
        ("stor: etcd://127.0.0.1:1\n", "unknown key `stor`"),
        ("node-ttl: 10\n", "needs a unit"),
    ] {
        std::fs::write(dir.path().join("bad.yaml"), yaml).unwrap();
        let output = std::process::Command::new(common::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(dir.path().join("bad.yaml"))
            .output()
            .unwrap();
        assert!(!output.status.success(), "{yaml}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{yaml}: {stderr}");
    }
}
