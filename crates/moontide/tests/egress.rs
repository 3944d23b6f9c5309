//! The egress policy end to end, on the real binary: what a function's outbound `http`
//! may reach by default (nothing of the node, loopback, private ranges or metadata), what
//! `serve --egress-allow` and a function's own `egress_allow` open, redirects, and how a
//! denial shows (the Lua error, the function's log, `/metrics`). Real traffic only ever
//! goes to loopback: every other address is refused before a connection.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Node, metric_value, temp_files};
use serde_json::{Value, json};

/// A function that fetches `?url=` and answers what happened.
const PROBE: &str = r#"local http = require("http")
return function(event)
  local r, err = http.get(event.queryStringParameters.url, { timeout_ms = 2000 })
  if r then return { status = r.status, body = r.body } end
  return { err = err }
end"#;

/// A loopback HTTP/1.1 backend: `/to?URL` answers a 302 to URL, anything else 200
/// `backend`. Counts the requests it read.
struct Backend {
    addr: String,
    requests: Arc<AtomicUsize>,
}

fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let target = line.split(' ').nth(1).unwrap_or("/").to_string();
                let answer = match target.strip_prefix("/to?") {
                    Some(location) => format!(
                        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\
                         connection: close\r\n\r\n"
                    ),
                    None => "HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\n\
                             backend"
                        .to_string(),
                };
                let _ = stream.write_all(answer.as_bytes());
            });
        }
    });
    Backend { addr, requests }
}

/// What a [`recorder`] saw: connections closed, and the bytes they sent in all.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    bytes: AtomicUsize,
}

/// A loopback listener that records what each connection sent before it closed.
fn recorder() -> (u16, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let record = record.clone();
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes);
                record.bytes.fetch_add(bytes.len(), Ordering::SeqCst);
                record.connections.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, seen)
}

fn port_of(url: &str) -> &str {
    url.rsplit(':').next().unwrap()
}

/// Calls function `name` (a probe) with `url`; its JSON answer.
async fn probe(node: &Node, name: &str, url: &str) -> Value {
    let target = reqwest::Url::parse_with_params(&node.url(&format!("/fn/{name}")), [("url", url)])
        .expect("probe URL");
    let response = node.http.get(target).send().await.expect("probe request");
    assert_eq!(response.status().as_u16(), 200, "probe {url}");
    response.json().await.expect("probe answers JSON")
}

/// The probe's error for `url`, which must be a denial for `reason`.
async fn denied(node: &Node, name: &str, url: &str, reason: &str) -> String {
    let answer = probe(node, name, url).await;
    let err = answer["err"].as_str().unwrap_or_default().to_string();
    assert!(
        err.starts_with("egress to ") && err.contains(&format!("denied by policy: {reason} (")),
        "{url}: expected a {reason} denial, got {answer}"
    );
    err
}

#[tokio::test]
async fn by_default_the_node_itself_loopback_and_metadata_are_denied() {
    let node = Node::start();
    let backend = backend();
    node.deploy("probe", PROBE, json!({})).await;
    let admin = node.admin.clone();
    let admin_port = port_of(&admin).to_string();
    let data_port = port_of(&node.data).to_string();

    // The admin API by its address: metrics, OpenAPI, probes.
    let message = denied(
        &node,
        "probe",
        &format!("{admin}/metrics"),
        "admin_listener",
    )
    .await;
    let admin_addr = admin.trim_start_matches("http://");
    assert_eq!(
        message,
        format!(
            "egress to {admin_addr} denied by policy: admin_listener (the node's own admin \
             API; no allowlist opens it)"
        )
    );
    let mut admin_denials = 1;
    for path in ["/v1/openapi.json", "/healthz"] {
        denied(&node, "probe", &format!("{admin}{path}"), "admin_listener").await;
        admin_denials += 1;
    }
    // ... and spelled otherwise.
    for host in [
        "2130706433",
        "0x7f000001",
        "127.1",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "0.0.0.0",
    ] {
        let url = format!("http://{host}:{admin_port}/metrics");
        denied(&node, "probe", &url, "admin_listener").await;
        admin_denials += 1;
    }
    // A name is refused at resolution: its loopback addresses are dropped.
    let by_name = format!("http://localhost:{admin_port}/metrics");
    let message = denied(&node, "probe", &by_name, "loopback").await;
    assert!(
        message.starts_with(&format!("egress to localhost:{admin_port} (")),
        "{message}"
    );
    denied(
        &node,
        "probe",
        &format!("http://[::1]:{admin_port}/"),
        "loopback",
    )
    .await;

    // The data plane: a function calling the node (itself) in a loop.
    let own = format!(
        "{}/fn/probe?url=http://127.0.0.1:{data_port}/fn/probe",
        node.data
    );
    denied(&node, "probe", &own, "data_plane").await;

    // Loopback backends: refused before connecting (the backend never sees a request).
    let direct = format!("http://{}/ok", backend.addr);
    denied(&node, "probe", &direct, "loopback").await;
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);

    // Cloud metadata: refused before any packet (nothing listens there in tests).
    for url in [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://2852039166/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
    ] {
        denied(&node, "probe", url, "metadata").await;
    }
    denied(&node, "probe", "http://10.0.0.1:8080/", "private").await;

    // Counted by reason, and written to the function's log.
    let metrics = node.metrics().await;
    let series = |reason: &str| {
        metric_value(
            &metrics,
            &format!(r#"moontide_egress_denied_total{{function="probe",reason="{reason}"}}"#),
        )
    };
    assert_eq!(series("admin_listener"), admin_denials as f64, "{metrics}");
    assert_eq!(series("loopback"), 3.0);
    assert_eq!(series("data_plane"), 1.0);
    assert_eq!(series("metadata"), 3.0);
    assert_eq!(series("private"), 1.0);
    let logs = node.log_messages("probe").await;
    let line = "egress to 169.254.169.254:80 denied by policy: metadata (";
    assert!(logs.iter().any(|l| l.starts_with(line)), "{logs:?}");
    assert!(
        logs.iter()
            .any(|l| l.starts_with(&format!("egress to {admin_addr} denied by policy"))),
        "{logs:?}"
    );
}

#[tokio::test]
async fn a_node_allowlist_opens_backends_but_never_the_node_and_redirects_are_checked() {
    let backend = backend();
    let node = Node::start_with(&[
        "--egress-allow",
        "127.0.0.1/32",
        "--egress-allow",
        "10.0.0.0/8:443",
    ]);
    node.deploy("probe", PROBE, json!({})).await;
    let admin_port = port_of(&node.admin).to_string();
    let data_port = port_of(&node.data).to_string();
    let b = &backend.addr;
    let b_port = port_of(b);

    // The allowlisted backend answers, by address and by name.
    let answer = probe(&node, "probe", &format!("http://{b}/ok")).await;
    assert_eq!(
        (answer["status"].as_u64(), answer["body"].as_str()),
        (Some(200), Some("backend"))
    );
    let answer = probe(&node, "probe", &format!("http://localhost:{b_port}/ok")).await;
    assert_eq!(answer["body"], "backend", "{answer}");
    // A redirect to another allowed place is followed.
    let answer = probe(&node, "probe", &format!("http://{b}/to?http://{b}/ok")).await;
    assert_eq!(answer["body"], "backend", "{answer}");

    // Redirects to what the policy denies are refused at the hop.
    let hops = [
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "metadata",
        ),
        (
            format!("http://127.0.0.1:{admin_port}/metrics"),
            "admin_listener",
        ),
        // By name: allowed at resolution (127.0.0.1 is listed), refused once connected.
        (
            format!("http://localhost:{admin_port}/metrics"),
            "admin_listener",
        ),
        (
            format!("http://127.0.0.1:{data_port}/fn/probe"),
            "data_plane",
        ),
        ("http://[::1]/".to_string(), "loopback"),
        ("http://192.168.0.1/".to_string(), "private"),
    ];
    let before = backend.requests.load(Ordering::SeqCst);
    for (location, reason) in &hops {
        denied(&node, "probe", &format!("http://{b}/to?{location}"), reason).await;
    }
    // Each redirecting request reached the backend; no denied hop did.
    assert_eq!(backend.requests.load(Ordering::SeqCst) - before, hops.len());

    // The node's allowlist is shown by the status endpoint.
    let (_, status) = node
        .admin_json(reqwest::Method::GET, "/v1/status", None)
        .await;
    assert_eq!(
        status["node"]["egress_allow"],
        json!(["127.0.0.1", "10.0.0.0/8:443"])
    );
    // Opened on one port only (checked without a packet: the port is refused first).
    denied(&node, "probe", "http://10.0.0.1:8080/", "private").await;
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"moontide_egress_denied_total{function="probe",reason="admin_listener"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn a_function_allowlist_opens_only_what_it_names_for_that_function() {
    let backend = backend();
    let (other_port, other_seen) = recorder();
    let node = Node::start();
    let data_port = port_of(&node.data).to_string();
    let dir = temp_files(&[("probe.lua", PROBE)]);
    let probe_file = dir.path().join("probe.lua").display().to_string();
    let b = backend.addr.clone();
    let b_port = port_of(&b).to_string();

    node.cli_ok(&["deploy", "own", &probe_file, "--egress-allow", &b]);
    node.cli_ok(&["deploy", "other", &probe_file]);
    let admin_port = port_of(&node.admin).to_string();
    let admin_entry = format!("127.0.0.1:{admin_port}");
    node.cli_ok(&[
        "deploy",
        "admintry",
        &probe_file,
        "--egress-allow",
        &admin_entry,
    ]);
    let self_entry = format!("127.0.0.1:{data_port}");
    node.cli_ok(&[
        "deploy",
        "selfcall",
        &probe_file,
        "--egress-allow",
        &self_entry,
    ]);
    node.deploy("hello", "return function() return 'hi' end", json!({}))
        .await;

    // `own` reaches its backend, by address and by name; `other` does not.
    let answer = probe(&node, "own", &format!("http://{b}/ok")).await;
    assert_eq!(answer["body"], "backend", "{answer}");
    let answer = probe(&node, "own", &format!("http://localhost:{b_port}/ok")).await;
    assert_eq!(answer["body"], "backend", "{answer}");
    denied(&node, "other", &format!("http://{b}/ok"), "loopback").await;

    // The entry names a port: another loopback port stays closed, by address (before
    // connecting) and by name (once connected, before a byte of the request is sent).
    denied(
        &node,
        "own",
        &format!("http://127.0.0.1:{other_port}/"),
        "loopback",
    )
    .await;
    denied(
        &node,
        "own",
        &format!("http://localhost:{other_port}/"),
        "loopback",
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while other_seen.connections.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the name's connection never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        other_seen.bytes.load(Ordering::SeqCst),
        0,
        "request bytes reached a denied port"
    );
    denied(
        &node,
        "own",
        &format!("http://127.0.0.1:{data_port}/fn/hello"),
        "data_plane",
    )
    .await;

    // Naming the data plane's exact address and port lets a function call the node.
    let answer = probe(
        &node,
        "selfcall",
        &format!("http://127.0.0.1:{data_port}/fn/hello"),
    )
    .await;
    assert_eq!(answer["body"], "hi", "{answer}");
    denied(&node, "selfcall", &format!("http://{b}/ok"), "loopback").await;
    // Nothing opens the admin API, not even an entry naming it.
    let metrics_url = format!("{}/metrics", node.admin);
    denied(&node, "admintry", &metrics_url, "admin_listener").await;

    // The entries are shown, normalised; a malformed one is refused with its path.
    let info = node.cli_ok(&["info", "own"]);
    assert!(info.contains(&b), "{info}");
    let output = node.cli(&[
        "deploy",
        "own",
        &probe_file,
        "--egress-allow",
        "localhost:80",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.egress_allow[0]"), "{stderr}");
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            "/v1/functions/own",
            Some(
                json!({"source": PROBE, "config": {"egress_allow": ["10.0.0.0/8", "10.0.0.0/33"]}}),
            ),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"]["path"], "config.egress_allow[1]");
}
