//! `moontide-gwload deploys`: the admin workload of `bench/cluster_deploys.sh` — deploys,
//! route PUTs and reads through the admin API of one node or of every node of a cluster,
//! each call timed from send to the whole answer (closed loop: a client sends its next
//! call when the previous one is answered).
//!
//! Phases, in order (names are `PREFIX…`, so runs on one store never collide):
//!
//! - `deploy_seq`: COUNT new functions, one after another.
//! - `redeploy_seq`: COUNT new versions of one function (its source changes every time).
//! - `deploy_conc`: COUNT new functions from CLIENTS clients at once (distinct names).
//! - `route_seq`: COUNT new routes `/PREFIXr/i` → the functions of `deploy_seq`.
//! - `route_conc`: COUNT new routes from CLIENTS clients at once.
//! - `get_fn`: COUNT `GET /v1/functions/NAME` (one function: a head and a version read).
//! - `list_fn`: COUNT `GET /v1/functions` (every function of the store: 2×COUNT + 11).
//!
//! With several admin URLs, sequential calls go round robin over them and client `j` of a
//! concurrent phase talks to URL `j mod n`. Around each phase the CPU time of
//! `--server-pids` and `--etcd-pids` (every thread's, from `/proc`) and etcd's WAL fsync
//! histogram and KV request counts (`--etcd-metrics`) are read, so each row also says
//! what a call cost the servers and etcd, how many fsyncs etcd made and how many requests
//! it answered per call. One CSV row per phase is appended to `--out`.

use std::cell::RefCell;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::{Context, bail};
use hyper::Method;
use tokio::time::Instant;

use super::{Conn, pct};

pub struct DeploysArgs {
    pub admin: Vec<String>,
    pub token_file: PathBuf,
    pub count: usize,
    pub clients: usize,
    pub prefix: String,
    pub setup: String,
    pub round: u32,
    pub server_pids: Vec<u32>,
    pub etcd_pids: Vec<u32>,
    pub etcd_metrics: Option<String>,
    pub out: PathBuf,
}

const CSV_HEADER: &str = "setup,round,phase,calls,seconds,per_s,p50_us,p99_us,max_us,\
                          server_cpu_us_per_call,etcd_cpu_us_per_call,wal_fsyncs_per_call,\
                          wal_fsync_mean_us,etcd_kv_requests_per_call";

fn source(tag: &str) -> String {
    format!(
        r#"{{"source": "return function(event, ctx) return {{statusCode = 200, body = \"{tag}\"}} end", "config": {{}}}}"#
    )
}

fn route(path: &str, function: &str) -> String {
    format!(r#"{{"paths": ["{path}"], "function": "{function}"}}"#)
}

/// One call: (method, path, body).
type Call = (Method, String, Option<String>);

/// What one phase's calls are: `calls(i)` is call `i` of `count`.
struct Phase<'a> {
    name: &'static str,
    concurrent: bool,
    calls: &'a dyn Fn(usize) -> Call,
}

/// Time on a CPU of the processes, all their threads, in nanoseconds (the first field of
/// `/proc/PID/task/TID/schedstat`: exact, unlike the 10 ms ticks of `/proc/PID/stat`).
/// Threads that exit between two readings take their time with them; the servers' and
/// etcd's threads live as long as the process.
fn cpu_ns(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("process {pid} is gone"))?;
        for task in tasks.flatten() {
            // A thread that exits while being read is skipped.
            if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
                total += stat
                    .split_whitespace()
                    .next()
                    .and_then(|ns| ns.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// From etcd's `/metrics`: `etcd_disk_wal_fsync_duration_seconds` (sum, count) and the
/// KV requests it answered (`grpc_server_handled_total` of `etcdserverpb.KV`: Range, Txn,
/// Put, DeleteRange — the store's round trips).
async fn etcd_counters(metrics: &mut Option<Conn>) -> anyhow::Result<(f64, f64, f64)> {
    let Some(conn) = metrics.as_mut() else {
        return Ok((0.0, 0.0, 0.0));
    };
    let (status, body) = conn.send(Method::GET, "/metrics", None, None).await?;
    if status != 200 {
        bail!("etcd /metrics answered {status}");
    }
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let kv_requests = text
        .lines()
        .filter(|line| {
            line.starts_with("grpc_server_handled_total{")
                && line.contains(r#"grpc_service="etcdserverpb.KV""#)
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum();
    Ok((
        value("etcd_disk_wal_fsync_duration_seconds_sum"),
        value("etcd_disk_wal_fsync_duration_seconds_count"),
        kv_requests,
    ))
}

struct Driver {
    args: DeploysArgs,
    token: Rc<str>,
    /// `conns[client][url]`: every client has its own connection to every admin URL.
    conns: Vec<Vec<Conn>>,
    metrics: Option<Conn>,
    out: std::fs::File,
}

impl Driver {
    async fn run_phase(&mut self, phase: Phase<'_>) -> anyhow::Result<()> {
        let count = self.args.count;
        let urls = self.args.admin.len();
        let cpu_before = (
            cpu_ns(&self.args.server_pids)?,
            cpu_ns(&self.args.etcd_pids)?,
        );
        let etcd_before = etcd_counters(&mut self.metrics).await?;
        let latencies = Rc::new(RefCell::new(Vec::<i64>::with_capacity(count)));
        let start = Instant::now();
        if phase.concurrent {
            let clients = self.args.clients.max(1);
            let mut tasks = Vec::new();
            for client in 0..clients {
                // Client `client` makes calls client, client + clients, ...
                let calls: Vec<Call> = (client..count)
                    .step_by(clients)
                    .map(|i| (phase.calls)(i))
                    .collect();
                // The task owns the client's connections for the phase and hands them back.
                let mut conns = std::mem::take(&mut self.conns[client]);
                let (token, latencies) = (Rc::clone(&self.token), Rc::clone(&latencies));
                tasks.push(tokio::task::spawn_local(async move {
                    for (method, path, body) in calls {
                        let sent = Instant::now();
                        let (status, answer) = conns[client % urls]
                            .send(method.clone(), &path, Some(&token), body)
                            .await?;
                        check(&method, &path, status, &answer)?;
                        latencies
                            .borrow_mut()
                            .push(sent.elapsed().as_micros() as i64);
                    }
                    anyhow::Ok(conns)
                }));
            }
            for (client, task) in tasks.into_iter().enumerate() {
                self.conns[client] = task.await.context("client task")??;
            }
        } else {
            for i in 0..count {
                let (method, path, body) = (phase.calls)(i);
                let sent = Instant::now();
                let (status, answer) = self.conns[0][i % urls]
                    .send(method.clone(), &path, Some(&self.token), body)
                    .await?;
                check(&method, &path, status, &answer)?;
                latencies
                    .borrow_mut()
                    .push(sent.elapsed().as_micros() as i64);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let cpu_after = (
            cpu_ns(&self.args.server_pids)?,
            cpu_ns(&self.args.etcd_pids)?,
        );
        let etcd_after = etcd_counters(&mut self.metrics).await?;
        let mut latencies = latencies.take();
        latencies.sort_unstable();
        let calls = latencies.len() as f64;
        let per_call_us = |ns: u64| ns as f64 / 1e3 / calls.max(1.0);
        let fsyncs = etcd_after.1 - etcd_before.1;
        let row = format!(
            "{},{},{},{},{:.3},{:.1},{},{},{},{:.0},{:.0},{:.2},{:.0},{:.2}",
            self.args.setup,
            self.args.round,
            phase.name,
            latencies.len(),
            seconds,
            calls / seconds,
            pct(&latencies, 50.0),
            pct(&latencies, 99.0),
            latencies.last().copied().unwrap_or(0),
            per_call_us(cpu_after.0 - cpu_before.0),
            per_call_us(cpu_after.1 - cpu_before.1),
            fsyncs / calls.max(1.0),
            if fsyncs > 0.0 {
                (etcd_after.0 - etcd_before.0) / fsyncs * 1e6
            } else {
                0.0
            },
            (etcd_after.2 - etcd_before.2) / calls.max(1.0),
        );
        eprintln!("moontide-gwload deploys: {row}");
        writeln!(self.out, "{row}")?;
        Ok(())
    }
}

fn check(method: &Method, path: &str, status: u16, answer: &[u8]) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    bail!(
        "{method} {path} answered {status}: {}",
        String::from_utf8_lossy(answer)
    )
}

pub async fn deploys(args: DeploysArgs) -> anyhow::Result<()> {
    if args.count == 0 || args.clients == 0 || args.admin.is_empty() {
        bail!("--count, --clients and --admin must be given and > 0");
    }
    let token: Rc<str> = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read {}", args.token_file.display()))?
        .trim()
        .into();
    let mut conns = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let mut per_url = Vec::with_capacity(args.admin.len());
        for url in &args.admin {
            per_url.push(Conn::new(url).await?);
        }
        conns.push(per_url);
    }
    let metrics = match &args.etcd_metrics {
        Some(url) => Some(Conn::new(url).await?),
        None => None,
    };
    let new_file = !args.out.exists();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    if new_file {
        writeln!(out, "{CSV_HEADER}")?;
    }
    let p = args.prefix.clone();
    let mut driver = Driver {
        args,
        token,
        conns,
        metrics,
        out,
    };

    // Warm-up (not recorded): connections, the first instances, the function redeployed
    // below. Ten deploys (more if there are more URLs: every URL gets one).
    let urls = driver.args.admin.len();
    for i in 0..urls.max(10) {
        let path = format!("/v1/functions/{p}w{i}");
        let (status, answer) = driver.conns[0][i % urls]
            .send(Method::PUT, &path, Some(&driver.token), Some(source(&path)))
            .await?;
        check(&Method::PUT, &path, status, &answer)?;
    }
    let path = format!("/v1/functions/{p}u");
    let (status, answer) = driver.conns[0][0]
        .send(Method::PUT, &path, Some(&driver.token), Some(source("u")))
        .await?;
    check(&Method::PUT, &path, status, &answer)?;

    let put = |path: String, body: String| (Method::PUT, path, Some(body));
    let deploy_seq = |i: usize| put(format!("/v1/functions/{p}s{i}"), source(&format!("s{i}")));
    let redeploy = |i: usize| put(format!("/v1/functions/{p}u"), source(&format!("u{i}")));
    let deploy_conc = |i: usize| put(format!("/v1/functions/{p}c{i}"), source(&format!("c{i}")));
    let route_seq = |i: usize| {
        put(
            format!("/v1/routes/{p}r{i}"),
            route(&format!("/{p}r/{i}"), &format!("{p}s{i}")),
        )
    };
    let route_conc = |i: usize| {
        put(
            format!("/v1/routes/{p}q{i}"),
            route(&format!("/{p}q/{i}"), &format!("{p}c{i}")),
        )
    };
    let get_fn = |_: usize| (Method::GET, format!("/v1/functions/{p}s0"), None);
    let list_fn = |_: usize| (Method::GET, "/v1/functions".to_string(), None);
    let phase = |name, concurrent, calls| Phase {
        name,
        concurrent,
        calls,
    };
    let phases = [
        phase("deploy_seq", false, &deploy_seq),
        phase("redeploy_seq", false, &redeploy),
        phase("deploy_conc", true, &deploy_conc),
        phase("route_seq", false, &route_seq),
        phase("route_conc", true, &route_conc),
        phase("get_fn", false, &get_fn),
        phase("list_fn", false, &list_fn),
    ];
    for phase in phases {
        driver.run_phase(phase).await?;
    }
    Ok(())
}
