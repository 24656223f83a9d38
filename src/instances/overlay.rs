//! The guest's writable overlay disk (`overlay.raw`, a sparse file holding
//! one ext4 filesystem): made once, grown when the declaration asks for
//! more, never shrunk and never recreated while it exists, since it is the
//! app's data.
//!
//! What a declared size means for the overlay there is, is [`resize`], a
//! pure decision the planner shares: larger grows it (at the next create,
//! while no VMM runs), smaller is refused (ext4 cannot shrink while in use
//! and an offline shrink can lose data, so the guest keeps what it has).
//! The rest is IO: [`ensure`] makes or grows the file.
//!
//! Why the filesystem is grown on the host (`e2fsck -f -p`, then
//! `resize2fs` on the file) rather than by hypeman-init at mount (an online
//! `EXT4_IOC_RESIZE_FS`): the grow then happens once, at the edge that
//! already formats the disk with e2fsprogs, before any VMM can see the
//! disk, and a failure is reported by the step that caused it, naming the
//! file, instead of surfacing as a guest that booted smaller than
//! declared. The guest's init and the config-disk contract stay as they
//! are. The price: e2fsprogs reads a filesystem the guest wrote, which is
//! done only on a grow (an edit by the operator), never on an ordinary
//! boot, and `-p` lets e2fsck fix only what needs no judgement.
//!
//! Safe to re-run after a kill at any point: a grow writes a marker
//! (`overlay.grow`) before it extends the file and removes it only once
//! `resize2fs` is done. A marker found at the next attempt means the
//! filesystem may lag behind its file, so the check and the resize run
//! again (`resize2fs` of a filesystem that already fills its file changes
//! nothing), and then the declared size is looked at afresh. The daemon
//! may also die while e2fsck or resize2fs runs, and the tool with it does
//! not: the grow holds an exclusive `flock` on the overlay that the tools
//! inherit, so a next attempt that finds the lock taken fails (and is
//! retried later) rather than run a second tool on the same filesystem.

use crate::config_file::ByteSize;
use crate::durable::{self, DurableError};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a declared overlay size asks of an overlay of the current size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// The same size.
    Keep,
    /// Larger: the file and its filesystem grow, at the next create.
    Grow { from: u64, to: u64 },
    /// Smaller: refused; the overlay keeps its size and its data.
    Shrink { have: u64, declared: u64 },
}

/// What `declared` bytes ask of an overlay of `current` bytes.
pub fn resize(current: u64, declared: u64) -> Resize {
    match declared.cmp(&current) {
        std::cmp::Ordering::Equal => Resize::Keep,
        std::cmp::Ordering::Greater => Resize::Grow { from: current, to: declared },
        std::cmp::Ordering::Less => Resize::Shrink { have: current, declared },
    }
}

/// Why a smaller `overlay_size` is not applied, and what to do instead:
/// the line `status` and `hypeman.log` show while it is declared.
pub fn shrink_refused(have: u64, declared: u64) -> String {
    let have = ByteSize(have);
    format!(
        "overlay_size cannot shrink (the overlay is {have}, declared {}); keeping {have}: \
         delete the instance to start over with a smaller one",
        ByteSize(declared)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {tool} (e2fsprogs) on {}", path.display())]
    Spawn {
        tool: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed on {} ({status}): {output}", path.display())]
    Tool { tool: &'static str, path: PathBuf, status: std::process::ExitStatus, output: String },
    #[error("{} is busy: an e2fsck or resize2fs of an earlier attempt still runs on it", path.display())]
    Busy { path: PathBuf },
    #[error(transparent)]
    Durable(#[from] DurableError),
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// There was none: a fresh, empty overlay of the declared size.
    Made,
    /// Left as it was (the declared size, or a smaller one, refused).
    Kept,
    /// Grown, with its filesystem, from `from` bytes to `to`.
    Grown { from: u64, to: u64 },
    /// A grow that was interrupted was completed: the filesystem fills its
    /// file of `size` bytes again (a smaller size declared since is left
    /// to the planner to refuse).
    Completed { size: u64 },
}

/// The marker of a grow in progress, beside the overlay.
pub fn grow_marker(overlay: &Path) -> PathBuf {
    overlay.with_file_name("overlay.grow")
}

/// Makes the overlay at `path` with `declared` bytes, or grows the one
/// there to `declared` bytes; a smaller declaration leaves it as it is.
/// Only while no VMM has the disk open.
pub fn ensure(path: &Path, declared: u64) -> Result<Ensured, OverlayError> {
    let marker = grow_marker(path);
    if !path.exists() {
        make(path, declared)?;
        // A marker without its overlay speaks of nothing.
        durable::remove_file_if_exists(&marker)?;
        return Ok(Ensured::Made);
    }
    let lock = lock(path)?;
    let resumed = marker.exists();
    if resumed {
        fit_filesystem(path, &lock)?;
        finish(&marker)?;
    }
    match resize(len(path)?, declared) {
        Resize::Keep | Resize::Shrink { .. } if resumed => Ok(Ensured::Completed { size: len(path)? }),
        Resize::Keep | Resize::Shrink { .. } => Ok(Ensured::Kept),
        Resize::Grow { from, to } => {
            // Checked before anything changes: resize2fs wants a
            // filesystem checked since it was last mounted.
            check(path, &lock)?;
            durable::write_atomic(&marker, format!("growing {} to {to} bytes\n", path.display()).as_bytes())?;
            extend(path, to)?;
            fill(path, &lock)?;
            finish(&marker)?;
            Ok(Ensured::Grown { from, to })
        }
    }
}

/// A fresh sparse ext4 overlay, formatted under a temp name and renamed
/// into place, so a crash never leaves a half-made disk under its name.
fn make(path: &Path, size: u64) -> Result<(), OverlayError> {
    let tmp = durable::temp_path(path);
    // Made here, 0600, for mkfs.ext4 to format in place.
    let made = durable::private_file()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| f.set_len(size))
        .map_err(|source| OverlayError::Io { op: "create", path: tmp.clone(), source })
        .and_then(|()| {
            tool(
                "mkfs.ext4",
                Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]),
                &tmp,
                None,
            )
        });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    durable::publish(&tmp, path)?;
    Ok(())
}

fn len(path: &Path) -> Result<u64, OverlayError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|source| OverlayError::Io { op: "read the size of", path: path.to_path_buf(), source })
}

/// Extends the file, sparsely, and makes its new length durable.
fn extend(path: &Path, to: u64) -> Result<(), OverlayError> {
    let io = |op| move |source| OverlayError::Io { op, path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io("open"))?;
    file.set_len(to).map_err(io("extend"))?;
    file.sync_all().map_err(io("sync"))
}

/// The overlay, locked for this attempt (see the module doc); the lock
/// goes with the returned file and with the last tool that inherited it.
fn lock(path: &Path) -> Result<Flock<std::fs::File>, OverlayError> {
    let file = std::fs::File::open(path).map_err(|source| OverlayError::Io { op: "open", path: path.to_path_buf(), source })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(OverlayError::Busy { path: path.to_path_buf() }),
        Err((_, errno)) => Err(OverlayError::Io { op: "lock", path: path.to_path_buf(), source: errno.into() }),
    }
}

/// `e2fsck -f -p`: replays the journal of a guest that was killed, fixes
/// what is safe to fix, and refuses the rest.
fn check(path: &Path, lock: &Flock<std::fs::File>) -> Result<(), OverlayError> {
    tool("e2fsck", Command::new("e2fsck").args(["-f", "-p"]), path, Some(lock))
}

/// The check, then the resize: after an interrupted grow, nothing is
/// known of the filesystem's state.
fn fit_filesystem(path: &Path, lock: &Flock<std::fs::File>) -> Result<(), OverlayError> {
    check(path, lock)?;
    fill(path, lock)
}

/// `resize2fs` to the file's size, on a filesystem just checked. Of one
/// that fills its file already, it changes nothing.
fn fill(path: &Path, lock: &Flock<std::fs::File>) -> Result<(), OverlayError> {
    tool("resize2fs", &mut Command::new("resize2fs"), path, Some(lock))
}

/// The grow is complete: its marker goes, durably.
fn finish(marker: &Path) -> Result<(), OverlayError> {
    durable::remove_file_if_exists(marker)?;
    if let Some(dir) = marker.parent() {
        durable::fsync_dir(dir)?;
    }
    Ok(())
}

/// Runs `cmd` on `path`, handing it `lock`'s descriptor (only this child:
/// every other stays closed on exec). e2fsck's exit statuses 1 and 2 mean
/// it corrected errors, which is a success here; everything else fails
/// with its output.
fn tool(name: &'static str, cmd: &mut Command, path: &Path, lock: Option<&Flock<std::fs::File>>) -> Result<(), OverlayError> {
    if let Some(lock) = lock {
        inheriting(cmd, lock);
    }
    let out = cmd
        .arg(path)
        .output()
        .map_err(|source| OverlayError::Spawn { tool: name, path: path.to_path_buf(), source })?;
    let corrected = name == "e2fsck" && matches!(out.status.code(), Some(1 | 2));
    if out.status.success() || corrected {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if output.is_empty() {
        output = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(OverlayError::Tool { tool: name, path: path.to_path_buf(), status: out.status, output })
}

/// Makes the child of `cmd` inherit `lock`'s descriptor, and so the lock.
fn inheriting<'a>(cmd: &'a mut Command, lock: &Flock<std::fs::File>) -> &'a mut Command {
    let fd = lock.as_raw_fd();
    // SAFETY: fcntl is async-signal-safe; the closure touches only the
    // descriptor number, which the caller keeps open until the child has
    // exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn e2fsprogs() -> bool {
        crate::test_gate::tools(&["mkfs.ext4", "e2fsck", "resize2fs", "debugfs", "dumpe2fs"])
    }

    /// The filesystem's size in bytes, as its superblock says.
    fn fs_bytes(path: &Path) -> u64 {
        let out = Command::new("dumpe2fs").arg("-h").arg(path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        field("Block count:") * field("Block size:")
    }

    /// Writes `content` as `/name` into the filesystem, as the guest would.
    fn put(path: &Path, name: &str, content: &[u8]) {
        let src = path.with_file_name(format!("{name}.src"));
        std::fs::write(&src, content).unwrap();
        let out = Command::new("debugfs").arg("-w").arg("-R").arg(format!("write {} {name}", src.display())).arg(path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn get(path: &Path, name: &str) -> Vec<u8> {
        let out = Command::new("debugfs").arg("-R").arg(format!("cat /{name}")).arg(path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    fn fsck_clean(path: &Path) {
        let out = Command::new("e2fsck").args(["-f", "-n"]).arg(path).output().unwrap();
        assert!(out.status.success(), "not clean: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn a_declared_size_is_kept_grown_or_refused() {
        assert_eq!(resize(64 * MIB, 64 * MIB), Resize::Keep);
        assert_eq!(resize(64 * MIB, 128 * MIB), Resize::Grow { from: 64 * MIB, to: 128 * MIB });
        assert_eq!(resize(1 << 30, 512 * MIB), Resize::Shrink { have: 1 << 30, declared: 512 * MIB });
        assert_eq!(
            shrink_refused(1 << 30, 512 * MIB),
            "overlay_size cannot shrink (the overlay is 1GiB, declared 512MiB); keeping 1GiB: \
             delete the instance to start over with a smaller one"
        );
    }

    #[test]
    fn an_overlay_is_made_once_and_never_recreated() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        assert_eq!(ensure(&p, 64 * MIB).unwrap(), Ensured::Made);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        // Sparse: far less allocated than its size.
        assert!(meta.blocks() * 512 < 32 * MIB, "allocated {}", meta.blocks() * 512);
        put(&p, "data", b"guest data");
        assert_eq!(ensure(&p, 64 * MIB).unwrap(), Ensured::Kept);
        assert_eq!(get(&p, "data"), b"guest data");
    }

    #[test]
    fn a_larger_size_grows_the_file_and_its_filesystem_and_keeps_the_data() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        ensure(&p, 64 * MIB).unwrap();
        put(&p, "data", b"written before the grow");
        let before = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert_eq!(ensure(&p, 256 * MIB).unwrap(), Ensured::Grown { from: 64 * MIB, to: 256 * MIB });
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 256 * MIB);
        assert_eq!(fs_bytes(&p), 256 * MIB, "the filesystem fills the file");
        assert_eq!(get(&p, "data"), b"written before the grow");
        fsck_clean(&p);
        let after = meta.blocks() * 512;
        eprintln!("allocated: {} KiB before, {} KiB after growing 64 → 256 MiB", before / 1024, after / 1024);
        assert!(after < 64 * MIB, "still sparse: {after} bytes allocated");
        assert!(!grow_marker(&p).exists(), "no grow left pending");
        // Again: nothing to do.
        assert_eq!(ensure(&p, 256 * MIB).unwrap(), Ensured::Kept);
    }

    #[test]
    fn a_smaller_size_changes_nothing() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        ensure(&p, 128 * MIB).unwrap();
        put(&p, "data", b"kept");
        let image = std::fs::read(&p).unwrap();
        assert_eq!(ensure(&p, 64 * MIB).unwrap(), Ensured::Kept);
        assert_eq!(std::fs::read(&p).unwrap(), image, "not a byte changed");
    }

    /// A daemon killed between extending the file and `resize2fs` (the
    /// marker is there, the file is long, the filesystem is not): the next
    /// attempt completes the grow, whatever the declaration says by then.
    #[test]
    fn a_grow_killed_before_resize2fs_is_completed_by_the_next_attempt() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        ensure(&p, 64 * MIB).unwrap();
        put(&p, "data", b"survives");
        std::fs::write(grow_marker(&p), b"growing\n").unwrap();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(192 * MIB).unwrap();
        assert_eq!(fs_bytes(&p), 64 * MIB, "the kill left the filesystem behind its file");
        assert_eq!(ensure(&p, 192 * MIB).unwrap(), Ensured::Completed { size: 192 * MIB });
        assert_eq!(fs_bytes(&p), 192 * MIB);
        assert_eq!(get(&p, "data"), b"survives");
        assert!(!grow_marker(&p).exists());
        fsck_clean(&p);

        // Killed the same way, with a smaller size declared meanwhile: the
        // file is not cut back, its filesystem still catches up with it.
        std::fs::write(grow_marker(&p), b"growing\n").unwrap();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(256 * MIB).unwrap();
        assert_eq!(ensure(&p, 64 * MIB).unwrap(), Ensured::Completed { size: 256 * MIB });
        assert_eq!((std::fs::metadata(&p).unwrap().len(), fs_bytes(&p)), (256 * MIB, 256 * MIB));
        assert_eq!(get(&p, "data"), b"survives");
    }

    /// Killed after the marker was written but before the file was
    /// extended: the next attempt finds nothing to fit, and grows.
    #[test]
    fn a_grow_killed_before_the_file_was_extended_grows_at_the_next_attempt() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        ensure(&p, 64 * MIB).unwrap();
        std::fs::write(grow_marker(&p), b"growing\n").unwrap();
        assert_eq!(ensure(&p, 128 * MIB).unwrap(), Ensured::Grown { from: 64 * MIB, to: 128 * MIB });
        assert_eq!(fs_bytes(&p), 128 * MIB);
        assert!(!grow_marker(&p).exists());
    }

    /// A tool of an attempt whose daemon was killed may still run, holding
    /// the lock it inherited: the next attempt leaves the file alone, and
    /// goes ahead once the tool is gone.
    #[test]
    fn an_overlay_a_tool_still_holds_is_not_touched() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        ensure(&p, 64 * MIB).unwrap();
        let held = lock(&p).unwrap();
        let mut orphan = inheriting(Command::new("sleep").arg("30"), &held).spawn().unwrap();
        // The daemon that took the lock is killed: its descriptor closes
        // without an unlock (dropping a `Flock` would unlock it, for the
        // child too); its tool lives on.
        let fd = held.as_raw_fd();
        std::mem::forget(held);
        nix::unistd::close(fd).unwrap();
        let err = ensure(&p, 128 * MIB).unwrap_err();
        assert_eq!(err.to_string(), format!("{} is busy: an e2fsck or resize2fs of an earlier attempt still runs on it", p.display()));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 64 * MIB, "untouched");
        orphan.kill().unwrap();
        orphan.wait().unwrap();
        assert_eq!(ensure(&p, 128 * MIB).unwrap(), Ensured::Grown { from: 64 * MIB, to: 128 * MIB });
        // Every other child is spawned without it.
        let held = lock(&p).unwrap();
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let fd = held.as_raw_fd();
        std::mem::forget(held);
        nix::unistd::close(fd).unwrap();
        // Another test's child, forked but not yet exec'd, may hold a copy
        // for a moment; `sleep` would hold it for 30 s.
        let t0 = std::time::Instant::now();
        while lock(&p).is_err() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "a child that was not handed the lock holds it");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        other.kill().unwrap();
        other.wait().unwrap();
    }

    /// A file that is no ext4 filesystem is not grown into one: the error
    /// names the file and the tool, and the file keeps its size.
    #[test]
    fn an_overlay_that_is_not_ext4_is_refused_with_its_path() {
        if !e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overlay.raw");
        std::fs::write(&p, vec![0x5a; 64 * 1024]).unwrap();
        let err = ensure(&p, 64 * MIB).unwrap_err();
        let text = crate::error_chain(&err);
        assert!(text.starts_with(&format!("e2fsck failed on {} (exit status: ", p.display())), "{text}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 64 * 1024, "untouched");
        assert!(!grow_marker(&p).exists(), "nothing begun");
    }
}
