//! VMM uids (`[vmm] users = "per-instance"`): each guest gets the lowest
//! uid of `uid_range` no other guest record holds, recorded in its
//! metadata before its first VMM starts, and keeps it until it is removed.
//! Recorded first, spawned after: a daemon killed in between finds the uid
//! in the record and uses it again. One lock is held from reading the
//! records to writing the new one, so two creates cannot pick the same uid.
//!
//! The uid is also the VMM's gid (no `/etc/passwd` or `/etc/group` entry is
//! needed: the VMM is spawned already as it, see `hypervisor::process`).

use super::{InstanceError, Instances};
use crate::hypervisor::VmmUser;
use crate::settings::{Settings, VmmUsers};
use crate::store::Metadata;
use std::collections::BTreeSet;

/// The lowest free uid of `first..=last`; the recorded one while it is in
/// range (a guest keeps its uid, even one another record now claims too:
/// that other record is the newer, and gets its own at its next create).
pub fn pick_uid(first: u32, last: u32, recorded: Option<u32>, taken: &BTreeSet<u32>) -> Option<u32> {
    if let Some(uid) = recorded.filter(|u| (first..=last).contains(u)) {
        return Some(uid);
    }
    (first..=last).find(|u| !taken.contains(u))
}

/// What a guest's VMM runs as under `settings`: `None` while VMMs run as
/// root (or the guest has no uid yet).
pub fn vmm_user(settings: &Settings, meta: &Metadata) -> Option<VmmUser> {
    match settings.vmm.users {
        VmmUsers::Root => None,
        VmmUsers::PerInstance => {
            let uid = meta.vmm_uid?;
            let mut groups = vec![settings.vmm.group];
            groups.extend(crate::hypervisor::handover::kvm_group());
            Some(VmmUser { uid, gid: uid, groups, data_dir: settings.data_dir.clone() })
        }
    }
}

impl Instances {
    /// Gives the guest its VMM uid when VMMs run per instance, recorded
    /// before returning.
    pub(super) async fn ensure_vmm_uid(&self, meta: &mut Metadata) -> Result<(), InstanceError> {
        let vmm = self.settings.vmm;
        if vmm.users == VmmUsers::Root {
            return Ok(());
        }
        if meta.vmm_uid.is_some_and(|u| (vmm.uid_first..=vmm.uid_last).contains(&u)) {
            return Ok(());
        }
        let _held = self.vmm_uids.lock().await;
        let listing = self.blocking(|store: &crate::store::Store| store.list()).await?;
        if !listing.unreadable.is_empty() {
            return Err(InstanceError::UnreadableVmmUids(listing.unreadable.len()));
        }
        let taken: BTreeSet<u32> = listing.guests.iter().filter(|g| g.id != meta.id).filter_map(|g| g.vmm_uid).collect();
        let uid = pick_uid(vmm.uid_first, vmm.uid_last, meta.vmm_uid, &taken)
            .ok_or(InstanceError::VmmUidsExhausted { first: vmm.uid_first, last: vmm.uid_last })?;
        meta.vmm_uid = Some(uid);
        self.write_metadata(meta).await?;
        tracing::info!(instance = %meta.name, uid, "VMM uid recorded");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_uid_and_a_recorded_one_is_kept() {
        let taken: BTreeSet<u32> = [100, 101, 103].into();
        assert_eq!(pick_uid(100, 105, None, &taken), Some(102));
        assert_eq!(pick_uid(100, 105, Some(104), &taken), Some(104), "kept");
        assert_eq!(pick_uid(100, 105, Some(7), &taken), Some(102), "out of a changed range: a new one");
        assert_eq!(pick_uid(100, 101, None, &taken), None, "exhausted");
        assert_eq!(pick_uid(5, 5, None, &BTreeSet::new()), Some(5));
    }

    #[test]
    fn root_mode_has_no_user_and_per_instance_the_recorded_uid() {
        let mut settings = Settings::defaults();
        settings.vmm.users = VmmUsers::Root;
        let mut meta = Metadata::new(ulid::Ulid::new(), "web", crate::hypervisor::HypervisorKind::Qemu);
        meta.vmm_uid = Some(70003);
        assert_eq!(vmm_user(&settings, &meta), None);
        settings.vmm.users = VmmUsers::PerInstance;
        let user = vmm_user(&settings, &meta).unwrap();
        assert_eq!((user.uid, user.gid, user.groups[0]), (70003, 70003, settings.vmm.group));
        meta.vmm_uid = None;
        assert_eq!(vmm_user(&settings, &meta), None, "no uid recorded yet: nothing to run as");
    }
}
