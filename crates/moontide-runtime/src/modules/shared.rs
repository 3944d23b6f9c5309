//! The `shared` module: one node-wide key/value dictionary ([`SharedDict`]) shared by every
//! instance of every function on the node, in the spirit of OpenResty's `ngx.shared.DICT`,
//! and the Lua table that exposes it.
//!
//! The dictionary is split into shards, each a `parking_lot::Mutex` around a hash map plus an
//! exact LRU list and an expiry index. Memory is bounded: every entry is charged
//! `key.len() + value size + ENTRY_OVERHEAD` bytes against its shard's equal share of
//! `capacity_bytes`, so the total never exceeds the capacity. When a write does not fit, the
//! shard first drops its expired entries, then evicts least-recently-used ones (the write is
//! then reported as `forcible`). Expired entries are invisible and removed lazily.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mlua::{Lua, LuaString, MultiValue, Table, Value};
use parking_lot::Mutex;

use super::json::lua_type_name;

/// Fixed number of bytes charged per entry on top of its key and value.
pub const ENTRY_OVERHEAD: usize = 64;
/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 250;
/// Largest accepted string value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// Upper bound on the number of shards.
const MAX_SHARDS: usize = 16;
/// Shards are only split while each keeps at least this much room (so that large values
/// still fit in small dictionaries).
const MIN_SHARD_BYTES: usize = 2 * 1024 * 1024 + 4096;

/// A value stored in the dictionary.
#[derive(Clone, Debug, PartialEq)]
pub enum SharedValue {
    /// A Lua boolean.
    Bool(bool),
    /// A Lua number.
    Number(f64),
    /// A Lua string (arbitrary bytes).
    Str(Bytes),
}

impl SharedValue {
    /// Bytes charged for the value itself.
    fn charged_len(&self) -> usize {
        match self {
            SharedValue::Bool(_) | SharedValue::Number(_) => 8,
            SharedValue::Str(b) => b.len(),
        }
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetOutcome {
    /// The value was stored. `false` if it can never fit (larger than a shard's share of the
    /// capacity) or the key/value is invalid for [`SharedDict::set`].
    pub stored: bool,
    /// Live (unexpired) entries were evicted to make room.
    pub forcible: bool,
}

/// Why a dictionary operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SharedError {
    /// `add` on a key that holds a live value.
    #[error("exists")]
    Exists,
    /// `replace` or `incr` (without `init`) on a missing or expired key.
    #[error("not found")]
    NotFound,
    /// `incr` on a value that is not a number.
    #[error("not a number")]
    NotANumber,
    /// The entry can never fit: it is larger than its shard's share of the capacity.
    #[error("no memory")]
    NoMemory,
    /// Keys must not be empty.
    #[error("key is empty")]
    EmptyKey,
    /// Keys are at most [`MAX_KEY_LEN`] bytes.
    #[error("key longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong,
    /// String values are at most [`MAX_VALUE_LEN`] bytes.
    #[error("value larger than {MAX_VALUE_LEN} bytes")]
    ValueTooLarge,
}

/// A monotonic clock: time elapsed since an arbitrary fixed origin.
pub type Clock = Box<dyn Fn() -> Duration + Send + Sync>;

/// One node-wide dictionary shared by every instance of every function on the node.
///
/// Thread-safe (`Send + Sync`), sharded, bounded in memory: `capacity_bytes` counts
/// key + value bytes + [`ENTRY_OVERHEAD`] per entry.
pub struct SharedDict {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    capacity: usize,
    clock: Clock,
}

impl std::fmt::Debug for SharedDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDict")
            .field("shards", &self.shards.len())
            .field("capacity_bytes", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Set,
    Add,
    Replace,
}

impl SharedDict {
    /// A dictionary holding at most `capacity_bytes`, using the real monotonic clock.
    pub fn new(capacity_bytes: usize) -> SharedDict {
        let origin = Instant::now();
        Self::with_clock(capacity_bytes, Box::new(move || origin.elapsed()))
    }

    /// Like [`SharedDict::new`], with an injected monotonic clock (for tests): `clock()`
    /// returns the time elapsed since any fixed origin and must never go backwards.
    pub fn with_clock(capacity_bytes: usize, clock: Clock) -> SharedDict {
        let mut shards = 1;
        while shards < MAX_SHARDS && capacity_bytes / (shards * 2) >= MIN_SHARD_BYTES {
            shards *= 2;
        }
        let share = capacity_bytes / shards;
        SharedDict {
            shards: (0..shards).map(|_| Mutex::new(Shard::new(share))).collect(),
            hasher: RandomState::new(),
            capacity: capacity_bytes,
            clock,
        }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[i]
    }

    /// The live value under `key` (marks it recently used).
    pub fn get(&self, key: &[u8]) -> Option<SharedValue> {
        let now = (self.clock)();
        let mut shard = self.shard(key).lock();
        let i = shard.lookup_live(key, now)?;
        shard.touch(i);
        Some(shard.node(i).value.clone())
    }

    /// Stores `value` under `key`, replacing any previous value. `ttl` of `None` or zero
    /// means no expiry. Evicts expired, then least-recently-used entries of the key's shard
    /// when needed (`forcible`). An entry that can never fit, an empty or too long key or a
    /// too large value is not stored (`stored == false`); a previous value under the key is
    /// then removed, so a failed overwrite never leaves stale data behind.
    pub fn set(&self, key: &[u8], value: SharedValue, ttl: Option<Duration>) -> SetOutcome {
        if validate(key, &value).is_err() {
            self.delete(key);
            return SetOutcome::default();
        }
        self.write(key, value, ttl, Mode::Set).unwrap_or_default()
    }

    /// Like [`SharedDict::set`], but only if `key` is missing (or expired): `Err(Exists)`
    /// otherwise.
    pub fn add(
        &self,
        key: &[u8],
        value: SharedValue,
        ttl: Option<Duration>,
    ) -> Result<SetOutcome, SharedError> {
        validate(key, &value)?;
        self.write(key, value, ttl, Mode::Add)
    }

    /// Like [`SharedDict::set`], but only if `key` is present: `Err(NotFound)` otherwise.
    pub fn replace(
        &self,
        key: &[u8],
        value: SharedValue,
        ttl: Option<Duration>,
    ) -> Result<SetOutcome, SharedError> {
        validate(key, &value)?;
        self.write(key, value, ttl, Mode::Replace)
    }

    fn write(
        &self,
        key: &[u8],
        value: SharedValue,
        ttl: Option<Duration>,
        mode: Mode,
    ) -> Result<SetOutcome, SharedError> {
        let now = (self.clock)();
        let expires = expiry(now, ttl);
        self.shard(key).lock().write(key, value, expires, now, mode)
    }

    /// Adds `by` to the number under `key` and returns the new value (the entry keeps its
    /// expiry). If `key` is missing or expired, stores `init + by` with `init_ttl` when `init`
    /// is given, else fails with `NotFound`. `NotANumber` if the value is not a number.
    pub fn incr(
        &self,
        key: &[u8],
        by: f64,
        init: Option<f64>,
        init_ttl: Option<Duration>,
    ) -> Result<f64, SharedError> {
        validate_key(key)?;
        let now = (self.clock)();
        let mut shard = self.shard(key).lock();
        if let Some(i) = shard.lookup_live(key, now) {
            shard.touch(i);
            let node = shard.node_mut(i);
            return match node.value {
                SharedValue::Number(n) => {
                    let new = n + by;
                    node.value = SharedValue::Number(new);
                    Ok(new)
                }
                _ => Err(SharedError::NotANumber),
            };
        }
        let init = init.ok_or(SharedError::NotFound)?;
        let new = init + by;
        let outcome = shard.write(
            key,
            SharedValue::Number(new),
            expiry(now, init_ttl),
            now,
            Mode::Add,
        )?;
        if outcome.stored {
            Ok(new)
        } else {
            Err(SharedError::NoMemory)
        }
    }

    /// Removes `key`; `true` if a live entry was removed.
    pub fn delete(&self, key: &[u8]) -> bool {
        let now = (self.clock)();
        let mut shard = self.shard(key).lock();
        match shard.lookup_live(key, now) {
            Some(i) => {
                shard.remove(i);
                true
            }
            None => false,
        }
    }

    /// Remaining time to live of `key`: `None` if missing or expired, `Some(None)` if it
    /// never expires.
    pub fn ttl(&self, key: &[u8]) -> Option<Option<Duration>> {
        let now = (self.clock)();
        let mut shard = self.shard(key).lock();
        let i = shard.lookup_live(key, now)?;
        Some(shard.node(i).expires.map(|e| e.saturating_sub(now)))
    }

    /// Number of live entries (expired ones are purged first).
    pub fn len(&self) -> usize {
        let now = (self.clock)();
        self.shards
            .iter()
            .map(|s| {
                let mut s = s.lock();
                s.purge_expired(now);
                s.map.len()
            })
            .sum()
    }

    /// `true` if there are no live entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged for the live entries (expired ones are purged first).
    pub fn used_bytes(&self) -> usize {
        let now = (self.clock)();
        self.shards
            .iter()
            .map(|s| {
                let mut s = s.lock();
                s.purge_expired(now);
                s.used
            })
            .sum()
    }

    /// The configured capacity in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity
    }
}

fn validate_key(key: &[u8]) -> Result<(), SharedError> {
    if key.is_empty() {
        Err(SharedError::EmptyKey)
    } else if key.len() > MAX_KEY_LEN {
        Err(SharedError::KeyTooLong)
    } else {
        Ok(())
    }
}

fn validate(key: &[u8], value: &SharedValue) -> Result<(), SharedError> {
    validate_key(key)?;
    match value {
        SharedValue::Str(b) if b.len() > MAX_VALUE_LEN => Err(SharedError::ValueTooLarge),
        _ => Ok(()),
    }
}

/// Absolute expiry for a TTL; zero and overflowing TTLs never expire.
fn expiry(now: Duration, ttl: Option<Duration>) -> Option<Duration> {
    ttl.filter(|t| !t.is_zero())
        .and_then(|t| now.checked_add(t))
}

const NIL: usize = usize::MAX;

struct Node {
    key: Arc<[u8]>,
    value: SharedValue,
    expires: Option<Duration>,
    size: usize,
    /// Towards the most recently used end.
    prev: usize,
    /// Towards the least recently used end.
    next: usize,
}

/// One shard: a map from key to slot, a slab of nodes forming an LRU list (head = most
/// recently used) and an index of expiry times.
struct Shard {
    map: HashMap<Arc<[u8]>, usize>,
    nodes: Vec<Option<Node>>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    expiries: BTreeSet<(Duration, usize)>,
    used: usize,
    capacity: usize,
}

impl Shard {
    fn new(capacity: usize) -> Shard {
        Shard {
            map: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            expiries: BTreeSet::new(),
            used: 0,
            capacity,
        }
    }

    // Slots referenced by the map and the lists are always occupied; these accessors are
    // only called with such slots.
    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("occupied slot")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("occupied slot")
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        let old_head = self.head;
        {
            let n = self.node_mut(i);
            n.prev = NIL;
            n.next = old_head;
        }
        if old_head == NIL {
            self.tail = i;
        } else {
            self.node_mut(old_head).prev = i;
        }
        self.head = i;
    }

    /// Marks slot `i` as most recently used.
    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn remove(&mut self, i: usize) {
        self.unlink(i);
        if let Some(node) = self.nodes[i].take() {
            self.map.remove(&node.key);
            if let Some(e) = node.expires {
                self.expiries.remove(&(e, i));
            }
            self.used -= node.size;
        }
        self.free.push(i);
    }

    fn insert(
        &mut self,
        key: Arc<[u8]>,
        value: SharedValue,
        expires: Option<Duration>,
        size: usize,
    ) {
        let node = Node {
            key: key.clone(),
            value,
            expires,
            size,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        };
        self.push_front(i);
        self.map.insert(key, i);
        if let Some(e) = expires {
            self.expiries.insert((e, i));
        }
        self.used += size;
    }

    /// The slot of the live entry under `key`; an expired entry is removed.
    fn lookup_live(&mut self, key: &[u8], now: Duration) -> Option<usize> {
        let i = *self.map.get(key)?;
        if self.node(i).expires.is_some_and(|e| e <= now) {
            self.remove(i);
            return None;
        }
        Some(i)
    }

    /// Removes every expired entry; returns how many.
    fn purge_expired(&mut self, now: Duration) -> usize {
        let mut n = 0;
        while let Some(&(e, i)) = self.expiries.first() {
            if e > now {
                break;
            }
            self.remove(i);
            n += 1;
        }
        n
    }

    fn write(
        &mut self,
        key: &[u8],
        value: SharedValue,
        expires: Option<Duration>,
        now: Duration,
        mode: Mode,
    ) -> Result<SetOutcome, SharedError> {
        let existing = self.lookup_live(key, now);
        match (mode, existing) {
            (Mode::Add, Some(_)) => return Err(SharedError::Exists),
            (Mode::Replace, None) => return Err(SharedError::NotFound),
            _ => {}
        }
        // Reuse the existing key allocation when overwriting.
        let key: Arc<[u8]> = match existing {
            Some(i) => {
                let k = self.node(i).key.clone();
                self.remove(i);
                k
            }
            None => Arc::from(key),
        };
        let size = key.len() + value.charged_len() + ENTRY_OVERHEAD;
        if size > self.capacity {
            return Ok(SetOutcome::default());
        }
        let mut forcible = false;
        if self.used + size > self.capacity {
            self.purge_expired(now);
        }
        while self.used + size > self.capacity && self.tail != NIL {
            self.remove(self.tail);
            forcible = true;
        }
        self.insert(key, value, expires, size);
        Ok(SetOutcome {
            stored: true,
            forcible,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Lua API
// ---------------------------------------------------------------------------------------------

/// Builds the `shared` module table bound to `dict`:
///
/// - `shared.get(key)` -> value or nil
/// - `shared.set(key, value, ttl?)` -> `true, nil, forcible` or `nil, "no memory", forcible`;
///   a nil value deletes the key
/// - `shared.add(key, value, ttl?)` -> `true, nil, forcible` or `nil, "exists"`
/// - `shared.replace(key, value, ttl?)` -> `true, nil, forcible` or `nil, "not found"`
/// - `shared.incr(key, by, init?, init_ttl?)` -> new value or `nil, err`
///   (`"not found"`, `"not a number"`, `"no memory"`)
/// - `shared.delete(key)` -> true if a live entry was removed
/// - `shared.ttl(key)` -> remaining seconds (0 = never expires) or `nil, "not found"`
///
/// Keys are strings of 1..=250 bytes; values are strings (at most 1 MiB), numbers or
/// booleans; TTLs are seconds (fractions allowed), 0 or nil meaning no expiry.
pub fn module(lua: &Lua, dict: Arc<SharedDict>) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 7)?;

    let d = dict.clone();
    t.raw_set(
        "get",
        lua.create_function(move |lua, args: MultiValue| {
            let key = key_arg(&args, "shared.get")?;
            match d.get(&key.as_bytes()) {
                Some(v) => value_to_lua(lua, v),
                None => Ok(Value::Nil),
            }
        })?,
    )?;

    let d = dict.clone();
    t.raw_set(
        "set",
        lua.create_function(move |lua, args: MultiValue| {
            let key = key_arg(&args, "shared.set")?;
            let key = key.as_bytes();
            let ttl = ttl_arg(&args, 2, "shared.set")?;
            if matches!(args.get(1), None | Some(Value::Nil)) {
                d.delete(&key);
                return Ok((Value::Boolean(true), Value::Nil, false));
            }
            let value = value_arg(&args, 1, "shared.set")?;
            let outcome = d.set(&key, value, ttl);
            if outcome.stored {
                Ok((Value::Boolean(true), Value::Nil, outcome.forcible))
            } else {
                let err = lua_err_string(lua, SharedError::NoMemory)?;
                Ok((Value::Nil, err, outcome.forcible))
            }
        })?,
    )?;

    for (name, mode) in [("add", Mode::Add), ("replace", Mode::Replace)] {
        let d = dict.clone();
        let function = format!("shared.{name}");
        t.raw_set(
            name,
            lua.create_function(move |lua, args: MultiValue| {
                let key = key_arg(&args, &function)?;
                let key = key.as_bytes();
                let value = value_arg(&args, 1, &function)?;
                let ttl = ttl_arg(&args, 2, &function)?;
                let result = match mode {
                    Mode::Add => d.add(&key, value, ttl),
                    _ => d.replace(&key, value, ttl),
                };
                match result {
                    Ok(o) if o.stored => Ok((Value::Boolean(true), Value::Nil, o.forcible)),
                    Ok(o) => Ok((
                        Value::Nil,
                        lua_err_string(lua, SharedError::NoMemory)?,
                        o.forcible,
                    )),
                    Err(e) => Ok((Value::Nil, lua_err_string(lua, e)?, false)),
                }
            })?,
        )?;
    }

    let d = dict.clone();
    t.raw_set(
        "incr",
        lua.create_function(move |lua, args: MultiValue| {
            let key = key_arg(&args, "shared.incr")?;
            let by = number_arg(&args, 1, "shared.incr", "by", false)?.unwrap_or(0.0);
            let init = number_arg(&args, 2, "shared.incr", "init", true)?;
            let init_ttl = ttl_arg(&args, 3, "shared.incr")?;
            match d.incr(&key.as_bytes(), by, init, init_ttl) {
                Ok(n) => Ok((Value::Number(n), Value::Nil)),
                Err(e) => Ok((Value::Nil, lua_err_string(lua, e)?)),
            }
        })?,
    )?;

    let d = dict.clone();
    t.raw_set(
        "delete",
        lua.create_function(move |_, args: MultiValue| {
            let key = key_arg(&args, "shared.delete")?;
            Ok(d.delete(&key.as_bytes()))
        })?,
    )?;

    let d = dict;
    t.raw_set(
        "ttl",
        lua.create_function(move |lua, args: MultiValue| {
            let key = key_arg(&args, "shared.ttl")?;
            match d.ttl(&key.as_bytes()) {
                Some(ttl) => Ok((
                    Value::Number(ttl.map_or(0.0, |t| t.as_secs_f64())),
                    Value::Nil,
                )),
                None => Ok((Value::Nil, lua_err_string(lua, SharedError::NotFound)?)),
            }
        })?,
    )?;

    Ok(t)
}

fn lua_err_string(lua: &Lua, e: SharedError) -> mlua::Result<Value> {
    Ok(Value::String(lua.create_string(e.to_string())?))
}

fn value_to_lua(lua: &Lua, v: SharedValue) -> mlua::Result<Value> {
    Ok(match v {
        SharedValue::Bool(b) => Value::Boolean(b),
        SharedValue::Number(n) => Value::Number(n),
        SharedValue::Str(s) => Value::String(lua.create_string(&s)?),
    })
}

fn type_of(args: &MultiValue, index: usize) -> &'static str {
    lua_type_name(args.get(index).unwrap_or(&Value::Nil))
}

/// The key argument: a string of 1..=250 bytes.
fn key_arg(args: &MultiValue, function: &str) -> mlua::Result<LuaString> {
    let Some(Value::String(s)) = args.front() else {
        return Err(mlua::Error::runtime(format!(
            "{function}: key must be a string, got {}",
            type_of(args, 0)
        )));
    };
    validate_key(&s.as_bytes()).map_err(|e| mlua::Error::runtime(format!("{function}: {e}")))?;
    Ok(s.clone())
}

/// A value argument: a string, number or boolean.
fn value_arg(args: &MultiValue, index: usize, function: &str) -> mlua::Result<SharedValue> {
    let v = match args.get(index) {
        Some(Value::Boolean(b)) => SharedValue::Bool(*b),
        Some(Value::Integer(i)) => SharedValue::Number(*i as f64),
        Some(Value::Number(n)) => SharedValue::Number(*n),
        Some(Value::String(s)) => {
            let b = s.as_bytes();
            if b.len() > MAX_VALUE_LEN {
                return Err(mlua::Error::runtime(format!(
                    "{function}: {}",
                    SharedError::ValueTooLarge
                )));
            }
            SharedValue::Str(Bytes::copy_from_slice(&b))
        }
        _ => {
            return Err(mlua::Error::runtime(format!(
                "{function}: value must be a string, number or boolean, got {}",
                type_of(args, index)
            )));
        }
    };
    Ok(v)
}

/// A finite number argument; `None` for nil when `optional`.
fn number_arg(
    args: &MultiValue,
    index: usize,
    function: &str,
    name: &str,
    optional: bool,
) -> mlua::Result<Option<f64>> {
    let n = match args.get(index) {
        Some(Value::Integer(i)) => *i as f64,
        Some(Value::Number(n)) => *n,
        None | Some(Value::Nil) if optional => return Ok(None),
        _ => {
            return Err(mlua::Error::runtime(format!(
                "{function}: {name} must be a number, got {}",
                type_of(args, index)
            )));
        }
    };
    if !n.is_finite() {
        return Err(mlua::Error::runtime(format!(
            "{function}: {name} must be a finite number"
        )));
    }
    Ok(Some(n))
}

/// A TTL argument in seconds: nil or 0 = no expiry; negative, NaN or absurdly large is an
/// error.
fn ttl_arg(args: &MultiValue, index: usize, function: &str) -> mlua::Result<Option<Duration>> {
    let secs = match args.get(index) {
        None | Some(Value::Nil) => return Ok(None),
        Some(Value::Integer(i)) => *i as f64,
        Some(Value::Number(n)) => *n,
        _ => {
            return Err(mlua::Error::runtime(format!(
                "{function}: ttl must be a number of seconds, got {}",
                type_of(args, index)
            )));
        }
    };
    if secs < 0.0 || secs.is_nan() {
        return Err(mlua::Error::runtime(format!(
            "{function}: ttl must not be negative"
        )));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d.is_zero() => Ok(None),
        Ok(d) => Ok(Some(d)),
        Err(_) => Err(mlua::Error::runtime(format!(
            "{function}: ttl is too large"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A dictionary with a manual clock (milliseconds).
    fn manual(capacity: usize) -> (Arc<SharedDict>, Arc<AtomicU64>) {
        let ms = Arc::new(AtomicU64::new(1_000));
        let c = ms.clone();
        let dict = SharedDict::with_clock(
            capacity,
            Box::new(move || Duration::from_millis(c.load(Ordering::SeqCst))),
        );
        (Arc::new(dict), ms)
    }

    fn s(v: &str) -> SharedValue {
        SharedValue::Str(Bytes::copy_from_slice(v.as_bytes()))
    }

    const SEC: Option<Duration> = Some(Duration::from_secs(1));

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SharedDict>();
    }

    #[test]
    fn set_get_delete() {
        let (d, _) = manual(1 << 20);
        assert_eq!(d.get(b"a"), None);
        assert_eq!(
            d.set(b"a", s("x"), None),
            SetOutcome {
                stored: true,
                forcible: false
            }
        );
        assert!(d.set(b"b", SharedValue::Number(1.5), None).stored);
        assert!(d.set(b"c", SharedValue::Bool(false), None).stored);
        assert_eq!(d.get(b"a"), Some(s("x")));
        assert_eq!(d.get(b"b"), Some(SharedValue::Number(1.5)));
        assert_eq!(d.get(b"c"), Some(SharedValue::Bool(false)));
        assert_eq!(d.len(), 3);
        assert_eq!(d.used_bytes(), 3 * (1 + ENTRY_OVERHEAD) + 1 + 8 + 8);
        d.set(b"a", s("longer"), None);
        assert_eq!(d.get(b"a"), Some(s("longer")));
        assert_eq!(d.used_bytes(), 3 * (1 + ENTRY_OVERHEAD) + 6 + 8 + 8);
        assert!(d.delete(b"a"));
        assert!(!d.delete(b"a"));
        assert_eq!(d.get(b"a"), None);
        assert_eq!(d.len(), 2);
        // Invalid keys and values are refused, never stored.
        assert!(!d.set(b"", s("x"), None).stored);
        assert!(!d.set(&[b'k'; MAX_KEY_LEN + 1], s("x"), None).stored);
        assert!(d.set(&[b'k'; MAX_KEY_LEN], s("x"), None).stored);
        let big = SharedValue::Str(Bytes::from(vec![0u8; MAX_VALUE_LEN + 1]));
        assert!(!d.set(b"b", big.clone(), None).stored);
        assert_eq!(
            d.get(b"b"),
            None,
            "a failed overwrite removes the old value"
        );
        assert_eq!(d.add(b"z", big, None), Err(SharedError::ValueTooLarge));
        assert_eq!(d.add(b"", s("x"), None), Err(SharedError::EmptyKey));
        assert_eq!(
            d.incr(&[b'k'; 300], 1.0, Some(0.0), None),
            Err(SharedError::KeyTooLong)
        );
    }

    #[test]
    fn ttl_expiry_with_injected_clock() {
        let (d, clock) = manual(1 << 20);
        d.set(b"short", s("v"), Some(Duration::from_millis(500)));
        d.set(b"forever", s("v"), None);
        d.set(b"zero", s("v"), Some(Duration::ZERO));
        assert_eq!(d.ttl(b"short"), Some(Some(Duration::from_millis(500))));
        assert_eq!(d.ttl(b"forever"), Some(None));
        assert_eq!(d.ttl(b"zero"), Some(None));
        assert_eq!(d.ttl(b"missing"), None);
        clock.fetch_add(499, Ordering::SeqCst);
        assert_eq!(d.get(b"short"), Some(s("v")));
        assert_eq!(d.ttl(b"short"), Some(Some(Duration::from_millis(1))));
        clock.fetch_add(1, Ordering::SeqCst);
        assert_eq!(d.get(b"short"), None);
        assert_eq!(d.ttl(b"short"), None);
        assert!(!d.delete(b"short"));
        assert_eq!(d.len(), 2);
        // Expired entries are invisible to add/replace/incr too.
        d.set(b"n", SharedValue::Number(5.0), SEC);
        clock.fetch_add(1000, Ordering::SeqCst);
        assert_eq!(d.replace(b"n", s("x"), None), Err(SharedError::NotFound));
        assert_eq!(d.incr(b"n", 1.0, None, None), Err(SharedError::NotFound));
        assert!(d.add(b"n", s("x"), None).unwrap().stored);
        // An expired-but-unvisited entry is purged by len()/used_bytes().
        d.set(b"gone", s("v"), SEC);
        let before = d.used_bytes();
        clock.fetch_add(1000, Ordering::SeqCst);
        assert!(d.used_bytes() < before);
    }

    #[test]
    fn incr_semantics() {
        let (d, clock) = manual(1 << 20);
        assert_eq!(d.incr(b"c", 1.0, None, None), Err(SharedError::NotFound));
        assert_eq!(d.incr(b"c", 2.0, Some(10.0), SEC), Ok(12.0));
        assert_eq!(d.incr(b"c", -0.5, Some(100.0), None), Ok(11.5));
        // The entry keeps the expiry it was created with.
        assert_eq!(d.ttl(b"c"), Some(SEC));
        clock.fetch_add(1000, Ordering::SeqCst);
        assert_eq!(d.incr(b"c", 1.0, Some(0.0), None), Ok(1.0));
        assert_eq!(d.ttl(b"c"), Some(None));
        d.set(b"s", s("12"), None);
        assert_eq!(
            d.incr(b"s", 1.0, Some(0.0), None),
            Err(SharedError::NotANumber)
        );
        d.set(b"b", SharedValue::Bool(true), None);
        assert_eq!(d.incr(b"b", 1.0, None, None), Err(SharedError::NotANumber));
    }

    #[test]
    fn add_and_replace() {
        let (d, _) = manual(1 << 20);
        assert_eq!(d.replace(b"k", s("1"), None), Err(SharedError::NotFound));
        assert!(d.add(b"k", s("1"), None).unwrap().stored);
        assert_eq!(d.add(b"k", s("2"), None), Err(SharedError::Exists));
        assert_eq!(d.get(b"k"), Some(s("1")));
        assert!(d.replace(b"k", s("3"), SEC).unwrap().stored);
        assert_eq!(d.get(b"k"), Some(s("3")));
        assert_eq!(d.ttl(b"k"), Some(SEC));
    }

    #[test]
    fn shard_layout_follows_capacity() {
        assert_eq!(SharedDict::new(1 << 20).shards.len(), 1);
        assert_eq!(SharedDict::new(10 << 20).shards.len(), 4);
        assert_eq!(SharedDict::new(1 << 30).shards.len(), 16);
        assert_eq!(SharedDict::new(0).shards.len(), 1);
        // A tiny dictionary refuses everything without panicking.
        let d = SharedDict::new(10);
        assert_eq!(d.set(b"k", s("v"), None), SetOutcome::default());
        assert_eq!(
            d.incr(b"k", 1.0, Some(0.0), None),
            Err(SharedError::NoMemory)
        );
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn entries_larger_than_a_shard_are_refused() {
        let (d, _) = manual(1000);
        assert!(d.set(b"small", s("x"), None).stored);
        let big = SharedValue::Str(Bytes::from(vec![b'x'; 1000]));
        assert_eq!(
            d.set(b"big", big, None),
            SetOutcome {
                stored: false,
                forcible: false
            }
        );
        assert_eq!(
            d.get(b"small"),
            Some(s("x")),
            "a refused entry evicts nothing"
        );
    }

    #[test]
    fn eviction_prefers_expired_then_lru() {
        // One shard of 10 entries of 100 bytes (1-byte key + 35-byte value + 64).
        let (d, clock) = manual(1000);
        let v = |c: char| SharedValue::Str(Bytes::from(c.to_string().repeat(35)));
        for (i, k) in (b'a'..=b'j').enumerate() {
            let ttl = if k == b'e' || k == b'h' { SEC } else { None };
            clock.fetch_add(1, Ordering::SeqCst);
            let o = d.set(&[k], v(char::from(b'0' + i as u8)), ttl);
            assert_eq!(
                o,
                SetOutcome {
                    stored: true,
                    forcible: false
                }
            );
        }
        assert_eq!(d.used_bytes(), 1000);
        // Use "a" so that "b" becomes the least recently used entry.
        assert!(d.get(b"a").is_some());
        clock.fetch_add(1000, Ordering::SeqCst); // "e" and "h" expire
        // Two new entries fit in the room of the two expired ones: nothing live is evicted.
        assert_eq!(
            d.set(b"k", v('k'), None),
            SetOutcome {
                stored: true,
                forcible: false
            }
        );
        assert_eq!(
            d.set(b"l", v('l'), None),
            SetOutcome {
                stored: true,
                forcible: false
            }
        );
        for k in [b"a", b"b", b"c", b"d", b"f", b"g", b"i", b"j", b"k", b"l"] {
            assert!(d.ttl(k).is_some(), "{} should still be there", k[0] as char);
        }
        // The next one evicts the LRU entry: "b" (not "a", which was used recently).
        assert_eq!(
            d.set(b"m", v('m'), None),
            SetOutcome {
                stored: true,
                forcible: true
            }
        );
        assert_eq!(d.get(b"b"), None);
        assert!(d.get(b"a").is_some());
        assert!(d.get(b"c").is_some());
        // A larger value evicts as many LRU entries as needed: "d" and "f" ("c" was just used).
        let big = SharedValue::Str(Bytes::from(vec![b'x'; 135]));
        assert_eq!(
            d.set(b"n", big, None),
            SetOutcome {
                stored: true,
                forcible: true
            }
        );
        assert_eq!(d.get(b"d"), None);
        assert_eq!(d.get(b"f"), None);
        assert!(d.get(b"g").is_some());
        assert!(d.used_bytes() <= 1000);
    }

    #[test]
    fn capacity_is_never_exceeded_under_random_inserts() {
        use rand::Rng as _;
        let (d, clock) = manual(64 * 1024);
        let mut rng = rand::rng();
        let mut stored = 0;
        for i in 0..20_000u32 {
            let key = format!("key-{}", rng.random_range(0..5_000u32));
            let len = rng.random_range(0..2_000usize);
            let ttl = match rng.random_range(0..3) {
                0 => None,
                _ => Some(Duration::from_millis(rng.random_range(1..50))),
            };
            let op = rng.random_range(0..10);
            if op < 6 {
                let o = d.set(
                    key.as_bytes(),
                    SharedValue::Str(Bytes::from(vec![b'v'; len])),
                    ttl,
                );
                if o.stored {
                    stored += 1;
                }
            } else if op < 8 {
                let _ = d.incr(key.as_bytes(), 1.0, Some(0.0), ttl);
            } else {
                d.delete(key.as_bytes());
            }
            if i % 7 == 0 {
                clock.fetch_add(1, Ordering::SeqCst);
            }
            let used = d.used_bytes();
            assert!(used <= d.capacity_bytes(), "used {used} > capacity");
        }
        assert!(stored > 10_000);
        assert!(d.len() > 10);
    }

    #[test]
    fn concurrent_incr_sums_exactly() {
        let d = Arc::new(SharedDict::new(64 << 20));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        d.incr(b"counter", 1.0, Some(0.0), None).unwrap();
                        d.incr(format!("k{}", i % 64).as_bytes(), 2.0, Some(0.0), None)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.get(b"counter"), Some(SharedValue::Number(40_000.0)));
        let total: f64 = (0..64)
            .map(|i| match d.get(format!("k{i}").as_bytes()) {
                Some(SharedValue::Number(n)) => n,
                other => panic!("unexpected {other:?}"),
            })
            .sum();
        assert_eq!(total, 80_000.0);
    }

    fn lua_with(dict: Arc<SharedDict>) -> Lua {
        let lua = Lua::new();
        lua.globals()
            .set("shared", module(&lua, dict).unwrap())
            .unwrap();
        lua.sandbox(true).unwrap();
        lua
    }

    #[test]
    fn lua_api_end_to_end() {
        let (d, clock) = manual(1 << 20);
        let lua = lua_with(d.clone());
        lua.load(
            r#"
            assert(shared.get("k") == nil)
            local ok, err, forcible = shared.set("k", "v")
            assert(ok == true and err == nil and forcible == false)
            assert(shared.get("k") == "v")
            assert(shared.set("n", 41) and shared.get("n") == 41)
            assert(shared.set("b", false) and shared.get("b") == false)
            assert(shared.set("bin", "\0\255") and shared.get("bin") == "\0\255")

            local ok, err = shared.add("k", "other")
            assert(ok == nil and err == "exists")
            assert(shared.add("k2", "v2", 10) == true)
            local ok, err = shared.replace("nope", 1)
            assert(ok == nil and err == "not found")
            assert(shared.replace("k2", "v3") == true and shared.get("k2") == "v3")

            assert(shared.incr("n", 1) == 42)
            local v, err = shared.incr("missing", 1)
            assert(v == nil and err == "not found")
            assert(shared.incr("missing", 5, 10, 1) == 15)
            local v, err = shared.incr("k", 1)
            assert(v == nil and err == "not a number")

            assert(shared.ttl("k") == 0)
            local t, err = shared.ttl("nope")
            assert(t == nil and err == "not found")
            assert(shared.set("t", "x", 1.5) and shared.ttl("t") == 1.5)

            assert(shared.delete("k") == true)
            assert(shared.delete("k") == false)
            assert(shared.get("k") == nil)
            assert(shared.set("n", nil) == true and shared.get("n") == nil)
            "#,
        )
        .exec()
        .unwrap();
        assert_eq!(d.get(b"k2"), Some(s("v3")));
        clock.fetch_add(1_500, Ordering::SeqCst);
        lua.load(r#"assert(shared.get("t") == nil and shared.get("missing") == nil and shared.get("k2") == "v3")"#)
            .exec()
            .unwrap();
    }

    #[test]
    fn lua_no_memory_and_forcible() {
        let (d, _) = manual(300);
        let lua = lua_with(d);
        lua.load(
            r#"
            local ok, err, forcible = shared.set("big", string.rep("x", 400))
            assert(ok == nil and err == "no memory" and forcible == false, tostring(err))
            assert(shared.set("a", string.rep("x", 100)))
            local ok, err, forcible = shared.set("b", string.rep("x", 100))
            assert(ok == true and forcible == true, "second entry should evict the first")
            assert(shared.get("a") == nil)
            "#,
        )
        .exec()
        .unwrap();
    }

    #[test]
    fn lua_argument_errors() {
        let (d, _) = manual(1 << 20);
        let lua = lua_with(d);
        let cases = [
            ("shared.get()", "shared.get: key must be a string, got nil"),
            ("shared.get(1)", "key must be a string, got number"),
            ("shared.get('')", "shared.get: key is empty"),
            (
                "shared.get(string.rep('k', 251))",
                "key longer than 250 bytes",
            ),
            (
                "shared.set('k', {})",
                "shared.set: value must be a string, number or boolean, got table",
            ),
            ("shared.set('k', print)", "got function"),
            (
                "shared.set('k', string.rep('x', 1024 * 1024 + 1))",
                "value larger than 1048576 bytes",
            ),
            (
                "shared.set('k', 'v', -1)",
                "shared.set: ttl must not be negative",
            ),
            ("shared.set('k', 'v', 0/0)", "ttl must not be negative"),
            ("shared.set('k', 'v', math.huge)", "ttl is too large"),
            (
                "shared.set('k', 'v', 'soon')",
                "ttl must be a number of seconds, got string",
            ),
            (
                "shared.add('k')",
                "shared.add: value must be a string, number or boolean, got nil",
            ),
            ("shared.replace('k', {})", "shared.replace: value must be"),
            (
                "shared.incr('k')",
                "shared.incr: by must be a number, got nil",
            ),
            ("shared.incr('k', 0/0)", "by must be a finite number"),
            (
                "shared.incr('k', 1, 'x')",
                "init must be a number, got string",
            ),
            (
                "shared.incr('k', 1, 0, -5)",
                "shared.incr: ttl must not be negative",
            ),
            (
                "shared.delete({})",
                "shared.delete: key must be a string, got table",
            ),
            (
                "shared.ttl(true)",
                "shared.ttl: key must be a string, got boolean",
            ),
        ];
        for (code, want) in cases {
            let e = lua.load(code).exec().unwrap_err().to_string();
            assert!(e.contains(want), "{code}: {e} should contain {want}");
        }
    }

    #[test]
    fn two_states_share_one_dict() {
        let d = Arc::new(SharedDict::new(1 << 20));
        let a = lua_with(d.clone());
        let b = lua_with(d);
        a.load("shared.set('hello', 'from a')").exec().unwrap();
        let got: String = b.load("return shared.get('hello')").eval().unwrap();
        assert_eq!(got, "from a");
    }
}
