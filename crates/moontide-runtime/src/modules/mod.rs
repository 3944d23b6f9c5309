//! The built-in modules a function can `require`: `json`, `crypto`, `time`, `shared`,
//! `log` and `http`. Each module file owns one module table and nothing else; the
//! sandbox (`crate::sandbox`) decides which of them a function may load.

pub mod crypto;
pub mod http;
pub mod json;
pub mod log;
pub mod shared;
pub mod time;
