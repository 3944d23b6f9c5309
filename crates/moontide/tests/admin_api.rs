//! Bad input on every admin endpoint: a clear status, a JSON error, and the path of the
//! offending field. Also: the token guards every /v1 endpoint, and every documented route
//! is served.

mod common;

use common::Node;
use reqwest::Method;
use serde_json::{Value, json};

fn error_of(body: &Value) -> (&str, &str) {
    (
        body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {body}")),
        body["error"]["details"]["path"].as_str().unwrap_or(""),
    )
}

#[tokio::test]
async fn every_v1_endpoint_needs_the_token() {
    let node = Node::start();
    let document: Value = node
        .admin_request(Method::GET, "/v1/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let Ok(method) = method.to_ascii_uppercase().parse::<Method>() else {
                continue;
            };
            if !["GET", "PUT", "POST", "DELETE"].contains(&method.as_str()) {
                continue;
            }
            let url = format!("{}{}", node.admin, path.replace("{name}", "greeting"));
            let public = operation["security"]
                .as_array()
                .is_some_and(|s| s.is_empty());
            for token in [None, Some("wrong-token")] {
                let mut request = node.http.request(method.clone(), &url);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.unwrap();
                if public {
                    assert_ne!(response.status(), 401, "{method} {path} is public");
                } else {
                    assert_eq!(
                        response.status(),
                        401,
                        "{method} {path} without a valid token"
                    );
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(body["error"]["code"], "unauthorized");
                }
            }
            // With the token, the route exists (no "no such endpoint", no 405).
            let response = node
                .admin_request(method.clone(), &path.replace("{name}", "greeting"))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert!(
                status != 405 && body["error"]["message"] != "no such endpoint",
                "{method} {path}: {status} {body}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 28, "every documented operation was checked");
}

#[tokio::test]
async fn deploy_rejects_bad_input_with_the_field_path() {
    let node = Node::start();
    let put = |name: &str, body: Value| {
        let node = &node;
        let path = format!("/v1/functions/{name}");
        async move { node.admin_json(Method::PUT, &path, Some(body)).await }
    };
    let ok_source = "return function() return 'ok' end";
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "f",
            json!({"source": ok_source, "extra": 1}),
            "invalid_request",
            "extra",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"timeout": "forever"}}),
            "invalid_request",
            "config.timeout",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"timeout": "20m"}}),
            "invalid_request",
            "config.timeout",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"memory": "12 apples"}}),
            "invalid_request",
            "config.memory",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"memory": 1024}}),
            "invalid_request",
            "config.memory",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"max": 0}}),
            "invalid_request",
            "config.max",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"min": 5, "max": 2}}),
            "invalid_request",
            "config.min",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"env": {"1X": "v"}}}),
            "invalid_request",
            "config.env.1X",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"route": "/healthz"}}),
            "invalid_request",
            "config.route",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"nope": true}}),
            "invalid_request",
            "config.nope",
        ),
        (
            "f",
            json!({"source": ok_source, "config": {"max": "ten"}}),
            "invalid_request",
            "config.max",
        ),
        ("f", json!({"source": 12}), "invalid_request", "source"),
        ("f", json!({}), "invalid_request", "source"),
        (
            "f",
            json!({"source": ok_source, "files": {"main.lua": ok_source}}),
            "invalid_request",
            "source",
        ),
        (
            "f",
            json!({"files": {"util.lua": "return 1"}}),
            "compile_error",
            "files.main.lua",
        ),
        (
            "f",
            json!({"files": {"main.lua": ok_source, "../x.lua": "return 1"}}),
            "compile_error",
            "files.../x.lua",
        ),
        (
            "f",
            json!({"source": "return function( end"}),
            "compile_error",
            "source",
        ),
        (
            "bad name!",
            json!({"source": ok_source}),
            "invalid_request",
            "name",
        ),
    ];
    for (name, body, code, path) in cases {
        let (status, response) = put(name, body.clone()).await;
        assert_eq!(status, 400, "{name} {body} -> {response}");
        let (got_code, got_path) = error_of(&response);
        assert_eq!((got_code, got_path), (code, path), "{body} -> {response}");
        assert!(!response["error"]["message"].as_str().unwrap().is_empty());
    }
    // A secret of the wrong type is refused without being echoed.
    let (status, response) = put(
        "f",
        json!({"source": ok_source, "config": {"env": {"PIN": 987654321}}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&response), ("invalid_request", "config.env.PIN"));
    assert!(!response.to_string().contains("987654321"), "{response}");
    // Not JSON at all.
    let response = node
        .admin_request(Method::PUT, "/v1/functions/f")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    // Nothing above was stored.
    let (_, list) = node.admin_json(Method::GET, "/v1/functions", None).await;
    assert_eq!(list["functions"], json!([]));
}

#[tokio::test]
async fn other_endpoints_reject_bad_input() {
    let node = Node::start();
    node.deploy("f", "return function(e) return e end", json!({}))
        .await;

    for (method, path) in [
        (Method::GET, "/v1/functions/nope"),
        (Method::DELETE, "/v1/functions/nope"),
        (Method::GET, "/v1/functions/nope/versions"),
        (Method::POST, "/v1/functions/nope/rollback"),
        (Method::POST, "/v1/functions/nope/invoke"),
        (Method::GET, "/v1/functions/nope/logs"),
    ] {
        let (status, body) = node.admin_json(method.clone(), path, None).await;
        assert_eq!(status, 404, "{method} {path}");
        assert_eq!(body["error"]["code"], "not_found", "{method} {path}");
    }

    let (status, body) = node
        .admin_json(
            Method::POST,
            "/v1/functions/f/rollback",
            Some(json!({"to": "x"})),
        )
        .await;
    assert_eq!((status, error_of(&body)), (400, ("invalid_request", "to")));
    let (status, body) = node
        .admin_json(
            Method::POST,
            "/v1/functions/f/rollback",
            Some(json!({"to": 9})),
        )
        .await;
    assert_eq!((status, error_of(&body)), (400, ("invalid_request", "to")));
    let (status, body) = node
        .admin_json(
            Method::POST,
            "/v1/functions/f/rollback",
            Some(json!({"too": 1})),
        )
        .await;
    assert_eq!((status, error_of(&body).0), (400, "invalid_request"));
    let (status, body) = node
        .admin_json(Method::POST, "/v1/functions/f/rollback", None)
        .await;
    assert_eq!((status, error_of(&body).0), (409, "no_previous_version"));

    let response = node
        .admin_request(Method::POST, "/v1/functions/f/invoke")
        .body("{broken")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");

    let (status, body) = node
        .admin_json(Method::GET, "/v1/functions/f/logs?follow=1&bogus=2", None)
        .await;
    assert_eq!((status, error_of(&body).0), (400, "invalid_request"));

    let (status, body) = node
        .admin_json(Method::PATCH, "/v1/functions/f", None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = node.admin_json(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    // Invoke passes the event through; rm removes.
    let (status, body) = node
        .admin_json(
            Method::POST,
            "/v1/functions/f/invoke",
            Some(json!({"a": [1, null]})),
        )
        .await;
    assert_eq!((status, body), (200, json!({"a": [1, null]})));
    let output = node.cli(&["rm", "f"]);
    assert!(output.status.success());
    assert_eq!(node.get("/fn/f").await.status(), 404);
    let output = node.cli(&["rm", "f"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not exist"));
}

#[tokio::test]
async fn the_cli_explains_a_missing_server_or_token() {
    let output = std::process::Command::new(common::BIN)
        .args(["ls"])
        .env("MOONTIDE_ADMIN", "http://127.0.0.1:1")
        .env("MOONTIDE_TOKEN", "x")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the admin API"));

    let empty = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::BIN)
        .args(["ls", "--data-dir"])
        .arg(empty.path())
        .env_remove("MOONTIDE_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no admin token"));
}

/// The CLI's rough edges (issue 14): a name such as `../etc` gets the name rule, not a
/// URL's "no such endpoint"; a duration without a unit is refused, not guessed; `--output
/// json` prints the admin API's JSON for scripts; `apply` says when it replaced an object
/// made by hand, and what changed.
#[tokio::test]
async fn the_cli_names_bad_input_and_prints_json_for_scripts() {
    let node = Node::start();
    let files = common::temp_files(&[
        ("hello.lua", "return function() print('hi') return 'hi' end"),
        (
            "moontide.yaml",
            "functions:\n  hello: {path: hello.lua}\nroutes:\n  hello: {paths: [\"/hi\"], function: hello}\n",
        ),
    ]);
    let source = files.path().join("hello.lua");
    let source = source.to_str().unwrap();

    for args in [
        &["info", "../etc"][..],
        &["logs", "../etc"][..],
        &["deploy", "../etc", source][..],
    ] {
        let output = node.cli(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(
            stderr.contains("name '../etc': function names are"),
            "{args:?}: {stderr}"
        );
    }

    let output = node.cli(&["deploy", "hello", source, "--timeout", "5"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("'5' needs a unit: 5s, 5ms"), "{stderr}");
    assert!(stderr.contains("at: config.timeout"), "{stderr}");

    let deployed: Value =
        serde_json::from_str(&node.cli_ok(&["--output", "json", "deploy", "hello", source]))
            .expect("deploy --output json is JSON");
    assert_eq!(deployed["version"], 1);
    let listed: Value = serde_json::from_str(&node.cli_ok(&["-o", "json", "ls"])).unwrap();
    assert_eq!(listed["functions"][0]["name"], "hello");
    let versions: Value =
        serde_json::from_str(&node.cli_ok(&["-o", "json", "versions", "hello"])).unwrap();
    assert_eq!(versions["versions"][0]["version"], 1);
    assert_eq!(node.get("/fn/hello").await.text().await.unwrap(), "hi");
    let logs = node.cli_ok(&["-o", "json", "logs", "hello"]);
    let record: Value = serde_json::from_str(logs.lines().next().expect("a log line")).unwrap();
    assert_eq!(record["message"], "hi");
    assert!(record["ts_ms"].is_u64(), "{record}");

    // A route made by hand, then a manifest with the same name: the replacement is said.
    let (status, _) = node
        .admin_json(
            Method::PUT,
            "/v1/routes/hello",
            Some(json!({"paths": ["/by-hand"], "function": "hello"})),
        )
        .await;
    assert_eq!(status, 201);
    let manifest = files.path().join("moontide.yaml");
    let applied = node.cli_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        applied.contains("routes.hello: replaced the existing object (changed: paths)"),
        "{applied}"
    );
    let again = node.cli_ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(again.contains("routes.hello: unchanged"), "{again}");
}
