//! Cache pruning at daemon start: the provisioner's caches (initrds, image
//! disks) lose what no current input needs, keeping every file a live
//! VMM's or a snapshot's launch record names.

use super::{InstanceError, Instances};

impl Instances {
    /// Prunes the provisioner's caches, keeping what a live VMM or a
    /// snapshot was launched with. For daemon start, before any worker: a
    /// `prepare` must not run meanwhile. Skipped while some guest record
    /// cannot be read, since its VMM or snapshot may need any entry.
    pub async fn prune_caches(&self) -> Result<(), InstanceError> {
        let store = self.store.clone();
        let in_use = self
            .run_blocking(move || -> Result<Vec<std::path::PathBuf>, InstanceError> {
                let listing = store.list()?;
                if !listing.unreadable.is_empty() {
                    return Err(InstanceError::UnreadableGuests(listing.unreadable.len()));
                }
                let mut in_use = Vec::new();
                for meta in &listing.guests {
                    let paths = store.guest_paths(meta.id);
                    // A VMM the daemon died before recording leaves only its socket.
                    let live = meta.vmm.is_some() || paths.ch_socket.exists() || paths.qmp_socket.exists();
                    let mut dirs = Vec::new();
                    if live {
                        dirs.push(paths.dir.clone());
                    }
                    if store.snapshot(meta.id)?.is_some() {
                        dirs.push(paths.snapshot_latest.clone());
                    }
                    for dir in dirs {
                        // Unknown means needed: keep everything.
                        in_use.extend(crate::hypervisor::recorded_initrds(&dir).map_err(InstanceError::UnreadableLaunch)?);
                    }
                }
                Ok(in_use)
            })
            .await??;
        self.provisioner.prune_cache(&in_use).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declaration::spec::{HypervisorKind, InstanceSpec};
    use crate::hypervisor::Backends;
    use crate::instances::provision::{self, ProvisionError, Provisioner};
    use crate::settings::Settings;
    use crate::store::{GuestPaths, Metadata, SnapshotInfo, Store, VmmRecord};
    use std::sync::Arc;

    /// Remembers what it was asked to keep.
    #[derive(Default)]
    struct Keeps(std::sync::Mutex<Option<Vec<std::path::PathBuf>>>);

    #[async_trait::async_trait]
    impl Provisioner for Keeps {
        async fn prepare(&self, spec: &InstanceSpec, guest: &GuestPaths, meta: &Metadata) -> Result<crate::hypervisor::VmConfig, ProvisionError> {
            provision::FakeProvisioner.prepare(spec, guest, meta).await
        }

        async fn prune_cache(&self, in_use: &[std::path::PathBuf]) -> Result<(), ProvisionError> {
            *self.0.lock().unwrap() = Some(in_use.to_vec());
            Ok(())
        }
    }

    #[tokio::test]
    async fn pruning_keeps_what_live_vmms_and_snapshots_were_launched_with() {
        use crate::hypervisor::{cloud_hypervisor, launch, qemu};
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let initrd = |n: &str| std::path::PathBuf::from(format!("/data/system/initrd/{n}/initrd.cpio"));
        let record = |n: &str| {
            let mut config = crate::hypervisor::conformance::bare_config();
            config.initrd = Some(initrd(n));
            cloud_hypervisor::LaunchRecord { version: 1, config }
        };
        // Running (recorded), running (only its socket), in standby,
        // stopped: only the stopped one's initrd may go.
        let mut running = store.create_guest("running", HypervisorKind::CloudHypervisor).unwrap();
        let paths = store.guest_paths(running.id);
        launch::write(&paths.dir.join(cloud_hypervisor::LAUNCH_FILE), &record("live")).unwrap();
        running.vmm = Some(VmmRecord { pid: 1, pid_start_time: 1, socket: paths.ch_socket.clone(), version: None });
        store.write_metadata(&running).unwrap();
        let unrecorded = store.create_guest("unrecorded", HypervisorKind::CloudHypervisor).unwrap();
        let paths = store.guest_paths(unrecorded.id);
        launch::write(&paths.dir.join(cloud_hypervisor::LAUNCH_FILE), &record("unrecorded")).unwrap();
        std::fs::write(&paths.ch_socket, b"").unwrap();
        let standby = store.create_guest("standby", HypervisorKind::Qemu).unwrap();
        let dir = store.begin_snapshot(standby.id).unwrap();
        let mut config = crate::hypervisor::conformance::bare_config();
        config.initrd = Some(initrd("snapshot"));
        launch::write(&dir.join(qemu::LAUNCH_FILE), &qemu::LaunchRecord { version: 1, config, argv: vec![] }).unwrap();
        store.commit_snapshot(standby.id, &SnapshotInfo::new(HypervisorKind::Qemu, "9", "h", 0)).unwrap();
        // The guest directory's record is the last VMM's, which is gone.
        launch::write(&store.guest_paths(standby.id).dir.join(qemu::LAUNCH_FILE), &record("gone")).unwrap();
        let stopped = store.create_guest("stopped", HypervisorKind::CloudHypervisor).unwrap();
        launch::write(&store.guest_paths(stopped.id).dir.join(cloud_hypervisor::LAUNCH_FILE), &record("stopped")).unwrap();

        let keeps = Arc::new(Keeps::default());
        let backends = Backends { cloud_hypervisor: None, qemu: None };
        let instances = Instances::new(store.clone(), backends, Arc::new(Settings::defaults()), keeps.clone());
        instances.prune_caches().await.unwrap();
        let mut kept = keeps.0.lock().unwrap().take().expect("asked to prune");
        kept.sort();
        let mut want = vec![initrd("live"), initrd("unrecorded"), initrd("snapshot")];
        want.sort();
        assert_eq!(kept, want);

        // A record that cannot be read stops the pruning.
        std::fs::write(store.guest_paths(running.id).dir.join(cloud_hypervisor::LAUNCH_FILE), b"{").unwrap();
        let err = instances.prune_caches().await.unwrap_err();
        assert!(matches!(err, InstanceError::UnreadableLaunch(_)), "{err}");
        assert!(keeps.0.lock().unwrap().is_none(), "not pruned");
    }
}
