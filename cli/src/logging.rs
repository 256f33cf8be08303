//! tracing setup from the `[log]` section. `RUST_LOG`, when set and not blank, replaces
//! `[log] level`; both are parsed by `tracing_subscriber`'s `EnvFilter`, and both get the
//! node's quiet defaults (`libp2p_gossipsub=error`) for the targets they do not name
//! (`keel_node::config::with_quiet_defaults`).

use anyhow::{anyhow, Result};
use keel_node::config::{with_quiet_defaults, LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber.
pub fn init(log: &LogConfig) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        // RUST_LOG keeps the meaning it has for any tracing program, EnvFilter's syntax as
        // is; only targets it does not name get the quiet defaults.
        Ok(v) if !v.trim().is_empty() => EnvFilter::builder()
            .parse(with_quiet_defaults(&v))
            .map_err(|e| anyhow!("RUST_LOG \"{v}\": {e}"))?,
        _ => log.filter()?,
    };
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow!("installing logger: {e}"))
}
