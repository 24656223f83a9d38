//! Hotplug memory around standby: given back before the snapshot, so the
//! snapshot holds only what the guest uses, and plugged again after a
//! restore. Both are best effort: a guest that keeps its memory, or a
//! failed resize, only makes a larger snapshot or a smaller guest for a
//! while, so neither fails the step.

use super::{error_chain, Instances};
use crate::hypervisor::{Hypervisor, VmInfo, VmmHandle};
use super::step::Memory;
use std::time::Duration;
use tokio::time::Instant;

/// While a guest unplugs memory: how often its size is read, how long it
/// must stay unchanged to count as settled, and how long to wait at most.
/// The settling time is long because a guest answers late: under QEMU TCG
/// a 128 MiB virtio-mem device read fully plugged for 110 ms after the
/// request and then empty at once (measured), so a few readings 20 ms apart
/// mistook "not started yet" for "keeps its memory".
const MEMORY_POLL: Duration = Duration::from_millis(20);
const MEMORY_SETTLED_AFTER: Duration = Duration::from_secs(1);
const MEMORY_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one reading of the plugged size says about a shrink in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shrink {
    /// At the target: done.
    Reached,
    /// Unchanged for `MEMORY_SETTLED_AFTER`: the guest keeps the rest.
    Kept,
    /// Still moving, or not long enough unchanged: read again.
    Waiting,
}

/// The pure part of the shrink loop: remembers the last reading and when
/// it last changed (an unreadable size counts as a change, so it never
/// settles on nothing).
struct ShrinkWatch {
    target: u64,
    last: Option<u64>,
    since: Instant,
}

impl ShrinkWatch {
    fn new(target: u64, now: Instant) -> ShrinkWatch {
        ShrinkWatch { target, last: None, since: now }
    }

    fn observe(&mut self, actual: Option<u64>, now: Instant) -> Shrink {
        if actual == Some(self.target) {
            return Shrink::Reached;
        }
        if actual.is_none() || actual != self.last {
            self.last = actual;
            self.since = now;
            return Shrink::Waiting;
        }
        if now.duration_since(self.since) >= MEMORY_SETTLED_AFTER {
            Shrink::Kept
        } else {
            Shrink::Waiting
        }
    }
}

impl Instances {
    /// Resizes the guest down to its boot memory and waits until the
    /// plugged size reaches it or stops changing (the guest unplugs block
    /// by block). Cloud Hypervisor reports the requested size at once, so
    /// there the backend's `resize_memory` does the waiting and this loop
    /// ends on its first reading.
    pub(super) async fn shrink_memory(&self, backend: &dyn Hypervisor, vmm: &VmmHandle, base: u64, name: &str) {
        let before = match backend.info(vmm).await {
            Ok(VmInfo { memory_actual_bytes: Some(actual), .. }) if actual > base => actual,
            _ => return,
        };
        if let Err(e) = backend.resize_memory(vmm, base).await {
            tracing::warn!(instance = %name, error = %error_chain(&e), "cannot shrink memory before standby");
            return;
        }
        let started = Instant::now();
        let mut watch = ShrinkWatch::new(base, started);
        while started.elapsed() < MEMORY_SETTLE_TIMEOUT {
            let actual = backend.info(vmm).await.ok().and_then(|i| i.memory_actual_bytes);
            match watch.observe(actual, Instant::now()) {
                Shrink::Reached => {
                    tracing::info!(instance = %name, before, base, ms = started.elapsed().as_millis() as u64, "memory shrunk to the boot memory");
                    return;
                }
                Shrink::Kept => {
                    tracing::info!(instance = %name, actual = actual.unwrap_or(0), base, "the guest kept part of its hotplug memory");
                    return;
                }
                Shrink::Waiting => tokio::time::sleep(MEMORY_POLL).await,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_shrink_that_has_not_started_yet_is_waited_for() {
        let t0 = Instant::now();
        let mut w = ShrinkWatch::new(128 * MIB, t0);
        // Fully plugged for a while (the guest has not reacted), then gone.
        for ms in [0, 20, 40, 60, 110, 900] {
            assert_eq!(w.observe(Some(256 * MIB), t0 + Duration::from_millis(ms)), Shrink::Waiting, "at {ms} ms");
        }
        assert_eq!(w.observe(Some(128 * MIB), t0 + Duration::from_millis(920)), Shrink::Reached);
    }

    #[test]
    fn a_guest_that_stops_unplugging_keeps_the_rest_after_the_settling_time() {
        let t0 = Instant::now();
        let mut w = ShrinkWatch::new(128 * MIB, t0);
        assert_eq!(w.observe(Some(256 * MIB), t0), Shrink::Waiting);
        let moved = t0 + Duration::from_millis(300);
        assert_eq!(w.observe(Some(192 * MIB), moved), Shrink::Waiting);
        assert_eq!(w.observe(Some(192 * MIB), moved + MEMORY_SETTLED_AFTER - Duration::from_millis(1)), Shrink::Waiting);
        assert_eq!(w.observe(Some(192 * MIB), moved + MEMORY_SETTLED_AFTER), Shrink::Kept);
    }

    #[test]
    fn an_unreadable_size_never_counts_as_settled() {
        let t0 = Instant::now();
        let mut w = ShrinkWatch::new(128 * MIB, t0);
        for s in 0..5 {
            assert_eq!(w.observe(None, t0 + MEMORY_SETTLED_AFTER * s), Shrink::Waiting);
        }
    }
}
