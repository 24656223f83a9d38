//! The whole daemon (watcher, workers, planner, executor, store) against the
//! fake hypervisor, through real files in temp directories.

use hypeman::daemon::{self, DaemonConfig};
use hypeman::declaration::spec::HypervisorKind;
use hypeman::hypervisor::fake::{FakeHypervisor, Fault, Op};
use hypeman::hypervisor::Backends;
use hypeman::instances::provision::{FakeProvisioner, ProvisionError, Provisioner};
use hypeman::instances::Instances;
use hypeman::settings::Settings;
use hypeman::state::VmState;
use hypeman::store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Env {
    _tmp: tempfile::TempDir,
    config_dir: PathBuf,
    settings: Arc<Settings>,
    fake: FakeHypervisor,
    provisioner: Arc<dyn Provisioner>,
    daemon: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

const WAIT: Duration = Duration::from_secs(10);

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let config_dir = tmp.path().join("etc");
        std::fs::create_dir_all(config_dir.join("instances")).unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.default_hypervisor = HypervisorKind::Qemu;
        settings.reconcile.resync_interval = Duration::from_millis(300);
        settings.reconcile.debounce = Duration::from_millis(10);
        settings.reconcile.backoff_initial = Duration::from_millis(20);
        settings.reconcile.backoff_max = Duration::from_millis(200);
        settings.reconcile.stop_grace = Duration::from_millis(300);
        settings.reconcile.health_interval = Duration::from_millis(50);
        Env {
            _tmp: tmp,
            config_dir,
            settings: Arc::new(settings),
            fake: FakeHypervisor::new(HypervisorKind::Qemu),
            provisioner: Arc::new(FakeProvisioner),
            daemon: None,
        }
    }

    fn backends(&self) -> Backends {
        Backends { cloud_hypervisor: None, qemu: Some(Arc::new(self.fake.clone())) }
    }

    fn start(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        let cfg = DaemonConfig {
            config_dir: self.config_dir.clone(),
            settings: self.settings.clone(),
            backends: self.backends(),
            provisioner: self.provisioner.clone(),
            handle_sighup: false,
            api: None,
        };
        let task = tokio::spawn(async move {
            daemon::run(cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap()
        });
        self.daemon = Some((tx, task));
    }

    async fn stop(&mut self) {
        if let Some((tx, task)) = self.daemon.take() {
            let _ = tx.send(());
            tokio::time::timeout(WAIT, task).await.expect("daemon stops").unwrap();
        }
    }

    /// Kills the daemon like SIGKILL would: no orderly stop of anything.
    /// Waits until the task is gone, as the kernel releases a killed
    /// process's lock before anyone can start the next daemon.
    async fn kill(&mut self) {
        if let Some((_tx, task)) = self.daemon.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn write(&self, name: &str, body: &str) {
        let path = self.config_dir.join("instances").join(format!("{name}.toml"));
        // Atomic save, like an editor: temp file, then rename over.
        let tmp = self.config_dir.join("instances").join(format!(".{name}.toml.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.config_dir.join("instances").join(format!("{name}.toml"))).unwrap();
    }

    fn instances(&self) -> Instances {
        let store = Arc::new(Store::open(&self.settings.data_dir).unwrap());
        Instances::new(store, self.backends(), self.settings.clone(), Arc::new(FakeProvisioner))
    }

    fn store(&self) -> Store {
        Store::open(&self.settings.data_dir).unwrap()
    }

    fn socket(&self, name: &str) -> PathBuf {
        let meta = self.store().find_by_name(name).unwrap().expect("guest exists");
        self.store().guest_paths(meta.id).qmp_socket
    }

    async fn state(&self, name: &str) -> VmState {
        self.instances().observe(name).await.unwrap().state
    }

    async fn wait_for(&self, name: &str, want: VmState) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.state(name).await;
            if got == want {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let err = self.store().find_by_name(name).ok().flatten().and_then(|m| m.last_error);
                panic!("{name}: waited for {want}, still {got} (last error: {err:?}); calls {:?}", self.fake.calls());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_gone(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.store().find_by_name(name).unwrap().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "{name} never deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn decl(state: &str, memory: &str) -> String {
    format!("image = \"docker.io/library/busybox:latest\"\nstate = \"{state}\"\nmemory = \"{memory}\"\ncmd = [\"sh\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_standby_restore_stop_delete() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    assert_eq!(env.fake.calls(), vec![Op::Create, Op::Boot]);

    env.fake.clear_calls();
    env.write("web", &decl("standby", "256MiB"));
    env.wait_for("web", VmState::Standby).await;
    assert_eq!(env.fake.live_vmms(), 0, "standby leaves no VMM");
    let id = env.store().find_by_name("web").unwrap().unwrap().id;
    assert!(env.store().snapshot(id).unwrap().is_some(), "a complete snapshot");
    assert_eq!(env.fake.calls(), vec![Op::Pause, Op::Snapshot, Op::Info, Op::ShutdownVmm]);

    env.fake.clear_calls();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    assert_eq!(&env.fake.calls()[..2], &[Op::Restore, Op::Resume]);
    // Once running, the snapshot is stale and goes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.store().snapshot(id).unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "stale snapshot kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.fake.vmms_started(), 2);

    env.write("web", &decl("stopped", "256MiB"));
    env.wait_for("web", VmState::Stopped).await;
    assert_eq!(env.fake.live_vmms(), 0);

    let dir = env.store().guest_paths(id).dir;
    assert!(dir.exists());
    env.remove("web");
    env.wait_gone("web").await;
    assert!(!dir.exists(), "removing the file deletes the data");
    env.stop().await;
}

/// With hotplug memory, a standby first gives it back (resize to the boot
/// memory, then reads until the size settles), so the snapshot holds only
/// the boot memory; a restore grows it back right after the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_shrinks_memory_and_restore_grows_it_back() {
    let mut env = Env::new();
    env.start();
    let with_hotplug = |state: &str| format!("{}hotplug_memory = \"256MiB\"\n", decl(state, "256MiB"));
    env.write("mem", &with_hotplug("running"));
    env.wait_for("mem", VmState::Running).await;
    let socket = env.socket("mem");
    let plugged = |env: &Env| env.fake.memory_of(&socket);
    assert_eq!(plugged(&env), Some(512 << 20), "all hotplug memory is plugged at boot");

    env.fake.clear_calls();
    env.write("mem", &with_hotplug("standby"));
    env.wait_for("mem", VmState::Standby).await;
    assert_eq!(
        env.fake.calls(),
        vec![Op::Info, Op::ResizeMemory, Op::Info, Op::Pause, Op::Snapshot, Op::Info, Op::ShutdownVmm],
        "shrink, settle, then pause and snapshot"
    );
    let id = env.store().find_by_name("mem").unwrap().unwrap().id;
    assert_eq!(env.store().snapshot(id).unwrap().unwrap().memory_bytes, 256 << 20);

    env.fake.clear_calls();
    env.write("mem", &with_hotplug("running"));
    env.wait_for("mem", VmState::Running).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.store().snapshot(id).unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "stale snapshot kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = env.fake.calls();
    assert_eq!(&calls[..4], &[Op::Restore, Op::Resume, Op::Info, Op::ResizeMemory], "{calls:?}");
    assert_eq!(calls.iter().filter(|op| **op == Op::ResizeMemory).count(), 1, "grown once: {calls:?}");
    assert_eq!(plugged(&env), Some(512 << 20), "grown back to boot + hotplug");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_declaration_leaves_the_instance_alone() {
    let mut env = Env::new();
    env.start();
    env.write("db", &decl("running", "256MiB"));
    env.wait_for("db", VmState::Running).await;
    let pid = env.instances().observe("db").await.unwrap().vmm.unwrap().pid;
    env.fake.clear_calls();

    env.write("db", "image = \"busybox\"\nstate = \"sideways\"\n");
    // Several resyncs pass; nothing may happen to the VM.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(env.fake.calls(), Vec::<Op>::new());
    let obs = env.instances().observe("db").await.unwrap();
    assert_eq!(obs.state, VmState::Running);
    assert_eq!(obs.vmm.unwrap().pid, pid);
    let err = obs.meta.unwrap().last_error.expect("the error is reported");
    assert!(err.contains("db.toml:2:"), "error names file and line: {err}");

    // Fixing the file clears the error without touching the VM.
    env.write("db", &decl("running", "256MiB"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.store().find_by_name("db").unwrap().unwrap().last_error.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "error never cleared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.fake.calls(), Vec::<Op>::new());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_spec_restarts_gracefully() {
    let mut env = Env::new();
    env.start();
    env.write("app", &decl("running", "256MiB"));
    env.wait_for("app", VmState::Running).await;
    let socket = env.socket("app");
    env.fake.clear_calls();
    env.write("app", &decl("running", "512MiB"));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if env.fake.config_of(&socket).map(|c| c.memory_bytes) == Some(512 << 20)
            && env.fake.state_of(&socket) == Some(VmState::Running)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never restarted: {:?}", env.fake.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.fake.calls(), vec![Op::PowerOff, Op::ShutdownVmm, Op::Create, Op::Boot]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_vmm_is_noticed_and_the_instance_brought_back() {
    let mut env = Env::new();
    env.start();
    env.write("svc", &decl("running", "256MiB"));
    env.wait_for("svc", VmState::Running).await;
    assert!(env.fake.kill_vmm(&env.socket("svc")));
    assert!(env.fake.wait_for_calls(Op::Create, 2, WAIT).await, "recreated after death");
    env.wait_for("svc", VmState::Running).await;
    assert_eq!(env.fake.live_vmms(), 1);

    // A guest that powers off while declared running is started again.
    env.fake.guest_exit(&env.socket("svc"));
    assert!(env.fake.wait_for_calls(Op::Create, 3, WAIT).await, "restarted after guest exit");
    env.wait_for("svc", VmState::Running).await;
    // And one declared standby that died keeps its snapshot semantics.
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_daemon_adopts_live_vmms() {
    let mut env = Env::new();
    env.start();
    for n in ["a", "b", "c"] {
        env.write(n, &decl("running", "256MiB"));
    }
    for n in ["a", "b", "c"] {
        env.wait_for(n, VmState::Running).await;
    }
    env.stop().await;
    assert_eq!(env.fake.live_vmms(), 3, "VMs outlive the daemon");
    env.fake.clear_calls();
    env.start();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(env.fake.vmms_started(), 3, "no VMM started twice");
    assert_eq!(env.fake.calls(), Vec::<Op>::new());

    // Killed (not stopped) in the middle of a standby: the next daemon finishes it.
    env.fake.set_delay(Op::Snapshot, Duration::from_millis(300));
    env.write("a", &decl("standby", "256MiB"));
    assert!(env.fake.wait_for_calls(Op::Snapshot, 1, WAIT).await);
    env.kill().await;
    env.fake.set_delay(Op::Snapshot, Duration::ZERO);
    env.start();
    env.wait_for("a", VmState::Standby).await;
    assert_eq!(env.fake.live_vmms(), 2);
    assert_eq!(env.fake.vmms_started(), 3);
    env.stop().await;
}

/// Every operation of every orchestration fails once (before and after
/// taking effect); each time the instance still converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_every_step_converges_after_a_retry() {
    let scenarios: &[(&str, &str, VmState, &[Op])] = &[
        ("create", "running", VmState::Running, &[Op::Create, Op::Boot]),
        ("standby", "standby", VmState::Standby, &[Op::Pause, Op::Snapshot, Op::ShutdownVmm]),
        ("restore", "running", VmState::Running, &[Op::Restore, Op::Resume]),
        ("stop", "stopped", VmState::Stopped, &[Op::PowerOff, Op::ShutdownVmm]),
    ];
    for fault in [Fault::Error, Fault::ErrorAfter, Fault::KillVmm] {
        for (scenario, _, _, ops) in scenarios {
            for op in *ops {
                if (*scenario, *op, fault) == ("standby", Op::Snapshot, Fault::KillVmm) {
                    // The guest's state is lost, not converged on with a
                    // fresh boot: a_vmm_that_dies_while_its_snapshot_is_written_is_reported.
                    continue;
                }
                let mut env = Env::new();
                env.start();
                // Bring the instance to where the scenario starts.
                let (start, setup): (&str, VmState) = match *scenario {
                    "create" => ("stopped", VmState::Stopped),
                    "standby" | "stop" => ("running", VmState::Running),
                    _ => ("standby", VmState::Standby),
                };
                env.write("x", &decl(start, "256MiB"));
                if *scenario == "create" {
                    let deadline = tokio::time::Instant::now() + WAIT;
                    while env.store().find_by_name("x").unwrap().is_none() {
                        assert!(tokio::time::Instant::now() < deadline);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                env.wait_for("x", setup).await;
                env.fake.fail(*op, 0, fault);
                let (_, want_str, want, _) = scenarios.iter().find(|s| s.0 == *scenario).unwrap();
                env.write("x", &decl(want_str, "256MiB"));
                if (*scenario, *op, fault) == ("standby", Op::Pause, Fault::KillVmm) {
                    // The VMM died under the guest on its way to standby: its
                    // state is gone, and a fresh boot is not saved as it.
                    wait_for_error(&env, "x", "its running state went with it").await;
                    assert_eq!(env.state("x").await, VmState::Stopped);
                    assert_eq!(env.fake.vmms_started(), 1, "nothing booted in its place");
                    env.stop().await;
                    continue;
                }
                env.wait_for("x", *want).await;
                // Settled: the state holds and exactly the right VMMs live.
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(env.state("x").await, *want, "{scenario} with {fault:?} at {op:?}");
                assert_eq!(env.fake.pending_faults(), 0, "the fault at {op:?} fired");
                let expect_vmms = usize::from(want.requires_vmm());
                assert_eq!(env.fake.live_vmms(), expect_vmms, "{scenario} with {fault:?} at {op:?}");
                env.stop().await;
            }
        }
    }
    // Delete, with a fault in its VMM shutdown.
    let mut env = Env::new();
    env.start();
    env.write("x", &decl("running", "256MiB"));
    env.wait_for("x", VmState::Running).await;
    env.fake.fail(Op::ShutdownVmm, 0, Fault::Error);
    env.fake.fail(Op::PowerOff, 0, Fault::Error);
    env.remove("x");
    env.wait_gone("x").await;
    assert_eq!(env.fake.live_vmms(), 0);
    assert_eq!(env.fake.pending_faults(), 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ignoring_the_power_button_is_killed_after_the_grace() {
    let mut env = Env::new();
    env.fake.set_guest_ignores_power_off(true);
    env.start();
    env.write("stubborn", &decl("running", "256MiB"));
    env.wait_for("stubborn", VmState::Running).await;
    env.fake.clear_calls();
    env.write("stubborn", &decl("stopped", "256MiB"));
    env.wait_for("stubborn", VmState::Stopped).await;
    assert_eq!(env.fake.calls(), vec![Op::PowerOff, Op::Kill]);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_vmm_is_killed_when_declared_stopped_or_deleted() {
    let mut env = Env::new();
    env.start();
    env.write("hung", &decl("running", "256MiB"));
    env.wait_for("hung", VmState::Running).await;
    let socket = env.socket("hung");
    env.fake.make_unresponsive(&socket, true);
    env.wait_for("hung", VmState::Unknown).await;
    // Wanted running, it is left alone: it may yet answer.
    tokio::time::sleep(env.settings.reconcile.stop_grace * 2).await;
    assert_eq!(env.state("hung").await, VmState::Unknown);
    assert!(!env.fake.calls().contains(&Op::Kill));
    // Declared stopped: killed, since it has not answered for longer than
    // the stop grace (the plan's tests pin the timing), and stopped.
    env.write("hung", &decl("stopped", "256MiB"));
    env.wait_for("hung", VmState::Stopped).await;
    assert!(env.fake.calls().contains(&Op::Kill));
    assert_eq!(env.fake.live_vmms(), 0);

    // Hung again, then deleted: killed at once, and removed.
    env.write("hung", &decl("running", "256MiB"));
    env.wait_for("hung", VmState::Running).await;
    env.fake.make_unresponsive(&env.socket("hung"), true);
    env.wait_for("hung", VmState::Unknown).await;
    env.remove("hung");
    env.wait_gone("hung").await;
    assert_eq!(env.fake.live_vmms(), 0);
    env.stop().await;
}

/// A guest that misses the power button (still booting) has it pressed
/// again until it hears it, within the one grace of the first press.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_power_button_press_is_repeated() {
    let mut env = Env::new();
    let mut settings = (*env.settings).clone();
    settings.reconcile.stop_grace = Duration::from_secs(10);
    env.settings = Arc::new(settings);
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.fake.miss_power_presses(2);
    env.write("web", &decl("stopped", "256MiB"));
    env.wait_for("web", VmState::Stopped).await;
    let presses = env.fake.calls().iter().filter(|op| **op == Op::PowerOff).count();
    assert_eq!(presses, 3, "pressed until heard");
    assert!(!env.fake.calls().contains(&Op::Kill), "powered off by itself, not killed");
    env.stop().await;
}

/// A guest pinned to a backend that is not installed (any more) can still
/// be removed: its recorded VMM, alive, is killed as a process, and its
/// data goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_backend_is_missing_can_be_removed() {
    let mut env = Env::new();
    let store = env.store();
    let meta = store.create_guest("orphan", HypervisorKind::CloudHypervisor).unwrap();
    let paths = store.guest_paths(meta.id);
    // A VMM the record names, still running: a stand-in process.
    let mut child = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let pid = child.id();
    let start = hypeman::hypervisor::process::start_time(pid).unwrap();
    let mut meta = meta;
    meta.vmm = Some(hypeman::store::VmmRecord { pid, pid_start_time: start, socket: paths.ch_socket.clone(), version: None });
    store.write_metadata(&meta).unwrap();
    env.start();
    // Declared, it cannot run: status says why, and nothing is killed.
    env.write("orphan", &format!("{}hypervisor = \"cloud-hypervisor\"\n", decl("running", "256MiB")));
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.store().find_by_name("orphan").unwrap().unwrap().last_error.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no error recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = env.store().find_by_name("orphan").unwrap().unwrap().last_error.unwrap();
    assert!(error.starts_with("cloud-hypervisor is not installed, and its VMM (pid"), "{error}");
    assert!(child.try_wait().unwrap().is_none(), "its VMM is left running");
    env.remove("orphan");
    env.wait_gone("orphan").await;
    assert!(!paths.dir.exists(), "its data is deleted");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(!status.success(), "its VMM was killed: {status:?}");
    env.stop().await;
}

/// The console line init prints when the app ends, as the guest would
/// leave it in `app.log`.
fn console_exit(env: &Env, name: &str, status: i32) {
    let meta = env.store().find_by_name(name).unwrap().expect("guest exists");
    let log = env.store().guest_paths(meta.id).app_log;
    let text = format!("hypeman-init: starting (version 0.1.0)\r\nwork\r\nhypeman-init: app exited with status {status}\r\nhypeman-init: powering off\r\n");
    std::fs::write(log, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restart_policy_follows_the_declaration() {
    let mut env = Env::new();
    env.start();
    env.write("job", &format!("{}restart = \"on-failure\"\n", decl("running", "256MiB")));
    env.wait_for("job", VmState::Running).await;

    // Exit 1 is a failure: booted again.
    console_exit(&env, "job", 1);
    env.fake.guest_exit(&env.socket("job"));
    assert!(env.fake.wait_for_calls(Op::Create, 2, WAIT).await, "restarted after exit 1");
    env.wait_for("job", VmState::Running).await;

    // Exit 0 is not: the VMM goes, the instance stays Stopped and says why.
    console_exit(&env, "job", 0);
    env.fake.guest_exit(&env.socket("job"));
    env.wait_for("job", VmState::Stopped).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let meta = loop {
        let meta = env.store().find_by_name("job").unwrap().unwrap();
        if meta.last_error.is_some() {
            break meta;
        }
        assert!(tokio::time::Instant::now() < deadline, "the exit never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(meta.last_error.as_deref(), Some("the app exited with status 0; restart = \"on-failure\" leaves it stopped"));
    assert_eq!(meta.exited.map(|e| e.end), Some(hypeman::exit::GuestEnd::Exited { status: 0 }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.fake.live_vmms(), 0);
    assert_eq!(env.fake.vmms_started(), 2, "not booted a third time");

    // `always` in the declaration: it boots again, without a config change.
    env.write("job", &format!("{}restart = \"always\"\n", decl("running", "256MiB")));
    assert!(env.fake.wait_for_calls(Op::Create, 3, WAIT).await, "booted after the policy changed");
    env.wait_for("job", VmState::Running).await;
    env.stop().await;
}

/// A guest the daemon powers off did not end by itself: no exit record, no
/// console read, and `restart = "never"` does not hold back the next boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_the_daemon_asked_for_is_not_an_ending() {
    let mut env = Env::new();
    env.start();
    let never = |state: &str| format!("{}restart = \"never\"\n", decl(state, "256MiB"));
    env.write("svc", &never("running"));
    env.wait_for("svc", VmState::Running).await;
    env.write("svc", &never("stopped"));
    assert!(env.fake.wait_for_calls(Op::ShutdownVmm, 1, WAIT).await, "the VMM was ended");
    env.wait_for("svc", VmState::Stopped).await;
    // Past a resync, so a pass that would forget an exit has had its turn.
    tokio::time::sleep(env.settings.reconcile.resync_interval * 2).await;
    let meta = env.store().find_by_name("svc").unwrap().expect("guest exists");
    assert_eq!(meta.exited, None);
    assert_eq!(meta.last_error, None);
    let log = std::fs::read_to_string(env.store().guest_paths(meta.id).hypeman_log).unwrap();
    assert!(log.contains("power off (from Running)"), "{log}");
    assert!(log.contains("stop VMM (from Shutdown)"), "{log}");
    assert!(!log.contains("ended by itself"), "{log}");
    assert!(!log.contains("forget the last exit"), "{log}");

    env.write("svc", &never("running"));
    assert!(env.fake.wait_for_calls(Op::Create, 2, WAIT).await, "booted again");
    env.wait_for("svc", VmState::Running).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_logs_rotate_at_the_configured_size() {
    let mut env = Env::new();
    let settings = Arc::get_mut(&mut env.settings).expect("not shared before start");
    settings.logs.max_size = hypeman::declaration::spec::ByteSize(1 << 20);
    settings.logs.keep = 1;
    env.start();
    env.write("chatty", &decl("running", "256MiB"));
    env.wait_for("chatty", VmState::Running).await;
    let meta = env.store().find_by_name("chatty").unwrap().unwrap();
    let app = env.store().guest_paths(meta.id).app_log;
    std::fs::write(&app, vec![b'x'; (1 << 20) + 1]).unwrap();
    let rotated = app.with_extension("log.1");
    let deadline = tokio::time::Instant::now() + WAIT;
    // The rotation renames the copy into place, then truncates: wait for
    // both, or the look can fall between the two.
    let truncated = || std::fs::metadata(&app).map(|m| m.len() < 1 << 20).unwrap_or(false);
    while !(rotated.exists() && truncated()) {
        assert!(tokio::time::Instant::now() < deadline, "never rotated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::metadata(&rotated).unwrap().len(), (1 << 20) + 1);
    assert!(std::fs::metadata(&app).unwrap().len() < 1 << 20, "truncated in place");
    // Under the limit: left alone, and keep = 1 keeps no `.2`.
    std::fs::write(&app, vec![b'y'; 1 << 20]).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(std::fs::metadata(&app).unwrap().len(), 1 << 20);
    assert!(!app.with_extension("log.2").exists());
    env.stop().await;
}

fn networked(state: &str) -> String {
    format!("{}[network]\nenabled = true\n", decl(state, "256MiB"))
}

fn lease_of(env: &Env, name: &str) -> Option<hypeman::store::NetworkLease> {
    env.store().find_by_name(name).unwrap().and_then(|m| m.network)
}

fn with_subnet(env: &mut Env, subnet: &str) {
    let mut settings = (*env.settings).clone();
    settings.network.subnet = subnet.parse().unwrap();
    env.settings = Arc::new(settings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_leases_are_distinct_and_survive_a_daemon_restart() {
    let mut env = Env::new();
    with_subnet(&mut env, "192.168.77.0/29");
    env.start();
    for name in ["a", "b", "c"] {
        env.write(name, &networked("running"));
    }
    for name in ["a", "b", "c"] {
        env.wait_for(name, VmState::Running).await;
    }
    let leases: Vec<_> = ["a", "b", "c"].iter().map(|n| lease_of(&env, n).expect("leased")).collect();
    let ips: std::collections::BTreeSet<_> = leases.iter().map(|l| l.ip.clone()).collect();
    assert_eq!(ips.len(), 3, "one address each: {leases:?}");
    for l in &leases {
        assert_eq!((l.cidr, l.gateway.as_str()), (29, "192.168.77.1"));
        assert!(l.tap.starts_with("hm") && l.tap.len() == 15, "{l:?}");
    }

    // Killed and restarted, and the guests stopped and started again: the
    // same addresses.
    env.kill().await;
    env.start();
    for name in ["a", "b", "c"] {
        env.write(name, &networked("stopped"));
    }
    for name in ["a", "b", "c"] {
        env.wait_for(name, VmState::Stopped).await;
    }
    for name in ["a", "b", "c"] {
        env.write(name, &networked("running"));
    }
    for name in ["a", "b", "c"] {
        env.wait_for(name, VmState::Running).await;
    }
    let again: Vec<_> = ["a", "b", "c"].iter().map(|n| lease_of(&env, n).expect("leased")).collect();
    assert_eq!(again, leases);

    // Networking turned off: the lease goes at the next create.
    env.write("c", &decl("stopped", "256MiB"));
    env.wait_for("c", VmState::Stopped).await;
    env.write("c", &decl("running", "256MiB"));
    env.wait_for("c", VmState::Running).await;
    assert_eq!(lease_of(&env, "c"), None);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subnet_is_reported_and_a_deleted_guest_frees_its_address() {
    let mut env = Env::new();
    // A /30 holds exactly one guest.
    with_subnet(&mut env, "192.168.78.0/30");
    env.start();
    env.write("first", &networked("running"));
    env.wait_for("first", VmState::Running).await;
    assert_eq!(lease_of(&env, "first").expect("leased").ip, "192.168.78.2");

    env.write("second", &networked("running"));
    let deadline = tokio::time::Instant::now() + WAIT;
    let error = loop {
        let m = env.store().find_by_name("second").unwrap();
        if let Some(e) = m.and_then(|m| m.last_error) {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "second never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.contains("no free address left in 192.168.78.0/30 (1 in use)"), "{error}");
    assert_eq!(env.state("second").await, VmState::Stopped);

    env.remove("first");
    env.wait_gone("first").await;
    env.wait_for("second", VmState::Running).await;
    assert_eq!(lease_of(&env, "second").expect("leased").ip, "192.168.78.2");
    env.stop().await;
}

fn with_backoff(env: &mut Env, initial: Duration, max: Duration) {
    let mut settings = (*env.settings).clone();
    settings.reconcile.backoff_initial = initial;
    settings.reconcile.backoff_max = max;
    env.settings = Arc::new(settings);
}

/// A failing instance backs off for a minute here; editing or deleting its
/// declaration is acted on at once, not after the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_or_deleted_declaration_does_not_wait_out_the_backoff() {
    let mut env = Env::new();
    with_backoff(&mut env, Duration::from_secs(60), Duration::from_secs(60));
    env.start();
    env.fake.fail(Op::Create, 0, Fault::Error);
    env.write("fix", &decl("running", "256MiB"));
    assert!(env.fake.wait_for_calls(Op::Create, 1, WAIT).await, "first create");
    // The user fixes the declaration: a create follows well within WAIT.
    env.write("fix", &decl("running", "512MiB"));
    env.wait_for("fix", VmState::Running).await;

    env.fake.fail(Op::Create, 0, Fault::Error);
    env.write("gone", &decl("running", "256MiB"));
    assert!(env.fake.wait_for_calls(Op::Create, 3, WAIT).await, "create of gone");
    env.remove("gone");
    env.wait_gone("gone").await;

    // An unchanged declaration still waits: no second create of a third one.
    env.fake.fail(Op::Create, 0, Fault::Error);
    env.write("wait", &decl("running", "256MiB"));
    assert!(env.fake.wait_for_calls(Op::Create, 4, WAIT).await, "create of wait");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.state("wait").await, VmState::Stopped, "still backing off");
    env.stop().await;
}

/// A guest that keeps ending says so in `last_error` while it waits to boot
/// again, and a changed declaration boots it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_shows_in_last_error() {
    let mut env = Env::new();
    with_backoff(&mut env, Duration::from_secs(60), Duration::from_secs(60));
    env.start();
    env.write("loop", &decl("running", "256MiB"));
    env.wait_for("loop", VmState::Running).await;
    // The first exit boots again at once; the second backs off.
    for round in 1..=2 {
        console_exit(&env, "loop", 3);
        env.fake.guest_exit(&env.socket("loop"));
        if round == 1 {
            assert!(env.fake.wait_for_calls(Op::Create, 2, WAIT).await, "rebooted after the first exit");
            env.wait_for("loop", VmState::Running).await;
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let error = loop {
        let meta = env.store().find_by_name("loop").unwrap().unwrap();
        if let Some(error) = meta.last_error {
            break error;
        }
        assert!(tokio::time::Instant::now() < deadline, "the crash loop never showed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.starts_with("crash loop: "), "{error}");
    assert!(error.ends_with("(2 times in a row); booting again in 1m (backoff)"), "{error}");
    assert_eq!(env.fake.vmms_started(), 2, "not booted during the backoff");
    env.write("loop", &decl("running", "512MiB"));
    env.wait_for("loop", VmState::Running).await;
    env.stop().await;
}

fn hypeman_log(env: &Env, name: &str) -> String {
    let meta = env.store().find_by_name(name).unwrap().expect("guest exists");
    std::fs::read_to_string(env.store().guest_paths(meta.id).hypeman_log).unwrap()
}

/// A declaration changed while in standby: the guest is restored as it
/// was taken and shut down through its power button (so that it writes
/// what it had not), then cold boots the new declaration; the log says
/// which field. Declared stopped from standby, it goes the same way down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_standby_restores_shuts_down_and_cold_boots() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.write("web", &decl("running", "512MiB"));
    assert!(env.fake.wait_for_calls(Op::Create, 2, WAIT).await, "restarted for the change");
    env.wait_for("web", VmState::Running).await;
    env.write("web", &decl("standby", "512MiB"));
    env.wait_for("web", VmState::Standby).await;
    let before = env.fake.calls().len();
    env.write("web", &decl("running", "1GiB"));
    assert!(env.fake.wait_for_calls(Op::Create, 3, WAIT).await, "cold booted");
    env.wait_for("web", VmState::Running).await;
    let since: Vec<Op> = env.fake.calls()[before..]
        .iter()
        .copied()
        .filter(|op| matches!(op, Op::Create | Op::Boot | Op::Restore | Op::Resume | Op::PowerOff))
        .collect();
    assert_eq!(since, vec![Op::Restore, Op::Resume, Op::PowerOff, Op::Create, Op::Boot], "through the guest");
    let log = hypeman_log(&env, "web");
    assert_eq!(
        log.matches("power off (from Running): the declaration changed (memory); restarting to apply it\n").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("discard snapshot"), "{log}");

    env.write("web", &decl("standby", "1GiB"));
    env.wait_for("web", VmState::Standby).await;
    let before = env.fake.calls().len();
    env.write("web", &decl("stopped", "1GiB"));
    env.wait_for("web", VmState::Stopped).await;
    let since: Vec<Op> = env.fake.calls()[before..]
        .iter()
        .copied()
        .filter(|op| matches!(op, Op::Restore | Op::Resume | Op::PowerOff))
        .collect();
    assert_eq!(since, vec![Op::Restore, Op::Resume, Op::PowerOff], "stopped through the guest");
    let meta = env.store().find_by_name("web").unwrap().unwrap();
    assert!(env.store().snapshot(meta.id).unwrap().is_none(), "no snapshot left");
    // Stopping is no restart: no reason given.
    let log = hypeman_log(&env, "web");
    let last_power_off = log.lines().rfind(|l| l.contains("power off (from")).expect("a power off");
    assert!(last_power_off.ends_with("power off (from Running)"), "{log}");
    env.stop().await;
}

/// A snapshot that cannot be restored (a disk it names is gone) is the one
/// that is discarded, and the record says why and what that cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrestorable_snapshot_is_discarded_and_the_log_says_why() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("standby", "256MiB"));
    env.wait_for("web", VmState::Standby).await;
    let meta = env.store().find_by_name("web").unwrap().unwrap();
    std::fs::remove_file(env.store().guest_paths(meta.id).overlay).unwrap();
    env.write("web", &decl("stopped", "256MiB"));
    env.wait_for("web", VmState::Stopped).await;
    assert_eq!(env.fake.calls().iter().filter(|op| **op == Op::Restore).count(), 0, "no VMM for it");
    let log = hypeman_log(&env, "web");
    assert!(log.contains("the standby snapshot cannot be restored (cannot prepare disk at "), "{log}");
    assert!(log.contains("what the guest had not written to its disks is lost"), "{log}");
    env.stop().await;
}

/// vim saves by renaming the file to a backup and writing a new one; the
/// moment in between, no declaration exists. That must not touch the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editor_save_through_a_backup_rename_leaves_the_guest_alone() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.fake.clear_calls();
    let dir = env.config_dir.join("instances");
    for _ in 0..3 {
        std::fs::rename(dir.join("web.toml"), dir.join("web.toml~")).unwrap();
        // Longer than the daemon's debounce: the watcher has seen the gap.
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::fs::write(dir.join("web.toml"), decl("running", "256MiB")).unwrap();
        std::fs::remove_file(dir.join("web.toml~")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(env.state("web").await, VmState::Running);
    assert!(!env.fake.calls().contains(&Op::PowerOff), "{:?}", env.fake.calls());
    // A removal that stays is carried out.
    env.remove("web");
    env.wait_gone("web").await;
    env.stop().await;
}

/// Waits until `name`'s recorded last error contains `want`.
async fn wait_for_error(env: &Env, name: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let error = env.store().find_by_name(name).unwrap().and_then(|m| m.last_error);
        if error.as_deref().is_some_and(|e| e.contains(want)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name}: never failed with {want:?}; last error {error:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The daemon's lease index against deletes, a guest recreated under the
/// same name, and a restart that must read every lease back from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_index_follows_deletes_recreates_and_restarts() {
    let mut env = Env::new();
    // A /30 holds exactly one guest.
    with_subnet(&mut env, "192.168.79.0/30");
    env.start();
    env.write("first", &networked("running"));
    env.wait_for("first", VmState::Running).await;
    let old = env.store().find_by_name("first").unwrap().expect("guest exists");
    assert_eq!(old.network.expect("leased").ip, "192.168.79.2");

    // Deleted and declared again: a new guest, on the address set free.
    env.remove("first");
    env.wait_gone("first").await;
    env.write("first", &networked("running"));
    env.wait_for("first", VmState::Running).await;
    let first = env.store().find_by_name("first").unwrap().expect("guest exists");
    assert_ne!(first.id, old.id);
    assert_eq!(first.network.as_ref().expect("leased").ip, "192.168.79.2");

    env.write("second", &networked("running"));
    wait_for_error(&env, "second", "no free address left in 192.168.79.0/30 (1 in use)").await;

    // Restarted with its error cleared: the new daemon knows the address is
    // held before anything else leases one.
    env.kill().await;
    let mut second = env.store().find_by_name("second").unwrap().expect("guest exists");
    second.last_error = None;
    env.store().write_metadata(&second).unwrap();
    env.start();
    wait_for_error(&env, "second", "no free address left in 192.168.79.0/30 (1 in use)").await;
    assert_eq!(lease_of(&env, "first"), first.network);
    assert_eq!(lease_of(&env, "second"), None);
    assert_eq!(env.state("first").await, VmState::Running);

    env.remove("first");
    env.wait_gone("first").await;
    env.wait_for("second", VmState::Running).await;
    assert_eq!(lease_of(&env, "second").expect("leased").ip, "192.168.79.2");
    env.stop().await;
}

/// A guest record that cannot be read may hold any address: none is handed
/// out until it can be read again (or is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_address_is_leased_while_a_guest_record_is_unreadable() {
    let mut env = Env::new();
    with_subnet(&mut env, "192.168.80.0/29");
    let stray = env.settings.data_dir.join("guests").join("not-a-guest");
    std::fs::create_dir_all(&stray).unwrap();
    env.start();
    env.write("net", &networked("running"));
    wait_for_error(&env, "net", "1 guest record(s) cannot be read").await;
    assert_eq!(lease_of(&env, "net"), None);
    // A guest without networking is not held back.
    env.write("plain", &decl("running", "256MiB"));
    env.wait_for("plain", VmState::Running).await;

    std::fs::remove_dir(&stray).unwrap();
    env.wait_for("net", VmState::Running).await;
    assert!(lease_of(&env, "net").is_some());
    env.stop().await;
}

/// The host side of a guest network as the health check sees it, with a
/// switch for the test to delete the TAP behind the daemon's back. A VMM
/// started afterwards (a create or restore runs `prepare`) opens the TAP
/// made again, as a real one would.
struct DeletableTap {
    deleted: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Provisioner for DeletableTap {
    async fn prepare(
        &self,
        spec: &hypeman::declaration::spec::InstanceSpec,
        guest: &hypeman::store::GuestPaths,
        meta: &hypeman::store::Metadata,
    ) -> Result<hypeman::hypervisor::VmConfig, ProvisionError> {
        self.deleted.store(false, std::sync::atomic::Ordering::SeqCst);
        FakeProvisioner.prepare(spec, guest, meta).await
    }

    /// A restore makes the TAP again, as the real provisioner does.
    async fn prepare_restore(
        &self,
        meta: &hypeman::store::Metadata,
        config: &hypeman::hypervisor::VmConfig,
    ) -> Result<(), ProvisionError> {
        self.deleted.store(false, std::sync::atomic::Ordering::SeqCst);
        FakeProvisioner.prepare_restore(meta, config).await
    }

    async fn tap_health(
        &self,
        meta: &hypeman::store::Metadata,
    ) -> Result<Option<hypeman::network::host::TapHealth>, ProvisionError> {
        use hypeman::network::host::TapHealth;
        let deleted = self.deleted.load(std::sync::atomic::Ordering::SeqCst);
        Ok(meta.network.as_ref().map(|_| if deleted { TapHealth::Missing } else { TapHealth::Fine }))
    }
}

/// A running guest whose TAP is deleted goes through standby and back,
/// which reconnects it, and its log says why; it is not rebooted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_whose_tap_was_deleted_is_reconnected_by_a_standby_restore_cycle() {
    let mut env = Env::new();
    let tap = Arc::new(DeletableTap { deleted: false.into() });
    env.provisioner = tap.clone();
    env.start();
    env.write("web", &networked("running"));
    env.wait_for("web", VmState::Running).await;
    // Health checks of a healthy guest do nothing.
    tokio::time::sleep(env.settings.reconcile.health_interval * 4).await;
    assert_eq!(env.fake.calls().iter().filter(|op| **op == Op::Pause).count(), 0);

    tap.deleted.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(env.fake.wait_for_calls(Op::Restore, 1, WAIT).await, "restored");
    env.wait_for("web", VmState::Running).await;
    let ops: Vec<Op> = env
        .fake
        .calls()
        .into_iter()
        .filter(|op| matches!(op, Op::Create | Op::Boot | Op::Pause | Op::Snapshot | Op::Restore | Op::Resume | Op::PowerOff))
        .collect();
    assert_eq!(ops, vec![Op::Create, Op::Boot, Op::Pause, Op::Snapshot, Op::Restore, Op::Resume]);
    let log = hypeman_log(&env, "web");
    let lost = log.lines().filter(|l| l.contains("the guest lost its network")).count();
    assert_eq!(lost, 1, "said once: {log}");
    assert!(log.contains("a standby/restore cycle reconnects the guest"), "{log}");
    assert!(log.contains("restore from standby: done"), "{log}");
    // Healthy again: the stale snapshot goes and nothing more happens.
    tokio::time::sleep(env.settings.reconcile.health_interval * 4).await;
    assert_eq!(env.fake.calls().iter().filter(|op| **op == Op::Restore).count(), 1);
    assert!(!env.instances().observe("web").await.unwrap().has_snapshot());
    env.stop().await;
}

/// Counts `prepare` calls and fails them as a host without a guest kernel
/// would, until told a kernel is there.
struct NoKernelYet {
    prepares: std::sync::atomic::AtomicUsize,
    kernel: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Provisioner for NoKernelYet {
    async fn prepare(
        &self,
        spec: &hypeman::declaration::spec::InstanceSpec,
        guest: &hypeman::store::GuestPaths,
        meta: &hypeman::store::Metadata,
    ) -> Result<hypeman::hypervisor::VmConfig, ProvisionError> {
        self.prepares.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !self.kernel.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ProvisionError::NoKernel);
        }
        FakeProvisioner.prepare(spec, guest, meta).await
    }
}

/// An error only a change can clear is not retried on a timer: status says
/// it waits for a change, and an edit of the declaration tries again. A
/// transient one says when it is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_that_needs_a_change_waits_for_one_and_status_says_so() {
    let mut env = Env::new();
    let provisioner = Arc::new(NoKernelYet { prepares: 0.into(), kernel: false.into() });
    env.provisioner = provisioner.clone();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    wait_for_error(&env, "web", "no guest kernel configured").await;
    let error = env.store().find_by_name("web").unwrap().unwrap().last_error.unwrap();
    assert!(error.ends_with("waiting for a change to the declaration or settings"), "{error}");
    // Several backoff periods and resyncs later, still one try.
    tokio::time::sleep(env.settings.reconcile.resync_interval * 3).await;
    assert_eq!(provisioner.prepares.load(std::sync::atomic::Ordering::SeqCst), 1, "not retried");
    // The kernel appears and the declaration is edited: tried at once.
    provisioner.kernel.store(true, std::sync::atomic::Ordering::SeqCst);
    env.write("web", &decl("running", "512MiB"));
    env.wait_for("web", VmState::Running).await;
    assert_eq!(env.store().find_by_name("web").unwrap().unwrap().last_error, None);

    // A transient failure says when it is tried again.
    env.fake.fail(Op::Pause, 0, Fault::Error);
    env.write("web", &decl("standby", "512MiB"));
    wait_for_error(&env, "web", "pause failed").await;
    let error = env.store().find_by_name("web").unwrap().unwrap().last_error.unwrap();
    assert!(error.contains("; retrying in "), "{error}");
    env.wait_for("web", VmState::Standby).await;
    env.stop().await;
}

/// A VMM that stops answering while its guest powers off (QEMU closing its
/// QMP socket on the way out) is waited for like any stopping guest: no
/// "does not answer" error, and it is killed after the grace if it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_stops_answering_while_stopping_is_not_an_error() {
    let mut env = Env::new();
    env.fake.set_guest_ignores_power_off(true);
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    let socket = env.socket("web");
    env.write("web", &decl("stopped", "256MiB"));
    // Once the button press has returned (the call is counted as it
    // begins; a VMM that stops answering during it is a failed press).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !hypeman_log(&env, "web").contains("power off: done") {
        assert!(tokio::time::Instant::now() < deadline, "power button never pressed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.fake.make_unresponsive(&socket, true);
    env.wait_for("web", VmState::Stopped).await;
    let meta = env.store().find_by_name("web").unwrap().unwrap();
    assert_eq!(meta.last_error, None);
    let log = hypeman_log(&env, "web");
    assert!(!log.contains("does not answer"), "{log}");
    assert!(log.contains("killing its VMM"), "{log}");
    env.stop().await;
}

/// Holds `prepare` of every instance whose name starts with `slow` (an
/// image pull that takes long) until released.
struct SlowPulls {
    released: std::sync::atomic::AtomicBool,
    waiting: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Provisioner for SlowPulls {
    async fn prepare(
        &self,
        spec: &hypeman::declaration::spec::InstanceSpec,
        guest: &hypeman::store::GuestPaths,
        meta: &hypeman::store::Metadata,
    ) -> Result<hypeman::hypervisor::VmConfig, ProvisionError> {
        use std::sync::atomic::Ordering::SeqCst;
        if spec.name.starts_with("slow") {
            self.waiting.fetch_add(1, SeqCst);
            while !self.released.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        FakeProvisioner.prepare(spec, guest, meta).await
    }
}

/// More instances than there are turns, all stuck preparing their disks,
/// do not hold up another instance: a step lends its turn while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_stuck_preparing_do_not_stall_the_others() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut env = Env::new();
    let slow = Arc::new(SlowPulls { released: false.into(), waiting: 0.into() });
    env.provisioner = slow.clone();
    env.start();
    let stuck = hypeman::instances::TURNS + 2;
    for i in 0..stuck {
        env.write(&format!("slow{i}"), &decl("running", "256MiB"));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while slow.waiting.load(SeqCst) < stuck {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {stuck} reached prepare", slow.waiting.load(SeqCst));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.write("quick", &decl("running", "256MiB"));
    env.wait_for("quick", VmState::Running).await;
    slow.released.store(true, SeqCst);
    for i in 0..stuck {
        env.wait_for(&format!("slow{i}"), VmState::Running).await;
    }
    env.stop().await;
}

/// A snapshot taken by the release before the agent channel (its launch
/// configuration has no `agent`, and its hash is of that configuration)
/// still restores: the restored guest simply has no channel until its next
/// cold boot, and the resume says so in the log instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_before_the_agent_channel_still_restores() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.write("web", &decl("standby", "256MiB"));
    env.wait_for("web", VmState::Standby).await;
    env.stop().await;

    // Rewrite the snapshot as the previous release took it.
    let meta = env.store().find_by_name("web").unwrap().unwrap();
    let snap_dir = env.store().guest_paths(meta.id).snapshot_latest;
    let vm_file = snap_dir.join("fake-vm.json");
    let mut vm: serde_json::Value = serde_json::from_slice(&std::fs::read(&vm_file).unwrap()).unwrap();
    assert!(vm["config"]["agent"].is_object(), "this release records the channel: {vm}");
    vm["config"].as_object_mut().unwrap().remove("agent");
    let old: hypeman::hypervisor::VmConfig = serde_json::from_value(vm["config"].clone()).unwrap();
    std::fs::write(&vm_file, serde_json::to_vec(&vm).unwrap()).unwrap();
    let marker = snap_dir.join("snapshot.json");
    let mut info: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    assert_ne!(info["config_hash"], old.config_hash().as_str());
    info["config_hash"] = old.config_hash().into();
    // The previous release's marker (version 1) records no files to check.
    info["version"] = 1.into();
    info.as_object_mut().unwrap().remove("files");
    std::fs::write(&marker, serde_json::to_vec(&info).unwrap()).unwrap();

    env.fake.clear_calls();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    let calls = env.fake.calls();
    assert_eq!(&calls[..2], &[Op::Restore, Op::Resume], "{calls:?}");
    assert!(!calls.contains(&Op::Create), "no cold boot: {calls:?}");
    let log = hypeman_log(&env, "web");
    assert!(!log.contains("cannot be restored"), "{log}");
    assert!(log.contains("guest clock not set: no agent channel at "), "{log}");
    env.stop().await;
}

fn snapshots_dir(env: &Env, name: &str) -> PathBuf {
    let meta = env.store().find_by_name(name).unwrap().expect("guest exists");
    env.store().guest_paths(meta.id).snapshots_dir
}

/// The issue-10 full disk, before anything is written: a guest whose
/// snapshot cannot fit is never paused, status names the lack of space,
/// the log says it once however long the disk stays full, and the standby
/// goes on by itself once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_fit_never_pauses_the_guest_and_goes_on_once_it_fits() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.fake.clear_calls();
    env.fake.set_snapshot_estimate(Some(1 << 60));
    env.write("web", &decl("standby", "256MiB"));
    wait_for_error(&env, "web", "No space left on device").await;
    // Many health intervals (50 ms): rechecks, and nothing else.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.state("web").await, VmState::Running);
    assert_eq!(env.fake.calls(), Vec::<Op>::new(), "never paused");
    let error = env.store().find_by_name("web").unwrap().unwrap().last_error.unwrap();
    assert!(error.starts_with("pause failed: No space left on device for the snapshot in "), "{error}");
    assert!(error.contains("the snapshot needs up to ") && error.contains(" are available"), "{error}");
    assert!(error.contains("the guest keeps running"), "{error}");
    let log = hypeman_log(&env, "web");
    assert_eq!(log.matches("No space left on device").count(), 1, "said once, not at every recheck:\n{log}");
    assert!(!log.contains("pause (from Running)"), "no step began:\n{log}");

    env.fake.set_snapshot_estimate(Some(1 << 20));
    env.wait_for("web", VmState::Standby).await;
    assert_eq!(env.fake.calls(), vec![Op::Pause, Op::Snapshot, Op::Info, Op::ShutdownVmm]);
    env.stop().await;
}

/// The issue-10 full disk, mid-write: the partial files are gone before
/// the guest is resumed, the guest keeps running, and the error names the
/// space and what was written; no retry pauses it while the disk stays
/// full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_fills_the_disk_resumes_the_guest_and_leaves_nothing_behind() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    let partial = snapshots_dir(&env, "web").join("snapshot-latest.partial");
    env.fake.clear_calls();
    env.fake.fail(Op::Snapshot, 0, Fault::DiskFull);
    env.fake.hold(Op::Resume);
    env.write("web", &decl("standby", "256MiB"));
    assert!(env.fake.wait_for_calls(Op::Resume, 1, WAIT).await, "the guest is resumed");
    assert!(!partial.exists(), "the partial snapshot went first");
    // The disk stays full from here on.
    env.fake.set_snapshot_estimate(Some(1 << 60));
    env.fake.release(Op::Resume);
    wait_for_error(&env, "web", "were written before the disk filled").await;
    let error = env.store().find_by_name("web").unwrap().unwrap().last_error.unwrap();
    assert!(error.starts_with("snapshot to standby failed: No space left on device for the snapshot in "), "{error}");
    assert!(error.contains("64.0 KiB were written"), "{error}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(env.state("web").await, VmState::Running);
    assert_eq!(env.fake.calls(), vec![Op::Pause, Op::Snapshot, Op::Resume], "not paused again while it cannot fit");
    assert!(!partial.exists());

    env.fake.set_snapshot_estimate(None);
    env.wait_for("web", VmState::Standby).await;
    env.stop().await;
}

/// The issue-10 lost guest: its VMM dies while the snapshot is written.
/// Status and `hypeman.log` say the running state was lost; no fresh VM is
/// booted and saved in its place, not even by a restarted daemon; declaring
/// it stopped acknowledges the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_dies_while_its_snapshot_is_written_is_reported() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.fake.fail(Op::Snapshot, 0, Fault::KillVmm);
    env.write("web", &decl("standby", "256MiB"));
    wait_for_error(&env, "web", "the guest's running state was lost: its VMM (pid").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let check = |env: &Env| {
        let meta = env.store().find_by_name("web").unwrap().unwrap();
        assert!(meta.lost.as_deref().is_some_and(|l| l.contains("died while its snapshot was written")), "{meta:?}");
        assert!(meta.last_error.as_deref().is_some_and(|e| e.contains("running state was lost")), "{meta:?}");
        assert_eq!(env.fake.vmms_started(), 1, "no VM booted in its place");
        assert!(env.store().snapshot(meta.id).unwrap().is_none(), "no standby to show");
        assert!(!snapshots_dir(env, "web").join("snapshot-latest.partial").exists());
    };
    check(&env);
    assert_eq!(env.state("web").await, VmState::Stopped);
    assert!(hypeman_log(&env, "web").contains("the guest's running state was lost"));

    env.kill().await;
    env.start();
    tokio::time::sleep(Duration::from_millis(600)).await;
    check(&env);
    assert_eq!(env.state("web").await, VmState::Stopped);

    env.write("web", &decl("stopped", "256MiB"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !env.store().find_by_name("web").unwrap().unwrap().lost_answered {
        assert!(tokio::time::Instant::now() < deadline, "the loss was never acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still said while the guest stays stopped; gone once it boots.
    assert!(env.store().find_by_name("web").unwrap().unwrap().lost.is_some());
    env.write("web", &decl("standby", "256MiB"));
    env.wait_for("web", VmState::Standby).await;
    assert_eq!(env.fake.vmms_started(), 2, "booted anew once asked");
    env.stop().await;
}

/// A snapshot damaged on disk is found before any VMM is started on it:
/// the instance holds in standby with the file and the mismatch in status,
/// is not restored in a loop (not even by a restarted daemon), and keeps
/// the snapshot until declared stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_detected_before_restore_and_kept_until_stopped() {
    let mut env = Env::new();
    env.start();
    env.write("web", &decl("running", "256MiB"));
    env.wait_for("web", VmState::Running).await;
    env.write("web", &decl("standby", "256MiB"));
    env.wait_for("web", VmState::Standby).await;
    let state = snapshots_dir(&env, "web").join("snapshot-latest/fake-vm.json");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&state, bytes).unwrap();
    env.fake.clear_calls();

    env.write("web", &decl("running", "256MiB"));
    wait_for_error(&env, "web", "the snapshot is damaged").await;
    let error = env.store().find_by_name("web").unwrap().unwrap().last_error.unwrap();
    assert!(error.contains(&format!("{}: its SHA-256 is", state.display())), "{error}");
    assert!(error.contains("waiting for a change"), "{error}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.kill().await;
    env.start();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.state("web").await, VmState::Standby);
    assert!(!env.fake.calls().contains(&Op::Restore), "{:?}", env.fake.calls());
    assert_eq!(env.fake.vmms_started(), 1);
    assert!(state.exists(), "kept for the user");
    assert!(hypeman_log(&env, "web").contains("declare the instance stopped to discard it"));

    env.write("web", &decl("stopped", "256MiB"));
    env.wait_for("web", VmState::Stopped).await;
    assert!(!state.exists(), "declaring stopped discards it");
    env.stop().await;
}

fn with_overlay(memory: &str, overlay: &str) -> String {
    format!("{}overlay_size = \"{overlay}\"\n", decl("running", memory))
}

fn overlay_len(env: &Env, name: &str) -> u64 {
    let meta = env.store().find_by_name(name).unwrap().expect("guest exists");
    std::fs::metadata(env.store().guest_paths(meta.id).overlay).unwrap().len()
}

fn last_error(env: &Env, name: &str) -> Option<String> {
    env.store().find_by_name(name).unwrap().and_then(|m| m.last_error)
}

/// A larger `overlay_size` restarts the guest and grows its overlay; a
/// smaller one leaves the guest running with the overlay it has and says
/// why, until the old size is declared again; a shrink declared together
/// with another change does not hold that change back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_overlay_is_grown_and_a_smaller_one_refused_without_a_restart() {
    const GIB: u64 = 1 << 30;
    let mut env = Env::new();
    env.start();
    env.write("web", &with_overlay("256MiB", "1GiB"));
    env.wait_for("web", VmState::Running).await;
    assert_eq!(overlay_len(&env, "web"), GIB);

    env.fake.clear_calls();
    env.write("web", &with_overlay("256MiB", "2GiB"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(overlay_len(&env, "web") == 2 * GIB && env.fake.calls().contains(&Op::Boot)) {
        assert!(tokio::time::Instant::now() < deadline, "never grown: {:?}", env.fake.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.wait_for("web", VmState::Running).await;
    assert_eq!(env.fake.calls(), vec![Op::PowerOff, Op::ShutdownVmm, Op::Create, Op::Boot]);
    assert!(hypeman_log(&env, "web").contains("the declaration changed (overlay_size); restarting to apply it"));

    env.fake.clear_calls();
    env.write("web", &with_overlay("256MiB", "512MiB"));
    let refused = "overlay_size cannot shrink (the overlay is 2GiB, declared 512MiB); keeping 2GiB: \
                   delete the instance to start over with a smaller one";
    wait_for_error(&env, "web", refused).await;
    assert_eq!(env.state("web").await, VmState::Running);
    assert!(env.fake.calls().is_empty(), "the guest was left alone: {:?}", env.fake.calls());
    assert_eq!(overlay_len(&env, "web"), 2 * GIB);
    let log = hypeman_log(&env, "web");
    assert_eq!(log.matches(refused).count(), 1, "said once:\n{log}");

    // Another field changed with it: that one is applied, the overlay kept.
    env.write("web", &with_overlay("512MiB", "512MiB"));
    let socket = env.socket("web");
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.fake.config_of(&socket).map(|c| c.memory_bytes) != Some(512 << 20) {
        assert!(tokio::time::Instant::now() < deadline, "memory never applied: {:?}", env.fake.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.wait_for("web", VmState::Running).await;
    wait_for_error(&env, "web", refused).await;
    assert_eq!(overlay_len(&env, "web"), 2 * GIB);
    assert!(hypeman_log(&env, "web").contains("the declaration changed (memory); restarting to apply it"));

    // The overlay's own size declared again: the message goes, nothing
    // restarts.
    env.fake.clear_calls();
    env.write("web", &with_overlay("512MiB", "2GiB"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while last_error(&env, "web").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "still {:?}", last_error(&env, "web"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(env.fake.calls().is_empty(), "{:?}", env.fake.calls());
    env.stop().await;
}
