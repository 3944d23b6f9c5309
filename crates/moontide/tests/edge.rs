//! Hostile clients at the edge (issue 14), over raw loopback sockets so that the exact
//! request bytes reach the node: paths that spell a guarded route another way (dot
//! segments, encoded characters, doubled slashes) must route — and be forwarded — as
//! their normal form, or be refused; HTTP/1.1 heads without one `Host` are `400`;
//! `CONNECT` is refused and the connection closed.
//!
//! Every case is driven through both of the data plane's request paths: a fresh
//! connection starts in the front (`moontide-server/src/front.rs`), which proxies plain
//! upstream routes itself and hands anything else to hyper; a connection whose first
//! request was `/healthz` has been handed to hyper (`dataplane.rs`) for good, so what
//! follows on it is parsed and routed by hyper alone. Functions and plugin routes are
//! always served by hyper; HTTP/2 (h2c) is hyper's too.
//!
//! The backend is a raw TCP server on 127.0.0.1 that records each request's target and
//! answers `200` with `served <target>`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Node;
use common::raw_http::{Conn, WAIT};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::timeout;

const HOST: &str = "files.example";
const KEY: &str = "key-1234";

/// The raw backend: the targets it was sent, in order.
struct Backend {
    address: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let targets: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = targets.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut conn = Conn::new(stream);
                    while let Ok(Some(request)) = conn.request().await {
                        let target = request.target;
                        let body = format!("served {target}");
                        record.lock().unwrap().push(target);
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Backend { address, targets }
    }

    /// The targets seen since the last call.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.targets.lock().unwrap())
    }
}

async fn put(node: &Node, path: &str, body: Value) {
    let (status, answer) = node
        .admin_json(reqwest::Method::PUT, path, Some(body))
        .await;
    assert!(matches!(status, 200 | 201), "PUT {path}: {answer}");
}

/// A one-worker node with the issue's setup: upstream `files`; `/api/*` → files (a plain
/// route: the front proxies it); `/api/private/*` → files behind the example `key-auth`
/// plugin (hyper serves it); both for Host `files.example`.
async fn files_node() -> (Node, Backend) {
    let node = Node::start_with(&["--workers", "1"]);
    let backend = Backend::start().await;
    put(
        &node,
        "/v1/upstreams/files",
        json!({"nodes": [{"address": backend.address.to_string()}]}),
    )
    .await;
    let key_auth = std::fs::read_to_string(common::examples_dir().join("gateway/key-auth.lua"))
        .expect("the example key-auth plugin");
    put(&node, "/v1/plugins/key-auth", json!({"source": key_auth})).await;
    put(
        &node,
        "/v1/routes/files",
        json!({"hosts": [HOST], "paths": ["/api/*"], "upstream": "files"}),
    )
    .await;
    put(
        &node,
        "/v1/routes/files-private",
        json!({"hosts": [HOST], "paths": ["/api/private/*"], "upstream": "files",
               "plugins": [{"name": "key-auth", "config": {"keys": [KEY]}}]}),
    )
    .await;
    (node, backend)
}

fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
}

fn get_with_key(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\nx-api-key: {KEY}\r\n\r\n")
}

/// The issue's spellings of `/api/private/secret.txt`.
const PRIVATE_SPELLINGS: &[&str] = &[
    "/api/private/secret.txt",
    "/api/public/../private/secret.txt",
    "/api/public/%2e%2e/private/secret.txt",
    "/api/public/%2E%2E/private/secret.txt",
    "/api/%70rivate/secret.txt",
    "/api//private/secret.txt",
    "/api/./private/secret.txt",
    "/api/%2e/private/secret.txt",
    "//api/private/secret.txt",
];

/// Which of the two request paths a connection starts on.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// A fresh connection: the front parses the head.
    Front,
    /// A connection already handed to hyper.
    Hyper,
}

impl Path {
    async fn conn(self, node: &Node) -> Conn {
        match self {
            Path::Front => Conn::to(node).await,
            Path::Hyper => Conn::held_by_hyper(node, HOST).await,
        }
    }
}

const BOTH: [Path; 2] = [Path::Front, Path::Hyper];

/// Catches: the router matching the raw text, so that a spelling of the private path
/// misses `/api/private/*` (and its key-auth plugin), matches `/api/*` and is forwarded
/// verbatim to a backend that normalises it — the private file without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_guarded_path_meets_its_plugin() {
    let (node, backend) = files_node().await;
    for path in BOTH {
        for spelling in PRIVATE_SPELLINGS {
            let mut conn = path.conn(&node).await;
            let response = conn.exchange(&get(spelling)).await;
            assert_eq!(
                response.status, 401,
                "{path:?} {spelling}: the key-auth plugin must answer: {response:?}"
            );
            assert_eq!(
                response.text(),
                "missing or unknown API key\n",
                "{path:?} {spelling}"
            );
            assert_eq!(backend.take(), Vec::<String>::new(), "{path:?} {spelling}");

            // With the key, the backend gets the path that was routed, not the spelling.
            let response = conn.exchange(&get_with_key(spelling)).await;
            assert_eq!(response.status, 200, "{path:?} {spelling}: {response:?}");
            assert_eq!(response.text(), "served /api/private/secret.txt");
            assert_eq!(
                backend.take(),
                ["/api/private/secret.txt"],
                "{path:?} {spelling}"
            );
        }
    }

    // The plugin's `log` phase (which runs after each response) saw the routed path too.
    let expected = 2 * BOTH.len() * PRIVATE_SPELLINGS.len();
    let lines = timeout(WAIT, async {
        loop {
            let lines = node.plugin_log_messages("key-auth").await;
            if lines.len() >= expected {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every request's log line");
    for line in &lines {
        assert!(
            line == "served GET /api/private/secret.txt 401"
                || line == "served GET /api/private/secret.txt 200",
            "req.path in the plugin: {line}"
        );
    }
}

/// Catches: the normal form routed but the raw target forwarded (or the reverse), the
/// query string touched, or the front leaving normalisation to hyper (the plain route
/// stays the front's: no `date` header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_route_forwards_the_path_it_routed_with_the_query_as_sent() {
    let (node, backend) = files_node().await;
    let cases = [
        ("/api/public/a.txt", "/api/public/a.txt"),
        ("/api/public/./a.txt", "/api/public/a.txt"),
        ("/api/public/x/../a.txt", "/api/public/a.txt"),
        ("/api/public//a.txt", "/api/public/a.txt"),
        ("/api/%70ublic/%61.txt", "/api/public/a.txt"),
        ("/api/public/a%20b%3a.txt", "/api/public/a%20b%3A.txt"),
        (
            "/api/public/./a.txt?q=%2F..%2e&r=/../x",
            "/api/public/a.txt?q=%2F..%2e&r=/../x",
        ),
        ("/api/public/..", "/api/"),
    ];
    for path in BOTH {
        let mut conn = path.conn(&node).await;
        for (sent, forwarded) in cases {
            let response = conn.exchange(&get(sent)).await;
            assert_eq!(response.status, 200, "{path:?} {sent}: {response:?}");
            assert_eq!(
                response.text(),
                format!("served {forwarded}"),
                "{path:?} {sent}"
            );
            assert_eq!(backend.take(), [forwarded], "{path:?} {sent}");
            assert_eq!(
                response.served_by_front(),
                matches!(path, Path::Front),
                "{path:?} {sent}: {response:?}"
            );
        }
    }
}

/// Catches: `..` escaping the only route's prefix (`/api/../secret.txt` is `/secret.txt`,
/// which no route serves), a climb above the root clamped or forwarded, and the encoded
/// separators, the backslash and broken `%` escapes passed to a backend that would
/// decode them differently. Each refusal is the node's JSON error, on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_escape_or_hide_a_separator_are_refused() {
    let (node, backend) = files_node().await;
    let refused = [
        ("/api/../secret.txt", 404, "not_found"),
        ("/api/public/../../secret.txt", 404, "not_found"),
        ("/api/public/../../../secret.txt", 400, "bad_path"),
        ("/api/../../secret.txt", 400, "bad_path"),
        ("/api/public/..%2Fprivate/secret.txt", 400, "bad_path"),
        ("/api/public%2f..%2fprivate/secret.txt", 400, "bad_path"),
        ("/api/public/..%5Cprivate/secret.txt", 400, "bad_path"),
        ("/api/public/..\\private/secret.txt", 400, "bad_path"),
        ("/api/public/%zz", 400, "bad_path"),
        ("/api/public/100%", 400, "bad_path"),
    ];
    for path in BOTH {
        for (sent, status, code) in refused {
            let mut conn = path.conn(&node).await;
            let response = conn.exchange(&get(sent)).await;
            assert_eq!(response.status, status, "{path:?} {sent}: {response:?}");
            assert_eq!(response.error_code(), code, "{path:?} {sent}");
            assert!(response.header("x-request-id").is_some(), "{response:?}");
            assert_eq!(backend.take(), Vec::<String>::new(), "{path:?} {sent}");
        }
    }
}

/// Catches: HTTP/2 (hyper's h2 server) routing the raw `:path`. reqwest's URL parser
/// already removes dot segments, so the spellings it keeps are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_are_normalised_too() {
    let (node, backend) = files_node().await;
    // `:authority` is `files.example:<port>`, resolved to the node.
    let address: SocketAddr = node.data.trim_start_matches("http://").parse().unwrap();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve(HOST, address)
        .build()
        .unwrap();
    let url = |path: &str| format!("http://{HOST}:{}{path}", address.port());
    for spelling in ["/api/%70rivate/secret.txt", "/api//private/secret.txt"] {
        let response = client.get(url(spelling)).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 401, "{spelling}");
    }
    let response = client
        .get(url("/api/public%2F..%2Fprivate/secret.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(backend.take(), Vec::<String>::new());
}

/// Catches: a function's `event.path` and `pathParameters` built from the raw path (on a
/// gateway route, on `/fn/{name}/...`), so a function that authorises on them sees another
/// path than the router did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_see_the_normal_path_and_parameters() {
    let node = Node::start_with(&["--workers", "1"]);
    node.deploy(
        "echo",
        r#"local json = require("json")
           return function(event)
             return { statusCode = 200,
                      body = json.encode({ path = event.path,
                                           params = event.pathParameters or json.null }) }
           end"#,
        json!({}),
    )
    .await;
    put(
        &node,
        "/v1/routes/echo",
        json!({"paths": ["/files/:dir/*rest"], "function": "echo"}),
    )
    .await;
    let cases = [
        (
            "/files/public/../private/%73ecret.txt",
            "/files/private/secret.txt",
            json!({"dir": "private", "rest": "secret.txt"}),
        ),
        (
            "/files//a/./b/%2e%2e/c%3a",
            "/files/a/c%3A",
            json!({"dir": "a", "rest": "c%3A"}),
        ),
        (
            "/fn/echo/x/%2E%2E/y//z",
            "/fn/echo/y/z",
            json!({"proxy": "y/z"}),
        ),
    ];
    for path in BOTH {
        for (sent, event_path, params) in &cases {
            let mut conn = path.conn(&node).await;
            let response = conn.exchange(&get(sent)).await;
            assert_eq!(response.status, 200, "{path:?} {sent}: {response:?}");
            let body: Value = serde_json::from_slice(&response.body).unwrap();
            assert_eq!(body["path"], *event_path, "{path:?} {sent}: {body}");
            assert_eq!(body["params"], *params, "{path:?} {sent}: {body}");
        }
    }
}

/// Catches: HTTP/1.1 heads without a `Host`, or with two (the first won), being routed and
/// proxied (RFC 9112 §3.2: `400`); an absolute-form target routed by the `Host` header
/// instead of its own authority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_needs_exactly_one_host_and_an_absolute_target_names_it() {
    let (node, backend) = files_node().await;
    let bad_heads = [
        "GET /api/public/a.txt HTTP/1.1\r\n\r\n".to_string(),
        format!("GET /api/public/a.txt HTTP/1.1\r\nHost: {HOST}\r\nHost: other.example\r\n\r\n"),
        format!("GET /api/public/a.txt HTTP/1.1\r\nHost: other.example\r\nHost: {HOST}\r\n\r\n"),
        format!("GET /api/private/a.txt HTTP/1.1\r\nHost: {HOST}\r\nHost: {HOST}\r\n\r\n"),
    ];
    for path in BOTH {
        for head in &bad_heads {
            let mut conn = path.conn(&node).await;
            let response = conn.exchange(head).await;
            assert_eq!(response.status, 400, "{path:?} {head:?}: {response:?}");
            assert_eq!(response.error_code(), "bad_host", "{path:?} {head:?}");
            assert_eq!(backend.take(), Vec::<String>::new(), "{path:?} {head:?}");
        }

        // The authority of an absolute-form target is the host, whatever `Host` says.
        let mut conn = path.conn(&node).await;
        let response = conn
            .exchange(&format!(
                "GET http://{HOST}/api/public/./a.txt HTTP/1.1\r\nHost: other.example\r\n\r\n"
            ))
            .await;
        assert_eq!(response.status, 200, "{path:?}: {response:?}");
        assert_eq!(backend.take(), ["/api/public/a.txt"], "{path:?}");
    }

    // HTTP/1.0 needs no `Host`: the route without hosts still serves it.
    put(
        &node,
        "/v1/routes/anyhost",
        json!({"paths": ["/open/*"], "upstream": "files"}),
    )
    .await;
    let mut conn = Conn::to(&node).await;
    let response = conn.exchange("GET /open/a HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(backend.take(), ["/open/a"]);
}

/// Catches: `CONNECT` forwarded upstream as an ordinary request (and its connection
/// pooled again): it is refused with the node's JSON error and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_the_connection_closed() {
    let (node, backend) = files_node().await;
    for path in BOTH {
        for target in ["/api/public/x", "files.example:80"] {
            let mut conn = path.conn(&node).await;
            let response = conn
                .exchange(&format!(
                    "CONNECT {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
                ))
                .await;
            assert_eq!(response.status, 405, "{path:?} {target}: {response:?}");
            assert_eq!(response.error_code(), "method_not_allowed");
            assert_eq!(response.header("connection"), Some("close"));
            conn.expect_closed().await;
            assert_eq!(backend.take(), Vec::<String>::new(), "{path:?} {target}");
        }
    }
}

/// Catches: a route pattern that no normalised request path can match accepted silently
/// (it would guard nothing): the admin API refuses it and names its normal form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_patterns_that_no_request_can_match_are_refused() {
    let (node, _backend) = files_node().await;
    for (pattern, says) in [
        ("/api/%70rivate/*", "write `/api/private/*`"),
        ("/api/./private/*", "write `/api/private/*`"),
        ("/api/a%3ab", "write `/api/a%3Ab`"),
        ("/api/a%2Fb", "encoded `/`"),
    ] {
        let (status, body) = node
            .admin_json(
                reqwest::Method::PUT,
                "/v1/routes/odd",
                Some(json!({"paths": [pattern], "upstream": "files"})),
            )
            .await;
        assert_eq!(status, 400, "{pattern}: {body}");
        assert_eq!(body["error"]["details"]["path"], "paths[0]", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{pattern}: {message}");
    }
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            "/v1/functions/routed",
            Some(
                json!({"source": "return function() return {statusCode = 200} end",
                        "config": {"route": "/a/../b"}}),
            ),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"]["path"], "config.route", "{body}");
}

/// The upstream gets a normal path also when a plugin wrote it: a `rewrite` that sets
/// `req.path` with dot segments or unreserved escapes is cleaned before forwarding, and
/// one the node refuses (an encoded `/`, a climb above the root) is the plugin's bad
/// result — a 500 naming the plugin, with the reason in the plugin's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_a_plugin_writes_is_normalised_or_refused() {
    let (node, backend) = files_node().await;
    put(
        &node,
        "/v1/plugins/rewriter",
        json!({"source": "return { rewrite = function(req, ctx)
            req.path = req.headers['x-new-path']
          end }"}),
    )
    .await;
    put(
        &node,
        "/v1/routes/rewritten",
        json!({"hosts": [HOST], "paths": ["/rewrite/*"], "upstream": "files",
               "plugins": [{"name": "rewriter"}]}),
    )
    .await;
    let rewrite = |new_path: &str| {
        format!("GET /rewrite/x HTTP/1.1\r\nHost: {HOST}\r\nx-new-path: {new_path}\r\n\r\n")
    };
    for (written, forwarded) in [
        (
            "/api/public/../private/%73ecret.txt",
            "/api/private/secret.txt",
        ),
        ("/a//b/./c", "/a/b/c"),
        ("/plain", "/plain"),
    ] {
        let mut conn = Conn::to(&node).await;
        let response = conn.exchange(&rewrite(written)).await;
        assert_eq!(response.status, 200, "{written}: {}", response.text());
        assert_eq!(backend.take(), [forwarded], "{written}");
    }
    for refused in ["/a/%2Fb", "/../etc/passwd"] {
        let mut conn = Conn::to(&node).await;
        let response = conn.exchange(&rewrite(refused)).await;
        assert_eq!(response.status, 500, "{refused}: {}", response.text());
        assert_eq!(response.error_code(), "plugin_error", "{refused}");
        assert!(backend.take().is_empty(), "{refused} was forwarded");
    }
    let log = node.plugin_log_messages("rewriter").await.join("\n");
    assert!(
        log.contains("rewrite: req.path '/a/%2Fb' is refused by the node"),
        "{log}"
    );
}
