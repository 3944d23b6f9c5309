//! The Luau backend: how a tenant's Lua state is built, sandboxed and limited.
//!
//! This is the only module that knows Luau specifics (DESIGN.md §2: keep backend code in
//! one place so another backend could be added behind a feature). It builds a state from
//! the safe standard library only, replaces the globals that could reach the host
//! (`require` → built-in and bundle modules only; `print` → the function log; `load` → a
//! text-only shim over `loadstring`), then turns on Luau's sandbox mode (read-only
//! libraries, read-only string metatable, per-state global proxy) and finally the memory
//! cap.
//!
//! What a tenant cannot do here: `io`, `debug`, `os.execute/exit/remove` (Luau's `os` has
//! only `clock/date/difftime/time`), `loadfile`, `dofile`, `string.dump`, binary chunks
//! (`loadstring` only compiles text), `require` of files or C modules, or changing a shared
//! library or the string metatable. Its `http` module reaches only what the egress policy
//! allows ([`crate::egress`]: not the node itself, loopback, private ranges or metadata).

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use mlua::chunk::{ChunkMode, Compiler};
use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value, VmState};

use crate::clock;
use crate::compile::{CompiledFunction, CompiledModule};
use crate::engine::{Engine, FunctionEgress};
use crate::instance::{LogLevel, LogSink};
use crate::limits::Limits;
use crate::modules;
use crate::modules::log::{EmitLog, LogEmitter};
use crate::preempt::{self, Preemption, Running};
use crate::watchdog::InterruptSwitch;

/// How often a long-running call yields back to the I/O loop of its thread, in coarse
/// clock milliseconds, so one CPU-bound call cannot starve the other requests it shares a
/// thread with.
pub const TIMESLICE_MS: u64 = 2;

/// What `_VERSION` reads in a tenant's state: the language Luau is a dialect of.
pub const LUA_VERSION: &str = "Lua 5.1";

/// The limit a call broke, recorded by the interrupt or the allocator before the error
/// unwinds, so that a tenant catching the error with `pcall` does not hide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Timeout,
    /// The call held its thread longer than its blocking cap without being able to yield
    /// (inside a C function such as `string.find` or `table.sort`).
    Blocking,
}

/// One call's share of an instance's [`CallState`], loaded by [`CallState::enter`] before
/// each resume and saved after it.
#[derive(Debug)]
pub(crate) struct CallFrame {
    pub deadline_ms: u64,
    pub request_id: Rc<str>,
    pub limit_hit: Option<LimitHit>,
}

/// Per-instance call state shared with the interrupt and the log functions: the state of
/// the call running now (see [`CallFrame`]).
#[derive(Debug)]
pub(crate) struct CallState {
    /// Coarse-clock millisecond at which the current call times out (`u64::MAX`: idle).
    pub deadline_ms: Cell<u64>,
    /// Coarse-clock millisecond after which the call yields to the I/O loop.
    pub slice_end_ms: Cell<u64>,
    pub limit_hit: Cell<Option<LimitHit>>,
    /// Set by the interrupt when it yields at the end of a timeslice.
    pub slice_yielded: Cell<bool>,
    /// Coarse-clock millisecond at which the call was last resumed.
    pub resumed_at_ms: Cell<u64>,
    /// Longest a call may run without yielding, in ms (`u64::MAX`: no cap).
    pub blocking_cap_ms: Cell<u64>,
    /// The request id of the call in progress, for log lines.
    pub request_id: RefCell<Rc<str>>,
    /// Turns the state's interrupt on and off (set once, right after the state is built).
    switch: OnceCell<Arc<InterruptSwitch>>,
    /// Length of a timeslice in coarse-clock ms. 0 (tests only): preempt at about every
    /// other safepoint, chosen by a seeded generator (see `chaos`).
    pub slice_ms: Cell<u64>,
    /// State of the xorshift generator of the zero-length slice.
    chaos: Cell<u64>,
    /// Which tenant coroutine the interrupt yielded, for the coroutine wrappers.
    preemption: OnceCell<Rc<Preemption>>,
}

impl CallState {
    fn new() -> CallState {
        CallState {
            deadline_ms: Cell::new(u64::MAX),
            slice_end_ms: Cell::new(u64::MAX),
            limit_hit: Cell::new(None),
            slice_yielded: Cell::new(false),
            resumed_at_ms: Cell::new(0),
            blocking_cap_ms: Cell::new(u64::MAX),
            request_id: RefCell::new(Rc::from("init")),
            switch: OnceCell::new(),
            slice_ms: Cell::new(TIMESLICE_MS),
            chaos: Cell::new(0x9E37_79B9_7F4A_7C15),
            preemption: OnceCell::new(),
        }
    }

    fn preemption(&self) -> &Rc<Preemption> {
        self.preemption
            .get()
            .expect("the preemption state is installed when the sandbox is built")
    }

    pub fn switch(&self) -> &Arc<InterruptSwitch> {
        self.switch
            .get()
            .expect("the interrupt switch is installed when the sandbox is built")
    }

    /// Makes `frame` the call in progress: before each resume of a call, so that calls
    /// sharing the instance (coroutines) each keep their own deadline, broken limit and
    /// request id. A call that broke a limit raises again at its first safepoint.
    pub fn enter(&self, frame: &CallFrame) {
        let mut request_id = self.request_id.borrow_mut();
        if !Rc::ptr_eq(&request_id, &frame.request_id) {
            *request_id = frame.request_id.clone();
        }
        self.deadline_ms.set(frame.deadline_ms);
        self.limit_hit.set(frame.limit_hit);
        if frame.limit_hit.is_some() {
            self.switch().arm();
        }
    }

    /// Starts a fresh timeslice at `now_ms` and tells the watchdog when to arm the
    /// interrupt next: at the end of the slice or at the deadline, whichever is first.
    pub fn new_slice(&self, now_ms: u64) {
        let slice_ms = self.slice_ms.get();
        self.slice_end_ms.set(now_ms + slice_ms);
        if slice_ms == 0 {
            self.switch().arm();
        } else {
            self.schedule_interrupt();
        }
    }

    /// The host is about to resume its call. (Marks of tenant coroutines stay: a wrapper
    /// that was itself preempted before it looked at its coroutine still needs its mark.)
    pub fn before_resume(&self) {
        self.slice_yielded.set(false);
    }

    fn schedule_interrupt(&self) {
        let due = self.slice_end_ms.get().min(self.deadline_ms.get());
        self.switch().arm_at(due);
    }

    pub fn end(&self) {
        self.deadline_ms.set(u64::MAX);
        self.slice_end_ms.set(u64::MAX);
    }

    /// The interrupt: ends a call past its deadline or its blocking cap (and stays armed,
    /// so that every later safepoint raises again and a `pcall` cannot swallow the error),
    /// or yields at the end of a timeslice. It runs only when the watchdog armed it, and
    /// switches itself off.
    fn interrupt(&self, lua: &Lua) -> mlua::Result<VmState> {
        self.switch().disarm();
        let now = clock::now_ms();
        self.check_limits(now)?;
        if preempt::in_protected_code(lua) {
            // Never between an async poll and its yield (see `preempt`): the slice ends
            // at the next safepoint outside, a few instructions on.
            self.switch().arm();
            return Ok(VmState::Continue);
        }
        if self.slice_ms.get() == 0 && !self.chaos() {
            // Zero-length slices go on at about every other safepoint: a yielded coroutine
            // re-runs the instruction it stopped at, so yielding at every one would make no
            // progress; a random choice cannot fall into step with the code.
            self.switch().arm();
            return Ok(VmState::Continue);
        }
        if now >= self.slice_end_ms.get() {
            self.new_slice(now);
            // A tenant coroutine's yield is marked for the wrappers (`preempt`), which pass
            // it on to the host; one that cannot yield now (inside a C call) goes on, and
            // the next slice's end arms the interrupt again. The host's own coroutine
            // yields to the host (if it cannot, mlua goes on).
            let preemption = self.preemption();
            match preemption.running(lua) {
                Running::Host => {}
                Running::TenantCoroutine(thread) => preemption.mark_forced(thread),
                Running::Unyieldable => return Ok(VmState::Continue),
            }
            self.slice_yielded.set(true);
            return Ok(VmState::Yield);
        }
        // Armed early (a slice of an earlier resume): reschedule.
        self.schedule_interrupt();
        Ok(VmState::Continue)
    }

    /// Records a deadline or blocking cap that has passed at `now`, and raises the broken
    /// limit (now or earlier) with the interrupt armed, so that every later safepoint
    /// raises again.
    fn check_limits(&self, now: u64) -> mlua::Result<()> {
        if self.limit_hit.get().is_none() {
            if now >= self.deadline_ms.get() {
                self.limit_hit.set(Some(LimitHit::Timeout));
            } else if now.saturating_sub(self.resumed_at_ms.get()) >= self.blocking_cap_ms.get() {
                self.limit_hit.set(Some(LimitHit::Blocking));
            }
        }
        if let Some(hit) = self.limit_hit.get() {
            self.switch().arm();
            return Err(mlua::Error::runtime(match hit {
                LimitHit::Timeout => "function timed out",
                LimitHit::Blocking => "function held its thread too long without yielding",
            }));
        }
        Ok(())
    }

    /// One step of the zero-length slice's generator: `true` to preempt here.
    fn chaos(&self) -> bool {
        let mut x = self.chaos.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.chaos.set(x);
        x & 1 == 1
    }

    /// Milliseconds left in the current call (0 when past the deadline or idle).
    pub fn remaining_ms(&self) -> u64 {
        let deadline = self.deadline_ms.get();
        if deadline == u64::MAX {
            return 0;
        }
        deadline.saturating_sub(clock::precise_now_ms())
    }
}

/// Arms the instance's memory cap while Lua code runs, and disarms it while the host
/// marshals events and results (mlua wraps every API call in a protected call while a
/// limit is set; measured at roughly a third of the hello path). Memory allocated by the
/// host in between still counts: the cap applies to the whole state when it is re-armed.
pub(crate) struct MemoryCap<'a> {
    lua: &'a Lua,
}

impl<'a> MemoryCap<'a> {
    pub fn arm(lua: &'a Lua, bytes: usize) -> mlua::Result<MemoryCap<'a>> {
        lua.set_memory_limit(bytes)?;
        Ok(MemoryCap { lua })
    }
}

impl Drop for MemoryCap<'_> {
    fn drop(&mut self) {
        let _ = self.lua.set_memory_limit(0);
    }
}

/// The instance's memory cap, readable by host functions (app data set at build).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryBudget {
    pub bytes: usize,
}

/// Runs host work called from Lua (e.g. `json.decode`) with the memory cap disarmed, when
/// the work can allocate at most `worst_case_bytes` of Lua memory and that fits in the
/// headroom left under the cap; otherwise runs it armed (slower, exact). After the work the
/// cap is re-armed and checked, so the state never ends a host call above its cap: the
/// overshoot is transient and bounded by the headroom.
pub(crate) fn host_work<R>(
    lua: &Lua,
    worst_case_bytes: usize,
    work: impl FnOnce() -> mlua::Result<R>,
) -> mlua::Result<R> {
    let Some(cap) = lua
        .app_data_ref::<MemoryBudget>()
        .map(|budget| budget.bytes)
    else {
        return work();
    };
    if worst_case_bytes >= cap.saturating_sub(lua.used_memory()) {
        return work();
    }
    lua.set_memory_limit(0)?;
    let result = work();
    lua.set_memory_limit(cap)?;
    if lua.used_memory() > cap {
        return Err(mlua::Error::MemoryError("not enough memory".into()));
    }
    result
}

/// For long host work called from Lua, which the interrupt cannot stop (it runs only at
/// the VM's safepoints): `Err` once the call is past its deadline or blocking cap, recorded
/// as the interrupt records it. Cheap (a coarse clock read); call it every so often.
pub(crate) fn check_host_limits(lua: &Lua) -> mlua::Result<()> {
    match lua.app_data_ref::<Rc<CallState>>() {
        Some(state) => state.check_limits(clock::now_ms()),
        None => Ok(()),
    }
}

/// The call running now, for host functions that keep per-call state (`db`'s
/// transactions): an identity that no other call in flight on the instance shares, and
/// the time left before its deadline (none outside any call).
pub(crate) fn current_call(lua: &Lua) -> (usize, Option<std::time::Duration>) {
    match lua.app_data_ref::<Rc<CallState>>() {
        Some(state) => {
            let key = Rc::as_ptr(&state.request_id.borrow()) as *const u8 as usize;
            let remaining = (state.deadline_ms.get() != u64::MAX)
                .then(|| std::time::Duration::from_millis(state.remaining_ms()));
            (key, remaining)
        }
        None => (0, None),
    }
}

/// What the sandbox needs to know about the function it hosts.
pub(crate) struct SandboxSpec<'a> {
    pub engine: &'a Engine,
    /// The name in logs and metrics (`plugin:{name}` for a plugin).
    pub function_name: &'a Arc<str>,
    pub function: &'a Arc<CompiledFunction>,
    /// The function's own egress allowlist (and its client).
    pub egress: &'a Arc<FunctionEgress>,
    pub limits: Limits,
    pub env: &'a Arc<BTreeMap<String, String>>,
    pub log: Arc<dyn LogSink>,
}

/// A built, sandboxed state with the function's main chunk loaded (not yet run).
pub(crate) struct Sandbox {
    pub lua: Lua,
    pub main: Function,
    pub state: Rc<CallState>,
    pub emit_log: EmitLog,
}

/// Builds a fresh sandboxed Luau state for one instance.
pub(crate) fn build(spec: SandboxSpec<'_>) -> mlua::Result<Sandbox> {
    let libs = StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::OS
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::BIT
        | StdLib::MATH
        | StdLib::BUFFER;
    let lua = Lua::new_with(libs, LuaOptions::default())?;
    let state = Rc::new(CallState::new());
    let globals = lua.globals();

    // Logging: `print`, `log.*` and `ctx.log` all end here, tagged with the request id.
    let line_cap = spec.limits.log_line_bytes;
    let sink = spec.log.clone();
    let log_state = state.clone();
    let emit_log: EmitLog = Rc::new(LogEmitter::new(line_cap, move |level, line: &str| {
        let request_id = log_state.request_id.borrow().clone();
        sink.log(level, &request_id, line);
    }));

    globals.raw_set(
        "print",
        modules::log::print_function(&lua, emit_log.clone())?,
    )?;
    globals.raw_set("debug", Value::Nil)?;
    globals.raw_set("require", require_function(&lua, &spec, emit_log.clone())?)?;
    preempt::reserve_chunk_names(&lua)?;
    globals.raw_set("load", load_shim(&lua)?)?;
    // Luau says "Luau 0.7xx"; libraries that branch on `_VERSION == "Lua 5.1"` would take
    // their 5.2+ path and expect `_ENV`. Luau is a 5.1 dialect (`setfenv`, `unpack`,
    // `loadstring`): say so. What differs from 5.1 is in docs/lua-api.md.
    globals.raw_set("_VERSION", LUA_VERSION)?;

    // `os.getenv` reads the function's own environment (its secrets), nothing else.
    let env = spec.env.clone();
    let os: Table = globals.raw_get("os")?;
    os.raw_set(
        "getenv",
        lua.create_function(move |_, name: String| Ok(env.get(&name).cloned()))?,
    )?;

    crate::guards::install(&lua, spec.limits.memory_bytes)?;
    let preemption = Rc::new(Preemption::new(&lua));
    let _ = state.preemption.set(preemption.clone());
    let pass_state = state.clone();
    preempt::install(&lua, preemption, move || pass_state.slice_yielded.set(true))?;
    // Last: the modules above keep the native `pcall` they captured.
    crate::lua_errors::install(&lua)?;
    lua.sandbox(true)?;

    // The interrupt is installed switched off; the watchdog arms it when a call's slice
    // or deadline is due, so safepoints cost nothing until then.
    let interrupt_state = state.clone();
    let switch = InterruptSwitch::install(&lua, move |lua| interrupt_state.interrupt(lua))?;
    let _ = state.switch.set(Arc::new(switch));

    let main = load_module(&lua, &spec.function.main)?;
    lua.set_app_data(MemoryBudget {
        bytes: spec.limits.memory_bytes,
    });
    // For long host work that checks the call's limits itself (`check_host_limits`).
    lua.set_app_data(state.clone());
    // The memory cap is armed only while Lua code runs (see `MemoryCap`): with a limit set,
    // mlua runs every API call in a protected call, which would tax the host's marshaling.
    Ok(Sandbox {
        lua,
        main,
        state,
        emit_log,
    })
}

/// Loads one compiled module as a function (its chunk name is its file).
fn load_module(lua: &Lua, module: &CompiledModule) -> mlua::Result<Function> {
    lua.load(&module.bytecode[..])
        .set_name(format!("={}", module.file))
        .set_mode(ChunkMode::Binary)
        .into_function()
}

/// `require(name)`: the bundle's own modules first (an explicit file wins), then the
/// built-ins. Each module runs once per instance; its result is cached.
fn require_function(
    lua: &Lua,
    spec: &SandboxSpec<'_>,
    emit_log: EmitLog,
) -> mlua::Result<Function> {
    let function = spec.function.clone();
    let engine_shared = spec.engine.shared_dict();
    let outbound = spec
        .egress
        .outbound(spec.engine)
        .map_err(mlua::Error::runtime)?;
    let limits = spec.limits;
    let redis = spec.engine.redis();
    let databases = spec.engine.databases();
    let function_name = spec.function_name.clone();
    // A refused outbound call: a warn line in the function's log, and the node's count.
    let on_denied: modules::http::OnDenied = {
        let engine = spec.engine.clone();
        let name = spec.function_name.clone();
        let emit_log = emit_log.clone();
        Rc::new(move |denied| {
            emit_log.emit(LogLevel::Warn, &denied.to_string());
            engine.egress_denied(&name, denied.reason);
        })
    };
    let loaded: RefCell<HashMap<String, Value>> = RefCell::new(HashMap::new());
    let loading: RefCell<Vec<String>> = RefCell::new(Vec::new());
    lua.create_function(move |lua, name: String| {
        if let Some(value) = loaded.borrow().get(&name) {
            return Ok(value.clone());
        }
        if loading.borrow().contains(&name) {
            return Err(mlua::Error::runtime(format!(
                "require: module '{name}' is required while it loads (circular require)"
            )));
        }
        // `database` is `db` (the name the seed's example uses), unless the bundle has its own.
        if name == "database"
            && !function.modules.contains_key(&name)
            && let Some(value) = loaded.borrow().get("db")
        {
            return Ok(value.clone());
        }
        let value = if let Some(module) = function.modules.get(&name) {
            loading.borrow_mut().push(name.clone());
            let result = load_module(lua, module).and_then(|f| f.call::<Value>(()));
            loading.borrow_mut().pop();
            match result? {
                Value::Nil => Value::Boolean(true),
                other => other,
            }
        } else {
            let table = match name.as_str() {
                "json" => modules::json::module(lua)?,
                "crypto" => modules::crypto::module(lua)?,
                "time" => modules::time::module(lua)?,
                "shared" => modules::shared::module(lua, engine_shared.clone())?,
                "log" => modules::log::module(lua, emit_log.clone())?,
                "http" => modules::http::module(lua, outbound.clone(), limits, on_denied.clone())?,
                "redis" => modules::redis::module(lua, redis.clone(), limits.memory_bytes)?,
                "db" | "database" => modules::db::module(
                    lua,
                    databases.as_ref(),
                    &function_name,
                    limits.memory_bytes,
                )?,
                _ => {
                    return Err(mlua::Error::runtime(format!(
                        "module '{name}' not found: not a built-in module (json, http, redis, \
                         db, shared, log, time, crypto) and not a file of this bundle"
                    )));
                }
            };
            table.set_readonly(true);
            Value::Table(table)
        };
        if name == "database" && !function.modules.contains_key("db") {
            loaded.borrow_mut().insert("db".to_string(), value.clone());
        }
        loaded.borrow_mut().insert(name, value.clone());
        Ok(value)
    })
}

/// Lua 5.2+'s `load(chunk [, chunkname [, mode [, env]]])` over Luau's text-only
/// `loadstring`, so code written for newer Luas runs. Returns `nil, message` (a string) on
/// error like the real one, where `loadstring` raises. Binary chunks are refused.
fn load_shim(lua: &Lua) -> mlua::Result<Function> {
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    const SOURCE: &str = r#"
local loadstring, setfenv, type, concat, pcall, tostring, gsub =
  loadstring, setfenv, type, table.concat, pcall, tostring, string.gsub
return function(chunk, chunkname, mode, env)
  if type(chunk) == "function" then
    local parts = {}
    while true do
      local piece = chunk()
      if piece == nil or piece == "" then break end
      if type(piece) ~= "string" then return nil, "reader function must return a string" end
      parts[#parts + 1] = piece
    end
    chunk = concat(parts)
  elseif type(chunk) ~= "string" then
    return nil, "bad argument #1 to 'load' (string expected, got " .. type(chunk) .. ")"
  end
  if mode ~= nil and type(mode) == "string" and not mode:find("t", 1, true) then
    return nil, "attempt to load a text chunk (mode is '" .. mode .. "')"
  end
  local ok, fn = pcall(loadstring, chunk, chunkname or "=(load)")
  -- Luau's loadstring raises (an error object): `load` returns the message, a string.
  if not ok then return nil, (gsub(tostring(fn), "^syntax error: ", "")) end
  if env ~= nil then setfenv(fn, env) end
  return fn
end
"#;
    let bytecode = BYTECODE.get_or_init(|| {
        Compiler::new()
            .compile(SOURCE)
            .expect("the load shim compiles")
    });
    lua.load(&bytecode[..])
        .set_name("=load")
        .set_mode(ChunkMode::Binary)
        .call(())
}
