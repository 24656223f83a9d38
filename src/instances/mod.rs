//! Instances: where the store and the hypervisor meet. One look at an
//! instance ([`observe`]) and carrying out one planned step ([`execute`]);
//! it does not choose steps, that is `reconcile::plan`.
//!
//! ```text
//!  observe.rs   store + VMM probe + console tail + TAP health ──► Observation   (changes nothing)
//!  execute.rs   Step ──► backend calls, store writes ──► Outcome               (checks the hop first)
//!  leases.rs    guest addresses, handed out under one lock
//!  memory.rs    hotplug memory given back before standby, plugged again after
//!  prune.rs     cache pruning at daemon start, keeping what VMMs and snapshots name
//! ```
//!
//! Every step is safe to run again after the daemon is killed at any point
//! inside it: VMMs are found again by their socket, snapshots only count
//! once their marker is written, and metadata is written atomically. Store
//! and declaration IO runs on the blocking pool ([`Instances::blocking`]),
//! never on the runtime's threads.

mod execute;
pub mod image_provisioner;
mod leases;
mod vmm_users;
mod memory;
mod observe;
pub mod overlay;
pub mod provision;
mod prune;
pub mod space;
pub mod step;

use crate::declaration::spec::{HypervisorKind, InstanceSpec};
use crate::hypervisor::{Backends, GuestVmm, Hypervisor, HypervisorError, VmmHandle};
use crate::logs::InstanceLog;
use crate::settings::Settings;
use crate::state::StateError;
use crate::store::{GuestPaths, Metadata, Store, StoreError, VmmRecord};
pub use observe::Observation;
pub use provision::{ProvisionError, Provisioner};
use std::sync::Arc;

/// What kind of failure a step error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// May pass by itself (a VMM that timed out, a registry that did not
    /// answer): retry with backoff.
    Transient,
    /// A snapshot does not fit in the free space of the data dir. Passes
    /// once space is freed; until then every try is a free-space check
    /// that leaves the guest running, so it is retried at a steady pace
    /// rather than backed off.
    LacksSpace,
    /// Cannot pass until the declaration or the settings change (a missing
    /// kernel, an option the backend cannot do, a backend that is not
    /// installed): do not retry until one does.
    NeedsChange,
    /// Will not pass as things are, and is not the user's to fix by an edit
    /// (the state machine refused a step: a bug). Not retried until the
    /// declaration changes; reported as such.
    Permanent,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::LacksSpace => "lacks-space",
            ErrorKind::NeedsChange => "needs-change",
            ErrorKind::Permanent => "permanent",
        }
    }
}

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
    #[error("every VMM uid of uid_range {first}-{last} is taken; widen [vmm] uid_range")]
    VmmUidsExhausted { first: u32, last: u32 },
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
    #[error(transparent)]
    Durable(#[from] crate::durable::DurableError),
    #[error("No space left on device for the snapshot in {dir}: {detail}")]
    NoSpace {
        dir: std::path::PathBuf,
        /// How much was needed, written and available, as far as known.
        detail: String,
        /// What the hypervisor said, when the snapshot was begun.
        #[source]
        source: Option<HypervisorError>,
    },
    #[error("the guest's running state was lost: its VMM (pid {pid}) died while its snapshot was written")]
    StateLost {
        pid: u32,
        #[source]
        source: Box<InstanceError>,
    },
    /// The VMM refused a snapshot that passed the marker's checks.
    #[error(
        "the guest's running state could not be brought back (the snapshot is kept, and not restored again; declaring the instance stopped discards it)"
    )]
    NotRestored {
        #[source]
        source: HypervisorError,
    },
    #[error("a blocking task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("the daemon is stopping")]
    BlockingClosed,
}

impl InstanceError {
    /// What kind of failure this is, for the error policy.
    pub fn kind(&self) -> ErrorKind {
        match self {
            InstanceError::Hypervisor { source, .. } => hypervisor_error_kind(source),
            InstanceError::Provision(e) => provision_error_kind(e),
            InstanceError::NoBackend(_) => ErrorKind::NeedsChange,
            InstanceError::State(_) => ErrorKind::Permanent,
            InstanceError::NoSpace { .. } => ErrorKind::LacksSpace,
            // What the user wants of a guest whose state is gone, or of a
            // damaged snapshot kept for them to look at, is theirs to say.
            InstanceError::StateLost { .. }
            | InstanceError::NotRestored { .. }
            | InstanceError::Store(StoreError::DamagedSnapshot { .. }) => {
                ErrorKind::NeedsChange
            }
            InstanceError::Store(_)
            | InstanceError::Network(_)
            | InstanceError::UnreadableLeases(_)
            | InstanceError::VmmUidsExhausted { .. }
            | InstanceError::UnreadableGuests(_)
            | InstanceError::UnreadableLaunch(_)
            | InstanceError::NoGuest(_)
            | InstanceError::Durable(_)
            | InstanceError::Join(_)
            | InstanceError::BlockingClosed => ErrorKind::Transient,
        }
    }
}

fn hypervisor_error_kind(e: &HypervisorError) -> ErrorKind {
    match e {
        HypervisorError::Unsupported { .. } => ErrorKind::NeedsChange,
        // A snapshot the VMM cannot use does not become usable by trying
        // again: it is kept, and not restored in a loop.
        HypervisorError::BadSnapshot { .. } => ErrorKind::NeedsChange,
        // The VMM binary is not installed (or not where the settings say).
        HypervisorError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NeedsChange,
        HypervisorError::AlreadyRunning { .. }
        | HypervisorError::VmmGone { .. }
        | HypervisorError::WrongState { .. }
        | HypervisorError::Timeout { .. }
        | HypervisorError::Spawn { .. }
        | HypervisorError::Backend { .. }
        | HypervisorError::Injected { .. } => ErrorKind::Transient,
    }
}

fn provision_error_kind(e: &ProvisionError) -> ErrorKind {
    match e {
        ProvisionError::NoKernel => ErrorKind::NeedsChange,
        // Rebuilt in place, it is the same path: a change to it is not a
        // declaration change, so it is retried rather than waited on.
        ProvisionError::Init(_) => ErrorKind::Transient,
        // A missing disk image may be made yet; one of the wrong kind waits
        // for the declaration (or the file) to be put right.
        ProvisionError::Volume { missing: false, .. } => ErrorKind::NeedsChange,
        ProvisionError::Volume { missing: true, .. } => ErrorKind::Transient,
        // A secret manager may write the file after the daemon starts; one
        // that is there but unusable waits for it to change (its digest is
        // part of the declaration as read, so a fixed file counts).
        ProvisionError::EnvFile(e) if e.is_missing() => ErrorKind::Transient,
        ProvisionError::EnvFile(_) => ErrorKind::NeedsChange,
        ProvisionError::Kernel { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NeedsChange,
        ProvisionError::Kernel { .. }
        | ProvisionError::Image { .. }
        | ProvisionError::Disk { .. }
        | ProvisionError::Network(_)
        | ProvisionError::NoLease
        | ProvisionError::Other(_) => ErrorKind::Transient,
    }
}

/// Observes and acts on instances; cheap to share.
pub struct Instances {
    store: Arc<Store>,
    backends: Backends,
    settings: Arc<Settings>,
    provisioner: Arc<dyn Provisioner>,
    leases: leases::Leases,
    vmm_uids: tokio::sync::Mutex<()>,
    blocking_slots: tokio::sync::Semaphore,
    turns: tokio::sync::Semaphore,
}

/// How many store or declaration reads and writes run at once.
pub const BLOCKING_AT_ONCE: usize = 8;

/// How many instances are looked at or stepped at once. The rest wait
/// their turn holding only their sleeping task, so a thousand instances
/// starting together do not hold a thousand looks and steps in flight, each
/// waiting for the same disk. A step lends its turn to the others while it
/// waits on something that may take long (preparing disks, which may pull
/// an image; writing a snapshot); the stop grace and every backoff are
/// timers and hold none.
pub const TURNS: usize = 32;

impl Instances {
    pub fn new(
        store: Arc<Store>,
        backends: Backends,
        settings: Arc<Settings>,
        provisioner: Arc<dyn Provisioner>,
    ) -> Instances {
        Instances {
            store,
            backends,
            settings,
            provisioner,
            leases: leases::Leases::default(),
            vmm_uids: tokio::sync::Mutex::new(()),
            blocking_slots: tokio::sync::Semaphore::new(BLOCKING_AT_ONCE),
            turns: tokio::sync::Semaphore::new(TURNS),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The hypervisor a new guest of this declaration is pinned to: its own
    /// choice or the settings' default. Only a guest's creation asks; after
    /// that its record says.
    pub fn resolve_kind(&self, spec: &InstanceSpec) -> HypervisorKind {
        spec.hypervisor.unwrap_or(self.settings.default_hypervisor)
    }

    fn backend(&self, kind: HypervisorKind) -> Result<Arc<dyn Hypervisor>, InstanceError> {
        self.backends.get(kind).ok_or(InstanceError::NoBackend(kind))
    }

    /// Runs `f` on the store on the blocking pool: store calls fsync and
    /// rename, which must not stall the runtime's threads.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, InstanceError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        Ok(self.run_blocking(move || f(&store)).await??)
    }

    /// Runs `f` on the blocking pool, at most [`BLOCKING_AT_ONCE`] at a
    /// time: a thousand owners starting together would otherwise grow the
    /// pool to hundreds of threads, each with its stack, for work the disk
    /// does one fsync at a time anyway.
    pub async fn run_blocking<T, F>(&self, f: F) -> Result<T, InstanceError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let _permit = self.blocking_slots.acquire().await.map_err(|_| InstanceError::BlockingClosed)?;
        tokio::task::spawn_blocking(f).await.map_err(InstanceError::Join)
    }

    /// Waits for a turn to look at or step one instance ([`TURNS`]);
    /// `None` once the daemon is stopping.
    pub async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.turns.acquire().await.ok()
    }

    /// Awaits `f` with the caller's turn lent to the others, and takes a
    /// turn back after: for a wait inside a step that may take long.
    async fn lending_turn<F: std::future::Future>(&self, f: F) -> F::Output {
        self.turns.add_permits(1);
        let out = f.await;
        if let Ok(permit) = self.turns.acquire().await {
            permit.forget();
        }
        out
    }

    /// Writes the guest's record on the blocking pool.
    async fn write_metadata(&self, meta: &Metadata) -> Result<(), InstanceError> {
        let meta = meta.clone();
        self.blocking(move |store| store.write_metadata(&meta)).await
    }

    /// Records an error for status; the store keeps it across restarts.
    pub async fn record_error(&self, name: &str, error: Option<String>) -> Result<(), InstanceError> {
        let name = name.to_string();
        self.blocking(move |store| {
            if let Some(mut meta) = store.find_by_name(&name)? {
                if meta.last_error != error {
                    meta.last_error = error;
                    store.write_metadata(&meta)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Says something that happened to one instance, once, in both places
    /// it is read: the daemon's log (`tracing`) and the guest's
    /// `logs/hypeman.log`.
    pub fn event(&self, meta: &Metadata, level: tracing::Level, line: &str) {
        event(&self.store.guest_paths(meta.id), &meta.name, level, line);
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
}

/// See [`Instances::event`].
pub fn event(paths: &GuestPaths, name: &str, level: tracing::Level, line: &str) {
    Journal::open(paths, name).say(level, line);
}

/// One instance's events, each said once in both places it is read, with
/// `hypeman.log` held open for the several lines of one step.
pub struct Journal {
    name: String,
    log: Option<InstanceLog>,
}

impl Journal {
    pub fn open(paths: &GuestPaths, name: &str) -> Journal {
        Journal { name: name.to_string(), log: InstanceLog::open(&paths.hypeman_log).ok() }
    }

    pub fn say(&self, level: tracing::Level, line: &str) {
        let name = self.name.as_str();
        match level {
            tracing::Level::ERROR => tracing::error!(instance = name, "{line}"),
            tracing::Level::WARN => tracing::warn!(instance = name, "{line}"),
            tracing::Level::INFO => tracing::info!(instance = name, "{line}"),
            tracing::Level::DEBUG => tracing::debug!(instance = name, "{line}"),
            tracing::Level::TRACE => tracing::trace!(instance = name, "{line}"),
        }
        if let Some(log) = &self.log {
            let _ = log.append(line);
        }
        crate::events::publish(name, level, line);
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
    fn errors_have_kinds_for_the_error_policy() {
        let spawn = |kind| InstanceError::Hypervisor {
            op: "create",
            source: HypervisorError::Spawn { binary: "/no/qemu".into(), source: std::io::Error::from(kind) },
        };
        assert_eq!(spawn(std::io::ErrorKind::NotFound).kind(), ErrorKind::NeedsChange, "not installed");
        assert_eq!(spawn(std::io::ErrorKind::PermissionDenied).kind(), ErrorKind::Transient);
        assert_eq!(InstanceError::NoBackend(HypervisorKind::Qemu).kind(), ErrorKind::NeedsChange);
        assert_eq!(InstanceError::Provision(ProvisionError::NoKernel).kind(), ErrorKind::NeedsChange);
        let unsupported = HypervisorError::Unsupported { backend: HypervisorKind::Qemu, what: "bandwidth limits" };
        assert_eq!(InstanceError::Hypervisor { op: "create", source: unsupported }.kind(), ErrorKind::NeedsChange);
        let timeout = HypervisorError::Timeout { op: "boot", secs: 5 };
        assert_eq!(InstanceError::Hypervisor { op: "boot", source: timeout }.kind(), ErrorKind::Transient);
        let refused = StateError::InvalidTransition { from: crate::state::VmState::Running, to: crate::state::VmState::Created };
        assert_eq!(InstanceError::State(refused).kind(), ErrorKind::Permanent);
        assert_eq!(InstanceError::UnreadableLeases(1).kind(), ErrorKind::Transient);
        let unusable = HypervisorError::BadSnapshot { dir: "/s".into(), source: "no memory file".into() };
        assert_eq!(InstanceError::Hypervisor { op: "restore", source: unusable }.kind(), ErrorKind::NeedsChange);
        let damaged = StoreError::DamagedSnapshot { path: "/s/memory".into(), problem: "it is 1 bytes, 2 were written".into() };
        assert_eq!(InstanceError::Store(damaged).kind(), ErrorKind::NeedsChange);
        let full = InstanceError::NoSpace { dir: "/s".into(), detail: "x".into(), source: None };
        assert_eq!(full.kind(), ErrorKind::LacksSpace);
        assert!(full.to_string().starts_with("No space left on device for the snapshot in /s"));
        let lost = InstanceError::StateLost { pid: 7, source: Box::new(InstanceError::BlockingClosed) };
        assert_eq!(lost.kind(), ErrorKind::NeedsChange);
    }
}
