//! A small client of the admin API, used by every command but `serve`. It prints what a
//! person wants to read and exits non-zero with the server's message on any error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use moontide_runtime::FunctionSource;
use serde_json::{Value, json};

use crate::render::{self, Output, Table};

pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    output: Output,
}

/// The admin token: `MOONTIDE_TOKEN`, else `MOONTIDE_ADMIN_TOKEN` (what a cluster's nodes
/// share), else `<data-dir>/admin.token`.
fn find_token(data_dir: &Path) -> anyhow::Result<String> {
    for variable in ["MOONTIDE_TOKEN", "MOONTIDE_ADMIN_TOKEN"] {
        if let Ok(token) = std::env::var(variable)
            && !token.trim().is_empty()
        {
            return Ok(token.trim().to_string());
        }
    }
    let path = moontide_server::token_path(data_dir);
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no admin token: set MOONTIDE_TOKEN or point --data-dir at the node's data dir ({} is not readable)",
            path.display()
        )
    })?;
    Ok(token.trim().to_string())
}

/// Maps a file name the server reports (`main.lua`) back to the local path the user gave.
type LocalName = Box<dyn Fn(&str) -> String>;

/// The files of a function given as a `.lua` file, a directory or a `.zip`.
pub(crate) fn read_function(path: &Path) -> anyhow::Result<(Value, LocalName)> {
    let display = path.display().to_string();
    if path.is_dir() {
        let mut files = serde_json::Map::new();
        collect_lua_files(path, path, &mut files)?;
        if !files.contains_key("main.lua") {
            bail!("{display} has no main.lua (the entry point of a bundle)");
        }
        let root = path.to_path_buf();
        return Ok((
            json!({ "files": files }),
            Box::new(move |file: &str| root.join(file).display().to_string()),
        ));
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {display}"))?;
    if path.extension().is_some_and(|e| e == "zip") {
        let source =
            FunctionSource::from_zip(&bytes).map_err(|e| anyhow::anyhow!("{display}: {e}"))?;
        return Ok((
            json!({ "files": source.files }),
            Box::new(move |file: &str| format!("{display}!{file}")),
        ));
    }
    let text = String::from_utf8(bytes).with_context(|| format!("{display} is not UTF-8 text"))?;
    Ok((
        json!({ "source": text }),
        Box::new(move |_: &str| display.clone()),
    ))
}

fn collect_lua_files(
    root: &Path,
    dir: &Path,
    files: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_lua_files(root, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "lua") {
            let relative = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.insert(relative, Value::String(text));
        }
    }
    Ok(())
}

impl Client {
    pub fn new(base: &str, data_dir: &Path, output: Output) -> anyhow::Result<Client> {
        let _ = rustls_provider();
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token: find_token(data_dir)?,
            http: reqwest::Client::builder()
                .build()
                .context("building the HTTP client")?,
            output,
        })
    }

    /// With `--output json`, prints the admin API's answer and returns `true`.
    fn printed_as_json(&self, value: &Value) -> anyhow::Result<bool> {
        if self.output != Output::Json {
            return Ok(false);
        }
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(true)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let response = builder.send().await.with_context(|| {
            format!(
                "cannot reach the admin API at {} (is `moontide serve` running?)",
                self.base
            )
        })?;
        let status = response.status();
        let body = response.bytes().await.context("reading the response")?;
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
        };
        Ok((status, value))
    }

    /// Prints an API error and returns the failure exit code.
    fn fail(value: &Value) -> ExitCode {
        let error = &value["error"];
        let message = error["message"].as_str().unwrap_or("request failed");
        let code = error["code"].as_str().unwrap_or("error");
        eprintln!("error: {message} ({code})");
        if let Some(path) = error["details"]["path"].as_str().filter(|p| !p.is_empty()) {
            eprintln!("  at: {path}");
        }
        if let Some(request_id) = error["details"]["request_id"].as_str() {
            eprintln!("  request id: {request_id}");
        }
        ExitCode::FAILURE
    }

    /// `PUT path` with a JSON body: the status and the answer.
    pub async fn put(
        &self,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        self.send(self.request(reqwest::Method::PUT, path).json(body))
            .await
    }

    /// `GET path`: the status and the answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn exists(&self, name: &str) -> anyhow::Result<bool> {
        let (status, _) = self
            .send(self.request(reqwest::Method::GET, &format!("/v1/functions/{name}")))
            .await?;
        Ok(status.is_success())
    }

    pub async fn deploy(
        &self,
        name: &str,
        path: &Path,
        config: Value,
        wait_cluster: bool,
    ) -> anyhow::Result<ExitCode> {
        let (mut body, local_name) = read_function(path)?;
        body["config"] = config;
        let query = if wait_cluster { "?wait=cluster" } else { "" };
        let (status, value) = self
            .send(
                self.request(
                    reqwest::Method::PUT,
                    &format!("/v1/functions/{name}{query}"),
                )
                .json(&body),
            )
            .await?;
        if status.is_success() {
            let cluster = &value["cluster"];
            let everywhere = !wait_cluster || cluster["complete"] == true;
            if !self.printed_as_json(&value)? {
                println!("deployed {name} version {}", value["version"]);
                if wait_cluster && everywhere {
                    let nodes = cluster["served_by"].as_array().map_or(0, Vec::len);
                    println!("served by every live node ({nodes})");
                }
            }
            if !everywhere {
                let lagging: Vec<String> = cluster["lagging"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|node| {
                        format!(
                            "{} (at revision {})",
                            render::cell(&node["name"]),
                            node["revision"]
                        )
                    })
                    .collect();
                let why = match cluster["error"].as_str() {
                    Some(error) => format!("the node registry could not be read: {error}"),
                    None => format!("not yet served by {}", lagging.join(", ")),
                };
                eprintln!(
                    "error: {name} version {} is stored, but {why} after {} ms",
                    value["version"], cluster["waited_ms"]
                );
                return Ok(ExitCode::FAILURE);
            }
            return Ok(ExitCode::SUCCESS);
        }
        // A syntax error, or module-level code that failed when run once at deploy.
        if value["error"]["code"] == "compile_error" || value["error"]["code"] == "init_error" {
            for error in value["error"]["details"]["errors"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let message = error["message"].as_str().unwrap_or("");
                // A broken limit (an init that timed out) names no file.
                let Some(file) = error["file"].as_str().filter(|f| !f.is_empty()) else {
                    eprintln!("{}: {message}", path.display());
                    continue;
                };
                let file = local_name(file);
                match error["line"].as_u64() {
                    Some(line) => eprintln!("{file}:{line}: {message}"),
                    None => eprintln!("{file}: {message}"),
                }
            }
            eprintln!("error: {name} was not deployed; the running version keeps serving");
            return Ok(ExitCode::FAILURE);
        }
        Ok(Self::fail(&value))
    }

    pub async fn invoke(&self, name: &str, event: String) -> anyhow::Result<ExitCode> {
        let builder = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/functions/{name}/invoke"),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(event);
        let response = builder
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = response.status();
        let body = response.bytes().await.context("reading the response")?;
        if status.is_success() {
            println!("{}", String::from_utf8_lossy(&body));
            return Ok(ExitCode::SUCCESS);
        }
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Self::fail(&value))
    }

    pub async fn list(&self) -> anyhow::Result<ExitCode> {
        let (status, value) = self
            .send(self.request(reqwest::Method::GET, "/v1/functions"))
            .await?;
        if !status.is_success() {
            return Ok(Self::fail(&value));
        }
        if self.printed_as_json(&value)? {
            return Ok(ExitCode::SUCCESS);
        }
        let mut table = Table::new(&[
            ("NAME", false),
            ("VERSION", true),
            ("LATEST", true),
            ("INSTANCES", true),
            ("ROUTE", false),
        ]);
        for f in value["functions"].as_array().into_iter().flatten() {
            table.row(vec![
                render::cell(&f["name"]),
                render::cell(&f["active_version"]),
                render::cell(&f["latest_version"]),
                render::cell(&f["live_instances"]),
                render::cell(&f["route"]),
            ]);
        }
        print!("{}", table.render());
        Ok(ExitCode::SUCCESS)
    }

    /// `moontide nodes`: the cluster's live nodes, from the registry.
    pub async fn nodes(&self) -> anyhow::Result<ExitCode> {
        let (status, value) = self
            .send(self.request(reqwest::Method::GET, "/v1/nodes"))
            .await?;
        if !status.is_success() {
            return Ok(Self::fail(&value));
        }
        if self.printed_as_json(&value)? {
            return Ok(ExitCode::SUCCESS);
        }
        let mut table = Table::new(&[
            ("NAME", false),
            ("STATE", false),
            ("REVISION", true),
            ("DATA PLANE", false),
            ("ADMIN", false),
            ("INSTANCES", true),
            ("CPU", true),
            ("DEMAND", true),
            ("VERSION", false),
            ("STARTED", false),
        ]);
        for node in value["nodes"].as_array().into_iter().flatten() {
            let load = &node["load"];
            let this = node["name"] == value["this_node"];
            table.row(vec![
                format!(
                    "{}{}",
                    render::cell(&node["name"]),
                    if this { " *" } else { "" }
                ),
                render::cell(&node["state"]),
                render::cell(&node["revision"]),
                render::cell(&node["data_plane"]),
                render::cell(&node["admin"]),
                render::cell(&load["instances"]),
                format!("{:.0}%", load["cpu"].as_f64().unwrap_or(0.0) * 100.0),
                format!("{:.2}", load["demand"].as_f64().unwrap_or(0.0)),
                render::cell(&node["version"]),
                render::time_ms(&node["started_at_ms"]),
            ]);
        }
        print!("{}", table.render());
        Ok(ExitCode::SUCCESS)
    }

    pub async fn info(&self, name: &str) -> anyhow::Result<ExitCode> {
        let (status, value) = self
            .send(self.request(reqwest::Method::GET, &format!("/v1/functions/{name}")))
            .await?;
        if !status.is_success() {
            return Ok(Self::fail(&value));
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(ExitCode::SUCCESS)
    }

    pub async fn remove(&self, name: &str) -> anyhow::Result<ExitCode> {
        let (status, value) = self
            .send(self.request(reqwest::Method::DELETE, &format!("/v1/functions/{name}")))
            .await?;
        if !status.is_success() {
            return Ok(Self::fail(&value));
        }
        if !self.printed_as_json(&value)? {
            println!("removed {name}");
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn rollback(&self, name: &str, to: Option<u64>) -> anyhow::Result<ExitCode> {
        let body = match to {
            Some(to) => json!({ "to": to }),
            None => json!({}),
        };
        let (status, value) = self
            .send(
                self.request(
                    reqwest::Method::POST,
                    &format!("/v1/functions/{name}/rollback"),
                )
                .json(&body),
            )
            .await?;
        if !status.is_success() {
            return Ok(Self::fail(&value));
        }
        if !self.printed_as_json(&value)? {
            println!(
                "{name} now serves version {} (was {})",
                value["version"], value["previous_version"]
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn versions(&self, name: &str) -> anyhow::Result<ExitCode> {
        let (status, value) = self
            .send(self.request(
                reqwest::Method::GET,
                &format!("/v1/functions/{name}/versions"),
            ))
            .await?;
        if !status.is_success() {
            return Ok(Self::fail(&value));
        }
        if self.printed_as_json(&value)? {
            return Ok(ExitCode::SUCCESS);
        }
        let mut table = Table::new(&[
            ("VERSION", true),
            ("ACTIVE", false),
            ("CREATED", false),
            ("SHA256", false),
            ("FILES", false),
        ]);
        for v in value["versions"].as_array().into_iter().flatten() {
            let files: Vec<&str> = v["files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            table.row(vec![
                render::cell(&v["version"]),
                if v["active"] == true { "*" } else { "" }.to_string(),
                render::time_ms(&v["created_at_ms"]),
                v["sha256"]
                    .as_str()
                    .unwrap_or("")
                    .get(..12)
                    .unwrap_or("")
                    .to_string(),
                files.join(","),
            ]);
        }
        print!("{}", table.render());
        Ok(ExitCode::SUCCESS)
    }

    pub async fn logs(&self, name: &str, follow: bool, tail: usize) -> anyhow::Result<ExitCode> {
        let path = format!(
            "/v1/functions/{name}/logs?tail={tail}{}",
            if follow { "&follow=1" } else { "" }
        );
        let response = self
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        if !response.status().is_success() {
            let value = response.json::<Value>().await.unwrap_or(Value::Null);
            return Ok(Self::fail(&value));
        }
        let mut stream = response.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.context("reading the log stream")?);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(record) = serde_json::from_slice::<Value>(&line) {
                    if self.output == Output::Json {
                        println!("{record}");
                        continue;
                    }
                    println!(
                        "{} {:<5} v{} {} {}",
                        render::time_ms(&record["ts_ms"]),
                        record["level"].as_str().unwrap_or(""),
                        record["version"],
                        record["request_id"].as_str().unwrap_or("-"),
                        record["message"].as_str().unwrap_or(""),
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// reqwest is built without a default crypto provider; install ring's (idempotent).
fn rustls_provider() -> bool {
    moontide_runtime::install_crypto_provider()
}
