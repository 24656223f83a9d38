//! The QEMU backend against a real QEMU (TCG microvm): create, boot, pause,
//! snapshot, shut the VMM down, restore, resume, and the guest's counter
//! carries on where it stopped.
//!
//! Gated: without `HYPEMAN_REAL_VM=1` it prints why it skipped and passes.
//! With it, a missing prerequisite is a failure. Needs
//! `HYPEMAN_GUEST_KERNEL_DIR` (from `scripts/fetch-guest-kernel.sh`; default
//! `target/guest-kernel`) and the static init (`HYPEMAN_INIT_BINARY`, default
//! the release build under `target/x86_64-unknown-linux-gnu`).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hypeman::declaration::spec::IoLimit;
use hypeman::hypervisor::qemu::{QemuBackend, LAUNCH_FILE, MEMORY_FILE};
use hypeman::hypervisor::{DiskConfig, GuestVmm, Hypervisor, Probe, VmConfig, VmmHandle};
use hypeman::instances::image_provisioner::{ensure_overlay, write_config_disk, BASE_CMDLINE};
use hypeman::settings::Accel;
use hypeman::state::VmState;
use hypeman::system::cached_initrd;
use hypeman_contract::config::{GuestConfig, CONFIG_VERSION};
use support::{busybox_tree, real_vm};

const COUNTER_SCRIPT: &str = "i=0; while true; do i=$((i+1)); echo COUNTER $i; sleep 0.2; done";
/// Counts to 15 and exits: hypeman-init then powers the guest off.
const SHORT_COUNTER_SCRIPT: &str = "i=0; while [ $i -lt 15 ]; do i=$((i+1)); echo COUNTER $i; sleep 0.2; done";

/// busybox and the applets the counter needs, as an erofs image.
/// (kernel dir, init binary), or `None` when real-VM tests are not enabled.
fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    real_vm("the real QEMU backend test", &["mkfs.erofs", "mkfs.ext4"])
}

fn make_rootfs(work: &Path) -> PathBuf {
    let root = work.join("rootdir");
    busybox_tree(&root, &["sh", "sleep", "echo"]);
    let image = work.join("rootfs.erofs");
    let out = Command::new("mkfs.erofs").arg("--quiet").arg(&image).arg(&root).output().expect("mkfs.erofs");
    assert!(out.status.success(), "mkfs.erofs: {}", String::from_utf8_lossy(&out.stderr));
    image
}

fn vm_config(work: &Path, kernel_dir: &Path, init: &Path, script: &str) -> VmConfig {
    let initrd = cached_initrd(&work.join("data"), init, Some(&kernel_dir.join("lib/modules"))).expect("initrd");
    let rootfs = make_rootfs(work);
    let overlay = work.join("overlay.raw");
    ensure_overlay(&overlay, 256 << 20).expect("overlay");
    let config_disk = work.join("config.erofs");
    let guest = GuestConfig {
        version: CONFIG_VERSION,
        entrypoint: Vec::new(),
        cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::new(),
        workdir: "/".into(),
        user: None,
        hostname: "counter".into(),
        network: None,
        volumes: Vec::new(),
        stop_grace_ms: None,
    };
    write_config_disk(&config_disk, &guest).expect("config disk");
    let disk = |id: &str, path: PathBuf, readonly: bool| DiskConfig { id: id.into(), path, readonly, limit: IoLimit::default() };
    std::fs::create_dir_all(work.join("logs")).expect("mkdir logs");
    VmConfig {
        vcpus: 1,
        memory_bytes: 256 << 20,
        hotplug_memory_bytes: 0,
        kernel: kernel_dir.join("vmlinuz"),
        initrd: Some(initrd.path),
        cmdline: format!(
            "{BASE_CMDLINE} mitigations=off cryptomgr.notests 8250.nr_uarts=1 i8042.nokbd i8042.noaux no_timer_check"
        ),
        disks: vec![
            disk("rootfs", rootfs, true),
            disk("overlay", overlay, false),
            disk("config", config_disk, true),
        ],
        net: None,
        devices: Vec::new(),
        serial_log: work.join("logs/app.log"),
        vsock: None,
        agent: None,
        user: None,
    }
}

/// The COUNTER values in `text`, in order.
fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("COUNTER ")?.trim().parse().ok())
        .collect()
}

/// Waits until the log, read from byte `from`, holds a COUNTER line.
async fn wait_counter(log: &Path, from: usize, timeout: Duration) -> Option<(u64, Duration)> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = String::from_utf8_lossy(text.get(from..).unwrap_or_default()).to_string();
        if let Some(first) = counters(&tail).first() {
            return Some((*first, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn state_of(qemu: &QemuBackend, guest: &GuestVmm) -> Option<VmState> {
    match qemu.probe(guest).await {
        Probe::Alive { state, .. } => Some(state),
        other => panic!("probe: {other:?}"),
    }
}

fn alive(h: &VmmHandle) -> bool {
    hypeman::hypervisor::process::is_alive(hypeman::hypervisor::process::ProcessId {
        pid: h.pid,
        start_time: h.pid_start_time,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_boot_snapshot_restore_and_the_counter_continues() {
    let Some((kernel_dir, init)) = prerequisites() else {
        return;
    };
    let work_dir = tempfile::tempdir().expect("tempdir");
    let work = work_dir.path();
    let config = vm_config(work, &kernel_dir, &init, COUNTER_SCRIPT);
    let log = config.serial_log.clone();
    let guest = GuestVmm {
        guest_dir: work.to_path_buf(),
        socket: work.join("qmp.sock"),
        vmm_log: work.join("logs/vmm.log"),
        recorded: None,
    };
    let qemu = QemuBackend::new("qemu-system-x86_64".into(), Accel::Auto);
    let version = qemu.version().await.expect("version");
    eprintln!("QEMU {version}, accel {:?}", qemu.accelerator());
    assert_eq!(qemu.probe(&guest).await, Probe::Absent);

    let h = qemu.create(&guest, &config).await.expect("create");
    assert!(work.join(LAUNCH_FILE).exists());
    assert_eq!(state_of(&qemu, &guest).await, Some(VmState::Created));
    assert!(matches!(
        qemu.create(&guest, &config).await,
        Err(hypeman::hypervisor::HypervisorError::AlreadyRunning { .. })
    ));
    // A probe with no recorded handle finds the process by its socket.
    match qemu.probe(&guest).await {
        Probe::Alive { handle, .. } => assert_eq!(handle.pid, h.pid),
        other => panic!("{other:?}"),
    }

    let booted = Instant::now();
    qemu.boot(&h).await.expect("boot");
    assert_eq!(state_of(&qemu, &guest).await, Some(VmState::Running));
    let first = wait_counter(&log, 0, Duration::from_secs(60)).await;
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let (_, to_first) = first.unwrap_or_else(|| panic!("no COUNTER line; console:\n{console}"));
    let to_first = booted.elapsed().min(to_first);
    // Let it count a little, then pause.
    tokio::time::sleep(Duration::from_millis(700)).await;
    qemu.pause(&h).await.expect("pause");
    assert_eq!(state_of(&qemu, &guest).await, Some(VmState::Paused));
    let info = qemu.info(&h).await.expect("info");
    assert_eq!(info.state, VmState::Paused);
    assert_eq!(info.memory_actual_bytes, Some(256 << 20));
    // Let any serial output still in flight land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = std::fs::read(&log).expect("app log");
    let last = *counters(&String::from_utf8_lossy(&before)).last().expect("counter lines");
    assert!(last >= 2, "only {last} counter lines before the pause");

    let snap = work.join("snap");
    std::fs::create_dir(&snap).expect("mkdir snap");
    let t = Instant::now();
    let meta = qemu.snapshot(&h, &snap).await.expect("snapshot");
    let snapshot_time = t.elapsed();
    assert_eq!(meta.hypervisor_version, version);
    assert_eq!(meta.config_hash, config.config_hash());
    let size = std::fs::metadata(snap.join(MEMORY_FILE)).expect("memory file").len();
    assert!(snap.join(LAUNCH_FILE).exists());
    // A daemon that died after QEMU finished the snapshot but before it was
    // committed leaves QEMU in `postmigrate`, and the next daemon throws the
    // uncommitted file away. Snapshotting again must still work.
    std::fs::remove_dir_all(&snap).expect("discard the uncommitted snapshot");
    std::fs::create_dir(&snap).expect("mkdir snap");
    qemu.snapshot(&h, &snap).await.expect("snapshot again from postmigrate");
    assert!(std::fs::metadata(snap.join(MEMORY_FILE)).expect("memory file").len() > 0);

    qemu.shutdown_vmm(&h).await.expect("shutdown_vmm");
    assert!(!alive(&h), "QEMU still runs after shutdown_vmm");
    assert_eq!(qemu.probe(&guest).await, Probe::Absent);

    let t = Instant::now();
    let h2 = qemu.restore(&guest, &config, &snap).await.expect("restore");
    let restore_time = t.elapsed();
    assert_ne!(h2.pid, h.pid);
    assert_eq!(state_of(&qemu, &guest).await, Some(VmState::Paused));
    let resumed = Instant::now();
    qemu.resume(&h2).await.expect("resume");
    let (next, _) = wait_counter(&log, before.len(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no COUNTER after the restore"));
    let to_next = resumed.elapsed();
    assert_eq!(next, last + 1, "the counter restarted instead of continuing");

    qemu.shutdown_vmm(&h2).await.expect("shutdown_vmm after restore");
    assert!(!alive(&h2));
    assert_eq!(qemu.probe(&guest).await, Probe::Absent);
    eprintln!(
        "timings: boot to first COUNTER {:.2}s; snapshot {:.3}s ({:.1} MiB); restore {:.3}s; resume to COUNTER {next} {:.3}s",
        to_first.as_secs_f64(),
        snapshot_time.as_secs_f64(),
        size as f64 / (1 << 20) as f64,
        restore_time.as_secs_f64(),
        to_next.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_powers_off_ends_qemu_and_kill_is_final() {
    let Some((kernel_dir, init)) = prerequisites() else {
        return;
    };
    let work_dir = tempfile::tempdir().expect("tempdir");
    let work = work_dir.path();
    let config = vm_config(work, &kernel_dir, &init, SHORT_COUNTER_SCRIPT);
    let guest = GuestVmm {
        guest_dir: work.to_path_buf(),
        socket: work.join("qmp.sock"),
        vmm_log: work.join("logs/vmm.log"),
        recorded: None,
    };
    let qemu = QemuBackend::new("qemu-system-x86_64".into(), Accel::Auto);
    let h = qemu.create(&guest, &config).await.expect("create");
    qemu.boot(&h).await.expect("boot");
    wait_counter(&config.serial_log, 0, Duration::from_secs(60)).await.expect("COUNTER");
    // The ACPI button press reaches hypeman-init, which stops the app (no
    // TERM trap here, so SIGTERM ends it) and powers the guest off.
    let pressed = Instant::now();
    qemu.power_off(&h).await.expect("power_off");
    let gone = hypeman::hypervisor::process::wait_gone(
        hypeman::hypervisor::process::ProcessId { pid: h.pid, start_time: h.pid_start_time },
        Duration::from_secs(30),
    )
    .await;
    let console = std::fs::read_to_string(&config.serial_log).unwrap_or_default();
    assert!(gone, "QEMU still runs 30 s after the power button; console:\n{console}");
    assert!(pressed.elapsed() < Duration::from_secs(10), "the guest took {:?} to power off", pressed.elapsed());
    assert!(console.contains("hypeman-init: power button pressed, stopping app (SIGTERM)"), "{console}");
    assert!(console.contains("hypeman-init: app was killed by signal 15 (SIGTERM)"), "{console}");
    assert!(!console.contains("COUNTER 15"), "the app ran to its end instead of stopping: {console}");
    assert_eq!(qemu.probe(&guest).await, Probe::Absent);
    assert!(matches!(qemu.boot(&h).await, Err(hypeman::hypervisor::HypervisorError::VmmGone { .. })));

    // kill: a created VM is gone at once.
    let h = qemu.create(&guest, &config).await.expect("create again");
    qemu.kill(&h).await.expect("kill");
    assert!(!alive(&h));
    assert_eq!(qemu.probe(&guest).await, Probe::Absent);
}
