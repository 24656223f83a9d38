//! The on-disk truth under the data dir: guest directories, their
//! `metadata.json`, their snapshot, and the top-level `images/` and
//! `system/` dirs (created here, filled by their own modules).
//!
//! ```text
//!  {data_dir}/guests/{ulid}/            a guest; visible only once complete
//!  {data_dir}/guests/.{ulid}.tmp/       a create in progress (or crashed)
//!  {data_dir}/guests/.{ulid}.deleting/  a delete in progress (or crashed)
//! ```
//!
//! Every multi-step operation is safe to re-run after the daemon is killed
//! at any point, and [`Store::open_and_recover`] finishes or rolls back whatever a crash
//! interrupted. The store does no hypervisor calls and holds no policy: it
//! never decides whether a guest should run, only records what it is told
//! and reports what is on disk. All IO here is blocking `std::fs`; async
//! callers should use `spawn_blocking`.

mod applied;
mod damaged;
mod error;
mod metadata;
mod paths;
mod snapshot;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ulid::Ulid;

use crate::durable;

pub use applied::{AppliedDeclaration, AppliedLimit, AppliedNetwork, AppliedVolume, APPLIED_VERSION};
pub use error::StoreError;
pub use metadata::{now_rfc3339, ExitRecord, Metadata, NetworkLease, VmmRecord, CURRENT_VERSION};
pub use paths::{GuestPaths, MAX_SOCKET_PATH};
pub use snapshot::{SnapshotFile, SnapshotInfo, CHECKSUM_MAX_BYTES, SNAPSHOT_VERSION};

const GUESTS_DIR: &str = "guests";
const TOP_LEVEL_DIRS: [&str; 3] = [GUESTS_DIR, "images", "system"];
const CREATING_SUFFIX: &str = ".tmp";
const DELETING_SUFFIX: &str = ".deleting";

/// Handle on the data dir. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    data_dir: PathBuf,
    guests_dir: PathBuf,
    /// Serializes the name check and the publishing rename of
    /// `create_guest`, so two creates cannot both take one name.
    create_lock: Mutex<()>,
    /// Name → ID as last seen, so finding one guest by name reads one
    /// metadata file, not all of them. Only a hint: every hit is checked
    /// against the metadata it names, and a miss falls back to a full scan.
    names: Mutex<std::collections::HashMap<String, Ulid>>,
    /// Set for the data dir's owner (the daemon): only it creates guests,
    /// so a name missing from `names` is missing from disk too.
    authoritative: bool,
    /// Opened with [`Store::open_read_only`]: a missing `guests/` reads as
    /// no guests instead of an error.
    read_only: bool,
}

/// Every guest on disk. A guest whose metadata cannot be read shows up in
/// `unreadable` without hiding the others.
#[derive(Debug)]
pub struct Listing {
    /// Sorted by name.
    pub guests: Vec<Metadata>,
    /// Sorted by path.
    pub unreadable: Vec<Unreadable>,
}

/// An entry of `guests/` whose record cannot be used: a guest directory
/// whose `metadata.json` is missing, cut short, of a newer format or of a
/// shape this build refuses, or an entry that is not a guest directory.
#[derive(Debug)]
pub struct Unreadable {
    /// The guest directory's ID; `None` for an entry that is not a guest
    /// directory (it holds no record, so no name).
    pub id: Option<Ulid>,
    /// The record (or the stray entry).
    pub path: PathBuf,
    /// The name, when what is left of the record still says it.
    pub name: Option<String>,
    /// The format version, when what is left of the record still says it.
    pub version: Option<u64>,
    pub problem: StoreError,
}

impl Unreadable {
    /// Whether this record may be the guest named `name`: it names it, or
    /// its name cannot be read (then it may be anyone's).
    pub fn could_hold(&self, name: &str) -> bool {
        self.id.is_some() && self.name.as_deref().is_none_or(|n| n == name)
    }

    /// Written by a newer hypeman: never rewritten or deleted by this one.
    pub fn is_newer(&self) -> bool {
        self.version.is_some_and(|v| v > u64::from(CURRENT_VERSION))
    }
}

impl Store {
    /// Opens (creating if needed) the data dir and repairs what crashes
    /// left: removes half-created guests, finishes deletions, sweeps temp
    /// files, and finishes or drops interrupted snapshot commits. A guest
    /// that cannot be repaired is logged and left for the next open; it
    /// does not stop the others from being served.
    ///
    /// Only the one process that owns the data dir (the daemon, holding its
    /// lock) may do this: to anyone else, a snapshot being written looks
    /// exactly like an abandoned one.
    pub fn open_and_recover(data_dir: &Path) -> Result<Store, StoreError> {
        let mut store = Store::open(data_dir)?;
        store.repair()?;
        let listing = store.list()?;
        if let Ok(mut names) = store.names.lock() {
            names.extend(listing.guests.iter().map(|m| (m.name.clone(), m.id)));
        }
        // A guest whose metadata cannot be read might hold any name; only a
        // complete picture may answer "absent" without looking.
        store.authoritative = listing.unreadable.is_empty();
        Ok(store)
    }

    /// Opens (creating if needed) the data dir without repairing anything:
    /// for readers such as the CLI, and safe while a daemon works in it.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        // Sockets handed to hypervisors must not depend on their cwd.
        let data_dir =
            std::path::absolute(data_dir).map_err(StoreError::io("resolve", data_dir))?;
        durable::create_dir_all(&data_dir)?;
        let mut created = false;
        for name in TOP_LEVEL_DIRS {
            created |= durable::ensure_dir(&data_dir.join(name))?;
        }
        if created {
            durable::fsync_dir(&data_dir)?;
        }

        let store = Store {
            guests_dir: data_dir.join(GUESTS_DIR),
            data_dir,
            create_lock: Mutex::new(()),
            names: Mutex::new(std::collections::HashMap::new()),
            authoritative: false,
            read_only: false,
        };
        // Every guest's socket path has the same length; fail at startup,
        // not at the first boot.
        store.guest_paths(Ulid::nil()).check_socket_paths()?;
        Ok(store)
    }

    /// Opens the data dir for reading only: nothing is created and nothing
    /// is repaired. For the CLI, which runs beside a live daemon: repair
    /// would take a snapshot the daemon is writing for an abandoned one and
    /// remove it, and a half-created guest for a crashed create. A data dir
    /// that does not exist yet holds no guests.
    pub fn open_read_only(data_dir: &Path) -> Result<Store, StoreError> {
        let data_dir =
            std::path::absolute(data_dir).map_err(StoreError::io("resolve", data_dir))?;
        Ok(Store {
            guests_dir: data_dir.join(GUESTS_DIR),
            data_dir,
            create_lock: Mutex::new(()),
            names: Mutex::new(std::collections::HashMap::new()),
            authoritative: false,
            read_only: true,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn guest_paths(&self, id: Ulid) -> GuestPaths {
        GuestPaths::new(&self.guests_dir, id)
    }

    /// Creates a guest with a new ID. The guest directory appears fully
    /// formed or not at all.
    pub fn create_guest(
        &self,
        name: &str,
        hypervisor: crate::hypervisor::HypervisorKind,
    ) -> Result<Metadata, StoreError> {
        self.create_guest_with_id(Ulid::new(), name, hypervisor)
    }

    fn create_guest_with_id(
        &self,
        id: Ulid,
        name: &str,
        hypervisor: crate::hypervisor::HypervisorKind,
    ) -> Result<Metadata, StoreError> {
        let _guard = self
            .create_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = self.find_by_name(name)? {
            return Err(StoreError::NameTaken {
                name: name.to_string(),
                id: existing.id,
            });
        }

        let paths = self.guest_paths(id);
        let staging = self.guests_dir.join(format!(".{id}{CREATING_SUFFIX}"));
        let m = Metadata::new(id, name, hypervisor);
        let built = (|| -> Result<(), StoreError> {
            durable::create_dir(&staging)?;
            durable::create_dir(&staging.join(paths::LOGS_DIR))?;
            let metadata = staging.join(paths::METADATA_FILE);
            Ok(durable::write_atomic(&metadata, &metadata::encode(&m, &metadata)?)?)
        })();
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        durable::rename(&staging, &paths.dir)?;
        durable::fsync_dir(&self.guests_dir)?;
        if let Ok(mut names) = self.names.lock() {
            names.insert(name.to_string(), id);
        }
        tracing::info!(%id, name, "guest created");
        Ok(m)
    }

    pub fn list(&self) -> Result<Listing, StoreError> {
        let mut guests = Vec::new();
        let mut unreadable = Vec::new();
        for entry in self.guest_entries()? {
            match entry {
                GuestEntry::Guest(id) => match self.read_metadata(id) {
                    Ok(m) => guests.push(m),
                    Err(problem) => unreadable.push(self.unreadable(id, problem)),
                },
                GuestEntry::Stray(path) => unreadable.push(Unreadable {
                    id: None,
                    name: None,
                    version: None,
                    problem: StoreError::NotAGuest { path: path.clone() },
                    path,
                }),
                GuestEntry::Creating(_) | GuestEntry::Deleting(_) => {}
            }
        }
        guests.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        unreadable.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Listing { guests, unreadable })
    }

    /// What is left to say of guest `id`, whose record failed to read with
    /// `problem`.
    fn unreadable(&self, id: Ulid, problem: StoreError) -> Unreadable {
        let path = self.guest_paths(id).metadata;
        // Whatever is left of it: a missing or unreadable file says nothing.
        let remains = fs::read(&path).map(|bytes| damaged::remains(&bytes)).unwrap_or_default();
        Unreadable { id: Some(id), path, name: remains.name, version: remains.version, problem }
    }

    pub fn find_by_name(&self, name: &str) -> Result<Option<Metadata>, StoreError> {
        let hint = self.names.lock().ok().and_then(|n| n.get(name).copied());
        match hint {
            Some(id) => {
                if let Ok(m) = self.read_metadata(id) {
                    if m.name == name {
                        return Ok(Some(m));
                    }
                }
            }
            None if self.authoritative => return Ok(None),
            None => {}
        }
        let listing = self.list()?;
        if let Ok(mut names) = self.names.lock() {
            names.clear();
            names.extend(listing.guests.iter().map(|m| (m.name.clone(), m.id)));
        }
        if let Some(m) = listing.guests.into_iter().find(|m| m.name == name) {
            return Ok(Some(m));
        }
        // Never "absent" for a name an unreadable record may hold: the
        // caller would make a second guest (and a second VMM) of it.
        match listing.unreadable.into_iter().find(|u| u.could_hold(name)) {
            Some(u) => Err(StoreError::MaybeHeldByUnreadable {
                name: name.to_string(),
                path: u.path,
                problem: Box::new(u.problem),
            }),
            None => Ok(None),
        }
    }

    /// Resolves what a user typed: an exact ID, else an exact name, else a
    /// unique ID prefix (case-insensitive).
    pub fn lookup(&self, query: &str) -> Result<Metadata, StoreError> {
        let not_found = || StoreError::NotFound {
            query: query.to_string(),
        };
        if query.is_empty() {
            return Err(not_found());
        }
        if let Ok(id) = Ulid::from_string(query) {
            if self.guest_paths(id).dir.is_dir() {
                return self.read_metadata(id);
            }
        }
        let mut listing = self.list()?;
        if let Some(m) = listing.guests.iter().find(|m| m.name == query) {
            return Ok(m.clone());
        }
        if let Some(at) = listing.unreadable.iter().position(|u| u.name.as_deref() == Some(query)) {
            let u = listing.unreadable.swap_remove(at);
            return Err(StoreError::MaybeHeldByUnreadable {
                name: query.to_string(),
                path: u.path,
                problem: Box::new(u.problem),
            });
        }

        let prefix = query.to_ascii_uppercase();
        let mut matches: Vec<Ulid> = self
            .guest_entries()?
            .into_iter()
            .filter_map(|e| match e {
                GuestEntry::Guest(id) if id.to_string().starts_with(&prefix) => Some(id),
                _ => None,
            })
            .collect();
        matches.sort();
        match matches.as_slice() {
            [] => Err(not_found()),
            [id] => self.read_metadata(*id),
            many => {
                let names: HashMap<Ulid, &str> = listing
                    .guests
                    .iter()
                    .map(|m| (m.id, m.name.as_str()))
                    .collect();
                let matches = many
                    .iter()
                    .map(|id| format!("{id} ({})", names.get(id).copied().unwrap_or("unreadable")))
                    .collect();
                Err(StoreError::Ambiguous {
                    query: query.to_string(),
                    matches,
                })
            }
        }
    }

    pub fn read_metadata(&self, id: Ulid) -> Result<Metadata, StoreError> {
        let paths = self.guest_paths(id);
        let bytes = match fs::read(&paths.metadata) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !paths.dir.is_dir() => {
                return Err(StoreError::GuestNotFound { id });
            }
            Err(source) => {
                return Err(StoreError::Io {
                    op: "read",
                    path: paths.metadata,
                    source,
                })
            }
        };
        let m = metadata::decode_metadata(&bytes, &paths.metadata)?;
        if m.id != id {
            return Err(StoreError::IdMismatch {
                path: paths.metadata,
                found: m.id,
            });
        }
        Ok(m)
    }

    /// Atomically replaces the guest's metadata. The file is written with
    /// the current format version and `updated_at` set to now; the guest
    /// must exist (a write never resurrects a deleted guest), and its record
    /// must not be of a newer format (see [`Store::refuse_newer`]).
    pub fn write_metadata(&self, m: &Metadata) -> Result<(), StoreError> {
        let paths = self.guest_paths(m.id);
        if !paths.dir.is_dir() {
            return Err(StoreError::GuestNotFound { id: m.id });
        }
        self.refuse_newer(&paths)?;
        let stamped = Metadata {
            version: CURRENT_VERSION,
            updated_at: now_rfc3339(),
            ..m.clone()
        };
        Ok(durable::write_atomic(
            &paths.metadata,
            &metadata::encode(&stamped, &paths.metadata)?,
        )?)
    }

    /// Removes the guest and everything in its directory. The directory is
    /// first renamed to a hidden name, so a crash never leaves a half
    /// deleted guest (or snapshot) visible. Idempotent. Stopping its VMM is
    /// the caller's job.
    pub fn delete_guest(&self, id: Ulid) -> Result<(), StoreError> {
        let paths = self.guest_paths(id);
        let existed = paths.dir.is_dir();
        if existed {
            self.refuse_newer(&paths)?;
        }
        durable::discard_dir(
            &paths.dir,
            &self.guests_dir.join(format!(".{id}{DELETING_SUFFIX}")),
        )?;
        if existed {
            tracing::info!(%id, "guest deleted");
        }
        Ok(())
    }

    /// Fails when the guest's record on disk says a format newer than this
    /// build's: whatever this build would write or delete there, it would
    /// do by rules the newer hypeman may not keep. Every write and delete of
    /// a record passes here, so no caller can forget it. A record too damaged
    /// to say its version is not refused: a whole record written over it is
    /// a repair.
    fn refuse_newer(&self, paths: &GuestPaths) -> Result<(), StoreError> {
        let bytes = match fs::read(&paths.metadata) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Io { op: "read", path: paths.metadata.clone(), source }),
        };
        match damaged::remains(&bytes).version {
            Some(found) if found > u64::from(CURRENT_VERSION) => Err(StoreError::NewerRecord {
                path: paths.metadata.clone(),
                found,
                supported: CURRENT_VERSION,
            }),
            Some(_) | None => Ok(()),
        }
    }

    fn existing_guest(&self, id: Ulid) -> Result<GuestPaths, StoreError> {
        let paths = self.guest_paths(id);
        if paths.dir.is_dir() {
            Ok(paths)
        } else {
            Err(StoreError::GuestNotFound { id })
        }
    }

    fn guest_entries(&self) -> Result<Vec<GuestEntry>, StoreError> {
        let dir = &self.guests_dir;
        let mut out = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if self.read_only && e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(StoreError::Io {
                    op: "list",
                    path: dir.clone(),
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(StoreError::io("list", dir))?;
            out.push(GuestEntry::classify(
                &entry.file_name().to_string_lossy(),
                entry.path(),
            ));
        }
        Ok(out)
    }

    fn repair(&self) -> Result<(), StoreError> {
        for entry in self.guest_entries()? {
            let result = match &entry {
                GuestEntry::Creating(path) => {
                    tracing::warn!(path = %path.display(), "removing a guest whose creation was interrupted");
                    durable::remove_dir_all_if_exists(path).map_err(StoreError::from)
                }
                GuestEntry::Deleting(path) => {
                    tracing::warn!(path = %path.display(), "finishing an interrupted guest deletion");
                    durable::remove_dir_all_if_exists(path).map_err(StoreError::from)
                }
                // A guest whose record cannot be read is left exactly as it
                // is: a newer hypeman's snapshot follows rules this build
                // does not know, and a temp file beside a damaged record may
                // be what repairs it by hand.
                GuestEntry::Guest(id) => match self.read_metadata(*id) {
                    Ok(_) => {
                        let paths = self.guest_paths(*id);
                        durable::sweep_temp_files(&paths.dir)
                            .map_err(StoreError::from)
                            .and_then(|()| snapshot::recover(&paths))
                    }
                    Err(problem) => {
                        tracing::warn!(error = %crate::error_chain(&problem), "leaving a guest whose record cannot be read untouched");
                        Ok(())
                    }
                },
                GuestEntry::Stray(_) => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %crate::error_chain(&e), "could not repair the data dir; will retry on next open");
            }
        }
        Ok(())
    }
}

/// What one name in `guests/` is.
enum GuestEntry {
    Guest(Ulid),
    Creating(PathBuf),
    Deleting(PathBuf),
    /// Not ours: reported, never removed.
    Stray(PathBuf),
}

impl GuestEntry {
    fn classify(name: &str, path: PathBuf) -> GuestEntry {
        // Only the canonical (uppercase) spelling is a guest: paths are
        // always built from `Ulid::to_string`.
        let is_ulid = |s: &str| Ulid::from_string(s).is_ok_and(|id| id.to_string() == s);
        if let Some(hidden) = name.strip_prefix('.') {
            if hidden.strip_suffix(CREATING_SUFFIX).is_some_and(is_ulid) {
                return GuestEntry::Creating(path);
            }
            if hidden.strip_suffix(DELETING_SUFFIX).is_some_and(is_ulid) {
                return GuestEntry::Deleting(path);
            }
        } else if is_ulid(name) && path.is_dir() {
            if let Ok(id) = Ulid::from_string(name) {
                return GuestEntry::Guest(id);
            }
        }
        GuestEntry::Stray(path)
    }
}

#[cfg(test)]
pub(crate) mod tests;
