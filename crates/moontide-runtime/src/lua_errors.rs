//! Errors raised by the host's functions (`json.decode`, `crypto.sha256`, `require`, ...)
//! reach Lua as mlua error objects — userdata — where Lua 5.1 code, and every library
//! ported from OpenResty (`cjson.decode` raises a string), expects a string:
//! `local ok, err = pcall(json.decode, s); if err:find(...)` failed with "attempt to index
//! a userdata value". The sandbox's `pcall` and `xpcall` hand tenant code such an error as
//! its message string, as a C function of the standard library would raise it (no
//! `runtime error:` prefix, no traceback). Errors tenant code raises itself (strings,
//! tables, anything) pass unchanged, and a broken limit is still recorded by the interrupt
//! before the error unwinds, so converting its message hides nothing.

use mlua::{Function, Lua, Value};

/// Lua side: `pcall`/`xpcall` over the natives, converting the error value.
const WRAPPERS: &str = r#"
local plain, native_pcall, native_xpcall = ...
local function settle(ok, ...)
  if ok then return ok, ... end
  return false, plain((...))
end
local function pcall(f, ...)
  return settle(native_pcall(f, ...))
end
local function xpcall(f, handler, ...)
  return native_xpcall(f, function(e) return handler(plain(e)) end, ...)
end
return pcall, xpcall
"#;

/// The message of a host error, as Lua code should see it.
fn message(error: &mlua::Error) -> String {
    match error {
        mlua::Error::RuntimeError(message) => message.clone(),
        mlua::Error::MemoryError(_) => "not enough memory".to_string(),
        mlua::Error::CallbackError { cause, .. } => message(cause),
        mlua::Error::WithContext { cause, .. } => message(cause),
        other => other.to_string(),
    }
}

/// Replaces the global `pcall` and `xpcall` (before the sandbox seals the globals).
pub(crate) fn install(lua: &Lua) -> mlua::Result<()> {
    let plain = lua.create_function(|lua, value: Value| match value {
        Value::Error(error) => Ok(Value::String(lua.create_string(message(&error))?)),
        other => Ok(other),
    })?;
    let globals = lua.globals();
    let native_pcall: Function = globals.raw_get("pcall")?;
    let native_xpcall: Function = globals.raw_get("xpcall")?;
    let (pcall, xpcall): (Function, Function) = lua
        .load(WRAPPERS)
        .set_name("=moontide:pcall")
        .call((plain, native_pcall, native_xpcall))?;
    globals.raw_set("pcall", pcall)?;
    globals.raw_set("xpcall", xpcall)
}
