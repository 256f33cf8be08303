//! Node errors: anything that stops a node from starting or running.

use std::path::PathBuf;

/// Why the node cannot start or continue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Bad genesis file.
    #[error(transparent)]
    Genesis(#[from] keel_genesis::Error),
    /// Storage failure.
    #[error(transparent)]
    Storage(#[from] keel_storage::Error),
    /// State failure.
    #[error(transparent)]
    State(#[from] keel_state::Error),
    /// Block execution or storage through the application layer.
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    /// Consensus setup failure.
    #[error(transparent)]
    Consensus(#[from] keel_consensus::Error),
    /// A file that could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure (in the message, not a `source`, so it prints once).
        error: std::io::Error,
    },
    /// A key file that does not hold a key.
    #[error("{path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The data directory belongs to another chain.
    #[error("{0}")]
    Mismatch(String),
    /// The RPC server could not start.
    #[error("rpc server on {addr}: {reason}")]
    Rpc {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
