//! The QEMU backend: one detached `qemu-system-x86_64` per VM, driven over
//! its QMP socket.
//!
//! ```text
//!   create ──► prelaunch ──cont──► running ──stop──► paused ──cont──► running
//!   (argv + -S)  (Created)          (Running)        (Paused)
//!                                        │ system_powerdown: guest powers off,
//!                                        ▼ QEMU exits (-no-reboot)
//!   paused ──migrate exec:cat > memory──► postmigrate ──quit──► gone (Standby)
//!   restore: same argv + -incoming defer ──migrate-incoming──► paused
//! ```
//!
//! Every call connects to QMP, acts and disconnects: QMP serves one client at
//! a time and the CLI probes the same socket. The command line a VM was
//! created with is persisted as `launch.json` in the guest directory and
//! copied into each snapshot, because QEMU restores only into an identical
//! command line. This module maps QMP to the [`Hypervisor`] trait; it does
//! not decide which hop comes next and does not touch the store.

pub mod argv;
pub mod qmp;

use self::argv::{argv, Accelerator, LaunchPaths, Machine, VIRTIO_MEM_ID};
use self::qmp::{QmpClient, QmpError};
use super::launch::{self, LaunchError};
use super::process::{self, ProcessId};
use super::{
    DiskConfig, GuestVmm, Hypervisor, HypervisorError, Probe, SnapshotMeta, VmConfig, VmInfo,
    VmmHandle,
};
use super::{HypervisorKind, IoLimit};
use crate::state::VmState;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// Whether QEMU can give a NIC `limit`: only "no limit". Its tap netdev has
/// no rate limiter (throttle groups are for block devices only), so any
/// other limit would be silently ignored. The one place that decides it:
/// validation refuses a declaration that names QEMU and sets a limit
/// (pointing at the key), and [`QemuBackend`]'s create refuses a config
/// that carries one (QEMU as the host's default hypervisor).
pub fn supports_network_limit(limit: &IoLimit) -> bool {
    *limit == IoLimit::default()
}

/// The launch record's file name, in the guest directory and in snapshots.
pub const LAUNCH_FILE: &str = "launch.json";
/// The migration stream's file name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// QEMU's stdout and stderr, relative to the guest directory (the store's
/// `logs/vmm.log`): where its `exec:` migration writer's errors go.
const VMM_LOG: &str = "logs/vmm.log";
/// How long a QEMU whose restore failed gets to exit by itself, which it
/// does when it could not load the snapshot.
const REFUSAL_EXIT_WAIT: Duration = Duration::from_secs(2);

const LAUNCH_VERSION: u32 = 1;
/// Per QMP call, and for a probe's whole exchange.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a freshly spawned QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a starting QEMU's QMP socket is tried.
const LAUNCH_POLL: Duration = Duration::from_millis(5);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
/// `migrate-set-parameters max-bandwidth`: 10 GiB/s, so a local save is
/// not throttled to QEMU's default 32 MiB/s.
const MAX_BANDWIDTH: u64 = 10 << 30;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("QMP call failed")]
    Qmp(#[from] QmpError),
    #[error("QEMU exited during start-up; its log ends with: {log_tail}")]
    ExitedEarly { log_tail: String },
    #[error("QEMU reports the unexpected run state {status:?} after {op}")]
    UnexpectedStatus { op: &'static str, status: String },
    #[error("migration {status}: {reason}")]
    Migration { status: String, reason: String },
    /// QEMU only sees its `exec:` writer's pipe break; the writer's own
    /// words (`cat: write error: No space left on device`) are on QEMU's
    /// stderr, the VMM log, and say why.
    #[error("writing the snapshot failed: {writer}")]
    SnapshotWrite {
        writer: String,
        #[source]
        source: Box<QemuError>,
    },
    /// QEMU exited while loading a snapshot; `said` is the end of its log.
    #[error("QEMU exited while loading it: {said}")]
    RestoreRefused {
        said: String,
        #[source]
        source: Box<HypervisorError>,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("launch record unusable")]
    Launch(#[from] LaunchError),
    #[error("the launch record of {path} names another configuration")]
    ConfigMismatch { path: PathBuf },
    #[error("cannot run {binary} --version")]
    VersionRun {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unrecognised version output {0:?}")]
    VersionParse(String),
    #[error("the socket has no parent directory")]
    NoGuestDir,
    #[error("cannot attach to the TAP {tap} for the VMM")]
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hand the VM's files over to its VMM user")]
    Handover(#[source] super::handover::HandoverError),
    #[error("cannot open the disk {path} for the VMM")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a VM was launched with: persisted in the guest directory at create
/// and copied into each snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRecord {
    pub version: u32,
    pub config: VmConfig,
    /// Without `-incoming defer`; a restore adds it.
    pub argv: Vec<String>,
}

impl LaunchRecord {
    fn read(path: &Path) -> Result<LaunchRecord, QemuError> {
        Ok(launch::read(path)?)
    }

    fn write(&self, path: &Path) -> Result<(), QemuError> {
        Ok(launch::write(path, self)?)
    }
}

/// QEMU's run states, as far as hypeman distinguishes them.
fn vm_state(status: &str) -> Option<VmState> {
    match status {
        "prelaunch" => Some(VmState::Created),
        "running" => Some(VmState::Running),
        "paused" | "postmigrate" | "inmigrate" | "finish-migrate" => Some(VmState::Paused),
        "shutdown" => Some(VmState::Shutdown),
        _ => None,
    }
}

/// Which accelerator QEMU uses, as configured. `Auto` picks KVM only where
/// it can run a stock kernel (not under a nested `kvm_pvm`), else TCG; see
/// [`resolve_accel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `/dev/kvm` that opens read-write, and not the kvm_pvm module, which runs
/// stock guest kernels into an emulation failure (reference/this-machine.md §1).
pub fn resolve_accel(accel: Accel) -> Accelerator {
    match accel {
        Accel::Kvm => Accelerator::Kvm,
        Accel::Tcg => Accelerator::Tcg,
        Accel::Auto => {
            let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
            if kvm && !Path::new("/sys/module/kvm_pvm").exists() {
                Accelerator::Kvm
            } else {
                Accelerator::Tcg
            }
        }
    }
}

/// "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)" → "7.2.22".
pub fn parse_version(output: &str) -> Option<String> {
    let rest = output.split("QEMU emulator version ").nth(1)?;
    let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    (!v.is_empty()).then_some(v)
}

/// Quotes `s` for `/bin/sh`, which runs QEMU's `exec:` migration URIs.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The name a migration descriptor is handed to QEMU under (`getfd`).
const MIGRATION_FD: &str = "migration";

async fn self_send_fd(c: &mut QmpClient, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QemuError> {
    Ok(c.send_fd(MIGRATION_FD, fd).await?)
}

fn backend(op: &'static str) -> impl Fn(QemuError) -> HypervisorError {
    move |e| HypervisorError::Backend { op, source: Box::new(e) }
}

fn guest_dir(socket: &Path) -> Result<&Path, QemuError> {
    socket.parent().ok_or(QemuError::NoGuestDir)
}

pub struct QemuBackend {
    binary: PathBuf,
    accel: Accelerator,
    tsc_khz: Option<u64>,
    /// vhost-net is used: KVM, and `/dev/vhost-net` opens.
    vhost_net: bool,
    version: OnceCell<String>,
}

impl QemuBackend {
    /// Decides the accelerator and reads the host's TSC rate once.
    pub fn new(binary: PathBuf, accel: Accel) -> QemuBackend {
        let accel = resolve_accel(accel);
        QemuBackend {
            binary,
            accel,
            tsc_khz: crate::system::host_tsc_khz().ok(),
            vhost_net: accel == Accelerator::Kvm
                && std::fs::OpenOptions::new().read(true).write(true).open("/dev/vhost-net").is_ok(),
            version: OnceCell::new(),
        }
    }

    pub fn accelerator(&self) -> Accelerator {
        self.accel
    }

    async fn connect(&self, vmm: &VmmHandle) -> Result<QmpClient, HypervisorError> {
        match QmpClient::connect(&vmm.socket, QMP_TIMEOUT).await {
            Ok(c) => Ok(c),
            Err(_) if !process::is_alive(vmm.process_id()) => Err(HypervisorError::VmmGone { pid: vmm.pid }),
            Err(QmpError::Timeout { .. }) => Err(HypervisorError::Timeout { op: "QMP connect", secs: QMP_TIMEOUT.as_secs() }),
            Err(e) => Err(backend("QMP connect")(e.into())),
        }
    }

    /// Runs one command; a dead VMM is `VmmGone` whatever QMP said.
    async fn call(&self, vmm: &VmmHandle, op: &'static str, cmd: &str, args: Option<Value>) -> Result<Value, HypervisorError> {
        let mut c = self.connect(vmm).await?;
        self.call_on(&mut c, vmm, op, cmd, args).await
    }

    async fn call_on(
        &self,
        c: &mut QmpClient,
        vmm: &VmmHandle,
        op: &'static str,
        cmd: &str,
        args: Option<Value>,
    ) -> Result<Value, HypervisorError> {
        match c.execute(cmd, args).await {
            Ok(v) => Ok(v),
            Err(_) if !process::is_alive(vmm.process_id()) => Err(HypervisorError::VmmGone { pid: vmm.pid }),
            Err(QmpError::Timeout { .. }) => Err(HypervisorError::Timeout { op, secs: QMP_TIMEOUT.as_secs() }),
            Err(e) => Err(backend(op)(e.into())),
        }
    }

    async fn status_on(&self, c: &mut QmpClient, vmm: &VmmHandle, op: &'static str) -> Result<(String, Option<VmState>), HypervisorError> {
        let ret = self.call_on(c, vmm, op, "query-status", None).await?;
        let status = ret.get("status").and_then(Value::as_str).unwrap_or("").to_string();
        let state = vm_state(&status);
        Ok((status, state))
    }

    /// Checks the run state, then sends `cmd`: one hop of the state machine.
    async fn transition(&self, vmm: &VmmHandle, op: &'static str, from: &[VmState], cmd: &str) -> Result<(), HypervisorError> {
        let mut c = self.connect(vmm).await?;
        let (status, state) = self.status_on(&mut c, vmm, op).await?;
        match state {
            Some(s) if from.contains(&s) => {}
            Some(s) => return Err(HypervisorError::WrongState { op, state: s }),
            None => return Err(backend(op)(QemuError::UnexpectedStatus { op, status })),
        }
        self.call_on(&mut c, vmm, op, cmd, None).await?;
        Ok(())
    }

    /// Spawns QEMU with `args` and waits until its QMP socket answers.
    /// A QEMU that fails to come up is killed, so nothing is left behind.
    async fn launch(&self, guest: &GuestVmm, config: &VmConfig, args: &[String], op: &'static str) -> Result<(VmmHandle, QmpClient), HypervisorError> {
        match QmpClient::connect(&guest.socket, QMP_TIMEOUT).await {
            Err(e) if e.is_not_listening() => {}
            _ => return Err(HypervisorError::AlreadyRunning { socket: guest.socket.clone() }),
        }
        let _ = std::fs::remove_file(&guest.socket);
        let version = self.version().await.ok();
        let log_start = process::log_end(&guest.vmm_log);
        if let Some(user) = &config.user {
            super::handover::check_outside(config, user).map_err(|e| backend(op)(QemuError::Handover(e)))?;
            let grants = super::handover::grants(config, &guest.guest_dir, user);
            super::handover::apply(&grants).map_err(|e| backend(op)(QemuError::Handover(e)))?;
        }
        // Held until the child has its copy, then closed here.
        let tap = match (&config.user, &config.net) {
            (Some(_), Some(net)) => {
                let tap = super::handover::attach_tap(&net.tap)
                    .map_err(|source| backend(op)(QemuError::Tap { tap: net.tap.clone(), source }))?;
                Some(tap)
            }
            _ => None,
        };
        let disks = open_disks_by_descriptor(config).map_err(backend(op))?;
        use std::os::fd::AsFd;
        let pass: Vec<_> = tap
            .as_ref()
            .map(|t| (t.as_fd(), argv::TAP_FD))
            .into_iter()
            .chain(disks.iter().map(|(file, at)| (file.as_fd(), *at)))
            .collect();
        let id = process::spawn_detached_with(&self.binary, args, &guest.vmm_log, &guest.vmm_log, config.user.as_ref(), &pass)
            .map_err(|e| HypervisorError::Spawn { binary: self.binary.clone(), source: e.into_io() })?;
        drop(pass);
        drop((tap, disks));
        let handle = VmmHandle { pid: id.pid, pid_start_time: id.start_time, socket: guest.socket.clone(), version };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !process::is_alive(id) {
                return Err(backend(op)(QemuError::ExitedEarly { log_tail: process::log_tail(&guest.vmm_log, log_start) }));
            }
            match QmpClient::connect(&guest.socket, QMP_TIMEOUT).await {
                Ok(c) => return Ok((handle, c)),
                Err(e) if Instant::now() >= deadline => {
                    self.kill_quietly(id).await;
                    tracing::warn!(error = %e, "QEMU did not open its QMP socket");
                    return Err(HypervisorError::Timeout { op, secs: START_TIMEOUT.as_secs() });
                }
                // QEMU opens the socket some 50 ms after exec under TCG; a
                // coarse poll would add up to its interval to every restore.
                Err(_) => tokio::time::sleep(LAUNCH_POLL).await,
            }
        }
    }

    async fn kill_quietly(&self, id: ProcessId) {
        process::kill(id, EXIT_TIMEOUT).await;
    }

    /// Polls `query-migrate` until it completes or fails.
    async fn wait_migration(&self, c: &mut QmpClient, vmm: &VmmHandle, op: &'static str) -> Result<(), HypervisorError> {
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let ret = self.call_on(c, vmm, op, "query-migrate", None).await?;
            let status = ret.get("status").and_then(Value::as_str).unwrap_or("").to_string();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let reason = ret.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
                    return Err(backend(op)(QemuError::Migration { status, reason }));
                }
                _ if Instant::now() >= deadline => {
                    return Err(HypervisorError::Timeout { op, secs: MIGRATE_TIMEOUT.as_secs() })
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn launch_record(socket: &Path) -> Result<LaunchRecord, QemuError> {
        LaunchRecord::read(&guest_dir(socket)?.join(LAUNCH_FILE))
    }

    async fn restore_into(&self, c: &mut QmpClient, vmm: &VmmHandle, dir: &Path, sandboxed: bool) -> Result<(), HypervisorError> {
        let op = "restore";
        let memory = dir.join(MEMORY_FILE);
        let uri = if sandboxed {
            // A sandboxed QEMU can neither exec `cat` nor open the root-only
            // snapshot: the daemon opens it and hands the descriptor over.
            let file = std::fs::File::open(&memory).map_err(|source| backend(op)(QemuError::Read { path: memory.clone(), source }))?;
            use std::os::fd::AsFd;
            c.send_fd(MIGRATION_FD, file.as_fd()).await.map_err(|e| backend(op)(e.into()))?;
            format!("fd:{MIGRATION_FD}")
        } else {
            format!("exec:cat {}", shell_quote(&memory.display().to_string()))
        };
        self.call_on(c, vmm, op, "migrate-incoming", Some(json!({ "uri": uri }))).await?;
        self.wait_migration(c, vmm, op).await?;
        let (status, _) = self.status_on(c, vmm, op).await?;
        if status != "paused" {
            return Err(backend(op)(QemuError::UnexpectedStatus { op, status }));
        }
        Ok(())
    }
}

/// Opens the boot files and disks a VMM that is not root gets by
/// descriptor (see [`argv::boot_files_by_descriptor`] and
/// [`argv::disks_by_descriptor`]), each at the number the command line
/// names. Opened by the daemon, which may reach them; never created.
fn open_disks_by_descriptor(config: &VmConfig) -> Result<Vec<(std::fs::File, i32)>, QemuError> {
    let mut out = Vec::new();
    for (path, at) in argv::boot_files_by_descriptor(config) {
        let file = std::fs::File::open(&path).map_err(|source| QemuError::Disk { path: path.clone(), source })?;
        out.push((file, at));
    }
    for f in argv::disks_by_descriptor(config) {
        let path = &config.disks[f.index].path;
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map_err(|source| QemuError::Disk { path: path.clone(), source })
        };
        if let Some(at) = f.read_write {
            out.push((open(true)?, at));
        }
        out.push((open(false)?, f.read_only));
    }
    Ok(out)
}

#[async_trait]
impl Hypervisor for QemuBackend {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    /// The virtio-mem device is launched with all of its memory requested
    /// (`argv`), so a running guest has all of it once its driver plugs it.
    fn running_memory_bytes(&self, memory_bytes: u64, hotplug_memory_bytes: u64) -> u64 {
        memory_bytes + hotplug_memory_bytes
    }

    async fn version(&self) -> Result<String, HypervisorError> {
        self.version
            .get_or_try_init(|| async {
                let out = tokio::process::Command::new(&self.binary)
                    .arg("--version")
                    .output()
                    .await
                    .map_err(|source| QemuError::VersionRun { binary: self.binary.clone(), source })?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                parse_version(&text).ok_or(QemuError::VersionParse(text))
            })
            .await
            .cloned()
            .map_err(backend("version"))
    }

    async fn probe(&self, guest: &GuestVmm) -> Probe {
        let recorded = guest
            .recorded
            .as_ref()
            .filter(|h| h.socket == guest.socket && process::is_alive(h.process_id()));
        let status = match QmpClient::connect(&guest.socket, QMP_TIMEOUT).await {
            Ok(mut c) => c.execute("query-status", None).await,
            Err(e) => Err(e),
        };
        let answered = match status {
            Ok(ret) => ret.get("status").and_then(Value::as_str).unwrap_or("").to_string(),
            Err(e) if e.is_not_listening() => {
                let holder = recorded.map(VmmHandle::process_id).or_else(|| process::find_by_argument(&guest.socket));
                return match holder {
                    Some(p) => Probe::Unreachable { reason: format!("QEMU process {} lives but its QMP socket refuses connections", p.pid) },
                    // A socket file no process serves: absent. The file is
                    // left; removing it is a step the planner chooses.
                    None => Probe::Absent,
                };
            }
            Err(e) => return Probe::Unreachable { reason: crate::error_chain(&e) },
        };
        let Some(state) = vm_state(&answered) else {
            return Probe::Unreachable { reason: format!("QEMU is in run state {answered:?}") };
        };
        let handle = match recorded {
            Some(h) => VmmHandle { version: h.version.clone().or(self.version.get().cloned()), ..h.clone() },
            None => match process::find_by_argument(&guest.socket) {
                Some(p) => VmmHandle {
                    pid: p.pid,
                    pid_start_time: p.start_time,
                    socket: guest.socket.clone(),
                    version: self.version.get().cloned(),
                },
                None => return Probe::Unreachable { reason: "QMP answers but no QEMU process names the socket".into() },
            },
        };
        Probe::Alive { handle, state }
    }

    async fn create(&self, guest: &GuestVmm, config: &VmConfig) -> Result<VmmHandle, HypervisorError> {
        let op = "create";
        if config.vsock.is_some() {
            return Err(HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "vsock" });
        }
        if Machine::for_config(config) == Machine::Microvm && !config.devices.is_empty() {
            return Err(HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "PCI passthrough on microvm" });
        }
        let paths = LaunchPaths { qmp_socket: guest.socket.clone(), app_log: config.serial_log.clone() };
        if let Some(net) = &config.net {
            if !supports_network_limit(&net.limit_down) || !supports_network_limit(&net.limit_up) {
                // Declarations that name QEMU are refused at validation;
                // this catches QEMU as the host's default hypervisor.
                return Err(HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "network bandwidth limits" });
            }
        }
        let args = argv(config, &paths, self.accel, self.tsc_khz, self.vhost_net, false);
        let record = LaunchRecord { version: LAUNCH_VERSION, config: config.clone(), argv: args.clone() };
        record.write(&guest.guest_dir.join(LAUNCH_FILE)).map_err(backend(op))?;
        let (handle, mut c) = self.launch(guest, config, &args, op).await?;
        let checked = match self.status_on(&mut c, &handle, op).await {
            Ok((status, _)) if status == "prelaunch" => Ok(()),
            Ok((status, _)) => Err(backend(op)(QemuError::UnexpectedStatus { op, status })),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            self.kill_quietly(handle.process_id()).await;
            return Err(e);
        }
        tracing::info!(pid = handle.pid, accel = self.accel.as_str(), "QEMU created the VM");
        Ok(handle)
    }

    async fn boot(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        self.transition(vmm, "boot", &[VmState::Created], "cont").await
    }

    async fn pause(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        self.transition(vmm, "pause", &[VmState::Running], "stop").await
    }

    async fn resume(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        self.transition(vmm, "resume", &[VmState::Paused], "cont").await
    }

    async fn power_off(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        self.call(vmm, "power_off", "system_powerdown", None).await.map(|_| ())
    }

    async fn snapshot(&self, vmm: &VmmHandle, dir: &Path) -> Result<SnapshotMeta, HypervisorError> {
        let op = "snapshot";
        let record = Self::launch_record(&vmm.socket).map_err(backend(op))?;
        let mut c = self.connect(vmm).await?;
        let (status, state) = self.status_on(&mut c, vmm, op).await?;
        match state {
            Some(VmState::Paused) if status == "paused" || status == "postmigrate" || status == "finish-migrate" => {}
            Some(s) => return Err(HypervisorError::WrongState { op, state: s }),
            None => return Err(backend(op)(QemuError::UnexpectedStatus { op, status })),
        }
        if status != "paused" {
            // An earlier snapshot of this VM got as far as QEMU but its
            // file was thrown away (the daemon died before committing it).
            // QEMU refuses a second migration from `postmigrate`, so let
            // that one finish, then run the guest for an instant and pause
            // it again: the state we save is the state we then have.
            let _ = self.wait_migration(&mut c, vmm, op).await;
            self.call_on(&mut c, vmm, op, "cont", None).await?;
            self.call_on(&mut c, vmm, op, "stop", None).await?;
        }
        let ver = self.call_on(&mut c, vmm, op, "query-version", None).await?;
        let version = format!(
            "{}.{}.{}",
            ver.pointer("/qemu/major").and_then(Value::as_u64).unwrap_or(0),
            ver.pointer("/qemu/minor").and_then(Value::as_u64).unwrap_or(0),
            ver.pointer("/qemu/micro").and_then(Value::as_u64).unwrap_or(0),
        );
        self.call_on(&mut c, vmm, op, "migrate-set-parameters", Some(json!({ "max-bandwidth": MAX_BANDWIDTH })))
            .await?;
        // Made here, 0600, for the `exec:` writer's `>` to open and fill:
        // the guest's RAM gets the mode asked for, not the shell's umask.
        let memory = dir.join(MEMORY_FILE);
        let file = crate::durable::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&memory)
            .map_err(|source| backend(op)(QemuError::Create { path: memory.clone(), source }))?;
        let uri = if record.config.user.is_some() {
            // Sandboxed (spawn=deny) and unable to open the root-only
            // snapshot dir: QEMU writes into the descriptor it is handed.
            use std::os::fd::AsFd;
            self_send_fd(&mut c, file.as_fd()).await.map_err(backend(op))?;
            format!("fd:{MIGRATION_FD}")
        } else {
            // QEMU 7.2 has no `file:` URI; `exec:` runs through /bin/sh.
            format!("exec:cat > {}", shell_quote(&memory.display().to_string()))
        };
        drop(file);
        let log = guest_dir(&vmm.socket).map_err(backend(op))?.join(VMM_LOG);
        let log_start = process::log_end(&log);
        self.call_on(&mut c, vmm, op, "migrate", Some(json!({ "uri": uri }))).await?;
        match self.wait_migration(&mut c, vmm, op).await {
            Ok(()) => {}
            Err(HypervisorError::Backend { op, source }) => {
                let writer = process::log_tail(&log, log_start);
                return Err(match source.downcast::<QemuError>() {
                    Ok(e) if !writer.is_empty() => {
                        backend(op)(QemuError::SnapshotWrite { writer, source: e })
                    }
                    Ok(e) => backend(op)(*e),
                    Err(source) => HypervisorError::Backend { op, source },
                });
            }
            Err(e) => return Err(e),
        }
        record.write(&dir.join(LAUNCH_FILE)).map_err(backend(op))?;
        Ok(SnapshotMeta { hypervisor_version: version, config_hash: record.config.config_hash() })
    }

    fn snapshot_config(&self, dir: &Path) -> Result<VmConfig, HypervisorError> {
        let record = LaunchRecord::read(&dir.join(LAUNCH_FILE))
            .map_err(|e| HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source: Box::new(e) })?;
        Ok(record.config)
    }

    async fn restore(&self, guest: &GuestVmm, config: &VmConfig, dir: &Path) -> Result<VmmHandle, HypervisorError> {
        let op = "restore";
        let bad = |e: QemuError| HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source: Box::new(e) };
        let launch = dir.join(LAUNCH_FILE);
        let record = LaunchRecord::read(&launch).map_err(bad)?;
        if record.config != *config {
            return Err(bad(QemuError::ConfigMismatch { path: launch }));
        }
        let memory = dir.join(MEMORY_FILE);
        std::fs::metadata(&memory).map_err(|source| bad(QemuError::Read { path: memory.clone(), source }))?;
        let mut args = record.argv.clone();
        args.extend(["-incoming".to_string(), "defer".to_string()]);
        record.write(&guest.guest_dir.join(LAUNCH_FILE)).map_err(backend(op))?;
        let log = guest.guest_dir.join(VMM_LOG);
        let log_start = process::log_end(&log);
        let started = Instant::now();
        let (handle, mut c) = self.launch(guest, &record.config, &args, op).await?;
        let launched = started.elapsed();
        if let Err(e) = self.restore_into(&mut c, &handle, dir, record.config.user.is_some()).await {
            // QEMU exits by itself when it cannot load the stream (`load of
            // migration failed: …` on its stderr): the same file fails the
            // same way on every try, so that is the snapshot's fault. A
            // QEMU still alive (a timeout) is killed, and may do better.
            let refused = process::wait_gone(handle.process_id(), REFUSAL_EXIT_WAIT).await;
            self.kill_quietly(handle.process_id()).await;
            if refused {
                let said = process::log_tail(&log, log_start);
                return Err(bad(QemuError::RestoreRefused { said, source: Box::new(e) }));
            }
            return Err(e);
        }
        tracing::info!(
            pid = handle.pid,
            launch_ms = launched.as_millis() as u64,
            incoming_ms = (started.elapsed() - launched).as_millis() as u64,
            "QEMU restored the VM, paused"
        );
        Ok(handle)
    }

    async fn shutdown_vmm(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let id = vmm.process_id();
        let mut c = self.connect(vmm).await?;
        match c.execute("quit", None).await {
            // QEMU may exit before its reply reaches us.
            Ok(_) | Err(QmpError::Closed { .. }) => {}
            Err(e) if process::is_alive(id) => tracing::warn!(error = %e, "QMP quit failed; killing QEMU"),
            Err(_) => {}
        }
        drop(c);
        super::await_vmm_exit(vmm, EXIT_TIMEOUT, "QEMU ignored quit").await;
        Ok(())
    }

    async fn kill(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        super::kill_vmm(vmm, EXIT_TIMEOUT).await
    }

    async fn info(&self, vmm: &VmmHandle) -> Result<VmInfo, HypervisorError> {
        let op = "info";
        let mut c = self.connect(vmm).await?;
        let (status, state) = self.status_on(&mut c, vmm, op).await?;
        let state = state.ok_or_else(|| backend(op)(QemuError::UnexpectedStatus { op, status }))?;
        let memory = self
            .call_on(&mut c, vmm, op, "query-memory-size-summary", None)
            .await
            .ok()
            .and_then(|m| {
                let base = m.get("base-memory").and_then(Value::as_u64)?;
                Some(base + m.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0))
            });
        Ok(VmInfo { state, memory_actual_bytes: memory })
    }

    async fn resize_memory(&self, vmm: &VmmHandle, total_bytes: u64) -> Result<(), HypervisorError> {
        let op = "resize_memory";
        let record = Self::launch_record(&vmm.socket).map_err(backend(op))?;
        let config = &record.config;
        if config.hotplug_memory_bytes == 0 || Machine::for_config(config) != Machine::Q35 {
            // microvm has no device-memory region for virtio-mem.
            return Err(HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "memory resize without hotplug memory (microvm)" });
        }
        let max = config.memory_bytes + config.hotplug_memory_bytes;
        if total_bytes < config.memory_bytes || total_bytes > max {
            return Err(backend(op)(QemuError::UnexpectedStatus { op, status: format!("{total_bytes} outside {}..={max}", config.memory_bytes) }));
        }
        // virtio-mem plugs whole 2 MiB blocks.
        let requested = (total_bytes - config.memory_bytes) & !((2 << 20) - 1);
        self.call(
            vmm,
            op,
            "qom-set",
            Some(json!({ "path": format!("/machine/peripheral/{VIRTIO_MEM_ID}"), "property": "requested-size", "value": requested })),
        )
        .await
        .map(|_| ())
    }

    async fn add_disk(&self, _vmm: &VmmHandle, _disk: &DiskConfig) -> Result<(), HypervisorError> {
        // microvm's virtio-mmio bus cannot hotplug; q35 would need a spare
        // pcie-root-port at launch, which hypeman does not provision yet.
        Err(HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "disk hotplug" })
    }

    async fn remove_disk(&self, _vmm: &VmmHandle, _id: &str) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "disk hot-unplug" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_map_to_vm_states() {
        let table = [
            ("prelaunch", Some(VmState::Created)),
            ("running", Some(VmState::Running)),
            ("paused", Some(VmState::Paused)),
            ("postmigrate", Some(VmState::Paused)),
            ("inmigrate", Some(VmState::Paused)),
            ("finish-migrate", Some(VmState::Paused)),
            ("shutdown", Some(VmState::Shutdown)),
            ("internal-error", None),
            ("guest-panicked", None),
            ("", None),
        ];
        for (status, want) in table {
            assert_eq!(vm_state(status), want, "{status}");
        }
    }

    #[test]
    fn versions_and_quoting() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022 Fabrice Bellard\n").as_deref(),
            Some("7.2.22")
        );
        assert_eq!(parse_version("qemu 9").as_deref(), None);
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[test]
    fn explicit_accelerators_are_kept() {
        assert_eq!(resolve_accel(Accel::Tcg), Accelerator::Tcg);
        assert_eq!(resolve_accel(Accel::Kvm), Accelerator::Kvm);
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(resolve_accel(Accel::Auto), Accelerator::Tcg);
        }
    }

    #[tokio::test]
    async fn conformance_without_a_vmm() {
        use crate::hypervisor::conformance::*;
        let qemu = QemuBackend::new("/nonexistent/qemu".into(), Accel::Tcg);
        stale_socket_is_absent(&qemu, "qmp.sock").await;
        silent_socket_is_unreachable(&qemu, "qmp.sock", "greeting").await;
        gone_vmm_is_vmm_gone(&qemu, "qmp.sock").await;
    }

    use crate::hypervisor::conformance::bare_config;

    #[test]
    fn only_no_limit_is_a_network_limit_qemu_supports() {
        assert!(supports_network_limit(&IoLimit::default()));
        assert!(!supports_network_limit(&IoLimit { bytes_per_sec: Some(1), ops_per_sec: None }));
        assert!(!supports_network_limit(&IoLimit { bytes_per_sec: None, ops_per_sec: Some(1) }));
    }

    #[tokio::test]
    async fn a_network_bandwidth_limit_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = QemuBackend::new("/nonexistent/qemu".into(), Accel::Tcg);
        let config = VmConfig {
            net: Some(crate::hypervisor::NetConfig {
                tap: "hm0".into(),
                mac: "02:00:00:00:00:01".into(),
                limit_down: IoLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: None },
                limit_up: IoLimit::default(),
            }),
            serial_log: dir.path().join("app.log"),
            ..bare_config()
        };
        let err = qemu.create(&crate::hypervisor::conformance::guest(dir.path(), "qmp.sock"), &config).await.unwrap_err();
        assert_eq!(err.to_string(), "qemu does not support network bandwidth limits");
        assert!(!dir.path().join(LAUNCH_FILE).exists(), "nothing was launched or recorded");
    }

    #[test]
    fn launch_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let record = LaunchRecord {
            version: LAUNCH_VERSION,
            config: bare_config(),
            argv: vec!["-M".into(), "microvm".into()],
        };
        let path = dir.path().join(LAUNCH_FILE);
        record.write(&path).unwrap();
        assert_eq!(LaunchRecord::read(&path).unwrap(), record);
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(LaunchRecord::read(&path), Err(QemuError::Launch(LaunchError::Parse { .. }))));
    }
}
