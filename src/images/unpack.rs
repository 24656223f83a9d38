//! Applies OCI image layers (tar, optionally gzip or zstd compressed) in
//! order into one directory, the way an overlay stack would see them:
//! whiteouts delete, opaque markers hide lower contents, later entries
//! replace earlier ones.
//!
//! This module owns the safety of that directory: a layer is untrusted
//! input, and nothing it says may create, change or delete anything outside
//! the unpack root. Every filesystem call is made relative to a directory
//! descriptor reached by opening one component at a time with `O_NOFOLLOW`,
//! so a symlink in a path is refused rather than followed, and `..` or
//! absolute names never reach the kernel. It must not use `tar`'s own
//! `unpack` (which follows symlinks in parents) or any path-based call on
//! a path taken from a layer.
//!
//! Ownership is applied only when running privileged; otherwise it is
//! counted in [`UnpackStats`] and left as the unpacking user. Device nodes
//! likewise need privilege and are skipped, with a warning, without it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, FileStat,
    Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use tar::EntryType;

/// Bounds on what a stack of layers may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total bytes of regular file contents over all layers.
    pub max_bytes: u64,
    /// Total tar entries over all layers.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 16 << 30,
            max_entries: 4_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackOptions {
    pub limits: UnpackLimits,
    /// Apply ownership and create device nodes. Defaults to "running as root".
    pub privileged: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            limits: UnpackLimits::default(),
            privileged: nix::unistd::geteuid().is_root(),
        }
    }
}

/// What unpacking did, for image.json and for warnings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub layers: u64,
    pub entries: u64,
    /// Bytes of regular file contents written (over all layers).
    pub bytes: u64,
    /// Device nodes not created because unpacking was unprivileged.
    pub devices_skipped: u64,
    /// Entries whose owner was not applied because unpacking was unprivileged.
    pub ownership_skipped: u64,
    /// Extended attributes the filesystem refused.
    pub xattrs_skipped: u64,
}

/// Why a layer could not be applied. The root may hold a partial result
/// afterwards; the caller discards it.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry `{path}` escapes the root through `..`")]
    Escape { path: String },
    #[error("layer entry `{path}` goes through a symlink")]
    ThroughSymlink { path: String },
    #[error("hard link `{path}` points to `{target}`, which is not a file inside the root")]
    HardlinkTarget { path: String, target: String },
    #[error("invalid whiteout `{path}`")]
    Whiteout { path: String },
    #[error("`{path}` has a non-directory where a directory is needed")]
    NotADirectory { path: String },
    #[error("layers unpack to more than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("layers hold more than the limit of {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("unsupported layer compression ({0})")]
    Compression(&'static str),
    #[error("unsupported tar entry type {kind:?} at `{path}`")]
    UnsupportedEntry { path: String, kind: EntryType },
    #[error("cannot read layer")]
    Read(#[source] io::Error),
    #[error("cannot {op} `{path}`")]
    Fs {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Applies layers into one root. Create it, call [`Unpacker::apply_layer`]
/// once per layer, bottom first, then [`Unpacker::finish`].
pub struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    options: UnpackOptions,
    stats: UnpackStats,
    /// Paths written by the layer being applied: whiteouts only hide lower layers.
    layer_paths: HashSet<Vec<u8>>,
    /// Directory mode and mtime, applied at the end: creating children
    /// changes a directory's mtime, and a read-only directory mode would
    /// stop an unprivileged unpacker from filling it.
    dirs: HashMap<Vec<u8>, Meta>,
}

/// Metadata of one entry, with PAX overrides applied.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

impl Unpacker {
    /// `root` must be an existing, empty directory that only this process writes.
    pub fn new(root: &Path, options: UnpackOptions) -> Result<Unpacker, UnpackError> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::Fs {
            op: "open",
            path: root.display().to_string(),
            source: e.into(),
        })?;
        Ok(Unpacker {
            root: fd,
            root_path: root.to_path_buf(),
            options,
            stats: UnpackStats::default(),
            layer_paths: HashSet::new(),
            dirs: HashMap::new(),
        })
    }

    /// Applies one layer blob, detecting gzip and zstd compression from its
    /// first bytes.
    pub fn apply_layer<R: Read>(&mut self, layer: R) -> Result<(), UnpackError> {
        let mut buffered = BufReader::with_capacity(256 * 1024, layer);
        let magic = buffered.fill_buf().map_err(UnpackError::Read)?;
        let reader: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(UnpackError::Read)?)
        } else if magic.starts_with(b"BZh") {
            return Err(UnpackError::Compression("bzip2"));
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            return Err(UnpackError::Compression("xz"));
        } else {
            Box::new(buffered)
        };
        self.apply_tar(reader)
    }

    /// Applies one uncompressed tar stream.
    pub fn apply_tar<R: Read>(&mut self, tar: R) -> Result<(), UnpackError> {
        self.layer_paths.clear();
        self.stats.layers += 1;
        let progress = std::rc::Rc::new(std::cell::Cell::new((0u64, false)));
        let counted = Counting {
            inner: tar,
            progress: progress.clone(),
        };
        let mut archive = tar::Archive::new(counted);
        // Where the last entry's data ended in the stream.
        let mut data_end = 0u64;
        for entry in archive.entries().map_err(UnpackError::Read)? {
            let mut entry = match entry {
                Ok(entry) => entry,
                // A stream that stops right after an entry's data, without
                // padding or the end-of-archive blocks, is complete to Go's
                // archive/tar (so to containerd and Docker), and some
                // writers (umoci 0.4) produce it. Anything else truncated
                // is still an error.
                Err(e) => {
                    let (read, eof) = progress.get();
                    if eof && read == data_end {
                        tracing::debug!(bytes = read, "layer ends without tar padding");
                        break;
                    }
                    return Err(UnpackError::Read(e));
                }
            };
            data_end = entry
                .raw_file_position()
                .saturating_add(entry.header().entry_size().map_err(UnpackError::Read)?);
            self.stats.entries += 1;
            if self.stats.entries > self.options.limits.max_entries {
                return Err(UnpackError::TooManyEntries {
                    limit: self.options.limits.max_entries,
                });
            }
            self.apply_entry(&mut entry)?;
        }
        Ok(())
    }

    /// Applies deferred directory metadata and returns what was done.
    pub fn finish(self) -> Result<UnpackStats, UnpackError> {
        let mut dirs: Vec<_> = self.dirs.iter().collect();
        // Deepest first, so setting a parent's mtime is the last change to it.
        dirs.sort_by_key(|(path, _)| {
            std::cmp::Reverse(path.iter().filter(|&&b| b == b'/').count())
        });
        for (path, meta) in dirs {
            let comps = split(path);
            let fd = match self.open_dir(&comps, false) {
                Ok(fd) => fd,
                // Replaced by a later layer with something that is not a directory.
                Err(UnpackError::ThroughSymlink { .. } | UnpackError::NotADirectory { .. }) => {
                    continue
                }
                Err(UnpackError::Fs { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let shown = show(path);
            fchmod(&fd, Mode::from_bits_truncate(meta.mode & 0o7777))
                .map_err(fs_err("chmod", &shown))?;
            futimens(&fd, &meta.mtime, &meta.mtime).map_err(fs_err("set times of", &shown))?;
        }
        if self.stats.ownership_skipped > 0 {
            tracing::warn!(
                root = %self.root_path.display(),
                entries = self.stats.ownership_skipped,
                "unprivileged unpack: file owners not applied"
            );
        }
        Ok(self.stats)
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = show(&raw_path);
        let comps = normalize(&raw_path).ok_or_else(|| UnpackError::Escape {
            path: shown.clone(),
        })?;
        let kind = entry.header().entry_type();
        let meta = read_meta(entry).map_err(UnpackError::Read)?;

        let Some((name, parents)) = comps.split_last() else {
            // The root itself (`./`): only its metadata can change.
            if kind == EntryType::Directory {
                self.dirs.insert(Vec::new(), meta);
            }
            return Ok(());
        };
        let full = join(&comps);

        if name.starts_with(WHITEOUT_PREFIX) {
            return self.apply_whiteout(parents, name, &shown);
        }

        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                let total = self.stats.bytes.saturating_add(size);
                if total > self.options.limits.max_bytes {
                    return Err(UnpackError::TooLarge {
                        limit: self.options.limits.max_bytes,
                    });
                }
                let parent = self.open_dir(parents, true)?;
                self.clear_slot(&parent, name, false, &shown)?;
                let fd = openat(
                    &parent,
                    *name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(fs_err("create", &shown))?;
                let mut file = File::from(fd);
                let written =
                    io::copy(&mut entry.take(size), &mut file).map_err(UnpackError::Read)?;
                if written != size {
                    return Err(UnpackError::Read(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("`{shown}` is truncated"),
                    )));
                }
                self.stats.bytes = total;
                self.apply_meta(file.as_fd(), &meta, &shown, true)?;
            }
            EntryType::Directory => {
                let parent = self.open_dir(parents, true)?;
                if !self.clear_slot(&parent, name, true, &shown)? {
                    mkdirat(&parent, *name, Mode::from_bits_truncate(0o755))
                        .map_err(fs_err("create directory", &shown))?;
                }
                let fd = open_child_dir(&parent, name, &shown)?;
                self.apply_meta(fd.as_fd(), &meta, &shown, false)?;
                self.dirs.insert(full.clone(), meta);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::UnsupportedEntry {
                        path: shown.clone(),
                        kind,
                    })?
                    .into_owned();
                let parent = self.open_dir(parents, true)?;
                self.clear_slot(&parent, name, false, &shown)?;
                // Stored as written: the target is only ever resolved by the guest.
                symlinkat(OsStr::from_bytes(&target), &parent, *name)
                    .map_err(fs_err("create symlink", &shown))?;
                self.chown_at(&parent, name, &meta, &shown)?;
                utimensat(
                    &parent,
                    *name,
                    &meta.mtime,
                    &meta.mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(fs_err("set times of", &shown))?;
                if !meta.xattrs.is_empty() {
                    self.stats.xattrs_skipped += meta.xattrs.len() as u64;
                }
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| UnpackError::UnsupportedEntry {
                        path: shown.clone(),
                        kind,
                    })?
                    .into_owned();
                self.hardlink(parents, name, &full, &target, &shown)?;
            }
            EntryType::Char | EntryType::Block => {
                if !self.options.privileged {
                    self.stats.devices_skipped += 1;
                    tracing::warn!(path = %shown, "unprivileged unpack: device node skipped");
                    return Ok(());
                }
                let (major, minor) = device_numbers(entry.header()).map_err(UnpackError::Read)?;
                let sflag = if kind == EntryType::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                let parent = self.open_dir(parents, true)?;
                self.clear_slot(&parent, name, false, &shown)?;
                mknodat(
                    &parent,
                    *name,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    libc::makedev(major, minor),
                )
                .map_err(fs_err("create device", &shown))?;
                self.special_meta(&parent, name, &meta, &shown)?;
            }
            EntryType::Fifo => {
                let parent = self.open_dir(parents, true)?;
                self.clear_slot(&parent, name, false, &shown)?;
                mknodat(
                    &parent,
                    *name,
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(0o600),
                    0,
                )
                .map_err(fs_err("create fifo", &shown))?;
                self.special_meta(&parent, name, &meta, &shown)?;
            }
            // Consumed by the tar reader as metadata of the next entry.
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {
                return Ok(());
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: shown,
                    kind: other,
                })
            }
        }
        self.layer_paths.insert(full);
        Ok(())
    }

    /// `.wh.<name>` deletes `<name>` from lower layers; `.wh..wh..opq`
    /// empties its directory of lower layers' contents.
    fn apply_whiteout(
        &mut self,
        parents: &[&[u8]],
        name: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        if name == OPAQUE_MARKER {
            let dir = self.open_dir(parents, true)?;
            let prefix = join(parents);
            let names = list_dir(&dir, shown)?;
            for child in names {
                let mut child_path = prefix.clone();
                if !child_path.is_empty() {
                    child_path.push(b'/');
                }
                child_path.extend_from_slice(&child);
                if self.layer_paths.contains(&child_path) {
                    continue;
                }
                remove_tree(&dir, &child, shown)?;
                self.forget_dirs_under(&child_path);
            }
            return Ok(());
        }
        let victim = &name[WHITEOUT_PREFIX.len()..];
        if victim.starts_with(WHITEOUT_PREFIX) {
            // Other aufs metadata (`.wh..wh.plnk`, …) carries nothing for us.
            return Ok(());
        }
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err(UnpackError::Whiteout {
                path: shown.to_string(),
            });
        }
        let parent = match self.open_dir(parents, false) {
            Ok(fd) => fd,
            Err(UnpackError::Fs { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let mut victim_path = parents.to_vec();
        victim_path.push(victim);
        let victim_path = join(&victim_path);
        if self.layer_paths.contains(&victim_path) {
            return Ok(());
        }
        remove_tree(&parent, victim, shown)?;
        self.forget_dirs_under(&victim_path);
        Ok(())
    }

    fn hardlink(
        &mut self,
        parents: &[&[u8]],
        name: &[u8],
        full: &[u8],
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        let bad_target = || UnpackError::HardlinkTarget {
            path: shown.to_string(),
            target: show(target),
        };
        let tcomps = normalize(target).ok_or_else(bad_target)?;
        let Some((tname, tparents)) = tcomps.split_last() else {
            return Err(bad_target());
        };
        if join(&tcomps) == full {
            return Ok(());
        }
        let tparent = match self.open_dir(tparents, false) {
            Ok(fd) => fd,
            Err(
                UnpackError::Fs { .. }
                | UnpackError::ThroughSymlink { .. }
                | UnpackError::NotADirectory { .. },
            ) => return Err(bad_target()),
            Err(e) => return Err(e),
        };
        match lstat_at(&tparent, tname) {
            Ok(Some(st)) if !is_dir(&st) => {}
            Ok(_) | Err(_) => return Err(bad_target()),
        }
        let parent = self.open_dir(parents, true)?;
        self.clear_slot(&parent, name, false, shown)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        linkat(&tparent, *tname, &parent, name, AtFlags::empty())
            .map_err(fs_err("create hard link", shown))?;
        Ok(())
    }

    /// Opens the directory at `comps` below the root, one component at a
    /// time, refusing symlinks. With `create`, missing directories are made
    /// (layers may omit parents).
    fn open_dir(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, UnpackError> {
        let mut fd = self.root.try_clone().map_err(|e| UnpackError::Fs {
            op: "open",
            path: ".".into(),
            source: e,
        })?;
        for (i, comp) in comps.iter().enumerate() {
            let shown = || show(&join(&comps[..=i]));
            let next = match openat(&fd, *comp, DIR_FLAGS, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::ENOENT) if create => {
                    let made = match mkdirat(&fd, *comp, Mode::from_bits_truncate(0o755)) {
                        Ok(()) => true,
                        Err(Errno::EEXIST) => false,
                        Err(e) => return Err(fs_err("create directory", &shown())(e)),
                    };
                    let next = openat(&fd, *comp, DIR_FLAGS, Mode::empty())
                        .map_err(|e| classify(&fd, comp, e, shown()))?;
                    // A parent no layer names is the guest's, conventionally
                    // 0755; mkdirat's mode went through the daemon's 0077
                    // umask, so it is set again, explicitly.
                    if made {
                        fchmod(&next, Mode::from_bits_truncate(0o755)).map_err(fs_err("chmod", &shown()))?;
                    }
                    next
                }
                Err(e) => return Err(classify(&fd, comp, e, shown())),
            };
            fd = next;
        }
        Ok(fd)
    }

    /// Makes `name` in `parent` free for a new entry. Returns whether an
    /// existing directory was kept (only when `keep_dir`).
    fn clear_slot(
        &self,
        parent: &OwnedFd,
        name: &[u8],
        keep_dir: bool,
        shown: &str,
    ) -> Result<bool, UnpackError> {
        match lstat_at(parent, name).map_err(fs_err("inspect", shown))? {
            None => Ok(false),
            Some(st) if is_dir(&st) && keep_dir => Ok(true),
            Some(_) => {
                remove_tree(parent, name, shown)?;
                Ok(false)
            }
        }
    }

    fn apply_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        shown: &str,
        mode_now: bool,
    ) -> Result<(), UnpackError> {
        if self.options.privileged {
            fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(fs_err("chown", shown))?;
        } else if meta.uid != 0 || meta.gid != 0 {
            self.stats.ownership_skipped += 1;
        }
        for (key, value) in &meta.xattrs {
            if let Err(e) = set_xattr(fd, key, value) {
                self.stats.xattrs_skipped += 1;
                tracing::debug!(path = %shown, xattr = %show(key), error = %e, "xattr not applied");
            }
        }
        // After chown, which clears setuid/setgid bits.
        if mode_now {
            fchmod(fd, Mode::from_bits_truncate(meta.mode & 0o7777))
                .map_err(fs_err("chmod", shown))?;
            futimens(fd, &meta.mtime, &meta.mtime).map_err(fs_err("set times of", shown))?;
        }
        Ok(())
    }

    fn chown_at(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        if self.options.privileged {
            fchownat(
                parent,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(fs_err("chown", shown))?;
        } else if meta.uid != 0 || meta.gid != 0 {
            self.stats.ownership_skipped += 1;
        }
        Ok(())
    }

    /// Metadata of a device node or fifo, which must not be opened.
    fn special_meta(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        meta: &Meta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        self.chown_at(parent, name, meta, shown)?;
        // `name` was just created by us as a non-symlink in a directory reached
        // without symlinks, so following is moot; the flag keeps the kernel honest.
        fchmodat(
            parent,
            name,
            Mode::from_bits_truncate(meta.mode & 0o7777),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(fs_err("chmod", shown))?;
        utimensat(
            parent,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(fs_err("set times of", shown))
    }

    fn forget_dirs_under(&mut self, path: &[u8]) {
        self.dirs.retain(|p, _| {
            !(p.as_slice() == path || (p.starts_with(path) && p.get(path.len()) == Some(&b'/')))
        });
    }
}

/// Counts bytes read and notes end of stream, to tell a tar that merely
/// lacks its trailer from one cut short.
struct Counting<R> {
    inner: R,
    progress: std::rc::Rc<std::cell::Cell<(u64, bool)>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let (read, eof) = self.progress.get();
        self.progress
            .set((read + n as u64, eof || (n == 0 && !buf.is_empty())));
        Ok(n)
    }
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_RDONLY)
    .union(OFlag::O_CLOEXEC);

fn open_child_dir(parent: &OwnedFd, name: &[u8], shown: &str) -> Result<OwnedFd, UnpackError> {
    openat(parent, name, DIR_FLAGS, Mode::empty())
        .map_err(|e| classify(parent, name, e, shown.to_string()))
}

/// Turns an `openat` failure on a path component into the error a user needs.
fn classify(parent: &OwnedFd, comp: &[u8], e: Errno, shown: String) -> UnpackError {
    match lstat_at(parent, comp) {
        Ok(Some(st)) if (st.st_mode & libc::S_IFMT) == libc::S_IFLNK => {
            UnpackError::ThroughSymlink { path: shown }
        }
        Ok(Some(st)) if !is_dir(&st) => UnpackError::NotADirectory { path: shown },
        _ => fs_err("open", &shown)(e),
    }
}

fn lstat_at(parent: &OwnedFd, name: &[u8]) -> Result<Option<FileStat>, Errno> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_dir(st: &FileStat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFDIR
}

fn list_dir(dir: &OwnedFd, shown: &str) -> Result<Vec<Vec<u8>>, UnpackError> {
    let fd = dir.try_clone().map_err(|e| UnpackError::Fs {
        op: "list",
        path: shown.into(),
        source: e,
    })?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(fs_err("list", shown))?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(fs_err("list", shown))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Deletes `name` in `parent` and, for a directory, everything below it,
/// without following any symlink. A missing `name` is success.
fn remove_tree(parent: &OwnedFd, name: &[u8], shown: &str) -> Result<(), UnpackError> {
    let Some(st) = lstat_at(parent, name).map_err(fs_err("inspect", shown))? else {
        return Ok(());
    };
    if is_dir(&st) {
        let dir = openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(fs_err("open", shown))?;
        for child in list_dir(&dir, shown)? {
            remove_tree(&dir, &child, shown)?;
        }
        unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(fs_err("remove", shown))
    } else {
        unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(fs_err("remove", shown))
    }
}

fn set_xattr(fd: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let key =
        std::ffi::CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `key` is NUL-terminated, `value` is a valid buffer of its length,
    // and `fd` is a live descriptor borrowed for the call.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Splits a tar path into components below the root: leading `/` and `.`
/// components are dropped (`/etc` and `./etc` are `etc`); `None` when any
/// component is `..`.
fn normalize(raw: &[u8]) -> Option<Vec<&[u8]>> {
    let mut comps = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return None,
            c => comps.push(c),
        }
    }
    Some(comps)
}

fn split(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect()
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn fs_err<'a>(op: &'static str, path: &'a str) -> impl Fn(Errno) -> UnpackError + 'a {
    move |e| UnpackError::Fs {
        op,
        path: path.to_string(),
        source: e.into(),
    }
}

fn device_numbers(header: &tar::Header) -> io::Result<(u32, u32)> {
    let major = header.device_major()?.unwrap_or(0);
    let minor = header.device_minor()?.unwrap_or(0);
    Ok((major, minor))
}

/// Mode, owner, mtime and xattrs from the header, overridden by PAX records.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let mut meta = Meta {
        mode: header.mode()?,
        // Some writers leave these blank; blank means 0, as GNU tar reads it.
        // An id too large for Linux becomes `nobody`, never root.
        uid: header.uid().map_or(0, id_or_nobody),
        gid: header.gid().map_or(0, id_or_nobody),
        mtime: TimeSpec::new(
            header
                .mtime()
                .ok()
                .and_then(|v| i64::try_from(v).ok())
                .unwrap_or(0),
            0,
        ),
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
                continue;
            }
            let text = std::str::from_utf8(value).unwrap_or("");
            match key {
                b"uid" => meta.uid = text.parse().map_or(meta.uid, id_or_nobody),
                b"gid" => meta.gid = text.parse().map_or(meta.gid, id_or_nobody),
                b"mtime" => meta.mtime = parse_pax_time(text).unwrap_or(meta.mtime),
                _ => {}
            }
        }
    }
    Ok(meta)
}

fn id_or_nobody(id: u64) -> u32 {
    u32::try_from(id)
        .ok()
        .filter(|&v| v != u32::MAX)
        .unwrap_or(65534)
}

/// PAX times are decimal seconds with an optional fraction: `1700000000.25`.
fn parse_pax_time(text: &str) -> Option<TimeSpec> {
    let (secs, frac) = match text.split_once('.') {
        Some((s, f)) => (s, f),
        None => (text, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        if !b.is_ascii_digit() {
            return None;
        }
        nanos += i64::from(b - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(TimeSpec::new(secs, if secs < 0 { -nanos } else { nanos }))
}

#[cfg(test)]
mod tests;
