//! `hypeman logs`: the last lines of one of an instance's three logs, then
//! (with `--follow`) what is appended, until a signal. Reading and
//! following are `crate::logs`'s. Bytes are passed through as written,
//! except the app log's line endings: the serial console ends lines with
//! `\r\n` (the guest's tty adds the `\r`), which leaves a `\r` at the end
//! of every line a user greps or pipes on, so it is printed as `\n`.

use super::view;
use super::{CliError, Context};
use crate::logs::{follow, tail_with_end, FollowStart, LogsError};
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

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

/// How often a follow checks that the guest it reads still exists.
const GONE_POLL: Duration = Duration::from_millis(500);

/// What `hypeman logs` prints: which log, how many lines first, and
/// whether to keep following.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogsOptions {
    pub which: LogSource,
    pub tail: usize,
    pub follow: bool,
}

/// Writes the last `tail` lines of the log to `out`, then, when `follow`,
/// everything appended until `stop` resolves. A log that does not exist
/// yet (the VM never booted) is empty, and followed until it appears. A
/// reader that goes away (`| head`) ends the command quietly.
///
/// A follow is by name, like `tail -F`: when the guest is deleted (its
/// declaration removed) it says so on `notes` and waits; when a guest of
/// the same name is created again, it says so and follows that one's log
/// from its start.
pub(crate) async fn logs(
    ctx: &Context,
    query: &str,
    opts: LogsOptions,
    out: &mut impl Write,
    notes: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let name = view::resolve(ctx, query)?;
    let store = ctx.instances.store();
    let meta = store
        .find_by_name(&name)
        .map_err(|e| ctx.store_error(e))?
        .ok_or_else(|| CliError::NotCreated { name: name.clone() })?;
    let which = opts.which;
    let path_of = |id: ulid::Ulid| -> PathBuf {
        let paths = store.guest_paths(id);
        match which {
            LogSource::App => paths.app_log,
            LogSource::Vmm => paths.vmm_log,
            LogSource::Hypeman => paths.hypeman_log,
        }
    };
    let failed = |source: LogsError| CliError::Logs {
        name: name.clone(),
        source_name: which.as_str(),
        source,
    };
    let (bytes, end) = match tail_with_end(&path_of(meta.id), opts.tail).await {
        Ok(read) => read,
        Err(LogsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            (Vec::new(), 0)
        }
        Err(e) => return Err(failed(e)),
    };
    let mut endings = LineEndings::new(which);
    let tail_out = endings.filter(&bytes);
    if !opts.follow {
        return emit(out, &tail_out).map(drop);
    }
    if !emit(out, &tail_out)? {
        return Ok(());
    }
    let mut following = Some(meta.id);
    let mut chunks = follow(path_of(meta.id), FollowStart::FromOffset(end));
    let mut check = tokio::time::interval(GONE_POLL);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            chunk = chunks.recv(), if following.is_some() => match chunk {
                Some(Ok(bytes)) => {
                    if !emit(out, &endings.filter(&bytes))? {
                        return Ok(());
                    }
                }
                Some(Err(e)) => return Err(failed(e)),
                None => return Ok(()),
            },
            _ = check.tick() => {
                if following.is_some_and(|id| store.guest_paths(id).dir.exists()) {
                    continue;
                }
                let now = store.find_by_name(&name).map_err(|e| ctx.store_error(e))?;
                match (following, now) {
                    (Some(old), None) => {
                        note(notes, &format!("{name} (ID {old}) was deleted, and its logs with it; waiting for it to be created again"))?;
                        following = None;
                    }
                    (_, Some(meta)) if following != Some(meta.id) => {
                        note(notes, &format!("{name} was created again (ID {}); following its {} log", meta.id, which.as_str()))?;
                        following = Some(meta.id);
                        endings = LineEndings::new(which);
                        chunks = follow(path_of(meta.id), FollowStart::FromOffset(0));
                    }
                    (_, _) => {}
                }
            }
        }
    }
}

/// Rewrites the serial console's `\r\n` as `\n`, across chunk
/// boundaries: a chunk's last `\r` is held back until the next chunk shows
/// whether a `\n` follows it. A `\r` still held when the output ends (the
/// first half of a line ending being written) is dropped. Any other `\r`
/// (a progress bar redrawing its line) is kept. Only the app log is
/// rewritten; the VMM's and hypeman's logs are passed through.
#[derive(Debug)]
pub(crate) struct LineEndings {
    rewrite: bool,
    held_cr: bool,
}

impl LineEndings {
    pub(crate) fn new(which: LogSource) -> LineEndings {
        let rewrite = match which {
            LogSource::App => true,
            LogSource::Vmm | LogSource::Hypeman => false,
        };
        LineEndings { rewrite, held_cr: false }
    }

    /// The bytes of `chunk` to print now.
    pub(crate) fn filter(&mut self, chunk: &[u8]) -> Vec<u8> {
        if !self.rewrite {
            return chunk.to_vec();
        }
        let mut out = Vec::with_capacity(chunk.len() + 1);
        let mut rest = chunk;
        if std::mem::take(&mut self.held_cr) && rest.first() != Some(&b'\n') {
            out.push(b'\r');
        }
        if let Some((&b'\r', head)) = rest.split_last() {
            self.held_cr = true;
            rest = head;
        }
        let mut bytes = rest.iter().peekable();
        while let Some(&b) = bytes.next() {
            if b == b'\r' && bytes.peek() == Some(&&b'\n') {
                continue;
            }
            out.push(b);
        }
        out
    }
}

/// One `hypeman: …` line for the person watching, on stderr, so that
/// stdout stays the log's bytes alone.
fn note(notes: &mut impl Write, text: &str) -> Result<(), CliError> {
    writeln!(notes, "hypeman: {text}").map_err(CliError::Output)
}

/// Writes and flushes `bytes`; `false` when the reader is gone.
fn emit(out: &mut impl Write, bytes: &[u8]) -> Result<bool, CliError> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::Output(e)),
    }
}
