//! The timeline: requests and scrapes folded into 100 ms buckets, and `timeline.csv`.
//!
//! A request belongs to the bucket in which it was *scheduled* to be sent, whenever it
//! finished. Its latency runs from that scheduled instant (not from when the generator
//! got round to it), so a generator that falls behind shows up as latency instead of
//! hiding it. Latency percentiles cover every request that got an HTTP answer other than
//! 503, plus timeouts counted at the timeout. 503s (shed: fast rejections that would pull
//! the percentiles down exactly when the node is overloaded) and transport errors have
//! no latency; they are counted in their own columns.
//!
//! Gauges come from the last scrape that landed in the bucket (the previous bucket's
//! value if none did); counters are turned into per-bucket deltas.

use std::fmt::Write as _;
use std::path::Path;

use crate::pattern::Pattern;
use crate::prom::FunctionSample;

/// Bucket length, in seconds.
pub const BUCKET_S: f64 = 0.1;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Status(u16),
    /// No complete answer within `--timeout`.
    Timeout,
    /// Connect or protocol failure.
    Transport,
}

/// Requests scheduled in one bucket.
#[derive(Debug, Clone, Default)]
pub struct RequestBucket {
    pub sent: u32,
    /// 2xx answers.
    pub ok: u32,
    /// 503 answers.
    pub shed: u32,
    /// Everything else: other statuses, timeouts, transport errors.
    pub errors: u32,
    pub timeouts: u32,
    pub transport: u32,
    /// Latencies in ms (see the module doc for which requests have one).
    pub latency_ms: Vec<f32>,
}

/// Collects request outcomes by bucket.
#[derive(Debug, Default)]
pub struct Recorder {
    pub buckets: Vec<RequestBucket>,
    /// Non-2xx, non-503 statuses seen, for the summary.
    pub other_statuses: std::collections::BTreeMap<u16, u32>,
}

impl Recorder {
    fn bucket(&mut self, t_s: f64) -> &mut RequestBucket {
        let i = bucket_index(t_s);
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, RequestBucket::default);
        }
        &mut self.buckets[i]
    }

    /// A request scheduled at `t_s` went out.
    pub fn sent(&mut self, t_s: f64) {
        self.bucket(t_s).sent += 1;
    }

    /// The request scheduled at `t_s` ended after `latency_ms`.
    pub fn finished(&mut self, t_s: f64, outcome: Outcome, latency_ms: f64) {
        if let Outcome::Status(code) = outcome
            && !(200..300).contains(&code)
            && code != 503
        {
            *self.other_statuses.entry(code).or_default() += 1;
        }
        let b = self.bucket(t_s);
        match outcome {
            Outcome::Status(200..=299) => b.ok += 1,
            Outcome::Status(503) => b.shed += 1,
            Outcome::Status(_) => b.errors += 1,
            Outcome::Timeout => {
                b.errors += 1;
                b.timeouts += 1;
            }
            Outcome::Transport => {
                b.errors += 1;
                b.transport += 1;
            }
        }
        if !matches!(outcome, Outcome::Transport | Outcome::Status(503)) {
            b.latency_ms.push(latency_ms as f32);
        }
    }
}

/// The bucket a time (seconds from the start) falls in.
pub fn bucket_index(t_s: f64) -> usize {
    // The small slack keeps 0.3 (= 0.29999...) in bucket 3.
    ((t_s / BUCKET_S) + 1e-9).floor().max(0.0) as usize
}

/// Nearest-rank percentile (`p` in 0..=1) of sorted values.
pub fn percentile(sorted: &[f32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(f64::from(sorted[rank - 1]))
}

/// One line of `timeline.csv`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Bucket start, seconds.
    pub t_s: f64,
    /// Requests sent in the bucket, per second.
    pub offered_rps: f64,
    /// Of those, 2xx answers, per second.
    pub achieved_rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors: u32,
    pub shed: u32,
    pub instances_desired: Option<f64>,
    pub instances_actual: Option<f64>,
    pub instances_busy: Option<f64>,
    pub queue_depth: Option<f64>,
    /// Cold starts counted by the node during the bucket.
    pub cold_starts: Option<f64>,
    /// Instances the load needs: ceil(offered_rps × service time / target concurrency).
    pub oracle_instances: u32,
    pub instances_idle: Option<f64>,
    /// `moontide_shed_total` growth during the bucket (the node's own count).
    pub server_shed: Option<f64>,
    /// The pattern's rate at the bucket's midpoint (not written; used for reversals).
    pub curve_rps: f64,
}

/// Inputs of [`build`] besides the data.
pub struct Oracle {
    pub service_time_s: f64,
    pub target_concurrency: f64,
}

impl Oracle {
    pub fn instances(&self, rps: f64) -> u32 {
        let need = rps * self.service_time_s / self.target_concurrency;
        // Slack against 10.000000001 from float arithmetic.
        (need - 1e-9).ceil().max(0.0) as u32
    }
}

/// Folds requests and scrape samples (`(t_s, sample)`, in time order; `baseline` is the
/// scrape taken before the start) into `n` rows.
pub fn build(
    requests: &[RequestBucket],
    samples: &[(f64, FunctionSample)],
    baseline: FunctionSample,
    pattern: &Pattern,
    oracle: &Oracle,
    n: usize,
) -> Vec<Row> {
    let empty = RequestBucket::default();
    let mut rows = Vec::with_capacity(n);
    let mut last = baseline;
    let mut next_sample = 0;
    let mut prev_counters = (baseline.cold_starts, baseline.shed);
    for i in 0..n {
        // The last scrape in this bucket; a series absent from it is absent, not stale.
        while next_sample < samples.len() && bucket_index(samples[next_sample].0) <= i {
            last = samples[next_sample].1;
            next_sample += 1;
        }
        let r = requests.get(i).unwrap_or(&empty);
        let mut lat = r.latency_ms.clone();
        lat.sort_by(f32::total_cmp);
        let offered_rps = f64::from(r.sent) / BUCKET_S;
        let delta = |now: Option<f64>, before: Option<f64>| match (now, before) {
            (Some(n), Some(b)) => Some((n - b).max(0.0)),
            (Some(n), None) => Some(n),
            (None, _) => None,
        };
        rows.push(Row {
            t_s: i as f64 * BUCKET_S,
            offered_rps,
            achieved_rps: f64::from(r.ok) / BUCKET_S,
            p50_ms: percentile(&lat, 0.50),
            p99_ms: percentile(&lat, 0.99),
            errors: r.errors,
            shed: r.shed,
            instances_desired: last.desired,
            instances_actual: last.instances,
            instances_busy: last.busy,
            queue_depth: last.queue_depth,
            cold_starts: delta(last.cold_starts, prev_counters.0),
            oracle_instances: oracle.instances(offered_rps),
            instances_idle: last.idle,
            server_shed: delta(last.shed, prev_counters.1),
            curve_rps: pattern.rate((i as f64 + 0.5) * BUCKET_S),
        });
        prev_counters = (last.cold_starts, last.shed);
    }
    rows
}

/// The CSV header (the spec'd columns, then `instances_idle` and `server_shed`).
pub const CSV_HEADER: &str = "t_s,offered_rps,achieved_rps,p50_ms,p99_ms,errors,shed,\
instances_desired,instances_actual,instances_busy,queue_depth,cold_starts,oracle_instances,\
instances_idle,server_shed";

/// Renders the rows as CSV; absent values are empty cells.
pub fn to_csv(rows: &[Row]) -> String {
    fn opt(out: &mut String, v: Option<f64>) {
        out.push(',');
        if let Some(v) = v {
            if v.fract() == 0.0 {
                let _ = write!(out, "{v:.0}");
            } else {
                let _ = write!(out, "{v:.2}");
            }
        }
    }
    let mut out = String::with_capacity(rows.len() * 64);
    out.push_str(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let _ = write!(
            out,
            "{:.1},{:.0},{:.0}",
            r.t_s, r.offered_rps, r.achieved_rps
        );
        opt(&mut out, r.p50_ms);
        opt(&mut out, r.p99_ms);
        let _ = write!(out, ",{},{}", r.errors, r.shed);
        opt(&mut out, r.instances_desired);
        opt(&mut out, r.instances_actual);
        opt(&mut out, r.instances_busy);
        opt(&mut out, r.queue_depth);
        opt(&mut out, r.cold_starts);
        let _ = write!(out, ",{}", r.oracle_instances);
        opt(&mut out, r.instances_idle);
        opt(&mut out, r.server_shed);
        out.push('\n');
    }
    out
}

/// Writes `timeline.csv`.
pub fn write_csv(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    std::fs::write(path, to_csv(rows))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample(instances: f64, cold: f64) -> FunctionSample {
        FunctionSample {
            instances: Some(instances),
            cold_starts: Some(cold),
            ..FunctionSample::default()
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f32> = (1..=100).map(|x| x as f32).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn oracle_rounds_up_but_not_float_noise() {
        let o = Oracle {
            service_time_s: 0.02,
            target_concurrency: 1.0,
        };
        assert_eq!(o.instances(500.0), 10);
        assert_eq!(o.instances(510.0), 11);
        assert_eq!(o.instances(0.0), 0);
    }

    #[test]
    fn rows_attribute_requests_and_difference_counters() {
        let mut rec = Recorder::default();
        rec.sent(0.05);
        rec.finished(0.05, Outcome::Status(200), 21.0);
        rec.sent(0.15);
        rec.finished(0.15, Outcome::Status(503), 1.0);
        rec.sent(0.16);
        rec.finished(0.16, Outcome::Timeout, 5000.0);
        rec.sent(0.17);
        rec.finished(0.17, Outcome::Transport, 0.0);
        rec.sent(0.18);
        rec.finished(0.18, Outcome::Status(500), 3.0);
        let pattern = Pattern::Constant {
            rate: 10.0,
            duration: Duration::from_secs(1),
        };
        let oracle = Oracle {
            service_time_s: 0.02,
            target_concurrency: 1.0,
        };
        let samples = vec![(0.01, sample(1.0, 1.0)), (0.25, sample(3.0, 4.0))];
        let rows = build(
            &rec.buckets,
            &samples,
            sample(0.0, 0.0),
            &pattern,
            &oracle,
            4,
        );
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].offered_rps, 10.0);
        assert_eq!(rows[0].achieved_rps, 10.0);
        assert_eq!(rows[0].p99_ms, Some(21.0));
        assert_eq!(rows[0].instances_actual, Some(1.0));
        assert_eq!(rows[0].cold_starts, Some(1.0));
        assert_eq!(rows[0].oracle_instances, 1);
        assert_eq!(rows[1].offered_rps, 40.0);
        assert_eq!((rows[1].errors, rows[1].shed), (3, 1));
        assert_eq!(rows[1].p99_ms, Some(5000.0));
        // No scrape in bucket 1: carried forward, no new cold starts.
        assert_eq!(rows[1].instances_actual, Some(1.0));
        assert_eq!(rows[1].cold_starts, Some(0.0));
        assert_eq!(rows[2].instances_actual, Some(3.0));
        assert_eq!(rows[2].cold_starts, Some(3.0));
        assert_eq!(rows[3].p50_ms, None);
        assert_eq!(rec.other_statuses.get(&500), Some(&1));
        let csv = to_csv(&rows);
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        assert_eq!(lines.next(), Some("0.0,10,10,21,21,0,0,,1,,,1,1,,"));
        assert_eq!(lines.nth(1), Some("0.2,0,0,,,0,0,,3,,,3,0,,"));
    }
}
