//! hypeman-init: the guest's PID 1, and the guest contract it shares with
//! the host.
//!
//! The host side of hypeman depends on this crate only for [`config`] (the
//! `config.json` format, disk serials, initrd paths), so both sides compile
//! the same definitions. Everything else is init's own: it runs inside the
//! guest, static and single-threaded, and must never panic-loop the kernel.

pub mod acpi;
pub mod boot;
pub mod command;
pub mod config;
pub mod console;
pub mod disks;
pub mod error;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod shutdown;
pub mod supervise;
pub mod user;
