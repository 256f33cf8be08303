//! Human-readable units for configuration: byte sizes such as `"64MiB"` or `"1.5GiB"`.
//!
//! [`ByteSize`] reads both binary (`KiB`, `MiB`, `GiB`, `TiB`: powers of 1024) and SI
//! (`KB`, `MB`, `GB`, `TB`: powers of 1000) units, case-insensitively, and writes the
//! shortest exact form back, so a value always survives a write/read round trip.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Bytes jemalloc hands out for a request of `size` bytes: its size class (`nallocx`), which
/// is what its `allocated` statistic counts (a 150-byte request takes 160, a 300-byte one
/// 320). Memory estimates reported against that statistic round each allocation with this.
/// Computes only; allocates nothing.
#[allow(unsafe_code)]
pub fn allocation_size(size: usize) -> usize {
    if size == 0 {
        return 0;
    }
    // SAFETY: `nallocx` only computes a size class; flags 0 ask for the default alignment.
    // It returns 0 where the size cannot be allocated: the request itself is kept then.
    match unsafe { tikv_jemalloc_sys::nallocx(size, 0) } {
        0 => size,
        real => real,
    }
}

/// The units [`ByteSize`] understands, longest suffix first so `"KiB"` is not read as `"B"`.
const UNITS: [(&str, u64); 9] = [
    ("kib", KIB),
    ("mib", MIB),
    ("gib", GIB),
    ("tib", TIB),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("b", 1),
];

/// The units [`ByteSize::fmt`] writes, largest first; binary units are preferred when exact.
const DISPLAY_UNITS: [(&str, u64); 8] = [
    ("TiB", TIB),
    ("GiB", GIB),
    ("MiB", MIB),
    ("KiB", KIB),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
];

/// A number of bytes, written in configuration files as a string with an optional unit
/// (`"64MiB"`, `"1.5GiB"`, `"100MB"`, `"512"`, `"0"`) or as a bare integer.
///
/// Fractions are allowed before a unit and rounded down to a whole byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` kibibytes (1024 bytes each).
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n * KIB)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * MIB)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n * GIB)
    }

    /// The number of bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

/// Why a size string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid size \"{input}\": {reason}")]
pub struct ByteSizeError {
    /// The text that was refused.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

const EXPECTED: &str =
    "expected a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB, TB";

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(input: &str) -> Result<ByteSize, ByteSizeError> {
        let err = |reason| ByteSizeError {
            input: input.to_string(),
            reason,
        };
        let text = input.trim();
        let number_end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(number_end);
        let unit = unit.trim_start().to_ascii_lowercase();
        let multiplier = if unit.is_empty() {
            1
        } else {
            match UNITS.iter().find(|(name, _)| *name == unit) {
                Some((_, m)) => *m,
                None => return Err(err(EXPECTED)),
            }
        };
        let number = number.replace('_', "");
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number.as_str(), ""),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(err(EXPECTED));
        }
        if fraction.len() > 18 {
            return Err(err(EXPECTED));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err("the number is too large"))?
        };
        let fraction_value: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| err(EXPECTED))?
        };
        // 10^18 fits a u128 with room for a u64 multiplier, so this arithmetic cannot overflow
        // once `whole` is known to be below 2^64.
        if whole > u128::from(u64::MAX) {
            return Err(err("the number is too large"));
        }
        let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
        let multiplier = u128::from(multiplier);
        let bytes = whole
            .checked_mul(multiplier)
            .and_then(|b| b.checked_add(fraction_value * multiplier / scale))
            .ok_or_else(|| err("the number is too large"))?;
        u64::try_from(bytes)
            .map(ByteSize)
            .map_err(|_| err("the size does not fit in 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    /// Writes the largest unit that represents the size exactly (`"256MiB"`, `"100MB"`),
    /// `"0"` for zero and plain bytes (`"1500B"`) otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0");
        }
        for (name, size) in DISPLAY_UNITS {
            if self.0 % size == 0 {
                return write!(f, "{}{}", self.0 / size, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        struct ByteSizeVisitor;

        impl Visitor<'_> for ByteSizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a number of bytes")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: a size cannot be negative")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn allocation_sizes_are_jemallocs_size_classes() {
        assert_eq!(allocation_size(0), 0);
        // Small classes: multiples of 8 up to 128, then four per doubling.
        assert_eq!(allocation_size(1), 8);
        assert_eq!(allocation_size(150), 160);
        assert_eq!(allocation_size(300), 320);
        assert_eq!(allocation_size(4096), 4096);
        assert_eq!(allocation_size(310_000), 320 * 1024);
        for size in [7, 100, 1000, 70_000] {
            assert!(allocation_size(size) >= size);
        }
    }

    #[test]
    fn parses_binary_si_fractional_and_bare_sizes() {
        let cases = [
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("512KiB", 512 * 1024),
            ("64MiB", 64 << 20),
            ("1GiB", 1 << 30),
            ("1.5GiB", 3 << 29),
            ("2TiB", 2 << 40),
            ("100MB", 100_000_000),
            ("1kb", 1_000),
            ("3GB", 3_000_000_000),
            ("64 MiB", 64 << 20),
            (" 1_024 ", 1024),
            ("1.1KiB", 1126),
            (".5KiB", 512),
        ];
        for (text, bytes) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn refuses_unknown_units_and_garbage_with_a_clear_message() {
        let e = "12XB".parse::<ByteSize>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid size \"12XB\": expected a number with an optional unit B, KiB, MiB, GiB, \
             TiB, KB, MB, GB, TB"
        );
        for bad in ["", "MiB", "-1", "1.2.3MiB", "ten", "1 0MiB", "."] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert!("18446744073709551616".parse::<ByteSize>().is_err());
        assert_eq!(
            "18446744073709551615".parse::<ByteSize>(),
            Ok(ByteSize(u64::MAX))
        );
    }

    #[test]
    fn display_is_exact_and_round_trips() {
        assert_eq!(ByteSize(0).to_string(), "0");
        assert_eq!(ByteSize::gib(1).to_string(), "1GiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1536MiB");
        assert_eq!(ByteSize(100_000_000).to_string(), "100MB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
        assert_eq!(ByteSize(1023).to_string(), "1023B");
        for n in [
            1,
            999,
            1000,
            1024,
            4096,
            1_000_000,
            u64::MAX,
            1 << 40,
            12_345_678_901,
        ] {
            let text = ByteSize(n).to_string();
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(n)), "{text}");
        }
    }
}
