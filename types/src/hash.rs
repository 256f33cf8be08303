//! 32-byte blake3 hashes and 20-byte account addresses, written as `0x`-prefixed hex.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// A blake3 hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The all-zero hash: the parent of genesis and the root of an empty tree.
    pub const ZERO: Hash = Hash([0; 32]);

    /// blake3 of `bytes`.
    pub fn digest(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses a 32-byte field of a decoded message.
    pub fn from_slice(field: &'static str, bytes: &[u8]) -> Result<Hash> {
        crate::codec::array(field, bytes).map(Hash)
    }
}

/// An account address: the first 20 bytes of blake3(public key).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Address(pub [u8; 20]);

impl Address {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// Parses a 20-byte field of a decoded message.
    pub fn from_slice(field: &'static str, bytes: &[u8]) -> Result<Address> {
        crate::codec::array(field, bytes).map(Address)
    }
}

fn parse_hex<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N]> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| Error::Hex {
            field,
            reason: "missing 0x prefix".into(),
        })?;
    if digits.len() != N * 2 {
        return Err(Error::Hex {
            field,
            reason: format!("expected {} hex digits, got {}", N * 2, digits.len()),
        });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out).map_err(|e| Error::Hex {
        field,
        reason: e.to_string(),
    })?;
    Ok(out)
}

macro_rules! hex_type {
    ($ty:ident, $len:expr, $field:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "0x{}", hex::encode(self.0))
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                parse_hex::<$len>($field, s).map($ty)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_type!(Hash, 32, "hash");
hex_type!(Address, 20, "address");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_round_trips_and_rejects_bad_input() {
        let h = Hash::digest(b"keel");
        let s = h.to_string();
        assert_eq!(s.len(), 66);
        assert_eq!(s.parse::<Hash>(), Ok(h));
        assert!("abcd".parse::<Hash>().is_err());
        assert!(format!("0x{}", "zz".repeat(32)).parse::<Hash>().is_err());
        assert!(format!("0x{}", "00".repeat(31)).parse::<Hash>().is_err());
    }

    #[test]
    fn address_serde_is_hex_string() {
        let a = Address([7; 20]);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"0x{}\"", "07".repeat(20)));
        assert_eq!(serde_json::from_str::<Address>(&json).unwrap(), a);
    }
}
