//! Running the app as PID 1's only child: fork, drop to the app's user,
//! exec; then forward SIGTERM/SIGINT/SIGHUP to it and reap every zombie
//! (orphans are re-parented to PID 1) until the app itself exits.
//!
//! Signals are blocked and taken synchronously with `sigwaitinfo`, so there
//! are no async handlers and no races between a SIGCHLD and the wait loop.
//! An exec failure in the child travels back over a close-on-exec pipe, so
//! init reports it as its own error instead of as an exit status 127.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::InitError;

/// Everything the child needs, prepared before `fork` so the child does not
/// allocate.
pub struct Launch {
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub uid: u32,
    pub gid: u32,
}

/// How the app ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppExit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for AppExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppExit::Code(code) => write!(f, "app exited with status {code}"),
            AppExit::Signal(sig) => {
                write!(f, "app was killed by signal {sig} ({})", signal_name(*sig))
            }
        }
    }
}

/// Signals init passes on to the app instead of acting on them.
const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => "other",
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Starts the app and supervises it until it exits.
pub fn run(launch: &Launch, on_forward: impl Fn(libc::c_int)) -> Result<AppExit, InitError> {
    let argv = null_terminated(&launch.argv);
    let envp = null_terminated(&launch.envp);

    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut wanted: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to local sigsets.
    unsafe {
        libc::sigemptyset(&mut wanted);
        libc::sigaddset(&mut wanted, libc::SIGCHLD);
        for sig in FORWARDED {
            libc::sigaddset(&mut wanted, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &wanted, &mut previous) != 0 {
            return Err(InitError::last_os("block signals"));
        }
    }

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(InitError::last_os("create the exec status pipe"));
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (status_read, status_write) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: init is single-threaded, so the child may run arbitrary code;
    // it still only makes async-signal-safe calls on prepared data.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(InitError::last_os("fork the app"));
    }
    if pid == 0 {
        // SAFETY: child side: only async-signal-safe calls, then exec or _exit.
        unsafe {
            use std::os::fd::AsRawFd;
            let report = |fd: libc::c_int| -> ! {
                let errno = *libc::__errno_location();
                let bytes = errno.to_ne_bytes();
                libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127)
            };
            let fd = status_write.as_raw_fd();
            libc::sigprocmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
            // Its own session, so a shell app's job control does not fight init.
            libc::setsid();
            let groups = [launch.gid];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(launch.gid) != 0
                || libc::setuid(launch.uid) != 0
            {
                report(fd);
            }
            libc::execve(launch.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            report(fd)
        }
    }

    drop(status_write);
    let mut bytes = Vec::new();
    let mut pipe = std::fs::File::from(status_read);
    pipe.read_to_end(&mut bytes).map_err(|e| InitError::Sys {
        op: "read the exec status pipe",
        source: e,
    })?;
    if let Ok(errno) = <[u8; 4]>::try_from(bytes.as_slice()) {
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(InitError::Exec {
            program: launch.program.to_string_lossy().into_owned(),
            source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
        });
    }

    loop {
        // SAFETY: siginfo_t is plain data filled in by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers; the set's signals are blocked.
        let sig = unsafe { libc::sigwaitinfo(&wanted, &mut info) };
        if sig < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(InitError::Sys {
                op: "wait for signals",
                source: err,
            });
        }
        if sig == libc::SIGCHLD {
            if let Some(exit) = reap(pid) {
                return Ok(exit);
            }
        } else {
            on_forward(sig);
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Reaps every exited child; returns the app's exit if it was among them.
/// One SIGCHLD may stand for several exits, so this loops until none is left.
fn reap(app: libc::pid_t) -> Option<AppExit> {
    let mut app_exit = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return app_exit;
        }
        if pid == app {
            if libc::WIFEXITED(status) {
                app_exit = Some(AppExit::Code(libc::WEXITSTATUS(status)));
            } else if libc::WIFSIGNALED(status) {
                app_exit = Some(AppExit::Signal(libc::WTERMSIG(status)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_lines_are_what_the_host_greps_for() {
        assert_eq!(AppExit::Code(0).to_string(), "app exited with status 0");
        assert_eq!(AppExit::Code(3).to_string(), "app exited with status 3");
        assert_eq!(
            AppExit::Signal(15).to_string(),
            "app was killed by signal 15 (SIGTERM)"
        );
    }
}
