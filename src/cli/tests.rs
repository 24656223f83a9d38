//! In-process tests of the commands' computations against the fake backend,
//! a temp config dir and a temp data dir; snapshots of `status --json` and
//! of every `--help`.

use super::*;
use crate::declaration::spec::HypervisorKind;
use crate::hypervisor::fake::FakeHypervisor;
use crate::hypervisor::{GuestVmm, Hypervisor, VmmHandle};
use crate::instances::record_of;
use crate::store::{NetworkLease, SnapshotInfo};
use clap::CommandFactory;
use tempfile::TempDir;

const CH: HypervisorKind = HypervisorKind::CloudHypervisor;

struct World {
    tmp: TempDir,
    config_dir: PathBuf,
    store: Arc<Store>,
    fake: FakeHypervisor,
    ctx: Context,
}

/// A config dir with an empty `instances/`, a data dir, and a context
/// whose only backend is a fake Cloud Hypervisor (no QEMU).
fn world() -> World {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config_dir = tmp.path().join("config");
    std::fs::create_dir_all(config_dir.join("instances")).expect("instances dir");
    let mut settings = Settings::defaults();
    settings.data_dir = tmp.path().join("data");
    let store = Arc::new(Store::open(&settings.data_dir).expect("store"));
    let fake = FakeHypervisor::new(CH);
    let backends = Backends {
        cloud_hypervisor: Some(Arc::new(fake.clone())),
        qemu: None,
    };
    let instances = Instances::new(
        store.clone(),
        backends,
        Arc::new(settings),
        Arc::new(ObserveOnly),
    );
    let ctx = Context::new(&config_dir, instances);
    World {
        tmp,
        config_dir,
        store,
        fake,
        ctx,
    }
}

impl World {
    fn declare(&self, name: &str, text: &str) {
        std::fs::write(
            self.config_dir
                .join("instances")
                .join(format!("{name}.toml")),
            text,
        )
        .expect("write declaration");
    }

    fn undeclare(&self, name: &str) {
        std::fs::remove_file(
            self.config_dir
                .join("instances")
                .join(format!("{name}.toml")),
        )
        .expect("remove declaration");
    }

    /// The restart fields of a declaration, as the daemon records them
    /// when it creates the VM.
    fn applied(&self, text: &str) -> crate::store::AppliedDeclaration {
        let path = self.tmp.path().join("x.toml");
        let spec = crate::declaration::parse_instance(
            &path,
            text,
            &self.ctx.instances().settings().limits,
        )
        .expect("valid declaration");
        spec.restart_fields(CH)
    }

    fn guest(&self, name: &str, kind: HypervisorKind) -> Metadata {
        self.store.create_guest(name, kind).expect("create guest")
    }

    /// A guest with a live fake VMM, booted when `boot`, its VMM and
    /// applied spec recorded as the daemon would.
    async fn live(&self, name: &str, applied_from: &str, boot: bool) -> (Metadata, VmmHandle) {
        let mut meta = self.guest(name, CH);
        let paths = self.store.guest_paths(meta.id);
        let guest = GuestVmm {
            guest_dir: paths.dir.clone(),
            socket: paths.ch_socket.clone(),
            vmm_log: paths.vmm_log.clone(),
            recorded: None,
        };
        let handle = self
            .fake
            .create(&guest, &vm_config(&paths))
            .await
            .expect("fake create");
        if boot {
            self.fake.boot(&handle).await.expect("fake boot");
        }
        meta.vmm = Some(record_of(&handle));
        meta.applied = Some(Box::new(self.applied(applied_from)));
        self.store.write_metadata(&meta).expect("write metadata");
        (meta, handle)
    }

    /// A guest with a complete snapshot and no VMM.
    fn standby(&self, name: &str, applied_from: &str) -> Metadata {
        let mut meta = self.guest(name, CH);
        self.store.begin_snapshot(meta.id).expect("begin snapshot");
        let info = SnapshotInfo::new(CH, "fake-1.0", "0123", 512 * 1024 * 1024);
        self.store
            .commit_snapshot(meta.id, &info)
            .expect("commit snapshot");
        meta.applied = Some(Box::new(self.applied(applied_from)));
        self.store.write_metadata(&meta).expect("write metadata");
        meta
    }

    /// What `status --json` prints for `value`, with the temp dir, the
    /// IDs and the pids of `statuses` redacted.
    fn printed_json<T: serde::Serialize>(&self, value: &T, statuses: &[&InstanceStatus]) -> String {
        let mut out = Vec::new();
        write_json(&mut out, value).expect("json");
        let mut text = String::from_utf8(out).expect("utf-8");
        text = text.replace(&self.tmp.path().display().to_string(), "[tmp]");
        for s in statuses {
            if let Some(id) = &s.id {
                text = text.replace(&format!("\"id\": \"{id}\""), "\"id\": \"[id]\"");
            }
            if let Some(pid) = s.pid {
                text = text.replace(&format!("\"pid\": {pid},"), "\"pid\": \"[pid]\",");
            }
        }
        text
    }
}

fn vm_config(paths: &GuestPaths) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_bytes: 512 * 1024 * 1024,
        hotplug_memory_bytes: 0,
        kernel: PathBuf::from("/boot/vmlinux"),
        initrd: None,
        cmdline: String::new(),
        disks: Vec::new(),
        net: None,
        devices: Vec::new(),
        serial_log: paths.app_log.clone(),
        vsock: None,
        agent: None,
        user: None,
    }
}

const SMALL: &str = "image = \"docker.io/library/busybox:latest\"\nmemory = \"512MiB\"\n";
const GROWN: &str = "image = \"docker.io/library/busybox:latest\"\nmemory = \"1GiB\"\nvcpus = 2\n";
const STANDBY: &str =
    "image = \"docker.io/library/busybox:latest\"\nmemory = \"512MiB\"\nstate = \"standby\"\n";
const BROKEN: &str = "image = \"docker.io/library/busybox:latest\"\ncolour = \"red\"\n";

/// One instance of every kind `status` distinguishes.
async fn populated() -> World {
    let w = world();
    // Declared, not created yet.
    w.declare("fresh", SMALL);
    // Running, with an address, as declared.
    w.declare("web", SMALL);
    let (mut web, _) = w.live("web", SMALL, true).await;
    web.network = Some(NetworkLease {
        ip: "10.100.0.2".into(),
        cidr: 24,
        gateway: "10.100.0.1".into(),
        mac: "02:00:00:00:00:02".into(),
        tap: "hm-web".into(),
    });
    w.store.write_metadata(&web).expect("write metadata");
    // Running an older declaration: more memory and vCPUs wanted now.
    w.declare("grown", GROWN);
    w.live("grown", SMALL, true).await;
    // In standby as declared.
    w.declare("sleepy", STANDBY);
    w.standby("sleepy", STANDBY);
    // A declaration that does not validate, over a stopped guest.
    w.declare("broken", BROKEN);
    w.guest("broken", CH);
    // On disk, declaration removed.
    w.guest("orphan", CH);
    // On a hypervisor this host has no backend for.
    w.declare(
        "legacy",
        "image = \"docker.io/library/busybox:latest\"\nhypervisor = \"qemu\"\n",
    );
    w.guest("legacy", HypervisorKind::Qemu);
    w
}

fn by_name<'a>(all: &'a [InstanceStatus], name: &str) -> &'a InstanceStatus {
    all.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} in {all:?}"))
}

#[tokio::test]
async fn status_of_every_kind_of_instance() {
    let w = populated().await;
    let all = status_all(&w.ctx).await.expect("status");
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["broken", "fresh", "grown", "legacy", "orphan", "sleepy", "web"]
    );

    let fresh = by_name(&all, "fresh");
    assert_eq!(
        (
            fresh.id.as_deref(),
            fresh.state,
            fresh.desired_state.as_str()
        ),
        (None, VmState::Stopped, "running")
    );
    assert_eq!(fresh.hypervisor, Some(CH));

    let web = by_name(&all, "web");
    assert_eq!(web.state, VmState::Running);
    assert_eq!(web.ip.as_deref(), Some("10.100.0.2"));
    assert!(web.pid.is_some());
    assert_eq!(web.pending_change, None);

    let grown = by_name(&all, "grown");
    assert_eq!(
        grown.pending_change.as_deref(),
        Some("memory, vcpus (restart needed)")
    );

    let sleepy = by_name(&all, "sleepy");
    assert_eq!(
        (sleepy.state, sleepy.has_snapshot, sleepy.pid),
        (VmState::Standby, true, None)
    );

    let broken = by_name(&all, "broken");
    assert_eq!(broken.desired_state, "invalid");
    let expected = format!(
        "{}:2:1: ",
        w.config_dir.join("instances/broken.toml").display()
    );
    let error = broken.last_error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with(&expected) && error.contains("colour"),
        "{error}"
    );

    assert_eq!(by_name(&all, "orphan").desired_state, "absent");

    let legacy = by_name(&all, "legacy");
    assert_eq!(legacy.state, VmState::Stopped);
    assert_eq!(
        legacy.last_error.as_deref(),
        Some("no qemu backend is available on this host")
    );

    let printed = w.printed_json(&all, &all.iter().collect::<Vec<_>>());
    insta::assert_snapshot!("status_json_all", printed);
}

#[tokio::test]
async fn status_of_one_instance_by_name_id_or_prefix() {
    let w = populated().await;
    let by_name = status_of(&w.ctx, "web").await.expect("by name");
    let id = by_name.id.clone().expect("web has an id");
    assert_eq!(status_of(&w.ctx, &id).await.expect("by id").name, "web");
    // A prefix long enough to pass the shared timestamp, in any case.
    let prefix = id[..20].to_ascii_lowercase();
    assert_eq!(
        status_of(&w.ctx, &prefix).await.expect("by prefix").name,
        "web"
    );
    // Declared but not created yet.
    let fresh = status_of(&w.ctx, "fresh").await.expect("declared only");
    assert_eq!((fresh.id, fresh.state), (None, VmState::Stopped));
    insta::assert_snapshot!("status_json_one", w.printed_json(&by_name, &[&by_name]));
}

#[tokio::test]
async fn status_of_an_ambiguous_or_unknown_name_fails() {
    let w = populated().await;
    // Every guest's ID starts with the same timestamp digit.
    match status_of(&w.ctx, "0").await {
        Err(e @ CliError::Lookup(StoreError::Ambiguous { .. })) => {
            assert!(
                e.to_string()
                    .starts_with("\"0\" matches more than one guest: "),
                "{e}"
            );
        }
        other => panic!("expected an ambiguous lookup, got {other:?}"),
    }
    match status_of(&w.ctx, "nope").await {
        Err(e @ CliError::NotFound { .. }) => {
            assert!(
                e.to_string().starts_with("no instance matches \"nope\""),
                "{e}"
            );
        }
        other => panic!("expected not found, got {other:?}"),
    }
}

#[tokio::test]
async fn a_declared_name_wins_over_an_id_prefix_it_shares() {
    let w = populated().await;
    w.declare("0", SMALL);
    let status = status_of(&w.ctx, "0").await.expect("declared name");
    assert_eq!((status.name.as_str(), status.id), ("0", None));
}

#[tokio::test]
async fn status_on_an_empty_data_dir_is_empty() {
    let w = world();
    assert_eq!(status_all(&w.ctx).await.expect("status"), Vec::new());
}

#[tokio::test]
async fn status_notices_a_dead_vmm() {
    let w = world();
    w.declare("web", SMALL);
    let (meta, _) = w.live("web", SMALL, true).await;
    assert!(w.fake.kill_vmm(&w.store.guest_paths(meta.id).ch_socket));
    let status = status_of(&w.ctx, "web").await.expect("status");
    assert_eq!((status.state, status.pid), (VmState::Stopped, None));
}

#[tokio::test]
async fn table_is_aligned_and_lists_errors_and_pending_changes() {
    let w = populated().await;
    let all = status_all(&w.ctx).await.expect("status");
    let mut out = Vec::new();
    status::write_table(&mut out, &all).expect("table");
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    let state_col = lines[0].find("STATE").expect("STATE column");
    for line in &lines[1..=all.len()] {
        let state = &line[state_col..];
        assert!(
            state
                .split_whitespace()
                .next()
                .is_some_and(|s| s.parse::<VmState>().is_ok()),
            "{line}"
        );
    }
    assert!(
        text.contains("\ngrown: pending change: memory, vcpus (restart needed)\n"),
        "{text}"
    );
    assert!(
        text.contains("\nlegacy: error: no qemu backend is available on this host\n"),
        "{text}"
    );
}

#[tokio::test]
async fn plan_shows_the_next_step_of_every_instance() {
    let w = populated().await;
    let rows = plan_rows(&w.ctx).await.expect("plan");
    let mut out = Vec::new();
    plan::write_plan(&mut out, &rows).expect("render");
    let text = String::from_utf8(out)
        .expect("utf-8")
        .replace(&w.tmp.path().display().to_string(), "[tmp]");
    insta::assert_snapshot!("plan_output", text);
    let action = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.action.clone())
    };
    assert_eq!(action("fresh").as_deref(), Some("provision"));
    assert_eq!(action("web").as_deref(), Some("nothing to do"));
    assert_eq!(action("grown").as_deref(), Some("power off"));
    assert_eq!(action("orphan").as_deref(), Some("remove instance data"));
}

#[tokio::test]
async fn plan_of_a_created_vm_is_to_boot_it() {
    let w = world();
    w.declare("web", SMALL);
    w.live("web", SMALL, false).await;
    let rows = plan_rows(&w.ctx).await.expect("plan");
    let mut out = Vec::new();
    plan::write_plan(&mut out, &rows).expect("render");
    assert_eq!(
        String::from_utf8(out).expect("utf-8"),
        "web  Created -> running: boot\n"
    );
}

#[tokio::test]
async fn wait_returns_once_the_state_is_reached() {
    let w = world();
    w.declare("web", SMALL);
    let (_, handle) = w.live("web", SMALL, false).await;
    let fake = w.fake.clone();
    let booter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fake.boot(&handle).await
    });
    let status = wait_for(
        &w.ctx,
        "web",
        VmState::Running,
        Duration::from_secs(10),
        Duration::from_millis(20),
    )
    .await
    .expect("reaches Running");
    assert_eq!(status.state, VmState::Running);
    booter.await.expect("join").expect("boot");
}

#[tokio::test]
async fn wait_times_out_naming_the_last_state_and_error() {
    let w = populated().await;
    let err = wait_for(
        &w.ctx,
        "legacy",
        VmState::Running,
        Duration::from_millis(250),
        Duration::from_millis(50),
    )
    .await
    .expect_err("never runs");
    assert_eq!(
        err.to_string(),
        "legacy did not become Running within 250ms: it is Stopped, \
         last error: no qemu backend is available on this host"
    );
    assert!(matches!(
        wait_for(
            &w.ctx,
            "nope",
            VmState::Running,
            Duration::from_secs(1),
            Duration::from_millis(50)
        )
        .await,
        Err(CliError::NotFound { .. })
    ));
}

#[tokio::test]
async fn wait_for_a_removed_instance_to_stop() {
    let w = world();
    w.declare("gone", SMALL);
    let (meta, _) = w.live("gone", SMALL, true).await;
    let waiter = wait_for(
        &w.ctx,
        "gone",
        VmState::Stopped,
        Duration::from_secs(5),
        Duration::from_millis(20),
    );
    // Resolved while it exists; once its record is gone it reads as Stopped.
    let remover = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        w.undeclare("gone");
        w.store.delete_guest(meta.id).expect("delete");
    };
    let (waited, ()) = tokio::join!(waiter, remover);
    let status = waited.expect("stopped");
    // The record is gone. The declaration was read just before it (a look
    // reads the file, then the store): under load the remover can run in
    // between, so the file may still have said running.
    assert_eq!(status.id, None, "{status:?}");
    assert!(matches!(status.desired_state.as_str(), "absent" | "running"), "{status:?}");
}

#[test]
fn wait_state_names_are_case_insensitive() {
    let cli = Cli::try_parse_from([
        "hypeman",
        "wait",
        "web",
        "--state",
        "standby",
        "--timeout",
        "90s",
    ])
    .expect("parses");
    match cli.command {
        Command::Wait { state, timeout, .. } => {
            assert_eq!(
                (state, timeout),
                (VmState::Standby, Duration::from_secs(90))
            );
        }
        other => panic!("parsed as {other:?}"),
    }
    let err = Cli::try_parse_from(["hypeman", "wait", "web", "--state", "asleep"])
        .expect_err("bad state");
    assert!(
        err.to_string().contains("\"asleep\" is not a state"),
        "{err}"
    );
}

#[test]
fn global_options_are_accepted_after_the_subcommand() {
    let cli = Cli::try_parse_from(["hypeman", "plan", "--config-dir", "/x", "--data-dir", "/y"])
        .expect("parses");
    assert_eq!(cli.global.config_dir, PathBuf::from("/x"));
    assert_eq!(cli.global.data_dir, Some(PathBuf::from("/y")));
}

#[tokio::test]
async fn logs_prints_the_tail_then_follows() {
    let w = world();
    w.declare("web", SMALL);
    let meta = w.guest("web", CH);
    let app_log = w.store.guest_paths(meta.id).app_log;
    std::fs::write(&app_log, b"one\r\ntwo\r\nthree\r\n").expect("write log");

    let mut out = Vec::new();
    logs::logs(
        &w.ctx,
        "web",
        opts(LogSource::App, 2, false),
        &mut out,
        &mut io::sink(),
        std::future::pending(),
    )
    .await
    .expect("logs");
    assert_eq!(out, b"two\nthree\n");

    let mut out = Vec::new();
    let appender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&app_log)
            .expect("open");
        // A line ending written in two halves, and one as a plain \n.
        f.write_all(b"four\r").expect("append");
        f.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(400));
        f.write_all(b"\nfive\n").expect("append");
    });
    let stop = tokio::time::sleep(Duration::from_millis(1200));
    logs::logs(&w.ctx, "web", opts(LogSource::App, 1, true), &mut out, &mut io::sink(), stop)
        .await
        .expect("follow");
    appender.await.expect("join");
    assert_eq!(String::from_utf8_lossy(&out), "three\nfour\nfive\n");
}

/// `hypeman logs web | grep 'x$'` works: the serial console's \r\n is
/// printed as \n, wherever the chunks of a follow split it; other bytes of
/// the app log, and every byte of the other logs, are kept.
#[test]
fn app_log_line_endings_are_plain_newlines() {
    let run = |which: LogSource, chunks: &[&[u8]]| {
        let mut endings = logs::LineEndings::new(which);
        chunks.iter().flat_map(|c| endings.filter(c)).collect::<Vec<u8>>()
    };
    assert_eq!(run(LogSource::App, &[b"a\r\nb\r\n"]), b"a\nb\n");
    assert_eq!(run(LogSource::App, &[b"a\r", b"\nb\r", b"\n"]), b"a\nb\n");
    // A lone \r at the end is the first half of a line ending: dropped.
    assert_eq!(run(LogSource::App, &[b"ready\r"]), b"ready");
    // A progress bar's \r, and a \r that a later chunk shows was lone.
    assert_eq!(run(LogSource::App, &[b"10%\r20%\r\n"]), b"10%\r20%\n");
    assert_eq!(run(LogSource::App, &[b"10%\r", b"20%\n"]), b"10%\r20%\n");
    assert_eq!(run(LogSource::App, &[b"\r", b"\r", b"\n"]), b"\r\n");
    assert_eq!(run(LogSource::App, &[b"\xff\r\n\x00"]), b"\xff\n\x00");
    assert_eq!(run(LogSource::Vmm, &[b"a\r\n", b"b\r"]), b"a\r\nb\r");
    assert_eq!(run(LogSource::Hypeman, &[b"a\r\n"]), b"a\r\n");
}

fn opts(which: LogSource, tail: usize, follow: bool) -> logs::LogsOptions {
    logs::LogsOptions { which, tail, follow }
}

/// A follow outlives the guest: deleted, it says so on stderr and waits;
/// created again under the same name, it follows the new guest's log.
#[tokio::test]
async fn logs_follow_goes_on_to_a_guest_created_again_under_the_name() {
    let w = world();
    w.declare("web", SMALL);
    let first = w.guest("web", CH);
    std::fs::write(w.store.guest_paths(first.id).app_log, b"old 1\n").expect("write log");
    let store = w.store.clone();
    let recreate = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let paths = store.guest_paths(first.id);
        let mut f = std::fs::OpenOptions::new().append(true).open(&paths.app_log).expect("open");
        f.write_all(b"old 2\n").expect("append");
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::remove_dir_all(&paths.dir).expect("delete the guest");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let second = w.guest("web", CH);
        std::fs::write(w.store.guest_paths(second.id).app_log, b"new 1\n").expect("write log");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        second.id
    };
    let (mut out, mut notes) = (Vec::new(), Vec::new());
    let (result, second) = tokio::join!(
        logs::logs(&w.ctx, "web", opts(LogSource::App, 10, true), &mut out, &mut notes, recreate_stop()),
        recreate
    );
    result.expect("follow");
    assert_eq!(String::from_utf8_lossy(&out), "old 1\nold 2\nnew 1\n");
    assert_eq!(
        String::from_utf8_lossy(&notes),
        format!(
            "hypeman: web (ID {}) was deleted, and its logs with it; waiting for it to be created again\n\
             hypeman: web was created again (ID {second}); following its app log\n",
            first.id
        )
    );
}

/// Ends the follow of the test above once everything has happened.
async fn recreate_stop() {
    tokio::time::sleep(Duration::from_millis(3000)).await;
}

#[tokio::test]
async fn logs_of_a_guest_that_never_wrote_are_empty_and_of_an_uncreated_one_fail() {
    let w = world();
    w.declare("web", SMALL);
    let mut out = Vec::new();
    assert!(matches!(
        logs::logs(
            &w.ctx,
            "web",
            opts(LogSource::Vmm, 10, false),
            &mut out,
            &mut io::sink(),
            std::future::pending()
        )
        .await,
        Err(CliError::NotCreated { .. })
    ));
    w.guest("web", CH);
    logs::logs(
        &w.ctx,
        "web",
        opts(LogSource::Vmm, 10, false),
        &mut out,
        &mut io::sink(),
        std::future::pending(),
    )
    .await
    .expect("logs");
    assert!(out.is_empty());
}

#[test]
fn validate_reports_settings_and_declaration_problems_together() {
    let w = world();
    std::fs::write(
        w.config_dir.join("hypeman.toml"),
        "default_hypervisor = \"kvmtool\"\n",
    )
    .expect("settings");
    w.declare("broken", BROKEN);
    w.declare("fine", SMALL);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = validate(&w.config_dir, None, &mut out, &mut err).expect("validate");
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.is_empty());
    let err = String::from_utf8(err).expect("utf-8");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    let prefix = w.config_dir.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{prefix}/hypeman.toml:1:")),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{prefix}/instances/broken.toml:2:1: ")),
        "{err}"
    );
}

#[test]
fn help_texts() {
    let mut cmd = Cli::command();
    cmd.build();
    insta::assert_snapshot!("help", cmd.render_help().to_string());
    insta::assert_snapshot!("help_long", cmd.render_long_help().to_string());
    for sub in cmd.get_subcommands_mut() {
        let name = sub.get_name().to_string();
        if name == "help" {
            continue;
        }
        // What `hypeman NAME --help` prints.
        insta::assert_snapshot!(format!("help_{name}"), sub.render_long_help().to_string());
        for subsub in sub.get_subcommands_mut() {
            let inner = subsub.get_name().to_string();
            if inner == "help" {
                continue;
            }
            insta::assert_snapshot!(format!("help_{name}_{inner}"), subsub.render_long_help().to_string());
        }
    }
}

#[tokio::test]
async fn looking_beside_a_daemon_disturbs_nothing_in_progress() {
    let w = world();
    w.declare("web", STANDBY);
    let (meta, _) = w.live("web", STANDBY, true).await;
    // The daemon is mid-snapshot: the hypervisor is writing into `.partial`.
    let partial = w.store.begin_snapshot(meta.id).expect("begin snapshot");
    std::fs::write(partial.join("memory"), b"half").expect("write");
    let backends = Backends {
        cloud_hypervisor: Some(Arc::new(w.fake.clone())),
        qemu: None,
    };
    let settings = Arc::new(w.ctx.instances().settings().clone());
    let ctx = Context::open(&w.config_dir, settings, backends).expect("open read-only");
    let all = status_all(&ctx).await.expect("status");
    assert_eq!(all[0].state, VmState::Running);
    plan_rows(&ctx).await.expect("plan");
    assert_eq!(
        std::fs::read(partial.join("memory")).expect("still there"),
        b"half"
    );
}

#[tokio::test]
async fn status_lists_every_unreadable_record_with_its_path_and_problem() {
    let w = world();
    w.declare("web", SMALL);
    let (web, _) = w.live("web", SMALL, true).await;
    let web_record = w.store.guest_paths(web.id).metadata;
    let text = std::fs::read_to_string(&web_record).expect("record");
    // Cut after the name: the row keeps the name, and says what is wrong.
    std::fs::write(&web_record, &text[..text.find("\"created_at\"").expect("created_at")]).expect("truncate");
    let rows = status_all(&w.ctx).await.expect("status");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].name.as_str(), rows[0].state, rows[0].pid), ("web", VmState::Unknown, None));
    let error = rows[0].last_error.clone().expect("the problem");
    assert!(error.contains(&web_record.display().to_string()) && error.contains("not valid JSON"), "{error}");
    assert_eq!(status_of(&w.ctx, "web").await.expect("status web").last_error, Some(error));

    // A record without a readable name: a row of its own, and a declared
    // instance without a guest says it may be that record's.
    let other = w.guest("db", CH);
    let other_record = w.store.guest_paths(other.id).metadata;
    std::fs::write(&other_record, b"{\"ver").expect("truncate");
    w.declare("api", SMALL);
    let rows = status_all(&w.ctx).await.expect("status");
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["api", "web", status::NAMELESS], "{rows:?}");
    let nameless = &rows[2];
    assert_eq!(nameless.id.as_deref(), Some(other.id.to_string().as_str()));
    assert_eq!(nameless.state, VmState::Unknown);
    assert!(nameless.last_error.as_deref().is_some_and(|e| e.contains(&other_record.display().to_string())), "{nameless:?}");
    let api = rows[0].last_error.as_deref().unwrap_or_default();
    assert!(api.contains("may be the record of \"api\"") && api.contains(&other_record.display().to_string()), "{api}");
    let mut table = Vec::new();
    status::write_table(&mut table, &rows).expect("table");
    let table = String::from_utf8(table).expect("utf-8");
    assert!(table.contains(&format!("{}: error: ", status::NAMELESS)), "{table}");
}

/// A volume's source is shown as the VM gets it, with its symlinks
/// resolved, beside the path the declaration wrote: in the table's notes
/// and in `--json`.
#[tokio::test]
async fn status_shows_each_volume_with_its_resolved_source() {
    let w = world();
    let real = w.tmp.path().join("disks/data.raw");
    std::fs::create_dir_all(real.parent().unwrap()).expect("disks dir");
    std::fs::write(&real, b"disk").expect("disk");
    let link = w.tmp.path().join("data-link.raw");
    std::os::unix::fs::symlink(&real, &link).expect("link");
    w.declare(
        "web",
        &format!(
            "image = \"busybox\"\n[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n[[volumes]]\nsource = \"{}\"\npath = \"/ro\"\nreadonly = true\n",
            link.display(),
            w.tmp.path().join("later.raw").display()
        ),
    );
    let web = status_of(&w.ctx, "web").await.expect("status");
    let real = std::fs::canonicalize(&real).expect("canonical");
    assert_eq!(web.volumes[0].source, real);
    assert_eq!(web.volumes[0].declared, link);
    let mut out = Vec::new();
    status::write_table(&mut out, std::slice::from_ref(&web)).expect("table");
    let text = String::from_utf8(out).expect("utf-8").replace(&w.tmp.path().display().to_string(), "[tmp]");
    let tmp = std::fs::canonicalize(w.tmp.path()).expect("canonical tmp").display().to_string();
    let text = text.replace(&tmp, "[tmp]");
    assert!(text.contains("\nweb: volume /data: [tmp]/disks/data.raw (declared as [tmp]/data-link.raw)\n"), "{text}");
    assert!(text.contains("\nweb: volume /ro: [tmp]/later.raw\n"), "{text}");
    let json = w.printed_json(&web, &[&web]).replace(&tmp, "[tmp]");
    insta::assert_snapshot!("status_json_volumes", json);
}
