//! What a pull reports while it works: the [`PullEvent`]s the store emits,
//! in order, and the [`Progress`] trait that receives them.
//!
//! ```text
//!  Resolved ─┬─ LayerCached × n ── Cached                     (already converted)
//!            └─ (BlobStarted ─ BlobProgress* ─ BlobVerified) × n
//!               ─ Unpacking × n ─ Unpacked ─ Building ─ Built
//!  Cached                                     (reference served from the cache
//!                                              without resolving it again)
//! ```
//!
//! Rendering is the receiver's: the CLI draws it on a terminal
//! (`cli::progress`), the daemon logs it ([`LogProgress`]). This module
//! must not write to a terminal or read a clock.

use super::RootfsFormat;

/// One step of a pull. Digests are `sha256:<hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullEvent<'a> {
    /// The reference names this manifest, with `layers` layer blobs of
    /// `bytes` in all.
    Resolved {
        digest: &'a str,
        layers: usize,
        bytes: u64,
    },
    /// A layer blob is not needed: the image it belongs to is converted.
    LayerCached { digest: &'a str, size: u64 },
    /// The image is in the cache; nothing was fetched or converted.
    Cached { digest: &'a str },
    BlobStarted { digest: &'a str, size: u64 },
    /// `done` bytes of the blob have been written, after each chunk.
    BlobProgress {
        digest: &'a str,
        done: u64,
        size: u64,
    },
    /// The whole blob arrived and its size and sha256 digest match.
    BlobVerified { digest: &'a str, size: u64 },
    /// Applying layer `index` (from 1) of `count`.
    Unpacking { index: usize, count: usize },
    Unpacked {
        layers: u64,
        entries: u64,
        bytes: u64,
    },
    Building { format: RootfsFormat },
    /// The root disk is written; it occupies `size_bytes` on the host.
    Built {
        format: RootfsFormat,
        size_bytes: u64,
    },
}

/// Receives the events of a pull. Called from the pulling task, once per
/// downloaded chunk among others, so an implementation must be cheap and
/// must not block.
pub trait Progress: Send + Sync {
    fn event(&self, event: &PullEvent<'_>);
}

/// Ignores every event.
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _: &PullEvent<'_>) {}
}

/// Logs a pull for the daemon: one info line per fetched layer and per
/// conversion phase finished, nothing per chunk.
pub struct LogProgress;

impl Progress for LogProgress {
    fn event(&self, event: &PullEvent<'_>) {
        match *event {
            PullEvent::Resolved {
                digest,
                layers,
                bytes,
            } => tracing::debug!(digest, layers, bytes, "image resolved"),
            PullEvent::LayerCached { .. }
            | PullEvent::BlobStarted { .. }
            | PullEvent::BlobProgress { .. }
            | PullEvent::Unpacking { .. }
            | PullEvent::Building { .. } => {}
            PullEvent::Cached { digest } => tracing::debug!(digest, "image cached"),
            PullEvent::BlobVerified { digest, size } => {
                tracing::info!(digest, bytes = size, "image layer fetched")
            }
            PullEvent::Unpacked {
                layers,
                entries,
                bytes,
            } => tracing::info!(layers, entries, bytes, "image layers unpacked"),
            PullEvent::Built { format, size_bytes } => {
                tracing::info!(format = format.as_str(), disk_bytes = size_bytes, "image root disk built")
            }
        }
    }
}
