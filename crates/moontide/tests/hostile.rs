//! Runs the hostile-function corpus (`tests/hostile/*.lua`, see its README) against a real
//! node: each attack ends with its expected error, the next call of the same function
//! works, and a neighbour keeps answering.

mod common;

use std::path::Path;

use common::{Node, metric_value};
use serde_json::Value;

/// One expected outcome: status, error code, and the `kind` label counted in the metrics.
#[derive(Clone)]
struct Outcome {
    status: u16,
    code: String,
    kind: String,
}

impl Outcome {
    fn parse(text: &str) -> Outcome {
        let mut words = text.split_whitespace();
        let status: u16 = words.next().and_then(|w| w.parse().ok()).expect("STATUS");
        let code = words.next().expect("CODE").to_string();
        let kind = words.next().unwrap_or(kind_of(&code)).to_string();
        Outcome { status, code, kind }
    }
}

struct Case {
    name: String,
    source: String,
    /// The first attack's outcome.
    expect: Outcome,
    /// The second attack's (`-- then:`). When it differs in kind, it is an attack that
    /// cannot yield: first stopped by the I/O thread's blocking cap, then run on the
    /// long-call worker until its timeout.
    then: Option<Outcome>,
    config: Value,
    /// `-- denied: REASON`: an egress denial the attack must cause, counted in
    /// `moontide_egress_denied_total{reason}` and written to the function's log.
    denied: Option<String>,
}

impl Case {
    /// The source with the node's addresses filled in (`{{ADMIN}}`, `{{ADMIN_PORT}}`,
    /// `{{DATA}}`: what an attack on the node itself aims at).
    fn source_for(&self, node: &Node) -> String {
        let admin = node.admin.trim_start_matches("http://");
        let data = node.data.trim_start_matches("http://");
        let admin_port = admin.rsplit(':').next().unwrap_or_default();
        self.source
            .replace("{{ADMIN}}", admin)
            .replace("{{ADMIN_PORT}}", admin_port)
            .replace("{{DATA}}", data)
    }
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/hostile exists") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "lua") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let header = |prefix: &str| {
            source
                .lines()
                .take_while(|l| l.starts_with("--"))
                .find_map(|l| l.strip_prefix(prefix))
        };
        let expect = header("-- expect: ")
            .map(Outcome::parse)
            .unwrap_or_else(|| panic!("{} lacks an expect line", path.display()));
        let then = header("-- then: ").map(Outcome::parse);
        let config = header("-- config: ")
            .map(|c| serde_json::from_str(c).expect("config line is JSON"))
            .unwrap_or_else(|| serde_json::json!({}));
        cases.push(Case {
            name: path
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .replace('_', "-"),
            source: source.clone(),
            expect,
            then,
            config,
            denied: header("-- denied: ").map(str::to_string),
        });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(cases.len() >= 15, "the corpus is there");
    cases
}

fn kind_of(code: &str) -> &'static str {
    match code {
        // Not an error: the attack is neutralised and the call answers (`200 ok`).
        "ok" => "-",
        "function_timeout" => "timeout",
        "memory_limit_exceeded" => "memory",
        "function_error" => "runtime",
        "function_blocked" => "blocking",
        other => panic!("unknown expected code {other}"),
    }
}

#[tokio::test]
async fn every_hostile_function_is_stopped_and_the_node_stays_healthy() {
    let node = Node::start();
    node.deploy(
        "neighbour",
        "return function() return 'fine' end",
        serde_json::json!({}),
    )
    .await;
    let mut failures = Vec::new();
    for case in corpus() {
        node.deploy(&case.name, &case.source_for(&node), case.config.clone())
            .await;
        let mut attacked = true;
        for expected in std::iter::once(&case.expect).chain(&case.then) {
            let response = node.get(&format!("/fn/{}", case.name)).await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let code = match body["error"]["code"].as_str() {
                Some(code) => code.to_string(),
                None if status == 200 => "ok".to_string(),
                None => String::new(),
            };
            if (status, code.as_str()) != (expected.status, expected.code.as_str()) {
                failures.push(format!(
                    "{}: expected {} {}, got {status} {body}",
                    case.name, expected.status, expected.code
                ));
                attacked = false;
                break;
            }
        }
        if !attacked {
            continue;
        }
        let again = node.get(&format!("/fn/{}?ok=1", case.name)).await;
        let again_status = again.status().as_u16();
        let again_body = again.text().await.unwrap_or_default();
        if (again_status, again_body.as_str()) != (200, "ok") {
            failures.push(format!(
                "{}: next call got {again_status} {again_body}",
                case.name
            ));
        }
        let neighbour = node
            .get("/fn/neighbour")
            .await
            .text()
            .await
            .unwrap_or_default();
        if neighbour != "fine" {
            failures.push(format!(
                "{}: the neighbour answered {neighbour:?}",
                case.name
            ));
        }
    }
    let metrics = node.metrics().await;
    for case in corpus() {
        let outcomes: Vec<&Outcome> = std::iter::once(&case.expect).chain(&case.then).collect();
        for outcome in outcomes.iter().filter(|o| o.kind != "-") {
            let count = outcomes.iter().filter(|o| o.kind == outcome.kind).count();
            let series = format!(
                r#"moontide_function_errors_total{{function="{}",kind="{}"}} {count}"#,
                case.name, outcome.kind
            );
            if !failures.iter().any(|f| f.starts_with(&case.name)) && !metrics.contains(&series) {
                failures.push(format!("{}: metrics lack {series}", case.name));
            }
        }
        if let Some(reason) = &case.denied {
            let series = format!(
                r#"moontide_egress_denied_total{{function="{}",reason="{reason}"}}"#,
                case.name
            );
            if !failures.iter().any(|f| f.starts_with(&case.name)) {
                if metric_value(&metrics, &series) < 1.0 {
                    failures.push(format!("{}: metrics lack {series}", case.name));
                }
                let needle = format!("denied by policy: {reason}");
                let logs = node.log_messages(&case.name).await;
                if !logs.iter().any(|line| line.contains(&needle)) {
                    failures.push(format!("{}: no log line says {needle:?}", case.name));
                }
            }
        }
        if case
            .then
            .as_ref()
            .is_some_and(|then| then.kind != case.expect.kind)
        {
            // A second attack of another kind (blocking, then timeout) ran on the
            // long-call worker.
            let series = format!(r#"moontide_long_calls_total{{function="{}"}}"#, case.name);
            let handed_over = metric_value(&metrics, &series) >= 1.0;
            if !failures.iter().any(|f| f.starts_with(&case.name)) && !handed_over {
                failures.push(format!(
                    "{}: no call ran on the long-call worker",
                    case.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "hostile corpus failures:\n{}",
        failures.join("\n")
    );
}

/// A call that cannot yield (a pattern bomb inside the C matcher) runs on the long-call
/// worker once its function is marked; meanwhile the I/O threads keep serving others.
#[tokio::test]
async fn a_neighbour_answers_while_a_call_that_cannot_yield_runs() {
    // One I/O worker: had the bomb run on it, the neighbour would wait for the bomb.
    let node = Node::start_with(&["--workers", "1"]);
    node.deploy(
        "neighbour",
        "return function() return 'fine' end",
        serde_json::json!({}),
    )
    .await;
    node.deploy(
        "bomb",
        "return function()
           local s = string.rep('a', 40)
           while true do string.find(s, string.rep('a*', 20) .. 'b') end
         end",
        serde_json::json!({"timeout": "3s"}),
    )
    .await;
    // First call: inline, ended by the blocking cap, which marks the function.
    let first = node.get("/fn/bomb").await;
    assert_eq!(first.status().as_u16(), 503);
    assert!(first.headers().contains_key("retry-after"));
    // Second call: on the long-call worker, for its whole 3 s budget.
    let bomb = tokio::spawn({
        let url = node.url("/fn/bomb");
        async move {
            common::http_client()
                .get(url)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let series = r#"moontide_long_calls_total{function="bomb"}"#;
    let mut polls = 0;
    while metric_value(&node.metrics().await, series) < 1.0 {
        polls += 1;
        assert!(
            polls < 1000,
            "the second call never reached the long-call worker"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for _ in 0..20 {
        let answer = node.get("/fn/neighbour").await.text().await.unwrap();
        assert_eq!(answer, "fine");
    }
    assert!(
        !bomb.is_finished(),
        "the neighbour was served while the bomb still ran"
    );
    assert_eq!(bomb.await.unwrap().as_u16(), 504);
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"moontide_function_errors_total{function="bomb",kind="blocking"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"moontide_function_errors_total{function="bomb",kind="timeout"}"#
        ),
        1.0
    );
}
