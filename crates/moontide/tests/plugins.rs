//! Lua plugins over real sockets: one plugin with all five phases on a route to an
//! upstream and on a route to a function, `ctx` across phases and requests, a hostile
//! plugin, and admin validation of plugins and of routes' plugin lists. Backends are small
//! HTTP servers started by the test on loopback ports.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use common::Node;
use serde_json::{Value, json};

/// A backend that counts its requests and answers with JSON echoing what it received.
async fn backend() -> (SocketAddr, Arc<AtomicUsize>) {
    async fn answer(
        State(hits): State<Arc<AtomicUsize>>,
        request: Request,
    ) -> axum::response::Response {
        hits.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = request.into_parts();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let echo = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "x_rewritten": header("x-rewritten"),
            "x_key": header("x-key"),
            "body": String::from_utf8_lossy(&body),
        });
        axum::response::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("x-backend", "yes")
            .body(axum::body::Body::from(echo.to_string()))
            .unwrap()
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(hits.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, hits)
}

/// Every phase: rewrite changes the path and adds a header, access wants `x-key: secret`
/// (401 otherwise), header_filter reports what `ctx` holds, body_filter wraps the body,
/// log writes a line to the plugin's log.
const ALL_PHASES: &str = r#"
local P = {}
function P.rewrite(req, ctx)
  ctx.trace = 'rewrite'
  req.path = '/rewritten' .. req.path
  req.headers['x-rewritten'] = ctx.conf.tag or 'none'
  req.query.added = 'yes'
end
function P.access(req, ctx)
  ctx.trace = ctx.trace .. ',access'
  if req.headers['x-key'] ~= 'secret' then
    return { statusCode = 401, headers = { ['content-type'] = 'text/plain' },
             body = 'denied by ' .. ctx.plugin_name .. ' on ' .. ctx.route }
  end
  ctx.count = (ctx.count or 0) + 1
end
function P.header_filter(res, ctx)
  ctx.trace = ctx.trace .. ',header_filter'
  res.headers['x-trace'] = ctx.trace
  res.headers['x-count'] = ctx.count
  res.headers['x-conf'] = ctx.conf.tag
end
function P.body_filter(res, ctx)
  res.body = 'filtered:' .. res.body
end
function P.log(req, res, ctx)
  ctx.log('logged ' .. ctx.request_id .. ' ' .. res.status .. ' ' .. req.path .. ' ' .. ctx.trace)
end
return P
"#;

async fn put(node: &Node, path: &str, body: Value) -> (u16, Value) {
    node.admin_json(reqwest::Method::PUT, path, Some(body))
        .await
}

/// Waits (bounded) for a line containing `needle` in the plugin's log: the log phase runs
/// after the response was handed back.
async fn wait_for_log(node: &Node, name: &str, needle: &str) -> String {
    for _ in 0..200 {
        if let Some(line) = node
            .plugin_log_messages(name)
            .await
            .into_iter()
            .find(|line| line.contains(needle))
        {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "no log line with {needle:?} in {:?}",
        node.plugin_log_messages(name).await
    );
}

async fn send(
    node: &Node,
    path: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = node.http.post(node.url(path)).body("payload");
    if let Some(key) = key {
        request = request.header("x-key", key);
    }
    let response = request.send().await.expect("data-plane request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_runs_on_a_route_to_an_upstream() {
    let node = Node::start_with(&["--workers", "1"]);
    let (address, hits) = backend().await;
    let (status, body) = put(&node, "/v1/plugins/auth", json!({"source": ALL_PHASES})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["phases"],
        json!(["rewrite", "access", "header_filter", "body_filter", "log"])
    );
    let (status, body) = put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": address.to_string()}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(
        &node,
        "/v1/routes/api",
        json!({"path": "/api/*", "upstream": "api",
               "plugins": [{"name": "auth", "config": {"tag": "t1"}}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // access ends the request without the key: the backend is not reached, the filters
    // do not run on the plugin's own response, log does.
    let (status, headers, text) = send(&node, "/api/x", None).await;
    assert_eq!(status, 401, "{text}");
    assert_eq!(text, "denied by auth on api");
    assert_eq!(header(&headers, "x-trace"), "");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the backend was not reached"
    );
    let denied_id = header(&headers, "x-request-id").to_string();
    let line = wait_for_log(&node, "auth", &denied_id).await;
    assert_eq!(
        line,
        format!("logged {denied_id} 401 /rewritten/api/x rewrite,access")
    );

    // With the key: the backend sees the rewritten request; the filters change the
    // response; ctx lived across the phases of each request and not across requests
    // (both requests run on the same instance: one worker, concurrency 100).
    for _ in 0..2 {
        let (status, headers, text) = send(&node, "/api/x?q=1", Some("secret")).await;
        assert_eq!(status, 200, "{text}");
        let echoed: Value = serde_json::from_str(
            text.strip_prefix("filtered:")
                .unwrap_or_else(|| panic!("body_filter ran: {text}")),
        )
        .unwrap();
        assert_eq!(echoed["path"], "/rewritten/api/x");
        assert_eq!(echoed["query"], "added=yes&q=1");
        assert_eq!(echoed["x_rewritten"], "t1");
        assert_eq!(echoed["body"], "payload");
        assert_eq!(header(&headers, "x-backend"), "yes");
        assert_eq!(header(&headers, "x-trace"), "rewrite,access,header_filter");
        assert_eq!(header(&headers, "x-count"), "1", "ctx is per request");
        assert_eq!(header(&headers, "x-conf"), "t1", "ctx.conf is the route's");
        assert_eq!(
            header(&headers, "content-length"),
            text.len().to_string(),
            "the length is the filtered body's"
        );
        let id = header(&headers, "x-request-id").to_string();
        let line = wait_for_log(&node, "auth", &id).await;
        assert_eq!(
            line,
            format!("logged {id} 200 /rewritten/api/x rewrite,access,header_filter")
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // A plugin change serves the next request.
    let (status, body) = put(
        &node,
        "/v1/plugins/auth",
        json!({"source": "return { header_filter = function(res) res.headers['x-v'] = '2' end }"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, _) = send(&node, "/api/x", None).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-v"), "2");

    let metrics = node.metrics().await;
    assert!(
        common::metric_value(
            &metrics,
            r#"moontide_plugin_phase_calls_total{plugin="auth",phase="access"}"#
        ) >= 3.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_runs_on_a_route_to_a_function() {
    let node = Node::start();
    node.deploy(
        "echo",
        r#"local json = require('json')
           return function(event)
             return { statusCode = 200, body = json.encode({
               path = event.path, header = event.headers['x-rewritten'],
               added = event.queryStringParameters and event.queryStringParameters.added,
               body = event.body }) }
           end"#,
        json!({}),
    )
    .await;
    let (status, body) = put(&node, "/v1/plugins/auth", json!({"source": ALL_PHASES})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(
        &node,
        "/v1/routes/fn",
        json!({"path": "/fnr/*", "function": "echo",
               "plugins": [{"name": "auth", "config": {"tag": "t2"}}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let (status, _, text) = send(&node, "/fnr/x", None).await;
    assert_eq!(status, 401, "{text}");
    assert_eq!(text, "denied by auth on fn");

    let (status, headers, text) = send(&node, "/fnr/x", Some("secret")).await;
    assert_eq!(status, 200, "{text}");
    let seen: Value =
        serde_json::from_str(text.strip_prefix("filtered:").expect("filtered")).unwrap();
    assert_eq!(
        seen,
        json!({"path": "/rewritten/fnr/x", "header": "t2", "added": "yes", "body": "payload"})
    );
    assert_eq!(header(&headers, "x-trace"), "rewrite,access,header_filter");
    assert_eq!(header(&headers, "x-conf"), "t2");
    let id = header(&headers, "x-request-id").to_string();
    wait_for_log(&node, "auth", &format!("logged {id} 200 /rewritten/fnr/x")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_run_in_order_and_errors_answer_with_the_request_id() {
    let node = Node::start();
    let (address, hits) = backend().await;
    put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": address.to_string()}]}),
    )
    .await;
    // Two plugins: each appends to a header in rewrite and header_filter, so the order
    // shows; the second fails in header_filter when asked to.
    for (name, source) in [
        (
            "first",
            "return { rewrite = function(req) req.headers['x-rewritten'] = 'first' end,
                      header_filter = function(res) res.headers['x-order'] = (res.headers['x-order'] or '') .. 'first,' end }",
        ),
        (
            "second",
            "return { rewrite = function(req) req.headers['x-rewritten'] = req.headers['x-rewritten'] .. ',second' end,
                      header_filter = function(res, ctx)
                        if ctx.conf.fail then error('boom in header_filter') end
                        res.headers['x-order'] = (res.headers['x-order'] or '') .. 'second'
                      end }",
        ),
    ] {
        let (status, body) = put(&node, &format!("/v1/plugins/{name}"), json!({"source": source})).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = put(
        &node,
        "/v1/routes/ordered",
        json!({"path": "/ordered", "upstream": "api",
               "plugins": [{"name": "first"}, {"name": "second"}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, headers, text) = send(&node, "/ordered", None).await;
    assert_eq!(status, 200, "{text}");
    let echoed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(echoed["x_rewritten"], "first,second");
    assert_eq!(header(&headers, "x-order"), "first,second");

    let (status, body) = put(
        &node,
        "/v1/routes/ordered",
        json!({"path": "/ordered", "upstream": "api",
               "plugins": [{"name": "first"}, {"name": "second", "config": {"fail": true}}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, text) = send(&node, "/ordered", None).await;
    assert_eq!(status, 500, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "plugin_error");
    assert_eq!(error["error"]["details"]["plugin"], "second");
    assert_eq!(error["error"]["details"]["phase"], "header_filter");
    let id = header(&headers, "x-request-id");
    assert_eq!(error["error"]["details"]["request_id"], id);
    assert!(
        !text.contains("boom"),
        "the message stays in the log: {text}"
    );
    wait_for_log(&node, "second", "boom in header_filter").await;
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_plugin_times_out_and_the_node_keeps_serving() {
    let node = Node::start();
    let (address, hits) = backend().await;
    put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": address.to_string()}]}),
    )
    .await;
    let (status, body) = put(
        &node,
        "/v1/plugins/spin",
        json!({"source": "return { access = function() while true do pcall(function() while true do end end) end end }",
               "config": {"timeout": "200ms"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(
        &node,
        "/v1/plugins/fine",
        json!({"source": "return { log = function() end }"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    put(
        &node,
        "/v1/routes/hostile",
        json!({"path": "/hostile", "upstream": "api", "plugins": [{"name": "spin"}]}),
    )
    .await;
    put(
        &node,
        "/v1/routes/calm",
        json!({"path": "/calm", "upstream": "api", "plugins": [{"name": "fine"}]}),
    )
    .await;
    for _ in 0..2 {
        let (status, _, text) = send(&node, "/hostile", None).await;
        assert_eq!(status, 504, "{text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["code"], "plugin_timeout");
        assert_eq!(error["error"]["details"]["phase"], "access");
        let (status, _, text) = send(&node, "/calm", None).await;
        assert_eq!(status, 200, "{text}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "only the calm route reached the backend"
    );
    wait_for_log(&node, "spin", "timed out").await;
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(
            &metrics,
            r#"moontide_plugin_phase_errors_total{plugin="spin",phase="access",kind="timeout"}"#
        ),
        2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugins_and_plugin_lists_are_refused_with_their_paths() {
    let node = Node::start();
    let refused = |body: &Value| {
        (
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["error"]["details"]["path"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };

    // A syntax error: 400 with its line.
    let (status, body) = put(
        &node,
        "/v1/plugins/bad",
        json!({"source": "local P = {}\nfunction P.access(req)\n  return ((\nend\nreturn P"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "compile_error");
    assert_eq!(body["error"]["details"]["path"], "source");
    assert!(
        body["error"]["details"]["errors"][0]["line"]
            .as_u64()
            .is_some_and(|line| line >= 3),
        "{body}"
    );

    // What the chunk returns is checked by running it once.
    for (source, expected) in [
        ("return 42", "must return a table"),
        ("return function() end", "must return a table"),
        ("return { acces = function() end }", "unknown phase 'acces'"),
        (
            "return { access = 'allow' }",
            "phase 'access' must be a function",
        ),
        ("return {}", "defines no phase"),
    ] {
        let (status, body) = put(&node, "/v1/plugins/bad", json!({"source": source})).await;
        assert_eq!(status, 400, "{source}: {body}");
        let (code, path, message) = refused(&body);
        assert_eq!(code, "invalid_request", "{source}");
        assert_eq!(path, "source", "{source}");
        assert!(message.contains(expected), "{source}: {message}");
    }
    // An init that fails is refused like a function's: `init_error`, file and line.
    let (status, body) = put(
        &node,
        "/v1/plugins/bad",
        json!({"source": "local x = 1\nerror('no init for you')"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (code, path, message) = refused(&body);
    assert_eq!((code.as_str(), path.as_str()), ("init_error", "source"));
    assert_eq!(message, "main.lua:2: no init for you");
    assert_eq!(body["error"]["details"]["errors"][0]["line"], 2);
    let (status, _) = node
        .admin_json(reqwest::Method::GET, "/v1/plugins/bad", None)
        .await;
    assert_eq!(status, 404, "nothing refused was stored");

    // Wire shape and config fields.
    for (input, path) in [
        (
            json!({"source": "return { log = function() end }", "phase": "x"}),
            "phase",
        ),
        (json!({}), "source"),
        (
            json!({"source": "return { log = function() end }", "config": {"timeout": "soon"}}),
            "config.timeout",
        ),
        (
            json!({"source": "return { log = function() end }", "config": {"route": "/x"}}),
            "config.route",
        ),
    ] {
        let (status, body) = put(&node, "/v1/plugins/bad", input.clone()).await;
        assert_eq!(status, 400, "{input}: {body}");
        assert_eq!(refused(&body).1, path, "{input}: {body}");
    }
    let (status, body) = put(&node, "/v1/plugins/a%2Fb", json!({"source": "return {}"})).await;
    assert_eq!((status, refused(&body).1.as_str()), (400, "name"), "{body}");

    // Routes: a missing plugin, a bad plugin entry.
    let (status, body) = put(
        &node,
        "/v1/upstreams/api",
        json!({"nodes": [{"address": "127.0.0.1:9"}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(
        &node,
        "/v1/routes/r",
        json!({"path": "/r", "upstream": "api", "plugins": [{"name": "missing"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(refused(&body).1, "plugins[0].name");
    let (status, body) = put(
        &node,
        "/v1/plugins/ok",
        json!({"source": "return { log = function() end }"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    for (plugins, path) in [
        (json!([{"name": "ok", "config": 5}]), "plugins[0].config"),
        (json!([{"name": "ok"}, {"name": "ok"}]), "plugins[1].name"),
        (json!([{"config": {}}]), "plugins[0].name"),
        (json!([{"name": "ok", "when": "always"}]), "plugins[0].when"),
        (json!([{"name": "ok"}, {"name": "gone"}]), "plugins[1].name"),
    ] {
        let (status, body) = put(
            &node,
            "/v1/routes/r",
            json!({"path": "/r", "upstream": "api", "plugins": plugins.clone()}),
        )
        .await;
        assert_eq!(status, 400, "{plugins}: {body}");
        assert_eq!(refused(&body).1, path, "{plugins}: {body}");
    }

    // A plugin in use cannot be deleted.
    let (status, body) = put(
        &node,
        "/v1/routes/r",
        json!({"path": "/r", "upstream": "api", "plugins": [{"name": "ok"}]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = node
        .admin_json(reqwest::Method::DELETE, "/v1/plugins/ok", None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "in_use");
    assert_eq!(body["error"]["details"]["routes"], json!(["r"]));
    let (status, body) = node
        .admin_json(reqwest::Method::GET, "/v1/plugins", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["items"][0]["name"], "ok");
    assert_eq!(body["items"][0]["phases"], json!(["log"]));
    let (status, _) = node
        .admin_json(reqwest::Method::DELETE, "/v1/routes/r", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = node
        .admin_json(reqwest::Method::DELETE, "/v1/plugins/ok", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = node
        .admin_json(reqwest::Method::GET, "/v1/plugins/ok", None)
        .await;
    assert_eq!(status, 404);
}
