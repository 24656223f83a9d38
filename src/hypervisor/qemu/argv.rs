//! The QEMU command line for one VM, as a pure function of its launch
//! configuration. No IO here: the backend resolves the accelerator and the
//! TSC rate first and passes them in, so the argv is reproducible, which a
//! restore depends on (QEMU restores only into an identical command line).
//!
//! Machine choice: `microvm` (virtio-mmio, fastest boot) unless the VM has
//! hotplug memory, which needs virtio-mem and therefore `q35` (microvm has
//! no device-memory region; reference/this-machine.md §4).

use crate::hypervisor::{DiskConfig, VmConfig};
#[cfg(test)]
use crate::hypervisor::NetConfig;
use std::path::PathBuf;

/// The accelerator after `auto` has been decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Tcg,
    Kvm,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Tcg => "tcg",
            Accelerator::Kvm => "kvm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Microvm,
    Q35,
}

impl Machine {
    pub fn for_config(config: &VmConfig) -> Machine {
        if config.hotplug_memory_bytes > 0 || !config.devices.is_empty() {
            Machine::Q35
        } else {
            Machine::Microvm
        }
    }
}

/// Host paths the command line names besides the configuration's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPaths {
    pub qmp_socket: PathBuf,
    /// The serial console's file.
    pub app_log: PathBuf,
}

/// The descriptor a per-instance VMM finds its TAP at.
pub const TAP_FD: i32 = 3;

/// Where a per-instance VMM finds its kernel (and an initrd kept outside the
/// data dir), opened by the daemon, when the file lies outside the data dir:
/// QEMU reads `-kernel /proc/self/fd/N`, a path that reaches the file
/// without passing through its directories (which may be private: a
/// checkout under a `0700` home); only the file's own mode still counts.
pub const KERNEL_FD: i32 = 4;
pub const INITRD_FD: i32 = 5;

/// The boot files of `config` a VMM that is not root gets by descriptor,
/// with the number each is at.
pub fn boot_files_by_descriptor(config: &VmConfig) -> Vec<(PathBuf, i32)> {
    let Some(user) = &config.user else { return Vec::new() };
    std::iter::once((config.kernel.clone(), KERNEL_FD))
        .chain(config.initrd.clone().map(|i| (i, INITRD_FD)))
        .filter(|(p, _)| !p.starts_with(&user.data_dir))
        .collect()
}

/// The path QEMU is told for `file`: its descriptor's when it is passed one.
fn boot_file(config: &VmConfig, file: &std::path::Path) -> String {
    match boot_files_by_descriptor(config).into_iter().find(|(p, _)| p == file) {
        Some((_, fd)) => format!("/proc/self/fd/{fd}"),
        None => file.display().to_string(),
    }
}

/// Where a per-instance VMM finds the descriptors of its disks outside the
/// data dir (volumes): disk `i` read-write at `DISK_FD_BASE + 2i`, read-only
/// at `+ 1`. Numbered by the disk's place, so a restore's argv is the same.
pub const DISK_FD_BASE: i32 = 10;

/// A disk a VMM that is not root gets as descriptors the daemon opened,
/// rather than a path it would have to reach: everything outside the data
/// dir (a volume's directories are the user's, and may well be private).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFds {
    /// The disk's place in `VmConfig::disks`.
    pub index: usize,
    /// Opened read-write at this number; `None` for a read-only disk.
    pub read_write: Option<i32>,
    /// Opened read-only at this number: QEMU dups the descriptor of the
    /// set whose access mode matches each open it makes.
    pub read_only: i32,
    /// The fdset both are added to (`/dev/fdset/N` is the drive's file).
    pub set: i32,
}

/// The disks of `config` passed by descriptor, and at which numbers; none
/// for a root VMM.
pub fn disks_by_descriptor(config: &VmConfig) -> Vec<DiskFds> {
    let Some(user) = &config.user else { return Vec::new() };
    config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.path.starts_with(&user.data_dir))
        .map(|(index, d)| {
            let base = DISK_FD_BASE + 2 * index as i32;
            DiskFds { index, read_write: (!d.readonly).then_some(base), read_only: base + 1, set: base }
        })
        .collect()
}

/// `-sandbox` for a VMM that runs as its own user (issue 11).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The id of the virtio-mem device, for `qom-set` on its `requested-size`.
pub const VIRTIO_MEM_ID: &str = "vm0";

/// A size as QEMU's `-m`/`size=` parse it.
fn size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes % MIB == 0 {
        format!("{}M", bytes / MIB)
    } else {
        format!("{bytes}B")
    }
}

/// Commas in a QemuOpts value are escaped by doubling them.
fn opt(value: &std::path::Path) -> String {
    value.display().to_string().replace(',', ",,")
}

fn drive(disk: &DiskConfig, fds: Option<&DiskFds>) -> String {
    let file = match fds {
        Some(f) => format!("/dev/fdset/{}", f.set),
        None => opt(&disk.path),
    };
    let mut s = format!("id={},file={file},format=raw,if=none", disk.id);
    if disk.readonly {
        s.push_str(",readonly=on");
    } else {
        s.push_str(",discard=unmap");
    }
    if let Some(bps) = disk.limit.bytes_per_sec {
        s.push_str(&format!(",throttling.bps-total={bps}"));
    }
    if let Some(iops) = disk.limit.ops_per_sec {
        s.push_str(&format!(",throttling.iops-total={iops}"));
    }
    s
}

/// The full argument list (without the binary). `vhost_net` moves the NIC's
/// data path into the host kernel (only useful, and only offered, under
/// KVM). `incoming` adds `-incoming defer` for a restore; everything else
/// is identical.
///
/// The NIC's bandwidth limits are not here: QEMU's tap netdev has no rate
/// limiter, and the backend refuses a configuration that asks for one.
pub fn argv(
    config: &VmConfig,
    paths: &LaunchPaths,
    accel: Accelerator,
    tsc_khz: Option<u64>,
    vhost_net: bool,
    incoming: bool,
) -> Vec<String> {
    let machine = Machine::for_config(config);
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    match machine {
        Machine::Microvm => push(&["-M", "microvm"]),
        Machine::Q35 => push(&["-M", "q35"]),
    }
    push(&["-accel", accel.as_str()]);
    push(&["-cpu", match accel {
        Accelerator::Tcg => "max",
        Accelerator::Kvm => "host",
    }]);
    push(&["-smp", &config.vcpus.to_string()]);
    let boot_mem = size(config.memory_bytes);
    match machine {
        Machine::Q35 if config.hotplug_memory_bytes > 0 => {
            let max = size(config.memory_bytes + config.hotplug_memory_bytes);
            push(&["-m", &format!("{boot_mem},maxmem={max}")]);
        }
        _ => push(&["-m", &boot_mem]),
    }
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    if config.user.is_some() {
        // QEMU's seccomp filter. spawn=deny forbids fork/exec, so snapshots
        // of such a VM go through a descriptor the daemon hands over
        // (`fd:` migration), not through `exec:cat`.
        push(&["-sandbox", SANDBOX]);
    }
    push(&["-kernel", &boot_file(config, &config.kernel)]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", &boot_file(config, initrd)]);
    }
    let mut cmdline = config.cmdline.clone();
    let mut arg = |s: String| {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&s);
    };
    // Under TCG microvm has nothing to calibrate the TSC against and hangs
    // about every other boot without it (reference/this-machine.md §2).
    if let (Machine::Microvm, Accelerator::Tcg, Some(khz)) = (machine, accel, tsc_khz) {
        arg(format!("tsc_early_khz={khz}"));
        // TCG's TSC follows the host clock and stops while the VM is
        // stopped, but a starved vCPU delivers its timer ticks late, so the
        // clocksource watchdog (which checks the TSC against those ticks)
        // marks it unstable and the guest falls back to refined-jiffies,
        // whose wall clock then loses time with every late tick (measured:
        // a guest 2.3 s behind 10 s after boot on a loaded host).
        arg("tsc=reliable".to_string());
    }
    if config.hotplug_memory_bytes > 0 {
        // Plugged blocks must be movable to be unpluggable again.
        arg("memhp_default_state=online_movable".to_string());
        if config.devices.is_empty() {
            // q35 puts the device-memory region above 4 GiB, and its SRAT
            // entry makes the kernel expect RAM up there, so it reserves
            // its 64 MiB DMA bounce buffer (swiotlb) at boot: half of a
            // 128 MiB guest, which then panics ("System is deadlocked on
            // memory") before init runs. Virtio devices do not use the
            // DMA API without VIRTIO_F_ACCESS_PLATFORM, so they never
            // bounce; a passthrough device might, so it keeps the buffer.
            arg("swiotlb=noforce".to_string());
        }
    }
    push(&["-append", &cmdline]);
    if machine == Machine::Q35 && config.hotplug_memory_bytes > 0 {
        push(&[
            "-object",
            &format!("memory-backend-ram,id=vmem0,size={}", size(config.hotplug_memory_bytes)),
            "-device",
            // All of it plugged from the start, as Cloud Hypervisor does:
            // the guest's driver plugs it as it probes, with no QMP call a
            // daemon killed at the wrong moment could leave unmade. A
            // restore gets the size at the pause from the migration stream
            // (virtio-mem migrates `requested-size` and its plugged-block
            // bitmap), not this value.
            &format!(
                "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev=vmem0,block-size=2M,requested-size={}",
                size(config.hotplug_memory_bytes)
            ),
        ]);
    }
    let (blk, net_dev) = match machine {
        Machine::Microvm => ("virtio-blk-device", "virtio-net-device"),
        Machine::Q35 => ("virtio-blk-pci", "virtio-net-pci"),
    };
    let by_fd = disks_by_descriptor(config);
    for f in &by_fd {
        for fd in f.read_write.into_iter().chain([f.read_only]) {
            push(&["-add-fd", &format!("fd={fd},set={}", f.set)]);
        }
    }
    for (index, disk) in config.disks.iter().enumerate() {
        push(&["-drive", &drive(disk, by_fd.iter().find(|f| f.index == index))]);
        push(&["-device", &format!("{blk},drive={id},serial={id}", id = disk.id)]);
    }
    if let Some(net) = &config.net {
        // A VMM that is not root may not open /dev/net/tun (0600 here): the
        // daemon attaches to the TAP and hands the descriptor over as
        // TAP_FD, the same number at every launch so a restore's argv is
        // the same.
        let tap = match config.user {
            Some(_) => format!("fd={TAP_FD}"),
            None => format!("ifname={},script=no,downscript=no", net.tap),
        };
        push(&[
            "-netdev",
            &format!("tap,id=net0,{tap},vhost={}", if vhost_net { "on" } else { "off" }),
            "-device",
            &format!("{net_dev},netdev=net0,mac={}", net.mac),
        ]);
    }
    for dev in &config.devices {
        push(&["-device", &format!("vfio-pci,sysfsdev={}", opt(dev))]);
    }
    push(&[
        "-chardev",
        &format!("file,id=con,path={},append=on", opt(&paths.app_log)),
        "-serial",
        "chardev:con",
    ]);
    if let Some(agent) = &config.agent {
        // The agent's channel: a named port on a virtio-serial device (the
        // console is the 8250 UART above, so the device is the agent's
        // alone). `wait=off`: QEMU runs without a host client, and the
        // guest sees the port's host side come and go as the daemon
        // connects for each exchange.
        let serial = match machine {
            Machine::Microvm => "virtio-serial-device",
            Machine::Q35 => "virtio-serial-pci",
        };
        push(&[
            "-device",
            &format!("{serial},id=agent-serial,max_ports=2"),
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", opt(&agent.socket)),
            "-device",
            &format!("virtserialport,bus=agent-serial.0,chardev=agent,name={}", hypeman_contract::agent::SERIAL_PORT_NAME),
        ]);
    }
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt(&paths.qmp_socket))]);
    // Created, not booted: `cont` boots.
    push(&["-S"]);
    if incoming {
        push(&["-incoming", "defer"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::IoLimit;

    fn config() -> VmConfig {
        let disk = |id: &str, path: &str, readonly: bool| DiskConfig {
            id: id.into(),
            path: path.into(),
            readonly,
            limit: IoLimit::default(),
        };
        VmConfig {
            vcpus: 2,
            memory_bytes: 256 << 20,
            hotplug_memory_bytes: 0,
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/d/initrd.cpio.gz".into()),
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
            disks: vec![
                disk("rootfs", "/img/rootfs.erofs", true),
                disk("overlay", "/g/overlay.raw", false),
                disk("config", "/g/config,1.erofs", true),
            ],
            net: None,
            devices: vec![],
            serial_log: "/g/logs/app.log".into(),
            vsock: None,
            agent: None,
            user: None,
        }
    }

    fn paths() -> LaunchPaths {
        LaunchPaths { qmp_socket: "/g/qmp.sock".into(), app_log: "/g/logs/app.log".into() }
    }

    #[test]
    fn microvm_under_tcg() {
        let mut c = config();
        c.disks[1].limit = IoLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: Some(500) };
        insta::assert_snapshot!(argv(&c, &paths(), Accelerator::Tcg, Some(2_100_000), false, false).join("\n"));
    }

    #[test]
    fn q35_with_virtio_mem_under_kvm_restoring() {
        let mut c = config();
        c.hotplug_memory_bytes = 768 << 20;
        insta::assert_snapshot!(argv(&c, &paths(), Accelerator::Kvm, Some(2_100_000), false, true).join("\n"));
    }

    #[test]
    fn restore_adds_only_incoming_defer() {
        let c = config();
        let create = argv(&c, &paths(), Accelerator::Tcg, Some(1), false, false);
        let mut restore = argv(&c, &paths(), Accelerator::Tcg, Some(1), false, true);
        assert_eq!(restore.split_off(create.len()), vec!["-incoming", "defer"]);
        assert_eq!(restore, create);
    }

    fn with_net(mut c: VmConfig) -> VmConfig {
        c.net = Some(NetConfig {
            tap: "hm4rrffq69g5fav".into(),
            mac: "02:8f:11:d2:7c:03".into(),
            limit_down: IoLimit::default(),
            limit_up: IoLimit::default(),
        });
        c
    }

    #[test]
    fn microvm_with_a_nic_under_tcg() {
        insta::assert_snapshot!(argv(&with_net(config()), &paths(), Accelerator::Tcg, Some(2_100_000), false, false).join("\n"));
    }

    /// A VMM with its own user: QEMU's seccomp sandbox, and the TAP as the
    /// descriptor the daemon hands over rather than a name to open.
    #[test]
    fn a_vmm_user_gets_the_sandbox_and_its_tap_by_descriptor() {
        let mut c = with_net(config());
        c.user = Some(crate::hypervisor::VmmUser { uid: 70001, gid: 70001, groups: vec![69999], data_dir: "/d".into() });
        let args = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        let at = args.iter().position(|a| a == "-sandbox").expect("sandboxed");
        assert_eq!(args[at + 1], "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
        let at = args.iter().position(|a| a == "-netdev").expect("a netdev");
        assert_eq!(args[at + 1], "tap,id=net0,fd=3,vhost=off");
        let root = argv(&with_net(config()), &paths(), Accelerator::Tcg, None, false, false);
        assert!(!root.iter().any(|a| a == "-sandbox"), "a root VMM as before");
    }

    /// A volume outside the data dir reaches a VMM that is not root as
    /// descriptors in an fdset (its directories may be private); the
    /// disks under the data dir keep their paths (granted by group).
    #[test]
    fn a_vmm_user_gets_its_volumes_by_descriptor() {
        let mut c = config();
        let disk = |id: &str, path: &str, readonly: bool| DiskConfig { id: id.into(), path: path.into(), readonly, limit: Default::default() };
        c.disks = vec![disk("rootfs", "/d/images/x/rootfs.erofs", true), disk("vol0", "/srv/data.raw", false), disk("vol1", "/srv/ro.raw", true)];
        c.user = Some(crate::hypervisor::VmmUser { uid: 70001, gid: 70001, groups: vec![69999], data_dir: "/d".into() });
        assert_eq!(
            disks_by_descriptor(&c),
            vec![
                DiskFds { index: 1, read_write: Some(12), read_only: 13, set: 12 },
                DiskFds { index: 2, read_write: None, read_only: 15, set: 14 },
            ]
        );
        let args = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        let values = |flag: &str| args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect::<Vec<_>>();
        assert_eq!(values("-add-fd"), ["fd=12,set=12", "fd=13,set=12", "fd=15,set=14"]);
        let drives = values("-drive");
        assert!(drives[0].starts_with("id=rootfs,file=/d/images/x/rootfs.erofs,"), "{drives:?}");
        assert!(drives[1].starts_with("id=vol0,file=/dev/fdset/12,") && drives[1].contains("discard=unmap"), "{drives:?}");
        assert!(drives[2].starts_with("id=vol1,file=/dev/fdset/14,") && drives[2].contains("readonly=on"), "{drives:?}");
        let at = args.iter().position(|a| a == "-kernel").unwrap();
        assert_eq!(args[at + 1], "/proc/self/fd/4", "the kernel lies outside the data dir");
        c.user = None;
        assert!(disks_by_descriptor(&c).is_empty(), "a root VMM opens every disk by path");
        assert!(boot_files_by_descriptor(&c).is_empty());
    }

    #[test]
    fn q35_with_a_vhost_nic_under_kvm() {
        let mut c = with_net(config());
        c.hotplug_memory_bytes = 512 << 20;
        let args = argv(&c, &paths(), Accelerator::Kvm, None, true, false);
        let at = args.iter().position(|a| a == "-netdev").expect("a netdev");
        assert_eq!(
            args[at..at + 4],
            [
                "-netdev",
                "tap,id=net0,ifname=hm4rrffq69g5fav,script=no,downscript=no,vhost=on",
                "-device",
                "virtio-net-pci,netdev=net0,mac=02:8f:11:d2:7c:03",
            ]
        );
    }

    #[test]
    fn the_agent_channel_is_a_named_port_on_its_own_virtio_serial_device() {
        let mut c = config();
        let without = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        c.agent = Some(crate::hypervisor::AgentChannel { socket: "/g/agent,1.sock".into() });
        let with = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        let at = with.iter().position(|a| a == "virtio-serial-device,id=agent-serial,max_ports=2").expect("a virtio-serial device");
        assert_eq!(
            with[at - 1..at + 5],
            [
                "-device",
                "virtio-serial-device,id=agent-serial,max_ports=2",
                "-chardev",
                "socket,id=agent,path=/g/agent,,1.sock,server=on,wait=off",
                "-device",
                "virtserialport,bus=agent-serial.0,chardev=agent,name=org.hypeman.agent.0",
            ]
        );
        // Nothing else moves: a VM without the channel (a snapshot taken
        // before it existed) keeps its command line.
        let mut rest = with.clone();
        rest.drain(at - 1..at + 5);
        assert_eq!(rest, without);
        c.hotplug_memory_bytes = 256 << 20;
        assert!(argv(&c, &paths(), Accelerator::Tcg, None, false, false).contains(&"virtio-serial-pci,id=agent-serial,max_ports=2".to_string()));
    }

    #[test]
    fn hotplug_memory_is_plugged_at_boot_and_the_bounce_buffer_kept_only_for_passthrough() {
        let mut c = config();
        c.memory_bytes = 128 << 20;
        c.hotplug_memory_bytes = 128 << 20;
        let args = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        assert!(args.contains(&"128M,maxmem=256M".to_string()), "{args:?}");
        assert!(args.contains(&"virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2M,requested-size=128M".to_string()), "{args:?}");
        let cmdline = |args: &[String]| args[args.iter().position(|a| a == "-append").unwrap() + 1].clone();
        assert!(cmdline(&args).ends_with("memhp_default_state=online_movable swiotlb=noforce"), "{}", cmdline(&args));
        c.devices = vec!["/sys/bus/pci/devices/0000:01:00.0".into()];
        let args = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        assert!(!cmdline(&args).contains("swiotlb"), "{}", cmdline(&args));
        c.hotplug_memory_bytes = 0;
        let args = argv(&c, &paths(), Accelerator::Tcg, None, false, false);
        assert!(!cmdline(&args).contains("swiotlb") && !args.iter().any(|a| a.contains("virtio-mem")), "{args:?}");
    }

    #[test]
    fn tsc_rate_only_for_tcg_microvm() {
        let has_tsc = |c: &VmConfig, a| argv(c, &paths(), a, Some(5), false, false).iter().any(|s| s.contains("tsc_early_khz=5"));
        let mut q35 = config();
        q35.hotplug_memory_bytes = 1 << 30;
        assert!(has_tsc(&config(), Accelerator::Tcg));
        assert!(!has_tsc(&config(), Accelerator::Kvm));
        assert!(!has_tsc(&q35, Accelerator::Tcg));
    }
}
