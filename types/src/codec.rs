//! Helpers shared by the prost codec of every wire type.

use crate::{Error, Result};

/// Largest single message keel decodes (blocks included). Anything larger is refused before
/// decoding so a peer or client cannot make us allocate without bound.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Decodes a prost message, refusing oversized input.
pub(crate) fn decode<M: prost::Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(Error::TooLarge {
            what,
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    M::decode(bytes).map_err(|e| Error::Decode {
        what,
        reason: e.to_string(),
    })
}

/// Copies a fixed-size array out of a byte field, naming the field on error.
pub(crate) fn array<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| Error::Length {
        field,
        expected: N,
        got: bytes.len(),
    })
}
