//! The hypervisor boundary: one [`Hypervisor`] trait that Cloud Hypervisor,
//! QEMU and the test fake implement, and the launch configuration they all
//! consume.
//!
//! A backend turns single-hop requests into VMM calls. It owns no policy: it
//! does not decide which hop comes next (that is `reconcile`), and it does not
//! touch the store (that is `instances`). VMM processes run detached and
//! outlive the daemon, so every call names its VMM by a [`VmmHandle`] that can
//! be persisted and found again.

pub mod cloud_hypervisor;
pub mod fake;
mod kind;
pub mod launch;
pub mod fdpass;
pub mod handover;
pub mod process;
pub mod qemu;

pub use kind::HypervisorKind;

use crate::state::VmState;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Token-bucket style limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct IoLimit {
    /// Bytes per second.
    pub bytes_per_sec: Option<u64>,
    /// Operations (disk) or packets (network) per second.
    pub ops_per_sec: Option<u64>,
}

/// A disk attached to the guest, found there by its virtio serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Virtio serial and device id: `rootfs`, `overlay`, `config`, `vol0`…
    pub id: String,
    pub path: PathBuf,
    pub readonly: bool,
    pub limit: IoLimit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: String,
    /// Host → guest.
    pub limit_down: IoLimit,
    /// Guest → host.
    pub limit_up: IoLimit,
}

/// A virtio-vsock device, proxied through a unix socket on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    pub socket: PathBuf,
}

/// The host↔guest agent channel: a unix socket on the host through which
/// the daemon reaches the agent in hypeman-init. QEMU makes it a
/// virtio-serial port (`virtserialport`) behind a chardev socket server;
/// Cloud Hypervisor a virtio-vsock device whose hybrid vsock socket it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentChannel {
    pub socket: PathBuf,
}

/// Everything a backend needs to launch one VM. Built by `instances` from
/// the declaration, the settings and the prepared disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub vcpus: u32,
    /// Boot memory.
    pub memory_bytes: u64,
    /// Extra memory that can be plugged through virtio-mem (0: none).
    pub hotplug_memory_bytes: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// In boot order: rootfs, overlay, config, then volumes.
    pub disks: Vec<DiskConfig>,
    pub net: Option<NetConfig>,
    /// Host PCI devices passed through with VFIO (sysfs paths).
    pub devices: Vec<PathBuf>,
    /// The serial console's file (`logs/app.log`).
    pub serial_log: PathBuf,
    /// Left out of the JSON when absent, so configurations without one keep
    /// the hash they had before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Left out when absent, like `vsock`: a snapshot taken before the
    /// channel existed hashes as it did. It is restored under its own launch
    /// record, without the channel, until the guest next boots cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentChannel>,
    /// Whom the VMM runs as; absent: as the daemon (root), unsandboxed.
    /// Part of the launch record, so a restore or an adopted VMM keeps the
    /// uid it was started with; left out when absent, like `vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<VmmUser>,
}

/// The unprivileged identity of one guest's VMM (issue 11): spawned as
/// `uid`/`gid` with `groups` as its only supplementary groups (the shared
/// VMM group first, then `/dev/kvm`'s group when that is not open to all),
/// and no capabilities. `data_dir` bounds what [`handover`] may change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub data_dir: PathBuf,
}

impl VmConfig {
    /// A digest of the launch configuration, recorded with each snapshot:
    /// the launch record a snapshot is restored under must hash to it.
    pub fn config_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

/// How to reach one live VMM process. Persisted in metadata so a restarted
/// daemon adopts the VMM instead of starting a second one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmHandle {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`; guards against pid reuse.
    pub pid_start_time: u64,
    pub socket: PathBuf,
    pub version: Option<String>,
}

impl VmmHandle {
    pub fn process_id(&self) -> process::ProcessId {
        process::ProcessId { pid: self.pid, start_time: self.pid_start_time }
    }
}

/// Where one guest's VMM lives, and what was last recorded of it.
#[derive(Debug, Clone)]
pub struct GuestVmm {
    pub guest_dir: PathBuf,
    pub socket: PathBuf,
    pub vmm_log: PathBuf,
    pub recorded: Option<VmmHandle>,
}

/// What is behind a guest's VMM socket right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No VMM process: the state is decided by the store (snapshot or not).
    Absent,
    /// A VMM answered. `state` is one of Created, Running, Paused, Shutdown.
    Alive { handle: VmmHandle, state: VmState },
    /// The socket is there and something holds it, but it does not answer.
    Unreachable { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub state: VmState,
    /// Guest memory currently plugged, as the VMM reports it.
    pub memory_actual_bytes: Option<u64>,
}

/// Recorded with a snapshot so a restore can refuse a mismatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub hypervisor_version: String,
    pub config_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("a VMM is already running on {socket}")]
    AlreadyRunning { socket: PathBuf },
    #[error("the VMM process {pid} has exited")]
    VmmGone { pid: u32 },
    #[error("operation {op} is not valid while the VM is {state}")]
    WrongState { op: &'static str, state: VmState },
    #[error("{op} timed out after {secs}s")]
    Timeout { op: &'static str, secs: u64 },
    #[error("{backend} does not support {what}")]
    Unsupported { backend: HypervisorKind, what: &'static str },
    #[error("snapshot in {dir} is unusable")]
    BadSnapshot {
        dir: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to start the VMM ({binary})")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} failed")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Only the fake backend raises this: a test asked for a failure here.
    #[error("injected fault in {op}")]
    Injected { op: &'static str },
}

/// What a snapshot writes besides guest RAM (device state, the migration
/// stream's headers, launch records), added to every size estimate.
pub const SNAPSHOT_STATE_MARGIN_BYTES: u64 = 16 << 20;

/// One hypervisor backend. Every method acts on one VMM; none decides what
/// to do next.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    fn kind(&self) -> HypervisorKind;
    /// The guest memory a freshly booted VM of `memory_bytes` boot memory
    /// and `hotplug_memory_bytes` hotplug memory has plugged: what a
    /// restored VM grows back to after a standby shrank it to
    /// `memory_bytes`.
    fn running_memory_bytes(&self, memory_bytes: u64, hotplug_memory_bytes: u64) -> u64;
    /// The backend's version string, recorded with snapshots.
    async fn version(&self) -> Result<String, HypervisorError>;
    /// Looks behind the guest's socket without changing anything: not even
    /// a stale socket file is removed.
    async fn probe(&self, guest: &GuestVmm) -> Probe;
    /// Starts a VMM process and creates (not boots) the VM: `Stopped → Created`.
    /// Refuses when a VMM already answers on the guest's socket.
    async fn create(&self, guest: &GuestVmm, config: &VmConfig)
        -> Result<VmmHandle, HypervisorError>;
    /// `Created → Running`.
    async fn boot(&self, vmm: &VmmHandle) -> Result<(), HypervisorError>;
    /// `Running → Paused`.
    async fn pause(&self, vmm: &VmmHandle) -> Result<(), HypervisorError>;
    /// `Paused → Running`.
    async fn resume(&self, vmm: &VmmHandle) -> Result<(), HypervisorError>;
    /// Asks the guest to power off (ACPI power button). Returns at once; the
    /// caller watches for `Shutdown` or the VMM's exit.
    async fn power_off(&self, vmm: &VmmHandle) -> Result<(), HypervisorError>;
    /// At most how many bytes a snapshot of this VM would write now, for
    /// a free-space check before a standby pauses it; `None` when it
    /// cannot tell. By default the smaller of the VMM's resident memory
    /// and the guest's plugged memory (guest pages never touched are not
    /// resident, and are written as nothing or as holes), plus room for
    /// device state. Cloud Hypervisor's `memory-ranges` and QEMU's
    /// migration stream both stay under it.
    async fn snapshot_size_estimate(&self, vmm: &VmmHandle) -> Option<u64> {
        let resident = process::resident_kib(vmm.process_id())?.saturating_mul(1024);
        let plugged = self.info(vmm).await.ok().and_then(|i| i.memory_actual_bytes).unwrap_or(resident);
        Some(resident.min(plugged).saturating_add(SNAPSHOT_STATE_MARGIN_BYTES))
    }
    /// Writes the paused VM's state and memory into the empty `dir`.
    async fn snapshot(&self, vmm: &VmmHandle, dir: &Path)
        -> Result<SnapshotMeta, HypervisorError>;
    /// The launch configuration the snapshot in `dir` was taken under, from
    /// the launch record it holds: what [`Hypervisor::restore`] must be
    /// given, and what the host must provide (disks, TAP) for it.
    fn snapshot_config(&self, dir: &Path) -> Result<VmConfig, HypervisorError>;
    /// Starts a VMM process and restores `dir` into it: `Standby → Paused`.
    async fn restore(&self, guest: &GuestVmm, config: &VmConfig, dir: &Path)
        -> Result<VmmHandle, HypervisorError>;
    /// Ends the VMM process in an orderly way and waits until it is gone.
    async fn shutdown_vmm(&self, vmm: &VmmHandle) -> Result<(), HypervisorError>;
    /// Kills the VMM process and waits until it is gone.
    async fn kill(&self, vmm: &VmmHandle) -> Result<(), HypervisorError>;
    async fn info(&self, vmm: &VmmHandle) -> Result<VmInfo, HypervisorError>;
    /// Sets the total guest memory through virtio-mem.
    async fn resize_memory(&self, vmm: &VmmHandle, total_bytes: u64)
        -> Result<(), HypervisorError>;
    async fn add_disk(&self, vmm: &VmmHandle, disk: &DiskConfig) -> Result<(), HypervisorError>;
    async fn remove_disk(&self, vmm: &VmmHandle, id: &str) -> Result<(), HypervisorError>;
}

/// How long a killed VMM process may take to be gone.
pub const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The end every backend's `kill` shares: SIGKILL, wait until the process
/// is gone, remove its socket.
pub(crate) async fn kill_vmm(vmm: &VmmHandle, timeout: std::time::Duration) -> Result<(), HypervisorError> {
    if !process::kill(vmm.process_id(), timeout).await {
        return Err(HypervisorError::Timeout { op: "kill", secs: timeout.as_secs() });
    }
    let _ = std::fs::remove_file(&vmm.socket);
    Ok(())
}

/// The end every backend's orderly shutdown shares, once the VMM was asked
/// to exit: wait for it (it holds locks on the disk images until it is
/// gone), kill it if it will not go (`refusal` says so in the log), and
/// remove its socket.
pub(crate) async fn await_vmm_exit(vmm: &VmmHandle, timeout: std::time::Duration, refusal: &str) {
    let id = vmm.process_id();
    if !process::wait_gone(id, timeout).await {
        tracing::warn!(pid = vmm.pid, "{refusal}; killing it");
        process::kill(id, timeout).await;
    }
    let _ = std::fs::remove_file(&vmm.socket);
}

/// Every initrd that a launch record in `dir` (a guest directory, or a
/// snapshot directory) names, whichever backend wrote it. Asked of every
/// backend, installed or not: a snapshot taken by a backend missing today
/// still needs its initrd when that backend comes back.
pub fn recorded_initrds(dir: &Path) -> Result<Vec<PathBuf>, launch::LaunchError> {
    let mut found = Vec::new();
    for file in [qemu::LAUNCH_FILE, cloud_hypervisor::LAUNCH_FILE] {
        if let Some(initrd) = launch::recorded_initrd(&dir.join(file))? {
            found.push(initrd);
        }
    }
    Ok(found)
}

/// The backends a daemon can use, picked per instance at runtime.
#[derive(Clone, Default)]
pub struct Backends {
    pub cloud_hypervisor: Option<Arc<dyn Hypervisor>>,
    pub qemu: Option<Arc<dyn Hypervisor>>,
}

impl Backends {
    pub fn get(&self, kind: HypervisorKind) -> Option<Arc<dyn Hypervisor>> {
        match kind {
            HypervisorKind::CloudHypervisor => self.cloud_hypervisor.clone(),
            HypervisorKind::Qemu => self.qemu.clone(),
        }
    }
}

/// Checks every real backend passes without a VMM binary: how it treats a
/// stale socket, a socket that never answers, and a VMM that is gone.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    /// The smallest launch configuration: one vCPU, 256 MiB, no disks, no NIC.
    pub fn bare_config() -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_bytes: 256 << 20,
            hotplug_memory_bytes: 0,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            net: None,
            devices: vec![],
            serial_log: "/app.log".into(),
            vsock: None,
            agent: None,
            user: None,
        }
    }

    pub fn guest(dir: &Path, socket: &str) -> GuestVmm {
        GuestVmm { guest_dir: dir.to_path_buf(), socket: dir.join(socket), vmm_log: dir.join("vmm.log"), recorded: None }
    }

    /// A socket file nobody listens on is absent, and a look leaves it
    /// (observation changes nothing; the executor's `ClearStaleSocket`
    /// removes it).
    pub async fn stale_socket_is_absent(hv: &dyn Hypervisor, socket: &str) {
        let dir = tempfile::tempdir().unwrap();
        let g = guest(dir.path(), socket);
        drop(std::os::unix::net::UnixListener::bind(&g.socket).unwrap());
        assert_eq!(hv.probe(&g).await, Probe::Absent);
        assert!(g.socket.exists(), "a probe removes nothing");
        assert_eq!(hv.probe(&g).await, Probe::Absent);
    }

    /// A socket that accepts but never answers is unreachable, with a
    /// reason that contains `why`, and is left alone.
    pub async fn silent_socket_is_unreachable(hv: &dyn Hypervisor, socket: &str, why: &str) {
        let dir = tempfile::tempdir().unwrap();
        let g = guest(dir.path(), socket);
        let _listener = tokio::net::UnixListener::bind(&g.socket).unwrap();
        let probe = hv.probe(&g).await;
        assert!(matches!(&probe, Probe::Unreachable { reason } if reason.contains(why)), "{probe:?}");
        assert!(g.socket.exists(), "a live socket must not be removed");
    }

    /// Calls on a VMM whose process is gone say so; killing it is done;
    /// a missing binary has no version.
    pub async fn gone_vmm_is_vmm_gone(hv: &dyn Hypervisor, socket: &str) {
        let dir = tempfile::tempdir().unwrap();
        let h = VmmHandle { pid: u32::MAX - 1, pid_start_time: 1, socket: dir.path().join(socket), version: None };
        assert!(matches!(hv.boot(&h).await, Err(HypervisorError::VmmGone { .. })));
        assert!(matches!(hv.shutdown_vmm(&h).await, Err(HypervisorError::VmmGone { .. })));
        hv.kill(&h).await.expect("killing a gone VMM is done");
        let err = hv.version().await.unwrap_err();
        assert!(matches!(err, HypervisorError::Backend { op: "version", .. }), "{err:?}");
    }
}
