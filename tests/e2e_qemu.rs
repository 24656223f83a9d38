//! The whole product under QEMU: the real `hypeman daemon` binary, real
//! declaration files, a real OCI image (built here with umoci from
//! busybox-static), real microVMs. This is the scenario of the NixOS VM test
//! `vm-tests/`, run on this machine (QEMU TCG instead of KVM).
//!
//! The scenario itself lives in `support::daemon`, shared with
//! `e2e_cloud_hypervisor`. Gated like `real_boot`: without
//! `HYPEMAN_REAL_VM=1` it prints why it skipped; with it, a missing
//! prerequisite is a failure.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::daemon::{World, COUNTER};

fn gate() -> Option<(PathBuf, PathBuf)> {
    support::real_vm("the daemon end-to-end test", &["umoci", "mkfs.erofs", "mkfs.ext4"])
}

/// The daemon set up for real QEMU guests under TCG.
fn world(kernel_dir: &Path, init: &Path) -> World {
    World::qemu(kernel_dir, init)
}

#[test]
fn running_standby_restore_stop_delete_through_the_daemon() {
    let Some((kernel_dir, init)) = gate() else { return };
    support::daemon::lifecycle(&mut world(&kernel_dir, &init));
}

/// The daemon killed hard in the middle of going to standby: the restarted
/// daemon finishes the job with the same VMM (no second QEMU), leaves a
/// complete snapshot and no QEMU, and the restore continues the counter.
#[test]
fn daemon_killed_during_standby_converges_on_restart() {
    let Some((kernel_dir, init)) = gate() else { return };
    let mut w = world(&kernel_dir, &init);
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(3);
    let pid = w.status()["pid"].as_u64().expect("a live VMM");
    let hypeman_log = w.guest_dir().join("logs/hypeman.log");

    w.declare("standby");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&hypeman_log).unwrap_or_default().contains("snapshot to standby (from") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the snapshot step never began");
        std::thread::sleep(Duration::from_millis(2));
    }
    w.kill_daemon();
    let log = std::fs::read_to_string(&hypeman_log).unwrap();
    eprintln!("killed the daemon; hypeman.log ends:\n{}", log.lines().rev().take(3).collect::<Vec<_>>().join("\n"));

    w.start();
    w.wait("Standby");
    assert!(!w.vmm_running(), "standby leaves no VMM");
    let snap = w.guest_dir().join("snapshots/snapshot-latest");
    assert!(snap.join("snapshot.json").exists(), "snapshot is complete");
    let log = std::fs::read_to_string(&hypeman_log).unwrap();
    assert_eq!(log.matches("create VM (from").count(), 1, "one VMM all along, no cold boot:\n{log}");
    let last = *w.counters().last().unwrap();

    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(last);
    let after = w.counters();
    let first_new = after.iter().skip_while(|&&c| c != last).nth(1).copied();
    assert_eq!(first_new, Some(last + 1), "the counter continued: {:?}", &after[after.len().saturating_sub(10)..]);
    assert_ne!(w.status()["pid"].as_u64(), Some(pid), "restored by a new VMM");
    w.stop_daemon();
}

/// `state = "stopped"` presses the ACPI power button; hypeman-init hears
/// it, sends the app SIGTERM, and powers off long before `stop_grace`. On
/// microvm (GED power button) and on q35 (ACPI fixed power button, chosen
/// for an instance with hotplug memory).
#[test]
fn stop_is_graceful_the_app_gets_sigterm_and_no_kill_is_needed() {
    let Some((kernel_dir, init)) = gate() else { return };
    for (machine, extra) in [("microvm", ""), ("q35", "hotplug_memory = \"128MiB\"\n")] {
        eprintln!("--- {machine} ---");
        graceful_stop(&kernel_dir, &init, extra);
    }
}

fn graceful_stop(kernel_dir: &Path, init: &Path, extra: &str) {
    let mut w = world(kernel_dir, init);
    w.extra = extra.into();
    let grace = Duration::from_secs(30);
    w.reconcile_setting("stop_grace", "\"30s\"");
    w.script = format!("trap 'echo APP GOT TERM; exit 0' TERM; {COUNTER}");
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(2);
    let dir = w.guest_dir();

    let t = Instant::now();
    w.declare("stopped");
    w.wait("Stopped");
    let took = t.elapsed();
    eprintln!("graceful stop: state edit → Stopped in {:.2}s (stop_grace {grace:?})", took.as_secs_f64());
    assert!(!w.vmm_running(), "no QEMU left");

    let app = std::fs::read_to_string(dir.join("logs/app.log")).unwrap();
    let hypeman = std::fs::read_to_string(dir.join("logs/hypeman.log")).unwrap();
    let tail = |text: &str| text.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    for line in [
        "hypeman-init: power button pressed, stopping app (SIGTERM)",
        "APP GOT TERM",
        "hypeman-init: app exited with status 0",
        "hypeman-init: powering off",
    ] {
        assert!(app.lines().any(|l| l.trim_end() == line), "app.log lacks {line:?}:\n{}", tail(&app));
    }
    eprintln!("--- app.log tail ---\n{}\n--- hypeman.log tail ---\n{}", tail(&app), tail(&hypeman));
    assert!(!hypeman.contains("killing its VMM"), "the VMM was killed:\n{}", tail(&hypeman));
    assert!(!w.daemon_log_text().contains("killing its VMM"), "the VMM was killed");
    assert!(took < grace / 2, "stop took {took:?}, not well under stop_grace {grace:?}");
    w.stop_daemon();
}

/// An app that exits by itself under `restart = "never"`: the guest powers
/// off, the instance stays Stopped, and status says how it ended.
#[test]
fn an_app_that_exits_stays_stopped_under_restart_never() {
    let Some((kernel_dir, init)) = gate() else { return };
    let mut w = world(&kernel_dir, &init);
    w.script = "echo JOB DONE; exit 3".into();
    w.extra = "restart = \"never\"\n".into();
    w.start();
    w.declare("running");
    let t0 = Instant::now();
    let status = loop {
        let s = w.status();
        if s["last_error"].as_str().is_some_and(|e| e.contains("exited")) {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "the exit never showed in status: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["state"], "Stopped");
    assert_eq!(status["desired_state"], "running");
    assert_eq!(status["last_error"], "the app exited with status 3; restart = \"never\" leaves it stopped");
    // It stays down: no second boot.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(w.status()["state"], "Stopped");
    let app = std::fs::read_to_string(w.guest_dir().join("logs/app.log")).unwrap();
    assert_eq!(app.matches("hypeman-init: starting (version").count(), 1, "booted once:\n{app}");
    assert!(app.contains("JOB DONE"));
    assert!(!w.vmm_running());

    // Declared stopped and running again: it boots again.
    w.declare("stopped");
    let t0 = Instant::now();
    while !w.status()["last_error"].is_null() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the exit was never forgotten: {}", w.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    w.declare("running");
    let t0 = Instant::now();
    while std::fs::read_to_string(w.guest_dir().join("logs/app.log")).unwrap().matches("JOB DONE").count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(90), "never booted again");
        std::thread::sleep(Duration::from_millis(200));
    }
    w.stop_daemon();
}

/// The last `COUNTER n` line in a console log.
fn last_counter(app_log: &Path) -> Option<u64> {
    let log = std::fs::read_to_string(app_log).ok()?;
    log.lines().rev().find_map(|l| l.trim().strip_prefix("COUNTER ")?.trim().parse().ok())
}

/// Allocated bytes of everything under `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// The issue-4 benchmark: cold boot, standby, restore and snapshot size for
/// 256 MiB and 1 GiB guests, through the daemon, in one run. It prints
/// figures and asserts nothing about time. Run it with
/// `HYPEMAN_REAL_VM=1 HYPEMAN_GUEST_KERNEL_DIR=… cargo test --release --test e2e_qemu bench -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: run explicitly"]
fn bench_cold_boot_standby_restore() {
    let Some((kernel_dir, init)) = gate() else { return };
    println!("| guest | cold boot (write → first output) | standby | restore (edit → output resumes) | restore / cold boot | snapshot on disk |");
    println!("|---|---|---|---|---|---|");
    for memory in ["256MiB", "1GiB"] {
        let mut w = world(&kernel_dir, &init);
        w.memory = memory.into();
        // A counter every 10 ms, so "output resumes" measures the restore
        // and not the app's own sleep.
        w.script = COUNTER.replace("sleep 0.2", "sleep 0.01");
        w.start();
        let t = Instant::now();
        w.declare("running");
        w.wait_counter_above(0);
        let cold = t.elapsed();
        w.wait_counter_above(5);
        let dir = w.guest_dir();
        let app_log = dir.join("logs/app.log");
        let qmp = dir.join("qmp.sock");
        // Three standby/restore rounds; the medians are printed (this
        // machine is noisy, and one round says little).
        let (mut standbys, mut restores, mut size) = (Vec::new(), Vec::new(), 0);
        for _ in 0..3 {
            let t = Instant::now();
            w.declare("standby");
            while !dir.join("snapshots/snapshot-latest/snapshot.json").exists()
                || hypeman::hypervisor::process::find_by_argument(&qmp).is_some()
            {
                assert!(t.elapsed() < Duration::from_secs(60), "standby never finished");
                std::thread::sleep(Duration::from_millis(2));
            }
            standbys.push(t.elapsed());
            size = size.max(allocated(&dir.join("snapshots/snapshot-latest")));
            let last = last_counter(&app_log).expect("counter lines before standby");
            let t = Instant::now();
            w.declare("running");
            // Read the console directly every 2 ms: `hypeman status` per
            // poll would cost more than the resolution wanted here.
            while last_counter(&app_log).unwrap_or(0) <= last {
                assert!(t.elapsed() < Duration::from_secs(60), "output never resumed after {last}");
                std::thread::sleep(Duration::from_millis(2));
            }
            restores.push(t.elapsed());
            // Let the restore finish (snapshot dropped) before the next round.
            w.wait("Running");
            while dir.join("snapshots/snapshot-latest").exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (standby, restore) = (median(&mut standbys), median(&mut restores));
        eprintln!("{memory}: standby rounds {standbys:?}, restore rounds {restores:?}");
        println!(
            "| {memory} | {:.2} s | {:.2} s | {:.2} s | {:.3} | {:.1} MiB |",
            cold.as_secs_f64(),
            standby.as_secs_f64(),
            restore.as_secs_f64(),
            restore.as_secs_f64() / cold.as_secs_f64(),
            size as f64 / (1 << 20) as f64
        );
        w.stop_daemon();
    }
}

/// A VMM that stops answering (QEMU frozen with SIGSTOP) while the guest
/// is declared stopped is killed once it has been silent for `stop_grace`,
/// and the instance ends Stopped: deleting the declaration is not the only
/// way out.
#[test]
fn a_hung_vmm_declared_stopped_is_killed_and_ends_stopped() {
    let Some((kernel_dir, init)) = gate() else { return };
    let mut w = world(&kernel_dir, &init);
    w.reconcile_setting("stop_grace", "\"3s\"");
    w.start();
    w.declare("running");
    w.wait("Running");
    let pid = w.status()["pid"].as_u64().expect("a live VMM") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    w.wait("Unknown");
    let t = Instant::now();
    w.declare("stopped");
    w.wait("Stopped");
    eprintln!("hung VMM declared stopped: Stopped after {:.2}s (stop_grace 3s)", t.elapsed().as_secs_f64());
    assert!(!w.vmm_running(), "the frozen QEMU was killed");
    let log = std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap();
    assert!(log.contains("kill unresponsive VMM (from Unknown)"), "{log}");
    w.stop_daemon();
}

/// The documented minimum memory boots the bundled kernel and runs the app.
#[test]
fn the_minimum_memory_boots() {
    let Some((kernel_dir, init)) = gate() else { return };
    let mut w = world(&kernel_dir, &init);
    w.memory = hypeman::declaration::MIN_MEMORY.to_string();
    w.start();
    w.declare("running");
    w.wait("Running");
    let took = w.wait_counter_above(2);
    eprintln!("memory = {:?}: the app ran, third line {:.2}s after Running", w.memory, took.as_secs_f64());
    w.stop_daemon();
}

/// The guest's `MemTotal` in KiB from every `MEMTOTAL n` line of a console
/// log, in order.
fn mem_totals(app_log: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(app_log).unwrap_or_default();
    log.lines().filter_map(|l| l.trim().strip_prefix("MEMTOTAL ")?.trim().parse().ok()).collect()
}

/// Waits until the console has a `MEMTOTAL` line after the first `skip`
/// that `ok` accepts, and returns its value.
fn wait_mem_total(w: &World, skip: usize, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let app_log = w.guest_dir().join("logs/app.log");
    let t0 = Instant::now();
    loop {
        if let Some(&kib) = mem_totals(&app_log).iter().skip(skip).find(|&&k| ok(k)) {
            return kib;
        }
        assert!(t0.elapsed() < w.patience, "{what}: MemTotal lines {:?}", mem_totals(&app_log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `hotplug_memory` under QEMU (q35, virtio-mem): 128 MiB + 128 MiB boots
/// with all of it plugged, standby gives the hotplug memory back before the
/// snapshot (the restored guest first sees only its boot memory, from the
/// migrated virtio-mem state), and the restore plugs it again while the app
/// goes on counting.
#[test]
fn hotplug_memory_is_plugged_at_boot_shrunk_for_standby_and_plugged_after_restore() {
    let Some((kernel_dir, init)) = gate() else { return };
    const MIB_KIB: u64 = 1024;
    let mut w = world(&kernel_dir, &init);
    w.memory = "128MiB".into();
    w.extra = "hotplug_memory = \"128MiB\"\n".into();
    // MemTotal with sh builtins only (the image has no grep).
    w.script = COUNTER.replace(
        "echo COUNTER $i;",
        "while read k v u; do [ $k = MemTotal: ] && echo MEMTOTAL $v; done < /proc/meminfo; echo COUNTER $i;",
    );
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(2);
    // The kernel keeps about 30 MiB for itself: boot memory alone reads
    // under 128 MiB, with the hotplug memory plugged over 192 MiB.
    let plugged = wait_mem_total(&w, 0, "never plugged at boot", |k| k > 192 * MIB_KIB);
    eprintln!("booted 128 MiB + 128 MiB: guest MemTotal {:.1} MiB", plugged as f64 / 1024.0);

    let dir = w.guest_dir();
    let t = Instant::now();
    w.declare("standby");
    w.wait("Standby");
    let standby = t.elapsed();
    // Every line from here on was printed by the restored guest.
    let seen = mem_totals(&dir.join("logs/app.log")).len();
    let memory_file = dir.join("snapshots/snapshot-latest/memory");
    let size = std::fs::metadata(&memory_file).expect("a snapshot memory file").len();
    eprintln!("standby: {:.2}s, snapshot memory file {size} bytes ({:.1} MiB)", standby.as_secs_f64(), size as f64 / (1 << 20) as f64);
    let last = *w.counters().last().unwrap();

    let t = Instant::now();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(last);
    let after = w.counters();
    let first_new = after.iter().skip_while(|&&c| c != last).nth(1).copied();
    assert_eq!(first_new, Some(last + 1), "the app went on counting: {:?}", &after[after.len().saturating_sub(10)..]);
    // The snapshot was taken after the guest gave its hotplug memory back
    // (the daemon says so), and the restore plugs it again.
    let shrink = w.daemon_log_text().lines().find(|l| l.contains("memory shrunk to the boot memory")).map(str::to_string);
    assert!(shrink.is_some(), "no shrink before the snapshot:\n{}", w.daemon_log_text());
    let regrown = wait_mem_total(&w, seen, "never plugged again after the restore", |k| k > 192 * MIB_KIB);
    let totals = mem_totals(&dir.join("logs/app.log"));
    eprintln!("{}", shrink.unwrap());
    eprintln!(
        "restore: edit → next COUNTER {:.2}s; guest MemTotal after the restore (KiB, in order): {:?}; {:.1} MiB once plugged again",
        t.elapsed().as_secs_f64(),
        &totals[seen..],
        regrown as f64 / 1024.0
    );
    let n = w.counters().len();
    w.wait_counter_above(*w.counters().last().unwrap() + 2);
    assert!(w.counters().len() > n, "the app keeps running");
    w.stop_daemon();
}

/// The app of the clock test: its clocksource once, then the guest's wall
/// clock (µs) ten times a second, printed by busybox `adjtimex` itself
/// right after it reads the clock (a shell pipeline between the reading and
/// the console would add its own fork and exec time to every skew).
const CLOCK: &str = "echo CLOCKSOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource); \
                     while true; do adjtimex; usleep 100000; done";

/// One console `CLOCK` line: the guest's time, and the host's when the
/// test read the line (a few ms after the guest printed it).
#[derive(Debug, Clone, Copy)]
struct Reading {
    guest: f64,
    host: f64,
}

impl Reading {
    /// Guest minus host, s: negative when the guest is behind.
    fn skew(&self) -> f64 {
        self.guest - self.host
    }
}

fn host_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The guest times in `text`, s: `adjtimex`'s `time.tv_sec:` line and the
/// `time.tv_usec:` line after it.
fn clock_lines(text: &str) -> Vec<f64> {
    let field = |l: &str, name: &str| l.trim().strip_prefix(name)?.trim().parse::<f64>().ok();
    let mut out = Vec::new();
    let mut sec = None;
    for line in text.lines() {
        if let Some(s) = field(line, "time.tv_sec:") {
            sec = Some(s);
        } else if let (Some(s), Some(us)) = (sec.take(), field(line, "time.tv_usec:")) {
            out.push(s + us / 1e6);
        }
    }
    out
}

/// Reads the console every 2 ms for `span` after its first new line past
/// byte `from`, timestamping each new `CLOCK` line as it appears.
/// Returns the readings and when the first one appeared.
fn read_clock(app_log: &Path, from: usize, span: Duration, patience: Duration) -> (Vec<Reading>, Instant) {
    let t0 = Instant::now();
    let mut seen = 0;
    let mut out: Vec<Reading> = Vec::new();
    let mut first: Option<Instant> = None;
    loop {
        let text = std::fs::read(app_log).unwrap_or_default();
        let host = host_now();
        let lines = clock_lines(&String::from_utf8_lossy(&text[from.min(text.len())..]));
        for guest in lines.iter().skip(seen) {
            out.push(Reading { guest: *guest, host });
            first.get_or_insert_with(Instant::now);
        }
        seen = lines.len();
        if let Some(first) = first.filter(|f| f.elapsed() >= span) {
            return (out, first);
        }
        assert!(t0.elapsed() < patience, "no clock output on the console after {patience:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How long each `step` took, from its start line to its `: done` line in
/// `hypeman.log` (host wall time, ms).
fn step_times(log: &str, step: &str) -> Vec<Duration> {
    let at = |l: &str| humantime::parse_rfc3339(l.split(' ').next()?).ok();
    let mut began = None;
    let mut out = Vec::new();
    for line in log.lines() {
        if line.contains(&format!(" {step} (from ")) {
            began = at(line);
        } else if line.ends_with(&format!(" {step}: done")) {
            if let (Some(b), Some(e)) = (began.take(), at(line)) {
                out.push(e.duration_since(b).unwrap_or_default());
            }
        }
    }
    out
}

/// What one standby/restore cycle of the clock test measured.
struct Cycle {
    standby: Duration,
    restore: Duration,
    /// The skew of the last line before the standby.
    before_standby: f64,
    /// The first line after the restore.
    first_after: Reading,
    /// Every line read from 1 s after the resume on.
    settled: Vec<Reading>,
    /// When the first line within 1 s of the host came, after the resume.
    corrected_after: Option<f64>,
    hypeman_log: String,
    clocksource: String,
}

/// Boots the clock app with `init`, stands it by for `standby_for`,
/// restores it and reads its clock for 3 s.
fn clock_cycle(kernel_dir: &Path, init: &Path, standby_for: Duration) -> Cycle {
    let settings = support::tcg_settings(kernel_dir, init, "");
    let mut w = World::new("qmp.sock", |tmp| (settings, support::busybox_image(tmp, &["sh", "adjtimex", "cat", "echo", "usleep"])));
    w.script = CLOCK.into();
    w.start();
    w.declare("running");
    w.wait("Running");
    let dir = w.guest_dir();
    let app_log = dir.join("logs/app.log");
    let (boot, _) = read_clock(&app_log, 0, Duration::from_millis(500), w.patience);
    let before_standby = boot.last().expect("clock lines").skew();
    let console = std::fs::read_to_string(&app_log).unwrap();
    let clocksource = console.lines().find_map(|l| l.strip_prefix("CLOCKSOURCE ")).unwrap_or("?").trim().to_string();

    let t = Instant::now();
    w.declare("standby");
    w.wait("Standby");
    let standby = t.elapsed();
    let asleep = Instant::now();
    while asleep.elapsed() < standby_for {
        // The standby itself is what is measured: it must last this long.
        std::thread::sleep(Duration::from_millis(200));
    }
    let from = std::fs::metadata(&app_log).unwrap().len() as usize;
    let t = Instant::now();
    w.declare("running");
    let (readings, first_at) = read_clock(&app_log, from, Duration::from_secs(3), w.patience);
    let restore = first_at.duration_since(t);
    w.wait("Running");
    let hypeman_log = std::fs::read_to_string(dir.join("logs/hypeman.log")).unwrap();
    // Three short rounds for the standby and restore times: from the
    // edit to the snapshot being complete with no QEMU left, and from the
    // edit to the app's next output (it prints ten times a second).
    let qmp = dir.join("qmp.sock");
    let (mut standbys, mut restores) = (vec![standby], vec![restore]);
    for _ in 0..3 {
        while dir.join("snapshots/snapshot-latest").exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        w.declare("standby");
        while !dir.join("snapshots/snapshot-latest/snapshot.json").exists()
            || hypeman::hypervisor::process::find_by_argument(&qmp).is_some()
        {
            assert!(t.elapsed() < w.patience, "standby never finished");
            std::thread::sleep(Duration::from_millis(2));
        }
        standbys.push(t.elapsed());
        let from = std::fs::metadata(&app_log).unwrap().len() as usize;
        let t = Instant::now();
        w.declare("running");
        let (_, first) = read_clock(&app_log, from, Duration::ZERO, w.patience);
        restores.push(first.duration_since(t));
        w.wait("Running");
    }
    // The resume, as the daemon logged it (host wall time, ms).
    let resumed = hypeman_log
        .lines()
        .rfind(|l| l.contains(" resume (from Paused)"))
        .and_then(|l| humantime::parse_rfc3339(l.split(' ').next()?).ok())
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64())
        .expect("a resume in hypeman.log");
    let first_after = readings[0];
    let settled = readings.iter().copied().filter(|r| r.host >= resumed + 1.0).collect();
    let corrected_after = readings.iter().find(|r| r.skew().abs() < 1.0).map(|r| r.host - resumed);
    let log = std::fs::read_to_string(dir.join("logs/hypeman.log")).unwrap();
    for step in ["snapshot to standby", "restore from standby", "resume"] {
        eprintln!("hypeman.log {step}: {:?}", step_times(&log, step));
    }
    w.stop_daemon();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (standby, restore) = (median(standbys.clone()), median(restores.clone()));
    eprintln!("standby rounds {standbys:?}, restore rounds {restores:?}");
    Cycle { standby, restore, before_standby, first_after, settled, corrected_after, hypeman_log, clocksource }
}

/// Issue 10: after a standby of ≥ 40 s the restored guest's wall clock is
/// within 1 s of the host's within 1 s of the resume. Measured side by side
/// with the init of the release before the agent (its guest has the
/// channel's device but nothing serving it), whose clock stays behind by
/// the standby, and whose resume only logs that the clock was not set.
/// Prints the skews and the standby and restore times of both.
#[test]
fn clock_skew_after_a_long_standby() {
    let Some((kernel_dir, init)) = gate() else { return };
    // Issue 10's figure is for 40 s; HYPEMAN_CLOCK_STANDBY_S may ask for
    // longer (or, while developing, shorter).
    let standby_for = Duration::from_secs(std::env::var("HYPEMAN_CLOCK_STANDBY_S").ok().and_then(|s| s.parse().ok()).unwrap_or(40));
    let previous = std::env::var_os("HYPEMAN_PREVIOUS_INIT").map(std::path::PathBuf::from);
    // A baseline run (another daemon build through HYPEMAN_DAEMON_BINARY,
    // with its own init) is measured and printed, not judged.
    let baseline = std::env::var_os("HYPEMAN_DAEMON_BINARY").is_some();
    let mut runs = vec![(if baseline { "baseline" } else { "this init" }, init.clone())];
    if let Some(p) = previous.filter(|_| !baseline) {
        support::require(&p, "HYPEMAN_PREVIOUS_INIT names the init of the previous release");
        runs.insert(0, ("previous init", p));
    }
    for (what, init) in runs {
        let c = clock_cycle(&kernel_dir, &init, standby_for);
        let worst = c.settled.iter().map(|r| r.skew().abs()).fold(0.0, f64::max);
        println!(
            "clock skew ({what}): {:+.3} s before the standby; after a {:.0} s standby: first line {:+.3} s, \
             within 1 s of the host {}, worst from 1 s after the resume on {:.3} s ({} lines); \
             standby {:.2} s, restore {:.2} s (medians of 4)",
            c.before_standby,
            standby_for.as_secs_f64(),
            c.first_after.skew(),
            c.corrected_after.map_or("never".to_string(), |s| format!("{s:.2} s after the resume")),
            worst,
            c.settled.len(),
            c.standby.as_secs_f64(),
            c.restore.as_secs_f64(),
        );
        let clock_line = c.hypeman_log.lines().rfind(|l| l.contains("guest clock")).unwrap_or("").to_string();
        println!("  hypeman.log: {clock_line}");
        println!("  guest clocksource: {}; load average: {}", c.clocksource, std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
        assert!(!c.settled.is_empty(), "the guest printed its clock after the resume");
        if what == "baseline" {
            continue;
        }
        if what == "this init" {
            assert!(worst < 1.0, "the guest's clock is {worst:.3} s off the host's 1 s after the resume: {:?}", c.settled);
            assert!(clock_line.contains("guest clock set: it was "), "{clock_line}");
        } else {
            assert!(clock_line.contains("guest clock not set: no answer from the guest agent"), "{clock_line}");
            assert!(c.first_after.skew() < -standby_for.as_secs_f64() + 2.0, "the old guest's clock stood still: {:?}", c.first_after);
        }
    }
}

/// The app of the overlay test: counts its boots in a file on its root
/// filesystem (the overlay), prints that count and the root's size from
/// `df`, then counts on the console.
const OVERLAY_APP: &str = "n=$(cat /boots 2>/dev/null || echo 0); n=$((n+1)); echo $n > /boots; sync; \
                           echo BOOTS $(cat /boots); set -- $(df -k / | tail -n 1); echo ROOT_KIB $2; \
                           i=0; while true; do i=$((i+1)); echo COUNTER $i; sleep 0.2; done";

/// The last value printed after `key ` on the console.
fn console_value(app_log: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(app_log).unwrap_or_default();
    text.lines().rev().find_map(|l| l.trim().strip_prefix(key)?.trim().parse().ok())
}

fn wait_console(app_log: &Path, key: &str, want: impl Fn(u64) -> bool, patience: Duration) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Some(v) = console_value(app_log, key).filter(|v| want(*v)) {
            return v;
        }
        assert!(t0.elapsed() < patience, "no fitting {key} line; app.log ends:\n{}", tail_of(app_log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// `overlay_size` raised: the guest restarts on a grown overlay (its `df`
/// shows the new size) and what it wrote to its root filesystem is still
/// there; then lowered: the guest keeps running, untouched, and status
/// says why its overlay stays as it is.
#[test]
fn a_raised_overlay_size_grows_the_root_filesystem_and_a_lowered_one_is_refused() {
    let Some((kernel_dir, init)) = gate() else { return };
    let settings = support::tcg_settings(&kernel_dir, &init, "");
    let mut w = World::new("qmp.sock", |tmp| {
        (settings, support::busybox_image(tmp, &["sh", "sleep", "echo", "cat", "df", "sync", "tail"]))
    });
    w.script = OVERLAY_APP.into();
    w.extra = "overlay_size = \"1GiB\"\n".into();
    w.start();
    w.declare("running");
    w.wait("Running");
    let app_log = w.guest_dir().join("logs/app.log");
    assert_eq!(wait_console(&app_log, "BOOTS ", |_| true, w.patience), 1);
    let before = wait_console(&app_log, "ROOT_KIB ", |_| true, w.patience);
    assert!(before <= 1 << 20, "a 1 GiB overlay: {before} KiB");

    let t = Instant::now();
    w.extra = "overlay_size = \"2GiB\"\n".into();
    w.declare("running");
    assert_eq!(wait_console(&app_log, "BOOTS ", |n| n >= 2, w.patience), 2, "the file written at the first boot survived");
    let took = t.elapsed();
    let after = wait_console(&app_log, "ROOT_KIB ", |kib| kib != before, w.patience);
    eprintln!("overlay 1 → 2 GiB: declaration edit → app on the grown overlay in {:.2}s; df / {before} → {after} KiB", took.as_secs_f64());
    assert!(after > (1 << 20) * 19 / 10 && after <= 2 << 20, "a 2 GiB overlay: {after} KiB");
    let hypeman_log = std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap();
    assert!(hypeman_log.contains("the declaration changed (overlay_size); restarting to apply it"), "{hypeman_log}");
    assert!(hypeman_log.contains("overlay grown from 1GiB to 2GiB"), "{hypeman_log}");
    w.wait("Running");

    let pid = w.status()["pid"].as_u64().expect("a live VMM");
    w.extra = "overlay_size = \"512MiB\"\n".into();
    w.declare("running");
    let t0 = Instant::now();
    let status = loop {
        let s = w.status();
        if s["last_error"].as_str().is_some_and(|e| e.contains("overlay_size cannot shrink")) {
            break s;
        }
        assert!(t0.elapsed() < w.patience, "never refused: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        status["last_error"],
        "overlay_size cannot shrink (the overlay is 2GiB, declared 512MiB); keeping 2GiB: delete the instance to start over with a smaller one"
    );
    assert_eq!(status["state"], "Running");
    assert_eq!(status["pid"].as_u64(), Some(pid), "the same VMM: not restarted");
    assert!(status["pending_change"].is_null(), "no restart is pending: {status}");
    let last = *w.counters().last().unwrap();
    w.wait_counter_above(last);
    assert_eq!(console_value(&app_log, "BOOTS "), Some(2), "no third boot");
    assert_eq!(std::fs::metadata(w.guest_dir().join("overlay.raw")).unwrap().len(), 2 << 30);
    w.stop_daemon();
}
