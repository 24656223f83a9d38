//! Running the app as PID 1's only child: fork, drop to the app's user,
//! exec; then forward SIGINT/SIGHUP to it, stop it on the power button or a
//! SIGTERM/SIGPWR to init (SIGTERM to its process group, SIGKILL after a
//! grace), and reap every zombie (orphans are re-parented to PID 1) until
//! the app itself exits.
//!
//! Signals are blocked and read from a signalfd that is polled together
//! with the ACPI event socket, so there are no async handlers and no races
//! between a SIGCHLD and the wait loop.
//! An exec failure in the child travels back over a close-on-exec pipe, so
//! init reports it as its own error instead of as an exit status 127.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::acpi::{AcpiEvent, AcpiEvents};
use crate::error::InitError;
use hypeman_contract::console::{signal_name, AppExit, STOPPING_SUFFIX};

/// Everything the child needs, prepared before `fork` so the child does not
/// allocate.
pub struct Launch {
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub uid: u32,
    pub gid: u32,
}

/// Signals init passes on to the app instead of acting on them.
const FORWARDED: [libc::c_int; 2] = [libc::SIGINT, libc::SIGHUP];
/// Signals that ask init itself to stop the app and power off, like the
/// power button does.
const STOPPING: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGPWR];


/// Why init began to stop the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    PowerButton,
    Signal(libc::c_int),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::PowerButton => f.write_str("power button pressed"),
            StopReason::Signal(sig) => write!(f, "{} received", signal_name(*sig)),
        }
    }
}

/// What the supervisor did that the console should show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Forwarded(libc::c_int),
    Stopping(StopReason),
    Killing { waited: Duration },
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Forwarded(sig) => write!(f, "forwarding {} to the app", signal_name(*sig)),
            Notice::Stopping(why) => write!(f, "{why}{STOPPING_SUFFIX}"),
            Notice::Killing { waited } => {
                write!(
                    f,
                    "app still running {} s after SIGTERM, sending SIGKILL",
                    waited.as_secs()
                )
            }
        }
    }
}

/// The stop sequence as a pure state machine over time: the first request
/// sends SIGTERM and starts the clock, later ones change nothing, and once
/// the grace is over SIGKILL goes out exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopper {
    grace: Duration,
    /// When SIGTERM went out.
    since: Option<Instant>,
    killed: bool,
}

/// What the supervisor must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAction {
    None,
    Terminate,
    Kill { waited: Duration },
}

impl Stopper {
    pub fn new(grace: Duration) -> Stopper {
        Stopper {
            grace,
            since: None,
            killed: false,
        }
    }

    /// A stop was asked for at `now`.
    pub fn request(&mut self, now: Instant) -> StopAction {
        if self.since.is_some() {
            return StopAction::None;
        }
        self.since = Some(now);
        StopAction::Terminate
    }

    /// Time passed; `Kill` once the grace is over.
    pub fn tick(&mut self, now: Instant) -> StopAction {
        match self.since {
            Some(since) if !self.killed && now.duration_since(since) >= self.grace => {
                self.killed = true;
                StopAction::Kill {
                    waited: now.duration_since(since),
                }
            }
            Some(_) | None => StopAction::None,
        }
    }

    /// How long the loop may sleep before [`Stopper::tick`] has work:
    /// `None` for as long as it likes.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        match self.since {
            Some(since) if !self.killed => {
                Some((since + self.grace).saturating_duration_since(now))
            }
            Some(_) | None => None,
        }
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Starts the app and supervises it until it exits. `acpi`, when the
/// kernel offers ACPI events, is watched for the power button; it and a
/// SIGTERM/SIGPWR to init both start the stop sequence (see [`Stopper`]).
pub fn run(
    launch: &Launch,
    acpi: Option<&AcpiEvents>,
    grace: Duration,
    notice: impl Fn(Notice),
) -> Result<AppExit, InitError> {
    let argv = null_terminated(&launch.argv);
    let envp = null_terminated(&launch.envp);

    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut wanted: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; sigprocmask fills it in.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to local sigsets.
    unsafe {
        libc::sigemptyset(&mut wanted);
        libc::sigaddset(&mut wanted, libc::SIGCHLD);
        for sig in FORWARDED.iter().chain(&STOPPING) {
            libc::sigaddset(&mut wanted, *sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &wanted, &mut previous) != 0 {
            return Err(InitError::last_os("block signals"));
        }
    }
    // Blocked signals arrive on a descriptor, so one poll waits for them and
    // for the power button alike, without async handlers.
    // SAFETY: a valid sigset; the descriptor is owned right after.
    let raw = unsafe { libc::signalfd(-1, &wanted, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if raw < 0 {
        return Err(InitError::last_os("create the signal descriptor"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let signals = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(InitError::last_os("create the exec status pipe"));
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (status_read, status_write) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: init has another thread (the agent), so the child makes only
    // async-signal-safe calls on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(InitError::last_os("fork the app"));
    }
    if pid == 0 {
        // SAFETY: child side: only async-signal-safe calls, then exec or _exit.
        unsafe {
            let report = |fd: libc::c_int| -> ! {
                let errno = *libc::__errno_location();
                let bytes = errno.to_ne_bytes();
                libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127)
            };
            let fd = status_write.as_raw_fd();
            libc::sigprocmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
            // Its own session (and process group, whose id is its pid), so a
            // shell app's job control does not fight init and a stop reaches
            // everything the app started.
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

    let mut stopper = Stopper::new(grace);
    let act = |action: StopAction| match action {
        StopAction::None => {}
        StopAction::Terminate => {
            // SAFETY: signalling the app's process group (its pid, see setsid).
            unsafe { libc::kill(-pid, libc::SIGTERM) };
        }
        StopAction::Kill { waited } => {
            notice(Notice::Killing { waited });
            // SAFETY: as above.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    };
    loop {
        let mut polled = [
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: acpi.map_or(-1, AcpiEvents::raw_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = stopper.timeout(Instant::now()).map_or(-1, |d| {
            d.as_millis().min(i32::MAX as u128) as libc::c_int + 1
        });
        // SAFETY: two live pollfd entries; a negative fd is ignored by poll.
        let ready =
            unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(InitError::Sys {
                op: "wait for signals",
                source: err,
            });
        }
        if let Some(acpi) = acpi.filter(|_| polled[1].revents != 0) {
            if acpi.drain().iter().any(AcpiEvent::is_power_button) {
                if let action @ StopAction::Terminate = stopper.request(Instant::now()) {
                    notice(Notice::Stopping(StopReason::PowerButton));
                    act(action);
                }
            }
        }
        for sig in read_signals(&signals) {
            if sig == libc::SIGCHLD {
                if let Some(exit) = reap(pid) {
                    return Ok(exit);
                }
            } else if STOPPING.contains(&sig) {
                if let action @ StopAction::Terminate = stopper.request(Instant::now()) {
                    notice(Notice::Stopping(StopReason::Signal(sig)));
                    act(action);
                }
            } else {
                notice(Notice::Forwarded(sig));
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, sig) };
            }
        }
        act(stopper.tick(Instant::now()));
    }
}

/// The signal numbers waiting on a non-blocking signalfd.
fn read_signals(fd: &OwnedFd) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data filled in by the kernel.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: info is writable for `size` bytes.
        let got = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if got != size as isize {
            return out;
        }
        out.push(info.ssi_signo as libc::c_int);
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
    fn stop_lines_say_why_and_what() {
        assert_eq!(
            Notice::Stopping(StopReason::PowerButton).to_string(),
            "power button pressed, stopping app (SIGTERM)"
        );
        assert_eq!(
            Notice::Stopping(StopReason::Signal(libc::SIGTERM)).to_string(),
            "SIGTERM received, stopping app (SIGTERM)"
        );
        assert_eq!(
            Notice::Killing {
                waited: Duration::from_millis(10_400)
            }
            .to_string(),
            "app still running 10 s after SIGTERM, sending SIGKILL"
        );
    }

    #[test]
    fn stopper_terminates_once_then_kills_once_after_the_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut s = Stopper::new(grace);
        // Nothing asked: nothing to do, sleep as long as you like.
        assert_eq!(s.timeout(t0), None);
        assert_eq!(s.tick(t0 + Duration::from_secs(100)), StopAction::None);

        assert_eq!(s.request(t0), StopAction::Terminate);
        assert_eq!(
            s.timeout(t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        // A second press does not restart the clock or signal again.
        assert_eq!(s.request(t0 + Duration::from_secs(5)), StopAction::None);
        assert_eq!(s.tick(t0 + Duration::from_secs(9)), StopAction::None);
        assert_eq!(
            s.timeout(t0 + Duration::from_secs(11)),
            Some(Duration::ZERO)
        );
        assert_eq!(
            s.tick(t0 + Duration::from_secs(11)),
            StopAction::Kill {
                waited: Duration::from_secs(11)
            }
        );
        assert_eq!(s.tick(t0 + Duration::from_secs(12)), StopAction::None);
        assert_eq!(s.timeout(t0 + Duration::from_secs(12)), None);
    }
}
