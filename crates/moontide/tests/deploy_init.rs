//! A deploy runs the unit's init (its module-level code) once before it is accepted (issue
//! 14): code whose init fails is refused with 400 `init_error` and the file and line, like
//! a syntax error, instead of answering every call with a 500. An init that fails only at
//! run time still answers 500, and its log line carries the request id the client got.

mod common;

use common::{Node, temp_files};
use reqwest::Method;
use serde_json::{Value, json};

async fn put(node: &Node, name: &str, body: Value) -> (u16, Value) {
    node.admin_json(Method::PUT, &format!("/v1/functions/{name}"), Some(body))
        .await
}

/// `(code, path, kind, file, line, message)` of an `init_error`.
fn init_error(body: &Value) -> (String, String, String, String, Option<u64>, String) {
    let error = &body["error"];
    let site = &error["details"]["errors"][0];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        text(&error["code"]),
        text(&error["details"]["path"]),
        text(&error["details"]["kind"]),
        text(&site["file"]),
        site["line"].as_u64(),
        text(&error["message"]),
    )
}

#[tokio::test]
async fn a_deploy_whose_init_fails_is_refused_with_file_and_line() {
    let node = Node::start();
    // `require` of a module that is neither built in nor in the bundle: the error is
    // raised by `require` itself, so its line comes from the traceback.
    let (status, body) = put(
        &node,
        "f",
        json!({"source": "local lib = require('missing')\nreturn function() return 'hi' end"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (code, path, kind, file, line, message) = init_error(&body);
    assert_eq!(
        (code.as_str(), path.as_str(), kind.as_str()),
        ("init_error", "source", "runtime")
    );
    assert_eq!((file.as_str(), line), ("main.lua", Some(1)), "{body}");
    assert!(
        message.starts_with("main.lua:1: module 'missing' not found"),
        "{message}"
    );

    // `io` is not in the sandbox: writing at module level fails at its line.
    let (status, body) = put(
        &node,
        "f",
        json!({"source": "-- a comment\nio.write('x')\nreturn function() return 'hi' end"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (code, path, _, file, line, message) = init_error(&body);
    assert_eq!((code.as_str(), path.as_str()), ("init_error", "source"));
    assert_eq!((file.as_str(), line), ("main.lua", Some(2)), "{body}");
    assert_eq!(message, "main.lua:2: attempt to index nil with 'write'");

    // In a bundle, the field is the file that failed (a module main.lua requires).
    let (status, body) = put(
        &node,
        "f",
        json!({"files": {
            "main.lua": "local util = require('lib.util')\nreturn function() return util end",
            "lib/util.lua": "local M = {}\n\nerror('util cannot start')\nreturn M",
        }}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (code, path, _, file, line, message) = init_error(&body);
    assert_eq!(
        (code.as_str(), path.as_str(), file.as_str(), line),
        ("init_error", "files.lib/util.lua", "lib/util.lua", Some(3)),
        "{body}"
    );
    assert_eq!(message, "lib/util.lua:3: util cannot start");

    // A chunk that returns no handler.
    let (status, body) = put(&node, "f", json!({"source": "return 42"})).await;
    assert_eq!(status, 400, "{body}");
    let (code, _, kind, file, _, message) = init_error(&body);
    assert_eq!(
        (code.as_str(), kind.as_str(), file.as_str()),
        ("init_error", "init", "main.lua")
    );
    assert!(
        message.contains("must return the handler function"),
        "{message}"
    );

    // Nothing refused was stored, and no log was kept for a function that never was.
    let (status, _) = node.admin_json(Method::GET, "/v1/functions/f", None).await;
    assert_eq!(status, 404);
    let (status, _) = node
        .admin_json(Method::GET, "/v1/functions/f/logs", None)
        .await;
    assert_eq!(status, 404);

    // A refused new version leaves the serving one alone.
    node.deploy("f", "return function() return 'v1' end", json!({}))
        .await;
    let (status, body) = put(
        &node,
        "f",
        json!({"source": "require('nope')\nreturn function() return 'v2' end"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(node.get("/fn/f").await.text().await.unwrap(), "v1");
    let (_, versions) = node
        .admin_json(Method::GET, "/v1/functions/f/versions", None)
        .await;
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(1));
}

/// The CLI prints an init failure like a syntax error: the local file, its line, why.
#[tokio::test]
async fn the_cli_shows_a_failed_init_at_its_line() {
    let node = Node::start();
    let dir = temp_files(&[(
        "hello.lua",
        "local greeting = 'hi'\nio.write(greeting)\nreturn function() return greeting end",
    )]);
    let file = dir.path().join("hello.lua");
    let output = node.cli(&["deploy", "hello", file.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:2: attempt to index nil with 'write'",
            file.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("hello was not deployed"), "{stderr}");
}

/// An init that never ends is stopped by the function's own timeout and refused; the
/// admin API and the data plane keep answering meanwhile.
#[tokio::test]
async fn an_init_that_spins_is_ended_by_its_timeout_and_refused() {
    let node = Node::start();
    node.deploy("neighbour", "return function() return 'ok' end", json!({}))
        .await;
    for source in [
        "while true do end",
        "while true do pcall(function() while true do end end) end",
    ] {
        let deploy = put(
            &node,
            "spin",
            json!({"source": source, "config": {"timeout": "300ms"}}),
        );
        let others = async {
            let (status, _) = node.admin_json(Method::GET, "/v1/status", None).await;
            let answer = node.get("/fn/neighbour").await.text().await.unwrap();
            (status, answer)
        };
        let ((status, body), (admin_status, answer)) = tokio::join!(deploy, others);
        assert_eq!((admin_status, answer.as_str()), (200, "ok"));
        assert_eq!(status, 400, "{source}: {body}");
        let (code, path, kind, _, _, message) = init_error(&body);
        assert_eq!(
            (code.as_str(), path.as_str(), kind.as_str()),
            ("init_error", "source", "timeout"),
            "{body}"
        );
        assert!(message.contains("300 ms"), "{message}");
    }
    // Memory is the function's own limit too.
    let (status, body) = put(
        &node,
        "hog",
        json!({"source": "local t = {} for i = 1, 1e9 do t[i] = i end return function() end",
               "config": {"memory": "8MiB"}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(init_error(&body).2, "memory", "{body}");
}

/// What the contract allows at module level keeps working at deploy: the function's
/// environment, the built-in modules, `print` (its line is in the log, under the request
/// id `deploy`). An identical redeploy changes nothing and runs no init.
#[tokio::test]
async fn an_init_may_use_its_env_and_the_built_in_modules() {
    let node = Node::start();
    let source = r#"
local json = require("json")
local shared = require("shared")
local greeting = assert(os.getenv("GREETING"), "GREETING is required")
local inits = shared.incr("inits", 1, 0)
print("init " .. inits)
local config = json.decode('{"punctuation": "!"}')
return function(event, ctx)
  return greeting .. ", " .. (event.name or "World") .. config.punctuation
end
"#;
    let config = json!({"env": {"GREETING": "Hello"}});
    let (status, body) = put(&node, "g", json!({"source": source, "config": config})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        node.get("/fn/g").await.text().await.unwrap(),
        "Hello, World!"
    );
    let (status, body) = put(&node, "g", json!({"source": source, "config": config})).await;
    assert_eq!((status, &body["unchanged"]), (200, &json!(true)), "{body}");
    let response = node
        .admin_request(Method::GET, "/v1/functions/g/logs")
        .send()
        .await
        .unwrap();
    let records: Vec<Value> = response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let inits: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["request_id"].as_str().unwrap(),
                r["message"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(inits[0], ("deploy", "init 1"), "{inits:?}");
    assert_eq!(
        inits.iter().filter(|(id, _)| *id == "deploy").count(),
        1,
        "the unchanged redeploy ran no init: {inits:?}"
    );
    // Without its variable the same code is refused, naming the assertion.
    let (status, body) = put(&node, "g2", json!({"source": source})).await;
    assert_eq!(status, 400, "{body}");
    let (_, _, _, file, line, message) = init_error(&body);
    assert_eq!((file.as_str(), line), ("main.lua", Some(4)), "{body}");
    assert!(message.ends_with("GREETING is required"), "{message}");
}

/// An init can still fail at run time (it depends on more than its code): the client gets
/// a 500 with a request id, and the init's error is in the function log under that id.
#[tokio::test]
async fn a_run_time_init_failure_is_logged_under_the_clients_request_id() {
    let node = Node::start();
    // The deploy check is the first init; every later one fails.
    let source = r#"
local shared = require("shared")
if shared.incr("starts", 1, 0) > 1 then
  error("only one start allowed")
end
return function() return "ok" end
"#;
    node.deploy("once", source, json!({})).await;
    let response = node.get("/fn/once").await;
    assert_eq!(response.status(), 500);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["details"]["request_id"], request_id.as_str());
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&request_id),
        "{body}"
    );
    let response = node
        .admin_request(Method::GET, "/v1/functions/once/logs")
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let line: Value = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|record| {
            record["message"]
                .as_str()
                .is_some_and(|m| m.contains("only one start allowed"))
        })
        .unwrap_or_else(|| panic!("the init's error is logged: {text}"));
    assert_eq!(line["request_id"], request_id.as_str(), "{line}");
    assert_eq!(line["level"], "error");
}
