//! The gateway over real sockets: routes to upstreams and functions, weighted balancing,
//! consistent hashing, load-aware balancers, retries that hide a dead node, passive
//! health, the headers a proxy adds, WebSocket pass-through, and admin validation of
//! routes and upstreams. Backends are small HTTP servers started by the test on loopback ports.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

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

    // Every attempt is counted per node and outcome: 40 answers from the live node, and
    // the dead node's 5 connect errors before passive health ejected it.
    let metrics = node.metrics().await;
    let attempts = |address: &SocketAddr, outcome: &str| {
        common::metric_value(
            &metrics,
            &format!(
                r#"moontide_upstream_attempts_total{{upstream="api",node="{address}",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(attempts(&live, "ok"), 40.0, "{metrics}");
    assert_eq!(attempts(&dead, "error"), 5.0, "{metrics}");

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
    let shown = &body["items"][0]["config"];
    assert_eq!(shown["upstream"], "u", "{body}");
    assert_eq!(shown["paths"], json!(["/r"]), "{body}");

    // What GET shows is the PUT shape with every default filled in: it goes back as is.
    let (_, upstream) = node
        .admin_json(reqwest::Method::GET, "/v1/upstreams/u", None)
        .await;
    assert_eq!(
        upstream["config"]["timeouts"]["connect"], 1000,
        "{upstream}"
    );
    let (status, again) = put(&node, "/v1/upstreams/u", upstream["config"].clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["config"], upstream["config"]);
    let (status, again) = put(&node, "/v1/routes/r", shown.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(&again["config"], shown);
}

/// A WebSocket backend that echoes every message, prefixed with its id.
async fn websocket_backend(id: &'static str) -> SocketAddr {
    use axum::extract::ws::{WebSocket, WebSocketUpgrade};
    async fn echo(mut socket: WebSocket, id: &'static str) {
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                axum::extract::ws::Message::Text(text) => {
                    axum::extract::ws::Message::Text(format!("{id}: {}", text.as_str()).into())
                }
                axum::extract::ws::Message::Binary(bytes) => {
                    axum::extract::ws::Message::Binary(bytes)
                }
                axum::extract::ws::Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    }
    let app = axum::Router::new().route(
        "/ws/chat",
        axum::routing::get(move |upgrade: WebSocketUpgrade| async move {
            upgrade.on_upgrade(move |socket| echo(socket, id))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through_the_gateway() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let node = Node::start();
    let chat = websocket_backend("chat").await;
    put(
        &node,
        "/v1/upstreams/chat",
        json!({"nodes": [{"address": chat.to_string()}]}),
    )
    .await;
    put(
        &node,
        "/v1/routes/chat",
        json!({"paths": ["/ws/*"], "upstream": "chat"}),
    )
    .await;

    let url = node.url("/ws/chat").replacen("http://", "ws://", 1);
    let (mut socket, response) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("the handshake goes through the gateway");
    assert_eq!(response.status(), 101);
    for round in 0..3 {
        socket
            .send(Message::text(format!("hello {round}")))
            .await
            .unwrap();
        let reply = socket.next().await.unwrap().unwrap();
        assert_eq!(reply, Message::text(format!("chat: hello {round}")));
    }
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    socket.send(Message::binary(payload.clone())).await.unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(
        reply.into_data().as_ref(),
        payload.as_slice(),
        "large frames pass whole"
    );
    socket.close(None).await.unwrap();

    // Plain requests on the same route still work (and are not upgrades).
    let (status, _) = get_json(&node, "/ws/chat").await;
    assert_ne!(status, 101);
}

async fn backend_of(node: &Node, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = node.http.get(node.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let body: Value = response.json().await.unwrap();
    body["backend"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_sticks_and_moves_only_the_leaving_nodes_keys() {
    let node = Node::start();
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let nodes = |addresses: &[SocketAddr]| {
        addresses
            .iter()
            .map(|a| json!({"address": a.to_string()}))
            .collect::<Vec<_>>()
    };
    let (status, body) = put(
        &node,
        "/v1/upstreams/users",
        json!({"nodes": nodes(&[a, b, c]), "balancer": "chash", "hash_on": {"header": "x-user"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    put(
        &node,
        "/v1/routes/users",
        json!({"paths": ["/u/*"], "upstream": "users"}),
    )
    .await;

    let users: Vec<String> = (0..150).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for user in &users {
        let first = backend_of(&node, "/u/x", &[("x-user", user)]).await;
        for _ in 0..2 {
            let again = backend_of(&node, "/u/x", &[("x-user", user)]).await;
            assert_eq!(again, first, "{user} sticks to its node");
        }
        before.insert(user.clone(), first);
    }
    let mut spread: HashMap<&str, usize> = HashMap::new();
    for backend in before.values() {
        *spread.entry(backend.as_str()).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "every node owns keys: {spread:?}");

    // Node b leaves: its keys move, no other key does.
    put(
        &node,
        "/v1/upstreams/users",
        json!({"nodes": nodes(&[a, c]), "balancer": "chash", "hash_on": {"header": "x-user"}}),
    )
    .await;
    for user in &users {
        let now = backend_of(&node, "/u/x", &[("x-user", user)]).await;
        if before[user] == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(
                now, before[user],
                "{user} did not belong to the leaving node"
            );
        }
    }

    // Other key sources: a query argument and a cookie.
    put(
        &node,
        "/v1/upstreams/users",
        json!({"nodes": nodes(&[a, b, c]), "balancer": "chash", "hash_on": {"query": "user"}}),
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for user in users.iter().take(30) {
        let path = format!("/u/x?user={user}");
        let first = backend_of(&node, &path, &[]).await;
        assert_eq!(backend_of(&node, &path, &[]).await, first);
        seen.insert(first);
    }
    assert!(seen.len() > 1, "query keys spread over the nodes");
    put(
        &node,
        "/v1/upstreams/users",
        json!({"nodes": nodes(&[a, b, c]), "balancer": "chash", "hash_on": {"cookie": "sid"}}),
    )
    .await;
    for user in users.iter().take(30) {
        let cookie = format!("theme=dark; sid={user}");
        let first = backend_of(&node, "/u/x", &[("cookie", &cookie)]).await;
        assert_eq!(
            backend_of(&node, "/u/x", &[("cookie", &cookie)]).await,
            first
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_and_ewma_avoid_a_slow_node() {
    // The slow node holds each request 300 ms; with 20 clients in flight the load-aware
    // balancers must send most requests to the fast nodes (round robin would give it a
    // third).
    let node = Node::start_with(&["--workers", "1"]);
    let (fast, other) = (backend("fast").await, backend("other").await);
    let slow = slow_backend("slow", Duration::from_millis(300)).await;
    for balancer in ["least_conn", "ewma"] {
        let (status, body) = put(
            &node,
            "/v1/upstreams/mixed",
            json!({"nodes": [{"address": fast.to_string()}, {"address": other.to_string()},
                             {"address": slow.to_string()}],
                   "balancer": balancer}),
        )
        .await;
        assert!(status == 200 || status == 201, "{status} {body}");
        put(
            &node,
            "/v1/routes/mixed",
            json!({"paths": ["/m/*"], "upstream": "mixed"}),
        )
        .await;
        // 20 clients, each sending 10 requests one after another.
        let clients = (0..20).map(|_| async {
            let mut got = Vec::new();
            for _ in 0..10 {
                got.push(backend_of(&node, "/m/x", &[]).await);
            }
            got
        });
        let mut counts: HashMap<String, usize> = HashMap::new();
        for backend in futures_util::future::join_all(clients)
            .await
            .into_iter()
            .flatten()
        {
            *counts.entry(backend).or_default() += 1;
        }
        let slow_share = counts.get("slow").copied().unwrap_or(0);
        assert!(
            slow_share < 200 / 5,
            "{balancer}: the slow node got {slow_share} of 200 (round robin: ~67): {counts:?}"
        );
    }
}

async fn slow_backend(id: &'static str, delay: Duration) -> SocketAddr {
    let app = axum::Router::new().fallback(move || async move {
        tokio::time::sleep(delay).await;
        axum::Json(json!({"backend": id}))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_sets_up_upstreams_functions_and_routes_from_one_manifest() {
    let node = Node::start();
    let web = backend("web").await;
    let dir = common::temp_files(&[
        (
            "fns/greet.lua",
            "return function(event) return 'hello ' .. event.pathParameters.who end",
        ),
        (
            "moontide.yaml",
            &format!(
                "# routes name objects defined further down: apply orders them itself\n\
                 routes:\n\
                 \x20 greet: {{paths: ['/hi/:who'], function: greet}}\n\
                 \x20 web: {{paths: ['/web/*'], upstream: web}}\n\
                 functions:\n\
                 \x20 greet:\n\
                 \x20   path: fns/greet.lua\n\
                 \x20   config: {{timeout: 2s}}\n\
                 upstreams:\n\
                 \x20 web:\n\
                 \x20   nodes: [{{address: '{web}'}}]\n"
            ),
        ),
    ]);
    let manifest = dir.path().join("moontide.yaml");
    let manifest = manifest.to_str().unwrap().to_string();
    let run = |args: Vec<String>| {
        let node_admin = node.admin.clone();
        let token = node.token.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BIN)
                .args(&args)
                .env("MOONTIDE_ADMIN", node_admin)
                .env("MOONTIDE_TOKEN", token)
                .output()
                .unwrap()
        })
    };
    let output = run(vec!["apply".into(), "-f".into(), manifest.clone()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "upstreams.web: created",
            "functions.greet: deployed version 1",
            "routes.greet: created",
            "routes.web: created"
        ]
    );
    let text = node
        .http
        .get(node.url("/hi/moon"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "hello moon");
    assert_eq!(get_json(&node, "/web/x").await.1["backend"], "web");

    // Applying the same file again changes nothing: the function keeps its version.
    let output = run(vec!["apply".into(), "-f".into(), manifest.clone()])
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success());
    assert!(
        stdout.contains("functions.greet: unchanged (version 1)"),
        "{stdout}"
    );
    let (_, versions) = node
        .admin_json(reqwest::Method::GET, "/v1/functions/greet/versions", None)
        .await;
    assert_eq!(
        versions["versions"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );

    // A refused object stops the apply and names the field inside the manifest.
    std::fs::write(
        &manifest,
        format!(
            "upstreams:\n  web: {{nodes: [{{address: '{web}'}}]}}\n\
             routes:\n  broken: {{paths: ['no-slash'], upstream: web}}\n  zzz: {{paths: ['/z'], upstream: web}}\n"
        ),
    )
    .unwrap();
    let output = run(vec!["apply".into(), "-f".into(), manifest])
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success());
    assert!(stderr.contains("at: routes.broken.paths[0]"), "{stderr}");
    assert!(stderr.contains("applied 1 of 3 objects"), "{stderr}");
    let (status, _) = node
        .admin_json(reqwest::Method::GET, "/v1/routes/zzz", None)
        .await;
    assert_eq!(status, 404, "objects after the refused one are not applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_manifest_applies() {
    let node = Node::start();
    let manifest = common::examples_dir().join("gateway/moontide.yaml");
    let output = {
        let (admin, token) = (node.admin.clone(), node.token.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BIN)
                .args(["apply", "-f", manifest.to_str().unwrap()])
                .env("MOONTIDE_ADMIN", admin)
                .env("MOONTIDE_TOKEN", token)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let response = node.http.get(node.url("/hello/moon")).send().await.unwrap();
    assert_eq!(
        response.status(),
        401,
        "the example's key-auth plugin guards the route"
    );
    let response = node
        .http
        .get(node.url("/hello/moon"))
        .header("x-api-key", "demo-key-1234")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-served-for"], "demo***");
}
