//! Runs the hostile-function corpus (`tests/hostile/*.lua`, see its README) against a real
//! node: each attack ends with its expected error, the next call of the same function
//! works, and a neighbour keeps answering.

mod common;

use std::path::Path;

use common::Node;
use serde_json::Value;

struct Case {
    name: String,
    source: String,
    status: u16,
    code: String,
    /// The `kind` label counted in the metrics.
    kind: String,
    config: Value,
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
        let mut lines = source.lines();
        let expect = lines
            .next()
            .and_then(|l| l.strip_prefix("-- expect: "))
            .unwrap_or_else(|| panic!("{} lacks an expect line", path.display()));
        let mut words = expect.split_whitespace();
        let status: u16 = words.next().and_then(|w| w.parse().ok()).expect("STATUS");
        let code = words.next().expect("CODE").to_string();
        let kind = words.next().unwrap_or(kind_of(&code)).to_string();
        let config = lines
            .next()
            .and_then(|l| l.strip_prefix("-- config: "))
            .map(|c| serde_json::from_str(c).expect("config line is JSON"))
            .unwrap_or_else(|| serde_json::json!({}));
        cases.push(Case {
            name: path
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .replace('_', "-"),
            source: source.clone(),
            status,
            code,
            kind,
            config,
        });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(cases.len() >= 15, "the corpus is there");
    cases
}

fn kind_of(code: &str) -> &'static str {
    match code {
        "function_timeout" => "timeout",
        "memory_limit_exceeded" => "memory",
        "function_error" => "runtime",
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
        node.deploy(&case.name, &case.source, case.config.clone())
            .await;
        let response = node.get(&format!("/fn/{}", case.name)).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        if (status, code.as_str()) != (case.status, case.code.as_str()) {
            failures.push(format!(
                "{}: expected {} {}, got {status} {body}",
                case.name, case.status, case.code
            ));
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
        let series = format!(
            r#"moontide_function_errors_total{{function="{}",kind="{}"}} 1"#,
            case.name, case.kind
        );
        if !failures.iter().any(|f| f.starts_with(&case.name)) && !metrics.contains(&series) {
            failures.push(format!("{}: metrics lack {series}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "hostile corpus failures:\n{}",
        failures.join("\n")
    );
}
