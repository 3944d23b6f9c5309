//! Elasticity: instances scale from zero on demand and back to zero after the idle grace,
//! the autoscaler pre-warms a rising load, the bounded queue sheds with `503` and
//! `Retry-After`, and a full node evicts idle instances of cold functions before it refuses
//! a call. Driven over real sockets against the real binary; observed through `/metrics`
//! and `info`. Waits are bounded polls, never timing assertions.

mod common;

use std::time::Duration;

use common::{Node, metric_value as metric};
use serde_json::{Value, json};

/// Sleeps `event.queryStringParameters.ms` (default 100) and answers "ok".
const SLEEPER: &str = r#"
local time = require("time")
return function(event)
    local ms = tonumber((event.queryStringParameters or {}).ms) or 100
    time.sleep(ms)
    return "ok"
end
"#;

/// Polls `/metrics` until `series` satisfies `done` (bounded); returns the last exposition.
async fn wait_for_metric(node: &Node, series: &str, done: impl Fn(f64) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..200 {
        last = node.metrics().await;
        if done(metric(&last, series)) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} never reached the expected value; last exposition:\n{last}");
}

/// Sends `count` concurrent requests; returns (status, body JSON or text, Retry-After).
async fn burst(node: &Node, path: &str, count: usize) -> Vec<(u16, Value, Option<String>)> {
    let requests = (0..count).map(|_| {
        let request = node.http.get(node.url(path)).send();
        async move {
            let response = request.await.expect("data-plane request");
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let text = response.text().await.expect("body");
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            (status, body, retry_after)
        }
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test]
async fn scales_from_zero_on_demand_and_back_to_zero_after_the_idle_grace() {
    let node = Node::start();
    node.deploy(
        "sleeper",
        SLEEPER,
        json!({"idle_timeout": "300ms", "stable_window": "200ms", "panic_window": "20ms"}),
    )
    .await;
    let before = node.metrics().await;
    assert_eq!(
        metric(&before, r#"moontide_instances{function="sleeper"}"#),
        0.0
    );

    let answers = burst(&node, "/fn/sleeper?ms=300", 6).await;
    assert!(
        answers.iter().all(|(status, ..)| *status == 200),
        "{answers:?}"
    );
    let during = node.metrics().await;
    // Six overlapping calls needed six instances, made on demand.
    assert!(
        metric(&during, r#"moontide_cold_starts_total{function="sleeper"}"#) >= 6.0,
        "{during}"
    );
    assert!(
        metric(
            &during,
            r#"moontide_scale_events_total{function="sleeper",direction="up",reason="demand"}"#
        ) >= 6.0,
        "{during}"
    );

    // No more calls: the averages decay, the grace passes, the function falls to min (0).
    let after = wait_for_metric(&node, r#"moontide_instances{function="sleeper"}"#, |v| {
        v == 0.0
    })
    .await;
    let down = metric(
        &after,
        r#"moontide_scale_events_total{function="sleeper",direction="down",reason="scale_down"}"#,
    ) + metric(
        &after,
        r#"moontide_scale_events_total{function="sleeper",direction="down",reason="idle"}"#,
    );
    assert!(down >= 6.0, "{after}");
    assert_eq!(
        metric(&after, r#"moontide_instances_desired{function="sleeper"}"#),
        0.0
    );
    assert_eq!(metric(&after, "moontide_node_instances"), 0.0, "{after}");

    // The next call starts from zero again and is served.
    let response = node.get("/fn/sleeper?ms=1").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn min_instances_stay_warm_through_the_grace() {
    let node = Node::start();
    node.deploy(
        "warm",
        SLEEPER,
        json!({"min": 2, "idle_timeout": "100ms", "stable_window": "100ms", "panic_window": "10ms"}),
    )
    .await;
    // Kept warm from the deploy on, with no traffic at all.
    wait_for_metric(&node, r#"moontide_instances{function="warm"}"#, |v| {
        v == 2.0
    })
    .await;
    let answers = burst(&node, "/fn/warm?ms=200", 5).await;
    assert!(answers.iter().all(|(status, ..)| *status == 200));
    // Back down to min, not below.
    let metrics = wait_for_metric(&node, r#"moontide_instances{function="warm"}"#, |v| {
        v == 2.0
    })
    .await;
    assert!(
        metric(
            &metrics,
            r#"moontide_scale_events_total{function="warm",direction="down",reason="scale_down"}"#
        ) + metric(
            &metrics,
            r#"moontide_scale_events_total{function="warm",direction="down",reason="idle"}"#
        ) >= 3.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_rising_load_is_prewarmed() {
    // One worker: the whole load lands on one thread's autoscaler.
    let node = Node::start_with(&["--workers", "1"]);
    node.deploy(
        "ramp",
        SLEEPER,
        json!({"stable_window": "1s", "panic_window": "50ms", "max": 100}),
    )
    .await;
    // Steps of 2, 6 and 12 concurrent callers, each step held about 600 ms.
    for callers in [2usize, 6, 12] {
        let rounds = (0..callers).map(|_| async {
            for _ in 0..12 {
                let response = node.get("/fn/ramp?ms=50").await;
                assert_eq!(response.status(), 200);
            }
        });
        futures_util::future::join_all(rounds).await;
    }
    let metrics = node.metrics().await;
    let prewarmed = metric(
        &metrics,
        r#"moontide_scale_events_total{function="ramp",direction="up",reason="prewarm"}"#,
    );
    assert!(prewarmed >= 1.0, "no instance was pre-warmed:\n{metrics}");
}

#[tokio::test]
async fn the_bounded_queue_sheds_with_503_and_retry_after() {
    let node = Node::start();
    node.deploy(
        "narrow",
        SLEEPER,
        json!({"max": 1, "queue_size": 2, "queue_timeout": "200ms"}),
    )
    .await;
    // One call holds the only instance for a second; two wait 200 ms and are shed; the
    // rest find the queue full.
    let holder = node.http.get(node.url("/fn/narrow?ms=1000")).send();
    let holder = tokio::spawn(holder);
    wait_for_metric(
        &node,
        r#"moontide_instances_busy{function="narrow"}"#,
        |v| v == 1.0,
    )
    .await;
    let answers = burst(&node, "/fn/narrow?ms=1", 6).await;
    let holder = holder.await.unwrap().expect("holder");
    assert_eq!(holder.status(), 200);

    let reasons: Vec<&str> = answers
        .iter()
        .map(|(status, body, retry_after)| {
            assert_eq!(*status, 503, "{body}");
            assert_eq!(body["error"]["code"], "overloaded", "{body}");
            assert!(retry_after.is_some(), "503 without Retry-After: {body}");
            body["error"]["details"]["reason"].as_str().unwrap_or("")
        })
        .collect();
    let count = |reason| reasons.iter().filter(|r| **r == reason).count();
    assert_eq!(count("queue_timeout"), 2, "{reasons:?}");
    assert_eq!(count("queue_full"), 4, "{reasons:?}");

    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"moontide_shed_total{function="narrow",reason="queue_timeout"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"moontide_shed_total{function="narrow",reason="queue_full"}"#
        ),
        4.0
    );
    assert!(
        metric(
            &metrics,
            r#"moontide_queue_wait_seconds_count{function="narrow"}"#
        ) >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"moontide_queue_depth{function="narrow"}"#),
        0.0
    );
}

/// Calls that wait, race a hand-over with a re-check, time out, or are abandoned by their
/// client mid-wait must leave nothing behind: afterwards the queue is empty and every
/// instance comes back to the node (a leaked instance would hold `max` forever).
#[tokio::test]
async fn waiting_and_abandoned_calls_leak_nothing() {
    let node = Node::start();
    node.deploy(
        "contended",
        SLEEPER,
        json!({"max": 2, "queue_timeout": "3s", "idle_timeout": "200ms",
               "stable_window": "100ms", "panic_window": "20ms"}),
    )
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(40))
        .build()
        .unwrap();
    let patient = (0..24).map(|_| async {
        let response = node.get("/fn/contended?ms=15").await;
        assert_eq!(response.status(), 200);
    });
    let abandoned = (0..12).map(|_| {
        let request = impatient.get(node.url("/fn/contended?ms=15")).send();
        async move {
            // Gives up while queued behind the others.
            let _ = request.await;
        }
    });
    tokio::join!(
        futures_util::future::join_all(patient),
        futures_util::future::join_all(abandoned)
    );
    let metrics = wait_for_metric(&node, "moontide_node_instances", |v| v == 0.0).await;
    assert_eq!(
        metric(&metrics, r#"moontide_queue_depth{function="contended"}"#),
        0.0,
        "{metrics}"
    );
    let (_, info) = node
        .admin_json(reqwest::Method::GET, "/v1/functions/contended", None)
        .await;
    assert_eq!(info["instances"]["waiting"], 0, "{info}");
    assert_eq!(info["instances"]["live"], 0, "{info}");
    // And the function still serves.
    assert_eq!(node.get("/fn/contended?ms=1").await.status(), 200);
}

#[tokio::test]
async fn a_full_node_evicts_idle_instances_of_cold_functions_before_refusing() {
    let node = Node::start_with(&["--workers", "1", "--max-instances", "2"]);
    for name in ["cold", "warm", "hot"] {
        node.deploy(name, SLEEPER, json!({"queue_timeout": "300ms"}))
            .await;
    }
    // cold and warm each leave one idle instance (their idle grace is 60 s).
    for name in ["cold", "warm"] {
        let response = node.get(&format!("/fn/{name}?ms=1")).await;
        assert_eq!(response.status(), 200);
    }
    let metrics = node.metrics().await;
    assert_eq!(
        metric(&metrics, "moontide_node_instances"),
        2.0,
        "{metrics}"
    );

    // The node is full, but hot is served: cold's idle instance (idle longest) makes room.
    let response = node.get("/fn/hot?ms=1").await;
    assert_eq!(response.status(), 200);
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"moontide_scale_events_total{function="cold",direction="down",reason="evicted"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"moontide_instances{function="warm"}"#),
        1.0
    );
    assert_eq!(metric(&metrics, "moontide_node_instances"), 2.0);

    // Both slots busy and nothing idle to evict: the third function is refused.
    let busy = burst(&node, "/fn/warm?ms=1500", 1);
    let also_busy = burst(&node, "/fn/hot?ms=1500", 1);
    let refused = async {
        wait_for_metric(&node, r#"moontide_instances_busy{function="hot"}"#, |v| {
            v == 1.0
        })
        .await;
        wait_for_metric(&node, r#"moontide_instances_busy{function="warm"}"#, |v| {
            v == 1.0
        })
        .await;
        burst(&node, "/fn/cold?ms=1", 1).await
    };
    let (busy, also_busy, refused) = tokio::join!(busy, also_busy, refused);
    assert_eq!(busy[0].0, 200);
    assert_eq!(also_busy[0].0, 200);
    let (status, body, retry_after) = &refused[0];
    assert_eq!(*status, 503, "{body}");
    assert_eq!(body["error"]["details"]["reason"], "node_full", "{body}");
    assert!(retry_after.is_some());
}

/// Records the peak of calls running at once in the instance (module-level state).
const PEAK_TRACKER: &str = r#"
local time = require("time")
local running, peak = 0, 0
return function(event)
    running = running + 1
    if running > peak then peak = running end
    time.sleep(tonumber((event.queryStringParameters or {}).ms) or 100)
    running = running - 1
    return { peak = peak }
end
"#;

/// With `concurrency` 4, one instance serves four calls at once (coroutines of one state);
/// the fifth waits for a free share rather than a new instance. On a node with two
/// workers, calls spread over both threads share and hand back instances without leaking.
#[tokio::test]
async fn calls_share_an_instance_up_to_its_concurrency() {
    let node = Node::start_with(&["--workers", "1"]);
    node.deploy(
        "shared",
        PEAK_TRACKER,
        json!({"concurrency": 4, "max": 1, "queue_timeout": "5s"}),
    )
    .await;
    let answers = burst(&node, "/fn/shared?ms=200", 10).await;
    assert!(
        answers.iter().all(|(status, ..)| *status == 200),
        "{answers:?}"
    );
    let peak = answers
        .iter()
        .map(|(_, body, _)| body["peak"].as_u64().expect("peak"))
        .max();
    assert_eq!(peak, Some(4), "{answers:?}");
    let metrics = node.metrics().await;
    assert_eq!(
        metric(&metrics, r#"moontide_cold_starts_total{function="shared"}"#),
        1.0,
        "one instance served all ten calls:\n{metrics}"
    );

    let node = Node::start();
    node.deploy(
        "spread",
        PEAK_TRACKER,
        json!({"concurrency": 3, "max": 2, "queue_timeout": "5s", "idle_timeout": "200ms",
               "stable_window": "100ms", "panic_window": "20ms"}),
    )
    .await;
    let answers = burst(&node, "/fn/spread?ms=50", 24).await;
    assert!(
        answers.iter().all(|(status, ..)| *status == 200),
        "{answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(_, body, _)| body["peak"].as_u64().is_some_and(|peak| peak <= 3)),
        "no instance ran more than 3 calls at once: {answers:?}"
    );
    let settled = wait_for_metric(&node, r#"moontide_instances{function="spread"}"#, |v| {
        v == 0.0
    })
    .await;
    for gauge in ["instances_busy", "instances_idle", "queue_depth"] {
        let series = format!(r#"moontide_{gauge}{{function="spread"}}"#);
        assert_eq!(metric(&settled, &series), 0.0, "{series}:\n{settled}");
    }
}

#[tokio::test]
async fn info_shows_the_policy_and_the_pool() {
    let node = Node::start();
    node.deploy(
        "shown",
        SLEEPER,
        json!({"min": 1, "max": 7, "stable_window": "3s", "panic_window": "150ms",
               "max_scale_up_rate": 50, "queue_size": 9, "queue_timeout": "2s"}),
    )
    .await;
    wait_for_metric(&node, r#"moontide_instances{function="shown"}"#, |v| {
        v == 1.0
    })
    .await;
    let info = node.cli_ok(&["info", "shown"]);
    let info: Value = serde_json::from_str(&info).expect("info is JSON");
    let config = &info["active"]["config"];
    assert_eq!(config["max"], 7, "{info}");
    assert_eq!(config["concurrency"], 1);
    assert_eq!(config["stable_window_ms"], 3000);
    assert_eq!(config["panic_window_ms"], 150);
    assert_eq!(config["max_scale_up_rate"], 50);
    assert_eq!(config["queue_size"], 9);
    assert_eq!(config["queue_timeout_ms"], 2000);
    assert_eq!(info["instances"]["live"], 1, "{info}");
    assert_eq!(info["instances"]["waiting"], 0, "{info}");

    // Bad policies are refused with the path of each offending field.
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            "/v1/functions/shown",
            Some(json!({"source": SLEEPER, "config": {
                "concurrency": 0, "stable_window": "1s", "panic_window": "2s",
                "max_scale_up_rate": 0, "queue_size": 1_000_000, "queue_timeout": "2h"
            }})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let mut paths: Vec<&str> = body["error"]["details"]["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "config.concurrency",
            "config.max_scale_up_rate",
            "config.panic_window",
            "config.queue_size",
            "config.queue_timeout"
        ],
        "{body}"
    );
}
