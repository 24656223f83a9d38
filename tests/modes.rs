//! Issue 11, items 1 and 6, through the real `hypeman daemon` binary started
//! under `umask 000`: every path under the data dir is private (no bits for
//! others; group bits only where the group is a VMM's: the shared VMM group
//! or a guest's own VMM gid, as VMMs run as their own users by default)
//! through boot, standby (the snapshot written) and restore; a
//! user without privileges can neither read the snapshot nor connect to a
//! control socket; and the work a killed process left in the caches is swept
//! at the next start even when its pid lingers as a zombie or was reused,
//! while a live process's is kept.
//!
//! The fake Cloud Hypervisor test runs everywhere; the QEMU one is gated
//! like `e2e_qemu` (`HYPEMAN_REAL_VM=1`) and adds QEMU's own files: the
//! migration stream written into the descriptor the daemon opened, the QMP
//! and agent sockets, the serial log.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::daemon::World;

/// The loosest umask a user can start the daemon under. Process-wide, and
/// every test here wants it: what the tests create themselves is then as
/// open as it gets, and only the daemon's own modes can make its files
/// private.
fn loosest_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
}

/// The default VMM groups (`[vmm]`): the shared one, and each VMM's own
/// gid (its uid). A path may be open to these and to nobody else: that is
/// how a sandboxed VMM reaches its own guest's files (hypervisor/handover.rs).
fn vmm_group(gid: u32) -> bool {
    gid == 69999 || (70000..=70999).contains(&gid)
}

/// Every path under `root` (itself included) that others, or a group other
/// than a VMM's, can reach, with its mode and group. Symlinks are listed
/// too: nothing of the daemon's should be one.
fn exposed(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue }; // removed meanwhile
        let mode = meta.permissions().mode();
        let group_open = mode & 0o070 != 0 && !vmm_group(meta.gid());
        if meta.file_type().is_symlink() || mode & 0o007 != 0 || group_open {
            out.push(format!("{:04o} gid {} {}", mode & 0o7777, meta.gid(), path.display()));
        }
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    out.sort();
    out
}

/// Asserts that nothing under the data dir is exposed; returns how many
/// paths were checked, so a walk of an empty tree cannot pass for one.
fn assert_private(w: &World, when: &str) -> usize {
    let bad = exposed(&w.data);
    assert!(bad.is_empty(), "{when}: {} path(s) open to group or others:\n{}", bad.len(), bad.join("\n"));
    let count = walk_count(&w.data);
    eprintln!("{when}: {count} paths under the data dir, all private");
    count
}

fn walk_count(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        n += 1;
        if let Ok(entries) = std::fs::read_dir(&path) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    n
}

/// A local user without privileges, made if missing. `None` (a skip, or a
/// failure when the run must not skip) without `useradd`/`runuser`/`python3`.
fn unprivileged_user() -> Option<&'static str> {
    const USER: &str = "hypeman-probe";
    if !support::gate::tools(&["useradd", "runuser", "python3"]) {
        return None;
    }
    let known = Command::new("id").arg("-u").arg(USER).output().is_ok_and(|o| o.status.success());
    if !known {
        // Another test binary may make it at the same moment.
        let out = Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER]).output().unwrap();
        let exists_now = Command::new("id").arg("-u").arg(USER).output().is_ok_and(|o| o.status.success());
        assert!(exists_now, "useradd {USER}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Some(USER)
}

/// What `user` gets trying `what` (`read` a file or `connect` to a unix
/// socket): `Ok` or the error text, from a python3 one-liner run as `user`.
fn attempt(user: &str, what: &str, path: &Path) -> Result<(), String> {
    let script = match what {
        "read" => "import sys; open(sys.argv[1], 'rb').read(1)",
        "connect" => "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
        other => panic!("unknown attempt {other}"),
    };
    let out = Command::new("runuser").args(["-u", user, "--", "python3", "-c", script]).arg(path).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_string())
    }
}

fn assert_denied(user: &str, what: &str, path: &Path) {
    assert!(path.exists(), "{} is not there to try", path.display());
    match attempt(user, what, path) {
        Ok(()) => panic!("{user} could {what} {}", path.display()),
        Err(e) => assert!(e.contains("PermissionError"), "{user} {what} {}: {e}", path.display()),
    }
}

/// The probe itself works: as `user`, a world-readable file and a socket
/// anyone may connect to, in the same temp dir as the data dir, are
/// reachable. Without this a broken probe (or a temp dir `user` cannot
/// enter) would pass every denial below.
fn probe_reaches_what_is_open(user: &str, tmp: &Path) -> std::os::unix::net::UnixListener {
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = tmp.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::write(open.join("readable"), b"x").unwrap();
    let listener = std::os::unix::net::UnixListener::bind(open.join("probe.sock")).unwrap();
    attempt(user, "read", &open.join("readable")).expect("the probe reads a world-readable file");
    attempt(user, "connect", &open.join("probe.sock")).expect("the probe connects to an open socket");
    listener
}

/// A data dir the user made by hand as loosely as possible: the daemon
/// tightens it at start and says so.
fn loose_data_dir(w: &World) {
    std::fs::create_dir(&w.data).unwrap();
    std::fs::set_permissions(&w.data, std::fs::Permissions::from_mode(0o777)).unwrap();
}

fn assert_tightened_with_a_warning(w: &World) {
    let t0 = Instant::now();
    while !w.daemon_log_text().contains("hypeman daemon ready") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the daemon never became ready:\n{}", w.daemon_log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.daemon_log_text();
    let warning = log.lines().find(|l| l.contains("the data directory was open to other users")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    // Searchable by the VMMs' shared group only: their way to their own
    // guest's directory (VMMs run as their own users by default).
    assert!(warning.contains("old_mode=0777") && warning.contains("new_mode=0710"), "{warning}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&w.data).unwrap();
    assert_eq!((meta.permissions().mode() & 0o7777, meta.gid()), (0o710, 69999));
}

/// Boot, standby, restore, each followed by the walk; the snapshot's files
/// and the live control sockets refused to `user`. `sockets` are the file
/// names of the VMM's sockets in the guest directory.
fn boot_standby_restore(w: &mut World, user: &str, sockets: &[&str]) {
    loose_data_dir(w);
    w.start();
    assert_tightened_with_a_warning(w);

    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(2);
    let guest = w.guest_dir();
    for name in ["metadata.json", "overlay.raw", "config.erofs", "logs/app.log", "logs/vmm.log", "logs/hypeman.log"] {
        assert!(guest.join(name).exists(), "{name} was made");
    }
    let booted = assert_private(w, "after boot");
    for socket in sockets {
        assert_denied(user, "connect", &guest.join(socket));
    }
    // The daemon's API: root's alone.
    assert_denied(user, "connect", &w.data.join("hypeman.sock"));
    for name in ["metadata.json", "config.erofs", "logs/app.log"] {
        assert_denied(user, "read", &guest.join(name));
    }

    w.declare("standby");
    w.wait("Standby");
    let snapshot = guest.join("snapshots/snapshot-latest");
    assert!(snapshot.join("snapshot.json").exists(), "a complete snapshot");
    assert!(assert_private(w, "after standby") > booted, "the snapshot's files were walked too");
    for entry in std::fs::read_dir(&snapshot).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            assert_denied(user, "read", &entry.path());
        }
    }

    w.declare("running");
    w.wait("Running");
    assert_private(w, "after restore");
    for socket in sockets {
        assert_denied(user, "connect", &guest.join(socket));
    }
    w.declare("stopped");
    w.wait("Stopped");
    assert_private(w, "after stop");
    w.stop_daemon();
}

/// The daemon with the fake Cloud Hypervisor as its VMM: the files of the
/// daemon's own making, and what a VMM it spawned writes under its umask.
#[test]
fn under_umask_000_everything_the_daemon_and_its_vmm_make_is_private() {
    loosest_umask();
    if !support::gate::tools(&["umoci", "mkfs.erofs", "mkfs.ext4"]) {
        return;
    }
    let Some(user) = unprivileged_user() else { return };
    let mut w = World::new("ch.sock", |tmp| {
        let settings = support::fake_ch::daemon_settings(tmp, &[]);
        (settings, support::busybox_image(tmp, &["sh"]))
    });
    w.patience = Duration::from_secs(60);
    let _open = probe_reaches_what_is_open(user, w.tmp.path());
    boot_standby_restore(&mut w, user, &["ch.sock"]);
}

/// Real QEMU: its QMP and agent sockets, the serial log, the migration
/// stream it writes into the descriptor it is handed.
#[test]
fn under_umask_000_qemu_guests_files_and_sockets_are_private() {
    loosest_umask();
    let Some((kernel_dir, init)) = support::real_vm("the QEMU modes test", &["umoci", "mkfs.erofs", "mkfs.ext4"]) else {
        return;
    };
    let Some(user) = unprivileged_user() else { return };
    let mut w = World::qemu(&kernel_dir, &init);
    let _open = probe_reaches_what_is_open(user, w.tmp.path());
    boot_standby_restore(&mut w, user, &["qmp.sock", "agent.sock"]);
}

/// A child that has exited and not been reaped: what a killed daemon is
/// while its parent has not waited for it.
struct Zombie(std::process::Child);

impl Zombie {
    fn new() -> Zombie {
        let child = Command::new("true").spawn().unwrap();
        let t0 = Instant::now();
        while stat(child.id()).0 != "Z" {
            assert!(t0.elapsed() < Duration::from_secs(10), "`true` never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        Zombie(child)
    }
}

impl Drop for Zombie {
    fn drop(&mut self) {
        let _ = self.0.wait();
    }
}

/// Fields 3 and 22 of `/proc/<pid>/stat`: the state and the start time.
fn stat(pid: u32) -> (String, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = text[text.rfind(')').unwrap() + 1..].split_whitespace().collect();
    (fields[0].to_string(), fields[19].parse().unwrap())
}

fn token(pid: u32) -> String {
    format!("{pid}-{}", stat(pid).1)
}

/// Leftovers of a daemon (or `image pull`) killed mid-pull and mid-initrd
/// build, stamped as each would be: by a process that is gone, by a zombie,
/// by a pid reused since (this test's own pid with another start time), by
/// an older release (a bare pid, here a live one). All are removed at the
/// next start; the work of a process that is alive (this test, standing in
/// for a pull running beside the daemon) is kept.
#[test]
fn leftovers_of_dead_processes_are_swept_at_start_and_a_live_ones_kept() {
    loosest_umask();
    let tmp = support::tempdir();
    let init = tmp.path().join("init");
    std::fs::write(&init, b"init").unwrap();
    let (config, data) = (tmp.path().join("etc"), tmp.path().join("data"));
    std::fs::create_dir_all(config.join("instances")).unwrap();
    std::fs::write(config.join("hypeman.toml"), format!("[guest]\ninit = \"{}\"\n", init.display())).unwrap();

    let zombie = Zombie::new();
    let gone = {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let t = token(pid);
        child.wait().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        t
    };
    let me = std::process::id();
    let (zombie_token, live) = (token(zombie.0.id()), token(me));
    let reused = format!("{me}-{}", stat(me).1 + 1);

    let images = data.join("images");
    let refs = images.join("refs");
    let initrds = data.join("system/initrd").join(hypeman::system::initrd_hash(&init, None).unwrap());
    for dir in [&refs, &initrds] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let work = |t: &str, seq: u32| -> PathBuf {
        let dir = images.join(format!(".tmp-{t}-{seq}"));
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        std::fs::write(dir.join("blobs/layer-0"), b"half a layer").unwrap();
        dir
    };
    let file = |dir: &Path, name: String| -> PathBuf {
        std::fs::write(dir.join(&name), b"half").unwrap();
        dir.join(name)
    };
    let stale = [
        work(&gone, 0),
        work(&zombie_token, 1),
        work(&reused, 2),
        work(&me.to_string(), 3),
        file(&refs, format!(".0123.json.{zombie_token}.0.tmp")),
        file(&initrds, format!(".initrd.cpio.{zombie_token}.0.tmp")),
        file(&initrds, format!(".initrd.cpio.{gone}.1.tmp")),
    ];
    let kept = [work(&live, 4), file(&refs, format!(".0123.json.{live}.1.tmp")), file(&initrds, format!(".initrd.cpio.{live}.2.tmp"))];

    let log = tmp.path().join("daemon.log");
    let mut daemon = support::spawn_daemon(support::hypeman(&[], &config, &data), &log);
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("hypeman daemon ready") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the daemon never became ready:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM);
    daemon.wait().unwrap();

    let left: Vec<&PathBuf> = stale.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "not swept: {left:#?}");
    let lost: Vec<&PathBuf> = kept.iter().filter(|p| !p.exists()).collect();
    assert!(lost.is_empty(), "a live process's work was removed: {lost:#?}");
    // The zombie was still there, unreaped, all along.
    assert_eq!(stat(zombie.0.id()).0, "Z");
}
