//! Crash containment (issue 13 §1): a tenant function that crashes the node process (a
//! Luau VM bug) does not take the service down. The supervisor keeps the listeners, so no
//! connection is refused while the node restarts; neighbours keep answering; the crashing
//! version is quarantined at its second crash (`503 function_quarantined`, told in
//! `moontide info`, the function log and `/metrics`); a new deploy lifts it; nothing
//! acknowledged is lost.
//!
//! The crash is a real one: the `table.move` reproduction of luau#2970 with the built-in
//! guards turned off for this node (`MOONTIDE_UNSAFE_DISABLE_BUILTIN_GUARDS=1`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::{Node, metric_value};
use serde_json::{Value, json};

const CRASHER: &str = include_str!("../../../tests/hostile/vm_crash/table_move_int_min.lua");

fn unguarded_node() -> Node {
    Node::start_with_env(&[], &[("MOONTIDE_UNSAFE_DISABLE_BUILTIN_GUARDS", "1")])
}

/// One HTTP/1.1 GET on a fresh connection: the status line's code, or the I/O error (a
/// refused connection is `ConnectionRefused`).
fn raw_get(addr: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {response:?}")))
}

#[tokio::test]
async fn a_crashing_function_is_contained_and_quarantined() {
    let mut node = unguarded_node();
    let data_addr = node.data.trim_start_matches("http://").to_string();
    let pid = node.child.id();
    let version = node.deploy("crasher", CRASHER, json!({})).await;
    node.deploy("hello", "return function() return 'hi' end", json!({}))
        .await;

    for crash in 1..=2u32 {
        // The crashing call gets no answer: its process died under it.
        let outcome = raw_get(&data_addr, "/fn/crasher");
        assert!(
            !matches!(outcome, Ok(200)),
            "crash {crash}: the reproduction answered ({outcome:?}); is the guard still off?"
        );
        // At once, while the next node process starts: never refused, always answered.
        for _ in 0..20 {
            assert_eq!(
                raw_get(&data_addr, "/fn/hello").expect("the listener stays open"),
                200,
                "crash {crash}: a neighbour's call"
            );
        }
    }

    // The supervisor is the same process; the node behind it restarted twice. (Keep-alive
    // connections to the dead node died with it: a new client.)
    assert_eq!(node.child.id(), pid);
    node.http = common::http_client();
    let metrics = node.metrics().await;
    assert_eq!(metric_value(&metrics, "moontide_node_restarts_total "), 2.0);
    assert_eq!(
        metric_value(
            &metrics,
            "moontide_function_crashes_total{function=\"crasher\"} "
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "moontide_function_quarantined{function=\"crasher\"} "
        ),
        1.0
    );

    // Quarantined: refused with a clear answer, no third crash.
    let response = node.get("/fn/crasher").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "function_quarantined");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("crashed the node 2 times"), "{message}");
    assert!(message.contains("SIGSEGV"), "{message}");
    assert!(body["error"]["details"]["request_id"].is_string());
    let (status, invoked) = node
        .admin_json(
            reqwest::Method::POST,
            "/v1/functions/crasher/invoke",
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, &invoked["error"]["code"]),
        (503, &json!("function_quarantined"))
    );
    assert_eq!(
        metric_value(&node.metrics().await, "moontide_node_restarts_total "),
        2.0,
        "no further crash"
    );

    // `moontide info` and the function log say why and since when.
    let info: Value = serde_json::from_str(&node.cli_ok(&["info", "crasher"])).unwrap();
    assert_eq!(info["quarantine"]["version"], version);
    assert_eq!(info["quarantine"]["crashes"], 2);
    assert_eq!(info["quarantine"]["last_signal"], "SIGSEGV");
    assert!(info["quarantine"]["since_ms"].as_u64().is_some());
    let logs = node.log_messages("crasher").await;
    assert!(
        logs.iter()
            .any(|line| line.contains("crashed the node 2 time(s)")
                && line.contains("quarantined since")),
        "{logs:?}"
    );

    // A new version lifts it (and, acknowledged before the crashes, `hello` is still there).
    node.deploy("crasher", "return function() return 'fixed' end", json!({}))
        .await;
    let response = node.get("/fn/crasher").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "fixed");
    let info: Value = serde_json::from_str(&node.cli_ok(&["info", "crasher"])).unwrap();
    assert!(info["quarantine"].is_null(), "{info}");
    assert_eq!(info["crashes"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        metric_value(
            &node.metrics().await,
            "moontide_function_quarantined{function=\"crasher\"} "
        ),
        0.0
    );
}

/// A rollback to the quarantined version stays quarantined: the ledger is per version.
#[tokio::test]
async fn a_rollback_to_a_quarantined_version_stays_refused() {
    let mut node = unguarded_node();
    let data_addr = node.data.trim_start_matches("http://").to_string();
    node.deploy("crasher", CRASHER, json!({})).await;
    node.deploy("hello", "return function() return 'hi' end", json!({}))
        .await;
    for _ in 0..2 {
        let _ = raw_get(&data_addr, "/fn/crasher");
        // Answered by the next node process.
        assert_eq!(raw_get(&data_addr, "/fn/hello").unwrap(), 200);
    }
    node.http = common::http_client();
    assert_eq!(node.get("/fn/crasher").await.status(), 503);
    node.deploy("crasher", "return function() return 'v2' end", json!({}))
        .await;
    assert_eq!(node.get("/fn/crasher").await.status(), 200);
    node.cli_ok(&["rollback", "crasher", "--to", "1"]);
    let response = node.get("/fn/crasher").await;
    assert_eq!(response.status(), 503);
}

/// SIGTERM reaches the node through the supervisor: calls drain and both exit cleanly.
#[tokio::test]
async fn sigterm_stops_the_supervised_node_cleanly() {
    let mut node = Node::start();
    node.deploy("hello", "return function() return 'hi' end", json!({}))
        .await;
    assert_eq!(node.get("/fn/hello").await.status(), 200);
    node.sigterm();
    let status = node.child.wait().expect("the supervisor exits");
    assert!(
        status.success(),
        "{status:?} (signal {:?})",
        status.signal()
    );
}

/// With the guards on (production), the reproduction answers and nothing restarts.
#[tokio::test]
async fn the_guarded_reproduction_does_not_crash() {
    let node = Node::start();
    node.deploy("mover", CRASHER, json!({})).await;
    let response = node.get("/fn/mover").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "true true 1");
    assert_eq!(
        metric_value(&node.metrics().await, "moontide_node_restarts_total "),
        0.0
    );
}

/// `kill -9` of `moontide serve` (the supervisor) takes the node process with it: nothing
/// is left holding the data dir or serving.
#[tokio::test]
async fn killing_the_supervisor_kills_the_node() {
    let mut node = Node::start();
    let supervisor = node.child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
            .expect("the supervisor's children");
    let node_pid: u32 = children
        .split_whitespace()
        .next()
        .expect("the supervisor runs the node as its child")
        .parse()
        .unwrap();
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    // The kernel delivers the node's death signal at once; wait until it is reaped.
    let gone = (0..500).any(|_| {
        let state = std::fs::read_to_string(format!("/proc/{node_pid}/stat")).unwrap_or_default();
        let alive = state
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X");
        if alive {
            std::thread::sleep(Duration::from_millis(10));
        }
        !alive
    });
    assert!(gone, "the node process {node_pid} outlived its supervisor");
}
