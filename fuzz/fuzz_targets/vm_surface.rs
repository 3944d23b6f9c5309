//! The Luau VM surface itself (issue 13 §5): generated Lua programs run in a real sandboxed
//! instance with limits (`Instance::new` + `invoke_json`, as production does), biased to
//! the standard library's edge cases — extreme indices (±2^31, ±2^53, NaN, ±inf, -0.0),
//! `table.*`, `string.*` patterns/format/pack, `utf8.*`, `bit32.*`, `buffer.*`,
//! `coroutine.*` in odd orders, `math.*`, `select`, odd metatables and `pcall`/`error` with
//! odd values — plus Moontide's own modules (`json`, `crypto`, `time`, `shared`, `log`).
//!
//! Every top-level statement runs inside `pcall`: Lua errors are fine. Properties:
//! - the process does not crash (no signal, no sanitizer report, no panic);
//! - building the instance ends with an instance or an init error, never a setup error
//!   (nor, for generated programs, a missing handler);
//! - each call ends with `Ok` or a `CallError`, and within a bounded amount of thread CPU
//!   time (the call's timeout is 200 ms; the bound is generous, see `HANG_CPU`).
//!
//! Input: either a generator's byte stream (`arbitrary::Unstructured` drives a small Lua
//! grammar, see [`Gen`]), or — when it starts with `--lua` — Lua text whose lines are
//! statements, each wrapped in its own `pcall` (how the hand-written seeds in
//! `fuzz/seeds/vm_surface/` are written; a line that does not compile alone is dropped;
//! the words `init`, `twice`, `chaos`, `nocap` on the first line choose the [`Mode`]), or
//! — when it starts with `--program` — a whole `main.lua` to run as it is.
//! `require("http")` reaches a stub bundle module, never the network.
//!
//! `VM_SURFACE_PRINT=1` prints each program before it runs and its result (to turn a crash
//! artifact into a Lua reproduction: `cargo +nightly fuzz run vm_surface <artifact>`);
//! `VM_SURFACE_SHOW=<kind>` prints the programs whose call ended with that kind (`ok`,
//! `timeout`, `blocking`, …); `VM_SURFACE_STATS=1` counts outcomes.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moontide_runtime::{
    Engine, EngineConfig, FunctionSource, Instance, InstanceError, InstanceSpec, Limits, LogLevel,
    LogSink, UnitKind, compile,
};

/// The call's wall-clock budget.
const TIMEOUT: Duration = Duration::from_millis(200);
/// The instance's memory cap.
const MEMORY: usize = 16 << 20;
/// The result limit (production: 6 MiB). Encoding a result is host work bounded by this
/// limit, not by the timeout, so it is kept small like the others.
const RESULT: usize = 1 << 20;
/// Thread CPU time one input may use (instance + calls) before it counts as a hang: far
/// above the timeout (ASan makes the VM several times slower), far below libFuzzer's own
/// `-timeout`, and CPU rather than wall time so that a loaded machine does not trip it.
const HANG_CPU: Duration = Duration::from_secs(4);

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    engine: Engine,
}

thread_local! {
    static HARNESS: Harness = Harness {
        runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        engine: Engine::new(&EngineConfig {
            shared_dict_bytes: 1 << 20,
            ..EngineConfig::default()
        })
        .unwrap(),
    };
}

/// `require("http")` finds this bundle module first: generated code must not reach the
/// network.
const HTTP_STUB: &str =
    "return table.freeze({ request = function() error('no network in fuzzing') end })";

fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// How one program is run (chosen by the input).
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Also run the statements in the init phase (module level), not only in the handler.
    at_init: bool,
    /// Call the handler a second time (same instance) when the first call succeeded.
    twice: bool,
    /// Preempt at about every other safepoint (`set_timeslice(0)`), exercising the
    /// coroutine wrappers of `preempt`.
    chaos_slices: bool,
    /// A blocking cap, as I/O threads set (most inputs: it also ends runaway pattern
    /// matches, which cannot yield, at 50 ms instead of the 200 ms timeout).
    blocking_cap: bool,
}

fuzz_target!(|data: &[u8]| {
    let Some((program, mode)) = program(data) else {
        return;
    };
    if std::env::var_os("VM_SURFACE_PRINT").is_some() {
        eprintln!("-- {mode:?}\n{program}");
    }
    run(&program, mode, !data.starts_with(b"--"));
});

fn run(program: &str, mode: Mode, generated: bool) {
    let mut source = FunctionSource::single(program);
    source
        .files
        .insert("http.lua".to_string(), HTTP_STUB.to_string());
    // Generated code always compiles; mutated seed text may not.
    let compiled = match compile(&source) {
        Ok(compiled) => compiled,
        Err(errors) if generated => panic!("generated code does not compile: {errors:?}"),
        Err(_) => return,
    };
    let compiled = Arc::new(compiled);
    let spec = InstanceSpec {
        function_name: Arc::from("vm"),
        version: 1,
        limits: Limits {
            timeout: TIMEOUT,
            memory_bytes: MEMORY,
            response_body_bytes: RESULT,
            ..Limits::default()
        },
        env: Arc::new(BTreeMap::from([("KEY".to_string(), "value".to_string())])),
        log: Arc::new(Discard),
        kind: UnitKind::Function,
        egress: moontide_runtime::FunctionEgress::none(),
    };
    let started = thread_cpu();
    HARNESS.with(|harness| {
        harness.runtime.block_on(async {
            let instance = match Instance::new(&harness.engine, &compiled, &spec).await {
                Ok(instance) => instance,
                Err(InstanceError::Init(error)) => {
                    stats::record(&format!("init {}", error.kind()));
                    return;
                }
                // A `--program` input need not return a handler.
                Err(InstanceError::NoHandler(_)) if !generated => return,
                Err(other) => panic!("instance setup failed: {other}"),
            };
            if mode.chaos_slices {
                instance.set_timeslice(Duration::ZERO);
            }
            if mode.blocking_cap {
                instance.set_blocking_cap(Some(Duration::from_millis(50)));
            }
            let first = instance.invoke_json(&serde_json::json!({}), "fuzz").await;
            if std::env::var_os("VM_SURFACE_PRINT").is_some() {
                let shown = first.as_ref().map(|json| String::from_utf8_lossy(json));
                eprintln!("-- result: {shown:?}");
            }
            let outcome = first.as_ref().map_or_else(|error| error.kind(), |_| "ok");
            stats::record(outcome);
            if std::env::var("VM_SURFACE_SHOW").is_ok_and(|kind| kind == outcome) {
                eprintln!("-- ended with {outcome} ({first:?}), {mode:?}:\n{program}");
            }
            if mode.twice && first.is_ok() && !instance.is_broken() {
                let _ = instance
                    .invoke_json(&serde_json::json!({"n": 2}), "fuzz2")
                    .await;
            }
            drop(instance);
        });
    });
    let used = thread_cpu() - started;
    assert!(
        used < HANG_CPU,
        "one input used {used:?} of CPU; its calls had a {TIMEOUT:?} timeout"
    );
}

/// The program for one input, or `None` when there is nothing to run.
fn program(data: &[u8]) -> Option<(String, Mode)> {
    if let Some(text) = data.strip_prefix(b"--program") {
        // A whole program, run as it is (to reproduce a printed one).
        let text = std::str::from_utf8(text).ok()?;
        let (title, text) = text.split_once('\n').unwrap_or((text, ""));
        return Some((text.to_string(), mode_from_title(title)));
    }
    if let Some(text) = data.strip_prefix(b"--lua") {
        // The rest of the first line is the seed's title, where the words `init`, `twice`,
        // `chaos` and `nocap` set the mode.
        let text = std::str::from_utf8(text).ok()?;
        let (title, text) = text.split_once('\n').unwrap_or((text, ""));
        let mode = mode_from_title(title);
        return Some((from_text(text, mode), mode));
    }
    let mut u = Unstructured::new(data);
    let flags: u8 = u.arbitrary().unwrap_or(0);
    let mode = Mode {
        at_init: flags & 1 != 0,
        twice: flags & 2 != 0,
        chaos_slices: flags & 12 == 12,
        blocking_cap: flags & 48 != 48,
    };
    let mut generator = Gen {
        u: &mut u,
        fuel: 700,
        names: 0,
        scope: Vec::new(),
    };
    let init = (0..VARS).map(|_| generator.initial()).collect::<Vec<_>>();
    let statements = generator.top_level();
    let result = format!("v{}", generator.n(VARS));
    Some((assemble(&init, &statements, &result, mode), mode))
}

/// The mode a seed's first line asks for.
fn mode_from_title(title: &str) -> Mode {
    let has = |word: &str| title.split_whitespace().any(|w| w == word);
    Mode {
        at_init: has("init"),
        twice: has("twice"),
        chaos_slices: has("chaos"),
        blocking_cap: !has("nocap"),
    }
}

/// How many shared variables (`v0`..) the statements read and write.
const VARS: usize = 8;

/// The program: shared variables, the statements (each in its own `pcall`) in `run`, which
/// the handler (and, with `at_init`, the init phase) calls.
fn assemble(init: &[String], statements: &[String], result: &str, mode: Mode) -> String {
    let mut out = String::new();
    out.push_str(
        "local json, crypto, time, shared, log = require('json'), require('crypto'), \
         require('time'), require('shared'), require('log')\n",
    );
    let names = (0..init.len())
        .map(|i| format!("v{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(&format!("local {names}\n"));
    for (i, value) in init.iter().enumerate() {
        out.push_str(&format!("pcall(function(...) v{i} = {value} end)\n"));
    }
    out.push_str("local function run(...)\n");
    for statement in statements {
        out.push_str(&format!("  pcall(function(...) {statement} end, ...)\n"));
    }
    out.push_str(&format!("  return {result}\nend\n"));
    if mode.at_init {
        out.push_str("pcall(run, 'init')\n");
    }
    out.push_str("return function(event, ctx) return run(event, ctx) end\n");
    out
}

/// Seed text: each line is a statement (`v0`..`v7` are the shared variables; `...` is the
/// event and `ctx`). A line that does not compile on its own is dropped, so mutated text
/// still runs its other lines.
fn from_text(text: &str, mode: Mode) -> String {
    let mut statements = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("--") {
            continue;
        }
        let alone = format!("return function(...) pcall(function(...) {line} end, ...) end");
        if mlua::chunk::Compiler::new().compile(&alone).is_ok() {
            statements.push(line.to_string());
        }
    }
    let init = vec!["nil".to_string(); VARS];
    assemble(&init, &statements, "v0", mode)
}

/// What kind of value an argument should usually be.
#[derive(Clone, Copy, Debug)]
enum Hint {
    /// A number, biased to edge values.
    Num,
    /// A small integer (counts, lengths, bases).
    Small,
    Str,
    Pattern,
    Format,
    PackFormat,
    DateFormat,
    Table,
    Func,
    Comparator,
    Metatable,
    Buffer,
    Coroutine,
    /// A `gsub` replacement: string with captures, table or function.
    Replacement,
    /// An `os.time` table.
    TimeTable,
    Any,
}

use Hint::*;

/// Library functions and the arguments they expect. Calls get these hints most of the
/// time, and sometimes one argument fewer or one more.
const LIBRARY: &[(&str, &[Hint])] = &[
    // string
    ("string.byte", &[Str, Num, Num]),
    ("string.char", &[Num, Num, Num]),
    ("string.find", &[Str, Pattern, Num, Any]),
    ("string.format", &[Format, Any, Any, Any]),
    ("string.gmatch", &[Str, Pattern]),
    ("string.gsub", &[Str, Pattern, Replacement, Num]),
    ("string.len", &[Str]),
    ("string.lower", &[Str]),
    ("string.match", &[Str, Pattern, Num]),
    ("string.rep", &[Str, Num, Str]),
    ("string.reverse", &[Str]),
    ("string.sub", &[Str, Num, Num]),
    ("string.upper", &[Str]),
    ("string.split", &[Str, Str]),
    ("string.pack", &[PackFormat, Num, Str, Num]),
    ("string.packsize", &[PackFormat]),
    ("string.unpack", &[PackFormat, Str, Num]),
    // table
    ("table.concat", &[Table, Str, Num, Num]),
    ("table.insert", &[Table, Num, Any]),
    ("table.insert", &[Table, Any]),
    ("table.remove", &[Table, Num]),
    ("table.unpack", &[Table, Num, Num]),
    ("table.create", &[Num, Any]),
    ("table.find", &[Table, Any, Num]),
    ("table.clear", &[Table]),
    ("table.clone", &[Table]),
    ("table.freeze", &[Table]),
    ("table.isfrozen", &[Table]),
    ("table.sort", &[Table, Comparator]),
    ("table.move", &[Table, Num, Num, Num, Table]),
    ("table.pack", &[Any, Any, Any]),
    ("table.maxn", &[Table]),
    ("table.getn", &[Table]),
    ("table.foreach", &[Table, Func]),
    ("table.foreachi", &[Table, Func]),
    // math
    ("math.abs", &[Num]),
    ("math.ceil", &[Num]),
    ("math.floor", &[Num]),
    ("math.fmod", &[Num, Num]),
    ("math.modf", &[Num]),
    ("math.frexp", &[Num]),
    ("math.ldexp", &[Num, Num]),
    ("math.log", &[Num, Num]),
    ("math.exp", &[Num]),
    ("math.sqrt", &[Num]),
    ("math.pow", &[Num, Num]),
    ("math.max", &[Num, Num, Num]),
    ("math.min", &[Num, Num, Num]),
    ("math.random", &[Num, Num]),
    ("math.randomseed", &[Num]),
    ("math.clamp", &[Num, Num, Num]),
    ("math.sign", &[Num]),
    ("math.round", &[Num]),
    ("math.noise", &[Num, Num, Num]),
    ("math.lerp", &[Num, Num, Num]),
    ("math.map", &[Num, Num, Num, Num, Num]),
    ("math.isnan", &[Num]),
    ("math.isinf", &[Num]),
    ("math.isfinite", &[Num]),
    ("math.atan2", &[Num, Num]),
    ("math.tan", &[Num]),
    // bit32
    ("bit32.arshift", &[Num, Num]),
    ("bit32.band", &[Num, Num, Num]),
    ("bit32.bnot", &[Num]),
    ("bit32.bor", &[Num, Num]),
    ("bit32.btest", &[Num, Num]),
    ("bit32.bxor", &[Num, Num]),
    ("bit32.extract", &[Num, Num, Num]),
    ("bit32.replace", &[Num, Num, Num, Num]),
    ("bit32.lrotate", &[Num, Num]),
    ("bit32.lshift", &[Num, Num]),
    ("bit32.rrotate", &[Num, Num]),
    ("bit32.rshift", &[Num, Num]),
    ("bit32.countlz", &[Num]),
    ("bit32.countrz", &[Num]),
    ("bit32.byteswap", &[Num]),
    // utf8
    ("utf8.char", &[Num, Num, Num]),
    ("utf8.codepoint", &[Str, Num, Num]),
    ("utf8.len", &[Str, Num, Num]),
    ("utf8.offset", &[Str, Num, Num]),
    ("utf8.codes", &[Str]),
    // buffer
    ("buffer.create", &[Small]),
    ("buffer.fromstring", &[Str]),
    ("buffer.tostring", &[Buffer]),
    ("buffer.len", &[Buffer]),
    ("buffer.readi8", &[Buffer, Num]),
    ("buffer.readu8", &[Buffer, Num]),
    ("buffer.readi16", &[Buffer, Num]),
    ("buffer.readu16", &[Buffer, Num]),
    ("buffer.readi32", &[Buffer, Num]),
    ("buffer.readu32", &[Buffer, Num]),
    ("buffer.readf32", &[Buffer, Num]),
    ("buffer.readf64", &[Buffer, Num]),
    ("buffer.writei8", &[Buffer, Num, Num]),
    ("buffer.writeu8", &[Buffer, Num, Num]),
    ("buffer.writei16", &[Buffer, Num, Num]),
    ("buffer.writeu16", &[Buffer, Num, Num]),
    ("buffer.writei32", &[Buffer, Num, Num]),
    ("buffer.writeu32", &[Buffer, Num, Num]),
    ("buffer.writef32", &[Buffer, Num, Num]),
    ("buffer.writef64", &[Buffer, Num, Num]),
    ("buffer.readstring", &[Buffer, Num, Num]),
    ("buffer.writestring", &[Buffer, Num, Str, Num]),
    ("buffer.copy", &[Buffer, Num, Buffer, Num, Num]),
    ("buffer.fill", &[Buffer, Num, Num, Num]),
    ("buffer.readbits", &[Buffer, Num, Num]),
    ("buffer.writebits", &[Buffer, Num, Num, Num]),
    // coroutine
    ("coroutine.create", &[Func]),
    ("coroutine.resume", &[Coroutine, Any, Any]),
    ("coroutine.status", &[Coroutine]),
    ("coroutine.wrap", &[Func]),
    ("coroutine.yield", &[Any, Any]),
    ("coroutine.isyieldable", &[]),
    ("coroutine.running", &[]),
    ("coroutine.close", &[Coroutine]),
    // base
    ("assert", &[Any, Any]),
    ("error", &[Any, Small]),
    ("getmetatable", &[Any]),
    ("setmetatable", &[Table, Metatable]),
    ("ipairs", &[Table]),
    ("pairs", &[Table]),
    ("next", &[Table, Any]),
    ("pcall", &[Func, Any, Any]),
    ("xpcall", &[Func, Func, Any]),
    ("rawequal", &[Any, Any]),
    ("rawget", &[Table, Any]),
    ("rawset", &[Table, Any, Any]),
    ("rawlen", &[Table]),
    ("select", &[Num, Any, Any, Any]),
    ("tonumber", &[Str, Small]),
    ("tostring", &[Any]),
    ("type", &[Any]),
    ("typeof", &[Any]),
    ("unpack", &[Table, Num, Num]),
    ("newproxy", &[Any]),
    ("gcinfo", &[]),
    ("getfenv", &[Small]),
    ("loadstring", &[Str, Str]),
    ("load", &[Str, Str, Str, Table]),
    ("print", &[Any, Any]),
    // os
    ("os.clock", &[]),
    ("os.date", &[DateFormat, Num]),
    ("os.difftime", &[Num, Num]),
    ("os.time", &[TimeTable]),
    ("os.getenv", &[Str]),
    // Moontide's modules
    ("json.encode", &[Any]),
    ("json.decode", &[Str]),
    ("crypto.sha256", &[Str]),
    ("crypto.hmac_sha256", &[Str, Str]),
    ("crypto.base64_encode", &[Str]),
    ("crypto.base64_decode", &[Str]),
    ("crypto.base64url_decode", &[Str]),
    ("crypto.hex_encode", &[Str]),
    ("crypto.hex_decode", &[Str]),
    ("crypto.random_bytes", &[Num]),
    ("crypto.uuid", &[]),
    ("crypto.equal", &[Str, Str]),
    ("time.now", &[]),
    ("time.now_ms", &[]),
    ("time.monotonic_ms", &[]),
    ("time.iso8601", &[Num]),
    ("time.sleep", &[Num]),
    ("shared.get", &[Str]),
    ("shared.set", &[Str, Any, Num]),
    ("shared.incr", &[Str, Num, Num]),
    ("shared.delete", &[Str]),
    ("shared.ttl", &[Str]),
    ("log.info", &[Any, Any]),
    ("log.error", &[Any]),
];

/// String methods callable as `s:name(...)` (the string metatable's `__index`).
const STRING_METHODS: &[(&str, &[Hint])] = &[
    ("byte", &[Num, Num]),
    ("find", &[Pattern, Num, Any]),
    ("format", &[Any, Any]),
    ("gmatch", &[Pattern]),
    ("gsub", &[Pattern, Replacement, Num]),
    ("len", &[]),
    ("lower", &[]),
    ("match", &[Pattern, Num]),
    ("rep", &[Num, Str]),
    ("reverse", &[]),
    ("sub", &[Num, Num]),
    ("upper", &[]),
    ("split", &[Str]),
    ("unpack", &[Str, Num]),
];

/// Numbers at the edges of the C types and floats the library converts to.
const EDGE_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "4",
    "7",
    "8",
    "(-0.0)",
    "0.5",
    "(-0.5)",
    "1.5",
    "31",
    "32",
    "33",
    "(-31)",
    "(-32)",
    "(-33)",
    "63",
    "64",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "(-2147483647)",
    "2147483648",
    "(-2147483648)",
    "(-2147483649)",
    "4294967295",
    "4294967296",
    "(-4294967296)",
    "(2^31-1)",
    "(-2^31)",
    "(2^53)",
    "(-2^53)",
    "(2^53+1)",
    "(-2^53-1)",
    "(2^63)",
    "(-2^63)",
    "(2^64)",
    "1e308",
    "(-1e308)",
    "1e-310",
    "math.huge",
    "(-math.huge)",
    "(0/0)",
    "(-(0/0))",
    "0x7fffffff",
    "0xffffffff",
    "0x10FFFF",
    "0x110000",
    "0xD800",
    "(2^24)",
    "(2^24+1)",
    "1e6",
    "1e9",
    "0.1",
    "(1/3)",
    "(-1e-300)",
    "(2^-1074)",
    "#v0",
    "select('#', ...)",
];

/// Strings the library treats specially.
const EDGE_STRINGS: &[&str] = &[
    "",
    "a",
    "abc",
    "hello world",
    "\0",
    "\u{0}\u{0}\u{0}",
    "\u{ff}\u{fe}",
    "%",
    "%%",
    "123",
    " 0x1F ",
    "1e5",
    "-0",
    "inf",
    "nan",
    "0x",
    "1e400",
    "\u{10FFFF}",
    "\u{7FF}\u{800}",
    "h\u{e9}llo \u{20ac}",
    "a,b,,c",
    ",",
    "...",
    "\n",
    "\\",
    "KEY",
    "collect",
    "count",
    "step",
    "__index",
    "#",
    "(())",
    "[[]]",
    "return 1",
    "return ...",
    "error('x')",
    "while true do end",
    "{\"a\":[1,2,{\"b\":null}],\"c\":1e400}",
    "[1,2,3",
    "\"\\ud800\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "=",
    "YWJj",
    "!!",
    "zz",
    "616263",
];

/// Raw bytes that are not valid UTF-8 (escaped when emitted).
const EDGE_BYTES: &[&[u8]] = &[
    b"\xF4\x90\x80\x80",
    b"\xC0\x80",
    b"\xED\xA0\x80",
    b"\xFF",
    b"\xE2\x82",
    b"\x80\x80\x80",
    b"\xF0\x9F\x98\x80\xF0",
];

const PATTERN_ATOMS: &[&str] = &[
    "(",
    ")",
    "()",
    "%b()",
    "%b%%",
    "%bxy",
    "%f[%a]",
    "%f[^%z]",
    "%f[%w_]",
    "%f[]",
    ".",
    "-",
    "*",
    "+",
    "?",
    "%d",
    "%w",
    "%s",
    "%a",
    "%p",
    "%c",
    "%x",
    "%g",
    "%u",
    "%l",
    "%z",
    "[a-c]",
    "[^%s]",
    "[%]]",
    "[a-]",
    "[^]",
    "[",
    "]",
    "%1",
    "%2",
    "%0",
    "%9",
    "a",
    "b",
    "^",
    "$",
    "%",
    "%.",
    "%%",
    "(.-)",
    "(.*)",
    "((a)(b))",
    "(%w+)",
    "%S+",
    "[\0-\u{7f}]",
];

const FORMAT_CONVERSIONS: &[&str] = &[
    "d", "i", "c", "o", "u", "x", "X", "e", "E", "f", "g", "G", "q", "s", "a", "A", "%", "*", "l",
    "ld", "z",
];

const PACK_ITEMS: &[&str] = &[
    "b",
    "B",
    "h",
    "H",
    "i",
    "I",
    "l",
    "L",
    "j",
    "J",
    "T",
    "f",
    "d",
    "n",
    "s",
    "z",
    "x",
    "<",
    ">",
    "=",
    "!",
    "i1",
    "i3",
    "i4",
    "i8",
    "i16",
    "i17",
    "i0",
    "I7",
    "s1",
    "s2",
    "s4",
    "s9",
    "c0",
    "c1",
    "c10",
    "c2147483647",
    "!1",
    "!4",
    "!16",
    "!3",
    "Xi4",
    "X",
    "Xi16",
    " ",
];

const DATE_FORMATS: &[&str] = &[
    "*t",
    "!*t",
    "%c",
    "!%c",
    "%Y-%m-%d %H:%M:%S",
    "%x",
    "%X",
    "%p",
    "%j",
    "%U",
    "%Ez",
    "%E",
    "%",
    "%%",
    "%Q",
    "!%Y",
    "",
    "%a %A %b %B %d",
    "!",
];

const FIELD_NAMES: &[&str] = &["x", "n", "__index", "1", "len", "_G", "string", "self"];

const METAMETHODS: &[&str] = &[
    "__index",
    "__newindex",
    "__call",
    "__add",
    "__sub",
    "__concat",
    "__eq",
    "__lt",
    "__le",
    "__len",
    "__unm",
    "__tostring",
    "__iter",
    "__idiv",
    "__mod",
    "__namecall",
    "__close",
    "__gc",
];

const BINARY_OPS: &[&str] = &[
    "+", "-", "*", "/", "//", "%", "^", "..", "==", "~=", "<", "<=", ">", ">=", "and", "or",
];

/// The program generator: a small Lua grammar driven by the input's bytes. Generated text
/// always compiles: every expression is parenthesised where precedence could matter,
/// statements are separated by `;`, every loop is bounded by its own counter, `...` is
/// only used in vararg functions (all generated functions are).
struct Gen<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    /// Nodes left to generate; when it runs out everything becomes an atom.
    fuel: u32,
    /// Counter for fresh local names.
    names: u32,
    /// Local names visible here, besides the shared `v0`.. (parameters, loop variables).
    scope: Vec<String>,
}

impl Gen<'_, '_> {
    /// An index below `n` (0 when the input is used up).
    fn n(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        self.u.choose_index(n).unwrap_or(0)
    }

    fn coin(&mut self, numerator: u8, denominator: u8) -> bool {
        self.u.ratio(numerator, denominator).unwrap_or(false)
    }

    /// Takes one unit of fuel; `false` when none is left.
    fn spend(&mut self) -> bool {
        if self.fuel == 0 {
            return false;
        }
        self.fuel -= 1;
        true
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    fn var(&mut self) -> String {
        let locals = self.scope.len();
        let i = self.n(VARS + locals);
        if i < VARS {
            format!("v{i}")
        } else {
            self.scope[i - VARS].clone()
        }
    }

    fn top_level(&mut self) -> Vec<String> {
        let count = 1 + self.n(24);
        (0..count).map(|_| self.statement(3)).collect()
    }

    /// An initial value for a shared variable.
    fn initial(&mut self) -> String {
        match self.n(12) {
            0 => "{}".into(),
            1 => self.string_literal(),
            2 => self.number(),
            3 => format!("buffer.create({})", self.n(33)),
            4 => format!("coroutine.create({})", self.function(2)),
            5 => format!("setmetatable({{}}, {})", self.metatable(2)),
            6 => "newproxy(true)".into(),
            7 => self.function(2),
            8 => format!("table.create({}, {})", self.n(40), self.atom()),
            9 => self.table_constructor(2),
            10 => format!("coroutine.wrap({})", self.function(2)),
            _ => "nil".into(),
        }
    }

    fn block(&mut self, depth: u32) -> String {
        let count = 1 + self.n(4);
        (0..count)
            .map(|_| self.statement(depth))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn statement(&mut self, depth: u32) -> String {
        if depth == 0 || !self.spend() {
            let target = self.var();
            let value = self.atom();
            return format!("{target} = {value}");
        }
        let d = depth - 1;
        match self.n(20) {
            0..=2 => {
                let target = self.var();
                let value = self.expr(d + 1);
                format!("{target} = {value}")
            }
            3..=6 => self.library_call(d + 1),
            7 => {
                let target = self.var();
                let op = ["+=", "-=", "*=", "/=", "//=", "%=", "^=", "..="][self.n(8)];
                let value = self.expr(d);
                format!("{target} {op} {value}")
            }
            8 => {
                let target = self.var();
                let key = self.key(d);
                let value = self.expr(d);
                format!("{target}[{key}] = {value}")
            }
            9 => self.numeric_for(d),
            10 => self.generic_for(d),
            11 => {
                let guard = self.fresh("g");
                let condition = self.expr(d);
                let body = self.block(d);
                if self.coin(1, 2) {
                    format!(
                        "local {guard} = 0; while {condition} do {guard} += 1; if {guard} > 40 then break end; {body} end"
                    )
                } else {
                    format!(
                        "local {guard} = 0; repeat {guard} += 1; if {guard} > 40 then break end; {body} until {condition}"
                    )
                }
            }
            12 => {
                let condition = self.expr(d);
                let then = self.block(d);
                let otherwise = self.block(d);
                format!("if {condition} then {then} else {otherwise} end")
            }
            13 => {
                // Recursion, bounded by its argument (or not: stack overflow is an error).
                let name = self.fresh("f");
                let target = self.var();
                let value = self.expr(d);
                let n = ["3", "10", "200", "1e4", "(0/0)", "(-1)"][self.n(6)];
                format!(
                    "local function {name}(n, ...) if n > 0 then return {name}(n - 1, ...) end; return {value} end; {target} = {name}({n}, ...)"
                )
            }
            14 => {
                let target = self.var();
                let body = self.function(d);
                let make = ["coroutine.create", "coroutine.wrap"][self.n(2)];
                format!("{target} = {make}({body})")
            }
            15 => {
                let target = self.var();
                let metatable = self.metatable(d);
                format!("setmetatable({target}, {metatable})")
            }
            16 => {
                let value = self.expr(d);
                let level = ["", ", 0", ", 1", ", 2", ", 3", ", -1", ", 2^31"][self.n(7)];
                format!("error({value}{level})")
            }
            17 => {
                // Odd coroutine orders on the shared variables.
                let co = self.var();
                let args = self.arguments(&[Any, Any], d);
                match self.n(6) {
                    0 => format!("coroutine.resume({co}{args})"),
                    1 => format!("coroutine.close({co})"),
                    2 => format!("{co}({})", args.trim_start_matches(", ")),
                    3 => format!(
                        "coroutine.resume({co}, coroutine.close({co}), coroutine.status({co}))"
                    ),
                    4 => format!(
                        "coroutine.resume(coroutine.running()); coroutine.close(coroutine.running())"
                    ),
                    _ => format!("coroutine.yield({})", args.trim_start_matches(", ")),
                }
            }
            18 => {
                let call = self.method_call(d);
                format!("local _ = {call}")
            }
            _ => {
                let target = self.var();
                let value = self.expr(d);
                format!("{target} = pcall(function(...) return {value} end, ...)")
            }
        }
    }

    fn numeric_for(&mut self, d: u32) -> String {
        let i = self.fresh("i");
        let guard = self.fresh("g");
        let (from, to, step) = match self.n(4) {
            0 => (self.n(3).to_string(), self.n(12).to_string(), String::new()),
            1 => (self.number(), self.number(), String::new()),
            2 => (self.number(), self.number(), format!(", {}", self.number())),
            _ => (self.expr(d), self.expr(d), String::new()),
        };
        self.scope.push(i.clone());
        let body = self.block(d);
        self.scope.pop();
        format!(
            "local {guard} = 0; for {i} = {from}, {to}{step} do {guard} += 1; if {guard} > 40 then break end; {body} end"
        )
    }

    fn generic_for(&mut self, d: u32) -> String {
        let k = self.fresh("k");
        let v = self.fresh("v");
        let guard = self.fresh("g");
        let source = match self.n(8) {
            0 => format!("pairs({})", self.table(d)),
            1 => format!("ipairs({})", self.table(d)),
            2 => format!("next, {}", self.table(d)),
            3 => format!("string.gmatch({}, {})", self.string(d), self.pattern()),
            4 => format!("utf8.codes({})", self.string(d)),
            5 => self.var(), // generalized iteration (tables, `__iter`, functions)
            6 => format!("{}, {}, {}", self.function(d), self.atom(), self.atom()),
            _ => self.expr(d),
        };
        self.scope.push(k.clone());
        self.scope.push(v.clone());
        let body = self.block(d);
        self.scope.truncate(self.scope.len() - 2);
        format!(
            "local {guard} = 0; for {k}, {v} in {source} do {guard} += 1; if {guard} > 40 then break end; {body} end"
        )
    }

    fn expr(&mut self, depth: u32) -> String {
        if depth == 0 || !self.spend() {
            return self.atom();
        }
        let d = depth - 1;
        match self.n(18) {
            0..=1 => self.atom(),
            2..=5 => self.library_call(d),
            6 => {
                let left = self.expr(d);
                let op = BINARY_OPS[self.n(BINARY_OPS.len())];
                let right = self.expr(d);
                format!("({left} {op} {right})")
            }
            7 => {
                let op = ["-", "not ", "#"][self.n(3)];
                let operand = self.expr(d);
                format!("({op}({operand}))")
            }
            8 => self.table_constructor(d),
            9 => self.function(d),
            10 => self.method_call(d),
            11 => {
                let object = self.expr(d);
                if self.coin(1, 2) {
                    let key = self.key(d);
                    format!("({object})[{key}]")
                } else {
                    let field = FIELD_NAMES[self.n(FIELD_NAMES.len())];
                    if field.chars().all(|c| c.is_ascii_alphabetic() || c == '_') {
                        format!("({object}).{field}")
                    } else {
                        format!("({object})[{field}]")
                    }
                }
            }
            12 => {
                let callee = self.var();
                let args = self.arguments(&[Any, Any, Any], d);
                format!("{callee}({})", args.trim_start_matches(", "))
            }
            13 => {
                let condition = self.expr(d);
                let then = self.expr(d);
                let otherwise = self.expr(d);
                format!("(if {condition} then {then} else {otherwise})")
            }
            14 => {
                let a = self.expr(d);
                let b = self.expr(d);
                format!("`{{ {a} }}:{{ {b} }}`")
            }
            15 => {
                let n = self.number();
                let args = self.arguments(&[Any, Any, Any, Any], d);
                match self.n(4) {
                    0 => format!("select({n}{args})"),
                    1 => format!("select({n}, ...)"),
                    2 => format!("select('#'{args})"),
                    _ => format!(
                        "select({n}, table.unpack({}, 1, {}))",
                        self.table(d),
                        self.number()
                    ),
                }
            }
            16 => {
                let f = self.function(d);
                let args = self.arguments(&[Any, Any], d);
                if self.coin(1, 2) {
                    format!("pcall({f}{args})")
                } else {
                    let handler = self.function(d);
                    format!("xpcall({f}, {handler}{args})")
                }
            }
            _ => {
                // Round-trips through the bridge and tostring of odd values.
                let value = self.expr(d);
                ["tostring", "json.encode", "typeof", "tonumber"][self.n(4)].to_string()
                    + &format!("({value})")
            }
        }
    }

    fn atom(&mut self) -> String {
        match self.n(10) {
            0..=2 => self.var(),
            3..=4 => self.number(),
            5..=6 => self.string_literal(),
            7 => ["nil", "true", "false", "..."][self.n(4)].into(),
            8 => "{}".into(),
            _ => [
                "string",
                "table",
                "math.pi",
                "utf8.charpattern",
                "print",
                "coroutine.running()",
                "json.null",
                "ctx",
                "_G",
                "getfenv()",
            ][self.n(10)]
            .into(),
        }
    }

    fn number(&mut self) -> String {
        match self.n(10) {
            0..=4 => EDGE_NUMBERS[self.n(EDGE_NUMBERS.len())].into(),
            // Small ones, so that an extreme argument often meets ordinary others (a
            // crash usually needs one odd value, not all of them).
            5..=6 => ["0", "1", "1", "2", "3", "(-1)"][self.n(6)].into(),
            7 => {
                let v: i32 = self.u.arbitrary().unwrap_or(0);
                if v < 0 {
                    format!("({v})")
                } else {
                    v.to_string()
                }
            }
            8 => {
                let v: f64 = self.u.arbitrary().unwrap_or(0.0);
                if v.is_nan() {
                    "(0/0)".into()
                } else if v.is_infinite() {
                    if v > 0.0 { "math.huge" } else { "(-math.huge)" }.into()
                } else {
                    format!("({v:?})")
                }
            }
            _ => {
                // Near a power of two.
                let exponent = [8, 15, 16, 24, 31, 32, 52, 53, 63, 64, 1023, 1024][self.n(12)];
                let offset = ["", "-1", "+1", "-0.5"][self.n(4)];
                let sign = ["", "-"][self.n(2)];
                format!("({sign}2^{exponent}{offset})")
            }
        }
    }

    fn small(&mut self) -> String {
        match self.n(4) {
            0..=2 => self.n(40).to_string(),
            _ => self.number(),
        }
    }

    fn string_literal(&mut self) -> String {
        let bytes: Vec<u8> = match self.n(8) {
            0..=3 => EDGE_STRINGS[self.n(EDGE_STRINGS.len())].as_bytes().to_vec(),
            4 => EDGE_BYTES[self.n(EDGE_BYTES.len())].to_vec(),
            5 => {
                let len = self.n(17);
                self.u.bytes(len).map(<[u8]>::to_vec).unwrap_or_default()
            }
            6 => self.pattern_text().into_bytes(),
            _ => {
                let base = EDGE_STRINGS[self.n(EDGE_STRINGS.len())];
                base.repeat(1 + self.n(40)).into_bytes()
            }
        };
        lua_string(&bytes)
    }

    fn pattern_text(&mut self) -> String {
        let count = 1 + self.n(6);
        (0..count)
            .map(|_| PATTERN_ATOMS[self.n(PATTERN_ATOMS.len())])
            .collect()
    }

    fn pattern(&mut self) -> String {
        if self.coin(1, 8) {
            return self.atom();
        }
        let text = self.pattern_text();
        lua_string(text.as_bytes())
    }

    fn format_string(&mut self) -> String {
        let mut text = String::new();
        for _ in 0..1 + self.n(3) {
            if self.coin(1, 4) {
                text.push_str(["x", " ", "%%", "\0"][self.n(4)]);
            }
            text.push('%');
            for _ in 0..self.n(3) {
                text.push(['-', '+', ' ', '#', '0'][self.n(5)]);
            }
            text.push_str(["", "5", "10", "99", "100", "0", "*", "2147483647"][self.n(8)]);
            if self.coin(1, 3) {
                text.push('.');
                text.push_str(["", "0", "3", "99", "100", "*"][self.n(6)]);
            }
            text.push_str(FORMAT_CONVERSIONS[self.n(FORMAT_CONVERSIONS.len())]);
        }
        lua_string(text.as_bytes())
    }

    fn pack_format(&mut self) -> String {
        let count = 1 + self.n(5);
        let text: Vec<&str> = (0..count)
            .map(|_| PACK_ITEMS[self.n(PACK_ITEMS.len())])
            .collect();
        lua_string(text.join("").as_bytes())
    }

    fn string(&mut self, d: u32) -> String {
        match self.n(6) {
            0..=2 => self.string_literal(),
            3 => self.var(),
            4 => format!(
                "string.rep({}, {})",
                self.string_literal(),
                // Big strings past the memory cap fail fast; middling ones make pattern
                // matches run to the timeout, so they are rare.
                ["10", "100", "1000", "2^24", "2^31", "10", "100", "65536"][self.n(8)]
            ),
            _ => self.expr(d),
        }
    }

    fn key(&mut self, d: u32) -> String {
        match self.n(4) {
            0..=1 => self.number(),
            2 => self.string_literal(),
            _ => self.expr(d),
        }
    }

    fn table(&mut self, d: u32) -> String {
        match self.n(6) {
            0..=1 => self.var(),
            2..=3 => self.table_constructor(d),
            4 => format!(
                "table.create({}, {})",
                ["0", "1", "8", "100", "1e5"][self.n(5)],
                self.atom()
            ),
            _ => self.expr(d),
        }
    }

    fn table_constructor(&mut self, d: u32) -> String {
        let count = self.n(6);
        let mut entries = Vec::new();
        for _ in 0..count {
            entries.push(match self.n(4) {
                0..=1 => self.expr(d),
                2 => format!("[{}] = {}", self.key(d), self.expr(d)),
                _ => {
                    let field = FIELD_NAMES[self.n(FIELD_NAMES.len())];
                    let value = self.expr(d);
                    if field.chars().all(|c| c.is_ascii_alphabetic() || c == '_') {
                        format!("{field} = {value}")
                    } else {
                        format!("[{field}] = {value}")
                    }
                }
            });
        }
        if self.coin(1, 6) {
            entries.push("...".into());
        }
        format!("{{{}}}", entries.join(", "))
    }

    /// A function literal: `function(a, b, ...) <block>; return <expr> end`.
    fn function(&mut self, d: u32) -> String {
        let a = self.fresh("a");
        let b = self.fresh("b");
        self.scope.push(a.clone());
        self.scope.push(b.clone());
        let body = if d > 0 && self.coin(1, 2) {
            self.block(d - 1) + "; "
        } else {
            String::new()
        };
        let result = match self.n(4) {
            0 => format!("{a}, {b}, ..."),
            1 => format!("coroutine.yield({a}, ...)"),
            _ => self.expr(d.saturating_sub(1)),
        };
        self.scope.truncate(self.scope.len() - 2);
        format!("(function({a}, {b}, ...) {body}return {result} end)")
    }

    /// A `table.sort` comparator, often inconsistent.
    fn comparator(&mut self, d: u32) -> String {
        match self.n(8) {
            0 => "function(a, b) return true end".into(),
            1 => "function(a, b) return a <= b end".into(),
            2 => "function(a, b) return math.random() < 0.5 end".into(),
            3 => "function(a, b) error(b) end".into(),
            4 => "function(a, b) coroutine.yield(a) return a < b end".into(),
            5 => "function(a, b) return a > b end".into(),
            6 => "function(a, b) v0 = {} return false end".into(),
            _ => self.function(d),
        }
    }

    fn metatable(&mut self, d: u32) -> String {
        let count = 1 + self.n(4);
        let mut entries = Vec::new();
        for _ in 0..count {
            let name = METAMETHODS[self.n(METAMETHODS.len())];
            let value = match self.n(6) {
                0..=2 => self.function(d),
                3 => self.table(d),
                4 => self.var(),
                _ => self.atom(),
            };
            entries.push(format!("{name} = {value}"));
        }
        if self.coin(1, 4) {
            let mode = ["'k'", "'v'", "'kv'", "'s'", "1"][self.n(5)];
            entries.push(format!("__mode = {mode}"));
        }
        if self.coin(1, 6) {
            entries.push(format!("__metatable = {}", self.atom()));
        }
        format!("{{{}}}", entries.join(", "))
    }

    fn buffer(&mut self, d: u32) -> String {
        match self.n(5) {
            0..=1 => self.var(),
            2 => format!(
                "buffer.create({})",
                ["0", "1", "4", "8", "16", "1000"][self.n(6)]
            ),
            3 => format!("buffer.fromstring({})", self.string_literal()),
            _ => self.expr(d),
        }
    }

    fn coroutine(&mut self, d: u32) -> String {
        match self.n(4) {
            0..=1 => self.var(),
            2 => format!("coroutine.create({})", self.function(d)),
            _ => "coroutine.running()".into(),
        }
    }

    fn replacement(&mut self, d: u32) -> String {
        match self.n(5) {
            0 => lua_string(["%0", "%1", "%2%1", "%", "%%", "%9", "x%0x"][self.n(7)].as_bytes()),
            1 => self.table(d),
            2 => self.function(d),
            _ => self.string(d),
        }
    }

    fn time_table(&mut self, d: u32) -> String {
        let mut fields = Vec::new();
        for name in ["year", "month", "day", "hour", "min", "sec"] {
            if self.coin(3, 4) {
                let value = if self.coin(1, 2) {
                    self.number()
                } else {
                    self.small()
                };
                fields.push(format!("{name} = {value}"));
            }
        }
        if self.coin(1, 4) {
            fields.push(format!("isdst = {}", self.expr(d)));
        }
        format!("{{{}}}", fields.join(", "))
    }

    fn argument(&mut self, hint: Hint, d: u32) -> String {
        // Now and then anything at all, for type confusion.
        if self.coin(1, 10) {
            return self.expr(d);
        }
        match hint {
            Num => self.number(),
            Small => self.small(),
            Str => self.string(d),
            Pattern => self.pattern(),
            Format => self.format_string(),
            PackFormat => self.pack_format(),
            DateFormat => lua_string(DATE_FORMATS[self.n(DATE_FORMATS.len())].as_bytes()),
            Table => self.table(d),
            Func => self.function(d),
            Comparator => self.comparator(d),
            Metatable => self.metatable(d),
            Buffer => self.buffer(d),
            Coroutine => self.coroutine(d),
            Replacement => self.replacement(d),
            TimeTable => self.time_table(d),
            Any => self.expr(d),
        }
    }

    /// `, a, b, …` for these hints (sometimes one fewer or one more).
    fn arguments(&mut self, hints: &[Hint], d: u32) -> String {
        let mut count = hints.len();
        match self.n(6) {
            0 if count > 0 => count -= 1,
            1 => count += 1,
            _ => {}
        }
        let mut out = String::new();
        for i in 0..count {
            let hint = hints.get(i).copied().unwrap_or(Any);
            out.push_str(", ");
            out.push_str(&self.argument(hint, d));
        }
        out
    }

    fn library_call(&mut self, d: u32) -> String {
        let (name, hints) = LIBRARY[self.n(LIBRARY.len())];
        let args = self.arguments(hints, d);
        format!("{name}({})", args.trim_start_matches(", "))
    }

    fn method_call(&mut self, d: u32) -> String {
        let (name, hints) = STRING_METHODS[self.n(STRING_METHODS.len())];
        let receiver = self.string(d);
        let args = self.arguments(hints, d);
        format!("({receiver}):{name}({})", args.trim_start_matches(", "))
    }
}

/// A Lua string literal holding exactly `bytes`.
fn lua_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &byte in bytes {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(byte as char),
            _ => out.push_str(&format!("\\x{byte:02x}")),
        }
    }
    out.push('"');
    out
}

/// With `VM_SURFACE_STATS=1`, how calls ended, printed every 1000 calls.
mod stats {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static COUNTS: RefCell<BTreeMap<String, u64>> = const { RefCell::new(BTreeMap::new()) };
    }

    pub fn record(outcome: &str) {
        if std::env::var_os("VM_SURFACE_STATS").is_none() {
            return;
        }
        COUNTS.with_borrow_mut(|counts| {
            *counts.entry(outcome.to_string()).or_default() += 1;
            let total: u64 = counts.values().sum();
            if total % 1000 == 0 {
                eprintln!("vm_surface calls: {counts:?}");
            }
        });
    }
}
