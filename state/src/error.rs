//! Errors of the state layer.

use keel_types::Address;

/// Failures of the state tree and the executor.
///
/// A transaction that breaks a protocol rule is *not* an error: it gets a failed receipt.
/// These errors mean the caller asked for something impossible or the store let us down.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] keel_storage::Error),
    /// No root is stored for this version (never committed, or pruned).
    #[error("state version {0} not found")]
    VersionNotFound(u64),
    /// A version can only be built on an older one.
    #[error("cannot build state version {version} on base version {base}")]
    BadVersion {
        /// The base version asked for.
        base: u64,
        /// The version to build.
        version: u64,
    },
    /// Blocks start at height 1; version 0 is genesis and is built by `init_genesis`.
    #[error("cannot execute a block at height 0: version 0 is genesis")]
    GenesisHeight,
    /// The same address appears twice in the genesis accounts.
    #[error("genesis lists account {0} twice")]
    DuplicateGenesisAccount(Address),
    /// The same validator key appears twice in the genesis validators.
    #[error("genesis lists validator {0} twice")]
    DuplicateGenesisValidator(Address),
    /// More transactions in one block than receipts can index.
    #[error("a block cannot hold {0} transactions")]
    TooManyTransactions(usize),
    /// Bytes or structure in the store that cannot be right: a missing or undecodable node,
    /// an undecodable account.
    #[error("corrupt {what} in state store: {reason}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A Merkle proof that does not show what it was asked to show.
    #[error("invalid proof: {0}")]
    BadProof(&'static str),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
