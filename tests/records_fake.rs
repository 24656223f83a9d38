//! Guest records that the daemon cannot read, a daemon killed at every
//! point of a create, and an upgrade from the previous metadata format: the
//! whole daemon against the fake hypervisor, through real files.
//!
//! What each shows is "one VMM per instance, always": no look at an
//! instance whose record may be unreadable ever provisions it, and no VMM is
//! started that a restarted daemon would not find again under its record.

mod support;

use hypeman::daemon::{self, DaemonConfig};
use hypeman::declaration::spec::HypervisorKind;
use hypeman::hypervisor::fake::{FakeHypervisor, Fault, Op};
use hypeman::hypervisor::Backends;
use hypeman::instances::provision::FakeProvisioner;
use hypeman::instances::Instances;
use hypeman::settings::Settings;
use hypeman::state::VmState;
use hypeman::store::{Metadata, Store};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use support::daemon::COUNTER;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);
/// The image the instances declare (the fake provisioner pulls nothing).
const IMAGE: &str = "docker.io/library/busybox:latest";

struct Env {
    _tmp: tempfile::TempDir,
    config_dir: PathBuf,
    settings: Arc<Settings>,
    qemu: FakeHypervisor,
    ch: FakeHypervisor,
    daemon: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Env {
    fn new() -> Env {
        let tmp = support::tempdir();
        let config_dir = tmp.path().join("etc");
        std::fs::create_dir_all(config_dir.join("instances")).unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.default_hypervisor = HypervisorKind::Qemu;
        settings.reconcile.resync_interval = Duration::from_millis(200);
        settings.reconcile.debounce = Duration::from_millis(10);
        settings.reconcile.backoff_initial = Duration::from_millis(20);
        settings.reconcile.backoff_max = Duration::from_millis(100);
        settings.reconcile.stop_grace = Duration::from_millis(300);
        settings.reconcile.health_interval = Duration::from_millis(50);
        Env {
            _tmp: tmp,
            config_dir,
            settings: Arc::new(settings),
            qemu: FakeHypervisor::new(HypervisorKind::Qemu),
            ch: FakeHypervisor::new(HypervisorKind::CloudHypervisor),
            daemon: None,
        }
    }

    fn backends(&self) -> Backends {
        Backends { cloud_hypervisor: Some(Arc::new(self.ch.clone())), qemu: Some(Arc::new(self.qemu.clone())) }
    }

    fn start(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        let cfg = DaemonConfig {
            config_dir: self.config_dir.clone(),
            settings: self.settings.clone(),
            backends: self.backends(),
            provisioner: Arc::new(FakeProvisioner),
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

    /// As SIGKILL: nothing orderly happens.
    async fn kill(&mut self) {
        if let Some((_tx, task)) = self.daemon.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Declares `name` as `support::daemon::World::declare` does, so the
    /// upgrade fixtures match it.
    fn declare(&self, name: &str, state: &str, extra: &str) {
        let body = format!(
            "image = \"{IMAGE}\"\nstate = \"{state}\"\nmemory = \"256MiB\"\ncmd = [\"sh\", \"-c\", \"{COUNTER}\"]\n{extra}"
        );
        let dir = self.config_dir.join("instances");
        std::fs::write(dir.join(format!(".{name}.toml.tmp")), body).unwrap();
        std::fs::rename(dir.join(format!(".{name}.toml.tmp")), dir.join(format!("{name}.toml"))).unwrap();
    }

    fn undeclare(&self, name: &str) {
        std::fs::remove_file(self.config_dir.join("instances").join(format!("{name}.toml"))).unwrap();
    }

    fn store(&self) -> Store {
        Store::open(&self.settings.data_dir).unwrap()
    }

    fn instances(&self) -> Instances {
        Instances::new(Arc::new(self.store()), self.backends(), self.settings.clone(), Arc::new(FakeProvisioner))
    }

    fn meta(&self, name: &str) -> Metadata {
        self.store().find_by_name(name).unwrap().expect("guest exists")
    }

    fn guest_dir(&self, meta: &Metadata) -> PathBuf {
        self.store().guest_paths(meta.id).dir
    }

    fn hypeman_log(&self, meta: &Metadata) -> String {
        std::fs::read_to_string(self.store().guest_paths(meta.id).hypeman_log).unwrap_or_default()
    }

    async fn wait_for(&self, name: &str, want: VmState) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.instances().observe(name).await.unwrap().state;
            if got == want {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let err = self.store().find_by_name(name).ok().flatten().and_then(|m| m.last_error);
                panic!("{name}: waited for {want}, still {got} (last error: {err:?}); calls {:?}", self.qemu.calls());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the daemon has looked at every instance a few times:
    /// the live witness `api` is probed once per health tick, and every
    /// owner resyncs on its own several times meanwhile.
    async fn let_the_daemon_look(&self) {
        let now = self.qemu.call_count(Op::Probe);
        let ticks = (self.settings.reconcile.resync_interval.as_millis()
            / self.settings.reconcile.health_interval.as_millis()) as usize;
        assert!(self.qemu.wait_for_calls(Op::Probe, now + 4 * ticks, WAIT).await, "the daemon stopped looking");
    }
}

fn record_path(env: &Env, meta: &Metadata) -> PathBuf {
    env.store().guest_paths(meta.id).metadata
}

/// The daemon restarted on a data dir where `web`'s record is `damaged`
/// while its VMM runs: no second VMM, the record untouched, `api` (whose
/// record is fine) served meanwhile; nothing changes when `web`'s
/// declaration goes either. A new instance is created only when the damaged
/// record still says it is not its own (`name_readable`).
async fn one_vmm_for_a_damaged_record(damage: impl FnOnce(&[u8]) -> Vec<u8>, name_readable: bool, newer: bool) {
    let mut env = Env::new();
    env.start();
    env.declare("web", "running", "");
    env.declare("api", "running", "");
    env.wait_for("web", VmState::Running).await;
    env.wait_for("api", VmState::Running).await;
    let web = env.meta("web");
    let path = record_path(&env, &web);
    let whole = std::fs::read(&path).unwrap();
    env.kill().await;

    let damaged = damage(&whole);
    std::fs::write(&path, &damaged).unwrap();
    env.start();
    env.declare("new", "running", "");
    env.let_the_daemon_look().await;
    env.let_the_daemon_look().await;

    let started = if name_readable {
        env.wait_for("new", VmState::Running).await;
        3
    } else {
        let listing = env.store().list().unwrap();
        assert!(listing.guests.iter().all(|m| m.name != "new"), "a name the record may hold is not provisioned");
        2
    };
    assert_eq!(env.qemu.vmms_started(), started, "no second VMM for web");
    assert_eq!(env.qemu.live_vmms(), started);
    assert_eq!(std::fs::read(&path).unwrap(), damaged, "the record is left as it was");
    let obs = env.instances().observe("web").await.unwrap();
    assert_eq!(obs.state, VmState::Unknown);
    let why = obs.unreadable_record.expect("the look says why");
    assert!(why.contains(&path.display().to_string()), "{why}");
    assert!(why.contains("Repairing a damaged record"), "{why}");
    assert_eq!(why.contains("a newer hypeman wrote it"), newer, "{why}");
    let status = env.store().find_by_name("web").unwrap_err().to_string();
    assert!(status.contains(&path.display().to_string()), "{status}");

    // A deleted declaration does not delete the record's directory.
    env.undeclare("web");
    env.let_the_daemon_look().await;
    env.let_the_daemon_look().await;
    assert_eq!(std::fs::read(&path).unwrap(), damaged, "an unreadable record is never removed");
    assert_eq!(env.qemu.live_vmms(), started);

    // Repaired by hand (the whole record put back) and declared again: the
    // VMM that ran all along is adopted, not replaced.
    std::fs::write(&path, &whole).unwrap();
    env.declare("web", "running", "");
    env.wait_for("web", VmState::Running).await;
    env.let_the_daemon_look().await;
    assert_eq!(env.meta("web").vmm.map(|v| v.pid), web.vmm.as_ref().map(|v| v.pid), "the same VMM");
    let log = env.hypeman_log(&web);
    assert_eq!(log.matches("create VM (from").count(), 1, "one VMM for web all along:\n{log}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_record_gets_no_second_vmm() {
    // Cut inside `created_at`, after the name.
    one_vmm_for_a_damaged_record(
        |whole| {
            let at = String::from_utf8_lossy(whole).find("created_at").unwrap();
            whole[..at].to_vec()
        },
        true,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cut_before_its_name_gets_no_second_vmm_under_any_name() {
    one_vmm_for_a_damaged_record(|whole| whole[..5].to_vec(), false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_from_a_newer_hypeman_gets_no_second_vmm_and_stays_as_written() {
    one_vmm_for_a_damaged_record(
        |whole| {
            let text = String::from_utf8_lossy(whole);
            let current = format!("\"version\": {},", hypeman::store::CURRENT_VERSION);
            text.replacen(&current, &format!("\"version\": {},\n  \"from_the_future\": true,", hypeman::store::CURRENT_VERSION + 1), 1)
                .into_bytes()
        },
        true,
        true,
    )
    .await;
}

/// Killed before the VMM is spawned (the create is held in the backend):
/// the record already says which hypervisor and what declaration, and no
/// VMM runs; the restarted daemon creates it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_intent_before_the_spawn() {
    let mut env = Env::new();
    env.qemu.hold(Op::Create);
    env.start();
    env.declare("web", "running", "");
    assert!(env.qemu.wait_for_calls(Op::Create, 1, WAIT).await, "the create began");
    env.kill().await;
    // The killed daemon's call must never take effect (a task of the test
    // process, unlike a killed process's, would carry on once let go): it
    // fails without effect when released.
    env.qemu.fail(Op::Create, 0, Fault::Error);
    env.qemu.release(Op::Create);
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.qemu.pending_faults() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the held create never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let meta = env.meta("web");
    assert_eq!(meta.hypervisor, HypervisorKind::Qemu);
    let applied = meta.applied.clone().expect("the intent is on record before the spawn");
    assert_eq!((applied.image.as_str(), applied.memory_bytes), (IMAGE, 256 << 20));
    assert!(meta.vmm.is_none());
    assert_eq!(env.qemu.live_vmms(), 0);

    env.start();
    env.wait_for("web", VmState::Running).await;
    assert_eq!(env.qemu.vmms_started(), 1);
    assert_eq!(env.meta("web").applied, Some(applied));
    env.stop().await;
}

/// Killed once the VMM is spawned and its VM made, before the record names
/// it: the restarted daemon finds it under its record's backend, adopts it
/// and boots it; never a second VMM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_spawn_before_the_record() {
    let mut env = Env::new();
    // The create takes effect and its reply is lost; the daemon's next
    // look (which would adopt the VMM) is held off until it is killed.
    env.qemu.fail(Op::Create, 0, Fault::ErrorAfter);
    env.start();
    env.declare("web", "running", "");
    assert!(env.qemu.wait_for_calls(Op::Create, 1, WAIT).await);
    env.qemu.set_delay(Op::Probe, Duration::from_secs(60));
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.qemu.live_vmms() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the VMM was never spawned");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.kill().await;
    env.qemu.set_delay(Op::Probe, Duration::ZERO);
    let meta = env.meta("web");
    assert!(meta.vmm.is_none(), "the record does not name the VMM yet");
    assert!(meta.applied.is_some(), "but says what it was made from");

    env.start();
    env.wait_for("web", VmState::Running).await;
    assert_eq!(env.qemu.vmms_started(), 1, "adopted, not made again");
    let meta = env.meta("web");
    assert!(env.hypeman_log(&meta).contains("adopting the running VMM"), "{}", env.hypeman_log(&meta));
    assert!(meta.applied.is_some());
    env.stop().await;
}

/// A declaration that moves the guest to another hypervisor, and the daemon
/// killed right after the new backend's VMM is spawned: the record already
/// pins the new backend, so the restarted daemon finds that VMM under the
/// new backend's socket instead of starting a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_spawning_on_a_new_hypervisor() {
    let mut env = Env::new();
    env.start();
    env.declare("web", "running", "");
    env.wait_for("web", VmState::Running).await;
    env.ch.fail(Op::Create, 0, Fault::ErrorAfter);
    env.ch.set_delay(Op::Probe, Duration::from_secs(60));
    env.declare("web", "running", "hypervisor = \"cloud-hypervisor\"\n");
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.ch.live_vmms() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no Cloud Hypervisor VMM was spawned; calls {:?}", env.qemu.calls());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.kill().await;
    env.ch.set_delay(Op::Probe, Duration::ZERO);
    let meta = env.meta("web");
    assert_eq!(meta.hypervisor, HypervisorKind::CloudHypervisor, "pinned before the spawn");
    assert_eq!(meta.applied.as_ref().and_then(|a| a.hypervisor), Some(HypervisorKind::CloudHypervisor));

    env.start();
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.instances().observe("web").await.unwrap().state != VmState::Running {
        assert!(tokio::time::Instant::now() < deadline, "never running on Cloud Hypervisor; calls {:?}", env.ch.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.ch.vmms_started(), 1, "the spawned VMM adopted");
    assert_eq!(env.qemu.live_vmms(), 0);
    env.stop().await;
}

/// The fast twin of `e2e_upgrade`: guests the daemon made, their records
/// rewritten in the previous format from the committed fixtures (written by
/// the previous release's binary), and the daemon started again. The
/// running guest keeps its VMM, the standby one is restored from its
/// snapshot: nothing restarted, nothing discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_the_previous_format_keeps_both_guests() {
    let mut env = Env::new();
    env.start();
    env.declare("run", "running", "");
    env.declare("snap", "running", "");
    env.wait_for("run", VmState::Running).await;
    env.wait_for("snap", VmState::Running).await;
    env.declare("snap", "standby", "");
    env.wait_for("snap", VmState::Standby).await;
    env.stop().await;

    let (run, snap) = (env.meta("run"), env.meta("snap"));
    support::upgrade::rewrite_as_previous(&env.guest_dir(&run), "running", IMAGE);
    support::upgrade::rewrite_as_previous(&env.guest_dir(&snap), "standby", IMAGE);
    let old: serde_json::Value = serde_json::from_slice(&std::fs::read(record_path(&env, &run)).unwrap()).unwrap();
    assert_eq!(old["version"], 2);
    assert!(old["applied"]["memory"].is_u64(), "the untyped object of version 2: {old}");

    env.qemu.clear_calls();
    env.start();
    env.wait_for("run", VmState::Running).await;
    env.let_the_daemon_look().await;
    assert_eq!(env.meta("run").vmm.map(|v| v.pid), run.vmm.map(|v| v.pid), "the same VMM, adopted");
    assert_eq!(env.qemu.vmms_started(), 2, "nothing restarted");

    env.declare("snap", "running", "");
    env.wait_for("snap", VmState::Running).await;
    let calls = env.qemu.calls();
    assert!(calls.contains(&Op::Restore), "{calls:?}");
    assert!(!calls.contains(&Op::Create) && !calls.contains(&Op::PowerOff), "no cold boot, no restart: {calls:?}");
    let log = env.hypeman_log(&snap);
    assert!(!log.contains("discard"), "{log}");
    // Rewritten in the current format by the first write.
    let new: serde_json::Value = serde_json::from_slice(&std::fs::read(record_path(&env, &snap)).unwrap()).unwrap();
    assert_eq!(new["version"], hypeman::store::CURRENT_VERSION);
    assert_eq!(new["applied"]["memory_bytes"], 256u64 << 20);
    env.stop().await;
}

/// A host whose default hypervisor flips (here from Cloud Hypervisor, as
/// when `cloud-hypervisor` was on `PATH`, to QEMU) while its guests run or
/// stand by, under declarations that name none: the daemon started again
/// restarts nothing and restores the standby guest on the hypervisor its
/// snapshot was taken with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_hypervisor_that_flips_restarts_nothing() {
    let mut env = Env::new();
    let mut settings = (*env.settings).clone();
    settings.default_hypervisor = HypervisorKind::CloudHypervisor;
    env.settings = Arc::new(settings);
    env.start();
    env.declare("run", "running", "");
    env.declare("snap", "running", "");
    env.wait_for("run", VmState::Running).await;
    env.wait_for("snap", VmState::Running).await;
    env.declare("snap", "standby", "");
    env.wait_for("snap", VmState::Standby).await;
    env.stop().await;
    assert_eq!(env.meta("run").hypervisor, HypervisorKind::CloudHypervisor);

    let mut settings = (*env.settings).clone();
    settings.default_hypervisor = HypervisorKind::Qemu;
    env.settings = Arc::new(settings);
    env.ch.clear_calls();
    env.start();
    env.declare("snap", "running", "");
    env.wait_for("snap", VmState::Running).await;
    env.wait_for("run", VmState::Running).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.ch.call_count(Op::Probe) < 20 {
        assert!(tokio::time::Instant::now() < deadline, "the daemon stopped looking");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = env.ch.calls();
    assert!(calls.contains(&Op::Restore), "{calls:?}");
    assert!(!calls.contains(&Op::Create) && !calls.contains(&Op::PowerOff), "nothing restarted: {calls:?}");
    assert_eq!(env.ch.vmms_started(), 3, "two boots and one restore");
    assert_eq!(env.qemu.vmms_started(), 0);
    assert_eq!(env.meta("snap").hypervisor, HypervisorKind::CloudHypervisor);
    env.stop().await;
}
