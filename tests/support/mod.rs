//! What the integration tests share: the gate that runs real-VM tests only
//! when asked (and then fails on anything missing), the rule for tests that
//! need a host tool ([`gate`]), the busybox root tree
//! their guests boot and that tree as an OCI image, the hypeman CLI and
//! daemon launchers, the fake Cloud Hypervisor ([`fake_ch`]) and the
//! daemon-driving world of the end-to-end scenarios ([`daemon`]), and a
//! real local registry to pull images from ([`registry`]).

#![allow(dead_code)] // each test binary uses its own subset

pub mod daemon;
pub mod fake_ch;
pub mod gate;
pub mod registry;
pub mod upgrade;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A temp dir for a test's config and data dirs that VMM users may pass
/// through (`0711`): VMMs run as their own users by default, and the daemon
/// refuses a data dir they cannot reach (a fresh temp dir is `0700`).
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod the temp dir");
    tmp
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn require(path: &Path, how: &str) {
    assert!(path.exists(), "{} is missing: {how}", path.display());
}

/// Whether `program` is installed (in `PATH`, or at an absolute path).
pub fn which(program: &str) -> bool {
    gate::installed(program)
}

/// `(kernel dir, static hypeman-init)` when `HYPEMAN_REAL_VM=1`, else `None`
/// with a printed reason. Once asked for, a missing tool, kernel or init is a
/// failure: a requested real test must not pass without running.
pub fn real_vm(what: &str, tools: &[&str]) -> Option<(PathBuf, PathBuf)> {
    if std::env::var("HYPEMAN_REAL_VM").as_deref() != Ok("1") {
        eprintln!("skipping {what}: set HYPEMAN_REAL_VM=1 and HYPEMAN_GUEST_KERNEL_DIR (see scripts/test.sh)");
        return None;
    }
    for tool in ["qemu-system-x86_64"].iter().chain(tools) {
        assert!(which(tool), "{tool} is not installed (see scripts/setup.sh)");
    }
    require(Path::new("/bin/busybox"), "apt-get install busybox-static");
    let kernel_dir = std::env::var_os("HYPEMAN_GUEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/guest-kernel"));
    let fetch_hint = format!("run scripts/fetch-guest-kernel.sh {}", kernel_dir.display());
    require(&kernel_dir.join("vmlinuz"), &fetch_hint);
    require(&kernel_dir.join("lib/modules"), &fetch_hint);
    let init = std::env::var_os("HYPEMAN_INIT_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/x86_64-unknown-linux-gnu/release/hypeman-init"));
    require(
        &init,
        "RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p hypeman-init --target x86_64-unknown-linux-gnu",
    );
    Some((kernel_dir, init))
}

/// `root/bin/busybox` and a link to it for each applet.
pub fn busybox_tree(root: &Path, applets: &[&str]) {
    std::fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
}

/// Runs `cmd`, fails the test with its output if it fails, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OCI layout under `work` holding busybox and links for `applets`,
/// built with umoci; returns the `oci:<dir>:<tag>` reference.
pub fn busybox_image(work: &Path, applets: &[&str]) -> String {
    let root = work.join("rootfs");
    busybox_tree(&root, applets);
    let layout = work.join("oci");
    run_ok(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
    let image = format!("{}:busybox", layout.display());
    run_ok(Command::new("umoci").args(["new", "--image", &image]));
    run_ok(Command::new("umoci").args(["insert", "--image", &image]).arg(&root).arg("/"));
    format!("oci:{image}")
}

/// `hypeman --config-dir CONFIG --data-dir DATA`, run through `wrapper`
/// (`["ip", "netns", "exec", NS]`, say) when it is not empty, with the
/// environment's own dirs removed so only these count.
pub fn hypeman(wrapper: &[&str], config: &Path, data: &Path) -> Command {
    // `HYPEMAN_DAEMON_BINARY` runs another build (a benchmark's baseline).
    let binary = std::env::var("HYPEMAN_DAEMON_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hypeman").to_string());
    let mut c = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    c.arg("--config-dir").arg(config).arg("--data-dir").arg(data);
    c.env_remove("HYPEMAN_CONFIG_DIR").env_remove("HYPEMAN_DATA_DIR");
    c
}

/// Starts `hypeman daemon` from `cmd` (see [`hypeman`]), its output
/// appended to `log`.
pub fn spawn_daemon(mut cmd: Command, log: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the daemon log");
    cmd.arg("daemon")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the daemon log"))
        .stderr(log)
        .spawn()
        .expect("start the daemon")
}

/// Settings that boot QEMU TCG guests with `kernel_dir`'s kernel and
/// `init`, reconcile quickly, and add `extra` (TOML tables) at the end.
pub fn tcg_settings(kernel_dir: &Path, init: &Path, extra: &str) -> String {
    format!(
        "default_hypervisor = \"qemu\"\n[guest]\nkernel = \"{}\"\nmodules_dir = \"{}\"\ninit = \"{}\"\n\
         [qemu]\naccel = \"tcg\"\n[reconcile]\nresync_interval = \"2s\"\nhealth_interval = \"200ms\"\n\
         backoff_initial = \"200ms\"\nbackoff_max = \"2s\"\nstop_grace = \"3s\"\n{extra}",
        kernel_dir.join("vmlinuz").display(),
        kernel_dir.join("lib/modules").display(),
        init.display()
    )
}

/// A config dir (`root/etc`, with an empty `instances/`) holding
/// [`tcg_settings`], and the data dir beside it (`root/data`, not created).
pub fn tcg_config_dir(root: &Path, kernel_dir: &Path, init: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let config = root.join("etc");
    std::fs::create_dir_all(config.join("instances")).expect("mkdir instances");
    std::fs::write(config.join("hypeman.toml"), tcg_settings(kernel_dir, init, extra)).expect("write hypeman.toml");
    (config, root.join("data"))
}
