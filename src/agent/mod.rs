//! The host side of the host↔guest agent channel: how the daemon reaches
//! the agent in hypeman-init, and the requests it makes (today: setting the
//! guest's clock after a resume). The protocol is the contract's
//! (`hypeman_contract::agent`); this module owns the transports and the
//! client, and decides nothing about when to call them (the executor does,
//! after every resume).
//!
//! ```text
//!  QEMU               <guest>/agent.sock ── chardev socket ── virtserialport org.hypeman.agent.0
//!  Cloud Hypervisor   <guest>/agent.sock ── hybrid vsock: "CONNECT <port>\n" → "OK <n>\n" ── AF_VSOCK port
//! ```
//!
//! One connection per exchange: QEMU's chardev serves one client at a time,
//! and a connection left open would keep the next daemon out.

mod client;

pub use client::{AgentClient, ClockStep};

use crate::hypervisor::HypervisorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The channel's socket in the guest directory, for both backends (short:
/// unix socket paths are limited to 108 bytes, like `qmp.sock`'s).
pub const SOCKET_FILE: &str = "agent.sock";

/// How long one whole exchange (connect, hello, request) may take. A guest
/// without an agent (an init older than the channel) costs this much.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest handshake reply line Cloud Hypervisor sends (`OK <port>\n`).
const MAX_HANDSHAKE: usize = 64;

/// The channel's socket for a guest directory.
pub fn socket_path(guest_dir: &Path) -> PathBuf {
    guest_dir.join(SOCKET_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent channel at {}", socket.display())]
    NoChannel {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vsock handshake on {} was answered {reply:?}", socket.display())]
    Handshake { socket: PathBuf, reply: String },
    #[error("the agent channel {} failed", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent channel {} was closed", socket.display())]
    Closed { socket: PathBuf },
    #[error("no answer from the guest agent within {} ms (an init without an agent?)", waited.as_millis())]
    Timeout { waited: Duration },
    #[error("the guest agent refused {request}: {code}: {message}")]
    Refused { request: &'static str, code: hypeman_contract::agent::ErrorCode, message: String },
    #[error("the guest agent answered {request} with {got}")]
    Unexpected { request: &'static str, got: String },
}

/// How the host reaches one guest's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket whose bytes are the serial port's (QEMU's chardev).
    Serial { socket: PathBuf },
    /// Cloud Hypervisor's hybrid vsock: a unix socket, then a
    /// `CONNECT <port>` handshake to the guest's listening port.
    HybridVsock { socket: PathBuf, port: u32 },
}

impl Transport {
    /// The transport a guest of `kind` in `guest_dir` has.
    pub fn for_guest(kind: HypervisorKind, guest_dir: &Path) -> Transport {
        let socket = socket_path(guest_dir);
        match kind {
            HypervisorKind::Qemu => Transport::Serial { socket },
            HypervisorKind::CloudHypervisor => {
                Transport::HybridVsock { socket, port: hypeman_contract::agent::VSOCK_PORT }
            }
        }
    }

    pub fn socket(&self) -> &Path {
        match self {
            Transport::Serial { socket } | Transport::HybridVsock { socket, .. } => socket,
        }
    }

    /// A byte stream to the agent.
    pub async fn connect(&self) -> Result<UnixStream, AgentError> {
        let socket = self.socket().to_path_buf();
        let mut stream = UnixStream::connect(&socket)
            .await
            .map_err(|source| AgentError::NoChannel { socket: socket.clone(), source })?;
        if let Transport::HybridVsock { port, .. } = self {
            let io = |source| AgentError::Io { socket: socket.clone(), source };
            stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(io)?;
            // Byte by byte up to the newline: what follows it is the guest's.
            let mut line = Vec::new();
            loop {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await.map_err(io)? == 0 {
                    return Err(AgentError::Handshake { socket, reply: String::from_utf8_lossy(&line).into_owned() });
                }
                if byte[0] == b'\n' || line.len() >= MAX_HANDSHAKE {
                    break;
                }
                line.push(byte[0]);
            }
            let reply = String::from_utf8_lossy(&line).into_owned();
            if !reply.starts_with("OK ") {
                return Err(AgentError::Handshake { socket, reply });
            }
        }
        Ok(stream)
    }
}

/// Steps the guest's clock to the host's, within [`EXCHANGE_TIMEOUT`]:
/// connect, hello, `set_time`.
pub async fn step_clock(transport: &Transport) -> Result<ClockStep, AgentError> {
    step_clock_within(transport, EXCHANGE_TIMEOUT).await
}

pub async fn step_clock_within(transport: &Transport, timeout: Duration) -> Result<ClockStep, AgentError> {
    let exchange = async {
        let stream = transport.connect().await?;
        let mut client = AgentClient::new(stream, transport.socket().to_path_buf());
        let hello = client.hello().await?;
        client.set_time(hello).await
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| AgentError::Timeout { waited: timeout })?
}

#[cfg(test)]
mod tests;
