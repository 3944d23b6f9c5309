//! Known Luau VM crashes (`tests/hostile/vm_crash/*.lua`) run in child processes: with
//! the guards of `moontide_runtime::guards` each must answer its expected result and exit
//! normally; without them (`MOONTIDE_UNSAFE_DISABLE_BUILTIN_GUARDS=1`) each must still
//! die by a signal. When one no longer crashes unguarded, the Luau in use has fixed the
//! bug: drop its guard and this expectation together.
//!
//! A crash cannot be observed from inside the process that suffers it, so the test
//! re-executes its own binary, running only `child_runs_one_reproduction` with the file to
//! run in `VM_CRASH_REPRO`.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use moontide_runtime::{
    Engine, EngineConfig, FunctionSource, Instance, InstanceSpec, Limits, LogLevel, LogSink,
    UnitKind, compile, guards,
};

const REPRO_ENV: &str = "VM_CRASH_REPRO";
/// The child prints its result after this marker, so the harness's own output is ignored.
const RESULT_MARKER: &str = "vm-crash-result: ";

fn reproductions() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile/vm_crash");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/hostile/vm_crash exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "lua"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no reproductions in {}", dir.display());
    files
}

fn expected_result(source: &str) -> &str {
    source
        .lines()
        .take_while(|line| line.starts_with("--"))
        .find_map(|line| line.strip_prefix("-- result: "))
        .expect("a reproduction states its `-- result: ` line")
}

fn run_child(repro: &Path, guarded: bool) -> std::process::Output {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", "child_runs_one_reproduction", "--nocapture"])
        .env(REPRO_ENV, repro);
    if guarded {
        command.env_remove(guards::DISABLE_GUARDS_ENV);
    } else {
        command.env(guards::DISABLE_GUARDS_ENV, "1");
    }
    command.output().expect("the child starts")
}

#[test]
fn guarded_reproductions_answer_and_exit_normally() {
    for repro in reproductions() {
        let source = std::fs::read_to_string(&repro).unwrap();
        let output = run_child(&repro, true);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            output.status.signal(),
            None,
            "{}: the guarded child died by a signal\n{stdout}",
            repro.display()
        );
        let result = stdout
            .lines()
            .find_map(|line| line.strip_prefix(RESULT_MARKER))
            .unwrap_or_else(|| panic!("{}: no result\n{stdout}", repro.display()));
        assert_eq!(result, expected_result(&source), "{}", repro.display());
    }
}

#[test]
fn unguarded_reproductions_still_crash_the_vm() {
    for repro in reproductions() {
        let output = run_child(&repro, false);
        assert!(
            output.status.signal().is_some(),
            "{} no longer crashes an unguarded VM (exit {:?}): upstream fixed it; remove its \
             guard and this reproduction\n{}",
            repro.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

/// The child: runs the reproduction named by `VM_CRASH_REPRO` in a real instance with
/// production limits and prints its result. Does nothing when run as a normal test.
#[tokio::test(flavor = "current_thread")]
async fn child_runs_one_reproduction() {
    let Some(path) = std::env::var_os(REPRO_ENV) else {
        return;
    };
    let source = std::fs::read_to_string(&path).unwrap();
    let compiled = Arc::new(compile(&FunctionSource::single(source)).expect("compiles"));
    let engine = Engine::new(&EngineConfig::default()).expect("engine");
    let spec = InstanceSpec {
        function_name: Arc::from("repro"),
        version: 1,
        limits: Limits {
            timeout: Duration::from_secs(30),
            ..Limits::default()
        },
        env: Arc::new(BTreeMap::new()),
        log: Arc::new(Discard),
        kind: UnitKind::Function,
        egress: moontide_runtime::FunctionEgress::none(),
    };
    let instance = Instance::new(&engine, &compiled, &spec)
        .await
        .expect("instance");
    let result = instance
        .invoke_json(&serde_json::json!({}), "repro")
        .await
        .expect("the reproduction's call succeeds");
    let result: serde_json::Value = serde_json::from_slice(&result).expect("JSON result");
    let text = match result {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    };
    println!("{RESULT_MARKER}{text}");
}
