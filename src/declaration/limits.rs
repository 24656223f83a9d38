//! The bounds one declaration may ask for. They are the declaration's
//! rules, with maximums the host sets in the settings file's `[limits]`
//! (which `settings` parses into this type); validation takes them as an
//! argument so that this module never reads the settings itself.
//!
//! Two of them bound the input itself rather than the VM: the size of the
//! declaration file (read into memory and parsed with spans, so a file of
//! gigabytes would be held several times over), and the size of the app's
//! command and environment, which the guest kernel's `execve` refuses past
//! fixed limits (see [`EXEC_STRING_MAX`] and [`EXEC_TOTAL_CEILING`]).

use crate::config_file::ByteSize;

/// The longest single argument or `NAME=value` environment string the guest
/// kernel passes to `execve`, in bytes without its terminating NUL:
/// `MAX_ARG_STRLEN` is 32 pages (128 KiB) and counts the NUL. A longer
/// string fails the app's exec with `E2BIG`, however much room is left.
pub const EXEC_STRING_MAX: u64 = 128 * ByteSize::KIB - 1;

/// What each string costs against the kernel's total besides its bytes: its
/// NUL and its 8-byte pointer in `argv`/`envp` (`bprm_stack_limits` counts
/// both).
pub const EXEC_STRING_OVERHEAD: u64 = 1 + 8;

/// The most `limits.max_exec_size` may be: the guest kernel allows argv and
/// envp together a quarter of the stack rlimit the app starts with, and
/// hypeman-init leaves PID 1's default (8 MiB) in place, so 2 MiB. The
/// image's own entrypoint, cmd and environment and init's `PATH`, `HOME`
/// and `HOSTNAME` share it, which is why the default is half of it.
pub const EXEC_TOTAL_CEILING: ByteSize = ByteSize(2 * ByteSize::MIB);

/// Bounds on what one declaration may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory: ByteSize,
    pub max_overlay_size: ByteSize,
    /// The largest declaration file that is read at all.
    pub max_declaration_size: ByteSize,
    /// The most the declared `entrypoint`, `cmd` and `env` may take together
    /// as the guest kernel counts them (each string's bytes, its NUL and its
    /// pointer); at most [`EXEC_TOTAL_CEILING`].
    pub max_exec_size: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vcpus: 32,
            max_memory: ByteSize(64 * ByteSize::GIB),
            max_overlay_size: ByteSize(1024 * ByteSize::GIB),
            max_declaration_size: ByteSize(ByteSize::MIB),
            max_exec_size: ByteSize(ByteSize::MIB),
        }
    }
}
