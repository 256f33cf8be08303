//! Storage errors.

/// Failures of a storage engine or of data read back from it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine itself failed (I/O, corruption, lock held by another process...).
    #[error("storage engine: {0}")]
    Engine(String),
    /// Bytes in the store that do not decode: the database is corrupt or from another version.
    #[error("corrupt {what} in store: {reason}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A configuration value the engine cannot use.
    #[error("invalid storage option {key}: {reason}")]
    Config {
        /// The option.
        key: &'static str,
        /// Why it is refused.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
