//! Pure translation of hypeman's launch configuration into Cloud
//! Hypervisor's request bodies. No IO: the backend sends what this builds.
//!
//! Choices made here, each for a reason in reference/hypervisors.md §1:
//! - memory is `shared` (since v52 snapshots of MAP_SHARED memory are
//!   sparse) and, with hotplug memory, all of it is plugged at boot through
//!   `VirtioMem`, so a standby can unplug it again to shrink the snapshot;
//! - every disk names its `image_type` (auto-detection is deprecated since
//!   v52 and mangles partitionless raw disks on v53) and its virtio serial,
//!   by which the guest finds it;
//! - the serial port is `Tty`, i.e. the VMM's stdout, which the backend
//!   opens in append mode on `logs/app.log`. `File` mode would truncate the
//!   log at every create and restore; the console is off.
//! - Cloud Hypervisor has one rate limiter per network device, applied to
//!   each direction; with different declared limits the stricter one is
//!   used for both.

use super::api;
use super::client::ChVersion;
use crate::hypervisor::IoLimit;
use crate::hypervisor::VmConfig;
use std::path::Path;

/// Token buckets refill in this many milliseconds: small enough that a
/// limit is smooth rather than a burst once a second.
const REFILL_MS: u64 = 100;

/// The id of a VM's NIC (one at most).
pub const NET_ID: &str = "net0";

/// Where a VMM that is not root finds its TAP: the daemon attaches to it
/// and sends the descriptor with `vm.add-net` or `vm.restore`.
pub const TAP_FD_SENT: usize = 1;

/// Where a VMM that is not root finds its kernel and initrd (when they lie
/// outside the data dir) and its disks outside it (volumes): descriptors
/// the daemon opened, inherited at these numbers, and named to the VMM as
/// `/proc/self/fd/N`, a path that skips their directories. Disk `i` is at
/// `DISK_FD_BASE + i`, so a restore (which reopens the snapshot's paths)
/// finds them at the same numbers.
pub const KERNEL_FD: i32 = 4;
pub const INITRD_FD: i32 = 5;
pub const DISK_FD_BASE: i32 = 10;

/// A file a sandboxed VMM gets as an inherited descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedFile {
    pub path: std::path::PathBuf,
    pub at: i32,
    pub write: bool,
}

/// What `config`'s VMM inherits (nothing for a root VMM).
pub fn passed_files(config: &VmConfig) -> Vec<PassedFile> {
    let Some(user) = &config.user else { return Vec::new() };
    let outside = |p: &Path| !p.starts_with(&user.data_dir);
    let mut out: Vec<PassedFile> = std::iter::once((config.kernel.clone(), KERNEL_FD))
        .chain(config.initrd.clone().map(|i| (i, INITRD_FD)))
        .filter(|(p, _)| outside(p))
        .map(|(path, at)| PassedFile { path, at, write: false })
        .collect();
    for (i, d) in config.disks.iter().enumerate().filter(|(_, d)| outside(&d.path)) {
        out.push(PassedFile { path: d.path.clone(), at: DISK_FD_BASE + i as i32, write: !d.readonly });
    }
    out
}

/// The path the VMM is told for `path`: its descriptor's when passed one.
fn path_for(passed: &[PassedFile], path: &Path) -> String {
    match passed.iter().find(|f| f.path == path) {
        Some(f) => format!("/proc/self/fd/{}", f.at),
        None => path.display().to_string(),
    }
}

/// The NIC of `config`, as `vm.create` names it (by TAP name) or, for a
/// VMM that is not root, as `vm.add-net` does (the TAP as a descriptor).
pub fn net_config(config: &VmConfig) -> Option<api::NetConfig> {
    config.net.as_ref().map(|n| api::NetConfig {
        tap: config.user.is_none().then(|| n.tap.clone()),
        mac: n.mac.clone(),
        id: NET_ID.to_string(),
        rate_limiter_config: rate_limiter(&stricter(&n.limit_down, &n.limit_up)),
    })
}

/// What `vm.create` gets for `config`. A VMM that is not root gets its NIC
/// afterwards, by `vm.add-net` ([`net_config`]): `vm.create` drops
/// descriptors sent with it.
pub fn vm_config(config: &VmConfig) -> api::VmConfig {
    let passed = passed_files(config);
    let hotplug = config.hotplug_memory_bytes;
    let mut cmdline = config.cmdline.clone();
    if hotplug > 0 {
        // Plugged blocks must be movable to be unpluggable again.
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str("memhp_default_state=online_movable");
    }
    api::VmConfig {
        payload: api::PayloadConfig {
            kernel: path_for(&passed, &config.kernel),
            initramfs: config.initrd.as_ref().map(|p| path_for(&passed, p)),
            cmdline: (!cmdline.is_empty()).then_some(cmdline),
        },
        cpus: api::CpusConfig { boot_vcpus: config.vcpus, max_vcpus: config.vcpus },
        memory: api::MemoryConfig {
            size: config.memory_bytes,
            hotplug_method: (hotplug > 0).then_some(api::HotplugMethod::VirtioMem),
            hotplug_size: (hotplug > 0).then_some(hotplug),
            hotplugged_size: (hotplug > 0).then_some(hotplug),
            shared: true,
        },
        disks: config
            .disks
            .iter()
            .map(|d| api::DiskConfig { path: path_for(&passed, &d.path), ..disk(d) })
            .collect(),
        net: net_config(config).filter(|_| config.user.is_none()).into_iter().collect(),
        rng: api::RngConfig { src: "/dev/urandom".to_string() },
        serial: api::ConsoleConfig { mode: api::ConsoleMode::Tty, file: None },
        console: api::ConsoleConfig { mode: api::ConsoleMode::Off, file: None },
        devices: config
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| api::DeviceConfig { path: vfio_path(d), id: format!("vfio{i}") })
            .collect(),
        vsock: config
            .vsock
            .as_ref()
            .map(|v| api::VsockConfig {
                cid: u64::from(v.cid),
                socket: v.socket.display().to_string(),
                id: "vsock0".to_string(),
            })
            // The agent channel is the VM's vsock device unless the
            // configuration names one itself (a VM has one at most).
            .or_else(|| config.agent.as_ref().map(agent_vsock)),
    }
}

/// The guest's context id on its own vsock device (each VM has its own
/// hybrid vsock, so every guest can be 3, the first non-reserved id).
pub const AGENT_CID: u64 = 3;

/// The agent channel as a vsock device: the host reaches the guest's agent
/// port through the hybrid vsock socket (`CONNECT <port>`).
fn agent_vsock(agent: &crate::hypervisor::AgentChannel) -> api::VsockConfig {
    api::VsockConfig { cid: AGENT_CID, socket: agent.socket.display().to_string(), id: "agent".to_string() }
}

/// The body of `vm.add-disk`, and of each entry of `disks`.
pub fn disk(d: &crate::hypervisor::DiskConfig) -> api::DiskConfig {
    api::DiskConfig {
        path: d.path.display().to_string(),
        readonly: d.readonly,
        id: d.id.clone(),
        serial: d.id.clone(),
        image_type: api::ImageType::Raw,
        rate_limiter_config: rate_limiter(&d.limit),
    }
}

/// `vm.restore` of the snapshot in `dir`, for a VMM of `version`.
pub fn restore_config(dir: &Path, mode: Option<api::MemoryRestoreMode>) -> api::RestoreConfig {
    api::RestoreConfig { source_url: super::client::file_url(dir), memory_restore_mode: mode, net_fds: Vec::new() }
}

/// [`restore_config`] for `config`'s VMM: one that is not root gets its
/// TAP with the request ([`TAP_FD_SENT`] descriptor for the NIC).
pub fn restore_config_for(config: &VmConfig, dir: &Path, mode: Option<api::MemoryRestoreMode>) -> api::RestoreConfig {
    let mut body = restore_config(dir, mode);
    if config.user.is_some() && config.net.is_some() {
        body.net_fds.push(api::RestoredNetConfig { id: NET_ID.to_string(), num_fds: TAP_FD_SENT });
    }
    body
}

/// How a VMM of `version` should load a snapshot's memory:
/// - before v52 the field does not exist (`None`: the server copies);
/// - v52 restores on demand, but snapshotting such a VM with shared memory
///   could write a corrupt snapshot (CH #8525), so it copies;
/// - from v53 on demand: the guest resumes at once and pages fault in.
pub fn restore_mode(version: ChVersion, shared_memory: bool) -> Option<api::MemoryRestoreMode> {
    match (version.major, shared_memory) {
        (0..=51, _) => None,
        (52, true) => Some(api::MemoryRestoreMode::Copy),
        _ => Some(api::MemoryRestoreMode::OnDemand),
    }
}

/// A bucket that lets `rate` tokens a second through. A rate too low to
/// fill one token in [`REFILL_MS`] gets a one-token bucket with a longer
/// refill instead: rounding the size up to 1 would multiply the rate (5
/// IOPS would become 10), and a zero-sized bucket would block all IO.
fn bucket(per_sec: Option<u64>) -> Option<api::TokenBucket> {
    per_sec.filter(|rate| *rate > 0).map(|rate| {
        let per_refill = rate.saturating_mul(REFILL_MS) / 1000;
        if per_refill >= 1 {
            api::TokenBucket { size: per_refill, one_time_burst: None, refill_time: REFILL_MS }
        } else {
            api::TokenBucket { size: 1, one_time_burst: None, refill_time: (1000 + rate / 2) / rate }
        }
    })
}

fn rate_limiter(limit: &IoLimit) -> Option<api::RateLimiterConfig> {
    let config = api::RateLimiterConfig { bandwidth: bucket(limit.bytes_per_sec), ops: bucket(limit.ops_per_sec) };
    (config.bandwidth.is_some() || config.ops.is_some()).then_some(config)
}

/// Per field, the lower of two limits (an unset limit is no limit).
fn stricter(a: &IoLimit, b: &IoLimit) -> IoLimit {
    let min = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    };
    IoLimit { bytes_per_sec: min(a.bytes_per_sec, b.bytes_per_sec), ops_per_sec: min(a.ops_per_sec, b.ops_per_sec) }
}

/// A declared device is a sysfs path or a bare PCI address (`0000:01:00.0`).
fn vfio_path(device: &Path) -> String {
    let text = device.display().to_string();
    if text.contains('/') {
        text
    } else {
        format!("/sys/bus/pci/devices/{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{DiskConfig, NetConfig, VsockConfig};
    use std::path::PathBuf;

    /// A representative declaration: hotplug memory, four disks with and
    /// without limits, a network with asymmetric limits, VFIO, vsock.
    fn representative() -> VmConfig {
        let disk = |id: &str, path: &str, readonly, limit| DiskConfig { id: id.into(), path: path.into(), readonly, limit };
        VmConfig {
            vcpus: 2,
            memory_bytes: 1 << 30,
            hotplug_memory_bytes: 3 << 30,
            kernel: "/var/lib/hypeman/system/vmlinuz".into(),
            initrd: Some("/var/lib/hypeman/system/initrd/abc.cpio".into()),
            cmdline: "console=ttyS0 panic=-1 quiet init_on_free=1".into(),
            disks: vec![
                disk("rootfs", "/var/lib/hypeman/images/sha256-1/rootfs.erofs", true, IoLimit::default()),
                disk("overlay", "/var/lib/hypeman/guests/G/overlay.raw", false, IoLimit { bytes_per_sec: Some(50 << 20), ops_per_sec: Some(1000) }),
                disk("config", "/var/lib/hypeman/guests/G/config.erofs", true, IoLimit::default()),
                disk("vol0", "/srv/data.raw", false, IoLimit { bytes_per_sec: None, ops_per_sec: Some(5) }),
            ],
            net: Some(NetConfig {
                tap: "hm-web".into(),
                mac: "02:00:00:00:00:01".into(),
                limit_down: IoLimit { bytes_per_sec: Some(12_500_000), ops_per_sec: None },
                limit_up: IoLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: None },
            }),
            devices: vec![PathBuf::from("0000:01:00.0"), PathBuf::from("/sys/bus/pci/devices/0000:02:00.0")],
            serial_log: "/var/lib/hypeman/guests/G/logs/app.log".into(),
            vsock: Some(VsockConfig { cid: 3, socket: "/var/lib/hypeman/guests/G/vsock.sock".into() }),
            agent: None,
            user: None,
        }
    }

    #[test]
    fn request_bodies_of_a_representative_declaration() {
        let config = representative();
        let bodies = serde_json::json!({
            "vm.create": vm_config(&config),
            "vm.add-disk": disk(&DiskConfig {
                id: "vol1".into(),
                path: "/srv/more.raw".into(),
                readonly: true,
                limit: IoLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: None },
            }),
            "vm.remove-device": api::VmRemoveDevice { id: "vol1".into() },
            "vm.resize": api::VmResize { desired_ram: Some(config.memory_bytes) },
            "vm.snapshot": api::VmSnapshotConfig {
                destination_url: super::super::client::file_url(Path::new("/var/lib/hypeman/guests/G/snapshots/snapshot-latest")),
            },
            "vm.restore (v53)": restore_config(Path::new("/var/lib/hypeman/guests/G/snapshots/snapshot-latest"), restore_mode(ChVersion { major: 53, minor: 0, patch: 0 }, true)),
            "vm.restore (v49)": restore_config(Path::new("/var/lib/hypeman/guests/G/snapshots/snapshot-latest"), restore_mode(ChVersion { major: 49, minor: 0, patch: 0 }, true)),
        });
        insta::assert_json_snapshot!("request_bodies", bodies);
    }

    #[test]
    fn a_small_guest_has_no_hotplug_and_no_limits() {
        let mut c = representative();
        c.hotplug_memory_bytes = 0;
        c.cmdline = String::new();
        c.net = None;
        c.devices.clear();
        c.vsock = None;
        c.initrd = None;
        for d in &mut c.disks {
            d.limit = IoLimit::default();
        }
        let body = serde_json::to_value(vm_config(&c)).unwrap();
        assert_eq!(body["memory"], serde_json::json!({ "size": 1u64 << 30, "shared": true }));
        assert_eq!(body["payload"], serde_json::json!({ "kernel": "/var/lib/hypeman/system/vmlinuz" }));
        for key in ["net", "devices", "vsock"] {
            assert!(body.get(key).is_none(), "{key} should be left out");
        }
        assert!(body["disks"].as_array().unwrap().iter().all(|d| d.get("rate_limiter_config").is_none()));
        assert_eq!(body["serial"], serde_json::json!({ "mode": "Tty" }));
        assert_eq!(body["console"], serde_json::json!({ "mode": "Off" }));
    }

    #[test]
    fn the_agent_channel_is_the_vsock_device_unless_one_is_named() {
        let mut c = representative();
        c.vsock = None;
        c.agent = Some(crate::hypervisor::AgentChannel { socket: "/var/lib/hypeman/guests/G/agent.sock".into() });
        let body = serde_json::to_value(vm_config(&c)).unwrap();
        assert_eq!(body["vsock"], serde_json::json!({ "cid": 3, "socket": "/var/lib/hypeman/guests/G/agent.sock", "id": "agent" }));
        let named = representative();
        let mut both = named.clone();
        both.agent = c.agent.clone();
        assert_eq!(vm_config(&both).vsock, vm_config(&named).vsock);
    }

    #[test]
    fn restore_modes_by_version() {
        let v = |major| ChVersion { major, minor: 0, patch: 0 };
        let table = [
            (46, true, None),
            (49, false, None),
            (51, true, None),
            (52, true, Some(api::MemoryRestoreMode::Copy)),
            (52, false, Some(api::MemoryRestoreMode::OnDemand)),
            (53, true, Some(api::MemoryRestoreMode::OnDemand)),
            (54, false, Some(api::MemoryRestoreMode::OnDemand)),
        ];
        for (major, shared, want) in table {
            assert_eq!(restore_mode(v(major), shared), want, "v{major} shared={shared}");
        }
    }

    #[test]
    fn limits_become_token_buckets() {
        assert_eq!(rate_limiter(&IoLimit::default()), None);
        let l = rate_limiter(&IoLimit { bytes_per_sec: Some(5), ops_per_sec: Some(20_000) }).unwrap();
        // Never a zero-sized bucket, which would block all IO, and never a
        // faster one: 1 token every 200 ms is 5 a second.
        assert_eq!(l.bandwidth.unwrap(), api::TokenBucket { size: 1, one_time_burst: None, refill_time: 200 });
        assert_eq!(l.ops.unwrap(), api::TokenBucket { size: 2000, one_time_burst: None, refill_time: 100 });
        // Every rate comes out as itself, to within rounding.
        for rate in [1u64, 3, 5, 7, 9, 10, 11, 99, 1000, 12_500_000] {
            let b = bucket(Some(rate)).unwrap();
            let got = b.size as f64 * 1000.0 / b.refill_time as f64;
            assert!((got - rate as f64).abs() / (rate as f64) < 0.1, "{rate}/s became {got}/s ({b:?})");
        }
        let s = stricter(
            &IoLimit { bytes_per_sec: Some(10), ops_per_sec: None },
            &IoLimit { bytes_per_sec: Some(20), ops_per_sec: Some(7) },
        );
        assert_eq!(s, IoLimit { bytes_per_sec: Some(10), ops_per_sec: Some(7) });
    }
}
