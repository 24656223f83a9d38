//! Per-instance log files and reading them back.
//!
//! Owns: `logs/hypeman.log` writing ([`InstanceLog`]), size-based
//! copytruncate rotation, and reading any of the three logs (`app.log` serial
//! console, `vmm.log` VMM stdout/stderr, `hypeman.log`) with [`tail`] and
//! [`follow`].
//!
//! Must not: shell out (`tail`, `logrotate`), know where a guest directory
//! is (callers pass paths), or interpret log content: bytes are passed
//! through as written, CRLF from the serial console included.
//!
//! Rotation is copytruncate, never rename: the VMM holds `app.log` and
//! `vmm.log` open for its whole life and cannot be told to reopen. That only
//! works if every writer opened the file with `O_APPEND`; a writer without it
//! keeps its old offset and leaves a hole of zeros after a truncate.

use std::io::{self, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt};
use tokio::sync::mpsc;

/// Block size for reading backwards in [`tail`] and chunk size in [`follow`].
const BLOCK: usize = 64 * 1024;
/// How often [`follow`] looks at the file.
const FOLLOW_POLL: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rotate {path}")]
    Rotate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The last `n` lines of `path`, bytes as written. A final line without a
/// newline counts as a line. Reads backwards from the end in blocks, so the
/// cost is the size of the answer, not of the file.
pub async fn tail(path: &Path, n: usize) -> Result<Vec<u8>, LogsError> {
    tail_with_end(path, n).await.map(|(bytes, _)| bytes)
}

/// [`tail`], and the file length it read up to: where a [`follow`] that
/// continues the tail without a gap or a repeat starts
/// ([`FollowStart::FromOffset`]).
pub async fn tail_with_end(path: &Path, n: usize) -> Result<(Vec<u8>, u64), LogsError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| LogsError::Open {
            path: path.to_owned(),
            source,
        })?;
    let read_err = |source| LogsError::Read {
        path: path.to_owned(),
        source,
    };
    let len = file.metadata().await.map_err(read_err)?.len();
    let bytes = tail_of(&mut file, len, n, BLOCK).await.map_err(read_err)?;
    Ok((bytes, len))
}

/// The last `n` lines of the first `len` bytes of `r`.
async fn tail_of<R>(r: &mut R, len: u64, n: usize, block: usize) -> io::Result<Vec<u8>>
where
    R: AsyncRead + AsyncSeek + Unpin,
{
    if n == 0 || len == 0 {
        return Ok(Vec::new());
    }
    // Blocks read so far, the one at the end of the file first.
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut pos = len;
    let mut newlines = 0;
    let mut cut = 0;
    while pos > 0 {
        let size = usize::try_from(pos).map_or(block, |left| left.min(block));
        pos -= size as u64;
        let mut buf = vec![0; size];
        r.seek(SeekFrom::Start(pos)).await?;
        r.read_exact(&mut buf).await?;
        // The file's last byte, if a newline, ends the last line rather than
        // starting an empty one.
        let mut end = size;
        if pos + size as u64 == len && buf[size - 1] == b'\n' {
            end -= 1;
        }
        let mut found = None;
        while let Some(i) = buf[..end].iter().rposition(|&b| b == b'\n') {
            newlines += 1;
            if newlines == n {
                found = Some(i + 1);
                break;
            }
            end = i;
        }
        blocks.push(buf);
        if let Some(i) = found {
            cut = i;
            break;
        }
    }
    let total = blocks.iter().map(Vec::len).sum::<usize>() - cut;
    let mut out = Vec::with_capacity(total);
    let mut oldest_first = blocks.iter().rev();
    if let Some(first) = oldest_first.next() {
        out.extend_from_slice(&first[cut..]);
    }
    for b in oldest_first {
        out.extend_from_slice(b);
    }
    Ok(out)
}

/// Where [`follow`] starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowStart {
    /// Only what is appended after the call. A file that does not exist yet
    /// is read from its beginning once it appears.
    FromEnd,
    /// From this byte offset; past the end of the file (it was rotated since)
    /// means from the beginning.
    FromOffset(u64),
}

/// Yields bytes appended to `path` as they arrive, polling every 150 ms.
///
/// Survives copytruncate rotation (the size shrinks: restart at 0) and
/// replacement (a new inode at `path`: finish the old file, then read the new
/// one from 0), and waits for a file that does not exist yet. An error other
/// than "not found" is sent once and ends the stream. Stops when the receiver
/// is dropped. Must be called within a tokio runtime.
///
/// A truncate followed by more writes than were there before, all within one
/// poll, is indistinguishable from appends; like `tail -F`, that output is
/// then lost.
pub fn follow(path: PathBuf, start: FollowStart) -> mpsc::Receiver<Result<Vec<u8>, LogsError>> {
    spawn_follow(path, start).0
}

fn spawn_follow(
    path: PathBuf,
    start: FollowStart,
) -> (
    mpsc::Receiver<Result<Vec<u8>, LogsError>>,
    tokio::task::JoinHandle<()>,
) {
    // Resolved now, not when the task first runs, so nothing appended
    // after `follow` returns is skipped.
    let start = match start {
        FollowStart::FromEnd => std::fs::metadata(&path).map_or(0, |meta| meta.len()),
        FollowStart::FromOffset(at) => at,
    };
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut follower = Follower {
            path,
            start: Some(start),
            open: None,
            tx,
        };
        if let Err(err) = follower.run().await {
            let _ = follower.tx.send(Err(err)).await;
        }
    });
    (rx, task)
}

struct Follower {
    path: PathBuf,
    /// Applies to the first open only; reopened files are read from 0.
    start: Option<u64>,
    open: Option<Followed>,
    tx: mpsc::Sender<Result<Vec<u8>, LogsError>>,
}

struct Followed {
    file: tokio::fs::File,
    id: (u64, u64),
    offset: u64,
}

/// Why the follow loop ended without an error.
struct ReceiverGone;

impl Follower {
    async fn run(&mut self) -> Result<(), LogsError> {
        loop {
            if self.open.is_none() {
                self.open = self.try_open().await?;
            }
            let replaced = match self.poll_once().await {
                Ok(replaced) => replaced,
                Err(Ok(ReceiverGone)) => return Ok(()),
                Err(Err(err)) => return Err(err),
            };
            if replaced {
                self.open = None;
                continue;
            }
            tokio::select! {
                _ = self.tx.closed() => return Ok(()),
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }

    async fn try_open(&mut self) -> Result<Option<Followed>, LogsError> {
        let start = self.start.take();
        let file = match tokio::fs::File::open(&self.path).await {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LogsError::Open {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let meta = file.metadata().await.map_err(|e| self.read_err(e))?;
        let offset = match start {
            Some(at) if at <= meta.len() => at,
            Some(_) | None => 0,
        };
        Ok(Some(Followed {
            file,
            id: (meta.dev(), meta.ino()),
            offset,
        }))
    }

    /// Sends what is new in the open file; says whether `path` now names
    /// another file.
    async fn poll_once(&mut self) -> Result<bool, Result<ReceiverGone, LogsError>> {
        let Some(open) = self.open.as_mut() else {
            return Ok(false);
        };
        let len = open
            .file
            .metadata()
            .await
            .map_err(|e| Err(read_err(&self.path, e)))?
            .len();
        if len < open.offset {
            open.offset = 0;
        }
        if len > open.offset {
            open.file
                .seek(SeekFrom::Start(open.offset))
                .await
                .map_err(|e| Err(read_err(&self.path, e)))?;
            while open.offset < len {
                let want = usize::try_from(len - open.offset).map_or(BLOCK, |left| left.min(BLOCK));
                let mut buf = vec![0; want];
                let got = open
                    .file
                    .read(&mut buf)
                    .await
                    .map_err(|e| Err(read_err(&self.path, e)))?;
                if got == 0 {
                    // Truncated while we read; the next poll starts over.
                    break;
                }
                buf.truncate(got);
                open.offset += got as u64;
                self.tx.send(Ok(buf)).await.map_err(|_| Ok(ReceiverGone))?;
            }
        }
        match tokio::fs::metadata(&self.path).await {
            Ok(meta) => Ok((meta.dev(), meta.ino()) != open.id),
            // Renamed away and not yet re-created: keep reading the old file,
            // its writer may still be at it.
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(Err(read_err(&self.path, err))),
        }
    }

    fn read_err(&self, source: io::Error) -> LogsError {
        read_err(&self.path, source)
    }
}

fn read_err(path: &Path, source: io::Error) -> LogsError {
    LogsError::Read {
        path: path.to_owned(),
        source,
    }
}

/// `logs/hypeman.log`: what the daemon did to one instance, one timestamped
/// line per entry.
#[derive(Debug)]
pub struct InstanceLog {
    path: PathBuf,
    file: std::fs::File,
}

impl InstanceLog {
    /// Opens (creating) `path` for appending. The directory must exist.
    pub fn open(path: impl Into<PathBuf>) -> Result<InstanceLog, LogsError> {
        let path = path.into();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(crate::durable::FILE_MODE)
            .open(&path)
            .map_err(|source| LogsError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(InstanceLog { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `<RFC 3339 time> <line>\n` in one `write(2)`, so concurrent
    /// appenders and rotation never split an entry. Newlines inside `line`
    /// are escaped to keep one entry per line.
    pub fn append(&self, line: &str) -> Result<(), LogsError> {
        let now = humantime::format_rfc3339_millis(SystemTime::now());
        let line = line.trim_end_matches(['\n', '\r']);
        let mut entry = String::with_capacity(line.len() + 32);
        entry.push_str(&now.to_string());
        entry.push(' ');
        for c in line.chars() {
            match c {
                '\n' => entry.push_str("\\n"),
                '\r' => entry.push_str("\\r"),
                c => entry.push(c),
            }
        }
        entry.push('\n');
        (&self.file)
            .write_all(entry.as_bytes())
            .map_err(|source| LogsError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// Rotates `path` when it is larger than `max_bytes`: `path.1` … `path.keep`
/// shift up by one (the oldest falls off), `path` is copied to `path.1`, then
/// truncated in place, so writers holding it open with `O_APPEND` carry on
/// into the fresh file. `keep == 0` only truncates. A missing file is not
/// rotated. Returns whether it rotated.
///
/// Blocking: call it from `spawn_blocking` in async code. Lines written
/// between the copy and the truncate are lost, as with logrotate's
/// copytruncate; the window is one `ftruncate` long.
pub fn rotate_if_larger(path: &Path, max_bytes: u64, keep: usize) -> Result<bool, LogsError> {
    let rotate_err = |source| LogsError::Rotate {
        path: path.to_owned(),
        source,
    };
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(rotate_err(err)),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    if keep > 0 {
        for i in (1..keep).rev() {
            match std::fs::rename(numbered(path, i), numbered(path, i + 1)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(rotate_err(err)),
            }
        }
        // Through a temp name, so `path.1` is never a partial copy.
        let staging = with_suffix(path, ".1.tmp");
        // Not `fs::copy`, which gives the copy the mode of a log an older
        // release made: the copy is 0600 like every log.
        let copied = (|| {
            let mut from = std::fs::File::open(path)?;
            let mut to = crate::durable::private_file().write(true).create(true).truncate(true).open(&staging)?;
            io::copy(&mut from, &mut to)
        })();
        copied.map_err(rotate_err)?;
        std::fs::rename(&staging, numbered(path, 1)).map_err(rotate_err)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .map_err(rotate_err)?;
    Ok(true)
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    with_suffix(path, &format!(".{i}"))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Instant;

    const WAIT: Duration = Duration::from_secs(5);

    /// The last n lines the obvious way, to compare against.
    fn naive_tail(data: &[u8], n: usize) -> Vec<u8> {
        let lines: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
        lines[lines.len().saturating_sub(n)..].concat()
    }

    /// Counts bytes read, to show tail does not read the whole file.
    struct Counting {
        inner: io::Cursor<Vec<u8>>,
        read: u64,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let res = Pin::new(&mut this.inner).poll_read(cx, buf);
            this.read += (buf.filled().len() - before) as u64;
            res
        }
    }

    impl AsyncSeek for Counting {
        fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
            Pin::new(&mut self.get_mut().inner).start_seek(position)
        }
        fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
            Pin::new(&mut self.get_mut().inner).poll_complete(cx)
        }
    }

    async fn tail_bytes(data: &[u8], n: usize, block: usize) -> (Vec<u8>, u64) {
        let mut r = Counting {
            inner: io::Cursor::new(data.to_vec()),
            read: 0,
        };
        let out = tail_of(&mut r, data.len() as u64, n, block).await.unwrap();
        (out, r.read)
    }

    #[tokio::test]
    async fn tail_matches_naive_at_every_block_boundary() {
        let cases: &[&[u8]] = &[
            b"",
            b"\n",
            b"\n\n\n",
            b"one",
            b"one\n",
            b"one\ntwo",
            b"one\ntwo\n",
            b"one\r\ntwo\r\nthree\r\n",
            b"one\r\ntwo\r\nthree",
            b"a\n\nb\n\n",
            b"abcdefgh\nijklmnop\nqrstuvwx\n",
            b"\r\n\r\n",
        ];
        for data in cases {
            for block in 1..=10 {
                for n in 0..=6 {
                    let (got, _) = tail_bytes(data, n, block).await;
                    assert_eq!(
                        got,
                        naive_tail(data, n),
                        "data={:?} n={n} block={block}",
                        String::from_utf8_lossy(data)
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn tail_of_a_big_file_reads_only_the_end() {
        let mut data = Vec::new();
        for i in 0..200_000 {
            data.extend_from_slice(format!("line {i}\r\n").as_bytes());
        }
        let (got, read) = tail_bytes(&data, 10, BLOCK).await;
        assert_eq!(got, naive_tail(&data, 10));
        assert!(got.starts_with(b"line 199990\r\n"), "{got:?}");
        assert_eq!(read, BLOCK as u64, "one block holds 10 lines");

        // Lines spanning many blocks.
        let (got, read) = tail_bytes(&data, 50_000, BLOCK).await;
        assert_eq!(got, naive_tail(&data, 50_000));
        assert!(
            read < data.len() as u64 / 2,
            "read {read} of {}",
            data.len()
        );
    }

    #[tokio::test]
    async fn tail_of_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.log");

        let err = tail(&path, 5).await.unwrap_err();
        assert!(matches!(err, LogsError::Open { .. }));
        assert_eq!(err.to_string(), format!("cannot open {}", path.display()));

        fs::write(&path, b"").unwrap();
        assert_eq!(tail(&path, 5).await.unwrap(), b"");

        // Exactly two blocks, the boundary right after a newline.
        let mut data = vec![b'x'; BLOCK - 1];
        data.push(b'\n');
        data.extend(vec![b'y'; BLOCK - 1]);
        data.push(b'\n');
        fs::write(&path, &data).unwrap();
        assert_eq!(tail(&path, 1).await.unwrap(), &data[BLOCK..]);
        assert_eq!(tail(&path, 2).await.unwrap(), data);
        assert_eq!(tail(&path, 100).await.unwrap(), data);
        assert_eq!(tail(&path, 0).await.unwrap(), b"");

        fs::write(&path, b"booting\r\nready\r\n$ ").unwrap();
        assert_eq!(tail(&path, 2).await.unwrap(), b"ready\r\n$ ");
    }

    /// Receives until `want` bytes in total have arrived.
    async fn receive(rx: &mut mpsc::Receiver<Result<Vec<u8>, LogsError>>, want: usize) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Ok(bytes))) => got.extend(bytes),
                Ok(Some(Err(err))) => panic!("follow failed: {err}"),
                Ok(None) => panic!("follow ended; got {got:?}"),
                Err(_) => panic!("timed out after {got:?}"),
            }
        }
        got
    }

    fn append(path: &Path, bytes: &[u8]) {
        fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .unwrap();
    }

    #[tokio::test]
    async fn follow_sees_appends_from_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.log");
        fs::write(&path, "old\n").unwrap();
        let mut rx = follow(path.clone(), FollowStart::FromEnd);
        append(&path, b"new 1\r\n");
        assert_eq!(receive(&mut rx, 7).await, b"new 1\r\n");
        append(&path, b"new 2\r\n");
        assert_eq!(receive(&mut rx, 7).await, b"new 2\r\n");
    }

    #[tokio::test]
    async fn follow_from_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.log");
        fs::write(&path, "0123456789").unwrap();
        let mut rx = follow(path.clone(), FollowStart::FromOffset(4));
        assert_eq!(receive(&mut rx, 6).await, b"456789");

        // An offset past the end: the file was rotated since; start over.
        let mut rx = follow(path.clone(), FollowStart::FromOffset(1000));
        assert_eq!(receive(&mut rx, 10).await, b"0123456789");
    }

    #[tokio::test]
    async fn follow_waits_for_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vmm.log");
        let mut rx = follow(path.clone(), FollowStart::FromEnd);
        append(&path, b"first\n");
        assert_eq!(receive(&mut rx, 6).await, b"first\n");
    }

    #[tokio::test]
    async fn follow_survives_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.log");
        let mut rx = follow(path.clone(), FollowStart::FromOffset(0));
        append(&path, b"before rotation\n");
        assert_eq!(receive(&mut rx, 16).await, b"before rotation\n");
        assert!(rotate_if_larger(&path, 1, 1).unwrap());
        append(&path, b"after\n");
        assert_eq!(receive(&mut rx, 6).await, b"after\n");
    }

    #[tokio::test]
    async fn follow_survives_replacement() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.log");
        append(&path, b"v1\n");
        let mut rx = follow(path.clone(), FollowStart::FromOffset(0));
        assert_eq!(receive(&mut rx, 3).await, b"v1\n");

        let next = tmp.path().join("app.log.new");
        fs::write(&next, "replacement, longer than before\n").unwrap();
        fs::rename(&next, &path).unwrap();
        assert_eq!(
            receive(&mut rx, 32).await,
            b"replacement, longer than before\n"
        );
        append(&path, b"more\n");
        assert_eq!(receive(&mut rx, 5).await, b"more\n");
    }

    #[tokio::test]
    async fn follow_stops_when_the_receiver_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let (rx, task) = spawn_follow(tmp.path().join("app.log"), FollowStart::FromEnd);
        drop(rx);
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn follow_reports_an_unreadable_path() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory opens but cannot be read.
        let mut rx = follow(tmp.path().to_owned(), FollowStart::FromOffset(0));
        let got = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
        assert!(matches!(got, Some(Err(LogsError::Read { .. }))), "{got:?}");
        let end = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
        assert!(end.is_none(), "{end:?}");
    }

    #[test]
    fn instance_log_appends_timestamped_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("hypeman.log");
        let log = InstanceLog::open(&path).unwrap();
        log.append("create: Stopped -> Created").unwrap();
        log.append("boot failed:\nno kernel\n").unwrap();
        // A second handle, as after a daemon restart.
        InstanceLog::open(&path).unwrap().append("adopted").unwrap();

        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<(&str, &str)> = text.lines().map(|l| l.split_once(' ').unwrap()).collect();
        for (time, _) in &lines {
            humantime::parse_rfc3339(time).unwrap();
        }
        let messages: Vec<&str> = lines.iter().map(|(_, m)| *m).collect();
        assert_eq!(
            messages,
            [
                "create: Stopped -> Created",
                "boot failed:\\nno kernel",
                "adopted"
            ]
        );
    }

    #[test]
    fn instance_log_open_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("missing-dir").join("hypeman.log");
        let err = InstanceLog::open(&path).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot open {}", path.display()));
    }

    #[test]
    fn rotation_keeps_data_and_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vmm.log");
        // The VMM's handle, opened before any rotation.
        let mut vmm = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        vmm.write_all(b"generation 1\n").unwrap();

        assert!(!rotate_if_larger(&path, 100, 2).unwrap(), "below the limit");
        assert!(!numbered(&path, 1).exists());

        assert!(rotate_if_larger(&path, 5, 2).unwrap());
        assert_eq!(fs::read(numbered(&path, 1)).unwrap(), b"generation 1\n");
        assert_eq!(fs::read(&path).unwrap(), b"");

        vmm.write_all(b"generation 2\n").unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            b"generation 2\n",
            "no hole, no loss"
        );

        assert!(rotate_if_larger(&path, 5, 2).unwrap());
        vmm.write_all(b"generation 3\n").unwrap();
        assert!(rotate_if_larger(&path, 5, 2).unwrap());
        assert_eq!(fs::read(numbered(&path, 1)).unwrap(), b"generation 3\n");
        assert_eq!(fs::read(numbered(&path, 2)).unwrap(), b"generation 2\n");
        assert!(!numbered(&path, 3).exists(), "generation 1 fell off");
        assert!(!with_suffix(&path, ".1.tmp").exists());
    }

    #[test]
    fn rotation_edge_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.log");
        assert!(!rotate_if_larger(&path, 0, 3).unwrap(), "missing file");

        fs::write(&path, "12345").unwrap();
        assert!(
            !rotate_if_larger(&path, 5, 3).unwrap(),
            "exactly at the limit"
        );

        assert!(rotate_if_larger(&path, 4, 0).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert!(!numbered(&path, 1).exists(), "keep = 0 keeps nothing");
    }
}
