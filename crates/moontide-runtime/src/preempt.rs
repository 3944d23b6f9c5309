//! Forced yields that Lua cannot see.
//!
//! At the end of a timeslice the interrupt yields the running coroutine so that the I/O
//! loop of the thread can serve others (`sandbox::CallState::interrupt`). Luau yields the
//! coroutine that is running *now*: the call's own coroutine (the host resumes it), or a
//! coroutine the tenant created, whose resumer is the tenant's own `coroutine.resume` — which
//! would see a yield with no values that the program never made (`resume -> true nil`), and
//! a `coroutine.wrap(function() while true do end end)()` would return at once.
//!
//! So the sandbox replaces `coroutine.resume` and `coroutine.wrap` (before it seals the
//! libraries) with versions that recognise a yield the host made and pass it on:
//! - **a forced yield** (the interrupt marks the coroutine it yields, see
//!   [`Preemption::mark_forced`]): the wrapper yields its own coroutine with a private
//!   sentinel that only wrappers see, so the chain unwinds to the host's coroutine and the
//!   host sees the end of a slice. When the host resumes, each wrapper resumes its inner coroutine, which goes on
//!   where it stopped. Where the wrapper cannot yield (inside a C call such as a
//!   `table.sort` comparator or a metamethod) it resumes the inner coroutine at once: the
//!   program still computes the same thing, and the blocking cap still bounds the thread;
//! - **an async host call** (`http.request` inside a tenant coroutine: mlua yields
//!   `Lua::poll_pending()`): passed on likewise, so the call's task really waits for the
//!   I/O instead of the tenant seeing a light userdata.
//!
//! **No forced yield inside the machinery of host yields** ([`in_protected_code`]): not in
//! these wrappers, not in mlua's own async poll loop. Between an async host call's poll
//! (which registers the task's waker) and the yield that tells the host to wait, a forced
//! yield would let the host poll again — consuming a wake-up — without the future being
//! polled, and the call would then wait for a wake-up that already came (found by the
//! every-safepoint test as a hang, 1 run in 40; it could hit plain `http.request` calls at
//! the end of a slice too). Both are tiny functions, so skipping a slice end there costs
//! nothing. Their chunk names are reserved: a tenant's `loadstring`/`load` chunk name that
//! would match is renamed ([`reserve_chunk_names`]).
//!
//! Anything else a coroutine yields or returns reaches the tenant unchanged, errors
//! included (`coroutine.wrap` raises them at its caller's line, as Luau does). The
//! interrupt only marks a coroutine it can really yield (`watchdog::is_yieldable`), so a
//! mark is never left behind to make a later real yield look forced.

use std::cell::RefCell;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::OnceLock;

use mlua::chunk::{ChunkMode, Compiler};
use mlua::{Function, Lua, Table, Thread, Value};

/// The tenant coroutines the interrupt yielded whose resumers have not seen it yet. Per
/// Lua state. Usually empty or one; a set, because the interrupt may yield the resumer
/// itself before it looked (its mark must not replace the inner one).
#[derive(Debug)]
pub(crate) struct Preemption {
    forced: RefCell<Vec<*const c_void>>,
    /// The main thread: what `Lua::current_thread` names while the host's own call
    /// coroutine runs (mlua maps its implicit threads to their owner).
    main: *const c_void,
}

/// Where the interrupt found the running code.
pub(crate) enum Running {
    /// The host's call coroutine (or the main thread): yielding returns to the host.
    Host,
    /// A tenant coroutine that can yield: the yield is marked for its resumer.
    TenantCoroutine(*const c_void),
    /// A tenant coroutine inside a C call: it cannot yield now.
    Unyieldable,
}

impl Preemption {
    pub fn new(lua: &Lua) -> Preemption {
        Preemption {
            forced: RefCell::new(Vec::new()),
            main: lua.current_thread().to_pointer(),
        }
    }

    /// Called by the interrupt: what the running coroutine is.
    pub fn running(&self, lua: &Lua) -> Running {
        let thread = lua.current_thread();
        let pointer = thread.to_pointer();
        if pointer == self.main {
            Running::Host
        } else if crate::watchdog::is_yieldable(&thread) {
            Running::TenantCoroutine(pointer)
        } else {
            Running::Unyieldable
        }
    }

    /// Records that `thread` is about to be yielded by the interrupt, not by its program.
    pub fn mark_forced(&self, thread: *const c_void) {
        self.forced.borrow_mut().push(thread);
    }

    /// `true` (once) if `thread`'s last yield was made by the interrupt.
    fn take_forced(&self, thread: &Thread) -> bool {
        let pointer = thread.to_pointer();
        let mut forced = self.forced.borrow_mut();
        match forced.iter().position(|marked| *marked == pointer) {
            Some(index) => {
                forced.swap_remove(index);
                true
            }
            None => false,
        }
    }
}

/// `coroutine.resume` and `coroutine.wrap` that pass host yields on. Arguments: the native
/// `create`, `resume`, `yield`, `isyieldable`, `wrap`, the host's `take_forced(co)` (did
/// the interrupt yield `co`?) and `note_pass()` (a forced yield is on its way to the host),
/// and mlua's pending marker. A wrapper passes a forced yield on by yielding the private
/// `FORCED` sentinel, which only wrappers ever see.
const COROUTINE_SOURCE: &str = r##"
local create, resume, yield, isyieldable, native_wrap, take_forced, note_pass, PENDING = ...
local select, error, type, pcall, pack, unpack = select, error, type, pcall, table.pack, table.unpack
local FORCED = table.freeze({})

-- Resumes `co` until it yields or ends on its own; `forced` tells which host yield
-- interrupted it first. A loop, so that a long computation does not deepen the stack.
local function slow(co, forced)
  local r
  while true do
    if isyieldable() then
      if forced then
        note_pass()
        r = pack(resume(co, yield(FORCED)))
      else
        r = pack(resume(co, yield(PENDING)))
      end
    else
      -- Inside a C call: the host cannot get control back here; go on at once.
      r = pack(resume(co))
    end
    if not r[1] then break end
    if r.n == 1 then
      forced = take_forced(co)
      if not forced then break end
    elseif r.n == 2 and r[2] == FORCED then
      forced = true
    elseif r.n == 2 and r[2] == PENDING then
      forced = false
    else
      break
    end
  end
  return unpack(r, 1, r.n)
end

local function settle(co, ok, ...)
  if ok then
    local n = select("#", ...)
    if n == 0 then
      if take_forced(co) then return slow(co, true) end
    elseif n == 1 then
      local value = ...
      if value == FORCED then return slow(co, true) end
      if value == PENDING then return slow(co, false) end
    end
  end
  return ok, ...
end

local function guarded_resume(co, ...)
  if type(co) ~= "thread" then
    -- The native error, raised at the caller's line as the native function would.
    local _, message = pcall(resume, co)
    error(message, 2)
  end
  return settle(co, resume(co, ...))
end

local function finish_wrapped(ok, ...)
  if ok then return ... end
  -- As Luau's wrap: a string (or number) error gets the caller's position.
  error((...), 3)
end

local function guarded_wrap(f)
  if type(f) ~= "function" then
    local _, message = pcall(native_wrap, f)
    error(message, 2)
  end
  local co = create(f)
  return function(...)
    return finish_wrapped(settle(co, resume(co, ...)))
  end
end

return guarded_resume, guarded_wrap
"##;

/// The chunk name of the wrappers (reserved: see [`reserve_chunk_names`]).
const WRAPPER_CHUNK: &str = "=moontide:coroutine";
/// The chunk name mlua gives its async poll loop.
const MLUA_ASYNC_CHUNK: &str = "=__mlua_async_poll";

/// `true` if the running Lua function is one a forced yield must not interrupt (see the
/// module doc). Called by the interrupt at the end of a slice.
pub(crate) fn in_protected_code(lua: &Lua) -> bool {
    lua.inspect_stack(0, |frame| {
        frame
            .source()
            .source
            .is_some_and(|source| source == WRAPPER_CHUNK || source == MLUA_ASYNC_CHUNK)
    })
    .unwrap_or(false)
}

/// Replaces `loadstring` with one that renames a chunk name reserved for the host's own
/// chunks (`moontide:…`, `__mlua…`), so tenant code can never pass for them. Call before
/// the `load` shim is made (it uses `loadstring`).
pub(crate) fn reserve_chunk_names(lua: &Lua) -> mlua::Result<()> {
    const SOURCE: &str = r#"
local native, type, find, pcall, error = ...
local function reserved(name)
  return find(name, "^[=@]?moontide:") or find(name, "^[=@]?__mlua")
end
local function finish(ok, ...)
  if ok then return ... end
  error((...), 3)
end
return function(chunk, chunkname, ...)
  if type(chunkname) == "string" and reserved(chunkname) then
    chunkname = "=user:" .. chunkname
  end
  return finish(pcall(native, chunk, chunkname, ...))
end
"#;
    let globals = lua.globals();
    let native: Function = globals.raw_get("loadstring")?;
    let string: Table = globals.raw_get("string")?;
    let guarded: Function = lua.load(SOURCE).set_name("=moontide:loadstring").call((
        native,
        globals.raw_get::<Function>("type")?,
        string.raw_get::<Function>("find")?,
        globals.raw_get::<Function>("pcall")?,
        globals.raw_get::<Function>("error")?,
    ))?;
    globals.raw_set("loadstring", guarded)
}

/// Replaces `coroutine.resume` and `coroutine.wrap` in `lua`'s library. Call before the
/// sandbox seals the libraries. `on_pass` runs when a wrapper passes a forced yield on
/// (the host then counts its slice as used).
pub(crate) fn install(
    lua: &Lua,
    preemption: Rc<Preemption>,
    on_pass: impl Fn() + 'static,
) -> mlua::Result<()> {
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    let bytecode = BYTECODE.get_or_init(|| {
        Compiler::new()
            .compile(COROUTINE_SOURCE)
            .expect("the coroutine wrappers compile")
    });
    let coroutine: Table = lua.globals().raw_get("coroutine")?;
    let take_forced =
        lua.create_function(move |_, thread: Thread| Ok(preemption.take_forced(&thread)))?;
    let note_pass = lua.create_function(move |_, ()| {
        on_pass();
        Ok(())
    })?;
    let (resume, wrap): (Function, Function) = lua
        .load(&bytecode[..])
        .set_name(WRAPPER_CHUNK)
        .set_mode(ChunkMode::Binary)
        .call((
            coroutine.raw_get::<Function>("create")?,
            coroutine.raw_get::<Function>("resume")?,
            coroutine.raw_get::<Function>("yield")?,
            coroutine.raw_get::<Function>("isyieldable")?,
            coroutine.raw_get::<Function>("wrap")?,
            take_forced,
            note_pass,
            Value::LightUserData(Lua::poll_pending()),
        ))?;
    coroutine.raw_set("resume", resume)?;
    coroutine.raw_set("wrap", wrap)?;
    Ok(())
}
