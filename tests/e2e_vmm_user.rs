//! A real QEMU guest whose VMM runs as its own uid under QEMU's seccomp
//! sandbox (`[vmm] users = "per-instance"`, issue 11): its
//! `/proc/<pid>/status` shows the recorded non-root uid and `Seccomp: 2`
//! after a cold boot, after standby and restore, and after the daemon was
//! killed and restarted (adoption), and the guest's counter goes on.

mod support;

use std::os::unix::fs::PermissionsExt;
use support::daemon::World;

const UID_FIRST: u32 = 70500;

/// `Uid:` (real, effective, saved, fs), `Groups:` and `Seccomp:` of `pid`.
fn identity(pid: u64) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the VMM's status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (field("Uid:"), field("Groups:"), field("Seccomp:"))
}

fn assert_unprivileged(w: &World, when: &str) -> u64 {
    let pid = w.status()["pid"].as_u64().unwrap_or_else(|| panic!("{when}: a live VMM"));
    let (uid, groups, seccomp) = identity(pid);
    eprintln!("{when}: pid {pid} Uid: {uid} Groups: {groups} Seccomp: {seccomp}");
    let want = format!("{UID_FIRST} {UID_FIRST} {UID_FIRST} {UID_FIRST}");
    assert_eq!(uid, want, "{when}: the VMM runs as the guest's uid");
    let groups: Vec<&str> = groups.split(' ').collect();
    assert!(groups.contains(&"69000") && !groups.contains(&"0"), "{when}: the shared VMM group, never root's: {groups:?}");
    assert_eq!(seccomp, "2", "{when}: QEMU's seccomp filter is on");
    pid
}

#[test]
fn the_vmm_runs_unprivileged_and_sandboxed_through_boot_standby_restore_and_adoption() {
    let Some((kernel_dir, init)) = support::real_vm("the VMM user test", &["umoci", "mkfs.erofs", "mkfs.ext4"]) else {
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: spawning a VMM as another uid needs root");
        return;
    }
    let users = std::env::var("MEASURE_USERS").unwrap_or("per-instance".into());
    let extra = format!("[vmm]\nusers = \"{users}\"\nuid_range = \"{UID_FIRST}-{}\"\ngroup = 69000\n", UID_FIRST + 9);
    let settings = support::tcg_settings(&kernel_dir, &init, &extra);
    let mut w = World::new("qmp.sock", |tmp| (settings, support::busybox_image(tmp, &["sh", "sleep", "echo", "cat"])));
    // The data dir's parents must be searchable by the VMM, as /var/lib is.
    std::fs::set_permissions(w.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(2);
    let booted = assert_unprivileged(&w, "boot");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.guest_dir().join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["vmm_uid"].as_u64(), Some(UID_FIRST as u64), "recorded in the metadata");

    let t = std::time::Instant::now();
    w.declare("standby");
    w.wait("Standby");
    eprintln!("declared standby → Standby: {} ms", t.elapsed().as_millis());
    assert!(!w.vmm_running(), "standby leaves no VMM");
    let before = w.counters().last().copied().unwrap();
    let t = std::time::Instant::now();
    w.declare("running");
    w.wait("Running");
    eprintln!("declared running → Running (restore): {} ms", t.elapsed().as_millis());
    let restored = assert_unprivileged(&w, "restore");
    assert_ne!(restored, booted, "a new VMM");
    w.wait_counter_above(before);
    let first_after = w
        .counters()
        .into_iter()
        .skip_while(|c| *c != before)
        .nth(1)
        .expect("a counter line after the snapshot's");
    assert_eq!(first_after, before + 1, "the guest went on from where it stood by, not from a fresh boot");

    w.kill_daemon();
    w.start();
    w.wait("Running");
    let adopted = assert_unprivileged(&w, "adoption");
    assert_eq!(adopted, restored, "the restarted daemon adopted the VMM");
    let now = w.counters().last().copied().unwrap();
    w.wait_counter_above(now);

    w.declare("stopped");
    w.wait("Stopped");
}
