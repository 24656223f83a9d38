//! Room for a snapshot: how much the data dir's filesystem has free, how
//! much a snapshot is expected to take, and how to tell a snapshot that
//! failed for want of space from one that failed otherwise. The decisions
//! ([`shortfall`], [`ran_out`]) are pure; the reads beside them are one
//! `statvfs` and one directory walk.

use std::path::Path;

/// Free space this small after a failed write means the write filled the
/// disk: ext4 keeps a few blocks back, and other writers may have taken the
/// last ones meanwhile.
pub const FULL_BELOW_BYTES: u64 = 4 << 20;

/// The bytes an unprivileged writer can still put on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The length of every file under `dir` (0 when there is none): what a
/// failed snapshot had written.
pub fn written_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => written_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// How many bytes are missing for a snapshot expected to take `needed`
/// when `available` are free; `None` when it fits.
pub fn shortfall(needed: u64, available: u64) -> Option<u64> {
    (needed > available).then(|| needed - available)
}

/// Whether a snapshot write failed because the disk filled: the failure
/// says so (`ENOSPC` or `EDQUOT` anywhere in its chain, or QEMU's `exec:`
/// child saying it on its stderr, which reaches the error as text), or
/// the filesystem was left all but full.
pub fn ran_out(error: &(dyn std::error::Error + 'static), available_after: u64) -> bool {
    if available_after < FULL_BELOW_BYTES {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(code) if code == ENOSPC || code == EDQUOT) {
                return true;
            }
        }
        if e.to_string().contains("No space left on device") {
            return true;
        }
        cause = e.source();
    }
    false
}

const ENOSPC: i32 = nix::errno::Errno::ENOSPC as i32;
const EDQUOT: i32 = nix::errno::Errno::EDQUOT as i32;

/// Bytes as people read them: `272.0 MiB`.
pub use crate::config_file::units::human_bytes as human;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("snapshot failed")]
    struct Wrapped(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("migration failed: Unable to write to command: Broken pipe")]
    struct BrokenPipe;

    #[test]
    fn a_snapshot_fits_or_says_by_how_much_not() {
        assert_eq!(shortfall(100, 100), None);
        assert_eq!(shortfall(100, 1000), None);
        assert_eq!(shortfall(300, 100), Some(200));
    }

    #[test]
    fn running_out_is_told_from_the_cause_or_the_disk() {
        let plenty = 1 << 30;
        let enospc = Wrapped(std::io::Error::from_raw_os_error(ENOSPC));
        assert!(ran_out(&enospc, plenty), "ENOSPC in the chain");
        let edquot = Wrapped(std::io::Error::from_raw_os_error(EDQUOT));
        assert!(ran_out(&edquot, plenty), "quota");
        assert!(!ran_out(&BrokenPipe, plenty), "a broken pipe on a roomy disk is something else");
        assert!(ran_out(&BrokenPipe, FULL_BELOW_BYTES - 1), "a broken pipe on a full disk is the disk");
        let said = std::io::Error::other("cat: write error: No space left on device");
        assert!(ran_out(&Wrapped(said), plenty), "a child's stderr");
        let other = Wrapped(std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32));
        assert!(!ran_out(&other, plenty));
    }

    #[test]
    fn free_space_and_written_bytes_are_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
        assert_eq!(written_bytes(&dir.path().join("missing")), 0);
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 23]).unwrap();
        assert_eq!(written_bytes(dir.path()), 123);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(272 << 20), "272.0 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
