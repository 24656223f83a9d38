//! Crash-safe filesystem primitives, the one copy every module builds on:
//! atomic file replacement (temp file beside the target, write, fsync,
//! rename, fsync the directory), publishing a file a tool wrote, directory
//! and tree fsync, the sweep of temp files a crash left, and removal that
//! never leaves a half-deleted tree under its real name.
//!
//! A rename is only durable once the directory holding it is fsynced, and a
//! file's contents are only durable once the file is fsynced *before* the
//! rename; skipping either can leave an empty or missing file after a power
//! loss even though the rename "happened".
//!
//! This module sits at the bottom: it knows paths and bytes, nothing of
//! guests, images or hypervisors, and imports nothing from the crate. Its
//! errors carry the path; callers wrap them in their own error types.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What went wrong, and on which path. The cause is the `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DurableError {
    /// `map_err` adapter naming the operation and the path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> DurableError {
        let path = path.into();
        move |source| DurableError::Io { op, path, source }
    }
}

/// Suffix of every temp file [`temp_path`] names.
const TEMP_SUFFIX: &str = ".tmp";

/// Distinguishes concurrent temp files of the same target within a process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh temp name beside `target`: `.NAME.PID.SEQ.tmp`. Hidden, so no
/// directory scan mistakes it for the real file (a declaration, a guest),
/// unique within and across processes, and recognised by
/// [`is_temp_file_name`] so [`sweep_temp_files`] can remove it after a crash.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    parent_of(target).join(format!(".{name}.{}.{seq}{TEMP_SUFFIX}", std::process::id()))
}

/// A fully written, fsynced temp file that has not yet replaced its target.
/// Dropping it without [`Staged::commit`] is exactly what a crash between
/// write and rename leaves behind: the target is untouched and the temp
/// file is a stray that [`sweep_temp_files`] removes.
#[derive(Debug)]
pub struct Staged {
    temp: PathBuf,
    target: PathBuf,
}

impl Staged {
    /// Renames the temp file over the target and makes the rename durable.
    pub fn commit(self) -> Result<(), DurableError> {
        if let Err(e) = rename(&self.temp, &self.target) {
            // Best effort: a leftover is harmless and swept later.
            let _ = fs::remove_file(&self.temp);
            return Err(e);
        }
        fsync_dir(parent_of(&self.target))
    }

    /// Where the new contents wait for [`Staged::commit`].
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }
}

/// Writes a new temp file beside `target` through `write` and fsyncs it.
/// `write` gets the open file and its path (for its own error messages).
/// On any failure the temp file is removed and the target is untouched.
pub fn stage_with<E: From<DurableError>>(
    target: &Path,
    write: impl FnOnce(&mut File, &Path) -> Result<(), E>,
) -> Result<Staged, E> {
    let temp = temp_path(target);
    let result = (|| -> Result<(), E> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(DurableError::io("write", &temp))?;
        write(&mut file, &temp)?;
        file.sync_all().map_err(DurableError::io("write", &temp))?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Staged {
            temp,
            target: target.to_path_buf(),
        }),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Writes `bytes` to a new temp file beside `target` and fsyncs it.
pub fn stage(target: &Path, bytes: &[u8]) -> Result<Staged, DurableError> {
    stage_with(target, |file, temp| {
        file.write_all(bytes).map_err(DurableError::io("write", temp))
    })
}

/// Replaces `target` with `bytes` so that a reader (or a crash) sees either
/// the old contents or the new, never a mix or an empty file.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    stage(target, bytes)?.commit()
}

/// Publishes `written`, a file something else filled (`mkfs`, say), as
/// `target`: fsyncs it, renames it over `target` and fsyncs the directory.
/// On failure `written` is removed.
pub fn publish(written: &Path, target: &Path) -> Result<(), DurableError> {
    let synced = fsync_file(written);
    if let Err(e) = synced {
        let _ = fs::remove_file(written);
        return Err(e);
    }
    Staged {
        temp: written.to_path_buf(),
        target: target.to_path_buf(),
    }
    .commit()
}

/// Whether a directory entry name is one of [`temp_path`]'s temp files.
pub fn is_temp_file_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// Removes temp files that a crash left in `dir` (not recursive). Only for
/// a directory no other process is writing into at the same time: a live
/// writer's temp file looks exactly like a crash's.
pub fn sweep_temp_files(dir: &Path) -> Result<(), DurableError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DurableError::Io {
                op: "list",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(DurableError::io("list", dir))?;
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

/// Makes the entries of `dir` (creations, renames, removals) durable. A
/// directory is opened and synced as a file is.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    fsync_file(dir)
}

/// Makes the contents of the file at `path` durable.
pub fn fsync_file(path: &Path) -> Result<(), DurableError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(DurableError::io("sync", path))
}

/// Fsyncs every file and directory under `root`, children before parents,
/// so that a later rename of `root` publishes contents that are on disk.
/// Hypervisors write snapshot files without fsyncing them.
pub fn fsync_tree(root: &Path) -> Result<(), DurableError> {
    let entries = fs::read_dir(root).map_err(DurableError::io("list", root))?;
    for entry in entries {
        let entry = entry.map_err(DurableError::io("list", root))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(DurableError::io("inspect", &path))?;
        if kind.is_dir() {
            fsync_tree(&path)?;
        } else if kind.is_file() {
            fsync_file(&path)?;
        }
        // Sockets, fifos and symlinks carry no data of their own.
    }
    fsync_dir(root)
}

pub fn rename(from: &Path, to: &Path) -> Result<(), DurableError> {
    fs::rename(from, to).map_err(|source| DurableError::Rename {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}

pub fn create_dir(path: &Path) -> Result<(), DurableError> {
    fs::create_dir(path).map_err(DurableError::io("create directory", path))
}

pub fn remove_file_if_exists(path: &Path) -> Result<(), DurableError> {
    removed(fs::remove_file(path), path)
}

pub fn remove_dir_all_if_exists(path: &Path) -> Result<(), DurableError> {
    removed(fs::remove_dir_all(path), path)
}

/// A removal's outcome, where "already gone" is success.
fn removed(result: io::Result<()>, path: &Path) -> Result<(), DurableError> {
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DurableError::Io {
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
pub fn discard_dir(dir: &Path, trash: &Path) -> Result<(), DurableError> {
    remove_dir_all_if_exists(trash)?;
    match fs::rename(dir, trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DurableError::Rename {
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

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_replaces_contents_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.json");
        write_atomic(&target, b"one").unwrap();
        write_atomic(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(names(dir.path()), vec![std::ffi::OsString::from("f.json")]);
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

    #[test]
    fn a_failed_write_leaves_neither_temp_nor_target() {
        #[derive(Debug, PartialEq)]
        enum Failed {
            Writer,
            Durable,
        }
        impl From<DurableError> for Failed {
            fn from(_: DurableError) -> Failed {
                Failed::Durable
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("initrd.cpio");
        let err = stage_with(&target, |file, _| {
            file.write_all(b"half").map_err(|_| Failed::Durable)?;
            Err(Failed::Writer)
        })
        .unwrap_err();
        assert_eq!(err, Failed::Writer, "the writer's own error comes back");
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn temp_names_are_hidden_unique_and_swept() {
        let target = Path::new("/d/web.toml");
        let (a, b) = (temp_path(target), temp_path(target));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/d")));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".web.toml."), "{name}");
        assert!(is_temp_file_name(name), "{name}");
        assert!(!is_temp_file_name("web.toml.tmp"), "visible names are never swept");
        assert_eq!(temp_path(Path::new("f")).parent(), Some(Path::new(".")));
    }

    #[test]
    fn publish_moves_a_written_file_into_place_and_cleans_up_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("overlay.raw");
        let written = temp_path(&target);
        fs::write(&written, b"formatted").unwrap();
        publish(&written, &target).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"formatted");
        assert_eq!(names(dir.path()), vec![std::ffi::OsString::from("overlay.raw")]);

        // Into a directory that does not exist: the rename fails, and the
        // written file does not linger.
        let written = temp_path(&target);
        fs::write(&written, b"x").unwrap();
        let err = publish(&written, &dir.path().join("gone/overlay.raw")).unwrap_err();
        assert!(matches!(err, DurableError::Rename { .. }), "{err}");
        assert!(!written.exists());
        assert!(matches!(publish(&written, &target), Err(DurableError::Io { op: "sync", .. })));
    }

    #[test]
    fn fsync_tree_reaches_nested_files_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/memory"), b"m").unwrap();
        fs::write(dir.path().join("launch.json"), b"{}").unwrap();
        fsync_tree(dir.path()).unwrap();
        let gone = dir.path().join("gone");
        let err = fsync_tree(&gone).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot list {}", gone.display()));
    }
}
