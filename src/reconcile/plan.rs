//! The pure planner: given what the declaration wants and what was observed,
//! the next single hop, carrying everything the executor needs to take it.
//! No IO, no clock reads, no locks; the time comes in as an argument.
//! Everything else in `reconcile` exists to feed it and to carry out what it
//! returns. The vocabulary (`Step`, `Observed`, `Outcome`) is the
//! executor's, in `instances::step`.

use crate::declaration::spec::{DesiredState, HypervisorKind, InstanceSpec, RestartPolicy};
use crate::declaration::Desired;
use crate::exit::GuestEnd;
use crate::instances::overlay::{self, Resize};
use crate::network::host::TapHealth;
use crate::state::VmState;
use crate::store::AppliedDeclaration;
pub use crate::instances::step::{
    Hold, Memory, Observed, Outcome, PauseFor, Recall, Step, StepKind, PRESS_AGAIN_EVERY, STOP_POLL,
};
use tokio::time::Instant;

/// Whether `policy` boots a guest again after it ended this way.
pub fn restarts(policy: RestartPolicy, end: &GuestEnd) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !end.is_success(),
        RestartPolicy::Never => false,
    }
}

/// The restart fields `spec` changes since `applied`, with `overlay_size`
/// held against the overlay as it is (`overlay_bytes`, when known): only a
/// grow is applied by a restart. A smaller size is refused without taking
/// the guest down (see [`converged`]), and a size already there needs
/// nothing. The rule `status` shows as a pending change.
pub fn restart_changes(
    spec: &InstanceSpec,
    applied: &AppliedDeclaration,
    pinned: HypervisorKind,
    overlay_bytes: Option<u64>,
) -> Vec<String> {
    let mut changed = spec.changes_since(applied, pinned);
    if let Some(have) = overlay_bytes {
        let grows = match overlay::resize(have, spec.overlay_size.bytes()) {
            Resize::Grow { .. } => true,
            Resize::Keep | Resize::Shrink { .. } => false,
        };
        changed.retain(|field| field != "overlay_size" || grows);
    }
    changed
}

/// The next single step from `observed` toward `desired`.
pub fn plan(desired: &Desired, observed: &Observed, now: Instant) -> Step {
    use VmState::*;
    // A record that cannot be read may be this instance's, with its VMM
    // running: neither provision (a second VMM) nor remove (its data), and
    // whatever the declaration says, until someone repairs it.
    if let Some(why) = &observed.unreadable_record {
        return Step::Blocked(why.clone());
    }
    // The power button was pressed: whatever is wanted now, the guest is on
    // its way down. Give it its grace, then kill it. Finishing a stop the
    // owner began is not acting on the declaration, so an invalid one does
    // not hold it up. A VMM that stops answering meanwhile is exiting with
    // its guest (QEMU closes its QMP socket on the way out).
    let finishing_stop = match (observed.stopping, observed.state) {
        (Some(deadline), Running)
            if now < deadline && observed.vmm.is_some() && observed.press_again.is_some_and(|t| now >= t) =>
        {
            observed.vmm.clone().map(|vmm| Step::PressAgain { vmm })
        }
        (Some(deadline), Running | Created | Unknown) if now < deadline => {
            let next_press =
                observed.press_again.filter(|t| observed.state == Running && *t > now).unwrap_or(deadline);
            Some(Step::AwaitPowerOff(deadline.min(next_press).min(now + STOP_POLL)))
        }
        (Some(_), Running | Created | Unknown) => {
            observed.vmm.as_ref().or(observed.recorded_vmm.as_ref()).map(|vmm| Step::Kill { vmm: vmm.clone() })
        }
        (Some(_) | None, _) => None,
    };
    let spec = match desired {
        Desired::Invalid(_) if finishing_stop.is_none() => {
            return if observed.exists {
                Step::Blocked("the declaration is invalid; the instance is left as it is".into())
            } else {
                Step::Blocked("the declaration is invalid".into())
            };
        }
        Desired::Invalid(_) => None,
        Desired::Absent if !observed.exists => return Step::Converged,
        Desired::Absent => None,
        Desired::Present(spec) => Some(spec),
    };
    match observed.hold {
        Some(Hold::Until(t)) if now < t => return Step::WaitUntil(t),
        Some(Hold::ForChange) => return Step::AwaitChange,
        Some(Hold::Until(_)) | None => {}
    }
    if let Some(step) = finishing_stop {
        return step;
    }
    if let Some(step) = bookkeeping(observed) {
        return step;
    }
    let Some(spec) = spec else { return removal(observed) };
    let want = spec.state;
    if !observed.exists {
        return Step::Provision { spec: spec.clone() };
    }
    if observed.state == Stopped {
        if let Some(end) = observed.ended.clone() {
            return match observed.stopping {
                Some(_) => Step::ForgetVmm,
                None => Step::RecordExit { end },
            };
        }
    }
    let pinned = observed.hypervisor.unwrap_or(HypervisorKind::Qemu);
    // A VM made from an older declaration needs a restart to pick it up.
    let changed = match &observed.applied {
        Some(applied) if want != DesiredState::Stopped => restart_changes(spec, applied, pinned, observed.overlay_bytes),
        Some(_) | None => Vec::new(),
    };
    // `hypeman restart`: a fresh boot of the guest as declared, by the
    // same way down a changed declaration takes.
    let changed = match observed.restart && want == DesiredState::Running {
        true if changed.is_empty() => vec![crate::instances::step::RESTART_ASKED.to_string()],
        _ => changed,
    };
    let stale = !changed.is_empty();
    // A guest that ended by itself stays down if the policy says so, until
    // the declaration changes or says otherwise.
    let held = match (&observed.exited, observed.state) {
        (Some((end, Some(ran_with))), Stopped)
            if restart_changes(spec, ran_with, pinned, observed.overlay_bytes).is_empty() && !restarts(spec.restart, end) =>
        {
            Some(end.clone())
        }
        (Some(_), _) | (None, _) => None,
    };
    let network_lost = observed.tap.is_some_and(lost);
    let live = || observed.vmm.clone();
    // A restored guest that runs again is no longer in standby: its
    // snapshot goes before anything else is done with it (a power off
    // would otherwise leave the old snapshot looking like a standby).
    // Memory grows back only for a guest that is to go on running as it is.
    if observed.state == Running && observed.has_snapshot() {
        let keeps_running = want == DesiredState::Running && !stale;
        if let Some(vmm) = live() {
            return Step::DropStaleSnapshot { vmm, regrow: if keeps_running { Memory::of(spec) } else { None } };
        }
    }
    let step = match (want, observed.state) {
        // A VMM that does not answer cannot be asked to power off: a guest
        // declared stopped has it killed once the grace a power button
        // would have had is over.
        (DesiredState::Stopped, Unknown) => {
            return match (&observed.recorded_vmm, observed.unanswered_until) {
                (Some(vmm), Some(until)) if now >= until => Step::ForceKill { vmm: vmm.clone() },
                (Some(_), Some(until)) => Step::WaitUntil(until),
                (Some(_), None) => Step::Blocked("the VMM does not answer; waiting for it before killing it".into()),
                (None, _) => Step::Blocked(
                    "the VMM does not answer and is not on record; end the process holding its socket by hand".into(),
                ),
            }
        }
        (_, Unknown) => {
            return Step::Blocked(
                "the VMM does not answer; declaring the instance stopped (or deleting it) has it killed".into(),
            )
        }
        (DesiredState::Running, Stopped) => match held.filter(|_| !observed.restart) {
            Some(end) => return Step::Blocked(format!("{end}; restart = \"{}\" leaves it stopped", spec.restart)),
            None => return Step::Create { spec: spec.clone() },
        },
        (DesiredState::Running | DesiredState::Standby, Created) if stale => {
            live().map(|vmm| Step::PowerOff { vmm, booted: false, changed })
        }
        (DesiredState::Running | DesiredState::Standby, Created) => live().map(|vmm| Step::Boot { vmm }),
        (DesiredState::Running, Running) if stale => live().map(|vmm| Step::PowerOff { vmm, booted: true, changed }),
        // A lost network is repaired by a standby/restore cycle: the
        // restored VMM opens the TAP anew, and the guest keeps its state.
        (DesiredState::Running, Running) if network_lost => {
            live().map(|vmm| Step::Pause { vmm, shrink: None, why: PauseFor::ReconnectNetwork })
        }
        (DesiredState::Running, Running) if observed.tap == Some(TapHealth::Misplaced) => Some(Step::RepairTap),
        (DesiredState::Running, Running) => return converged(spec, observed),
        (DesiredState::Running, Paused) if network_lost => live().map(|vmm| Step::Snapshot { vmm }),
        // A paused VM with a snapshot beside it was just restored; one of
        // an older declaration is only resumed to be shut down.
        (DesiredState::Running, Paused) => live().map(|vmm| Step::Resume {
            vmm,
            regrow: if observed.has_snapshot() && !stale { Memory::of(spec) } else { None },
        }),
        (DesiredState::Running | DesiredState::Standby | DesiredState::Stopped, Shutdown) => {
            live().map(|vmm| Step::StopVmm { vmm, end: ended_by_itself(observed) })
        }
        // Leaving standby, for whatever is wanted next, goes through the
        // guest: it is restored as it was taken, and a guest to be stopped
        // or restarted for a changed declaration is then shut down through
        // its power button, so that it flushes what it had not written.
        // Only a snapshot that cannot be restored is discarded (the
        // restore says why).
        (DesiredState::Running | DesiredState::Stopped, Standby) => match &observed.snapshot {
            Some(snapshot) => return Step::Restore { spec: spec.clone(), snapshot: snapshot.clone() },
            None => return Step::Blocked("standby without a snapshot".into()),
        },

        // A fresh boot saved in its place would pass for the user's
        // standby: say what happened and wait for them.
        (DesiredState::Standby, Stopped) if observed.lost.is_some() => {
            return Step::Blocked(format!(
                "{}; it is not booted afresh in its place: declare it running to boot it anew, or stopped",
                observed.lost.as_deref().unwrap_or_default()
            ))
        }
        // Its VMM died under it (during the snapshot, say, with the daemon
        // killed before it could record the loss): the same holds.
        (DesiredState::Standby, Stopped) if matches!(observed.exited, Some((GuestEnd::Unknown, _))) => {
            return Step::Blocked(format!(
                "{}, and its running state went with it; it is not booted afresh in its place: declare it stopped, then standby again, to boot it anew",
                GuestEnd::Unknown
            ))
        }
        (DesiredState::Standby, Stopped) => return Step::Create { spec: spec.clone() },
        // Snapshotting a VM of an outdated declaration would only be thrown
        // away at restore: restart it first.
        (DesiredState::Standby, Running) if stale => live().map(|vmm| Step::PowerOff { vmm, booted: true, changed }),
        (DesiredState::Standby, Running) => {
            live().map(|vmm| Step::Pause { vmm, shrink: Memory::of(spec), why: PauseFor::Standby })
        }
        (DesiredState::Standby, Paused) if stale => live().map(|vmm| Step::Resume { vmm, regrow: None }),
        (DesiredState::Standby, Paused) => live().map(|vmm| Step::Snapshot { vmm }),
        // A stale snapshot stays until the instance is wanted running; the
        // pending change shows in status meanwhile.
        (DesiredState::Standby, Standby) => return converged(spec, observed),

        (DesiredState::Stopped, Stopped) if observed.exited.is_some() || observed.lost.is_some() => {
            return Step::ForgetExit
        }
        (DesiredState::Stopped, Stopped) => return Step::Converged,
        // A paused guest resumes first so it can shut down cleanly and
        // flush its overlay.
        (DesiredState::Stopped, Paused) => live().map(|vmm| Step::Resume { vmm, regrow: None }),
        (DesiredState::Stopped, Created | Running) => {
            live().map(|vmm| Step::PowerOff { vmm, booted: observed.state == Running, changed: Vec::new() })
        }
    };
    step.unwrap_or_else(no_vmm)
}

/// A guest that is as declared, except perhaps for a smaller overlay,
/// which is refused: it keeps running (or in standby) with the overlay it
/// has, and says why until the old size (or a larger one) is declared.
fn converged(spec: &InstanceSpec, observed: &Observed) -> Step {
    let declared = spec.overlay_size.bytes();
    match observed.overlay_bytes.map(|have| overlay::resize(have, declared)) {
        Some(Resize::Shrink { have, declared }) => Step::Blocked(overlay::shrink_refused(have, declared)),
        Some(Resize::Keep | Resize::Grow { .. }) | None => Step::Converged,
    }
}

/// The way down for an instance whose declaration is gone.
fn removal(observed: &Observed) -> Step {
    use VmState::*;
    let live = || observed.vmm.clone();
    let step = match observed.state {
        Unknown => {
            return match &observed.recorded_vmm {
                Some(vmm) => Step::ForceKill { vmm: vmm.clone() },
                None => Step::Blocked(
                    "the VMM does not answer and is not on record; end the process holding its socket by hand".into(),
                ),
            }
        }
        // A paused guest resumes first so it can shut down cleanly and
        // flush its overlay.
        Paused => live().map(|vmm| Step::Resume { vmm, regrow: None }),
        Running | Created => {
            live().map(|vmm| Step::PowerOff { vmm, booted: observed.state == Running, changed: Vec::new() })
        }
        Shutdown => live().map(|vmm| Step::StopVmm { vmm, end: ended_by_itself(observed) }),
        // The guest's data goes with its declaration: no need to restore
        // it to shut it down.
        Standby => return Step::DiscardSnapshot,
        Stopped => return Step::Remove,
    };
    step.unwrap_or_else(no_vmm)
}

/// Record-keeping that comes before any hop: a live VMM the record does not
/// name, a dead socket left behind.
fn bookkeeping(observed: &Observed) -> Option<Step> {
    if let Some(vmm) = &observed.vmm {
        if observed.recorded_vmm.as_ref() != Some(vmm) {
            return Some(Step::Adopt { vmm: vmm.clone() });
        }
    }
    // Only once no VMM is on record: a VMM that just exited is dealt with
    // first (how it ended, or that the owner stopped it).
    match (&observed.stale_socket, observed.state, &observed.recorded_vmm) {
        (Some(socket), VmState::Stopped | VmState::Standby, None) => Some(Step::ClearStaleSocket { socket: socket.clone() }),
        (Some(_) | None, _, _) => None,
    }
}

/// How the guest ended, when it powered off by itself rather than because
/// the owner pressed its power button.
fn ended_by_itself(observed: &Observed) -> Option<GuestEnd> {
    match observed.stopping {
        Some(_) => None,
        None => observed.ended.clone(),
    }
}

/// Whether a TAP in this health leaves the guest without its network.
fn lost(health: TapHealth) -> bool {
    match health {
        TapHealth::Fine | TapHealth::Misplaced => false,
        TapHealth::Missing | TapHealth::Orphaned => true,
    }
}

/// An observation in a VMM state without a VMM handle: only an
/// inconsistent observation builds one (observation fills `vmm` for every
/// state a VMM answers in).
fn no_vmm() -> Step {
    Step::Blocked("the VMM answered without a handle; looking again".into())
}

#[cfg(test)]
mod tests;
