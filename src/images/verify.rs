//! Whether a cached root disk is still the one its `image.json` recorded:
//! a disk truncated or altered after it was built makes a guest die of
//! SIGBUS or I/O errors at every boot, so the store checks before handing
//! the disk out and converts the image again when it does not match.
//!
//! The cost decides how often (measured here, a release build on this
//! 2-vCPU host, page-cached: sha256 at 280–430 MiB/s, so a 1.4 MiB busybox
//! disk 0.01–0.02 s, a 61 MiB one 0.14 s, a 300 MiB one 0.8–1.1 s, beside a
//! 2–4 s TCG boot): the size on every use (one `stat`), the digest once
//! per store (a daemon run) and file identity ([`FileId`]: device, inode,
//! length, mtime, ctime), so a crash-looping guest or many guests of one
//! image pay for one hash, and a file rewritten or replaced since is hashed
//! again.
//!
//! This module reads files and keeps the memo; what to do about a mismatch
//! is the store's.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;


/// Why a cached image cannot be used as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("its record {} cannot be read: {reason}", path.display())]
    Record { path: PathBuf, reason: String },
    #[error("its root disk {} is missing", path.display())]
    Missing { path: PathBuf },
    #[error("its root disk {} is {actual} bytes long, its record says {expected}", path.display())]
    Length { path: PathBuf, expected: u64, actual: u64 },
    /// Records written before the length was recorded have only the bytes
    /// allocated on the host.
    #[error("its root disk {} occupies {actual} bytes, its record says {expected}", path.display())]
    Allocated { path: PathBuf, expected: u64, actual: u64 },
    #[error("its root disk {} has digest sha256:{actual}, its record says sha256:{expected}", path.display())]
    Digest { path: PathBuf, expected: String, actual: String },
    #[error("its root disk {} cannot be read: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
}

/// What a record says of its root disk.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The file's length, when recorded.
    pub len: Option<u64>,
    /// The bytes it occupies (`st_blocks * 512`): what older records have.
    pub allocated: u64,
    /// Hex sha256 of the file, when recorded.
    pub sha256: Option<&'a str>,
}

/// Identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

pub use crate::durable::sha256_file;

/// The root disks whose digest this store has checked, by path, with the
/// version of the file that was checked.
#[derive(Debug, Default)]
pub struct Verified {
    seen: Mutex<HashMap<PathBuf, FileId>>,
}

impl Verified {
    /// Checks `disk` against `expected`: its size always, its digest unless
    /// this very file was checked before. `size_only` skips the digest (for
    /// listings).
    pub fn check(&self, disk: &Path, expected: Expected<'_>, size_only: bool) -> Result<(), Damage> {
        let meta = match std::fs::metadata(disk) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Damage::Missing { path: disk.to_path_buf() })
            }
            Err(e) => return Err(Damage::Unreadable { path: disk.to_path_buf(), reason: e.to_string() }),
        };
        match expected.len {
            Some(len) if meta.len() != len => {
                return Err(Damage::Length { path: disk.to_path_buf(), expected: len, actual: meta.len() })
            }
            Some(_) => {}
            None if meta.blocks() * 512 != expected.allocated => {
                return Err(Damage::Allocated {
                    path: disk.to_path_buf(),
                    expected: expected.allocated,
                    actual: meta.blocks() * 512,
                })
            }
            None => {}
        }
        let Some(want) = expected.sha256 else {
            return Ok(());
        };
        let id = FileId::of(&meta);
        if size_only || self.lock().get(disk) == Some(&id) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let actual = sha256_file(disk)
            .map_err(|e| Damage::Unreadable { path: disk.to_path_buf(), reason: e.to_string() })?;
        tracing::debug!(disk = %disk.display(), bytes = meta.len(), ms = started.elapsed().as_millis() as u64, "root disk digest checked");
        if actual != want {
            self.lock().remove(disk);
            return Err(Damage::Digest { path: disk.to_path_buf(), expected: want.to_string(), actual });
        }
        self.lock().insert(disk.to_path_buf(), id);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, FileId>> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_always_digest_once_per_file_version() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("rootfs.erofs");
        std::fs::write(&disk, vec![7u8; 10_000]).unwrap();
        let sha = sha256_file(&disk).unwrap();
        let allocated = std::fs::metadata(&disk).unwrap().blocks() * 512;
        let expected = Expected { len: Some(10_000), allocated, sha256: Some(&sha) };
        let verified = Verified::default();
        assert_eq!(verified.check(&disk, expected, false), Ok(()));

        // Same length, one byte changed in place: the digest is checked
        // again because the file's mtime moved.
        let mut bytes = std::fs::read(&disk).unwrap();
        bytes[5000] ^= 1;
        std::fs::write(&disk, &bytes).unwrap();
        // Kernel timestamps are coarse: a write this soon may keep the old
        // mtime, so the test moves it as a later write would.
        let file = std::fs::File::options().write(true).open(&disk).unwrap();
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
        drop(file);
        assert!(matches!(verified.check(&disk, expected, false), Err(Damage::Digest { .. })));
        assert_eq!(verified.check(&disk, expected, true), Ok(()));

        std::fs::write(&disk, vec![7u8; 4096]).unwrap();
        assert_eq!(
            verified.check(&disk, expected, true),
            Err(Damage::Length { path: disk.clone(), expected: 10_000, actual: 4096 })
        );
        // An old record: only the allocation to compare.
        let old = Expected { len: None, allocated, sha256: None };
        let now = std::fs::metadata(&disk).unwrap().blocks() * 512;
        assert_eq!(verified.check(&disk, old, false).is_ok(), now == allocated);
        std::fs::remove_file(&disk).unwrap();
        assert_eq!(verified.check(&disk, expected, false), Err(Damage::Missing { path: disk.clone() }));
    }

    #[test]
    fn a_checked_file_is_not_hashed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("rootfs.erofs");
        std::fs::write(&disk, b"disk").unwrap();
        let sha = sha256_file(&disk).unwrap();
        let allocated = std::fs::metadata(&disk).unwrap().blocks() * 512;
        let verified = Verified::default();
        verified.check(&disk, Expected { len: Some(4), allocated, sha256: Some(&sha) }, false).unwrap();
        // A wrong digest in the record is not noticed for the file already
        // checked: the memo is by file version, not by what is expected.
        let wrong = "0".repeat(64);
        assert_eq!(verified.check(&disk, Expected { len: Some(4), allocated, sha256: Some(&wrong) }, false), Ok(()));
        assert!(Verified::default()
            .check(&disk, Expected { len: Some(4), allocated, sha256: Some(&wrong) }, false)
            .is_err());
    }
}
