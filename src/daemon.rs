//! The daemon's lifecycle: wire the store, the watcher and the reconciler
//! together, run until told to stop, and leave every VMM running on the way
//! out (they are adopted by the next daemon).
//!
//! Shutdown is injected (`run(cfg, shutdown)`), so tests stop a daemon with
//! their own trigger and the binary with SIGTERM/SIGINT.

use crate::hypervisor::Backends;
use crate::instances::{Instances, Provisioner};
use crate::declaration::instances_dir;
use crate::reconcile::Reconciler;
use crate::settings::Settings;
use crate::store::{Store, StoreError};
use crate::watch::{self, WatchError, WatchReason, Watcher};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct DaemonConfig {
    pub config_dir: PathBuf,
    pub settings: Arc<Settings>,
    pub backends: Backends,
    pub provisioner: Arc<dyn Provisioner>,
    /// Listen for SIGHUP (a full rescan). Off in tests that run several
    /// daemons in one process.
    pub handle_sighup: bool,
    /// Starts the local API (`cli::serve::hook`) once the owners exist;
    /// none: the daemon serves no API.
    pub api: Option<ApiHook>,
}

/// What starts the local API: given the owners' directory and the store,
/// it binds the socket and returns the serving task.
pub type ApiHook = Box<
    dyn FnOnce(crate::reconcile::Directory, Arc<Store>) -> Result<tokio::task::JoinHandle<()>, Box<dyn std::error::Error + Send + Sync>>
        + Send,
>;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the data directory")]
    Store(#[from] StoreError),
    #[error("cannot watch the instances directory")]
    Watch(#[from] WatchError),
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the data directory private")]
    DataDir {
        #[source]
        source: crate::durable::DurableError,
    },
    #[error("cannot serve the local API")]
    Api(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("another hypeman daemon already manages {data_dir}")]
    AlreadyRunning { data_dir: PathBuf },
    #[error(
        "VMMs run as their own users ([vmm] users = \"per-instance\"), but they cannot reach the data directory {data_dir}: {problem}; \
         make it searchable (chmod o+x), move the data dir, or set [vmm] users = \"root\" in hypeman.toml"
    )]
    Unreachable { data_dir: PathBuf, problem: String },
}

/// One daemon per data dir: two would each start VMMs for the same
/// instances. The lock is released when the daemon's process ends, however
/// it ends.
fn lock_data_dir(data_dir: &std::path::Path, vmm: &crate::settings::VmmSettings) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let path = data_dir.join("daemon.lock");
    let io = |source| DaemonError::Lock { path: path.clone(), source };
    crate::durable::create_dir_all(data_dir).map_err(|e| DaemonError::DataDir { source: e })?;
    tighten_data_dir(data_dir, vmm)?;
    let file = crate::durable::private_file().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            DaemonError::AlreadyRunning { data_dir: data_dir.to_path_buf() }
        } else {
            io(std::io::Error::from(errno))
        }
    })
}

/// Gives the data dir its mode: private (`0700`), or, while VMMs run as
/// their own users, searchable by their shared group only (`0710`: they
/// may pass through it to their own guest's directory, never list it; see
/// `hypervisor::handover`). One looser than that is tightened with a
/// warning naming both modes: whatever made it so (a hand-made directory,
/// an older hypeman under a loose umask) exposed every snapshot and
/// control socket in it.
fn tighten_data_dir(data_dir: &std::path::Path, vmm: &crate::settings::VmmSettings) -> Result<(), DaemonError> {
    let (mode, group) = match vmm.users {
        crate::settings::VmmUsers::Root => (crate::durable::DIR_MODE, None),
        crate::settings::VmmUsers::PerInstance => {
            if let Some(problem) = crate::hypervisor::handover::unreachable(data_dir, false) {
                return Err(DaemonError::Unreachable { data_dir: data_dir.to_path_buf(), problem });
            }
            (crate::hypervisor::handover::DIR_SEARCH, Some(vmm.group))
        }
    };
    let old = match group {
        None => crate::durable::tighten_dir(data_dir),
        Some(_) => crate::durable::restrict_dir(data_dir, mode, group),
    }
    .map_err(|e| DaemonError::DataDir { source: e })?;
    if let Some(old) = old {
        tracing::warn!(
            data_dir = %data_dir.display(),
            old_mode = %format!("{old:04o}"),
            new_mode = %format!("{mode:04o}"),
            "the data directory was open to other users; it is now private to its owner{}",
            if group.is_some() { " (and searchable by the VMMs' group)" } else { "" }
        );
    }
    Ok(())
}

/// Whether a daemon holds `data_dir`'s lock, learnt from `/proc/locks`
/// without touching the lock (taking it, even for an instant, could make a
/// daemon starting at that moment fail). `None` when it cannot be told.
pub fn is_running(data_dir: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(data_dir.join("daemon.lock")) {
        Ok(meta) => meta,
        // No lock file: no daemon ever ran on this data dir.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    Some(holds_flock(&locks, meta.dev(), meta.ino()))
}

/// Whether the `/proc/locks` text lists a flock on the file `(dev, ino)`.
/// Its lines read `1: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF`, the
/// device as hexadecimal major:minor and the inode in decimal.
fn holds_flock(locks: &str, dev: u64, ino: u64) -> bool {
    let want = format!("{:02x}:{:02x}:{ino}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter is listed as `1: -> FLOCK …`, one field later.
        fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&want.as_str())
    })
}

/// How long in-flight steps get to finish when the daemon stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Rotates every guest's app, vmm and hypeman logs that grew past
/// `max_bytes` (settings `[logs]`), keeping `keep` old copies. The rotation
/// is copytruncate, so a VMM that holds its log open (QEMU's serial file is
/// opened with append) keeps writing to it.
pub fn rotate_logs(store: &Store, max_bytes: u64, keep: usize) {
    let Ok(listing) = store.list() else { return };
    for guest in listing.guests {
        let paths = store.guest_paths(guest.id);
        for log in [&paths.app_log, &paths.vmm_log, &paths.hypeman_log] {
            if let Err(e) = crate::logs::rotate_if_larger(log, max_bytes, keep) {
                tracing::warn!(instance = %guest.name, error = %crate::error_chain(&e), "cannot rotate a log");
            }
        }
    }
}

pub async fn run(cfg: DaemonConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
    let started = std::time::Instant::now();
    let _lock = lock_data_dir(&cfg.settings.data_dir, &cfg.settings.vmm)?;
    let store = Arc::new(Store::open_and_recover(&cfg.settings.data_dir)?);
    let dir = instances_dir(&cfg.config_dir);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Watch first, list second: nothing written in between is missed.
    let _watcher = Watcher::start(dir.clone(), tx.clone())?;
    let _sighup = if cfg.handle_sighup { Some(watch::spawn_sighup(tx.clone())?) } else { None };
    let instances = Arc::new(Instances::new(store.clone(), cfg.backends, cfg.settings.clone(), cfg.provisioner));
    // Before any worker, so no `prepare` runs meanwhile. Caches that change
    // only when the daemon is upgraded or reconfigured, which restarts it.
    if let Err(e) = instances.prune_caches().await {
        tracing::warn!(error = %crate::error_chain(&e), "cannot prune the caches; they are left as they are");
    }
    let mut reconciler = Reconciler::new(instances, dir.clone());
    reconciler.nudge_all().await;
    // The local API, answered from the owners' looks. Started under the
    // data dir's lock: a socket file left there is a dead daemon's.
    let socket = crate::api::socket_path(&cfg.settings.data_dir);
    let server = match cfg.api {
        Some(hook) => Some(hook(reconciler.directory(), store.clone()).map_err(DaemonError::Api)?),
        None => None,
    };
    tracing::info!(
        instances_dir = %dir.display(),
        data_dir = %cfg.settings.data_dir.display(),
        instances = reconciler.worker_count(),
        startup_ms = started.elapsed().as_millis() as u64,
        "hypeman daemon ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut resync = tokio::time::interval(cfg.settings.reconcile.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = rx.recv() => match ev {
                Some(ev) => match (ev.name, ev.reason) {
                    (Some(name), WatchReason::FileChanged | WatchReason::FileRemoved) => reconciler.nudge(&name),
                    (_, _) => {
                        tracing::info!("rescanning all instances");
                        reconciler.nudge_all().await;
                    }
                },
                None => break,
            },
            _ = resync.tick() => {
                reconciler.nudge_all().await;
                let store = store.clone();
                let logs = cfg.settings.logs.clone();
                tokio::task::spawn_blocking(move || rotate_logs(&store, logs.max_size.bytes(), logs.keep));
            }
        }
    }
    if let Some(server) = server {
        server.abort();
        let _ = std::fs::remove_file(&socket);
    }
    tracing::info!("stopping; VMs keep running and will be adopted by the next daemon");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    reconciler.shutdown(STOP_TIMEOUT).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declaration::spec::HypervisorKind;

    #[test]
    fn a_held_lock_is_seen_in_proc_locks_without_taking_it() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(is_running(tmp.path()), Some(false), "no lock file yet");
        let held = lock_data_dir(tmp.path(), &crate::settings::VmmSettings::default()).unwrap();
        assert_eq!(is_running(tmp.path()), Some(true));
        assert_eq!(is_running(tmp.path()), Some(true), "looking does not take it");
        drop(held);
        assert_eq!(is_running(tmp.path()), Some(false), "released with its holder");
        assert!(lock_data_dir(tmp.path(), &crate::settings::VmmSettings::default()).is_ok());
    }

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let dev = nix::sys::stat::makedev(0xfe, 0);
        let locks = "1: OFDLCK ADVISORY  READ -1 fe:00:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 fe:00:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 fe:00:99 0 EOF\n";
        assert!(holds_flock(locks, dev, 1234));
        assert!(!holds_flock(locks, dev, 77), "not a flock");
        assert!(!holds_flock(locks, dev, 99), "a waiter holds nothing");
        assert!(!holds_flock(locks, nix::sys::stat::makedev(8, 1), 1234), "another device");
    }

    #[test]
    fn oversized_guest_logs_rotate_and_small_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let g = store.create_guest("web", HypervisorKind::Qemu).unwrap();
        let paths = store.guest_paths(g.id);
        std::fs::write(&paths.app_log, vec![b'x'; 4096]).unwrap();
        std::fs::write(&paths.vmm_log, b"small\n").unwrap();
        rotate_logs(&store, 1024, 2);
        assert_eq!(std::fs::metadata(&paths.app_log).unwrap().len(), 0, "truncated in place");
        assert_eq!(std::fs::read(paths.app_log.with_extension("log.1")).unwrap().len(), 4096);
        assert_eq!(std::fs::read(&paths.vmm_log).unwrap(), b"small\n");
        assert!(!paths.vmm_log.with_extension("log.1").exists());
    }
}
