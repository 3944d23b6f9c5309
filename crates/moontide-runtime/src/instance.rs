//! One sandboxed Luau state serving one version of one function.
//!
//! An instance is created from a [`CompiledFunction`] (bytecode, no parsing), runs the
//! module-level init code once, and keeps the handler it returned. Each call runs the
//! handler in its own coroutine driven by the caller's async task, under its own limits
//! (deadline, timeslice; see [`CallFrame`]), and classifies failures into their own error
//! kinds. An instance that broke a limit is marked broken: the pool discards it instead of
//! reusing it.
//!
//! Calls may overlap on one instance (a function's `concurrency` above 1): each is a
//! coroutine of the same state, resumed by its own task on the instance's thread, so only
//! one runs at a time and they interleave where they wait (I/O, timeslices). Each call
//! keeps its own deadline, request id and `ctx`; the memory cap is the instance's, shared.
//!
//! State a call leaves in the instance (module-level tables, globals) is seen by later
//! calls of the same instance — of the same function version only, as in Lambda. Keep it
//! a cache.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, Table, Value};

use moontide_supervisor::recorder;

use crate::clock;
use crate::compile::{CompileError, CompiledFunction};
use crate::contract::{self, HttpRequest, HttpResponse, OutputError};
use crate::engine::{Engine, FunctionEgress};
use crate::fairness::{self, Seat};
use crate::limits::Limits;
use crate::modules::json;
use crate::modules::log::EmitLog;
use crate::plugin::PluginPhases;
use crate::sandbox::{self, CallFrame, CallState, LimitHit, MemoryCap, SandboxSpec};
use crate::watchdog::Watched;

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
    /// The handler (or a plugin phase) returned something that is not a valid result, or
    /// a result over an output cap (its kind says which: [`OutputError::kind`]).
    #[error("invalid result: {0}")]
    BadResult(OutputError),
    /// The call ran longer than its blocking cap inside one C function (a pattern match,
    /// a sort), where it cannot yield, on a thread that serves other calls.
    #[error("function held its thread for {0} ms without yielding")]
    Blocking(u64),
}

impl CallError {
    /// Every kind [`CallError::kind`] can name.
    pub const KINDS: [&'static str; 9] = [
        "timeout",
        "memory",
        "runtime",
        "blocking",
        OutputError::KINDS[0],
        OutputError::KINDS[1],
        OutputError::KINDS[2],
        OutputError::KINDS[3],
        OutputError::KINDS[4],
    ];

    /// The label used in logs and in `moontide_function_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::MemoryLimit => "memory",
            CallError::Runtime(_) => "runtime",
            CallError::BadResult(error) => error.kind(),
            CallError::Blocking(_) => "blocking",
        }
    }
}

/// The request id of an init that no call asked for (pre-warming, `min`).
pub const INIT_REQUEST_ID: &str = "init";

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
    /// A plugin's main.lua did not return a table of phase functions.
    #[error("{0}")]
    BadPlugin(String),
}

impl InstanceError {
    pub fn kind(&self) -> &'static str {
        match self {
            InstanceError::Setup(_) => "setup",
            InstanceError::Init(error) => error.kind(),
            InstanceError::NoHandler(_) | InstanceError::BadPlugin(_) => "init",
        }
    }

    /// Where and why the init failed, in the shape of a syntax error (a deploy refuses
    /// both alike): the file and line of the error's own position (`lib.lua:3: boom`),
    /// else of the innermost frame of the bundle in its traceback (an error raised by a
    /// built-in, such as `require` of a missing module, names no position itself); the
    /// first line of the message. A broken limit has no position (`file` empty); a
    /// return value that is not a handler (or a plugin's phase table) is `main.lua`'s.
    pub fn source_error(&self) -> CompileError {
        let unplaced = |file: &str, message: String| CompileError {
            file: file.to_string(),
            line: None,
            message,
        };
        match self {
            InstanceError::Init(CallError::Runtime(text)) => runtime_error_site(text),
            InstanceError::NoHandler(_) | InstanceError::BadPlugin(_) => {
                unplaced(crate::compile::MAIN_FILE, self.to_string())
            }
            InstanceError::Init(error) => unplaced("", format!("init failed: {error}")),
            InstanceError::Setup(message) => unplaced("", message.clone()),
        }
    }
}

/// `file:line: rest` at the start of `text`, when `file` names a bundle file (`.lua`).
fn split_site(text: &str) -> Option<(&str, u32, &str)> {
    let (file, rest) = text.split_once(".lua:")?;
    if file.is_empty() || file.contains(char::is_whitespace) || file.contains(['[', '"']) {
        return None;
    }
    let (line, rest) = rest.split_once(':')?;
    let line = line.parse().ok()?;
    Some((&text[..file.len() + 4], line, rest.trim_start()))
}

/// The site and first line of a runtime error's message (with its traceback).
fn runtime_error_site(text: &str) -> CompileError {
    let text = text.strip_prefix("runtime error: ").unwrap_or(text);
    let first = text.lines().next().unwrap_or_default();
    if let Some((file, line, message)) = split_site(first) {
        return CompileError {
            file: file.to_string(),
            line: Some(line),
            message: message.to_string(),
        };
    }
    // Traceback frames read `\tmain.lua:1: in function <main.lua:1>`, innermost first.
    let frame = text
        .lines()
        .skip(1)
        .find_map(|frame| split_site(frame.trim_start()));
    CompileError {
        file: frame.map_or_else(String::new, |(file, _, _)| file.to_string()),
        line: frame.map(|(_, line, _)| line),
        message: first.to_string(),
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
    /// What main.lua returns: a handler or a plugin's phase table.
    pub kind: UnitKind,
    /// The function's own egress allowlist, on top of the node's (see [`crate::egress`]).
    pub egress: Arc<FunctionEgress>,
}

/// What kind of deployable unit an instance runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnitKind {
    /// main.lua returns the handler function (DESIGN.md §1).
    #[default]
    Function,
    /// main.lua returns a table of phase functions (see [`crate::plugin`]).
    Plugin,
}

/// What an instance calls: a function's handler or a plugin's phases.
pub(crate) enum Entry {
    Handler(Function),
    Plugin(PluginPhases),
}

/// A live, sandboxed instance of one function version.
pub struct Instance {
    pub(crate) lua: Lua,
    pub(crate) entry: Entry,
    /// The `ctx` of a call that has the instance to itself (most calls: no table made).
    ctx: Table,
    /// A pristine `ctx`, copied for a call that overlaps another.
    pub(crate) ctx_template: Table,
    event_keys: contract::EventKeys,
    state: Rc<CallState>,
    pub(crate) emit_log: EmitLog,
    pub(crate) limits: Limits,
    broken: Cell<bool>,
    calls_in_flight: Cell<u32>,
    last_call: Cell<CallStats>,
    /// The function version, for the flight recorder (`moontide_supervisor::recorder`).
    function_name: Arc<str>,
    version: u64,
}

/// What the last call cost its thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Wall time spent in the call's resumes, excluding waits (includes time the kernel
    /// gave the thread's core to other threads).
    pub running: Duration,
    /// Thread CPU time of the resumes after the call first used up a timeslice. Short
    /// calls never pay for reading the CPU clock (a system call); a call that is still
    /// running after a slice is measured exactly, so preemption by the kernel cannot make
    /// a short call look long.
    pub cpu_after_first_slice: Duration,
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// When a call times out, on the coarse clock, kept ticking until the host has converted
/// the call's result: that host work runs after the interrupt stopped watching the call,
/// and checks the deadline itself ([`Instance::converting_output`]).
pub(crate) struct CallDeadline {
    ms: u64,
    _ticking: clock::Ticking,
}

impl Instance {
    /// Builds the state and runs the init phase under the function's limits. Its log
    /// lines carry the request id `init` (see [`Instance::new_for`]).
    pub async fn new(
        engine: &Engine,
        function: &Arc<CompiledFunction>,
        spec: &InstanceSpec,
    ) -> Result<Instance, InstanceError> {
        Instance::new_for(engine, function, spec, INIT_REQUEST_ID).await
    }

    /// [`Instance::new`] for the call `request_id`, whose arrival made the instance: the
    /// init's log lines (its `print`s, and why it failed) carry that id, the one the client
    /// is told to look for when the init fails.
    pub async fn new_for(
        engine: &Engine,
        function: &Arc<CompiledFunction>,
        spec: &InstanceSpec,
        request_id: &str,
    ) -> Result<Instance, InstanceError> {
        let sandbox = sandbox::build(SandboxSpec {
            engine,
            function_name: &spec.function_name,
            function,
            egress: &spec.egress,
            limits: spec.limits,
            env: &spec.env,
            log: spec.log.clone(),
        })
        .map_err(|e| match classify(&e) {
            CallError::MemoryLimit => InstanceError::Init(CallError::MemoryLimit),
            _ => InstanceError::Setup(e.to_string()),
        })?;
        let ctx_template = build_ctx(&sandbox.lua, spec, &sandbox.state, &sandbox.emit_log)
            .map_err(|e| InstanceError::Setup(e.to_string()))?;
        let ctx = copy_table(&sandbox.lua, &ctx_template)
            .map_err(|e| InstanceError::Setup(e.to_string()))?;
        let event_keys = contract::EventKeys::new(&sandbox.lua)
            .map_err(|e| InstanceError::Setup(e.to_string()))?;
        let mut instance = Instance {
            lua: sandbox.lua,
            entry: Entry::Handler(sandbox.main.clone()),
            ctx,
            ctx_template,
            event_keys,
            state: sandbox.state,
            emit_log: sandbox.emit_log,
            limits: spec.limits,
            broken: Cell::new(false),
            calls_in_flight: Cell::new(0),
            last_call: Cell::new(CallStats::default()),
            function_name: spec.function_name.clone(),
            version: spec.version,
        };
        let init = sandbox.main;
        let result = instance
            .run(|| init.call_async::<Value>(()), request_id)
            .await
            .map_err(InstanceError::Init)?;
        let entry = match (spec.kind, result) {
            (UnitKind::Plugin, result) => PluginPhases::from_value(result)
                .map(Entry::Plugin)
                .map_err(InstanceError::BadPlugin),
            (UnitKind::Function, Value::Function(handler)) => Ok(Entry::Handler(handler)),
            // Lua has one number type; mlua reports integral ones as "integer".
            (UnitKind::Function, Value::Integer(_)) => Err(InstanceError::NoHandler("number")),
            (UnitKind::Function, other) => Err(InstanceError::NoHandler(other.type_name())),
        };
        match entry {
            Ok(entry) => {
                instance.entry = entry;
                Ok(instance)
            }
            Err(error) => {
                // Lua errors were logged by `run`; a wrong return value is logged here.
                instance.state.request_id.replace(Rc::from(request_id));
                instance
                    .emit_log
                    .emit(crate::LogLevel::Error, &format!("init failed: {error}"));
                Err(error)
            }
        }
    }

    /// Direct invocation: `payload` is the event; the result is the handler's return value
    /// as JSON text (`null` for `nil`).
    pub async fn invoke_json(
        &self,
        payload: &serde_json::Value,
        request_id: &str,
    ) -> Result<Vec<u8>, CallError> {
        let event = json::json_to_lua(&self.lua, payload).map_err(|e| classify(&e))?;
        let deadline = self.deadline_from_now();
        let value = self.call(event, request_id).await?;
        self.converting_output(deadline, |check_limits| {
            contract::direct_result_json(&value, self.limits.response_body_bytes, check_limits)
        })?
        .map_err(|e| self.bad_result(e))
    }

    /// HTTP trigger: the event is an API Gateway proxy event (v1); the result becomes the
    /// response per DESIGN.md §1.
    pub async fn invoke_http(&self, request: &HttpRequest<'_>) -> Result<HttpResponse, CallError> {
        let event =
            contract::http_event(&self.lua, &self.event_keys, request).map_err(|e| classify(&e))?;
        let deadline = self.deadline_from_now();
        let value = self.call(Value::Table(event), request.request_id).await?;
        let converted = self.converting_output(deadline, |check_limits| {
            contract::http_response(value, &self.limits, check_limits)
        })?;
        self.converted(converted, "result")
    }

    /// The deadline of a call starting now, taken before the call for the host work on its
    /// result (see [`Instance::converting_output`]).
    pub(crate) fn deadline_from_now(&self) -> CallDeadline {
        // Started before `run` starts its own: the clock keeps ticking between the call and
        // its conversion instead of parking and waking again.
        let ticking = clock::Ticking::start();
        CallDeadline {
            ms: clock::now_ms() + self.limits.timeout.as_millis() as u64,
            _ticking: ticking,
        }
    }

    /// Runs host work on what this function's code returned (result conversion):
    ///
    /// - with the flight recorder naming this function version: a crash there is the
    ///   tenant's doing as much as one inside its Lua, and must count toward its
    ///   quarantine (building the event is not: its input is the client's);
    /// - under the limits that still hold, which the interrupt no longer watches: the
    ///   call's `deadline` (from [`Instance::deadline_from_now`]) and the
    ///   blocking cap, counted from now. `work` gets them as a [`json::LimitCheck`] to call
    ///   as it walks (a result of shared sub-tables, or of tables with many empty slots,
    ///   can make a long walk out of little memory).
    ///
    /// `Err` is the limit the work broke (logged as a call's broken limit is); `Ok` is
    /// what the work returned.
    pub(crate) fn converting_output<R>(
        &self,
        deadline: CallDeadline,
        work: impl FnOnce(json::LimitCheck<'_>) -> Result<R, OutputError>,
    ) -> Result<Result<R, OutputError>, CallError> {
        let _running = recorder::running(&self.function_name, self.version);
        let deadline_ms = deadline.ms;
        let started_ms = clock::now_ms();
        let blocking_cap_ms = self.state.blocking_cap_ms.get();
        let broke = Cell::new(None);
        let check_limits = || {
            let now = clock::now_ms();
            let error = if now >= deadline_ms {
                CallError::Timeout
            } else if now.saturating_sub(started_ms) >= blocking_cap_ms {
                CallError::Blocking(blocking_cap_ms)
            } else {
                return Ok(());
            };
            broke.set(Some(error));
            Err(mlua::Error::runtime("result conversion broke a limit"))
        };
        let converted = work(&check_limits);
        match broke.take() {
            Some(error) => {
                self.emit_log.emit(
                    crate::LogLevel::Error,
                    &format!("call failed: {error} (while converting its result)"),
                );
                Err(error)
            }
            None => Ok(converted),
        }
    }

    /// A converted result: its error logged and returned as [`CallError::BadResult`]; the
    /// framing headers it dropped noted in one warning line.
    pub(crate) fn converted(
        &self,
        converted: Result<contract::Converted, OutputError>,
        what: &str,
    ) -> Result<HttpResponse, CallError> {
        let converted = converted.map_err(|e| self.bad_result(e))?;
        if !converted.dropped.is_empty() {
            self.emit_log
                .emit(crate::LogLevel::Warn, &converted.dropped.warning(what));
        }
        Ok(converted.response)
    }

    /// Writes `message` to this unit's log under the request id of its last call: the
    /// node's verdict on something the call left behind (a plugin's `req.path` the node
    /// refuses), where the tenant looks for its errors.
    pub fn log(&self, level: crate::LogLevel, message: &str) {
        self.emit_log.emit(level, message);
    }

    /// `true` if the instance broke a limit and must not serve another call.
    pub fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// Calls running on this instance now (suspended ones included).
    pub fn calls_in_flight(&self) -> u32 {
        self.calls_in_flight.get()
    }

    /// What the call (or the init) that completed last cost its thread. Read it right
    /// after the call's future completes: no other call of the instance can end between.
    pub fn last_call(&self) -> CallStats {
        self.last_call.get()
    }

    /// Sets the timeslice after which a running call yields to its thread's I/O loop
    /// (default [`crate::sandbox::TIMESLICE_MS`]). Zero preempts at about every other
    /// safepoint (seeded, so runs repeat): tests use it to prove that forced yields never
    /// change what a program computes.
    pub fn set_timeslice(&self, slice: Duration) {
        self.state.slice_ms.set(slice.as_millis() as u64);
    }

    /// Caps how long one call may hold the thread without yielding (`None`: no cap).
    /// Threads that serve many functions set it; a thread given to long calls does not.
    pub fn set_blocking_cap(&self, cap: Option<Duration>) {
        let cap_ms = cap.map_or(u64::MAX, |cap| (cap.as_millis() as u64).max(1));
        self.state.blocking_cap_ms.set(cap_ms);
    }

    /// Bytes the Lua state holds now.
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }

    async fn call(&self, event: Value, request_id: &str) -> Result<Value, CallError> {
        // A call alone on the instance reuses its `ctx`; one that overlaps another gets
        // its own, so that each sees its own request id.
        let ctx = if self.calls_in_flight.get() == 0 {
            self.ctx.clone()
        } else {
            copy_table(&self.lua, &self.ctx_template).map_err(|e| classify(&e))?
        };
        ctx.raw_set("request_id", request_id)
            .map_err(|e| classify(&e))?;
        let Entry::Handler(handler) = &self.entry else {
            return Err(self.bad_result("a plugin cannot be called as a function"));
        };
        let handler = handler.clone();
        self.run(
            move || handler.call_async::<Value>((event, ctx)),
            request_id,
        )
        .await
    }

    /// Runs one coroutine under the limits, and turns every failure into its kind. Errors
    /// go to the function log, tagged with the request id.
    pub(crate) async fn run<F>(
        &self,
        start: impl FnOnce() -> F,
        request_id: &str,
    ) -> Result<Value, CallError>
    where
        F: std::future::Future<Output = mlua::Result<Value>>,
    {
        let timeout = self.limits.timeout;
        let _ticking = clock::Ticking::start();
        let mut frame = CallFrame {
            deadline_ms: clock::now_ms() + timeout.as_millis() as u64,
            request_id: Rc::from(request_id),
            limit_hit: None,
        };
        // If the caller abandons the call midway (client gone), its coroutine is left
        // suspended and the instance must not be reused.
        let in_flight = InFlight::start(self);
        let lua = &self.lua;
        let memory_bytes = self.limits.memory_bytes;
        let state = self.state.clone();
        let watched = Watched::start(self.state.switch());
        let mut call = std::pin::pin!(start());
        let mut seat = Seat::new();
        let mut stats = CallStats::default();
        let mut used_a_slice = false;
        // Each resume gets a fresh timeslice: a call that yielded and waited its turn must
        // make progress when it runs again, not yield at its next interrupt (which stalled
        // calls for a second under 64 connections). A call that used up its slice waits
        // for the thread's long lane (`fairness`) before it runs again.
        let fair_call = async {
            loop {
                let step = std::future::poll_fn(|cx| {
                    state.enter(&frame);
                    // The cap is armed only while Lua code runs (see `MemoryCap`).
                    let cap = match MemoryCap::arm(lua, memory_bytes) {
                        Ok(cap) => cap,
                        Err(e) => return Poll::Ready(Step::Done(Err(e))),
                    };
                    let now = clock::now_ms();
                    state.resumed_at_ms.set(now);
                    state.before_resume();
                    state.new_slice(now);
                    fairness::note_poll();
                    let cpu_started = used_a_slice.then(thread_cpu_time);
                    let started = Instant::now();
                    // If tenant code crashes the process now, the supervisor learns who.
                    let running = recorder::running(&self.function_name, self.version);
                    let poll = call.as_mut().poll(cx);
                    drop(running);
                    drop(cap);
                    frame.limit_hit = state.limit_hit.get();
                    let ran = started.elapsed();
                    stats.running += ran;
                    if let Some(cpu_started) = cpu_started {
                        stats.cpu_after_first_slice += thread_cpu_time() - cpu_started;
                    }
                    used_a_slice |= state.slice_yielded.get();
                    match poll {
                        Poll::Ready(result) => Poll::Ready(Step::Done(result)),
                        Poll::Pending if state.slice_yielded.get() => {
                            Poll::Ready(Step::Sliced(ran))
                        }
                        Poll::Pending => {
                            // Waiting on I/O, not the CPU: let other long calls run.
                            seat.release();
                            Poll::Pending
                        }
                    }
                })
                .await;
                match step {
                    Step::Done(result) => break result,
                    Step::Sliced(ran) => seat.after_slice(ran).await,
                }
            }
        };
        let outcome = tokio::time::timeout(timeout + Duration::from_millis(1), fair_call).await;
        drop(seat);
        self.last_call.set(stats);
        drop(watched);
        let limit_hit = frame.limit_hit;
        self.state.end();
        // A transaction the call left open is rolled back now, not when the state goes.
        crate::modules::db::call_ended(
            &self.lua,
            Rc::as_ptr(&frame.request_id) as *const u8 as usize,
        );
        let result = match (outcome, limit_hit) {
            (_, Some(LimitHit::Timeout)) | (Err(_), _) => Err(CallError::Timeout),
            (_, Some(LimitHit::Blocking)) => {
                Err(CallError::Blocking(self.state.blocking_cap_ms.get()))
            }
            (Ok(Ok(value)), None) => Ok(value),
            (Ok(Err(error)), None) => Err(classify(&error)),
        };
        in_flight.completed(matches!(
            result,
            Err(CallError::Timeout | CallError::MemoryLimit | CallError::Blocking(_))
        ));
        if let Err(error) = &result {
            self.emit_log
                .emit(crate::LogLevel::Error, &format!("call failed: {error}"));
        }
        result
    }

    pub(crate) fn bad_result(&self, error: impl Into<OutputError>) -> CallError {
        let error = CallError::BadResult(error.into());
        self.emit_log
            .emit(crate::LogLevel::Error, &format!("call failed: {error}"));
        error
    }
}

/// Counts a call in its instance's calls in flight; a call dropped before it completed
/// (abandoned mid-way) breaks the instance.
struct InFlight<'a> {
    instance: &'a Instance,
    completed: bool,
}

impl<'a> InFlight<'a> {
    fn start(instance: &'a Instance) -> InFlight<'a> {
        instance
            .calls_in_flight
            .set(instance.calls_in_flight.get() + 1);
        InFlight {
            instance,
            completed: false,
        }
    }

    /// The call ended; `broke_a_limit`: the instance must not serve again.
    fn completed(mut self, broke_a_limit: bool) {
        self.completed = true;
        if broke_a_limit {
            self.instance.broken.set(true);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let calls = &self.instance.calls_in_flight;
        calls.set(calls.get() - 1);
        if !self.completed {
            self.instance.broken.set(true);
        }
    }
}

/// One poll of a call: finished, or yielded at the end of a slice that ran this long.
enum Step<T> {
    Done(T),
    Sliced(Duration),
}

/// A shallow copy of `table`.
pub(crate) fn copy_table(lua: &Lua, table: &Table) -> mlua::Result<Table> {
    let copy = lua.create_table_with_capacity(0, 6)?;
    table.for_each(|key: Value, value: Value| copy.raw_set(key, value))?;
    Ok(copy)
}

/// `ctx`'s fields, built once per instance (the template of each call's `ctx`);
/// `request_id` is set before each call.
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
pub(crate) fn classify(error: &mlua::Error) -> CallError {
    match error {
        mlua::Error::MemoryError(_) => CallError::MemoryLimit,
        mlua::Error::CallbackError { cause, traceback } => match classify(cause) {
            CallError::Runtime(message) => CallError::Runtime(format!("{message}\n{traceback}")),
            other => other,
        },
        mlua::Error::WithContext { cause, .. } => classify(cause),
        other => CallError::Runtime(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineConfig, FunctionSource, compile};
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl LogSink for Lines {
        fn log(&self, level: LogLevel, request_id: &str, message: &str) {
            self.0
                .lock()
                .push(format!("{} [{request_id}]: {message}", level.as_str()));
        }
    }

    fn spec(limits: Limits, log: Arc<Lines>) -> InstanceSpec {
        InstanceSpec {
            function_name: Arc::from("t"),
            version: 1,
            limits,
            env: Arc::new(BTreeMap::from([("K".to_string(), "v".to_string())])),
            log,
            kind: UnitKind::Function,
            egress: FunctionEgress::none(),
        }
    }

    async fn instance_with(source: &str, limits: Limits) -> (Instance, Arc<Lines>) {
        let engine = Engine::new(&EngineConfig::default()).unwrap();
        let compiled = Arc::new(compile(&FunctionSource::single(source)).unwrap());
        let lines = Arc::new(Lines::default());
        let instance = Instance::new(&engine, &compiled, &spec(limits, lines.clone()))
            .await
            .unwrap_or_else(|e| panic!("instance: {e}"));
        (instance, lines)
    }

    async fn run(source: &str) -> Result<serde_json::Value, CallError> {
        let (instance, _) = instance_with(source, Limits::default()).await;
        let out = instance.invoke_json(&serde_json::json!({}), "r1").await?;
        Ok(serde_json::from_slice(&out).unwrap())
    }

    #[tokio::test]
    async fn host_reaching_globals_are_absent() {
        let result = run(r#"return function()
            return { io = type(io), debug = type(debug), package = type(package),
                     execute = type(os.execute), exit = type(os.exit), remove = type(os.remove),
                     loadfile = type(loadfile), dofile = type(dofile), dump = type(string.dump),
                     getenv = os.getenv("K"), missing = os.getenv("PATH") }
          end"#)
        .await
        .unwrap();
        assert_eq!(
            result,
            serde_json::json!({"io": "nil", "debug": "nil", "package": "nil", "execute": "nil",
                "exit": "nil", "remove": "nil", "loadfile": "nil", "dofile": "nil",
                "dump": "nil", "getenv": "v"})
        );
    }

    #[tokio::test]
    async fn require_finds_only_builtins_and_bundle_files() {
        for name in ["os", "io", "/etc/passwd", "./main", "@self/main", "string"] {
            let source = format!("return function() return require({name:?}) end");
            match run(&source).await {
                Err(CallError::Runtime(message)) => {
                    assert!(message.contains("not found"), "{name}: {message}")
                }
                other => panic!("require({name}) must fail, got {other:?}"),
            }
        }
        assert_eq!(
            run("local j = require('json') return function() return j == require('json') end")
                .await
                .unwrap(),
            serde_json::json!(true)
        );
    }

    #[tokio::test]
    async fn shared_libraries_and_the_string_metatable_are_read_only() {
        for attack in [
            "string.upper = function() return 'pwned' end",
            "getmetatable('').__index = { upper = function() return 'pwned' end }",
            "table.insert = nil",
            "math.pi = 3",
            "require('json').encode = nil",
        ] {
            let source = format!("return function() {attack} return 'survived' end");
            assert!(
                matches!(run(&source).await, Err(CallError::Runtime(_))),
                "{attack} must fail"
            );
        }
    }

    #[tokio::test]
    async fn binary_chunks_are_refused_and_load_is_text_only() {
        let result = run(r#"return function()
            local ok = pcall(loadstring, "\27Lua binary")
            local f, err = load("return 1 + 1")
            local g, gerr = load("return 1", "x", "b")
            return { binary_ok = ok, sum = f(), g = g == nil, gerr = gerr ~= nil, err = err == nil }
          end"#)
        .await
        .unwrap();
        assert_eq!(
            result,
            serde_json::json!({"binary_ok": false, "sum": 2, "g": true, "gerr": true, "err": true})
        );
    }

    #[tokio::test]
    async fn state_persists_within_an_instance_only() {
        let source =
            "counter = (counter or 0) return function() counter = counter + 1 return counter end";
        let (first, _) = instance_with(source, Limits::default()).await;
        assert_eq!(
            first
                .invoke_json(&serde_json::json!({}), "a")
                .await
                .unwrap(),
            b"1"
        );
        assert_eq!(
            first
                .invoke_json(&serde_json::json!({}), "b")
                .await
                .unwrap(),
            b"2"
        );
        let (second, _) = instance_with(source, Limits::default()).await;
        assert_eq!(
            second
                .invoke_json(&serde_json::json!({}), "c")
                .await
                .unwrap(),
            b"1"
        );
    }

    #[tokio::test]
    async fn timeouts_cannot_be_caught_and_break_the_instance() {
        let limits = Limits {
            timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        let (instance, lines) = instance_with(
            "return function() while true do pcall(function() while true do end end) end end",
            limits,
        )
        .await;
        let result = instance.invoke_json(&serde_json::json!({}), "r").await;
        assert_eq!(result, Err(CallError::Timeout));
        assert!(instance.is_broken());
        assert!(
            lines
                .0
                .lock()
                .iter()
                .any(|l| l.contains("function timed out"))
        );
    }

    /// A pattern bomb runs inside the C matcher, where the interrupt cannot yield: with a
    /// blocking cap it ends with its own kind long before its (generous) timeout; without
    /// one, only the timeout ends it.
    #[tokio::test]
    async fn the_blocking_cap_ends_a_call_that_cannot_yield() {
        const BOMB: &str = "return function()
            local s = string.rep('a', 40)
            while true do pcall(string.find, s, string.rep('a*', 20) .. 'b') end
          end";
        let limits = Limits {
            timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (capped, lines) = instance_with(BOMB, limits).await;
        capped.set_blocking_cap(Some(Duration::from_millis(20)));
        let result = capped.invoke_json(&serde_json::json!({}), "r").await;
        assert_eq!(result, Err(CallError::Blocking(20)));
        assert_eq!(result.unwrap_err().kind(), "blocking");
        assert!(capped.is_broken());
        assert!(
            lines
                .0
                .lock()
                .iter()
                .any(|l| l.contains("without yielding"))
        );

        let (uncapped, _) = instance_with(BOMB, limits).await;
        let result = uncapped.invoke_json(&serde_json::json!({}), "r").await;
        assert_eq!(result, Err(CallError::Timeout));
    }

    /// A yieldable long call never hits the blocking cap: each resume is one timeslice.
    /// Its CPU time past the first slice is what marks a function long-running.
    #[tokio::test]
    async fn the_blocking_cap_spares_calls_that_yield() {
        // Runs for 1.5 s of os.clock, three times the cap, so that it would meet the cap
        // if its slices did not end. The cap counts wall time: 500 ms (not less) so that
        // the kernel preempting the test thread mid-slice on a busy machine does not look
        // like a blocked call.
        let (instance, _) = instance_with(
            "return function()
               local start, n = os.clock(), 0
               while os.clock() - start < 1.5 do n = n + 1 end
               return n
             end",
            Limits::default(),
        )
        .await;
        instance.set_blocking_cap(Some(Duration::from_millis(500)));
        let result = instance.invoke_json(&serde_json::json!({}), "r").await;
        assert!(result.is_ok(), "{result:?}");
        assert!(
            instance.last_call().cpu_after_first_slice > Duration::ZERO,
            "it ran past its first slice, and that CPU time was measured"
        );
    }

    /// Header bytes that are not UTF-8 reach the event as ISO-8859-1 text, so a handler
    /// can always `json.encode` its event (a fuzzing find).
    #[tokio::test]
    async fn non_utf8_header_values_become_latin1_text() {
        let (instance, _) = instance_with(
            "local json = require('json')
             return function(event) return { statusCode = 200, body = json.encode(event.headers) } end",
            Limits::default(),
        )
        .await;
        let mut headers = http::HeaderMap::new();
        headers.insert("x-name", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
        headers.insert("x-utf8", http::HeaderValue::from_str("já").unwrap());
        let request = HttpRequest {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
            body: b"",
            source_ip: "127.0.0.1",
            request_id: "r",
            request_time_epoch_ms: 0,
            resource: "/",
            path_parameters: &[],
            protocol: "HTTP/1.1",
        };
        let response = instance.invoke_http(&request).await.unwrap();
        let seen: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(seen, serde_json::json!({"x-name": "café", "x-utf8": "já"}));
    }

    fn get<'a>(headers: &'a http::HeaderMap) -> HttpRequest<'a> {
        HttpRequest {
            method: "GET",
            path: "/",
            query: None,
            headers,
            body: b"",
            source_ip: "127.0.0.1",
            request_id: "r",
            request_time_epoch_ms: 0,
            resource: "/",
            path_parameters: &[],
            protocol: "HTTP/1.1",
        }
    }

    /// A result's framing headers are dropped, with one warning line per call; a result
    /// over a cap is a bad result of the cap's kind, its reason in the log, and the
    /// instance serves on.
    #[tokio::test]
    async fn output_rules_are_logged_per_call() {
        let (instance, lines) = instance_with(
            "return function(event)
               if event.path == '/flood' then
                 local h = {} for i = 1, 100000 do h['x-h' .. i] = 'v' end
                 return { statusCode = 200, headers = h }
               end
               return { statusCode = 200, body = 'b',
                        headers = { ['content-length'] = '0', connection = 'close' } }
             end",
            Limits::default(),
        )
        .await;
        let headers = http::HeaderMap::new();
        for _ in 0..2 {
            let response = instance.invoke_http(&get(&headers)).await.unwrap();
            assert!(response.headers.get("content-length").is_none());
            assert!(response.headers.get("connection").is_none());
        }
        let mut flood = get(&headers);
        flood.path = "/flood";
        let error = instance.invoke_http(&flood).await.unwrap_err();
        assert_eq!(error.kind(), "output_header_count");
        assert!(!instance.is_broken(), "a bad result keeps the instance");
        let log = lines.0.lock().clone();
        assert_eq!(
            log,
            [
                "warn [r]: result: dropped connection, content-length (framing and connection \
                 headers belong to the node, which sets them from the body it sends)",
                "warn [r]: result: dropped connection, content-length (framing and connection \
                 headers belong to the node, which sets them from the body it sends)",
                "error [r]: call failed: invalid result: more than 100 header lines",
            ]
        );
    }

    #[tokio::test]
    async fn a_direct_result_over_the_cap_is_refused() {
        let limits = Limits {
            response_body_bytes: 100,
            ..Limits::default()
        };
        let (instance, _) = instance_with(
            "return function() return { data = string.rep('x', 200) } end",
            limits,
        )
        .await;
        let error = instance
            .invoke_json(&serde_json::json!({}), "r")
            .await
            .unwrap_err();
        assert_eq!(
            error,
            CallError::BadResult(OutputError::BodyTooLarge { limit: 100 })
        );
        assert_eq!(error.kind(), "output_body");
    }

    /// A result made of shared sub-tables describes far more JSON than the state holds
    /// (65535³ strings in about 3 MB of Lua memory); encoding it stops at the result limit
    /// instead of walking gigabytes of text after the call's deadline stopped applying.
    /// Found by the `vm_surface` fuzz target (over 40 s in the encoder before the encoder
    /// was capped).
    #[tokio::test]
    async fn a_result_of_shared_subtables_stops_at_the_result_limit() {
        let limits = Limits {
            response_body_bytes: 64 << 10,
            ..Limits::default()
        };
        let (instance, _) = instance_with(
            "return function()
               return table.create(65535, table.create(65535, table.create(65535, '')))
             end",
            limits,
        )
        .await;
        let error = instance
            .invoke_json(&serde_json::json!({}), "r")
            .await
            .unwrap_err();
        assert_eq!(
            error,
            CallError::BadResult(OutputError::BodyTooLarge { limit: 64 << 10 })
        );
    }

    /// The HTTP path likewise: a table body (or a table returned as the response) of
    /// shared sub-tables is encoded only up to the body limit.
    #[tokio::test]
    async fn an_http_body_of_shared_subtables_stops_at_the_body_limit() {
        let limits = Limits {
            response_body_bytes: 64 << 10,
            ..Limits::default()
        };
        let headers = http::HeaderMap::new();
        for result in ["t", "{ statusCode = 200, body = t }"] {
            let (instance, _) = instance_with(
                &format!(
                    "return function()
                       local t = table.create(65535, table.create(65535, table.create(65535, '')))
                       return {result}
                     end"
                ),
                limits,
            )
            .await;
            let error = instance.invoke_http(&get(&headers)).await.unwrap_err();
            assert_eq!(
                error,
                CallError::BadResult(OutputError::BodyTooLarge { limit: 64 << 10 }),
                "{result}"
            );
        }
    }

    /// A result that writes little but is slow to walk (one table with a million empty
    /// slots, shared 20 000² times: `[[{},{},…],…]`, each `{}` a walk of a million slots)
    /// is converted under what is left of the call's deadline: the call times out instead
    /// of holding its thread for hours (the `vm_surface` fuzz target's second find, once
    /// the size caps were in; without the check this test hangs until nextest ends it).
    #[tokio::test]
    async fn a_result_that_is_slow_to_walk_stops_at_the_deadline() {
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (instance, lines) = instance_with(
            "return function() return table.create(20000, table.create(20000, table.create(1e6))) end",
            limits,
        )
        .await;
        let result = instance.invoke_json(&serde_json::json!({}), "r").await;
        assert_eq!(result, Err(CallError::Timeout));
        let log = lines.0.lock().join("\n");
        assert!(log.contains("while converting its result"), "{log}");
        // The instance did not break a limit inside Lua: it serves the next call.
        assert!(!instance.is_broken());
    }

    /// The HTTP path likewise, for a table returned as the body and for one returned as
    /// the response itself.
    #[tokio::test]
    async fn an_http_body_that_is_slow_to_walk_stops_at_the_deadline() {
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        for source in [
            "return function() return table.create(20000, table.create(20000, table.create(1e6))) end",
            "return function()
               local slow = table.create(20000, table.create(20000, table.create(1e6)))
               return { statusCode = 200, body = slow }
             end",
        ] {
            let (instance, _) = instance_with(source, limits).await;
            let headers = http::HeaderMap::new();
            let result = instance.invoke_http(&get(&headers)).await;
            assert_eq!(result, Err(CallError::Timeout), "{source}");
        }
    }

    /// A result that is quick to walk is converted as before, whatever is left of the
    /// deadline: the check ends only work that outlives the call's limits.
    #[tokio::test]
    async fn a_result_is_converted_within_the_deadline() {
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (instance, _) = instance_with(
            "return function() return table.create(200, table.create(10)) end",
            limits,
        )
        .await;
        let json = instance
            .invoke_json(&serde_json::json!({}), "r")
            .await
            .unwrap();
        assert_eq!(json.len(), 1 + 200 * 3 - 1 + 1);
    }

    /// `json.encode` of shared sub-tables walks far more than the state holds, in host code
    /// the interrupt cannot stop: the encoder checks the call's deadline itself, so the
    /// call ends as timed out (and a `pcall` cannot hide it) instead of running on.
    #[tokio::test]
    async fn json_encode_that_is_slow_to_walk_stops_at_the_deadline() {
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (instance, _) = instance_with(
            "local json = require('json')
             return function()
               local slow = table.create(20000, table.create(20000, table.create(1e6)))
               local ok = pcall(json.encode, slow)
               return ok
             end",
            limits,
        )
        .await;
        let result = instance.invoke_json(&serde_json::json!({}), "r").await;
        assert_eq!(result, Err(CallError::Timeout));
    }

    #[tokio::test]
    async fn memory_cap_ends_the_call() {
        let limits = Limits {
            memory_bytes: 4 << 20,
            ..Limits::default()
        };
        let (instance, _) = instance_with(
            "return function() local t = {} for i = 1, 1e9 do t[i] = i end end",
            limits,
        )
        .await;
        let result = instance.invoke_json(&serde_json::json!({}), "r").await;
        assert_eq!(result, Err(CallError::MemoryLimit));
        assert!(instance.is_broken());
    }

    #[tokio::test]
    async fn errors_carry_a_traceback_to_the_log() {
        let (instance, lines) = instance_with(
            "local function deep() error('bad thing') end\nreturn function() deep() end",
            Limits::default(),
        )
        .await;
        let result = instance.invoke_json(&serde_json::json!({}), "r").await;
        assert!(matches!(result, Err(CallError::Runtime(ref m)) if m.contains("bad thing")));
        assert!(!instance.is_broken(), "a plain error keeps the instance");
        let log = lines.0.lock().join("\n");
        assert!(log.contains("main.lua:1"), "{log}");
    }

    /// Two calls on one instance interleave where they wait, each with its own `ctx` and
    /// request id, sharing module-level state.
    #[tokio::test]
    async fn overlapping_calls_share_the_state_and_keep_their_own_ctx() {
        let (instance, lines) = instance_with(
            "local time = require('time')
             local trace = {}
             return function(event, ctx)
               table.insert(trace, event.name .. '1')
               time.sleep(event.ms)
               ctx.log('done ' .. event.name)
               table.insert(trace, event.name .. '2')
               return { id = ctx.request_id, trace = table.concat(trace, ',') }
             end",
            Limits::default(),
        )
        .await;
        let (event_a, event_b) = (
            serde_json::json!({"name": "a", "ms": 10}),
            serde_json::json!({"name": "b", "ms": 60}),
        );
        let (a, b) = tokio::join!(instance.invoke_json(&event_a, "req-a"), async {
            tokio::task::yield_now().await;
            assert_eq!(instance.calls_in_flight(), 1, "a is suspended in its sleep");
            instance.invoke_json(&event_b, "req-b").await
        });
        let a: serde_json::Value = serde_json::from_slice(&a.unwrap()).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&b.unwrap()).unwrap();
        assert_eq!(a, serde_json::json!({"id": "req-a", "trace": "a1,b1,a2"}));
        assert_eq!(
            b,
            serde_json::json!({"id": "req-b", "trace": "a1,b1,a2,b2"})
        );
        assert_eq!(instance.calls_in_flight(), 0);
        assert!(!instance.is_broken());
        let log = lines.0.lock().clone();
        assert_eq!(log, ["info [req-a]: done a", "info [req-b]: done b"]);
    }

    /// A call that runs out of time ends alone: the call it overlaps completes with its own
    /// deadline; the instance is broken only for later calls.
    #[tokio::test]
    async fn a_timeout_ends_only_its_own_call() {
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (instance, _) = instance_with(
            "local time = require('time')
             return function(event, ctx)
               if event.spin then while true do pcall(function() while true do end end) end end
               time.sleep(20)
               return ctx.request_id
             end",
            limits,
        )
        .await;
        let (spin, sleep) = (serde_json::json!({"spin": true}), serde_json::json!({}));
        let (spun, slept) = tokio::join!(
            instance.invoke_json(&spin, "spin"),
            instance.invoke_json(&sleep, "sleep"),
        );
        assert_eq!(spun, Err(CallError::Timeout));
        assert_eq!(slept.unwrap(), b"\"sleep\"");
        assert!(instance.is_broken());
    }

    /// A call abandoned mid-way (its client went away) breaks the instance: its coroutine
    /// is left suspended.
    #[tokio::test]
    async fn an_abandoned_call_breaks_the_instance() {
        let (instance, _) = instance_with(
            "local time = require('time') return function() time.sleep(1000) end",
            Limits::default(),
        )
        .await;
        let event = serde_json::json!({});
        let call = instance.invoke_json(&event, "r");
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call)
                .await
                .is_err()
        );
        assert_eq!(instance.calls_in_flight(), 0);
        assert!(instance.is_broken());
    }

    #[tokio::test]
    async fn init_must_return_a_function() {
        let engine = Engine::new(&EngineConfig::default()).unwrap();
        let compiled = Arc::new(compile(&FunctionSource::single("return 42")).unwrap());
        let error = Instance::new(&engine, &compiled, &spec(Limits::default(), Arc::default()))
            .await
            .err()
            .expect("init must fail");
        assert_eq!(error, InstanceError::NoHandler("number"));
    }

    async fn init_error(files: &[(&str, &str)], request_id: &str) -> (InstanceError, Vec<String>) {
        let engine = Engine::new(&EngineConfig::default()).unwrap();
        let mut source = FunctionSource::default();
        for (path, text) in files {
            source.files.insert(path.to_string(), text.to_string());
        }
        let compiled = Arc::new(compile(&source).unwrap());
        let lines = Arc::new(Lines::default());
        let error = Instance::new_for(
            &engine,
            &compiled,
            &spec(Limits::default(), lines.clone()),
            request_id,
        )
        .await
        .err()
        .expect("init must fail");
        let log = lines.0.lock().clone();
        (error, log)
    }

    /// A failed init names its file and line like a syntax error, whether Lua placed the
    /// error (`io.write` on a nil `io`) or a built-in raised it (`require` of a missing
    /// module: the position comes from the traceback), in main.lua or in a module.
    #[tokio::test]
    async fn a_failed_init_names_its_file_and_line() {
        let site = |e: &InstanceError| {
            let s = e.source_error();
            (s.file, s.line, s.message)
        };
        let (error, _) = init_error(
            &[(
                "main.lua",
                "local x = 1\nlocal m = require('missing')\nreturn function() end",
            )],
            "r",
        )
        .await;
        let (file, line, message) = site(&error);
        assert_eq!((file.as_str(), line), ("main.lua", Some(2)), "{message}");
        assert!(
            message.starts_with("module 'missing' not found"),
            "{message}"
        );
        assert!(!message.contains('\n'), "one line: {message}");

        let (error, _) = init_error(
            &[("main.lua", "\n\nio.write('x')\nreturn function() end")],
            "r",
        )
        .await;
        let (file, line, message) = site(&error);
        assert_eq!((file.as_str(), line), ("main.lua", Some(3)), "{message}");
        assert_eq!(message, "attempt to index nil with 'write'");

        let (error, _) = init_error(
            &[
                (
                    "main.lua",
                    "local lib = require('lib.util')\nreturn function() end",
                ),
                ("lib/util.lua", "local t = {}\n\nerror({})\nreturn t"),
            ],
            "r",
        )
        .await;
        let (file, line, message) = site(&error);
        assert_eq!(
            (file.as_str(), line),
            ("lib/util.lua", Some(3)),
            "{message}"
        );

        let (error, _) = init_error(&[("main.lua", "return 42")], "r").await;
        assert_eq!(site(&error).0, "main.lua");
        assert!(site(&error).2.contains("must return the handler"));
    }

    /// The init's failure is logged under the request id of the call that made the
    /// instance (the id its client is given), whatever the way it failed.
    #[tokio::test]
    async fn a_failed_init_is_logged_with_its_request_id() {
        let (_, log) = init_error(&[("main.lua", "error('boom')")], "req-7").await;
        assert!(
            log[0].starts_with("error [req-7]: call failed: runtime error: main.lua:1: boom"),
            "{log:?}"
        );
        let (_, log) = init_error(&[("main.lua", "print('hi') return 42")], "req-8").await;
        assert_eq!(log[0], "info [req-8]: hi");
        assert!(
            log[1].starts_with("error [req-8]: init failed: main.lua must return"),
            "{log:?}"
        );
    }

    #[test]
    fn error_sites_are_read_from_messages_and_tracebacks() {
        assert_eq!(
            split_site("main.lua:12: boom"),
            Some(("main.lua", 12, "boom"))
        );
        assert_eq!(
            split_site("lib/a-b.lua:1: x: y"),
            Some(("lib/a-b.lua", 1, "x: y"))
        );
        assert_eq!(split_site("[string \"x.lua\"]:1: boom"), None);
        assert_eq!(split_site("table: 0x1234"), None);
        let site = runtime_error_site(
            "runtime error: table: 0x1\nstack traceback:\n\t[C]: in function 'error'\n\tm.lua:4: in function <m.lua:1>",
        );
        assert_eq!(
            (site.file.as_str(), site.line, site.message.as_str()),
            ("m.lua", Some(4), "table: 0x1")
        );
    }

    /// `_VERSION` is the 5.1 Luau is a dialect of, so libraries that branch on it take
    /// their `setfenv` path (lua-resty-template: `load(code, name, "t", env)` on 5.2+,
    /// `setfenv(loadstring(code), env)` on 5.1).
    #[tokio::test]
    async fn version_is_lua_5_1() {
        let (instance, _) = instance_with(
            r#"
            local function compile(code, env)
              if _VERSION == "Lua 5.1" then
                local f = assert(loadstring(code))
                return setfenv(f, env)
              end
              return assert(load(code, "t", "t", env))
            end
            local render = compile("return greeting .. ', ' .. name", { greeting = "Hello" })
            return function(event)
              getfenv(render).name = event.name
              return { version = _VERSION, text = render() }
            end"#,
            Limits::default(),
        )
        .await;
        let out = instance
            .invoke_json(&serde_json::json!({"name": "Ada"}), "r")
            .await
            .unwrap();
        let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"version": "Lua 5.1", "text": "Hello, Ada"})
        );
    }
}
