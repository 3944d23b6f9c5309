//! `moontide apply -f moontide.yaml`: the declarative form of the admin API. The file maps
//! each kind (`upstreams`, `plugins`, `functions`, `routes`) to objects by name; each
//! object is the body the admin API's `PUT /v1/<kind>/<name>` takes, except that a
//! function or plugin may name its code with `path:` (a `.lua` file, a bundle directory or
//! a `.zip`, relative to the manifest) instead of inlining `source`.
//!
//! Objects are applied in dependency order — upstreams, plugins, functions, then the
//! routes that point at them — each with one `PUT`, so re-applying an unchanged file
//! changes nothing (a function whose code and config already serve keeps its version).
//! Apply is not one transaction: it stops at the first object the server refuses, says
//! which objects were applied before it, and prints the refused field as a path into the
//! manifest (`routes.api.paths[0]`). Objects absent from the file are left alone (there is
//! no prune: deleting is always an explicit `DELETE`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::client::{Client, read_function};

/// The manifest: objects by kind, then by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    upstreams: BTreeMap<String, Value>,
    #[serde(default)]
    plugins: BTreeMap<String, Value>,
    #[serde(default)]
    functions: BTreeMap<String, Value>,
    #[serde(default)]
    routes: BTreeMap<String, Value>,
}

/// One object to `PUT`, in apply order.
#[derive(Debug)]
struct Object {
    /// `upstreams`, `plugins`, `functions` or `routes`: the manifest key and API path.
    kind: &'static str,
    name: String,
    body: Value,
}

/// Reads and checks the manifest, resolving `path:` code references.
fn load(file: &Path) -> anyhow::Result<Vec<Object>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let manifest: Manifest = yaml_serde::from_str(&text)
        .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut objects = Vec::new();
    for (kind, entries) in [
        ("upstreams", manifest.upstreams),
        ("plugins", manifest.plugins),
        ("functions", manifest.functions),
        ("routes", manifest.routes),
    ] {
        for (name, mut body) in entries {
            let Some(fields) = body.as_object_mut() else {
                bail!("{kind}.{name}: expected a mapping of the object's fields");
            };
            // A route's `path` is its own field; a function's or plugin's names its code.
            let code_path = match kind {
                "functions" | "plugins" => fields.remove("path"),
                _ => None,
            };
            if let Some(path) = code_path {
                let Some(path) = path.as_str() else {
                    bail!("{kind}.{name}.path: expected a file or directory path");
                };
                let (code, _) = read_function(&base.join(path))
                    .with_context(|| format!("{kind}.{name}.path"))?;
                for (key, value) in code.as_object().into_iter().flatten() {
                    if fields.insert(key.clone(), value.clone()).is_some() {
                        bail!("{kind}.{name}: give either path or {key}, not both");
                    }
                }
            }
            objects.push(Object { kind, name, body });
        }
    }
    Ok(objects)
}

/// Applies the manifest: one `PUT` per object, stopping at the first refusal.
pub async fn apply(client: &Client, file: &Path) -> anyhow::Result<ExitCode> {
    let objects = load(file)?;
    if objects.is_empty() {
        println!("{}: nothing to apply", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    for (done, object) in objects.iter().enumerate() {
        let path = format!("/v1/{}/{}", object.kind, object.name);
        // What serves under this name now (made by hand, or by another manifest): a
        // replaced object is named as such, with the fields that changed.
        let before = match object.kind {
            "functions" => None,
            _ => match client.get(&path).await? {
                (status, value) if status.is_success() => Some(value),
                _ => None,
            },
        };
        let (status, answer) = client.put(&path, &object.body).await?;
        let label = format!("{}.{}", object.kind, object.name);
        if status.is_success() {
            let what = match (object.kind, status.as_u16()) {
                ("functions", _) if answer["unchanged"] == true => {
                    format!("unchanged (version {})", answer["version"])
                }
                ("functions", _) => format!("deployed version {}", answer["version"]),
                (_, 201) => "created".to_string(),
                _ => {
                    let (_, after) = client.get(&path).await?;
                    replaced(before.as_ref(), &after)
                }
            };
            println!("{label}: {what}");
            continue;
        }
        let error = &answer["error"];
        eprintln!(
            "error: {label}: {} ({})",
            error["message"].as_str().unwrap_or("refused"),
            error["code"].as_str().unwrap_or("error")
        );
        let fields = error["details"]["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["path"].as_str())
            .chain(error["details"]["path"].as_str());
        for field in fields.filter(|p| !p.is_empty()) {
            eprintln!("  at: {label}.{field}");
        }
        eprintln!(
            "applied {done} of {} objects; {label} and the {} after it were not applied",
            objects.len(),
            objects.len() - done - 1
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// How an existing object (as `GET` shows it: `{name, revision, config}`) compares with
/// what replaced it: `unchanged`, or `replaced (changed: fields)` naming the fields of its
/// config that differ.
fn replaced(before: Option<&Value>, after: &Value) -> String {
    let Some(before) = before else {
        return "applied".to_string();
    };
    let config = |object: &Value| object.get("config").cloned().unwrap_or(object.clone());
    let (before, after) = (config(before), config(after));
    let (Some(before), Some(after)) = (before.as_object(), after.as_object()) else {
        return "replaced".to_string();
    };
    let mut changed: Vec<&str> = before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .map(String::as_str)
        .collect();
    changed.sort_unstable();
    changed.dedup();
    if changed.is_empty() {
        "unchanged".to_string()
    } else {
        format!(
            "replaced the existing object (changed: {})",
            changed.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_object_names_what_changed() {
        let before = serde_json::json!({"name": "r", "revision": 4,
            "config": {"paths": ["/a/*"], "upstream": "x", "priority": 0}});
        let same = serde_json::json!({"name": "r", "revision": 5,
            "config": {"paths": ["/a/*"], "upstream": "x", "priority": 0}});
        let other = serde_json::json!({"name": "r", "revision": 6,
            "config": {"paths": ["/b/*"], "upstream": "x", "methods": ["GET"]}});
        assert_eq!(replaced(Some(&before), &same), "unchanged");
        assert_eq!(
            replaced(Some(&before), &other),
            "replaced the existing object (changed: methods, paths, priority)"
        );
        assert_eq!(replaced(None, &other), "applied");
    }

    fn manifest(yaml: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let file = dir.path().join("moontide.yaml");
        std::fs::write(&file, yaml).unwrap();
        (dir, file)
    }

    #[test]
    fn objects_come_in_dependency_order_with_code_read_from_paths() {
        let (_dir, file) = manifest(
            "routes:\n  api: {paths: [/api/*], upstream: api}\n\
             functions:\n  hello: {path: fns/hello.lua, config: {timeout: 2s}}\n\
             upstreams:\n  api: {nodes: [{address: '127.0.0.1:9'}]}\n",
            &[("fns/hello.lua", "return function() return 'hi' end")],
        );
        let objects = load(&file).unwrap();
        let order: Vec<String> = objects
            .iter()
            .map(|o| format!("{}.{}", o.kind, o.name))
            .collect();
        assert_eq!(order, ["upstreams.api", "functions.hello", "routes.api"]);
        assert_eq!(
            objects[1].body["source"],
            "return function() return 'hi' end"
        );
        assert_eq!(objects[1].body["config"]["timeout"], "2s");
        assert!(objects[1].body.get("path").is_none());

        // A route's own `path` field is passed on as is.
        let (_dir, file) = manifest("routes:\n  api: {path: /api, upstream: api}\n", &[]);
        assert_eq!(load(&file).unwrap()[0].body["path"], "/api");
    }

    #[test]
    fn mistakes_in_the_file_name_their_place() {
        let (_dir, file) = manifest("services: {}\n", &[]);
        let error = load(&file).unwrap_err().to_string();
        assert!(error.contains("unknown field `services`"), "{error}");

        let (_dir, file) = manifest("upstreams:\n  api: [1, 2]\n", &[]);
        let error = load(&file).unwrap_err().to_string();
        assert!(error.contains("upstreams.api"), "{error}");

        let (_dir, file) = manifest("functions:\n  f: {path: 7}\n", &[]);
        let error = load(&file).unwrap_err().to_string();
        assert!(error.contains("functions.f.path"), "{error}");

        let (_dir, file) = manifest("functions:\n  f: {path: missing.lua}\n", &[]);
        let error = format!("{:#}", load(&file).unwrap_err());
        assert!(error.contains("functions.f.path"), "{error}");

        let (_dir, file) = manifest(
            "functions:\n  f: {path: f.lua, source: x}\n",
            &[("f.lua", "x")],
        );
        let error = load(&file).unwrap_err().to_string();
        assert!(error.contains("either path or source"), "{error}");

        let (_dir, file) = manifest("upstreams:\n  api: {nodes: [\n", &[]);
        let error = load(&file).unwrap_err().to_string();
        assert!(
            error.contains("moontide.yaml") && error.contains("line"),
            "{error}"
        );
    }
}
