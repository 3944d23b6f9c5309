//! The `db` module end to end on the real server: the seed's example shape (`require
//! "database"`, a table created if missing, an insert, `db.query(... WHERE id = ?)`) over
//! HTTP; data that survives `kill -9` and a restart; functions that do not see each
//! other's tables; `ATTACH` refused; a runaway query that ends at its function's timeout
//! while the node serves others; a slow query that does not hold the only worker. No
//! timings are asserted: waits are bounded polls.

mod common;

use std::time::{Duration, Instant};

use common::Node;
use serde_json::{Value, json};

async fn call(node: &Node, path: &str) -> (u16, Value) {
    let response = node.get(path).await;
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// The seed's example, with the table created if missing and a row inserted first.
const USERS: &str = r#"local db = require("database")
db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
return function(event)
  local data = event.queryStringParameters or {}
  if data.name then
    local r = db.execute("INSERT INTO users (name) VALUES (?)", data.name)
    return { id = r.last_insert_id }
  end
  local rows = db.query("SELECT * FROM users WHERE id = ?", tonumber(data.userId))
  return { user = rows[1] or db.null, count = #rows }
end"#;

/// Runs the SQL of `?sql=` and answers the rows, or the error's message.
const RAW: &str = r#"local db = require("db")
return function(event)
  local ok, rows = pcall(db.query, event.queryStringParameters.sql)
  if not ok then return { err = tostring(rows) } end
  return { rows = rows }
end"#;

const RUNAWAY: &str = r#"local db = require("db")
local shared = require("shared")
return function(event)
  shared.set("runaway:started", true)
  return db.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
                   SELECT count(*) AS n FROM c")
end"#;

const PING: &str = r#"local shared = require("shared")
return function() return { started = shared.get("runaway:started") == true } end"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_runs_and_its_data_survives_kill_9() {
    let node = Node::start();
    node.deploy("users", USERS, json!({})).await;
    let (status, body) = call(&node, "/fn/users?name=ada").await;
    assert_eq!((status, &body), (200, &json!({"id": 1})), "{body}");
    let (status, body) = call(&node, "/fn/users?name=grace").await;
    assert_eq!((status, &body), (200, &json!({"id": 2})), "{body}");
    let (status, body) = call(&node, "/fn/users?userId=2").await;
    assert_eq!(
        (status, body),
        (200, json!({"user": {"id": 2, "name": "grace"}, "count": 1}))
    );
    let (_, body) = call(&node, "/fn/users?userId=9").await;
    assert_eq!(body, json!({"user": null, "count": 0}));
    assert!(node.data_dir.join("db/users.sqlite").exists());

    let node = node.kill_and_restart();
    let (status, body) = call(&node, "/fn/users?userId=1").await;
    assert_eq!(
        (status, body),
        (200, json!({"user": {"id": 1, "name": "ada"}, "count": 1}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_do_not_see_each_others_tables_and_attach_is_refused() {
    let node = Node::start();
    node.deploy("users", USERS, json!({})).await;
    node.deploy("raw", RAW, json!({})).await;
    let (status, _) = call(&node, "/fn/users?name=ada").await;
    assert_eq!(status, 200);
    let (_, body) = call(&node, "/fn/raw?sql=SELECT%20*%20FROM%20users").await;
    let err = body["err"].as_str().unwrap_or_default();
    assert!(err.contains("db.query: no such table: users"), "{body}");
    let (_, body) = call(
        &node,
        "/fn/raw?sql=ATTACH%20DATABASE%20'users.sqlite'%20AS%20u",
    )
    .await;
    let err = body["err"].as_str().unwrap_or_default();
    assert!(err.contains("not authorized"), "{body}");
    let (_, body) = call(&node, "/fn/raw?sql=SELECT%201%20AS%20one").await;
    assert_eq!(body, json!({"rows": [{"one": 1}]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_ends_at_its_timeout_without_holding_the_only_worker() {
    let node = Node::start_with(&["--workers", "1"]);
    node.deploy("runaway", RUNAWAY, json!({"timeout": "3s"}))
        .await;
    node.deploy("ping", PING, json!({})).await;
    node.deploy("raw", RAW, json!({})).await;

    let url = node.url("/fn/runaway");
    let client = reqwest::Client::new();
    let runaway = tokio::spawn(async move {
        let response = client.get(url).send().await.expect("runaway request");
        response.status().as_u16()
    });
    // While the runaway query runs, the one worker answers other calls.
    let limit = Instant::now() + Duration::from_secs(10);
    let mut served_meanwhile = false;
    while Instant::now() < limit && !runaway.is_finished() {
        let (status, body) = call(&node, "/fn/ping").await;
        assert_eq!(status, 200, "{body}");
        if body["started"] == true && !runaway.is_finished() {
            served_meanwhile = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served_meanwhile,
        "no call was answered while the runaway query ran"
    );
    let (status, body) = call(&node, "/fn/raw?sql=SELECT%202%20AS%20two").await;
    assert_eq!((status, body), (200, json!({"rows": [{"two": 2}]})));
    // The runaway call ends at its timeout (a bounded wait, not a timing assertion).
    let status = tokio::time::timeout(Duration::from_secs(30), runaway)
        .await
        .expect("the runaway call ended")
        .unwrap();
    assert_ne!(status, 200);
    assert!(
        poll_log(&node, "runaway", "timed out").await,
        "no timeout logged"
    );
    let (status, _) = call(&node, "/fn/raw?sql=SELECT%203").await;
    assert_eq!(status, 200);
}

/// Polls the function's log for a line containing `needle` (bounded wait).
async fn poll_log(node: &Node, name: &str, needle: &str) -> bool {
    let limit = Instant::now() + Duration::from_secs(20);
    while Instant::now() < limit {
        if node
            .log_messages(name)
            .await
            .iter()
            .any(|line| line.contains(needle))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
