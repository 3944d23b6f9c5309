//! Moontide's Lua runtime: everything that touches a Lua state lives in this crate.
//!
//! The life of a function, in the terms of wasmtime's `Engine → Module → Store`:
//!
//! - [`Engine`] — one per node: the node-wide `shared` dictionary, the outbound HTTP
//!   clients (one per egress policy, see [`egress`]), the coarse clock that limits read.
//! - [`compile`] → [`CompiledFunction`] — once per deployed version: every file of the
//!   bundle is compiled to Luau bytecode; syntax errors come back with file and line. A
//!   compiled function is immutable and shared (`Arc`) by every instance on every thread.
//! - [`Instance`] — one sandboxed Luau state running one version of one function. Created
//!   from the bytecode (no parsing), it runs the module-level (init) code once, then serves
//!   calls one at a time. Before each call the limits are set: a wall-clock deadline
//!   enforced by the interrupt and a timer, and a memory cap on the whole state.
//!
//! The function contract (DESIGN.md §1) — how a JSON payload or an HTTP request becomes
//! the `event`, and how the handler's result becomes a response — is in [`contract`].
//!
//! Outbound `http` calls obey the [`egress`] policy: loopback, private, link-local and
//! metadata addresses (in every spelling) and the node's own listeners are refused unless
//! an allowlist opens them; the node tells the [`Engine`] its listeners and allowlist.
//!
//! The `redis` module (`modules::redis`) talks to the node's Redis (`serve --redis`), the
//! operator's address, outside the egress policy, over a connection pool per thread.
//!
//! This crate knows nothing about sockets (but the outbound connections of `http` and
//! `redis`), routing or storage: it turns an event into a result under limits. Backend-specific code (Luau sandboxing, interrupt, memory
//! accounting) is confined to [`sandbox`] and `watchdog` (the crate's only `unsafe`: it
//! arms Luau's interrupt only when a call's timeslice or deadline is due, so limits cost
//! a CPU-bound function nothing until then).

// The one exception is `watchdog`, which arms Luau's interrupt through its C API.
#![deny(unsafe_code)]

pub mod clock;
pub mod compile;
pub mod contract;
pub mod egress;
mod engine;
mod fairness;
pub mod guards;
mod instance;
mod limits;
mod lua_errors;
pub mod modules;
pub mod plugin;
mod preempt;
pub mod sandbox;
#[allow(unsafe_code)]
mod watchdog;

pub use compile::{CompileError, CompiledFunction, FunctionSource, compile};
pub use contract::{HttpRequest, HttpResponse, OutputError};
pub use engine::{Engine, EngineConfig, FunctionEgress};
pub use instance::{
    CallError, CallStats, INIT_REQUEST_ID, Instance, InstanceError, InstanceSpec, LogLevel,
    LogSink, UnitKind,
};
pub use limits::Limits;

/// Installs the process-wide TLS crypto provider (ring) for outbound HTTPS; idempotent.
/// Returns `true` if this call installed it.
pub fn install_crypto_provider() -> bool {
    rustls::crypto::ring::default_provider()
        .install_default()
        .is_ok()
}
