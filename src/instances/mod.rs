//! Instances: observing one instance and carrying out one planned step.
//!
//! This is where the store and the hypervisor meet. `observe` derives the
//! state (never stored): no VMM → `Standby` with a complete snapshot, else
//! `Stopped`; a VMM that answers → its own state; a socket whose VMM does not
//! answer → `Unknown`. `execute` checks the step's hop against the state
//! machine before any side effect and persists what changed after it. It
//! does not choose steps; that is `reconcile::plan`.
//!
//! Every step is safe to run again after the daemon is killed at any point
//! inside it: VMMs are found again by their socket, snapshots only count
//! once their marker is written, and metadata is written atomically.
//!
//! Networking: a guest with `[network] enabled` gets its address lease here,
//! recorded in its metadata before `prepare` makes its TAP, and keeps it
//! until the guest is removed (a stopped guest comes back on the same
//! address). Its TAP lives while a VMM or a snapshot may use it: it goes
//! when the guest is stopped (`StopVmm` without a snapshot,
//! `DiscardSnapshot`) or removed. A guest whose VMM ended on its own keeps
//! an idle TAP until it is started again (which reuses it) or removed.
//! `observe` of a live VM checks its TAP through the provisioner, which puts
//! back what it can; a TAP its VMM no longer holds is reported as
//! `network_lost`, for the planner to reconnect the guest.

pub mod image_provisioner;
pub mod provision;

use crate::declaration::spec::{DesiredState, HypervisorKind, InstanceSpec};
use crate::hypervisor::{Backends, GuestVmm, Hypervisor, HypervisorError, Probe, VmInfo, VmmHandle};
use crate::logs::InstanceLog;
use crate::network::host::TapHealth;
use crate::network::ipam::LeaseIndex;
use crate::exit::GuestEnd;
use crate::reconcile::plan::{Observed, Step};
use crate::settings::Settings;
use crate::state::{StateError, VmState};
use crate::store::{now_rfc3339, ExitRecord, GuestPaths, Metadata, SnapshotInfo, Store, StoreError, VmmRecord};
pub use provision::{ProvisionError, Provisioner};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{op} failed")]
    Hypervisor {
        op: &'static str,
        #[source]
        source: HypervisorError,
    },
    #[error("preparing the VM's disks failed")]
    Provision(#[from] ProvisionError),
    #[error("cannot give the guest a network address")]
    Network(#[from] crate::network::NetworkError),
    #[error("cannot hand out a network address while {0} guest record(s) cannot be read: they may hold addresses")]
    UnreadableLeases(usize),
    #[error("cannot prune caches while {0} guest record(s) cannot be read: their VMs may need any entry")]
    UnreadableGuests(usize),
    #[error("cannot prune caches: a launch record cannot be read")]
    UnreadableLaunch(#[source] crate::hypervisor::launch::LaunchError),
    #[error("step refused by the state machine")]
    State(#[from] StateError),
    #[error("no {0} backend is available on this host")]
    NoBackend(HypervisorKind),
    #[error("instance {0} has no guest record")]
    NoGuest(String),
    #[error("{step} needs the declaration")]
    NoSpec { step: String },
    #[error("{step} needs a live VMM")]
    NoVmm { step: String },
    #[error("recording an exit needs a guest that ended")]
    NoExit,
}

/// What one look at an instance found.
#[derive(Debug, Clone)]
pub struct Observation {
    pub meta: Option<Metadata>,
    pub state: VmState,
    pub snapshot: Option<SnapshotInfo>,
    /// The live VMM, when one answered.
    pub vmm: Option<VmmHandle>,
    /// Why the state is `Unknown`, when it is.
    pub unreachable: Option<String>,
    /// How the guest ended, when it ended without the daemon asking and
    /// nothing has dealt with that yet (see `Observed::ended`).
    pub ended: Option<GuestEnd>,
    /// The live VM's TAP is not the one its VMM holds any more (see
    /// `Observed::network_lost`).
    pub network_lost: bool,
}

impl Observation {
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// What the planner needs of this observation.
    pub fn observed(&self, not_before: Option<tokio::time::Instant>) -> Observed {
        Observed {
            exists: self.meta.is_some(),
            state: self.state,
            has_snapshot: self.has_snapshot(),
            applied: self.meta.as_ref().and_then(|m| m.applied.clone()),
            not_before,
            ended: self.ended,
            network_lost: self.network_lost,
            exited: self.meta.as_ref().and_then(|m| m.exited.as_ref()).map(|e| (e.end, e.applied.clone())),
        }
    }
}

/// Whether an observation in `state` found a guest that ended without the
/// daemon asking, so that the console must say how: its VMM is on record
/// but gone, or the guest powered off inside its VMM though the daemon did
/// not just power it off. A stop the daemon asked for is no such ending:
/// where the VMM exits with its guest, `PowerOff` drops the record itself
/// (`forget_vmm`); where it stays, `powered_off` says so.
fn ended_by_itself(state: VmState, vmm_on_record: bool, powered_off: bool) -> bool {
    match state {
        VmState::Stopped => vmm_on_record,
        VmState::Shutdown => !powered_off,
        VmState::Created | VmState::Running | VmState::Paused | VmState::Standby | VmState::Unknown => false,
    }
}

/// Whether a VM in `state` has a VMM that holds its TAP open: the TAP is
/// opened when the VM is made (QEMU, a restore) or booted (Cloud
/// Hypervisor), so a just-created VM is not checked.
fn holds_tap(state: VmState) -> bool {
    match state {
        VmState::Running | VmState::Paused => true,
        VmState::Created | VmState::Shutdown | VmState::Stopped | VmState::Standby | VmState::Unknown => false,
    }
}

/// Whether a TAP in this health leaves the guest without its network.
fn lost(health: TapHealth) -> bool {
    match health {
        TapHealth::Fine | TapHealth::Misplaced => false,
        TapHealth::Missing | TapHealth::Orphaned => true,
    }
}

/// Observes and acts on instances; cheap to share.
pub struct Instances {
    store: Arc<Store>,
    backends: Backends,
    settings: Arc<Settings>,
    provisioner: Arc<dyn Provisioner>,
    /// Every guest's address, read from the store at the first lease the
    /// daemon hands out and kept up to date by each lease, release and
    /// removal. Held from looking up the free addresses to recording a new
    /// lease, so two creates cannot pick the same one.
    leases: tokio::sync::Mutex<Option<LeaseBook>>,
}

/// The lease index and how many guest records could not be read when it
/// was built: those may hold addresses it does not know.
struct LeaseBook {
    index: LeaseIndex,
    unreadable: usize,
}

/// How often a stopping guest is looked at.
const POLL: Duration = Duration::from_millis(50);
/// While a guest unplugs memory: how often its size is read, how many
/// equal readings in a row count as settled, and how long to wait at most.
const MEMORY_POLL: Duration = Duration::from_millis(20);
const MEMORY_STABLE_READINGS: u32 = 3;
const MEMORY_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

impl Instances {
    pub fn new(
        store: Arc<Store>,
        backends: Backends,
        settings: Arc<Settings>,
        provisioner: Arc<dyn Provisioner>,
    ) -> Instances {
        Instances { store, backends, settings, provisioner, leases: tokio::sync::Mutex::new(None) }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The hypervisor an instance uses: its own choice or the default.
    pub fn resolve_kind(&self, spec: &InstanceSpec) -> HypervisorKind {
        spec.hypervisor.unwrap_or(self.settings.default_hypervisor)
    }

    fn backend(&self, kind: HypervisorKind) -> Result<Arc<dyn Hypervisor>, InstanceError> {
        self.backends.get(kind).ok_or(InstanceError::NoBackend(kind))
    }

    fn guest_vmm(paths: &GuestPaths, meta: &Metadata) -> GuestVmm {
        let socket = match meta.hypervisor {
            HypervisorKind::CloudHypervisor => paths.ch_socket.clone(),
            HypervisorKind::Qemu => paths.qmp_socket.clone(),
        };
        GuestVmm {
            guest_dir: paths.dir.clone(),
            socket,
            vmm_log: paths.vmm_log.clone(),
            recorded: meta.vmm.as_ref().map(handle_of),
        }
    }

    /// Derives the instance's state from the store and its VMM.
    pub async fn observe(&self, name: &str) -> Result<Observation, InstanceError> {
        self.observe_after(name, false).await
    }

    /// [`Instances::observe`], told whether the daemon powered the guest
    /// off since it last looked (`PowerOff` succeeded): a guest then found
    /// shut down in its VMM did not end by itself, and its console is not
    /// read. A daemon restarted in between does not know, and takes such a
    /// guest for one that ended by itself (`init was asked to stop`).
    pub async fn observe_after(&self, name: &str, powered_off: bool) -> Result<Observation, InstanceError> {
        let Some(meta) = self.store.find_by_name(name)? else {
            return Ok(Observation {
                meta: None,
                state: VmState::Stopped,
                snapshot: None,
                vmm: None,
                unreachable: None,
                ended: None,
                network_lost: false,
            });
        };
        let snapshot = self.store.snapshot(meta.id)?;
        let backend = self.backend(meta.hypervisor)?;
        let guest = Self::guest_vmm(&self.store.guest_paths(meta.id), &meta);
        let (state, vmm, unreachable) = match backend.probe(&guest).await {
            Probe::Absent if snapshot.is_some() => (VmState::Standby, None, None),
            Probe::Absent => (VmState::Stopped, None, None),
            Probe::Alive { handle, state } => (state, Some(handle), None),
            Probe::Unreachable { reason } => (VmState::Unknown, None, Some(reason)),
        };
        let ended = if ended_by_itself(state, meta.vmm.is_some(), powered_off) {
            Some(self.read_end(meta.id).await)
        } else {
            None
        };
        let network_lost = holds_tap(state) && self.check_network(&meta, state).await;
        Ok(Observation { meta: Some(meta), state, snapshot, vmm, unreachable, ended, network_lost })
    }

    /// The network half of the health check of a live VM: puts its TAP
    /// back on the host side and says whether the guest lost its network
    /// (its VMM holds a deleted TAP). A failed check is logged and taken as
    /// no loss: a netlink hiccup must not cycle a guest.
    async fn check_network(&self, meta: &Metadata, state: VmState) -> bool {
        let health = match self.provisioner.check_network(meta).await {
            Ok(Some(health)) => health,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(instance = %meta.name, error = %error_chain(&e), "cannot check the guest's TAP");
                return false;
            }
        };
        let tap = meta.network.as_ref().map(|l| l.tap.as_str()).unwrap_or("?");
        let line = match health {
            TapHealth::Fine => return false,
            TapHealth::Misplaced => format!("TAP {tap} was off the bridge or down; put it back"),
            // Said once, when first seen: the cycle that follows passes
            // through Paused and looks again there.
            TapHealth::Missing | TapHealth::Orphaned if state == VmState::Running => format!(
                "the guest lost its network: TAP {tap} was deleted while the VM ran; it is made again, and a standby/restore cycle reconnects the guest"
            ),
            TapHealth::Missing | TapHealth::Orphaned => return true,
        };
        tracing::warn!(instance = %meta.name, "{line}");
        if let Ok(log) = InstanceLog::open(&self.store.guest_paths(meta.id).hypeman_log) {
            let _ = log.append(&line);
        }
        lost(health)
    }

    /// How the latest boot ended, from the tail of the console log.
    async fn read_end(&self, id: ulid::Ulid) -> GuestEnd {
        let path = self.store.guest_paths(id).app_log;
        match crate::logs::tail(&path, crate::exit::TAIL_LINES).await {
            Ok(bytes) => crate::exit::parse(&String::from_utf8_lossy(&bytes)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %error_chain(&e), "cannot read the console log");
                GuestEnd::Unknown
            }
        }
    }

    /// Carries out one step. `spec` is the current declaration, when valid.
    pub async fn execute(
        &self,
        name: &str,
        step: &Step,
        spec: Option<&InstanceSpec>,
        obs: &Observation,
    ) -> Result<(), InstanceError> {
        if let Some(to) = step.hop(obs.state) {
            obs.state.hop(to)?;
        }
        let needs_spec = || spec.ok_or_else(|| InstanceError::NoSpec { step: step.to_string() });
        if let Step::Provision = step {
            let spec = needs_spec()?;
            self.store.create_guest(name, self.resolve_kind(spec))?;
            return Ok(());
        }
        let mut meta = obs.meta.clone().ok_or_else(|| InstanceError::NoGuest(name.to_string()))?;
        let paths = self.store.guest_paths(meta.id);
        let log = InstanceLog::open(&paths.hypeman_log).ok();
        if let Some(log) = &log {
            let why = spec.and_then(|spec| self.why_restart(step, spec, &meta));
            let _ = log.append(&format!("{step} (from {}){}", obs.state, why.unwrap_or_default()));
        }
        let result = self.act(step, spec, obs, &mut meta, &paths).await;
        if let Some(log) = &log {
            let _ = match &result {
                Ok(()) => log.append(&format!("{step}: done")),
                Err(e) => log.append(&format!("{step}: failed: {}", error_chain(e))),
            };
        }
        result
    }

    /// Why a power off or a discarded snapshot was planned, when it is to
    /// apply a changed declaration: `hypeman.log` says which fields.
    fn why_restart(&self, step: &Step, spec: &InstanceSpec, meta: &Metadata) -> Option<String> {
        if spec.state == DesiredState::Stopped {
            return None;
        }
        let applied = meta.applied.as_ref()?;
        let changed = crate::declaration::spec::changed_fields(applied, &spec.restart_fields(self.resolve_kind(spec)));
        if changed.is_empty() {
            return None;
        }
        let changed = changed.join(", ");
        match step {
            Step::DiscardSnapshot => {
                Some(format!(": the declaration changed ({changed}) since the snapshot; it cannot be restored, a cold boot follows"))
            }
            Step::PowerOff => Some(format!(": the declaration changed ({changed}); restarting to apply it")),
            _ => None,
        }
    }

    async fn act(
        &self,
        step: &Step,
        spec: Option<&InstanceSpec>,
        obs: &Observation,
        meta: &mut Metadata,
        paths: &GuestPaths,
    ) -> Result<(), InstanceError> {
        let live = || obs.vmm.clone().ok_or_else(|| InstanceError::NoVmm { step: step.to_string() });
        let hv = |op: &'static str| move |source| InstanceError::Hypervisor { op, source };
        match step {
            Step::Converged | Step::Blocked(_) | Step::WaitUntil(_) | Step::Provision => Ok(()),
            Step::Create => {
                let spec = spec.ok_or_else(|| InstanceError::NoSpec { step: step.to_string() })?;
                let kind = self.resolve_kind(spec);
                let backend = self.backend(kind)?;
                meta.hypervisor = kind;
                self.ensure_lease(spec, meta).await?;
                let config = self.provisioner.prepare(spec, paths, meta).await?;
                let guest = Self::guest_vmm(paths, meta);
                let handle = backend.create(&guest, &config).await.map_err(hv("create"))?;
                meta.vmm = Some(record_of(&handle));
                meta.applied = Some(spec.restart_fields(kind));
                meta.last_error = None;
                meta.exited = None;
                self.store.write_metadata(meta)?;
                Ok(())
            }
            Step::Boot => {
                let backend = self.backend(meta.hypervisor)?;
                backend.boot(&live()?).await.map_err(hv("boot"))
            }
            Step::Pause => {
                let backend = self.backend(meta.hypervisor)?;
                let vmm = live()?;
                // A pause on the way to standby gives the hotplug memory
                // back first, so the snapshot holds only what the guest uses.
                if let Some(spec) = spec.filter(|s| s.state == DesiredState::Standby && s.hotplug_memory.bytes() > 0) {
                    self.shrink_memory(backend.as_ref(), &vmm, spec.memory.bytes(), &meta.name).await;
                }
                backend.pause(&vmm).await.map_err(hv("pause"))
            }
            Step::Resume => {
                let backend = self.backend(meta.hypervisor)?;
                let vmm = live()?;
                backend.resume(&vmm).await.map_err(hv("resume"))?;
                // A paused VM with a snapshot beside it was just restored.
                if let Some(spec) = spec.filter(|s| s.state == DesiredState::Running && obs.has_snapshot()) {
                    self.grow_memory(backend.as_ref(), &vmm, spec, &meta.name).await;
                }
                Ok(())
            }
            Step::Snapshot => {
                let backend = self.backend(meta.hypervisor)?;
                let vmm = live()?;
                let dir = self.store.begin_snapshot(meta.id)?;
                let taken = backend.snapshot(&vmm, &dir).await.map_err(hv("snapshot"))?;
                let memory = backend.info(&vmm).await.ok().and_then(|i| i.memory_actual_bytes).unwrap_or(0);
                let info = SnapshotInfo::new(meta.hypervisor, &taken.hypervisor_version, &taken.config_hash, memory);
                self.store.commit_snapshot(meta.id, &info)?;
                // Only now, with a complete snapshot on disk, may the VMM go.
                self.end_vmm(backend.as_ref(), &vmm).await?;
                meta.vmm = None;
                self.store.write_metadata(meta)?;
                Ok(())
            }
            Step::Restore => self.restore(spec, obs, meta, paths).await,
            Step::PowerOff => {
                let backend = self.backend(meta.hypervisor)?;
                let vmm = live()?;
                if obs.state == VmState::Created {
                    // Nothing booted that could hear the power button.
                    backend.kill(&vmm).await.map_err(hv("kill"))?;
                    return self.release_if_unused(obs, meta).await;
                }
                backend.power_off(&vmm).await.map_err(hv("power off"))?;
                let guest = Self::guest_vmm(paths, meta);
                let grace = self.settings.reconcile.stop_grace;
                let deadline = tokio::time::Instant::now() + grace;
                while tokio::time::Instant::now() < deadline {
                    match backend.probe(&guest).await {
                        Probe::Absent => {
                            // The VMM exited with its guest: nothing follows.
                            self.release_if_unused(obs, meta).await?;
                            return self.forget_vmm(obs, meta);
                        }
                        // StopVmm follows and releases what the VM used.
                        Probe::Alive { state: VmState::Shutdown, .. } => return Ok(()),
                        Probe::Alive { .. } | Probe::Unreachable { .. } => tokio::time::sleep(POLL).await,
                    }
                }
                let line = format!("guest did not power off within {}; killing its VMM", humantime::format_duration(grace));
                tracing::warn!(instance = %meta.name, "{line}");
                if let Ok(log) = InstanceLog::open(&paths.hypeman_log) {
                    let _ = log.append(&line);
                }
                backend.kill(&vmm).await.map_err(hv("kill"))?;
                self.release_if_unused(obs, meta).await?;
                self.forget_vmm(obs, meta)
            }
            Step::StopVmm => {
                let backend = self.backend(meta.hypervisor)?;
                self.end_vmm(backend.as_ref(), &live()?).await?;
                if let Some(end) = obs.ended {
                    self.note_exit(meta, paths, end);
                }
                self.forget_vmm(obs, meta)?;
                self.release_if_unused(obs, meta).await
            }
            Step::DiscardSnapshot => {
                self.store.remove_snapshot(meta.id)?;
                meta.applied = None;
                meta.vmm = None;
                self.store.write_metadata(meta)?;
                self.provisioner.release(meta).await?;
                Ok(())
            }
            Step::DropStaleSnapshot => {
                // Again here, in case the daemon died between the resume
                // and the growth; a VM already grown is left alone.
                if let (Some(spec), Some(vmm)) = (spec, &obs.vmm) {
                    let backend = self.backend(meta.hypervisor)?;
                    self.grow_memory(backend.as_ref(), vmm, spec, &meta.name).await;
                }
                Ok(self.store.remove_snapshot(meta.id)?)
            }
            Step::RecordExit => {
                let Some(end) = obs.ended else {
                    return Err(InstanceError::NoExit);
                };
                self.note_exit(meta, paths, end);
                self.release_if_unused(obs, meta).await?;
                self.forget_vmm(obs, meta)
            }
            Step::ForgetExit => {
                meta.exited = None;
                self.store.write_metadata(meta)?;
                Ok(())
            }
            Step::ForceKill => {
                let backend = self.backend(meta.hypervisor)?;
                let Some(record) = &meta.vmm else {
                    return Err(InstanceError::NoVmm { step: step.to_string() });
                };
                backend.kill(&handle_of(record)).await.map_err(hv("kill"))?;
                meta.vmm = None;
                self.store.write_metadata(meta)?;
                Ok(())
            }
            Step::Remove => {
                // The TAP first: once the guest record is gone, nothing
                // names it any more. Its lease goes with the record.
                self.provisioner.release(meta).await?;
                self.store.delete_guest(meta.id)?;
                if let Some(book) = self.leases.lock().await.as_mut() {
                    book.index.set(meta.id, None);
                }
                Ok(())
            }
        }
    }

    /// Keeps how the guest ended in the metadata (written by the caller)
    /// and says so in the instance's log.
    fn note_exit(&self, meta: &mut Metadata, paths: &GuestPaths, end: GuestEnd) {
        if let Ok(log) = InstanceLog::open(&paths.hypeman_log) {
            let _ = log.append(&format!("the guest ended by itself: {end}"));
        }
        meta.exited = Some(ExitRecord { end, applied: meta.applied.clone(), at: now_rfc3339() });
    }

    /// Drops the record of a VMM that is gone (ended, killed, or exited
    /// with its guest as QEMU does under `-no-reboot`), and what it applied
    /// unless a snapshot still holds that.
    fn forget_vmm(&self, obs: &Observation, meta: &mut Metadata) -> Result<(), InstanceError> {
        meta.vmm = None;
        if obs.snapshot.is_none() {
            meta.applied = None;
        }
        self.store.write_metadata(meta)?;
        Ok(())
    }

    /// Releases the host resources of a guest whose VMM is gone, unless a
    /// snapshot still needs them.
    async fn release_if_unused(&self, obs: &Observation, meta: &Metadata) -> Result<(), InstanceError> {
        if obs.snapshot.is_none() {
            self.provisioner.release(meta).await?;
        }
        Ok(())
    }

    /// Ends a VMM in order, and by force when it will not go.
    async fn end_vmm(&self, backend: &dyn Hypervisor, vmm: &VmmHandle) -> Result<(), InstanceError> {
        match backend.shutdown_vmm(vmm).await {
            Ok(()) => Ok(()),
            Err(HypervisorError::VmmGone { .. }) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "orderly VMM shutdown failed; killing it");
                backend.kill(vmm).await.map_err(|source| InstanceError::Hypervisor { op: "kill", source })
            }
        }
    }

    /// Resizes the guest down to its boot memory and waits until the
    /// plugged size stops changing (the guest unplugs block by block).
    /// Cloud Hypervisor reports the requested size at once, so there the
    /// backend's `resize_memory` does the waiting and this loop ends on its
    /// first reading.
    /// Best effort: a guest that keeps its memory, or a failed resize, only
    /// makes a larger snapshot, so neither fails the standby.
    async fn shrink_memory(&self, backend: &dyn Hypervisor, vmm: &VmmHandle, base: u64, name: &str) {
        match backend.info(vmm).await {
            Ok(VmInfo { memory_actual_bytes: Some(actual), .. }) if actual > base => {}
            _ => return,
        }
        if let Err(e) = backend.resize_memory(vmm, base).await {
            tracing::warn!(instance = %name, error = %error_chain(&e), "cannot shrink memory before standby");
            return;
        }
        let deadline = tokio::time::Instant::now() + MEMORY_SETTLE_TIMEOUT;
        let (mut last, mut stable) = (None, 0);
        while tokio::time::Instant::now() < deadline {
            let actual = backend.info(vmm).await.ok().and_then(|i| i.memory_actual_bytes);
            if actual == Some(base) {
                return;
            }
            stable = if actual.is_some() && actual == last { stable + 1 } else { 0 };
            if stable + 1 >= MEMORY_STABLE_READINGS {
                tracing::info!(instance = %name, actual = actual.unwrap_or(0), base, "the guest kept part of its hotplug memory");
                return;
            }
            last = actual;
            tokio::time::sleep(MEMORY_POLL).await;
        }
        tracing::warn!(instance = %name, "memory still changing after {MEMORY_SETTLE_TIMEOUT:?}; snapshotting anyway");
    }

    /// Plugs a restored guest's memory back to what it had when it booted.
    /// The guest plugs it in the background; nothing waits for it.
    async fn grow_memory(&self, backend: &dyn Hypervisor, vmm: &VmmHandle, spec: &InstanceSpec, name: &str) {
        let hotplug = spec.hotplug_memory.bytes();
        if hotplug == 0 {
            return;
        }
        let target = backend.running_memory_bytes(spec.memory.bytes(), hotplug);
        match backend.info(vmm).await {
            Ok(VmInfo { memory_actual_bytes: Some(actual), .. }) if actual < target => {}
            _ => return,
        }
        if let Err(e) = backend.resize_memory(vmm, target).await {
            tracing::warn!(instance = %name, error = %error_chain(&e), "cannot grow memory after restore");
        }
    }

    /// `Standby → Paused`, or a clean fall back to `Stopped` when the
    /// snapshot was taken by another hypervisor version or configuration.
    async fn restore(
        &self,
        spec: Option<&InstanceSpec>,
        obs: &Observation,
        meta: &mut Metadata,
        paths: &GuestPaths,
    ) -> Result<(), InstanceError> {
        let spec = spec.ok_or_else(|| InstanceError::NoSpec { step: Step::Restore.to_string() })?;
        let Some(snap) = &obs.snapshot else {
            return Err(InstanceError::NoVmm { step: Step::Restore.to_string() });
        };
        let backend = self.backend(meta.hypervisor)?;
        let started = std::time::Instant::now();
        self.ensure_lease(spec, meta).await?;
        let config = self.provisioner.prepare(spec, paths, meta).await?;
        tracing::debug!(instance = %meta.name, prepare_ms = started.elapsed().as_millis() as u64, "disks ready for the restore");
        let version = backend
            .version()
            .await
            .map_err(|source| InstanceError::Hypervisor { op: "version", source })?;
        let mismatch = if snap.hypervisor != meta.hypervisor {
            Some(format!("it was taken with {}, the instance now uses {}", snap.hypervisor, meta.hypervisor))
        } else if snap.hypervisor_version != version {
            Some(format!("it was taken with {} {}, this host has {version}", snap.hypervisor, snap.hypervisor_version))
        } else if snap.config_hash != config.config_hash() {
            Some("the VM configuration changed since it was taken".to_string())
        } else {
            None
        };
        if let Some(why) = mismatch {
            let line = format!("snapshot cannot be restored ({why}); discarding it and cold booting");
            tracing::warn!(instance = %meta.name, "{line}");
            if let Ok(log) = InstanceLog::open(&paths.hypeman_log) {
                let _ = log.append(&line);
            }
            self.store.remove_snapshot(meta.id)?;
            meta.applied = None;
            self.store.write_metadata(meta)?;
            return Ok(());
        }
        let guest = Self::guest_vmm(paths, meta);
        match backend.restore(&guest, &config, &paths.snapshot_latest).await {
            Ok(handle) => {
                meta.vmm = Some(record_of(&handle));
                meta.last_error = None;
                self.store.write_metadata(meta)?;
                Ok(())
            }
            Err(e) => {
                // Leave the snapshot in place for the next try, but no
                // half-restored VMM behind.
                if let Probe::Alive { handle, .. } = backend.probe(&guest).await {
                    let _ = backend.kill(&handle).await;
                }
                Err(InstanceError::Hypervisor { op: "restore", source: e })
            }
        }
    }

    /// Gives a guest with `[network] enabled` its lease (the recorded one
    /// while still valid, else a free address) and records it before
    /// returning; drops the lease and TAP of a guest whose declaration no
    /// longer enables networking.
    async fn ensure_lease(&self, spec: &InstanceSpec, meta: &mut Metadata) -> Result<(), InstanceError> {
        if !spec.network.enabled {
            if meta.network.is_some() {
                let mut slot = self.leases.lock().await;
                self.provisioner.release(meta).await?;
                meta.network = None;
                self.store.write_metadata(meta)?;
                if let Some(book) = slot.as_mut() {
                    book.index.set(meta.id, None);
                }
            }
            return Ok(());
        }
        let subnet = &self.settings.network.subnet;
        let mut slot = self.leases.lock().await;
        // An index that does not know what this guest's record says missed
        // a change on disk: read every record again.
        let mut reread = !slot.as_ref().is_some_and(|b| b.index.agrees(meta.id, meta.network.as_ref()));
        loop {
            let book = match &mut *slot {
                Some(book) if !reread => book,
                _ => slot.insert(self.read_leases()?),
            };
            let lease = crate::network::ipam::lease_for(subnet, meta.id, meta.network.as_ref(), &book.index.others_of(meta.id))?;
            if meta.network.as_ref() == Some(&lease) {
                return Ok(());
            }
            if book.unreadable > 0 {
                if reread {
                    return Err(InstanceError::UnreadableLeases(book.unreadable));
                }
                // They may have been repaired since: look again first.
                reread = true;
                continue;
            }
            if let Some(old) = &meta.network {
                tracing::warn!(instance = %meta.name, old = %old.ip, new = %lease.ip, "the recorded address no longer fits the network settings; replacing it");
                // A TAP name depends only on the ID, so the old TAP is this
                // guest's one and is kept.
            }
            meta.network = Some(lease);
            self.store.write_metadata(meta)?;
            book.index.set(meta.id, meta.network.as_ref());
            tracing::info!(instance = %meta.name, ip = meta.network.as_ref().map(|l| l.ip.as_str()).unwrap_or(""), "guest address leased");
            return Ok(());
        }
    }

    /// Every guest's lease, from the store.
    fn read_leases(&self) -> Result<LeaseBook, StoreError> {
        let listing = self.store.list()?;
        let mut index = LeaseIndex::default();
        for guest in &listing.guests {
            index.set(guest.id, guest.network.as_ref());
        }
        tracing::debug!(leases = index.len(), unreadable = listing.unreadable.len(), "lease index read from the store");
        Ok(LeaseBook { index, unreadable: listing.unreadable.len() })
    }

    /// Prunes the provisioner's caches, keeping what a live VMM or a
    /// snapshot was launched with. For daemon start, before any worker: a
    /// `prepare` must not run meanwhile. Skipped while some guest record
    /// cannot be read, since its VMM or snapshot may need any entry.
    pub async fn prune_caches(&self) -> Result<(), InstanceError> {
        let listing = self.store.list()?;
        if !listing.unreadable.is_empty() {
            return Err(InstanceError::UnreadableGuests(listing.unreadable.len()));
        }
        let mut in_use = Vec::new();
        for meta in &listing.guests {
            let paths = self.store.guest_paths(meta.id);
            // A VMM the daemon died before recording leaves only its socket.
            let live = meta.vmm.is_some() || paths.ch_socket.exists() || paths.qmp_socket.exists();
            let mut dirs = Vec::new();
            if live {
                dirs.push(&paths.dir);
            }
            if self.store.snapshot(meta.id)?.is_some() {
                dirs.push(&paths.snapshot_latest);
            }
            for dir in dirs {
                for file in [crate::hypervisor::qemu::LAUNCH_FILE, crate::hypervisor::cloud_hypervisor::LAUNCH_FILE] {
                    match crate::hypervisor::launch::recorded_initrd(&dir.join(file)) {
                        Ok(Some(initrd)) => in_use.push(initrd),
                        Ok(None) => {}
                        // Unknown means needed: keep everything.
                        Err(e) => return Err(InstanceError::UnreadableLaunch(e)),
                    }
                }
            }
        }
        self.provisioner.prune_cache(&in_use).await?;
        Ok(())
    }

    /// Records an error for status; the store keeps it across restarts.
    pub fn record_error(&self, name: &str, error: Option<String>) -> Result<(), InstanceError> {
        if let Some(mut meta) = self.store.find_by_name(name)? {
            if meta.last_error != error {
                meta.last_error = error;
                self.store.write_metadata(&meta)?;
            }
        }
        Ok(())
    }

    /// Adopts a live VMM that the metadata does not name (the daemon died
    /// between starting it and recording it).
    pub fn adopt(&self, obs: &Observation) -> Result<(), InstanceError> {
        if let (Some(meta), Some(vmm)) = (&obs.meta, &obs.vmm) {
            let record = record_of(vmm);
            if meta.vmm.as_ref() != Some(&record) {
                let mut meta = meta.clone();
                tracing::info!(instance = %meta.name, pid = vmm.pid, "adopting a running VMM");
                meta.vmm = Some(record);
                self.store.write_metadata(&meta)?;
            }
        }
        Ok(())
    }
}

pub fn handle_of(r: &VmmRecord) -> VmmHandle {
    VmmHandle { pid: r.pid, pid_start_time: r.pid_start_time, socket: r.socket.clone(), version: r.version.clone() }
}

pub fn record_of(h: &VmmHandle) -> VmmRecord {
    VmmRecord { pid: h.pid, pid_start_time: h.pid_start_time, socket: h.socket.clone(), version: h.version.clone() }
}

pub use crate::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ending_the_daemon_did_not_ask_for_is_read_from_the_console() {
        use VmState::*;
        assert!(ended_by_itself(Shutdown, true, false), "the guest powered off by itself");
        assert!(!ended_by_itself(Shutdown, true, true), "the daemon powered it off");
        assert!(ended_by_itself(Stopped, true, false), "the VMM on record went away");
        // Its record must go whoever asked; PowerOff drops it itself when
        // the VMM exits with the guest, so one left means a surprise.
        assert!(ended_by_itself(Stopped, true, true));
        assert!(!ended_by_itself(Stopped, false, false), "stopped and forgotten");
        for state in [Created, Running, Paused, Standby, Unknown] {
            assert!(!ended_by_itself(state, true, false), "{state}");
        }
    }

    /// Remembers what it was asked to keep.
    #[derive(Default)]
    struct Keeps(std::sync::Mutex<Option<Vec<std::path::PathBuf>>>);

    #[async_trait::async_trait]
    impl Provisioner for Keeps {
        async fn prepare(&self, spec: &InstanceSpec, guest: &GuestPaths, meta: &Metadata) -> Result<crate::hypervisor::VmConfig, ProvisionError> {
            provision::FakeProvisioner.prepare(spec, guest, meta).await
        }

        async fn prune_cache(&self, in_use: &[std::path::PathBuf]) -> Result<(), ProvisionError> {
            *self.0.lock().unwrap() = Some(in_use.to_vec());
            Ok(())
        }
    }

    #[tokio::test]
    async fn pruning_keeps_what_live_vmms_and_snapshots_were_launched_with() {
        use crate::hypervisor::{cloud_hypervisor, launch, qemu};
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let initrd = |n: &str| std::path::PathBuf::from(format!("/data/system/initrd/{n}/initrd.cpio"));
        let record = |n: &str| {
            let mut config = crate::hypervisor::conformance::bare_config();
            config.initrd = Some(initrd(n));
            cloud_hypervisor::LaunchRecord { version: 1, config }
        };
        // Running (recorded), running (only its socket), in standby,
        // stopped: only the stopped one's initrd may go.
        let mut running = store.create_guest("running", HypervisorKind::CloudHypervisor).unwrap();
        let paths = store.guest_paths(running.id);
        launch::write(&paths.dir.join(cloud_hypervisor::LAUNCH_FILE), &record("live")).unwrap();
        running.vmm = Some(VmmRecord { pid: 1, pid_start_time: 1, socket: paths.ch_socket.clone(), version: None });
        store.write_metadata(&running).unwrap();
        let unrecorded = store.create_guest("unrecorded", HypervisorKind::CloudHypervisor).unwrap();
        let paths = store.guest_paths(unrecorded.id);
        launch::write(&paths.dir.join(cloud_hypervisor::LAUNCH_FILE), &record("unrecorded")).unwrap();
        std::fs::write(&paths.ch_socket, b"").unwrap();
        let standby = store.create_guest("standby", HypervisorKind::Qemu).unwrap();
        let dir = store.begin_snapshot(standby.id).unwrap();
        let mut config = crate::hypervisor::conformance::bare_config();
        config.initrd = Some(initrd("snapshot"));
        launch::write(&dir.join(qemu::LAUNCH_FILE), &qemu::LaunchRecord { version: 1, config, argv: vec![] }).unwrap();
        store.commit_snapshot(standby.id, &SnapshotInfo::new(HypervisorKind::Qemu, "9", "h", 0)).unwrap();
        // The guest directory's record is the last VMM's, which is gone.
        launch::write(&store.guest_paths(standby.id).dir.join(qemu::LAUNCH_FILE), &record("gone")).unwrap();
        let stopped = store.create_guest("stopped", HypervisorKind::CloudHypervisor).unwrap();
        launch::write(&store.guest_paths(stopped.id).dir.join(cloud_hypervisor::LAUNCH_FILE), &record("stopped")).unwrap();

        let keeps = Arc::new(Keeps::default());
        let backends = Backends { cloud_hypervisor: None, qemu: None };
        let instances = Instances::new(store.clone(), backends, Arc::new(Settings::defaults()), keeps.clone());
        instances.prune_caches().await.unwrap();
        let mut kept = keeps.0.lock().unwrap().take().expect("asked to prune");
        kept.sort();
        let mut want = vec![initrd("live"), initrd("unrecorded"), initrd("snapshot")];
        want.sort();
        assert_eq!(kept, want);

        // A record that cannot be read stops the pruning.
        std::fs::write(store.guest_paths(running.id).dir.join(cloud_hypervisor::LAUNCH_FILE), b"{").unwrap();
        let err = instances.prune_caches().await.unwrap_err();
        assert!(matches!(err, InstanceError::UnreadableLaunch(_)), "{err}");
        assert!(keeps.0.lock().unwrap().is_none(), "not pruned");
    }
}
