//! Consensus errors.

/// Failures of the consensus state machine's setup and message checks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A validator set that consensus cannot use.
    #[error("invalid validator set: {0}")]
    InvalidValidatorSet(String),
    /// Persisted safety data that does not decode.
    #[error("corrupt safety data: {0}")]
    CorruptSafetyData(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
