//! The `redis` module: commands to the node's Redis (`serve --redis redis://HOST:PORT/DB`),
//! non-blocking (the calling coroutine yields while the command is in flight), over a
//! pool of connections per worker thread ([`client`]).
//!
//! Lua API (every function documented in `docs/lua-api.md`):
//! - `redis.call(command, ...)` → the reply; any command but the refused ones (below).
//! - `redis.get`, `redis.set(key, value [, {ex=, px=, nx=, xx=}])`, `redis.incr(key [, by])`,
//!   `redis.expire`, `redis.del`, `redis.hget`, `redis.hset`, `redis.eval(script [, keys
//!   [, args]])`; `redis.null`.
//!
//! Replies: a bulk or status string is a Lua string, an integer a number, an array a
//! table, a nil reply `nil` (`redis.null` inside an array, where `nil` would leave a
//! hole); a Redis error reply raises its message (`WRONGTYPE ...`), as Redis's own
//! `redis.call` does. What the caller should handle — no Redis configured, a connection
//! failure, a timeout — returns `nil, message`. Misuse raises (`redis.NAME: ...`),
//! configured or not, including the refused commands: those that change a pooled
//! connection's state or hold it (`SELECT`, `AUTH`, `CLIENT`, `MULTI`, `SUBSCRIBE`,
//! `MONITOR`, blocking pops, `WAIT`, ...) and those that administer the server or make it
//! connect elsewhere (`CONFIG`, `DEBUG`, `SHUTDOWN`, `MIGRATE`, `REPLICAOF`, ...).
//!
//! A reply larger than the instance's free memory is a memory error, raised after
//! reading no more than its header ([`resp`]); converting a big reply checks the call's
//! deadline as it goes. The address is the operator's: no call names one, and the
//! egress policy of `http` does not apply to it.

pub mod client;
pub mod resp;

use std::rc::Rc;
use std::sync::Arc;

use mlua::{Lua, MultiValue, Table, Value};

use crate::sandbox;
use client::{Failure, ThreadPool};
pub use client::{RedisClient, RedisConfig};
use resp::Reply;

/// What every call answers on a node started without `--redis`.
pub const NOT_CONFIGURED: &str = "redis is not configured on this node (serve --redis)";

/// Commands refused by `redis.call`, with the reason given.
const REFUSED: &[(&str, &[&str])] = &[
    (
        "it changes the state of a pooled connection",
        &[
            "AUTH",
            "HELLO",
            "SELECT",
            "CLIENT",
            "QUIT",
            "RESET",
            "READONLY",
            "READWRITE",
            "ASKING",
            "MULTI",
            "EXEC",
            "DISCARD",
            "WATCH",
            "UNWATCH",
        ],
    ),
    (
        "it holds a pooled connection (subscriptions and replication streams)",
        &[
            "SUBSCRIBE",
            "PSUBSCRIBE",
            "SSUBSCRIBE",
            "UNSUBSCRIBE",
            "PUNSUBSCRIBE",
            "SUNSUBSCRIBE",
            "MONITOR",
            "SYNC",
            "PSYNC",
            "REPLCONF",
        ],
    ),
    (
        "it blocks a pooled connection",
        &[
            "BLPOP",
            "BRPOP",
            "BRPOPLPUSH",
            "BLMOVE",
            "BLMPOP",
            "BZPOPMIN",
            "BZPOPMAX",
            "BZMPOP",
            "WAIT",
            "WAITAOF",
        ],
    ),
    (
        "it administers the server or makes it connect elsewhere",
        &[
            "SHUTDOWN",
            "DEBUG",
            "CONFIG",
            "MODULE",
            "ACL",
            "REPLICAOF",
            "SLAVEOF",
            "FAILOVER",
            "CLUSTER",
            "MIGRATE",
            "SAVE",
            "BGSAVE",
            "BGREWRITEAOF",
            "SWAPDB",
        ],
    ),
];

/// Why `redis.call` refuses `args` (command first), if it does.
fn refusal(args: &[Vec<u8>]) -> Option<String> {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
    for (why, names) in REFUSED {
        if names.contains(&name.as_str()) {
            return Some(format!("command '{name}' is not allowed: {why}"));
        }
    }
    if (name == "XREAD" || name == "XREADGROUP")
        && args[1..].iter().any(|a| a.eq_ignore_ascii_case(b"BLOCK"))
    {
        return Some(format!(
            "command '{name}' with BLOCK is not allowed: it blocks a pooled connection"
        ));
    }
    None
}

fn bad_argument(function: &str, index: usize, expected: &str, got: &Value) -> mlua::Error {
    mlua::Error::runtime(format!(
        "redis.{function}: bad argument #{index}: expected {expected}, got {}",
        got.type_name()
    ))
}

/// One command argument: a string's bytes, or a number as Redis reads it (integral values
/// without a fraction).
fn argument(function: &str, index: usize, value: &Value) -> mlua::Result<Vec<u8>> {
    match value {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(i) => Ok(i.to_string().into_bytes()),
        Value::Number(n) => Ok(number_text(*n).into_bytes()),
        other => Err(bad_argument(function, index, "string or number", other)),
    }
}

fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// A whole number argument (seconds, milliseconds, an increment).
fn whole(function: &str, index: usize, value: &Value) -> mlua::Result<i64> {
    match value {
        Value::Integer(i) => Ok(*i),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 => Ok(*n as i64),
        other => Err(bad_argument(function, index, "a whole number", other)),
    }
}

/// The module's shared state: the client, and this thread's pool of it.
struct Redis {
    client: Option<(Arc<RedisClient>, Rc<ThreadPool>)>,
    memory_bytes: usize,
}

impl Redis {
    /// Runs `args`: the reply (a Redis error reply raises), or `Err(message)` for the
    /// caller to handle.
    async fn run(&self, lua: &Lua, args: Vec<Vec<u8>>) -> mlua::Result<Result<Reply, String>> {
        let Some((client, pool)) = &self.client else {
            return Ok(Err(NOT_CONFIGURED.to_string()));
        };
        let budget = self.memory_bytes.saturating_sub(lua.used_memory());
        match client.execute(pool, &args, budget).await {
            Ok(Reply::Error(message)) => Err(mlua::Error::runtime(message)),
            Ok(reply) => Ok(Ok(reply)),
            Err(Failure::TooLarge(budget)) => Err(mlua::Error::MemoryError(format!(
                "redis reply larger than the instance's free memory ({budget} bytes)"
            ))),
            Err(Failure::Other(message)) => Ok(Err(message)),
        }
    }
}

/// Turns a reply into Lua values, checking the call's limits every 4096 values (a
/// million-element reply is host work the interrupt cannot stop).
struct Converter<'a> {
    lua: &'a Lua,
    count: usize,
}

impl Converter<'_> {
    fn value(&mut self, reply: Reply, nested: bool) -> mlua::Result<Value> {
        self.count += 1;
        if self.count.is_multiple_of(4096) {
            sandbox::check_host_limits(self.lua)?;
        }
        Ok(match reply {
            Reply::Nil if nested => Value::NULL,
            Reply::Nil => Value::Nil,
            Reply::Status(bytes) | Reply::Bulk(bytes) => {
                Value::String(self.lua.create_string(&bytes)?)
            }
            Reply::Int(i) => Value::Number(i as f64),
            Reply::Error(message) => {
                // Only inside an array (an `EVAL` result): Redis scripting's shape.
                let table = self.lua.create_table_with_capacity(0, 1)?;
                table.raw_set("err", message)?;
                Value::Table(table)
            }
            Reply::Array(elements) => {
                let table = self.lua.create_table_with_capacity(elements.len(), 0)?;
                for (index, element) in elements.into_iter().enumerate() {
                    table.raw_set(index + 1, self.value(element, true)?)?;
                }
                Value::Table(table)
            }
        })
    }
}

fn to_lua(lua: &Lua, reply: Reply) -> mlua::Result<Value> {
    Converter { lua, count: 0 }.value(reply, false)
}

type Shape = fn(&Lua, Reply) -> mlua::Result<Value>;

/// Registers `redis.NAME`: `parse` copies the arguments out of Lua (misuse raises before
/// any I/O), the command runs, `shape` turns the reply into the result. A failure to
/// handle is `nil, message`.
fn register(
    lua: &Lua,
    table: &Table,
    name: &'static str,
    redis: &Rc<Redis>,
    parse: impl Fn(Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> + 'static,
    shape: Shape,
) -> mlua::Result<()> {
    let redis = redis.clone();
    let function = lua.create_async_function(move |lua, args: MultiValue| {
        let redis = redis.clone();
        let parsed = parse(args.into_iter().collect());
        async move {
            let args = parsed?;
            Ok(match redis.run(&lua, args).await? {
                Ok(reply) => (shape(&lua, reply)?, None),
                Err(message) => (Value::Nil, Some(message)),
            })
        }
    })?;
    table.raw_set(name, function)
}

/// Argument `index` (1-based) of `args`, `nil` when absent.
fn arg(args: &[Value], index: usize) -> &Value {
    args.get(index - 1).unwrap_or(&Value::Nil)
}

/// The command `name` followed by the arguments `first..=last` of `args`.
fn fixed(
    function: &'static str,
    command: &'static str,
    args: &[Value],
    count: usize,
) -> mlua::Result<Vec<Vec<u8>>> {
    let mut out = vec![command.as_bytes().to_vec()];
    for index in 1..=count {
        out.push(argument(function, index, arg(args, index))?);
    }
    Ok(out)
}

fn plain(lua: &Lua, reply: Reply) -> mlua::Result<Value> {
    to_lua(lua, reply)
}

fn parse_call(args: Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> {
    if !matches!(arg(&args, 1), Value::String(_)) {
        return Err(bad_argument(
            "call",
            1,
            "a command name (string)",
            arg(&args, 1),
        ));
    }
    let out = args
        .iter()
        .enumerate()
        .map(|(i, value)| argument("call", i + 1, value))
        .collect::<mlua::Result<Vec<_>>>()?;
    if let Some(why) = refusal(&out) {
        return Err(mlua::Error::runtime(format!("redis.call: {why}")));
    }
    Ok(out)
}

fn parse_set(args: Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> {
    let mut out = fixed("set", "SET", &args, 2)?;
    match arg(&args, 3) {
        Value::Nil => {}
        Value::Table(opts) => {
            let mut expiry = None;
            for (name, unit) in [("ex", "EX"), ("px", "PX")] {
                let value: Value = opts.raw_get(name)?;
                if value.is_nil() {
                    continue;
                }
                let n = whole("set", 3, &value).map_err(|_| {
                    mlua::Error::runtime(format!(
                        "redis.set: option {name} must be a positive whole number"
                    ))
                })?;
                if n <= 0 {
                    return Err(mlua::Error::runtime(format!(
                        "redis.set: option {name} must be a positive whole number"
                    )));
                }
                if expiry.replace((unit, n)).is_some() {
                    return Err(mlua::Error::runtime(
                        "redis.set: options ex and px exclude each other",
                    ));
                }
            }
            if let Some((unit, n)) = expiry {
                out.push(unit.as_bytes().to_vec());
                out.push(n.to_string().into_bytes());
            }
            let mut condition = None;
            for (name, word) in [("nx", "NX"), ("xx", "XX")] {
                match opts.raw_get::<Value>(name)? {
                    Value::Nil | Value::Boolean(false) => {}
                    Value::Boolean(true) => {
                        if condition.replace(word).is_some() {
                            return Err(mlua::Error::runtime(
                                "redis.set: options nx and xx exclude each other",
                            ));
                        }
                    }
                    other => {
                        return Err(mlua::Error::runtime(format!(
                            "redis.set: option {name} must be a boolean, got {}",
                            other.type_name()
                        )));
                    }
                }
            }
            if let Some(word) = condition {
                out.push(word.as_bytes().to_vec());
            }
        }
        other => return Err(bad_argument("set", 3, "a table of options", other)),
    }
    Ok(out)
}

fn parse_incr(args: Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> {
    match arg(&args, 2) {
        Value::Nil => fixed("incr", "INCR", &args, 1),
        by => {
            let by = whole("incr", 2, by)?;
            let mut out = fixed("incr", "INCRBY", &args, 1)?;
            out.push(by.to_string().into_bytes());
            Ok(out)
        }
    }
}

fn parse_expire(args: Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> {
    let seconds = whole("expire", 2, arg(&args, 2))?;
    let mut out = fixed("expire", "EXPIRE", &args, 1)?;
    out.push(seconds.to_string().into_bytes());
    Ok(out)
}

fn parse_del(args: Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> {
    let mut out = vec![b"DEL".to_vec()];
    out.push(argument("del", 1, arg(&args, 1))?);
    for (i, value) in args.iter().enumerate().skip(1) {
        out.push(argument("del", i + 1, value)?);
    }
    Ok(out)
}

/// A sequence of command arguments (`redis.eval`'s `keys` and `args`), or nothing.
fn sequence(index: usize, value: &Value) -> mlua::Result<Vec<Vec<u8>>> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Table(table) => table
            .sequence_values::<Value>()
            .enumerate()
            .map(|(i, value)| {
                let value = value?;
                argument("eval", index, &value).map_err(|_| {
                    mlua::Error::runtime(format!(
                        "redis.eval: bad argument #{index}: element {} must be a string or \
                         number, got {}",
                        i + 1,
                        value.type_name()
                    ))
                })
            })
            .collect(),
        other => Err(bad_argument("eval", index, "a table", other)),
    }
}

fn parse_eval(args: Vec<Value>) -> mlua::Result<Vec<Vec<u8>>> {
    let script = match arg(&args, 1) {
        Value::String(s) => s.as_bytes().to_vec(),
        other => return Err(bad_argument("eval", 1, "a script (string)", other)),
    };
    let keys = sequence(2, arg(&args, 2))?;
    let rest = sequence(3, arg(&args, 3))?;
    let mut out = vec![
        b"EVAL".to_vec(),
        script,
        keys.len().to_string().into_bytes(),
    ];
    out.extend(keys);
    out.extend(rest);
    Ok(out)
}

/// Builds the `redis` module table. `client` is the node's (none without `--redis`);
/// `memory_bytes` is the instance's cap, which bounds a reply.
pub fn module(
    lua: &Lua,
    client: Option<Arc<RedisClient>>,
    memory_bytes: usize,
) -> mlua::Result<Table> {
    let redis = Rc::new(Redis {
        client: client.map(|client| {
            let pool = client.thread_pool();
            (client, pool)
        }),
        memory_bytes,
    });
    let table = lua.create_table_with_capacity(0, 10)?;
    table.raw_set("null", Value::NULL)?;
    register(lua, &table, "call", &redis, parse_call, plain)?;
    register(
        lua,
        &table,
        "get",
        &redis,
        |a| fixed("get", "GET", &a, 1),
        plain,
    )?;
    register(lua, &table, "set", &redis, parse_set, |_, reply| {
        // `OK`, or a nil reply when `nx`/`xx` kept the write from happening.
        Ok(Value::Boolean(!matches!(reply, Reply::Nil)))
    })?;
    register(lua, &table, "incr", &redis, parse_incr, plain)?;
    register(lua, &table, "expire", &redis, parse_expire, |_, reply| {
        Ok(Value::Boolean(matches!(reply, Reply::Int(1))))
    })?;
    register(lua, &table, "del", &redis, parse_del, plain)?;
    register(
        lua,
        &table,
        "hget",
        &redis,
        |a| fixed("hget", "HGET", &a, 2),
        plain,
    )?;
    register(
        lua,
        &table,
        "hset",
        &redis,
        |a| fixed("hset", "HSET", &a, 3),
        plain,
    )?;
    register(lua, &table, "eval", &redis, parse_eval, plain)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<Vec<u8>> {
        args.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn connection_state_blocking_and_admin_commands_are_refused() {
        for command in [
            &["subscribe", "c"][..],
            &["SELECT", "1"],
            &["Multi"],
            &["blpop", "q", "0"],
            &["CONFIG", "SET", "x", "y"],
            &["migrate", "10.0.0.1", "6379", "k", "0", "1000"],
            &["xread", "block", "0", "streams", "s", "$"],
        ] {
            let why = refusal(&strings(command)).unwrap_or_else(|| panic!("{command:?}"));
            assert!(why.contains("is not allowed"), "{why}");
        }
        for command in [
            &["GET", "k"][..],
            &["xread", "streams", "s", "0"],
            &["EVAL", "return 1", "0"],
        ] {
            assert_eq!(refusal(&strings(command)), None, "{command:?}");
        }
    }

    #[test]
    fn numbers_are_written_as_redis_reads_them() {
        assert_eq!(number_text(3.0), "3");
        assert_eq!(number_text(-2.0), "-2");
        assert_eq!(number_text(0.5), "0.5");
        assert_eq!(number_text(1e20), "100000000000000000000");
    }
}
