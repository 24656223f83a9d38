//! placeholder
pub mod reference;
pub mod unpack;
