//! The `keel` command-line binary: argument parsing and dispatch only. Node logic lives in
//! `keel-node`; each subcommand is a module of this crate.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod bench;
mod client;
mod commands;
mod logging;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole cause chain, no backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
