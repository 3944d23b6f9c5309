//! Scheduled functions on a real node (`moontide serve`, embedded store): a schedule in
//! the config runs the function with the documented event, `next_runs`/`recent_runs` show
//! in `GET /v1/functions/{name}` and `moontide info`, an invalid schedule is refused with
//! its field path, and overlap `skip` never runs a due time while the previous run goes.
//!
//! No timings: every wait polls with a bounded number of tries; assertions compare counts
//! and order, not durations.

mod common;

use std::time::Duration;

use common::Node;
use reqwest::Method;
use serde_json::{Value, json};

const TRIES: usize = 400;
const POLL: Duration = Duration::from_millis(50);

/// Polls the function's log until `done` holds for its `run` lines.
async fn wait_log(node: &Node, name: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    for _ in 0..TRIES {
        lines = node
            .log_messages(name)
            .await
            .into_iter()
            .filter(|line| line.starts_with("run ") || line.starts_with("end "))
            .collect();
        if done(&lines) {
            return lines;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("{name}: condition never held; log: {lines:?}");
}

#[tokio::test]
async fn every_second_runs_with_the_event_and_shows_next_and_recent_runs() {
    let node = Node::start();
    node.deploy(
        "tick",
        r#"local json = require("json")
           return function(event, ctx)
             print("run " .. json.encode(event))
             return "ok"
           end"#,
        json!({"schedule": "@every 1s"}),
    )
    .await;
    let lines = wait_log(&node, "tick", |lines| lines.len() >= 3).await;
    let events: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line.trim_start_matches("run ")).unwrap())
        .collect();
    let mut times = Vec::new();
    for event in &events {
        assert_eq!(event["source"], "moontide.schedule", "{event}");
        assert_eq!(event["schedule"], "@every 1s");
        assert_eq!(event["timezone"], "UTC");
        assert_eq!(event["attempt"], 1);
        assert!(event["run_id"].as_str().unwrap().starts_with("sch-"));
        times.push(event["scheduled_time"].as_str().unwrap().to_string());
    }
    // Increasing due times, each once (RFC 3339 in one zone sorts as text).
    assert!(times.windows(2).all(|pair| pair[0] < pair[1]), "{times:?}");

    let (status, info) = node
        .admin_json(Method::GET, "/v1/functions/tick", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(info["schedule"]["cron"], "@every 1s");
    assert_eq!(info["schedule"]["overlap"], "skip");
    assert_eq!(info["next_runs"].as_array().unwrap().len(), 3, "{info}");
    let mut finished = 0;
    for _ in 0..TRIES {
        let (_, info) = node
            .admin_json(Method::GET, "/v1/functions/tick", None)
            .await;
        let recent = info["recent_runs"].as_array().unwrap().clone();
        finished = recent.iter().filter(|run| run["state"] == "ok").count();
        if finished >= 2 {
            // Newest first, every one run by this node as attempt 1.
            assert!(recent[0]["scheduled_ms"].as_i64() > recent[1]["scheduled_ms"].as_i64());
            assert!(
                recent
                    .iter()
                    .all(|run| run["attempt"] == 1 && run["node"].is_string())
            );
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(finished >= 2, "recent_runs never showed 2 finished runs");
    // `moontide info` shows the same.
    let shown = node.cli_ok(&["info", "tick"]);
    assert!(
        shown.contains("next_runs") && shown.contains("recent_runs"),
        "{shown}"
    );

    // Invalid schedules are refused with the field's path.
    for (schedule, path) in [
        (
            json!({"cron": "0 3 * * *", "timezone": "Mars/Base"}),
            "config.schedule.timezone",
        ),
        (json!("@every 100ms"), "config.schedule"),
        (json!({"cron": "0 3 * *"}), "config.schedule.cron"),
        (
            json!({"cron": "@daily", "overlap": "later"}),
            "config.schedule.overlap",
        ),
    ] {
        let (status, body) = node
            .admin_json(
                Method::PUT,
                "/v1/functions/bad",
                Some(json!({"source": "return function() end", "config": {"schedule": schedule}})),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["details"]["path"], path, "{body}");
    }
    let (_, body) = node
        .admin_json(
            Method::PUT,
            "/v1/functions/bad",
            Some(json!({"source": "return function() end",
                        "config": {"schedule": {"cron": "@daily", "timezone": "Mars/Base"}}})),
        )
        .await;
    assert_eq!(
        body["error"]["message"],
        "config.schedule.timezone: unknown time zone \"Mars/Base\""
    );

    // The CLI flag deploys a schedule too.
    let dir = common::temp_files(&[("cli.lua", "return function() return 1 end")]);
    let file = dir.path().join("cli.lua");
    node.cli_ok(&[
        "deploy",
        "cli",
        file.to_str().unwrap(),
        "--schedule",
        "30 2 * * *",
        "--schedule-timezone",
        "Europe/Berlin",
    ]);
    let (_, info) = node
        .admin_json(Method::GET, "/v1/functions/cli", None)
        .await;
    assert_eq!(info["schedule"]["timezone"], "Europe/Berlin", "{info}");
    assert!(
        info["next_runs"][0]
            .as_str()
            .unwrap()
            .contains("T02:30:00+0"),
        "{info}"
    );

    // Removing the schedule stops the runs: no new run line after a redeploy without it.
    node.deploy(
        "tick",
        "return function() print('run unscheduled') end",
        json!({}),
    )
    .await;
    let (_, info) = node
        .admin_json(Method::GET, "/v1/functions/tick", None)
        .await;
    assert_eq!(info["next_runs"], json!([]));
}

#[tokio::test]
async fn overlap_skip_never_runs_two_at_once() {
    let node = Node::start();
    // Each run holds its instance for about 2.5 s of CPU, the schedule fires every second.
    node.deploy(
        "slow",
        r#"return function(event, ctx)
             print("run " .. event.scheduled_time)
             local started = os.clock()
             while os.clock() - started < 2.5 do end
             print("end " .. event.scheduled_time)
           end"#,
        json!({"schedule": "@every 1s", "timeout": "10s"}),
    )
    .await;
    let lines = wait_log(&node, "slow", |lines| {
        lines.iter().filter(|line| line.starts_with("end ")).count() >= 2
    })
    .await;
    // Starts and ends alternate: a run never started while another ran.
    let mut running = false;
    for line in &lines {
        if line.starts_with("run ") {
            assert!(!running, "a run started while another ran: {lines:?}");
            running = true;
        } else {
            running = false;
        }
    }
    // The due times in between were recorded as skipped.
    let mut skipped = 0;
    for _ in 0..TRIES {
        let (_, info) = node
            .admin_json(Method::GET, "/v1/functions/slow", None)
            .await;
        skipped = info["recent_runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|run| run["state"] == "skipped")
            .count();
        if skipped >= 1 {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(skipped >= 1, "no due time was recorded as skipped");
}

#[tokio::test]
async fn overlap_queue_runs_one_after_another_and_errors_are_recorded() {
    let node = Node::start();
    node.deploy(
        "queued",
        r#"return function(event, ctx)
             print("run " .. event.scheduled_time)
             local started = os.clock()
             while os.clock() - started < 2 do end
             print("end " .. event.scheduled_time)
           end"#,
        json!({"schedule": {"cron": "@every 1s", "overlap": "queue"}, "timeout": "10s"}),
    )
    .await;
    node.deploy(
        "failing",
        "return function() error('boom') end",
        json!({"schedule": "@every 1s"}),
    )
    .await;
    let lines = wait_log(&node, "queued", |lines| {
        lines.iter().filter(|line| line.starts_with("end ")).count() >= 2
    })
    .await;
    let mut running = false;
    for line in &lines {
        assert_eq!(
            line.starts_with("run "),
            !running,
            "runs overlapped: {lines:?}"
        );
        running = line.starts_with("run ");
    }
    let (_, info) = node
        .admin_json(Method::GET, "/v1/functions/queued", None)
        .await;
    let recent = info["recent_runs"].as_array().unwrap();
    assert!(
        recent.iter().all(|run| run["state"] != "skipped"),
        "queue skips nothing it runs: {info}"
    );
    let mut failed = None;
    for _ in 0..TRIES {
        let (_, info) = node
            .admin_json(Method::GET, "/v1/functions/failing", None)
            .await;
        failed = info["recent_runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|run| run["state"] == "error")
            .cloned();
        if failed.is_some() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let failed = failed.expect("a failed run is recorded");
    assert_eq!(failed["error"], "function_error", "{failed}");
}
