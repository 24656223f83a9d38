//! The Cloud Hypervisor backend: one detached `cloud-hypervisor` process per
//! VM, driven over the REST API on its `--api-socket`.
//!
//! ```text
//!   spawn ──vm.create──► Created ──vm.boot──► Running ◄──vm.resume── Paused
//!                                              │  vm.pause ─────────►  │
//!                     vm.power-button: the guest powers off and        │ vm.snapshot
//!                     the VMM process exits                            ▼
//!                                                       vmm.shutdown: process exits
//!   restore: spawn ──vm.restore (OnDemand from v53, else Copy)──► Paused
//! ```
//!
//! A VMM process serves one VM incarnation: create and restore each start a
//! fresh one, after removing a stale socket file (up to v52 the server just
//! `bind()`s). Its stdout is the guest's serial port (`Tty` mode), appended
//! to `logs/app.log`; its stderr, the VMM's own log, to `logs/vmm.log`.
//! The configuration a VM was launched with is kept as `ch-launch.json` in
//! the guest directory and in each snapshot: its hash keys the snapshot.
//!
//! A VMM with no VM in it is what a create or restore leaves when the
//! daemon dies between starting the process and filling it; it reports
//! `Shutdown` (a VMM without a running guest), so the planner ends it and
//! starts over. This module maps the API onto the [`Hypervisor`] trait; it
//! does not decide which hop comes next and does not touch the store.
//!
//! Cloud Hypervisor never fsyncs a snapshot, and this backend leaves that
//! to the store: its commit fsyncs every file and directory of the
//! snapshot before it writes the marker, so a multi-GB memory file is
//! fsynced once, there.

pub mod api;
pub mod client;
pub mod config;

use self::client::{ApiClient, ApiError, ChVersion, Endpoint, Refusal};
use super::launch::{self, LaunchError};
use super::process::{self, ProcessId};
use super::{
    DiskConfig, GuestVmm, Hypervisor, HypervisorError, Probe, SnapshotMeta, VmConfig, VmInfo,
    VmmHandle,
};
use crate::hypervisor::HypervisorKind;
use crate::state::VmState;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// The launch record's file name, in the guest directory and in snapshots.
pub const LAUNCH_FILE: &str = "ch-launch.json";
/// What Cloud Hypervisor writes into a snapshot directory.
pub const SNAPSHOT_FILES: [&str; 3] = ["config.json", "state.json", "memory-ranges"];

const LAUNCH_VERSION: u32 = 1;
/// How long a probe waits for each answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a freshly spawned VMM may take to answer `vmm.ping`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot waits out v53's prefault after an on-demand restore
/// unless [`CloudHypervisorBackend::with_prefault_wait`] says otherwise. The
/// prefault reads every page of the snapshot: minutes for a large guest on
/// a slow disk.
const PREFAULT_WAIT: Duration = Duration::from_secs(120);
/// After a shrink, how often the VMM's resident memory is read, how many
/// readings in a row must not fall below the lowest so far, and the most
/// the wait may take.
const UNPLUG_POLL: Duration = Duration::from_millis(20);
const UNPLUG_SETTLED_READINGS: u32 = 3;
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// Before v49 Cloud Hypervisor puts its default address
    /// (192.168.249.1/24) on every TAP it is given without one, which on a
    /// port of hypeman's bridge would answer for the wrong network.
    #[error("guest networking needs cloud-hypervisor 49.0 or newer (this host has {version})")]
    NetworkNeedsV49 { version: String },
    #[error("API call failed")]
    Api(#[from] ApiError),
    #[error("cloud-hypervisor exited during start-up; its log ends with: {log_tail}")]
    ExitedEarly { log_tail: String },
    #[error("cannot start the VMM")]
    Spawn(#[source] process::ProcessError),
    #[error("cannot run {} --version", binary.display())]
    VersionRun {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unrecognised version {0:?}")]
    VersionParse(String),
    #[error("launch record unusable")]
    Launch(#[from] LaunchError),
    #[error("the snapshot was taken under another VM configuration")]
    ConfigMismatch,
    #[error("the snapshot lacks {}", path.display())]
    MissingFile { path: PathBuf },
    #[error("snapshot directory {} is not empty", dir.display())]
    NotEmpty { dir: PathBuf },
    #[error("cannot list or empty snapshot directory {}", dir.display())]
    SnapshotDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cloud Hypervisor reports {state:?} after {op}")]
    UnexpectedState { op: &'static str, state: api::VmState },
    #[error("{requested} bytes of memory is outside {min}..={max}")]
    MemoryOutOfRange { requested: u64, min: u64, max: u64 },
    #[error("the socket has no parent directory")]
    NoGuestDir,
    #[error("cannot hand the VM's files over to its VMM user")]
    Handover(#[source] super::handover::HandoverError),
    #[error("cannot open {} for the VMM", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach to the TAP {tap} for the VMM")]
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a VM was launched with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRecord {
    pub version: u32,
    pub config: VmConfig,
}

fn backend(op: &'static str) -> impl Fn(ChError) -> HypervisorError {
    move |e| HypervisorError::Backend { op, source: Box::new(e) }
}

/// The client of the VMM on `socket`.
fn api_client(socket: &Path, op: &'static str) -> Result<ApiClient, HypervisorError> {
    ApiClient::new(socket).map_err(|e| backend(op)(e.into()))
}

/// The version the VMM reports on `vmm.ping`.
fn ping_version(ping: &api::VmmPingResponse) -> Result<ChVersion, ChError> {
    ChVersion::of_ping(ping).ok_or_else(|| ChError::VersionParse(ping.version.clone()))
}

fn guest_dir(socket: &Path) -> Result<&Path, ChError> {
    socket.parent().ok_or(ChError::NoGuestDir)
}

fn read_launch(path: &Path) -> Result<LaunchRecord, ChError> {
    Ok(launch::read(path)?)
}

/// The process serving `socket`: the one whose pid `vmm.ping` reports
/// (when it reports one), else the one whose command line names the socket.
fn serving_process(ping: &api::VmmPingResponse, socket: &Path) -> Option<ProcessId> {
    let reported = ping.pid.and_then(|p| u32::try_from(p).ok()).and_then(|pid| {
        let start_time = process::start_time(pid)?;
        Some(ProcessId { pid, start_time })
    });
    reported.or_else(|| process::find_by_argument(socket))
}

/// The trait's view of Cloud Hypervisor's states.
fn vm_state(state: api::VmState) -> Option<VmState> {
    match state {
        api::VmState::Created => Some(VmState::Created),
        api::VmState::Running => Some(VmState::Running),
        api::VmState::Paused => Some(VmState::Paused),
        api::VmState::Shutdown => Some(VmState::Shutdown),
        api::VmState::BreakPoint => None,
    }
}

/// One reading of resident memory during an unplug: the lowest so far and
/// how many readings in a row have not gone below it.
fn unplug_progress(lowest: u64, settled: u32, kib: u64) -> (u64, u32) {
    if kib < lowest {
        (kib, if lowest == u64::MAX { 1 } else { 0 })
    } else {
        (lowest, settled + 1)
    }
}

/// Whether the server refused `endpoint` only because the VM already is in
/// `target`, where the call would have taken it: a daemon that died after
/// its request, or a state read just before someone else's. Done, then.
fn already_there(endpoint: Endpoint, target: VmState, e: &ApiError) -> bool {
    match e.refusal() {
        // "Invalid transition: InvalidStateTransition(Paused, Paused)".
        Some(Refusal::InvalidTransition { from, to }) => from == to && vm_state(to) == Some(target),
        // A boot of a booted VM reads as a second create.
        Some(Refusal::AlreadyCreated) => endpoint == Endpoint::VmBoot,
        Some(
            Refusal::NotCreated
            | Refusal::NotRunning
            | Refusal::RestoreInProgress
            | Refusal::FileExists
            | Refusal::NotADirectory
            | Refusal::BadRequest
            | Refusal::Other,
        )
        | None => false,
    }
}

pub struct CloudHypervisorBackend {
    binary: PathBuf,
    version: OnceCell<ChVersion>,
    /// How long a snapshot waits out v53's prefault (see [`PREFAULT_WAIT`]).
    prefault_wait: Duration,
    /// One request at a time per VMM: the server has one HTTP thread and a
    /// second request would only queue behind the first.
    serial: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl CloudHypervisorBackend {
    pub fn new(binary: PathBuf) -> CloudHypervisorBackend {
        CloudHypervisorBackend { binary, version: OnceCell::new(), prefault_wait: PREFAULT_WAIT, serial: Mutex::new(HashMap::new()) }
    }

    /// Snapshots wait at most `wait` for v53 to finish prefaulting an
    /// on-demand restore before they fail.
    pub fn with_prefault_wait(mut self, wait: Duration) -> CloudHypervisorBackend {
        self.prefault_wait = wait;
        self
    }

    async fn exclusive(&self, socket: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.serial.lock().expect("lock table poisoned");
            map.entry(socket.to_path_buf()).or_default().clone()
        };
        lock.lock_owned().await
    }

    async fn binary_version(&self) -> Result<ChVersion, ChError> {
        self.version
            .get_or_try_init(|| async {
                let out = tokio::process::Command::new(&self.binary)
                    .arg("--version")
                    .output()
                    .await
                    .map_err(|source| ChError::VersionRun { binary: self.binary.clone(), source })?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                ChVersion::parse(&text).ok_or(ChError::VersionParse(text))
            })
            .await
            .copied()
    }

    /// Maps an API failure: a VMM that is gone is `VmmGone` whatever the
    /// socket said, a timeout is a timeout.
    fn api_error(vmm: &VmmHandle, op: &'static str, e: ApiError) -> HypervisorError {
        if !e.is_refusal() && !process::is_alive(vmm.process_id()) {
            return HypervisorError::VmmGone { pid: vmm.pid };
        }
        match e {
            ApiError::Timeout { secs, .. } => HypervisorError::Timeout { op, secs },
            e => backend(op)(e.into()),
        }
    }

    async fn state_of(&self, vmm: &VmmHandle, client: &ApiClient, op: &'static str) -> Result<(VmState, Option<u64>), HypervisorError> {
        match client.info().await {
            Ok(info) => match vm_state(info.state) {
                Some(state) => Ok((state, info.memory_actual_size)),
                None => Err(backend(op)(ChError::UnexpectedState { op, state: info.state })),
            },
            // A VMM without a VM: nothing runs in it.
            Err(e) if e.is_not_created() => Ok((VmState::Shutdown, None)),
            Err(e) => Err(Self::api_error(vmm, op, e)),
        }
    }

    /// Checks the VM's state, then makes one call: one hop of the state
    /// machine `from → to`, refused as `WrongState` rather than by the
    /// server. A VM already in `to` is done, whether the state read says so
    /// or the server's refusal does ([`already_there`]): the hop is safe to
    /// repeat after the daemon died between the call and its record.
    async fn transition<F, Fut>(&self, vmm: &VmmHandle, endpoint: Endpoint, (from, to): (VmState, VmState), call: F) -> Result<(), HypervisorError>
    where
        F: FnOnce(ApiClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), ApiError>>,
    {
        let op = endpoint.path();
        let _serial = self.exclusive(&vmm.socket).await;
        let client = api_client(&vmm.socket, op)?;
        let (state, _) = self.state_of(vmm, &client, op).await?;
        if state == to {
            tracing::debug!(op, ?state, "the VM is already there");
            return Ok(());
        }
        if state != from {
            return Err(HypervisorError::WrongState { op, state });
        }
        match call(client).await {
            Err(e) if already_there(endpoint, to, &e) => {
                tracing::debug!(op, error = %crate::error_chain(&e), "the VM was already there");
                Ok(())
            }
            done => done.map_err(|e| Self::api_error(vmm, op, e)),
        }
    }

    /// Makes room on the guest's socket and starts a VMM on it, waiting
    /// until it answers. Refuses while a VM lives there; a VMM left empty
    /// by an unfinished create or restore is ended first.
    async fn launch(&self, guest: &GuestVmm, config: &VmConfig, op: &'static str) -> Result<(VmmHandle, ApiClient, ChVersion), HypervisorError> {
        let serial_log = config.serial_log.as_path();
        let client = api_client(&guest.socket, op)?;
        match client.ping_within(PROBE_TIMEOUT).await {
            Err(e) if e.is_not_listening() => {
                if process::find_by_argument(&guest.socket).is_some() {
                    return Err(HypervisorError::AlreadyRunning { socket: guest.socket.clone() });
                }
                // Up to v52 the server only bind()s: a stale file stops it.
                let _ = std::fs::remove_file(&guest.socket);
            }
            Err(_) => return Err(HypervisorError::AlreadyRunning { socket: guest.socket.clone() }),
            Ok(ping) => {
                match client.info_within(PROBE_TIMEOUT).await {
                    Err(e) if e.is_not_created() => {}
                    _ => return Err(HypervisorError::AlreadyRunning { socket: guest.socket.clone() }),
                }
                tracing::warn!(socket = %guest.socket.display(), "ending an empty VMM left by an unfinished create or restore");
                let _ = client.vmm_shutdown().await;
                if let Some(id) = serving_process(&ping, &guest.socket) {
                    if !process::wait_gone(id, EXIT_TIMEOUT).await {
                        process::kill(id, EXIT_TIMEOUT).await;
                    }
                }
                let _ = std::fs::remove_file(&guest.socket);
            }
        }
        let mut args = vec!["--api-socket".to_string(), format!("path={}", guest.socket.display())];
        let log_start = process::log_end(&guest.vmm_log);
        let mut passed = Vec::new();
        if let Some(user) = &config.user {
            // Its own user, with its default seccomp filter (named, not
            // left to the default, so a build that changed it cannot
            // quietly run this VMM without one).
            args.extend(["--seccomp".to_string(), "true".to_string()]);
            let handover = |e| backend(op)(ChError::Handover(e));
            super::handover::check_outside(config, user).map_err(handover)?;
            super::handover::apply(&super::handover::grants(config, &guest.guest_dir, user)).map_err(handover)?;
            for f in config::passed_files(config) {
                if f.write || config.disks.iter().any(|d| d.path == f.path) {
                    // A volume is reopened through /proc/self/fd, which
                    // checks the file's own mode: it joins the VMM's group.
                    super::handover::grant_volume(&f.path, user, f.write).map_err(handover)?;
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(f.write)
                    .open(&f.path)
                    .map_err(|source| backend(op)(ChError::Open { path: f.path.clone(), source }))?;
                passed.push((file, f.at));
            }
        }
        use std::os::fd::AsFd;
        let pass: Vec<_> = passed.iter().map(|(f, at)| (f.as_fd(), *at)).collect();
        let id = process::spawn_detached_with(&self.binary, &args, serial_log, &guest.vmm_log, config.user.as_ref(), &pass)
            .map_err(|e| HypervisorError::Spawn { binary: self.binary.clone(), source: e.into_io() })?;
        drop(pass);
        drop(passed);
        let deadline = Instant::now() + START_TIMEOUT;
        let ping = loop {
            if !process::is_alive(id) {
                return Err(backend(op)(ChError::ExitedEarly { log_tail: process::log_tail(&guest.vmm_log, log_start) }));
            }
            match client.ping_within(PROBE_TIMEOUT).await {
                Ok(ping) => break ping,
                Err(e) if Instant::now() >= deadline => {
                    process::kill(id, EXIT_TIMEOUT).await;
                    tracing::warn!(error = %crate::error_chain(&e), "cloud-hypervisor did not answer on its API socket");
                    return Err(HypervisorError::Timeout { op, secs: START_TIMEOUT.as_secs() });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let version = match ping_version(&ping) {
            Ok(v) => v,
            Err(e) => {
                process::kill(id, EXIT_TIMEOUT).await;
                return Err(backend(op)(e));
            }
        };
        let handle = VmmHandle { pid: id.pid, pid_start_time: id.start_time, socket: guest.socket.clone(), version: Some(version.to_string()) };
        Ok((handle, client, version))
    }

    /// Waits for the guest to unplug what a shrink took away. Cloud
    /// Hypervisor's `memory_actual_size` is its config's `size +
    /// hotplugged_size`, which `vm.resize` sets at once (vmm/src/lib.rs
    /// `vm_info`, vmm/src/vm.rs `resize`): it never shows the guest's
    /// progress, and nothing else in the API does. What does is the VMM's
    /// resident shared memory: guest RAM is a MAP_SHARED memfd (`shared`,
    /// see `config`), and the VMM punches out each block the guest unplugs.
    /// Done when that has not fallen for a few readings in a row; pages the
    /// guest touches meanwhile only raise it, so they do not hold the wait.
    async fn wait_unplugged(&self, vmm: &VmmHandle) {
        let deadline = Instant::now() + UNPLUG_TIMEOUT;
        let mut lowest = u64::MAX;
        let mut settled = 0;
        while Instant::now() < deadline {
            let Some(kib) = process::resident_shmem_kib(vmm.process_id()) else {
                return;
            };
            (lowest, settled) = unplug_progress(lowest, settled, kib);
            if settled >= UNPLUG_SETTLED_READINGS {
                return;
            }
            tokio::time::sleep(UNPLUG_POLL).await;
        }
        tracing::warn!(pid = vmm.pid, "the guest was still unplugging memory after {UNPLUG_TIMEOUT:?}");
    }

    /// The TAP's descriptor for a VMM that is not root (attached by the
    /// daemon, which may open /dev/net/tun); none otherwise.
    fn tap_for(&self, config: &VmConfig, op: &'static str) -> Result<Option<std::fs::File>, HypervisorError> {
        match (&config.user, &config.net) {
            (Some(_), Some(net)) => super::handover::attach_tap(&net.tap)
                .map(Some)
                .map_err(|source| backend(op)(ChError::Tap { tap: net.tap.clone(), source })),
            _ => Ok(None),
        }
    }

    /// Kills a VMM that failed half-way, so nothing is left behind.
    async fn discard(&self, vmm: &VmmHandle) {
        process::kill(vmm.process_id(), EXIT_TIMEOUT).await;
        let _ = std::fs::remove_file(&vmm.socket);
    }

    /// Starts a VMM and restores `dir` into it with `mode`.
    async fn restore_once(
        &self,
        guest: &GuestVmm,
        config: &VmConfig,
        dir: &Path,
        mode: impl Fn(ChVersion) -> Option<api::MemoryRestoreMode>,
    ) -> Result<(VmmHandle, Option<api::MemoryRestoreMode>), (HypervisorError, Option<api::MemoryRestoreMode>)> {
        let op = "restore";
        super::handover::open_snapshot(dir, &guest.guest_dir, config.user.as_ref()).map_err(|e| (backend(op)(ChError::Handover(e)), None))?;
        let (handle, client, version) = self.launch(guest, config, op).await.map_err(|e| (e, None))?;
        let mode = mode(version);
        let restored = async {
            let tap = self.tap_for(config, op)?;
            let fds: Vec<_> = tap.iter().map(|t| t.as_raw_fd()).collect();
            client.restore(&config::restore_config_for(config, dir, mode), &fds).await.map_err(|e| match e.refusal() {
                // The server read the snapshot and will not have it (a file
                // it cannot parse, one that does not match the state, no
                // directory): the same files fail the same way every time.
                // An on-demand refusal may still pass by copy (see `restore`).
                Some(Refusal::Other | Refusal::NotADirectory) => {
                    HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source: Box::new(ChError::from(e)) }
                }
                _ => Self::api_error(&handle, op, e),
            })?;
            match self.state_of(&handle, &client, op).await? {
                (VmState::Paused, _) => Ok(()),
                (state, _) => Err(HypervisorError::WrongState { op, state }),
            }
        };
        match restored.await {
            Ok(()) => Ok((handle, mode)),
            Err(e) => {
                self.discard(&handle).await;
                Err((e, mode))
            }
        }
    }
}

#[async_trait]
impl Hypervisor for CloudHypervisorBackend {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::CloudHypervisor
    }

    /// `vm.create` plugs all hotplug memory at boot (`hotplugged_size`).
    fn running_memory_bytes(&self, memory_bytes: u64, hotplug_memory_bytes: u64) -> u64 {
        memory_bytes + hotplug_memory_bytes
    }

    async fn version(&self) -> Result<String, HypervisorError> {
        self.binary_version().await.map(|v| v.to_string()).map_err(backend("version"))
    }

    async fn probe(&self, guest: &GuestVmm) -> Probe {
        let client = match ApiClient::new(&guest.socket) {
            Ok(c) => c,
            Err(e) => return Probe::Unreachable { reason: crate::error_chain(&e) },
        };
        let recorded = guest
            .recorded
            .as_ref()
            .filter(|h| h.socket == guest.socket && process::is_alive(h.process_id()));
        let ping = match client.ping_within(PROBE_TIMEOUT).await {
            Ok(ping) => ping,
            Err(e) if e.is_not_listening() => {
                let holder = recorded.map(VmmHandle::process_id).or_else(|| process::find_by_argument(&guest.socket));
                return match holder {
                    Some(p) => Probe::Unreachable {
                        reason: format!("cloud-hypervisor process {} lives but its API socket refuses connections", p.pid),
                    },
                    // A socket file no process serves: absent. The file is
                    // left; removing it is a step the planner chooses.
                    None => Probe::Absent,
                };
            }
            Err(e) => return Probe::Unreachable { reason: crate::error_chain(&e) },
        };
        let version = ChVersion::of_ping(&ping).map(|v| v.to_string());
        let state = match client.info_within(PROBE_TIMEOUT).await {
            Ok(info) => match vm_state(info.state) {
                Some(s) => s,
                None => return Probe::Unreachable { reason: format!("the VM is in state {:?}", info.state) },
            },
            Err(e) if e.is_not_created() => VmState::Shutdown,
            Err(e) => return Probe::Unreachable { reason: crate::error_chain(&e) },
        };
        let handle = match (recorded, serving_process(&ping, &guest.socket)) {
            (Some(h), _) => VmmHandle { version: version.or(h.version.clone()), ..h.clone() },
            (None, Some(p)) => VmmHandle { pid: p.pid, pid_start_time: p.start_time, socket: guest.socket.clone(), version },
            (None, None) => {
                return Probe::Unreachable { reason: "the API answers but no cloud-hypervisor process names the socket".into() }
            }
        };
        Probe::Alive { handle, state }
    }

    async fn create(&self, guest: &GuestVmm, config: &VmConfig) -> Result<VmmHandle, HypervisorError> {
        let op = "create";
        let record = LaunchRecord { version: LAUNCH_VERSION, config: config.clone() };
        launch::write(&guest.guest_dir.join(LAUNCH_FILE), &record).map_err(|e| backend(op)(e.into()))?;
        let _serial = self.exclusive(&guest.socket).await;
        let (handle, client, version) = self.launch(guest, config, op).await?;
        if config.net.is_some() && !version.leaves_tap_addresses_alone() {
            self.discard(&handle).await;
            return Err(backend(op)(ChError::NetworkNeedsV49 { version: version.to_string() }));
        }
        if let Err(e) = client.create(&config::vm_config(config)).await {
            self.discard(&handle).await;
            return Err(Self::api_error(&handle, op, e));
        }
        // A VMM that may not open /dev/net/tun gets its TAP as a
        // descriptor, added to the created VM before it boots.
        if let (Some(net), Some(_)) = (config::net_config(config), &config.user) {
            let added = match self.tap_for(config, op) {
                Ok(tap) => {
                    let fds: Vec<_> = tap.iter().map(|t| t.as_raw_fd()).collect();
                    client.add_net(&net, &fds).await.map_err(|e| Self::api_error(&handle, op, e))
                }
                Err(e) => Err(e),
            };
            if let Err(e) = added {
                self.discard(&handle).await;
                return Err(e);
            }
        }
        tracing::info!(pid = handle.pid, %version, "Cloud Hypervisor created the VM");
        Ok(handle)
    }

    async fn boot(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let hop = (VmState::Created, VmState::Running);
        self.transition(vmm, Endpoint::VmBoot, hop, |c| async move { c.boot().await }).await
    }

    async fn pause(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let hop = (VmState::Running, VmState::Paused);
        self.transition(vmm, Endpoint::VmPause, hop, |c| async move { c.pause().await }).await
    }

    async fn resume(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let hop = (VmState::Paused, VmState::Running);
        self.transition(vmm, Endpoint::VmResume, hop, |c| async move { c.resume().await }).await
    }

    async fn power_off(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let _serial = self.exclusive(&vmm.socket).await;
        match api_client(&vmm.socket, "power_off")?.power_button().await {
            Ok(()) => Ok(()),
            // The guest powered off so fast that the VMM exited mid-reply.
            Err(e) if !e.is_refusal() && !process::is_alive(vmm.process_id()) => Ok(()),
            Err(e) => Err(Self::api_error(vmm, "power_off", e)),
        }
    }

    async fn snapshot(&self, vmm: &VmmHandle, dir: &Path) -> Result<SnapshotMeta, HypervisorError> {
        let op = "snapshot";
        let guest = guest_dir(&vmm.socket).map_err(backend(op))?;
        let record = read_launch(&guest.join(LAUNCH_FILE)).map_err(backend(op))?;
        let entries = std::fs::read_dir(dir).map_err(|source| backend(op)(ChError::SnapshotDir { dir: dir.to_path_buf(), source }))?;
        if entries.count() > 0 {
            return Err(backend(op)(ChError::NotEmpty { dir: dir.to_path_buf() }));
        }
        let _serial = self.exclusive(&vmm.socket).await;
        let client = api_client(&vmm.socket, op)?;
        let (state, _) = self.state_of(vmm, &client, op).await?;
        if state != VmState::Paused {
            return Err(HypervisorError::WrongState { op, state });
        }
        // The handle carries what the VMM reported when it was launched or
        // last probed; only a handle without one costs a `vmm.ping`.
        let version = match vmm.version.as_deref().and_then(ChVersion::parse) {
            Some(v) => v,
            None => {
                let ping = client.ping().await.map_err(|e| Self::api_error(vmm, op, e))?;
                ping_version(&ping).map_err(backend(op))?
            }
        };
        if let Some(user) = &record.config.user {
            // The VMM writes the files itself, as its own user.
            super::handover::writable_snapshot_dir(dir, guest, user).map_err(|e| backend(op)(ChError::Handover(e)))?;
        }
        // A standby soon after an on-demand restore meets v53's prefault:
        // the snapshot waits it out (bounded), the VM staying paused.
        match client.snapshot_after_prefault(dir, self.prefault_wait).await {
            Ok(()) => {}
            // Checked empty above: someone wrote into it meanwhile.
            Err(e) if e.refusal() == Some(Refusal::FileExists) => {
                tracing::warn!(error = %crate::error_chain(&e), "the snapshot directory filled up under the snapshot");
                return Err(backend(op)(ChError::NotEmpty { dir: dir.to_path_buf() }));
            }
            Err(e) => return Err(Self::api_error(vmm, op, e)),
        }
        launch::write(&dir.join(LAUNCH_FILE), &record).map_err(|e| backend(op)(e.into()))?;
        Ok(SnapshotMeta { hypervisor_version: version.to_string(), config_hash: record.config.config_hash() })
    }

    fn snapshot_config(&self, dir: &Path) -> Result<VmConfig, HypervisorError> {
        let record = read_launch(&dir.join(LAUNCH_FILE))
            .map_err(|e| HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source: Box::new(e) })?;
        Ok(record.config)
    }

    async fn restore(&self, guest: &GuestVmm, config: &VmConfig, dir: &Path) -> Result<VmmHandle, HypervisorError> {
        let op = "restore";
        let bad = |e: ChError| HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source: Box::new(e) };
        let record = read_launch(&dir.join(LAUNCH_FILE)).map_err(bad)?;
        if record.config != *config {
            return Err(bad(ChError::ConfigMismatch));
        }
        for name in SNAPSHOT_FILES {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(bad(ChError::MissingFile { path }));
            }
        }
        launch::write(&guest.guest_dir.join(LAUNCH_FILE), &record).map_err(|e| backend(op)(e.into()))?;
        let _serial = self.exclusive(&guest.socket).await;
        // memory is always shared (see `config`).
        let preferred = |v: ChVersion| config::restore_mode(v, true);
        let (handle, mode) = match self.restore_once(guest, config, dir, preferred).await {
            Ok(done) => done,
            Err((HypervisorError::Backend { source, .. } | HypervisorError::BadSnapshot { source, .. }, Some(api::MemoryRestoreMode::OnDemand))) => {
                // On-demand restore needs userfaultfd (/dev/userfaultfd or
                // vm.unprivileged_userfaultfd=1); without it the server
                // refuses rather than falling back itself.
                tracing::warn!(error = %crate::error_chain(source.as_ref()), "on-demand restore refused; restoring by copy");
                self.restore_once(guest, config, dir, |_| Some(api::MemoryRestoreMode::Copy)).await.map_err(|(e, _)| e)?
            }
            Err((e, _)) => return Err(e),
        };
        tracing::info!(pid = handle.pid, ?mode, "Cloud Hypervisor restored the VM, paused");
        Ok(handle)
    }

    async fn shutdown_vmm(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let id = vmm.process_id();
        if !process::is_alive(id) {
            return Err(HypervisorError::VmmGone { pid: vmm.pid });
        }
        let _serial = self.exclusive(&vmm.socket).await;
        match api_client(&vmm.socket, "shutdown_vmm")?.vmm_shutdown().await {
            Ok(()) => {}
            Err(e) if process::is_alive(id) => {
                tracing::warn!(error = %crate::error_chain(&e), "vmm.shutdown failed; killing cloud-hypervisor")
            }
            // It exited before its reply reached us.
            Err(_) => {}
        }
        // The process holds OFD locks on the disk images until it exits.
        super::await_vmm_exit(vmm, EXIT_TIMEOUT, "cloud-hypervisor ignored vmm.shutdown").await;
        Ok(())
    }

    async fn kill(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        super::kill_vmm(vmm, EXIT_TIMEOUT).await
    }

    async fn info(&self, vmm: &VmmHandle) -> Result<VmInfo, HypervisorError> {
        let _serial = self.exclusive(&vmm.socket).await;
        let (state, memory_actual_bytes) = self.state_of(vmm, &api_client(&vmm.socket, "info")?, "info").await?;
        Ok(VmInfo { state, memory_actual_bytes })
    }

    async fn resize_memory(&self, vmm: &VmmHandle, total_bytes: u64) -> Result<(), HypervisorError> {
        let op = "resize_memory";
        let guest = guest_dir(&vmm.socket).map_err(backend(op))?;
        let record = read_launch(&guest.join(LAUNCH_FILE)).map_err(backend(op))?;
        let config = &record.config;
        if config.hotplug_memory_bytes == 0 {
            return Err(HypervisorError::Unsupported { backend: HypervisorKind::CloudHypervisor, what: "memory resize without hotplug memory" });
        }
        let (min, max) = (config.memory_bytes, config.memory_bytes + config.hotplug_memory_bytes);
        if total_bytes < min || total_bytes > max {
            return Err(backend(op)(ChError::MemoryOutOfRange { requested: total_bytes, min, max }));
        }
        let _serial = self.exclusive(&vmm.socket).await;
        let client = api_client(&vmm.socket, op)?;
        let (_, requested) = self.state_of(vmm, &client, op).await?;
        if requested == Some(total_bytes) {
            // v53 refuses a resize to the size already asked for (a 500 with
            // a backtrace); there is nothing to do.
            return Ok(());
        }
        client.resize_memory(total_bytes).await.map_err(|e| Self::api_error(vmm, op, e))?;
        if requested.is_some_and(|r| total_bytes < r) {
            self.wait_unplugged(vmm).await;
        }
        Ok(())
    }

    async fn add_disk(&self, vmm: &VmmHandle, disk: &DiskConfig) -> Result<(), HypervisorError> {
        let _serial = self.exclusive(&vmm.socket).await;
        let added = api_client(&vmm.socket, "add_disk")?.add_disk(&config::disk(disk)).await;
        match added.map_err(|e| Self::api_error(vmm, "add_disk", e))? {
            Some(pci) => tracing::info!(id = %pci.id, bdf = %pci.bdf, "disk hot-plugged"),
            None => tracing::info!(id = %disk.id, "disk added to the created VM"),
        }
        Ok(())
    }

    async fn remove_disk(&self, vmm: &VmmHandle, id: &str) -> Result<(), HypervisorError> {
        let _serial = self.exclusive(&vmm.socket).await;
        api_client(&vmm.socket, "remove_disk")?.remove_device(id).await.map_err(|e| Self::api_error(vmm, "remove_disk", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_by_name() {
        let table = [
            (api::VmState::Created, Some(VmState::Created)),
            (api::VmState::Running, Some(VmState::Running)),
            (api::VmState::Paused, Some(VmState::Paused)),
            (api::VmState::Shutdown, Some(VmState::Shutdown)),
            (api::VmState::BreakPoint, None),
        ];
        for (ch, want) in table {
            assert_eq!(vm_state(ch), want, "{ch:?}");
        }
    }

    #[test]
    fn an_unplug_is_done_when_resident_memory_stops_falling() {
        let run = |readings: &[u64]| {
            let (mut lowest, mut settled) = (u64::MAX, 0);
            readings
                .iter()
                .position(|&kib| {
                    (lowest, settled) = unplug_progress(lowest, settled, kib);
                    settled >= UNPLUG_SETTLED_READINGS
                })
                .map(|i| i + 1)
        };
        // Falling block by block, then flat: done on the third flat reading.
        assert_eq!(run(&[900, 700, 500, 300, 300, 300, 300]), Some(7));
        // The guest touching pages meanwhile does not hold the wait.
        assert_eq!(run(&[900, 500, 520, 540, 560]), Some(5));
        // Still falling: not done.
        assert_eq!(run(&[900, 800, 700, 600, 500, 400]), None);
        // Nothing to unplug that was resident: done at once.
        assert_eq!(run(&[100, 100, 100]), Some(3));
    }

    #[tokio::test]
    async fn conformance_without_a_vmm() {
        use crate::hypervisor::conformance::*;
        let ch = CloudHypervisorBackend::new("/nonexistent/cloud-hypervisor".into());
        stale_socket_is_absent(&ch, "ch.sock").await;
        silent_socket_is_unreachable(&ch, "ch.sock", "vmm.ping").await;
        gone_vmm_is_vmm_gone(&ch, "ch.sock").await;
    }

    #[test]
    fn a_refusal_that_says_the_vm_is_there_already_is_done() {
        let refused = |endpoint, messages: &[&str]| ApiError::Refused {
            endpoint,
            status: 500,
            messages: messages.iter().map(|m| m.to_string()).collect(),
        };
        let twice = refused(
            Endpoint::VmPause,
            &["Error from API", "The VM could not be paused", "Cannot pause VM", "Failed to pause migratable component", "Invalid transition: InvalidStateTransition(Paused, Paused)"],
        );
        assert!(already_there(Endpoint::VmPause, VmState::Paused, &twice));
        assert!(!already_there(Endpoint::VmResume, VmState::Running, &twice), "paused is not where a resume leads");
        let resumed = refused(Endpoint::VmResume, &["Error from API", "The VM could not resume", "Invalid transition: InvalidStateTransition(Running, Running)"]);
        assert!(already_there(Endpoint::VmResume, VmState::Running, &resumed));
        let booted = refused(Endpoint::VmBoot, &["Error from API", "The VM could not boot", "VM is already created"]);
        assert!(already_there(Endpoint::VmBoot, VmState::Running, &booted));
        let created = refused(Endpoint::VmCreate, &["Error from API", "The VM could not be created", "VM is already created"]);
        assert!(!already_there(Endpoint::VmCreate, VmState::Created, &created), "only a boot reads it as done");
        let idle = refused(Endpoint::VmPause, &["Error from API", "The VM could not be paused", "VM is not running"]);
        assert!(!already_there(Endpoint::VmPause, VmState::Paused, &idle), "not running is not paused");
        let gone = ApiError::Connect { socket: "/x".into(), source: std::io::ErrorKind::NotFound.into() };
        assert!(!already_there(Endpoint::VmPause, VmState::Paused, &gone));
    }
}
