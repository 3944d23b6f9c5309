//! One sandboxed Luau state serving one version of one function, one call at a time.
//!
//! An instance is created from a [`CompiledFunction`] (bytecode, no parsing), runs the
//! module-level init code once, and keeps the handler it returned. Each call sets the
//! limits first (deadline, timeslice), runs the handler in a coroutine driven by the
//! caller's async task, and classifies failures into their own error kinds. An instance
//! that broke a limit is marked broken: the pool discards it instead of reusing it.
//!
//! State a call leaves in the instance (module-level tables, globals) is seen by later
//! calls of the same instance — of the same function version only, as in Lambda. Keep it
//! a cache.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use mlua::{Function, Lua, Table, Value};

use crate::clock;
use crate::compile::CompiledFunction;
use crate::contract::{self, HttpRequest, HttpResponse};
use crate::engine::Engine;
use crate::limits::Limits;
use crate::modules::json;
use crate::modules::log::EmitLog;
use crate::sandbox::{self, CallState, LimitHit, SandboxSpec};

/// Severity of a function log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where a function's log lines go (`print`, `log.*`, `ctx.log`, and its errors).
pub trait LogSink: Send + Sync + 'static {
    fn log(&self, level: LogLevel, request_id: &str, message: &str);
}

/// Why one call failed. Each limit has its own kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The wall-clock budget ran out (in Lua code or while waiting on I/O).
    #[error("function timed out")]
    Timeout,
    /// The instance's memory cap was reached and the error was not handled in Lua.
    #[error("memory limit exceeded")]
    MemoryLimit,
    /// The handler raised an error (message with traceback, for the log only).
    #[error("{0}")]
    Runtime(String),
    /// The handler returned something that is not a valid result.
    #[error("invalid result: {0}")]
    BadResult(String),
}

impl CallError {
    /// The label used in logs and in `moontide_function_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::MemoryLimit => "memory",
            CallError::Runtime(_) => "runtime",
            CallError::BadResult(_) => "result",
        }
    }
}

/// Why an instance could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    /// Building the Lua state failed (out of memory under the cap, or a host bug).
    #[error("creating the Lua state: {0}")]
    Setup(String),
    /// The init phase (module-level code of main.lua) failed.
    #[error("init failed: {0}")]
    Init(CallError),
    /// main.lua did not return a function.
    #[error("main.lua must return the handler function, got {0}")]
    NoHandler(&'static str),
}

impl InstanceError {
    pub fn kind(&self) -> &'static str {
        match self {
            InstanceError::Setup(_) => "setup",
            InstanceError::Init(error) => error.kind(),
            InstanceError::NoHandler(_) => "init",
        }
    }
}

/// Who an instance is and under what rules it runs.
#[derive(Clone)]
pub struct InstanceSpec {
    pub function_name: Arc<str>,
    pub version: u64,
    pub limits: Limits,
    /// The function's environment (secrets): `ctx.env` and `os.getenv`.
    pub env: Arc<BTreeMap<String, String>>,
    pub log: Arc<dyn LogSink>,
}

/// A live, sandboxed instance of one function version.
pub struct Instance {
    lua: Lua,
    handler: Function,
    ctx: Table,
    state: Rc<CallState>,
    emit_log: EmitLog,
    limits: Limits,
    broken: bool,
}

impl Instance {
    /// Builds the state and runs the init phase under the function's limits.
    pub async fn new(
        engine: &Engine,
        function: &Arc<CompiledFunction>,
        spec: &InstanceSpec,
    ) -> Result<Instance, InstanceError> {
        let sandbox = sandbox::build(SandboxSpec {
            engine,
            function,
            limits: spec.limits,
            env: &spec.env,
            log: spec.log.clone(),
        })
        .map_err(|e| match classify(&e, None) {
            CallError::MemoryLimit => InstanceError::Init(CallError::MemoryLimit),
            _ => InstanceError::Setup(e.to_string()),
        })?;
        let ctx = build_ctx(&sandbox.lua, spec, &sandbox.state, &sandbox.emit_log)
            .map_err(|e| InstanceError::Setup(e.to_string()))?;
        let mut instance = Instance {
            lua: sandbox.lua,
            handler: sandbox.main.clone(),
            ctx,
            state: sandbox.state,
            emit_log: sandbox.emit_log,
            limits: spec.limits,
            broken: false,
        };
        let init = sandbox.main;
        let result = instance
            .run(|| init.call_async::<Value>(()), "init")
            .await
            .map_err(InstanceError::Init)?;
        match result {
            Value::Function(handler) => {
                instance.handler = handler;
                Ok(instance)
            }
            other => Err(InstanceError::NoHandler(other.type_name())),
        }
    }

    /// Direct invocation: `payload` is the event; the result is the handler's return value
    /// as JSON text (`null` for `nil`).
    pub async fn invoke_json(
        &mut self,
        payload: &serde_json::Value,
        request_id: &str,
    ) -> Result<Vec<u8>, CallError> {
        let event = json::json_to_lua(&self.lua, payload).map_err(|e| classify(&e, None))?;
        let value = self.call(event, request_id).await?;
        contract::direct_result_json(&value).map_err(|e| self.bad_result(e))
    }

    /// HTTP trigger: the event is an API Gateway proxy event (v1); the result becomes the
    /// response per DESIGN.md §1.
    pub async fn invoke_http(
        &mut self,
        request: &HttpRequest<'_>,
    ) -> Result<HttpResponse, CallError> {
        let event = contract::http_event(&self.lua, request).map_err(|e| classify(&e, None))?;
        let value = self.call(Value::Table(event), request.request_id).await?;
        contract::http_response(value).map_err(|e| self.bad_result(e))
    }

    /// `true` if the instance broke a limit and must not serve another call.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Bytes the Lua state holds now.
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }

    async fn call(&mut self, event: Value, request_id: &str) -> Result<Value, CallError> {
        self.ctx
            .raw_set("request_id", request_id)
            .map_err(|e| classify(&e, None))?;
        let handler = self.handler.clone();
        let ctx = self.ctx.clone();
        self.run(
            move || handler.call_async::<Value>((event, ctx)),
            request_id,
        )
        .await
    }

    /// Runs one coroutine under the limits, and turns every failure into its kind. Errors
    /// go to the function log, tagged with the request id.
    async fn run<F>(
        &mut self,
        start: impl FnOnce() -> F,
        request_id: &str,
    ) -> Result<Value, CallError>
    where
        F: std::future::Future<Output = mlua::Result<Value>>,
    {
        let timeout = self.limits.timeout;
        let deadline = clock::now_ms() + timeout.as_millis() as u64;
        self.state.begin(request_id, deadline);
        // Until the call completes the instance counts as broken: if the caller abandons
        // the future midway (client gone), the coroutine is left suspended and the
        // instance must not be reused.
        self.broken = true;
        let outcome = tokio::time::timeout(timeout + Duration::from_millis(1), start()).await;
        let limit_hit = self.state.limit_hit.get();
        self.state.end();
        let result = match (outcome, limit_hit) {
            (_, Some(LimitHit::Timeout)) | (Err(_), _) => Err(CallError::Timeout),
            (Ok(Ok(value)), None) => Ok(value),
            (Ok(Err(error)), None) => Err(classify(&error, Some(&self.lua))),
        };
        self.broken = matches!(result, Err(CallError::Timeout | CallError::MemoryLimit));
        if let Err(error) = &result {
            (self.emit_log)(crate::LogLevel::Error, &format!("call failed: {error}"));
        }
        result
    }

    fn bad_result(&self, message: String) -> CallError {
        let error = CallError::BadResult(message);
        (self.emit_log)(crate::LogLevel::Error, &format!("call failed: {error}"));
        error
    }
}

/// `ctx`: built once per instance; `request_id` is set before each call.
fn build_ctx(
    lua: &Lua,
    spec: &InstanceSpec,
    state: &Rc<CallState>,
    emit_log: &EmitLog,
) -> mlua::Result<Table> {
    let ctx = lua.create_table_with_capacity(0, 6)?;
    ctx.raw_set("function_name", &*spec.function_name)?;
    ctx.raw_set("version", spec.version)?;
    ctx.raw_set("request_id", "")?;
    let env = lua.create_table_from(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    env.set_readonly(true);
    ctx.raw_set("env", env)?;
    let remaining = state.clone();
    ctx.raw_set(
        "remaining_ms",
        lua.create_function(move |_, _self: Value| Ok(remaining.remaining_ms()))?,
    )?;
    let emit = emit_log.clone();
    ctx.raw_set(
        "log",
        crate::modules::log::module(lua, emit)?.raw_get::<Function>("info")?,
    )?;
    Ok(ctx)
}

/// Maps an mlua error to its kind. A runtime error's message keeps the traceback when Lua
/// gives one.
fn classify(error: &mlua::Error, lua: Option<&Lua>) -> CallError {
    let _ = lua;
    match error {
        mlua::Error::MemoryError(_) => CallError::MemoryLimit,
        mlua::Error::CallbackError { cause, traceback } => match classify(cause, None) {
            CallError::Runtime(message) => CallError::Runtime(format!("{message}\n{traceback}")),
            other => other,
        },
        mlua::Error::WithContext { cause, .. } => classify(cause, None),
        other => CallError::Runtime(other.to_string()),
    }
}
