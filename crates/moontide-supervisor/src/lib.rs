//! Moontide's process supervisor, and what it learns when the node dies.
//!
//! Luau's sandbox is not formally proven; a VM bug a tenant can trigger kills the process
//! that runs it. So `moontide serve` is two processes: this crate's [`supervise`] holds
//! the listening sockets and runs the node as a child; the node records in a shared
//! [`recorder`] which function version each thread is running; when the child dies of a
//! signal the supervisor reads the recorder, counts the crash in the [`ledger`] (which
//! quarantines a version at its second crash) and starts the next child on the same
//! sockets. Everything a single process gives — one health state per upstream node, one
//! `shared` dictionary, one `/metrics`, one instance budget — stays in the one node
//! process (ARCHITECTURE.md, "Isolation").
//!
//! Depends on no other Moontide crate: the runtime marks its resumes through
//! [`recorder::running`], the server reads the [`ledger`], the binary runs [`supervise`].

// The unsafe code is the recorder's mapping and signal handler, and taking the inherited
// listener descriptors; each block says why it is sound.
#![deny(unsafe_code)]

pub mod ledger;
#[allow(unsafe_code)]
pub mod recorder;
#[allow(unsafe_code)]
pub mod supervise;
