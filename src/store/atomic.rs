//! Crash-safe filesystem primitives: atomic file replacement, directory
//! fsync, and removal that never leaves a half-deleted tree under its real
//! name. Everything else in the store is built from these.
//!
//! A rename is only durable once the directory holding it is fsynced, and a
//! file's contents are only durable once the file is fsynced *before* the
//! rename; skipping either can leave an empty or missing file after a power
//! loss even though the rename "happened".

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::StoreError;

/// Suffix of every temporary file written by [`write_atomic`].
const TEMP_SUFFIX: &str = ".tmp";

/// Distinguishes concurrent temp files of the same target within a process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fully written, fsynced temporary file that has not yet replaced its
/// target. Dropping it without [`Staged::commit`] is exactly what a crash
/// between write and rename leaves behind: the target is untouched and the
/// temp file is a stray that `Store::open_and_recover` sweeps away.
#[derive(Debug)]
pub(crate) struct Staged {
    temp: PathBuf,
    target: PathBuf,
}

impl Staged {
    /// Renames the temp file over the target and makes the rename durable.
    pub(crate) fn commit(self) -> Result<(), StoreError> {
        if let Err(e) = rename(&self.temp, &self.target) {
            // Best effort: a leftover is harmless and swept on open.
            let _ = fs::remove_file(&self.temp);
            return Err(e);
        }
        fsync_dir(parent_of(&self.target))
    }

    #[cfg(test)]
    pub(crate) fn temp_path(&self) -> &Path {
        &self.temp
    }
}

/// Writes `bytes` to a new temp file beside `target` and fsyncs it.
pub(crate) fn stage(target: &Path, bytes: &[u8]) -> Result<Staged, StoreError> {
    let dir = parent_of(target);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".{name}.{}.{seq}{TEMP_SUFFIX}", std::process::id()));

    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(Staged {
            temp,
            target: target.to_path_buf(),
        }),
        Err(source) => {
            let _ = fs::remove_file(&temp);
            Err(StoreError::Io {
                op: "write",
                path: temp,
                source,
            })
        }
    }
}

/// Replaces `target` with `bytes` so that a reader (or a crash) sees either
/// the old contents or the new, never a mix or an empty file.
pub(crate) fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    stage(target, bytes)?.commit()
}

/// Whether a directory entry name is one of [`stage`]'s temp files.
pub(crate) fn is_temp_file_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// Removes temp files that a crash left in `dir` (not recursive).
pub(crate) fn sweep_temp_files(dir: &Path) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                op: "list",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        let name = entry.file_name();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && is_temp_file_name(&name.to_string_lossy()) {
            let path = entry.path();
            tracing::debug!(path = %path.display(), "removing temp file left by a crash");
            remove_file_if_exists(&path)?;
        }
    }
    Ok(())
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync", dir))
}

/// Fsyncs every file and directory under `root`, children before parents,
/// so that a later rename of `root` publishes contents that are on disk.
/// Hypervisors write snapshot files without fsyncing them.
pub(crate) fn fsync_tree(root: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(root).map_err(StoreError::io("list", root))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", root))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(StoreError::io("inspect", &path))?;
        if kind.is_dir() {
            fsync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(StoreError::io("sync", &path))?;
        }
        // Sockets, fifos and symlinks carry no data of their own.
    }
    fsync_dir(root)
}

pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(|source| StoreError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

pub(crate) fn create_dir(path: &Path) -> Result<(), StoreError> {
    fs::create_dir(path).map_err(StoreError::io("create directory", path))
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

pub(crate) fn remove_dir_all_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes the directory `dir` by first renaming it to `trash` (a name
/// nobody reads as live data) and only then deleting it, so a crash
/// mid-deletion never leaves a partly deleted tree under its real name.
/// A missing `dir` is success. Any older `trash` is removed first.
pub(crate) fn discard_dir(dir: &Path, trash: &Path) -> Result<(), StoreError> {
    remove_dir_all_if_exists(trash)?;
    match fs::rename(dir, trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Rename {
                from: dir.to_path_buf(),
                to: trash.to_path_buf(),
                source,
            })
        }
    }
    fsync_dir(parent_of(dir))?;
    remove_dir_all_if_exists(trash)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_contents_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.json");
        write_atomic(&target, b"one").unwrap();
        write_atomic(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }

    #[test]
    fn staged_but_not_committed_leaves_target_intact_and_sweep_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.json");
        write_atomic(&target, b"old").unwrap();

        // The crash: the new contents are on disk under the temp name only.
        let staged = stage(&target, b"new").unwrap();
        let temp = staged.temp_path().to_path_buf();
        drop(staged);

        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read(&temp).unwrap(), b"new");
        sweep_temp_files(dir.path()).unwrap();
        assert!(!temp.exists());
        assert_eq!(fs::read(&target).unwrap(), b"old");
    }

    #[test]
    fn discard_dir_is_idempotent_and_replaces_old_trash() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let trash = dir.path().join(".trash");
        fs::create_dir_all(live.join("sub")).unwrap();
        fs::write(live.join("sub/file"), b"x").unwrap();
        fs::create_dir_all(&trash).unwrap();
        fs::write(trash.join("older"), b"y").unwrap();

        discard_dir(&live, &trash).unwrap();
        assert!(!live.exists());
        assert!(!trash.exists());
        discard_dir(&live, &trash).unwrap();
    }
}
