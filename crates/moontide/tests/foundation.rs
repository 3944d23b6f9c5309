//! The foundation issue's user steps, end to end: the real binary, real sockets, the CLI.

mod common;

use std::time::Duration;

use common::{Node, examples_dir, temp_files};
use serde_json::{Value, json};

fn example(name: &str) -> String {
    examples_dir().join(name).display().to_string()
}

#[tokio::test]
async fn deploy_invoke_and_serve_the_greeting_through_the_cli() {
    let node = Node::start();
    let out = node.cli_ok(&["deploy", "greeting", &example("greeting.lua")]);
    assert_eq!(out.trim(), "deployed greeting version 1");

    let out = node.cli_ok(&["invoke", "greeting", "--data", r#"{"name":"Ada"}"#]);
    assert_eq!(out.trim(), r#"{"statusCode":200,"body":"Hello, Ada!"}"#);

    let response = node.get("/fn/greeting").await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.text().await.unwrap(), "Hello, World!");

    // HTTP event: the query string is in queryStringParameters, not `name`.
    let response = node.get("/fn/greeting?name=Ada").await;
    assert_eq!(response.text().await.unwrap(), "Hello, World!");

    let listing = node.cli_ok(&["ls"]);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("greeting") && l.contains(" 1 ")),
        "{listing}"
    );
    let info: Value = serde_json::from_str(&node.cli_ok(&["info", "greeting"])).unwrap();
    assert_eq!(info["active_version"], 1);
}

#[tokio::test]
async fn the_json_api_example_decodes_the_body() {
    let node = Node::start();
    node.cli_ok(&["deploy", "orders", &example("orders.lua")]);
    let response = node
        .http
        .post(node.url("/fn/orders"))
        .body(
            r#"{"items":[{"sku":"A-100","qty":2,"price":19.99},{"sku":"B","qty":1,"price":5.5}]}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let order: Value = response.json().await.unwrap();
    assert_eq!(order["total"], json!(45.48));
    assert_eq!(order["items"][1]["sku"], "B");
    assert!(
        order["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );

    let response = node
        .http
        .post(node.url("/fn/orders"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = node.get("/fn/orders").await;
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn a_syntax_error_is_refused_with_file_and_line_and_the_old_version_keeps_serving() {
    let node = Node::start();
    node.cli_ok(&["deploy", "greeting", &example("greeting.lua")]);
    let dir = temp_files(&[(
        "broken.lua",
        "local x = 1\nreturn function(\n  if then\nend\n",
    )]);
    let broken = dir.path().join("broken.lua").display().to_string();
    let output = node.cli(&["deploy", "greeting", &broken]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{broken}:3:")), "{stderr}");

    let response = node.get("/fn/greeting").await;
    assert_eq!(response.text().await.unwrap(), "Hello, World!");
    let versions = node.cli_ok(&["versions", "greeting"]);
    assert_eq!(
        versions.lines().count(),
        2,
        "header + one version: {versions}"
    );

    // A bundle's broken module is named too.
    let bundle = temp_files(&[
        (
            "main.lua",
            "local util = require('util')\nreturn function() return util.x end",
        ),
        ("lib/bad.lua", "return {\n\n  x = = 1 }"),
        ("util.lua", "return { x = 1 }"),
    ]);
    let output = node.cli(&["deploy", "bundled", &bundle.path().display().to_string()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lib/bad.lua:3:"), "{stderr}");
}

#[tokio::test]
async fn new_versions_serve_at_once_in_flight_calls_finish_on_theirs_and_rollback_works() {
    let node = Node::start();
    let slow_v1 = r#"
        local time = require("time")
        return function(event)
          if event.queryStringParameters and event.queryStringParameters.slow then time.sleep(600) end
          return "v1"
        end"#;
    assert_eq!(node.deploy("svc", slow_v1, json!({})).await, 1);

    let in_flight = tokio::spawn({
        let client = node.http.clone();
        let url = node.url("/fn/svc?slow=1");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        node.deploy("svc", "return function() return 'v2' end", json!({}))
            .await,
        2
    );
    assert_eq!(node.get("/fn/svc").await.text().await.unwrap(), "v2");
    assert_eq!(
        in_flight.await.unwrap(),
        "v1",
        "the call in flight finished on version 1"
    );

    let out = node.cli_ok(&["rollback", "svc"]);
    assert!(out.contains("now serves version 1"), "{out}");
    assert_eq!(node.get("/fn/svc").await.text().await.unwrap(), "v1");
    let versions = node.cli_ok(&["versions", "svc"]);
    let rows: Vec<&str> = versions.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{versions}");
    assert!(
        rows.iter().any(|r| r.trim_start().starts_with("1  *")),
        "{versions}"
    );

    node.cli_ok(&["rollback", "svc", "--to", "2"]);
    assert_eq!(node.get("/fn/svc").await.text().await.unwrap(), "v2");
    let output = node.cli(&["rollback", "svc", "--to", "7"]);
    assert!(!output.status.success());
}

#[tokio::test]
async fn acknowledged_deploys_survive_sigkill() {
    let node = Node::start();
    node.cli_ok(&["deploy", "greeting", &example("greeting.lua")]);
    for i in 0..5 {
        node.deploy(
            "counter",
            &format!("return function() return 'deploy {i}' end"),
            json!({}),
        )
        .await;
    }
    node.cli_ok(&["rollback", "counter", "--to", "3"]);
    let node = node.kill_and_restart();
    assert_eq!(
        node.get("/fn/greeting").await.text().await.unwrap(),
        "Hello, World!"
    );
    assert_eq!(
        node.get("/fn/counter").await.text().await.unwrap(),
        "deploy 2"
    );
    let (status, versions) = node
        .admin_json(reqwest::Method::GET, "/v1/functions/counter/versions", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(versions["versions"].as_array().unwrap().len(), 5);
    assert_eq!(versions["active_version"], 3);
    // The admin token survived too (same file).
    node.cli_ok(&["ls"]);
}

#[tokio::test]
async fn bundles_from_a_directory_and_a_zip_find_their_modules() {
    let node = Node::start();
    let files = [
        (
            "main.lua",
            "local strings = require('lib.strings')\nlocal lib = require('lib')\nreturn function(e) return strings.shout(lib.name) end",
        ),
        ("lib/init.lua", "return { name = 'moontide' }"),
        (
            "lib/strings.lua",
            "local M = {}\nfunction M.shout(s) return s:upper() .. '!' end\nreturn M",
        ),
    ];
    let dir = temp_files(&files);
    node.cli_ok(&["deploy", "bundle", &dir.path().display().to_string()]);
    assert_eq!(
        node.get("/fn/bundle").await.text().await.unwrap(),
        "MOONTIDE!"
    );

    let zip_path = dir.path().join("bundle.zip");
    let status = std::process::Command::new("zip")
        .current_dir(dir.path())
        .args(["-q", "-r", "bundle.zip", "main.lua", "lib"])
        .status();
    match status {
        Ok(status) if status.success() => {
            node.cli_ok(&["deploy", "zipped", &zip_path.display().to_string()]);
            assert_eq!(
                node.get("/fn/zipped").await.text().await.unwrap(),
                "MOONTIDE!"
            );
        }
        _ => {
            // Build the zip in Rust when the zip tool is absent.
            let file = std::fs::File::create(&zip_path).unwrap();
            let mut writer = zip::ZipWriter::new(file);
            for (path, content) in files {
                writer
                    .start_file(path, zip::write::SimpleFileOptions::default())
                    .unwrap();
                std::io::Write::write_all(&mut writer, content.as_bytes()).unwrap();
            }
            writer.finish().unwrap();
            node.cli_ok(&["deploy", "zipped", &zip_path.display().to_string()]);
            assert_eq!(
                node.get("/fn/zipped").await.text().await.unwrap(),
                "MOONTIDE!"
            );
        }
    }
}

#[tokio::test]
async fn the_http_event_has_the_api_gateway_shape() {
    let node = Node::start();
    node.deploy(
        "echo",
        r#"local json = require("json")
           return function(event, ctx)
             return { statusCode = 200, headers = { ["content-type"] = "application/json" },
                      body = json.encode({
                        method = event.httpMethod, path = event.path, resource = event.resource,
                        q = event.queryStringParameters, mq = event.multiValueQueryStringParameters,
                        h = event.headers["x-thing"], mh = event.multiValueHeaders["x-thing"],
                        pp = event.pathParameters, body = event.body, b64 = event.isBase64Encoded,
                        rid = event.requestContext.requestId, ip = event.requestContext.identity.sourceIp,
                        epoch = type(event.requestContext.requestTimeEpoch),
                        fn = ctx.function_name, version = ctx.version, remaining = ctx:remaining_ms() > 0,
                      }) }
           end"#,
        json!({}),
    )
    .await;
    let response = node
        .http
        .post(node.url("/fn/echo/a/b?x=1&y=2&y=3&s=a%20b"))
        .header("X-Thing", "one")
        .header("x-request-id", "req-123")
        .body(vec![0xff_u8, 0x00, 0x01])
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let event: Value = response.json().await.unwrap();
    assert_eq!(event["method"], "POST");
    assert_eq!(event["path"], "/fn/echo/a/b");
    assert_eq!(event["resource"], "/fn/{name}/{proxy+}");
    assert_eq!(event["q"], json!({"x": "1", "y": "3", "s": "a b"}));
    assert_eq!(event["mq"]["y"], json!(["2", "3"]));
    assert_eq!(event["h"], "one");
    assert_eq!(event["mh"], json!(["one"]));
    assert_eq!(event["pp"], json!({"proxy": "a/b"}));
    assert_eq!(event["body"], "/wAB");
    assert_eq!(event["b64"], true);
    assert_eq!(event["rid"], "req-123");
    assert_eq!(event["ip"], "127.0.0.1");
    assert_eq!(event["epoch"], "number");
    assert_eq!(event["fn"], "echo");
    assert_eq!(event["version"], 1);
    assert_eq!(event["remaining"], true);
}

#[tokio::test]
async fn results_convert_per_the_contract_and_errors_stay_in_the_log() {
    let node = Node::start();
    node.deploy("text", "return function() return 'plain' end", json!({}))
        .await;
    node.deploy(
        "table",
        "return function() return { a = 1, list = {1, 2} } end",
        json!({}),
    )
    .await;
    node.deploy("nothing", "return function() end", json!({}))
        .await;
    node.deploy(
        "custom",
        r#"return function() return { statusCode = 201, headers = { ["x-a"] = "1" },
             multiValueHeaders = { ["set-cookie"] = { "a=1", "b=2" } },
             body = "aGk=", isBase64Encoded = true } end"#,
        json!({}),
    )
    .await;
    node.deploy(
        "boom",
        "local function inner() error('secret detail 42') end\nreturn function() inner() end",
        json!({}),
    )
    .await;

    let r = node.get("/fn/text").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(r.text().await.unwrap(), "plain");

    let r = node.get("/fn/table").await;
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"a": 1, "list": [1, 2]})
    );

    let r = node.get("/fn/nothing").await;
    assert_eq!(r.status(), 204);

    let r = node.get("/fn/custom").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-a"], "1");
    let cookies: Vec<_> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(cookies, vec!["a=1", "b=2"]);
    assert_eq!(r.text().await.unwrap(), "hi");

    let r = node.get("/fn/boom").await;
    assert_eq!(r.status(), 500);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = r.text().await.unwrap();
    assert!(
        !body.contains("secret detail"),
        "the error must not reach the client: {body}"
    );
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "function_error");
    assert_eq!(error["error"]["details"]["request_id"], request_id.as_str());
    let logs = node.log_messages("boom").await;
    let line = logs
        .iter()
        .find(|l| l.contains("secret detail 42"))
        .expect("error in the log");
    assert!(
        line.contains("main.lua:1"),
        "traceback names the file and line: {line}"
    );

    // Direct invocation of a failing function: 500 with the request id, details in the log.
    let output = node.cli(&["invoke", "boom"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("request id"));

    let r = node.get("/fn/missing").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
}

#[tokio::test]
async fn limits_end_the_call_and_the_next_call_works() {
    let node = Node::start();
    node.deploy(
        "spin",
        "return function(e) if e.queryStringParameters then while true do end end return 'ok' end",
        json!({"timeout": "200ms"}),
    )
    .await;
    node.deploy(
        "hog",
        "return function(e) if e.queryStringParameters then local s = 'x' while true do s = s .. s end end return 'ok' end",
        json!({"memory": "8MiB"}),
    )
    .await;
    let r = node.get("/fn/spin?go=1").await;
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "function_timeout"
    );
    assert_eq!(node.get("/fn/spin").await.text().await.unwrap(), "ok");

    let r = node.get("/fn/hog?go=1").await;
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "memory_limit_exceeded"
    );
    assert_eq!(node.get("/fn/hog").await.text().await.unwrap(), "ok");

    let metrics = node.metrics().await;
    assert!(
        metrics.contains(r#"moontide_function_errors_total{function="spin",kind="timeout"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"moontide_function_errors_total{function="hog",kind="memory"} 1"#));
    // The healthy neighbour was never disturbed.
    assert!(metrics.contains(r#"moontide_requests_total{function="spin",trigger="http"} 2"#));
}

#[tokio::test]
async fn modules_log_shared_http_crypto_and_env_work() {
    // A one-shot HTTP server on loopback for the outbound client.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(2) {
            let mut stream = stream.unwrap();
            let mut buffer = [0u8; 4096];
            let n = stream.read(&mut buffer).unwrap();
            let request = String::from_utf8_lossy(&buffer[..n]).to_string();
            let body = if request.contains("x-probe: yes") {
                "probed"
            } else {
                "plain"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-up: 1\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    // Outbound calls to loopback are denied by default: the node allows this one address.
    let node = Node::start_with(&["--egress-allow", "127.0.0.1/32"]);
    node.deploy(
        "mods",
        &format!(
            r#"local http, shared, crypto, log = require("http"), require("shared"), require("crypto"), require("log")
               return function(event, ctx)
                 print("printed", 1)
                 log.warn("warned")
                 local r, err = http.get("http://{upstream}/x", {{ headers = {{ ["x-probe"] = "yes" }} }})
                 if not r then error(err) end
                 return {{ up = r.body, status = r.status, hdr = r.headers["x-up"],
                          n = shared.incr("hits", 1, 0), sha = crypto.sha256("abc"),
                          secret = os.getenv("API_KEY"), env = ctx.env.API_KEY }}
               end"#
        ),
        json!({"env": {"API_KEY": "s3cr3t-value"}}),
    )
    .await;
    let first: Value = node.get("/fn/mods").await.json().await.unwrap();
    assert_eq!(first["up"], "probed");
    assert_eq!(first["status"], 200);
    assert_eq!(first["hdr"], "1");
    assert_eq!(first["n"], 1);
    assert_eq!(
        first["sha"],
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(first["secret"], "s3cr3t-value");
    assert_eq!(first["env"], "s3cr3t-value");
    let second: Value = node.get("/fn/mods").await.json().await.unwrap();
    assert_eq!(second["n"], 2);

    let logs = node.log_messages("mods").await;
    assert!(logs.contains(&"printed\t1".to_string()), "{logs:?}");
    assert!(logs.contains(&"warned".to_string()), "{logs:?}");
    let cli_logs = node.cli_ok(&["logs", "mods"]);
    assert!(
        cli_logs.contains("warn") && cli_logs.contains("warned"),
        "{cli_logs}"
    );

    // The secret's value never appears in what the API shows.
    let (_, info) = node
        .admin_json(reqwest::Method::GET, "/v1/functions/mods", None)
        .await;
    assert!(!info.to_string().contains("s3cr3t-value"));
    assert!(info.to_string().contains("API_KEY"));
    let (_, versions) = node
        .admin_json(reqwest::Method::GET, "/v1/functions/mods/versions", None)
        .await;
    assert!(!versions.to_string().contains("s3cr3t-value"));
    // ... nor in the function's log or the server's own log.
    assert!(!node.cli_ok(&["logs", "mods"]).contains("s3cr3t-value"));
    let server_log = std::fs::read_to_string(node.data_dir.with_extension("log")).unwrap();
    assert!(!server_log.contains("s3cr3t-value"));
    // A malformed --env never echoes its argument (it may be the secret itself).
    let output = node.cli(&[
        "deploy",
        "mods2",
        &example("greeting.lua"),
        "--env",
        "hunter2",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("KEY=VALUE") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

#[tokio::test]
async fn routes_serve_a_function_at_its_own_path() {
    let node = Node::start();
    node.cli_ok(&[
        "deploy",
        "greeting",
        &example("greeting.lua"),
        "--route",
        "/hello",
    ]);
    assert_eq!(
        node.get("/hello").await.text().await.unwrap(),
        "Hello, World!"
    );
    assert_eq!(
        node.get("/hello/there").await.text().await.unwrap(),
        "Hello, World!"
    );
    assert_eq!(node.get("/hellothere").await.status(), 404);
}

#[tokio::test]
async fn sigterm_finishes_calls_in_flight_then_exits_zero() {
    let mut node = Node::start();
    node.deploy(
        "slow",
        "local time = require('time') return function() time.sleep(700) return 'done' end",
        json!({}),
    )
    .await;
    let in_flight = tokio::spawn({
        let client = node.http.clone();
        let url = node.url("/fn/slow");
        async move {
            let response = client.get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.sigterm();
    assert_eq!(in_flight.await.unwrap(), (200, "done".to_string()));
    let status = tokio::task::spawn_blocking(move || {
        let status = node.child.wait().unwrap();
        (status, node)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn probes_and_metrics_answer() {
    let node = Node::start();
    node.cli_ok(&["deploy", "greeting", &example("greeting.lua")]);
    node.get("/fn/greeting").await;
    for base in [&node.data, &node.admin] {
        for probe in ["/healthz", "/readyz"] {
            let r = node
                .http
                .get(format!("{base}{probe}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{base}{probe}");
        }
    }
    let metrics = node.metrics().await;
    for series in [
        r#"moontide_requests_total{function="greeting",trigger="http"} 1"#,
        r#"moontide_request_duration_seconds_count{function="greeting"} 1"#,
        r#"moontide_instances{function="greeting"} 1"#,
        r#"moontide_cold_starts_total{function="greeting"} 1"#,
        "moontide_functions 1",
    ] {
        assert!(metrics.contains(series), "missing {series} in:\n{metrics}");
    }
    let (status, body) = node
        .admin_json(reqwest::Method::GET, "/v1/status", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["functions"][0]["name"], "greeting");
    assert_eq!(body["ready"], true);
}

/// Polls `/v1/status` until `name` has `want` live instances (bounded; not a timing test).
async fn wait_for_instances(node: &Node, name: &str, want: u64) -> u64 {
    let mut live = u64::MAX;
    for _ in 0..100 {
        let (_, status) = node
            .admin_json(reqwest::Method::GET, "/v1/status", None)
            .await;
        live = status["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["live_instances"].as_u64().unwrap())
            .unwrap_or(0);
        if live == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live
}

#[tokio::test]
async fn min_keeps_instances_warm_and_idle_ones_scale_to_zero() {
    let node = Node::start();
    node.deploy(
        "warm",
        "return function() return 'w' end",
        json!({"min": 2}),
    )
    .await;
    assert_eq!(
        wait_for_instances(&node, "warm", 2).await,
        2,
        "pre-warmed to min without traffic"
    );

    node.deploy(
        "cold",
        "return function() return 'c' end",
        json!({"idle_timeout": "100ms"}),
    )
    .await;
    assert_eq!(node.get("/fn/cold").await.text().await.unwrap(), "c");
    assert_eq!(
        wait_for_instances(&node, "cold", 0).await,
        0,
        "idle instances were reaped"
    );
    // Scale from zero again.
    assert_eq!(node.get("/fn/cold").await.text().await.unwrap(), "c");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let node = Node::start();
    node.cli_ok(&["deploy", "greeting", &example("greeting.lua")]);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client.get(node.url("/fn/greeting")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.unwrap(), "Hello, World!");
}
