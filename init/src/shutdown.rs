//! The last act before power-off, after the app has ended: no process may
//! be left writing, every filesystem is synced, and what can be unmounted
//! is, the rest (the root overlay above all) remounted read-only, so the
//! overlay disk is clean when the VMM goes away.
//!
//! Which mounts to touch, and in what order, is decided by the pure
//! [`plan`] from `/proc/self/mounts`; the syscalls are in [`wind_down`].

use std::ffi::CString;
use std::time::{Duration, Instant};

/// How long processes left over after SIGKILL may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// Kernel filesystems: nothing on disk to protect, and `/proc` is how this
/// module reads the mount table.
const VIRTUAL: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "hugetlbfs",
    "rootfs",
];

/// What to do with one writable mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Unmount, or remount read-only if it is busy.
    Unmount(String),
    /// The root cannot be unmounted: remount read-only.
    RemountReadOnly(String),
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The writable disk-backed mounts of a `/proc/self/mounts` text, the last
/// mounted first (children before their parents).
pub fn plan(mounts: &str) -> Vec<Action> {
    let mut actions = Vec::new();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, target, fstype, options, ..] = fields.as_slice() else {
            continue;
        };
        if VIRTUAL.contains(fstype) || !options.split(',').any(|o| o == "rw") {
            continue;
        }
        let target = unescape(target);
        actions.push(if target == "/" {
            Action::RemountReadOnly(target)
        } else {
            Action::Unmount(target)
        });
    }
    actions.reverse();
    actions
}

/// How winding down went, for one console line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub killed: usize,
    pub unmounted: usize,
    pub read_only: usize,
    pub failed: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "synced; {} leftover process(es) killed, {} filesystem(s) unmounted, {} remounted read-only",
            self.killed, self.unmounted, self.read_only
        )?;
        if !self.failed.is_empty() {
            write!(f, "; still writable: {}", self.failed.join(" "))?;
        }
        Ok(())
    }
}

/// Kills whatever the app left behind, syncs, and unmounts or remounts
/// read-only every writable filesystem. Best effort: PID 1 powers off next
/// whatever happens, so failures are only reported.
pub fn wind_down() -> Summary {
    let mut summary = Summary::default();
    // SAFETY: kill(-1) from PID 1 signals every process but init itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            summary.killed += 1;
            continue;
        }
        // ECHILD (nothing left) or a child stuck in the kernel past the timeout.
        if pid < 0 || start.elapsed() >= REAP_TIMEOUT {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for action in plan(&table) {
        let (target, unmount) = match &action {
            Action::Unmount(t) => (t, true),
            Action::RemountReadOnly(t) => (t, false),
        };
        let Ok(c_target) = CString::new(target.as_str()) else {
            continue;
        };
        // SAFETY: NUL-terminated path; remount takes no source, type or data.
        unsafe {
            if unmount && libc::umount2(c_target.as_ptr(), 0) == 0 {
                summary.unmounted += 1;
            } else if libc::mount(
                std::ptr::null(),
                c_target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ) == 0
            {
                summary.read_only += 1;
            } else {
                summary.failed.push(target.clone());
            }
        }
    }
    // SAFETY: as above.
    unsafe { libc::sync() };
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_writable_disks_children_first_and_the_root_read_only() {
        let table = "\
overlay / overlay rw,relatime,lowerdir=/mnt/rootfs,upperdir=/mnt/overlay/upper 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
devtmpfs /dev devtmpfs rw,nosuid,size=4k 0 0
devpts /dev/pts devpts rw,nosuid,noexec,gid=5,mode=620 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev,noexec 0 0
/dev/vdd /data ext4 rw,relatime 0 0
/dev/vde /srv/static\\040files erofs ro,relatime 0 0
/dev/vdf /data/cache ext4 rw 0 0
";
        assert_eq!(
            plan(table),
            vec![
                Action::Unmount("/data/cache".into()),
                Action::Unmount("/data".into()),
                Action::RemountReadOnly("/".into()),
            ]
        );
        assert!(plan("").is_empty());
        assert!(plan("garbage\n").is_empty());
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert_eq!(unescape("/srv/a\\040b"), "/srv/a b");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn summary_line_names_what_stayed_writable() {
        let s = Summary {
            killed: 2,
            unmounted: 1,
            read_only: 1,
            failed: vec!["/data".into()],
        };
        assert_eq!(
            s.to_string(),
            "synced; 2 leftover process(es) killed, 1 filesystem(s) unmounted, 1 remounted read-only; still writable: /data"
        );
    }
}
