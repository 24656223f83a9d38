//! An in-process hypervisor for tests of everything above the backend.
//!
//! It keeps its "VMM processes" in a world shared by every clone, so a test
//! can stop one daemon and start another against the same live VMMs. A test
//! can slow any call, hold calls and release them one at a time, make the
//! Nth call of an operation fail (or kill its VMM, or hang), and kill VMMs or
//! end guests behind the daemon's back. It follows the state rules of the
//! real backends: snapshot only when paused, restore only into a fresh VMM,
//! never two VMMs on one socket.

use super::{
    DiskConfig, GuestVmm, Hypervisor, HypervisorError, Probe, SnapshotMeta, VmConfig, VmInfo,
    VmmHandle,
};
use super::HypervisorKind;
use crate::state::VmState;
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The operations of the [`Hypervisor`] trait, for faults and call logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Version,
    Probe,
    Create,
    Boot,
    Pause,
    Resume,
    PowerOff,
    Snapshot,
    Restore,
    ShutdownVmm,
    Kill,
    Info,
    ResizeMemory,
    AddDisk,
    RemoveDisk,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Version => "version",
            Op::Probe => "probe",
            Op::Create => "create",
            Op::Boot => "boot",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::PowerOff => "power_off",
            Op::Snapshot => "snapshot",
            Op::Restore => "restore",
            Op::ShutdownVmm => "shutdown_vmm",
            Op::Kill => "kill",
            Op::Info => "info",
            Op::ResizeMemory => "resize_memory",
            Op::AddDisk => "add_disk",
            Op::RemoveDisk => "remove_disk",
        }
    }
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails without effect.
    Error,
    /// The call takes effect, then fails (a lost reply).
    ErrorAfter,
    /// The VMM dies during the call, which fails.
    KillVmm,
    /// A snapshot fills the disk: it writes part of its memory file, then
    /// fails with `ENOSPC` (other calls fail as with [`Fault::Error`]).
    DiskFull,
}

#[derive(Debug, Clone)]
struct FakeVmm {
    pid: u32,
    state: VmState,
    config: VmConfig,
    memory_actual: u64,
    unresponsive: bool,
}

#[derive(Debug, Clone, Copy)]
struct Armed {
    op: Op,
    skip: usize,
    fault: Fault,
}

#[derive(Debug, Default)]
struct World {
    vmms: BTreeMap<PathBuf, FakeVmm>,
    next_pid: u32,
    started: usize,
    calls: Vec<(Op, PathBuf, std::time::Instant)>,
    /// The same calls indexed, so benchmarks can poll them cheaply.
    by_target: HashMap<(Op, PathBuf), Vec<std::time::Instant>>,
    counts: HashMap<Op, usize>,
    armed: Vec<Armed>,
    delays: HashMap<Op, Duration>,
    /// Held operations and the calls let through so far.
    held: HashMap<Op, usize>,
    guest_ignores_power_off: bool,
    /// Presses of the power button the guest misses before it hears one
    /// (a guest still booting).
    power_presses_missed: u32,
    /// What `snapshot_size_estimate` answers (`None`: it cannot tell).
    snapshot_estimate: Option<u64>,
}

/// A test double of a hypervisor; clones share one world.
#[derive(Clone)]
pub struct FakeHypervisor {
    kind: HypervisorKind,
    world: Arc<Mutex<World>>,
    changed: Arc<Notify>,
}

const FAKE_VERSION: &str = "fake-1.0";

impl FakeHypervisor {
    pub fn new(kind: HypervisorKind) -> Self {
        let world = World { next_pid: 4_000_000, ..World::default() };
        FakeHypervisor { kind, world: Arc::new(Mutex::new(world)), changed: Arc::new(Notify::new()) }
    }

    /// Reads the world without waking waiters (a waiter that reads must not
    /// wake itself, or it spins).
    fn peek<R>(&self, f: impl FnOnce(&World) -> R) -> R {
        f(&self.world.lock().expect("fake world poisoned"))
    }

    /// Changes the world and wakes everything waiting on it.
    fn with<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        let r = f(&mut self.world.lock().expect("fake world poisoned"));
        self.changed.notify_waiters();
        r
    }

    /// Every call of `op` sleeps `d` first.
    pub fn set_delay(&self, op: Op, d: Duration) {
        self.with(|w| w.delays.insert(op, d));
    }

    /// After `skip` successful calls of `op`, the next one suffers `fault`.
    pub fn fail(&self, op: Op, skip: usize, fault: Fault) {
        self.with(|w| w.armed.push(Armed { op, skip, fault }));
    }

    /// Calls of `op` wait until [`FakeHypervisor::step`] lets them through.
    pub fn hold(&self, op: Op) {
        self.with(|w| w.held.insert(op, 0));
    }

    /// Lets one more held call of `op` through.
    pub fn step(&self, op: Op) {
        self.with(|w| {
            if let Some(n) = w.held.get_mut(&op) {
                *n += 1;
            }
        });
    }

    /// Stops holding `op`.
    pub fn release(&self, op: Op) {
        self.with(|w| w.held.remove(&op));
    }

    /// Makes guests ignore the power button, so a stop needs the grace
    /// period and a kill.
    pub fn set_guest_ignores_power_off(&self, ignore: bool) {
        self.with(|w| w.guest_ignores_power_off = ignore);
    }

    /// The guest misses the next `presses` presses of its power button,
    /// as one whose init is not listening yet does.
    pub fn miss_power_presses(&self, presses: u32) {
        self.with(|w| w.power_presses_missed = presses);
    }

    /// What [`Hypervisor::snapshot_size_estimate`] answers from now on.
    pub fn set_snapshot_estimate(&self, bytes: Option<u64>) {
        self.with(|w| w.snapshot_estimate = bytes);
    }

    /// The VMM on `socket` dies (as if killed with SIGKILL).
    pub fn kill_vmm(&self, socket: &Path) -> bool {
        self.with(|w| w.vmms.remove(socket).is_some())
    }

    /// The guest on `socket` powers itself off (its app exited).
    pub fn guest_exit(&self, socket: &Path) {
        self.with(|w| {
            if let Some(v) = w.vmms.get_mut(socket) {
                v.state = VmState::Shutdown;
            }
        });
    }

    /// The VMM on `socket` stops answering but keeps its socket.
    pub fn make_unresponsive(&self, socket: &Path, unresponsive: bool) {
        self.with(|w| {
            if let Some(v) = w.vmms.get_mut(socket) {
                v.unresponsive = unresponsive;
            }
        });
    }

    pub fn state_of(&self, socket: &Path) -> Option<VmState> {
        self.peek(|w| w.vmms.get(socket).map(|v| v.state))
    }

    pub fn config_of(&self, socket: &Path) -> Option<VmConfig> {
        self.peek(|w| w.vmms.get(socket).map(|v| v.config.clone()))
    }

    /// The guest memory plugged in the VM on `socket`.
    pub fn memory_of(&self, socket: &Path) -> Option<u64> {
        self.peek(|w| w.vmms.get(socket).map(|v| v.memory_actual))
    }

    pub fn live_vmms(&self) -> usize {
        self.peek(|w| w.vmms.len())
    }

    /// How many VMM processes were ever started (create + restore).
    pub fn vmms_started(&self) -> usize {
        self.peek(|w| w.started)
    }

    /// Every call so far, in order, except probes and version queries.
    pub fn calls(&self) -> Vec<Op> {
        self.peek(|w| {
            w.calls
                .iter()
                .map(|(op, _, _)| *op)
                .filter(|op| !matches!(op, Op::Probe | Op::Version))
                .collect()
        })
    }

    /// When each call of `op` on `socket` was made, in order.
    pub fn call_times(&self, op: Op, socket: &Path) -> Vec<std::time::Instant> {
        self.peek(|w| w.by_target.get(&(op, socket.to_path_buf())).cloned().unwrap_or_default())
    }

    /// Faults armed with [`FakeHypervisor::fail`] that have not fired yet.
    pub fn pending_faults(&self) -> usize {
        self.peek(|w| w.armed.len())
    }

    /// How many calls of `op` were made since the start (not reset by
    /// [`FakeHypervisor::clear_calls`]).
    pub fn call_count(&self, op: Op) -> usize {
        self.peek(|w| w.counts.get(&op).copied().unwrap_or(0))
    }

    pub fn clear_calls(&self) {
        self.with(|w| w.calls.clear());
    }

    /// Waits until `pred` holds for the world's call count of `op`.
    pub async fn wait_for_calls(&self, op: Op, at_least: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let n = self.call_count(op);
            if n >= at_least {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Records the call, applies delay and hold, and fires an armed fault.
    async fn enter(&self, op: Op, socket: &Path) -> Result<Option<Fault>, HypervisorError> {
        let delay = self.with(|w| {
            let now = std::time::Instant::now();
            w.calls.push((op, socket.to_path_buf(), now));
            w.by_target.entry((op, socket.to_path_buf())).or_default().push(now);
            *w.counts.entry(op).or_default() += 1;
            w.delays.get(&op).copied()
        });
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        loop {
            let notified = self.changed.notified();
            let go = {
                let mut w = self.world.lock().expect("fake world poisoned");
                match w.held.get_mut(&op) {
                    None => true,
                    Some(0) => false,
                    Some(n) => {
                        *n -= 1;
                        true
                    }
                }
            };
            if go {
                break;
            }
            notified.await;
        }
        let fault = self.with(|w| {
            let idx = w.armed.iter().position(|a| a.op == op)?;
            if w.armed[idx].skip > 0 {
                w.armed[idx].skip -= 1;
                return None;
            }
            Some(w.armed.remove(idx).fault)
        });
        match fault {
            Some(Fault::Error) => Err(HypervisorError::Injected { op: op.name() }),
            Some(Fault::KillVmm) => {
                self.with(|w| w.vmms.remove(socket));
                Err(HypervisorError::Injected { op: op.name() })
            }
            Some(Fault::ErrorAfter) => Ok(Some(Fault::ErrorAfter)),
            Some(Fault::DiskFull) if op == Op::Snapshot => Ok(Some(Fault::DiskFull)),
            Some(Fault::DiskFull) => Err(HypervisorError::Injected { op: op.name() }),
            None => Ok(None),
        }
    }

    fn finish(op: Op, fault: Option<Fault>) -> Result<(), HypervisorError> {
        match fault {
            Some(Fault::ErrorAfter) => Err(HypervisorError::Injected { op: op.name() }),
            _ => Ok(()),
        }
    }

    /// Runs `f` on the live, answering VMM behind `vmm`.
    fn on_vmm<R>(
        &self,
        vmm: &VmmHandle,
        f: impl FnOnce(&mut FakeVmm) -> Result<R, HypervisorError>,
    ) -> Result<R, HypervisorError> {
        self.with(|w| match w.vmms.get_mut(&vmm.socket) {
            Some(v) if v.pid == vmm.pid && !v.unresponsive => f(v),
            Some(v) if v.pid == vmm.pid => Err(HypervisorError::Timeout { op: "api call", secs: 30 }),
            _ => Err(HypervisorError::VmmGone { pid: vmm.pid }),
        })
    }

    fn transition(
        &self,
        vmm: &VmmHandle,
        op: &'static str,
        from: &[VmState],
        to: VmState,
    ) -> Result<(), HypervisorError> {
        self.on_vmm(vmm, |v| {
            if !from.contains(&v.state) {
                return Err(HypervisorError::WrongState { op, state: v.state });
            }
            v.state = to;
            Ok(())
        })
    }

    fn spawn(&self, guest: &GuestVmm, config: &VmConfig, state: VmState) -> Result<VmmHandle, HypervisorError> {
        let memory_actual = self.running_memory_bytes(config.memory_bytes, config.hotplug_memory_bytes);
        self.with(|w| {
            if w.vmms.contains_key(&guest.socket) {
                return Err(HypervisorError::AlreadyRunning { socket: guest.socket.clone() });
            }
            w.next_pid += 1;
            w.started += 1;
            let pid = w.next_pid;
            w.vmms.insert(
                guest.socket.clone(),
                FakeVmm { pid, state, config: config.clone(), memory_actual, unresponsive: false },
            );
            Ok(VmmHandle {
                pid,
                pid_start_time: u64::from(pid),
                socket: guest.socket.clone(),
                version: Some(FAKE_VERSION.to_string()),
            })
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FakeSnapshot {
    config: VmConfig,
    memory_actual: u64,
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn kind(&self) -> HypervisorKind {
        self.kind
    }

    /// Like Cloud Hypervisor: all hotplug memory is plugged at boot.
    fn running_memory_bytes(&self, memory_bytes: u64, hotplug_memory_bytes: u64) -> u64 {
        memory_bytes + hotplug_memory_bytes
    }

    async fn version(&self) -> Result<String, HypervisorError> {
        self.enter(Op::Version, Path::new("")).await?;
        Ok(FAKE_VERSION.to_string())
    }

    async fn probe(&self, guest: &GuestVmm) -> Probe {
        if let Err(e) = self.enter(Op::Probe, &guest.socket).await {
            return Probe::Unreachable { reason: e.to_string() };
        }
        self.peek(|w| match w.vmms.get(&guest.socket) {
            None => Probe::Absent,
            Some(v) if v.unresponsive => Probe::Unreachable { reason: "the VMM does not answer".into() },
            Some(v) => Probe::Alive {
                handle: VmmHandle {
                    pid: v.pid,
                    pid_start_time: u64::from(v.pid),
                    socket: guest.socket.clone(),
                    version: Some(FAKE_VERSION.to_string()),
                },
                state: v.state,
            },
        })
    }

    async fn create(&self, guest: &GuestVmm, config: &VmConfig) -> Result<VmmHandle, HypervisorError> {
        let fault = self.enter(Op::Create, &guest.socket).await?;
        let handle = self.spawn(guest, config, VmState::Created)?;
        Self::finish(Op::Create, fault)?;
        Ok(handle)
    }

    async fn boot(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::Boot, &vmm.socket).await?;
        self.transition(vmm, "boot", &[VmState::Created], VmState::Running)?;
        Self::finish(Op::Boot, fault)
    }

    async fn pause(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::Pause, &vmm.socket).await?;
        self.transition(vmm, "pause", &[VmState::Running], VmState::Paused)?;
        Self::finish(Op::Pause, fault)
    }

    async fn resume(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::Resume, &vmm.socket).await?;
        self.transition(vmm, "resume", &[VmState::Paused], VmState::Running)?;
        Self::finish(Op::Resume, fault)
    }

    async fn power_off(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::PowerOff, &vmm.socket).await?;
        let ignore = self.with(|w| {
            let missed = w.power_presses_missed > 0;
            w.power_presses_missed = w.power_presses_missed.saturating_sub(1);
            w.guest_ignores_power_off || missed
        });
        self.on_vmm(vmm, |v| {
            match v.state {
                VmState::Running if !ignore => v.state = VmState::Shutdown,
                // A paused or unbooted guest cannot react to the button; a
                // real VMM accepts the request and nothing happens.
                _ => {}
            }
            Ok(())
        })?;
        Self::finish(Op::PowerOff, fault)
    }

    async fn snapshot_size_estimate(&self, vmm: &VmmHandle) -> Option<u64> {
        let estimate = self.peek(|w| w.snapshot_estimate);
        self.on_vmm(vmm, |_| Ok(())).ok().and(estimate)
    }

    async fn snapshot(&self, vmm: &VmmHandle, dir: &Path) -> Result<SnapshotMeta, HypervisorError> {
        let fault = self.enter(Op::Snapshot, &vmm.socket).await?;
        let snap = self.on_vmm(vmm, |v| {
            if v.state != VmState::Paused {
                return Err(HypervisorError::WrongState { op: "snapshot", state: v.state });
            }
            Ok(FakeSnapshot { config: v.config.clone(), memory_actual: v.memory_actual })
        })?;
        let backend = |e: std::io::Error| HypervisorError::Backend { op: "snapshot", source: e.into() };
        let json = serde_json::to_vec_pretty(&snap).map_err(|e| HypervisorError::Backend { op: "snapshot", source: e.into() })?;
        // 0600 like what a real VMM writes under the daemon's umask.
        let write = |path: std::path::PathBuf, bytes: &[u8]| {
            let mut file = crate::durable::private_file().write(true).create(true).truncate(true).open(path)?;
            std::io::Write::write_all(&mut file, bytes)
        };
        if fault == Some(Fault::DiskFull) {
            // Like QEMU's `exec:cat`: part of the stream is on disk when
            // the write fails.
            write(dir.join("memory"), &[0u8; 64 << 10]).map_err(backend)?;
            return Err(backend(std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32)));
        }
        write(dir.join("fake-vm.json"), &json).map_err(backend)?;
        Self::finish(Op::Snapshot, fault)?;
        Ok(SnapshotMeta { hypervisor_version: FAKE_VERSION.to_string(), config_hash: snap.config.config_hash() })
    }

    fn snapshot_config(&self, dir: &Path) -> Result<VmConfig, HypervisorError> {
        let bad = |source: Box<dyn std::error::Error + Send + Sync>| HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source };
        let bytes = std::fs::read(dir.join("fake-vm.json")).map_err(|e| bad(e.into()))?;
        let snap: FakeSnapshot = serde_json::from_slice(&bytes).map_err(|e| bad(e.into()))?;
        Ok(snap.config)
    }

    async fn restore(&self, guest: &GuestVmm, config: &VmConfig, dir: &Path) -> Result<VmmHandle, HypervisorError> {
        let fault = self.enter(Op::Restore, &guest.socket).await?;
        let bad = |source: Box<dyn std::error::Error + Send + Sync>| HypervisorError::BadSnapshot { dir: dir.to_path_buf(), source };
        let bytes = std::fs::read(dir.join("fake-vm.json")).map_err(|e| bad(e.into()))?;
        let snap: FakeSnapshot = serde_json::from_slice(&bytes).map_err(|e| bad(e.into()))?;
        if snap.config != *config {
            return Err(bad("the snapshot was taken under another configuration".into()));
        }
        let handle = self.spawn(guest, config, VmState::Paused)?;
        self.with(|w| {
            if let Some(v) = w.vmms.get_mut(&guest.socket) {
                v.memory_actual = snap.memory_actual;
            }
        });
        Self::finish(Op::Restore, fault)?;
        Ok(handle)
    }

    async fn shutdown_vmm(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::ShutdownVmm, &vmm.socket).await?;
        self.on_vmm(vmm, |_| Ok(()))?;
        self.with(|w| w.vmms.remove(&vmm.socket));
        Self::finish(Op::ShutdownVmm, fault)
    }

    async fn kill(&self, vmm: &VmmHandle) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::Kill, &vmm.socket).await?;
        // Killing works on an unresponsive VMM too; a gone one is fine.
        self.with(|w| {
            if w.vmms.get(&vmm.socket).is_some_and(|v| v.pid == vmm.pid) {
                w.vmms.remove(&vmm.socket);
            }
        });
        Self::finish(Op::Kill, fault)
    }

    async fn info(&self, vmm: &VmmHandle) -> Result<VmInfo, HypervisorError> {
        let fault = self.enter(Op::Info, &vmm.socket).await?;
        let info = self.on_vmm(vmm, |v| Ok(VmInfo { state: v.state, memory_actual_bytes: Some(v.memory_actual) }))?;
        Self::finish(Op::Info, fault)?;
        Ok(info)
    }

    async fn resize_memory(&self, vmm: &VmmHandle, total_bytes: u64) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::ResizeMemory, &vmm.socket).await?;
        self.on_vmm(vmm, |v| {
            let max = v.config.memory_bytes + v.config.hotplug_memory_bytes;
            if total_bytes < v.config.memory_bytes || total_bytes > max {
                return Err(HypervisorError::Backend {
                    op: "resize_memory",
                    source: format!("{total_bytes} outside {}..={max}", v.config.memory_bytes).into(),
                });
            }
            v.memory_actual = total_bytes;
            Ok(())
        })?;
        Self::finish(Op::ResizeMemory, fault)
    }

    async fn add_disk(&self, vmm: &VmmHandle, disk: &DiskConfig) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::AddDisk, &vmm.socket).await?;
        self.on_vmm(vmm, |v| {
            v.config.disks.push(disk.clone());
            Ok(())
        })?;
        Self::finish(Op::AddDisk, fault)
    }

    async fn remove_disk(&self, vmm: &VmmHandle, id: &str) -> Result<(), HypervisorError> {
        let fault = self.enter(Op::RemoveDisk, &vmm.socket).await?;
        self.on_vmm(vmm, |v| {
            v.config.disks.retain(|d| d.id != id);
            Ok(())
        })?;
        Self::finish(Op::RemoveDisk, fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(dir: &Path) -> GuestVmm {
        crate::hypervisor::conformance::guest(dir, "ch.sock")
    }

    fn config() -> VmConfig {
        VmConfig { hotplug_memory_bytes: 256 << 20, ..crate::hypervisor::conformance::bare_config() }
    }

    #[tokio::test]
    async fn lifecycle_follows_the_state_rules() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new(HypervisorKind::CloudHypervisor);
        let g = guest(dir.path());
        assert_eq!(fake.probe(&g).await, Probe::Absent);
        let h = fake.create(&g, &config()).await.unwrap();
        assert!(matches!(fake.create(&g, &config()).await, Err(HypervisorError::AlreadyRunning { .. })));
        assert!(matches!(fake.snapshot(&h, dir.path()).await, Err(HypervisorError::WrongState { .. })));
        fake.boot(&h).await.unwrap();
        fake.pause(&h).await.unwrap();
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let meta = fake.snapshot(&h, &snap).await.unwrap();
        assert_eq!(meta.config_hash, config().config_hash());
        fake.shutdown_vmm(&h).await.unwrap();
        assert_eq!(fake.probe(&g).await, Probe::Absent);
        let h2 = fake.restore(&g, &config(), &snap).await.unwrap();
        assert_ne!(h2.pid, h.pid);
        assert_eq!(fake.state_of(&g.socket), Some(VmState::Paused));
        fake.resume(&h2).await.unwrap();
        assert_eq!(fake.vmms_started(), 2);
        // The old handle names a dead process.
        assert!(matches!(fake.pause(&h).await, Err(HypervisorError::VmmGone { .. })));
    }

    #[tokio::test]
    async fn faults_fire_after_the_skipped_calls() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new(HypervisorKind::Qemu);
        let g = guest(dir.path());
        fake.fail(Op::Create, 1, Fault::Error);
        let h = fake.create(&g, &config()).await.unwrap();
        fake.kill(&h).await.unwrap();
        assert!(matches!(fake.create(&g, &config()).await, Err(HypervisorError::Injected { op: "create" })));
        assert_eq!(fake.live_vmms(), 0);
        fake.fail(Op::Create, 0, Fault::ErrorAfter);
        assert!(fake.create(&g, &config()).await.is_err());
        assert_eq!(fake.live_vmms(), 1, "a lost reply still took effect");
    }

    #[tokio::test]
    async fn held_calls_wait_for_steps() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new(HypervisorKind::Qemu);
        let g = guest(dir.path());
        fake.hold(Op::Create);
        let f2 = fake.clone();
        let g2 = g.clone();
        let task = tokio::spawn(async move { f2.create(&g2, &config()).await });
        assert!(fake.wait_for_calls(Op::Create, 1, Duration::from_secs(5)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished());
        fake.step(Op::Create);
        task.await.unwrap().unwrap();
    }
}
