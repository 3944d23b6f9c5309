//! The run's summary: totals, latency, and the elasticity figures computed from the
//! timeline (steady p99 and recovery time of a step, instance-seconds against the oracle,
//! flapping, settling after the load stops). Written as `summary.json` and printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::client::PoolStats;
use crate::pattern::Pattern;
use crate::timeline::{BUCKET_S, RequestBucket, Row, bucket_index, percentile};

/// Seconds of steady load before the step that define the steady p99.
pub const STEADY_WINDOW_S: f64 = 3.0;
/// A bucket has recovered when its p99 is below this multiple of the steady p99.
pub const RECOVERY_FACTOR: f64 = 2.0;
/// Window of the median that smooths `instances_actual` before reversals are counted.
pub const MEDIAN_WINDOW: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct Requests {
    pub sent: u64,
    pub ok: u64,
    /// Not 2xx and not 503, plus timeouts and transport errors.
    pub errors: u64,
    /// 503 answers.
    pub shed: u64,
    pub timeouts: u64,
    pub transport_errors: u64,
    /// Statuses counted in `errors`, by code.
    pub error_statuses: BTreeMap<u16, u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flapping {
    /// Direction reversals of `instances_actual` after a 5-bucket median.
    pub instance_reversals: Option<usize>,
    /// Direction reversals of the offered rate curve.
    pub offered_reversals: usize,
}

/// How well the generator kept to its schedule.
#[derive(Debug, Clone, Serialize)]
pub struct Generator {
    /// Largest delay between a request's scheduled instant and its dispatch.
    pub max_lag_ms: f64,
    pub connections: PoolStats,
    pub scrapes: u64,
    pub scrape_failures: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub pattern: String,
    pub knobs: BTreeMap<String, String>,
    pub description: String,
    pub url: String,
    pub function: String,
    pub service_time_ms: f64,
    pub target_concurrency: f64,
    pub timeout_ms: f64,
    pub buckets: usize,
    pub requests: Requests,
    pub latency: Latency,
    /// p99 over the last 3 s before the step (step only).
    pub steady_p99_ms: Option<f64>,
    /// From the step start to the first bucket after which every bucket of the high phase
    /// has p99 < 2 × steady p99 (step only; null if never).
    pub recovery_s: Option<f64>,
    /// Σ instances_actual × 0.1 s.
    pub instance_seconds: Option<f64>,
    pub oracle_instance_seconds: f64,
    /// instance_seconds / oracle_instance_seconds.
    pub instance_ratio: Option<f64>,
    pub peak_instances: Option<f64>,
    pub cold_starts: Option<f64>,
    pub flapping: Flapping,
    /// When the load stops for good (seconds from the start).
    pub load_stop_s: f64,
    /// Last value of instances_actual in the timeline.
    pub final_instances: Option<f64>,
    /// From the load stop until instances_actual reached its final value for good.
    pub settle_after_stop_s: Option<f64>,
    pub generator: Generator,
}

/// Everything [`Summary::compute`] needs besides the pattern and the timeline.
pub struct RunInfo {
    pub url: String,
    pub function: String,
    pub service_time_ms: f64,
    pub target_concurrency: f64,
    pub timeout_ms: f64,
    pub error_statuses: BTreeMap<u16, u32>,
    pub generator: Generator,
}

impl Summary {
    pub fn compute(
        pattern: &Pattern,
        requests: &[RequestBucket],
        rows: &[Row],
        info: RunInfo,
    ) -> Summary {
        let sum = |f: fn(&RequestBucket) -> u32| requests.iter().map(|b| u64::from(f(b))).sum();
        let totals = Requests {
            sent: sum(|b| b.sent),
            ok: sum(|b| b.ok),
            errors: sum(|b| b.errors),
            shed: sum(|b| b.shed),
            timeouts: sum(|b| b.timeouts),
            transport_errors: sum(|b| b.transport),
            error_statuses: info.error_statuses,
        };
        let all = sorted_latencies(requests, 0, requests.len());
        let latency = Latency {
            p50_ms: percentile(&all, 0.50),
            p99_ms: percentile(&all, 0.99),
            max_ms: all.last().map(|v| f64::from(*v)),
        };

        let (steady_p99_ms, recovery_s) = match pattern {
            Pattern::Step { .. } => {
                let (start, end) = pattern.high_phase().expect("a step has a high phase");
                let steady = steady_p99(requests, start);
                let recovery = steady.and_then(|s| recovery(rows, start, end, s));
                (steady, recovery)
            }
            _ => (None, None),
        };

        let actual: Vec<Option<f64>> = rows.iter().map(|r| r.instances_actual).collect();
        let have_instances = actual.iter().any(Option::is_some);
        let instance_seconds =
            have_instances.then(|| actual.iter().flatten().sum::<f64>() * BUCKET_S);
        let oracle_instance_seconds = rows
            .iter()
            .map(|r| f64::from(r.oracle_instances))
            .sum::<f64>()
            * BUCKET_S;
        let instance_ratio = instance_seconds
            .filter(|_| oracle_instance_seconds > 0.0)
            .map(|s| s / oracle_instance_seconds);
        let smoothed = median_filter(&actual, MEDIAN_WINDOW);
        let flapping = Flapping {
            instance_reversals: have_instances.then(|| reversals(smoothed.iter().flatten())),
            offered_reversals: reversals(rows.iter().map(|r| &r.curve_rps)),
        };
        let load_stop_s = pattern.load_stop_s();
        let final_instances = actual.iter().rev().flatten().next().copied();
        let cold_starts = rows
            .iter()
            .any(|r| r.cold_starts.is_some())
            .then(|| rows.iter().filter_map(|r| r.cold_starts).sum());

        Summary {
            pattern: pattern.name().to_string(),
            knobs: pattern
                .knobs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            description: pattern.to_string(),
            url: info.url,
            function: info.function,
            service_time_ms: info.service_time_ms,
            target_concurrency: info.target_concurrency,
            timeout_ms: info.timeout_ms,
            buckets: rows.len(),
            requests: totals,
            latency,
            steady_p99_ms,
            recovery_s,
            instance_seconds,
            oracle_instance_seconds,
            instance_ratio,
            peak_instances: actual.iter().flatten().copied().reduce(f64::max),
            cold_starts,
            flapping,
            load_stop_s,
            final_instances,
            settle_after_stop_s: settle_after(&actual, load_stop_s),
            generator: info.generator,
        }
    }

    /// The short human summary.
    pub fn human(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
        let secs = |v: Option<f64>| v.map_or("never/-".to_string(), |v| format!("{v:.1} s"));
        let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let r = &self.requests;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} -> {} ({})",
            self.description, self.url, self.function
        );
        let _ = writeln!(
            out,
            "requests: {} sent, {} ok, {} errors ({} timeouts, {} transport{}), {} shed (503)",
            r.sent,
            r.ok,
            r.errors,
            r.timeouts,
            r.transport_errors,
            r.error_statuses
                .iter()
                .map(|(code, n)| format!(", {n}x {code}"))
                .collect::<String>(),
            r.shed
        );
        if r.errors > 0 {
            let _ = writeln!(out, "NOTE: errors were seen (exit status is still 0)");
        }
        let _ = writeln!(
            out,
            "latency (answers but 503s, timeouts at the timeout): p50 {}, p99 {}, max {}",
            ms(self.latency.p50_ms),
            ms(self.latency.p99_ms),
            ms(self.latency.max_ms)
        );
        if self.pattern == "step" {
            let _ = writeln!(
                out,
                "step: steady p99 {}, recovery (p99 < {RECOVERY_FACTOR}x steady) {}",
                ms(self.steady_p99_ms),
                secs(self.recovery_s)
            );
        }
        let _ = writeln!(
            out,
            "instance-seconds: {} actual vs {:.1} oracle (ratio {}); peak {} instances, {} cold starts",
            num(self.instance_seconds),
            self.oracle_instance_seconds,
            self.instance_ratio
                .map_or("-".to_string(), |v| format!("{v:.2}")),
            num(self.peak_instances),
            num(self.cold_starts)
        );
        let _ = writeln!(
            out,
            "flapping: {} reversals of instances vs {} of the offered rate",
            self.flapping
                .instance_reversals
                .map_or("-".to_string(), |v| v.to_string()),
            self.flapping.offered_reversals
        );
        let no_scale_down = match (self.final_instances, self.peak_instances) {
            (Some(last), Some(peak)) if last >= peak => " (= the peak: no scale-down seen)",
            _ => "",
        };
        let _ = writeln!(
            out,
            "after the load stops (t={:.1}s): instances reach their final value {}{} after {}",
            self.load_stop_s,
            num(self.final_instances),
            no_scale_down,
            secs(self.settle_after_stop_s)
        );
        let g = &self.generator;
        let _ = write!(
            out,
            "generator: max lag {:.1} ms, {} connections opened (peak {} open), {} scrapes ({} failed)",
            g.max_lag_ms,
            g.connections.opened,
            g.connections.peak_open,
            g.scrapes,
            g.scrape_failures
        );
        out
    }
}

/// Latencies of buckets `from..to`, sorted.
fn sorted_latencies(requests: &[RequestBucket], from: usize, to: usize) -> Vec<f32> {
    let to = to.min(requests.len());
    let from = from.min(to);
    let mut all: Vec<f32> = requests[from..to]
        .iter()
        .flat_map(|b| b.latency_ms.iter().copied())
        .collect();
    all.sort_by(f32::total_cmp);
    all
}

/// p99 over the [`STEADY_WINDOW_S`] before `start`.
fn steady_p99(requests: &[RequestBucket], start: f64) -> Option<f64> {
    let from = bucket_index((start - STEADY_WINDOW_S).max(0.0));
    let to = bucket_index(start);
    percentile(&sorted_latencies(requests, from, to), 0.99)
}

/// See [`Summary::recovery_s`]. Buckets without a p99 (nothing sent) do not count.
fn recovery(rows: &[Row], start: f64, end: f64, steady_p99: f64) -> Option<f64> {
    let from = bucket_index(start);
    let to = bucket_index(end).min(rows.len());
    let limit = RECOVERY_FACTOR * steady_p99;
    let mut recovered_from = None;
    for i in (from..to).rev() {
        match rows[i].p99_ms {
            Some(p99) if p99 >= limit => break,
            _ => recovered_from = Some(i),
        }
    }
    recovered_from.map(|i| (i as f64 * BUCKET_S - start).max(0.0))
}

/// Centered running median over `window` values (absent values skipped).
pub fn median_filter(values: &[Option<f64>], window: usize) -> Vec<Option<f64>> {
    let half = window / 2;
    (0..values.len())
        .map(|i| {
            values[i]?;
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(values.len());
            let mut w: Vec<f64> = values[lo..hi].iter().flatten().copied().collect();
            w.sort_by(f64::total_cmp);
            Some(w[w.len() / 2])
        })
        .collect()
}

/// Number of direction changes (up then down, or down then up); flat stretches are skipped.
pub fn reversals<'a>(values: impl IntoIterator<Item = &'a f64>) -> usize {
    let mut prev: Option<f64> = None;
    let mut direction = 0.0f64;
    let mut count = 0;
    for &v in values {
        if let Some(p) = prev {
            let d = v - p;
            if d.abs() > 1e-9 {
                if direction != 0.0 && d.signum() != direction {
                    count += 1;
                }
                direction = d.signum();
            }
        }
        prev = Some(v);
    }
    count
}

/// Seconds from `load_stop_s` until the series took its final value for good.
fn settle_after(values: &[Option<f64>], load_stop_s: f64) -> Option<f64> {
    let last = values.iter().rev().flatten().next().copied()?;
    let stop = bucket_index(load_stop_s).min(values.len());
    let mut settled_from = values.len();
    for i in (0..values.len()).rev() {
        match values[i] {
            Some(v) if v != last => break,
            _ => settled_from = i,
        }
    }
    let from = settled_from.max(stop);
    Some((from as f64 * BUCKET_S - load_stop_s).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_with_p99(p99: &[Option<f64>]) -> Vec<Row> {
        p99.iter()
            .enumerate()
            .map(|(i, p)| Row {
                t_s: i as f64 * BUCKET_S,
                p99_ms: *p,
                ..Row::default()
            })
            .collect()
    }

    #[test]
    fn recovery_is_the_start_of_the_last_good_stretch() {
        // Step at bucket 2 (0.2 s), high phase until bucket 8; steady p99 = 20 -> limit 40.
        let rows = rows_with_p99(&[
            Some(20.0),
            Some(20.0),
            Some(300.0),
            Some(30.0),
            Some(90.0),
            Some(30.0),
            None,
            Some(39.0),
            Some(500.0),
        ]);
        let r = recovery(&rows, 0.2, 0.8, 20.0).unwrap();
        assert!((r - 0.3).abs() < 1e-9, "{r}");
        // Bad at the end of the high phase: never recovered.
        let rows = rows_with_p99(&[Some(20.0), Some(20.0), Some(30.0), Some(300.0)]);
        assert_eq!(recovery(&rows, 0.2, 0.4, 20.0), None);
        // Never bad: recovered at once.
        let rows = rows_with_p99(&[Some(20.0), Some(20.0), Some(30.0), Some(30.0)]);
        assert_eq!(recovery(&rows, 0.2, 0.4, 20.0), Some(0.0));
    }

    #[test]
    fn median_removes_short_blips_and_reversals_count_turns() {
        let v: Vec<Option<f64>> = [
            5.0, 5.0, 6.0, 5.0, 5.0, 5.0, 10.0, 10.0, 10.0, 10.0, 4.0, 4.0, 4.0,
        ]
        .into_iter()
        .map(Some)
        .collect();
        let m = median_filter(&v, 5);
        let m: Vec<f64> = m.into_iter().flatten().collect();
        assert_eq!(m[2], 5.0, "a one-bucket blip is gone: {m:?}");
        assert_eq!(reversals(&m), 1, "{m:?}");
        assert_eq!(reversals(&[1.0, 2.0, 2.0, 3.0, 1.0, 1.0, 4.0]), 2);
        assert_eq!(reversals(&[3.0, 3.0, 3.0]), 0);
        assert_eq!(median_filter(&[None, Some(1.0)], 5), vec![None, Some(1.0)]);
    }

    #[test]
    fn settle_time_counts_from_the_load_stop() {
        let v: Vec<Option<f64>> = [1.0, 5.0, 5.0, 4.0, 3.0, 2.0, 2.0]
            .into_iter()
            .map(Some)
            .collect();
        // Load stops at 0.2 s (bucket 2); final value 2 from bucket 5 (0.5 s) on.
        let s = settle_after(&v, 0.2).unwrap();
        assert!((s - 0.3).abs() < 1e-9, "{s}");
        // Already at its final value when the load stopped.
        assert_eq!(settle_after(&[Some(2.0), Some(2.0)], 0.1), Some(0.0));
        assert_eq!(settle_after(&[None, None], 0.1), None);
    }

    #[test]
    fn steady_p99_uses_the_three_seconds_before_the_step() {
        let mut buckets = vec![RequestBucket::default(); 60];
        for (i, b) in buckets.iter_mut().enumerate() {
            b.latency_ms = vec![if i < 20 {
                1000.0
            } else {
                20.0 + (i % 3) as f32
            }];
        }
        // Step at 5 s: window = buckets 20..50, none of the 1000 ms ones.
        assert_eq!(steady_p99(&buckets, 5.0), Some(22.0));
    }
}
