//! The Lua reference (`docs/lua-api.md`) cannot rot: every block marked `lua run` is run as
//! the body of a handler in a real sandboxed instance and must finish without an error
//! (its `assert`s are the doc's claims), and every function of every built-in module is
//! named in it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use moontide_runtime::modules::db::DbConfig;
use moontide_runtime::{
    Engine, EngineConfig, FunctionEgress, FunctionSource, Instance, InstanceSpec, Limits, LogLevel,
    LogSink, UnitKind, compile,
};

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

fn doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/lua-api.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `lua run` blocks: (line of the fence, code).
fn runnable_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, line) in doc.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```lua run" => current = Some((index + 1, String::new())),
            Some(_) if line.trim() == "```" => blocks.push(current.take().unwrap()),
            Some((_, code)) => {
                code.push_str(line);
                code.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unclosed `lua run` block");
    blocks
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        function_name: Arc::from("doc"),
        version: 1,
        limits: Limits::default(),
        env: Arc::new(BTreeMap::from([("GREETING".into(), "hello".into())])),
        log: Arc::new(Discard),
        kind: UnitKind::Function,
        egress: FunctionEgress::none(),
    }
}

/// Runs `source` (a whole chunk returning a handler) with an empty event; the handler's
/// JSON result or the error.
async fn run(engine: &Engine, source: &str) -> Result<String, String> {
    let compiled = compile(&FunctionSource::single(source)).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let instance = Instance::new(engine, &Arc::new(compiled), &spec())
        .await
        .map_err(|e| e.to_string())?;
    let result = instance
        .invoke_json(&serde_json::json!({}), "doc")
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&result).into_owned())
}

/// An engine whose `db` module keeps the `doc` function's database in a fresh directory.
fn engine() -> Engine {
    let dir = std::env::temp_dir().join(format!(
        "moontide-lua-api-doc-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    Engine::new(&EngineConfig {
        db: Some(DbConfig::new(dir)),
        ..EngineConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn every_runnable_example_of_the_lua_reference_runs() {
    moontide_runtime::install_crypto_provider();
    let doc = doc();
    let blocks = runnable_blocks(&doc);
    assert!(
        blocks.len() >= 10,
        "found {} `lua run` blocks",
        blocks.len()
    );
    let engine = engine();
    let mut failures = Vec::new();
    for (line, code) in &blocks {
        let source = format!("return function(event, ctx)\n{code}end\n");
        if let Err(error) = run(&engine, &source).await {
            // Lines of the error are the wrapper's: line 2 is the block's first.
            failures.push(format!(
                "docs/lua-api.md block at line {line} (its line N is wrapper line N+1): {error}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "current_thread")]
async fn every_function_of_every_built_in_module_is_documented() {
    moontide_runtime::install_crypto_provider();
    let engine = engine();
    let names = run(
        &engine,
        r#"
        local names = {}
        for _, module in ipairs({ "json", "crypto", "time", "shared", "log", "http", "redis", "db" }) do
          for key in pairs(require(module)) do
            names[#names + 1] = module .. "." .. key
          end
        end
        return function() return names end
        "#,
    )
    .await
    .expect("the modules load");
    let names: Vec<String> = serde_json::from_str(&names).unwrap();
    assert!(names.len() > 30, "{names:?}");
    let doc = doc();
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !doc.contains(&format!("`{name}")))
        .collect();
    assert!(missing.is_empty(), "not in docs/lua-api.md: {missing:?}");
}
