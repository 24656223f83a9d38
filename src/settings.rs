//! Daemon settings from `<config-dir>/hypeman.toml`: every field optional,
//! every default sensible. Parsing and validation live below the types.
//!
//! This module owns the settings file format, its defaults and the probe
//! that picks the default hypervisor. It does not check that the files it
//! names exist (a kernel may be installed after the daemon starts); the
//! modules that use them report that when they need them.
//!
//! Relative paths in the file (`data_dir`, `[guest]` paths, and binaries
//! written with a `/`) are resolved against the config dir, so a config dir
//! can be moved or checked in as a unit. A binary written without `/`
//! (`"qemu-system-x86_64"`) is a command name, looked up on `PATH` when run.
//! Problems are reported like declarations' (`path:line:column: message`,
//! see [`Diagnostic`]), all of them at once.

use crate::config_file::units::RawQuantity;
use crate::config_file::{ByteSize, Diagnostic, Problems, RawInt};
use crate::declaration::{EXEC_TOTAL_CEILING, MIN_MEMORY, MIN_OVERLAY_SIZE};
use crate::hypervisor::HypervisorKind;
// QEMU's accelerator is the backend's type; re-exported so the path
// `settings::Accel` keeps working.
pub use crate::hypervisor::qemu::Accel;
// The bounds `[limits]` sets are the declaration's rules; re-exported so the
// path `settings::Limits` keeps working.
pub use crate::declaration::Limits;
use serde::Deserialize;
use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestSettings {
    /// bzImage or PVH vmlinux.
    pub kernel: Option<PathBuf>,
    pub modules_dir: Option<PathBuf>,
    /// Extra kernel arguments, appended.
    pub cmdline: String,
    /// The guest's PID 1; default: `hypeman-init` next to the executable.
    pub init: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    pub binary: PathBuf,
    pub accel: Accel,
}

/// Whom VMMs run as (`[vmm]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmUsers {
    /// As the daemon: root, with no sandbox (the behaviour before issue 11).
    Root,
    /// Each guest's VMM as its own uid from `uid_range` (gid the same
    /// number), sandboxed: one VMM cannot reach another guest's files. The
    /// default.
    PerInstance,
}

/// `[vmm]`: `users`, `uid_range = "FIRST-LAST"`, `group` (the gid that may
/// read shared image disks and traverse the data dir).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmSettings {
    pub users: VmmUsers,
    pub uid_first: u32,
    pub uid_last: u32,
    pub group: u32,
}

/// Above the usual ranges of system (<1000), human (<60000) and
/// systemd's dynamic users (61184–65519), below container subuid ranges
/// (100000 and up, 65536 each).
const DEFAULT_VMM_UIDS: (u32, u32) = (70000, 70999);
const DEFAULT_VMM_GROUP: u32 = 69999;

impl Default for VmmSettings {
    fn default() -> Self {
        VmmSettings { users: VmmUsers::PerInstance, uid_first: DEFAULT_VMM_UIDS.0, uid_last: DEFAULT_VMM_UIDS.1, group: DEFAULT_VMM_GROUP }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudHypervisorSettings {
    pub binary: PathBuf,
}

/// Guest networking on the host (`[network]`): the bridge guests' TAPs
/// join and the subnet their addresses come from. The gateway is the
/// subnet's first address, given to the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    pub bridge: String,
    pub subnet: crate::network::Subnet,
    /// Written to guests' `/etc/resolv.conf`; empty: no name servers.
    pub dns: Vec<std::net::IpAddr>,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet: crate::network::Subnet::new(std::net::Ipv4Addr::new(10, 100, 0, 0), 16)
                .expect("the default subnet is valid"),
            dns: Vec::new(),
        }
    }
}

/// Reconciler timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileSettings {
    /// Every instance is reconciled at least this often.
    pub resync_interval: Duration,
    /// File events for one instance within this window are merged.
    pub debounce: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a guest gets to shut down before its VMM is killed.
    pub stop_grace: Duration,
    /// How often an instance with a live VMM is looked at, to notice a VMM
    /// or guest that went away.
    pub health_interval: Duration,
}

/// Size-based rotation of each guest's logs (copytruncate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A log rotates once it is larger than this.
    pub max_size: ByteSize,
    /// Rotated copies kept (`app.log.1` … `app.log.N`); 0 only truncates.
    pub keep: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { max_size: ByteSize(50 * ByteSize::MIB), keep: 3 }
    }
}

/// The smallest `logs.max_size`: rotation is checked once per resync, and
/// a smaller log would be rotated before anyone could read it.
const MIN_LOG_SIZE: ByteSize = ByteSize(ByteSize::MIB);
/// The most rotated copies kept per log.
const MAX_LOG_KEEP: i64 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The settings file, when one exists.
    pub source: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub default_hypervisor: HypervisorKind,
    /// `host:port` registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The filesystem of images' root disks: erofs (compact, read-only) or
    /// ext4 (for guest kernels without erofs).
    pub rootfs_format: crate::images::rootfs::RootfsFormat,
    pub guest: GuestSettings,
    pub qemu: QemuSettings,
    pub cloud_hypervisor: CloudHypervisorSettings,
    pub vmm: VmmSettings,
    pub network: NetworkSettings,
    pub limits: Limits,
    pub reconcile: ReconcileSettings,
    pub logs: LogSettings,
}

/// The settings file's name inside the config dir.
pub const SETTINGS_FILE: &str = "hypeman.toml";

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid settings {}", path.display())]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

impl SettingsError {
    /// The error as `path:line:column: message` lines.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            SettingsError::Read { path, source } => vec![Diagnostic::whole_file(
                path,
                format!("cannot read: {source}"),
            )],
            SettingsError::Invalid { diagnostics, .. } => diagnostics.clone(),
        }
    }
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            resync_interval: Duration::from_secs(30),
            debounce: Duration::from_millis(100),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5 * 60),
            stop_grace: Duration::from_secs(30),
            health_interval: Duration::from_secs(5),
        }
    }
}

const DEFAULT_DATA_DIR: &str = "/var/lib/hypeman";
const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";
const DEFAULT_CH_BINARY: &str = "cloud-hypervisor";
const DEFAULT_BRIDGE: &str = "hypeman0";

impl Settings {
    /// How the image store pulls and converts under these settings.
    pub fn image_store_options(&self) -> crate::images::ImageStoreOptions {
        crate::images::ImageStoreOptions {
            insecure_registries: self.insecure_registries.clone(),
            format: self.rootfs_format,
            ..crate::images::ImageStoreOptions::default()
        }
    }

    /// Every default, without probing the host: `default_hypervisor` is
    /// Cloud Hypervisor here, while [`Settings::load`] picks QEMU when no
    /// Cloud Hypervisor binary is found. For tests and as a base to edit.
    pub fn defaults() -> Settings {
        Settings {
            source: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            default_hypervisor: HypervisorKind::CloudHypervisor,
            insecure_registries: Vec::new(),
            rootfs_format: crate::images::rootfs::RootfsFormat::Erofs,
            guest: GuestSettings::default(),
            qemu: QemuSettings {
                binary: PathBuf::from(DEFAULT_QEMU_BINARY),
                accel: Accel::Auto,
            },
            cloud_hypervisor: CloudHypervisorSettings {
                binary: PathBuf::from(DEFAULT_CH_BINARY),
            },
            vmm: VmmSettings::default(),
            network: NetworkSettings::default(),
            limits: Limits::default(),
            reconcile: ReconcileSettings::default(),
            logs: LogSettings::default(),
        }
    }

    /// Load `<config_dir>/hypeman.toml`; a missing file means all defaults.
    /// `data_dir_override` (the `--data-dir` flag) wins over the file's
    /// `data_dir` and is used as given.
    pub fn load(
        config_dir: &Path,
        data_dir_override: Option<&Path>,
    ) -> Result<Settings, SettingsError> {
        Settings::load_with_probe(config_dir, data_dir_override, &|binary| {
            find_executable(binary).is_some()
        })
    }

    /// [`Settings::load`] with the "is this hypervisor binary installed?"
    /// question answered by `probe`, so tests do not depend on the host.
    pub fn load_with_probe(
        config_dir: &Path,
        data_dir_override: Option<&Path>,
        probe: &dyn Fn(&Path) -> bool,
    ) -> Result<Settings, SettingsError> {
        let path = config_dir.join(SETTINGS_FILE);
        // Follows symlinks: NixOS links /etc files into the store.
        let (text, source) = match std::fs::read_to_string(&path) {
            Ok(text) => (text, Some(path.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (String::new(), None),
            Err(source) => return Err(SettingsError::Read { path, source }),
        };
        let mut settings = Settings::parse(&path, &text, config_dir, data_dir_override, probe)
            .map_err(|diagnostics| SettingsError::Invalid {
                path: path.clone(),
                diagnostics,
            })?;
        settings.source = source;
        Ok(settings)
    }

    /// Parse and validate settings text. Pure apart from `probe`, which is
    /// asked only when the file does not set `default_hypervisor`. `path` is
    /// used in messages and recorded as `source`.
    pub fn parse(
        path: &Path,
        text: &str,
        config_dir: &Path,
        data_dir_override: Option<&Path>,
        probe: &dyn Fn(&Path) -> bool,
    ) -> Result<Settings, Vec<Diagnostic>> {
        let mut p = Problems::new(path, text);
        let raw: RawSettings = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                p.push(Diagnostic::from_toml(path, text, &e));
                return Err(p.into_sorted());
            }
        };
        let defaults = Settings::defaults();
        let resolve = |p: &mut Problems<'_>, key: &str, raw: &Spanned<String>| -> Option<PathBuf> {
            check_path(p, key, raw).then(|| config_dir.join(raw.get_ref()))
        };
        let binary = |p: &mut Problems<'_>,
                      key: &str,
                      raw: &Option<Spanned<String>>,
                      default: &Path|
         -> PathBuf {
            match raw {
                None => default.to_path_buf(),
                Some(b) if !b.get_ref().contains('/') => {
                    check_path(p, key, b);
                    PathBuf::from(b.get_ref())
                }
                Some(b) => resolve(p, key, b).unwrap_or_default(),
            }
        };

        let data_dir = match (data_dir_override, &raw.data_dir) {
            (Some(dir), data_dir) => {
                // Still checked: the file should be valid on its own.
                if let Some(d) = data_dir {
                    check_path(&mut p, "data_dir", d);
                }
                dir.to_path_buf()
            }
            (None, Some(d)) => resolve(&mut p, "data_dir", d).unwrap_or(defaults.data_dir),
            (None, None) => defaults.data_dir,
        };
        let cloud_hypervisor = CloudHypervisorSettings {
            binary: binary(
                &mut p,
                "cloud_hypervisor.binary",
                &raw.cloud_hypervisor.binary,
                &defaults.cloud_hypervisor.binary,
            ),
        };
        let qemu = QemuSettings {
            binary: binary(
                &mut p,
                "qemu.binary",
                &raw.qemu.binary,
                &defaults.qemu.binary,
            ),
            accel: match &raw.qemu.accel {
                None => Accel::Auto,
                Some(a) => match a.get_ref().as_str() {
                    "auto" => Accel::Auto,
                    "kvm" => Accel::Kvm,
                    "tcg" => Accel::Tcg,
                    _ => {
                        report(
                            &mut p,
                            "qemu.accel",
                            a,
                            "expected \"auto\", \"kvm\" or \"tcg\"",
                        );
                        Accel::Auto
                    }
                },
            },
        };
        let default_hypervisor = match &raw.default_hypervisor {
            None if probe(&cloud_hypervisor.binary) => HypervisorKind::CloudHypervisor,
            None => HypervisorKind::Qemu,
            Some(h) => match h.get_ref().as_str() {
                "cloud-hypervisor" => HypervisorKind::CloudHypervisor,
                "qemu" => HypervisorKind::Qemu,
                _ => {
                    report(
                        &mut p,
                        "default_hypervisor",
                        h,
                        "expected \"cloud-hypervisor\" or \"qemu\"",
                    );
                    HypervisorKind::Qemu
                }
            },
        };
        let rootfs_format = match &raw.rootfs_format {
            None => crate::images::rootfs::RootfsFormat::Erofs,
            Some(f) => match f.get_ref().as_str() {
                "erofs" => crate::images::rootfs::RootfsFormat::Erofs,
                "ext4" => crate::images::rootfs::RootfsFormat::Ext4,
                _ => {
                    report(&mut p, "rootfs_format", f, "expected \"erofs\" or \"ext4\"");
                    crate::images::rootfs::RootfsFormat::Erofs
                }
            },
        };
        let mut insecure_registries = Vec::new();
        for (i, r) in raw.insecure_registries.iter().enumerate() {
            if is_host_port(r.get_ref()) {
                insecure_registries.push(r.get_ref().clone());
            } else {
                report(
                    &mut p,
                    &format!("insecure_registries[{i}]"),
                    r,
                    "expected host:port, such as \"localhost:5000\" or \"[::1]:5000\"",
                );
            }
        }
        let guest = GuestSettings {
            kernel: raw
                .guest
                .kernel
                .as_ref()
                .and_then(|k| resolve(&mut p, "guest.kernel", k)),
            modules_dir: raw
                .guest
                .modules_dir
                .as_ref()
                .and_then(|m| resolve(&mut p, "guest.modules_dir", m)),
            cmdline: match &raw.guest.cmdline {
                None => String::new(),
                Some(c) => {
                    // The kernel reads its command line as one line.
                    if c.get_ref().chars().any(char::is_control) {
                        report(
                            &mut p,
                            "guest.cmdline",
                            c,
                            "must be one line without control characters",
                        );
                    }
                    c.get_ref().clone()
                }
            },
            init: raw
                .guest
                .init
                .as_ref()
                .and_then(|i| resolve(&mut p, "guest.init", i)),
        };
        let vmm = vmm(&mut p, &raw.vmm);
        let network = network(&mut p, &raw.network);
        let limits = limits(&mut p, &raw.limits);
        let reconcile = reconcile(&mut p, &raw.reconcile);
        let logs = logs(&mut p, &raw.logs);

        p.finish(Settings {
            source: Some(path.to_path_buf()),
            data_dir,
            default_hypervisor,
            insecure_registries,
            rootfs_format,
            guest,
            qemu,
            cloud_hypervisor,
            vmm,
            network,
            limits,
            reconcile,
            logs,
        })
    }
}

/// Where `binary` would be run from: itself when it names a path (has a
/// `/`), else the first executable of that name on `PATH`.
pub fn find_executable(binary: &Path) -> Option<PathBuf> {
    fn is_executable(path: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    if binary.as_os_str().is_empty() {
        return None;
    }
    if binary.components().count() > 1 || binary.is_absolute() {
        return is_executable(binary).then(|| binary.to_path_buf());
    }
    let path_var = std::env::var_os("PATH")?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn report(p: &mut Problems<'_>, key: &str, raw: &Spanned<String>, message: impl fmt::Display) {
    p.value(key, raw.span(), message);
}

/// A usable path string: not empty, no control characters (which no one
/// means in a path and which would garble every log line naming it).
fn check_path(p: &mut Problems<'_>, key: &str, raw: &Spanned<String>) -> bool {
    let text = raw.get_ref();
    if text.is_empty() {
        report(p, key, raw, "must not be empty");
        false
    } else if text.chars().any(char::is_control) {
        report(p, key, raw, "must not contain control characters");
        false
    } else {
        true
    }
}

/// `host:port`: a DNS name or IPv4 address, or a bracketed IPv6 address,
/// then a port 1–65535. The port is required because that is how
/// registries are named in image references (`localhost:5000/app`).
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        }
    };
    port_ok && host_ok
}

/// `"FIRST-LAST"`, both uids above 0, FIRST ≤ LAST.
pub fn parse_uid_range(text: &str) -> Result<(u32, u32), String> {
    let bad = || format!("expected \"FIRST-LAST\" uids above 0 (such as \"{}-{}\"), not {text:?}", DEFAULT_VMM_UIDS.0, DEFAULT_VMM_UIDS.1);
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let first: u32 = a.trim().parse().map_err(|_| bad())?;
    let last: u32 = b.trim().parse().map_err(|_| bad())?;
    // u32::MAX is (uid_t)-1, "no change" to setuid/chown.
    if first == 0 || last < first || last == u32::MAX {
        return Err(bad());
    }
    Ok((first, last))
}

fn vmm(p: &mut Problems<'_>, raw: &RawVmm) -> VmmSettings {
    let mut s = VmmSettings::default();
    if let Some(u) = &raw.users {
        match u.get_ref().as_str() {
            "root" => s.users = VmmUsers::Root,
            "per-instance" => s.users = VmmUsers::PerInstance,
            _ => report(p, "vmm.users", u, "expected \"root\" or \"per-instance\""),
        }
    }
    if let Some(r) = &raw.uid_range {
        match parse_uid_range(r.get_ref()) {
            Ok((first, last)) => (s.uid_first, s.uid_last) = (first, last),
            Err(message) => report(p, "vmm.uid_range", r, message),
        }
    }
    if let Some(g) = &raw.group {
        match u32::try_from(*g.get_ref()) {
            Ok(gid) if gid != 0 && gid != u32::MAX && !(s.uid_first..=s.uid_last).contains(&gid) => s.group = gid,
            _ => p.value("vmm.group", g.span(), "expected a gid above 0 and outside uid_range (the VMMs' own gids)"),
        }
    }
    s
}

fn network(p: &mut Problems<'_>, raw: &RawNetwork) -> NetworkSettings {
    let defaults = NetworkSettings::default();
    let bridge = match &raw.bridge {
        None => defaults.bridge,
        Some(b) => match crate::network::names::check_ifname(b.get_ref()) {
            Ok(()) if b.get_ref().starts_with(crate::network::names::TAP_PREFIX) => {
                // `hm…` names are the guests' TAPs; a bridge among them
                // could be taken for one and removed.
                report(p, "network.bridge", b, "must not start with \"hm\", the prefix of guest TAPs");
                defaults.bridge
            }
            Ok(()) => b.get_ref().clone(),
            Err(e) => {
                report(p, "network.bridge", b, e);
                defaults.bridge
            }
        },
    };
    let subnet = match &raw.subnet {
        None => defaults.subnet,
        Some(s) => match s.get_ref().parse::<crate::network::Subnet>() {
            Ok(subnet) => subnet,
            Err(e) => {
                report(p, "network.subnet", s, e);
                defaults.subnet
            }
        },
    };
    let mut dns = Vec::new();
    for (i, server) in raw.dns.iter().enumerate() {
        match server.get_ref().parse::<std::net::IpAddr>() {
            Ok(ip) => dns.push(ip),
            Err(_) => report(
                p,
                &format!("network.dns[{i}]"),
                server,
                "expected an IP address such as \"1.1.1.1\" or \"2606:4700::1111\"",
            ),
        }
    }
    NetworkSettings { bridge, subnet, dns }
}

/// The size at `key`, at least `min`; `default` when absent or reported.
fn size(p: &mut Problems<'_>, key: &str, raw: &Option<Spanned<RawQuantity>>, default: ByteSize, min: ByteSize) -> ByteSize {
    match raw {
        None => default,
        Some(s) => match s.get_ref().size() {
            Ok(bytes) if bytes >= min.0 => ByteSize(bytes),
            Ok(_) => {
                p.value(key, s.span(), format!("must be at least {min}"));
                default
            }
            Err(e) => {
                p.value(key, s.span(), e);
                default
            }
        },
    }
}

fn limits(p: &mut Problems<'_>, raw: &RawLimits) -> Limits {
    let defaults = Limits::default();
    let max_vcpus = match &raw.max_vcpus {
        None => defaults.max_vcpus,
        Some(v) => match u32::try_from(v.get_ref().0) {
            Ok(n) if n >= 1 => n,
            _ => {
                p.value("limits.max_vcpus", v.span(), "must be at least 1");
                defaults.max_vcpus
            }
        },
    };
    Limits {
        max_vcpus,
        max_memory: size(
            p,
            "limits.max_memory",
            &raw.max_memory,
            defaults.max_memory,
            MIN_MEMORY,
        ),
        max_overlay_size: size(
            p,
            "limits.max_overlay_size",
            &raw.max_overlay_size,
            defaults.max_overlay_size,
            MIN_OVERLAY_SIZE,
        ),
        max_declaration_size: size(
            p,
            "limits.max_declaration_size",
            &raw.max_declaration_size,
            defaults.max_declaration_size,
            MIN_DECLARATION_SIZE,
        ),
        max_exec_size: exec_size(p, &raw.max_exec_size, defaults.max_exec_size),
    }
}

/// The smallest `limits.max_declaration_size`: room for any sensible
/// declaration, so a typo in the unit does not refuse every file.
const MIN_DECLARATION_SIZE: ByteSize = ByteSize(4 * ByteSize::KIB);
/// The smallest `limits.max_exec_size`: one argument of the kernel's
/// longest length still fits.
const MIN_EXEC_SIZE: ByteSize = ByteSize(128 * ByteSize::KIB);

/// `limits.max_exec_size`, between [`MIN_EXEC_SIZE`] and the guest kernel's
/// ceiling, past which no exec could succeed anyway.
fn exec_size(p: &mut Problems<'_>, raw: &Option<Spanned<RawQuantity>>, default: ByteSize) -> ByteSize {
    let size = size(p, "limits.max_exec_size", raw, default, MIN_EXEC_SIZE);
    match raw {
        Some(s) if size > EXEC_TOTAL_CEILING => {
            p.value(
                "limits.max_exec_size",
                s.span(),
                format!("must be at most {EXEC_TOTAL_CEILING}: the guest kernel refuses a larger command and environment"),
            );
            default
        }
        Some(_) | None => size,
    }
}

fn logs(p: &mut Problems<'_>, raw: &RawLogs) -> LogSettings {
    let defaults = LogSettings::default();
    let max_size = size(p, "logs.max_size", &raw.max_size, defaults.max_size, MIN_LOG_SIZE);
    let keep = match &raw.keep {
        None => defaults.keep,
        Some(k) => match usize::try_from(k.get_ref().0) {
            Ok(n) if k.get_ref().0 <= MAX_LOG_KEEP => n,
            _ => {
                p.value("logs.keep", k.span(), format!("must be between 0 and {MAX_LOG_KEEP}"));
                defaults.keep
            }
        },
    };
    LogSettings { max_size, keep }
}

/// A humantime error as one sentence a user can act on: its position
/// messages ("expected number at 0") mean nothing without the parser's view.
fn duration_problem(e: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    match e {
        E::UnknownUnit { .. } => e.to_string(),
        E::NumberOverflow => "too large".to_string(),
        E::InvalidCharacter(_) | E::NumberExpected(_) | E::Empty => {
            "not a duration; write for example \"100ms\", \"30s\", \"5m\" or \"1h 30m\"".to_string()
        }
    }
}

fn reconcile(p: &mut Problems<'_>, raw: &RawReconcile) -> ReconcileSettings {
    let defaults = ReconcileSettings::default();
    let mut duration =
        |key: &str, raw: &Option<Spanned<String>>, default: Duration, nonzero: bool| match raw {
            None => (default, None),
            Some(d) => match humantime::parse_duration(d.get_ref()) {
                Ok(v) if nonzero && v.is_zero() => {
                    report(p, &format!("reconcile.{key}"), d, "must be more than 0");
                    (default, None)
                }
                Ok(v) => (v, Some(d.span())),
                Err(e) => {
                    report(p, &format!("reconcile.{key}"), d, duration_problem(&e));
                    (default, None)
                }
            },
        };
    // A zero resync or backoff would spin the reconciler; zero debounce and
    // zero grace are legitimate ("act at once", "kill at once").
    let (resync_interval, _) = duration(
        "resync_interval",
        &raw.resync_interval,
        defaults.resync_interval,
        true,
    );
    let (debounce, _) = duration("debounce", &raw.debounce, defaults.debounce, false);
    let (backoff_initial, initial_span) = duration(
        "backoff_initial",
        &raw.backoff_initial,
        defaults.backoff_initial,
        true,
    );
    let (backoff_max, max_span) =
        duration("backoff_max", &raw.backoff_max, defaults.backoff_max, true);
    let (stop_grace, _) = duration("stop_grace", &raw.stop_grace, defaults.stop_grace, false);
    let (health_interval, _) = duration(
        "health_interval",
        &raw.health_interval,
        defaults.health_interval,
        true,
    );
    if backoff_max < backoff_initial {
        let message = format!(
            "reconcile.backoff_max ({}) must not be less than reconcile.backoff_initial ({})",
            humantime::format_duration(backoff_max),
            humantime::format_duration(backoff_initial)
        );
        // Point at whichever of the two the user wrote.
        match max_span.or(initial_span) {
            Some(span) => p.at(span, message),
            None => p.file(message),
        }
    }
    ReconcileSettings {
        resync_interval,
        debounce,
        backoff_initial,
        backoff_max,
        stop_grace,
        health_interval,
    }
}

/// The outside format of `hypeman.toml`; see the module doc.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    data_dir: Option<Spanned<String>>,
    default_hypervisor: Option<Spanned<String>>,
    #[serde(default)]
    insecure_registries: Vec<Spanned<String>>,
    rootfs_format: Option<Spanned<String>>,
    #[serde(default)]
    guest: RawGuest,
    #[serde(default)]
    qemu: RawQemu,
    #[serde(default)]
    cloud_hypervisor: RawCloudHypervisor,
    #[serde(default)]
    vmm: RawVmm,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    reconcile: RawReconcile,
    #[serde(default)]
    logs: RawLogs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    max_size: Option<Spanned<RawQuantity>>,
    keep: Option<Spanned<RawInt>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    bridge: Option<Spanned<String>>,
    subnet: Option<Spanned<String>>,
    #[serde(default)]
    dns: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuest {
    kernel: Option<Spanned<String>>,
    modules_dir: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    init: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQemu {
    binary: Option<Spanned<String>>,
    accel: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVmm {
    users: Option<Spanned<String>>,
    uid_range: Option<Spanned<String>>,
    group: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloudHypervisor {
    binary: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_vcpus: Option<Spanned<RawInt>>,
    max_memory: Option<Spanned<RawQuantity>>,
    max_overlay_size: Option<Spanned<RawQuantity>>,
    max_declaration_size: Option<Spanned<RawQuantity>>,
    max_exec_size: Option<Spanned<RawQuantity>>,
}

/// Durations are strings in `humantime` syntax: "30s", "100ms", "5m", "1h 30m".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    #[serde(default, deserialize_with = "duration_text")]
    resync_interval: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    debounce: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    backoff_initial: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    backoff_max: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    stop_grace: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    health_interval: Option<Spanned<String>>,
}

/// A duration string; `stop_grace = 30` is refused with a message that says
/// what to write instead of "expected a string" (seconds? milliseconds?).
fn duration_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Spanned<String>>, D::Error> {
    struct DurationText(String);

    impl<'de> Deserialize<'de> for DurationText {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = DurationText;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a duration string with a unit, such as \"30s\" or \"100ms\"")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationText, E> {
                    Ok(DurationText(v.to_string()))
                }
            }
            deserializer.deserialize_str(V)
        }
    }

    let text = Spanned::<DurationText>::deserialize(deserializer)?;
    let span = text.span();
    Ok(Some(Spanned::new(span, text.into_inner().0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::fs;

    const CONFIG: &str = "/etc/hypeman";

    fn found(_: &Path) -> bool {
        true
    }

    fn not_found(_: &Path) -> bool {
        false
    }

    fn parse(text: &str) -> Result<Settings, Vec<Diagnostic>> {
        Settings::parse(
            Path::new("/etc/hypeman/hypeman.toml"),
            text,
            Path::new(CONFIG),
            None,
            &found,
        )
    }

    #[test]
    fn an_empty_file_means_the_documented_defaults() {
        let settings = parse("").unwrap();
        assert_eq!(
            Settings {
                source: None,
                ..settings
            },
            Settings::defaults()
        );
        let d = Settings::defaults();
        assert_eq!(d.data_dir, Path::new("/var/lib/hypeman"));
        assert_eq!(
            d.qemu,
            QemuSettings {
                binary: "qemu-system-x86_64".into(),
                accel: Accel::Auto
            }
        );
        assert_eq!(d.cloud_hypervisor.binary, Path::new("cloud-hypervisor"));
        assert_eq!(
            d.guest,
            GuestSettings {
                kernel: None,
                modules_dir: None,
                cmdline: String::new(),
                init: None
            }
        );
        assert_eq!(d.network.bridge, "hypeman0");
        assert_eq!(d.network.subnet.to_string(), "10.100.0.0/16");
        assert_eq!(d.network.subnet.gateway().to_string(), "10.100.0.1");
        assert!(d.network.dns.is_empty());
        assert_eq!(
            d.limits,
            Limits {
                max_vcpus: 32,
                max_memory: ByteSize(64 << 30),
                max_overlay_size: ByteSize(1 << 40),
                max_declaration_size: ByteSize(1 << 20),
                max_exec_size: ByteSize(1 << 20),
            }
        );
        assert_eq!(
            d.reconcile,
            ReconcileSettings {
                resync_interval: Duration::from_secs(30),
                debounce: Duration::from_millis(100),
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(300),
                stop_grace: Duration::from_secs(30),
                health_interval: Duration::from_secs(5),
            }
        );
        assert_eq!(d.logs, LogSettings { max_size: ByteSize(50 << 20), keep: 3 });
    }

    #[test]
    fn log_rotation_limits_are_settings() {
        let s = parse("[logs]\nmax_size = \"1GiB\"\nkeep = 0\n").unwrap();
        assert_eq!(s.logs, LogSettings { max_size: ByteSize(1 << 30), keep: 0 });
        let s = parse("[logs]\nkeep = 100\n").unwrap();
        assert_eq!(s.logs, LogSettings { max_size: ByteSize(50 << 20), keep: 100 });
    }

    #[test]
    fn default_hypervisor_follows_the_probe_of_the_configured_binary() {
        let asked = RefCell::new(Vec::new());
        let probe = |b: &Path| {
            asked.borrow_mut().push(b.to_path_buf());
            false
        };
        let path = Path::new("/etc/hypeman/hypeman.toml");
        let s = Settings::parse(
            path,
            "[cloud_hypervisor]\nbinary = \"bin/ch\"\n",
            Path::new(CONFIG),
            None,
            &probe,
        );
        assert_eq!(s.unwrap().default_hypervisor, HypervisorKind::Qemu);
        assert_eq!(*asked.borrow(), [PathBuf::from("/etc/hypeman/bin/ch")]);

        assert_eq!(
            parse("").unwrap().default_hypervisor,
            HypervisorKind::CloudHypervisor
        );
        let s = Settings::parse(path, "", Path::new(CONFIG), None, &not_found).unwrap();
        assert_eq!(s.default_hypervisor, HypervisorKind::Qemu);

        // An explicit choice is not second-guessed, and the probe not run.
        asked.borrow_mut().clear();
        let s = Settings::parse(
            path,
            "default_hypervisor = \"cloud-hypervisor\"\n",
            Path::new(CONFIG),
            None,
            &probe,
        );
        assert_eq!(
            s.unwrap().default_hypervisor,
            HypervisorKind::CloudHypervisor
        );
        assert!(asked.borrow().is_empty());
    }

    #[test]
    fn relative_paths_are_resolved_against_the_config_dir() {
        let s = parse(
            r#"
            data_dir = "state"
            [guest]
            kernel = "vmlinux"
            modules_dir = "/lib/modules/6.12"
            init = "../libexec/hypeman-init"
            [qemu]
            binary = "./qemu/bin/qemu-system-x86_64"
            [cloud_hypervisor]
            binary = "cloud-hypervisor-v44"
            "#,
        )
        .unwrap();
        assert_eq!(s.data_dir, Path::new("/etc/hypeman/state"));
        assert_eq!(
            s.guest.kernel.as_deref(),
            Some(Path::new("/etc/hypeman/vmlinux"))
        );
        assert_eq!(
            s.guest.modules_dir.as_deref(),
            Some(Path::new("/lib/modules/6.12"))
        );
        assert_eq!(
            s.guest.init.as_deref(),
            Some(Path::new("/etc/hypeman/../libexec/hypeman-init"))
        );
        assert_eq!(
            s.qemu.binary,
            Path::new("/etc/hypeman/./qemu/bin/qemu-system-x86_64")
        );
        // No `/`: a command name for PATH, not a file in the config dir.
        assert_eq!(s.cloud_hypervisor.binary, Path::new("cloud-hypervisor-v44"));
    }

    #[test]
    fn the_data_dir_flag_wins_over_the_file() {
        let path = Path::new("/etc/hypeman/hypeman.toml");
        let text = "data_dir = \"/srv/hypeman\"\n";
        let s = Settings::parse(
            path,
            text,
            Path::new(CONFIG),
            Some(Path::new("/tmp/hm")),
            &found,
        )
        .unwrap();
        assert_eq!(s.data_dir, Path::new("/tmp/hm"));
        assert_eq!(parse(text).unwrap().data_dir, Path::new("/srv/hypeman"));
    }

    #[test]
    fn the_example_settings_file_is_valid_and_matches_its_snapshot() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let text = fs::read_to_string(dir.join(SETTINGS_FILE)).unwrap();
        let settings = Settings::parse(
            Path::new("examples/hypeman.toml"),
            &text,
            Path::new("examples"),
            None,
            &not_found,
        );
        let settings = settings.unwrap_or_else(|d| {
            panic!("{}", d.iter().map(|d| format!("{d}\n")).collect::<String>())
        });
        insta::assert_debug_snapshot!("example_settings", settings);
        // It documents the defaults: only the values it sets on purpose differ.
        let defaults = Settings::defaults();
        assert_eq!(settings.limits, defaults.limits);
        assert_eq!(settings.reconcile, defaults.reconcile);
        assert_eq!(settings.logs, defaults.logs);
        assert_eq!(settings.qemu, defaults.qemu);
        assert_eq!(settings.data_dir, defaults.data_dir);

        // And through `load`, from the directory itself.
        let loaded = Settings::load_with_probe(&dir, None, &not_found).unwrap();
        assert_eq!(loaded.source, Some(dir.join(SETTINGS_FILE)));
        assert_eq!(
            Settings {
                source: None,
                ..loaded
            },
            Settings {
                source: None,
                ..settings
            }
        );
    }

    #[test]
    fn a_missing_file_means_defaults_and_no_source() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Settings::load_with_probe(tmp.path(), Some(Path::new("/data")), &found).unwrap();
        assert_eq!(s.source, None);
        assert_eq!(
            s,
            Settings {
                data_dir: "/data".into(),
                ..Settings::defaults()
            }
        );
    }

    #[test]
    fn load_errors_carry_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SETTINGS_FILE);
        fs::write(&path, "[limits]\nmax_vcpus = 0\n").unwrap();
        let err = Settings::load_with_probe(tmp.path(), None, &found).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("invalid settings {}", path.display())
        );
        assert_eq!(
            err.diagnostics()[0].to_string(),
            format!(
                "{}:2:13: limits.max_vcpus = 0: must be at least 1",
                path.display()
            )
        );

        // A directory where the file should be: unreadable, not "missing".
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let err = Settings::load_with_probe(tmp.path(), None, &found).unwrap_err();
        assert!(matches!(err, SettingsError::Read { .. }), "{err:?}");
    }

    /// One input per distinct message, rendered into one snapshot.
    #[test]
    fn vmm_users_default_to_per_instance_and_parse() {
        assert_eq!(Settings::defaults().vmm, VmmSettings::default());
        assert_eq!(VmmSettings::default().users, VmmUsers::PerInstance);
        assert_eq!(parse("[vmm]\nusers = \"root\"\n").unwrap().vmm.users, VmmUsers::Root);
        let s = parse("[vmm]\nusers = \"per-instance\"\nuid_range = \"300000 - 300009\"\ngroup = 299999\n").unwrap();
        assert_eq!(s.vmm, VmmSettings { users: VmmUsers::PerInstance, uid_first: 300000, uid_last: 300009, group: 299999 });
        assert_eq!(parse_uid_range("5-5"), Ok((5, 5)));
        for bad in ["", "5", "5-", "-5", "a-b", "0-5", "6-5", "1-4294967295", "1-2-3"] {
            assert!(parse_uid_range(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn every_error_message() {
        let cases = [
            ("syntax error", "data_dir = /var/lib/hypeman\n"),
            ("unknown top-level key", "datadir = \"/srv\"\n"),
            ("unknown table", "[networking]\nbridge = \"br0\"\n"),
            ("unknown key in [network]", "[network]\nnat = true\n"),
            (
                "bad network",
                "[network]\nbridge = \"a-bridge-name-too-long\"\nsubnet = \"10.100.0.1/16\"\ndns = [\"1.1.1.1\", \"dns.google\"]\n",
            ),
            ("bridge with the TAP prefix", "[network]\nbridge = \"hmbr\"\nsubnet = \"10.0.0.0/31\"\n"),
            ("unknown key in [guest]", "[guest]\ninitrd = \"/boot/initrd\"\n"),
            ("unknown key in [qemu]", "[qemu]\nmachine = \"q35\"\n"),
            ("unknown key in [cloud_hypervisor]", "[cloud_hypervisor]\npath = \"/bin/ch\"\n"),
            ("unknown key in [limits]", "[limits]\nmax_cpus = 4\n"),
            ("unknown key in [reconcile]", "[reconcile]\ninterval = \"1m\"\n"),
            ("wrong type", "insecure_registries = \"localhost:5000\"\n"),
            ("unknown rootfs format", "rootfs_format = \"squashfs\"\n"),
            ("duration as a number", "[reconcile]\nstop_grace = 30\n"),
            ("empty paths", "data_dir = \"\"\n[guest]\nkernel = \"\"\n[qemu]\nbinary = \"\"\n"),
            ("control characters", "[guest]\ninit = \"/sbin/init\\n\"\ncmdline = \"quiet\\nsplash\"\n"),
            ("unknown hypervisor", "default_hypervisor = \"kvm\"\n"),
            ("unknown accel", "[qemu]\naccel = \"hvf\"\n"),
            (
                "bad registries",
                "insecure_registries = [\"localhost\", \"localhost:0\", \"reg:99999\", \"-bad-:5000\", \"::1:5000\", \"[::1]:5000\", \"http://reg:5000\"]\n",
            ),
            ("bad limits", "[limits]\nmax_vcpus = -1\nmax_memory = \"32MiB\"\nmax_overlay_size = \"1TB\"\n"),
            ("input limits out of range", "[limits]\nmax_declaration_size = \"1KiB\"\nmax_exec_size = \"4MiB\"\n"),
            ("exec size under one string", "[limits]\nmax_exec_size = \"64KiB\"\n"),
            (
                "bad durations",
                "[reconcile]\nresync_interval = \"0s\"\ndebounce = \"soon\"\nbackoff_initial = \"10\"\nstop_grace = \"-1s\"\n",
            ),
            ("bad log rotation", "[logs]\nmax_size = \"512KiB\"\nkeep = -1\n"),
            ("log rotation over the limits", "[logs]\nmax_size = \"1GB\"\nkeep = 101\n"),
            ("unknown key in [logs]", "[logs]\nmax_files = 3\n"),
            ("unknown vmm users", "[vmm]\nusers = \"nobody\"\n"),
            ("bad uid ranges", "[vmm]\nuid_range = \"0-10\"\ngroup = 0\n"),
            ("reversed uid range", "[vmm]\nuid_range = \"200-100\"\n"),
            ("vmm group inside the uid range", "[vmm]\nuid_range = \"100-200\"\ngroup = 150\n"),
            ("backoff max below initial", "[reconcile]\nbackoff_initial = \"10s\"\nbackoff_max = \"5s\"\n"),
            ("backoff initial above the default max", "[reconcile]\nbackoff_initial = \"10m\"\n"),
        ];
        let mut out = String::new();
        for (title, text) in cases {
            let diagnostics = match parse(text) {
                Ok(s) => panic!("{title}: accepted: {s:?}"),
                Err(d) => d,
            };
            out.push_str(&format!("── {title} ──\n{text}"));
            for d in diagnostics {
                out.push_str(&format!("  → {d}\n"));
            }
            out.push('\n');
        }
        insta::assert_snapshot!("error_messages", out);
    }

    #[test]
    fn registries_are_host_and_port() {
        for ok in [
            "localhost:5000",
            "registry.lan:443",
            "10.0.0.2:5000",
            "[::1]:5000",
            "[fe80::1]:1",
        ] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in [
            "localhost",
            ":5000",
            "host:",
            "host:+1",
            "host:65536",
            "a..b:1",
            "[::1:5000",
            "a b:1",
            "[zz]:1",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn find_executable_needs_the_execute_bit() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join("cloud-hypervisor");
        let plain = tmp.path().join("notes");
        fs::write(&exe, "#!/bin/sh\n").unwrap();
        fs::write(&plain, "").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_executable(&exe), Some(exe.clone()));
        assert_eq!(find_executable(&plain), None);
        assert_eq!(find_executable(tmp.path()), None);
        assert_eq!(find_executable(Path::new("")), None);
        // `sh` is on PATH on every machine these tests run on.
        assert!(find_executable(Path::new("sh")).is_some());
        assert_eq!(
            find_executable(Path::new("hypeman-surely-not-installed")),
            None
        );
    }
}
