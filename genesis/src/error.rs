//! Genesis errors.

/// A genesis file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not valid JSON for the genesis format.
    #[error("genesis.json: {0}")]
    Json(String),
    /// A field with a value the chain cannot start from.
    #[error("genesis.json: invalid {field}: {reason}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// Why it is refused.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
