//! The Cloud Hypervisor backend (the `Hypervisor` trait) with real detached
//! processes: the fake server binary stands in for `cloud-hypervisor`,
//! through a wrapper script that sets its version and quirks per test. Its
//! guest prints a counter to the serial port, so a restore that continues
//! the counter in an appended `app.log` shows the whole chain works.

mod support;

use hypeman::declaration::spec::IoLimit;
use hypeman::hypervisor::cloud_hypervisor::{CloudHypervisorBackend, LAUNCH_FILE};
use hypeman::hypervisor::process;
use hypeman::hypervisor::{DiskConfig, GuestVmm, Hypervisor, HypervisorError, Probe, VmConfig, VmmHandle};
use hypeman::state::VmState;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Guest {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    backend: CloudHypervisorBackend,
    binary: PathBuf,
}

impl Guest {
    fn new(env: &[(&str, &str)]) -> Guest {
        let tmp = support::tempdir();
        let dir = tmp.path().join("g");
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let binary = support::fake_ch::wrapper(tmp.path(), env);
        Guest { backend: CloudHypervisorBackend::new(binary.clone()), binary, dir, _tmp: tmp }
    }

    /// A guest whose VMM may run as its own user, and its data dir (the
    /// temp dir, opened for others to pass through as `/var/lib` is);
    /// `None` when the test cannot make one (not root: `needs` says why).
    fn for_a_vmm_user(needs: &str) -> Option<(Guest, PathBuf)> {
        use std::os::unix::fs::PermissionsExt;
        if !support::gate::capability(needs, nix::unistd::geteuid().is_root()) {
            return None;
        }
        let g = Guest::new(&[]);
        let data_dir = g.dir.parent().unwrap().to_path_buf();
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        Some((g, data_dir))
    }

    fn vmm(&self, recorded: Option<&VmmHandle>) -> GuestVmm {
        GuestVmm {
            guest_dir: self.dir.clone(),
            socket: self.dir.join("ch.sock"),
            vmm_log: self.dir.join("logs/vmm.log"),
            recorded: recorded.cloned(),
        }
    }

    fn config(&self, hotplug: u64) -> VmConfig {
        let file = |name: &str| {
            let p = self.dir.join(name);
            std::fs::write(&p, name).unwrap();
            p
        };
        VmConfig {
            vcpus: 1,
            memory_bytes: 256 << 20,
            hotplug_memory_bytes: hotplug,
            kernel: file("vmlinuz"),
            initrd: Some(file("initrd")),
            cmdline: "console=ttyS0".into(),
            disks: vec![DiskConfig { id: "rootfs".into(), path: file("rootfs.erofs"), readonly: true, limit: IoLimit::default() }],
            net: None,
            devices: vec![],
            serial_log: self.dir.join("logs/app.log"),
            vsock: None,
            agent: None,
            user: None,
        }
    }

    fn counters(&self) -> Vec<u64> {
        std::fs::read_to_string(self.dir.join("logs/app.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("COUNTER ")?.parse().ok())
            .collect()
    }

    fn wait_counter_above(&self, n: u64) {
        let t0 = Instant::now();
        while self.counters().last().copied().unwrap_or(0) <= n {
            assert!(t0.elapsed() < Duration::from_secs(10), "counter stuck at {:?}", self.counters().last());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Creates, boots and pauses a VM of `cfg`, snapshots it into a new
    /// `snap` directory and ends its VMM, as a standby does.
    async fn standby(&self, cfg: &VmConfig) -> PathBuf {
        let h = self.backend.create(&self.vmm(None), cfg).await.unwrap();
        self.backend.boot(&h).await.unwrap();
        self.backend.pause(&h).await.unwrap();
        let snap = self.dir.join("snap");
        std::fs::create_dir(&snap).unwrap();
        self.backend.snapshot(&h, &snap).await.unwrap();
        self.backend.shutdown_vmm(&h).await.unwrap();
        snap
    }

    fn vmm_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/vmm.log")).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        while let Some(p) = process::find_by_argument(&self.dir.join("ch.sock")) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(10));
        }
        let violations = support::fake_ch::violations(&self.dir.join("logs/vmm.log"));
        if !std::thread::panicking() {
            assert_eq!(violations, Vec::<String>::new(), "requests that break the OpenAPI spec");
        }
    }
}

fn alive(h: &VmmHandle) -> bool {
    process::is_alive(h.process_id())
}

async fn probe_state(g: &Guest, recorded: Option<&VmmHandle>) -> Option<(u32, VmState)> {
    match g.backend.probe(&g.vmm(recorded)).await {
        Probe::Alive { handle, state } => Some((handle.pid, state)),
        Probe::Absent => None,
        Probe::Unreachable { reason } => panic!("unreachable: {reason}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_standby_restore_and_power_off() {
    let g = Guest::new(&[]);
    let cfg = g.config(512 << 20);
    assert_eq!(g.backend.version().await.unwrap(), "53.0.0");
    let h = g.backend.create(&g.vmm(None), &cfg).await.unwrap();
    assert!(alive(&h));
    assert_eq!(h.version.as_deref(), Some("53.0.0"));
    assert!(matches!(g.backend.create(&g.vmm(None), &cfg).await, Err(HypervisorError::AlreadyRunning { .. })));
    assert_eq!(probe_state(&g, Some(&h)).await, Some((h.pid, VmState::Created)));
    assert!(matches!(g.backend.pause(&h).await, Err(HypervisorError::WrongState { state: VmState::Created, .. })));
    g.backend.boot(&h).await.unwrap();
    g.wait_counter_above(3);
    let info = g.backend.info(&h).await.unwrap();
    assert_eq!(info.memory_actual_bytes, Some(768 << 20));

    // Standby, as the executor does it: shrink, pause, snapshot, end.
    g.backend.resize_memory(&h, 256 << 20).await.unwrap();
    assert!(g.backend.resize_memory(&h, 128 << 20).await.is_err(), "below the boot memory");
    g.backend.pause(&h).await.unwrap();
    let snap = g.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let meta = g.backend.snapshot(&h, &snap).await.unwrap();
    assert_eq!(meta.hypervisor_version, g.backend.version().await.unwrap());
    assert_eq!(meta.config_hash, cfg.config_hash());
    for f in ["config.json", "state.json", "memory-ranges", LAUNCH_FILE] {
        assert!(snap.join(f).is_file(), "{f}");
    }
    let last = *g.counters().last().unwrap();
    g.backend.shutdown_vmm(&h).await.unwrap();
    assert!(!alive(&h), "shutdown_vmm waits for the process to exit");
    assert!(!g.dir.join("ch.sock").exists());
    assert_eq!(probe_state(&g, Some(&h)).await, None);

    // Restore: a new process, paused until resumed, the guest carries on.
    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    assert_ne!(h2.pid, h.pid);
    assert_eq!(probe_state(&g, None).await, Some((h2.pid, VmState::Paused)));
    assert!(g.vmm_log().contains("PUT /api/v1/vm.restore -> 204"));
    g.backend.resume(&h2).await.unwrap();
    g.wait_counter_above(last);
    let counters = g.counters();
    let resumed = counters.iter().skip_while(|&&c| c != last).nth(1).copied();
    assert_eq!(resumed, Some(last + 1), "app.log appended, counter continued: {counters:?}");
    assert_eq!(counters[0], 1, "nothing before the restore was truncated away");

    // A guest power-off ends the VMM process.
    g.backend.power_off(&h2).await.unwrap();
    assert!(process::wait_gone(h2.process_id(), Duration::from_secs(5)).await);
    assert_eq!(probe_state(&g, Some(&h2)).await, None);
    assert!(matches!(g.backend.boot(&h2).await, Err(HypervisorError::VmmGone { .. })));
}

/// The requests the fake logged in `log`, in order.
fn requests(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("GET /") || l.starts_with("PUT /")).collect()
}

/// A snapshot checks the state and snapshots: the version it records is
/// the one the handle carries from the launch or the last probe. Only a
/// handle without one costs a `vmm.ping`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_takes_the_version_from_the_handle() {
    let g = Guest::new(&[]);
    let h = g.backend.create(&g.vmm(None), &g.config(0)).await.unwrap();
    g.backend.boot(&h).await.unwrap();
    g.backend.pause(&h).await.unwrap();
    let snap = g.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let from = g.vmm_log().len();
    assert_eq!(g.backend.snapshot(&h, &snap).await.unwrap().hypervisor_version, "53.0.0");
    assert_eq!(requests(&g.vmm_log()[from..]), ["GET /api/v1/vm.info -> 200", "PUT /api/v1/vm.snapshot -> 204"]);

    let bare = VmmHandle { version: None, ..h.clone() };
    let snap2 = g.dir.join("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let from = g.vmm_log().len();
    assert_eq!(g.backend.snapshot(&bare, &snap2).await.unwrap().hypervisor_version, "53.0.0");
    assert_eq!(
        requests(&g.vmm_log()[from..]),
        ["GET /api/v1/vm.info -> 200", "GET /api/v1/vmm.ping -> 200", "PUT /api/v1/vm.snapshot -> 204"]
    );
    g.backend.shutdown_vmm(&h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_finds_the_vmm_by_its_socket() {
    let g = Guest::new(&[]);
    let h = g.backend.create(&g.vmm(None), &g.config(0)).await.unwrap();
    g.backend.boot(&h).await.unwrap();
    // Another backend, as in a new daemon that never recorded the VMM.
    let fresh = CloudHypervisorBackend::new(g.binary.clone());
    match fresh.probe(&g.vmm(None)).await {
        Probe::Alive { handle, state } => {
            assert_eq!((handle.pid, handle.pid_start_time, state), (h.pid, h.pid_start_time, VmState::Running));
            assert_eq!(handle.version.as_deref(), Some("53.0.0"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(g.backend.resize_memory(&h, 512 << 20).await, Err(HypervisorError::Unsupported { .. })));
    fresh.kill(&h).await.unwrap();
    assert!(!alive(&h));
}

/// What the daemon leaves when it dies between starting a VMM and creating
/// the VM in it: an empty VMM reads as `Shutdown`, and a create replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_vmm_is_shutdown_and_replaced_by_create() {
    an_empty_vmm_of(&[]).await;
}

/// Up to v46 "no VM" is a 500 whose body is `VmInfo(VmNotCreated)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_v46_vmm_is_shutdown_too() {
    an_empty_vmm_of(&[("FAKE_CH_VERSION", "46.0.0")]).await;
}

async fn an_empty_vmm_of(env: &[(&str, &str)]) {
    let g = Guest::new(env);
    let socket = g.dir.join("ch.sock");
    let args = vec!["--api-socket".to_string(), format!("path={}", socket.display())];
    let empty = process::spawn_detached(&g.binary, &args, &g.dir.join("logs/vmm.log")).unwrap();
    // Listening, not merely bound: the socket file appears a moment before.
    let client = hypeman::hypervisor::cloud_hypervisor::client::ApiClient::new(&socket).unwrap();
    let t0 = Instant::now();
    while client.ping().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5), "the empty VMM never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(probe_state(&g, None).await, Some((empty.pid, VmState::Shutdown)));
    let h = g.backend.create(&g.vmm(None), &g.config(0)).await.unwrap();
    assert_ne!(h.pid, empty.pid);
    assert!(!process::is_alive(empty), "the empty VMM was ended");
    assert_eq!(probe_state(&g, Some(&h)).await, Some((h.pid, VmState::Created)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_userfaultfd_the_restore_falls_back_to_copy() {
    let g = Guest::new(&[("FAKE_CH_NO_USERFAULTFD", "1")]);
    let cfg = g.config(0);
    let snap = g.standby(&cfg).await;
    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    assert_eq!(probe_state(&g, Some(&h2)).await, Some((h2.pid, VmState::Paused)));
    let log = g.vmm_log();
    let restores: Vec<&str> = log.lines().filter(|l| l.starts_with("PUT /api/v1/vm.restore")).collect();
    assert_eq!(restores, ["PUT /api/v1/vm.restore -> 500", "PUT /api/v1/vm.restore -> 204"], "{log}");
    // The snapshot must match the configuration it is restored under.
    g.backend.kill(&h2).await.unwrap();
    let mut other = cfg.clone();
    other.vcpus = 2;
    assert!(matches!(g.backend.restore(&g.vmm(None), &other, &snap).await, Err(HypervisorError::BadSnapshot { .. })));
}

/// A snapshot the server reads and refuses (here a `state.json` it cannot
/// parse) is the snapshot's fault, not a passing one: `BadSnapshot`, which
/// the daemon does not retry in a loop, with the server's words, after the
/// copy restore was tried too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_server_refuses_is_a_bad_snapshot() {
    let g = Guest::new(&[]);
    let cfg = g.config(0);
    let snap = g.standby(&cfg).await;
    std::fs::write(snap.join("state.json"), "{ not json").unwrap();
    match g.backend.restore(&g.vmm(None), &cfg, &snap).await {
        Err(e @ HypervisorError::BadSnapshot { .. }) => {
            let chain = hypeman::error_chain(&e);
            assert!(chain.contains("Error parsing state.json"), "{chain}");
        }
        other => panic!("expected BadSnapshot, got {other:?}"),
    }
    let log = g.vmm_log();
    let restores: Vec<&str> = log.lines().filter(|l| l.starts_with("PUT /api/v1/vm.restore")).collect();
    assert_eq!(restores, ["PUT /api/v1/vm.restore -> 500", "PUT /api/v1/vm.restore -> 500"], "on demand, then by copy: {log}");
    assert!(process::find_by_argument(&g.vmm(None).socket).is_none(), "no VMM left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_waits_out_the_v53_prefault() {
    let g = Guest::new(&[("FAKE_CH_PREFAULT_MS", "600")]);
    let cfg = g.config(0);
    let snap = g.standby(&cfg).await;
    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    g.backend.resume(&h2).await.unwrap();
    g.backend.pause(&h2).await.unwrap();
    let snap2 = g.dir.join("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let t0 = Instant::now();
    g.backend.snapshot(&h2, &snap2).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300), "the first attempts were refused");
    let log = g.vmm_log();
    let snapshots: Vec<&str> = requests(&log).into_iter().filter(|l| l.starts_with("PUT /api/v1/vm.snapshot")).collect();
    // The first, before the standby, then refusals while prefaulting, then the one taken.
    assert!(snapshots.len() >= 3, "{snapshots:?}");
    assert_eq!(snapshots.first(), Some(&"PUT /api/v1/vm.snapshot -> 204"));
    assert!(snapshots[1..snapshots.len() - 1].iter().all(|l| *l == "PUT /api/v1/vm.snapshot -> 500"), "{snapshots:?}");
    assert_eq!(snapshots.last(), Some(&"PUT /api/v1/vm.snapshot -> 204"));
    for f in ["config.json", "state.json", "memory-ranges", LAUNCH_FILE] {
        assert!(snap2.join(f).is_file(), "{f}");
    }
    g.backend.shutdown_vmm(&h2).await.unwrap();
}

/// A prefault that outlasts the wait: the standby's snapshot fails and
/// says why, nothing is left in the directory, and the VM stays paused for
/// the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefault_that_never_ends_fails_the_snapshot_clearly() {
    let mut g = Guest::new(&[("FAKE_CH_PREFAULT_MS", "3600000")]);
    g.backend = CloudHypervisorBackend::new(g.binary.clone()).with_prefault_wait(Duration::from_millis(400));
    let cfg = g.config(0);
    let snap = g.standby(&cfg).await;
    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    g.backend.resume(&h2).await.unwrap();
    g.backend.pause(&h2).await.unwrap();
    let snap2 = g.dir.join("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let t0 = Instant::now();
    let err = g.backend.snapshot(&h2, &snap2).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "bounded: {:?}", t0.elapsed());
    assert_eq!(
        hypeman::error_chain(&err),
        "snapshot failed: API call failed: vm.snapshot was refused for 400ms because Cloud Hypervisor was still prefaulting \
         the memory of an on-demand restore (\"VM on-demand memory restore is still in progress\"); gave up"
    );
    assert_eq!(std::fs::read_dir(&snap2).unwrap().count(), 0, "no launch record, no snapshot files");
    assert_eq!(probe_state(&g, Some(&h2)).await, Some((h2.pid, VmState::Paused)));
    g.backend.kill(&h2).await.unwrap();
}

/// Steps re-run after the daemon died between a call and its record: a VM
/// already where the call leads is done, and the call is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_to_where_the_vm_already_is_is_done() {
    let g = Guest::new(&[]);
    let h = g.backend.create(&g.vmm(None), &g.config(512 << 20)).await.unwrap();
    g.backend.boot(&h).await.unwrap();
    g.backend.boot(&h).await.expect("booted already");
    g.backend.pause(&h).await.unwrap();
    g.backend.pause(&h).await.expect("paused already");
    g.backend.resume(&h).await.unwrap();
    g.backend.resume(&h).await.expect("running already");
    // All plugged at boot: a resize to that size is not sent (v53 would
    // answer it with a 500).
    g.backend.resize_memory(&h, 768 << 20).await.unwrap();
    let log = g.vmm_log();
    let calls: Vec<&str> = requests(&log).into_iter().filter(|l| l.starts_with("PUT /api/v1/vm.")).collect();
    assert_eq!(
        calls,
        ["PUT /api/v1/vm.create -> 204", "PUT /api/v1/vm.boot -> 204", "PUT /api/v1/vm.pause -> 204", "PUT /api/v1/vm.resume -> 204"]
    );
    assert!(matches!(g.backend.resume(&h).await, Ok(())));
    g.backend.shutdown_vmm(&h).await.unwrap();
}

/// `vmm.shutdown`: a 200 with an empty body, then the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_shutdown_ends_the_process_with_status_0() {
    let g = Guest::new(&[]);
    let socket = g.dir.join("ch.sock");
    let mut child = std::process::Command::new(&g.binary)
        .args(["--api-socket", &format!("path={}", socket.display())])
        .stderr(std::fs::File::create(g.dir.join("logs/vmm.log")).unwrap())
        .spawn()
        .unwrap();
    let client = hypeman::hypervisor::cloud_hypervisor::client::ApiClient::new(&socket).unwrap();
    let t0 = Instant::now();
    while client.ping().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(5), "the VMM never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.vmm_shutdown().await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert!(g.vmm_log().contains("PUT /api/v1/vmm.shutdown -> 200"));
}

/// v49: 500s for everything, no restore mode, and a stale socket file
/// makes the server fail to start unless the backend removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v49_server_is_driven_too() {
    let g = Guest::new(&[("FAKE_CH_VERSION", "49.0.0")]);
    let cfg = g.config(0);
    assert_eq!(g.backend.version().await.unwrap(), "49.0.0");
    let h = g.backend.create(&g.vmm(None), &cfg).await.unwrap();
    // Killed hard: the socket file stays behind.
    g.backend.kill(&h).await.unwrap();
    std::os::unix::net::UnixListener::bind(g.dir.join("ch.sock")).map(drop).unwrap();
    let h = g.backend.create(&g.vmm(None), &cfg).await.unwrap();
    g.backend.boot(&h).await.unwrap();
    g.backend.pause(&h).await.unwrap();
    let snap = g.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    assert_eq!(g.backend.snapshot(&h, &snap).await.unwrap().hypervisor_version, "49.0.0");
    g.backend.shutdown_vmm(&h).await.unwrap();
    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    g.backend.resume(&h2).await.unwrap();
    assert_eq!(g.backend.info(&h2).await.unwrap().state, VmState::Running);
    g.backend.shutdown_vmm(&h2).await.unwrap();
}

/// Before v49 Cloud Hypervisor would put its default address on the TAP:
/// a networked VM is refused there, and no VMM is left behind; from v49 the
/// same config is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networking_needs_v49() {
    let net = hypeman::hypervisor::NetConfig {
        tap: "hm0000000000001".into(),
        mac: "02:00:00:00:00:01".into(),
        limit_down: IoLimit::default(),
        limit_up: IoLimit::default(),
    };
    let g = Guest::new(&[("FAKE_CH_VERSION", "48.0.0")]);
    let cfg = VmConfig { net: Some(net.clone()), ..g.config(0) };
    let err = g.backend.create(&g.vmm(None), &cfg).await.unwrap_err();
    assert!(
        hypeman::error_chain(&err).contains("guest networking needs cloud-hypervisor 49.0 or newer (this host has 48.0.0)"),
        "{}",
        hypeman::error_chain(&err)
    );
    assert!(process::find_by_argument(&g.dir.join("ch.sock")).is_none(), "no VMM left behind");

    let g = Guest::new(&[("FAKE_CH_VERSION", "49.0.0")]);
    let cfg = VmConfig { net: Some(net), ..g.config(0) };
    let h = g.backend.create(&g.vmm(None), &cfg).await.unwrap();
    g.backend.shutdown_vmm(&h).await.unwrap();
}

/// A VMM of its own user (issue 11): spawned as it with `--seccomp true`,
/// its TAP sent as a descriptor with `vm.add-net` and again with
/// `vm.restore`, a kernel and a volume outside the data dir (in private
/// directories, the volume root's `0600`) reopened through
/// `/proc/self/fd`, the snapshot written by the VMM itself. Root only (the
/// daemon's case: it makes TAPs and spawns as other users).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_of_its_own_user_gets_its_tap_kernel_and_volume_by_descriptor() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some((g, data_dir)) = Guest::for_a_vmm_user("root (TAPs, VMMs as other users)") else { return };
    let private = tempfile::tempdir().unwrap();
    let kernel = private.path().join("vmlinuz");
    std::fs::write(&kernel, "kernel").unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let volume = private.path().join("data.raw");
    std::fs::write(&volume, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tap = format!("hmt{}", std::process::id() % 1_000_000);
    support::run_ok(std::process::Command::new("ip").args(["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"]));
    struct Tap(String);
    impl Drop for Tap {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _tap = Tap(tap.clone());
    let uid = 70_900;
    let mut cfg = g.config(0);
    cfg.kernel = kernel.clone();
    cfg.disks.push(DiskConfig { id: "vol0".into(), path: volume.clone(), readonly: false, limit: IoLimit::default() });
    cfg.net = Some(hypeman::hypervisor::NetConfig {
        tap: tap.clone(),
        mac: "02:00:00:00:00:09".into(),
        limit_down: IoLimit::default(),
        limit_up: IoLimit::default(),
    });
    cfg.user = Some(hypeman::hypervisor::VmmUser { uid, gid: uid, groups: vec![69_999], data_dir: data_dir.clone() });

    let h = g.backend.create(&g.vmm(None), &cfg).await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid)).unwrap();
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.split_whitespace().next().unwrap_or("").to_string());
    assert_eq!(field("Uid:").as_deref(), Some("70900"), "{status}");
    assert_eq!(field("CapEff:").as_deref(), Some("0000000000000000"), "{status}");
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", h.pid)).unwrap().replace('\0', " ");
    assert!(cmdline.contains("--seccomp true"), "{cmdline}");
    let log = g.vmm_log();
    assert!(log.contains(&format!("PUT /api/v1/vm.add-net -> 204 fds=[{tap}]")), "the TAP went as a descriptor:\n{log}");
    let vm = std::fs::metadata(&volume).unwrap();
    assert_eq!((vm.gid(), vm.mode() & 0o777), (uid, 0o660), "the volume joined the VMM's own group, its owner kept");
    g.backend.boot(&h).await.unwrap();
    g.wait_counter_above(2);

    g.backend.pause(&h).await.unwrap();
    let snap = g.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(0o700)).unwrap();
    g.backend.snapshot(&h, &snap).await.unwrap();
    let written = std::fs::metadata(snap.join("state.json")).unwrap();
    assert_eq!(written.uid(), uid, "written by the VMM itself");
    let last = *g.counters().last().unwrap();
    g.backend.shutdown_vmm(&h).await.unwrap();

    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    let log = g.vmm_log();
    assert!(log.contains(&format!("PUT /api/v1/vm.restore -> 204 fds=[{tap}]")), "the TAP went with the restore:\n{log}");
    g.backend.resume(&h2).await.unwrap();
    g.wait_counter_above(last);
    assert!(support::fake_ch::violations(&g.dir.join("logs/vmm.log")).is_empty(), "{}", g.vmm_log());
    g.backend.power_off(&h2).await.unwrap();
    assert!(process::wait_gone(h2.process_id(), Duration::from_secs(5)).await);
}

/// A snapshot of a VMM of its own user whose files became root's since
/// (`0700` directories, `0600` files: copied back by root, or modes
/// tightened): the restore hands the snapshot and the directories on its
/// way from the guest dir to the VMM first, whatever its standby granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_made_roots_again_is_handed_back_before_a_restore() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some((g, data_dir)) = Guest::for_a_vmm_user("root (VMMs as other users)") else { return };
    let uid = 70_901;
    let mut cfg = g.config(0);
    cfg.user = Some(hypeman::hypervisor::VmmUser { uid, gid: uid, groups: vec![69_999], data_dir });
    let h = g.backend.create(&g.vmm(None), &cfg).await.unwrap();
    g.backend.boot(&h).await.unwrap();
    g.wait_counter_above(2);
    g.backend.pause(&h).await.unwrap();
    let snapshots = g.dir.join("snapshots");
    let snap = snapshots.join("snapshot-latest");
    std::fs::create_dir_all(&snap).unwrap();
    g.backend.snapshot(&h, &snap).await.unwrap();
    let last = *g.counters().last().unwrap();
    g.backend.shutdown_vmm(&h).await.unwrap();
    let roots = |path: &std::path::Path, mode: u32| {
        std::os::unix::fs::chown(path, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    roots(&snapshots, 0o700);
    roots(&snap, 0o700);
    for f in std::fs::read_dir(&snap).unwrap() {
        roots(&f.unwrap().path(), 0o600);
    }

    let h2 = g.backend.restore(&g.vmm(None), &cfg, &snap).await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", h2.pid)).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains("70901")), "{status}");
    g.backend.resume(&h2).await.unwrap();
    g.wait_counter_above(last);
    let mode = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o777)
    };
    assert_eq!(mode(&snapshots), (0, uid, 0o710), "the way to the snapshot: search only");
    assert_eq!(mode(&snap), (0, uid, 0o750));
    assert_eq!(mode(&snap.join("state.json")), (0, uid, 0o640), "read by the VMM's group, still root's");
    g.backend.power_off(&h2).await.unwrap();
    assert!(process::wait_gone(h2.process_id(), Duration::from_secs(5)).await);
}

#[test]
fn the_wrapper_is_the_fake() {
    let dir = tempfile::tempdir().unwrap();
    let bin = support::fake_ch::wrapper(dir.path(), &[("FAKE_CH_VERSION", "52.1.0")]);
    let out = std::process::Command::new(&bin).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cloud-hypervisor v52.1.0\n");
    let bad = std::process::Command::new(&bin).arg("--kernel").arg("/x").output().unwrap();
    assert!(!bad.status.success(), "arguments hypeman does not send are refused");
}
