//! Triggers that start calls without a client request. Today: schedules (`scheduler`,
//! and `runs`, their records in the store). Later: queues and event sources.

pub mod runs;
pub mod scheduler;
