//! The VM's hybrid vsock device and, behind it, what a guest running
//! hypeman-init's agent would answer. Cloud Hypervisor binds the device's
//! unix socket when it creates (or restores) the VM; a host connects, sends
//! `CONNECT <port>\n` and gets `OK <n>\n` when the guest listens on that
//! port, or a closed connection when nothing does.
//!
//! The emulated guest listens on the agent's port and speaks the agent
//! protocol (`hypeman_contract::agent`): hello, ping, `set_time`. Its wall
//! clock is the host's plus an offset: zero at boot, and after a restore as
//! far behind as the snapshot is old (a restored guest's clock stands where
//! it was when the snapshot was taken), until `set_time` steps it.
//!
//! Not emulated: guest-initiated connections (`<socket>_<port>`), and a
//! guest without an agent (use a real guest for that).

use hypeman_contract::agent::{negotiate, Decoder, ErrorCode, Frame, Message, TimeSource, VSOCK_PORT};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the accept loop looks at its stop flag.
const POLL: Duration = Duration::from_millis(10);

/// The guest side of one VM's vsock device, served on a thread until
/// dropped.
#[derive(Debug)]
pub struct GuestAgent {
    stop: Arc<AtomicBool>,
    /// Guest clock minus host clock, in ns.
    offset_ns: Arc<Mutex<i64>>,
}

fn realtime_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

impl GuestAgent {
    /// Binds the device's socket, as `config.vsock.socket` names it, and
    /// serves it; `None` when the VM has no vsock device. `behind` is how
    /// far the guest's clock starts behind the host's. A socket file left
    /// at the path (by an earlier VMM) is replaced. Whether the real VMM
    /// replaces one or fails to bind is not known here, so hypeman removes
    /// it before every create and restore anyway.
    pub fn start(config: &serde_json::Value, behind: Duration) -> Result<Option<GuestAgent>, String> {
        let Some(socket) = config.pointer("/vsock/socket").and_then(serde_json::Value::as_str) else {
            return Ok(None);
        };
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|e| format!("Error creating vsock device: cannot bind {socket}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| format!("vsock socket {socket}: {e}"))?;
        let agent = GuestAgent {
            stop: Arc::new(AtomicBool::new(false)),
            offset_ns: Arc::new(Mutex::new(-(behind.as_nanos() as i64))),
        };
        let (stop, offset) = (agent.stop.clone(), agent.offset_ns.clone());
        let socket = PathBuf::from(socket);
        std::thread::spawn(move || accept_loop(&listener, &socket, &stop, &offset));
        Ok(Some(agent))
    }

    /// How far behind the host's a guest restored from the snapshot in
    /// `dir` starts: the age of its state file.
    pub fn snapshot_age(dir: &Path) -> Duration {
        std::fs::metadata(dir.join("state.json"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    }
}

impl Drop for GuestAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: &UnixListener, socket: &Path, stop: &AtomicBool, offset: &Arc<Mutex<i64>>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let offset = offset.clone();
                let socket = socket.to_path_buf();
                std::thread::spawn(move || {
                    if let Err(e) = connection(stream, &offset) {
                        eprintln!("fake-cloud-hypervisor: vsock {}: {e}", socket.display());
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn connection(stream: UnixStream, offset: &Mutex<i64>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let port = line.trim_end().strip_prefix("CONNECT ").and_then(|p| p.parse::<u32>().ok());
    if port != Some(VSOCK_PORT) {
        // Nothing listens there: the real VMM closes the connection.
        return Ok(());
    }
    let mut writer = stream;
    // The host-side port Cloud Hypervisor allocates for the connection.
    writer.write_all(b"OK 1073741824\n")?;
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        for frame in decoder.push(&buf[..n]).into_iter().flatten() {
            let message = match frame.message {
                Message::Hello { min_version, max_version } => match negotiate(min_version, max_version) {
                    Some(version) => Message::HelloReply { version, agent: "fake-cloud-hypervisor guest".into() },
                    None => Message::Error { code: ErrorCode::Version, message: "no common version".into() },
                },
                Message::Ping { payload } => Message::Pong { payload },
                Message::SetTime { host_realtime_ns } => {
                    let mut offset = offset.lock().unwrap_or_else(|e| e.into_inner());
                    let before_ns = realtime_ns() + *offset;
                    *offset = host_realtime_ns - realtime_ns();
                    Message::TimeSet { before_ns, after_ns: realtime_ns() + *offset, source: TimeSource::Sent }
                }
                Message::Unknown { kind, .. } => Message::Error { code: ErrorCode::Unsupported, message: format!("kind {kind}") },
                Message::HelloReply { .. } | Message::Pong { .. } | Message::TimeSet { .. } | Message::Error { .. } => continue,
            };
            writer.write_all(&Frame { message, ..frame }.encode())?;
        }
    }
}
