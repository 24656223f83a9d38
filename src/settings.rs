//! Daemon settings from `<config-dir>/hypeman.toml`: every field optional,
//! every default sensible. Parsing and validation live below the types.

use crate::declaration::spec::{ByteSize, HypervisorKind};
use std::path::PathBuf;
use std::time::Duration;

/// Which accelerator QEMU uses. `Auto` picks KVM only where it can run a
/// stock kernel (not under a nested `kvm_pvm`), else TCG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSettings {
    /// bzImage or PVH vmlinux.
    pub kernel: Option<PathBuf>,
    pub modules_dir: Option<PathBuf>,
    /// Extra kernel arguments, appended.
    pub cmdline: String,
    /// The guest's PID 1; default: `hypeman-init` next to the executable.
    pub init: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    pub binary: PathBuf,
    pub accel: Accel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudHypervisorSettings {
    pub binary: PathBuf,
}

/// Bounds on what one declaration may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory: ByteSize,
    pub max_overlay_size: ByteSize,
}

/// Reconciler timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// Every instance is reconciled at least this often.
    pub resync_interval: Duration,
    /// File events for one instance within this window are merged.
    pub debounce: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a guest gets to shut down before its VMM is killed.
    pub stop_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The settings file, when one exists.
    pub source: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub default_hypervisor: HypervisorKind,
    /// `host:port` registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub guest: GuestSettings,
    pub qemu: QemuSettings,
    pub cloud_hypervisor: CloudHypervisorSettings,
    pub limits: Limits,
    pub reconcile: ReconcileSettings,
}
