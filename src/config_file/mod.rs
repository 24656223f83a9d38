//! The toolkit both of hypeman's TOML files are read with: instance
//! declarations (`declaration`) and the settings file (`settings`).
//!
//! It owns what the two share and nothing of what either file means:
//! `path:line:column: message` problem reports ([`Diagnostic`], collected
//! per file by `Problems`), sizes and rates as people write them
//! ([`units`], [`ByteSize`]), and integers read loosely so that range
//! errors read as the key's own (`RawInt`). It must not import either
//! file's module: they build on it, so neither needs the other for these.

mod diagnostic;
mod int;
pub mod units;

pub use diagnostic::Diagnostic;
pub(crate) use diagnostic::Problems;
pub(crate) use int::RawInt;
pub use units::ByteSize;
