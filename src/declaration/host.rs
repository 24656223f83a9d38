//! What a declaration's volume sources are on this host: the one place
//! where validation looks at the filesystem, behind [`VolumeHost`] so that
//! `parse_instance` stays pure and tests can answer for the host.
//!
//! A source is resolved once, when the declaration is read: every symlink
//! in it is followed and the VM is given the resolved path, which `status`
//! shows. The provisioner looks again just before the VMM opens it
//! ([`check_at_use`]), since the file may have been replaced in between.
//!
//! A source that does not exist yet, or that the user validating may not
//! look at, is not a validation problem: `hypeman validate` also runs where
//! the host's files are not (the Nix build of a config dir) or as a user
//! who cannot see into a root-only directory, and a disk image may be made
//! after its declaration. It is reported when the VM is made.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// What kind of file a volume source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    BlockDevice,
    Directory,
    Symlink,
    /// A FIFO, socket or character device.
    Other,
}

impl SourceKind {
    pub fn of(file_type: std::fs::FileType) -> SourceKind {
        if file_type.is_symlink() {
            SourceKind::Symlink
        } else if file_type.is_file() {
            SourceKind::File
        } else if file_type.is_block_device() {
            SourceKind::BlockDevice
        } else if file_type.is_dir() {
            SourceKind::Directory
        } else {
            SourceKind::Other
        }
    }

    fn described(self) -> &'static str {
        match self {
            SourceKind::File => "a regular file",
            SourceKind::BlockDevice => "a block device",
            SourceKind::Directory => "a directory",
            SourceKind::Symlink => "a symbolic link",
            SourceKind::Other => "a FIFO, socket or character device",
        }
    }
}

/// Why a source of `kind` cannot back a volume declared with
/// `block_device`; `None` when it can. The one rule, for validation and for
/// the provisioner's second look.
pub fn kind_problem(kind: SourceKind, block_device: bool) -> Option<String> {
    match (kind, block_device) {
        (SourceKind::File, false) | (SourceKind::BlockDevice, true) => None,
        (SourceKind::BlockDevice, false) => {
            Some("is a block device; set block_device = true to attach one".to_string())
        }
        (other, true) => Some(format!(
            "is {}, and block_device = true asks for a block device",
            other.described()
        )),
        (other, false) => Some(format!(
            "is {}; a volume is a raw disk image file (or a block device with block_device = true)",
            other.described()
        )),
    }
}

/// A source as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// With every symlink followed.
    pub resolved: PathBuf,
    pub kind: SourceKind,
}

/// Answers what a volume source is.
pub trait VolumeHost {
    /// `Ok(None)`: not looked at (the source is taken as written).
    fn inspect(&self, source: &Path) -> io::Result<Option<Inspected>>;
}

/// Looks at nothing: `parse_instance`'s host, which keeps it pure.
pub struct Unchecked;

impl VolumeHost for Unchecked {
    fn inspect(&self, _source: &Path) -> io::Result<Option<Inspected>> {
        Ok(None)
    }
}

/// This host's filesystem.
pub struct HostFiles;

impl VolumeHost for HostFiles {
    fn inspect(&self, source: &Path) -> io::Result<Option<Inspected>> {
        let resolved = std::fs::canonicalize(source)?;
        // The resolved path has no symlink left in it: this is its own type.
        let kind = SourceKind::of(std::fs::symlink_metadata(&resolved)?.file_type());
        Ok(Some(Inspected { resolved, kind }))
    }
}

/// [`check_at_use`]'s answer for a source that is not there.
pub const MISSING: &str = "does not exist";

/// Why the resolved source at `path` cannot be attached now, for the
/// provisioner just before it hands the path to the VMM: it must still be
/// there, and still of the kind validation accepted (a path that became a
/// symlink was replaced since, and is refused rather than followed).
pub fn check_at_use(path: &Path, block_device: bool) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => match kind_problem(SourceKind::of(meta.file_type()), block_device) {
            None => Ok(()),
            Some(problem) => Err(format!("{problem} (it changed since the declaration was read)")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(MISSING.to_string()),
        Err(e) => Err(format!("cannot be inspected: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn the_host_resolves_links_once_and_names_the_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real.raw");
        std::fs::write(&real, b"disk").unwrap();
        let link = tmp.path().join("link.raw");
        symlink(&real, &link).unwrap();
        let again = tmp.path().join("again.raw");
        symlink(&link, &again).unwrap();
        let real = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            HostFiles.inspect(&again).unwrap(),
            Some(Inspected { resolved: real.clone(), kind: SourceKind::File })
        );
        assert_eq!(HostFiles.inspect(tmp.path()).unwrap().unwrap().kind, SourceKind::Directory);
        assert_eq!(
            HostFiles.inspect(&tmp.path().join("none")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(Unchecked.inspect(&again).unwrap(), None);
    }

    #[test]
    fn only_the_declared_kind_is_accepted() {
        assert_eq!(kind_problem(SourceKind::File, false), None);
        assert_eq!(kind_problem(SourceKind::BlockDevice, true), None);
        for kind in [SourceKind::Directory, SourceKind::Symlink, SourceKind::Other, SourceKind::File] {
            assert!(kind_problem(kind, true).is_some(), "{kind:?}");
        }
        for kind in [SourceKind::Directory, SourceKind::Symlink, SourceKind::Other, SourceKind::BlockDevice] {
            assert!(kind_problem(kind, false).is_some(), "{kind:?}");
        }
    }

    #[test]
    fn a_source_replaced_after_validation_is_refused_at_use() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d.raw");
        assert_eq!(check_at_use(&disk, false).unwrap_err(), "does not exist");
        std::fs::write(&disk, b"disk").unwrap();
        assert_eq!(check_at_use(&disk, false), Ok(()));
        assert!(check_at_use(&disk, true).unwrap_err().starts_with("is a regular file, and block_device"));
        std::fs::remove_file(&disk).unwrap();
        symlink("/etc/passwd", &disk).unwrap();
        assert_eq!(
            check_at_use(&disk, false).unwrap_err(),
            "is a symbolic link; a volume is a raw disk image file (or a block device with block_device = true) \
             (it changed since the declaration was read)"
        );
        std::fs::remove_file(&disk).unwrap();
        std::fs::create_dir(&disk).unwrap();
        assert!(check_at_use(&disk, false).unwrap_err().starts_with("is a directory"));
    }
}
