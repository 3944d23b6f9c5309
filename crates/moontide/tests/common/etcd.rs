//! A real etcd server for tests: one member on free loopback ports with its data in a temp
//! dir, stopped and started again on the same ports and data (an outage), compacted with
//! `etcdctl`, killed when dropped.
//!
//! Self-contained (std only), so `moontide-store-etcd`'s tests include it by path too.
//! Both binaries come from Debian's `etcd-server` and `etcd-client` packages, which
//! `scripts/install-test-deps.sh` installs; a test fails (it does not skip) without them.

#![allow(dead_code)] // each test binary uses part of it

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Polls of `etcdctl endpoint health` before a start counts as failed (not a timing
/// assertion: a bound on waiting).
const READY_TRIES: usize = 600;
const READY_POLL: Duration = Duration::from_millis(100);
/// Tries with new ports when another process took a free one first.
const PORT_ATTEMPTS: usize = 5;

const MISSING: &str = "is not installed: run scripts/install-test-deps.sh \
                       (it installs Debian's `etcd-server` and `etcd-client` packages)";

/// A running (or stopped) one-member etcd; SIGKILLed when dropped.
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Data and logs; removed after the process is killed.
    dir: tempfile::TempDir,
    starts: usize,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until it answers.
    pub fn start() -> Etcd {
        require_binary("etcd");
        require_binary("etcdctl");
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut etcd = Etcd {
                child: None,
                client_port: free_port(),
                peer_port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
                starts: 0,
            };
            match etcd.try_start() {
                Ok(()) => return etcd,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("etcd did not start: {failures:#?}");
    }

    /// `127.0.0.1:PORT` of its client listener.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The `serve --store` URL for it.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// Kills it (SIGKILL; etcd's WAL keeps every acknowledged write).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(failure) = self.try_start() {
            panic!("etcd did not restart: {failure}");
        }
    }

    /// Starts it again on the same ports with no data: a new cluster whose revisions start
    /// over (as after a restore from an old backup, or a replaced etcd).
    pub fn wipe_and_restart(&mut self) {
        self.stop();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("remove etcd data");
        if let Err(failure) = self.try_start() {
            panic!("etcd did not start again: {failure}");
        }
    }

    /// Runs `etcdctl` against it; panics unless it succeeds. Returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let output = self.etcdctl_output(args);
        assert!(
            output.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> u64 {
        let status = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let at = status
            .find("\"revision\":")
            .unwrap_or_else(|| panic!("no revision in {status}"));
        status[at + "\"revision\":".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("bad revision in {status}"))
    }

    /// Compacts the history up to the current revision (`etcdctl compact`); returns it.
    pub fn compact(&self) -> u64 {
        let revision = self.revision();
        self.etcdctl(&["compact", &revision.to_string(), "--physical"]);
        revision
    }

    /// Everything etcd logged so far.
    pub fn log(&self) -> String {
        (0..self.starts)
            .map(|i| std::fs::read_to_string(self.log_path(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_path(&self, start: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("etcd-{start}.log"))
    }

    fn etcdctl_output(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=http://{}", self.endpoint()))
            .arg("--command-timeout=2s")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run etcdctl: {e}"))
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log_path = self.log_path(self.starts);
        self.starts += 1;
        let log = std::fs::File::create(&log_path).expect("etcd log file");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name=default")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn etcd: {e}"));
        self.child = Some(child);
        for _ in 0..READY_TRIES {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "etcd exited ({status}) before it was ready; log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if self
                .etcdctl_output(&["endpoint", "health"])
                .status
                .success()
            {
                return Ok(());
            }
            std::thread::sleep(READY_POLL);
        }
        self.stop();
        Err(format!(
            "etcd on {client} not healthy after {READY_TRIES} polls; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

fn require_binary(name: &str) {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(found, "{name} {MISSING}");
}
