//! `hypeman logs`: the last lines of one of an instance's three logs, then
//! (with `--follow`) what is appended, until a signal. Bytes are passed
//! through as written; reading and following are `crate::logs`'s.

use super::view;
use super::{CliError, Context};
use crate::logs::{follow, tail_with_end, FollowStart, LogsError};
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;

/// Which of an instance's logs to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogSource {
    /// The guest's serial console (`logs/app.log`).
    App,
    /// The VMM process's output (`logs/vmm.log`).
    Vmm,
    /// What the daemon did to the instance (`logs/hypeman.log`).
    Hypeman,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::App => "app",
            LogSource::Vmm => "vmm",
            LogSource::Hypeman => "hypeman",
        }
    }
}

/// Writes the last `tail` lines of the log to `out`, then, when `follow`,
/// everything appended until `stop` resolves. A log that does not exist
/// yet (the VM never booted) is empty, and followed until it appears. A
/// reader that goes away (`| head`) ends the command quietly.
pub(crate) async fn logs(
    ctx: &Context,
    query: &str,
    which: LogSource,
    tail: usize,
    follow_on: bool,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let name = view::resolve(ctx, query)?;
    let store = ctx.instances.store();
    let meta = store
        .find_by_name(&name)
        .map_err(|e| ctx.store_error(e))?
        .ok_or_else(|| CliError::NotCreated { name: name.clone() })?;
    let paths = store.guest_paths(meta.id);
    let path: PathBuf = match which {
        LogSource::App => paths.app_log,
        LogSource::Vmm => paths.vmm_log,
        LogSource::Hypeman => paths.hypeman_log,
    };
    let failed = |source: LogsError| CliError::Logs {
        name: name.clone(),
        source_name: which.as_str(),
        source,
    };
    let (bytes, end) = match tail_with_end(&path, tail).await {
        Ok(read) => read,
        Err(LogsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            (Vec::new(), 0)
        }
        Err(e) => return Err(failed(e)),
    };
    if !emit(out, &bytes)? || !follow_on {
        return Ok(());
    }
    let mut chunks = follow(path, FollowStart::FromOffset(end));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            chunk = chunks.recv() => match chunk {
                Some(Ok(bytes)) => {
                    if !emit(out, &bytes)? {
                        return Ok(());
                    }
                }
                Some(Err(e)) => return Err(failed(e)),
                None => return Ok(()),
            },
        }
    }
}

/// Writes and flushes `bytes`; `false` when the reader is gone.
fn emit(out: &mut impl Write, bytes: &[u8]) -> Result<bool, CliError> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::Output(e)),
    }
}
