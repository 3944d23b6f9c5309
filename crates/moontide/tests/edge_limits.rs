//! Hostile clients at the edge (issue 14): timeouts, connection caps and the admin port
//! (`edge.rs` has the request heads and paths), over raw loopback sockets against the real
//! binary: request bodies that stop (a `Content-Length` larger than what is sent, a chunked
//! body that never ends) are answered and closed after the body timeout on every hyper
//! path (function routes, plugin routes, proxied routes); a body declared over the limit is
//! refused at once; idle sockets and unfinished heads are closed after the head timeout on
//! the data plane and the admin listener; the connection caps answer cleanly; the admin
//! token's scheme is case-insensitive; `/metrics` and `/v1/openapi.json` need the token
//! unless the node chose `--metrics-public`.
//!
//! No timing is asserted: the node runs with short timeouts, and each test reads until
//! the node closes the socket, with a generous outer guard that fails the test if it
//! never does.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Node, metric_value};
use reqwest::Method;
use serde_json::{Value, json};

/// The outer guard on waiting for the node to answer or close (not a timing assertion: the
/// configured timeouts are 1 s).
const GUARD: Duration = Duration::from_secs(30);

/// Short timeouts, so the tests wait seconds, not minutes.
const SHORT: &[&str] = &["--body-timeout", "1s", "--header-timeout", "2s"];

const ECHO: &str = "return function(event) return { statusCode = 200, body = event.body } end";

fn address(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .expect("host:port")
}

fn connect(url: &str) -> TcpStream {
    let stream = TcpStream::connect(address(url)).expect("connect");
    stream.set_read_timeout(Some(GUARD)).expect("read timeout");
    stream
}

/// Everything the node sends until it closes the connection; panics if it is still open
/// after the guard.
fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!(
                "the node did not close the connection ({error}); received so far: {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// One keep-alive request/response on `stream` (the response must carry a
/// Content-Length); returns the status line.
fn round_trip(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).expect("write");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).expect("read");
        assert!(
            n > 0,
            "closed early: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if received.len() >= end + 4 + length {
                return text.lines().next().unwrap_or_default().to_string();
            }
        }
    }
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

fn error_code(response: &str) -> String {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: Value = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("not a JSON error body: {response:?}"));
    json["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn has_header(response: &str, name: &str, value: &str) -> bool {
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().any(|line| {
        line.split_once(':').is_some_and(|(n, v)| {
            n.eq_ignore_ascii_case(name) && v.trim().eq_ignore_ascii_case(value)
        })
    })
}

/// Sends `head` and then `body`, and reads what the node answers until it closes.
fn send_and_wait(url: &str, head: &str, body: &[u8]) -> String {
    let mut stream = connect(url);
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    read_until_closed(&mut stream)
}

fn assert_body_timeout(response: &str, what: &str) {
    let status = status_line(response);
    assert!(
        status.starts_with("HTTP/1.1 408") || status.starts_with("HTTP/1.0 408"),
        "{what}: {response:?}"
    );
    assert_eq!(error_code(response), "body_timeout", "{what}: {response:?}");
    // HTTP/1.0 closes after every answer without saying so.
    assert!(
        status.starts_with("HTTP/1.0") || has_header(response, "connection", "close"),
        "{what}: {response:?}"
    );
    assert!(
        has_header(response, "content-type", "application/json"),
        "{what}: {response:?}"
    );
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_answered_408_and_closed() {
    let node = Node::start_with(SHORT);
    node.deploy("echo", ECHO, json!({})).await;
    // HTTP/1.1 starts in the front (a body within the limit is waited for there); the
    // front hands HTTP/1.0 to hyper.
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let response = send_and_wait(
            &node.data,
            &format!("POST /fn/echo {version}\r\nHost: edge.test\r\nContent-Length: 1000\r\n\r\n"),
            b"0123456789",
        );
        assert_body_timeout(
            &response,
            &format!("{version}, Content-Length 1000, 10 bytes sent"),
        );
    }
}

#[tokio::test]
async fn a_body_declared_over_the_limit_is_answered_413_at_once_and_closed() {
    let node = Node::start_with(SHORT);
    node.deploy("echo", ECHO, json!({})).await;
    let response = send_and_wait(
        &node.data,
        "POST /fn/echo HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 100000000\r\n\r\n",
        b"0123456789",
    );
    assert!(
        status_line(&response).starts_with("HTTP/1.1 413"),
        "{response:?}"
    );
    assert_eq!(error_code(&response), "body_too_large", "{response:?}");
    assert!(has_header(&response, "connection", "close"), "{response:?}");
}

#[tokio::test]
async fn a_chunked_body_that_never_ends_is_answered_408_and_closed_on_every_hyper_path() {
    let node = Node::start_with(SHORT);
    node.deploy("echo", ECHO, json!({})).await;
    // A proxied route (its body is read whole before it is forwarded, so the upstream is
    // never reached), a function route and a route with a plugin.
    let (status, body) = node
        .admin_json(
            Method::PUT,
            "/v1/upstreams/nowhere",
            Some(json!({"nodes": [{"address": "127.0.0.1:9"}]})),
        )
        .await;
    assert!(matches!(status, 200 | 201), "upstream: {body}");
    let (status, body) = node
        .admin_json(
            Method::PUT,
            "/v1/plugins/noop",
            Some(json!({"source": "return { access = function(req, ctx) end }"})),
        )
        .await;
    assert!(matches!(status, 200 | 201), "plugin: {body}");
    for (name, route) in [
        (
            "proxied",
            json!({"path": "/proxied/*", "upstream": "nowhere"}),
        ),
        (
            "function",
            json!({"path": "/function/*", "function": "echo"}),
        ),
        (
            "plugin",
            json!({"path": "/plugin/*", "function": "echo", "plugins": [{"name": "noop"}]}),
        ),
    ] {
        let (status, body) = node
            .admin_json(Method::PUT, &format!("/v1/routes/{name}"), Some(route))
            .await;
        assert!(matches!(status, 200 | 201), "route {name}: {body}");
    }
    for path in ["/fn/echo", "/proxied/x", "/function/x", "/plugin/x"] {
        let response = send_and_wait(
            &node.data,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: edge.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            b"5\r\nhello\r\n",
        );
        assert_body_timeout(&response, path);
    }
}

#[tokio::test]
async fn idle_and_unfinished_heads_are_closed_on_the_data_plane_and_the_admin_port() {
    let node = Node::start_with(SHORT);
    for url in [&node.data, &node.admin] {
        // An idle socket.
        let mut idle = connect(url);
        assert_eq!(read_until_closed(&mut idle), "", "idle socket on {url}");
        // A head without its blank line.
        let mut partial = connect(url);
        partial
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: edge.test\r\n")
            .expect("write");
        let answer = read_until_closed(&mut partial);
        assert!(
            answer.is_empty() || status_line(&answer).starts_with("HTTP/1.1 408"),
            "unfinished head on {url}: {answer:?}"
        );
        // A keep-alive connection that served a request, then idles.
        let mut kept = connect(url);
        let status = round_trip(
            &mut kept,
            "GET /healthz HTTP/1.1\r\nHost: edge.test\r\n\r\n",
        );
        assert!(status.starts_with("HTTP/1.1 200"), "{url}: {status}");
        assert_eq!(read_until_closed(&mut kept), "", "idle keep-alive on {url}");
    }
}

#[tokio::test]
async fn an_admin_body_that_stops_is_answered_and_closed() {
    let node = Node::start_with(SHORT);
    let response = send_and_wait(
        &node.admin,
        &format!(
            "PUT /v1/functions/slow HTTP/1.1\r\nHost: edge.test\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
            node.token
        ),
        b"{\"source\":",
    );
    assert!(
        status_line(&response).starts_with("HTTP/1.1 4"),
        "{response:?}"
    );
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_answered_429_and_closed() {
    let node = Node::start_with(&["--max-connections-per-ip", "2"]);
    let request = "GET /healthz HTTP/1.1\r\nHost: edge.test\r\n\r\n";
    let mut first = connect(&node.data);
    let mut second = connect(&node.data);
    // Both are accepted and counted once each has been answered.
    assert!(round_trip(&mut first, request).starts_with("HTTP/1.1 200"));
    assert!(round_trip(&mut second, request).starts_with("HTTP/1.1 200"));
    let mut third = connect(&node.data);
    let response = read_until_closed(&mut third);
    assert!(
        status_line(&response).starts_with("HTTP/1.1 429"),
        "{response:?}"
    );
    assert_eq!(error_code(&response), "client_connection_limit");
    assert!(has_header(&response, "connection", "close"), "{response:?}");
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"moontide_connections_refused_total{reason="per_ip"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "moontide_connections "),
        2.0,
        "{metrics}"
    );
    // A slot freed is a slot again (once the node has seen the close).
    drop(first);
    let mut served = false;
    for _ in 0..100 {
        let mut again = connect(&node.data);
        again.write_all(request.as_bytes()).expect("write");
        let answer = read_until_closed_or_answered(&mut again);
        if answer.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the closed connection's slot was never freed");
}

/// The status line of the first answer on `stream`.
fn read_until_closed_or_answered(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn connections_over_the_node_cap_are_answered_503_and_closed() {
    let node = Node::start_with(&["--max-connections", "2", "--max-connections-per-ip", "0"]);
    let request = "GET /healthz HTTP/1.1\r\nHost: edge.test\r\n\r\n";
    let mut first = connect(&node.data);
    let mut second = connect(&node.data);
    assert!(round_trip(&mut first, request).starts_with("HTTP/1.1 200"));
    assert!(round_trip(&mut second, request).starts_with("HTTP/1.1 200"));
    let mut third = connect(&node.data);
    let response = read_until_closed(&mut third);
    assert!(
        status_line(&response).starts_with("HTTP/1.1 503"),
        "{response:?}"
    );
    assert_eq!(error_code(&response), "connection_limit");
    assert!(has_header(&response, "connection", "close"), "{response:?}");
    assert!(has_header(&response, "retry-after", "1"), "{response:?}");
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"moontide_connections_refused_total{reason="total"}"#
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let node = Node::start();
    for value in [
        format!("bearer {}", node.token),
        format!("BEARER {}", node.token),
        format!("Bearer   {}", node.token),
    ] {
        let response = node
            .http
            .get(format!("{}/v1/functions", node.admin))
            .header("authorization", &value)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "Authorization: {value}");
    }
    let response = node
        .http
        .get(format!("{}/v1/functions", node.admin))
        .header("authorization", format!("Basic {}", node.token))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn metrics_and_the_openapi_document_need_the_token_unless_metrics_are_public() {
    let node = Node::start();
    for path in ["/metrics", "/v1/openapi.json"] {
        let url = format!("{}{path}", node.admin);
        let without = node.http.get(&url).send().await.expect("request");
        assert_eq!(without.status(), 401, "{path} without the token");
        let with = node
            .http
            .get(&url)
            .bearer_auth(&node.token)
            .send()
            .await
            .expect("request");
        assert_eq!(with.status(), 200, "{path} with the token");
    }

    let public = Node::start_with(&["--metrics-public"]);
    let metrics = public
        .http
        .get(format!("{}/metrics", public.admin))
        .send()
        .await
        .expect("request");
    assert_eq!(metrics.status(), 200, "--metrics-public opens /metrics");
    let openapi = public
        .http
        .get(format!("{}/v1/openapi.json", public.admin))
        .send()
        .await
        .expect("request");
    assert_eq!(
        openapi.status(),
        401,
        "--metrics-public opens only /metrics"
    );
}

/// The soft open-files limit of a process, from `/proc/PID/limits`.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// Every connection is a file: a node started under a low soft limit (1 024 is common)
/// would fail `accept` long before its connection cap answers cleanly. The supervisor
/// raises the soft limit to the hard one, and the node it runs inherits it.
#[tokio::test]
async fn the_node_raises_its_open_files_limit_to_the_hard_limit() {
    let (_, hard) = open_files_limits(std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut command = std::process::Command::new("bash");
    command
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
        .arg(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--workers", "1", "--data-dir"])
        .arg(&data_dir)
        .env("RUST_LOG", "warn");
    let node = Node::start_command(command, data_dir);
    assert_eq!(node.get("/healthz").await.status(), 200);
    let supervisor = node.child.id();
    // The node: the supervisor's child.
    let node_pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // `pid (comm) state ppid ...`; comm may hold spaces, so split after `)`.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(supervisor)
            })
        })
        .expect("the node process");
    for pid in [supervisor, node_pid] {
        let (soft, _) = open_files_limits(pid);
        assert_eq!(soft, hard, "process {pid}");
    }
}
