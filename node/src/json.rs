//! JSON encodings shared by the RPC types ([`crate::rpc::types`]) and the light-client
//! proofs ([`crate::light`]): amounts as decimal strings ([`amount`]) and byte strings as
//! `0x`-prefixed hex ([`HexBytes`]).

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Serde of an amount: a decimal JSON string (`"1000"`), read back from a string or a number.
pub mod amount {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `value` as a decimal string.
    pub fn serialize<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    /// Reads a decimal string (or a plain number).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text<'a> {
            Number(u64),
            #[serde(borrow)]
            Text(std::borrow::Cow<'a, str>),
        }
        match Text::deserialize(d)? {
            Text::Number(n) => Ok(n),
            Text::Text(s) => s
                .parse()
                .map_err(|_| D::Error::custom(format!("invalid amount {s:?}"))),
        }
    }
}

/// Bytes written as `0x`-prefixed hex (read back with or without the prefix).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

impl fmt::Display for HexBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(&self.0))
    }
}

impl Serialize for HexBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HexBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        hex::decode(s.strip_prefix("0x").unwrap_or(&s))
            .map(HexBytes)
            .map_err(|e| D::Error::custom(format!("invalid hex: {e}")))
    }
}
