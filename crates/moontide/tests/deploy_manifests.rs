//! The Kubernetes manifests in `deploy/kubernetes/`, checked three ways:
//!
//! - against the schemas: Kubernetes' own (`kubernetes-validate --strict`, for Kubernetes
//!   1.30 and 1.37) and KEDA's CRDs (`tests/deploy/check_keda.py`), and both validators
//!   must reject a manifest with a field their schema lacks;
//! - against each other: namespaces, Service ports, the autoscalers' targets, the KEDA URL,
//!   the Secret, the etcd members, the probes, the sizing flags, the image's user;
//! - against the binary: the Deployment's own `serve` arguments and environment run a node
//!   (on loopback, against a real etcd) that answers the probes, exports the metric the HPA
//!   reads, serves the field the ScaledObject reads behind the token, and on SIGTERM drains
//!   and exits within `terminationGracePeriodSeconds`.
//!
//! The Python tools are in the venv `scripts/install-test-deps.sh` makes
//! (`$MOONTIDE_TEST_VENV`, default `~/.cache/moontide/test-venv`); without them a test
//! fails, it does not skip.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// The Kubernetes versions every manifest must validate against (the oldest we claim, and
/// the newest the pinned kubernetes-validate ships).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// The namespace every object is in (its name is also written into URLs).
const NAMESPACE: &str = "moontide";
/// The metric the HPA scales on, and the field KEDA reads.
const HPA_METRIC: &str = "moontide_cluster_desired_nodes";
const MISSING_VENV: &str = "run scripts/install-test-deps.sh: it installs the deploy tests' \
                            Python tools (scripts/test-requirements.txt) into a venv";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn manifest_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Every `*.yaml` in `deploy/kubernetes/`, sorted.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the manifests are missing: {files:?}");
    files
}

/// One Kubernetes object of the manifests and the file it is in.
struct Object {
    file: PathBuf,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().expect("kind")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
    }

    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().expect("apiVersion")
    }
}

fn objects() -> Vec<Object> {
    let mut objects = Vec::new();
    for file in manifest_files() {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for document in yaml_serde::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
            if !value.is_null() {
                objects.push(Object {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    objects
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .map(|o| &o.value)
        .unwrap_or_else(|| {
            let all: Vec<_> = objects
                .iter()
                .map(|o| format!("{}/{}", o.kind(), o.name()))
                .collect();
            panic!("no {kind}/{name} in deploy/kubernetes (there are {all:?})")
        })
}

fn venv() -> PathBuf {
    std::env::var_os("MOONTIDE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/moontide/test-venv")
        })
}

/// A program of the venv; panics (the test fails) when it is not there.
fn venv_bin(name: &str) -> PathBuf {
    let path = venv().join("bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: {MISSING_VENV}",
        path.display()
    );
    path
}

fn run(command: &mut Command) -> (Output, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, text)
}

fn kubernetes_validate(files: &[PathBuf], versions: &[&str]) -> (Output, String) {
    let mut command = Command::new(venv_bin("kubernetes-validate"));
    command.arg("--strict");
    for version in versions {
        command.args(["-k", version]);
    }
    run(command.args(files))
}

fn check_keda(files: &[PathBuf]) -> (Output, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deploy/check_keda.py");
    run(Command::new(venv_bin("python")).arg(script).args(files))
}

/// `1.30.0` -> `1.30`, as kubernetes-validate reports versions.
fn major_minor(version: &str) -> &str {
    version.rsplit_once('.').expect("x.y.z").0
}

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    let (output, text) = kubernetes_validate(&manifest_files(), &KUBERNETES_VERSIONS);
    assert!(
        output.status.success(),
        "kubernetes-validate failed:\n{text}"
    );
    // Each object must be reported as passed; kubernetes-validate only warns about a kind it
    // has no schema for (and exits 0), which is acceptable for KEDA's kinds alone: those are
    // checked against KEDA's schema by the next test.
    let lines: Vec<&str> = text.lines().collect();
    let mut expected = Vec::new();
    for object in objects() {
        for version in KUBERNETES_VERSIONS.map(major_minor) {
            let file = object.file.display();
            expected.push(if object.api_version().starts_with("keda.sh/") {
                format!(
                    "WARN {file} Couldn't find schema for kind {} with api version {} for \
                     kubernetes version {version}",
                    object.kind(),
                    object.api_version()
                )
            } else {
                format!(
                    "INFO {file} passed for resource {}/{} against version {version}",
                    object.kind().to_lowercase(),
                    object.name()
                )
            });
        }
    }
    for line in &expected {
        assert!(
            lines.contains(&line.as_str()),
            "missing `{line}` in:\n{text}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "unexpected lines in:\n{text}");
}

#[test]
fn keda_objects_pass_the_keda_crd_schema() {
    let objects = objects();
    let keda: Vec<&Object> = objects
        .iter()
        .filter(|o| o.api_version().starts_with("keda.sh/"))
        .collect();
    let kinds: Vec<&str> = keda.iter().map(|o| o.kind()).collect();
    assert_eq!(kinds, ["TriggerAuthentication", "ScaledObject"]);
    let (output, text) = check_keda(&manifest_files());
    assert!(output.status.success(), "check_keda.py failed:\n{text}");
    for object in keda {
        let line = format!(
            "OK {} {}/{}",
            object.file.display(),
            object.kind().to_lowercase(),
            object.name()
        );
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

/// Both validators can fail: a field their schema lacks is an error, not a warning.
#[test]
fn both_validators_reject_a_field_the_schema_lacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = |file: &str, from: &str, to: &str| {
        let text = std::fs::read_to_string(manifest_dir().join(file)).expect("read");
        let changed = text.replacen(from, to, 1);
        assert_ne!(changed, text, "`{from}` is not in {file}");
        let path = dir.path().join(file);
        std::fs::write(&path, changed).expect("write");
        path
    };

    let deployment = broken(
        "moontide.yaml",
        "      terminationGracePeriodSeconds:",
        "      terminationGracePeriodSecs: 45\n      terminationGracePeriodSeconds:",
    );
    let (output, text) = kubernetes_validate(&[deployment], &["1.37.0"]);
    assert!(!output.status.success(), "accepted:\n{text}");
    assert!(
        text.contains("ERROR") && text.contains("'terminationGracePeriodSecs' was unexpected"),
        "{text}"
    );

    let scaled_object = broken(
        "keda.yaml",
        "  pollingInterval:",
        "  pollingIntervalSeconds:",
    );
    let (output, text) = check_keda(&[scaled_object]);
    assert!(!output.status.success(), "accepted:\n{text}");
    assert!(
        text.contains(".spec.pollingIntervalSeconds (unknown field)"),
        "{text}"
    );
}

/// The `moontide` container of the Deployment.
fn moontide_container(deployment: &Value) -> &Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "moontide")
        .expect("a container named moontide")
}

/// The `serve` flags of a container's args: `--name=value` (or `--name` alone for a
/// switch), in order. Every arg after `serve` must be of that form.
fn serve_flags(container: &Value) -> Vec<(String, Option<String>)> {
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    assert_eq!(
        args.first(),
        Some(&"serve"),
        "the Deployment runs `serve`: {args:?}"
    );
    args[1..]
        .iter()
        .map(|arg| {
            assert!(
                arg.starts_with("--"),
                "write `--flag=value` as one arg: {arg}"
            );
            match arg.split_once('=') {
                Some((name, value)) => (name.to_string(), Some(value.to_string())),
                None => (arg.to_string(), None),
            }
        })
        .collect()
}

fn flag<'a>(flags: &'a [(String, Option<String>)], name: &str) -> &'a str {
    flags
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .unwrap_or_else(|| panic!("the Deployment passes no {name}=VALUE: {flags:?}"))
}

fn port_of(address: &str) -> u64 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

/// A container port by name (or number), as probes and Services refer to it.
fn container_port(container: &Value, reference: &Value) -> u64 {
    if let Some(number) = reference.as_u64() {
        return number;
    }
    let name = reference.as_str().expect("port name or number");
    container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// Bytes in a Kubernetes quantity (`2Gi`, `512Mi`) or a Moontide size (`1GiB`, `64MiB`).
fn bytes(size: &str) -> u64 {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits.parse().unwrap_or_else(|_| panic!("size {size}"));
    let unit = match &size[digits.len()..] {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        other => panic!("unit {other} of {size}: extend this test"),
    };
    number * unit
}

fn seconds(duration: &str) -> u64 {
    humantime::parse_duration(duration)
        .unwrap_or_else(|e| panic!("duration {duration}: {e}"))
        .as_secs()
}

/// The `USER uid:gid` of the Containerfile.
fn image_user() -> (u64, u64) {
    let containerfile = std::fs::read_to_string(repo().join("deploy/container/Containerfile"))
        .expect("Containerfile");
    let user = containerfile
        .lines()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("a USER line");
    let (uid, gid) = user.trim().split_once(':').expect("USER uid:gid");
    (uid.parse().expect("uid"), gid.parse().expect("gid"))
}

fn contains_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(map) => map.contains_key(key) || map.values().any(|v| contains_key(v, key)),
        Value::Array(items) => items.iter().any(|v| contains_key(v, key)),
        _ => false,
    }
}

#[test]
fn the_manifests_agree_with_each_other() {
    let objects = objects();
    find(&objects, "Namespace", NAMESPACE);
    for object in objects.iter().filter(|o| o.kind() != "Namespace") {
        assert_eq!(
            object.value["metadata"]["namespace"],
            NAMESPACE,
            "{}/{} in {}",
            object.kind(),
            object.name(),
            object.file.display()
        );
    }

    let deployment = find(&objects, "Deployment", "moontide");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = moontide_container(deployment);
    let flags = serve_flags(container);
    assert!(
        container.get("command").is_none(),
        "the image's entrypoint (/moontide) runs; args only"
    );
    assert!(
        !contains_key(pod, "exec"),
        "the image has no shell nor any program but /moontide: no exec probes or hooks"
    );
    let admin_port = port_of(flag(&flags, "--admin"));

    // Every Service's selector picks a workload's pods, and its target ports are theirs.
    for service in objects.iter().filter(|o| o.kind() == "Service") {
        let selector = service.value["spec"]["selector"]
            .as_object()
            .expect("selector");
        let workload = objects
            .iter()
            .filter(|o| o.kind() == "Deployment" || o.kind() == "StatefulSet")
            .find(|o| {
                let labels = &o.value["spec"]["template"]["metadata"]["labels"];
                selector.iter().all(|(k, v)| &labels[k] == v)
            })
            .unwrap_or_else(|| panic!("Service {} selects no pods", service.name()));
        let pod_container = &workload.value["spec"]["template"]["spec"]["containers"][0];
        for port in service.value["spec"]["ports"].as_array().expect("ports") {
            container_port(pod_container, &port["targetPort"]);
        }
    }

    // Probes: /readyz and /healthz on the admin port.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let http = &container[probe]["httpGet"];
        assert_eq!(http["path"], path, "{probe}");
        assert_eq!(
            container_port(container, &http["port"]),
            admin_port,
            "{probe}"
        );
    }

    // Sizing: Lua memory below the memory limit, a worker per requested CPU.
    let resources = &container["resources"];
    let limit = bytes(
        resources["limits"]["memory"]
            .as_str()
            .expect("memory limit"),
    );
    let lua = bytes(flag(&flags, "--instance-memory"));
    assert!(
        lua < limit,
        "--instance-memory {lua} must stay below the limit {limit}"
    );
    assert_eq!(
        flag(&flags, "--workers"),
        resources["requests"]["cpu"]
            .as_str()
            .expect("cpu request as a string")
    );

    // The drain fits in the grace period.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let drain = seconds(flag(&flags, "--drain-delay"));
    let shutdown = seconds(flag(&flags, "--shutdown-grace"));
    assert!(
        grace > drain + shutdown,
        "terminationGracePeriodSeconds {grace} must exceed --drain-delay {drain} s + \
         --shutdown-grace {shutdown} s"
    );

    // The data dir is a writable volume (the root filesystem is read-only).
    let data_dir = flag(&flags, "--data-dir");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == data_dir)
        .expect("a volume at the data dir");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the data dir's volume");
    assert!(volume.get("emptyDir").is_some(), "{volume}");

    // The pod runs as the image's user.
    let (uid, gid) = image_user();
    assert_eq!(pod["securityContext"]["runAsUser"], uid);
    assert_eq!(pod["securityContext"]["runAsGroup"], gid);

    // The admin token comes from one Secret, the same for the nodes, KEDA and the README.
    let env = container["env"].as_array().expect("env");
    let token = &env
        .iter()
        .find(|e| e["name"] == "MOONTIDE_ADMIN_TOKEN")
        .expect("MOONTIDE_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"];
    let (secret, key) = (
        token["name"].as_str().expect("secret"),
        token["key"].as_str().expect("key"),
    );
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).expect("README");
    let create =
        format!("kubectl -n {NAMESPACE} create secret generic {secret} --from-literal={key}=");
    assert!(
        readme.contains(&create),
        "the README creates the Secret: `{create}`"
    );

    // --store names every etcd member at its client port, through the headless Service.
    let etcd = find(&objects, "StatefulSet", "etcd");
    let governing = etcd["spec"]["serviceName"].as_str().expect("serviceName");
    let headless = find(&objects, "Service", governing);
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let client_port = headless["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "client")
        .and_then(|p| p["port"].as_u64())
        .expect("etcd client port");
    let members: Vec<String> = (0..etcd["spec"]["replicas"].as_u64().expect("replicas"))
        .map(|i| format!("etcd-{i}.{governing}:{client_port}"))
        .collect();
    assert_eq!(
        flag(&flags, "--store"),
        format!("etcd://{}", members.join(","))
    );

    // Both autoscalers aim at the Deployment.
    let hpa = find(&objects, "HorizontalPodAutoscaler", "moontide");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"],
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "moontide"})
    );
    let metric = &hpa["spec"]["metrics"][0]["external"];
    assert_eq!(metric["metric"]["name"], HPA_METRIC);
    assert_eq!(
        metric["target"],
        serde_json::json!({"type": "AverageValue", "averageValue": "1"})
    );
    assert!(
        readme.contains(&format!("seriesQuery: '{HPA_METRIC}{{")),
        "the README's prometheus-adapter rule serves {HPA_METRIC}"
    );

    let scaled = find(&objects, "ScaledObject", "moontide");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "moontide");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "metrics-api");
    assert_eq!(trigger["metricType"], "AverageValue");
    let metadata = &trigger["metadata"];
    assert_eq!(metadata["valueLocation"], "desired_nodes");
    assert_eq!(metadata["targetValue"], "1");
    assert_eq!(metadata["authMode"], "bearer");
    // http://SERVICE.NAMESPACE.svc:PORT/v1/scaling, SERVICE:PORT leading to the admin port.
    let url = metadata["url"].as_str().expect("url");
    let rest = url.strip_prefix("http://").expect("http URL");
    let (authority, path) = rest.split_once('/').expect("a path");
    assert_eq!(path, "v1/scaling", "{url}");
    let (host, port) = authority.split_once(':').expect("host:port");
    let service_name = host
        .strip_suffix(&format!(".{NAMESPACE}.svc"))
        .unwrap_or_else(|| panic!("{url}: KEDA resolves SERVICE.{NAMESPACE}.svc"));
    let service = find(&objects, "Service", service_name);
    let service_port = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"].as_u64() == port.parse().ok())
        .unwrap_or_else(|| panic!("{url}: Service {service_name} has no port {port}"));
    assert_eq!(
        container_port(container, &service_port["targetPort"]),
        admin_port,
        "{url} reaches the admin port"
    );
    let auth_name = trigger["authenticationRef"]["name"]
        .as_str()
        .expect("authenticationRef");
    let auth = find(&objects, "TriggerAuthentication", auth_name);
    assert_eq!(
        auth["spec"]["secretTargetRef"],
        serde_json::json!([{"parameter": "token", "name": secret, "key": key}])
    );
}

#[test]
fn the_etcd_statefulset_passes_only_flags_etcd_has() {
    let output = Command::new("etcd")
        .arg("--help")
        .output()
        .unwrap_or_else(|e| {
            panic!("etcd: {e}; run scripts/install-test-deps.sh (Debian's etcd-server)")
        });
    let help = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let known: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--"))
        .collect();
    assert!(known.contains(&"--initial-cluster"), "etcd --help:\n{help}");
    let objects = objects();
    let etcd = find(&objects, "StatefulSet", "etcd");
    let container = &etcd["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name"))
        .collect();
    for arg in container["args"].as_array().expect("args") {
        let arg = arg.as_str().expect("string");
        let name = arg.split_once('=').map_or(arg, |(name, _)| name);
        assert!(known.contains(&name), "etcd has no {name}");
        // Kubernetes expands $(VAR) in args from the container's env only.
        for rest in arg.split("$(").skip(1) {
            let var = rest.split(')').next().expect("$(VAR)");
            assert!(
                env.contains(&var),
                "{arg} uses $({var}), not in env {env:?}"
            );
        }
    }
}

/// The Deployment's `serve` arguments and environment, run for real: only what cannot be
/// the same here is replaced (addresses: loopback port 0; the data dir: a temp dir; the
/// etcd members: a real etcd on loopback; the pod's name and IP; the Secret's token).
#[cfg(feature = "etcd")]
#[tokio::test]
async fn the_deployments_command_line_runs_a_node_that_keeps_the_manifests_promises() {
    use common::etcd::Etcd;
    use common::{BIN, Node};

    const TOKEN: &str = "deploy-manifests-test-token";
    let objects = objects();
    let deployment = find(&objects, "Deployment", "moontide");
    let container = moontide_container(deployment);
    let flags = serve_flags(container);
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");

    let mut replaced = BTreeMap::new();
    replaced.insert("--listen", "127.0.0.1:0".to_string());
    replaced.insert("--admin", "127.0.0.1:0".to_string());
    replaced.insert("--data-dir", data_dir.display().to_string());
    replaced.insert("--store", etcd.store_url());
    let mut args = vec!["serve".to_string()];
    for (name, value) in &flags {
        args.push(match (replaced.remove(name.as_str()), value) {
            (Some(new), _) => format!("{name}={new}"),
            (None, Some(value)) => format!("{name}={value}"),
            (None, None) => name.clone(),
        });
    }
    assert!(replaced.is_empty(), "the Deployment lacks {replaced:?}");

    let mut env = BTreeMap::new();
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().expect("env name");
        let value = if let Some(value) = var["value"].as_str() {
            value.to_string()
        } else if !var["valueFrom"]["secretKeyRef"].is_null() {
            TOKEN.to_string()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "moontide-5d8f7c9b4-x2k7q".to_string(),
                Some("status.podIP") => "127.0.0.1".to_string(),
                other => panic!("{name} from {other:?}: teach this test its value"),
            }
        };
        env.insert(name.to_string(), value);
    }
    assert_eq!(
        env.get("MOONTIDE_ADMIN_TOKEN").map(String::as_str),
        Some(TOKEN)
    );

    // clap refuses an unknown flag or a bad value before it would print the help.
    let check = Command::new(BIN)
        .args(&args)
        .arg("--help")
        .output()
        .expect("moontide serve --help");
    assert!(
        check.status.success(),
        "moontide does not take the Deployment's arguments {args:?}:\n{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Every variable the Deployment sets is one `serve` reads (clap lists `[env: NAME=]`;
    // MOONTIDE_ADMIN_TOKEN is named in --store's help).
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("moontide serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for name in env.keys() {
        assert!(
            help.contains(name.as_str()),
            "`moontide serve --help` never names {name}"
        );
    }

    let mut command = Command::new(BIN);
    command.args(&args).envs(&env).env("RUST_LOG", "warn");
    let mut node = Node::start_command(command, data_dir);
    let log = dir.path().join("data.log");

    // The probes answer 200 where they point (readiness once the config is loaded).
    let address_of_port = |port: u64| {
        for (flag_name, address) in [("--admin", &node.admin), ("--listen", &node.data)] {
            if port_of(flag(&flags, flag_name)) == port {
                return address.clone();
            }
        }
        panic!("port {port} is neither --admin's nor --listen's")
    };
    let mut probes = Vec::new();
    for probe in ["readinessProbe", "livenessProbe"] {
        let http = &container[probe]["httpGet"];
        let base = address_of_port(container_port(container, &http["port"]));
        let url = format!("{base}{}", http["path"].as_str().expect("path"));
        let mut status = 0;
        for _ in 0..100 {
            status = node
                .http
                .get(&url)
                .send()
                .await
                .expect(&url)
                .status()
                .as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "{probe} {url}");
        probes.push((probe, url));
    }

    // The HPA's metric is exported, without the token (--metrics-public).
    let response = node
        .http
        .get(format!("{}/metrics", node.admin))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200, "/metrics without the token");
    let metrics = response.text().await.expect("metrics body");
    assert!(
        metrics.contains(&format!("# TYPE {HPA_METRIC} gauge")),
        "no gauge {HPA_METRIC} in /metrics:\n{metrics}"
    );

    // KEDA's URL path answers behind the token with a number at its valueLocation.
    let scaled = find(&objects, "ScaledObject", "moontide");
    let metadata = &scaled["spec"]["triggers"][0]["metadata"];
    let url = metadata["url"].as_str().expect("url");
    let path = &url[url.find("/v1/").expect("/v1/ path")..];
    let without = node
        .http
        .get(format!("{}{path}", node.admin))
        .send()
        .await
        .expect("scaling");
    assert_eq!(without.status(), 401, "{path} without the token");
    let (status, body) = node.admin_json(reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    let location = metadata["valueLocation"].as_str().expect("valueLocation");
    assert!(
        body[location].is_number(),
        "{path} has no number at {location}: {body}"
    );

    // SIGTERM: not ready while draining, then a clean exit within the grace period.
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let drain = seconds(flag(&flags, "--drain-delay"));
    node.sigterm();
    let (probe, readiness) = &probes[0];
    let mut status = Ok(200);
    for _ in 0..drain * 10 {
        status = node
            .http
            .get(readiness)
            .send()
            .await
            .map(|r| r.status().as_u16());
        if !matches!(status, Ok(200)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        matches!(status, Ok(503)),
        "{probe} after SIGTERM, within --drain-delay: {status:?}"
    );
    let mut exit = None;
    for _ in 0..grace * 10 {
        exit = node.child.try_wait().expect("try_wait");
        if exit.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = exit.unwrap_or_else(|| {
        panic!("the node still runs {grace} s after SIGTERM: the kubelet would SIGKILL it")
    });
    assert!(
        exit.success(),
        "the node's exit after SIGTERM: {exit}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
