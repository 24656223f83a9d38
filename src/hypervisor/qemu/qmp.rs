//! A QMP client for one operation: connect to a QEMU monitor socket, read
//! the greeting, negotiate capabilities, run commands and drop the
//! connection.
//!
//! QMP serves one client at a time, so callers connect per operation and
//! never hold a client between calls (the CLI probes the same socket). Every
//! command carries an incrementing `id` and only the reply with that id
//! answers it; asynchronous events (`{"event":…}`) that arrive meanwhile are
//! kept in [`QmpClient::events`] and otherwise skipped. This module knows
//! the wire protocol only, not what the commands mean.

use serde_json::{json, Value};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Nothing listens: no socket file, or a stale one.
    #[error("no QMP server listens on {path}")]
    NotListening {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed")]
    Io(#[source] std::io::Error),
    /// The server accepted the connection but did not answer in time (it is
    /// busy with another client, or hung).
    #[error("no QMP reply to {what} within {}ms", timeout.as_millis())]
    Timeout { what: String, timeout: Duration },
    #[error("QEMU closed the QMP connection during {what}")]
    Closed { what: String },
    #[error("malformed QMP message {line:?}")]
    Malformed { line: String },
    #[error("QMP {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

impl QmpError {
    /// Whether the error means that no VMM listens on the socket at all.
    pub fn is_not_listening(&self) -> bool {
        matches!(self, QmpError::NotListening { .. })
    }
}

/// One negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    /// The `qemu` part of the greeting: `{"major":7,"minor":2,"micro":22}`.
    pub greeting_version: Value,
    /// Events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities, each step
    /// bounded by `timeout`; later commands use the same timeout unless
    /// [`QmpClient::execute_with_timeout`] says otherwise.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Err(_) => return Err(QmpError::Timeout { what: "connect".into(), timeout }),
            Ok(Err(source)) => {
                return Err(match source.kind() {
                    ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                        QmpError::NotListening { path: path.to_path_buf(), source }
                    }
                    _ => QmpError::Connect { path: path.to_path_buf(), source },
                })
            }
            Ok(Ok(s)) => s,
        };
        let (read, writer) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(read),
            writer,
            next_id: 1,
            timeout,
            greeting_version: Value::Null,
            events: Vec::new(),
        };
        let greeting = tokio::time::timeout(timeout, client.read_message("greeting"))
            .await
            .map_err(|_| QmpError::Timeout { what: "greeting".into(), timeout })??;
        let Some(qmp) = greeting.get("QMP") else {
            return Err(QmpError::Malformed { line: greeting.to_string() });
        };
        client.greeting_version = qmp.pointer("/version/qemu").cloned().unwrap_or(Value::Null);
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Runs `command` with optional `arguments` and returns its `return`.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.timeout).await
    }

    pub async fn execute_with_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        let exchange = async {
            self.writer.write_all(line.as_bytes()).await.map_err(QmpError::Io)?;
            loop {
                let msg = self.read_message(command).await?;
                if msg.get("event").is_some() {
                    self.events.push(msg);
                    continue;
                }
                if msg.get("id").and_then(Value::as_u64) != Some(id) {
                    // A reply to an earlier, timed-out request of this
                    // session, or one without an id: not ours.
                    continue;
                }
                if let Some(ret) = msg.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = msg.get("error") {
                    let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class: text("class"),
                        desc: text("desc"),
                    });
                }
                return Err(QmpError::Malformed { line: msg.to_string() });
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout { what: command.to_string(), timeout })?
    }

    /// `getfd`: hands `fd` to QEMU under `name` (SCM_RIGHTS on the same
    /// message as the command), for a later `fd:NAME` migration URI. QEMU
    /// keeps its own copy; the caller may close `fd` after this returns.
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        use std::os::fd::{AsRawFd, RawFd};
        let id = self.next_id;
        self.next_id += 1;
        let mut line = json!({ "execute": "getfd", "arguments": { "fdname": name }, "id": id }).to_string();
        line.push('\n');
        let raw: RawFd = fd.as_raw_fd();
        let timeout = self.timeout;
        let stream: &UnixStream = self.writer.as_ref();
        let send = async { crate::hypervisor::fdpass::send_all(stream, line.as_bytes(), &[raw]).await.map_err(QmpError::Io) };
        tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| QmpError::Timeout { what: "getfd".into(), timeout })??;
        let exchange = async {
            loop {
                let msg = self.read_message("getfd").await?;
                if msg.get("event").is_some() {
                    self.events.push(msg);
                    continue;
                }
                if msg.get("id").and_then(Value::as_u64) != Some(id) {
                    continue;
                }
                if msg.get("return").is_some() {
                    return Ok(());
                }
                if let Some(err) = msg.get("error") {
                    let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    return Err(QmpError::Command { command: "getfd".into(), class: text("class"), desc: text("desc") });
                }
                return Err(QmpError::Malformed { line: msg.to_string() });
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout { what: "getfd".into(), timeout })?
    }

    /// The next JSON object on the connection (QEMU ends each with CRLF).
    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.map_err(QmpError::Io)?;
            if n == 0 {
                return Err(QmpError::Closed { what: what.to_string() });
            }
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            return match serde_json::from_str::<Value>(trimmed) {
                Ok(v) if v.is_object() => Ok(v),
                _ => Err(QmpError::Malformed { line: trimmed.to_string() }),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18\"}, \"capabilities\": [\"oob\"]}}\r\n";

    /// A fake QMP server for one client: answers capabilities, then runs
    /// `script` on each later request (`None`: stay silent).
    fn serve(
        dir: &Path,
        script: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> (PathBuf, tokio::task::JoinHandle<Vec<Value>>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            w.write_all(GREETING.as_bytes()).await.unwrap();
            let mut seen = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return seen;
                }
                let req: Value = serde_json::from_str(&line).unwrap();
                seen.push(req.clone());
                let replies = if req["execute"] == "qmp_capabilities" {
                    vec![json!({"return": {}, "id": req["id"]}).to_string()]
                } else {
                    script(&req)
                };
                for reply in replies {
                    w.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
                }
            }
        });
        (path, task)
    }

    #[tokio::test]
    async fn negotiates_and_matches_replies_by_id_skipping_events() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), |req| {
            vec![
                r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
                json!({"return": {"stale": true}, "id": 999}).to_string(),
                json!({"return": {"status": "running", "running": true}, "id": req["id"]}).to_string(),
            ]
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(2)).await.unwrap();
        assert_eq!(c.greeting_version["major"], 7);
        let ret = c.execute("query-status", None).await.unwrap();
        assert_eq!(ret["status"], "running");
        let ret = c.execute("stop", Some(json!({"x": 1}))).await.unwrap();
        assert_eq!(ret["running"], true);
        assert_eq!(c.events.len(), 2);
        assert_eq!(c.events[0]["event"], "STOP");
        drop(c);
        let seen = server.await.unwrap();
        let ids: Vec<_> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(seen[2]["arguments"]["x"], 1);
        assert!(seen[1].get("arguments").is_none());
    }

    #[tokio::test]
    async fn command_errors_carry_class_and_description() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _server) = serve(dir.path(), |req| {
            vec![json!({"error": {"class": "GenericError", "desc": "Expecting a valid migration protocol"}, "id": req["id"]}).to_string()]
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(2)).await.unwrap();
        let err = c.execute("migrate", Some(json!({"uri": "file:/x"}))).await.unwrap_err();
        insta::assert_snapshot!(err.to_string(), @"QMP migrate failed: GenericError: Expecting a valid migration protocol");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_missing_one_is_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _server) = serve(dir.path(), |_| Vec::new());
        let mut c = QmpClient::connect(&path, Duration::from_secs(2)).await.unwrap();
        let err = c.execute_with_timeout("query-status", None, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");

        let err = QmpClient::connect(&dir.path().join("none.sock"), Duration::from_secs(1)).await.unwrap_err();
        assert!(err.is_not_listening(), "{err:?}");
        // A stale socket file with nobody behind it is refused.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let err = QmpClient::connect(&stale, Duration::from_secs(1)).await.unwrap_err();
        assert!(err.is_not_listening(), "{err:?}");
    }

    #[tokio::test]
    async fn a_server_that_accepts_but_never_greets_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mute.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = QmpClient::connect(&path, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { ref what, .. } if what == "greeting"), "{err:?}");
    }

    #[tokio::test]
    async fn closing_mid_call_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            w.write_all(GREETING.as_bytes()).await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"{\"return\": {}, \"id\": 1}\r\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            // `quit`: QEMU may exit before it replies.
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(2)).await.unwrap();
        let err = c.execute("quit", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Closed { .. }), "{err:?}");
    }
}
