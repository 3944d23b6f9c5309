//! Guarded built-ins: standard-library functions whose Luau implementation crashes the
//! process on some hostile arguments, replaced (before the sandbox seals the libraries) by
//! versions that never hand those arguments to the VM.
//!
//! A guard must not change what correct code computes: it either passes the call through
//! untouched, or computes the same result by a path that cannot crash (and that an
//! unlimited VM would also have reached). Each guard names the upstream bug it covers and
//! the Luau version that still has it; `tests/hostile/vm_crash_*.lua` holds the
//! reproductions, run in a child process by `tests/vm_crashes.rs`, which also checks that
//! each reproduction still crashes an unguarded state — when one stops crashing, upstream
//! has fixed the bug and its guard can go.
//!
//! Guarded today:
//! - `table.move` (luau-lang/luau#2970; Luau 0.740 and 0.745): moving `2^31 - 1` elements
//!   into a table that holds the key `-2^31` makes `luaH_resizearray` read out of bounds
//!   (SIGSEGV, not catchable by `pcall`). The guard takes every call whose destination
//!   array could not fit in the instance's memory cap anyway and moves the elements
//!   itself, sparsely: it walks the keys the tables actually hold, as Luau's own sparse path
//!   does, so the result is what an unlimited VM computes and no huge array is allocated.

use std::sync::OnceLock;

use mlua::{Function, Lua, Table, Value};

/// Size of one Luau array slot (`TValue`), for the largest array a memory cap allows.
const ARRAY_SLOT_BYTES: usize = 16;

/// Environment variable that turns the guards off, for tests of crash containment only:
/// with it set, known VM crashes reach the VM again. Never set it in production.
pub const DISABLE_GUARDS_ENV: &str = "MOONTIDE_UNSAFE_DISABLE_BUILTIN_GUARDS";

fn guards_disabled() -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var_os(DISABLE_GUARDS_ENV).is_some_and(|v| v == "1"))
}

/// The guarded `table.move`, in Lua so that the native function's errors reach the
/// caller as before (same message, raised at the caller's line): `plan` (Rust) says whether
/// the call must be done sparsely and with which integer bounds; otherwise the native
/// function gets the original arguments.
const TABLE_MOVE_SOURCE: &str = r#"
local native_move, plan, raise_memory_error = ...
local next, type, isfrozen, error, pcall, find = next, type, table.isfrozen, error, pcall, string.find
local function rethrow(ok, ...)
  if ok then return ... end
  local message = ...
  if message == "not enough memory" then raise_memory_error() end
  -- Luau puts the caller's line on argument errors (`luaL_argerror`), none on the others.
  -- The native function's caller was `pcall`; raise at the guard's caller (level 3: past
  -- `rethrow` and the guard; Luau makes no tail calls).
  local argument_error = find(message, "^invalid argument #") or find(message, "^missing argument #")
  error(message, argument_error and 3 or 0)
end
return function(...)
  local sparse, f, e, t = plan(...)
  if not sparse then
    return rethrow(pcall(native_move, ...))
  end
  local source = ...
  local destination = select(5, ...)
  if destination == nil then destination = source end
  if isfrozen(destination) then
    error("attempt to modify a readonly table", 0)
  end
  -- As Luau's sparse path: collect, clear the destination range, copy.
  local moving = {}
  for key, value in next, source do
    if type(key) == "number" and key >= f and key <= e and key % 1 == 0 then
      moving[key] = value
    end
  end
  local last = t + (e - f)
  local clearing = {}
  for key in next, destination do
    if type(key) == "number" and key >= t and key <= last and key % 1 == 0 then
      clearing[#clearing + 1] = key
    end
  end
  for i = 1, #clearing do
    rawset(destination, clearing[i], nil)
  end
  for key, value in next, moving do
    rawset(destination, key - f + t, value)
  end
  return destination
end
"#;

/// Replaces the guarded built-ins of `lua`'s standard library. Call before
/// `Lua::sandbox(true)` makes the libraries read-only. `memory_cap` is the instance's cap
/// in bytes.
pub(crate) fn install(lua: &Lua, memory_cap: usize) -> mlua::Result<()> {
    if guards_disabled() {
        return Ok(());
    }
    static BYTECODE: OnceLock<Vec<u8>> = OnceLock::new();
    let bytecode = BYTECODE.get_or_init(|| {
        mlua::chunk::Compiler::new()
            .compile(TABLE_MOVE_SOURCE)
            .expect("the table.move guard compiles")
    });
    let table: Table = lua.globals().raw_get("table")?;
    let native_move: Function = table.raw_get("move")?;
    let max_array_slots = (memory_cap / ARRAY_SLOT_BYTES).max(1) as i64;
    let plan = lua.create_function(move |lua, args: mlua::MultiValue| {
        Ok(match sparse_move_plan(lua, &args, max_array_slots)? {
            Some((first, last, to)) => (true, first, last, to),
            None => (false, 0, 0, 0),
        })
    })?;
    let raise_memory_error = lua.create_function(|_, ()| -> mlua::Result<()> {
        Err(mlua::Error::MemoryError("not enough memory".into()))
    })?;
    let guarded: Function = lua
        .load(&bytecode[..])
        .set_name("=table.move")
        .set_mode(mlua::chunk::ChunkMode::Binary)
        .call((native_move, plan, raise_memory_error))?;
    table.raw_set("move", guarded)?;
    Ok(())
}

/// Luau's `luaL_checkinteger`: a number (or numeric string) converted with C's `(int)`
/// cast, which on the targets Luau supports turns anything out of range into `INT_MIN`.
fn luau_int(lua: &Lua, value: &Value) -> mlua::Result<Option<i64>> {
    let Some(number) = lua.coerce_number(value.clone())? else {
        return Ok(None);
    };
    let truncated = number.trunc();
    if truncated.is_nan() || truncated < i32::MIN as f64 || truncated > i32::MAX as f64 {
        return Ok(Some(i32::MIN as i64));
    }
    Ok(Some(truncated as i64))
}

/// Decides whether a `table.move(a1, f, e, t [, a2])` call must be done sparsely by the
/// guard, and with which bounds: only a well-formed call (every argument check Luau makes
/// passes) moving more elements than the memory cap could hold as an array. Anything else
/// goes to the native function, which raises the same errors as before.
fn sparse_move_plan(
    lua: &Lua,
    args: &mlua::MultiValue,
    max_array_slots: i64,
) -> mlua::Result<Option<(i64, i64, i64)>> {
    let arg = |i: usize| args.get(i).cloned().unwrap_or(Value::Nil);
    if !matches!(arg(0), Value::Table(_)) || !matches!(arg(4), Value::Nil | Value::Table(_)) {
        return Ok(None);
    }
    let (Some(first), Some(last), Some(to)) = (
        luau_int(lua, &arg(1))?,
        luau_int(lua, &arg(2))?,
        luau_int(lua, &arg(3))?,
    ) else {
        return Ok(None);
    };
    if last < first {
        return Ok(None);
    }
    let int_max = i32::MAX as i64;
    // Luau's own checks ("too many elements to move", "destination wrap around").
    if !(first > 0 || last < int_max + first) {
        return Ok(None);
    }
    let count = last - first + 1;
    if to > int_max - count + 1 || count <= max_array_slots {
        return Ok(None);
    }
    Ok(Some((first, last, to)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded(cap: usize) -> Lua {
        let lua = Lua::new();
        install(&lua, cap).unwrap();
        lua.sandbox(true).unwrap();
        lua
    }

    fn eval(lua: &Lua, source: &str) -> String {
        lua.load(source).eval::<String>().unwrap()
    }

    /// The crash reproduction of luau#2970 is answered, and answered as an unlimited VM
    /// would: the one element moves.
    #[test]
    fn the_table_move_crash_is_a_sparse_move() {
        let lua = guarded(64 << 20);
        let out = eval(
            &lua,
            "local d = {} d[-2147483648] = 1
             local ok, r = pcall(table.move, {1}, 1, 2147483647, 1, d)
             return tostring(ok) .. ' ' .. tostring(r == d) .. ' ' .. tostring(d[1]) .. ' ' .. tostring(d[-2147483648])",
        );
        assert_eq!(out, "true true 1 1");
    }

    /// Small moves, errors and odd arguments are the native function's, unchanged.
    #[test]
    fn ordinary_moves_are_untouched() {
        let guarded = guarded(64 << 20);
        let native = Lua::new();
        native.sandbox(true).unwrap();
        for source in [
            "local t = table.move({1,2,3,4,5}, 2, 4, 1) return table.concat(t, ',')",
            "local t = table.move({1,2,3}, 1, 3, 3) return table.concat(t, ',')",
            "local t = table.move({1,2,3}, 1, 3, 1, {9,9,9,9}) return table.concat(t, ',')",
            "return tostring(select(2, pcall(table.move, {}, 1, 2)))",
            "return tostring(select(2, pcall(table.move, {}, -2147483648, 2147483647, 1)))",
            "return tostring(select(2, pcall(table.move, {}, 1, 2147483647, 2)))",
            "return tostring(select(2, pcall(table.move, 1, 1, 2, 1)))",
            "return tostring(select(2, pcall(function() return table.move({}, 1, 2) end)))",
            "return tostring(select(2, pcall(function() local t = table.freeze({}) table.move({1}, 1, 1, 1, t) end)))",
            "return tostring(select(2, pcall(table.move, {}, 'x', 2, 1)))",
            "local t = table.move({1,2,3}, '1', 3.7, 2) return table.concat(t, ',')",
            "local t = table.move({1,2}, 5, 1, 1) return table.concat(t, ',')",
        ] {
            assert_eq!(eval(&guarded, source), eval(&native, source), "{source}");
        }
    }

    /// A large sparse move gives what the native sparse path gives when it fits.
    #[test]
    fn large_moves_match_the_native_result() {
        let source = "local s = {1, 2, 3, [100] = 'a', [5000000] = 'b', x = 'y'}
                      local d = {7, 8, 9, 10, [4999999] = 'z', [4000000] = 'gone'}
                      table.move(s, 1, 5000000, 2, d)
                      local keys = {}
                      for k, v in pairs(d) do keys[#keys + 1] = tostring(k) .. '=' .. tostring(v) end
                      table.sort(keys)
                      return table.concat(keys, ',')";
        // 5 000 000 slots do not fit a 1 MiB cap: the guard moves them.
        let small_cap = guarded(1 << 20);
        let native = Lua::new();
        native.sandbox(true).unwrap();
        assert_eq!(eval(&small_cap, source), eval(&native, source));
    }
}
