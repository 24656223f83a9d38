//! Cloud Hypervisor's REST bodies as serde types, spelled exactly as the
//! server's serde spells them (`"VirtioMem"`, `"OnDemand"`, `"Tty"`…).
//!
//! Only the fields hypeman sends or reads are here; optional ones are left
//! out of the JSON when unset so the server's own defaults apply. These are
//! wire types: nothing outside `cloud_hypervisor` sees them, and the tests
//! validate every body built from them against the v53.0 OpenAPI spec.

use serde::{Deserialize, Serialize};

/// `PUT vm.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub payload: PayloadConfig,
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    pub rng: RngConfig,
    pub serial: ConsoleConfig,
    pub console: ConsoleConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    Acpi,
    VirtioMem,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Boot memory, bytes.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_method: Option<HotplugMethod>,
    /// How much can be plugged on top of `size` (a multiple of 128 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// How much of `hotplug_size` is plugged at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    /// MAP_SHARED memory: since v52 snapshots skip never-touched pages.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
    pub id: String,
    /// The guest finds its disks by this virtio serial, not by `vdX` order.
    pub serial: String,
    /// Always explicit: auto-detection is deprecated since v52.
    pub image_type: ImageType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Absent for a NIC whose TAP comes as a descriptor (`vm.add-net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    pub mac: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// A VFIO device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// `/sys/bus/pci/devices/<BDF>`.
    pub path: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: String,
    pub id: String,
}

/// `PUT vm.resize`. Sizes are totals in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResize {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
}

/// `PUT vm.remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveDevice {
    pub id: String,
}

/// `PUT vm.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// `file:///absolute/dir`; the directory must exist and be empty.
    pub destination_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    Copy,
    OnDemand,
}

/// `PUT vm.restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub source_url: String,
    /// Only v52 and later know this field; older servers get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_restore_mode: Option<MemoryRestoreMode>,
    /// NICs whose TAPs come with the request as descriptors, in order.
    /// The server's `RestoreConfig` has had it since v37; the v53 OpenAPI
    /// document does not list it (the fake knows it as a documented gap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_fds: Vec<RestoredNetConfig>,
}

/// One entry of `RestoreConfig::net_fds`: the NIC's id in the snapshot and
/// how many of the request's descriptors are its.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredNetConfig {
    pub id: String,
    pub num_fds: usize,
}

/// `GET vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    #[serde(default)]
    pub build_version: Option<String>,
    pub version: String,
    #[serde(default)]
    pub pid: Option<i64>,
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    /// Only with the `guest_debug` build feature.
    BreakPoint,
}

/// `GET vm.info`, as far as hypeman reads it: the config is kept opaque.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    #[serde(default)]
    pub memory_actual_size: Option<u64>,
    #[serde(default)]
    pub config: serde_json::Value,
}

/// The 200 reply of a hot-plug (`vm.add-disk` into a booted VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}
