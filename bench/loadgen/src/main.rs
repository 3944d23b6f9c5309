//! `moontide-load`: the load tool of the elasticity benchmark.
//!
//! Sends open-loop GET load to one function URL following a rate pattern, scrapes the
//! node's Prometheus metrics every 100 ms, and writes `timeline.csv`, `summary.json` and
//! `timeline.svg` to `--out`; prints a short summary. Everything runs on one thread (a
//! current-thread tokio runtime), optionally pinned to one CPU with `--cpu`.
//!
//! Exit status: 0 when the run completed (even with failed requests: the summary says
//! so); 2 for bad arguments; 1 when setup failed (cannot reach the URL or the metrics,
//! cannot write the output).

mod client;
mod pattern;
mod plot;
mod prom;
mod summary;
mod timeline;

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tokio::time::Instant;

use crate::client::{Pool, Target};
use crate::pattern::{Pattern, parse_duration};
use crate::prom::FunctionSample;
use crate::summary::{Generator, RunInfo, Summary};
use crate::timeline::{BUCKET_S, Oracle, Outcome, Recorder};

/// Open-loop load for the elasticity benchmark.
///
/// Example: moontide-load --url http://127.0.0.1:8080/fn/sleep20 --metrics
/// http://127.0.0.1:8081/metrics --function sleep20 --pattern step --base 500 --peak 5000
/// --out results/step
#[derive(Debug, Parser)]
#[command(name = "moontide-load", version, about, long_about)]
struct Cli {
    /// Function URL to GET (http:// only).
    #[arg(long)]
    url: String,
    /// The node's Prometheus endpoint (admin API `/metrics`).
    #[arg(long)]
    metrics: String,
    /// Function name: the `function` label to read from the metrics.
    #[arg(long)]
    function: String,
    /// Rate pattern; its knobs follow (defaults in brackets):
    /// constant --rate [1000] --duration [10s];
    /// ramp --base [100] --peak [3000] --duration [30s];
    /// step --base [500] --peak [5000] --before [10s] --during [10s] --after [10s];
    /// sine --base [300] --peak [3000] --period [20s] --duration [40s];
    /// burst --peak [2000] --idle-before [3s] --during [5s] --idle-after [15s].
    #[arg(long, value_enum, verbatim_doc_comment)]
    pattern: PatternKind,
    /// Rate of `constant` (requests/s).
    #[arg(long)]
    rate: Option<f64>,
    /// Low rate of `ramp`, `step`, `sine` (requests/s).
    #[arg(long)]
    base: Option<f64>,
    /// High rate of `ramp`, `step`, `sine`, `burst` (requests/s).
    #[arg(long)]
    peak: Option<f64>,
    /// Length of `constant`, `ramp`, `sine`.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// `step`: time at the base rate before the step.
    #[arg(long, value_parser = parse_duration)]
    before: Option<Duration>,
    /// `step`, `burst`: length of the high phase.
    #[arg(long, value_parser = parse_duration)]
    during: Option<Duration>,
    /// `step`: time at the base rate after the step.
    #[arg(long, value_parser = parse_duration)]
    after: Option<Duration>,
    /// `sine`: period (base at 0, peak at period/2).
    #[arg(long, value_parser = parse_duration)]
    period: Option<Duration>,
    /// `burst`: idle time (no requests) before the burst.
    #[arg(long, value_parser = parse_duration)]
    idle_before: Option<Duration>,
    /// `burst`: idle time after the burst.
    #[arg(long, value_parser = parse_duration)]
    idle_after: Option<Duration>,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Most connections open at once; a request that finds them all busy waits (its
    /// latency includes the wait).
    #[arg(long, default_value_t = 2000)]
    max_connections: usize,
    /// Per-request timeout, from the request's scheduled send time; a timeout is an error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// The function's known time per call, for the oracle.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    service_time: Duration,
    /// Concurrent calls one instance serves, for the oracle.
    #[arg(long, default_value_t = 1.0)]
    target_concurrency: f64,
    /// Keep scraping this long after the last scheduled request (and after every
    /// request has ended), so the timeline shows what the node does once the load stops.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    tail: Duration,
    /// Pin the tool to this CPU (sched_setaffinity) before starting.
    #[arg(long)]
    cpu: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PatternKind {
    Constant,
    Ramp,
    Step,
    Sine,
    Burst,
}

impl Cli {
    /// The pattern from `--pattern` and its knobs; knobs of another pattern are an error.
    fn pattern(&self) -> Result<Pattern, String> {
        let given: [(&str, bool); 10] = [
            ("rate", self.rate.is_some()),
            ("base", self.base.is_some()),
            ("peak", self.peak.is_some()),
            ("duration", self.duration.is_some()),
            ("before", self.before.is_some()),
            ("during", self.during.is_some()),
            ("after", self.after.is_some()),
            ("period", self.period.is_some()),
            ("idle-before", self.idle_before.is_some()),
            ("idle-after", self.idle_after.is_some()),
        ];
        let knobs: &[&str] = match self.pattern {
            PatternKind::Constant => &["rate", "duration"],
            PatternKind::Ramp => &["base", "peak", "duration"],
            PatternKind::Step => &["base", "peak", "before", "during", "after"],
            PatternKind::Sine => &["base", "peak", "period", "duration"],
            PatternKind::Burst => &["peak", "idle-before", "during", "idle-after"],
        };
        let name = self
            .pattern
            .to_possible_value()
            .expect("no skipped variants");
        let foreign: Vec<String> = given
            .iter()
            .filter(|(knob, set)| *set && !knobs.contains(knob))
            .map(|(knob, _)| format!("--{knob}"))
            .collect();
        if !foreign.is_empty() {
            return Err(format!(
                "{} {} of the {} pattern (its knobs: {})",
                foreign.join(", "),
                if foreign.len() == 1 {
                    "is not a knob"
                } else {
                    "are not knobs"
                },
                name.get_name(),
                knobs
                    .iter()
                    .map(|k| format!("--{k}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        let secs = Duration::from_secs;
        let pattern = match self.pattern {
            PatternKind::Constant => Pattern::Constant {
                rate: self.rate.unwrap_or(1000.0),
                duration: self.duration.unwrap_or(secs(10)),
            },
            PatternKind::Ramp => Pattern::Ramp {
                base: self.base.unwrap_or(100.0),
                peak: self.peak.unwrap_or(3000.0),
                duration: self.duration.unwrap_or(secs(30)),
            },
            PatternKind::Step => Pattern::Step {
                base: self.base.unwrap_or(500.0),
                peak: self.peak.unwrap_or(5000.0),
                before: self.before.unwrap_or(secs(10)),
                during: self.during.unwrap_or(secs(10)),
                after: self.after.unwrap_or(secs(10)),
            },
            PatternKind::Sine => Pattern::Sine {
                base: self.base.unwrap_or(300.0),
                peak: self.peak.unwrap_or(3000.0),
                period: self.period.unwrap_or(secs(20)),
                duration: self.duration.unwrap_or(secs(40)),
            },
            PatternKind::Burst => Pattern::Burst {
                peak: self.peak.unwrap_or(2000.0),
                idle_before: self.idle_before.unwrap_or(secs(3)),
                during: self.during.unwrap_or(secs(5)),
                idle_after: self.idle_after.unwrap_or(secs(15)),
            },
        };
        pattern.validate()?;
        if self.target_concurrency.is_nan() || self.target_concurrency <= 0.0 {
            return Err("--target-concurrency must be > 0".to_string());
        }
        if self.timeout.is_zero() {
            return Err("--timeout must be > 0".to_string());
        }
        Ok(pattern)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let pattern = match cli.pattern() {
        Ok(p) => p,
        Err(message) => {
            eprintln!("moontide-load: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpu) = cli.cpu
        && let Err(error) = pin_to_cpu(cpu)
    {
        eprintln!("moontide-load: cannot pin to CPU {cpu}: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("moontide-load: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run(&cli, &pattern)) {
        Ok(summary) => {
            println!("{}", summary.human());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("moontide-load: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        bail!("no such CPU");
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

/// Scrapes the metrics once: the function's sample.
async fn scrape(pool: &Pool, function: &str) -> anyhow::Result<FunctionSample> {
    let (status, body) = tokio::time::timeout(Duration::from_secs(1), pool.get())
        .await
        .context("no answer within 1s")??;
    if !status.is_success() {
        bail!("status {status}");
    }
    let text = std::str::from_utf8(&body).context("metrics are not UTF-8")?;
    Ok(FunctionSample::parse(text, function))
}

async fn run(cli: &Cli, pattern: &Pattern) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(&cli.out)
        .with_context(|| format!("cannot create {}", cli.out.display()))?;
    let target = Target::resolve(&cli.url).await?;
    let pool = Rc::new(Pool::new(target, cli.max_connections));
    pool.warm()
        .await
        .with_context(|| format!("cannot connect to --url {}", cli.url))?;
    let metrics = Rc::new(Pool::new(Target::resolve(&cli.metrics).await?, 1));
    let baseline = scrape(&metrics, &cli.function)
        .await
        .with_context(|| format!("cannot scrape --metrics {}", cli.metrics))?;
    if baseline.instances.is_none() {
        eprintln!(
            "moontide-load: note: no moontide_instances series for function=\"{}\" yet \
             (it appears with the first instance)",
            cli.function
        );
    }
    eprintln!(
        "moontide-load: {pattern}, {:.1}s (+{:.1}s tail) against {}",
        pattern.duration_s(),
        cli.tail.as_secs_f64(),
        cli.url
    );

    let start = Instant::now();
    let recorder = Rc::new(RefCell::new(Recorder::default()));

    // Scraper: every 100 ms, in the middle of each bucket.
    let samples = Rc::new(RefCell::new(Vec::<(f64, FunctionSample)>::new()));
    let scrapes = Rc::new(Cell::new(0u64));
    let scrape_failures = Rc::new(Cell::new(0u64));
    let scraper = {
        let (samples, scrapes, failures) = (
            Rc::clone(&samples),
            Rc::clone(&scrapes),
            Rc::clone(&scrape_failures),
        );
        let metrics = Rc::clone(&metrics);
        let function = cli.function.clone();
        let period = Duration::from_secs_f64(BUCKET_S);
        tokio::task::spawn_local(async move {
            let mut ticks = tokio::time::interval_at(start + period / 2, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                ticks.tick().await;
                let t = start.elapsed().as_secs_f64();
                scrapes.set(scrapes.get() + 1);
                match scrape(&metrics, &function).await {
                    Ok(sample) => samples.borrow_mut().push((t, sample)),
                    Err(_) => failures.set(failures.get() + 1),
                }
            }
        })
    };

    // Generator: open loop, each request on its own task.
    let in_flight = Rc::new(Cell::new(0usize));
    let timeout = cli.timeout;
    let mut max_lag = Duration::ZERO;
    for offset in pattern.schedule() {
        let at = start + Duration::from_secs_f64(offset);
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        } else {
            // Behind schedule: let the request tasks run before sending more.
            tokio::task::yield_now().await;
        }
        max_lag = max_lag.max(Instant::now().saturating_duration_since(at));
        recorder.borrow_mut().sent(offset);
        in_flight.set(in_flight.get() + 1);
        let (pool, recorder, in_flight) = (
            Rc::clone(&pool),
            Rc::clone(&recorder),
            Rc::clone(&in_flight),
        );
        tokio::task::spawn_local(async move {
            let (outcome, latency) = match tokio::time::timeout_at(at + timeout, pool.get()).await {
                Ok(Ok((status, _))) => (Outcome::Status(status.as_u16()), at.elapsed()),
                Ok(Err(_)) => (Outcome::Transport, at.elapsed()),
                Err(_) => (Outcome::Timeout, timeout),
            };
            recorder
                .borrow_mut()
                .finished(offset, outcome, latency.as_secs_f64() * 1000.0);
            in_flight.set(in_flight.get() - 1);
        });
    }
    while in_flight.get() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tail_end = start + Duration::from_secs_f64(pattern.duration_s()) + cli.tail;
    tokio::time::sleep_until(tail_end).await;
    scraper.abort();
    let elapsed = start.elapsed().as_secs_f64();
    let n = ((elapsed / BUCKET_S).floor() as usize).max(recorder.borrow().buckets.len());

    let recorder = recorder.take();
    let samples = samples.take();
    let oracle = Oracle {
        service_time_s: cli.service_time.as_secs_f64(),
        target_concurrency: cli.target_concurrency,
    };
    let rows = timeline::build(&recorder.buckets, &samples, baseline, pattern, &oracle, n);
    let info = RunInfo {
        url: cli.url.clone(),
        function: cli.function.clone(),
        service_time_ms: cli.service_time.as_secs_f64() * 1000.0,
        target_concurrency: cli.target_concurrency,
        timeout_ms: cli.timeout.as_secs_f64() * 1000.0,
        error_statuses: recorder.other_statuses.clone(),
        generator: Generator {
            max_lag_ms: max_lag.as_secs_f64() * 1000.0,
            connections: pool.stats(),
            scrapes: scrapes.get(),
            scrape_failures: scrape_failures.get(),
        },
    };
    let summary = Summary::compute(pattern, &recorder.buckets, &rows, info);

    let csv = cli.out.join("timeline.csv");
    timeline::write_csv(&csv, &rows).with_context(|| format!("writing {}", csv.display()))?;
    let json = cli.out.join("summary.json");
    std::fs::write(&json, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = cli.out.join("timeline.svg");
    plot::draw(&svg, &rows, pattern, &summary)
        .with_context(|| format!("writing {}", svg.display()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec![
            "moontide-load",
            "--url",
            "http://127.0.0.1:1/fn/x",
            "--metrics",
            "http://127.0.0.1:2/metrics",
            "--function",
            "x",
            "--out",
            "/tmp/x",
        ];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    #[test]
    fn knobs_default_and_foreign_knobs_are_refused() {
        let p = cli(&["--pattern", "step", "--peak", "4000"])
            .pattern()
            .unwrap();
        assert_eq!(
            p.to_string(),
            "step: base 500/s, peak 4000/s, before 10s, during 10s, after 10s"
        );
        let err = cli(&["--pattern", "burst", "--period", "5s", "--base", "1"])
            .pattern()
            .unwrap_err();
        assert!(
            err.starts_with("--base, --period are not knobs of the burst"),
            "{err}"
        );
        let p = cli(&["--pattern", "sine", "--period", "500ms"])
            .pattern()
            .unwrap();
        assert!(matches!(p, Pattern::Sine { period, .. } if period == Duration::from_millis(500)));
    }
}
