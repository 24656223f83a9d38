//! The boot sequence, phase by phase, from the initramfs to the running app.
//! Every phase announces itself on the console, so a boot that stops shows
//! where. This module decides what goes where; the syscalls live in
//! `mounts`, `net`, `modules` and `supervise`.
//!
//! ```text
//!  initramfs /            newroot (overlayfs)
//!  ├─ /proc /sys /dev ──MS_MOVE──► /proc /sys /dev
//!  ├─ /mnt/config   (erofs, ro)   config.json, unmounted after reading
//!  ├─ /mnt/rootfs   (erofs|ext4, ro) ─┐ lowerdir
//!  ├─ /mnt/overlay  (ext4, rw)      ──┼ upperdir=upper, workdir=work
//!  └─ /newroot ◄──────────────────────┘ ──switch_root──► /
//! ```

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::acpi::AcpiEvents;
use crate::command;
use crate::console::say;
use crate::disks;
use crate::error::InitError;
use crate::modules::{self, LoadOutcome};
use crate::mounts;
use crate::net;
use crate::supervise::{self, Launch};
use hypeman_contract::config::{
    GuestConfig, CONFIG_FILE, OVERLAY_UPPER, OVERLAY_WORK, SERIAL_CONFIG,
};
use hypeman_contract::console::AppExit;
use hypeman_contract::modules::{parse_load_order, MODULE_LOAD_ORDER};
use crate::user::{self, Identity};

/// How long to wait for the expected disks to show up in sysfs.
const DISK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the NIC with the configured MAC (its driver probes
/// asynchronously; a loaded TCG host can take seconds).
const NIC_TIMEOUT: Duration = Duration::from_secs(10);

const CONFIG_MNT: &str = "/mnt/config";
const ROOTFS_MNT: &str = "/mnt/rootfs";
const OVERLAY_MNT: &str = "/mnt/overlay";
const NEW_ROOT: &str = "/newroot";

fn mkdir(path: impl AsRef<Path>) -> Result<(), InitError> {
    let path = path.as_ref();
    std::fs::create_dir_all(path).map_err(|e| InitError::io("create directory", path, e))
}

/// `path` (absolute, as the app sees it) under `root`.
fn under(root: &str, path: &str) -> PathBuf {
    Path::new(root).join(path.trim_start_matches('/'))
}

/// Runs the whole boot and the app; returns how the app ended.
pub fn boot(started: Instant) -> Result<AppExit, InitError> {
    mount_kernel_filesystems()?;
    say(&format!(
        "mounted /proc /sys /dev ({} ms)",
        started.elapsed().as_millis()
    ));

    load_modules()?;
    say(&format!(
        "modules loaded ({} ms)",
        started.elapsed().as_millis()
    ));

    // As soon as the channel's drivers are in: the agent finds its device
    // while the disks are being found, and serves before the app runs.
    crate::agent::start(say);

    // Right after the `button` driver is loaded: a stop asked for while the
    // disks are still being found is then acted on once the app runs.
    let acpi = match AcpiEvents::subscribe() {
        Ok(events) => Some(events),
        Err(e) => {
            say(&format!(
                "warning: the power button cannot stop the app: {}",
                crate::error::chain(&e)
            ));
            None
        }
    };

    let sys = Path::new("/sys");
    let dev = Path::new("/dev");
    let found = disks::wait_for(sys, dev, &[SERIAL_CONFIG.to_owned()], DISK_TIMEOUT)?;
    let config = read_config(&found[SERIAL_CONFIG])?;
    let wanted = config.required_serials();
    let disks = disks::wait_for(sys, dev, &wanted, DISK_TIMEOUT)?;
    say(&format!(
        "disks: {} ({} ms)",
        disks
            .iter()
            .map(|(serial, dev)| format!("{serial}={}", dev.display()))
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_millis()
    ));

    mount_root(&config, &disks)?;
    say(&format!(
        "root filesystem ready ({} ms)",
        started.elapsed().as_millis()
    ));

    set_hostname(&config.hostname)?;
    setup_network(&config)?;

    let identity = match &config.user {
        Some(spec) => user::resolve(spec, Path::new(NEW_ROOT))?,
        None => Identity::root(),
    };
    mounts::switch_root(Path::new(NEW_ROOT))?;
    mkdir(&config.workdir)?;
    std::env::set_current_dir(&config.workdir)
        .map_err(|e| InitError::io("enter workdir", &config.workdir, e))?;

    let launch = prepare_launch(&config, &identity)?;
    say(&format!(
        "starting {:?} as {}:{} in {} ({} ms)",
        command::argv(&config),
        identity.uid,
        identity.gid,
        config.workdir,
        started.elapsed().as_millis()
    ));
    // The app's SIGTERM → SIGKILL window, inside the host's grace.
    let window = hypeman_contract::config::app_stop_window(config.stop_grace_ms.map(Duration::from_millis));
    supervise::run(&launch, acpi.as_ref(), window, |notice| {
        say(&notice.to_string())
    })
}

fn mount_kernel_filesystems() -> Result<(), InitError> {
    let nosuid_noexec_nodev = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    for (fstype, target, flags) in [
        ("proc", "/proc", nosuid_noexec_nodev),
        ("sysfs", "/sys", nosuid_noexec_nodev),
        ("devtmpfs", "/dev", libc::MS_NOSUID),
    ] {
        mkdir(target)?;
        match mounts::mount(fstype, Path::new(target), fstype, flags, None) {
            Ok(()) => {}
            // Already mounted (CONFIG_DEVTMPFS_MOUNT, or a re-exec): fine.
            Err(InitError::Mount { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
    }
    crate::console::attach("/dev/console").map_err(|e| InitError::io("open", "/dev/console", e))?;
    // Ctrl-Alt-Del then arrives as SIGINT, which is forwarded to the app,
    // instead of an immediate hard reboot.
    // SAFETY: reboot(2) with a command that takes no argument.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    Ok(())
}

fn load_modules() -> Result<(), InitError> {
    let list = match std::fs::read_to_string(MODULE_LOAD_ORDER) {
        Ok(text) => parse_load_order(&text),
        // A kernel with every driver built in needs no list.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(InitError::io("read", MODULE_LOAD_ORDER, e)),
    };
    for path in &list {
        match modules::load(path) {
            LoadOutcome::Loaded | LoadOutcome::AlreadyLoaded => {}
            // Its device is not there (ptp_kvm without KVM): nothing to drive.
            LoadOutcome::Failed(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            LoadOutcome::Failed(e) => say(&format!(
                "warning: cannot load module {}: {e}",
                path.display()
            )),
        }
    }
    Ok(())
}

fn read_config(device: &Path) -> Result<GuestConfig, InitError> {
    mkdir(CONFIG_MNT)?;
    let dev = device.to_string_lossy();
    mounts::mount_any(
        &dev,
        Path::new(CONFIG_MNT),
        &["erofs", "ext4"],
        libc::MS_RDONLY,
    )?;
    let path = Path::new(CONFIG_MNT).join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| InitError::io("read", &path, e))?;
    let config = GuestConfig::parse(&bytes).map_err(|source| InitError::Config { path, source })?;
    // SAFETY: unmounting our own mount point; failure only leaks the mount.
    unsafe {
        if let Ok(target) = CString::new(CONFIG_MNT) {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
    Ok(config)
}

fn mount_root(
    config: &GuestConfig,
    disks: &std::collections::BTreeMap<String, PathBuf>,
) -> Result<(), InitError> {
    let rootfs = disks[hypeman_contract::config::SERIAL_ROOTFS]
        .to_string_lossy()
        .into_owned();
    let overlay_dev = &disks[hypeman_contract::config::SERIAL_OVERLAY];

    mkdir(ROOTFS_MNT)?;
    let fstype = mounts::mount_any(
        &rootfs,
        Path::new(ROOTFS_MNT),
        &["erofs", "ext4"],
        libc::MS_RDONLY,
    )?;
    say(&format!("rootfs {rootfs} mounted read-only ({fstype})"));

    if !mounts::has_ext_filesystem(overlay_dev)? {
        return Err(InitError::OverlayUnformatted {
            device: overlay_dev.clone(),
        });
    }
    mkdir(OVERLAY_MNT)?;
    mounts::mount(
        &overlay_dev.to_string_lossy(),
        Path::new(OVERLAY_MNT),
        "ext4",
        0,
        None,
    )?;
    let upper = under(OVERLAY_MNT, OVERLAY_UPPER);
    let work = under(OVERLAY_MNT, OVERLAY_WORK);
    mkdir(&upper)?;
    mkdir(&work)?;

    mkdir(NEW_ROOT)?;
    let options = format!(
        "lowerdir={ROOTFS_MNT},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mounts::mount("overlay", Path::new(NEW_ROOT), "overlay", 0, Some(&options))?;

    // Volumes before /dev moves into the new root: their device paths are
    // the initramfs' /dev ones.
    for vol in &config.volumes {
        let device = disks[&vol.serial].to_string_lossy().into_owned();
        let target = under(NEW_ROOT, &vol.mount);
        mkdir(&target)?;
        let flags = if vol.readonly { libc::MS_RDONLY } else { 0 };
        let fstype = mounts::mount_any(&device, &target, &["ext4", "erofs"], flags)?;
        say(&format!(
            "volume {} ({device}, {fstype}) mounted on {}{}",
            vol.serial,
            vol.mount,
            if vol.readonly { " read-only" } else { "" }
        ));
    }
    for dir in ["/proc", "/sys", "/dev"] {
        let target = under(NEW_ROOT, dir);
        mkdir(&target)?;
        mounts::move_mount(Path::new(dir), &target)?;
    }
    // devtmpfs has no /dev/pts or /dev/shm; apps (and shells) expect both.
    for (fstype, dir, data) in [
        ("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "mode=1777"),
    ] {
        let target = under(NEW_ROOT, dir);
        mkdir(&target)?;
        if let Err(e) = mounts::mount(
            fstype,
            &target,
            fstype,
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(data),
        ) {
            say(&format!("warning: {}", crate::error::chain(&e)));
        }
    }

    Ok(())
}

fn set_hostname(hostname: &str) -> Result<(), InitError> {
    // SAFETY: pointer and length describe a live byte slice.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(InitError::last_os("set the hostname"));
    }
    Ok(())
}

/// Writes `path` (under the new root) afresh. An image's `/etc/hosts` or
/// `/etc/resolv.conf` may be a symlink (into `/run`, say): it is replaced,
/// never followed.
fn replace_file(path: &str, contents: &str) -> Result<(), InitError> {
    let target = under(NEW_ROOT, path);
    if let Some(parent) = target.parent() {
        mkdir(parent)?;
    }
    match std::fs::remove_file(&target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(InitError::io("replace", target, e)),
    }
    std::fs::write(&target, contents).map_err(|e| InitError::io("write", &target, e))
}

fn setup_network(config: &GuestConfig) -> Result<(), InitError> {
    net::loopback_up()?;
    replace_file("/etc/hostname", &format!("{}\n", config.hostname))?;
    replace_file(
        "/etc/hosts",
        &net::hosts_file(&config.hostname, config.network.as_ref().map(|n| n.ip)),
    )?;
    let Some(network) = &config.network else {
        return Ok(());
    };
    let mac = hypeman_contract::config::parse_mac(&network.mac).map_err(|source| InitError::Config {
        path: PathBuf::from(CONFIG_FILE),
        source,
    })?;
    let sys = under(NEW_ROOT, "/sys");
    let start = Instant::now();
    let interface = loop {
        if let Some(name) = net::interface_by_mac(&sys, &mac)? {
            break name;
        }
        if start.elapsed() >= NIC_TIMEOUT {
            return Err(InitError::NoInterface {
                mac: network.mac.clone(),
                found: net::interface_names(&sys),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    net::configure(&interface, network.ip, network.prefix_len, network.gateway)?;

    replace_file("/etc/resolv.conf", &net::resolv_conf(&network.dns))?;
    say(&format!(
        "network: {interface} {}/{} via {}",
        network.ip, network.prefix_len, network.gateway
    ));
    Ok(())
}

fn prepare_launch(config: &GuestConfig, identity: &Identity) -> Result<Launch, InitError> {
    let argv = command::argv(config);
    let env = command::environment(config, identity);
    let path_var = env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(hypeman_contract::config::DEFAULT_PATH);
    let program = command::resolve_program(&argv[0], path_var, Path::new("/"))?;
    let c = |s: &str| CString::new(s).map_err(|_| InitError::Nul { what: s.to_owned() });
    Ok(Launch {
        program: c(&program.to_string_lossy())?,
        argv: argv.iter().map(|a| c(a)).collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|(k, v)| c(&format!("{k}={v}")))
            .collect::<Result<_, _>>()?,
        uid: identity.uid,
        gid: identity.gid,
    })
}
