//! A guest's one snapshot, `snapshots/snapshot-latest/`, and how it is
//! written, published and removed without a crash ever exposing a partial
//! snapshot as complete.
//!
//! ```text
//!  begin_snapshot ──► snapshot-latest.partial/   (empty; the hypervisor writes here)
//!  commit_snapshot:   fsync every file and dir in .partial
//!                     write .partial/snapshot.json atomically    ◄── the commit point
//!                     snapshot-latest → .snapshot-trash, .partial → snapshot-latest
//!                     fsync snapshots/, delete .snapshot-trash
//! ```
//!
//! A snapshot is complete iff `snapshot-latest/snapshot.json` exists and
//! parses. A `.partial` with a valid marker is a commit that crashed before
//! its rename; `Store::open_and_recover` finishes it. A `.partial` without one is an
//! abandoned attempt; `Store::open_and_recover` deletes it. Anything being deleted is
//! first renamed to `.snapshot-trash`, so the marker disappears atomically
//! before any memory file does.
//!
//! Integrity: the marker lists every file the hypervisor wrote with its
//! size, and a SHA-256 of the small ones (device state, launch records);
//! memory images are recorded by size only, since hashing gigabytes would
//! cost the standby and the restore their speed. [`Store::verify_snapshot`]
//! checks a snapshot against its marker before a VMM is started on it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::durable;
use super::error::StoreError;
use super::metadata::{encode, versioned_value};
use super::paths::{GuestPaths, SNAPSHOT_MARKER};
use super::Store;
use crate::hypervisor::HypervisorKind;

/// The marker format this build writes and the newest it reads.
/// 2 added `files`; a version-1 marker reads as one with nothing to check.
pub const SNAPSHOT_VERSION: u32 = 2;

/// Files up to this size get a checksum in the marker; larger ones are
/// memory images and get their size only. Device state is 40–220 KB
/// (Cloud Hypervisor's `state.json`) and launch records a few KB.
pub const CHECKSUM_MAX_BYTES: u64 = 4 << 20;

/// The marker `snapshot.json`, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub version: u32,
    pub hypervisor: HypervisorKind,
    pub hypervisor_version: String,
    /// Hash of the launch config; a different hash means the snapshot cannot
    /// be restored and the guest must cold boot.
    pub config_hash: String,
    /// RFC 3339.
    pub created_at: String,
    pub memory_bytes: u64,
    /// What the hypervisor wrote, as committed, for
    /// [`Store::verify_snapshot`]. Filled by [`Store::commit_snapshot`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<SnapshotFile>,
}

/// One file of a snapshot as it was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    /// Relative to the snapshot directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// Lowercase hex; only for files up to [`CHECKSUM_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl SnapshotInfo {
    pub fn new(
        hypervisor: HypervisorKind,
        hypervisor_version: &str,
        config_hash: &str,
        memory_bytes: u64,
    ) -> SnapshotInfo {
        SnapshotInfo {
            version: SNAPSHOT_VERSION,
            hypervisor,
            hypervisor_version: hypervisor_version.to_string(),
            config_hash: config_hash.to_string(),
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            memory_bytes,
            files: Vec::new(),
        }
    }

    /// The bytes every file of the snapshot takes, as committed.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

impl Store {
    /// Returns a fresh, empty `snapshots/snapshot-latest.partial` for the
    /// hypervisor to write into, discarding any stale one. The complete
    /// snapshot, if any, is untouched until [`Store::commit_snapshot`].
    pub fn begin_snapshot(&self, id: Ulid) -> Result<PathBuf, StoreError> {
        let paths = self.existing_guest(id)?;
        if durable::ensure_dir(&paths.snapshots_dir)? {
            durable::fsync_dir(&paths.dir)?;
        }
        let partial = paths.snapshot_partial();
        durable::discard_dir(&partial, &paths.snapshot_trash())?;
        durable::create_dir(&partial)?;
        durable::fsync_dir(&paths.snapshots_dir)?;
        Ok(partial)
    }

    /// Makes what the hypervisor wrote into the `.partial` dir durable,
    /// writes the marker last, and publishes it as `snapshot-latest`,
    /// replacing the previous snapshot. The marker is written with the
    /// current [`SNAPSHOT_VERSION`] whatever `info.version` says, and with
    /// the sizes and checksums of what is in `.partial` whatever
    /// `info.files` says.
    ///
    /// This is the one place a snapshot becomes durable: every file and
    /// directory under `.partial` is fsynced here, once, before the marker
    /// exists, so a backend only writes its files and must not fsync them
    /// again (a memory file is gigabytes; QEMU's `exec:cat` never syncs it).
    pub fn commit_snapshot(&self, id: Ulid, info: &SnapshotInfo) -> Result<(), StoreError> {
        let paths = self.guest_paths(id);
        let partial = paths.snapshot_partial();
        if !partial.is_dir() {
            return Err(StoreError::NoPartialSnapshot { path: partial });
        }
        // All data first; the marker (itself fsynced, then its directory)
        // is what makes the snapshot complete.
        durable::fsync_tree(&partial)?;
        let marker = partial.join(SNAPSHOT_MARKER);
        let info = SnapshotInfo {
            version: SNAPSHOT_VERSION,
            files: record_files(&partial)?,
            ..info.clone()
        };
        durable::write_atomic(&marker, &encode(&info, &marker)?)?;
        publish(&paths)?;
        tracing::debug!(%id, "snapshot committed");
        Ok(())
    }

    /// The marker of the complete snapshot, or `None` if there is none. A
    /// marker that is missing or does not parse means "not complete"; a
    /// marker from a newer hypeman is an error, so a downgrade does not
    /// silently cold boot over a snapshot it cannot read.
    pub fn snapshot(&self, id: Ulid) -> Result<Option<SnapshotInfo>, StoreError> {
        read_marker(&self.guest_paths(id).snapshot_latest)
    }

    /// Checks the complete snapshot against what its marker recorded at
    /// commit: every file there, of its size, and the small ones with their
    /// checksum. Called before a VMM is started on it, so a damaged
    /// snapshot is reported (and kept, for the user to look at or discard)
    /// instead of restored into a guest that crashes or loops. A marker of
    /// version 1 recorded nothing and passes.
    pub fn verify_snapshot(&self, id: Ulid) -> Result<(), StoreError> {
        let dir = self.guest_paths(id).snapshot_latest;
        let Some(info) = read_marker(&dir)? else {
            return Err(StoreError::DamagedSnapshot {
                path: dir.join(SNAPSHOT_MARKER),
                problem: "the marker is missing or unreadable".to_string(),
            });
        };
        for file in &info.files {
            let path = dir.join(&file.path);
            let damaged = |problem: String| StoreError::DamagedSnapshot { path: path.clone(), problem };
            let found = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(damaged("it is missing".to_string())),
                Err(source) => return Err(StoreError::Io { op: "inspect", path, source }),
            };
            if found != file.bytes {
                return Err(damaged(format!("it is {found} bytes, {} were written", file.bytes)));
            }
            if let Some(expected) = &file.sha256 {
                let actual = sha256_of(&path)?;
                if &actual != expected {
                    return Err(damaged(format!("its SHA-256 is {actual}, {expected} was written")));
                }
            }
        }
        Ok(())
    }

    /// `snapshots/snapshot-latest`: what a hypervisor restores from.
    pub fn snapshot_dir(&self, id: Ulid) -> PathBuf {
        self.guest_paths(id).snapshot_latest
    }

    /// Discards the snapshot being written, keeping the complete one, if
    /// any: a failed snapshot leaves nothing behind to fill the disk.
    /// Idempotent.
    pub fn abandon_snapshot(&self, id: Ulid) -> Result<(), StoreError> {
        let paths = self.guest_paths(id);
        Ok(durable::discard_dir(&paths.snapshot_partial(), &paths.snapshot_trash())?)
    }

    /// Removes the snapshot and any snapshot being written. Idempotent.
    pub fn remove_snapshot(&self, id: Ulid) -> Result<(), StoreError> {
        let paths = self.guest_paths(id);
        let trash = paths.snapshot_trash();
        durable::discard_dir(&paths.snapshot_latest, &trash)?;
        Ok(durable::discard_dir(&paths.snapshot_partial(), &trash)?)
    }
}

/// Every file under `dir` (but the marker) with its size, and a checksum
/// for the small ones, sorted by path.
fn record_files(dir: &Path) -> Result<Vec<SnapshotFile>, StoreError> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let here = dir.join(&rel);
        for entry in fs::read_dir(&here).map_err(StoreError::io("list", &here))? {
            let entry = entry.map_err(StoreError::io("list", &here))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(StoreError::io("inspect", &path))?;
            let name = rel.join(entry.file_name());
            if kind.is_dir() {
                pending.push(name);
            } else if kind.is_file() && name != Path::new(SNAPSHOT_MARKER) {
                let bytes = entry.metadata().map_err(StoreError::io("inspect", &path))?.len();
                let sha256 = if bytes <= CHECKSUM_MAX_BYTES { Some(sha256_of(&path)?) } else { None };
                let path = name.to_string_lossy().replace(std::path::MAIN_SEPARATOR, "/");
                files.push(SnapshotFile { path, bytes, sha256 });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn sha256_of(path: &Path) -> Result<String, StoreError> {
    durable::sha256_file(path).map_err(StoreError::io("read", path))
}

/// Replaces `snapshot-latest` with the (marked) `.partial`. Re-runnable from
/// any point: until the final rename, `.partial` still holds a valid marker
/// and `recover` calls this again.
fn publish(paths: &GuestPaths) -> Result<(), StoreError> {
    let trash = paths.snapshot_trash();
    durable::remove_dir_all_if_exists(&trash)?;
    match fs::rename(&paths.snapshot_latest, &trash) {
        Ok(()) => durable::fsync_dir(&paths.snapshots_dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError::Rename {
                from: paths.snapshot_latest.clone(),
                to: trash,
                source,
            })
        }
    }
    durable::rename(&paths.snapshot_partial(), &paths.snapshot_latest)?;
    durable::fsync_dir(&paths.snapshots_dir)?;
    Ok(durable::remove_dir_all_if_exists(&trash)?)
}

/// Brings a guest's snapshots dir back to a clean state after a crash:
/// finishes a commit whose marker was written, drops an abandoned partial,
/// and empties the trash.
pub(crate) fn recover(paths: &GuestPaths) -> Result<(), StoreError> {
    if !paths.snapshots_dir.is_dir() {
        return Ok(());
    }
    let partial = paths.snapshot_partial();
    if partial.is_dir() {
        // Our own marker: a newer-version error cannot happen here, and any
        // other unreadable marker means the commit never reached its point.
        if matches!(read_marker(&partial), Ok(Some(_))) {
            tracing::warn!(guest = %paths.dir.display(), "finishing a snapshot commit interrupted by a crash");
            publish(paths)?;
        } else {
            tracing::warn!(guest = %paths.dir.display(), "removing an unfinished snapshot");
            durable::discard_dir(&partial, &paths.snapshot_trash())?;
        }
    }
    Ok(durable::remove_dir_all_if_exists(&paths.snapshot_trash())?)
}

fn read_marker(dir: &Path) -> Result<Option<SnapshotInfo>, StoreError> {
    let path = dir.join(SNAPSHOT_MARKER);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                op: "read",
                path,
                source,
            })
        }
    };
    let decoded = versioned_value(&bytes, &path, SNAPSHOT_VERSION).and_then(|(_, value)| {
        serde_json::from_value::<SnapshotInfo>(value).map_err(|source| StoreError::Parse {
            path: path.clone(),
            source,
        })
    });
    match decoded {
        Ok(info) => Ok(Some(info)),
        Err(e @ StoreError::UnsupportedVersion { .. }) => Err(e),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "snapshot marker unreadable; treating the snapshot as incomplete");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_with_guest;

    fn info(hash: &str) -> SnapshotInfo {
        SnapshotInfo::new(HypervisorKind::CloudHypervisor, "v44.0", hash, 1 << 30)
    }

    /// What a hypervisor leaves in the snapshot dir.
    fn write_hypervisor_files(dir: &Path, tag: &str) {
        fs::write(dir.join("config.json"), format!("{{\"tag\":\"{tag}\"}}")).unwrap();
        fs::create_dir(dir.join("memory")).unwrap();
        fs::write(dir.join("memory/ranges"), tag).unwrap();
    }

    fn snapshot_entries(store: &Store, id: Ulid) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store.guest_paths(id).snapshots_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn begin_commit_replace_remove_lifecycle() {
        let (_tmp, store, m) = store_with_guest("web");
        assert_eq!(store.snapshot(m.id).unwrap(), None);

        let partial = store.begin_snapshot(m.id).unwrap();
        assert!(partial.ends_with("snapshots/snapshot-latest.partial"));
        assert_eq!(
            fs::read_dir(&partial).unwrap().count(),
            0,
            "begin returns an empty dir"
        );
        write_hypervisor_files(&partial, "first");
        assert_eq!(
            store.snapshot(m.id).unwrap(),
            None,
            "not complete before commit"
        );

        store.commit_snapshot(m.id, &info("h1")).unwrap();
        let got = store
            .snapshot(m.id)
            .unwrap()
            .expect("complete after commit");
        assert_eq!(got.config_hash, "h1");
        let latest = store.snapshot_dir(m.id);
        assert_eq!(
            fs::read_to_string(latest.join("memory/ranges")).unwrap(),
            "first"
        );
        assert_eq!(snapshot_entries(&store, m.id), vec!["snapshot-latest"]);

        // A second snapshot replaces the first only on commit.
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "second");
        assert_eq!(store.snapshot(m.id).unwrap().unwrap().config_hash, "h1");
        store.commit_snapshot(m.id, &info("h2")).unwrap();
        assert_eq!(store.snapshot(m.id).unwrap().unwrap().config_hash, "h2");
        assert_eq!(
            fs::read_to_string(latest.join("memory/ranges")).unwrap(),
            "second"
        );
        assert_eq!(snapshot_entries(&store, m.id), vec!["snapshot-latest"]);

        store.remove_snapshot(m.id).unwrap();
        assert_eq!(store.snapshot(m.id).unwrap(), None);
        assert!(!latest.exists());
        store.remove_snapshot(m.id).unwrap();
    }

    #[test]
    fn begin_discards_a_stale_partial() {
        let (_tmp, store, m) = store_with_guest("web");
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "stale");
        let again = store.begin_snapshot(m.id).unwrap();
        assert_eq!(again, partial);
        assert_eq!(fs::read_dir(&again).unwrap().count(), 0);
    }

    #[test]
    fn commit_without_begin_is_an_error() {
        let (_tmp, store, m) = store_with_guest("web");
        assert!(matches!(
            store.commit_snapshot(m.id, &info("h")),
            Err(StoreError::NoPartialSnapshot { .. })
        ));
    }

    #[test]
    fn begin_for_unknown_guest_is_an_error() {
        let (_tmp, store, _m) = store_with_guest("web");
        assert!(matches!(
            store.begin_snapshot(Ulid::new()),
            Err(StoreError::GuestNotFound { .. })
        ));
    }

    #[test]
    fn latest_without_marker_is_not_complete() {
        let (_tmp, store, m) = store_with_guest("web");
        // As if the files were renamed into place without the marker.
        let latest = store.snapshot_dir(m.id);
        fs::create_dir_all(&latest).unwrap();
        write_hypervisor_files(&latest, "x");
        assert_eq!(store.snapshot(m.id).unwrap(), None);
    }

    #[test]
    fn corrupt_marker_is_not_complete() {
        let (_tmp, store, m) = store_with_guest("web");
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "x");
        store.commit_snapshot(m.id, &info("h")).unwrap();
        let marker = store.snapshot_dir(m.id).join(SNAPSHOT_MARKER);

        fs::write(&marker, b"{\"version\": 1, \"hypervisor\": ").unwrap();
        assert_eq!(store.snapshot(m.id).unwrap(), None);
        fs::write(&marker, b"{\"version\": 1}").unwrap();
        assert_eq!(store.snapshot(m.id).unwrap(), None);
    }

    #[test]
    fn marker_from_newer_hypeman_is_an_error_not_a_cold_boot() {
        let (_tmp, store, m) = store_with_guest("web");
        let latest = store.snapshot_dir(m.id);
        fs::create_dir_all(&latest).unwrap();
        fs::write(latest.join(SNAPSHOT_MARKER), b"{\"version\": 7}").unwrap();
        assert!(matches!(
            store.snapshot(m.id),
            Err(StoreError::UnsupportedVersion { found: 7, .. })
        ));
    }

    #[test]
    fn open_drops_a_partial_that_never_got_its_marker() {
        let (tmp, store, m) = store_with_guest("web");
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "old");
        store.commit_snapshot(m.id, &info("old")).unwrap();
        // Crash while the hypervisor was writing the next one.
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "new");
        drop(store);

        let store = Store::open_and_recover(tmp.path()).unwrap();
        assert_eq!(snapshot_entries(&store, m.id), vec!["snapshot-latest"]);
        assert_eq!(store.snapshot(m.id).unwrap().unwrap().config_hash, "old");
    }

    /// Replays `commit_snapshot` up to each crash point after the marker is
    /// written, and checks that `open` publishes the new snapshot.
    #[test]
    fn open_finishes_a_commit_interrupted_after_its_marker() {
        for crash_point in ["marker written", "old moved to trash"] {
            let (tmp, store, m) = store_with_guest("web");
            let partial = store.begin_snapshot(m.id).unwrap();
            write_hypervisor_files(&partial, "old");
            store.commit_snapshot(m.id, &info("old")).unwrap();

            let partial = store.begin_snapshot(m.id).unwrap();
            write_hypervisor_files(&partial, "new");
            let marker = partial.join(SNAPSHOT_MARKER);
            durable::write_atomic(&marker, &encode(&info("new"), &marker).unwrap()).unwrap();
            let paths = store.guest_paths(m.id);
            if crash_point == "old moved to trash" {
                fs::rename(&paths.snapshot_latest, paths.snapshot_trash()).unwrap();
                assert_eq!(store.snapshot(m.id).unwrap(), None);
            }
            drop(store);

            let store = Store::open_and_recover(tmp.path()).unwrap();
            assert_eq!(
                store.snapshot(m.id).unwrap().unwrap().config_hash,
                "new",
                "{crash_point}"
            );
            assert_eq!(
                fs::read_to_string(paths.snapshot_latest.join("memory/ranges")).unwrap(),
                "new"
            );
            assert_eq!(
                snapshot_entries(&store, m.id),
                vec!["snapshot-latest"],
                "{crash_point}"
            );
        }
    }

    fn committed(store: &Store, id: Ulid) -> PathBuf {
        let partial = store.begin_snapshot(id).unwrap();
        write_hypervisor_files(&partial, "state");
        // A memory image above the checksum limit: recorded by size only.
        fs::write(partial.join("memory-ranges"), vec![7u8; CHECKSUM_MAX_BYTES as usize + 1]).unwrap();
        store.commit_snapshot(id, &info("h")).unwrap();
        store.snapshot_dir(id)
    }

    #[test]
    fn the_marker_records_sizes_and_checksums_of_the_small_files() {
        let (_tmp, store, m) = store_with_guest("web");
        committed(&store, m.id);
        let got = store.snapshot(m.id).unwrap().unwrap();
        assert_eq!(got.version, SNAPSHOT_VERSION);
        let names: Vec<&str> = got.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, vec!["config.json", "memory-ranges", "memory/ranges"], "every file but the marker, sorted");
        let ranges = &got.files[2];
        assert_eq!(ranges.bytes, 5);
        // sha256("state")
        assert_eq!(ranges.sha256.as_deref(), Some("4ba69735ca53765ed6a709edb56c6ea236b7193a3b29a6b390c346f0f4340e4e"));
        let memory = &got.files[1];
        assert_eq!((memory.bytes, memory.sha256.as_deref()), (CHECKSUM_MAX_BYTES + 1, None), "size only");
        assert_eq!(got.total_bytes(), 5 + 15 + CHECKSUM_MAX_BYTES + 1);
        store.verify_snapshot(m.id).unwrap();
    }

    #[test]
    fn a_damaged_snapshot_is_told_with_its_file_and_the_mismatch_and_kept() {
        type Spoil = fn(&Path);
        let damage: [(&str, Spoil); 4] = [
            ("its SHA-256 is", |dir| fs::write(dir.join("memory/ranges"), "stATe").unwrap()),
            ("it is 3 bytes, 5 were written", |dir| fs::write(dir.join("memory/ranges"), "sta").unwrap()),
            ("it is missing", |dir| fs::remove_file(dir.join("config.json")).unwrap()),
            ("were written", |dir| {
                let f = fs::OpenOptions::new().write(true).open(dir.join("memory-ranges")).unwrap();
                f.set_len(4096).unwrap();
            }),
        ];
        for (said, spoil) in damage {
            let (_tmp, store, m) = store_with_guest("web");
            let dir = committed(&store, m.id);
            spoil(&dir);
            let err = store.verify_snapshot(m.id).unwrap_err();
            assert!(matches!(err, StoreError::DamagedSnapshot { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.starts_with("the snapshot is damaged: "), "{text}");
            assert!(text.contains(said), "{text} lacks {said:?}");
            assert!(text.contains(&dir.display().to_string()), "names the file: {text}");
            assert!(store.snapshot(m.id).unwrap().is_some(), "still there for the user: {said}");
        }
    }

    #[test]
    fn a_version_1_marker_still_reads_and_has_nothing_to_check() {
        let (_tmp, store, m) = store_with_guest("web");
        let latest = store.snapshot_dir(m.id);
        fs::create_dir_all(&latest).unwrap();
        write_hypervisor_files(&latest, "x");
        let v1 = r#"{"version": 1, "hypervisor": "qemu", "hypervisor_version": "7.2.22",
            "config_hash": "h", "created_at": "2026-01-15T09:31:02.456Z", "memory_bytes": 0}"#;
        fs::write(latest.join(SNAPSHOT_MARKER), v1).unwrap();
        let got = store.snapshot(m.id).unwrap().expect("complete");
        assert_eq!((got.version, got.files.len()), (1, 0));
        store.verify_snapshot(m.id).unwrap();
    }

    #[test]
    fn abandoning_drops_only_the_snapshot_being_written() {
        let (_tmp, store, m) = store_with_guest("web");
        committed(&store, m.id);
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "half");
        store.abandon_snapshot(m.id).unwrap();
        assert!(!partial.exists());
        assert_eq!(snapshot_entries(&store, m.id), vec!["snapshot-latest"]);
        store.verify_snapshot(m.id).unwrap();
        store.abandon_snapshot(m.id).unwrap();
    }

    #[test]
    fn a_half_removed_snapshot_is_never_complete() {
        let (tmp, store, m) = store_with_guest("web");
        let partial = store.begin_snapshot(m.id).unwrap();
        write_hypervisor_files(&partial, "x");
        store.commit_snapshot(m.id, &info("h")).unwrap();
        // remove_snapshot's first step, then a crash before the deletion.
        let paths = store.guest_paths(m.id);
        fs::rename(&paths.snapshot_latest, paths.snapshot_trash()).unwrap();
        assert_eq!(store.snapshot(m.id).unwrap(), None);
        drop(store);

        let store = Store::open_and_recover(tmp.path()).unwrap();
        assert_eq!(store.snapshot(m.id).unwrap(), None);
        assert!(snapshot_entries(&store, m.id).is_empty());
    }
}
