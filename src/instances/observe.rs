//! One look at an instance, changing nothing: the guest's record and
//! snapshot from the store, what answers behind its VMM socket, how its
//! console says it ended, and how its TAP looks.
//!
//! State is derived, never stored: no VMM → `Standby` with a complete
//! snapshot, else `Stopped`; a VMM that answers → its own state; a socket
//! whose VMM does not answer → `Unknown`. Whatever needs repairing (a dead
//! socket file, a TAP off its bridge, a VMM the record does not name) is
//! reported for the planner to choose a step; this module writes nothing,
//! so the CLI's look and the daemon's are the same look.

use super::{error_chain, InstanceError, Instances};
use crate::exit::GuestEnd;
use crate::hypervisor::{Probe, VmmHandle};
use crate::network::host::TapHealth;
use super::step::{Observed, Recall};
use crate::state::VmState;
use crate::store::{Metadata, SnapshotInfo, StoreError};

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
    /// How the guest ended, when it looks ended: it is shut down inside its
    /// VMM, or its VMM is on record but gone (see `Observed::ended`).
    pub ended: Option<GuestEnd>,
    /// How the live VM's TAP looks (see `Observed::tap`).
    pub tap: Option<TapHealth>,
    /// The VMM socket file is there but no process serves it.
    pub stale_socket: Option<std::path::PathBuf>,
    /// What this look could not see: no backend of the guest's hypervisor
    /// is installed, so its VMM was judged by its process alone.
    pub blind: Option<String>,
    /// A guest record that cannot be read may be this instance's: what it
    /// is and what is wrong with it. The state is then `Unknown`, and
    /// nothing may be done that assumes the instance has no guest.
    pub unreadable_record: Option<String>,
    /// The size of the guest's overlay file, when there is one.
    pub overlay_bytes: Option<u64>,
}

impl Observation {
    /// The look at a name the store holds no guest of.
    pub fn nothing() -> Observation {
        Observation {
            meta: None,
            state: VmState::Stopped,
            snapshot: None,
            vmm: None,
            unreachable: None,
            ended: None,
            tap: None,
            stale_socket: None,
            blind: None,
            unreadable_record: None,
            overlay_bytes: None,
        }
    }

    /// The look at a name that an unreadable guest record may hold.
    pub fn unreadable(why: String) -> Observation {
        Observation { state: VmState::Unknown, unreadable_record: Some(why), ..Observation::nothing() }
    }

    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// What the planner needs of this observation, with what the owner
    /// remembers: whether it holds back after an error, and whether it
    /// pressed the guest's power button (and until when the guest has).
    pub fn observed(&self, recall: Recall) -> Observed {
        let meta = self.meta.as_ref();
        Observed {
            exists: meta.is_some(),
            state: self.state,
            hypervisor: meta.map(|m| m.hypervisor),
            vmm: self.vmm.clone(),
            recorded_vmm: meta.and_then(|m| m.vmm.as_ref()).map(super::handle_of),
            snapshot: self.snapshot.clone(),
            applied: meta.and_then(|m| m.applied.as_deref().cloned()),
            hold: recall.hold,
            ended: self.ended.clone(),
            tap: self.tap,
            exited: meta.and_then(|m| m.exited.as_ref()).map(|e| (e.end.clone(), e.applied.as_deref().cloned())),
            stale_socket: self.stale_socket.clone(),
            stopping: recall.stopping,
            press_again: recall.press_again,
            unanswered_until: recall.unanswered_until,
            restart: recall.restart,
            unreadable_record: self.unreadable_record.clone(),
            lost: meta.filter(|m| !m.lost_answered).and_then(|m| m.lost.clone()),
            overlay_bytes: self.overlay_bytes,
        }
    }
}

/// What is behind a guest's socket when its backend is not installed: its
/// recorded VMM, if that process still lives, which nothing here can ask.
fn without_backend(meta: &Metadata) -> Probe {
    match &meta.vmm {
        Some(vmm) if crate::hypervisor::process::is_alive(super::handle_of(vmm).process_id()) => Probe::Unreachable {
            reason: format!("{} is not installed, and its VMM (pid {}) still runs", meta.hypervisor, vmm.pid),
        },
        Some(_) | None => Probe::Absent,
    }
}

/// Why nothing is done for an instance whose record may be the unreadable
/// one `e` names: the file, what is wrong with it, and where to read how to
/// repair it.
fn unreadable_reason(e: &StoreError) -> String {
    let newer = matches!(e, StoreError::MaybeHeldByUnreadable { problem, .. }
        if matches!(**problem, StoreError::UnsupportedVersion { .. } | StoreError::UnsupportedAppliedVersion { .. }));
    let what = if newer {
        "a newer hypeman wrote it, and this one leaves it untouched"
    } else {
        "its VMM, if one runs, is not managed"
    };
    format!(
        "{}; {what}: nothing is done for this instance until the record is repaired (README: Repairing a damaged record)",
        error_chain(e)
    )
}

/// Whether a guest in `state` looks like it ended, so that its console is
/// read for how: its VMM is on record but gone, or it powered off inside
/// its VMM. Whether it ended by itself is the planner's to judge.
fn looks_ended(state: VmState, vmm_on_record: bool) -> bool {
    match state {
        VmState::Stopped => vmm_on_record,
        VmState::Shutdown => true,
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

impl Instances {
    /// Derives the instance's state from the store and its VMM.
    pub async fn observe(&self, name: &str) -> Result<Observation, InstanceError> {
        let owned = name.to_string();
        let found = self
            .blocking(move |store| match store.find_by_name(&owned)? {
                Some(meta) => {
                    let snapshot = store.snapshot(meta.id)?;
                    let overlay = std::fs::metadata(store.guest_paths(meta.id).overlay).ok().map(|m| m.len());
                    Ok(Some((meta, snapshot, overlay)))
                }
                None => Ok(None),
            })
            .await;
        let found = match found {
            Err(InstanceError::Store(e @ StoreError::MaybeHeldByUnreadable { .. })) => {
                return Ok(Observation::unreadable(unreadable_reason(&e)));
            }
            other => other?,
        };
        let Some((meta, snapshot, overlay_bytes)) = found else {
            return Ok(Observation::nothing());
        };
        let guest = Self::guest_vmm(&self.store.guest_paths(meta.id), &meta);
        let (probe, blind) = match self.backend(meta.hypervisor) {
            Ok(backend) => (backend.probe(&guest).await, None),
            // Nothing can talk to its VMM; what is left can still be told
            // from the record, so the instance can at least be removed.
            Err(e) => (without_backend(&meta), Some(e.to_string())),
        };
        let (state, vmm, unreachable) = match probe {
            Probe::Absent if snapshot.is_some() => (VmState::Standby, None, None),
            Probe::Absent => (VmState::Stopped, None, None),
            Probe::Alive { handle, state } => (state, Some(handle), None),
            Probe::Unreachable { reason } => (VmState::Unknown, None, Some(reason)),
        };
        let stale_socket = match state {
            VmState::Stopped | VmState::Standby if std::fs::symlink_metadata(&guest.socket).is_ok() => {
                Some(guest.socket.clone())
            }
            _ => None,
        };
        let ended = if looks_ended(state, meta.vmm.is_some()) { Some(self.read_end(meta.id).await) } else { None };
        let tap = if holds_tap(state) { self.tap_health(&meta).await } else { None };
        Ok(Observation {
            meta: Some(meta),
            state,
            snapshot,
            vmm,
            unreachable,
            ended,
            tap,
            stale_socket,
            blind,
            unreadable_record: None,
            overlay_bytes,
        })
    }

    /// The network half of the health check of a live VM: how its TAP
    /// looks. A failed check is logged and taken as no news: a netlink
    /// hiccup must not cycle a guest.
    async fn tap_health(&self, meta: &Metadata) -> Option<TapHealth> {
        match self.provisioner.tap_health(meta).await {
            Ok(health) => health,
            Err(e) => {
                tracing::warn!(instance = %meta.name, error = %error_chain(&e), "cannot check the guest's TAP");
                None
            }
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_guest_that_looks_ended_has_its_console_read() {
        use VmState::*;
        assert!(looks_ended(Shutdown, true), "powered off inside its VMM");
        assert!(looks_ended(Stopped, true), "the VMM on record went away");
        assert!(!looks_ended(Stopped, false), "stopped and forgotten");
        for state in [Created, Running, Paused, Standby, Unknown] {
            assert!(!looks_ended(state, true), "{state}");
        }
    }

    #[tokio::test]
    async fn a_look_changes_nothing_on_disk() {
        use crate::declaration::spec::HypervisorKind;
        use crate::hypervisor::Backends;
        use crate::store::Store;
        use std::sync::Arc;
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let guest = store.create_guest("web", HypervisorKind::Qemu).unwrap();
        let paths = store.guest_paths(guest.id);
        // A socket no process serves, and a VMM on record that is gone.
        drop(std::os::unix::net::UnixListener::bind(&paths.qmp_socket).unwrap());
        let mut meta = guest.clone();
        meta.vmm = Some(crate::store::VmmRecord { pid: u32::MAX - 1, pid_start_time: 1, socket: paths.qmp_socket.clone(), version: None });
        store.write_metadata(&meta).unwrap();
        let before = std::fs::read(&paths.metadata).unwrap();
        let fake = crate::hypervisor::fake::FakeHypervisor::new(HypervisorKind::Qemu);
        let backends = Backends { cloud_hypervisor: None, qemu: Some(Arc::new(fake)) };
        let settings = Arc::new(crate::settings::Settings::defaults());
        let instances = Instances::new(store.clone(), backends, settings, Arc::new(super::super::provision::FakeProvisioner));
        let obs = instances.observe("web").await.unwrap();
        assert_eq!(obs.state, VmState::Stopped);
        assert_eq!(obs.stale_socket.as_deref(), Some(paths.qmp_socket.as_path()));
        assert_eq!(obs.ended, Some(GuestEnd::Unknown), "no console: ended some other way");
        assert!(paths.qmp_socket.exists(), "the socket is the planner's to clear");
        assert_eq!(std::fs::read(&paths.metadata).unwrap(), before, "the record is untouched");
        assert!(!paths.hypeman_log.exists() || std::fs::read(&paths.hypeman_log).unwrap().is_empty());
    }
}
