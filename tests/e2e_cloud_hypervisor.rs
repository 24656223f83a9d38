//! The whole product on Cloud Hypervisor, as far as this machine allows:
//! the real `hypeman daemon` binary, real declaration files, a real OCI
//! image turned into real disks, and the fake Cloud Hypervisor binary in
//! place of `cloud-hypervisor` (no KVM needed). The scenario is the one the
//! QEMU test runs with real microVMs (`support::daemon::lifecycle`), so the
//! orchestration is proven for both backends.
//!
//! Every VMM the daemon starts appends what it was asked to one audit log;
//! each test ends by checking that no request broke the OpenAPI spec.

mod support;

use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};
use support::daemon::World;

/// A one-layer OCI layout written by hand (no umoci needed).
fn tiny_image(dir: &Path) -> String {
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let blob = |media_type: &str, bytes: &[u8]| {
        let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        serde_json::json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len() })
    };
    let mut tar = tar::Builder::new(Vec::new());
    let app = b"#!/bin/sh\necho hello\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(app.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(1_700_000_000);
    tar.append_data(&mut header, "bin/app", &app[..]).unwrap();
    let layer = tar.into_inner().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Cmd": ["/bin/app"] },
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob("application/vnd.oci.image.config.v1+json", config.to_string().as_bytes()),
        "layers": [blob("application/vnd.oci.image.layer.v1.tar", &layer)],
    });
    let mut desc = blob("application/vnd.oci.image.manifest.v1+json", manifest.to_string().as_bytes());
    desc["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "tiny" });
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(layout.join("index.json"), serde_json::json!({ "schemaVersion": 2, "manifests": [desc] }).to_string()).unwrap();
    format!("oci:{}:tiny", layout.display())
}

/// The daemon with the fake as its `cloud-hypervisor`, tuned by `env`.
fn world(env: &[(&str, &str)]) -> World {
    for tool in ["mkfs.erofs", "mkfs.ext4"] {
        assert!(support::which(tool), "{tool} is not installed (see scripts/setup.sh)");
    }
    World::new("ch.sock", |tmp| {
        let audit = shared_audit_log(tmp);
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.push(("FAKE_CH_AUDIT_LOG", &audit));
        let settings = support::fake_ch::daemon_settings(tmp, &env);
        (settings, tiny_image(tmp))
    })
}

/// The file every fake VMM appends its log lines to, made writable by
/// anyone first: the VMMs run as their own users.
fn shared_audit_log(tmp: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = tmp.join("audit.log");
    std::fs::write(&path, "").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    path.display().to_string()
}

fn audit(w: &World) -> Vec<String> {
    std::fs::read_to_string(w.tmp.path().join("audit.log")).unwrap_or_default().lines().map(str::to_string).collect()
}

fn assert_no_violations(w: &World) {
    let bad: Vec<String> = audit(w).into_iter().filter(|l| l.contains("SPEC VIOLATION") || l.contains("malformed")).collect();
    assert_eq!(bad, Vec::<String>::new(), "requests that break the OpenAPI spec");
}

/// The position of the first audit line containing `needle` after `from`.
fn find(lines: &[String], from: usize, needle: &str) -> Option<usize> {
    lines.iter().skip(from).position(|l| l.contains(needle)).map(|i| i + from)
}

#[test]
fn v53_lifecycle_through_the_daemon_with_memory_shrink_and_on_demand_restore() {
    let mut w = world(&[]);
    w.patience = Duration::from_secs(30);
    w.extra = "hotplug_memory = \"256MiB\"\n".into();
    support::daemon::lifecycle(&mut w);
    let lines = audit(&w);
    // Standby: shrink, let it settle, then pause and snapshot.
    let resize = find(&lines, 0, "PUT /api/v1/vm.resize -> 204").expect("memory was shrunk before the standby");
    let pause = find(&lines, resize, "PUT /api/v1/vm.pause -> 204").expect("then paused");
    let snapshot = find(&lines, pause, "PUT /api/v1/vm.snapshot -> 204").expect("then snapshotted");
    let shutdown = find(&lines, snapshot, "PUT /api/v1/vmm.shutdown -> 200").expect("then the VMM ended");
    // Restore, resume, grow back.
    let restore = find(&lines, shutdown, "PUT /api/v1/vm.restore -> 204").expect("restored");
    let resume = find(&lines, restore, "PUT /api/v1/vm.resume -> 204").expect("resumed");
    find(&lines, resume, "PUT /api/v1/vm.resize -> 204").expect("memory grown back after the resume");
    assert_no_violations(&w);
}

#[test]
fn v49_lifecycle_through_the_daemon() {
    let mut w = world(&[("FAKE_CH_VERSION", "49.0.0")]);
    w.patience = Duration::from_secs(30);
    support::daemon::lifecycle(&mut w);
    assert!(audit(&w).iter().all(|l| !l.contains("vm.resize")), "no hotplug memory, no resize");
    assert_no_violations(&w);
}

/// The daemon killed while a snapshot is in progress: the next daemon
/// adopts the VMM and finishes the standby, with one VMM at a time.
#[test]
fn a_daemon_killed_mid_standby_is_finished_by_the_next() {
    let mut w = world(&[("FAKE_CH_SNAPSHOT_DELAY_MS", "1500")]);
    w.patience = Duration::from_secs(30);
    w.start();
    w.declare("running");
    w.wait("Running");
    let pid = w.status()["pid"].as_u64().unwrap();
    w.declare("standby");
    let t0 = Instant::now();
    while find(&audit(&w), 0, "PUT /api/v1/vm.pause -> 204").is_none() {
        assert!(t0.elapsed() < w.patience, "the standby never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    w.kill_daemon();
    w.start();
    w.wait("Standby");
    assert!(!w.vmm_running());
    let snap = w.guest_dir().join("snapshots/snapshot-latest");
    for f in ["snapshot.json", "config.json", "state.json", "memory-ranges", "ch-launch.json"] {
        assert!(snap.join(f).is_file(), "{f}");
    }
    // Each audit line starts with the pid of the VMM that wrote it.
    let vmms: std::collections::BTreeSet<String> =
        audit(&w).iter().filter_map(|l| Some(l.strip_prefix('[')?.split(']').next()?.to_string())).collect();
    assert_eq!(vmms.into_iter().collect::<Vec<_>>(), vec![pid.to_string()], "one VMM, adopted, never a second");
    w.stop_daemon();
    assert_no_violations(&w);
}

/// A snapshot taken by another Cloud Hypervisor version is not restored:
/// the instance cold-boots and the log says why.
#[test]
fn a_snapshot_from_another_version_cold_boots() {
    let mut w = world(&[]);
    w.patience = Duration::from_secs(30);
    w.start();
    w.declare("standby");
    w.wait("Standby");
    w.stop_daemon();
    let audit_log = shared_audit_log(w.tmp.path());
    support::fake_ch::wrapper(w.tmp.path(), &[("FAKE_CH_VERSION", "54.0.0"), ("FAKE_CH_AUDIT_LOG", &audit_log)]);
    w.start();
    w.declare("running");
    w.wait("Running");
    assert!(!audit(&w).iter().any(|l| l.contains("vm.restore")), "no restore was tried");
    let log = std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap();
    assert!(
        log.contains("snapshot cannot be restored (it was taken with cloud-hypervisor 53.0.0, this host has 54.0.0)"),
        "{log}"
    );
    w.stop_daemon();
    assert_no_violations(&w);
}

/// Standby → restore → standby at once: v53 is still prefaulting the
/// on-demand restore when the second standby snapshots, refuses it with
/// its real words, and the daemon waits the prefault out instead of
/// failing the standby.
#[test]
fn a_standby_right_after_an_on_demand_restore_waits_out_the_prefault() {
    let mut w = world(&[("FAKE_CH_PREFAULT_MS", "1500")]);
    w.patience = Duration::from_secs(30);
    w.start();
    w.declare("standby");
    w.wait("Standby");
    w.declare("running");
    w.wait("Running");
    let restored = find(&audit(&w), 0, "PUT /api/v1/vm.restore -> 204").expect("restored");
    let t0 = Instant::now();
    w.declare("standby");
    w.wait("Standby");
    eprintln!("standby right after the restore: {:.2}s", t0.elapsed().as_secs_f64());
    let lines = audit(&w);
    let refused = find(&lines, restored, "PUT /api/v1/vm.snapshot -> 500").expect("the prefault refused the first snapshot");
    find(&lines, refused, "PUT /api/v1/vm.snapshot -> 204").expect("then the snapshot was taken");
    assert!(!w.vmm_running(), "standby leaves no VMM");
    let snap = w.guest_dir().join("snapshots/snapshot-latest");
    assert!(snap.join("snapshot.json").exists(), "snapshot is complete");
    let log = std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap_or_default();
    // A step that fails is logged "<step> failed: …" (and retried later):
    // the standby must have gone through without one.
    assert!(!log.contains(" failed: "), "the standby did not fail on the way: {log}");
    // And back again: the cycle goes on.
    w.declare("running");
    w.wait("Running");
    w.stop_daemon();
    assert_no_violations(&w);
}

/// The agent channel end to end at the protocol level: the daemon reaches
/// the fake's guest agent through the hybrid vsock socket (`CONNECT`
/// handshake, then the agent protocol) after the restore's resume, and the
/// skew it corrected (the guest's clock stood still for the standby) is in
/// `hypeman.log`. The restore also shows that the stale vsock socket the
/// last VMM left is cleared before the next one binds it.
#[test]
fn a_restored_guests_clock_is_set_over_the_hybrid_vsock() {
    let mut w = world(&[]);
    w.patience = Duration::from_secs(30);
    w.start();
    w.declare("running");
    w.wait("Running");
    w.declare("standby");
    w.wait("Standby");
    let standby = Duration::from_secs(2);
    std::thread::sleep(standby);
    w.declare("running");
    w.wait("Running");
    let log_path = w.guest_dir().join("logs/hypeman.log");
    let t0 = Instant::now();
    let line = loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        let after_restore = log.split(" (from Standby)").nth(1).unwrap_or("");
        if let Some(line) = after_restore.lines().find(|l| l.contains("guest clock set: it was ")) {
            break line.to_string();
        }
        assert!(t0.elapsed() < w.patience, "no clock step in hypeman.log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("{line}");
    let behind: f64 = line
        .split("guest clock set: it was ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("a skew in seconds");
    assert!(line.contains(" s behind the host's, now 0.0"), "{line}");
    assert!(behind >= standby.as_secs_f64() && behind < standby.as_secs_f64() + 20.0, "{line}");
    assert!(line.contains("agent fake-cloud-hypervisor guest, protocol 1"), "{line}");
    let launch = std::fs::read_to_string(w.guest_dir().join("ch-launch.json")).unwrap();
    assert!(launch.contains("agent.sock"), "the launch config names the agent channel:\n{launch}");
    w.stop_daemon();
    assert_no_violations(&w);
}
