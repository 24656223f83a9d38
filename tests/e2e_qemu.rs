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
use std::process::Command;
use std::time::{Duration, Instant};
use support::daemon::{ok, World};

fn gate() -> Option<(PathBuf, PathBuf)> {
    support::real_vm("the daemon end-to-end test", &["umoci", "mkfs.erofs", "mkfs.ext4"])
}

/// An OCI layout holding busybox and its applet links.
fn busybox_image(work: &Path) -> String {
    let root = work.join("rootfs");
    support::busybox_tree(&root, &["sh", "sleep", "echo", "cat"]);
    let layout = work.join("oci");
    ok(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
    let image = format!("{}:busybox", layout.display());
    ok(Command::new("umoci").args(["new", "--image", &image]));
    ok(Command::new("umoci").args(["insert", "--image", &image]).arg(&root).arg("/"));
    format!("oci:{image}")
}

/// The daemon set up for real QEMU guests under TCG.
fn world(kernel_dir: &Path, init: &Path) -> World {
    let settings = format!(
        "default_hypervisor = \"qemu\"\n[guest]\nkernel = \"{}\"\nmodules_dir = \"{}\"\ninit = \"{}\"\n\
         [qemu]\naccel = \"tcg\"\n[reconcile]\nresync_interval = \"2s\"\nhealth_interval = \"200ms\"\n\
         backoff_initial = \"200ms\"\nbackoff_max = \"2s\"\nstop_grace = \"3s\"\n",
        kernel_dir.join("vmlinuz").display(),
        kernel_dir.join("lib/modules").display(),
        init.display()
    );
    World::new("qmp.sock", |tmp| (settings, busybox_image(tmp)))
}

#[test]
fn running_standby_restore_stop_delete_through_the_daemon() {
    let Some((kernel_dir, init)) = gate() else { return };
    support::daemon::lifecycle(&mut world(&kernel_dir, &init));
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
/// `HYPEMAN_REAL_VM=1 HYPEMAN_GUEST_KERNEL_DIR=… cargo test --release --test e2e_qemu -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: run explicitly"]
fn bench_cold_boot_standby_restore() {
    let Some((kernel_dir, init)) = gate() else { return };
    println!("| guest | cold boot (write → first output) | standby | restore (edit → output resumes) | restore / cold boot | snapshot on disk |");
    println!("|---|---|---|---|---|---|");
    for memory in ["256MiB", "1GiB"] {
        let mut w = world(&kernel_dir, &init);
        w.memory = memory.into();
        w.start();
        let t = Instant::now();
        w.declare("running");
        w.wait_counter_above(0);
        let cold = t.elapsed();
        w.wait_counter_above(5);
        let t = Instant::now();
        w.declare("standby");
        let dir = w.guest_dir();
        while !dir.join("snapshots/snapshot-latest/snapshot.json").exists() || w.vmm_running() {
            assert!(t.elapsed() < Duration::from_secs(60), "standby never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        let standby = t.elapsed();
        let size = allocated(&dir.join("snapshots/snapshot-latest"));
        let last = *w.counters().last().unwrap();
        let t = Instant::now();
        w.declare("running");
        w.wait_counter_above(last);
        let restore = t.elapsed();
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
