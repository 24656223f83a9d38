//! Turns changes in `<config-dir>/instances/` into instance names for the
//! reconciler.
//!
//! Owns: the inotify watch (through `notify`), following the instances
//! directory as it appears, disappears or is replaced, deciding which file
//! names are declaration candidates, and turning SIGHUP into a rescan.
//!
//! Must not: read or parse declarations, validate names, debounce, or decide
//! what a change means. The reconciler is level-triggered: it re-reads the
//! directory by name, so an event here is only a hint about *where* to look.
//!
//! ```text
//!   notify thread ──Msg──► driver thread ──WatchEvent──► reconciler
//!                            │  every 1 s: stat(instances dir)
//!                            ├─ dir exists   → watch it        (Rescan when it (re)appears)
//!                            └─ dir missing  → watch nearest existing ancestor
//! ```
//!
//! The once-a-second stat is what catches the cases inotify cannot see: a
//! parent directory renamed away, or an instances directory that is itself a
//! symlink whose target was swapped (NixOS `/etc/static`).

use crate::declaration::{self, DeclFile};
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// How often the driver re-checks that it is watching the right directory.
const POLL: Duration = Duration::from_secs(1);

/// A hint for the reconciler: look at this instance, or at all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The file stem of the declaration; `None` means "rescan all".
    pub name: Option<String>,
    pub reason: WatchReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchReason {
    FileChanged,
    FileRemoved,
    /// SIGHUP, the directory (re)appeared or went away, or the kernel dropped
    /// events: reconcile everything.
    Rescan,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the file watcher")]
    Init(#[source] notify::Error),
    #[error("cannot watch {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot resolve {path} against the current directory")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn the watcher thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot install the SIGHUP handler")]
    Signal(#[source] std::io::Error),
}

/// The instance name a directory entry declares, if it is a declaration
/// candidate at all. Pure: looks at the file name only, so an event for a
/// file that is already gone still maps to its instance.
///
/// Which names are declarations is [`declaration::instance_name`]'s rule,
/// the one the directory scan uses; this only turns it into what an event
/// needs. A `NAME.toml` whose `NAME` is not a valid instance name still
/// yields `NAME`: validation reports that, not us. Non-UTF-8 names yield
/// `None` (they cannot name an instance; the scan reports them).
pub fn candidate_name(path: &Path) -> Option<String> {
    path.file_name()?.to_str()?;
    match declaration::instance_name(path) {
        DeclFile::Instance(name) => Some(name),
        DeclFile::InvalidName(file) => file.strip_suffix(".toml").map(str::to_owned),
        DeclFile::Ignored => None,
    }
}

/// Watches one instances directory until dropped.
#[derive(Debug)]
pub struct Watcher {
    control: std_mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching `instances_dir`, which need not exist yet.
    ///
    /// When this returns, changes are being watched: a caller that lists the
    /// directory *after* `start` misses nothing. No event is sent for the
    /// files already there.
    pub fn start(
        instances_dir: PathBuf,
        tx: UnboundedSender<WatchEvent>,
    ) -> Result<Watcher, WatchError> {
        let dir = std::path::absolute(&instances_dir).map_err(|source| WatchError::Path {
            path: instances_dir.clone(),
            source,
        })?;
        let (control, inbox) = std_mpsc::channel();
        let from_notify = control.clone();
        let notifier = RecommendedWatcher::new(
            move |res: notify::Result<Event>| {
                // The driver is gone only while shutting down.
                let _ = from_notify.send(Msg::Notify(res));
            },
            notify::Config::default(),
        )
        .map_err(WatchError::Init)?;

        let mut driver = Driver {
            dir,
            notifier,
            mode: Mode::Unwatched,
            tx,
        };
        driver.start()?;
        let thread = std::thread::Builder::new()
            .name("hypeman-watch".into())
            .spawn(move || driver.run(inbox))
            .map_err(WatchError::Thread)?;
        Ok(Watcher {
            control,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.control.send(Msg::Stop);
        if let Some(thread) = self.thread.take() {
            // The driver answers within one notify callback; a panic there
            // has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}

/// Sends a `Rescan` on every SIGHUP until `tx` is closed. Content changes
/// behind a symlinked declaration are invisible to inotify; this is how an
/// operator (or the NixOS module on switch) says "look again".
///
/// Must be called from within a tokio runtime. The handler is installed
/// before this returns, so a SIGHUP sent afterwards cannot kill the process.
pub fn spawn_sighup(
    tx: UnboundedSender<WatchEvent>,
) -> Result<tokio::task::JoinHandle<()>, WatchError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).map_err(WatchError::Signal)?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: rescanning all declarations");
                    let event = WatchEvent { name: None, reason: WatchReason::Rescan };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        }
    }))
}

enum Msg {
    Notify(notify::Result<Event>),
    Stop,
}

/// (device, inode): tells a replaced directory from the one we watch.
type DirId = (u64, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Nothing watched (start-up, or the last watch attempt failed).
    Unwatched,
    /// The instances directory with this identity is watched.
    Dir(DirId),
    /// The directory is missing; this ancestor is watched for its return.
    Ancestor(PathBuf),
}

struct Driver {
    /// Absolute, not canonicalized: a symlinked directory is followed anew
    /// on every check.
    dir: PathBuf,
    notifier: RecommendedWatcher,
    mode: Mode,
    tx: UnboundedSender<WatchEvent>,
}

impl Driver {
    /// The first watch, in the caller's thread so its errors are returned.
    fn start(&mut self) -> Result<(), WatchError> {
        if let Some(id) = dir_id(&self.dir) {
            self.notifier
                .watch(&self.dir, RecursiveMode::NonRecursive)
                .map_err(|source| WatchError::Watch {
                    path: self.dir.clone(),
                    source,
                })?;
            self.mode = Mode::Dir(id);
            return Ok(());
        }
        let ancestor = nearest_existing_ancestor(&self.dir);
        self.notifier
            .watch(&ancestor, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch {
                path: ancestor.clone(),
                source,
            })?;
        self.mode = Mode::Ancestor(ancestor);
        // It may have appeared between the stat and the watch.
        self.converge();
        Ok(())
    }

    fn run(mut self, inbox: std_mpsc::Receiver<Msg>) {
        loop {
            match inbox.recv_timeout(POLL) {
                Ok(Msg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Notify(res)) => self.handle(res),
                Err(std_mpsc::RecvTimeoutError::Timeout) => self.converge(),
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }

    fn handle(&mut self, res: notify::Result<Event>) {
        let event = match res {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, dir = %self.dir.display(), "file watcher error; rescanning");
                self.emit(None, WatchReason::Rescan);
                return;
            }
        };
        if event.need_rescan() {
            tracing::warn!(dir = %self.dir.display(), "file watcher dropped events; rescanning");
            self.emit(None, WatchReason::Rescan);
            return;
        }
        match self.mode {
            Mode::Dir(_) => {}
            Mode::Unwatched | Mode::Ancestor(_) => {
                self.converge();
                return;
            }
        }
        let Some(reason) = reason_for(&event.kind) else {
            return;
        };
        for path in &event.paths {
            if *path == self.dir {
                // Deleted or moved away itself.
                self.converge();
            } else if path.parent() == Some(self.dir.as_path()) {
                if let Some(name) = candidate_name(path) {
                    tracing::debug!(%name, ?reason, "declaration file event");
                    self.emit(Some(name), reason);
                }
            }
        }
    }

    /// Makes the watch match what is on disk now; emits `Rescan` when the
    /// directory appeared, went away, or was replaced.
    fn converge(&mut self) {
        // A few rounds cover a directory that comes and goes while we switch.
        for _ in 0..4 {
            match dir_id(&self.dir) {
                Some(id) => {
                    if self.mode == Mode::Dir(id) {
                        return;
                    }
                    self.unwatch();
                    if let Err(err) = self.notifier.watch(&self.dir, RecursiveMode::NonRecursive) {
                        if dir_id(&self.dir).is_none() {
                            continue;
                        }
                        tracing::warn!(error = %err, dir = %self.dir.display(), "cannot watch instances directory; retrying");
                        return;
                    }
                    tracing::info!(dir = %self.dir.display(), "watching instances directory");
                    self.mode = Mode::Dir(id);
                    // After the watch is in place, so nothing created in
                    // between is missed by the reconciler's listing.
                    self.emit(None, WatchReason::Rescan);
                    return;
                }
                None => {
                    let ancestor = nearest_existing_ancestor(&self.dir);
                    if self.mode == Mode::Ancestor(ancestor.clone()) {
                        return;
                    }
                    let was_watching_dir = matches!(self.mode, Mode::Dir(_));
                    self.unwatch();
                    if was_watching_dir {
                        tracing::info!(dir = %self.dir.display(), "instances directory went away");
                        self.emit(None, WatchReason::Rescan);
                    }
                    if let Err(err) = self.notifier.watch(&ancestor, RecursiveMode::NonRecursive) {
                        // The poll still notices the directory, a second late.
                        tracing::debug!(error = %err, ancestor = %ancestor.display(), "cannot watch ancestor");
                        return;
                    }
                    self.mode = Mode::Ancestor(ancestor);
                    if dir_id(&self.dir).is_none() {
                        return;
                    }
                }
            }
        }
    }

    fn unwatch(&mut self) {
        let path = match &self.mode {
            Mode::Unwatched => return,
            Mode::Dir(_) => self.dir.clone(),
            Mode::Ancestor(path) => path.clone(),
        };
        // Fails when the kernel already dropped the watch (deleted directory).
        let _ = self.notifier.unwatch(&path);
        self.mode = Mode::Unwatched;
    }

    fn emit(&self, name: Option<String>, reason: WatchReason) {
        // A closed channel ends the driver loop right after.
        let _ = self.tx.send(WatchEvent { name, reason });
    }
}

/// What a notify event says about the files it names, if anything. Opens
/// and read-only closes are dropped: the reconciler reading a declaration
/// must not wake itself up.
fn reason_for(kind: &EventKind) -> Option<WatchReason> {
    match kind {
        EventKind::Create(_) => Some(WatchReason::FileChanged),
        EventKind::Remove(_) => Some(WatchReason::FileRemoved),
        EventKind::Modify(ModifyKind::Name(rename)) => match rename {
            RenameMode::From => Some(WatchReason::FileRemoved),
            RenameMode::To => Some(WatchReason::FileChanged),
            // inotify also sends `From` and `To` for the same rename.
            RenameMode::Both => None,
            // Backends that cannot tell: look at the name, the reconciler
            // finds out whether it is still there.
            RenameMode::Any | RenameMode::Other => Some(WatchReason::FileChanged),
        },
        EventKind::Modify(_) => Some(WatchReason::FileChanged),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(WatchReason::FileChanged),
        EventKind::Access(_) | EventKind::Any | EventKind::Other => None,
    }
}

/// Follows symlinks: a swapped symlink target is a new directory.
fn dir_id(dir: &Path) -> Option<DirId> {
    let meta = std::fs::metadata(dir).ok()?;
    meta.is_dir().then(|| (meta.dev(), meta.ino()))
}

fn nearest_existing_ancestor(dir: &Path) -> PathBuf {
    dir.ancestors()
        .skip(1)
        .find(|p| dir_id(p).is_some())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Instant;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const WAIT: Duration = Duration::from_secs(5);

    fn changed(name: &str) -> WatchEvent {
        WatchEvent {
            name: Some(name.into()),
            reason: WatchReason::FileChanged,
        }
    }

    fn removed(name: &str) -> WatchEvent {
        WatchEvent {
            name: Some(name.into()),
            reason: WatchReason::FileRemoved,
        }
    }

    fn rescan() -> WatchEvent {
        WatchEvent {
            name: None,
            reason: WatchReason::Rescan,
        }
    }

    /// Receives until `want` arrives; returns everything received before it.
    async fn expect(rx: &mut UnboundedReceiver<WatchEvent>, want: WatchEvent) -> Vec<WatchEvent> {
        let deadline = Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(got)) if got == want => return before,
                Ok(Some(got)) => before.push(got),
                Ok(None) => panic!("channel closed waiting for {want:?}; got {before:?}"),
                Err(_) => panic!("timed out waiting for {want:?}; got {before:?}"),
            }
        }
    }

    fn setup() -> (
        tempfile::TempDir,
        PathBuf,
        UnboundedReceiver<WatchEvent>,
        Watcher,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("instances");
        fs::create_dir(&dir).unwrap();
        let (tx, rx) = unbounded_channel();
        let watcher = Watcher::start(dir.clone(), tx).unwrap();
        (tmp, dir, rx, watcher)
    }

    #[test]
    fn candidate_names() {
        let table: &[(&str, Option<&str>)] = &[
            ("web.toml", Some("web")),
            ("/etc/hypeman/instances/web.toml", Some("web")),
            ("Bad Name!.toml", Some("Bad Name!")),
            ("a.b.toml", Some("a.b")),
            ("web.toml.tmp", None),
            ("web.tmp", None),
            (".web.toml", None),
            (".web.toml.swp", None),
            (".web.toml.swx", None),
            ("web.toml.swp", None),
            ("web.toml~", None),
            ("4913", None),
            ("#web.toml#", None),
            (".#web.toml", None),
            (".toml", None),
            ("web.json", None),
            ("web", None),
            ("web.TOML", None),
            ("", None),
            ("/", None),
        ];
        for (path, want) in table {
            assert_eq!(
                candidate_name(Path::new(path)).as_deref(),
                *want,
                "candidate_name({path:?})"
            );
        }
    }

    /// The watcher and the scan read file names by one rule: every name
    /// here is classified the same by both, editor and temp files included.
    #[test]
    fn the_watcher_and_the_scan_agree_on_every_name() {
        use DeclFile::{Ignored, Instance, InvalidName};
        let instance = |n: &str| Instance(n.into());
        let invalid = |n: &str| InvalidName(n.into());
        let table: Vec<(&str, DeclFile, Option<&str>)> = vec![
            ("web.toml", instance("web"), Some("web")),
            ("/etc/hypeman/instances/a-1.toml", instance("a-1"), Some("a-1")),
            ("Web.toml", invalid("Web.toml"), Some("Web")),
            ("web.prod.toml", invalid("web.prod.toml"), Some("web.prod")),
            // Once a disagreement: the watcher took this for `#web`.
            ("#web.toml", Ignored, None),
            ("#web.toml#", Ignored, None),
            (".#web.toml", Ignored, None),
            (".web.toml", Ignored, None),
            (".web.toml.swp", Ignored, None),
            ("web.toml.swp", Ignored, None),
            ("web.toml.swx", Ignored, None),
            ("web.toml~", Ignored, None),
            ("web.toml.tmp", Ignored, None),
            ("web.toml.bak", Ignored, None),
            ("4913", Ignored, None),
            (".toml", Ignored, None),
            ("toml", Ignored, None),
            ("web.TOML", Ignored, None),
            ("web", Ignored, None),
            ("/", Ignored, None),
        ];
        // What `durable::write_atomic` leaves while it writes a declaration.
        let temp = crate::durable::temp_path(Path::new("web.toml"));
        let temp = temp.to_str().unwrap();
        for (path, file, candidate) in table.iter().cloned().chain([(temp, Ignored, None)]) {
            assert_eq!(declaration::instance_name(Path::new(path)), file, "instance_name({path:?})");
            assert_eq!(candidate_name(Path::new(path)).as_deref(), candidate, "candidate_name({path:?})");
        }
    }

    #[test]
    fn non_utf8_name_is_not_a_candidate() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(OsStr::from_bytes(b"w\xffb.toml"));
        assert_eq!(candidate_name(path), None);
    }

    #[tokio::test]
    async fn create_modify_delete() {
        let (_tmp, dir, mut rx, _w) = setup();
        let file = dir.join("web.toml");
        fs::write(&file, "image = \"a\"\n").unwrap();
        expect(&mut rx, changed("web")).await;
        // Drain the rest of the create (modify, close-write) before the next step.
        fs::write(dir.join("sentinel1.toml"), "").unwrap();
        expect(&mut rx, changed("sentinel1")).await;

        fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"vcpus = 2\n"))
            .unwrap();
        expect(&mut rx, changed("web")).await;

        fs::remove_file(&file).unwrap();
        expect(&mut rx, removed("web")).await;
    }

    #[tokio::test]
    async fn reading_a_declaration_is_not_a_change() {
        let (_tmp, dir, mut rx, _w) = setup();
        let file = dir.join("web.toml");
        fs::write(&file, "x").unwrap();
        fs::write(dir.join("sentinel1.toml"), "").unwrap();
        expect(&mut rx, changed("sentinel1")).await;
        let _ = fs::read(&file).unwrap();
        fs::write(dir.join("sentinel2.toml"), "").unwrap();
        let before = expect(&mut rx, changed("sentinel2")).await;
        assert!(
            before
                .iter()
                .all(|e| e.name.as_deref() == Some("sentinel1")),
            "{before:?}"
        );
    }

    #[tokio::test]
    async fn atomic_save_by_rename_is_a_change_of_the_target() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("instances");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("web.toml"), "old").unwrap();
        let (tx, mut rx) = unbounded_channel();
        let _w = Watcher::start(dir.clone(), tx).unwrap();

        fs::write(dir.join(".web.toml.new"), "new").unwrap();
        fs::rename(dir.join(".web.toml.new"), dir.join("web.toml")).unwrap();
        let before = expect(&mut rx, changed("web")).await;
        assert_eq!(before, vec![], "the temp file must not show up");
        assert_eq!(fs::read_to_string(dir.join("web.toml")).unwrap(), "new");
    }

    #[tokio::test]
    async fn rename_away_is_a_removal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("instances");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("web.toml"), "x").unwrap();
        let (tx, mut rx) = unbounded_channel();
        let _w = Watcher::start(dir.clone(), tx).unwrap();

        fs::rename(dir.join("web.toml"), dir.join("web.toml.disabled")).unwrap();
        expect(&mut rx, removed("web")).await;
    }

    #[tokio::test]
    async fn editor_files_are_ignored() {
        let (_tmp, dir, mut rx, _w) = setup();
        for junk in [
            ".web.toml.swp",
            ".web.toml.swx",
            "web.toml~",
            "web.toml.tmp",
            "4913",
            "#web.toml#",
            ".hidden.toml",
            "notes.txt",
        ] {
            fs::write(dir.join(junk), "x").unwrap();
            fs::remove_file(dir.join(junk)).unwrap();
        }
        std::os::unix::fs::symlink("user@host.1234", dir.join(".#web.toml")).unwrap();
        fs::write(dir.join("sentinel.toml"), "").unwrap();
        let before = expect(&mut rx, changed("sentinel")).await;
        assert_eq!(before, vec![]);
    }

    #[tokio::test]
    async fn directory_created_after_start() {
        let tmp = tempfile::tempdir().unwrap();
        // Neither the config dir nor the instances dir exist yet.
        let dir = tmp.path().join("hypeman").join("instances");
        let (tx, mut rx) = unbounded_channel();
        let _w = Watcher::start(dir.clone(), tx).unwrap();

        fs::create_dir_all(&dir).unwrap();
        expect(&mut rx, rescan()).await;
        fs::write(dir.join("web.toml"), "x").unwrap();
        expect(&mut rx, changed("web")).await;
    }

    #[tokio::test]
    async fn directory_deleted_and_recreated() {
        let (tmp, dir, mut rx, _w) = setup();
        fs::write(dir.join("web.toml"), "x").unwrap();
        expect(&mut rx, changed("web")).await;

        fs::remove_dir_all(&dir).unwrap();
        expect(&mut rx, rescan()).await;

        // The whole config dir, this time, with a rename in place.
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("db.toml"), "x").unwrap();
        fs::rename(&staging, &dir).unwrap();
        expect(&mut rx, rescan()).await;

        fs::write(dir.join("api.toml"), "x").unwrap();
        expect(&mut rx, changed("api")).await;
    }

    #[tokio::test]
    async fn directory_replaced_behind_a_symlink() {
        // NixOS: /etc/hypeman/instances -> /etc/static/... swapped on switch.
        let tmp = tempfile::tempdir().unwrap();
        let gen1 = tmp.path().join("gen1");
        let gen2 = tmp.path().join("gen2");
        fs::create_dir(&gen1).unwrap();
        fs::create_dir(&gen2).unwrap();
        let dir = tmp.path().join("instances");
        std::os::unix::fs::symlink(&gen1, &dir).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let _w = Watcher::start(dir.clone(), tx).unwrap();

        let next = tmp.path().join("instances.next");
        std::os::unix::fs::symlink(&gen2, &next).unwrap();
        fs::rename(&next, &dir).unwrap();
        expect(&mut rx, rescan()).await;
        fs::write(gen2.join("web.toml"), "x").unwrap();
        expect(&mut rx, changed("web")).await;
    }

    #[tokio::test]
    async fn symlinked_declarations() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::write(store.join("v1"), "image = \"a\"").unwrap();
        fs::write(store.join("v2"), "image = \"b\"").unwrap();
        let dir = tmp.path().join("instances");
        fs::create_dir(&dir).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let _w = Watcher::start(dir.clone(), tx).unwrap();

        std::os::unix::fs::symlink(store.join("v1"), dir.join("web.toml")).unwrap();
        expect(&mut rx, changed("web")).await;

        // Replace the link atomically, as NixOS activation does.
        std::os::unix::fs::symlink(store.join("v2"), dir.join(".web.toml.tmp")).unwrap();
        fs::rename(dir.join(".web.toml.tmp"), dir.join("web.toml")).unwrap();
        expect(&mut rx, changed("web")).await;

        fs::remove_file(dir.join("web.toml")).unwrap();
        expect(&mut rx, removed("web")).await;
    }

    #[tokio::test]
    async fn stops_when_dropped() {
        let (_tmp, _dir, mut rx, w) = setup();
        drop(w);
        // The driver owned the only sender: the channel closes.
        let closed = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
        assert_eq!(closed, None);
    }

    #[tokio::test]
    async fn sighup_means_rescan() {
        let (tx, mut rx) = unbounded_channel();
        let task = spawn_sighup(tx).unwrap();
        // SAFETY: kill(2) on our own pid; the handler is installed.
        let rc = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        assert_eq!(rc, 0);
        expect(&mut rx, rescan()).await;
        drop(rx);
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
}
