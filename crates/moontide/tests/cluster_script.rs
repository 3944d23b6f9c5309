//! `scripts/cluster.sh`, run as a user runs it (the README's "A cluster on one machine"):
//! three nodes on a real etcd behind a Moontide load balancer, all started by the script
//! with this test's binary (`MOONTIDE_BIN`) and a state dir of the test's own.
//!
//! A function deployed on one node is served through the load balancer and by every node;
//! a node killed with SIGKILL is marked down by the load balancer's health checks while
//! every request through it still answers 200; `scripts/cluster.sh stop` ends the script
//! with status 0 and leaves no process it started.
//!
//! No timings: every wait polls with a bounded number of tries. Built with the `etcd`
//! feature (the test suite runs with `--all-features`).
#![cfg(feature = "etcd")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Tries of a polled condition (a bound on waiting, not a timing assertion).
const TRIES: usize = 1_200;
const POLL: Duration = Duration::from_millis(100);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster.sh")
}

/// The running script; stopped (and anything it left killed) when dropped, so a failing
/// test leaves no cluster behind.
struct Cluster {
    child: Child,
    state: tempfile::TempDir,
    /// The script's stdout and stderr.
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        let state = tempfile::tempdir().expect("state dir");
        let log_dir = tempfile::tempdir().expect("log dir");
        let log = log_dir.path().join("cluster.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("bash")
            .arg(script())
            .arg(nodes.to_string())
            .env("MOONTIDE_BIN", common::BIN)
            .env("STATE_DIR", state.path())
            .env("WORKERS", "1")
            .env("RUST_LOG", "warn")
            .env_remove("MOONTIDE_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("run scripts/cluster.sh");
        Cluster {
            child,
            state,
            log,
            _log_dir: log_dir,
        }
    }

    fn state_dir(&self) -> &Path {
        self.state.path()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `cluster.env` (written whole once everything is ready) and parses it.
    async fn env(&mut self) -> HashMap<String, String> {
        let path = self.state_dir().join("cluster.env");
        for _ in 0..TRIES {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return parse_env(&text);
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "cluster.sh exited ({status}) before it was ready:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("cluster.sh not ready:\n{}", self.output());
    }

    /// Waits for the script to exit; its status.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..TRIES {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("cluster.sh did not exit:\n{}", self.output());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            for _ in 0..TRIES {
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(POLL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in processes_naming(self.state_dir()) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// `KEY=VALUE` and `KEY='VALUE'` lines (comments skipped).
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.trim_matches('\'').to_string()))
        .collect()
}

/// Live processes (zombies excluded) whose command line names a path under `dir`: what
/// the script started (every data dir, log and etcd dir is there).
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = format!("{}/", dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && is_alive(&pid) {
            found.push(pid);
        }
    }
    found
}

/// Running, or at least not yet a zombie.
fn is_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}

/// `(status, body)` of a GET; `(0, error)` when the request fails.
async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    match http.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(error) => (0, error.to_string()),
    }
}

async fn wait_serves(http: &reqwest::Client, url: &str, body: &str) {
    let mut last = (0, String::new());
    for _ in 0..TRIES {
        last = get(http, url).await;
        if last == (200, body.to_string()) {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("{url} never answered 200 {body:?}; last: {last:?}");
}

/// The load balancer's view of its upstream's nodes: address → healthy.
async fn lb_health(http: &reqwest::Client, env: &HashMap<String, String>) -> HashMap<String, bool> {
    let response = http
        .get(format!("{}/v1/upstreams/cluster", env["LB_ADMIN"]))
        .bearer_auth(&env["MOONTIDE_ADMIN_TOKEN"])
        .send()
        .await
        .expect("GET the load balancer's upstream");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("upstream JSON");
    body["status"]["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no status in {body}"))
        .iter()
        .map(|node| {
            (
                node["address"].as_str().unwrap().to_string(),
                node["healthy"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_script_serves_through_its_load_balancer_survives_a_dead_node_and_stops_clean()
{
    let mut cluster = Cluster::start(3);
    let env = cluster.env().await;
    let http = common::http_client();
    let token = env["MOONTIDE_ADMIN_TOKEN"].clone();
    assert!(token.len() >= 32, "a random admin token: {token:?}");
    let nodes: Vec<(String, String, String)> = (1..=3)
        .map(|i| {
            (
                env[&format!("NODE_{i}_URL")].clone(),
                env[&format!("NODE_{i}_ADMIN")].clone(),
                env[&format!("NODE_{i}_PID")].clone(),
            )
        })
        .collect();
    for url in [&env["LB_URL"], &env["LB_ADMIN"]]
        .into_iter()
        .chain(nodes.iter().flat_map(|(data, admin, _)| [data, admin]))
    {
        assert!(url.starts_with("http://127.0.0.1:"), "loopback only: {url}");
    }
    assert!(env["ETCD_ENDPOINT"].starts_with("127.0.0.1:"));
    assert!(
        cluster.output().contains(&env["LB_URL"]),
        "the script prints where the load balancer is:\n{}",
        cluster.output()
    );
    // Every node and the load balancer take the one token.
    for admin in nodes
        .iter()
        .map(|(_, admin, _)| admin)
        .chain([&env["LB_ADMIN"]])
    {
        let response = http
            .get(format!("{admin}/v1/functions"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("admin request");
        assert_eq!(response.status(), 200, "{admin} takes the cluster's token");
    }

    // A deploy on node-1 is served by every node and through the load balancer.
    let source = "return function(event, ctx) return {statusCode = 200, body = \"hello from the cluster\"} end";
    let response = http
        .put(format!("{}/v1/functions/hello", nodes[0].1))
        .bearer_auth(&token)
        .json(&json!({"source": source, "config": {"route": "/hello"}}))
        .send()
        .await
        .expect("deploy");
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let lb = format!("{}/hello", env["LB_URL"]);
    for (data, _, _) in &nodes {
        wait_serves(&http, &format!("{data}/hello"), "hello from the cluster").await;
    }
    for _ in 0..9 {
        assert_eq!(
            get(&http, &lb).await,
            (200, "hello from the cluster".to_string())
        );
    }

    // kill -9 node-2 (its supervisor; the node process dies with it).
    let (victim_url, _, victim_pid) = &nodes[1];
    let victim = victim_url.trim_start_matches("http://").to_string();
    let health = lb_health(&http, &env).await;
    assert_eq!(health.len(), 3, "{health:?}");
    assert!(health.values().all(|healthy| *healthy), "{health:?}");
    let status = Command::new("kill")
        .args(["-KILL", victim_pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut marked_down = false;
    for _ in 0..TRIES {
        // Every request through the load balancer answers 200 all along.
        assert_eq!(
            get(&http, &lb).await,
            (200, "hello from the cluster".to_string()),
            "through the load balancer after node-2 was killed"
        );
        let health = lb_health(&http, &env).await;
        if health[&victim] {
            tokio::time::sleep(POLL).await;
            continue;
        }
        assert!(
            health
                .iter()
                .all(|(address, healthy)| *healthy == (*address != victim)),
            "only node-2 is down: {health:?}"
        );
        marked_down = true;
        break;
    }
    assert!(marked_down, "the load balancer never marked {victim} down");
    assert_eq!(get(&http, victim_url).await.0, 0, "node-2 is gone");
    for _ in 0..20 {
        assert_eq!(
            get(&http, &lb).await,
            (200, "hello from the cluster".to_string())
        );
    }

    // What the script started and still runs (etcd, the load balancer and two nodes, each
    // node a supervisor and its node process) is what `processes_naming` sees.
    let running = processes_naming(cluster.state_dir());
    let mut pids = vec![&env["ETCD_PID"], &env["LB_PID"], &nodes[0].2, &nodes[2].2];
    for pid in &pids {
        assert!(running.contains(pid), "{pid} not in {running:?}");
    }
    assert!(!running.contains(victim_pid), "{victim_pid} in {running:?}");
    assert_eq!(running.len(), 7, "{running:?}");

    // `stop` ends the script (status 0), which stops everything it started.
    let output = Command::new("bash")
        .arg(script())
        .arg("stop")
        .env("STATE_DIR", cluster.state_dir())
        .output()
        .expect("cluster.sh stop");
    assert!(
        output.status.success(),
        "cluster.sh stop: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = cluster.wait_exit().await;
    assert!(
        status.success(),
        "cluster.sh exited {status}:\n{}",
        cluster.output()
    );
    let left = processes_naming(cluster.state_dir());
    assert!(left.is_empty(), "processes left running: {left:?}");
    pids.push(victim_pid);
    for pid in pids {
        assert!(!is_alive(pid), "pid {pid} still runs");
    }
    assert!(
        !cluster.state_dir().join("cluster.env").exists(),
        "cluster.env goes with the cluster"
    );
    assert!(cluster.output().contains("stopped"), "{}", cluster.output());
}
