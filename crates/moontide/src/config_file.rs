//! `moontide serve --config FILE`: the node's flags in a YAML file (a Kubernetes ConfigMap,
//! a file under /etc), one key per `serve` flag, named as the flag without its dashes:
//!
//! ```yaml
//! listen: 0.0.0.0:8080
//! store: etcd://10.0.0.5:2379,10.0.0.6:2379
//! node-ttl: 10s
//! metrics-public: true          # a switch: true sets it, false leaves it off
//! egress-allow: [10.0.0.0/8]    # a repeatable flag takes a list
//! ```
//!
//! The file is turned into flags before clap parses the command line, so every value is
//! checked exactly as the same flag would be, and the precedence is the usual one: the
//! command line, then the flag's environment variable, then the file, then the default.
//! A key that is not a `serve` flag is refused, naming the file and the key. The
//! supervisor starts the node with the same arguments, so a node restarted after a crash
//! reads the file again.

use std::ffi::OsString;
use std::path::Path;

use clap::CommandFactory;
use yaml_serde::Value;

use crate::cli::Cli;

/// The command line with `--config FILE` of `serve` replaced by the file's flags (the
/// arguments unchanged for any other command).
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(serve_at) = subcommand_position(&args).filter(|&at| args[at] == "serve") else {
        return Ok(args);
    };
    let mut rest: Vec<OsString> = Vec::new();
    let mut file = None;
    let mut tail = args[serve_at + 1..].iter();
    while let Some(arg) = tail.next() {
        if arg == "--" {
            rest.push(arg.clone());
            rest.extend(tail.by_ref().cloned());
            break;
        }
        if arg == "--config" {
            file = Some(tail.next().ok_or("--config needs a FILE")?.clone());
        } else if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            file = Some(OsString::from(path));
        } else {
            rest.push(arg.clone());
        }
    }
    let Some(file) = file else {
        return Ok(args);
    };
    let from_file = flags_of(Path::new(&file), &args)?;
    let mut expanded: Vec<OsString> = args[..=serve_at].to_vec();
    expanded.extend(from_file);
    expanded.extend(rest);
    Ok(expanded)
}

/// Where the subcommand is: the first argument that is not a global option or its value.
fn subcommand_position(args: &[OsString]) -> Option<usize> {
    let command = Cli::command();
    let takes_value: Vec<String> = command
        .get_arguments()
        .filter(|arg| arg.get_action().takes_values())
        .flat_map(|arg| {
            let long = arg.get_long().map(|l| format!("--{l}"));
            let short = arg.get_short().map(|s| format!("-{s}"));
            long.into_iter().chain(short)
        })
        .collect();
    let mut at = 1;
    while at < args.len() {
        let arg = args[at].to_string_lossy();
        if !arg.starts_with('-') {
            return Some(at);
        }
        at += if takes_value.iter().any(|flag| *flag == arg) {
            2
        } else {
            1
        };
    }
    None
}

/// The flags a config file stands for, minus those the command line or the environment
/// already sets.
fn flags_of(path: &Path, command_line: &[OsString]) -> Result<Vec<OsString>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {shown}: {e}"))?;
    let document: Value =
        yaml_serde::from_str(&text).map_err(|e| format!("--config {shown}: {e}"))?;
    let entries = match document {
        Value::Mapping(entries) => entries,
        Value::Null => return Ok(Vec::new()),
        _ => {
            return Err(format!(
                "--config {shown}: expected a mapping of serve flags"
            ));
        }
    };
    let cli = Cli::command();
    let serve = cli
        .find_subcommand("serve")
        .expect("moontide has a serve command");
    let known: Vec<&clap::Arg> = serve
        .get_arguments()
        .chain(cli.get_arguments().filter(|arg| arg.is_global_set()))
        .filter(|arg| arg.get_long().is_some())
        .collect();
    let mut flags = Vec::new();
    for (key, value) in entries {
        let Some(key) = key.as_str() else {
            return Err(format!(
                "--config {shown}: keys are flag names, got {key:?}"
            ));
        };
        let Some(arg) = known.iter().find(|arg| arg.get_long() == Some(key)) else {
            let mut names: Vec<&str> = known.iter().filter_map(|arg| arg.get_long()).collect();
            names.retain(|name| *name != "help" && *name != "config");
            names.sort_unstable();
            return Err(format!(
                "--config {shown}: unknown key `{key}` (the keys are serve's flags: {})",
                names.join(", ")
            ));
        };
        let flag = format!("--{key}");
        let on_command_line = command_line.iter().any(|given| {
            given
                .to_str()
                .is_some_and(|given| given == flag || given.starts_with(&format!("{flag}=")))
        });
        let in_environment = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if on_command_line || in_environment {
            continue;
        }
        let values = match value {
            Value::Sequence(items) => items,
            single => vec![single],
        };
        for (index, value) in values.into_iter().enumerate() {
            let path = if index > 0 {
                format!("{key}[{index}]")
            } else {
                key.to_string()
            };
            match value {
                Value::Bool(true) => flags.push(OsString::from(&flag)),
                Value::Bool(false) => {}
                Value::String(text) => flags.extend([OsString::from(&flag), text.into()]),
                Value::Number(number) => {
                    flags.extend([OsString::from(&flag), number.to_string().into()])
                }
                other => {
                    return Err(format!(
                        "--config {shown}: `{path}` must be a string, number or true/false, got {other:?}"
                    ));
                }
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn with_file(yaml: &str, command: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moontide.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut line = args(command);
        line.push("--config".into());
        line.push(path.into_os_string());
        expand(line).map(|out| {
            out.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn file_keys_become_flags_after_serve() {
        let out = with_file(
            "max-instances: 7\nmetrics-public: true\nexamples: false\negress-allow: [10.0.0.0/8, 127.0.0.1:81]\n",
            &["moontide", "--data-dir", "d", "serve"],
        )
        .unwrap();
        assert_eq!(
            out,
            [
                "moontide",
                "--data-dir",
                "d",
                "serve",
                "--max-instances",
                "7",
                "--metrics-public",
                "--egress-allow",
                "10.0.0.0/8",
                "--egress-allow",
                "127.0.0.1:81"
            ]
        );
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let out = with_file(
            "listen: 0.0.0.0:8080\nadmin: 0.0.0.0:9080\n",
            &["moontide", "serve", "--listen=127.0.0.1:1"],
        )
        .unwrap();
        assert_eq!(
            out,
            [
                "moontide",
                "serve",
                "--admin",
                "0.0.0.0:9080",
                "--listen=127.0.0.1:1"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_shapes_are_refused_by_name() {
        let error = with_file("stor: etcd://x:1\n", &["moontide", "serve"]).unwrap_err();
        assert!(error.contains("unknown key `stor`"), "{error}");
        assert!(
            error.contains("store"),
            "the known keys are listed: {error}"
        );
        let error = with_file("store: {a: 1}\n", &["moontide", "serve"]).unwrap_err();
        assert!(error.contains("`store` must be"), "{error}");
        let error = with_file("- a\n", &["moontide", "serve"]).unwrap_err();
        assert!(error.contains("expected a mapping"), "{error}");
    }

    #[test]
    fn other_commands_are_left_alone() {
        let line = args(&["moontide", "ls", "--config", "x"]);
        assert_eq!(expand(line.clone()).unwrap(), line);
    }
}
