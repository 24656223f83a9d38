//! The bounds one declaration may ask for. They are the declaration's
//! rules, with maximums the host sets in the settings file's `[limits]`
//! (which `settings` parses into this type); validation takes them as an
//! argument so that this module never reads the settings itself.

use crate::config_file::ByteSize;

/// Bounds on what one declaration may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory: ByteSize,
    pub max_overlay_size: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vcpus: 32,
            max_memory: ByteSize(64 * ByteSize::GIB),
            max_overlay_size: ByteSize(1024 * ByteSize::GIB),
        }
    }
}
