//! The emulated VMM behind the API: one optional VM, the state rules
//! Cloud Hypervisor enforces, its error codes and bodies by version, and
//! snapshot/restore through real files.
//!
//! ```text
//!   (no VM) ──vm.create──► Created ──vm.boot──► Running ◄──vm.resume── Paused
//!      ▲  ▲                  ▲                     │ vm.pause ─────────► │
//!      │  └──vm.delete───────┤◄────vm.shutdown─────┘      vm.snapshot ◄──┘
//!      └─ vm.restore (only here) ──► Paused
//!   vm.power-button while Running: the guest powers off, the process exits
//!   vmm.shutdown: 200 with Content-Length: 0, then the process exits
//! ```
//!
//! The "guest" is a counter: while the VM runs, [`Vmm::tick`] prints
//! `COUNTER n` to the serial port (the process's stdout in `Tty` mode, a
//! file truncated at every open in `File` mode, as the real VMM does). The
//! counter is saved in `state.json`, so a restored guest carries on.
//!
//! Refusals are worded as the real v53.0 server words them wherever that
//! was checked against the binary (reference/hypervisors.md, "Checked
//! against the real cloud-hypervisor v53.0 binary"): `["Error from API",
//! <headline of the endpoint>, <causes…>]`, e.g. "VM is not running" for
//! pause/resume/shutdown/power-button without a booted VM, "VM is already
//! created" for a second create, boot or a restore into a used VMM,
//! "Invalid transition: InvalidStateTransition(Paused, Paused)" for a
//! second pause, and [`RESTORE_IN_PROGRESS`] while an on-demand restore
//! prefaults. Cases nobody checked keep descriptive texts of the fake's own.

use crate::http::Response;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const V53: Version = Version { major: 53, minor: 0, patch: 0 };

    /// `53.0.0`, `v49.0`, `46.0`.
    pub fn parse(text: &str) -> Option<Version> {
        let text = text.trim().trim_start_matches('v');
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(Version { major, minor, patch })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub version: Version,
    /// `vm.snapshot` takes this long (the server answers nothing meanwhile).
    pub snapshot_delay: Duration,
    /// From v53 an on-demand restore goes on prefaulting guest memory in
    /// the background for this long after `vm.restore` has answered;
    /// meanwhile `vm.snapshot` and `vm.send-migration` are refused with the
    /// real server's words ([`RESTORE_IN_PROGRESS`]).
    pub prefault: Duration,
    /// Whether `OnDemand` restores can get a userfaultfd.
    pub userfaultfd: bool,
    /// How long the guest takes to (un)plug memory after `vm.resize`.
    pub resize_time: Duration,
    /// The guest ignores the ACPI power button.
    pub ignore_power_button: bool,
    pub pid: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            version: Version::V53,
            snapshot_delay: Duration::ZERO,
            prefault: Duration::ZERO,
            userfaultfd: true,
            resize_time: Duration::from_millis(60),
            ignore_power_button: false,
            pid: std::process::id(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
}

impl VmState {
    fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

/// What the server does after sending a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// The process exits (vmm.shutdown, or the guest powered off).
    Exit,
}

/// virtio-mem memory: what is plugged moves toward what was asked for
/// over `resize_time`, in 2 MiB blocks, as a guest driver would.
#[derive(Debug, Clone)]
struct Memory {
    base: u64,
    max: u64,
    virtio_mem: bool,
    from: u64,
    to: u64,
    since: Instant,
    span: Duration,
}

const BLOCK: u64 = 2 << 20;

impl Memory {
    fn actual(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.since);
        if self.span.is_zero() || elapsed >= self.span {
            return self.to;
        }
        let frac = elapsed.as_secs_f64() / self.span.as_secs_f64();
        let at = self.from as f64 + (self.to as f64 - self.from as f64) * frac;
        (at as u64) / BLOCK * BLOCK
    }

    fn request(&mut self, to: u64, now: Instant) {
        self.from = self.actual(now);
        self.to = to;
        self.since = now;
    }
}

/// Where the guest's serial port goes.
#[derive(Debug)]
enum Serial {
    None,
    Stdout,
    File(File),
}

#[derive(Debug)]
struct Vm {
    config: Value,
    state: VmState,
    memory: Memory,
    counter: u64,
    serial: Serial,
    /// Restored `OnDemand` on v53: snapshots are refused until then.
    prefault_until: Option<Instant>,
    next_disk: u32,
    /// TAPs the VM got as descriptors (`vm.add-net`, `vm.restore`), held
    /// as the real VMM holds them.
    net_fds: Vec<std::os::fd::OwnedFd>,
    /// The vsock device's guest side, when the VM has one; held for as
    /// long as the VM lives (dropping it stops serving).
    _agent: Option<crate::vsock::GuestAgent>,
}

/// What v53 answers a snapshot or migration while an on-demand restore
/// still prefaults: the root cause of its chain, word for word (checked
/// against the real v53.0 binary).
pub const RESTORE_IN_PROGRESS: &str = "VM on-demand memory restore is still in progress";
/// The root cause of lifecycle calls on a VMM with no booted VM.
const NOT_RUNNING: &str = "VM is not running";
const ALREADY_CREATED: &str = "VM is already created";
const NO_SUCH_FILE: &str = "No such file or directory (os error 2)";

/// A refusal, rendered by version in [`Vmm::refuse`].
enum Fail {
    /// No VM (or no config) where one is needed.
    NotCreated,
    /// Anything else the VMM refuses: the one cause below the headline.
    Refused(String),
    /// A cause with causes of its own, outermost first.
    Chain(Vec<String>),
    /// The body does not deserialize into the server's types.
    BadRequest(String),
}

pub struct Vmm {
    opts: Options,
    vm: Option<Vm>,
}

/// `file:///dir` → `/dir`.
fn file_url(url: &str) -> Result<PathBuf, Fail> {
    url.strip_prefix("file://")
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .ok_or_else(|| Fail::Refused(format!("Invalid URL {url:?}: only file:// is supported")))
}

fn u64_at(v: &Value, pointer: &str) -> Option<u64> {
    v.pointer(pointer).and_then(Value::as_u64)
}

fn open_serial(config: &Value) -> Result<Serial, String> {
    let mode = config.pointer("/serial/mode").and_then(Value::as_str).unwrap_or("Null");
    match mode {
        "Tty" => Ok(Serial::Stdout),
        "File" => {
            let path = config.pointer("/serial/file").and_then(Value::as_str).ok_or("serial File mode without a file")?;
            // Truncating, as Cloud Hypervisor does at every open.
            File::create(path).map(Serial::File).map_err(|e| format!("Error opening serial file {path}: {e}"))
        }
        "Off" | "Null" | "Pty" | "Socket" => Ok(Serial::None),
        other => Err(format!("unknown variant `{other}`")),
    }
}

/// Creates a snapshot file as Cloud Hypervisor does: `O_EXCL`, mode 0600.
/// `what` names it in the refusal ("VM config snapshot file").
fn write_new(path: &Path, what: &str, bytes: &[u8]) -> Result<(), Fail> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Fail::Chain(vec![format!("Error creating {what}"), e.to_string()]))?;
    f.write_all(bytes).map_err(|e| Fail::Chain(vec![format!("Error writing {what}"), e.to_string()]))
}

/// `path` cannot be opened: the chain v53 gives for a disk image.
fn disk_missing(path: &str) -> Fail {
    Fail::Chain(vec!["Cannot open disk path".into(), format!("I/O error (path={path} op=open)"), NO_SUCH_FILE.into()])
}

/// The text of `vm.resize` to the size the VM already has: v53 passes
/// virtio-mem's own error up with its `anyhow` backtrace, so the body is
/// long and spans lines. The first line is the real one; the frames are
/// this fake's (they differ by build anyway).
fn identical_size(hotplugged: u64) -> String {
    format!(
        "ResizeError(new size 0x{hotplugged:x} and requested_size are identical\n\n\
         Stack backtrace:\n   \
         0: anyhow::error::<impl anyhow::Error>::msg\n   \
         1: virtio_devices::mem::Mem::resize\n   \
         2: vmm::memory_manager::MemoryManager::virtio_mem_resize\n   \
         3: vmm::memory_manager::MemoryManager::resize\n   \
         4: vmm::vm::Vm::resize\n   \
         5: vmm::Vmm::vm_resize\n   \
         6: std::sys::backtrace::__rust_begin_short_backtrace)"
    )
}

impl Vmm {
    pub fn new(opts: Options) -> Vmm {
        Vmm { opts, vm: None }
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    pub fn options_mut(&mut self) -> &mut Options {
        &mut self.opts
    }

    /// The VM's state, `None` without a VM.
    pub fn state(&self) -> Option<VmState> {
        self.vm.as_ref().map(|vm| vm.state)
    }

    /// The guest's counter, `None` without a VM.
    pub fn counter(&self) -> Option<u64> {
        self.vm.as_ref().map(|vm| vm.counter)
    }

    /// The endpoints of the real server (v53), with their methods.
    pub fn method_of(endpoint: &str) -> Option<&'static str> {
        Some(match endpoint {
            "vmm.ping" | "vm.info" | "vm.counters" => "GET",
            "vmm.shutdown" | "vm.create" | "vm.delete" | "vm.boot" | "vm.pause" | "vm.resume" | "vm.shutdown"
            | "vm.reboot" | "vm.power-button" | "vm.resize" | "vm.resize-disk" | "vm.resize-zone" | "vm.add-device"
            | "vm.remove-device" | "vm.add-disk" | "vm.add-fs" | "vm.add-generic-vhost-user" | "vm.add-pmem"
            | "vm.add-net" | "vm.add-vsock" | "vm.add-vdpa" | "vm.add-user-device" | "vm.snapshot" | "vm.coredump"
            | "vm.nmi" | "vm.restore" | "vm.receive-migration" | "vm.send-migration" => "PUT",
            _ => return None,
        })
    }

    /// The guest runs for one tick: it prints its counter.
    pub fn tick(&mut self) {
        if let Some(vm) = self.vm.as_mut().filter(|vm| vm.state == VmState::Running) {
            vm.counter += 1;
            let line = format!("COUNTER {}\n", vm.counter);
            let _ = match &mut vm.serial {
                Serial::None => Ok(()),
                Serial::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(line.as_bytes()).and_then(|()| out.flush())
                }
                Serial::File(f) => f.write_all(line.as_bytes()),
            };
        }
    }

    fn headline(endpoint: &str) -> String {
        match endpoint {
            "vm.create" => "The VM could not be created".into(),
            "vm.boot" => "The VM could not boot".into(),
            "vm.pause" => "The VM could not be paused".into(),
            "vm.resume" => "The VM could not resume".into(),
            "vm.shutdown" => "The VM could not shutdown".into(),
            "vm.delete" => "The VM could not be deleted".into(),
            "vm.power-button" => "Error triggering power button".into(),
            "vm.info" => "The VM info is not available".into(),
            "vm.resize" => "The VM could not be resized".into(),
            "vm.add-disk" => "The disk could not be added to the VM".into(),
            "vm.remove-device" => "The device could not be removed from the VM".into(),
            "vm.snapshot" => "The VM could not be snapshotted".into(),
            "vm.restore" => "The VM could not be restored".into(),
            "vm.send-migration" => "Error starting migration sender".into(),
            other => format!("{other} failed"),
        }
    }

    /// The `HttpError` variant an endpoint's failure is wrapped in up to
    /// v46, whose body is that error's `Debug` form.
    fn debug_variant(endpoint: &str) -> String {
        endpoint
            .trim_start_matches("vmm.")
            .trim_start_matches("vm.")
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
            })
            .fold(if endpoint.starts_with("vmm.") { "Vmm".to_string() } else { "Vm".to_string() }, |a, w| a + &w)
    }

    /// A refusal as the server of `opts.version` sends it.
    fn refuse(&self, endpoint: &str, fail: Fail) -> Response {
        let v = self.opts.version;
        if v.major < 47 {
            // `format!("{:?}", error)` in plain text, although the
            // Content-Type still says JSON: `VmInfo(VmNotCreated)`.
            let (status, cause) = match fail {
                Fail::NotCreated => (500, "VmNotCreated".to_string()),
                Fail::Refused(cause) => (500, cause),
                Fail::Chain(causes) => (500, causes.join(": ")),
                Fail::BadRequest(cause) => (400, format!("SerdeJsonDeserialize({cause:?})")),
            };
            let body = format!("{}({cause})", Self::debug_variant(endpoint));
            return Response { status, body: Some(body.into_bytes()) };
        }
        let (status, causes) = match fail {
            Fail::NotCreated => (if v.major >= 53 { 404 } else { 500 }, vec!["VM is not created".to_string()]),
            Fail::Refused(cause) => (500, vec![cause]),
            Fail::Chain(causes) => (500, causes),
            Fail::BadRequest(cause) => (400, vec![cause]),
        };
        let mut chain = vec!["Error from API".to_string(), Self::headline(endpoint)];
        chain.extend(causes);
        Response::json(status, &json!(chain))
    }

    fn vm(&mut self) -> Result<&mut Vm, Fail> {
        self.vm.as_mut().ok_or(Fail::NotCreated)
    }

    /// The VM as the lifecycle calls need it: booted (a VM object exists,
    /// not just its config), else "VM is not running" whether or not there
    /// is a config.
    fn booted(&mut self) -> Result<&mut Vm, Fail> {
        self.vm.as_mut().filter(|vm| vm.state != VmState::Created).ok_or_else(|| Fail::Refused(NOT_RUNNING.into()))
    }

    /// `vm.pause` / `vm.resume`: `Running ⇄ Paused`; asking for the state
    /// the VM is already in is an invalid transition, in the real words.
    fn pause_or_resume(&mut self, to: VmState) -> Result<(), Fail> {
        let vm = self.booted()?;
        if vm.state == to {
            let (verb, name) = if to == VmState::Paused { ("pause", "Paused") } else { ("resume", "Running") };
            return Err(Fail::Chain(vec![
                format!("Cannot {verb} VM"),
                format!("Failed to {verb} migratable component"),
                format!("Invalid transition: InvalidStateTransition({name}, {name})"),
            ]));
        }
        vm.state = to;
        Ok(())
    }

    /// v53 refuses snapshots and migrations while an on-demand restore
    /// still prefaults guest memory.
    fn restore_in_progress(&self, now: Instant) -> Result<(), Fail> {
        let prefaulting = self.vm.as_ref().and_then(|vm| vm.prefault_until).is_some_and(|t| now < t);
        if self.opts.version.major >= 53 && prefaulting {
            return Err(Fail::Refused(RESTORE_IN_PROGRESS.into()));
        }
        Ok(())
    }

    /// Whether an on-demand restore is still prefaulting (tests look).
    pub fn prefaulting(&self) -> bool {
        self.restore_in_progress(Instant::now()).is_err()
    }

    /// Ends a prefault at once, as a test steps the fake.
    pub fn end_prefault(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            vm.prefault_until = None;
        }
    }

    /// Serves one request whose body already passed the spec check.
    pub fn handle(&mut self, endpoint: &str, body: &[u8]) -> (Response, After) {
        self.handle_with_fds(endpoint, body, Vec::new())
    }

    /// [`handle`](Self::handle), with the descriptors that came with the
    /// request. Only `vm.add-net` and `vm.restore` take them; the real
    /// `vm.create` drops those of its NICs, and other endpoints ignore them.
    pub fn handle_with_fds(&mut self, endpoint: &str, body: &[u8], fds: Vec<std::os::fd::OwnedFd>) -> (Response, After) {
        let now = Instant::now();
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return (self.refuse(endpoint, Fail::BadRequest(e.to_string())), After::Continue),
            }
        };
        let result = match endpoint {
            "vmm.ping" => Ok((self.ping(), After::Continue)),
            "vmm.shutdown" => Ok((Response::empty_ok(), After::Exit)),
            "vm.create" => self.create(body, now).map(|()| (Response::no_content(), After::Continue)),
            "vm.boot" => self.boot(now).map(|()| (Response::no_content(), After::Continue)),
            "vm.pause" => self.pause_or_resume(VmState::Paused).map(|()| (Response::no_content(), After::Continue)),
            "vm.resume" => self.pause_or_resume(VmState::Running).map(|()| (Response::no_content(), After::Continue)),
            "vm.power-button" => {
                let ignore = self.opts.ignore_power_button;
                self.booted().map(|vm| {
                    let off = vm.state == VmState::Running && !ignore;
                    (Response::no_content(), if off { After::Exit } else { After::Continue })
                })
            }
            "vm.shutdown" => self.booted().map(|vm| {
                // The Vm is dropped, its config kept: it reads as Created.
                vm.state = VmState::Created;
                vm.serial = Serial::None;
                (Response::no_content(), After::Continue)
            }),
            "vm.delete" => {
                self.vm = None;
                Ok((Response::no_content(), After::Continue))
            }
            "vm.info" => self.info(now).map(|v| (Response::json(200, &v), After::Continue)),
            "vm.resize" => self.resize(&body, now).map(|()| (Response::no_content(), After::Continue)),
            "vm.add-disk" => self.add_disk(body).map(|r| (r, After::Continue)),
            "vm.remove-device" => self.remove_device(&body).map(|()| (Response::no_content(), After::Continue)),
            "vm.snapshot" => self.snapshot(&body, now).map(|()| (Response::no_content(), After::Continue)),
            "vm.restore" => self.restore_with_fds(&body, fds, now).map(|()| (Response::no_content(), After::Continue)),
            "vm.add-net" => self.add_net(body, fds).map(|()| (Response::no_content(), After::Continue)),
            "vm.send-migration" => self.restore_in_progress(now).and_then(|()| {
                Err(Fail::Refused("fake-cloud-hypervisor does not emulate vm.send-migration".into()))
            }),
            other => Err(Fail::Refused(format!("fake-cloud-hypervisor does not emulate {other}"))),
        };
        match result {
            Ok(done) => done,
            Err(fail) => (self.refuse(endpoint, fail), After::Continue),
        }
    }

    fn ping(&self) -> Response {
        let v = self.opts.version;
        Response::json(
            200,
            &json!({
                "build_version": format!("v{}.{}", v.major, v.minor),
                "version": v.to_string(),
                "pid": self.opts.pid,
                "features": ["kvm"],
            }),
        )
    }

    fn create(&mut self, config: Value, now: Instant) -> Result<(), Fail> {
        if self.vm.is_some() {
            return Err(Fail::Refused(ALREADY_CREATED.into()));
        }
        // Beyond the spec: what the server's own types would refuse.
        let method = config.pointer("/memory/hotplug_method").and_then(Value::as_str).unwrap_or("Acpi");
        if method != "Acpi" && method != "VirtioMem" {
            return Err(Fail::BadRequest(format!("unknown variant `{method}`, expected `Acpi` or `VirtioMem`")));
        }
        let size = u64_at(&config, "/memory/size").unwrap_or(512 << 20);
        let hotplug = u64_at(&config, "/memory/hotplug_size").unwrap_or(0);
        let plugged = u64_at(&config, "/memory/hotplugged_size").unwrap_or(0);
        if method == "VirtioMem" && hotplug % (128 << 20) != 0 {
            return Err(Fail::Refused("Invalid hotplug_size: it must be a multiple of 128 MiB".into()));
        }
        if plugged > hotplug {
            return Err(Fail::Refused("hotplugged_size exceeds hotplug_size".into()));
        }
        for d in config.get("disks").and_then(Value::as_array).into_iter().flatten() {
            if d.get("image_type").is_none() {
                return Err(Fail::Refused("disk image_type must be given explicitly (auto-detection is deprecated)".into()));
            }
        }
        let memory = Memory {
            base: size,
            max: size + hotplug,
            virtio_mem: method == "VirtioMem",
            from: size + plugged,
            to: size + plugged,
            since: now,
            span: self.opts.resize_time,
        };
        let agent = crate::vsock::GuestAgent::start(&config, Duration::ZERO).map_err(Fail::Refused)?;
        self.vm = Some(Vm {
            config,
            state: VmState::Created,
            memory,
            counter: 0,
            serial: Serial::None,
            prefault_until: None,
            next_disk: 0,
            net_fds: Vec::new(),
            _agent: agent,
        });
        Ok(())
    }

    fn boot(&mut self, now: Instant) -> Result<(), Fail> {
        let vm = self.vm()?;
        if vm.state != VmState::Created {
            // A VM object exists (booted, paused): the same words as a
            // second create.
            return Err(Fail::Refused(ALREADY_CREATED.into()));
        }
        let missing = |pointer: &str| {
            vm.config.pointer(pointer).and_then(Value::as_str).filter(|p| !Path::new(p).exists()).is_some()
        };
        if missing("/payload/kernel") {
            return Err(Fail::Chain(vec!["Cannot open kernel file".into(), NO_SUCH_FILE.into()]));
        }
        if missing("/payload/initramfs") {
            return Err(Fail::Chain(vec!["Cannot open initramfs file".into(), NO_SUCH_FILE.into()]));
        }
        let disks = vm.config.get("disks").and_then(Value::as_array).into_iter().flatten();
        if let Some(path) = disks.filter_map(|d| d.get("path").and_then(Value::as_str)).find(|p| !Path::new(p).exists()) {
            return Err(disk_missing(path));
        }
        vm.serial = open_serial(&vm.config).map_err(Fail::Refused)?;
        let plugged = u64_at(&vm.config, "/memory/hotplugged_size").unwrap_or(0);
        vm.memory.from = vm.memory.base + plugged;
        vm.memory.to = vm.memory.from;
        vm.memory.since = now;
        vm.state = VmState::Running;
        Ok(())
    }

    fn info(&mut self, _now: Instant) -> Result<Value, Fail> {
        let vm = self.vm()?;
        Ok(json!({
            "config": vm.config,
            "state": vm.state.name(),
            // As the real server computes it: the config's `size +
            // hotplugged_size`, which `vm.resize` sets at once. What the
            // guest has really plugged is not in the API (it shows only in
            // the snapshot's size).
            "memory_actual_size": vm.memory.to,
            "device_tree": {},
        }))
    }

    fn resize(&mut self, body: &Value, now: Instant) -> Result<(), Fail> {
        let vm = self.vm()?;
        if body.get("desired_vcpus").is_some() || body.get("desired_balloon").is_some() {
            return Err(Fail::Refused("fake-cloud-hypervisor emulates memory resizes only".into()));
        }
        let Some(desired) = body.get("desired_ram").and_then(Value::as_u64) else {
            return Ok(());
        };
        let m = &mut vm.memory;
        if m.max == m.base {
            return Err(Fail::Refused("Memory resize is not allowed: no hotplug memory was configured".into()));
        }
        if desired < m.base {
            return Err(Fail::Refused(format!("desired_ram {desired} is below the boot memory {}", m.base)));
        }
        if desired > m.max {
            return Err(Fail::Refused(format!("desired_ram {desired} exceeds the hotplug limit {}", m.max)));
        }
        if !m.virtio_mem && desired < m.actual(now) {
            return Err(Fail::Refused("ACPI memory hotplug cannot shrink memory".into()));
        }
        if m.virtio_mem && desired / BLOCK * BLOCK == m.to {
            return Err(Fail::Refused(identical_size(m.to - m.base)));
        }
        m.request(desired / BLOCK * BLOCK, now);
        // The server records the new size in the VM's config at once,
        // whatever the guest does with it.
        let base = m.base;
        let hotplugged = if desired > base { json!(desired - base) } else { Value::Null };
        if let Some(memory) = vm.config.get_mut("memory").and_then(Value::as_object_mut) {
            memory.insert("hotplugged_size".into(), hotplugged);
        }
        Ok(())
    }

    fn disks(vm: &mut Vm) -> &mut Vec<Value> {
        let config = vm.config.as_object_mut().expect("a VM config is an object");
        let disks = config.entry("disks").or_insert_with(|| json!([]));
        if !disks.is_array() {
            *disks = json!([]);
        }
        disks.as_array_mut().expect("just made an array")
    }

    fn add_disk(&mut self, mut disk: Value) -> Result<Response, Fail> {
        let vm = self.vm()?;
        let path = disk.get("path").and_then(Value::as_str).unwrap_or_default().to_string();
        if !Path::new(&path).exists() {
            return Err(disk_missing(&path));
        }
        let id = match disk.get("id").and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => {
                vm.next_disk += 1;
                format!("_disk{}", vm.next_disk)
            }
        };
        if Self::disks(vm).iter().any(|d| d.get("id").and_then(Value::as_str) == Some(&id)) {
            return Err(Fail::Refused(format!("Identifier {id} is not unique")));
        }
        disk["id"] = json!(id);
        let booted = vm.state != VmState::Created;
        let disks = Self::disks(vm);
        disks.push(disk);
        let slot = disks.len() + 2;
        Ok(if booted {
            Response::json(200, &json!({ "id": id, "bdf": format!("0000:00:{slot:02x}.0") }))
        } else {
            Response::no_content()
        })
    }

    fn remove_device(&mut self, body: &Value) -> Result<(), Fail> {
        let vm = self.vm()?;
        let id = body.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
        let disks = Self::disks(vm);
        let before = disks.len();
        disks.retain(|d| d.get("id").and_then(Value::as_str) != Some(&id));
        if disks.len() == before {
            return Err(Fail::Refused(format!("Failed to find device {id} to remove")));
        }
        Ok(())
    }

    fn snapshot(&mut self, body: &Value, now: Instant) -> Result<(), Fail> {
        let delay = self.opts.snapshot_delay;
        self.vm()?;
        self.restore_in_progress(now)?;
        let vm = self.vm()?;
        if vm.state != VmState::Paused {
            return Err(Fail::Refused(format!("InvalidStateTransition({}, Paused): the VM must be paused", vm.state.name())));
        }
        let dir = file_url(body.get("destination_url").and_then(Value::as_str).unwrap_or_default())?;
        if !dir.is_dir() {
            return Err(Fail::Refused(format!("Destination is not a directory: {dir:?}")));
        }
        std::thread::sleep(delay);
        let memory = vm.memory.actual(now);
        let config = serde_json::to_vec_pretty(&vm.config).expect("a JSON value serializes");
        let state = json!({ "fake_cloud_hypervisor": 1, "memory_actual_size": memory, "counter": vm.counter });
        write_new(&dir.join("config.json"), "VM config snapshot file", &config)?;
        write_new(&dir.join("state.json"), "VM state snapshot file", state.to_string().as_bytes())?;
        // Guest RAM; shared memory is written sparsely, so this is holes.
        write_new(&dir.join("memory-ranges"), "memory ranges file", b"")?;
        OpenOptions::new()
            .write(true)
            .open(dir.join("memory-ranges"))
            .and_then(|f| f.set_len(memory))
            .map_err(|e| Fail::Refused(format!("Error writing memory-ranges: {e}")))
    }

    /// `vm.add-net` to a created VM: the NIC joins its config (204), with
    /// the descriptors sent as its TAP, each checked to be one. Hotplug
    /// into a booted VM is not emulated.
    fn add_net(&mut self, mut net: Value, fds: Vec<std::os::fd::OwnedFd>) -> Result<(), Fail> {
        let vm = self.vm()?;
        if vm.state != VmState::Created {
            return Err(Fail::Refused("fake-cloud-hypervisor does not emulate NIC hotplug into a booted VM".into()));
        }
        if fds.is_empty() && net.get("tap").is_none() {
            return Err(Fail::Refused("a NIC needs a tap name or descriptors".into()));
        }
        let names = fds.iter().map(crate::fds::tap_name).collect::<Result<Vec<_>, _>>().map_err(Fail::Refused)?;
        // The server replaces whatever numbers the body named by those
        // received (here: the names the descriptors are attached to).
        net["fds"] = json!(names);
        let nets = vm.config.as_object_mut().expect("a config object").entry("net").or_insert_with(|| json!([]));
        nets.as_array_mut().ok_or_else(|| Fail::Refused("net is not a list".into()))?.push(net);
        vm.net_fds.extend(fds);
        Ok(())
    }

    /// `vm.restore`, with the TAPs of `net_fds` as descriptors: as many as
    /// their `num_fds` add up to, or the request is bad (the server's
    /// `attach_fds_to_cfgs`).
    fn restore_with_fds(&mut self, body: &Value, fds: Vec<std::os::fd::OwnedFd>, now: Instant) -> Result<(), Fail> {
        let wanted: u64 = body.get("net_fds").and_then(Value::as_array).into_iter().flatten().filter_map(|n| n.get("num_fds")?.as_u64()).sum();
        if wanted != fds.len() as u64 {
            return Err(Fail::BadRequest(format!("Number of expected FDs: {wanted}, received: {}", fds.len())));
        }
        fds.iter().map(crate::fds::tap_name).collect::<Result<Vec<_>, _>>().map_err(Fail::Refused)?;
        self.restore(body, now)?;
        if let Some(vm) = self.vm.as_mut() {
            vm.net_fds = fds;
        }
        Ok(())
    }

    fn restore(&mut self, body: &Value, now: Instant) -> Result<(), Fail> {
        let v = self.opts.version;
        for field in ["memory_restore_mode", "resume"] {
            if v.major < 52 && body.get(field).is_some() {
                return Err(Fail::BadRequest(format!("unknown field `{field}`")));
            }
        }
        if self.vm.is_some() {
            return Err(Fail::Refused(ALREADY_CREATED.into()));
        }
        let on_demand = body.get("memory_restore_mode").and_then(Value::as_str) == Some("OnDemand");
        if on_demand && body.get("prefault").and_then(Value::as_bool) == Some(true) {
            return Err(Fail::Refused("OnDemand memory restore is incompatible with prefault".into()));
        }
        let dir = file_url(body.get("source_url").and_then(Value::as_str).unwrap_or_default())?;
        if !dir.is_dir() {
            return Err(Fail::Chain(vec![
                "Cannot restore VM".into(),
                "Failed to send migratable component snapshot".into(),
                format!("Destination is not a directory: {dir:?}"),
            ]));
        }
        if on_demand && !self.opts.userfaultfd {
            return Err(Fail::Refused("Error restoring memory: cannot create a userfaultfd: Operation not permitted (os error 1)".into()));
        }
        let read = |name: &str| -> Result<Value, Fail> {
            let bytes = std::fs::read(dir.join(name)).map_err(|e| Fail::Refused(format!("Error reading {name}: {e}")))?;
            serde_json::from_slice(&bytes).map_err(|e| Fail::Refused(format!("Error parsing {name}: {e}")))
        };
        let config = read("config.json")?;
        let state = read("state.json")?;
        let memory = u64_at(&state, "/memory_actual_size").unwrap_or(0);
        let ranges = std::fs::metadata(dir.join("memory-ranges")).map_err(|e| Fail::Refused(format!("Error opening memory-ranges: {e}")))?;
        if ranges.len() != memory {
            return Err(Fail::Refused(format!("memory-ranges holds {} bytes, the state says {memory}", ranges.len())));
        }
        let serial = open_serial(&config).map_err(Fail::Refused)?;
        let size = u64_at(&config, "/memory/size").unwrap_or(512 << 20);
        let hotplug = u64_at(&config, "/memory/hotplug_size").unwrap_or(0);
        let resume = body.get("resume").and_then(Value::as_bool) == Some(true);
        // Asked for in the config; the guest goes on (un)plugging toward it.
        let requested = size + u64_at(&config, "/memory/hotplugged_size").unwrap_or(0);
        let memory = Memory {
            base: size,
            max: size + hotplug,
            virtio_mem: config.pointer("/memory/hotplug_method").and_then(Value::as_str) == Some("VirtioMem"),
            from: memory,
            to: requested,
            since: now,
            span: self.opts.resize_time,
        };
        let agent = crate::vsock::GuestAgent::start(&config, crate::vsock::GuestAgent::snapshot_age(&dir)).map_err(Fail::Refused)?;
        self.vm = Some(Vm {
            config,
            state: if resume { VmState::Running } else { VmState::Paused },
            memory,
            counter: u64_at(&state, "/counter").unwrap_or(0),
            serial,
            // The background prefault starts as the restore answers,
            // whether or not the VM is resumed.
            prefault_until: (on_demand && v.major >= 53 && !self.opts.prefault.is_zero()).then(|| now + self.opts.prefault),
            next_disk: 0,
            net_fds: Vec::new(),
            _agent: agent,
        });
        Ok(())
    }
}
