//! The daemon's side of the local API (`crate::api`): the socket, one task
//! per connection, and the answers, rendered from the owners' last looks
//! exactly as the CLI renders a look of its own (`status`, `plan`). It
//! lives with the CLI's renderings; the daemon is handed it as a hook
//! (`daemon::ApiHook`), so the daemon does not depend on the CLI.

use crate::api::protocol::{self, ErrorKind, Op, Reply};
use super::{CliError, Context};
use crate::reconcile::Directory;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot remove the stale API socket {}", path.display())]
    Stale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Listens on `path` (`0600`). Called with the data dir's lock held, so a
/// socket file already there is a dead daemon's: it is replaced.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    crate::durable::remove_file_if_exists(path)
        .map_err(|e| ServerError::Stale { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind { path: path.to_path_buf(), source })?;
    // Bound under the 0077 umask (0700 already); only the owner may write,
    // which is what connecting takes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ServerError::Bind { path: path.to_path_buf(), source })?;
    Ok(listener)
}

/// The daemon's API hook: binds `<data_dir>/hypeman.sock` and serves it
/// from the owners' directory, with a context over the daemon's store
/// that never looks at a VMM.
pub fn hook(config_dir: PathBuf, settings: std::sync::Arc<crate::settings::Settings>) -> crate::daemon::ApiHook {
    Box::new(move |directory, store| {
        let listener = bind(&crate::api::socket_path(&settings.data_dir))?;
        let api = Arc::new(Api { directory, ctx: Context::for_daemon(&config_dir, store, settings) });
        Ok(tokio::spawn(serve(listener, api)))
    })
}

/// What the server answers from.
pub struct Api {
    pub directory: Directory,
    pub ctx: Context,
}

/// Serves connections until the task is dropped, each in its own task.
pub async fn serve(listener: UnixListener, api: Arc<Api>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let api = api.clone();
                tokio::spawn(async move { connection(stream, &api).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the API socket failed to accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One request line, one reply line, closed.
async fn connection(stream: UnixStream, api: &Api) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let limit = protocol::MAX_REQUEST as u64 + 1;
    let mut reader = BufReader::new(read.take(limit));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Err(_) => Reply::error(ErrorKind::BadRequest, format!("no request line within {}s", READ_TIMEOUT.as_secs())),
        Ok(Err(e)) => Reply::error(ErrorKind::BadRequest, format!("reading the request failed: {e}")),
        Ok(Ok(_)) if line.len() > protocol::MAX_REQUEST => {
            Reply::error(ErrorKind::BadRequest, format!("the request is longer than {} bytes", protocol::MAX_REQUEST))
        }
        Ok(Ok(_)) => match protocol::parse_request(&line) {
            Ok(protocol::Request { op: Op::Events { name }, .. }) => return stream_events(api, name, reader, write).await,
            Ok(request) => answer(api, request.op).await,
            Err(refusal) => refusal,
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| br#"{"v":1,"ok":false,"error":"unencodable reply","kind":"internal"}"#.to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

/// Streams events (of `name`'s instance, when given) until the client
/// goes: an `ok` line first, then one line per event. A client too slow to
/// keep up is told how many it missed.
async fn stream_events(
    api: &Api,
    name: Option<String>,
    mut reader: impl tokio::io::AsyncRead + Unpin,
    mut write: tokio::net::unix::OwnedWriteHalf,
) {
    let instance = match name.map(|q| super::view::resolve(&api.ctx, &q)).transpose() {
        Ok(instance) => instance,
        Err(e) => {
            let kind = if matches!(e, CliError::NotFound { .. }) { ErrorKind::NotFound } else { ErrorKind::Internal };
            let _ = send_line(&mut write, &Reply::error(kind, crate::instances::error_chain(&e))).await;
            return;
        }
    };
    let mut events = crate::events::subscribe();
    if send_line(&mut write, &Reply::ok(serde_json::json!({ "streaming": "events", "instance": instance }))).await.is_err() {
        return;
    }
    let mut scratch = [0u8; 256];
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            // The client sends nothing more: a read that ends is its leaving.
            n = reader.read(&mut scratch) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let reply = match event {
            Ok(e) if instance.as_ref().is_some_and(|n| *n != e.instance) => continue,
            Ok(e) => Reply::ok(serde_json::to_value(e).unwrap_or_default()),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                Reply::error(ErrorKind::Internal, format!("{missed} events were missed (this client fell behind)"))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if send_line(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

async fn send_line(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// The reply to `op`, from the owners' looks.
pub async fn answer(api: &Api, op: Op) -> Reply {
    let result = match op {
        Op::Ping => Ok(serde_json::json!({ "daemon": env!("CARGO_PKG_VERSION"), "protocol": protocol::VERSION })),
        Op::Status { name: None } => {
            let looks = api.directory.looks().await;
            Ok(serde_json::to_value(super::status::status_from_looks(&api.ctx, &looks, &api.directory.nameless())).unwrap_or_default())
        }
        Op::Status { name: Some(query) } => match super::view::resolve(&api.ctx, &query) {
            Ok(name) => {
                let look = api.directory.look(&name).await;
                Ok(serde_json::to_value(super::status::status_from_look(&api.ctx, &name, look.as_deref())).unwrap_or_default())
            }
            Err(e) => Err(e),
        },
        Op::Plan => {
            let looks = api.directory.looks().await;
            Ok(serde_json::to_value(super::plan::rows_from_looks(&api.ctx, &looks)).unwrap_or_default())
        }
        Op::Events { .. } => return Reply::error(ErrorKind::BadRequest, "events is a stream, served on its own connection"),
        Op::Restart { name: query } => {
            let name = match super::view::resolve(&api.ctx, &query) {
                Ok(name) => name,
                Err(e) => return Reply::error(ErrorKind::NotFound, crate::instances::error_chain(&e)),
            };
            return match api.directory.restart(&name).await {
                Some(Ok(what)) => Reply::ok(serde_json::json!({ "name": name, "message": what })),
                Some(Err(why)) => Reply::error(ErrorKind::Refused, why),
                None => Reply::error(ErrorKind::NotFound, format!("{name} is neither declared nor stored")),
            };
        }
    };
    match result {
        Ok(value) => Reply::ok(value),
        Err(e) => {
            let kind = match &e {
                CliError::NotFound { .. } => ErrorKind::NotFound,
                CliError::Lookup(_) => ErrorKind::Ambiguous,
                _ => ErrorKind::Internal,
            };
            Reply::error(kind, crate::instances::error_chain(&e))
        }
    }
}
