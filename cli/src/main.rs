//! The `keel` command-line binary: argument parsing and dispatch only. Node logic lives in
//! `keel-node`; each subcommand is a module of this crate.

#![allow(clippy::print_stdout, clippy::print_stderr)]

/// `println!` for command output: a reader that went away (`keel keys show | head -1`) ends
/// the command quietly, as in other Unix tools, instead of a panic on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

/// Writes one line of command output to stdout; on a closed pipe, exits at once (status 0:
/// the reader had what it wanted).
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

mod args;
mod bench;
mod client;
mod commands;
mod loadgen;
mod logging;
mod prove;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`): heap profiling ready but inactive.
/// `prof:true` can only be chosen at start; sampling stays off (`prof_active:false`, no cost
/// measurable) unless `[metrics] profiling = true` switches it on (`keel_node::profiling`).
/// `MALLOC_CONF` (`_RJEM_MALLOC_CONF` where jemalloc is prefixed) is read after this and
/// overrides it.
#[allow(unsafe_code, non_upper_case_globals)] // exported by name, as jemalloc looks it up
#[cfg_attr(
    any(
        target_os = "android",
        target_os = "dragonfly",
        target_vendor = "apple"
    ),
    export_name = "_rjem_malloc_conf"
)]
#[cfg_attr(
    not(any(
        target_os = "android",
        target_os = "dragonfly",
        target_vendor = "apple"
    )),
    export_name = "malloc_conf"
)]
pub static malloc_conf: &[u8; 28] = b"prof:true,prof_active:false\0";

fn main() -> ExitCode {
    if let Err(e) = check_cpu() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
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

/// RocksDB is compiled with SSE4.2 and PCLMUL on x86-64 (its log checksums: see
/// `.cargo/config.toml`); say so plainly instead of dying of an illegal instruction later.
fn check_cpu() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        let missing: Vec<&str> = [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            (
                "pclmulqdq",
                std::arch::is_x86_feature_detected!("pclmulqdq"),
            ),
        ]
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(format!(
                "this CPU lacks {} (x86-64-v2), which this build of keel needs; build on it \
                 after removing the CXXFLAGS line of .cargo/config.toml",
                missing.join(" and ")
            ));
        }
    }
    Ok(())
}
