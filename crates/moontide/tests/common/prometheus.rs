//! A real Prometheus server for tests: started on a free loopback port with its own config
//! and storage in a temp dir, scraping the targets it is given, killed when dropped. Also
//! `promtool check metrics`, the linter Prometheus ships for an exposition.
//!
//! The first scrape comes about 5 s after the start whatever the scrape interval: Prometheus
//! (2.42) hands discovered targets to its scrape manager at most every 5 s, with no flag to
//! change that.
//!
//! Both binaries come from Debian's `prometheus` package, which
//! `scripts/install-test-deps.sh` installs; a test fails (it does not skip) without them.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Name of the scrape job every target is in (`up{job="moontide"}`).
pub const JOB: &str = "moontide";

/// Time between scrapes (Prometheus accepts sub-second intervals).
const SCRAPE_INTERVAL: &str = "200ms";

/// Bound on waiting for a started Prometheus to be ready (not a timing assertion).
const READY_LIMIT: Duration = Duration::from_secs(60);

/// Tries with a new port when another process took the free one first.
const PORT_ATTEMPTS: usize = 5;

const MISSING: &str = "is not installed: run scripts/install-test-deps.sh \
                       (it installs Debian's `prometheus` package)";

/// A running Prometheus (SIGKILLed when dropped).
pub struct Prometheus {
    child: Child,
    /// Base URL of its HTTP API, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    http: reqwest::Client,
    /// Config, storage and log; removed after the process is killed.
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`) at `metrics_path` in job [`JOB`],
    /// presenting the bearer token in `token_file` when given (as an operator configures
    /// it: `authorization.credentials_file`), and waits until it reports ready.
    pub async fn start(
        targets: &[&str],
        metrics_path: &str,
        token_file: Option<&std::path::Path>,
    ) -> Prometheus {
        require_binary("prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_text(targets, metrics_path, token_file))
            .expect("write config");
        let http = super::http_client();
        let mut taken = Vec::new();
        for attempt in 0..PORT_ATTEMPTS {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let log_path = dir.path().join(format!("prometheus-{attempt}.log"));
            let log = std::fs::File::create(&log_path).expect("prometheus log file");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn prometheus: {e}"));
            let ready = wait_ready(&mut child, &http, &url).await;
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            match ready {
                Ok(()) => {
                    return Prometheus {
                        child,
                        url,
                        http,
                        dir,
                    };
                }
                Err(Some(status)) if log().contains("address already in use") => {
                    taken.push(format!("port {port} ({status})"));
                }
                Err(Some(status)) => {
                    panic!(
                        "prometheus exited ({status}) before it was ready; log:\n{}",
                        log()
                    )
                }
                Err(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "prometheus at {url} not ready within {READY_LIMIT:?}; log:\n{}",
                        log()
                    )
                }
            }
        }
        panic!("prometheus found no free port; taken: {taken:?}");
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        let mut logs: Vec<_> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs.iter()
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .collect()
    }

    /// An instant query through `/api/v1/query`; returns `data` (`resultType`, `result`).
    /// Panics on an HTTP or PromQL error.
    pub async fn query(&self, promql: &str) -> Value {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            [("query", promql)],
        )
        .expect("query URL");
        let response = self.http.get(url).send().await.expect("prometheus query");
        let status = response.status();
        let body: Value = response.json().await.expect("prometheus query JSON");
        assert!(
            status.is_success() && body["status"] == "success",
            "query {promql:?}: {status} {body}"
        );
        body["data"].clone()
    }

    /// Polls `promql` until `predicate` holds for its `data`, for at most `limit` (a bound
    /// on waiting, e.g. for the first scrape; not a timing assertion). Returns that `data`;
    /// panics with the last answer and the targets' scrape errors past the limit.
    pub async fn wait_for_query(
        &self,
        promql: &str,
        predicate: impl Fn(&Value) -> bool,
        limit: Duration,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let data = self.query(promql).await;
            if predicate(&data) {
                return data;
            }
            if Instant::now() >= deadline {
                panic!(
                    "query {promql:?} did not satisfy the predicate within {limit:?}; \
                     last answer: {data}\ntargets: {:?}",
                    self.target_health().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `(scrape URL, health, last error)` of every active target (`/api/v1/targets`).
    pub async fn target_health(&self) -> Vec<(String, String, String)> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/targets?state=active", self.url))
            .send()
            .await
            .expect("prometheus targets")
            .json()
            .await
            .expect("prometheus targets JSON");
        let field = |target: &Value, name: &str| target[name].as_str().unwrap_or("").to_string();
        body["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    field(t, "scrapeUrl"),
                    field(t, "health"),
                    field(t, "lastError"),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The one number of an instant query that returned exactly one series, if it did.
pub fn single_value(data: &Value) -> Option<f64> {
    match data["result"].as_array()?.as_slice() {
        [series] => series["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// Whether an instant query returned at least one series.
pub fn has_series(data: &Value) -> bool {
    data["result"].as_array().is_some_and(|r| !r.is_empty())
}

/// What `promtool check metrics` said about an exposition.
#[derive(Debug)]
pub struct PromtoolReport {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl PromtoolReport {
    /// Whether promtool could parse the exposition: it exits 0 when it has no lint
    /// problems, 3 when it has some, 1 when it could not read the input.
    pub fn parsed(&self) -> bool {
        matches!(self.status.code(), Some(0 | 3))
    }

    /// Every problem promtool reported (lint findings or parse errors).
    pub fn problems(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .chain(self.stderr.lines())
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect()
    }
}

/// Runs `promtool check metrics` with `exposition` on its stdin.
pub fn promtool_check(exposition: &str) -> PromtoolReport {
    require_binary("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn promtool: {e}"));
    let mut stdin = child.stdin.take().expect("promtool stdin");
    let text = exposition.to_string();
    // Written from a thread so that a large exposition cannot deadlock against full pipes.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let output = child.wait_with_output().expect("promtool output");
    writer
        .join()
        .expect("promtool stdin writer")
        .expect("write promtool stdin");
    PromtoolReport {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Polls `/-/ready` for at most [`READY_LIMIT`]: `Err(Some(status))` if the process
/// exited first, `Err(None)` if it is still not ready.
async fn wait_ready(
    child: &mut Child,
    http: &reqwest::Client,
    url: &str,
) -> Result<(), Option<ExitStatus>> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait prometheus") {
            return Err(Some(status));
        }
        let ready = http
            .get(format!("{url}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Panics, naming the install script, unless `binary --version` runs.
fn require_binary(binary: &str) {
    match Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`{binary} --version` failed ({status}): {binary} {MISSING}"),
        Err(e) => panic!("{binary} {MISSING} ({e})"),
    }
}

/// A port that was free a moment ago (bind port 0, read it, release it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn config_text(
    targets: &[&str],
    metrics_path: &str,
    token_file: Option<&std::path::Path>,
) -> String {
    let authorization = token_file
        .map(|path| {
            format!(
                "    authorization:\n      \
                   type: Bearer\n      \
                   credentials_file: \"{}\"\n",
                path.display()
            )
        })
        .unwrap_or_default();
    let targets = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "global:\n  \
           scrape_interval: {SCRAPE_INTERVAL}\n  \
           scrape_timeout: {SCRAPE_INTERVAL}\n  \
           evaluation_interval: 1s\n\
         scrape_configs:\n  \
           - job_name: {JOB}\n    \
             metrics_path: \"{metrics_path}\"\n\
         {authorization}    \
             static_configs:\n      \
               - targets: [{targets}]\n"
    )
}
