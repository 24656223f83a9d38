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

/// Uids a damaged record may hold, from what it leaves outside its
/// record: the group of each guest directory in `dirs` (set to the VMM's
/// gid, which is its uid, at every launch: `hypervisor::handover`) and the
/// real uid of every live process (a VMM running now).
fn uids_in_use_on_the_host(dirs: &[std::path::PathBuf]) -> BTreeSet<u32> {
    use std::os::unix::fs::MetadataExt;
    let mut uids: BTreeSet<u32> = dirs.iter().filter_map(|d| std::fs::metadata(d).ok()).map(|m| m.gid()).collect();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        let pids = procs.flatten().filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()));
        // The real uid from `status` (the directory's owner follows
        // dumpability, which is not the uid).
        let real_uid = |status: String| status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok());
        uids.extend(pids.filter_map(|p| std::fs::read_to_string(p.path().join("status")).ok()).filter_map(real_uid));
    }
    uids
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
        let mut taken: BTreeSet<u32> = listing.guests.iter().filter(|g| g.id != meta.id).filter_map(|g| g.vmm_uid).collect();
        if !listing.unreadable.is_empty() {
            // A damaged record's uid is not lost with it: its guest directory
            // carries it as its group from its first launch on, and a live
            // VMM shows it as its uid. One damaged record must not keep every
            // new guest from starting, as refusing all picks would.
            let range = vmm.uid_first..=vmm.uid_last;
            let dirs: Vec<std::path::PathBuf> = listing
                .unreadable
                .iter()
                .filter_map(|u| u.id)
                .map(|id| self.store.guest_paths(id).dir)
                .collect();
            let found = self.run_blocking(move || uids_in_use_on_the_host(&dirs)).await?;
            taken.extend(found.into_iter().filter(|u| range.contains(u)));
            tracing::warn!(
                instance = %meta.name,
                unreadable = listing.unreadable.len(),
                "picking a VMM uid while some guest records cannot be read: their uids are taken from their directories' groups and the live VMMs"
            );
        }
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

    /// What a damaged record leaves: its directory's group, and a live
    /// process's real uid (this test's own).
    #[test]
    fn uids_are_found_in_guest_directories_and_live_processes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let found = uids_in_use_on_the_host(&[dir.path().to_path_buf(), dir.path().join("gone")]);
        assert!(found.contains(&gid), "{found:?}");
        assert!(found.contains(&nix::unistd::getuid().as_raw()), "{found:?}");
    }
}
