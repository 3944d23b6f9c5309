//! The built-in modules a function can `require`: `json`, `crypto`, `time`, `shared`,
//! `log`, `http`, `redis` and `db`. Each module file (or folder) owns one module table and
//! nothing else; the sandbox (`crate::sandbox`) decides which of them a function may load.

pub mod crypto;
pub mod db;
pub mod http;
pub mod json;
pub mod log;
pub mod redis;
pub mod shared;
pub mod time;
