//! Node errors: anything that stops a node from starting or running.

use std::path::PathBuf;

use keel_types::Hash;

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
    /// Block execution or storage through the ledger.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The p2p service could not start.
    #[error(transparent)]
    Network(keel_p2p::Error),
    /// A configured network address that does not parse.
    #[error("{key}: \"{value}\" is not a multiaddr: {reason}")]
    BadAddress {
        /// The configuration key.
        key: &'static str,
        /// The value.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
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
    /// The database was made for another genesis.
    #[error("the database in {data} belongs to another chain (genesis {stored}), not to this genesis.json ({expected})")]
    WrongGenesis {
        /// The data folder.
        data: String,
        /// The genesis hash the database records (`unknown` if none).
        stored: String,
        /// The hash of the genesis file.
        expected: Hash,
    },
    /// A record of the node's own that does not decode or is missing: the database is
    /// damaged.
    #[error("the database is damaged: {what}: {reason}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A benchmark that cannot run as asked, or failed.
    #[error("benchmark: {0}")]
    Bench(String),
    /// A testnet that cannot be generated as asked.
    #[error("{0}")]
    Testnet(String),
    /// A tool was asked for something it cannot do here (`keel db` on a memory store...).
    #[error("{0}")]
    Unusable(String),
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
