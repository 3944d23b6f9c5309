//! Moontide's cluster membership: the node registry, the node-count signal Kubernetes
//! scales on, and waiting until every node serves a write.
//!
//! Every node keeps one [`NodeRecord`] in the store's [`Membership`] under a lease
//! ([`registrar`]): its addresses, version, state (starting, ready, draining), the config
//! revision it serves and its load. A node that dies stops renewing the lease, and its
//! record expires with it. From the live records:
//!
//! - `GET /v1/nodes` lists the cluster;
//! - [`demand`] sums the nodes' load into how many nodes the cluster needs
//!   ([`Scaling`]), the value KEDA's `metrics-api` trigger and the HPA's external metric
//!   read;
//! - [`wait`] tells when every live node serves a given revision (`?wait=cluster` on
//!   admin writes).
//!
//! On the embedded store the registry is the node alone ([`moontide_store::LocalMembership`]);
//! on etcd it is every node sharing that etcd. This crate knows nothing of HTTP, pools or
//! Lua: the node hands it a [`LoadSample`] when asked.
//!
//! [`Membership`]: moontide_store::Membership

#![forbid(unsafe_code)]

pub mod demand;
pub mod record;
pub mod registrar;
pub mod wait;

pub use demand::{LoadMeter, LoadSample, Scaling};
pub use record::{NodeLoad, NodeRecord, NodeState};
