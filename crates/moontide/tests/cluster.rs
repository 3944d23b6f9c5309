//! Cluster mode on etcd: several `moontide serve --store etcd://…` nodes (real processes on
//! free loopback ports) share one real etcd started by the harness (`common::etcd`).
//!
//! A write on any node is served by every node; an etcd outage leaves every node serving
//! its last snapshot with writes refused `503 store_unavailable`, and the nodes catch up
//! by themselves when etcd is back; a node whose watch falls behind a compaction (the
//! APISIX failure: paused, history compacted, resumed) reloads and serves the latest.
//!
//! No timings: every wait polls with a bounded number of tries. Built with the `etcd`
//! feature (the test suite runs with `--all-features`).
#![cfg(feature = "etcd")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::Node;
use common::etcd::Etcd;
use reqwest::Method;
use serde_json::json;

/// The admin token every node of the test clusters shares.
const TOKEN: &str = "cluster-test-token-0123456789";

/// Tries of a polled condition (a bound on waiting, not a timing assertion).
const TRIES: usize = 600;
const POLL: Duration = Duration::from_millis(50);

fn start_nodes(etcd: &Etcd, count: usize) -> Vec<Node> {
    let url = etcd.store_url();
    (0..count)
        .map(|_| Node::start_with_env(&["--store", &url], &[("MOONTIDE_ADMIN_TOKEN", TOKEN)]))
        .collect()
}

fn source(answer: &str) -> String {
    format!("return function(event, ctx) return {{statusCode = 200, body = \"{answer}\"}} end")
}

/// `(status, body)` of `GET /fn/{name}` on `node`.
async fn call(node: &Node, name: &str) -> (u16, String) {
    let response = node.get(&format!("/fn/{name}")).await;
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Polls until `node` answers `GET /fn/{name}` with `expected` (`(200, body)` or a bare
/// status with any body when `body` is `None`).
async fn wait_serves(node: &Node, name: &str, status: u16, body: Option<&str>) {
    let mut last = (0, String::new());
    for _ in 0..TRIES {
        last = call(node, name).await;
        if last.0 == status && body.is_none_or(|b| last.1 == b) {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!(
        "node {} never answered /fn/{name} with {status} {body:?}; last: {last:?}",
        node.admin
    );
}

async fn deploy(node: &Node, name: &str, answer: &str) -> u16 {
    let (status, _) = node
        .admin_json(
            Method::PUT,
            &format!("/v1/functions/{name}"),
            Some(json!({"source": source(answer), "config": {}})),
        )
        .await;
    status
}

/// Deploys, again while the node answers 503 (its etcd connection is coming back).
async fn deploy_eventually(node: &Node, name: &str, answer: &str) -> u16 {
    let mut status = 0;
    for _ in 0..TRIES {
        status = deploy(node, name, answer).await;
        if status != 503 {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    status
}

/// The node process the supervisor runs for `node` (`node.child` is the supervisor).
fn node_pid(node: &Node) -> String {
    let output = Command::new("pgrep")
        .args(["-P", &node.child.id().to_string()])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&output.stdout);
    let mut pids = pids.split_whitespace();
    let pid = pids.next().expect("the supervisor runs a node").to_string();
    assert!(pids.next().is_none(), "one node process per supervisor");
    pid
}

fn signal(pid: &str, signal: &str) {
    let status = Command::new("kill")
        .args([signal, pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Sends SIGCONT when dropped, so a failing test never leaves a stopped process behind.
struct Paused(String);

impl Paused {
    fn stop(pid: String) -> Paused {
        signal(&pid, "-STOP");
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal(&self.0, "-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_any_node_is_served_by_every_node() {
    let etcd = Etcd::start();
    let nodes = start_nodes(&etcd, 3);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    for node in &nodes {
        assert_eq!(node.token, TOKEN, "every node uses MOONTIDE_ADMIN_TOKEN");
    }

    assert_eq!(deploy(a, "hello", "one").await, 201);
    // Acknowledged by A: A serves it now; B and C follow through their watches.
    assert_eq!(call(a, "hello").await, (200, "one".to_string()));
    wait_serves(b, "hello", 200, Some("one")).await;
    wait_serves(c, "hello", 200, Some("one")).await;

    assert_eq!(deploy(b, "hello", "two").await, 201);
    for node in &nodes {
        wait_serves(node, "hello", 200, Some("two")).await;
    }

    let (status, body) = c
        .admin_json(Method::POST, "/v1/functions/hello/rollback", None)
        .await;
    assert_eq!(status, 200, "rollback on C: {body}");
    for node in &nodes {
        wait_serves(node, "hello", 200, Some("one")).await;
    }

    // Every node lists the same versions: one store.
    let (_, versions) = a
        .admin_json(Method::GET, "/v1/functions/hello/versions", None)
        .await;
    let (_, versions_c) = c
        .admin_json(Method::GET, "/v1/functions/hello/versions", None)
        .await;
    assert_eq!(versions, versions_c);
    assert!(
        etcd.etcdctl(&["get", "--prefix", "--keys-only", "/moontide/f/head/"])
            .contains("/moontide/f/head/hello"),
        "keys live under /moontide/ in etcd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_keep_serving_while_etcd_is_down_and_catch_up_when_it_returns() {
    let mut etcd = Etcd::start();
    let nodes = start_nodes(&etcd, 2);
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(deploy(a, "hello", "one").await, 201);
    wait_serves(b, "hello", 200, Some("one")).await;

    etcd.stop();
    for node in &nodes {
        assert_eq!(call(node, "hello").await, (200, "one".to_string()));
        let ready = node.get("/readyz").await.status();
        assert_eq!(
            ready, 200,
            "the data plane stays ready on its last snapshot"
        );
    }
    let (status, body) = b
        .admin_json(
            Method::PUT,
            "/v1/functions/hello",
            Some(json!({"source": source("two"), "config": {}})),
        )
        .await;
    assert_eq!(status, 503, "a write without etcd: {body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    let (status, body) = a.admin_json(Method::GET, "/v1/functions/hello", None).await;
    assert_eq!(status, 503, "a read of the store without etcd: {body}");
    // Still serving after the failed writes.
    assert_eq!(call(b, "hello").await, (200, "one".to_string()));

    etcd.restart();
    assert_eq!(
        deploy_eventually(a, "hello", "two").await,
        201,
        "writes work again once etcd is back"
    );
    for node in &nodes {
        wait_serves(node, "hello", 200, Some("two")).await;
    }
}

fn reloads(metrics: &str) -> f64 {
    common::metric_value(metrics, "moontide_config_reloads_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_that_falls_behind_a_compaction_reloads_and_serves_the_latest() {
    let mut etcd = Etcd::start();
    let nodes = start_nodes(&etcd, 2);
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(deploy(a, "kept", "one").await, 201);
    assert_eq!(deploy(a, "doomed", "here").await, 201);
    wait_serves(b, "kept", 200, Some("one")).await;
    wait_serves(b, "doomed", 200, Some("here")).await;

    // Paused while changes are written and compacted: etcd had already pushed them into
    // B's connection, so B applies them when it resumes.
    let paused = Paused::stop(node_pid(b));
    assert_eq!(deploy(a, "kept", "two").await, 201);
    etcd.compact();
    drop(paused);
    wait_serves(b, "kept", 200, Some("two")).await;
    assert_eq!(reloads(&b.metrics().await), 0.0, "nothing was missed");

    // Now B's connection dies while B cannot notice (etcd restarts before anything is
    // written, so nothing waits for B in its socket); the changes are written and their
    // history compacted. When B resumes, its watch must restart from a revision that is
    // gone: what APISIX nodes lost config on (apache/apisix #8682, #12167, #11390).
    let paused = Paused::stop(node_pid(b));
    etcd.restart();
    assert_eq!(deploy_eventually(a, "kept", "three").await, 201);
    let (status, body) = a
        .admin_json(Method::DELETE, "/v1/functions/doomed", None)
        .await;
    assert!(status == 200 || status == 204, "delete: {status} {body}");
    assert_eq!(deploy(a, "new", "fresh").await, 201);
    etcd.compact();
    drop(paused);

    wait_serves(b, "kept", 200, Some("three")).await;
    wait_serves(b, "new", 200, Some("fresh")).await;
    wait_serves(b, "doomed", 404, None).await;
    assert_eq!(
        reloads(&b.metrics().await),
        1.0,
        "B reloaded the keyspace once, because its history was compacted"
    );
    // And it follows the watch again afterwards.
    assert_eq!(deploy(a, "kept", "four").await, 201);
    wait_serves(b, "kept", 200, Some("four")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_an_etcd_whose_revisions_went_back() {
    let mut etcd = Etcd::start();
    let nodes = start_nodes(&etcd, 2);
    let (a, b) = (&nodes[0], &nodes[1]);
    for answer in ["one", "two", "three", "four"] {
        assert_eq!(deploy(a, "hello", answer).await, 201);
    }
    wait_serves(b, "hello", 200, Some("four")).await;

    // A new, empty etcd on the same address: its revisions start below what B applied,
    // so a watch resumed from B's revision would wait for revisions that never come.
    etcd.wipe_and_restart();
    assert_eq!(deploy_eventually(a, "fresh", "new").await, 201);
    wait_serves(b, "fresh", 200, Some("new")).await;
    wait_serves(b, "hello", 404, None).await;
    wait_serves(a, "hello", 404, None).await;
}

#[test]
fn a_malformed_store_url_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (url, expected) in [
        ("etcd://127.0.0.1", "no :PORT"),
        ("etcd://127.0.0.1:notaport", "no valid port"),
        ("redis://127.0.0.1:6379", "expected etcd://HOST:PORT"),
    ] {
        let mut child = Command::new(common::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--store", url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn moontide serve");
        let mut status = None;
        for _ in 0..TRIES {
            status = child.try_wait().expect("wait");
            if status.is_some() {
                break;
            }
            std::thread::sleep(POLL);
        }
        let Some(status) = status else {
            let _ = child.kill();
            panic!("serve --store {url} did not refuse to start");
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{url}");
        assert!(stderr.contains(expected), "{url}: {stderr}");
    }
}

/// `count` nodes named `node-i`, with a registry lease of `ttl`.
fn start_named_nodes(etcd: &Etcd, count: usize, ttl: &str) -> Vec<Node> {
    let url = etcd.store_url();
    (0..count)
        .map(|i| {
            let name = format!("node-{i}");
            let args = ["--store", &url, "--node-name", &name, "--node-ttl", ttl];
            Node::start_with_env(&args, &[("MOONTIDE_ADMIN_TOKEN", TOKEN)])
        })
        .collect()
}

/// Polls `GET /v1/nodes` on `node` until `check` holds for the listed records.
async fn wait_nodes(
    node: &Node,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..TRIES {
        let (status, body) = node.admin_json(Method::GET, "/v1/nodes", None).await;
        if status == 200 && body["nodes"].as_array().is_some_and(|nodes| check(nodes)) {
            return body;
        }
        last = body;
        tokio::time::sleep(POLL).await;
    }
    panic!(
        "GET /v1/nodes on {} never matched; last: {last}",
        node.admin
    );
}

fn names(nodes: &[serde_json::Value]) -> Vec<&str> {
    nodes.iter().filter_map(|n| n["name"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_registers_and_a_killed_node_leaves_when_its_lease_expires() {
    let etcd = Etcd::start();
    // A short lease: a killed node leaves within seconds.
    let nodes = start_named_nodes(&etcd, 3, "2s");
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (status, body) = a
        .admin_json(
            Method::PUT,
            "/v1/functions/hello",
            Some(json!({"source": source("one"), "config": {}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let revision = body["revision"].as_u64().unwrap();
    // Every node lists all three, each serving the write, from any node.
    for node in &nodes {
        let listed = wait_nodes(node, |nodes| {
            names(nodes) == ["node-0", "node-1", "node-2"]
                && nodes
                    .iter()
                    .all(|n| n["state"] == "ready" && n["revision"].as_u64() >= Some(revision))
        })
        .await;
        let me = listed["this_node"].as_str().unwrap();
        let record = listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == me)
            .unwrap();
        assert_eq!(record["admin"], node.admin.trim_start_matches("http://"));
    }
    let table = b.cli_ok(&["nodes"]);
    for name in ["node-0", "node-1 *", "node-2"] {
        assert!(table.contains(name), "moontide nodes lists {name}: {table}");
    }
    assert!(
        etcd.etcdctl(&["get", "--prefix", "--keys-only", "/moontide-nodes/"])
            .contains("/moontide-nodes/node-2"),
        "records live under /moontide-nodes/, beside the config"
    );

    // kill -9 the whole of C (supervisor and node): nothing deregisters it, its lease
    // runs out.
    signal(&c.child.id().to_string(), "-KILL");
    let after = wait_nodes(a, |nodes| names(nodes) == ["node-0", "node-1"]).await;
    assert_eq!(after["nodes"].as_array().unwrap().len(), 2);
    let scaling = a.admin_json(Method::GET, "/v1/scaling", None).await.1;
    assert_eq!(scaling["live_nodes"], 2, "{scaling}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_cluster_answers_once_every_node_serves_the_write_or_names_the_laggard() {
    let etcd = Etcd::start();
    // A lease longer than the test: the paused node stays listed, lagging.
    let nodes = start_named_nodes(&etcd, 3, "60s");
    let (a, c) = (&nodes[0], &nodes[2]);
    wait_nodes(a, |nodes| {
        nodes.len() == 3 && nodes.iter().all(|n| n["state"] == "ready")
    })
    .await;

    let put = |answer: &str, query: &str| {
        let path = format!("/v1/functions/hello?{query}");
        let body = json!({"source": source(answer), "config": {}});
        async move { a.admin_json(Method::PUT, &path, Some(body)).await }
    };
    let (status, body) = put("one", "wait=cluster").await;
    assert_eq!(status, 201, "{body}");
    let cluster = &body["cluster"];
    assert_eq!(cluster["complete"], true, "{body}");
    assert_eq!(cluster["revision"], body["revision"]);
    assert_eq!(
        cluster["served_by"],
        json!(["node-0", "node-1", "node-2"]),
        "{body}"
    );
    // Every node serves it the moment the answer says so.
    for node in &nodes {
        assert_eq!(call(node, "hello").await, (200, "one".to_string()));
    }

    // C cannot apply anything while stopped: the wait runs out and names it.
    let paused = Paused::stop(node_pid(c));
    let (status, body) = put("two", "wait=cluster&wait_timeout=1s").await;
    assert_eq!(status, 201, "the write stands: {body}");
    let cluster = &body["cluster"];
    assert_eq!(cluster["complete"], false, "{body}");
    assert_eq!(cluster["served_by"], json!(["node-0", "node-1"]), "{body}");
    assert_eq!(cluster["lagging"][0]["name"], "node-2", "{body}");
    assert!(
        cluster["lagging"][0]["revision"].as_u64() < body["revision"].as_u64(),
        "{body}"
    );
    // The CLI's deploy says so too, and fails.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hello.lua");
    std::fs::write(&file, source("cli")).unwrap();
    let output = a.cli(&["deploy", "hello", file.to_str().unwrap(), "--wait-cluster"]);
    assert!(
        !output.status.success(),
        "a deploy not served everywhere fails"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is stored, but not yet served by node-2"),
        "{stderr}"
    );
    drop(paused);
    let out = a.cli_ok(&["deploy", "hello", file.to_str().unwrap(), "--wait-cluster"]);
    assert!(out.contains("served by every live node (3)"), "{out}");
    let (status, body) = put("three", "wait=cluster").await;
    assert_eq!(status, 201);
    assert_eq!(body["cluster"]["complete"], true, "C caught up: {body}");
    assert_eq!(call(c, "hello").await, (200, "three".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_told_to_stop_drains_then_leaves_the_registry_at_once() {
    let etcd = Etcd::start();
    // A long lease: leaving must not wait for it to expire.
    let url = etcd.store_url();
    let start = |name: &str, drain: &str| {
        Node::start_with_env(
            &[
                "--store",
                &url,
                "--node-name",
                name,
                "--node-ttl",
                "60s",
                "--drain-delay",
                drain,
            ],
            &[("MOONTIDE_ADMIN_TOKEN", TOKEN)],
        )
    };
    // The store can come from a config file too (a Kubernetes ConfigMap).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("moontide.yaml");
    std::fs::write(&config, format!("store: {url}\nnode-name: stays\n")).unwrap();
    let a = Node::start_with_env(
        &["--config", config.to_str().unwrap()],
        &[("MOONTIDE_ADMIN_TOKEN", TOKEN)],
    );
    let mut b = start("leaves", "3s");
    wait_nodes(&a, |nodes| nodes.len() == 2).await;
    b.sigterm();
    wait_nodes(&a, |nodes| {
        nodes
            .iter()
            .any(|n| n["name"] == "leaves" && n["state"] == "draining")
    })
    .await;
    wait_nodes(&a, |nodes| names(nodes) == ["stays"]).await;
    let exited = b.wait_for_exit().await;
    assert!(exited.success(), "{exited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaling_signal_on_any_node_follows_the_load_on_another() {
    let etcd = Etcd::start();
    let url = etcd.store_url();
    // Small instance budgets, so a few slow calls are more than a node.
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            let name = format!("node-{i}");
            Node::start_with_env(
                &[
                    "--store",
                    &url,
                    "--node-name",
                    &name,
                    "--max-instances",
                    "4",
                ],
                &[("MOONTIDE_ADMIN_TOKEN", TOKEN)],
            )
        })
        .collect();
    let (a, b) = (&nodes[0], &nodes[1]);
    wait_nodes(b, |nodes| nodes.len() == 2).await;
    let idle = scaling(b).await;
    assert_eq!(idle["desired_nodes"], 1, "{idle}");
    assert_eq!(idle["live_nodes"], 2, "{idle}");
    // Calls pile up on A only; B's answer must say the cluster needs more nodes.
    let raised = common::pile_up_until_scaling_rises(a, b).await;
    let raised = raised.expect("B's signal never followed the load on A");
    let listed = b.admin_json(Method::GET, "/v1/nodes", None).await.1;
    let demand_of = |name: &str| {
        listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["load"]["demand"].as_f64().unwrap())
            .unwrap()
    };
    assert!(raised["demand"].as_f64().unwrap() > 0.7, "{raised}");
    assert!(demand_of("node-1") < 0.7, "the load was on A: {listed}");
    // The load gone, every node's answer settles back to one node.
    for node in &nodes {
        let mut settled = serde_json::Value::Null;
        for _ in 0..TRIES {
            settled = scaling(node).await;
            if settled["desired_nodes"] == 1 {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        assert_eq!(settled["desired_nodes"], 1, "{settled}");
    }
}

/// `GET /v1/scaling` on `node`.
async fn scaling(node: &Node) -> serde_json::Value {
    node.admin_json(Method::GET, "/v1/scaling", None).await.1
}
