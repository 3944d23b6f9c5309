//! The `moontide` command (DESIGN.md §3). `serve` runs a node in this process; every other
//! command is a thin client of a node's admin API (see `client`; `apply` for manifests).

mod apply;
mod cli;
mod client;
mod config_file;
mod render;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = match config_file::expand(std::env::args_os().collect()) {
        Ok(args) => cli::Cli::parse_from(args),
        Err(message) => {
            eprintln!("error: {message}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("moontide-admin")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
