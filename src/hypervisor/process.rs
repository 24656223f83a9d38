//! VMM processes as the operating system sees them: spawning one detached
//! from the daemon, telling whether a recorded pid is still that process,
//! and waiting for it to go. Backend-neutral; no hypervisor protocol here.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open the VMM log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} exited before it could be recorded")]
    Vanished { pid: u32 },
}

impl ProcessError {
    /// As an `io::Error` of the kind its cause had, so a caller can tell a
    /// binary that is not installed (`NotFound`) from other failures.
    pub fn into_io(self) -> std::io::Error {
        let kind = match &self {
            ProcessError::Log { source, .. } | ProcessError::Spawn { source, .. } => source.kind(),
            ProcessError::Vanished { .. } => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, self)
    }
}

/// A process identity that survives pid reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// The state letter and start time of `pid` (`durable` reads them for
/// its temp names too).
fn stat(pid: u32) -> Option<(String, u64)> {
    crate::durable::process_stat(pid)
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`, in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// Whether `id` still names the same live process. A zombie counts as gone:
/// it has exited and only waits for its parent to reap it.
pub fn is_alive(id: ProcessId) -> bool {
    match stat(id.pid) {
        Some((state, start)) => start == id.start_time && state != "Z" && state != "X",
        None => false,
    }
}

/// Spawns `binary args…` in its own session so it outlives the daemon and
/// ignores the daemon's terminal signals; stdout and stderr append to `log`.
pub fn spawn_detached(binary: &Path, args: &[String], log: &Path) -> Result<ProcessId, ProcessError> {
    spawn_detached_split(binary, args, log, log)
}

/// [`spawn_detached`] with stdout appending to `stdout_log` and stderr to
/// `stderr_log` (Cloud Hypervisor writes the guest's serial port to stdout).
///
/// The child is reaped by a background thread while this daemon lives;
/// after a daemon restart it is re-parented to init (or the nearest
/// subreaper), which reaps it.
pub fn spawn_detached_split(
    binary: &Path,
    args: &[String],
    stdout_log: &Path,
    stderr_log: &Path,
) -> Result<ProcessId, ProcessError> {
    spawn_detached_as(binary, args, stdout_log, stderr_log, None)
}

/// [`spawn_detached_split`], the child becoming `user` (when given) before
/// it execs: its supplementary groups replaced by the user's, then its
/// gid, then its uid (in that order: after setuid it could change neither),
/// and `no_new_privs` set, so nothing it execs gains privileges and its
/// capabilities are gone. The logs are opened here, by the daemon, and
/// handed over as stdout and stderr.
pub fn spawn_detached_as(
    binary: &Path,
    args: &[String],
    stdout_log: &Path,
    stderr_log: &Path,
    user: Option<&super::VmmUser>,
) -> Result<ProcessId, ProcessError> {
    spawn_detached_with(binary, args, stdout_log, stderr_log, user, &[])
}

/// Where the child's copies of passed descriptors are parked before they
/// are moved to their numbers: above any number a child is given, so no
/// move overwrites a descriptor still to be moved.
const PARK_FD_FROM: i32 = 1024;

/// [`spawn_detached_as`], `pass` (descriptors and the numbers the child
/// finds them at) given to the child, such as its TAP and its volumes.
pub fn spawn_detached_with(
    binary: &Path,
    args: &[String],
    stdout_log: &Path,
    stderr_log: &Path,
    user: Option<&super::VmmUser>,
    pass: &[(std::os::fd::BorrowedFd<'_>, i32)],
) -> Result<ProcessId, ProcessError> {
    use std::os::fd::AsRawFd;
    let pass: Vec<(i32, i32)> = pass.iter().map(|(fd, at)| (fd.as_raw_fd(), *at)).collect();
    // Filled in the child; allocated here, as nothing may allocate there.
    let mut parked: Vec<i32> = vec![-1; pass.len()];
    let open_log = |log: &Path| {
        crate::durable::private_file()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Log { path: log.to_path_buf(), source })
    };
    let (out, err) = (open_log(stdout_log)?, open_log(stderr_log)?);
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let ids = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    // SAFETY: setsid, setgroups, setgid, setuid and prctl are
    // async-signal-safe and touch no Rust state; the group list was
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Parked first (close-on-exec copies, numbered above every
            // target), then moved: a descriptor whose own number is another's
            // target is never overwritten before it is moved. dup2 clears
            // close-on-exec on the target.
            for (slot, (fd, _)) in parked.iter_mut().zip(&pass) {
                *slot = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, PARK_FD_FROM);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (parked, (_, at)) in parked.iter().zip(&pass) {
                if libc::dup2(*parked, *at) != *at {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| ProcessError::Spawn { binary: binary.to_path_buf(), source })?;
    let pid = child.id();
    let start = start_time(pid);
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })
        .map_err(|source| ProcessError::Spawn { binary: binary.to_path_buf(), source })?;
    match start {
        Some(start_time) => Ok(ProcessId { pid, start_time }),
        None => Err(ProcessError::Vanished { pid }),
    }
}

/// The process's resident shared memory (`RssShmem` of
/// `/proc/<pid>/status`, KiB): a VMM's MAP_SHARED guest RAM that is backed
/// by pages, which drops as the VMM discards blocks the guest unplugged.
pub fn resident_shmem_kib(id: ProcessId) -> Option<u64> {
    if !is_alive(id) {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", id.pid)).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix("RssShmem:")?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// The process's resident memory (`VmRSS` of `/proc/<pid>/status`, KiB):
/// all guest RAM a VMM's guest has touched, and the VMM's own memory.
pub fn resident_kib(id: ProcessId) -> Option<u64> {
    if !is_alive(id) {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", id.pid)).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix("VmRSS:")?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Sends `sig` to the process if it is still `id`.
pub fn signal(id: ProcessId, sig: nix::sys::signal::Signal) -> bool {
    if !is_alive(id) {
        return false;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(id.pid as i32), sig).is_ok()
}

/// Waits until `id` is gone; `false` if it still lives after `timeout`.
pub async fn wait_gone(id: ProcessId, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(id) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGKILLs `id` (if it is still that process) and waits until it is gone;
/// `false` if it still lives after `timeout`.
pub async fn kill(id: ProcessId, timeout: Duration) -> bool {
    signal(id, nix::sys::signal::Signal::SIGKILL);
    wait_gone(id, timeout).await
}

/// How long `log` is now: where the output of a VMM about to start begins.
pub fn log_end(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// The last lines a VMM wrote to its log since byte `from` (see
/// [`log_end`]) on one line, for an error message: the output of earlier
/// attempts, appended to the same log, is not this one's reason.
pub fn log_tail(log: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(log) {
        let from = if file.metadata().is_ok_and(|m| m.len() < from) { 0 } else { from };
        let _ = file.seek(SeekFrom::Start(from)).and_then(|_| file.read_to_end(&mut bytes));
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The live process whose command line names `socket`, if any: a VMM that
/// was started but not yet recorded when the daemon died.
pub fn find_by_argument(socket: &Path) -> Option<ProcessId> {
    let needle = socket.as_os_str().as_encoded_bytes();
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let hit = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.windows(needle.len().max(1)).any(|w| w == needle));
        if hit {
            if let Some(start_time) = start_time(pid) {
                let id = ProcessId { pid, start_time };
                if is_alive(id) {
                    return Some(id);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VMM binary that is not installed stays `NotFound` through the
    /// backend's `io::Error`, which the error policy reads as "needs a
    /// change" rather than something to retry.
    #[test]
    fn a_missing_binary_is_not_found_through_into_io() {
        let tmp = tempfile::tempdir().unwrap();
        let err = spawn_detached(Path::new("/nonexistent/qemu-system-x86_64"), &[], &tmp.path().join("vmm.log")).unwrap_err();
        assert_eq!(err.into_io().kind(), std::io::ErrorKind::NotFound);
        let log = spawn_detached(Path::new("/bin/true"), &[], &tmp.path().join("no/such/dir/vmm.log")).unwrap_err();
        assert_eq!(log.into_io().kind(), std::io::ErrorKind::NotFound, "the log's own error kind");
    }

    #[test]
    fn a_log_tail_is_of_this_start_only() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("vmm.log");
        assert_eq!(log_tail(&log, 0), "", "no log yet");
        std::fs::write(&log, "qemu: could not open kernel file\n").unwrap();
        let start = log_end(&log);
        assert_eq!(log_tail(&log, start), "", "an earlier attempt's line is not this one's");
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"one\ntwo\n").unwrap();
        assert_eq!(log_tail(&log, start), "one | two");
        // Rotated (truncated) since: all of it is new.
        std::fs::write(&log, "fresh\n").unwrap();
        assert_eq!(log_tail(&log, start), "fresh");
    }

    #[tokio::test]
    async fn detached_process_is_tracked_until_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let marker = dir.path().join("marker-socket-path");
        // `tail -f` neither forks nor execs: the marker stays in the argv of
        // exactly one process, as a VMM's socket path does.
        std::fs::write(&marker, "started\n").unwrap();
        let id = spawn_detached(
            Path::new("tail"),
            &["-f".into(), marker.display().to_string()],
            &log,
        )
        .unwrap();
        assert!(is_alive(id));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("started") {
            assert!(Instant::now() < deadline, "the child never wrote to its log");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Its own session: not in the daemon's process group.
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(id.pid as i32))).unwrap();
        assert_eq!(sid.as_raw() as u32, id.pid);
        assert_eq!(find_by_argument(&marker).map(|p| p.pid), Some(id.pid));
        // A different start time is a different process.
        assert!(!is_alive(ProcessId { pid: id.pid, start_time: id.start_time + 1 }));
        assert!(signal(id, nix::sys::signal::Signal::SIGKILL));
        assert!(wait_gone(id, Duration::from_secs(5)).await);
        assert!(!is_alive(id));
        assert!(find_by_argument(&marker).is_none());
    }

    #[tokio::test]
    async fn split_logs_take_stdout_and_stderr_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("app.log"), dir.path().join("vmm.log"));
        std::fs::write(&out, "before\n").unwrap();
        let script = "echo to-stdout; echo to-stderr >&2".to_string();
        let id = spawn_detached_split(Path::new("sh"), &["-c".into(), script], &out, &err).unwrap();
        assert!(wait_gone(id, Duration::from_secs(5)).await);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "before\nto-stdout\n", "appended, not truncated");
        assert_eq!(std::fs::read_to_string(&err).unwrap(), "to-stderr\n");
    }

    /// Run as root only (the daemon's case): the child has the uid, gid
    /// and groups asked for and no capabilities.
    #[tokio::test]
    async fn a_child_spawned_as_a_user_has_its_ids_and_no_capabilities() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.log");
        let user = super::super::VmmUser { uid: 70123, gid: 70123, groups: vec![69999], data_dir: dir.path().into() };
        let script = "grep -E '^(Uid|Gid|Groups|CapEff|NoNewPrivs):' /proc/self/status".to_string();
        let id = spawn_detached_as(Path::new("sh"), &["-c".into(), script], &out, &out, Some(&user)).unwrap();
        assert!(wait_gone(id, Duration::from_secs(5)).await);
        let status = std::fs::read_to_string(&out).unwrap();
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
        assert_eq!(field("Uid:").as_deref(), Some("70123 70123 70123 70123"), "{status}");
        assert_eq!(field("Gid:").as_deref(), Some("70123 70123 70123 70123"), "{status}");
        assert_eq!(field("Groups:").as_deref(), Some("69999"), "{status}");
        assert_eq!(field("CapEff:").as_deref(), Some("0000000000000000"), "{status}");
        assert_eq!(field("NoNewPrivs:").as_deref(), Some("1"), "{status}");
    }

    /// Descriptors reach the child at their numbers, even when each one's
    /// own number is the other's target (moved naively, the first move
    /// would overwrite the second descriptor).
    #[tokio::test]
    async fn passed_descriptors_arrive_at_their_numbers_even_when_crossed() {
        use std::os::fd::{AsFd, AsRawFd};
        let dir = tempfile::tempdir().unwrap();
        let (a, b, out) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("out.log"));
        std::fs::write(&a, "from-a\n").unwrap();
        std::fs::write(&b, "from-b\n").unwrap();
        let (fa, fb) = (std::fs::File::open(&a).unwrap(), std::fs::File::open(&b).unwrap());
        let (na, nb) = (fa.as_raw_fd(), fb.as_raw_fd());
        // `a` goes to `b`'s number and `b` to `a`'s.
        let script = format!("cat /proc/self/fd/{nb}; cat /proc/self/fd/{na}");
        let pass = [(fa.as_fd(), nb), (fb.as_fd(), na)];
        let id = spawn_detached_with(Path::new("sh"), &["-c".into(), script], &out, &out, None, &pass).unwrap();
        assert!(wait_gone(id, Duration::from_secs(5)).await);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "from-a\nfrom-b\n");
    }

    #[test]
    fn missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = spawn_detached(Path::new("/nonexistent/vmm"), &[], &dir.path().join("l")).unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err:?}");
    }

    #[test]
    fn resident_shmem_of_self_is_read() {
        let me = ProcessId { pid: std::process::id(), start_time: start_time(std::process::id()).unwrap() };
        assert!(resident_shmem_kib(me).is_some());
        assert_eq!(resident_shmem_kib(ProcessId { start_time: me.start_time + 1, ..me }), None);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t));
        assert!(is_alive(ProcessId { pid: me, start_time: t }));
        assert_eq!(start_time(u32::MAX), None);
    }
}
