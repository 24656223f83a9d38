//! Finding the guest's disks by virtio serial (`/sys/block/vd*/serial`),
//! never by `vdX` order, which depends on probe order and the hypervisor.
//! The sysfs root is a parameter so tests can use a fake tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::InitError;

/// Serial → device node (`/dev/vdb`), from the `block` directory under
/// `sys_root` (normally `/sys`). Disks without a serial are skipped.
pub fn scan(sys_root: &Path, dev_root: &Path) -> Result<BTreeMap<String, PathBuf>, InitError> {
    let block = sys_root.join("block");
    let entries = match std::fs::read_dir(&block) {
        Ok(e) => e,
        // Before the first block device registers, the directory may be empty
        // or, on odd kernels, absent; both mean "nothing yet".
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(InitError::io("list", block, e)),
    };
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| InitError::io("list", &block, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("vd") {
            names.push(name);
        }
    }
    names.sort();
    let mut map: BTreeMap<String, PathBuf> = BTreeMap::new();
    for name in names {
        let serial_path = block.join(&name).join("serial");
        let serial = match std::fs::read_to_string(&serial_path) {
            Ok(s) => s.trim_end_matches(['\n', '\0']).trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(InitError::io("read", serial_path, e)),
        };
        if serial.is_empty() {
            continue;
        }
        let dev = dev_root.join(&name);
        if let Some(first) = map.get(&serial) {
            return Err(InitError::DuplicateSerial {
                serial,
                first: first.display().to_string(),
                second: dev.display().to_string(),
            });
        }
        map.insert(serial, dev);
    }
    Ok(map)
}

/// Polls [`scan`] until every serial in `wanted` is present or `timeout`
/// passes. Virtio probing is asynchronous to module loading, so the disks
/// appear some milliseconds after `virtio_blk` is in.
pub fn wait_for(
    sys_root: &Path,
    dev_root: &Path,
    wanted: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, PathBuf>, InitError> {
    let start = Instant::now();
    loop {
        let found = scan(sys_root, dev_root)?;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|w| !found.contains_key(*w))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(found);
        }
        if start.elapsed() >= timeout {
            return Err(InitError::DisksMissing {
                missing,
                found: found.keys().cloned().collect(),
                waited_s: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_disk(sys: &Path, name: &str, serial: Option<&str>) {
        let dir = sys.join("block").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        if let Some(s) = serial {
            std::fs::write(dir.join("serial"), format!("{s}\n")).expect("write serial");
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hypeman-init-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn maps_serials_to_devices_regardless_of_order() {
        let sys = temp_dir("scan");
        fake_disk(&sys, "vda", Some("config"));
        fake_disk(&sys, "vdb", Some("overlay"));
        fake_disk(&sys, "vdc", Some("rootfs"));
        fake_disk(&sys, "vdd", None);
        fake_disk(&sys, "vde", Some(""));
        fake_disk(&sys, "loop0", Some("rootfs-not-virtio"));
        let map = scan(&sys, Path::new("/dev")).expect("scan");
        assert_eq!(map.len(), 3, "{map:?}");
        assert_eq!(map["rootfs"], Path::new("/dev/vdc"));
        assert_eq!(map["overlay"], Path::new("/dev/vdb"));
        assert_eq!(map["config"], Path::new("/dev/vda"));
        let _ = std::fs::remove_dir_all(&sys);
    }

    #[test]
    fn duplicate_serials_are_an_error() {
        let sys = temp_dir("dup");
        fake_disk(&sys, "vda", Some("rootfs"));
        fake_disk(&sys, "vdb", Some("rootfs"));
        let err = scan(&sys, Path::new("/dev")).expect_err("duplicate");
        assert!(err.to_string().contains("/dev/vda and /dev/vdb"), "{err}");
        let _ = std::fs::remove_dir_all(&sys);
    }

    #[test]
    fn waiting_reports_which_serials_are_missing() {
        let sys = temp_dir("wait");
        fake_disk(&sys, "vda", Some("rootfs"));
        let wanted = vec!["rootfs".to_owned(), "vol0".to_owned()];
        let err = wait_for(&sys, Path::new("/dev"), &wanted, Duration::from_millis(50))
            .expect_err("missing");
        let text = err.to_string();
        assert!(
            text.contains("[\"vol0\"]") && text.contains("found: [\"rootfs\"]"),
            "{text}"
        );
        fake_disk(&sys, "vdb", Some("vol0"));
        let map = wait_for(&sys, Path::new("/dev"), &wanted, Duration::from_millis(50))
            .expect("all there");
        assert_eq!(map["vol0"], Path::new("/dev/vdb"));
        let _ = std::fs::remove_dir_all(&sys);
    }

    #[test]
    fn a_missing_block_directory_means_no_disks_yet() {
        let sys = temp_dir("empty");
        assert!(scan(&sys, Path::new("/dev")).expect("scan").is_empty());
        let _ = std::fs::remove_dir_all(&sys);
    }
}
