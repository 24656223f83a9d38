//! hypeman-init: the guest's PID 1.
//!
//! What it shares with the host (the config disk format, the console lines
//! the host reads back, the initrd's module list) is `hypeman-contract`;
//! the host does not link this crate. Everything here is init's own: it
//! runs inside the guest, static, and must never panic-loop the kernel. It
//! is one thread but for the agent (`agent`), which serves the host↔guest
//! channel beside the supervisor and touches nothing the supervisor owns.

pub mod acpi;
pub mod agent;
pub mod boot;
pub mod command;
pub mod console;
pub mod disks;
pub mod error;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod shutdown;
pub mod supervise;
pub mod user;
