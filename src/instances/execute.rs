//! Carrying out one planned step: backend calls and store writes, and what
//! they turned out to do as an [`Outcome`]. The step's hop is checked
//! against the state machine before any side effect; what changed is
//! persisted after it. Which step comes next is not decided here.
//!
//! A step holds its inputs (the planner put them there), so nothing here
//! finds a declaration or a VMM missing. The guest's record comes from the
//! observation the step was planned on.
//!
//! Networking: a guest's TAP lives while a VMM or a snapshot may use it: it
//! goes when the guest is stopped (`StopVmm` without a snapshot,
//! `DiscardSnapshot`) or removed. A guest whose VMM ended on its own keeps
//! an idle TAP until it is started again (which reuses it) or removed.

use super::{error_chain, record_of, space, InstanceError, Instances, Observation};
use crate::declaration::spec::{DesiredState, InstanceSpec};
use crate::exit::GuestEnd;
use crate::hypervisor::{Hypervisor, HypervisorError, Probe, VmmHandle};
use crate::state::VmState;
use super::step::{Outcome, PauseFor, Step};
use crate::store::{now_rfc3339, ExitRecord, GuestPaths, Metadata, SnapshotInfo};
use std::sync::Arc;
use tracing::Level;

fn hv(op: &'static str) -> impl Fn(HypervisorError) -> InstanceError {
    move |source| InstanceError::Hypervisor { op, source }
}

impl Instances {
    /// Carries out one step planned on `obs`.
    pub async fn execute(&self, name: &str, step: &Step, obs: &Observation) -> Result<Outcome, InstanceError> {
        if let Some(to) = step.hop() {
            obs.state.hop(to)?;
        }
        if let Step::Provision { spec } = step {
            // The hypervisor is pinned here, once: later passes read it from
            // the record, whatever the settings' default becomes.
            let kind = self.resolve_kind(spec);
            let name = name.to_string();
            self.blocking(move |store| store.create_guest(&name, kind).map(drop)).await?;
            return Ok(Outcome::Done);
        }
        let mut meta = obs.meta.clone().ok_or_else(|| InstanceError::NoGuest(name.to_string()))?;
        let paths = self.store.guest_paths(meta.id);
        if let Step::Pause { vmm, why: PauseFor::Standby, .. } = step {
            // A guest whose snapshot cannot fit is never paused. Checked
            // before the step is logged: while the disk stays full, every
            // recheck would otherwise add a line to `hypeman.log`.
            self.check_space(self.backend(meta.hypervisor)?.as_ref(), vmm, &paths).await?;
        }
        let journal = super::Journal::open(&paths, &meta.name);
        // A repeated press is not news: the first one was logged.
        let level = if matches!(step, Step::PressAgain { .. }) { Level::DEBUG } else { Level::INFO };
        journal.say(level, &format!("{step} (from {}){}", obs.state, why(step)));
        let result = self.act(step, obs, &mut meta, &paths).await;
        if result.is_ok() {
            journal.say(Level::DEBUG, &format!("{step}: done"));
        }
        result
    }

    async fn act(
        &self,
        step: &Step,
        obs: &Observation,
        meta: &mut Metadata,
        paths: &GuestPaths,
    ) -> Result<Outcome, InstanceError> {
        let done = Ok(Outcome::Done);
        match step {
            Step::Converged
            | Step::Blocked(_)
            | Step::WaitUntil(_)
            | Step::AwaitChange
            | Step::AwaitPowerOff(_)
            | Step::Provision { .. } => done,
            Step::Adopt { vmm } => {
                self.event(meta, Level::INFO, &format!("adopting the running VMM (pid {})", vmm.pid));
                meta.vmm = Some(record_of(vmm));
                self.write_metadata(meta).await?;
                done
            }
            Step::ClearStaleSocket { socket } => {
                crate::durable::remove_file_if_exists(socket)?;
                done
            }
            Step::RepairTap => {
                let tap = meta.network.as_ref().map(|l| l.tap.clone()).unwrap_or_default();
                self.provisioner.repair_network(meta).await?;
                self.event(meta, Level::WARN, &format!("TAP {tap} was off the bridge or down; put it back"));
                done
            }
            Step::Create { spec } => self.create(spec, meta, paths).await,
            Step::Boot { vmm } => {
                self.backend(meta.hypervisor)?.boot(vmm).await.map_err(hv("boot"))?;
                done
            }
            Step::Pause { vmm, shrink, why } => {
                let backend = self.backend(meta.hypervisor)?;
                if *why == PauseFor::ReconnectNetwork {
                    let tap = meta.network.as_ref().map(|l| l.tap.as_str()).unwrap_or("?");
                    self.event(meta, Level::WARN, &format!(
                        "the guest lost its network: TAP {tap} was deleted while the VM ran; it is made again, and a standby/restore cycle reconnects the guest"
                    ));
                }
                if let Some(memory) = shrink {
                    self.shrink_memory(backend.as_ref(), vmm, memory.boot_bytes, &meta.name).await;
                }
                backend.pause(vmm).await.map_err(hv("pause"))?;
                done
            }
            Step::Resume { vmm, regrow } => {
                let backend = self.backend(meta.hypervisor)?;
                backend.resume(vmm).await.map_err(hv("resume"))?;
                // A resumed guest's clock stands where it was paused; the
                // agent steps it to the host's. Never fails the step.
                let clock = crate::agent::step_clock(&crate::agent::Transport::for_guest(meta.hypervisor, &paths.dir)).await;
                match clock {
                    Ok(step) => self.event(meta, Level::INFO, &step.to_string()),
                    Err(e) => self.event(meta, Level::INFO, &format!("guest clock not set: {}", error_chain(&e))),
                }
                if let Some(memory) = regrow {
                    self.grow_memory(backend.as_ref(), vmm, *memory, &meta.name).await;
                }
                done
            }
            Step::Snapshot { vmm } => self.snapshot(vmm, obs, meta, paths).await,
            Step::Restore { spec, snapshot } => self.restore(spec, snapshot, meta, paths).await,
            Step::PowerOff { vmm, booted: false, .. } => {
                // Nothing booted that could hear the power button.
                self.backend(meta.hypervisor)?.kill(vmm).await.map_err(hv("kill"))?;
                self.vmm_gone(obs, meta).await?;
                Ok(Outcome::Killed)
            }
            Step::PowerOff { vmm, booted: true, .. } => {
                self.backend(meta.hypervisor)?.power_off(vmm).await.map_err(hv("power off"))?;
                let deadline = tokio::time::Instant::now() + self.settings.reconcile.stop_grace;
                Ok(Outcome::PowerButtonPressed { deadline })
            }
            Step::PressAgain { vmm } => {
                // The grace runs from the first press: the owner keeps it.
                self.backend(meta.hypervisor)?.power_off(vmm).await.map_err(hv("power off"))?;
                Ok(Outcome::PowerButtonPressed { deadline: tokio::time::Instant::now() + self.settings.reconcile.stop_grace })
            }
            Step::Kill { vmm } => {
                let grace = self.settings.reconcile.stop_grace;
                self.event(meta, Level::WARN, &format!(
                    "guest did not power off within {}; killing its VMM",
                    humantime::format_duration(grace)
                ));
                self.backend(meta.hypervisor)?.kill(vmm).await.map_err(hv("kill"))?;
                self.vmm_gone(obs, meta).await?;
                Ok(Outcome::Killed)
            }
            Step::StopVmm { vmm, end } => {
                let backend = self.backend(meta.hypervisor)?;
                self.end_vmm(backend.as_ref(), vmm).await?;
                if let Some(end) = end {
                    self.note_exit(meta, end.clone());
                }
                self.vmm_gone(obs, meta).await?;
                done
            }
            Step::DiscardSnapshot => {
                let id = meta.id;
                self.blocking(move |store| store.remove_snapshot(id)).await?;
                meta.applied = None;
                meta.vmm = None;
                self.write_metadata(meta).await?;
                self.provisioner.release(meta).await?;
                done
            }
            Step::DropStaleSnapshot { vmm, regrow } => {
                // Again here, in case the daemon died between the resume
                // and the growth; a VM already grown is left alone.
                if let Some(memory) = regrow {
                    let backend = self.backend(meta.hypervisor)?;
                    self.grow_memory(backend.as_ref(), vmm, *memory, &meta.name).await;
                }
                let id = meta.id;
                self.blocking(move |store| store.remove_snapshot(id)).await?;
                done
            }
            Step::RecordExit { end } => {
                self.note_exit(meta, end.clone());
                self.vmm_gone(obs, meta).await?;
                done
            }
            Step::ForgetVmm => {
                // The VMM exited with its guest after the power button: the
                // stop the daemon asked for is over.
                self.vmm_gone(obs, meta).await?;
                done
            }
            Step::ForgetExit => {
                meta.exited = None;
                meta.lost_answered = meta.lost.is_some();
                self.write_metadata(meta).await?;
                done
            }
            Step::ForceKill { vmm } => {
                // Bookkeeping outside the table: `Unknown` has no hops, and
                // the next look finds what is left. A VMM of a backend that
                // is not installed (any more) is killed as a process.
                match self.backend(meta.hypervisor) {
                    Ok(backend) => backend.kill(vmm).await.map_err(hv("kill"))?,
                    Err(_) => crate::hypervisor::kill_vmm(vmm, crate::hypervisor::KILL_TIMEOUT).await.map_err(hv("kill"))?,
                }
                meta.vmm = None;
                self.write_metadata(meta).await?;
                done
            }
            Step::Remove => {
                // The TAP first: once the guest record is gone, nothing
                // names it any more. Its lease goes with the record.
                self.provisioner.release(meta).await?;
                let id = meta.id;
                self.blocking(move |store| store.delete_guest(id)).await?;
                self.forget_lease(meta).await;
                done
            }
        }
    }

    /// `Stopped → Created`: the lease, the disks, a VMM holding the VM.
    async fn create(&self, spec: &InstanceSpec, meta: &mut Metadata, paths: &GuestPaths) -> Result<Outcome, InstanceError> {
        // A declaration that names a hypervisor moves the guest to it; one
        // that does not keeps the one pinned at creation.
        let kind = spec.hypervisor_for(meta.hypervisor);
        let backend = self.backend(kind)?;
        meta.hypervisor = kind;
        self.ensure_lease(spec, meta).await?;
        self.ensure_vmm_uid(meta).await?;
        let config = self.lending_turn(self.provisioner.prepare(spec, paths, meta)).await?;
        // The intent first, durably: a daemon killed once the VMM is spawned
        // finds it under the right backend's socket and knows what it was
        // made from (the next look adopts it). Killed before the spawn, the
        // guest is still `Stopped` and this step runs again.
        meta.applied = Some(Box::new(spec.applied_for(kind)));
        meta.exited = None;
        self.write_metadata(meta).await?;
        let guest = Self::guest_vmm(paths, meta);
        let handle = backend.create(&guest, &config).await.map_err(hv("create"))?;
        meta.vmm = Some(record_of(&handle));
        meta.last_error = None;
        meta.lost = None;
        meta.lost_answered = false;
        self.write_metadata(meta).await?;
        Ok(Outcome::Done)
    }

    /// `Paused → Standby`: the snapshot, committed only once complete, and
    /// only then the end of the VMM. A snapshot that fails costs the guest
    /// nothing it still has: see [`Instances::snapshot_failed`].
    async fn snapshot(
        &self,
        vmm: &VmmHandle,
        obs: &Observation,
        meta: &mut Metadata,
        paths: &GuestPaths,
    ) -> Result<Outcome, InstanceError> {
        let backend = self.backend(meta.hypervisor)?;
        let id = meta.id;
        // Checked again here: the pause may have been long ago (a daemon
        // restarted since), and the disk filled meanwhile.
        let needed = match self.check_space(backend.as_ref(), vmm, paths).await {
            Ok(needed) => needed,
            Err(e) => return Err(self.snapshot_failed(backend.as_ref(), vmm, obs, meta, paths, None, e).await),
        };
        let written = async {
            let dir = self.blocking(move |store| store.begin_snapshot(id)).await?;
            let taken = self.lending_turn(backend.snapshot(vmm, &dir)).await.map_err(hv("snapshot"))?;
            let memory = backend.info(vmm).await.ok().and_then(|i| i.memory_actual_bytes).unwrap_or(0);
            let info = SnapshotInfo::new(meta.hypervisor, &taken.hypervisor_version, &taken.config_hash, memory);
            self.blocking(move |store| store.commit_snapshot(id, &info)).await
        };
        if let Err(e) = written.await {
            return Err(self.snapshot_failed(backend.as_ref(), vmm, obs, meta, paths, needed, e).await);
        }
        // Only now, with a complete snapshot on disk, may the VMM go.
        self.end_vmm(backend.as_ref(), vmm).await?;
        meta.vmm = None;
        self.write_metadata(meta).await?;
        Ok(Outcome::Done)
    }

    /// Refuses a snapshot that would not fit in the free space of the
    /// guest's directory, before anything is paused or written; returns the
    /// estimate it checked (`None`: the backend cannot tell, and nothing is
    /// refused).
    async fn check_space(
        &self,
        backend: &dyn Hypervisor,
        vmm: &VmmHandle,
        paths: &GuestPaths,
    ) -> Result<Option<u64>, InstanceError> {
        let Some(needed) = backend.snapshot_size_estimate(vmm).await else { return Ok(None) };
        let dir = paths.dir.clone();
        let available = self.run_blocking(move || space::free_bytes(&dir)).await?;
        let available = available.map_err(|e| crate::durable::DurableError::Io { op: "statvfs", path: paths.dir.clone(), source: e })?;
        match space::shortfall(needed, available) {
            None => Ok(Some(needed)),
            Some(_) => Err(InstanceError::NoSpace {
                dir: paths.snapshots_dir.clone(),
                detail: format!(
                    "the snapshot needs up to {}, {} are available",
                    space::human(needed),
                    space::human(available)
                ),
                source: None,
            }),
        }
    }

    /// After any failure of a snapshot: the partial files go at once, a
    /// guest whose VMM lives is resumed (it keeps running), and the error
    /// says why in the user's terms: a full disk as `No space left on
    /// device` with how much was needed, written and available; a VMM that
    /// died as the loss of the guest's running state, which is recorded
    /// (`Metadata::lost`, `hypeman.log`) so that a fresh boot is never
    /// taken for the user's standby. Safe to re-run: every part is
    /// idempotent, and a daemon killed inside it finds a paused guest or a
    /// dead VMM again and plans from there.
    #[allow(clippy::too_many_arguments)]
    async fn snapshot_failed(
        &self,
        backend: &dyn Hypervisor,
        vmm: &VmmHandle,
        obs: &Observation,
        meta: &mut Metadata,
        paths: &GuestPaths,
        needed: Option<u64>,
        error: InstanceError,
    ) -> InstanceError {
        let partial = paths.snapshot_partial();
        let dir = paths.dir.clone();
        // Measured before the partial files go, which frees their space.
        let (written, available) = self
            .run_blocking(move || (space::written_bytes(&partial), space::free_bytes(&dir).ok()))
            .await
            .unwrap_or((0, None));
        let id = meta.id;
        if let Err(e) = self.blocking(move |store| store.abandon_snapshot(id)).await {
            self.event(meta, Level::ERROR, &format!("cannot remove the failed snapshot: {}", error_chain(&e)));
        }
        let guest = Self::guest_vmm(paths, meta);
        match backend.probe(&guest).await {
            Probe::Alive { state: VmState::Paused, .. } => match backend.resume(vmm).await {
                Ok(()) => self.event(meta, Level::WARN, "the snapshot failed; the guest was resumed and keeps running"),
                Err(e) => self.event(meta, Level::ERROR, &format!("the snapshot failed and the guest could not be resumed: {}", error_chain(&e))),
            },
            Probe::Alive { .. } | Probe::Unreachable { .. } => {}
            Probe::Absent => return self.state_lost(vmm, obs, meta, error).await,
        }
        if matches!(error, InstanceError::NoSpace { .. }) {
            return error;
        }
        let available = available.unwrap_or(u64::MAX);
        if !space::ran_out(&error, available) {
            return error;
        }
        let needed = needed.map_or(String::new(), |n| format!("the snapshot needs up to {}; ", space::human(n)));
        InstanceError::NoSpace {
            dir: paths.snapshots_dir.clone(),
            detail: format!(
                "{needed}{} were written before the disk filled, {} were left free",
                space::human(written),
                space::human(available)
            ),
            source: match error {
                InstanceError::Hypervisor { source, .. } => Some(source),
                _ => None,
            },
        }
    }

    /// The VMM died while its guest was being saved: what the guest was
    /// running is gone. Said in `hypeman.log` and kept in the guest's
    /// record until the declaration says what now.
    async fn state_lost(&self, vmm: &VmmHandle, obs: &Observation, meta: &mut Metadata, error: InstanceError) -> InstanceError {
        let lost = InstanceError::StateLost { pid: vmm.pid, source: Box::new(error) };
        let line = lost.to_string();
        self.event(meta, Level::ERROR, &format!("{line}; it is not booted afresh in its place: declare the instance running to boot it anew, or stopped"));
        meta.lost = Some(line);
        meta.lost_answered = false;
        if let Err(e) = self.vmm_gone(obs, meta).await {
            self.event(meta, Level::ERROR, &format!("cannot record the loss: {}", error_chain(&e)));
        }
        lost
    }

    /// `Standby → Paused`: a new VMM restores the snapshot under the launch
    /// configuration it was taken with, so a guest of an older declaration
    /// (or of an older hypeman, whose VMs lacked a device this one adds)
    /// comes back as it was and can be shut down cleanly. Only a snapshot
    /// that cannot be restored at all is discarded, and the record says why.
    async fn restore(
        &self,
        spec: &Arc<InstanceSpec>,
        snap: &SnapshotInfo,
        meta: &mut Metadata,
        paths: &GuestPaths,
    ) -> Result<Outcome, InstanceError> {
        if let Err(e) = self.verify_snapshot(meta).await {
            // Kept for a guest wanted back; one declared stopped has no use
            // for a snapshot that cannot be restored.
            let damaged = matches!(&e, InstanceError::Store(crate::store::StoreError::DamagedSnapshot { .. }));
            if damaged && spec.state == DesiredState::Stopped {
                return self.discard_unusable(meta, error_chain(&e)).await;
            }
            return Err(e);
        }
        let backend = self.backend(meta.hypervisor)?;
        let started = std::time::Instant::now();
        self.ensure_lease(spec, meta).await?;
        let unusable = match backend.snapshot_config(&paths.snapshot_latest) {
            Ok(config) => match self.restorable(backend.as_ref(), snap, &config, meta).await? {
                None => Ok(config),
                Some(why) => Err(why),
            },
            Err(e) => Err(format!("its launch record cannot be read: {}", error_chain(&e))),
        };
        let config = match unusable {
            Ok(config) => config,
            Err(why) => return self.discard_unusable(meta, why).await,
        };
        if let Err(e) = self.provisioner.prepare_restore(meta, &config).await {
            return self.discard_unusable(meta, error_chain(&e)).await;
        }
        tracing::debug!(instance = %meta.name, prepare_ms = started.elapsed().as_millis() as u64, "host ready for the restore");
        let guest = Self::guest_vmm(paths, meta);
        match backend.restore(&guest, &config, &paths.snapshot_latest).await {
            Ok(handle) => {
                meta.vmm = Some(record_of(&handle));
                meta.last_error = None;
                self.write_metadata(meta).await?;
                Ok(Outcome::Done)
            }
            Err(e) => {
                // Leave the snapshot in place, but no half-restored VMM.
                if let Probe::Alive { handle, .. } = backend.probe(&guest).await {
                    let _ = backend.kill(&handle).await;
                }
                if !matches!(e, HypervisorError::BadSnapshot { .. }) {
                    return Err(InstanceError::Hypervisor { op: "restore", source: e });
                }
                // The VMM refused the snapshot itself: trying again would
                // fail the same way. A guest wanted stopped has no use for
                // it; for any other the running state is not back, and the
                // snapshot is kept for the user to decide.
                if spec.state == DesiredState::Stopped {
                    return self.discard_unusable(meta, error_chain(&e)).await;
                }
                let refused = InstanceError::NotRestored { source: e };
                self.event(meta, Level::ERROR, &error_chain(&refused));
                Err(refused)
            }
        }
    }

    /// Why the snapshot, taken under `config`, cannot be restored on this
    /// host (`None`: it can).
    async fn restorable(
        &self,
        backend: &dyn Hypervisor,
        snap: &SnapshotInfo,
        config: &crate::hypervisor::VmConfig,
        meta: &Metadata,
    ) -> Result<Option<String>, InstanceError> {
        if snap.hypervisor != meta.hypervisor {
            return Ok(Some(format!("it was taken with {}, the instance now uses {}", snap.hypervisor, meta.hypervisor)));
        }
        let version = backend.version().await.map_err(hv("version"))?;
        if snap.hypervisor_version != version {
            return Ok(Some(format!("it was taken with {} {}, this host has {version}", snap.hypervisor, snap.hypervisor_version)));
        }
        if snap.config_hash != config.config_hash() {
            return Ok(Some("its launch record is not the one it was taken with".to_string()));
        }
        Ok(None)
    }

    /// Discards a snapshot that cannot be restored, saying so in the log
    /// and in the record: what the guest had not written is lost.
    async fn discard_unusable(&self, meta: &mut Metadata, why: String) -> Result<Outcome, InstanceError> {
        let message = format!(
            "the standby snapshot cannot be restored ({why}); it was discarded, and what the guest had not written to its disks is lost"
        );
        self.event(meta, Level::WARN, &message);
        // The loss is on record before the snapshot goes: a daemon killed
        // in between finds the snapshot again and discards it again, never
        // a snapshot gone without a word.
        meta.applied = None;
        meta.lost = Some(message.clone());
        meta.lost_answered = false;
        meta.last_error = Some(message);
        self.write_metadata(meta).await?;
        let id = meta.id;
        self.blocking(move |store| store.remove_snapshot(id)).await?;
        Ok(Outcome::SnapshotUnusable { why })
    }

    /// Checks the snapshot against its marker before any VMM is started on
    /// it. A damaged one is kept (declaring the instance stopped discards
    /// it) and reported with the file and the mismatch; its error needs a
    /// change, so it is not restored in a loop.
    async fn verify_snapshot(&self, meta: &Metadata) -> Result<(), InstanceError> {
        let id = meta.id;
        let checked = self.blocking(move |store| store.verify_snapshot(id)).await;
        if let Err(e) = &checked {
            if matches!(e, InstanceError::Store(crate::store::StoreError::DamagedSnapshot { .. })) {
                self.event(meta, Level::ERROR, &format!("{e}; it is kept, and not restored: declare the instance stopped to discard it"));
            }
        }
        checked
    }

    /// Keeps how the guest ended in the metadata (written by the caller)
    /// and says so in the instance's log.
    fn note_exit(&self, meta: &mut Metadata, end: GuestEnd) {
        self.event(meta, Level::INFO, &format!("the guest ended by itself: {end}"));
        meta.exited = Some(ExitRecord { end, applied: meta.applied.clone(), at: now_rfc3339() });
    }

    /// After a VMM is gone (ended, killed, or exited with its guest as
    /// QEMU does under `-no-reboot`): releases the host resources it used
    /// unless a snapshot still needs them, then drops its record, and what
    /// it applied unless a snapshot still holds that. The TAP goes first:
    /// a crash in between leaves the VMM on record, and the next look
    /// comes back here (the release is idempotent).
    async fn vmm_gone(&self, obs: &Observation, meta: &mut Metadata) -> Result<(), InstanceError> {
        if obs.snapshot.is_none() {
            self.provisioner.release(meta).await?;
            meta.applied = None;
        }
        meta.vmm = None;
        self.write_metadata(meta).await
    }

    /// Ends a VMM in order, and by force when it will not go.
    async fn end_vmm(&self, backend: &dyn Hypervisor, vmm: &VmmHandle) -> Result<(), InstanceError> {
        match backend.shutdown_vmm(vmm).await {
            Ok(()) => Ok(()),
            Err(HypervisorError::VmmGone { .. }) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "orderly VMM shutdown failed; killing it");
                backend.kill(vmm).await.map_err(hv("kill"))
            }
        }
    }
}

/// Why a power off or a discarded snapshot was planned, when it is to
/// apply a changed declaration: `hypeman.log` says which fields.
fn why(step: &Step) -> String {
    match step {
        Step::PowerOff { changed, .. } if changed.iter().any(|c| c == super::step::RESTART_ASKED) => {
            format!(": {}; booting it afresh, as declared", super::step::RESTART_ASKED)
        }
        Step::PowerOff { changed, .. } if !changed.is_empty() => {
            format!(": the declaration changed ({}); restarting to apply it", changed.join(", "))
        }
        _ => String::new(),
    }
}
