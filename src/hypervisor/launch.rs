//! Launch records: what a VM was started with, persisted as JSON beside it
//! (in the guest directory) and copied into each of its snapshots, so a
//! restarted daemon or a restore knows the configuration without asking the
//! VMM. Backend-neutral file handling only; each backend defines its record.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

use crate::durable::{self, DurableError};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {} as JSON", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: DurableError,
    },
    #[error("{} is not a launch record", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, LaunchError> {
    let bytes = std::fs::read(path).map_err(|source| LaunchError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| LaunchError::Parse { path: path.to_path_buf(), source })
}

/// The initrd a launch record names, whichever backend wrote it (both keep
/// the launch config under `config`); `None` when there is no record or it
/// names none.
pub fn recorded_initrd(path: &Path) -> Result<Option<PathBuf>, LaunchError> {
    // Lenient on purpose: only the one field matters here, and a record of
    // any version that has it must count.
    #[derive(serde::Deserialize)]
    struct Record {
        config: Config,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        initrd: Option<PathBuf>,
    }
    match read::<Record>(path) {
        Ok(record) => Ok(record.config.initrd),
        Err(LaunchError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Temp file, fsync, rename, fsync the directory: a crash leaves the old
/// record or the new, and a record that was written stays written.
pub fn write<T: Serialize>(path: &Path, record: &T) -> Result<(), LaunchError> {
    let json = serde_json::to_vec_pretty(record).map_err(|source| LaunchError::Encode { path: path.to_path_buf(), source })?;
    durable::write_atomic(path, &json).map_err(|source| LaunchError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initrd_of_a_record_of_either_backend() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = crate::hypervisor::conformance::bare_config();
        config.initrd = Some("/data/system/initrd/ab/initrd.cpio".into());
        let qemu = crate::hypervisor::qemu::LaunchRecord { version: 1, config: config.clone(), argv: vec!["-m".into()] };
        let ch = crate::hypervisor::cloud_hypervisor::LaunchRecord { version: 1, config: config.clone() };
        write(&tmp.path().join("launch.json"), &qemu).unwrap();
        write(&tmp.path().join("ch-launch.json"), &ch).unwrap();
        for file in ["launch.json", "ch-launch.json"] {
            assert_eq!(recorded_initrd(&tmp.path().join(file)).unwrap(), config.initrd, "{file}");
        }
        assert_eq!(recorded_initrd(&tmp.path().join("none.json")).unwrap(), None);
        std::fs::write(tmp.path().join("bad.json"), b"{}").unwrap();
        assert!(matches!(recorded_initrd(&tmp.path().join("bad.json")), Err(LaunchError::Parse { .. })));
    }

    #[test]
    fn a_rewrite_replaces_the_record_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("launch.json");
        let record = |argv: &str| crate::hypervisor::qemu::LaunchRecord {
            version: 1,
            config: crate::hypervisor::conformance::bare_config(),
            argv: vec![argv.into()],
        };
        write(&path, &record("old")).unwrap();
        write(&path, &record("new")).unwrap();
        let read: crate::hypervisor::qemu::LaunchRecord = read(&path).unwrap();
        assert_eq!(read.argv, ["new"]);
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["launch.json"]);
        let err = write(&tmp.path().join("gone/launch.json"), &record("x")).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot write {}", tmp.path().join("gone/launch.json").display()));
    }
}
