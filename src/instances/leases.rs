//! Guest addresses: a guest with `[network] enabled` gets its lease here,
//! recorded in its metadata before `prepare` makes its TAP, and keeps it
//! until the guest is removed (a stopped guest comes back on the same
//! address). Its TAP lives while a VMM or a snapshot may use it.
//!
//! Every guest's address is read from the store at the first lease the
//! daemon hands out and kept up to date by each lease, release and removal.
//! The index is held from looking up the free addresses to recording a new
//! lease, so two creates cannot pick the same one.

use super::{InstanceError, Instances};
use crate::declaration::spec::InstanceSpec;
use crate::network::ipam::LeaseIndex;
use crate::store::{Metadata, StoreError};

/// The daemon's lease book; empty until the first lease needs it.
#[derive(Default)]
pub(super) struct Leases(tokio::sync::Mutex<Option<LeaseBook>>);

/// The lease index and how many guest records could not be read when it
/// was built: those may hold addresses it does not know.
struct LeaseBook {
    index: LeaseIndex,
    unreadable: usize,
}

impl Instances {
    /// Gives a guest with `[network] enabled` its lease (the recorded one
    /// while still valid, else a free address) and records it before
    /// returning; drops the lease and TAP of a guest whose declaration no
    /// longer enables networking.
    pub(super) async fn ensure_lease(&self, spec: &InstanceSpec, meta: &mut Metadata) -> Result<(), InstanceError> {
        if !spec.network.enabled {
            if meta.network.is_some() {
                let mut slot = self.leases.0.lock().await;
                self.provisioner.release(meta).await?;
                meta.network = None;
                self.write_metadata(meta).await?;
                if let Some(book) = slot.as_mut() {
                    book.index.set(meta.id, None);
                }
            }
            return Ok(());
        }
        let subnet = &self.settings.network.subnet;
        let mut slot = self.leases.0.lock().await;
        // An index that does not know what this guest's record says missed
        // a change on disk: read every record again.
        let mut reread = !slot.as_ref().is_some_and(|b| b.index.agrees(meta.id, meta.network.as_ref()));
        loop {
            let book = match &mut *slot {
                Some(book) if !reread => book,
                _ => slot.insert(self.blocking(read_leases).await?),
            };
            let lease = crate::network::ipam::lease_for(subnet, meta.id, meta.network.as_ref(), &book.index.others_of(meta.id))?;
            if meta.network.as_ref() == Some(&lease) {
                return Ok(());
            }
            if book.unreadable > 0 {
                if reread {
                    return Err(InstanceError::UnreadableLeases(book.unreadable));
                }
                // They may have been repaired since: look again first.
                reread = true;
                continue;
            }
            if let Some(old) = &meta.network {
                tracing::warn!(instance = %meta.name, old = %old.ip, new = %lease.ip, "the recorded address no longer fits the network settings; replacing it");
                // A TAP name depends only on the ID, so the old TAP is this
                // guest's one and is kept.
            }
            meta.network = Some(lease);
            self.write_metadata(meta).await?;
            book.index.set(meta.id, meta.network.as_ref());
            tracing::info!(instance = %meta.name, ip = meta.network.as_ref().map(|l| l.ip.as_str()).unwrap_or(""), "guest address leased");
            return Ok(());
        }
    }

    /// Forgets a removed guest's lease in the index (its record is gone).
    pub(super) async fn forget_lease(&self, meta: &Metadata) {
        if let Some(book) = self.leases.0.lock().await.as_mut() {
            book.index.set(meta.id, None);
        }
    }
}

/// Every guest's lease, from the store.
fn read_leases(store: &crate::store::Store) -> Result<LeaseBook, StoreError> {
    let listing = store.list()?;
    let mut index = LeaseIndex::default();
    for guest in &listing.guests {
        index.set(guest.id, guest.network.as_ref());
    }
    tracing::debug!(leases = index.len(), unreadable = listing.unreadable.len(), "lease index read from the store");
    Ok(LeaseBook { index, unreadable: listing.unreadable.len() })
}
