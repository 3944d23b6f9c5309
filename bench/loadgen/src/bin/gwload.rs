//! `moontide-gwload`: the drivers of the gateway and cluster benchmarks (bench/churn.sh,
//! bench/kill_node.sh, bench/cluster_propagation.sh, bench/cluster_deploys.sh).
//! Single-threaded (a current-thread tokio runtime), optionally pinned to one CPU; all
//! times from `std::time::Instant` (CLOCK_MONOTONIC), mapped to Unix-epoch microseconds
//! once at start so that records of two processes and the shell's `$EPOCHREALTIME` marks
//! can be lined up.
//!
//! Subcommands:
//!
//! - `steady`: open-loop GET load at a constant rate, spread round robin over one or more
//!   URLs (keep-alive pools, one per URL). Every request is written to `--records` as
//!   `send_epoch_us,latency_us,status` (status 0 = transport error, 1 = timeout; latency
//!   counted from the scheduled send time, so queueing in the generator counts). Failed
//!   answers (non-2xx, or a body other than `--expect`) and transport errors are also
//!   counted by message on stderr.
//! - `routes`: PUT `--count` routes `/<prefix>/<i>` -> `--upstream` through the admin API
//!   (sequentially), and prints how long it took.
//! - `churn`: `--before` quiet, then `--rate` route changes per second for `--duration`
//!   (cycle: PUT a new route and poll the data plane until it serves, PUT (update) an
//!   existing route, DELETE the oldest new route), then `--after` quiet. Writes the phase
//!   marks and every change to `--out`, and the change-to-serve latencies (PUT acknowledged
//!   -> first `200 ok` from the new path) with their percentiles.
//! - `deploys`: the admin workload of bench/cluster_deploys.sh (sequential and concurrent
//!   deploys, route PUTs, reads; one node or every node of a cluster): calls/s and latency
//!   percentiles per phase, with the servers' CPU per call and etcd's fsyncs (`deploys`).
//!
//! Exit status: 0 ok; 1 a check failed (admin call refused, a new route never served,
//! answers not as expected); 2 bad arguments.

#[path = "../client.rs"]
#[allow(dead_code)]
mod client;
#[path = "gwload/deploys.rs"]
mod deploys;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client::{Pool, Target};

#[derive(Debug, Parser)]
#[command(name = "moontide-gwload", version, about)]
struct Cli {
    /// Pin to this CPU (sched_setaffinity) before starting.
    #[arg(long, global = true)]
    cpu: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open-loop GET load at a constant rate over one or more URLs.
    Steady {
        /// URL to GET (repeat for several; requests go round robin over them).
        #[arg(long, required = true)]
        url: Vec<String>,
        /// Requests per second (all URLs together).
        #[arg(long)]
        rate: f64,
        /// Length of the load, e.g. 30s.
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        /// Per-request timeout from the scheduled send time.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
        /// Most connections per URL.
        #[arg(long, default_value_t = 256)]
        max_connections: usize,
        /// The body every answer must have.
        #[arg(long, default_value = "ok\n")]
        expect: String,
        /// Where the per-request CSV goes.
        #[arg(long)]
        records: PathBuf,
    },
    /// PUT COUNT routes /PREFIX/i -> UPSTREAM through the admin API.
    Routes {
        #[arg(long)]
        admin: String,
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long)]
        upstream: String,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Route names are PREFIX<i>, paths /PREFIX/<i>.
        #[arg(long, default_value = "r")]
        prefix: String,
    },
    /// Route churn with change-to-serve latency.
    Churn {
        #[arg(long)]
        admin: String,
        #[arg(long)]
        token_file: PathBuf,
        /// Data plane base URL (http://127.0.0.1:PORT); several, comma-separated, for the
        /// nodes of a cluster: a new route counts as served when every one serves it.
        #[arg(long, value_delimiter = ',', required = true)]
        data: Vec<String>,
        #[arg(long)]
        upstream: String,
        /// Existing routes r0..r<existing-1> (from `routes`), updated by the churn.
        #[arg(long, default_value_t = 5000)]
        existing: usize,
        /// Changes per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, value_parser = parse_duration)]
        before: Duration,
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, value_parser = parse_duration)]
        after: Duration,
        /// Give up on a new route that does not serve within this long.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        serve_timeout: Duration,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Deploys, route PUTs and reads through the admin API, phase by phase.
    Deploys {
        /// Admin API base URL(s), comma-separated: calls go round robin over them.
        #[arg(long, value_delimiter = ',', required = true)]
        admin: Vec<String>,
        #[arg(long)]
        token_file: PathBuf,
        /// Calls per phase.
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Clients of the concurrent phases.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Prefix of every name this run creates.
        #[arg(long, default_value = "b")]
        prefix: String,
        /// The setup's name in the CSV (e.g. embedded, etcd-1).
        #[arg(long)]
        setup: String,
        #[arg(long, default_value_t = 1)]
        round: u32,
        /// Server processes whose CPU time is counted per call (comma-separated).
        #[arg(long, value_delimiter = ',')]
        server_pids: Vec<u32>,
        /// etcd processes whose CPU time is counted per call (comma-separated).
        #[arg(long, value_delimiter = ',')]
        etcd_pids: Vec<u32>,
        /// etcd's client URL, for its WAL fsync histogram (/metrics).
        #[arg(long)]
        etcd_metrics: Option<String>,
        /// CSV to append one row per phase to (header written if new).
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(format!("'{text}': a unit is required (ms, s or m)"));
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}': not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("'{text}': out of range"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// Monotonic instants as Unix-epoch microseconds.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    epoch_us: i64,
}

impl Clock {
    fn new() -> Clock {
        let start = Instant::now();
        let epoch_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_micros() as i64;
        Clock { start, epoch_us }
    }
    fn epoch_us(&self, at: Instant) -> i64 {
        if at >= self.start {
            self.epoch_us + at.duration_since(self.start).as_micros() as i64
        } else {
            self.epoch_us - self.start.duration_since(at).as_micros() as i64
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(cpu) = cli.cpu {
        let mut set = rustix::thread::CpuSet::new();
        if cpu >= rustix::thread::CpuSet::MAX_CPU {
            eprintln!("moontide-gwload: no CPU {cpu}");
            return ExitCode::from(2);
        }
        set.set(cpu);
        if let Err(error) = rustix::thread::sched_setaffinity(None, &set) {
            eprintln!("moontide-gwload: cannot pin to CPU {cpu}: {error}");
            return ExitCode::from(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, async {
        match cli.command {
            Command::Steady {
                url,
                rate,
                duration,
                timeout,
                max_connections,
                expect,
                records,
            } => {
                steady(
                    &url,
                    rate,
                    duration,
                    timeout,
                    max_connections,
                    &expect,
                    &records,
                )
                .await
            }
            Command::Routes {
                admin,
                token_file,
                upstream,
                count,
                prefix,
            } => routes(&admin, &token_file, &upstream, count, &prefix).await,
            Command::Churn {
                admin,
                token_file,
                data,
                upstream,
                existing,
                rate,
                before,
                duration,
                after,
                serve_timeout,
                out,
            } => {
                churn(ChurnArgs {
                    admin,
                    token_file,
                    data,
                    upstream,
                    existing,
                    rate,
                    before,
                    duration,
                    after,
                    serve_timeout,
                    out,
                })
                .await
            }
            Command::Deploys {
                admin,
                token_file,
                count,
                clients,
                prefix,
                setup,
                round,
                server_pids,
                etcd_pids,
                etcd_metrics,
                out,
            } => {
                deploys::deploys(deploys::DeploysArgs {
                    admin,
                    token_file,
                    count,
                    clients,
                    prefix,
                    setup,
                    round,
                    server_pids,
                    etcd_pids,
                    etcd_metrics,
                    out,
                })
                .await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("moontide-gwload: {error:#}");
            ExitCode::from(1)
        }
    }
}

// --- steady ----------------------------------------------------------------------------

struct Record {
    send_us: i64,
    latency_us: i64,
    status: u16,
}

async fn steady(
    urls: &[String],
    rate: f64,
    duration: Duration,
    timeout: Duration,
    max_connections: usize,
    expect: &str,
    records_path: &PathBuf,
) -> anyhow::Result<()> {
    if rate.is_nan() || rate <= 0.0 {
        bail!("--rate must be > 0");
    }
    let mut pools = Vec::new();
    for url in urls {
        let pool = Rc::new(Pool::new(Target::resolve(url).await?, max_connections));
        pool.warm()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        pools.push(pool);
    }
    let clock = Clock::new();
    let records = Rc::new(RefCell::new(Vec::<Record>::with_capacity(
        (rate * duration.as_secs_f64()) as usize + 16,
    )));
    let failures = Rc::new(RefCell::new(BTreeMap::<String, u64>::new()));
    let expect: Rc<str> = Rc::from(expect);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let period = 1.0 / rate;
    let start = clock.start;
    let mut max_lag = Duration::ZERO;
    let mut tasks = Vec::with_capacity(total as usize);
    eprintln!(
        "moontide-gwload steady: {rate}/s for {:.1}s over {} URL(s), {total} requests",
        duration.as_secs_f64(),
        urls.len()
    );
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 * period);
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        } else {
            tokio::task::yield_now().await;
        }
        max_lag = max_lag.max(Instant::now().saturating_duration_since(at));
        let pool = Rc::clone(&pools[i as usize % pools.len()]);
        let (records, failures, expect) = (
            Rc::clone(&records),
            Rc::clone(&failures),
            Rc::clone(&expect),
        );
        tasks.push(tokio::task::spawn_local(async move {
            let outcome = tokio::time::timeout_at(at + timeout, pool.get()).await;
            let done = Instant::now();
            let status = match outcome {
                Ok(Ok((status, body))) => {
                    if !status.is_success() || body.as_ref() != expect.as_bytes() {
                        let text = String::from_utf8_lossy(&body);
                        let text: String = text.chars().take(160).collect();
                        *failures
                            .borrow_mut()
                            .entry(format!("{} {}", status.as_u16(), text.trim_end()))
                            .or_default() += 1;
                        if status.is_success() {
                            // a 2xx with a wrong body counts as a failure too
                            599
                        } else {
                            status.as_u16()
                        }
                    } else {
                        status.as_u16()
                    }
                }
                Ok(Err(error)) => {
                    *failures
                        .borrow_mut()
                        .entry(format!("transport: {error:#}"))
                        .or_default() += 1;
                    0
                }
                Err(_) => {
                    *failures.borrow_mut().entry("timeout".into()).or_default() += 1;
                    1
                }
            };
            records.borrow_mut().push(Record {
                send_us: clock.epoch_us(at),
                latency_us: done.duration_since(at).as_micros() as i64,
                status,
            });
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let records = records.take();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(records_path)
            .with_context(|| format!("cannot write {}", records_path.display()))?,
    );
    writeln!(file, "send_epoch_us,latency_us,status")?;
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| r.send_us);
    for r in &sorted {
        writeln!(file, "{},{},{}", r.send_us, r.latency_us, r.status)?;
    }
    file.flush()?;
    let failed: u64 = failures.borrow().values().sum();
    let mut latencies: Vec<i64> = records.iter().map(|r| r.latency_us).collect();
    latencies.sort_unstable();
    let stats = pools
        .iter()
        .map(|p| p.stats())
        .fold((0, 0), |a, s| (a.0 + s.opened, a.1 + s.peak_open));
    eprintln!(
        "moontide-gwload steady: {} requests, {failed} failed, p50 {:.3} ms, p99 {:.3} ms, \
         max {:.3} ms; generator max lag {:.3} ms; connections opened {}, peak open {}",
        records.len(),
        pct(&latencies, 50.0) as f64 / 1000.0,
        pct(&latencies, 99.0) as f64 / 1000.0,
        latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
        max_lag.as_secs_f64() * 1000.0,
        stats.0,
        stats.1
    );
    for (message, n) in failures.borrow().iter() {
        eprintln!("moontide-gwload steady: failure x{n}: {message}");
    }
    Ok(())
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// --- a small HTTP/1.1 client for the admin API and the polls ----------------------------

struct Conn {
    addr: SocketAddr,
    host: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    async fn new(base: &str) -> anyhow::Result<Conn> {
        let target = Target::resolve(base).await?;
        Ok(Conn {
            addr: target.addr,
            host: target.host,
            sender: None,
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> anyhow::Result<(u16, Bytes)> {
        for attempt in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                let stream = TcpStream::connect(self.addr)
                    .await
                    .with_context(|| format!("connecting to {}", self.addr))?;
                stream.set_nodelay(true)?;
                let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
                tokio::task::spawn_local(async move {
                    let _ = connection.await;
                });
                self.sender = Some(sender);
            }
            let sender = self.sender.as_mut().expect("connected");
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            let mut request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(header::HOST, self.host.as_str());
            if let Some(token) = token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            if body.is_some() {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            let request = request.body(Full::new(Bytes::from(body.clone().unwrap_or_default())))?;
            match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let bytes = response.into_body().collect().await?.to_bytes();
                    return Ok((status, bytes));
                }
                Err(error) if attempt == 0 && error.is_canceled() => {
                    self.sender = None;
                }
                Err(error) => return Err(error.into()),
            }
        }
        bail!("{method} {path}: connection kept failing")
    }
}

struct Admin {
    conn: Conn,
    token: String,
}

impl Admin {
    async fn new(base: &str, token_file: &PathBuf) -> anyhow::Result<Admin> {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("cannot read {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(Admin {
            conn: Conn::new(base).await?,
            token,
        })
    }
    /// One call; an answer outside 2xx is an error.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<u16> {
        let (status, bytes) = self
            .conn
            .send(method.clone(), path, Some(&self.token), body)
            .await?;
        if !(200..300).contains(&status) {
            bail!(
                "admin {method} {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(status)
    }
}

fn route_body(path: &str, upstream: &str, priority: Option<i32>) -> String {
    match priority {
        Some(p) => format!(r#"{{"path": "{path}", "upstream": "{upstream}", "priority": {p}}}"#),
        None => format!(r#"{{"path": "{path}", "upstream": "{upstream}"}}"#),
    }
}

async fn routes(
    admin: &str,
    token_file: &PathBuf,
    upstream: &str,
    count: usize,
    prefix: &str,
) -> anyhow::Result<()> {
    let mut admin = Admin::new(admin, token_file).await?;
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..count {
        let t = Instant::now();
        admin
            .call(
                Method::PUT,
                &format!("/v1/routes/{prefix}{i}"),
                Some(route_body(&format!("/{prefix}/{i}"), upstream, None)),
            )
            .await?;
        slowest = slowest.max(t.elapsed());
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "moontide-gwload routes: {} routes in {:.2}s",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let total = start.elapsed();
    println!(
        "routes: {count} PUTs in {:.3}s ({:.0} µs each on average, slowest {:.3} ms)",
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / count.max(1) as f64,
        slowest.as_secs_f64() * 1000.0
    );
    Ok(())
}

// --- churn -----------------------------------------------------------------------------

struct ChurnArgs {
    admin: String,
    token_file: PathBuf,
    data: Vec<String>,
    upstream: String,
    existing: usize,
    rate: f64,
    before: Duration,
    duration: Duration,
    after: Duration,
    serve_timeout: Duration,
    out: PathBuf,
}

async fn churn(args: ChurnArgs) -> anyhow::Result<()> {
    if args.rate.is_nan() || args.rate <= 0.0 || args.existing == 0 {
        bail!("--rate and --existing must be > 0");
    }
    std::fs::create_dir_all(&args.out)?;
    let mut admin = Admin::new(&args.admin, &args.token_file).await?;
    let mut nodes = Vec::with_capacity(args.data.len());
    for url in &args.data {
        nodes.push(Conn::new(url).await?);
    }
    // Per node: change-to-serve of every new route on that node.
    let mut node_serve_us: Vec<Vec<i64>> = vec![Vec::new(); nodes.len()];
    let clock = Clock::new();
    let t0 = clock.start;
    tokio::time::sleep_until(t0 + args.before).await;
    let t1 = Instant::now();
    let end = t1 + args.duration;
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut changes = std::io::BufWriter::new(std::fs::File::create(args.out.join("changes.csv"))?);
    writeln!(changes, "start_epoch_us,op,name,admin_us,serve_us,polls")?;
    let mut serve_us: Vec<i64> = Vec::new();
    let mut admin_us: Vec<i64> = Vec::new();
    let mut live_new: VecDeque<u64> = VecDeque::new();
    let mut next_new: u64 = 0;
    let mut counts = BTreeMap::<&str, u64>::new();
    let mut max_lag = Duration::ZERO;
    let mut polls_total = 0u64;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut k: u64 = 0;
    loop {
        let at = t1 + period * k as u32;
        if at >= end {
            break;
        }
        if at > Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        max_lag = max_lag.max(Instant::now().saturating_duration_since(at));
        let started = Instant::now();
        let op = match k % 3 {
            0 => "new",
            1 => "update",
            _ if live_new.is_empty() => "update",
            _ => "delete",
        };
        k += 1;
        let (name, took, served, polls) = match op {
            "new" => {
                let n = next_new;
                next_new += 1;
                let name = format!("n{n}");
                let path = format!("/n/{n}");
                admin
                    .call(
                        Method::PUT,
                        &format!("/v1/routes/{name}"),
                        Some(route_body(&path, &args.upstream, None)),
                    )
                    .await?;
                let acked = Instant::now();
                // Poll back to back over one keep-alive connection per node, round robin
                // over the nodes that do not serve it yet, until every one answers from
                // the upstream. Each poll is one round trip through the gateway, so a
                // node's figure overshoots by at most one round of polls.
                let mut polls = 0u64;
                let mut waiting: Vec<usize> = (0..nodes.len()).collect();
                let mut turn = 0usize;
                let served_at = loop {
                    polls += 1;
                    turn %= waiting.len();
                    let node = waiting[turn];
                    let (status, body) = nodes[node].send(Method::GET, &path, None, None).await?;
                    let now = Instant::now();
                    if status == 200 && body.as_ref() == b"ok\n" {
                        node_serve_us[node].push(now.duration_since(acked).as_micros() as i64);
                        waiting.remove(turn);
                        if waiting.is_empty() {
                            break now;
                        }
                        continue;
                    }
                    turn += 1;
                    if status != 404 {
                        bail!(
                            "new route {path}: answered {status} '{}' (expected 404 until it serves, then 200 ok)",
                            String::from_utf8_lossy(&body)
                        );
                    }
                    if now.duration_since(acked) > args.serve_timeout {
                        bail!(
                            "new route {path} did not serve within {:?} of its PUT's acknowledgement ({polls} polls)",
                            args.serve_timeout
                        );
                    }
                };
                live_new.push_back(n);
                let s = served_at.duration_since(acked).as_micros() as i64;
                serve_us.push(s);
                polls_total += polls;
                (name, acked.duration_since(started), Some(s), polls)
            }
            "update" => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = rng % args.existing as u64;
                let name = format!("r{i}");
                admin
                    .call(
                        Method::PUT,
                        &format!("/v1/routes/{name}"),
                        Some(route_body(
                            &format!("/r/{i}"),
                            &args.upstream,
                            Some((k % 7) as i32 + 1),
                        )),
                    )
                    .await?;
                (name, started.elapsed(), None, 0)
            }
            _ => {
                let n = live_new.pop_front().expect("not empty");
                let name = format!("n{n}");
                admin
                    .call(Method::DELETE, &format!("/v1/routes/{name}"), None)
                    .await?;
                (name, started.elapsed(), None, 0)
            }
        };
        *counts.entry(op).or_default() += 1;
        admin_us.push(took.as_micros() as i64);
        writeln!(
            changes,
            "{},{op},{name},{},{},{polls}",
            clock.epoch_us(started),
            took.as_micros(),
            served.map_or(String::new(), |s| s.to_string())
        )?;
    }
    let t2 = Instant::now();
    // Leave the route table as it was: delete the new routes still there.
    let cleanup = live_new.len();
    for n in live_new.drain(..) {
        admin
            .call(Method::DELETE, &format!("/v1/routes/n{n}"), None)
            .await?;
    }
    let t2b = Instant::now();
    tokio::time::sleep_until(t2b + args.after).await;
    let t3 = Instant::now();
    changes.flush()?;
    std::fs::write(
        args.out.join("phases.txt"),
        format!(
            "quiet_before {} {}\nchurn {} {}\ncleanup {} {}\nquiet_after {} {}\n",
            clock.epoch_us(t0),
            clock.epoch_us(t1),
            clock.epoch_us(t1),
            clock.epoch_us(t2),
            clock.epoch_us(t2),
            clock.epoch_us(t2b),
            clock.epoch_us(t2b),
            clock.epoch_us(t3),
        ),
    )?;
    serve_us.sort_unstable();
    admin_us.sort_unstable();
    let done: u64 = counts.values().sum();
    let achieved = done as f64 / t2.duration_since(t1).as_secs_f64();
    let summary = format!(
        "churn: {done} changes in {:.2}s = {achieved:.1}/s (asked {}/s; {}); generator max lag {:.3} ms; \
         {cleanup} new routes deleted afterwards\n\
         admin call µs: p50 {} p99 {} max {}\n\
         change-to-serve (PUT ack -> first 200 ok), {} new routes, {} polls in all: \
         p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms\n",
        t2.duration_since(t1).as_secs_f64(),
        args.rate,
        counts
            .iter()
            .map(|(op, n)| format!("{op} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        max_lag.as_secs_f64() * 1000.0,
        pct(&admin_us, 50.0),
        pct(&admin_us, 99.0),
        admin_us.last().copied().unwrap_or(0),
        serve_us.len(),
        polls_total,
        pct(&serve_us, 50.0) as f64 / 1000.0,
        pct(&serve_us, 99.0) as f64 / 1000.0,
        serve_us.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    let mut summary = summary;
    if nodes.len() > 1 {
        summary.push_str(
            "change-to-serve on every node (the line above) is the slowest node's; per node:\n",
        );
        for (url, served) in args.data.iter().zip(&mut node_serve_us) {
            served.sort_unstable();
            summary.push_str(&format!(
                "  {url}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms\n",
                pct(served, 50.0) as f64 / 1000.0,
                pct(served, 99.0) as f64 / 1000.0,
                served.last().copied().unwrap_or(0) as f64 / 1000.0,
            ));
        }
    }
    std::fs::write(args.out.join("churn.txt"), &summary)?;
    print!("{summary}");
    Ok(())
}
