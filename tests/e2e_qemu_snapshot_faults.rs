//! Issue 10 under real QEMU (TCG), through the `hypeman daemon` binary: a
//! failed snapshot never costs the guest, a lost guest is reported, and a
//! damaged snapshot is found before a VMM is started on it.
//!
//! The moment a snapshot is being written is made to last: the daemon's
//! `PATH` begins with a `cat` that waits while a gate file exists before it
//! runs the real one (QEMU writes its migration stream through
//! `exec:cat > memory`, run by `/bin/sh` with the daemon's `PATH`). The
//! held `cat` leaves a `hold-cat.held` file (the memory file itself is made
//! by the daemon just before the migration starts), so a test knows the
//! write has begun, and can fill the disk or kill QEMU inside it.
//!
//! Gated like `e2e_qemu` (`HYPEMAN_REAL_VM=1`); the full-disk test needs
//! root for a loop-mounted ext4 data dir, which it unmounts even when it
//! fails.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::daemon::World;

fn gate() -> Option<(PathBuf, PathBuf)> {
    support::real_vm("the snapshot fault tests", &["umoci", "mkfs.erofs", "mkfs.ext4"])
}

/// A world whose QEMU writes snapshots through the gated `cat`; returns
/// it with the gate's path (absent: `cat` runs at once).
fn world(kernel_dir: &Path, init: &Path) -> (World, PathBuf) {
    let mut w = World::qemu(kernel_dir, init);
    let bin = w.tmp.path().join("gated-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let gate = w.tmp.path().join("hold-cat");
    let script = format!(
        "#!/bin/sh\n[ -e '{0}' ] && : > '{0}.held'\nwhile [ -e '{0}' ]; do sleep 0.02; done\nexec /bin/cat \"$@\"\n",
        gate.display()
    );
    std::fs::write(bin.join("cat"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("cat"), std::fs::Permissions::from_mode(0o755)).unwrap();
    w.path_first = Some(bin);
    // The gate holds `exec:cat`, the snapshot writer of a root VMM; a
    // sandboxed one (the default) streams into a descriptor the daemon
    // opened, which nothing on PATH can hold. Its restore failures take
    // the same path as here (`a_snapshot_qemu_refuses…` in root mode;
    // `tests/e2e_vmm_user.rs` for the sandboxed standby and restore).
    let settings = w.config.join("hypeman.toml");
    let text = std::fs::read_to_string(&settings).unwrap();
    std::fs::write(&settings, format!("{text}[vmm]\nusers = \"root\"\n")).unwrap();
    (w, gate)
}

/// Polls `cond` every 20 ms until it holds, failing with `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_error(status: &Value) -> String {
    status["last_error"].as_str().unwrap_or_default().to_string()
}

fn hypeman_log(w: &World) -> String {
    std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap_or_default()
}

fn partial(w: &World) -> PathBuf {
    w.guest_dir().join("snapshots/snapshot-latest.partial")
}

/// The guest still runs: the same QEMU answers `Running` and the counter
/// moves on.
fn assert_keeps_running(w: &World, pid: u64) {
    let status = w.status();
    assert_eq!(status["state"], "Running", "{status}");
    assert_eq!(status["pid"].as_u64(), Some(pid), "the same VMM: {status}");
    let last = w.counters().last().copied().unwrap_or(0);
    w.wait_counter_above(last);
}

/// A small ext4 loop-mounted at a directory, unmounted (and its loop device
/// freed) when dropped, whatever happened.
struct LoopFs {
    mount: PathBuf,
    image: PathBuf,
}

impl LoopFs {
    fn new(root: &Path, mib: u64) -> LoopFs {
        let image = root.join("data.ext4");
        let mount = root.join("data-mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let ok = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ok(Command::new("truncate").arg("-s").arg(format!("{mib}M")).arg(&image));
        // No blocks reserved for root: the daemon runs as root, and the
        // test's "full" must be full for it too.
        ok(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image));
        // `-o loop` sets up a loop device that the unmount frees.
        ok(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount));
        LoopFs { mount, image }
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mount).unwrap();
        st.blocks_available() * st.fragment_size()
    }

    /// Takes all but `leave` bytes of the free space with one file.
    fn fill(&self, leave: u64) -> PathBuf {
        let filler = self.mount.join("filler");
        let take = self.free().saturating_sub(leave) + std::fs::metadata(&filler).map_or(0, |m| m.len());
        let out = Command::new("fallocate").arg("-l").arg(take.to_string()).arg(&filler).output().unwrap();
        assert!(out.status.success(), "fallocate: {}", String::from_utf8_lossy(&out.stderr));
        filler
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.mount).status().is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds it: detach it now, free it when let go.
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A full data dir during standby, both ways: refused before the pause
/// when the snapshot cannot fit, and a disk that fills while the snapshot
/// is written. Either way the guest keeps running in the same QEMU, no
/// partial file is left, status names the lack of space, and the standby
/// goes on by itself once space is freed.
#[test]
fn a_full_data_dir_during_standby_costs_the_guest_nothing() {
    let Some((kernel_dir, init)) = gate() else { return };
    if !support::gate::capability("root (to loop-mount a small ext4 data dir)", nix::unistd::geteuid().is_root())
        || !support::gate::tools(&["mount", "umount", "fallocate", "truncate"])
    {
        return;
    }
    // Declared before `w`, so dropped after it: `w`'s drop ends the daemon
    // and every QEMU, and only then can the data dir be unmounted.
    let fs_root = support::tempdir();
    let fs = LoopFs::new(fs_root.path(), 420);
    let (mut w, cat_gate) = world(&kernel_dir, &init);
    w.data = fs.mount.clone();
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(3);
    let pid = w.status()["pid"].as_u64().expect("a live VMM");

    // 1. It cannot fit: refused before anything is paused or written.
    let filler = fs.fill(64 << 20);
    w.declare("standby");
    wait_until(60, "the lack of space in status", || last_error(&w.status()).contains("No space left on device"));
    let error = last_error(&w.status());
    eprintln!("refused before the pause: {error}");
    assert!(error.starts_with("pause failed: No space left on device for the snapshot in "), "{error}");
    assert!(error.contains("the snapshot needs up to") && error.contains("are available"), "{error}");
    assert_keeps_running(&w, pid);
    assert!(!hypeman_log(&w).contains("pause (from Running)\n"), "the guest was never paused");
    assert!(!partial(&w).exists());
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    w.wait("Standby");
    eprintln!("space freed → standby by itself in {:.2}s", t.elapsed().as_secs_f64());
    w.declare("running");
    w.wait("Running");
    let pid = w.status()["pid"].as_u64().expect("a live VMM");
    wait_until(30, "the restored guest's stale snapshot to go", || {
        !w.guest_dir().join("snapshots/snapshot-latest").exists()
    });

    // 2. The disk fills while the snapshot is written.
    std::fs::write(&cat_gate, "").unwrap();
    w.declare("standby");
    let held = cat_gate.with_extension("held");
    wait_until(60, "the migration stream to begin", || held.exists());
    std::fs::remove_file(&held).unwrap();
    // Not quite 0: the filler's own extent blocks need room.
    let filler = fs.fill(1 << 20);
    std::fs::remove_file(&cat_gate).unwrap();
    // From the log: `last_error` moves on to the first recheck (200 ms
    // later) and may already say that when it is read.
    let mid_write = "snapshot to standby failed: No space left on device for the snapshot in ";
    wait_until(60, "the full disk in hypeman.log", || hypeman_log(&w).contains(mid_write));
    let log = hypeman_log(&w);
    let error = log.lines().find(|l| l.contains(mid_write)).unwrap().to_string();
    eprintln!("disk filled mid-write: {error}");
    assert!(last_error(&w.status()).contains("No space left on device"), "{}", w.status());
    assert!(error.contains("were written before the disk filled"), "{error}");
    assert!(!partial(&w).exists(), "the partial snapshot is removed");
    assert_keeps_running(&w, pid);
    // The disk stays full: rechecks only, the guest is not paused again.
    std::thread::sleep(Duration::from_secs(2));
    assert_keeps_running(&w, pid);
    let log = hypeman_log(&w);
    let since = &log[log.rfind("snapshot to standby (from Paused)").expect("the snapshot began")..];
    assert!(!since.contains("pause (from Running)"), "paused again while the disk was full:\n{since}");
    assert!(since.contains("the guest was resumed and keeps running"), "{since}");
    std::fs::remove_file(&filler).unwrap();
    w.wait("Standby");
    assert!(!w.vmm_running());
    w.stop_daemon();
}

/// QEMU killed while its snapshot is written: status and `hypeman.log` say
/// the guest's running state was lost, and no fresh VM is booted and saved
/// in its place. Then a snapshot damaged on disk: found before any QEMU is
/// started on it, kept, and named in status; declaring stopped discards it.
#[test]
fn a_lost_guest_is_reported_and_a_damaged_snapshot_is_not_restored() {
    let Some((kernel_dir, init)) = gate() else { return };
    let (mut w, cat_gate) = world(&kernel_dir, &init);
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(3);
    let pid = w.status()["pid"].as_u64().expect("a live VMM");

    std::fs::write(&cat_gate, "").unwrap();
    w.declare("standby");
    let held = cat_gate.with_extension("held");
    wait_until(60, "the migration stream to begin", || held.exists());
    std::fs::remove_file(&held).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::fs::remove_file(&cat_gate).unwrap();
    wait_until(60, "the loss in status", || last_error(&w.status()).contains("running state was lost"));
    let error = last_error(&w.status());
    eprintln!("QEMU killed mid-snapshot: {error}");
    assert!(error.contains(&format!("its VMM (pid {pid}) died while its snapshot was written")), "{error}");
    // Long enough for the old behaviour's cold boot (2–4 s) and standby.
    std::thread::sleep(Duration::from_secs(6));
    let status = w.status();
    assert_eq!(status["state"], "Stopped", "no standby of a fresh boot: {status}");
    assert!(last_error(&status).contains("running state was lost"), "{status}");
    assert!(!w.vmm_running());
    assert!(!partial(&w).exists());
    assert!(!w.guest_dir().join("snapshots/snapshot-latest").exists());
    let log = hypeman_log(&w);
    assert_eq!(log.matches("create VM (from").count(), 1, "no VM booted in its place:\n{log}");
    assert!(log.contains("the guest's running state was lost"), "{log}");

    // Declared running: booted anew; then a standby whose memory file is
    // damaged afterwards.
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(1);
    w.declare("standby");
    w.wait("Standby");
    let snap = w.guest_dir().join("snapshots/snapshot-latest");
    let memory = snap.join("memory");
    let len = std::fs::metadata(&memory).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&memory).unwrap().set_len(len - 4096).unwrap();
    w.declare("running");
    wait_until(60, "the damage in status", || last_error(&w.status()).contains("the snapshot is damaged"));
    let error = last_error(&w.status());
    eprintln!("damaged snapshot: {error}");
    assert!(error.contains(&format!("{}: it is {} bytes, {len} were written", memory.display(), len - 4096)), "{error}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.status()["state"], "Standby");
    assert!(!w.vmm_running(), "no QEMU was started on it");
    assert!(memory.exists(), "kept for the user");

    w.declare("stopped");
    w.wait("Stopped");
    assert!(!snap.exists(), "declaring stopped discards it");
    w.stop_daemon();
}

/// A snapshot that passes the marker's checks but that QEMU cannot load
/// (the stream's header overwritten: the memory file's size is what the
/// marker checks of it): QEMU exits, the restore is not tried again in a
/// loop, status says the running state is not back, the snapshot is kept;
/// declaring stopped discards it and says what was lost.
#[test]
fn a_snapshot_qemu_refuses_is_kept_and_not_restored_in_a_loop() {
    let Some((kernel_dir, init)) = gate() else { return };
    let (mut w, _) = world(&kernel_dir, &init);
    w.start();
    // Booted through to the app first: a guest snapshotted the moment it
    // starts has a memory file small enough for the marker's checksum,
    // which would find the damage before QEMU could.
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(2);
    w.declare("standby");
    w.wait("Standby");
    let snap = w.guest_dir().join("snapshots/snapshot-latest");
    let memory = snap.join("memory");
    let len = std::fs::metadata(&memory).unwrap().len();
    assert!(len > 4 << 20, "a memory file of {len} bytes is checksummed whole");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&memory).unwrap();
        f.write_all(&[0u8; 8]).unwrap();
    }
    let vmm_log = w.guest_dir().join("logs/vmm.log");
    let refusals = || std::fs::read_to_string(&vmm_log).unwrap_or_default().matches("load of migration failed").count();
    w.declare("running");
    wait_until(60, "the refusal in status", || last_error(&w.status()).contains("could not be brought back"));
    let error = last_error(&w.status());
    eprintln!("refused snapshot: {error}");
    assert!(error.contains("QEMU exited while loading it"), "{error}");
    assert!(error.contains("load of migration failed"), "QEMU's own words: {error}");
    // Long enough for several tries under the old transient backoff.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(refusals(), 1, "restored once, not in a loop");
    let status = w.status();
    assert_eq!(status["state"], "Standby", "{status}");
    assert!(!w.vmm_running());
    assert!(memory.exists(), "kept for the user");

    w.declare("stopped");
    w.wait("Stopped");
    assert!(!snap.exists(), "declaring stopped discards it");
    wait_until(30, "the discard in status", || last_error(&w.status()).contains("it was discarded"));
    let status = w.status();
    let error = last_error(&status);
    assert!(error.contains("what the guest had not written to its disks is lost"), "{status}");
    assert!(error.contains("the standby snapshot cannot be restored"), "{status}");
    assert!(refusals() <= 2, "at most the one try of the way to stopped");
    w.stop_daemon();
}

/// The daemon and its QEMU both killed while the snapshot is written: the
/// daemon that starts next finds only a VMM gone without an exit line, and
/// does not boot a fresh guest to save as the user's standby.
#[test]
fn a_daemon_killed_with_its_qemu_mid_snapshot_boots_nothing_in_its_place() {
    let Some((kernel_dir, init)) = gate() else { return };
    let (mut w, cat_gate) = world(&kernel_dir, &init);
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(2);
    let pid = w.status()["pid"].as_u64().expect("a live VMM");
    std::fs::write(&cat_gate, "").unwrap();
    w.declare("standby");
    let memory = partial(&w).join("memory");
    wait_until(60, "the migration stream to begin", || memory.exists());
    w.kill_daemon();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::fs::remove_file(&cat_gate).unwrap();
    wait_until(10, "QEMU to go", || !w.vmm_running());

    w.start();
    wait_until(60, "the loss in status", || last_error(&w.status()).contains("running state went with it"));
    std::thread::sleep(Duration::from_secs(6));
    let status = w.status();
    eprintln!("after the restart: {}", last_error(&status));
    assert_eq!(status["state"], "Stopped", "no standby of a fresh boot: {status}");
    assert!(!w.vmm_running());
    assert_eq!(hypeman_log(&w).matches("create VM (from").count(), 1, "no VM booted in its place");

    // It is Stopped already, so `wait` returns at once: the daemon must
    // have answered the loss (its ForgetExit step) before the next edit,
    // or it never sees the stopped declaration at all.
    w.declare("stopped");
    wait_until(30, "the loss answered", || hypeman_log(&w).contains("forget the last exit"));
    w.declare("standby");
    w.wait("Standby");
    assert_eq!(hypeman_log(&w).matches("create VM (from").count(), 2, "booted anew once asked");
    w.stop_daemon();
}
