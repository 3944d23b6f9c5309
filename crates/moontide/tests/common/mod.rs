//! Test harness: starts the real `moontide` binary on free loopback ports with a fresh data
//! dir, and drives it over HTTP (reqwest) and through the CLI binary; [`etcd`] runs a real
//! etcd for cluster tests; [`prometheus`] runs a real Prometheus (and promtool) against it,
//! [`redis`] a real Redis for the `redis` module.

#![allow(dead_code)]

pub mod etcd;
pub mod prometheus;
pub mod raw_http;
pub mod redis;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_moontide");

/// A running node (killed with SIGKILL when dropped).
pub struct Node {
    pub child: Child,
    pub data_dir: PathBuf,
    pub data: String,
    pub admin: String,
    pub token: String,
    pub http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// A node on a new temporary data dir.
    pub fn start() -> Node {
        Node::start_with(&[])
    }

    /// A node on a fresh data dir, with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = Node::start_in(dir.path().to_path_buf(), extra);
        node._dir = Some(dir);
        node
    }

    /// A node on a fresh data dir, with extra `serve` flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = Node::start_in_with_env(dir.path().to_path_buf(), extra, env);
        node._dir = Some(dir);
        node
    }

    /// A node on `data_dir` (e.g. again after a kill), with extra `serve` flags.
    pub fn start_in(data_dir: PathBuf, extra: &[&str]) -> Node {
        Node::start_in_with_env(data_dir, extra, &[])
    }

    fn start_in_with_env(data_dir: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let workers: &[&str] = if extra.contains(&"--workers") {
            &[]
        } else {
            &["--workers", "2"]
        };
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(workers)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied());
        Node::start_command(command, data_dir)
    }

    /// A node run by `command`, a whole `moontide serve` command line (the README's, with
    /// its default data dir), whose data dir is `data_dir`: its output is read for the
    /// addresses it reports.
    pub fn start_command(mut command: Command, data_dir: PathBuf) -> Node {
        // Server logs go to a file: a pipe inherited by a server that outlives a killed
        // test would keep the test runner's output open.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .expect("server log file");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn moontide serve");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let mut data = None;
        let mut admin = None;
        while data.is_none() || admin.is_none() {
            let line = receiver
                .recv_timeout(Duration::from_secs(30))
                .expect("moontide serve did not report its addresses");
            if let Some(addr) = line.strip_prefix("moontide: data plane listening on ") {
                data = Some(addr.to_string());
            } else if let Some(addr) = line.strip_prefix("moontide: admin API listening on ") {
                admin = Some(addr.to_string());
            }
        }
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("admin.token exists after start")
            .trim()
            .to_string();
        Node {
            child,
            data_dir,
            data: data.unwrap(),
            admin: admin.unwrap(),
            token,
            http: http_client(),
            _dir: None,
        }
    }

    /// SIGKILL, wait, and start again on the same data dir (ports change).
    pub fn kill_and_restart(mut self) -> Node {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        let dir = self._dir.take();
        let mut node = Node::start_in(self.data_dir.clone(), &[]);
        node._dir = dir;
        node
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("MOONTIDE_ADMIN", &self.admin)
            .env("MOONTIDE_TOKEN", &self.token)
            .output()
            .expect("run moontide CLI")
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "moontide {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 stdout")
    }

    pub fn admin_request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(&self.token)
    }

    /// An admin call with an optional JSON body → (status, JSON or null).
    pub async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.admin_request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("admin body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Deploys Lua source through the API; panics unless 201.
    pub async fn deploy(&self, name: &str, source: &str, config: Value) -> u64 {
        let (status, body) = self
            .admin_json(
                reqwest::Method::PUT,
                &format!("/v1/functions/{name}"),
                Some(serde_json::json!({"source": source, "config": config})),
            )
            .await;
        assert_eq!(status, 201, "deploy {name}: {body}");
        body["version"].as_u64().expect("version")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.data)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("data-plane request")
    }

    /// The function's log lines (messages).
    pub async fn log_messages(&self, name: &str) -> Vec<String> {
        self.log_lines(&format!("/v1/functions/{name}/logs?tail=1000"))
            .await
    }

    /// The plugin's log lines (messages).
    pub async fn plugin_log_messages(&self, name: &str) -> Vec<String> {
        self.log_lines(&format!("/v1/plugins/{name}/logs?tail=1000"))
            .await
    }

    /// The messages of an NDJSON log endpoint of the admin API (which must answer 200).
    async fn log_lines(&self, path: &str) -> Vec<String> {
        let response = self
            .admin_request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("logs");
        assert_eq!(response.status(), 200, "GET {path}");
        let text = response.text().await.expect("logs body");
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .map(|record| record["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The Prometheus exposition from the admin port.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("metrics");
        response.text().await.expect("metrics body")
    }

    /// Polls until the node's process exits (bounded: 30 s), and returns how.
    pub async fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the node at {} did not exit", self.admin);
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series (`name{labels}`) in a `/metrics` exposition; 0 when absent.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The repo's examples folder.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// Writes `files` under a new temp dir; returns it.
pub fn temp_files(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, content) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }
    dir
}

/// A reqwest client (the build has no default TLS provider; install ring's first).
pub fn http_client() -> reqwest::Client {
    moontide_runtime::install_crypto_provider();
    reqwest::Client::new()
}

/// Deploys `slow` (each call sleeps 1.5 s) on `loaded` and keeps 12 of its calls in
/// flight, batch after batch (at most 20), until `watched`'s `GET /v1/scaling` asks for
/// more than one node; returns that answer, or `None` if it never did.
pub async fn pile_up_until_scaling_rises(loaded: &Node, watched: &Node) -> Option<Value> {
    loaded
        .deploy(
            "slow",
            "local time = require('time')\n\
             return function() time.sleep(1500) return 'done' end",
            serde_json::json!({"max": 16}),
        )
        .await;
    for _ in 0..20 {
        let calls: Vec<_> = (0..12)
            .map(|_| {
                let http = loaded.http.clone();
                let url = loaded.url("/fn/slow");
                tokio::spawn(async move { http.get(url).send().await.map(|r| r.status()) })
            })
            .collect();
        let mut raised = None;
        for _ in 0..30 {
            let (_, body) = watched
                .admin_json(reqwest::Method::GET, "/v1/scaling", None)
                .await;
            if body["desired_nodes"].as_u64() > Some(1) {
                raised = Some(body);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for call in calls {
            let _ = call.await;
        }
        if raised.is_some() {
            return raised;
        }
    }
    None
}
