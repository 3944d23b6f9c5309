//! Moontide's gateway logic, kept free of I/O so that it can be tested exhaustively and
//! shared by every worker thread: the routing table (which route a request matches) and
//! the load-balancing state of upstreams (which node serves it, and whether a node is
//! healthy or its circuit open). The server crate owns sockets, timers and config; this
//! crate answers questions about them.

#![forbid(unsafe_code)]

pub mod balance;
pub mod path;
pub mod router;
