//! Scheduled functions on a cluster: three `moontide serve --store etcd://…` nodes (real
//! processes) on one real etcd started by the harness. Every node runs the scheduler;
//! each due time must run on exactly one of them, and a run whose node is killed midway
//! is taken over by another node as attempt 2.
//!
//! No timings: every wait polls with a bounded number of tries; assertions compare
//! counts. Built with the `etcd` feature (the test suite runs with `--all-features`).
#![cfg(feature = "etcd")]

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::Node;
use common::etcd::Etcd;
use reqwest::Method;
use serde_json::{Value, json};

const TOKEN: &str = "schedule-cluster-token-0123456789";
const TRIES: usize = 1_200;
const POLL: Duration = Duration::from_millis(50);

/// `count` nodes named `node-i`, with a registry lease of 2s (a killed node leaves soon).
fn start_nodes(etcd: &Etcd, count: usize) -> Vec<Node> {
    let url = etcd.store_url();
    (0..count)
        .map(|i| {
            let name = format!("node-{i}");
            let args = ["--store", &url, "--node-name", &name, "--node-ttl", "2s"];
            Node::start_with_env(&args, &[("MOONTIDE_ADMIN_TOKEN", TOKEN)])
        })
        .collect()
}

async fn recent_runs(node: &Node, name: &str) -> Vec<Value> {
    let (status, info) = node
        .admin_json(Method::GET, &format!("/v1/functions/{name}"), None)
        .await;
    assert_eq!(status, 200, "{info}");
    info["recent_runs"].as_array().cloned().unwrap_or_default()
}

/// The `run …` lines of `name`'s log on every node (each node keeps its own log).
async fn run_lines(nodes: &[&Node], name: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for node in nodes {
        lines.extend(
            node.log_messages(name)
                .await
                .into_iter()
                .filter(|line| line.starts_with("run ")),
        );
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_due_time_runs_on_exactly_one_node() {
    let etcd = Etcd::start();
    let nodes = start_nodes(&etcd, 3);
    let all: Vec<&Node> = nodes.iter().collect();
    nodes[0]
        .deploy(
            "tick",
            r#"return function(event, ctx)
                 print("run " .. event.scheduled_time .. " " .. event.attempt)
               end"#,
            json!({"schedule": "@every 1s"}),
        )
        .await;
    // Wait for 8 finished runs, read on another node (they share the store).
    let mut done = Vec::new();
    for _ in 0..TRIES {
        done = recent_runs(&nodes[1], "tick")
            .await
            .into_iter()
            .filter(|run| run["state"] == "ok")
            .collect();
        if done.len() >= 8 {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(done.len() >= 8, "only {} runs finished", done.len());
    let lines = run_lines(&all, "tick").await;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &lines {
        *seen.entry(line.as_str()).or_default() += 1;
    }
    // No due time ran twice, anywhere.
    assert!(seen.values().all(|&count| count == 1), "{lines:#?}");
    // Every finished run ran exactly once, on the node its record names.
    for run in &done {
        let line = format!("run {} 1", run["scheduled_time"].as_str().unwrap());
        assert_eq!(seen.get(line.as_str()), Some(&1), "{run} in {lines:#?}");
        assert!(
            nodes
                .iter()
                .any(|node| node_name(node) == run["node"].as_str().unwrap_or_default()),
            "the record names a node of the cluster: {run}"
        );
    }
    // Every node sees the same records.
    let (a, b) = (
        recent_runs(&nodes[0], "tick").await,
        recent_runs(&nodes[2], "tick").await,
    );
    assert!(!a.is_empty() && !b.is_empty());
}

/// The name a test node was started with (`node-i`, from its `--node-name`).
fn node_name(node: &Node) -> String {
    // The harness passes `--node-name node-i`; read it back from the process arguments.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", node.child.id())).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    args.iter()
        .position(|arg| arg == "--node-name")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_node_dies_is_taken_over_as_attempt_two() {
    let etcd = Etcd::start();
    let mut nodes = start_nodes(&etcd, 3);
    // Each run holds its instance for about 3 s of CPU; due every second, overlap skip.
    nodes[0]
        .deploy(
            "slow",
            r#"return function(event, ctx)
                 print("run " .. event.scheduled_time .. " " .. event.attempt)
                 local started = os.clock()
                 while os.clock() - started < 3 do end
               end"#,
            json!({"schedule": "@every 1s", "timeout": "10s"}),
        )
        .await;
    // A run that is going: note its due time and node.
    let mut running = None;
    for _ in 0..TRIES {
        running = recent_runs(&nodes[0], "slow")
            .await
            .into_iter()
            .find(|run| run["state"] == "running");
        if running.is_some() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let running = running.expect("a run was going");
    let victim = running["node"].as_str().unwrap().to_string();
    let index = nodes
        .iter()
        .position(|node| node_name(node) == victim)
        .expect("the running node is one of ours");
    // kill -9 the victim's supervisor (its node goes with it): nothing finishes the run.
    let status = Command::new("kill")
        .args(["-KILL", &nodes[index].child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let _ = nodes[index].child.wait();
    let dead = nodes.remove(index);
    drop(dead);
    let survivor = &nodes[0];
    let due = running["scheduled_ms"].as_i64().unwrap();
    let mut taken = None;
    for _ in 0..TRIES {
        taken = recent_runs(survivor, "slow")
            .await
            .into_iter()
            .find(|run| run["scheduled_ms"].as_i64() == Some(due) && run["state"] == "ok");
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let taken = taken.expect("the orphaned run was finished by another node");
    assert_eq!(taken["attempt"], 2, "{taken}");
    assert_ne!(taken["node"], victim, "{taken}");
    // It ran again (attempt 2) on exactly one survivor.
    let survivors: Vec<&Node> = nodes.iter().collect();
    let line = format!("run {} 2", running["scheduled_time"].as_str().unwrap());
    let lines = run_lines(&survivors, "slow").await;
    assert_eq!(
        lines.iter().filter(|l| **l == line).count(),
        1,
        "{line} in {lines:#?}"
    );
}
