//! What an unprivileged VMM may open under the data dir, and the daemon
//! granting it just before the VMM starts (issue 11).
//!
//! Nothing changes owner: every file stays root's, and access comes by
//! group, so a VMM can never chmod its way further. A guest's own files
//! get its VMM's private gid (nobody else has it); shared files (image
//! root disks, the initrd) and the directories on the way to them get the
//! shared VMM group, directories with search only (`0710`: a VMM cannot
//! list them, so it learns no other guest's id). The guest directory is
//! `01770` with that gid: the VMM creates its sockets there, and the
//! sticky bit keeps it from removing or renaming anything of root's
//! (`metadata.json`, the launch record).
//!
//! Applied at every launch rather than at creation: a guest made while
//! VMMs ran as root is handed over at its next start, and re-applying is
//! harmless, so a daemon killed half-way simply does it again. Paths
//! outside the data dir (the kernel, volumes) are not touched here.
//! [`grants`] decides; [`apply`] does the IO, on a descriptor opened with
//! `O_NOFOLLOW`.

use super::{VmConfig, VmmUser};
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the VMM's user cannot open {}: {problem}; make it readable by others, or set [vmm] users = \"root\" in hypeman.toml", path.display())]
    Unreachable { path: PathBuf, problem: String },
    #[error("cannot hand {} over to the VMM's user", path.display())]
    Apply {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One path's group and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub gid: u32,
    pub mode: u32,
    /// Made (empty, 0600) when missing: the serial log, which QEMU would
    /// otherwise create itself in a directory it may not write.
    pub create: bool,
}

/// Directories on the way: search only.
pub const DIR_SEARCH: u32 = 0o710;
/// The guest directory: the VMM makes its sockets in it; sticky.
const GUEST_DIR: u32 = 0o1770;
const FILE_READ: u32 = 0o640;
const FILE_WRITE: u32 = 0o660;

/// Every path under `user.data_dir` the VMM of `config` opens, with what it
/// needs, parents before children. `guest_dir` is the guest's directory.
pub fn grants(config: &VmConfig, guest_dir: &Path, user: &VmmUser) -> Vec<(PathBuf, Grant)> {
    let shared = user.groups.first().copied().unwrap_or(user.gid);
    let mut files: Vec<(&Path, bool, bool)> = config.disks.iter().map(|d| (d.path.as_path(), !d.readonly, false)).collect();
    files.push((config.serial_log.as_path(), true, true));
    files.push((config.kernel.as_path(), false, false));
    if let Some(initrd) = &config.initrd {
        files.push((initrd.as_path(), false, false));
    }
    let mut out: BTreeMap<PathBuf, Grant> = BTreeMap::new();
    let dir = |out: &mut BTreeMap<PathBuf, Grant>, d: &Path| {
        let grant = if d == guest_dir {
            Grant { gid: user.gid, mode: GUEST_DIR, create: false }
        } else if d.starts_with(guest_dir) {
            Grant { gid: user.gid, mode: DIR_SEARCH, create: false }
        } else {
            Grant { gid: shared, mode: DIR_SEARCH, create: false }
        };
        out.insert(d.to_path_buf(), grant);
    };
    if guest_dir.starts_with(&user.data_dir) {
        for a in guest_dir.ancestors().take_while(|a| a.starts_with(&user.data_dir)) {
            dir(&mut out, a);
        }
    }
    for (file, writable, create) in files {
        if !file.starts_with(&user.data_dir) || file == user.data_dir {
            continue;
        }
        for a in file.ancestors().skip(1).take_while(|a| a.starts_with(&user.data_dir)) {
            dir(&mut out, a);
        }
        let own = file.starts_with(guest_dir);
        let grant = match (own, writable) {
            (true, true) => Grant { gid: user.gid, mode: FILE_WRITE, create },
            (true, false) => Grant { gid: user.gid, mode: FILE_READ, create },
            // A shared file is never the VMM's to write.
            (false, _) => Grant { gid: shared, mode: FILE_READ, create: false },
        };
        out.insert(file.to_path_buf(), grant);
    }
    // BTreeMap order puts every directory before what is inside it.
    out.into_iter().collect()
}

/// Why a user with no access of its own cannot reach `path` (a directory
/// on the way without search for others, or `path` itself not readable
/// by others when `read`), or `None` when it can. Reads the modes only
/// (ACLs are not consulted: a stricter answer, never a wrong "yes").
pub fn unreachable(path: &Path, read: bool) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777);
    for dir in path.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
        match mode(dir) {
            Ok(m) if m & 0o001 == 0 => return Some(format!("{} is {m:04o}, which others cannot pass through", dir.display())),
            Ok(_) => {}
            Err(e) => return Some(format!("{}: {e}", dir.display())),
        }
    }
    match mode(path) {
        Ok(m) if read && m & 0o004 == 0 => Some(format!("it is {m:04o}, which others cannot read")),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// The boot files outside the data dir (the kernel, an initrd kept
/// elsewhere) must be readable by any user: a VMM gets them as descriptors
/// it reopens through `/proc/self/fd`, which skips their directories but
/// not the file's own mode. The first that is not is the error, before a
/// VMM fails on it.
pub fn check_outside(config: &VmConfig, user: &VmmUser) -> Result<(), HandoverError> {
    use std::os::unix::fs::PermissionsExt;
    let files = std::iter::once(config.kernel.as_path()).chain(config.initrd.as_deref());
    for file in files.filter(|f| !f.starts_with(&user.data_dir)) {
        let problem = match std::fs::metadata(file) {
            Ok(m) if m.permissions().mode() & 0o004 != 0 => continue,
            Ok(m) => format!("it is {:04o}, which others cannot read", m.permissions().mode() & 0o7777),
            Err(e) => e.to_string(),
        };
        return Err(HandoverError::Unreachable { path: file.to_path_buf(), problem });
    }
    Ok(())
}

/// Sets each grant's group (owner kept) and mode on the path's own
/// descriptor; a symlink is refused, not followed.
pub fn apply(grants: &[(PathBuf, Grant)]) -> Result<(), HandoverError> {
    for (path, grant) in grants {
        let err = |source| HandoverError::Apply { path: path.clone(), source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(grant.create)
            .create(grant.create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(err)?;
        set_group_and_mode(&file, path, *grant)?;
    }
    Ok(())
}

/// `grant`'s group (owner kept) and mode on `file`'s own descriptor.
fn set_group_and_mode(file: &std::fs::File, path: &Path, grant: Grant) -> Result<(), HandoverError> {
    let err = |source| HandoverError::Apply { path: path.to_path_buf(), source };
    // SAFETY: plain syscalls on a descriptor the caller holds open.
    if unsafe { libc::fchown(file.as_raw_fd(), u32::MAX, grant.gid) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(file.as_raw_fd(), grant.mode) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A volume outside the data dir, for a VMM that reopens it through
/// `/proc/self/fd` (Cloud Hypervisor takes disks by path only): the file
/// joins the VMM's own group with read (and write) for the group; the
/// owner and what others may do are kept. QEMU needs none of this: it is
/// handed the descriptor itself.
pub fn grant_volume(path: &Path, user: &VmmUser, write: bool) -> Result<(), HandoverError> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| HandoverError::Apply { path: path.to_path_buf(), source })?;
    let mode = file.metadata().map_err(|source| HandoverError::Apply { path: path.to_path_buf(), source })?.permissions().mode() & 0o7777;
    let group = if write { 0o060 } else { 0o040 };
    set_group_and_mode(&file, path, Grant { gid: user.gid, mode: (mode & !0o070) | group, create: false })
}

/// The snapshot in `dir`, for a VMM of `user` to restore from: it reads the
/// files by name, and files written by root (a snapshot copied back, or
/// one whose modes were tightened since) are root's `0600`. The
/// directories between `guest_dir` and `dir` get search, the directory
/// the VMM's gid with read and search (`0750`), every file in it read
/// (`0640`): a restore never depends on what the snapshot's own standby
/// granted. Nothing for a root VMM.
pub fn open_snapshot(dir: &Path, guest_dir: &Path, user: Option<&VmmUser>) -> Result<(), HandoverError> {
    let Some(user) = user else { return Ok(()) };
    let err = |source| HandoverError::Apply { path: dir.to_path_buf(), source };
    let mut grants = on_the_way(dir, guest_dir, user);
    grants.push((dir.to_path_buf(), Grant { gid: user.gid, mode: 0o750, create: false }));
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        if entry.file_type().map_err(err)?.is_file() {
            grants.push((entry.path(), Grant { gid: user.gid, mode: FILE_READ, create: false }));
        }
    }
    apply(&grants)
}

/// The empty directory `dir` a VMM of `user` writes its snapshot into
/// (Cloud Hypervisor writes the files itself; they are then its uid's, in
/// its own guest's directory): writable by the VMM's gid, and the
/// directories between it and `guest_dir` searchable.
pub fn writable_snapshot_dir(dir: &Path, guest_dir: &Path, user: &VmmUser) -> Result<(), HandoverError> {
    let mut grants = on_the_way(dir, guest_dir, user);
    grants.push((dir.to_path_buf(), Grant { gid: user.gid, mode: 0o770, create: false }));
    apply(&grants)
}

/// Search for the VMM's gid on the directories strictly between
/// `guest_dir` (granted at launch) and `dir`, outermost first.
fn on_the_way(dir: &Path, guest_dir: &Path, user: &VmmUser) -> Vec<(PathBuf, Grant)> {
    let mut grants: Vec<(PathBuf, Grant)> = dir
        .ancestors()
        .skip(1)
        .take_while(|a| a.starts_with(guest_dir) && *a != guest_dir)
        .map(|a| (a.to_path_buf(), Grant { gid: user.gid, mode: DIR_SEARCH, create: false }))
        .collect();
    grants.reverse();
    grants
}

/// A descriptor attached to the existing TAP `name`, for a VMM that may not
/// open `/dev/net/tun` itself (`0600 root` on many hosts, this one too).
/// The same request as `network::host` makes the TAP with (`TUNSETIFF`,
/// tap, no packet info, vnet header); kept here because backends sit below
/// `network`.
pub fn attach_tap(name: &str) -> std::io::Result<std::fs::File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{name:?} is not an interface name")));
    }
    let tun = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // TUNSETIFF = _IOW('T', 202, int).
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: the fd is open for the call and `req` is the ifreq it reads.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// `/dev/kvm`'s group when the device exists and is not open to everyone:
/// the VMM needs it among its groups to use KVM. Never the root group
/// (gid 0, as here, where `/dev/kvm` is root:root): that would give a VMM
/// every root-group file, so such a host's VMMs run under TCG.
pub fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/dev/kvm").ok()?;
    (m.mode() & 0o006 != 0o006 && m.gid() != 0).then_some(m.gid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::DiskConfig;

    fn disk(id: &str, path: &str, readonly: bool) -> DiskConfig {
        DiskConfig { id: id.into(), path: path.into(), readonly, limit: Default::default() }
    }

    #[test]
    fn own_files_get_the_guest_gid_and_shared_ones_the_vmm_group() {
        let user = VmmUser { uid: 70001, gid: 70001, groups: vec![69999], data_dir: "/d".into() };
        let config = VmConfig {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/d/system/initrd/abc/initrd.cpio".into()),
            disks: vec![
                disk("rootfs", "/d/images/sha/rootfs.erofs", true),
                disk("overlay", "/d/guests/G/overlay.raw", false),
                disk("config", "/d/guests/G/config.erofs", true),
                disk("vol0", "/srv/data.img", false),
            ],
            serial_log: "/d/guests/G/logs/app.log".into(),
            ..crate::hypervisor::conformance::bare_config()
        };
        let all = grants(&config, Path::new("/d/guests/G"), &user);
        let made: Vec<&Path> = all.iter().filter(|(_, g)| g.create).map(|(p, _)| p.as_path()).collect();
        assert_eq!(made, [Path::new("/d/guests/G/logs/app.log")], "only the serial log is made when missing");
        let got: Vec<(String, u32, u32)> = all.into_iter().map(|(p, g)| (p.display().to_string(), g.gid, g.mode)).collect();
        let want: Vec<(String, u32, u32)> = [
            ("/d", 69999, 0o710),
            ("/d/guests", 69999, 0o710),
            ("/d/guests/G", 70001, 0o1770),
            ("/d/guests/G/config.erofs", 70001, 0o640),
            ("/d/guests/G/logs", 70001, 0o710),
            ("/d/guests/G/logs/app.log", 70001, 0o660),
            ("/d/guests/G/overlay.raw", 70001, 0o660),
            ("/d/images", 69999, 0o710),
            ("/d/images/sha", 69999, 0o710),
            ("/d/images/sha/rootfs.erofs", 69999, 0o640),
            ("/d/system", 69999, 0o710),
            ("/d/system/initrd", 69999, 0o710),
            ("/d/system/initrd/abc", 69999, 0o710),
            ("/d/system/initrd/abc/initrd.cpio", 69999, 0o640),
        ]
        .into_iter()
        .map(|(p, g, m)| (p.to_string(), g, m))
        .collect();
        assert_eq!(got, want, "the kernel and the volume are outside the data dir and left alone");
    }

    #[test]
    fn applied_on_the_files_themselves_and_symlinks_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("overlay.raw");
        std::fs::write(&file, b"x").unwrap();
        let me = nix::unistd::getegid().as_raw();
        apply(&[(file.clone(), Grant { gid: me, mode: 0o660, create: false })]).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&file).unwrap();
        assert_eq!((m.gid(), m.mode() & 0o7777), (me, 0o660));
        // Re-applying is harmless (a daemon killed half-way does it again).
        apply(&[(file.clone(), Grant { gid: me, mode: 0o660, create: false })]).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = apply(&[(link.clone(), Grant { gid: me, mode: 0o666, create: false })]).unwrap_err();
        assert!(err.to_string().contains("link"), "{err}");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o660, "the target is untouched");
    }

    /// A kernel under a private directory, or one only root may read, is
    /// named with the reason before a VMM fails on it.
    #[test]
    fn a_file_others_cannot_reach_is_named_with_the_reason() {
        use std::os::unix::fs::PermissionsExt;
        let set = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        set(tmp.path(), 0o755);
        let dir = tmp.path().join("kernels");
        std::fs::create_dir(&dir).unwrap();
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        set(&dir, 0o755);
        set(&kernel, 0o644);
        assert_eq!(unreachable(&kernel, true), None);
        set(&kernel, 0o600);
        assert_eq!(unreachable(&kernel, true).as_deref(), Some("it is 0600, which others cannot read"));
        assert_eq!(unreachable(&kernel, false), None, "passing through is all a data dir needs");
        set(&kernel, 0o644);
        set(&dir, 0o700);
        let problem = unreachable(&kernel, true).unwrap();
        assert_eq!(problem, format!("{} is 0700, which others cannot pass through", dir.display()));
        let user = VmmUser { uid: 70001, gid: 70001, groups: vec![69999], data_dir: "/d".into() };
        let config = VmConfig { kernel: kernel.clone(), ..crate::hypervisor::conformance::bare_config() };
        check_outside(&config, &user).expect("a readable kernel in a private directory goes by descriptor");
        set(&kernel, 0o600);
        let err = check_outside(&config, &user).unwrap_err();
        assert!(err.to_string().contains(&kernel.display().to_string()) && err.to_string().contains("users = \"root\""), "{err}");
    }
}
