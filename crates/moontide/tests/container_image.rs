//! The container image: `deploy/container/build.sh` builds it `FROM scratch` with podman from
//! the test build of the binary, and the test checks what is in it (its config; exactly the
//! binary, the libraries `ldd` lists, a CA bundle, nsswitch.conf and `/data`: no shell) and
//! runs it: `--version`, then `serve` in cluster mode the way the Kubernetes Deployment runs
//! it (read-only root, a fresh writable `/data`, user 65532, the admin token from
//! `MOONTIDE_ADMIN_TOKEN`) against a real etcd, over real sockets, and stops it with SIGTERM
//! (`podman stop`).
//!
//! Podman keeps this test's images and containers in a temp dir (`vfs` storage) and runs
//! them with runc, in the host's network namespace (so loopback ports are reachable), with
//! explicit `nofile`/`nproc` limits: see deploy/kubernetes/README.md for why on the
//! machines here. podman and runc come from Debian's packages, which
//! `scripts/install-test-deps.sh` installs; the test fails, it does not skip, without them.

#![cfg(feature = "etcd")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::BIN;
use common::etcd::Etcd;
use serde_json::Value;

const IMAGE: &str = "localhost/moontide:test";
const USER: &str = "65532:65532";
const TOKEN: &str = "container-image-test-token";
/// The root store of functions' outbound `http` (the node does not start without one).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const MISSING: &str = "run scripts/install-test-deps.sh (it installs Debian's podman and runc)";

/// Podman with storage and engine settings of its own in a temp dir.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        for tool in ["podman", "runc"] {
            let found = Command::new(tool).arg("--version").output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "{tool} is not installed: {MISSING}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{path}/root\"\n\
                 runroot = \"{path}/run\"\n"
            ),
        )
        .expect("storage.conf");
        // Podman's default limits for root are above this machine's hard limits, which a
        // container may not raise (no CAP_SYS_RESOURCE); podman also caps nproc lower than
        // the shell's for the runtime it starts.
        let nofile = hard_limit("Max open files").min(65_536);
        std::fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \
                 \"nproc=4096:4096\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\ntmp_dir = \"{path}/tmp\"\n\
                 volume_path = \"{path}/volumes\"\n"
            ),
        )
        .expect("containers.conf");
        Podman { dir }
    }

    /// A command run with this podman's settings (`podman` itself or a script calling it).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"));
        command
    }

    /// `podman ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self
            .command("podman")
            .args(args)
            .output()
            .expect("run podman");
        assert!(
            output.status.success(),
            "podman {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Stops what still runs (conmon, the node) before the temp dir goes.
        let _ = self
            .command("podman")
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self
            .command("podman")
            .args(["image", "unmount", "--all"])
            .output();
    }
}

/// The hard limit named `what` in /proc/self/limits.
fn hard_limit(what: &str) -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find_map(|line| line.strip_prefix(what))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|hard| hard.parse().ok())
        .unwrap_or(65_536)
}

/// The files `ldd` lists for the binary (libraries and the loader).
fn linked_libraries() -> BTreeSet<PathBuf> {
    let output = Command::new("ldd").arg(BIN).output().expect("ldd");
    assert!(output.status.success(), "ldd {BIN}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some(PathBuf::from(path)),
                [path, ..] if path.starts_with('/') => Some(PathBuf::from(path)),
                _ => None,
            }
        })
        .collect()
}

/// Every file and symlink under `root`, as absolute paths inside it.
fn files_under(root: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                pending.push(entry.path());
            } else {
                let inside = entry
                    .path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_owned();
                files.insert(Path::new("/").join(inside));
            }
        }
    }
    files
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Polls `url` until it answers `status` (a bound on waiting, not a timing assertion).
async fn wait_for(http: &reqwest::Client, url: &str, status: u16) {
    let mut last = None;
    for _ in 0..300 {
        match http.get(url).send().await {
            Ok(response) if response.status() == status => return,
            Ok(response) => last = Some(format!("{}", response.status())),
            Err(error) => last = Some(error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not answer {status}: last {last:?}");
}

#[tokio::test]
async fn the_image_holds_only_the_binary_and_its_libraries_and_runs_it_as_kubernetes_would() {
    let podman = Podman::new();
    let build = podman
        .command(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/container/build.sh"))
        .args([BIN, IMAGE])
        .output()
        .expect("run build.sh");
    assert!(
        build.status.success(),
        "build.sh failed:\n{}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );

    // Its config.
    let inspect: Value =
        serde_json::from_str(&podman.ok(&["image", "inspect", IMAGE])).expect("inspect JSON");
    let config = &inspect[0]["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/moontide"]),
        "{config}"
    );
    assert_eq!(config["User"], USER, "{config}");
    let env = config["Env"].as_array().expect("Env");
    for var in [
        "MOONTIDE_DATA_DIR=/data",
        &format!("SSL_CERT_FILE={CA_BUNDLE}"),
    ] {
        assert!(env.contains(&Value::from(var)), "{var}: {config}");
    }

    // Its files: the binary (the same bytes), what it links, and nothing else.
    let root = PathBuf::from(podman.ok(&["image", "mount", IMAGE]).trim());
    let mut expected = linked_libraries();
    assert!(
        expected
            .iter()
            .any(|p| p.to_string_lossy().contains("ld-linux")),
        "ldd lists the dynamic loader: {expected:?}"
    );
    expected.insert(PathBuf::from("/moontide"));
    expected.insert(PathBuf::from(CA_BUNDLE));
    expected.insert(PathBuf::from("/etc/nsswitch.conf"));
    assert_eq!(files_under(&root), expected);
    assert!(root.join("data").is_dir(), "/data");
    assert!(
        std::fs::read(root.join("moontide")).expect("/moontide")
            == std::fs::read(BIN).expect("the test binary"),
        "/moontide is the binary build.sh was given"
    );
    podman.ok(&["image", "unmount", IMAGE]);

    // It runs the binary.
    let version = podman.ok(&["run", "--rm", "--network", "none", IMAGE, "--version"]);
    let local = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("--version");
    assert_eq!(version, String::from_utf8_lossy(&local.stdout));

    // A node in cluster mode, as the Deployment runs it.
    let etcd = Etcd::start();
    let (data_port, admin_port) = (free_port(), free_port());
    let data_volume = podman.dir.path().join("data");
    std::fs::create_dir(&data_volume).expect("data volume");
    std::os::unix::fs::chown(&data_volume, Some(65532), Some(65532)).expect("chown data volume");
    let volume = format!("{}:/data", data_volume.display());
    let listen = format!("--listen=127.0.0.1:{data_port}");
    let admin = format!("--admin=127.0.0.1:{admin_port}");
    // By name, as in Kubernetes: glibc's resolver in the image reads the /etc/hosts podman
    // provides (the cluster's DNS through /etc/resolv.conf is the same code path).
    let store = format!(
        "--store=etcd://{}",
        etcd.endpoint().replace("127.0.0.1", "localhost")
    );
    let token = format!("MOONTIDE_ADMIN_TOKEN={TOKEN}");
    podman.ok(&[
        "run",
        "--detach",
        "--name",
        "node",
        "--network",
        "host",
        "--read-only",
        "--volume",
        &volume,
        "--env",
        &token,
        IMAGE,
        "serve",
        &listen,
        &admin,
        &store,
        "--workers=2",
    ]);
    let http = common::http_client();
    let data = format!("http://127.0.0.1:{data_port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_for(&http, &format!("{admin}/healthz"), 200).await;
    wait_for(&http, &format!("{admin}/readyz"), 200).await;
    wait_for(&http, &format!("{data}/healthz"), 200).await;
    wait_for(&http, &format!("{data}/readyz"), 200).await;

    // The process runs as the image's user.
    let pid = podman.ok(&["inspect", "--format", "{{.State.Pid}}", "node"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).expect("status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert_eq!(uid.split_whitespace().nth(1), Some("65532"), "{uid}");

    // The admin API takes the token from the environment; a function deployed through it runs.
    let status_url = format!("{admin}/v1/status");
    let without = http.get(&status_url).send().await.expect("status");
    assert_eq!(without.status(), 401);
    let with = http
        .get(&status_url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("status");
    assert_eq!(with.status(), 200);
    let source =
        std::fs::read_to_string(common::examples_dir().join("greeting.lua")).expect("greeting.lua");
    let deployed = http
        .put(format!("{admin}/v1/functions/greeting"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"source": source, "config": {}}))
        .send()
        .await
        .expect("deploy");
    assert_eq!(deployed.status(), 201, "{:?}", deployed.text().await);
    let answer = http
        .get(format!("{data}/fn/greeting"))
        .send()
        .await
        .expect("call");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.expect("body"), "Hello, World!");
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/moontide/"]);
    assert!(keys.contains("greeting"), "the function is in etcd: {keys}");

    // SIGTERM (podman stop) ends it cleanly, well before podman would SIGKILL it.
    podman.ok(&["stop", "--time", "60", "node"]);
    let exit = podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", "node"]);
    assert_eq!(
        exit.trim(),
        "0",
        "exit status after SIGTERM; logs:\n{}",
        podman.ok(&["logs", "node"])
    );
}
