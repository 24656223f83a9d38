//! Integers as written in a config file, read loosely so that a value out
//! of range is reported by its key's own check, with the file's other
//! problems, rather than failing the parse.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::fmt;

/// A TOML integer of any size, saturated into an `i64`: out-of-range values
/// are then reported by the key's own range check ("must be between 1 and
/// 32") instead of as a type error naming Rust types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawInt(pub i64);

impl fmt::Display for RawInt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for RawInt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;

        impl Visitor<'_> for IntVisitor {
            type Value = RawInt;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawInt, E> {
                Ok(RawInt(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawInt, E> {
                Ok(RawInt(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<RawInt, E> {
                Ok(RawInt(i64::try_from(v).unwrap_or(if v < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                })))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawInt, E> {
                Ok(RawInt(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }

        deserializer.deserialize_any(IntVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Doc {
        n: RawInt,
    }

    fn read(text: &str) -> Result<i64, toml::de::Error> {
        toml::from_str::<Doc>(text).map(|d| d.n.0)
    }

    #[test]
    fn any_integer_is_read_and_only_integers() {
        assert_eq!(read("n = 7").unwrap(), 7);
        assert_eq!(read("n = -3").unwrap(), -3);
        assert_eq!(read("n = 9223372036854775807").unwrap(), i64::MAX);
        assert!(read("n = \"7\"").is_err());
        assert!(read("n = 1.5").is_err());
        assert_eq!(RawInt(42).to_string(), "42");
    }
}
