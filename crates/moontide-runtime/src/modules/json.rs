//! The `json` module: `json.encode`, `json.decode` and the `json.null` sentinel, plus the
//! Rust-side conversions between Lua values and JSON (`encode_value`, `decode_to_lua`,
//! `json_to_lua`, `lua_to_json`) that the runtime uses to hand payloads to handlers and to
//! return their results.
//!
//! Mapping rules (shared by every conversion in this file):
//! - JSON `null` <-> `json.null` (`mlua::Value::NULL`, the null light userdata); a top-level
//!   Lua `nil` encodes as `null`.
//! - JSON arrays <-> Lua sequences `1..n` (n >= 1); JSON objects <-> tables with string keys,
//!   encoded with their keys sorted bytewise so the output is deterministic. An empty table
//!   encodes as `{}`. Any other key mix (sparse arrays, number keys among string keys,
//!   boolean/table keys, ...) is an error naming the offending key.
//! - Numbers: integral values with `|x| < 2^53` are written without a decimal point, every
//!   other finite value with the shortest round-trip representation; NaN and infinities are
//!   errors. Decoded numbers are always Lua numbers (f64).
//! - Strings must be valid UTF-8 to be encoded; they are escaped per RFC 8259 (`"`, `\` and
//!   control characters; `/` is left alone).
//! - Nesting is limited to 128 levels when encoding (a cyclic table hits this limit and
//!   errors instead of overflowing the stack); the decoder uses serde_json's limit (127
//!   nested arrays/objects). Encoded output is capped at [`MAX_ENCODED_LEN`] bytes so that a
//!   table graph with shared sub-tables cannot blow up exponentially.
//!
//! The encoder walks tables with raw iteration (no metamethods, no Lua code runs) and holds
//! at most a few Lua references per nesting level, so arbitrarily large tables never exhaust
//! mlua's auxiliary reference stack.

use std::cell::{Cell, RefCell};
use std::fmt;

use mlua::{Either, IntoLua, Lua, Table, Value};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::ser::{CompactFormatter, Formatter};

/// Maximum table nesting accepted by the encoder (`encode_value`, `lua_to_json`).
pub const MAX_DEPTH: usize = 128;

/// Maximum size of one encoded JSON text produced by the encoder.
pub const MAX_ENCODED_LEN: usize = 64 * 1024 * 1024;

/// Largest magnitude below which integral numbers are written as integers.
const EXACT_INT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53

/// Buffers larger than this are not kept around between `json.encode` calls.
const KEEP_BUFFER_BYTES: usize = 256 * 1024;

/// Everything that can go wrong converting between Lua values and JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// A value of a type JSON cannot represent (function, userdata, thread, ...).
    #[error("cannot encode a {0}")]
    Unsupported(&'static str),
    /// Too deeply nested tables, or a table that contains itself.
    #[error("table nesting deeper than {MAX_DEPTH} (or a cycle)")]
    TooDeep,
    /// NaN, `inf` or `-inf`.
    #[error("cannot encode NaN or infinity")]
    NonFinite,
    /// A string (value or key) that is not valid UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A table whose keys are neither exactly `1..n` nor all strings.
    #[error("mixed or sparse table keys ({0})")]
    Keys(String),
    /// The encoded text would be larger than [`MAX_ENCODED_LEN`].
    #[error("encoded JSON would exceed {MAX_ENCODED_LEN} bytes")]
    TooLarge,
    /// The input is not valid JSON (or is nested too deeply to decode).
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error (0 at the very start of an empty input).
        column: usize,
        /// What was wrong, without the position.
        message: String,
    },
    /// An error raised by Lua itself while building values (e.g. the memory limit).
    #[error(transparent)]
    Lua(#[from] mlua::Error),
}

impl JsonError {
    /// Converts into a Lua error prefixed with the name of the Lua function (`json.encode`).
    /// Errors raised by Lua itself (memory limit, ...) pass through unchanged.
    pub fn into_lua_error(self, function: &str) -> mlua::Error {
        match self {
            JsonError::Lua(e) => e,
            other => mlua::Error::runtime(format!("{function}: {other}")),
        }
    }
}

/// Builds the `json` module table: `json.encode(v) -> string`, `json.decode(s) -> value`,
/// `json.null`.
pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 3)?;
    t.raw_set(
        "encode",
        lua.create_function(|lua, value: Value| lua_encode(lua, &value))?,
    )?;
    t.raw_set(
        "decode",
        lua.create_function(|lua, value: Value| match value {
            Value::String(s) => {
                let text = s.as_bytes();
                // A JSON byte becomes at most ~21 bytes of Lua memory (`{},` → a table).
                crate::sandbox::host_work(lua, text.len().saturating_mul(32), || {
                    decode_to_lua(lua, &text).map_err(|e| e.into_lua_error("json.decode"))
                })
            }
            other => Err(mlua::Error::runtime(format!(
                "json.decode: expected string, got {}",
                lua_type_name(&other)
            ))),
        })?,
    )?;
    t.raw_set("null", Value::NULL)?;
    Ok(t)
}

/// Buffers reused by `json.encode` on this thread.
#[derive(Default)]
struct Scratch {
    out: Vec<u8>,
    entries: Vec<Entry>,
    keys: Vec<u8>,
    tmp: Vec<u8>,
}

impl Scratch {
    /// Drops buffers that grew large so an occasional huge document does not pin memory.
    fn trim(&mut self) {
        if self.out.capacity() > KEEP_BUFFER_BYTES {
            self.out = Vec::new();
        }
        if self.tmp.capacity() > KEEP_BUFFER_BYTES {
            self.tmp = Vec::new();
        }
        if self.keys.capacity() > KEEP_BUFFER_BYTES {
            self.keys = Vec::new();
        }
        if self.entries.capacity() > KEEP_BUFFER_BYTES / std::mem::size_of::<Entry>() {
            self.entries = Vec::new();
        }
    }
}

thread_local! {
    static ENCODE_SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn lua_encode(lua: &Lua, value: &Value) -> mlua::Result<mlua::LuaString> {
    ENCODE_SCRATCH.with(|cell| {
        // The encoder never runs Lua code, so re-entry is impossible in practice; fall back to
        // fresh buffers rather than panicking if it ever happens.
        let mut fresh = Scratch::default();
        let mut guard = cell.try_borrow_mut().ok();
        let scratch: &mut Scratch = match guard.as_deref_mut() {
            Some(s) => s,
            None => &mut fresh,
        };
        scratch.out.clear();
        scratch.entries.clear();
        scratch.keys.clear();
        // Text that could never become a Lua string under the memory cap is not worth
        // writing: the walk stops where the string would have failed to allocate (a graph
        // of shared sub-tables can describe far more text than the state holds).
        let headroom = lua
            .app_data_ref::<crate::sandbox::MemoryBudget>()
            .map(|budget| budget.bytes.saturating_sub(lua.used_memory()));
        let limit = headroom.map_or(MAX_ENCODED_LEN, |headroom| headroom.min(MAX_ENCODED_LEN));
        // Such a graph also makes a long walk out of little memory, and the interrupt
        // cannot stop host code: the walk checks the call's limits itself.
        let check = || crate::sandbox::check_host_limits(lua);
        let mut enc = Encoder {
            limit,
            out: &mut scratch.out,
            entries: &mut scratch.entries,
            keys: &mut scratch.keys,
            tmp: &mut scratch.tmp,
            pending: None,
            check_limits: Some(&check),
            values: 0,
        };
        // Walking the value allocates no Lua memory; the result string is made with the
        // cap armed.
        let result = crate::sandbox::host_work(lua, 0, || {
            enc.value(value, 0).map_err(|e| match e {
                JsonError::TooLarge if limit < MAX_ENCODED_LEN => {
                    mlua::Error::MemoryError("not enough memory".into())
                }
                e => e.into_lua_error("json.encode"),
            })
        })
        .and_then(|()| lua.create_string(&scratch.out[..]));
        scratch.trim();
        result
    })
}

/// The name Lua's `type()` would give a value.
pub(crate) fn lua_type_name(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        Value::LightUserData(_) | Value::UserData(_) => "userdata",
        Value::Vector(_) => "vector",
        Value::Buffer(_) => "buffer",
        Value::Error(_) => "error",
        _ => "value",
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Lua value -> JSON text (the encoder behind `json.encode`), appended to `out`.
///
/// On error `out` may contain a partial document.
pub fn encode_value(value: &Value, out: &mut Vec<u8>) -> Result<(), JsonError> {
    encode_value_within(value, out, MAX_ENCODED_LEN, None)
}

/// A check of the limits of the call whose value is being encoded (its deadline, its
/// blocking cap): `Err` ends the walk with that error.
pub type LimitCheck<'a> = &'a dyn Fn() -> mlua::Result<()>;

/// The [`LimitCheck`] of work done outside any call (tests, fuzz targets): never fails.
pub fn no_limits() -> mlua::Result<()> {
    Ok(())
}

/// [`encode_value`] with a smaller cap: fails with [`JsonError::TooLarge`] as soon as more
/// than `max_len` bytes (at most [`MAX_ENCODED_LEN`]) would be appended, before they are
/// (a response body, a direct result: the caller's output cap, not 64 MiB); and with the
/// first error of `check_limits`, called before every table and every
/// [`VALUES_PER_LIMIT_CHECK`] other values (a graph of shared sub-tables makes a long walk
/// out of little memory, and host code cannot be interrupted).
pub fn encode_value_within(
    value: &Value,
    out: &mut Vec<u8>,
    max_len: usize,
    check_limits: Option<LimitCheck<'_>>,
) -> Result<(), JsonError> {
    let (mut entries, mut keys, mut tmp) = (Vec::new(), Vec::new(), Vec::new());
    let mut enc = Encoder {
        limit: out.len().saturating_add(max_len.min(MAX_ENCODED_LEN)),
        out,
        entries: &mut entries,
        keys: &mut keys,
        tmp: &mut tmp,
        pending: None,
        check_limits,
        values: 0,
    };
    enc.value(value, 0)
}

/// One `"key":value` member of an object being encoded.
struct Entry {
    /// Range of the raw key bytes in `Encoder::keys`.
    key_start: usize,
    key_end: usize,
    /// Range of the encoded member in `Encoder::out`.
    start: usize,
    end: usize,
}

/// How many values other than tables the encoder writes between two checks of the call's
/// limits (it also checks before every table).
pub const VALUES_PER_LIMIT_CHECK: u32 = 4096;

struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
    /// The call's deadline and blocking cap, checked before every table and every
    /// [`VALUES_PER_LIMIT_CHECK`] other values.
    check_limits: Option<LimitCheck<'a>>,
    /// Values written since the last check.
    values: u32,
    /// Stack of object members, shared by all nesting levels.
    entries: &'a mut Vec<Entry>,
    /// Raw key bytes of the entries.
    keys: &'a mut Vec<u8>,
    /// Scratch space used to reorder object members.
    tmp: &'a mut Vec<u8>,
    /// An encoding error raised inside a `Table::for_each` callback.
    pending: Option<JsonError>,
}

/// What a table key means for the table's shape.
fn key_index(key: &Value) -> Option<f64> {
    match key {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

fn describe_number_key(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < EXACT_INT_LIMIT {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn key_description(key: &Value) -> String {
    match key {
        Value::String(s) => {
            let b = s.as_bytes();
            let shown = String::from_utf8_lossy(&b[..b.len().min(40)]).into_owned();
            format!("string key \"{shown}\"")
        }
        Value::Integer(_) | Value::Number(_) => {
            format!(
                "number key {}",
                describe_number_key(key_index(key).unwrap_or(f64::NAN))
            )
        }
        other => format!("{} key", lua_type_name(other)),
    }
}

/// A sentinel error used to stop `Table::for_each` after stashing the real error.
fn stop() -> mlua::Error {
    mlua::Error::runtime("json: iteration stopped")
}

impl Encoder<'_> {
    fn fail(&mut self, e: JsonError) -> mlua::Error {
        self.pending = Some(e);
        stop()
    }

    /// Maps the result of a `for_each` to the stashed encoding error, if any.
    fn finish_iteration(&mut self, r: mlua::Result<()>) -> Result<(), JsonError> {
        match (r, self.pending.take()) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(JsonError::Lua(e)),
            (Ok(()), None) => Ok(()),
        }
    }

    fn value(&mut self, value: &Value, depth: usize) -> Result<(), JsonError> {
        if let Some(check) = self.check_limits {
            // Before every table (walking one costs up to its whole capacity even when it
            // writes nothing: `{}` of a table with a million empty slots) and every
            // `VALUES_PER_LIMIT_CHECK` other values.
            self.values += 1;
            if matches!(value, Value::Table(_)) || self.values >= VALUES_PER_LIMIT_CHECK {
                self.values = 0;
                check().map_err(JsonError::Lua)?;
            }
        }
        match value {
            Value::Nil => self.out.extend_from_slice(b"null"),
            Value::LightUserData(ud) if ud.0.is_null() => self.out.extend_from_slice(b"null"),
            Value::Boolean(true) => self.out.extend_from_slice(b"true"),
            Value::Boolean(false) => self.out.extend_from_slice(b"false"),
            Value::Integer(i) => {
                if i.unsigned_abs() < (1u64 << 53) {
                    write_i64(self.out, *i);
                } else {
                    write_f64(self.out, *i as f64)?;
                }
            }
            Value::Number(n) => write_number(self.out, *n)?,
            Value::String(s) => write_string(self.out, &s.as_bytes(), self.limit)?,
            Value::Table(t) => self.table(t, depth + 1)?,
            other => return Err(JsonError::Unsupported(lua_type_name(other))),
        }
        // Checked after every value, so a graph of shared sub-tables stops growing as soon
        // as the output passes the limit.
        if self.out.len() > self.limit {
            return Err(JsonError::TooLarge);
        }
        Ok(())
    }

    fn table(&mut self, t: &Table, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        let n = t.raw_len();
        if n > 0 {
            self.array(t, n, depth)
        } else {
            self.object(t, depth)
        }
    }

    /// Encodes a table whose border is `n >= 1`; its keys must be exactly `1..n`.
    fn array(&mut self, t: &Table, n: usize, depth: usize) -> Result<(), JsonError> {
        let start = self.out.len();
        self.out.push(b'[');
        // Luau iterates the array part first, in order, so normally every value is written
        // during this single pass. If a key shows up out of order (values living in the hash
        // part), only the keys are validated and the values are fetched by index afterwards.
        let mut next = 1usize;
        let mut in_order = true;
        let mut count = 0usize;
        let r = t.for_each(|k: Value, v: Value| {
            let idx = match key_index(&k) {
                Some(i) if i >= 1.0 && i <= n as f64 && i.fract() == 0.0 => i as usize,
                Some(_) => {
                    let e = JsonError::Keys(format!(
                        "{} is outside the sequence 1..{n}",
                        key_description(&k)
                    ));
                    return Err(self.fail(e));
                }
                None => {
                    let e = JsonError::Keys(format!(
                        "{} in a table with array items",
                        key_description(&k)
                    ));
                    return Err(self.fail(e));
                }
            };
            count += 1;
            if in_order && idx == next {
                if idx > 1 {
                    self.out.push(b',');
                }
                if let Err(e) = self.value(&v, depth) {
                    return Err(self.fail(e));
                }
                next += 1;
            } else {
                in_order = false;
            }
            Ok(())
        });
        self.finish_iteration(r)?;
        if count != n {
            return Err(JsonError::Keys(format!(
                "sparse array: {count} items for length {n}"
            )));
        }
        if !in_order {
            self.out.truncate(start + 1);
            for i in 1..=n {
                if i > 1 {
                    self.out.push(b',');
                }
                let v: Value = t.raw_get(i)?;
                self.value(&v, depth)?;
            }
        }
        self.out.push(b']');
        Ok(())
    }

    /// Encodes a table without a sequence part: empty (`{}`) or string keys only.
    fn object(&mut self, t: &Table, depth: usize) -> Result<(), JsonError> {
        let base_entries = self.entries.len();
        let base_keys = self.keys.len();
        self.out.push(b'{');
        let body = self.out.len();
        let r = t.for_each(|k: Value, v: Value| {
            let Value::String(ks) = &k else {
                let what = match &k {
                    Value::Integer(_) | Value::Number(_) => {
                        format!("{} in a table that is not a sequence", key_description(&k))
                    }
                    other => key_description(other),
                };
                return Err(self.fail(JsonError::Keys(what)));
            };
            let kb = ks.as_bytes();
            if self.entries.len() > base_entries {
                self.out.push(b',');
            }
            let start = self.out.len();
            if let Err(e) = write_string(self.out, &kb, self.limit) {
                return Err(self.fail(e));
            }
            self.out.push(b':');
            if let Err(e) = self.value(&v, depth) {
                return Err(self.fail(e));
            }
            let key_start = self.keys.len();
            self.keys.extend_from_slice(&kb);
            self.entries.push(Entry {
                key_start,
                key_end: self.keys.len(),
                start,
                end: self.out.len(),
            });
            Ok(())
        });
        let result = self.finish_iteration(r);
        if result.is_ok() {
            self.sort_members(base_entries, body);
            self.out.push(b'}');
        }
        self.entries.truncate(base_entries);
        self.keys.truncate(base_keys);
        result
    }

    /// Reorders the members written since `body` so that their keys are sorted.
    fn sort_members(&mut self, base_entries: usize, body: usize) {
        let keys = &self.keys;
        let members = &mut self.entries[base_entries..];
        let key = |e: &Entry| &keys[e.key_start..e.key_end];
        if members.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
            return;
        }
        members.sort_unstable_by(|a, b| key(a).cmp(key(b)));
        self.tmp.clear();
        self.tmp.extend_from_slice(&self.out[body..]);
        self.out.truncate(body);
        for (i, e) in members.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out
                .extend_from_slice(&self.tmp[e.start - body..e.end - body]);
        }
    }
}

fn write_i64(out: &mut Vec<u8>, i: i64) {
    // Writing into a Vec cannot fail.
    let _ = CompactFormatter.write_i64(out, i);
}

fn write_f64(out: &mut Vec<u8>, n: f64) -> Result<(), JsonError> {
    if !n.is_finite() {
        return Err(JsonError::NonFinite);
    }
    let _ = CompactFormatter.write_f64(out, n);
    Ok(())
}

fn write_number(out: &mut Vec<u8>, n: f64) -> Result<(), JsonError> {
    if n.fract() == 0.0 && n.abs() < EXACT_INT_LIMIT {
        write_i64(out, n as i64);
        Ok(())
    } else {
        write_f64(out, n)
    }
}

/// `b'u'` marks bytes written as `\u00XX`, `0` bytes copied as-is, anything else is the
/// character after the backslash.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t[0x08] = b'b';
    t[0x0c] = b'f';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Writes `bytes` as a JSON string literal; they must be valid UTF-8. Fails with
/// [`JsonError::TooLarge`] before `out` grows past `limit` (escaping can make a string up to
/// six times longer, so the check is made before copying and again at every escape).
fn write_string(out: &mut Vec<u8>, bytes: &[u8], limit: usize) -> Result<(), JsonError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(JsonError::InvalidUtf8);
    }
    if out.len().saturating_add(bytes.len()).saturating_add(2) > limit {
        return Err(JsonError::TooLarge);
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[b as usize];
        if esc == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if esc == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', esc]);
        }
        if out.len() + (bytes.len() - run) + 1 > limit {
            return Err(JsonError::TooLarge);
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// JSON text -> Lua value (the decoder behind `json.decode`). Lua values are built directly
/// while parsing; trailing non-whitespace is an error.
pub fn decode_to_lua(lua: &Lua, text: &[u8]) -> Result<Value, JsonError> {
    let ctx = DecodeCtx {
        lua,
        lua_error: RefCell::new(None),
        items: RefCell::new(Vec::new()),
        members: RefCell::new(Vec::new()),
        held: Cell::new(0),
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let parsed = LuaSeed {
        ctx: &ctx,
        depth: 0,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => v.into_lua(lua).map_err(JsonError::Lua),
        Err(e) => match ctx.lua_error.into_inner() {
            Some(lua_err) => Err(JsonError::Lua(lua_err)),
            None => Err(syntax_error(&e)),
        },
    }
}

fn syntax_error(e: &serde_json::Error) -> JsonError {
    let (line, column) = (e.line(), e.column());
    let full = e.to_string();
    let suffix = format!(" at line {line} column {column}");
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    JsonError::Syntax {
        line,
        column,
        message,
    }
}

/// A decoded string: borrowed from the input when it has no escapes. Pushed straight onto
/// the Lua stack when its table is built, without an intermediate Lua reference.
type Str<'de> = Either<&'de str, String>;

/// A decoded value waiting to be stored in its parent table: a string, or a Lua value that
/// holds no reference (null, boolean, number) or a finished child table.
type Child<'de> = Either<Str<'de>, Value>;

/// Maximum number of finished child tables held (as Lua references) in the pending stacks
/// before a container is materialized early; keeps well clear of the ~8000 slots of mlua's
/// auxiliary reference stack under Luau.
const MAX_HELD_TABLES: usize = 1024;

struct DecodeCtx<'l, 'de> {
    lua: &'l Lua,
    /// A Lua error (e.g. out of memory) that aborted decoding.
    lua_error: RefCell<Option<mlua::Error>>,
    /// Pending items of every open array, innermost last. Each container's table is created
    /// at its end with the exact size, from its slice of this stack.
    items: RefCell<Vec<Child<'de>>>,
    /// Pending members of every open object, innermost last.
    members: RefCell<Vec<(Str<'de>, Child<'de>)>>,
    /// Number of child tables currently held in `items` and `members`.
    held: Cell<usize>,
}

impl DecodeCtx<'_, '_> {
    fn lua<T, E: de::Error>(&self, r: mlua::Result<T>) -> Result<T, E> {
        r.map_err(|e| {
            *self.lua_error.borrow_mut() = Some(e);
            E::custom("Lua error")
        })
    }

    /// Accounts for `child` being held in a pending stack; `false` if too many tables are
    /// already held and the container must be materialized now.
    fn hold(&self, child: &Child<'_>, held_here: &mut usize) -> bool {
        if matches!(child, Either::Right(Value::Table(_))) {
            if self.held.get() >= MAX_HELD_TABLES {
                return false;
            }
            self.held.set(self.held.get() + 1);
            *held_here += 1;
        }
        true
    }

    fn release(&self, held_here: &mut usize) {
        self.held.set(self.held.get() - *held_here);
        *held_here = 0;
    }
}

#[derive(Clone, Copy)]
struct LuaSeed<'c, 'l, 'de> {
    ctx: &'c DecodeCtx<'l, 'de>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for LuaSeed<'_, '_, 'de> {
    type Value = Child<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Child<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LuaSeed<'_, '_, 'de> {
    type Value = Child<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Child<'de>, E> {
        Ok(Either::Right(Value::Boolean(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Child<'de>, E> {
        Ok(Either::Right(Value::Number(v as f64)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Child<'de>, E> {
        Ok(Either::Right(Value::Number(v as f64)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Child<'de>, E> {
        Ok(Either::Right(Value::Number(v)))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Child<'de>, E> {
        Ok(Either::Left(Either::Left(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Child<'de>, E> {
        Ok(Either::Left(Either::Right(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Child<'de>, E> {
        Ok(Either::Left(Either::Right(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Child<'de>, E> {
        Ok(Either::Right(Value::NULL))
    }

    fn visit_none<E: de::Error>(self) -> Result<Child<'de>, E> {
        Ok(Either::Right(Value::NULL))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Child<'de>, A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(de::Error::custom("recursion limit exceeded"));
        }
        let ctx = self.ctx;
        let child_seed = LuaSeed { ctx, depth };
        let base = ctx.items.borrow().len();
        let mut held_here = 0;
        // Set once the array had to be materialized early; later items go straight in.
        let mut direct: Option<Table> = None;
        let mut n: usize = 0;
        while let Some(child) = seq.next_element_seed(child_seed)? {
            n += 1;
            if direct.is_none() && !ctx.hold(&child, &mut held_here) {
                let pending = ctx.items.borrow_mut().drain(base..).collect::<Vec<_>>();
                direct = Some(ctx.lua(ctx.lua.create_sequence_from(pending))?);
                ctx.release(&mut held_here);
            }
            match &direct {
                Some(t) => ctx.lua(t.raw_set(n, child))?,
                None => ctx.items.borrow_mut().push(child),
            }
        }
        let t = match direct {
            Some(t) => t,
            None => {
                let mut items = ctx.items.borrow_mut();
                ctx.lua(ctx.lua.create_sequence_from(items.drain(base..)))?
            }
        };
        ctx.release(&mut held_here);
        Ok(Either::Right(Value::Table(t)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Child<'de>, A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(de::Error::custom("recursion limit exceeded"));
        }
        let ctx = self.ctx;
        let child_seed = LuaSeed { ctx, depth };
        let base = ctx.members.borrow().len();
        let mut held_here = 0;
        let mut direct: Option<Table> = None;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let child = map.next_value_seed(child_seed)?;
            if direct.is_none() && !ctx.hold(&child, &mut held_here) {
                let pending = ctx.members.borrow_mut().drain(base..).collect::<Vec<_>>();
                direct = Some(ctx.lua(ctx.lua.create_table_from(pending))?);
                ctx.release(&mut held_here);
            }
            match &direct {
                Some(t) => ctx.lua(t.raw_set(key, child))?,
                None => ctx.members.borrow_mut().push((key, child)),
            }
        }
        let t = match direct {
            Some(t) => t,
            None => {
                let mut members = ctx.members.borrow_mut();
                ctx.lua(ctx.lua.create_table_from(members.drain(base..)))?
            }
        };
        ctx.release(&mut held_here);
        Ok(Either::Right(Value::Table(t)))
    }
}

/// Object keys, borrowed from the input when they have no escapes.
#[derive(Clone, Copy)]
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Str<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Str<'de>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Str<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
        Ok(Either::Left(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
        Ok(Either::Right(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
        Ok(Either::Right(v))
    }
}

// ---------------------------------------------------------------------------------------------
// serde_json::Value conversions
// ---------------------------------------------------------------------------------------------

/// serde_json::Value -> Lua value (used to hand a direct-invoke payload to a handler).
pub fn json_to_lua(lua: &Lua, v: &serde_json::Value) -> mlua::Result<Value> {
    json_to_lua_at(lua, v, 0)
}

fn json_to_lua_at(lua: &Lua, v: &serde_json::Value, depth: usize) -> mlua::Result<Value> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => Value::NULL,
        J::Bool(b) => Value::Boolean(*b),
        J::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Value::String(lua.create_string(s)?),
        J::Array(items) => {
            if depth >= MAX_DEPTH {
                return Err(mlua::Error::runtime(JsonError::TooDeep.to_string()));
            }
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, json_to_lua_at(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
        J::Object(map) => {
            if depth >= MAX_DEPTH {
                return Err(mlua::Error::runtime(JsonError::TooDeep.to_string()));
            }
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, item) in map {
                t.raw_set(k.as_str(), json_to_lua_at(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
    })
}

/// Lua value -> serde_json::Value (used to return a handler's result to the admin API).
/// Follows exactly the rules of [`encode_value`], including the size limit.
pub fn lua_to_json(value: &Value) -> Result<serde_json::Value, JsonError> {
    let mut budget = MAX_ENCODED_LEN;
    to_json(value, 0, &mut budget)
}

fn charge(budget: &mut usize, n: usize) -> Result<(), JsonError> {
    *budget = budget.checked_sub(n).ok_or(JsonError::TooLarge)?;
    Ok(())
}

fn json_number(n: f64) -> Result<serde_json::Value, JsonError> {
    if n.fract() == 0.0 && n.abs() < EXACT_INT_LIMIT {
        Ok(serde_json::Value::from(n as i64))
    } else {
        serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .ok_or(JsonError::NonFinite)
    }
}

fn to_json(
    value: &Value,
    depth: usize,
    budget: &mut usize,
) -> Result<serde_json::Value, JsonError> {
    use serde_json::Value as J;
    charge(budget, 8)?;
    Ok(match value {
        Value::Nil => J::Null,
        Value::LightUserData(ud) if ud.0.is_null() => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => json_number(*i as f64)?,
        Value::Number(n) => json_number(*n)?,
        Value::String(s) => {
            let b = s.as_bytes();
            charge(budget, b.len())?;
            J::String(
                std::str::from_utf8(&b)
                    .map_err(|_| JsonError::InvalidUtf8)?
                    .to_owned(),
            )
        }
        Value::Table(t) => table_to_json(t, depth + 1, budget)?,
        other => return Err(JsonError::Unsupported(lua_type_name(other))),
    })
}

fn table_to_json(
    t: &Table,
    depth: usize,
    budget: &mut usize,
) -> Result<serde_json::Value, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    let mut pending: Option<JsonError> = None;
    let n = t.raw_len();
    if n > 0 {
        let mut items: Vec<Option<serde_json::Value>> = Vec::new();
        let mut count = 0usize;
        let r = t.for_each(|k: Value, v: Value| {
            let result = match key_index(&k) {
                Some(i) if i >= 1.0 && i <= n as f64 && i.fract() == 0.0 => {
                    to_json(&v, depth, budget).map(|j| (i as usize, j))
                }
                Some(_) => Err(JsonError::Keys(format!(
                    "{} is outside the sequence 1..{n}",
                    key_description(&k)
                ))),
                None => Err(JsonError::Keys(format!(
                    "{} in a table with array items",
                    key_description(&k)
                ))),
            };
            match result {
                Ok((i, j)) => {
                    if items.len() < i {
                        items.resize(i, None);
                    }
                    items[i - 1] = Some(j);
                    count += 1;
                    Ok(())
                }
                Err(e) => {
                    pending = Some(e);
                    Err(stop())
                }
            }
        });
        if let Some(e) = pending {
            return Err(e);
        }
        r?;
        if count != n {
            return Err(JsonError::Keys(format!(
                "sparse array: {count} items for length {n}"
            )));
        }
        Ok(serde_json::Value::Array(
            items.into_iter().flatten().collect(),
        ))
    } else {
        let mut members: Vec<(String, serde_json::Value)> = Vec::new();
        let r = t.for_each(|k: Value, v: Value| {
            let result = match &k {
                Value::String(s) => {
                    let b = s.as_bytes();
                    charge(budget, b.len()).and_then(|()| {
                        let key = std::str::from_utf8(&b)
                            .map_err(|_| JsonError::InvalidUtf8)?
                            .to_owned();
                        Ok((key, to_json(&v, depth, budget)?))
                    })
                }
                Value::Integer(_) | Value::Number(_) => Err(JsonError::Keys(format!(
                    "{} in a table that is not a sequence",
                    key_description(&k)
                ))),
                other => Err(JsonError::Keys(key_description(other))),
            };
            match result {
                Ok(m) => {
                    members.push(m);
                    Ok(())
                }
                Err(e) => {
                    pending = Some(e);
                    Err(stop())
                }
            }
        });
        if let Some(e) = pending {
            return Err(e);
        }
        r?;
        members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut map = serde_json::Map::new();
        for (k, v) in members {
            map.insert(k, v);
        }
        Ok(serde_json::Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandboxed() -> Lua {
        let lua = Lua::new();
        lua.globals().set("json", module(&lua).unwrap()).unwrap();
        lua.sandbox(true).unwrap();
        lua
    }

    fn eval_str(lua: &Lua, code: &str) -> String {
        lua.load(code)
            .eval::<mlua::LuaString>()
            .unwrap_or_else(|e| panic!("{code}: {e}"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    fn eval_err(lua: &Lua, code: &str) -> String {
        match lua.load(code).exec() {
            Ok(()) => panic!("expected an error from {code}"),
            Err(e) => e.to_string(),
        }
    }

    fn encode_lua(lua: &Lua, code: &str) -> Result<String, JsonError> {
        let v: Value = lua.load(code).eval().unwrap();
        let mut out = Vec::new();
        encode_value(&v, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn encodes_scalars_and_numbers() {
        let lua = sandboxed();
        let cases = [
            ("nil", "null"),
            ("json.null", "null"),
            ("true", "true"),
            ("false", "false"),
            ("0", "0"),
            ("-1", "-1"),
            ("-5", "-5"),
            ("123456", "123456"),
            ("19.99", "19.99"),
            ("5.5", "5.5"),
            ("1e300", "1e+300"),
            ("2^53 - 1", "9007199254740991"),
            ("-(2^53 - 1)", "-9007199254740991"),
            ("0.1", "0.1"),
            ("-0.0", "0"),
            ("'hi'", "\"hi\""),
        ];
        for (code, want) in cases {
            let got = eval_str(&lua, &format!("return json.encode({code})"));
            assert_eq!(got, want, "json.encode({code})");
        }
        // 2^53 is outside the exact-integer range: it is written as a float, which still
        // decodes to the same number.
        let big = eval_str(&lua, "return json.encode(2^53)");
        assert_ne!(big, "9007199254740992");
        assert_eq!(big.parse::<f64>().unwrap(), 9_007_199_254_740_992.0);
    }

    #[test]
    fn number_round_trips() {
        let lua = sandboxed();
        for code in [
            "0",
            "-1",
            "1e300",
            "-1e-300",
            "19.99",
            "2^53",
            "2^53 + 2",
            "1/3",
            "123456789.125",
        ] {
            let ok: bool = lua
                .load(format!(
                    "local x = {code}; local y = json.decode(json.encode(x)); return x == y and type(y) == 'number'"
                ))
                .eval()
                .unwrap();
            assert!(ok, "round trip of {code}");
        }
    }

    /// Decoding parses numbers exactly (serde_json's `float_roundtrip`), so decode then
    /// encode is a fixed point; the default fast path was off by one ulp (a fuzzing find).
    #[test]
    fn decoding_numbers_is_exact() {
        let lua = sandboxed();
        for text in [
            "14444544444444444454444444444",
            "1.4445444444444445e+28",
            "0.1",
            "2.2250738585072014e-308",
        ] {
            let decoded = decode_to_lua(&lua, text.as_bytes()).unwrap();
            let mut once = Vec::new();
            encode_value(&decoded, &mut once).unwrap();
            let again = decode_to_lua(&lua, &once).unwrap();
            let mut twice = Vec::new();
            encode_value(&again, &mut twice).unwrap();
            assert_eq!(once, twice, "{text}");
            assert_eq!(
                String::from_utf8(once).unwrap().parse::<f64>().unwrap(),
                text.parse::<f64>().unwrap(),
                "{text} decodes to the nearest f64"
            );
        }
    }

    #[test]
    fn string_escapes_and_unicode() {
        let lua = sandboxed();
        assert_eq!(
            eval_str(
                &lua,
                r#"return json.encode("a\"b\\c/d\n\r\t\b\f\1\31é€😀")"#
            ),
            "\"a\\\"b\\\\c/d\\n\\r\\t\\b\\f\\u0001\\u001fé€😀\""
        );
        let ok: bool = lua
            .load(
                r#"
                local s = "quote\" back\\ nl\n ctl\0\1 uni é€😀 slash/"
                return json.decode(json.encode(s)) == s
                "#,
            )
            .eval()
            .unwrap();
        assert!(ok);
        assert_eq!(
            eval_str(
                &lua,
                r#"return json.decode('"\\u00e9\\u20ac\\ud83d\\ude00\\/"')"#
            ),
            "é€😀/"
        );
    }

    #[test]
    fn objects_have_sorted_keys_and_arrays_stay_arrays() {
        let lua = sandboxed();
        assert_eq!(
            eval_str(
                &lua,
                "return json.encode({zeta = 1, alpha = 2, mid = {b = true, a = false}, list = {3, 2, 1}})"
            ),
            r#"{"alpha":2,"list":[3,2,1],"mid":{"a":false,"b":true},"zeta":1}"#
        );
        assert_eq!(eval_str(&lua, "return json.encode({})"), "{}");
        assert_eq!(
            eval_str(&lua, "return json.encode({{}, {1}, {x = {}}})"),
            r#"[{},[1],{"x":{}}]"#
        );
        // Array values that live in the hash part (built backwards) are still ordered.
        assert_eq!(
            eval_str(
                &lua,
                "local t = {}; for i = 5, 1, -1 do t[i] = i * 10 end; return json.encode(t)"
            ),
            "[10,20,30,40,50]"
        );
        // Keys that need escaping are escaped and the order is bytewise.
        assert_eq!(
            eval_str(
                &lua,
                r#"return json.encode({["b\n"] = 1, ["a\""] = 2, B = 3})"#
            ),
            r#"{"B":3,"a\"":2,"b\n":1}"#
        );
    }

    #[test]
    fn big_tables_do_not_exhaust_references() {
        let lua = sandboxed();
        let n: i64 = lua
            .load(
                r#"
                local t, a = {}, {}
                for i = 1, 20000 do t["k" .. i] = {i}; a[i] = {v = i} end
                local obj = json.decode(json.encode(t))
                local arr = json.decode(json.encode(a))
                assert(#arr == 20000)
                local keys = 0
                for k, v in pairs(obj) do keys += 1 end
                assert(keys == 20000)
                for i = 1, 20000 do
                    assert(obj["k" .. i][1] == i and #obj["k" .. i] == 1, i)
                    assert(arr[i].v == i, i)
                end
                local nested = json.decode("[" .. string.rep("[[1]],", 3000) .. "[2]]")
                assert(#nested == 3001 and nested[3000][1][1] == 1 and nested[3001][1] == 2)
                local esc = json.decode('{"a\\nb": "x\\ty", "plain": "z"}')
                assert(esc["a\nb"] == "x\ty" and esc.plain == "z")
                return obj.k20000[1] + arr[20000].v
                "#,
            )
            .eval()
            .unwrap();
        assert_eq!(n, 40000);
        let mut out = Vec::new();
        let v: Value = lua
            .load("local t = {}; for i = 1, 20000 do t['k' .. i] = i end; return t")
            .eval()
            .unwrap();
        encode_value(&v, &mut out).unwrap();
        let j = lua_to_json(&v).unwrap();
        assert_eq!(serde_json::to_vec(&j).unwrap(), out);
    }

    #[test]
    fn null_round_trips() {
        let lua = sandboxed();
        let (len, is_null): (i64, bool) = lua
            .load("local t = json.decode('[1,null,3]'); return #t, t[2] == json.null")
            .eval()
            .unwrap();
        assert_eq!((len, is_null), (3, true));
        assert_eq!(
            eval_str(&lua, "return json.encode({a = json.null})"),
            r#"{"a":null}"#
        );
        assert_eq!(
            eval_str(&lua, "return json.encode(json.decode('[1,null,3]'))"),
            "[1,null,3]"
        );
        let top: bool = lua
            .load("return json.decode('null') == json.null")
            .eval()
            .unwrap();
        assert!(top);
    }

    #[test]
    fn nested_round_trip() {
        let lua = sandboxed();
        let text = r#"{"a":[1,2,{"b":[true,false,null,"x"]}],"c":{"d":{"e":-1.5}},"f":""}"#;
        let got = eval_str(
            &lua,
            &format!("return json.encode(json.decode([[{text}]]))"),
        );
        assert_eq!(got, text);
    }

    #[test]
    fn benchmark_body_round_trip() {
        let lua = sandboxed();
        let body = r#"{"id":123456,"user":"alice@example.com","action":"checkout","items":[{"sku":"A-100","qty":2,"price":19.99},{"sku":"B-200","qty":1,"price":5.5}],"tags":["fast","lua","bench"],"meta":{"ip":"127.0.0.1","ua":"wrk"}}"#;
        assert_eq!(body.len(), 211);
        lua.globals().set("body", body).unwrap();
        let got = eval_str(
            &lua,
            r#"
            local req = json.decode(body)
            assert(req.items[1].price == 19.99 and #req.tags == 3)
            req.ok = true
            req.total = req.items[1].qty * req.items[1].price + req.items[2].qty * req.items[2].price
            return json.encode(req)
            "#,
        );
        assert_eq!(
            got,
            r#"{"action":"checkout","id":123456,"items":[{"price":19.99,"qty":2,"sku":"A-100"},{"price":5.5,"qty":1,"sku":"B-200"}],"meta":{"ip":"127.0.0.1","ua":"wrk"},"ok":true,"tags":["fast","lua","bench"],"total":45.48,"user":"alice@example.com"}"#
        );
    }

    /// Escaping can make a string six times longer than itself: the cap is checked before
    /// the string is copied and at every escape, not after the whole string is written.
    #[test]
    fn a_smaller_cap_stops_the_encoder_as_it_grows() {
        let lua = Lua::new();
        let control = lua.create_string(vec![1u8; 10_000]).unwrap();
        let mut out = Vec::new();
        let result = encode_value_within(&Value::String(control), &mut out, 1000, None);
        assert!(matches!(result, Err(JsonError::TooLarge)));
        assert!(out.len() <= 1006, "{} bytes written", out.len());
        let plain = lua.create_string(vec![b'x'; 10_000]).unwrap();
        let mut out = Vec::new();
        let result = encode_value_within(&Value::String(plain), &mut out, 1000, None);
        assert!(matches!(result, Err(JsonError::TooLarge)));
        assert!(out.is_empty(), "refused before it was copied");
        let mut out = Vec::new();
        let fits = lua.create_string("a\u{1}b").unwrap();
        encode_value_within(&Value::String(fits), &mut out, 10, None).unwrap();
        assert_eq!(out, br#""a\u0001b""#);
    }

    #[test]
    fn encode_errors() {
        let lua = sandboxed();
        let cases = [
            (
                "local t = {}; t.self = t; return json.encode(t)",
                "nesting deeper than 128",
            ),
            (
                "local t = {}; t[1] = t; return json.encode(t)",
                "nesting deeper than 128",
            ),
            (
                "return json.encode({f = function() end})",
                "cannot encode a function",
            ),
            ("return json.encode(print)", "cannot encode a function"),
            (
                "return json.encode({1, nil, 3})",
                "mixed or sparse table keys",
            ),
            (
                "return json.encode({[1] = 1, [3] = 3})",
                "mixed or sparse table keys",
            ),
            ("return json.encode({[2] = 1})", "number key 2"),
            ("return json.encode({1, 2, x = 3})", "string key \"x\""),
            ("return json.encode({a = 1, [5] = 3})", "number key 5"),
            ("return json.encode({[1.5] = 1})", "number key 1.5"),
            ("return json.encode({[true] = 1})", "boolean key"),
            ("return json.encode({[{}] = 1})", "table key"),
            ("return json.encode(0/0)", "cannot encode NaN or infinity"),
            (
                "return json.encode({x = math.huge})",
                "cannot encode NaN or infinity",
            ),
            (
                "return json.encode(-math.huge)",
                "cannot encode NaN or infinity",
            ),
            ("return json.encode('\\255')", "string is not valid UTF-8"),
            (
                "return json.encode({['\\255'] = 1})",
                "string is not valid UTF-8",
            ),
            (
                "return json.encode(coroutine.create(print))",
                "cannot encode a thread",
            ),
        ];
        for (code, want) in cases {
            let e = eval_err(&lua, code);
            assert!(e.contains("json.encode: "), "{code}: {e}");
            assert!(e.contains(want), "{code}: {e} should contain {want}");
        }
        // Exactly 128 levels are fine, 129 are not.
        let ok = encode_lua(&lua, "local t = {} for i = 1, 127 do t = {t} end return t").unwrap();
        assert_eq!(ok.len(), 128 * 2);
        assert!(matches!(
            encode_lua(&lua, "local t = {} for i = 1, 128 do t = {t} end return t"),
            Err(JsonError::TooDeep)
        ));
    }

    #[test]
    fn shared_subtables_cannot_blow_up() {
        let lua = sandboxed();
        let s = "x".repeat(1 << 20);
        lua.globals().set("big", s).unwrap();
        let e = eval_err(
            &lua,
            "local t = {big} for i = 1, 100 do t = {t, t} end return json.encode(t)",
        );
        assert!(e.contains("exceed"), "{e}");
        let v: Value = lua
            .load("local t = {big} for i = 1, 100 do t = {t, t} end return t")
            .eval()
            .unwrap();
        assert!(matches!(lua_to_json(&v), Err(JsonError::TooLarge)));
    }

    /// Under a memory cap, `json.encode` stops where its text could no longer become a Lua
    /// string, with the memory error creating it would have raised, instead of first
    /// writing up to 64 MiB (found by the `vm_surface` fuzz target: shared sub-tables
    /// describing 65535³ strings kept a host call busy for tens of seconds).
    #[test]
    fn encode_stops_at_the_memory_headroom() {
        let lua = sandboxed();
        let headroom = 1 << 20;
        lua.set_app_data(crate::sandbox::MemoryBudget {
            bytes: lua.used_memory() + headroom,
        });
        let e = eval_err(
            &lua,
            "local t = table.create(65535, '') for i = 1, 3 do t = table.create(65535, t) end
             return json.encode(t)",
        );
        assert!(e.contains("not enough memory"), "{e}");
        // What fits is encoded as before (once the big tables are collected).
        lua.gc_collect().unwrap();
        lua.gc_collect().unwrap();
        let small = eval_str(&lua, "return json.encode(table.create(3, {1, 'a'}))");
        assert_eq!(small, r#"[[1,"a"],[1,"a"],[1,"a"]]"#);
    }

    /// The encoder checks the call's limits as it walks (before every table and every 4096
    /// other values), so the interrupt's verdict reaches host code it cannot stop; the
    /// first failed check ends the walk with that error.
    #[test]
    fn encoder_checks_the_call_limits_as_it_walks() {
        let lua = sandboxed();
        let v: Value = lua
            .load("return table.create(65535, table.create(65535, ''))")
            .eval()
            .unwrap();
        let checks = Cell::new(0);
        let check = || {
            checks.set(checks.get() + 1);
            if checks.get() == 3 {
                Err(mlua::Error::runtime("function timed out"))
            } else {
                Ok(())
            }
        };
        let mut out = Vec::new();
        let error = encode_value_within(&v, &mut out, MAX_ENCODED_LEN, Some(&check)).unwrap_err();
        assert!(error.to_string().contains("function timed out"), "{error}");
        assert_eq!(checks.get(), 3);
        // Three checks (the outer table, the first inner one, 4096 values into it): about
        // 4096 values of 3 bytes were written, not 65535².
        assert!(out.len() < 2 * 4096 * 3, "{}", out.len());
    }

    /// A table with a million empty slots encodes as `{}` but costs its whole capacity to
    /// walk: shared a thousand times it writes little and walks long, so checks come
    /// before every table, not only every 4096 values.
    #[test]
    fn encoder_checks_the_call_limits_before_every_table() {
        let lua = sandboxed();
        let v: Value = lua
            .load("return table.create(1000, table.create(1e6))")
            .eval()
            .unwrap();
        let checks = Cell::new(0);
        let check = || {
            checks.set(checks.get() + 1);
            Ok(())
        };
        let mut out = Vec::new();
        encode_value_within(&v, &mut out, MAX_ENCODED_LEN, Some(&check)).unwrap();
        assert_eq!(out.len(), 1 + 1000 * 3 - 1 + 1);
        assert_eq!(checks.get(), 1001);
    }

    #[test]
    fn decode_errors() {
        let lua = sandboxed();
        let e = eval_err(&lua, "return json.decode('{\"a\": 1,\\n  \"b\": }')");
        assert!(
            e.contains("json.decode: invalid JSON at line 2 column 8"),
            "{e}"
        );
        let e = eval_err(&lua, "return json.decode('[1, 2')");
        assert!(e.contains("invalid JSON at line 1 column 5"), "{e}");
        let e = eval_err(&lua, "return json.decode('[1] x')");
        assert!(e.contains("trailing characters"), "{e}");
        let e = eval_err(&lua, "return json.decode('')");
        assert!(e.contains("invalid JSON at line 1 column 0"), "{e}");
        let e = eval_err(&lua, "return json.decode({})");
        assert!(e.contains("json.decode: expected string, got table"), "{e}");
        let e = eval_err(&lua, "return json.decode()");
        assert!(e.contains("expected string, got nil"), "{e}");
        let e = eval_err(&lua, "return json.decode('\"\\255\"')");
        assert!(e.contains("invalid JSON"), "{e}");
        let e = eval_err(
            &lua,
            "return json.decode(string.rep('[', 200) .. string.rep(']', 200))",
        );
        assert!(e.contains("recursion limit"), "{e}");
        let e = eval_err(&lua, "return json.decode('NaN')");
        assert!(e.contains("invalid JSON"), "{e}");
    }

    #[test]
    fn decode_memory_limit_is_a_lua_error() {
        let lua = sandboxed();
        lua.set_memory_limit(lua.used_memory() + 256 * 1024)
            .unwrap();
        let text = format!("[{}]", vec!["\"abcdefghijklmnop\""; 100_000].join(","));
        let err = decode_to_lua(&lua, text.as_bytes()).unwrap_err();
        assert!(
            matches!(err, JsonError::Lua(mlua::Error::MemoryError(_))),
            "{err:?}"
        );
    }

    #[test]
    fn serde_json_value_conversions() {
        let lua = sandboxed();
        let v = serde_json::json!({"a": [1, 2.5, null, "x"], "b": {"c": true}, "d": {}});
        let lv = json_to_lua(&lua, &v).unwrap();
        lua.globals().set("v", lv.clone()).unwrap();
        let ok: bool = lua
            .load("return v.a[1] == 1 and v.a[2] == 2.5 and v.a[3] == json.null and #v.a == 4 and v.b.c == true")
            .eval()
            .unwrap();
        assert!(ok);
        assert_eq!(lua_to_json(&lv).unwrap(), v);
        assert_eq!(lua_to_json(&Value::Nil).unwrap(), serde_json::Value::Null);
        assert_eq!(
            lua_to_json(&Value::Number(5.0)).unwrap(),
            serde_json::json!(5)
        );
        assert!(matches!(
            lua_to_json(&Value::Number(f64::NAN)),
            Err(JsonError::NonFinite)
        ));
        let cyclic: Value = lua.load("local t = {}; t.t = t; return t").eval().unwrap();
        assert!(matches!(lua_to_json(&cyclic), Err(JsonError::TooDeep)));
        let sparse: Value = lua.load("return {1, nil, 3}").eval().unwrap();
        assert!(matches!(lua_to_json(&sparse), Err(JsonError::Keys(_))));
        let mut deep = serde_json::json!(1);
        for _ in 0..200 {
            deep = serde_json::json!([deep]);
        }
        assert!(json_to_lua(&lua, &deep).is_err());
    }

    #[test]
    fn decode_to_lua_directly() {
        let lua = Lua::new();
        let v = decode_to_lua(&lua, br#" {"k": [1, "two", false]} "#).unwrap();
        let t = v.as_table().unwrap();
        let k: Table = t.get("k").unwrap();
        assert_eq!(k.raw_len(), 3);
        assert_eq!(k.get::<f64>(1).unwrap(), 1.0);
        assert_eq!(k.get::<String>(2).unwrap(), "two");
        match decode_to_lua(&lua, b"{\"a\":\n  tru}").unwrap_err() {
            JsonError::Syntax { line, column, .. } => assert_eq!((line, column), (2, 6)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
