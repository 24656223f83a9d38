//! The host↔guest contract: everything hypeman's daemon and its guest PID 1
//! (`hypeman-init`) must agree on, compiled by both so neither can drift.
//!
//! - [`agent`]: the agent protocol over the host↔guest channel (framing,
//!   messages; the daemon's client and init's agent both speak it);
//! - [`config`]: the config disk the host writes and init reads
//!   (`config.json`, disk serials, paths inside the guest);
//! - [`console`]: the lines init prints that the host reads back from the
//!   console log (how a boot starts, how the app ended, a fatal error);
//! - [`modules`]: the initrd's kernel module list and its format.
//!
//! This crate describes formats only: it does no IO and runs no guest code,
//! and it must not grow dependencies that init (built static) does not
//! already link.

pub mod agent;
pub mod config;
pub mod console;
pub mod modules;
