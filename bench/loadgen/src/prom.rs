//! Reads the node's Prometheus/OpenMetrics text exposition: a small tolerant parser
//! (labels in any order, escaped label values, comments, `# EOF`, optional timestamps)
//! and the per-function sample the timeline records.

use std::collections::BTreeMap;

/// One series line: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses an exposition. Lines that do not parse are skipped (a scrape must not abort the
/// run), so the result holds every well-formed series line.
pub fn parse(text: &str) -> Vec<Series> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // Value, then an optional timestamp (and in OpenMetrics an optional exemplar).
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Series {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` (the text after `{`); returns the labels and the rest after `}`.
fn parse_labels(mut text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start();
        if let Some(rest) = text.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = text.find('=')?;
        let key = text[..eq].trim().to_string();
        text = text[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = text.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        text = text[end + 1..].trim_start();
        if let Some(rest) = text.strip_prefix(',') {
            text = rest;
        }
    }
}

/// What one scrape says about one function; `None` where the series is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FunctionSample {
    /// `moontide_instances`: live instances, busy and idle.
    pub instances: Option<f64>,
    /// `moontide_instances_desired`: what the autoscaler wants.
    pub desired: Option<f64>,
    /// `moontide_instances_busy` / `moontide_instances_idle`.
    pub busy: Option<f64>,
    pub idle: Option<f64>,
    /// `moontide_cold_starts_total` (a counter).
    pub cold_starts: Option<f64>,
    /// Sum of `moontide_shed_total` over all label sets (a counter).
    pub shed: Option<f64>,
    /// `moontide_queue_depth`: calls waiting for an instance.
    pub queue_depth: Option<f64>,
}

impl FunctionSample {
    /// Picks the function's series (`function="NAME"`) out of a parsed exposition.
    pub fn from_series(series: &[Series], function: &str) -> FunctionSample {
        let mut sample = FunctionSample::default();
        for s in series {
            if s.labels.get("function").map(String::as_str) != Some(function) {
                continue;
            }
            let slot = match s.name.as_str() {
                "moontide_instances" => &mut sample.instances,
                "moontide_instances_desired" => &mut sample.desired,
                "moontide_instances_busy" => &mut sample.busy,
                "moontide_instances_idle" => &mut sample.idle,
                "moontide_cold_starts_total" => &mut sample.cold_starts,
                "moontide_queue_depth" => &mut sample.queue_depth,
                "moontide_shed_total" => {
                    *sample.shed.get_or_insert(0.0) += s.value;
                    continue;
                }
                _ => continue,
            };
            // A gauge should appear once per function; if it does not, the last one wins.
            *slot = Some(s.value);
        }
        sample
    }

    /// Parses `text` and picks the function's series.
    pub fn parse(text: &str, function: &str) -> FunctionSample {
        FunctionSample::from_series(&parse(text), function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP moontide_instances Live Lua instances of a function (busy and idle).
# TYPE moontide_instances gauge
moontide_instances{function="sleep20"} 12
moontide_instances{function="other"} 3
# TYPE moontide_cold_starts counter
moontide_cold_starts_total{function="sleep20"} 40
moontide_shed_total{reason="queue_full",function="sleep20"} 5
moontide_shed_total{function="sleep20",reason="queue_timeout"} 2.5 1700000000000
moontide_shed_total{function="other",reason="queue_full"} 100
moontide_queue_depth{function="sleep20"} 0
moontide_request_duration_seconds_bucket{function="sleep20",le="+Inf"} 7
odd{function="sleep20", note="a \"quoted\", {braced} \\ value"} 1
broken{function="sleep20" 1
# EOF
"#;

    #[test]
    fn parses_labels_in_any_order_and_escapes() {
        let series = parse(TEXT);
        let odd = series.iter().find(|s| s.name == "odd").unwrap();
        assert_eq!(odd.labels["note"], r#"a "quoted", {braced} \ value"#);
        assert_eq!(odd.value, 1.0);
        assert!(series.iter().all(|s| s.name != "broken"));
        let shed: Vec<_> = series
            .iter()
            .filter(|s| s.name == "moontide_shed_total")
            .collect();
        assert_eq!(shed.len(), 3);
    }

    #[test]
    fn picks_one_function_and_leaves_absent_series_empty() {
        let sample = FunctionSample::parse(TEXT, "sleep20");
        assert_eq!(
            sample,
            FunctionSample {
                instances: Some(12.0),
                desired: None,
                busy: None,
                idle: None,
                cold_starts: Some(40.0),
                shed: Some(7.5),
                queue_depth: Some(0.0),
            }
        );
        assert_eq!(
            FunctionSample::parse(TEXT, "missing"),
            FunctionSample::default()
        );
    }

    #[test]
    fn special_values() {
        let series = parse("a 1e3\nb +Inf\nc NaN\nd{} -2\n");
        assert_eq!(series[0].value, 1000.0);
        assert!(series[1].value.is_infinite());
        assert!(series[2].value.is_nan());
        assert_eq!(series[3].value, -2.0);
    }
}
