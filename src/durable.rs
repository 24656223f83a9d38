//! Crash-safe filesystem primitives, the one copy every module builds on:
//! atomic file replacement (temp file beside the target, write, fsync,
//! rename, fsync the directory), publishing a file a tool wrote, directory
//! and tree fsync, the sweep of temp files a crash left, and removal that
//! never leaves a half-deleted tree under its real name.
//!
//! It is also where the data dir's modes come from: every file made here is
//! `0600` and every directory `0700`, asked for at creation
//! ([`private_file`], [`create_dir`]) rather than chmodded afterwards, so
//! there is no moment a snapshot's memory or a declared password is readable
//! by anyone else, and no umask can loosen it. Tools the daemon runs (mkfs,
//! the VMMs and their `exec:` writers) inherit [`UMASK`], set once at start
//! by [`set_umask`].
//!
//! Temp names carry their creator's identity (pid and start time,
//! [`process_token`]), so a sweep removes exactly what no live process is
//! writing: a killed process's leftovers go even while its pid lingers as a
//! zombie or has been reused, and a live `hypeman image pull` beside the
//! daemon keeps its own.
//!
//! A rename is only durable once the directory holding it is fsynced, and a
//! file's contents are only durable once the file is fsynced *before* the
//! rename; skipping either can leave an empty or missing file after a power
//! loss even though the rename "happened".
//!
//! This module sits at the bottom: it knows paths and bytes, nothing of
//! guests, images or hypervisors, and imports nothing from the crate. Its
//! errors carry the path; callers wrap them in their own error types.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

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

/// The mode of every file hypeman creates: its owner's alone. A snapshot
/// holds the guest's RAM, the config disk and metadata its environment.
pub const FILE_MODE: u32 = 0o600;

/// The mode of every directory hypeman creates, the data dir included.
pub const DIR_MODE: u32 = 0o700;

/// The process umask (see [`set_umask`]): what tools the daemon runs create
/// (mkfs output, a VMM's sockets and snapshot files) gets no group or other
/// bits either. A unix socket bound under it is `0700`; only the write bit
/// grants `connect`, and the owner's is all there is.
pub const UMASK: u32 = 0o077;

/// Sets the process umask to [`UMASK`], for every thread and every child
/// process from now on. Called once at start, before any thread is spawned.
pub fn set_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(UMASK));
}

/// Options that create a file with [`FILE_MODE`] whatever the umask (a
/// mode the umask can only narrow, never widen). Add the access flags.
pub fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Creates the directory `path` with [`DIR_MODE`]; its parent must exist.
pub fn create_dir(path: &Path) -> Result<(), DurableError> {
    DirBuilder::new()
        .mode(DIR_MODE)
        .create(path)
        .map_err(DurableError::io("create directory", path))
}

/// Creates `path` and its missing parents, each with [`DIR_MODE`]. Existing
/// ones are left as they are (see [`tighten_dir`]).
pub fn create_dir_all(path: &Path) -> Result<(), DurableError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(DurableError::io("create directory", path))
}

/// Creates the directory `path` with [`DIR_MODE`] unless it exists; whether
/// it was created (so the caller knows to fsync the parent).
pub fn ensure_dir(path: &Path) -> Result<bool, DurableError> {
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(DurableError::Io { op: "create directory", path: path.to_path_buf(), source }),
    }
}

/// Sets an existing directory that group or others can reach to
/// [`DIR_MODE`]; returns the mode it had, or `None` when it was private
/// already. For the data dir at start: one made by hand, by an older
/// hypeman or under a loose umask would otherwise expose everything in it.
pub fn tighten_dir(path: &Path) -> Result<Option<u32>, DurableError> {
    let mode = fs::metadata(path).map_err(DurableError::io("inspect", path))?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    restrict_dir(path, DIR_MODE, None)
}

/// Gives the existing directory `path` exactly `mode` (and the group
/// `group`, when given); returns the mode it had when that was looser than
/// `mode` (a bit `mode` lacks), `None` otherwise. A directory narrower than
/// `mode` is widened to it without a word: that is the setting asking.
pub fn restrict_dir(path: &Path, mode: u32, group: Option<u32>) -> Result<Option<u32>, DurableError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(DurableError::io("inspect", path))?;
    let old = meta.permissions().mode() & 0o7777;
    if let Some(gid) = group.filter(|g| *g != meta.gid()) {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(DurableError::io("change the group of", path))?;
    }
    if old != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(DurableError::io("restrict", path))?;
    }
    Ok((old & !mode & 0o777 != 0).then_some(old))
}

/// Suffix of every temp file [`temp_path`] names.
const TEMP_SUFFIX: &str = ".tmp";

/// Distinguishes concurrent temp files of the same target within a process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh temp name beside `target`: `.NAME.TOKEN.SEQ.tmp`, TOKEN being
/// [`process_token`]. Hidden, so no directory scan mistakes it for the real
/// file (a declaration, a guest), unique within and across processes, and
/// recognised by [`is_temp_file_name`] so [`sweep_dead_temp_files`] can
/// remove it once its creator is gone. A file or a directory may take the name.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    parent_of(target).join(format!(".{name}.{}.{seq}{TEMP_SUFFIX}", process_token()))
}

/// `(state letter, start time)` of process `pid`, fields 3 and 22 of
/// `/proc/<pid>/stat` (the start in clock ticks since boot), from one read.
/// `None` when there is no such process.
pub fn process_stat(pid: u32) -> Option<(String, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after the last ')' are unambiguous: field 3 onwards.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.to_string();
    let start = rest.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// This process as temp names record it: `PID-START`, the start time from
/// [`process_stat`]. The pid alone would not do: a killed daemon's pid can
/// linger as a zombie or be reused, and its leftovers would never be swept.
pub fn process_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let pid = std::process::id();
        // Without /proc (never on Linux) the start reads as 0, which no
        // live process has: the leftovers are then swept, never kept.
        let start = process_stat(pid).map_or(0, |(_, start)| start);
        format!("{pid}-{start}")
    })
}

/// Whether `token` (from [`process_token`]) names a process that is alive
/// now: same pid, same start time, and not a zombie (a zombie has exited
/// and only waits to be reaped; it writes nothing). Anything that does not
/// parse as a token, such as an older release's bare pid, is no one's.
pub fn token_is_live(token: &str) -> bool {
    let Some((pid, start)) = token.split_once('-') else { return false };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
    match process_stat(pid) {
        Some((state, now)) => now == start && state != "Z" && state != "X",
        None => false,
    }
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
        let mut file = private_file()
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

/// Whether the process that named the temp entry `name` is alive: the
/// token between the last two dots before `.tmp` (see [`temp_path`]).
fn temp_creator_is_live(name: &str) -> bool {
    let stem = name.strip_suffix(TEMP_SUFFIX).unwrap_or(name);
    let mut parts = stem.rsplitn(3, '.');
    let (_seq, token) = (parts.next(), parts.next());
    token.is_some_and(token_is_live)
}

/// Removes every temp file and directory in `dir` (not recursive). Only
/// for a directory no other process writes into, such as a guest's while
/// the daemon holds the data dir's lock: a live writer's temp file looks
/// exactly like a crash's.
pub fn sweep_temp_files(dir: &Path) -> Result<(), DurableError> {
    sweep(dir, |_| false)
}

/// Removes the temp files and directories in `dir` (not recursive) whose
/// creator is gone: killed mid-write, a zombie, or its pid reused. A live
/// process's are kept, so this is safe where a CLI may write beside the
/// daemon (the image cache).
pub fn sweep_dead_temp_files(dir: &Path) -> Result<(), DurableError> {
    sweep(dir, temp_creator_is_live)
}

/// Removes the temp entries of `dir` that `keep` does not claim.
fn sweep(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<(), DurableError> {
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
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_temp_file_name(&name) || keep(&name) {
            continue;
        }
        let path = entry.path();
        tracing::debug!(path = %path.display(), "removing a temp entry its dead creator left");
        match entry.file_type() {
            Ok(t) if t.is_dir() => remove_dir_all_if_exists(&path)?,
            Ok(t) if t.is_file() => remove_file_if_exists(&path)?,
            // Nothing of ours is a socket, fifo or symlink with a temp name.
            _ => {}
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


/// Hex SHA-256 of a file's contents (snapshot markers, image root disks).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
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

    /// A child that has exited and is not reaped yet, as a killed daemon
    /// whose parent has not waited for it; reaped when dropped.
    struct Zombie(std::process::Child);

    impl Zombie {
        fn new() -> Zombie {
            let child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            let t0 = std::time::Instant::now();
            while process_stat(pid).map(|(state, _)| state).as_deref() != Some("Z") {
                assert!(t0.elapsed() < std::time::Duration::from_secs(10), "`true` never became a zombie");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Zombie(child)
        }

        fn token(&self) -> String {
            let pid = self.0.id();
            format!("{pid}-{}", process_stat(pid).unwrap().1)
        }
    }

    impl Drop for Zombie {
        fn drop(&mut self) {
            let _ = self.0.wait();
        }
    }

    #[test]
    fn tokens_name_live_processes_only() {
        let me = std::process::id();
        let start = process_stat(me).unwrap().1;
        assert_eq!(process_token(), format!("{me}-{start}"));
        assert!(token_is_live(process_token()));
        assert!(!token_is_live(&format!("{me}-{}", start + 1)), "the pid reused by another process");
        let zombie = Zombie::new();
        assert!(!token_is_live(&zombie.token()), "a zombie writes nothing");
        for junk in ["", "1234", "x-1", "1-x", &format!("{me}")] {
            assert!(!token_is_live(junk), "{junk:?}");
        }
    }

    #[test]
    fn the_sweep_keeps_what_live_processes_write_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let start = process_stat(me).unwrap().1;
        let zombie = Zombie::new();
        let live_file = temp_path(&dir.path().join("metadata.json"));
        fs::write(&live_file, b"x").unwrap();
        let live_dir = temp_path(&dir.path().join("config.erofs"));
        create_dir(&live_dir).unwrap();
        let stale = [
            format!(".metadata.json.{me}-{}.0.tmp", start + 1),
            format!(".metadata.json.{}.3.tmp", zombie.token()),
            // The previous release's name: a bare pid, even a live one.
            format!(".metadata.json.{me}.0.tmp"),
            format!(".config.erofs.{}.1.tmp", zombie.token()),
        ];
        for (i, name) in stale.iter().enumerate() {
            if i == 3 {
                create_dir(&dir.path().join(name)).unwrap();
                fs::write(dir.path().join(name).join("config.json"), b"{}").unwrap();
            } else {
                fs::write(dir.path().join(name), b"x").unwrap();
            }
        }
        fs::write(dir.path().join("metadata.json"), b"{}").unwrap();
        sweep_dead_temp_files(dir.path()).unwrap();
        let mut kept = vec![
            std::ffi::OsString::from("metadata.json"),
            live_file.file_name().unwrap().to_owned(),
            live_dir.file_name().unwrap().to_owned(),
        ];
        kept.sort();
        assert_eq!(names(dir.path()), kept);
        sweep_temp_files(dir.path()).unwrap();
        assert_eq!(names(dir.path()), ["metadata.json"], "the lock holder's sweep takes every temp entry");
    }

    #[test]
    fn what_is_created_here_is_private_whatever_the_umask() {
        use nix::sys::stat::{umask, Mode};
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // Other tests of this process may create files meanwhile; the
        // loosest umask only makes what they create looser.
        let old = umask(Mode::empty());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        private_file().write(true).create_new(true).open(&file).unwrap();
        let written = dir.path().join("metadata.json");
        write_atomic(&written, b"{}").unwrap();
        let one = dir.path().join("one");
        create_dir(&one).unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        let ensured = dir.path().join("e");
        assert!(ensure_dir(&ensured).unwrap());
        assert!(!ensure_dir(&ensured).unwrap(), "an existing directory is left as it is");
        umask(old);
        assert_eq!((mode(&file), mode(&written)), (0o600, 0o600));
        for d in [&one, &dir.path().join("a"), &dir.path().join("a/b"), &deep, &ensured] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
    }

    #[test]
    fn a_loose_directory_is_tightened_and_a_private_one_left_alone() {
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(tighten_dir(&data).unwrap(), Some(0o777));
        assert_eq!(mode(&data), 0o700);
        assert_eq!(tighten_dir(&data).unwrap(), None);
        fs::set_permissions(&data, fs::Permissions::from_mode(0o500)).unwrap();
        assert_eq!(tighten_dir(&data).unwrap(), None, "stricter than 0700 is the owner's choice");
        assert_eq!(mode(&data), 0o500);
        let err = tighten_dir(&dir.path().join("gone")).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }

    /// A data dir shared with VMM users: exactly the mode and group asked
    /// for, a looser one reported, a narrower one widened silently.
    #[test]
    fn a_directory_is_given_exactly_its_mode_and_group() {
        use std::os::unix::fs::MetadataExt;
        let meta = |p: &Path| fs::metadata(p).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        let group = nix::unistd::getegid().as_raw();
        assert_eq!(restrict_dir(&data, 0o710, Some(group)).unwrap(), Some(0o755), "others could enter");
        assert_eq!((meta(&data).mode() & 0o7777, meta(&data).gid()), (0o710, group));
        assert_eq!(restrict_dir(&data, 0o710, Some(group)).unwrap(), None);
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(restrict_dir(&data, 0o710, None).unwrap(), None, "narrower: widened, nothing to warn of");
        assert_eq!(meta(&data).mode() & 0o7777, 0o710);
    }
}
