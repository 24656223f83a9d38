//! The edge that turns a declaration into a bootable launch configuration:
//! root disk from the image, overlay, config disk, kernel and initrd. The
//! executor calls it before every create and restore; an implementation
//! must be idempotent (same inputs → same `VmConfig`, nothing rebuilt that
//! is already there) and must never recreate an overlay that holds data.

use crate::declaration::spec::InstanceSpec;
use crate::hypervisor::VmConfig;
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
    #[error("{0}")]
    Other(String),
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
}
