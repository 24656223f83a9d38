//! The edge that turns a declaration into a bootable launch configuration:
//! root disk from the image, overlay, config disk, kernel and initrd, and
//! the guest's TAP on the host bridge. The executor calls it before every
//! create and restore; an implementation must be idempotent (same inputs →
//! same `VmConfig`, nothing rebuilt that is already there) and must never
//! recreate an overlay that holds data.
//!
//! The guest's network lease is the executor's (it is allocated against
//! every other guest's, under a lock, and recorded before `prepare` runs);
//! `prepare` only reads it from the metadata.

use crate::declaration::spec::InstanceSpec;
use crate::hypervisor::VmConfig;
use crate::network::host::TapHealth;
use crate::store::{GuestPaths, Metadata};
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("image {reference} is not available")]
    Image {
        reference: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot prepare {what} at {path}")]
    Disk {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no guest kernel configured (set [guest] kernel in hypeman.toml)")]
    NoKernel,
    #[error("cannot read the guest kernel {} (set by [guest] kernel in hypeman.toml)", path.display())]
    Kernel {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The init binary cannot run as the guest's PID 1.
    #[error(transparent)]
    Init(crate::system::InitError),
    #[error("cannot set up the guest's network")]
    Network(#[from] crate::network::NetworkError),
    /// A volume source that cannot be attached as it is now; `missing`
    /// when it is not there at all (it may yet be made).
    #[error("volumes[{index}]: the source {} {problem}", path.display())]
    Volume {
        index: usize,
        path: std::path::PathBuf,
        problem: String,
        missing: bool,
    },
    /// An env file the declaration names cannot be used as it is now.
    #[error(transparent)]
    EnvFile(#[from] crate::declaration::env_file::EnvFileError),
    #[error("[network] is enabled but the guest has no address lease")]
    NoLease,
    #[error("{0}")]
    Other(String),
}

/// The files a launch configuration names, with what each is for.
pub fn launch_files(config: &VmConfig) -> Vec<(&'static str, &std::path::Path)> {
    let mut files = vec![("kernel", config.kernel.as_path())];
    files.extend(config.initrd.iter().map(|p| ("initrd", p.as_path())));
    files.extend(config.disks.iter().map(|d| ("disk", d.path.as_path())));
    files
}

/// Every one of `files` is there: a restore would otherwise fail inside
/// the VMM, or worse, bring back a guest whose disk went missing.
pub fn files_present<'a>(files: impl IntoIterator<Item = (&'static str, &'a std::path::Path)>) -> Result<(), ProvisionError> {
    for (what, path) in files {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ProvisionError::Disk { what, path: path.to_path_buf(), source: source.into() });
        }
    }
    Ok(())
}

#[async_trait]
pub trait Provisioner: Send + Sync + 'static {
    /// Makes everything the VM needs on disk and returns its launch config.
    async fn prepare(
        &self,
        spec: &InstanceSpec,
        guest: &GuestPaths,
        meta: &Metadata,
    ) -> Result<VmConfig, ProvisionError>;

    /// Readies the host for restoring a snapshot taken under `config`
    /// (which may be another declaration's, or an older hypeman's):
    /// nothing on disk is rebuilt, every file it names must still be there,
    /// and its TAP is made again if it went (a host reboot). The default
    /// checks the files.
    async fn prepare_restore(&self, meta: &Metadata, config: &VmConfig) -> Result<(), ProvisionError> {
        let _ = meta;
        files_present(launch_files(config))
    }

    /// Removes the host resources `prepare` made that outlive a VMM (the
    /// guest's TAP), once the guest has neither a VMM nor a snapshot that
    /// needs them. Idempotent. The default has nothing to remove.
    async fn release(&self, meta: &Metadata) -> Result<(), ProvisionError> {
        let _ = meta;
        Ok(())
    }

    /// The health check of a guest whose VMM is live: how its TAP looks
    /// (`None`: the guest has no network here). Changes nothing; what is
    /// to be put back is the planner's to choose and `repair_network`'s to
    /// do. The default has no network.
    async fn tap_health(&self, meta: &Metadata) -> Result<Option<TapHealth>, ProvisionError> {
        let _ = meta;
        Ok(None)
    }

    /// Puts the host side of a live guest's network back: the bridge, and
    /// its TAP on it and up. The default has no network.
    async fn repair_network(&self, meta: &Metadata) -> Result<(), ProvisionError> {
        let _ = meta;
        Ok(())
    }

    /// Drops what `prepare` cached that neither the current inputs nor any
    /// of `in_use` (files named by live VMMs' and snapshots' launch records)
    /// needs. Must not run while a `prepare` is under way. The default
    /// caches nothing.
    async fn prune_cache(&self, in_use: &[std::path::PathBuf]) -> Result<(), ProvisionError> {
        let _ = in_use;
        Ok(())
    }
}

/// The provisioner paired with the fake hypervisor in tests and benchmarks:
/// it makes only the sparse overlay (once, never again while it exists;
/// grown, never shrunk) and a launch config from the declaration, with no
/// image or kernel.
pub struct FakeProvisioner;

#[async_trait]
impl Provisioner for FakeProvisioner {
    async fn prepare(
        &self,
        spec: &InstanceSpec,
        guest: &GuestPaths,
        _meta: &Metadata,
    ) -> Result<VmConfig, ProvisionError> {
        let disk_err = |e: std::io::Error| ProvisionError::Disk {
            what: "overlay",
            path: guest.overlay.clone(),
            source: e.into(),
        };
        // The real one's rule, on a file without a filesystem: made once,
        // grown to a larger declared size, never cut back.
        let declared = spec.overlay_size.bytes();
        let file = crate::durable::private_file().create(true).truncate(false).write(true).open(&guest.overlay).map_err(disk_err)?;
        if file.metadata().map_err(disk_err)?.len() < declared {
            file.set_len(declared).map_err(disk_err)?;
        }
        Ok(VmConfig {
            vcpus: spec.vcpus,
            memory_bytes: spec.memory.bytes(),
            hotplug_memory_bytes: spec.hotplug_memory.bytes(),
            kernel: "/fake/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disks: vec![crate::hypervisor::DiskConfig {
                id: "overlay".into(),
                path: guest.overlay.clone(),
                readonly: false,
                limit: Default::default(),
            }],
            net: None,
            devices: vec![],
            serial_log: guest.app_log.clone(),
            vsock: None,
            agent: Some(crate::hypervisor::AgentChannel { socket: crate::agent::socket_path(&guest.dir) }),
            user: None,
        })
    }

    /// The overlay it made must still be there; it has no kernel to check.
    async fn prepare_restore(&self, _meta: &Metadata, config: &VmConfig) -> Result<(), ProvisionError> {
        files_present(launch_files(config).into_iter().filter(|(what, _)| *what != "kernel"))
    }
}
