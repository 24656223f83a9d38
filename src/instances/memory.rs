//! Hotplug memory around standby: given back before the snapshot, so the
//! snapshot holds only what the guest uses, and plugged again after a
//! restore. Both are best effort: a guest that keeps its memory, or a
//! failed resize, only makes a larger snapshot or a smaller guest for a
//! while, so neither fails the step.

use super::{error_chain, Instances};
use crate::hypervisor::{Hypervisor, VmInfo, VmmHandle};
use super::step::Memory;
use std::time::Duration;

/// While a guest unplugs memory: how often its size is read, how many
/// equal readings in a row count as settled, and how long to wait at most.
const MEMORY_POLL: Duration = Duration::from_millis(20);
const MEMORY_STABLE_READINGS: u32 = 3;
const MEMORY_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

impl Instances {
    /// Resizes the guest down to its boot memory and waits until the
    /// plugged size stops changing (the guest unplugs block by block).
    /// Cloud Hypervisor reports the requested size at once, so there the
    /// backend's `resize_memory` does the waiting and this loop ends on its
    /// first reading.
    pub(super) async fn shrink_memory(&self, backend: &dyn Hypervisor, vmm: &VmmHandle, base: u64, name: &str) {
        match backend.info(vmm).await {
            Ok(VmInfo { memory_actual_bytes: Some(actual), .. }) if actual > base => {}
            _ => return,
        }
        if let Err(e) = backend.resize_memory(vmm, base).await {
            tracing::warn!(instance = %name, error = %error_chain(&e), "cannot shrink memory before standby");
            return;
        }
        let deadline = tokio::time::Instant::now() + MEMORY_SETTLE_TIMEOUT;
        let (mut last, mut stable) = (None, 0);
        while tokio::time::Instant::now() < deadline {
            let actual = backend.info(vmm).await.ok().and_then(|i| i.memory_actual_bytes);
            if actual == Some(base) {
                return;
            }
            stable = if actual.is_some() && actual == last { stable + 1 } else { 0 };
            if stable + 1 >= MEMORY_STABLE_READINGS {
                tracing::info!(instance = %name, actual = actual.unwrap_or(0), base, "the guest kept part of its hotplug memory");
                return;
            }
            last = actual;
            tokio::time::sleep(MEMORY_POLL).await;
        }
        tracing::warn!(instance = %name, "memory still changing after {MEMORY_SETTLE_TIMEOUT:?}; snapshotting anyway");
    }

    /// Plugs a restored guest's memory back to what it had when it booted.
    /// The guest plugs it in the background; nothing waits for it.
    pub(super) async fn grow_memory(&self, backend: &dyn Hypervisor, vmm: &VmmHandle, memory: Memory, name: &str) {
        let target = backend.running_memory_bytes(memory.boot_bytes, memory.hotplug_bytes);
        match backend.info(vmm).await {
            Ok(VmInfo { memory_actual_bytes: Some(actual), .. }) if actual < target => {}
            _ => return,
        }
        if let Err(e) = backend.resize_memory(vmm, target).await {
            tracing::warn!(instance = %name, error = %error_chain(&e), "cannot grow memory after restore");
        }
    }
}
