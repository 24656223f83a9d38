//! Where each file of a guest lives. Pure path arithmetic: nothing here
//! touches the filesystem, so the layout is readable in one place.

use std::path::{Path, PathBuf};

use ulid::Ulid;

use super::error::StoreError;

/// Longest path a unix socket can bind: `sun_path` is 108 bytes including
/// the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

pub(crate) const METADATA_FILE: &str = "metadata.json";
pub(crate) const LOGS_DIR: &str = "logs";
pub(crate) const SNAPSHOTS_DIR: &str = "snapshots";
pub(crate) const SNAPSHOT_LATEST: &str = "snapshot-latest";
pub(crate) const SNAPSHOT_PARTIAL: &str = "snapshot-latest.partial";
/// Where a snapshot directory goes to be deleted; never read as a snapshot.
pub(crate) const SNAPSHOT_TRASH: &str = ".snapshot-trash";
pub(crate) const SNAPSHOT_MARKER: &str = "snapshot.json";

/// The files of one guest, all under `guests/{ulid}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPaths {
    pub dir: PathBuf,
    pub metadata: PathBuf,
    /// Sparse writable overlay disk.
    pub overlay: PathBuf,
    /// Read-only config disk.
    pub config_disk: PathBuf,
    /// Cloud Hypervisor API socket.
    pub ch_socket: PathBuf,
    /// QEMU QMP socket.
    pub qmp_socket: PathBuf,
    pub logs_dir: PathBuf,
    /// The guest's serial console.
    pub app_log: PathBuf,
    pub vmm_log: PathBuf,
    pub hypeman_log: PathBuf,
    pub snapshots_dir: PathBuf,
    pub snapshot_latest: PathBuf,
}

impl GuestPaths {
    pub(crate) fn new(guests_dir: &Path, id: Ulid) -> GuestPaths {
        let dir = guests_dir.join(id.to_string());
        let logs_dir = dir.join(LOGS_DIR);
        let snapshots_dir = dir.join(SNAPSHOTS_DIR);
        GuestPaths {
            metadata: dir.join(METADATA_FILE),
            overlay: dir.join("overlay.raw"),
            config_disk: dir.join("config.erofs"),
            ch_socket: dir.join("ch.sock"),
            qmp_socket: dir.join("qmp.sock"),
            app_log: logs_dir.join("app.log"),
            vmm_log: logs_dir.join("vmm.log"),
            hypeman_log: logs_dir.join("hypeman.log"),
            logs_dir,
            snapshot_latest: snapshots_dir.join(SNAPSHOT_LATEST),
            snapshots_dir,
            dir,
        }
    }

    pub(crate) fn snapshot_partial(&self) -> PathBuf {
        self.snapshots_dir.join(SNAPSHOT_PARTIAL)
    }

    pub(crate) fn snapshot_trash(&self) -> PathBuf {
        self.snapshots_dir.join(SNAPSHOT_TRASH)
    }

    /// Fails if either API socket path is too long to bind. The ULID part is
    /// fixed-length, so this depends only on the data dir.
    pub fn check_socket_paths(&self) -> Result<(), StoreError> {
        for path in [&self.ch_socket, &self.qmp_socket] {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(StoreError::SocketPathTooLong {
                    path: path.clone(),
                    len,
                    max: MAX_SOCKET_PATH,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_design() {
        let id = Ulid::from_string("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let p = GuestPaths::new(Path::new("/var/lib/hypeman/guests"), id);
        let base = "/var/lib/hypeman/guests/01ARZ3NDEKTSV4RRFFQ69G5FAV";
        assert_eq!(p.dir, Path::new(base));
        assert_eq!(p.metadata, Path::new(base).join("metadata.json"));
        assert_eq!(p.ch_socket, Path::new(base).join("ch.sock"));
        assert_eq!(p.qmp_socket, Path::new(base).join("qmp.sock"));
        assert_eq!(p.app_log, Path::new(base).join("logs/app.log"));
        assert_eq!(
            p.snapshot_latest,
            Path::new(base).join("snapshots/snapshot-latest")
        );
        p.check_socket_paths().unwrap();
    }

    #[test]
    fn socket_path_limit_is_exactly_107_bytes() {
        let id = Ulid::nil();
        // "/guests/" + 26-char ULID + "/qmp.sock" is 43 bytes after the data dir.
        let tail = "/guests/".len() + 26 + "/qmp.sock".len();
        let fits = format!("/{}", "d".repeat(MAX_SOCKET_PATH - tail - 1));
        let p = GuestPaths::new(&Path::new(&fits).join("guests"), id);
        assert_eq!(p.qmp_socket.as_os_str().len(), MAX_SOCKET_PATH);
        p.check_socket_paths().unwrap();

        let too_long = format!("{fits}d");
        let p = GuestPaths::new(&Path::new(&too_long).join("guests"), id);
        match p.check_socket_paths() {
            Err(StoreError::SocketPathTooLong { path, len, max }) => {
                assert_eq!(path, p.qmp_socket);
                assert_eq!(len, 108);
                assert_eq!(max, 107);
            }
            other => panic!("expected SocketPathTooLong, got {other:?}"),
        }
    }
}
