//! Human-written quantities: sizes (`"512MiB"`) and rates (`"100Mbit"`,
//! `"10MiB/s"`), in declarations and in the settings file alike. Owns their
//! grammar and [`ByteSize`], and nothing else; which quantity a key takes
//! and its bounds are the validators' business.
//!
//! # Sizes
//!
//! ```text
//! size  = number [" "] [unit]          "512MiB", "1.5 GiB", "10G", "4096"
//! unit  = B | K | KiB | M | MiB | G | GiB | T | TiB     (case-insensitive)
//! ```
//!
//! Every unit is binary: `K` and `KiB` both mean 1024 bytes, `G` and `GiB`
//! both mean 2³⁰. That is what QEMU (`-m 512M`) and Cloud Hypervisor
//! (`size=512M`) mean by the short forms, so a value copied from either means
//! the same here. `KB`, `MB`, `GB`, `TB` are rejected rather than guessed:
//! half the world reads them as powers of ten. A bare number (a TOML integer
//! or a string without unit) is bytes. A decimal point is allowed when the
//! result is a whole number of bytes (`"1.5GiB"` yes, `"1.3B"` no).
//!
//! # Rates
//!
//! ```text
//! rate  = size "/s"                    bytes per second, binary: "10MiB/s"
//!       | number [" "] bits ["/s"]     bits per second, decimal: "100Mbit"
//! bits  = bit | Kbit | Mbit | Gbit | Tbit                  (case-insensitive)
//! ```
//!
//! Bit rates use decimal prefixes (`1Mbit` = 10⁶ bits = 125 000 bytes/s), as
//! network links and `tc` do. A rate string must say `/s` or `bit`: a bare
//! `"100M"` could mean either and is rejected. A TOML integer is bytes per
//! second. Rates are stored in bytes per second and must be whole bytes.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;
use std::str::FromStr;

/// A size in bytes, written by users as `"512MiB"`, `"1GiB"`, `"10G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub fn bytes(self) -> u64 {
        self.0
    }
    pub fn mib(self) -> u64 {
        self.0 / Self::MIB
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, name) in [(1u64 << 40, "TiB"), (Self::GIB, "GiB"), (Self::MIB, "MiB"), (Self::KIB, "KiB")] {
            if b >= unit && b % unit == 0 {
                return write!(f, "{}{name}", b / unit);
            }
        }
        write!(f, "{b}B")
    }
}

/// Why a size or rate could not be read. Messages follow `key = value: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value; expected a number with a unit, such as \"512MiB\"")]
    Empty,
    #[error("must not be negative")]
    Negative,
    #[error("expected a number followed by a unit, such as \"512MiB\"")]
    NotANumber,
    #[error("unknown size unit \"{0}\"; expected B, K/KiB, M/MiB, G/GiB or T/TiB")]
    UnknownSizeUnit(String),
    #[error("\"{unit}\" is ambiguous; write \"{binary}\" (sizes are binary: 1 KiB = 1024 bytes)")]
    AmbiguousUnit { unit: String, binary: &'static str },
    #[error("unknown rate unit \"{0}\"; expected bytes per second such as \"10MiB/s\" or bits per second such as \"100Mbit\"")]
    UnknownRateUnit(String),
    #[error("a rate needs \"/s\" or \"bit\", such as \"10MiB/s\" or \"100Mbit\"")]
    RateWithoutPerSecond,
    #[error("not a whole number of bytes")]
    Fractional,
    #[error(
        "a plain number is bytes and must be whole; use a string with a unit, such as \"1.5GiB\""
    )]
    FloatBytes,
    #[error("too large")]
    Overflow,
}

/// Parse a size string (see the module doc) into bytes.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (number, unit) = split_number(s)?;
    let multiplier = size_unit(unit)?;
    number.scale(multiplier, 1)
}

/// Parse a rate string (see the module doc) into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let (number, unit) = split_number(s)?;
    // Strip "/s" keeping the case of what is left, so messages quote the
    // user's own spelling.
    let (base, per_second) = match unit.len().checked_sub(2) {
        Some(i) if unit.is_char_boundary(i) && unit[i..].eq_ignore_ascii_case("/s") => {
            (unit[..i].trim_end(), true)
        }
        _ => (unit, false),
    };
    if let Some(prefix) = base.to_ascii_lowercase().strip_suffix("bit") {
        let bits = match prefix {
            "" => 1,
            "k" => 1_000,
            "m" => 1_000_000,
            "g" => 1_000_000_000,
            "t" => 1_000_000_000_000,
            _ => return Err(UnitError::UnknownRateUnit(unit.to_string())),
        };
        // Eight bits to the byte: divide in the same exact step.
        return number.scale(bits, 8);
    }
    match size_unit(base) {
        Ok(_) if !per_second => Err(UnitError::RateWithoutPerSecond),
        Ok(multiplier) => number.scale(multiplier, 1),
        Err(e @ UnitError::AmbiguousUnit { .. }) => Err(e),
        Err(_) => Err(UnitError::UnknownRateUnit(unit.to_string())),
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

/// An exact decimal: `digits / 10^decimals`.
struct Decimal {
    digits: u128,
    decimals: u32,
}

impl Decimal {
    /// `self * multiplier / divisor`, which must be a whole number that fits
    /// in a u64. Integer arithmetic only, so "0.1GiB" is judged exactly.
    fn scale(&self, multiplier: u64, divisor: u64) -> Result<u64, UnitError> {
        let numerator = self
            .digits
            .checked_mul(u128::from(multiplier))
            .ok_or(UnitError::Overflow)?;
        let denominator = 10u128.pow(self.decimals) * u128::from(divisor);
        if numerator % denominator != 0 {
            return Err(UnitError::Fractional);
        }
        u64::try_from(numerator / denominator).map_err(|_| UnitError::Overflow)
    }
}

/// Split `"1.5 GiB"` into the number and `"GiB"`.
fn split_number(s: &str) -> Result<(Decimal, &str), UnitError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    if s.starts_with('-') {
        return Err(UnitError::Negative);
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || (number.contains('.') && fraction.is_empty()) || fraction.contains('.') {
        return Err(UnitError::NotANumber);
    }
    // 2^128 has 39 digits; anything near that is overflow whatever the unit,
    // and bounding it keeps 10^decimals inside a u128.
    if whole.len() + fraction.len() > 30 {
        return Err(UnitError::Overflow);
    }
    let mut digits: u128 = 0;
    for c in whole.chars().chain(fraction.chars()) {
        digits = digits * 10 + u128::from(c as u8 - b'0');
    }
    let decimals = u32::try_from(fraction.len()).map_err(|_| UnitError::Overflow)?;
    Ok((Decimal { digits, decimals }, unit.trim_start()))
}

fn size_unit(unit: &str) -> Result<u64, UnitError> {
    match unit.to_ascii_lowercase().as_str() {
        "" | "b" => Ok(1),
        "k" | "kib" => Ok(1 << 10),
        "m" | "mib" => Ok(1 << 20),
        "g" | "gib" => Ok(1 << 30),
        "t" | "tib" => Ok(1 << 40),
        "kb" => Err(UnitError::AmbiguousUnit {
            unit: unit.to_string(),
            binary: "KiB",
        }),
        "mb" => Err(UnitError::AmbiguousUnit {
            unit: unit.to_string(),
            binary: "MiB",
        }),
        "gb" => Err(UnitError::AmbiguousUnit {
            unit: unit.to_string(),
            binary: "GiB",
        }),
        "tb" => Err(UnitError::AmbiguousUnit {
            unit: unit.to_string(),
            binary: "TiB",
        }),
        _ => Err(UnitError::UnknownSizeUnit(unit.to_string())),
    }
}

/// A size or rate as written in TOML: an integer (bytes, or bytes per
/// second), a string with a unit, or a float (always rejected, but kept so
/// validation can say why and go on to report the file's other problems).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawQuantity {
    Int(i64),
    Float(f64),
    Str(String),
}

impl RawQuantity {
    pub(crate) fn size(&self) -> Result<u64, UnitError> {
        match self {
            RawQuantity::Int(i) => u64::try_from(*i).map_err(|_| UnitError::Negative),
            RawQuantity::Float(f) if *f < 0.0 => Err(UnitError::Negative),
            RawQuantity::Float(_) => Err(UnitError::FloatBytes),
            RawQuantity::Str(s) => parse_size(s),
        }
    }

    /// Written as a plain number of bytes (`512`, `"512"`): a too-small
    /// value like that was most likely meant in MiB or GiB.
    pub(crate) fn is_unitless(&self) -> bool {
        match self {
            RawQuantity::Int(_) => true,
            RawQuantity::Float(_) => false,
            RawQuantity::Str(s) => {
                let s = s.trim();
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
            }
        }
    }

    pub(crate) fn rate(&self) -> Result<u64, UnitError> {
        match self {
            RawQuantity::Str(s) => parse_rate(s),
            RawQuantity::Int(_) | RawQuantity::Float(_) => self.size(),
        }
    }
}

impl<'de> Deserialize<'de> for RawQuantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuantityVisitor;

        impl Visitor<'_> for QuantityVisitor {
            type Value = RawQuantity;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string with a unit such as \"512MiB\", or an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawQuantity, E> {
                Ok(RawQuantity::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawQuantity, E> {
                i64::try_from(v)
                    .map(RawQuantity::Int)
                    .map_err(|_| E::custom("too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawQuantity, E> {
                Ok(RawQuantity::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawQuantity, E> {
                Ok(RawQuantity::Str(v.to_string()))
            }
        }

        deserializer.deserialize_any(QuantityVisitor)
    }
}

/// A byte count as people read it, in binary units with one decimal:
/// `512 B`, `1.5 MiB`, `272.0 MiB` (messages and listings; `ByteSize`
/// is the declarations' spelling).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("1K", 1024),
            ("1KiB", 1024),
            ("512MiB", 512 * MIB),
            ("512M", 512 * MIB),
            ("512mib", 512 * MIB),
            ("1GiB", GIB),
            ("10G", 10 * GIB),
            ("1.5GiB", 3 * GIB / 2),
            ("0.5K", 512),
            ("1 GiB", GIB),
            (" 2T ", 2 << 40),
            ("16777215TiB", 16_777_215 << 40),
        ];
        for (text, bytes) in ok {
            assert_eq!(parse_size(text), Ok(*bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes() {
        let bad: &[(&str, UnitError)] = &[
            ("", UnitError::Empty),
            ("   ", UnitError::Empty),
            ("-1GiB", UnitError::Negative),
            ("GiB", UnitError::NotANumber),
            (".5G", UnitError::NotANumber),
            ("5.G", UnitError::NotANumber),
            ("1.2.3G", UnitError::NotANumber),
            ("+1G", UnitError::NotANumber),
            (
                "1GB",
                UnitError::AmbiguousUnit {
                    unit: "GB".into(),
                    binary: "GiB",
                },
            ),
            (
                "1 mb",
                UnitError::AmbiguousUnit {
                    unit: "mb".into(),
                    binary: "MiB",
                },
            ),
            ("1X", UnitError::UnknownSizeUnit("X".into())),
            ("1GiB/s", UnitError::UnknownSizeUnit("GiB/s".into())),
            ("1.3B", UnitError::Fractional),
            ("0.1K", UnitError::Fractional),
            ("16777216TiB", UnitError::Overflow),
            ("18446744073709551616", UnitError::Overflow),
            ("1000000000000000000000000000000000", UnitError::Overflow),
        ];
        for (text, err) in bad {
            assert_eq!(parse_size(text).as_ref(), Err(err), "{text}");
        }
    }

    #[test]
    fn rates() {
        let ok: &[(&str, u64)] = &[
            ("100Mbit", 12_500_000),
            ("100 mbit/s", 12_500_000),
            ("1Gbit", 125_000_000),
            ("8bit", 1),
            ("1Kbit", 125),
            ("10MiB/s", 10 * MIB),
            ("10M/s", 10 * MIB),
            ("4096/s", 4096),
            ("1.5 GiB/s", 3 * GIB / 2),
        ];
        for (text, bps) in ok {
            assert_eq!(parse_rate(text), Ok(*bps), "{text}");
        }
        let bad: &[(&str, UnitError)] = &[
            ("100M", UnitError::RateWithoutPerSecond),
            ("4096", UnitError::RateWithoutPerSecond),
            ("1bit", UnitError::Fractional),
            (
                "10MB/s",
                UnitError::AmbiguousUnit {
                    unit: "MB".into(),
                    binary: "MiB",
                },
            ),
            (
                "10MB",
                UnitError::AmbiguousUnit {
                    unit: "MB".into(),
                    binary: "MiB",
                },
            ),
            ("10Xbit", UnitError::UnknownRateUnit("Xbit".into())),
            (
                "10furlongs/s",
                UnitError::UnknownRateUnit("furlongs/s".into()),
            ),
            ("10furlongs", UnitError::UnknownRateUnit("furlongs".into())),
            ("-1Mbit", UnitError::Negative),
        ];
        for (text, err) in bad {
            assert_eq!(parse_rate(text).as_ref(), Err(err), "{text}");
        }
    }

    #[test]
    fn raw_quantities() {
        assert_eq!(RawQuantity::Int(4096).size(), Ok(4096));
        assert_eq!(RawQuantity::Int(-1).size(), Err(UnitError::Negative));
        assert_eq!(RawQuantity::Float(1.5).size(), Err(UnitError::FloatBytes));
        assert_eq!(RawQuantity::Int(1000).rate(), Ok(1000));
        assert_eq!(RawQuantity::Str("1G".into()).size(), Ok(1 << 30));
    }

    #[test]
    fn byte_size_round_trips_through_display() {
        for text in ["512MiB", "1GiB", "3KiB", "2TiB", "1000B"] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.to_string(), text);
        }
    }
}
