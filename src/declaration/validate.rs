//! Meaning checks on a parsed declaration: `RawInstance` → `InstanceSpec`.
//! Owns every rule about what values are allowed and every default. Pure: no
//! IO, no knowledge of which hypervisor the host defaults to, so a file is
//! valid or not the same way on every machine.
//!
//! Every check reports into `Problems` and carries on with a stand-in value,
//! so one run shows all of a file's problems.

use super::env_file::is_env_name;
use super::host::{kind_problem, VolumeHost};
use super::limits::{Limits, EXEC_STRING_MAX, EXEC_STRING_OVERHEAD};
use super::raw::{RawInstance, RawVolume};
use super::spec::{
    ByteSize, DesiredState, HypervisorKind, InstanceSpec, IoLimit, NetworkSpec, RestartPolicy,
    VolumeSpec,
};
use crate::config_file::units::RawQuantity;
use crate::config_file::{Problems, RawInt};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

const MIB: u64 = ByteSize::MIB;

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY: ByteSize = ByteSize(512 * MIB);
pub const DEFAULT_HOTPLUG_MEMORY: ByteSize = ByteSize(0);
pub const DEFAULT_OVERLAY_SIZE: ByteSize = ByteSize(ByteSize::GIB);

/// The least memory the bundled guest kernel (Debian's cloud kernel) and
/// hypeman-init boot in, with a little room: measured under QEMU, 64 MiB
/// boots nothing, 72 MiB panics ("System is deadlocked on memory") while
/// the initrd unpacks, 76 and 78 MiB boot a busybox app
/// (`tests/e2e_qemu.rs` boots this minimum).
pub const MIN_MEMORY: ByteSize = ByteSize(80 * MIB);
/// Cloud Hypervisor requires guest RAM in multiples of 2 MiB. Checked for
/// every instance: validity must not depend on the host's default hypervisor.
pub const MEMORY_ALIGN: ByteSize = ByteSize(2 * MIB);
/// Cloud Hypervisor hot-plugs memory only in multiples of 128 MiB.
pub const HOTPLUG_ALIGN: ByteSize = ByteSize(128 * MIB);
/// The boot memory a guest needs besides [`MIN_MEMORY`] to hold hotplug
/// memory: the kernel keeps the `struct page` array of plugged memory
/// (64 bytes per 4 KiB page, 1/64 of it) in boot memory, because plugged
/// memory is onlined movable and cannot hold kernel data. Measured under
/// QEMU with the bundled kernel: 80 MiB + 1 GiB stalls before the app
/// starts, 96 MiB + 1 GiB, 82 MiB + 128 MiB and 128 MiB + 3 GiB boot with
/// all of it plugged.
pub const fn hotplug_boot_memory(hotplug: ByteSize) -> ByteSize {
    ByteSize(hotplug.0.div_ceil(64).next_multiple_of(MEMORY_ALIGN.0))
}
/// With hotplug memory QEMU's q35 announces RAM above 4 GiB, so the guest
/// kernel reserves its 64 MiB DMA bounce buffer (swiotlb) at boot. hypeman
/// turns it off unless a passthrough device might need it
/// (`hypervisor::qemu::argv`).
pub const PASSTHROUGH_BOUNCE_BUFFER: ByteSize = ByteSize(64 * MIB);
/// Smallest writable overlay worth formatting.
pub const MIN_OVERLAY_SIZE: ByteSize = ByteSize(16 * MIB);

const SYSFS_PCI: &str = "/sys/bus/pci/devices/";

/// Names a value in messages: `key = value` exactly as written, or `key
/// (default value)` when the file left it out.
struct Field {
    key: String,
    span: Option<Range<usize>>,
    default: String,
    /// Shown as `key = …`: an `env` value may be a secret, and messages
    /// end up in the daemon's log and `status`.
    redacted: bool,
}

impl Field {
    fn written<T>(key: impl Into<String>, raw: &Spanned<T>) -> Field {
        Field {
            key: key.into(),
            span: Some(raw.span()),
            default: String::new(),
            redacted: false,
        }
    }

    /// [`Field::written`] for a value never to be repeated in a message.
    fn secret<T>(key: impl Into<String>, raw: &Spanned<T>) -> Field {
        Field { redacted: true, ..Field::written(key, raw) }
    }

    fn defaulted(key: impl Into<String>, shown: impl std::fmt::Display) -> Field {
        Field {
            key: key.into(),
            span: None,
            default: shown.to_string(),
            redacted: false,
        }
    }

    fn report(&self, p: &mut Problems<'_>, message: impl std::fmt::Display) {
        match &self.span {
            Some(span) if self.redacted => p.at(span.clone(), format!("{} = …: {message}", self.key)),
            Some(span) => p.value(&self.key, span.clone(), message),
            None => p.file(format!(
                "{} (default {}): {message}",
                self.key, self.default
            )),
        }
    }
}

pub(crate) fn validate(
    p: &mut Problems<'_>,
    name: String,
    source: PathBuf,
    raw: RawInstance,
    limits: &Limits,
    host: &dyn VolumeHost,
) -> InstanceSpec {
    let image = image(p, raw.image.as_ref());
    let state = state(p, raw.state.as_ref());
    let restart = restart(p, raw.restart.as_ref());
    let hypervisor = hypervisor(p, raw.hypervisor.as_ref());
    let vcpus = vcpus(p, raw.vcpus.as_ref(), limits);
    let (memory, hotplug_memory) = memory(
        p,
        raw.memory.as_ref(),
        raw.hotplug_memory.as_ref(),
        !raw.devices.is_empty(),
        limits,
    );
    let overlay_size = overlay_size(p, raw.overlay_size.as_ref(), limits);
    let entrypoint = raw
        .entrypoint
        .as_ref()
        .map(|args| argv(p, "entrypoint", &args.0, true));
    let cmd = raw.cmd.as_ref().map(|args| argv(p, "cmd", &args.0, false));
    let workdir = raw.workdir.as_ref().map(|w| workdir(p, w));
    let env = env(p, &raw.env);
    let env_files = env_files(p, &raw.env_files);
    exec_size(p, &raw, limits);
    let network = NetworkSpec {
        enabled: raw.network.enabled.unwrap_or(false),
        bandwidth_down: IoLimit {
            bytes_per_sec: raw
                .network
                .bandwidth_down
                .as_ref()
                .map(|r| rate(p, "network.bandwidth_down", r)),
            ops_per_sec: None,
        },
        bandwidth_up: IoLimit {
            bytes_per_sec: raw
                .network
                .bandwidth_up
                .as_ref()
                .map(|r| rate(p, "network.bandwidth_up", r)),
            ops_per_sec: None,
        },
    };
    if hypervisor == Some(HypervisorKind::Qemu) {
        // Whether QEMU can is the backend's rule; here it gets the key's
        // position. A limit that did not parse still counts as one asked for.
        for (key, raw, limit) in [
            ("network.bandwidth_down", &raw.network.bandwidth_down, &network.bandwidth_down),
            ("network.bandwidth_up", &raw.network.bandwidth_up, &network.bandwidth_up),
        ] {
            if let Some(r) = raw {
                if !crate::hypervisor::qemu::supports_network_limit(limit) {
                    Field::written(key, r).report(
                        p,
                        "QEMU cannot limit network bandwidth; leave it out or use hypervisor = \"cloud-hypervisor\"",
                    );
                }
            }
        }
    }
    let disk_io = IoLimit {
        bytes_per_sec: raw
            .disk_io
            .bytes_per_sec
            .as_ref()
            .map(|r| rate(p, "disk_io.bytes_per_sec", r)),
        ops_per_sec: raw.disk_io.iops.as_ref().map(|i| iops(p, i)),
    };
    let devices = devices(p, &raw.devices);
    if state == DesiredState::Standby && !devices.is_empty() {
        if let Some(s) = &raw.state {
            // A VFIO device's state lives in the hardware, outside any snapshot.
            Field::written("state", s).report(
                p,
                "not possible with passthrough devices, which cannot be snapshotted",
            );
        }
    }
    let volumes = volumes(p, &raw.volumes, host);

    InstanceSpec {
        name,
        source,
        image,
        state,
        restart,
        hypervisor,
        vcpus,
        memory,
        hotplug_memory,
        overlay_size,
        entrypoint,
        cmd,
        workdir,
        env,
        env_files,
        // Read only where the host's files are looked at (`load_instance`).
        env_files_digest: None,
        network,
        disk_io,
        devices,
        volumes,
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn image(p: &mut Problems<'_>, raw: Option<&Spanned<String>>) -> String {
    let Some(raw) = raw else {
        p.file("missing required key `image`");
        return String::new();
    };
    let image = raw.get_ref();
    let field = Field::written("image", raw);
    if image.trim().is_empty() {
        field.report(p, "must not be empty");
    } else if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        field.report(p, "must not contain spaces or control characters");
    } else if let Some((transport, rest)) = ["oci-archive:", "oci:"]
        .iter()
        .find_map(|t| image.strip_prefix(t).map(|rest| (t, rest)))
    {
        // The daemon's working directory is `/`, so a relative layout path
        // would silently mean something else than where the user wrote it.
        if !rest.starts_with('/') {
            field.report(p, format!("the path after `{transport}` must be absolute"));
        }
    }
    image.clone()
}

fn state(p: &mut Problems<'_>, raw: Option<&Spanned<String>>) -> DesiredState {
    let Some(raw) = raw else {
        return DesiredState::Running;
    };
    match raw.get_ref().as_str() {
        "running" => DesiredState::Running,
        "standby" => DesiredState::Standby,
        "stopped" => DesiredState::Stopped,
        _ => {
            Field::written("state", raw)
                .report(p, "expected \"running\", \"standby\" or \"stopped\"");
            DesiredState::Running
        }
    }
}

fn restart(p: &mut Problems<'_>, raw: Option<&Spanned<String>>) -> RestartPolicy {
    let Some(raw) = raw else {
        return RestartPolicy::default();
    };
    match raw.get_ref().as_str() {
        "always" => RestartPolicy::Always,
        "on-failure" => RestartPolicy::OnFailure,
        "never" => RestartPolicy::Never,
        _ => {
            Field::written("restart", raw)
                .report(p, "expected \"always\", \"on-failure\" or \"never\"");
            RestartPolicy::default()
        }
    }
}

fn hypervisor(p: &mut Problems<'_>, raw: Option<&Spanned<String>>) -> Option<HypervisorKind> {
    let raw = raw?;
    match raw.get_ref().as_str() {
        "cloud-hypervisor" => Some(HypervisorKind::CloudHypervisor),
        "qemu" => Some(HypervisorKind::Qemu),
        _ => {
            Field::written("hypervisor", raw)
                .report(p, "expected \"cloud-hypervisor\" or \"qemu\"");
            None
        }
    }
}

fn vcpus(p: &mut Problems<'_>, raw: Option<&Spanned<RawInt>>, limits: &Limits) -> u32 {
    let Some(raw) = raw else {
        if DEFAULT_VCPUS > limits.max_vcpus {
            Field::defaulted("vcpus", DEFAULT_VCPUS).report(
                p,
                format!("exceeds limits.max_vcpus ({})", limits.max_vcpus),
            );
        }
        return DEFAULT_VCPUS;
    };
    match u32::try_from(raw.get_ref().0) {
        Ok(n) if (1..=limits.max_vcpus).contains(&n) => n,
        _ => {
            Field::written("vcpus", raw).report(
                p,
                format!(
                    "must be between 1 and {} (limits.max_vcpus)",
                    limits.max_vcpus
                ),
            );
            DEFAULT_VCPUS
        }
    }
}

/// A size value, or its default; `None` when it did not parse (reported).
fn size(
    p: &mut Problems<'_>,
    key: &str,
    raw: Option<&Spanned<RawQuantity>>,
    default: ByteSize,
) -> (Option<ByteSize>, Field) {
    let Some(raw) = raw else {
        return (Some(default), Field::defaulted(key, default));
    };
    let field = Field::written(key, raw);
    match raw.get_ref().size() {
        Ok(bytes) => (Some(ByteSize(bytes)), field),
        Err(e) => {
            field.report(p, e);
            (None, field)
        }
    }
}

fn memory(
    p: &mut Problems<'_>,
    raw_memory: Option<&Spanned<RawQuantity>>,
    raw_hotplug: Option<&Spanned<RawQuantity>>,
    passthrough: bool,
    limits: &Limits,
) -> (ByteSize, ByteSize) {
    let (memory, memory_field) = size(p, "memory", raw_memory, DEFAULT_MEMORY);
    let (hotplug, hotplug_field) = size(p, "hotplug_memory", raw_hotplug, DEFAULT_HOTPLUG_MEMORY);
    let mut memory_fits = false;
    if let Some(m) = memory {
        if m < MIN_MEMORY {
            let unitless = raw_memory.is_some_and(|raw| raw.get_ref().is_unitless());
            let hint = if unitless && m.0 > 0 {
                format!("; a number without a unit is bytes: write \"{}MiB\" for {} MiB", m.0, m.0)
            } else {
                String::new()
            };
            memory_field.report(p, format!("must be at least {MIN_MEMORY}{hint}"));
        } else if m.0 % MEMORY_ALIGN.0 != 0 {
            memory_field.report(
                p,
                format!(
                    "must be a multiple of {MEMORY_ALIGN} (Cloud Hypervisor's memory granularity)"
                ),
            );
        } else if m > limits.max_memory {
            memory_field.report(
                p,
                format!("exceeds limits.max_memory ({})", limits.max_memory),
            );
        } else {
            memory_fits = true;
        }
    }
    if let Some(h) = hotplug {
        if h.0 % HOTPLUG_ALIGN.0 != 0 {
            hotplug_field.report(p, format!("must be 0 or a multiple of {HOTPLUG_ALIGN} (Cloud Hypervisor's hotplug granularity)"));
        } else if let (true, Some(m)) = (memory_fits, memory) {
            let total = m.0.checked_add(h.0);
            if total.is_none_or(|t| t > limits.max_memory.0) {
                hotplug_field.report(
                    p,
                    format!(
                        "memory + hotplug_memory exceeds limits.max_memory ({})",
                        limits.max_memory
                    ),
                );
            } else if h.0 > 0 {
                let bounce = if passthrough { PASSTHROUGH_BOUNCE_BUFFER.0 } else { 0 };
                let needed = ByteSize(MIN_MEMORY.0 + hotplug_boot_memory(h).0 + bounce);
                if m < needed {
                    let why = if passthrough {
                        format!(", and {PASSTHROUGH_BOUNCE_BUFFER} for the DMA bounce buffer a passthrough device keeps")
                    } else {
                        String::new()
                    };
                    hotplug_field.report(
                        p,
                        format!(
                            "needs memory of at least {needed}: the guest kernel boots in {MIN_MEMORY} and keeps the page \
                             array of hotplug memory ({}) in boot memory{why}",
                            hotplug_boot_memory(h)
                        ),
                    );
                }
            }
        }
    }
    (
        memory.unwrap_or(DEFAULT_MEMORY),
        hotplug.unwrap_or(DEFAULT_HOTPLUG_MEMORY),
    )
}

fn overlay_size(
    p: &mut Problems<'_>,
    raw: Option<&Spanned<RawQuantity>>,
    limits: &Limits,
) -> ByteSize {
    let (size, field) = size(p, "overlay_size", raw, DEFAULT_OVERLAY_SIZE);
    if let Some(s) = size {
        if s < MIN_OVERLAY_SIZE {
            field.report(p, format!("must be at least {MIN_OVERLAY_SIZE}"));
        } else if s > limits.max_overlay_size {
            field.report(
                p,
                format!(
                    "exceeds limits.max_overlay_size ({})",
                    limits.max_overlay_size
                ),
            );
        }
    }
    size.unwrap_or(DEFAULT_OVERLAY_SIZE)
}

fn argv(
    p: &mut Problems<'_>,
    key: &str,
    args: &[Spanned<String>],
    first_is_program: bool,
) -> Vec<String> {
    for (i, arg) in args.iter().enumerate() {
        let field = Field::written(format!("{key}[{i}]"), arg);
        // exec() takes C strings: a NUL would silently cut the argument.
        if arg.get_ref().contains('\0') {
            field.report(p, "must not contain a NUL character");
        } else if i == 0 && first_is_program && arg.get_ref().is_empty() {
            field.report(p, "the program to run must not be empty");
        } else if arg.get_ref().len() as u64 > EXEC_STRING_MAX {
            field.report(
                p,
                format!(
                    "is {} bytes; the guest kernel passes at most {EXEC_STRING_MAX} bytes per argument (MAX_ARG_STRLEN)",
                    arg.get_ref().len()
                ),
            );
        }
    }
    args.iter().map(|a| a.get_ref().clone()).collect()
}

fn workdir(p: &mut Problems<'_>, raw: &Spanned<String>) -> String {
    let dir = raw.get_ref();
    if !dir.starts_with('/') {
        Field::written("workdir", raw).report(p, "must be an absolute path");
    } else if dir.contains('\0') {
        Field::written("workdir", raw).report(p, "must not contain a NUL character");
    }
    dir.clone()
}

fn env(
    p: &mut Problems<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<String>>,
) -> BTreeMap<String, String> {
    // Report in file order, not key order, so messages read top to bottom.
    let mut entries: Vec<_> = raw.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        if !is_env_name(key.get_ref()) {
            p.at(
                key.span(),
                format!(
                    "env: {:?} is not a valid variable name (letters, digits and `_`, not starting with a digit)",
                    key.get_ref()
                ),
            );
        } else if value.get_ref().contains('\0') {
            Field::secret(format!("env.{}", key.get_ref()), value)
                .report(p, "must not contain a NUL character");
        } else if env_string_len(key, value) > EXEC_STRING_MAX {
            Field::secret(format!("env.{}", key.get_ref()), value).report(
                p,
                format!(
                    "{}=… is {} bytes; the guest kernel passes at most {EXEC_STRING_MAX} bytes per environment string (MAX_ARG_STRLEN)",
                    key.get_ref(),
                    env_string_len(key, value)
                ),
            );
        }
    }
    raw.iter()
        .map(|(k, v)| (k.get_ref().clone(), v.get_ref().clone()))
        .collect()
}

/// `env_files`: absolute host paths, checked for shape only. Their content
/// is not read here: validation is pure and runs where the files are not
/// (the Nix build of a config dir, a user who may not read the secrets);
/// the daemon reads them at every cold boot.
fn env_files(p: &mut Problems<'_>, raw: &[Spanned<String>]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for (i, file) in raw.iter().enumerate() {
        let text = file.get_ref();
        let field = Field::written(format!("env_files[{i}]"), file);
        if let Some(problem) = host_path_problem(text) {
            field.report(p, problem);
        } else if text.ends_with('/') {
            field.report(p, "names a directory; an env file is a file of NAME=value lines");
        } else if let Some(j) = out.iter().position(|f| f.as_os_str() == text.as_str()) {
            field.report(p, format!("same file as env_files[{j}]"));
        }
        out.push(PathBuf::from(text));
    }
    out
}

/// The bytes of `NAME=value`, the string the app's `envp` holds.
fn env_string_len(key: &Spanned<String>, value: &Spanned<String>) -> u64 {
    (key.get_ref().len() + 1 + value.get_ref().len()) as u64
}

/// The declared `entrypoint`, `cmd` and `env` together, as the guest
/// kernel counts them against its total (bytes, NUL and pointer per
/// string), against `limits.max_exec_size`. Reported once, at the string
/// (in file order) where the total passes the limit.
fn exec_size(p: &mut Problems<'_>, raw: &RawInstance, limits: &Limits) {
    let mut items: Vec<(Field, u64)> = Vec::new();
    for (key, argv) in [("entrypoint", &raw.entrypoint), ("cmd", &raw.cmd)] {
        for (i, arg) in argv.iter().flat_map(|a| a.0.iter()).enumerate() {
            items.push((Field::written(format!("{key}[{i}]"), arg), arg.get_ref().len() as u64));
        }
    }
    for (key, value) in &raw.env {
        items.push((Field::secret(format!("env.{}", key.get_ref()), value), env_string_len(key, value)));
    }
    items.sort_by_key(|(field, _)| field.span.as_ref().map_or(0, |s| s.start));
    let cost = |len: u64| len.saturating_add(EXEC_STRING_OVERHEAD);
    let total: u64 = items.iter().map(|(_, len)| cost(*len)).fold(0, u64::saturating_add);
    if total <= limits.max_exec_size.0 {
        return;
    }
    let mut sum = 0u64;
    for (field, len) in &items {
        sum = sum.saturating_add(cost(*len));
        if sum > limits.max_exec_size.0 {
            field.report(
                p,
                format!(
                    "entrypoint, cmd and env pass limits.max_exec_size ({}, {} bytes) here: {total} bytes in all, \
                     counting each string's NUL and 8-byte pointer as the guest kernel does",
                    limits.max_exec_size,
                    limits.max_exec_size.0
                ),
            );
            return;
        }
    }
}

fn rate(p: &mut Problems<'_>, key: &str, raw: &Spanned<RawQuantity>) -> u64 {
    let field = Field::written(key, raw);
    match raw.get_ref().rate() {
        Ok(0) => {
            field.report(p, "must be more than 0; leave it out for no limit");
            0
        }
        Ok(bps) => bps,
        Err(e) => {
            field.report(p, e);
            0
        }
    }
}

fn iops(p: &mut Problems<'_>, raw: &Spanned<RawInt>) -> u64 {
    match u64::try_from(raw.get_ref().0) {
        Ok(n) if n > 0 => n,
        _ => {
            Field::written("disk_io.iops", raw)
                .report(p, "must be more than 0; leave it out for no limit");
            0
        }
    }
}

/// `DDDD:BB:DD.F` with hex digits, device ≤ 0x1f and function ≤ 7, the
/// form the kernel uses for sysfs names. Returned lower-cased.
fn pci_address(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let hex = |range: Range<usize>| b[range].iter().all(u8::is_ascii_hexdigit);
    if b.len() != 12 || b[4] != b':' || b[7] != b':' || b[10] != b'.' {
        return None;
    }
    if !(hex(0..4) && hex(5..7) && hex(8..10) && (b'0'..=b'7').contains(&b[11])) {
        return None;
    }
    let device = u8::from_str_radix(&s[8..10], 16).ok()?;
    (device <= 0x1f).then(|| s.to_ascii_lowercase())
}

/// Devices are stored as sysfs paths whichever way they were written, so two
/// spellings of one device compare equal and do not count as a change.
fn devices(p: &mut Problems<'_>, raw: &[Spanned<String>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, dev) in raw.iter().enumerate() {
        let text = dev.get_ref();
        let address = text
            .strip_prefix(SYSFS_PCI)
            .map(|a| a.trim_end_matches('/'))
            .unwrap_or(text);
        let field = Field::written(format!("devices[{i}]"), dev);
        match pci_address(address) {
            Some(a) => {
                let path = format!("{SYSFS_PCI}{a}");
                if let Some(j) = out.iter().position(|d| *d == path) {
                    field.report(p, format!("same device as devices[{j}]"));
                }
                out.push(path);
            }
            None => field.report(
                p,
                format!(
                    "expected a PCI address such as \"0000:01:00.0\" or a path under {SYSFS_PCI}"
                ),
            ),
        }
    }
    out
}

/// `/data//x/` → `/data/x`; `None` for relative paths or `.`/`..` parts,
/// which would let a mount point mean something other than it reads.
fn normalize_guest_path(s: &str) -> Option<String> {
    if !s.starts_with('/') {
        return None;
    }
    let mut out = String::new();
    for part in s.split('/').filter(|c| !c.is_empty()) {
        if part == "." || part == ".." {
            return None;
        }
        out.push('/');
        out.push_str(part);
    }
    Some(if out.is_empty() { "/".to_string() } else { out })
}

/// Whether a host path has a `..` part, which makes what it names depend
/// on the symlinks along it rather than on how it reads.
/// What is wrong with `text` as a host path a declaration names (a volume
/// source, an env file), if anything: the rules both share.
fn host_path_problem(text: &str) -> Option<&'static str> {
    if !text.starts_with('/') {
        Some("must be an absolute host path")
    } else if has_control(text) {
        Some("must not contain control characters")
    } else if has_parent_part(text) {
        Some("must not contain `..`: write the path it means")
    } else {
        None
    }
}

fn has_parent_part(s: &str) -> bool {
    s.split('/').any(|part| part == "..")
}

/// A volume source: checked as written, then (when `host` looks) resolved
/// and checked for its kind. Returns the path the VM is to be given.
fn volume_source(
    p: &mut Problems<'_>,
    field: &Field,
    text: &str,
    block_device: bool,
    host: &dyn VolumeHost,
) -> PathBuf {
    let declared = PathBuf::from(text);
    if let Some(problem) = host_path_problem(text) {
        field.report(p, problem);
    } else {
        match host.inspect(&declared) {
            Ok(None) => {}
            Ok(Some(found)) => {
                if let Some(problem) = kind_problem(found.kind, block_device) {
                    let shown = if found.resolved == declared {
                        String::new()
                    } else {
                        format!(" (resolved to {})", found.resolved.display())
                    };
                    field.report(p, format!("{problem}{shown}"));
                }
                return found.resolved;
            }
            // Checked when the VM is made (see `declaration::host`): it
            // may be made later, or be visible only to the daemon (a user's
            // `hypeman validate` may not see into a root-only directory).
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied) => {}
            Err(e) => field.report(p, format!("cannot be inspected: {e}")),
        }
    }
    declared
}

fn volumes(p: &mut Problems<'_>, raw: &[Spanned<RawVolume>], host: &dyn VolumeHost) -> Vec<VolumeSpec> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for (i, vol) in raw.iter().enumerate() {
        let RawVolume {
            source,
            path,
            readonly,
            block_device,
        } = vol.get_ref();
        let block_device = block_device.unwrap_or(false);
        let (source, declared) = match source {
            None => {
                p.at(
                    vol.span(),
                    format!("volumes[{i}]: missing required key `source`"),
                );
                (PathBuf::new(), PathBuf::new())
            }
            Some(s) => {
                let field = Field::written(format!("volumes[{i}].source"), s);
                let resolved = volume_source(p, &field, s.get_ref(), block_device, host);
                // Compared resolved: two links to one file are one file, and
                // two block devices backed by one file corrupt it.
                if let Some(j) = out.iter().position(|v| v.source == resolved && !resolved.as_os_str().is_empty()) {
                    let also = if out[j].declared == Path::new(s.get_ref()) {
                        String::new()
                    } else {
                        format!(" (both are {})", resolved.display())
                    };
                    field.report(p, format!("already attached as volumes[{j}]{also}"));
                }
                (resolved, PathBuf::from(s.get_ref()))
            }
        };
        let mount = match path {
            None => {
                p.at(
                    vol.span(),
                    format!("volumes[{i}]: missing required key `path`"),
                );
                String::new()
            }
            Some(m) => {
                let field = Field::written(format!("volumes[{i}].path"), m);
                match normalize_guest_path(m.get_ref()) {
                    None => {
                        field.report(p, "must be an absolute guest path without `.` or `..`");
                        m.get_ref().clone()
                    }
                    Some(n) if n == "/" => {
                        field.report(p, "cannot mount over the guest's root");
                        n
                    }
                    Some(n) if has_control(&n) => {
                        field.report(p, "must not contain control characters");
                        n
                    }
                    Some(n) => {
                        if let Some(j) = out.iter().position(|v| v.mount == n) {
                            field.report(p, format!("already used by volumes[{j}]"));
                        }
                        n
                    }
                }
            }
        };
        out.push(VolumeSpec {
            source,
            declared,
            block_device,
            mount,
            readonly: readonly.unwrap_or(false),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        assert_eq!(pci_address("0000:01:00.0").as_deref(), Some("0000:01:00.0"));
        assert_eq!(pci_address("0000:AF:1f.7").as_deref(), Some("0000:af:1f.7"));
        for bad in [
            "01:00.0",
            "0000:01:20.0",
            "0000:01:00.8",
            "0000:0g:00.0",
            "0000-01:00.0",
            "",
            "0000:01:00.00",
        ] {
            assert_eq!(pci_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn guest_paths() {
        assert_eq!(normalize_guest_path("/data").as_deref(), Some("/data"));
        assert_eq!(
            normalize_guest_path("//data//x/").as_deref(),
            Some("/data/x")
        );
        assert_eq!(normalize_guest_path("/").as_deref(), Some("/"));
        assert_eq!(normalize_guest_path("data"), None);
        assert_eq!(normalize_guest_path("/data/../etc"), None);
        assert_eq!(normalize_guest_path("/./data"), None);
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_", "PATH", "my_var2", "_1"] {
            assert!(is_env_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "A=B", "É"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }
}
