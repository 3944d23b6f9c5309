//! Upstream health over real sockets: active HTTP and TCP checks eject and re-admit nodes,
//! checks start as soon as an upstream is configured, node health survives upstream
//! edits, removed nodes stop being probed, and the circuit breaker opens, half-opens and
//! closes. Backends are small HTTP servers started by the test on loopback ports; every
//! wait polls for a condition with a generous deadline (no timing is asserted).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use common::{Node, metric_value};
use serde_json::{Value, json};

/// A backend that names itself, counts what reaches it, and can be told to fail its
/// health endpoint (`/healthz`) or its traffic (every other path: 500).
struct Backend {
    id: &'static str,
    address: SocketAddr,
    /// `/healthz` answers 200 (else 500).
    healthy: AtomicBool,
    /// Traffic answers 500 (else 200).
    failing: AtomicBool,
    /// Requests to `/healthz`.
    probes: AtomicUsize,
    /// `/healthz` requests answered 200.
    probes_ok: AtomicUsize,
    /// Every other request.
    hits: AtomicUsize,
}

impl Backend {
    async fn start(id: &'static str) -> Arc<Backend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = Arc::new(Backend {
            id,
            address: listener.local_addr().unwrap(),
            healthy: AtomicBool::new(true),
            failing: AtomicBool::new(false),
            probes: AtomicUsize::new(0),
            probes_ok: AtomicUsize::new(0),
            hits: AtomicUsize::new(0),
        });
        async fn answer(
            State(b): State<Arc<Backend>>,
            request: Request,
        ) -> axum::response::Response {
            let status = if request.uri().path() == "/healthz" {
                b.probes.fetch_add(1, Ordering::SeqCst);
                if b.healthy.load(Ordering::SeqCst) {
                    b.probes_ok.fetch_add(1, Ordering::SeqCst);
                    200
                } else {
                    500
                }
            } else {
                b.hits.fetch_add(1, Ordering::SeqCst);
                if b.failing.load(Ordering::SeqCst) {
                    500
                } else {
                    200
                }
            };
            axum::response::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(json!({"backend": b.id}).to_string()))
                .unwrap()
        }
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(backend.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        backend
    }

    fn addr(&self) -> String {
        self.address.to_string()
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A loopback address nothing listens on.
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `condition` every 20 ms until it holds; panics with `what` after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !condition().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn put(node: &Node, path: &str, body: Value) -> (u16, Value) {
    node.admin_json(reqwest::Method::PUT, path, Some(body))
        .await
}

async fn put_ok(node: &Node, path: &str, body: Value) {
    let (status, body) = put(node, path, body).await;
    assert!(status == 200 || status == 201, "{status} {body}");
}

/// The `status` of each node of `upstream` from the admin API: address → (healthy, breaker).
async fn node_status(node: &Node, upstream: &str) -> Vec<(String, bool, String)> {
    let (status, body) = node
        .admin_json(
            reqwest::Method::GET,
            &format!("/v1/upstreams/{upstream}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["status"]["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no status in {body}"))
        .iter()
        .map(|n| {
            (
                n["address"].as_str().unwrap().to_string(),
                n["healthy"].as_bool().unwrap(),
                n["breaker"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn is_healthy(node: &Node, upstream: &str, address: &str) -> bool {
    node_status(node, upstream)
        .await
        .into_iter()
        .find(|(a, _, _)| a == address)
        .unwrap_or_else(|| panic!("{address} is not a node of {upstream}"))
        .1
}

/// Sends a request through the route and returns (status, answering backend's id).
async fn request(node: &Node, path: &str) -> (u16, Option<String>) {
    let response = node.http.get(node.url(path)).send().await.expect("request");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["backend"].as_str().map(str::to_string))
}

fn http_check(interval: &str) -> Value {
    json!({"path": "/healthz", "interval": interval, "timeout": "2s",
           "healthy_threshold": 2, "unhealthy_threshold": 2})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_eject_a_failing_node_and_readmit_it() {
    let node = Node::start();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    put_ok(
        &node,
        "/v1/upstreams/web",
        json!({"nodes": [{"address": a.addr()}, {"address": b.addr()}],
               "health": {"active": http_check("50ms")}}),
    )
    .await;
    put_ok(
        &node,
        "/v1/routes/web",
        json!({"path": "/web/*", "upstream": "web"}),
    )
    .await;

    b.healthy.store(false, Ordering::SeqCst);
    eventually("b ejected", || async {
        !is_healthy(&node, "web", &b.addr()).await
    })
    .await;
    assert!(is_healthy(&node, "web", &a.addr()).await);
    let b_hits = b.hits();
    for _ in 0..20 {
        assert_eq!(request(&node, "/web/x").await, (200, Some("a".into())));
    }
    assert_eq!(b.hits(), b_hits, "an ejected node gets no traffic");
    let metrics = node.metrics().await;
    let series =
        |name: &str, who: &Backend| format!("{name}{{upstream=\"web\",node=\"{}\"}}", who.addr());
    assert_eq!(
        metric_value(&metrics, &series("moontide_upstream_node_healthy", &b)),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, &series("moontide_upstream_node_healthy", &a)),
        1.0,
        "{metrics}"
    );
    let ejected = format!(
        "moontide_upstream_health_transitions_total{{upstream=\"web\",node=\"{}\",to=\"unhealthy\",cause=\"active\"}}",
        b.addr()
    );
    assert_eq!(metric_value(&metrics, &ejected), 1.0, "{metrics}");

    // Healthy again: re-admitted only once `healthy_threshold` (2) checks passed.
    b.probes_ok.store(0, Ordering::SeqCst);
    b.healthy.store(true, Ordering::SeqCst);
    eventually("b re-admitted", || async {
        is_healthy(&node, "web", &b.addr()).await
    })
    .await;
    assert!(
        b.probes_ok.load(Ordering::SeqCst) >= 2,
        "re-admitted after fewer than healthy_threshold passing checks"
    );
    eventually("b serves again", || async {
        request(&node, "/web/x").await == (200, Some("b".into()))
    })
    .await;
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(&metrics, &series("moontide_upstream_node_healthy", &b)),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_upstream_is_checked_from_the_moment_it_is_configured() {
    let node = Node::start();
    let a = Backend::start("a").await;
    put_ok(
        &node,
        "/v1/upstreams/solo",
        json!({"nodes": [{"address": a.addr()}],
               "health": {"active": {"type": "http", "path": "/healthz", "interval": "50ms"}}}),
    )
    .await;
    eventually("probes reach the only node", || async { a.probes() >= 3 }).await;
    assert_eq!(a.hits(), 0, "no client request was sent");
    // Without a check, nothing is probed.
    let quiet = Backend::start("quiet").await;
    put_ok(
        &node,
        "/v1/upstreams/quiet",
        json!({"nodes": [{"address": quiet.addr()}]}),
    )
    .await;
    let seen = a.probes();
    eventually("more probes of solo", || async { a.probes() >= seen + 3 }).await;
    assert_eq!(quiet.probes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_health_survives_upstream_edits_and_removed_nodes_are_no_longer_probed() {
    let node = Node::start();
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    put_ok(
        &node,
        "/v1/upstreams/web",
        json!({"nodes": [{"address": a.addr()}, {"address": b.addr()}],
               "health": {"active": http_check("50ms")}}),
    )
    .await;
    put_ok(
        &node,
        "/v1/routes/web",
        json!({"path": "/web/*", "upstream": "web"}),
    )
    .await;
    b.healthy.store(false, Ordering::SeqCst);
    eventually("b ejected", || async {
        !is_healthy(&node, "web", &b.addr()).await
    })
    .await;

    // Add a node, change a weight and slow the checks down: were b's state reset, it would
    // count as healthy for at least the next two check intervals (10 s).
    put_ok(
        &node,
        "/v1/upstreams/web",
        json!({"nodes": [{"address": a.addr(), "weight": 2}, {"address": b.addr()},
                         {"address": c.addr()}],
               "health": {"active": {"path": "/healthz", "interval": "5s",
                                     "unhealthy_threshold": 3}}}),
    )
    .await;
    assert!(
        !is_healthy(&node, "web", &b.addr()).await,
        "health was lost in the edit"
    );
    let b_hits = b.hits();
    let mut answered = std::collections::HashSet::new();
    for _ in 0..30 {
        let (status, backend) = request(&node, "/web/x").await;
        assert_eq!(status, 200);
        answered.insert(backend.unwrap());
    }
    assert_eq!(
        b.hits(),
        b_hits,
        "the ejected node got traffic after the edit"
    );
    assert!(
        answered.contains("a") && answered.contains("c"),
        "{answered:?}"
    );

    // Remove b (and check faster again): its probes stop while c's go on.
    put_ok(
        &node,
        "/v1/upstreams/web",
        json!({"nodes": [{"address": a.addr()}, {"address": c.addr()}],
               "health": {"active": http_check("50ms")}}),
    )
    .await;
    let c_seen = c.probes();
    eventually("c probed after the edit", || async {
        c.probes() >= c_seen + 2
    })
    .await;
    let b_probes = b.probes();
    let c_seen = c.probes();
    eventually("c probed more", || async { c.probes() >= c_seen + 5 }).await;
    assert_eq!(b.probes(), b_probes, "a removed node is still probed");
    let metrics = node.metrics().await;
    assert!(
        !metrics.contains(&b.addr()),
        "series of a removed node remain: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_check_ejects_a_node_whose_port_is_closed() {
    let node = Node::start();
    let live = Backend::start("live").await;
    let dead = dead_address();
    put_ok(
        &node,
        "/v1/upstreams/tcp",
        json!({"nodes": [{"address": live.addr()}, {"address": dead}],
               "health": {"active": {"type": "tcp", "interval": "50ms", "unhealthy_threshold": 2},
                          "passive": {"unhealthy_threshold": 0}}}),
    )
    .await;
    eventually("the dead node is ejected", || async {
        !is_healthy(&node, "tcp", &dead).await
    })
    .await;
    assert!(is_healthy(&node, "tcp", &live.addr()).await);
    assert_eq!(live.probes(), 0, "a TCP check sends no HTTP request");
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            &format!("moontide_upstream_node_healthy{{upstream=\"tcp\",node=\"{dead}\"}}")
        ),
        0.0
    );
    assert!(
        metrics.contains(&format!(
            "moontide_upstream_node_healthy{{upstream=\"tcp\",node=\"{dead}\"}} 0"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_sheds_half_opens_and_closes() {
    let node = Node::start();
    let a = Backend::start("a").await;
    put_ok(
        &node,
        "/v1/upstreams/flaky",
        json!({"nodes": [{"address": a.addr()}],
               "health": {"passive": {"unhealthy_threshold": 0}},
               "breaker": {"failures": 3, "open": "2s"}}),
    )
    .await;
    put_ok(
        &node,
        "/v1/routes/flaky",
        json!({"path": "/flaky/*", "upstream": "flaky"}),
    )
    .await;
    a.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(request(&node, "/flaky/x").await, (500, Some("a".into())));
    }
    // Open: refused at the gateway without reaching the node.
    assert_eq!(request(&node, "/flaky/x").await, (503, None));
    assert_eq!(a.hits(), 3);
    let status = node_status(&node, "flaky").await;
    assert_eq!(status[0].2, "open", "{status:?}");
    let metrics = node.metrics().await;
    let breaker = format!(
        "moontide_upstream_node_breaker{{upstream=\"flaky\",node=\"{}\"}}",
        a.addr()
    );
    assert_eq!(metric_value(&metrics, &breaker), 1.0, "{metrics}");

    // After the open period one trial goes through; it fails: open again.
    eventually("a trial reaches the node", || async {
        let (status, _) = request(&node, "/flaky/x").await;
        assert!(status == 503 || status == 500, "{status}");
        status == 500
    })
    .await;
    assert_eq!(a.hits(), 4, "only one trial while half-open");
    assert_eq!(request(&node, "/flaky/x").await, (503, None));
    assert_eq!(a.hits(), 4);

    // The node recovers: the next trial succeeds and the breaker closes.
    a.failing.store(false, Ordering::SeqCst);
    eventually("the breaker closes", || async {
        let (status, _) = request(&node, "/flaky/x").await;
        assert!(status == 503 || status == 200, "{status}");
        status == 200
    })
    .await;
    assert_eq!(a.hits(), 5);
    for _ in 0..5 {
        assert_eq!(request(&node, "/flaky/x").await, (200, Some("a".into())));
    }
    assert_eq!(a.hits(), 10);
    assert_eq!(node_status(&node, "flaky").await[0].2, "closed");
    let metrics = node.metrics().await;
    let opened = format!(
        "moontide_upstream_breaker_transitions_total{{upstream=\"flaky\",node=\"{}\",to=\"open\"}}",
        a.addr()
    );
    assert_eq!(metric_value(&metrics, &opened), 2.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_breaker_settings_are_validated_with_field_paths() {
    let node = Node::start();
    let paths_of = |body: &Value| -> Vec<String> {
        body["error"]["details"]["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors in {body}"))
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, body) = put(
        &node,
        "/v1/upstreams/bad",
        json!({"nodes": [{"address": "127.0.0.1:1"}],
               "health": {"active": {"type": "udp", "path": "x", "interval": "abc",
                                     "timeout": "0ms", "healthy_threshold": 0,
                                     "unhealthy_threshold": 100000,
                                     "statuses": [200, "600", "300-200", true]},
                          "passive": {"unhealthy_threshold": 100000, "recovery": "soon"}},
               "breaker": {"failures": 100000, "open": "x", "max_open": "0ms",
                           "half_open_probes": 0, "successes": 0,
                           "ratio": {"ratio": 1.5, "min_requests": 0, "window": "1ms"}}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        paths_of(&body),
        [
            "health.active.type",
            "health.active.path",
            "health.active.statuses[1]",
            "health.active.statuses[2]",
            "health.active.statuses[3]",
            "health.active.interval",
            "health.active.timeout",
            "health.active.healthy_threshold",
            "health.active.unhealthy_threshold",
            "health.passive.unhealthy_threshold",
            "health.passive.recovery",
            "breaker.failures",
            "breaker.open",
            "breaker.max_open",
            "breaker.half_open_probes",
            "breaker.successes",
            "breaker.ratio.ratio",
            "breaker.ratio.min_requests",
            "breaker.ratio.window",
        ]
    );
    // TCP checks take no HTTP fields.
    let (status, body) = put(
        &node,
        "/v1/upstreams/bad",
        json!({"nodes": [{"address": "127.0.0.1:1"}],
               "health": {"active": {"type": "tcp", "path": "/healthz"}}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(paths_of(&body), ["health.active.path"]);
    // A negative count is refused by the JSON shape, with its path.
    let (status, body) = put(
        &node,
        "/v1/upstreams/bad",
        json!({"nodes": [{"address": "127.0.0.1:1"}], "breaker": {"failures": -1}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(paths_of(&body), ["breaker.failures"]);

    // What the API shows has every default filled in, in the PUT shape.
    let (status, body) = put(
        &node,
        "/v1/upstreams/good",
        json!({"nodes": [{"address": "127.0.0.1:1"}], "health": {"active": {}}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["config"]["health"],
        json!({"active": {"type": "http", "path": "/healthz", "interval": 2000,
                          "timeout": 1000, "healthy_threshold": 2,
                          "unhealthy_threshold": 3, "statuses": ["200-399"]},
               "passive": {"unhealthy_threshold": 5, "recovery": 10000}})
    );
    assert_eq!(
        body["config"]["breaker"],
        json!({"failures": 5, "open": 10000, "max_open": 300000,
               "half_open_probes": 1, "successes": 1})
    );
}
