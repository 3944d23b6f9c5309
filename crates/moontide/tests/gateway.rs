//! The gateway over real sockets: routes to upstreams and functions, weighted balancing,
//! retries that hide a dead node, the headers a proxy adds, and admin validation of routes
//! and upstreams. Backends are small HTTP servers started by the test on loopback ports.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::{Request, State};
use common::Node;
use serde_json::{Value, json};

/// Starts a backend answering every request with JSON naming itself and echoing what a
/// proxy sets. `?status=N` answers with that status.
async fn backend(id: &'static str) -> SocketAddr {
    async fn answer(State(id): State<&'static str>, request: Request) -> axum::response::Response {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let status = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("status="))
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(200);
        let body = json!({
            "backend": id,
            "method": request.method().as_str(),
            "path": request.uri().path(),
            "host": header("host"),
            "x_forwarded_for": header("x-forwarded-for"),
            "x_forwarded_proto": header("x-forwarded-proto"),
            "x_forwarded_host": header("x-forwarded-host"),
        });
        axum::response::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(answer).with_state(id);
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// A loopback address nothing listens on.
async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn put(node: &Node, path: &str, body: Value) -> (u16, Value) {
    node.admin_json(reqwest::Method::PUT, path, Some(body))
        .await
}

async fn get_json(node: &Node, path: &str) -> (u16, Value) {
    let response = node.http.get(node.url(path)).send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_spreads_by_weight() {
    let node = Node::start_with(&["--workers", "1"]);
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let (status, body) = put(
        &node,
        "/v1/upstreams/web",
        json!({"nodes": [{"address": a.to_string(), "weight": 1},
                         {"address": b.to_string(), "weight": 2},
                         {"address": c.to_string(), "weight": 3}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(
        &node,
        "/v1/routes/web",
        json!({"path": "/web/*", "upstream": "web"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..600 {
        let (status, body) = get_json(&node, "/web/x").await;
        assert_eq!(status, 200, "{body}");
        *counts
            .entry(body["backend"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    // One worker thread: smooth weighted round robin is exact.
    assert_eq!(counts["a"], 100, "{counts:?}");
    assert_eq!(counts["b"], 200, "{counts:?}");
    assert_eq!(counts["c"], 300, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_dead_node_and_the_proxy_sets_forwarding_headers() {
    let node = Node::start();
    let live = backend("live").await;
    let dead = dead_address().await;
    put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": dead.to_string()}, {"address": live.to_string()}],
               "retries": {"attempts": 1}}),
    )
    .await;
    put(
        &node,
        "/v1/routes/api",
        json!({"paths": ["/api/*"], "upstream": "api"}),
    )
    .await;
    for _ in 0..40 {
        let response = node
            .http
            .get(node.url("/api/users?x=1"))
            .header("host", "shop.example")
            .header("x-forwarded-for", "10.1.2.3")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["backend"], "live");
        assert_eq!(body["path"], "/api/users");
        assert_eq!(
            body["host"], "shop.example",
            "the client's Host passes by default"
        );
        assert_eq!(body["x_forwarded_for"], "10.1.2.3, 127.0.0.1");
        assert_eq!(body["x_forwarded_proto"], "http");
        assert_eq!(body["x_forwarded_host"], "shop.example");
    }

    // Passive health: the dead node failed live traffic five times in a row above, so it
    // is out now, and even without retries nothing fails.
    put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": dead.to_string()}, {"address": live.to_string()}],
               "retries": {"attempts": 0}, "host": "node"}),
    )
    .await;
    for _ in 0..10 {
        let (status, body) = get_json(&node, "/api/x").await;
        assert_eq!(status, 200, "the ejected node is kept out across the edit");
        assert_eq!(
            body["host"],
            live.to_string(),
            "host: node sends the node's address"
        );
    }

    // A node never seen before starts healthy: without retries its share fails with 502
    // until five consecutive failures eject it (the passive threshold), then none does.
    let dead_too = dead_address().await;
    put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": dead_too.to_string()}, {"address": live.to_string()}],
               "retries": {"attempts": 0}}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(get_json(&node, "/api/x").await.0);
    }
    let failed = statuses.iter().filter(|s| **s == 502).count();
    assert_eq!(failed, 5, "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 200), "{statuses:?}");

    // A listed status is retried on the next node for an idempotent request, not for POST.
    let other = backend("other").await;
    put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": live.to_string()}, {"address": other.to_string()}],
               "retries": {"attempts": 1, "on": [503]}}),
    )
    .await;
    let (status, _) = get_json(&node, "/api/x?status=503").await;
    assert_eq!(
        status, 503,
        "both nodes answered 503: the last answer is passed on"
    );
    let post = node
        .http
        .post(node.url("/api/x?status=503"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reach_functions_with_their_params() {
    let node = Node::start();
    node.deploy(
        "users",
        r#"return function(event)
             return { statusCode = 200, body = event.pathParameters.id .. " " .. event.resource }
           end"#,
        json!({}),
    )
    .await;
    let (status, body) = put(
        &node,
        "/v1/routes/user",
        json!({"path": "/users/:id", "methods": ["GET"], "function": "users"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let response = node.get("/users/42").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "42 /users/:id");
    let post = node.http.post(node.url("/users/42")).send().await.unwrap();
    assert_eq!(post.status(), 404, "methods: GET only");

    // Removing the route stops it at once.
    let (status, _) = node
        .admin_json(reqwest::Method::DELETE, "/v1/routes/user", None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(node.get("/users/42").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routes_and_upstreams_are_refused_with_field_paths() {
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
        json!({"nodes": [{"address": "no-port"}, {"address": "127.0.0.1:1", "weight": 0}],
               "balancer": "chash", "timeouts": {"read": "forever"}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        paths_of(&body),
        [
            "nodes[0].address",
            "nodes[1].weight",
            "hash_on",
            "timeouts.read"
        ]
    );

    let (status, body) = put(
        &node,
        "/v1/routes/bad",
        json!({"paths": ["no-slash", "/a/*/b"], "hosts": ["bad host"], "function": "f"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let mut paths = paths_of(&body);
    paths.sort();
    assert_eq!(paths, ["hosts[0]", "paths[0]", "paths[1]"], "{body}");

    let (status, body) = put(
        &node,
        "/v1/routes/r",
        json!({"path": "/r", "upstream": "missing"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(paths_of(&body), ["upstream"]);

    let (status, body) = put(
        &node,
        "/v1/routes/r",
        json!({"path": "/r", "unknown": 1, "upstream": "u"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // An upstream in use cannot be deleted.
    let live = backend("b").await;
    put(
        &node,
        "/v1/upstreams/u",
        json!({"nodes": [{"address": live.to_string()}]}),
    )
    .await;
    let (status, body) = put(
        &node,
        "/v1/routes/r",
        json!({"path": "/r", "upstream": "u"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = node
        .admin_json(reqwest::Method::DELETE, "/v1/upstreams/u", None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["details"]["routes"], json!(["r"]));
    let (status, body) = node
        .admin_json(reqwest::Method::GET, "/v1/routes", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["items"][0]["config"]["target"],
        json!({"upstream": "u"})
    );
}
