//! Guest records across hypeman versions, with real QEMU guests (TCG)
//! through the `hypeman daemon` binary: an upgrade from the previous
//! metadata format keeps both a running and a standby guest, and a damaged
//! or newer record never gets a second VMM. Gated like `e2e_qemu`: without
//! `HYPEMAN_REAL_VM=1` it prints why it skipped.
//!
//! The previous format is the one `tests/fixtures/upgrade/*-v2.json` hold,
//! written by the previous release's own binary
//! (`scripts/gen-upgrade-fixtures.sh`).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::daemon::World;

fn gate() -> Option<(PathBuf, PathBuf)> {
    support::real_vm("the upgrade end-to-end test", &["umoci", "mkfs.erofs", "mkfs.ext4"])
}

fn world(kernel_dir: &Path, init: &Path) -> World {
    World::qemu(kernel_dir, init)
}

/// The live processes whose command line names `dir` (a guest directory):
/// its VMMs.
fn vmms_of(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

fn hypeman_log(w: &World) -> String {
    std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap_or_default()
}

/// Waits until the daemon's log says `needle` at least `times` times.
fn wait_for_daemon_log(w: &World, needle: &str, times: usize) {
    let t0 = Instant::now();
    while w.daemon_log_text().matches(needle).count() < times {
        assert!(t0.elapsed() < w.patience, "the daemon never said {needle:?} {times} times:\n{}", w.daemon_log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counter lines of the guest in `dir` so far (read from its console
/// log directly: `status` has no ID for a guest whose record is damaged).
fn counters_in(dir: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(dir.join("logs/app.log")).unwrap_or_default();
    log.lines().filter_map(|l| l.trim().strip_prefix("COUNTER ")?.trim().parse().ok()).collect()
}

/// Waits until the guest in `dir` counted `n` further than it has now: it
/// runs on, and the daemon has had that long to act on it.
fn let_it_count(w: &World, dir: &Path, n: u64) {
    let target = counters_in(dir).last().copied().unwrap_or(0) + n;
    let t0 = Instant::now();
    while counters_in(dir).last().copied().unwrap_or(0) < target {
        assert!(t0.elapsed() < w.patience, "the counter stopped at {:?}", counters_in(dir).last());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_upgrade_from_the_previous_format_adopts_the_running_guest_and_restores_the_standby_one() {
    let Some((kernel_dir, init)) = gate() else { return };
    // One guest running, one in standby, each under its own daemon (the
    // scenario world holds one instance).
    let mut running = world(&kernel_dir, &init);
    running.start();
    running.declare("running");
    running.wait("Running");
    running.wait_counter_above(3);
    let pid = running.status()["pid"].as_u64().expect("a live VMM");

    let mut standby = world(&kernel_dir, &init);
    standby.start();
    standby.declare("running");
    standby.wait("Running");
    standby.wait_counter_above(3);
    standby.declare("standby");
    standby.wait("Standby");
    let last = *standby.counters().last().unwrap();

    // The daemons stop (their VMMs do not); the records go back to the
    // previous format, as the previous release would have left them.
    running.stop_daemon();
    standby.stop_daemon();
    support::upgrade::rewrite_as_previous(&running.guest_dir(), "running", &running.image);
    support::upgrade::rewrite_as_previous(&standby.guest_dir(), "standby", &standby.image);

    running.start();
    standby.start();
    // The running guest: the same VMM, counting on, nothing pending, no
    // power off, one create in its whole life.
    let_it_count(&running, &running.guest_dir(), 10);
    let s = running.status();
    assert_eq!((s["state"].as_str(), s["pid"].as_u64()), (Some("Running"), Some(pid)), "the same VMM: {s}");
    assert_eq!(s["pending_change"], serde_json::Value::Null, "{s}");
    assert_eq!(vmms_of(&running.guest_dir()), vec![pid as u32]);
    let log = hypeman_log(&running);
    assert_eq!(log.matches("create VM (from").count(), 1, "{log}");
    assert!(!log.contains("power off"), "{log}");
    let counters = running.counters();
    assert_eq!(counters.iter().filter(|&&c| c == 1).count(), 1, "the app never started again");

    // The standby guest, declared running: restored, its counter goes on.
    let t = Instant::now();
    standby.declare("running");
    standby.wait("Running");
    standby.wait_counter_above(last);
    eprintln!("restore after the upgrade: state edit → next COUNTER in {:.2}s", t.elapsed().as_secs_f64());
    let after = standby.counters();
    let first_new = after.iter().skip_while(|&&c| c != last).nth(1).copied();
    assert_eq!(first_new, Some(last + 1), "the guest continued where it stopped: {:?}", &after[after.len().saturating_sub(10)..]);
    let log = hypeman_log(&standby);
    assert_eq!(log.matches("create VM (from").count(), 1, "no cold boot:\n{log}");
    assert!(log.contains("restore from standby"), "{log}");
    assert!(!log.contains("discard"), "{log}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(standby.guest_dir().join("metadata.json")).unwrap()).unwrap();
    assert_eq!(record["version"], hypeman::store::CURRENT_VERSION, "written in the current format since");

    running.stop_daemon();
    standby.stop_daemon();
}

/// A truncated record at daemon start, then a record from a newer hypeman
/// while the daemon runs: one QEMU all along, the record untouched, the
/// problem in `status`; the whole record put back, the VMM is managed again.
#[test]
fn a_truncated_or_newer_record_never_gets_a_second_vmm() {
    let Some((kernel_dir, init)) = gate() else { return };
    let mut w = world(&kernel_dir, &init);
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(3);
    let pid = w.status()["pid"].as_u64().expect("a live VMM") as u32;
    let dir = w.guest_dir();
    let record = dir.join("metadata.json");
    let whole = std::fs::read(&record).unwrap();
    w.stop_daemon();

    // Truncated, as a full disk or a bad copy leaves it.
    let truncated = whole[..whole.len() / 3].to_vec();
    std::fs::write(&record, &truncated).unwrap();
    w.start();
    let shown = record.display().to_string();
    wait_for_daemon_log(&w, &shown, 2);
    let_it_count(&w, &dir, 5);
    assert_eq!(vmms_of(&dir), vec![pid], "one QEMU for the guest");
    assert_eq!(std::fs::read(&record).unwrap(), truncated, "the record is left as it was");
    let s = w.status();
    assert_eq!(s["state"], "Unknown", "{s}");
    let error = s["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(&shown) && error.contains("Repairing a damaged record"), "{s}");

    // Repaired: the VMM is managed again, not replaced.
    std::fs::write(&record, &whole).unwrap();
    let t0 = Instant::now();
    while w.status()["state"] != "Running" {
        assert!(t0.elapsed() < w.patience, "never managed again: {}", w.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.status()["pid"].as_u64(), Some(u64::from(pid)));

    // A newer hypeman's record (a downgrade), under the running daemon.
    let text = String::from_utf8(std::fs::read(&record).unwrap()).unwrap();
    let current = format!("\"version\": {},", hypeman::store::CURRENT_VERSION);
    let newer = text.replacen(&current, &format!("\"version\": {},", hypeman::store::CURRENT_VERSION + 1), 1);
    assert_ne!(newer, text);
    std::fs::write(&record, &newer).unwrap();
    let seen = w.daemon_log_text().matches("a newer hypeman wrote it").count();
    wait_for_daemon_log(&w, "a newer hypeman wrote it", seen + 2);
    let_it_count(&w, &dir, 5);
    assert_eq!(vmms_of(&dir), vec![pid], "one QEMU for the guest");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), newer, "a newer record is never rewritten");
    let s = w.status();
    assert!(s["last_error"].as_str().unwrap_or_default().contains("format version"), "{s}");
    w.stop_daemon();
}
