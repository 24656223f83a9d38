//! The guest agent: a thread of init that serves the host↔guest channel for
//! as long as the guest runs. Today it answers hello, ping and `set_time`
//! (the host sends it after every resume, because a restored guest's clock
//! stands where it was when the snapshot was taken); `hypeman exec` will
//! land on the same channel (see `hypeman_contract::agent`).
//!
//! ```text
//!  QEMU:              virtserialport org.hypeman.agent.0 ── /dev/vportNpM (found by name in sysfs)
//!  Cloud Hypervisor:  virtio-vsock ── AF_VSOCK listener on VSOCK_PORT, one host connection at a time
//! ```
//!
//! The channel outlives its host side: a serial port stays open while the
//! host disconnects and reconnects (a new daemon, a new VMM after a
//! restore), so the decoder is reset whenever the host is seen gone, and
//! the framing recovers from a half frame whenever it is not. The agent
//! must never take init down: it runs with every signal blocked (the
//! supervisor reads them from its signalfd), opens everything close-on-exec
//! (the app inherits nothing), and a panic in it ends only this thread
//! (see `main.rs`'s hook).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypeman_contract::agent::{
    negotiate, Decoder, ErrorCode, Frame, Message, TimeSource, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, SERIAL_PORT_NAME, VSOCK_PORT,
};

/// The agent thread's name, which the panic hook looks for.
pub const THREAD_NAME: &str = "agent";

/// How long the channel's device may take to appear after its driver loads.
const FIND_TIMEOUT: Duration = Duration::from_secs(10);
const FIND_POLL: Duration = Duration::from_millis(20);
/// While no host is connected to the serial port, `poll` reports a hang-up
/// at once; the agent looks again this often. A restore's `set_time` waits
/// at most this long for the agent to notice the new host.
const DISCONNECTED_POLL: Duration = Duration::from_millis(20);
/// A reply the host does not take within this long is dropped: a host that
/// stopped reading must not stall the next one.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The virtio device id of virtio-vsock.
const VIRTIO_ID_VSOCK: &str = "0x0013";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot {op} {what}")]
    Io {
        op: &'static str,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no agent channel appeared within {waited_s} s (no virtio port named {SERIAL_PORT_NAME}, no virtio-vsock device)")]
    NoChannel { waited_s: u64 },
}

impl AgentError {
    fn io(op: &'static str, what: impl std::fmt::Display, source: std::io::Error) -> AgentError {
        AgentError::Io { op, what: what.to_string(), source }
    }
}

/// Where the host reaches this guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A virtio-serial port's character device.
    Serial(PathBuf),
    /// A virtio-vsock device exists: listen on [`VSOCK_PORT`].
    Vsock,
}

/// The device of the virtio-serial port named `name`, from the port
/// directories under `class` (`/sys/class/virtio-ports`).
pub fn serial_port(class: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class).ok()?;
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim_end() == name))
        .map(|e| dev.join(e.file_name()))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Whether a virtio device under `devices` (`/sys/bus/virtio/devices`) is a
/// vsock one.
pub fn has_vsock(devices: &Path) -> bool {
    std::fs::read_dir(devices).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| std::fs::read_to_string(e.path().join("device")).is_ok_and(|id| id.trim() == VIRTIO_ID_VSOCK))
    })
}

/// The channel this guest has, looking until `timeout`: a named serial port
/// wins (QEMU), else a vsock device (Cloud Hypervisor).
pub fn find_channel(sys: &Path, dev: &Path, timeout: Duration) -> Result<Channel, AgentError> {
    let start = Instant::now();
    loop {
        if let Some(port) = serial_port(&sys.join("class/virtio-ports"), dev, SERIAL_PORT_NAME) {
            if port.exists() {
                return Ok(Channel::Serial(port));
            }
        }
        if has_vsock(&sys.join("bus/virtio/devices")) {
            return Ok(Channel::Vsock);
        }
        if start.elapsed() >= timeout {
            return Err(AgentError::NoChannel { waited_s: timeout.as_secs() });
        }
        std::thread::sleep(FIND_POLL);
    }
}

/// What a clock step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stepped {
    pub before_ns: i64,
    pub after_ns: i64,
    pub source: TimeSource,
}

/// The guest's wall clock, behind a trait so [`answer`] is tested without
/// stepping the test machine's clock.
pub trait GuestClock {
    /// Steps `CLOCK_REALTIME` to the host's time: `sent_ns` as the host sent
    /// it, or a better reading of the host clock if the guest has one.
    fn step(&mut self, sent_ns: i64) -> std::io::Result<Stepped>;
}

/// The reply to one frame from the host, if it needs one.
pub fn answer(frame: Frame, clock: &mut dyn GuestClock) -> Option<Frame> {
    let reply = |message| Some(Frame { stream: frame.stream, request: frame.request, message });
    let error = |code, message: String| reply(Message::Error { code, message });
    if frame.stream != 0 {
        return error(ErrorCode::Unsupported, format!("this agent has no stream {}", frame.stream));
    }
    match frame.message {
        Message::Hello { min_version, max_version } => match negotiate(min_version, max_version) {
            Some(version) => reply(Message::HelloReply { version, agent: env!("CARGO_PKG_VERSION").to_string() }),
            None => error(
                ErrorCode::Version,
                format!("the host speaks {min_version}..={max_version}, this agent {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"),
            ),
        },
        Message::Ping { payload } => reply(Message::Pong { payload }),
        Message::SetTime { host_realtime_ns } => match clock.step(host_realtime_ns) {
            Ok(s) => reply(Message::TimeSet { before_ns: s.before_ns, after_ns: s.after_ns, source: s.source }),
            Err(e) => error(ErrorCode::Failed, format!("cannot set the clock: {e}")),
        },
        Message::Unknown { kind, .. } => error(ErrorCode::Unsupported, format!("this agent does not know frame kind {kind}")),
        // Replies: the agent sends no requests, so none is expected.
        Message::HelloReply { .. } | Message::Pong { .. } | Message::TimeSet { .. } | Message::Error { .. } => None,
    }
}

/// The offset of the PTP clock from the system clock, from
/// `PTP_SYS_OFFSET`'s samples: system, PTP, system, … system (ns). Each PTP
/// reading is compared with the midpoint of the system readings around it,
/// and the sample with the tightest bracket wins.
pub fn ptp_offset_ns(samples: &[i64]) -> Option<i64> {
    samples
        .windows(3)
        .step_by(2)
        .map(|w| (w[2] - w[0], w[1] - (w[0] + (w[2] - w[0]) / 2)))
        .min_by_key(|(width, _)| *width)
        .map(|(_, offset)| offset)
}

/// The real clock: `clock_settime(CLOCK_REALTIME)`, through the host's
/// `ptp_kvm` clock where there is one.
pub struct SystemClock {
    ptp: Option<File>,
}

/// `PTP_SYS_OFFSET`'s argument (linux/ptp_clock.h).
#[repr(C)]
struct PtpSysOffset {
    n_samples: u32,
    rsv: [u32; 3],
    ts: [PtpClockTime; 2 * PTP_MAX_SAMPLES + 1],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PtpClockTime {
    sec: i64,
    nsec: u32,
    reserved: u32,
}

const PTP_MAX_SAMPLES: usize = 25;
/// `_IOW('=', 5, struct ptp_sys_offset)`.
const PTP_SYS_OFFSET: libc::c_ulong = (1 << 30)
    | ((std::mem::size_of::<PtpSysOffset>() as libc::c_ulong) << 16)
    | ((b'=' as libc::c_ulong) << 8)
    | 5;

impl SystemClock {
    /// Opens the `ptp_kvm` clock if `sys` lists one (only on KVM hosts).
    pub fn new(sys: &Path, dev: &Path) -> SystemClock {
        let ptp = std::fs::read_dir(sys.join("class/ptp")).ok().and_then(|entries| {
            entries.flatten().find_map(|e| {
                let name = std::fs::read_to_string(e.path().join("clock_name")).ok()?;
                if !name.contains("KVM") {
                    return None;
                }
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(dev.join(e.file_name()))
                    .ok()
            })
        });
        SystemClock { ptp }
    }

    fn realtime_ns() -> i64 {
        // SAFETY: timespec is plain data, filled in by clock_gettime.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: a valid clock id and a pointer to a local timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    }

    fn set_realtime_ns(ns: i64) -> std::io::Result<()> {
        let ts = libc::timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) };
        // SAFETY: a valid clock id and a pointer to an initialised timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The host clock's offset from ours, read through `ptp_kvm`.
    fn ptp_offset(ptp: &File) -> std::io::Result<i64> {
        let zero = PtpClockTime { sec: 0, nsec: 0, reserved: 0 };
        let mut arg = PtpSysOffset { n_samples: 5, rsv: [0; 3], ts: [zero; 2 * PTP_MAX_SAMPLES + 1] };
        // SAFETY: PTP_SYS_OFFSET reads n_samples and fills ts, which has
        // room for the maximum number of samples.
        if unsafe { libc::ioctl(ptp.as_raw_fd(), PTP_SYS_OFFSET, &mut arg) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = 2 * arg.n_samples as usize + 1;
        let samples: Vec<i64> = arg.ts[..n].iter().map(|t| t.sec * 1_000_000_000 + i64::from(t.nsec)).collect();
        ptp_offset_ns(&samples).ok_or_else(|| std::io::Error::other("no PTP samples"))
    }
}

impl GuestClock for SystemClock {
    fn step(&mut self, sent_ns: i64) -> std::io::Result<Stepped> {
        // The PTP reading is the host clock now, without the message's
        // transit time; the sent time is the fallback.
        let offset = self.ptp.as_ref().map(Self::ptp_offset);
        let before_ns = Self::realtime_ns();
        let (target, source) = match offset {
            Some(Ok(offset)) => (before_ns + offset, TimeSource::PtpKvm),
            Some(Err(_)) | None => (sent_ns, TimeSource::Sent),
        };
        Self::set_realtime_ns(target)?;
        Ok(Stepped { before_ns, after_ns: Self::realtime_ns(), source })
    }
}

/// Starts the agent thread with every signal blocked, so process-directed
/// signals reach the supervisor's signalfd and never this thread.
pub fn start(say: fn(&str)) {
    // SAFETY: sigset_t is plain data, filled in by sigfillset/sigprocmask.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to local sigsets; the mask is restored below.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
    }
    let spawned = std::thread::Builder::new().name(THREAD_NAME.to_string()).spawn(move || {
        if let Err(e) = run(Path::new("/sys"), Path::new("/dev"), say) {
            say(&format!("agent: stopped: {}", crate::error::chain(&e)));
        }
    });
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    if let Err(e) = spawned {
        say(&format!("warning: the agent did not start: {e}"));
    }
}

fn run(sys: &Path, dev: &Path, say: fn(&str)) -> Result<(), AgentError> {
    let channel = find_channel(sys, dev, FIND_TIMEOUT)?;
    let mut clock = SystemClock::new(sys, dev);
    let ptp = if clock.ptp.is_some() { ", host clock through ptp_kvm" } else { "" };
    match channel {
        Channel::Serial(port) => {
            say(&format!("agent: on {} ({SERIAL_PORT_NAME}){ptp}", port.display()));
            serve_serial(&port, &mut clock)
        }
        Channel::Vsock => {
            say(&format!("agent: on vsock port {VSOCK_PORT}{ptp}"));
            serve_vsock(&mut clock)
        }
    }
}

/// Answers every complete frame in `bytes`; broken frames are dropped (the
/// framing resynchronises at the next one).
fn serve_bytes(fd: RawFd, decoder: &mut Decoder, bytes: &[u8], clock: &mut dyn GuestClock) {
    for frame in decoder.push(bytes).into_iter().flatten() {
        if let Some(reply) = answer(frame, clock) {
            // A reply the host did not take is its loss; the next frame
            // starts with a delimiter, so a cut one cannot glue onto it.
            let _ = write_within(fd, &reply.encode(), WRITE_TIMEOUT);
        }
    }
}

/// Writes all of `bytes` to the non-blocking `fd`, waiting for room at
/// most `timeout` in all.
fn write_within(fd: RawFd, mut bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !bytes.is_empty() {
        // SAFETY: writing from a live slice of the given length.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            bytes = &bytes[n as usize..];
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !poll_one(fd, libc::POLLOUT, Some(left))? {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
            _ => return Err(err),
        }
    }
    Ok(())
}

/// Waits until `fd` has `events` (or a hang-up); false on timeout.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    loop {
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

fn serve_serial(port: &Path, clock: &mut dyn GuestClock) -> Result<(), AgentError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(port)
        .map_err(|e| AgentError::io("open", port.display(), e))?;
    let fd = file.as_raw_fd();
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        poll_one(fd, libc::POLLIN, None).map_err(|e| AgentError::io("poll", port.display(), e))?;
        match file.read(&mut buf) {
            // No host connected (the port reports a hang-up at once, so
            // look again after a while): what it left half-sent is void.
            Ok(0) => {
                decoder.reset();
                std::thread::sleep(DISCONNECTED_POLL);
            }
            Ok(n) => serve_bytes(fd, &mut decoder, &buf[..n], clock),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                // Woken by a hang-up with nothing to read.
                std::thread::sleep(DISCONNECTED_POLL);
            }
            Err(e) => return Err(AgentError::io("read", port.display(), e)),
        }
    }
}

/// A listening AF_VSOCK socket on `port`, any CID.
fn vsock_listener(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain data; the fields that matter are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: addr is a valid sockaddr_vm of the size given.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen on our own socket.
    if bound != 0 || unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Serves one host connection at a time; a new one replaces the old (after
/// a restore the old one is dead without knowing it).
fn serve_vsock(clock: &mut dyn GuestClock) -> Result<(), AgentError> {
    let what = format!("vsock port {VSOCK_PORT}");
    let listener = vsock_listener(VSOCK_PORT).map_err(|e| AgentError::io("listen on", &what, e))?;
    let mut conn: Option<(File, Decoder)> = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: conn.as_ref().map_or(-1, |(f, _)| f.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two live pollfd entries; a negative fd is ignored.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(AgentError::io("poll", &what, err));
        }
        if fds[0].revents != 0 {
            // SAFETY: accept on our listener; no peer address wanted.
            let raw = unsafe {
                libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            };
            if raw >= 0 {
                // SAFETY: a fresh descriptor nobody else owns.
                conn = Some((unsafe { File::from_raw_fd(raw) }, Decoder::new()));
                continue;
            }
        }
        if fds[1].revents != 0 {
            if let Some((file, decoder)) = conn.as_mut() {
                match file.read(&mut buf) {
                    Ok(0) => conn = None,
                    Ok(n) => {
                        let fd = file.as_raw_fd();
                        serve_bytes(fd, decoder, &buf[..n], clock);
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                    Err(_) => conn = None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeClock {
        now: i64,
        fail: bool,
    }

    impl GuestClock for FakeClock {
        fn step(&mut self, sent_ns: i64) -> std::io::Result<Stepped> {
            if self.fail {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            let before_ns = self.now;
            self.now = sent_ns;
            Ok(Stepped { before_ns, after_ns: self.now, source: TimeSource::Sent })
        }
    }

    fn req(request: u32, message: Message) -> Frame {
        Frame { stream: 0, request, message }
    }

    #[test]
    fn set_time_steps_the_clock_and_reports_before_and_after() {
        let mut clock = FakeClock { now: 1_000, fail: false };
        let reply = answer(req(7, Message::SetTime { host_realtime_ns: 43_000 }), &mut clock).unwrap();
        assert_eq!(reply, req(7, Message::TimeSet { before_ns: 1_000, after_ns: 43_000, source: TimeSource::Sent }));
        assert_eq!(clock.now, 43_000);
        let mut broken = FakeClock { now: 0, fail: true };
        match answer(req(8, Message::SetTime { host_realtime_ns: 1 }), &mut broken) {
            Some(Frame { request: 8, message: Message::Error { code: ErrorCode::Failed, message }, .. }) => {
                assert!(message.starts_with("cannot set the clock"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hello_ping_and_the_unknown_are_answered_by_request_id() {
        let mut clock = FakeClock { now: 0, fail: false };
        let hello = answer(req(1, Message::Hello { min_version: 1, max_version: 5 }), &mut clock).unwrap();
        assert!(matches!(hello.message, Message::HelloReply { version: PROTOCOL_VERSION, .. }), "{hello:?}");
        assert_eq!(hello.request, 1);
        let too_new = answer(req(2, Message::Hello { min_version: 9, max_version: 9 }), &mut clock).unwrap();
        assert!(matches!(too_new.message, Message::Error { code: ErrorCode::Version, .. }), "{too_new:?}");
        assert_eq!(answer(req(3, Message::Ping { payload: 77 }), &mut clock), Some(req(3, Message::Pong { payload: 77 })));
        let unknown = answer(req(4, Message::Unknown { kind: 0x12, body: vec![] }), &mut clock).unwrap();
        assert!(matches!(unknown.message, Message::Error { code: ErrorCode::Unsupported, .. }), "{unknown:?}");
        let stream = answer(Frame { stream: 3, request: 5, message: Message::Ping { payload: 0 } }, &mut clock).unwrap();
        assert!(matches!(stream.message, Message::Error { code: ErrorCode::Unsupported, .. }), "{stream:?}");
        assert_eq!(stream.stream, 3);
        // A stray reply gets no answer (no ping-pong between two agents).
        assert_eq!(answer(req(6, Message::Pong { payload: 1 }), &mut clock), None);
        assert_eq!(clock.now, 0, "nothing but set_time touches the clock");
    }

    #[test]
    fn the_port_is_found_by_name_and_vsock_by_device_id() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        let dev = tmp.path().join("dev");
        let ports = sys.join("class/virtio-ports");
        for (port, name) in [("vport0p0", "console-ish"), ("vport0p1", SERIAL_PORT_NAME)] {
            std::fs::create_dir_all(ports.join(port)).unwrap();
            std::fs::write(ports.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(serial_port(&ports, &dev, SERIAL_PORT_NAME), Some(dev.join("vport0p1")));
        assert_eq!(serial_port(&ports, &dev, "org.other"), None);
        // The sysfs entry without its device node is not a channel yet.
        let quick = Duration::from_millis(30);
        assert!(matches!(find_channel(&sys, &dev, quick), Err(AgentError::NoChannel { .. })));
        let devices = sys.join("bus/virtio/devices");
        std::fs::create_dir_all(devices.join("virtio0")).unwrap();
        std::fs::write(devices.join("virtio0/device"), "0x0003\n").unwrap();
        assert!(!has_vsock(&devices));
        std::fs::create_dir_all(devices.join("virtio1")).unwrap();
        std::fs::write(devices.join("virtio1/device"), "0x0013\n").unwrap();
        assert_eq!(find_channel(&sys, &dev, quick).unwrap(), Channel::Vsock);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vport0p1"), "").unwrap();
        assert_eq!(find_channel(&sys, &dev, quick).unwrap(), Channel::Serial(dev.join("vport0p1")));
    }

    #[test]
    fn the_ptp_offset_uses_the_tightest_sample() {
        // sys, ptp, sys, ptp, sys: the second bracket (10 ns) beats the
        // first (100 ns); its midpoint is 105, the host clock read 5157.
        assert_eq!(ptp_offset_ns(&[0, 5_050, 100, 5_157, 110]), Some(5_052));
        assert_eq!(ptp_offset_ns(&[0, 5_050, 100, 5_157, 300]), Some(5_000));
        assert_eq!(ptp_offset_ns(&[1_000, 900, 1_010]), Some(-105));
        assert_eq!(ptp_offset_ns(&[5]), None);
        assert_eq!(std::mem::size_of::<PtpSysOffset>(), 832, "the kernel's struct size");
        assert_eq!(PTP_SYS_OFFSET, 0x4340_3d05);
    }

    #[test]
    fn replies_go_out_and_a_stale_half_frame_is_skipped() {
        let (mut host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        guest.set_nonblocking(true).unwrap();
        let mut clock = FakeClock { now: 0, fail: false };
        let mut decoder = Decoder::new();
        let stale = req(1, Message::SetTime { host_realtime_ns: 5 }).encode();
        let mut bytes = stale[..7].to_vec();
        bytes.extend(req(2, Message::Ping { payload: 4 }).encode());
        serve_bytes(guest.as_raw_fd(), &mut decoder, &bytes, &mut clock);
        let mut got = vec![0u8; 256];
        let n = host.read(&mut got).unwrap();
        let replies: Vec<Frame> = Decoder::new().push(&got[..n]).into_iter().map(Result::unwrap).collect();
        assert_eq!(replies, [req(2, Message::Pong { payload: 4 })]);
        assert_eq!(clock.now, 0, "the cut-off set_time was not acted on");
    }

    #[test]
    fn a_host_that_stops_reading_costs_one_timeout() {
        let (_host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        guest.set_nonblocking(true).unwrap();
        let big = vec![1u8; 8 << 20];
        let t = Instant::now();
        let err = write_within(guest.as_raw_fd(), &big, Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
