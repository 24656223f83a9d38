//! The CLI's side of the API: one request, one reply. "No daemon answers"
//! (no socket, or nothing listening on it) is not an error: the caller
//! then shows the stored view, and says so.

use super::protocol::{ErrorKind, Op, Request, VERSION};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long the daemon may take to answer. Its answers come from memory;
/// this bounds a daemon that is wedged.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest reply read (10,000 instances' status is a few MiB).
const MAX_REPLY: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot talk to the daemon on {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon on {} did not answer within {}s", socket.display(), REPLY_TIMEOUT.as_secs())]
    Timeout { socket: PathBuf },
    #[error("the daemon's reply does not parse: {0}")]
    Reply(String),
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
}

/// A reply whose result is read straight into `T` (no JSON tree between).
#[derive(serde::Deserialize)]
struct TypedReply<T> {
    ok: bool,
    result: Option<T>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    kind: Option<ErrorKind>,
}

/// Asks the daemon on `data_dir`; `Ok(None)` when no daemon answers there.
pub async fn ask(data_dir: &Path, op: Op) -> Result<Option<serde_json::Value>, ClientError> {
    ask_as(data_dir, op).await
}

/// [`ask`], the result read as a `T`.
pub async fn ask_as<T: serde::de::DeserializeOwned>(data_dir: &Path, op: Op) -> Result<Option<T>, ClientError> {
    let socket = super::socket_path(data_dir);
    let io = |source| ClientError::Io { socket: socket.clone(), source };
    let stream = match tokio::net::UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(&Request { v: VERSION, op }).map_err(|e| ClientError::Reply(e.to_string()))?;
        line.push(b'\n');
        write.write_all(&line).await.map_err(io)?;
        let mut reply = Vec::new();
        BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REPLY)).read_until(b'\n', &mut reply).await.map_err(io)?;
        serde_json::from_slice::<TypedReply<T>>(&reply)
            .map_err(|e| ClientError::Reply(format!("{e}: {:?}", String::from_utf8_lossy(&reply[..reply.len().min(200)]))))
    };
    let reply = tokio::time::timeout(REPLY_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout { socket: socket.clone() })??;
    match reply {
        TypedReply { ok: true, result: Some(result), .. } => Ok(Some(result)),
        TypedReply { ok: true, result: None, .. } => Err(ClientError::Reply("an answer without a result".into())),
        TypedReply { kind, error, .. } => {
            Err(ClientError::Refused { kind: kind.unwrap_or(ErrorKind::Internal), message: error.unwrap_or_else(|| "refused without a reason".into()) })
        }
    }
}

/// A stream the daemon sends on one connection (`events`): its first line
/// said yes, then one line per item.
pub struct Stream {
    socket: PathBuf,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl Stream {
    /// The next item; `None` when the daemon closed the stream.
    pub async fn next<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        let Some(line) = self.lines.next_line().await.map_err(|source| ClientError::Io { socket: self.socket.clone(), source })? else {
            return Ok(None);
        };
        match serde_json::from_str::<TypedReply<T>>(&line).map_err(|e| ClientError::Reply(format!("{e}: {line:?}")))? {
            TypedReply { ok: true, result: Some(item), .. } => Ok(Some(item)),
            TypedReply { kind, error, .. } => Err(ClientError::Refused {
                kind: kind.unwrap_or(ErrorKind::Internal),
                message: error.unwrap_or_else(|| "the stream ended without a reason".into()),
            }),
        }
    }
}

/// Opens the stream `op` asks for; `Ok(None)` when no daemon answers.
pub async fn stream(data_dir: &Path, op: Op) -> Result<Option<Stream>, ClientError> {
    let socket = super::socket_path(data_dir);
    let io = |source| ClientError::Io { socket: socket.clone(), source };
    let stream = match tokio::net::UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&Request { v: VERSION, op }).map_err(|e| ClientError::Reply(e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let mut opened = Stream { socket: socket.clone(), lines: BufReader::new(read).lines(), _write: write };
    // The first line says whether the stream is on.
    let first = tokio::time::timeout(REPLY_TIMEOUT, opened.next::<serde_json::Value>())
        .await
        .map_err(|_| ClientError::Timeout { socket: socket.clone() })??;
    match first {
        Some(_) => Ok(Some(opened)),
        None => Err(ClientError::Reply("the daemon closed the stream at once".into())),
    }
}
