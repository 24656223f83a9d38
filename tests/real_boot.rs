//! A real guest boot under QEMU TCG (microvm), gated because it needs a
//! Debian guest kernel, the static hypeman-init and ~5 s of CPU.
//!
//! Run it with `scripts/real-boot-test.sh`, which fetches the kernel and
//! builds init; or by hand:
//! `HYPEMAN_REAL_VM=1 HYPEMAN_GUEST_KERNEL_DIR=DIR cargo test --test real_boot -- --nocapture`
//! (`DIR` as written by `scripts/fetch-guest-kernel.sh`; `HYPEMAN_INIT_BINARY`
//! defaults to the static release build under `target/`).
//!
//! Without `HYPEMAN_REAL_VM=1` it prints why it skipped and passes. With it,
//! a missing prerequisite is a failure: a requested real test must not pass
//! without running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use hypeman::system::{cached_initrd, host_tsc_khz};
use support::{busybox_tree, real_vm};
use hypeman_contract::config::{GuestConfig, CONFIG_FILE, CONFIG_VERSION};

const COUNTER_SCRIPT: &str =
    "i=0; while [ $i -lt 5 ]; do i=$((i+1)); echo COUNTER $i; sleep 0.1; done";

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// busybox with the applets the counter script needs, as an erofs image.
fn make_rootfs(work: &Path) -> PathBuf {
    let root = work.join("rootdir");
    busybox_tree(&root, &["sh", "sleep", "echo", "cat", "ls", "id"]);
    std::fs::create_dir_all(root.join("etc")).expect("mkdir etc");
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .expect("passwd");
    let image = work.join("rootfs.erofs");
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&root));
    image
}

fn counter_config() -> GuestConfig {
    GuestConfig {
        version: CONFIG_VERSION,
        entrypoint: Vec::new(),
        cmd: vec!["/bin/sh".into(), "-c".into(), COUNTER_SCRIPT.into()],
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        workdir: "/".to_owned(),
        user: None,
        hostname: "counter".to_owned(),
        network: None,
        volumes: Vec::new(),
        stop_grace_ms: None,
    }
}

fn make_config(work: &Path, config: &GuestConfig) -> PathBuf {
    let dir = work.join("configdir");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join(CONFIG_FILE),
        config.to_json().expect("config json"),
    )
    .expect("write config");
    let image = work.join("config.erofs");
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&dir));
    image
}

fn make_overlay(work: &Path, formatted: bool) -> PathBuf {
    let image = work.join("overlay.raw");
    let file = std::fs::File::create(&image).expect("create overlay");
    file.set_len(256 << 20).expect("size overlay");
    if formatted {
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
    }
    image
}

/// What a boot left behind.
struct Boot {
    /// QEMU's exit status: success means the guest powered off by itself.
    powered_off: bool,
    console: String,
    first_counter: Option<Duration>,
    overlay: PathBuf,
    /// Holds the disks until the test is done with them.
    _work: tempfile::TempDir,
}

/// Prerequisites, or `None` (skip) when the real-VM tests are not enabled.
fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    real_vm("the real QEMU boot", &["mkfs.erofs", "mkfs.ext4", "debugfs", "timeout"])
}

/// Builds the initrd and disks and boots them under QEMU TCG microvm, as in
/// reference/this-machine.md §3, until the guest powers off (or 60 s pass).
fn boot(kernel_dir: &Path, init: &Path, config: &GuestConfig, overlay_formatted: bool) -> Boot {
    let work_dir = support::tempdir();
    let work = work_dir.path();
    let modules_dir = kernel_dir.join("lib/modules");
    let initrd = cached_initrd(&work.join("data"), init, Some(&modules_dir)).expect("initrd");
    eprintln!(
        "initrd {} ({} modules, kernel {:?}, {} bytes)",
        initrd.path.display(),
        initrd.modules.len(),
        initrd.kernel_release,
        std::fs::metadata(&initrd.path)
            .map(|m| m.len())
            .unwrap_or(0)
    );
    // Our modules.dep resolution must agree with modprobe's on the real tree
    // (without modprobe, a skip of this check, or a failure under CI).
    if let Some(release) = initrd.kernel_release.as_ref().filter(|_| support::gate::tools(&["modprobe"])) {
        let mut expected: Vec<String> = Vec::new();
        for (name, _) in hypeman::system::GUEST_MODULES {
            let out = Command::new("modprobe")
                .arg("-d")
                .arg(kernel_dir)
                .args(["-S", release, "--show-depends", name])
                .output()
                .expect("modprobe");
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(path) = line.strip_prefix("insmod ") {
                    let rel = path
                        .trim()
                        .rsplit_once(&format!("{release}/"))
                        .map(|(_, r)| r.to_owned());
                    if let Some(rel) = rel.filter(|r| !expected.contains(r)) {
                        expected.push(rel);
                    }
                }
            }
        }
        assert_eq!(
            initrd.modules, expected,
            "load order differs from modprobe --show-depends"
        );
    }
    let rootfs = make_rootfs(work);
    let config = make_config(work, config);
    let overlay = make_overlay(work, overlay_formatted);
    let console = work.join("console.log");
    let tsc_khz = host_tsc_khz().expect("host TSC rate");

    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 tsc_early_khz={tsc_khz} mitigations=off cryptomgr.notests \
         8250.nr_uarts=1 i8042.nokbd i8042.noaux no_timer_check"
    );
    let drive = |id: &str, path: &Path, extra: &str| {
        format!("id={id},file={},format=raw,if=none{extra}", path.display())
    };
    let mut qemu = Command::new("timeout");
    qemu.arg("60")
        .arg("qemu-system-x86_64")
        .args([
            "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel_dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd.path)
        .args(["-append", &cmdline])
        .args([
            "-chardev",
            &format!("file,id=s0,path={}", console.display()),
            "-serial",
            "chardev:s0",
        ])
        .args(["-drive", &drive("r", &rootfs, ",readonly=on")])
        .args(["-device", "virtio-blk-device,drive=r,serial=rootfs"])
        .args(["-drive", &drive("o", &overlay, ",discard=unmap")])
        .args(["-device", "virtio-blk-device,drive=o,serial=overlay"])
        .args(["-drive", &drive("c", &config, ",readonly=on")])
        .args(["-device", "virtio-blk-device,drive=c,serial=config"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let started = Instant::now();
    let mut child = qemu.spawn().expect("start qemu");
    let mut first_counter = None;
    let status = loop {
        if first_counter.is_none() {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains("COUNTER 1") {
                first_counter = Some(started.elapsed());
            }
        }
        if let Some(status) = child.try_wait().expect("poll qemu") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let total = started.elapsed();
    let out = child.wait_with_output().expect("qemu output");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!(
        "qemu {status} after {total:.2?}; stderr: {}\n--- console ---\n{log}--- end ---",
        String::from_utf8_lossy(&out.stderr)
    );
    Boot {
        powered_off: status.success(),
        console: log,
        first_counter,
        overlay,
        _work: work_dir,
    }
}

fn assert_clean_poweroff(boot: &Boot) {
    assert!(
        boot.powered_off,
        "QEMU did not power off by itself (exit 124 = timeout)"
    );
    assert!(!boot.console.contains("Kernel panic"), "kernel panic");
    assert!(
        boot.console.contains("reboot: Power down"),
        "no power-down line"
    );
}

#[test]
fn boots_busybox_and_runs_the_counter_to_poweroff() {
    let Some((kernel_dir, init)) = prerequisites() else {
        return;
    };
    let boot = boot(&kernel_dir, &init, &counter_config(), true);
    eprintln!(
        "boot to COUNTER 1: {}",
        boot.first_counter
            .map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
    );
    assert_clean_poweroff(&boot);
    for line in [
        "COUNTER 1",
        "COUNTER 5",
        "hypeman-init: app exited with status 0",
    ] {
        assert!(boot.console.contains(line), "console lacks {line:?}");
    }
    assert!(!boot.console.contains("hypeman-init: fatal"));

    // The overlay was mounted read-write and synced before power-off.
    let listing = Command::new("debugfs")
        .args(["-R", "ls -l /"])
        .arg(&boot.overlay)
        .output()
        .expect("debugfs");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("upper") && listing.contains("work"),
        "overlay disk: {listing}"
    );
}

#[test]
fn a_missing_program_is_a_fatal_line_and_a_poweroff() {
    let Some((kernel_dir, init)) = prerequisites() else {
        return;
    };
    let mut config = counter_config();
    config.cmd = vec!["no-such-program".into()];
    let boot = boot(&kernel_dir, &init, &config, true);
    assert_clean_poweroff(&boot);
    assert!(
        boot.console
            .contains("hypeman-init: fatal: \"no-such-program\" was not found in PATH"),
        "no fatal line"
    );
}

#[test]
fn the_app_runs_as_its_user_and_its_failure_status_is_reported() {
    let Some((kernel_dir, init)) = prerequisites() else {
        return;
    };
    let mut config = counter_config();
    config.user = Some("app".to_owned());
    config.workdir = "/home/app".to_owned();
    config.cmd = vec![
        "sh".into(),
        "-c".into(),
        "echo \"$GREETING from $(cat /proc/sys/kernel/hostname) as $(id -u):$(id -g) home=$HOME pwd=$(pwd)\"; exit 3"
            .into(),
    ];
    let boot = boot(&kernel_dir, &init, &config, true);
    assert_clean_poweroff(&boot);
    assert!(
        boot.console
            .contains("hello from counter as 1000:1000 home=/home/app pwd=/home/app"),
        "env, hostname, user or workdir wrong"
    );
    assert!(
        boot.console
            .contains("hypeman-init: app exited with status 3"),
        "no exit status"
    );
}

#[test]
fn an_unformatted_overlay_is_a_clear_fatal_error() {
    let Some((kernel_dir, init)) = prerequisites() else {
        return;
    };
    let boot = boot(&kernel_dir, &init, &counter_config(), false);
    assert_clean_poweroff(&boot);
    assert!(
        boot.console
            .contains("has no ext4 filesystem; the host must format it before boot"),
        "no overlay error"
    );
    assert!(!boot.console.contains("COUNTER 1"));
}
