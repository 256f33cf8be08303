//! Errors of the type layer.

/// Failures while decoding or checking keel types.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Bytes that are not a valid prost message of the expected type.
    #[error("malformed {what}: {reason}")]
    Decode {
        /// The type that failed to decode.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A message larger than the protocol allows.
    #[error("{what} is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The type that was too large.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A list with more entries than the protocol allows.
    #[error("{what} has {len} entries, more than the limit of {max}")]
    TooMany {
        /// The list.
        what: &'static str,
        /// Its entries.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A fixed-length field of the wrong length.
    #[error("{field} must be {expected} bytes, got {got}")]
    Length {
        /// The field name.
        field: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// Text that is not the expected `0x`-prefixed hex.
    #[error("invalid hex for {field}: {reason}")]
    Hex {
        /// The field name.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A public key that is not a valid ed25519 point, or a weak one (of small order).
    #[error("invalid ed25519 public key")]
    PublicKey,
    /// A signature that does not verify.
    #[error("invalid signature")]
    BadSignature,
    /// A required field is missing.
    #[error("missing field {0}")]
    Missing(&'static str),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
