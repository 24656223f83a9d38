//! The pure planner: given what the declaration wants and what was observed,
//! the next single hop. No IO, no clock reads, no locks; the time comes in as
//! an argument. Everything else in `reconcile` exists to feed it and to carry
//! out what it returns.

use crate::declaration::spec::{DesiredState, RestartPolicy};
use crate::exit::GuestEnd;
use crate::state::VmState;
use std::fmt;
use tokio::time::Instant;

/// What the declaration asks for, read fresh at every reconcile.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    /// No declaration file: the instance and its data are to go.
    Absent,
    /// The file exists but does not parse or validate: hands off.
    Invalid,
    Present {
        state: DesiredState,
        /// `InstanceSpec::restart_fields` of the declaration.
        restart_fields: serde_json::Value,
        restart: RestartPolicy,
    },
}

/// What is true right now, as observed through the store and the VMM.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The store holds a guest of this name.
    pub exists: bool,
    pub state: VmState,
    /// A complete snapshot is on disk.
    pub has_snapshot: bool,
    /// The restart fields the current VM or snapshot was made from.
    pub applied: Option<serde_json::Value>,
    /// No step before this instant (error backoff, crash-loop backoff).
    pub not_before: Option<Instant>,
    /// The guest ended without the daemon asking, and no step has dealt
    /// with it yet: its VMM is gone but still on record (`Stopped`), or it
    /// powered off inside a live VMM (`Shutdown`).
    pub ended: Option<GuestEnd>,
    /// The live VM's TAP was deleted behind the daemon's back: its VMM
    /// holds a dead device, and only a VMM that opens the TAP again (a
    /// restore, or a new boot) gives the guest its network back.
    pub network_lost: bool,
    /// The recorded ending (see `Metadata::exited`) and the restart fields
    /// the ended VM ran with.
    pub exited: Option<(GuestEnd, Option<serde_json::Value>)>,
}

/// Whether `policy` boots a guest again after it ended this way.
pub fn restarts(policy: RestartPolicy, end: GuestEnd) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !end.is_success(),
        RestartPolicy::Never => false,
    }
}

/// The next thing to do for one instance. Every variant that acts is a
/// single hop of the state machine, or bookkeeping outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do: observed matches desired.
    Converged,
    /// Nothing can be done until something outside changes.
    Blocked(String),
    /// Backing off; look again at this instant.
    WaitUntil(Instant),
    /// Create the guest's record and directory (it stays `Stopped`).
    Provision,
    /// `Stopped → Created`: prepare disks, start the VMM, create the VM.
    Create,
    /// `Created → Running`.
    Boot,
    /// `Running → Paused`.
    Pause,
    /// `Paused → Running`.
    Resume,
    /// `Paused → Standby`: snapshot, then end the VMM.
    Snapshot,
    /// `Standby → Paused`: a new VMM restores the snapshot.
    Restore,
    /// `Running|Created → Shutdown`: power button, then a kill after the
    /// grace period.
    PowerOff,
    /// `Shutdown → Stopped`: end the VMM.
    StopVmm,
    /// `Standby → Stopped`: remove the snapshot.
    DiscardSnapshot,
    /// A running VM restored from a snapshot: the snapshot is stale now.
    DropStaleSnapshot,
    /// `Unknown`: kill the unanswering VMM (only on delete).
    ForceKill,
    /// A VMM that went away by itself: drop its record, keep how the guest
    /// ended for the restart policy and status.
    RecordExit,
    /// Declared stopped: the last ending no longer holds back a boot.
    ForgetExit,
    /// `Stopped`, declaration gone: remove the guest and all its data.
    Remove,
}

impl Step {
    /// The hop this step takes, checked against the table before acting.
    pub fn hop(&self, from: VmState) -> Option<VmState> {
        use VmState::*;
        match self {
            Step::Create => Some(Created),
            Step::Boot | Step::Resume => Some(Running),
            Step::Pause | Step::Restore => Some(Paused),
            Step::Snapshot => Some(Standby),
            Step::PowerOff => Some(Shutdown),
            Step::StopVmm | Step::DiscardSnapshot => Some(Stopped),
            Step::Converged
            | Step::Blocked(_)
            | Step::WaitUntil(_)
            | Step::Provision
            | Step::DropStaleSnapshot
            | Step::ForceKill
            | Step::RecordExit
            | Step::ForgetExit
            | Step::Remove => {
                let _ = from;
                None
            }
        }
    }

    /// Whether the step changes anything (and so is worth a log line).
    pub fn acts(&self) -> bool {
        !matches!(self, Step::Converged | Step::Blocked(_) | Step::WaitUntil(_))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Converged => f.write_str("nothing to do"),
            Step::Blocked(why) => write!(f, "blocked: {why}"),
            Step::WaitUntil(_) => f.write_str("backing off after an error"),
            Step::Provision => f.write_str("provision"),
            Step::Create => f.write_str("create VM"),
            Step::Boot => f.write_str("boot"),
            Step::Pause => f.write_str("pause"),
            Step::Resume => f.write_str("resume"),
            Step::Snapshot => f.write_str("snapshot to standby"),
            Step::Restore => f.write_str("restore from standby"),
            Step::PowerOff => f.write_str("power off"),
            Step::StopVmm => f.write_str("stop VMM"),
            Step::DiscardSnapshot => f.write_str("discard snapshot"),
            Step::DropStaleSnapshot => f.write_str("drop stale snapshot"),
            Step::ForceKill => f.write_str("kill unresponsive VMM"),
            Step::RecordExit => f.write_str("record how the guest ended"),
            Step::ForgetExit => f.write_str("forget the last exit"),
            Step::Remove => f.write_str("remove instance data"),
        }
    }
}

/// The next single step from `observed` toward `desired`.
pub fn plan(desired: &Desired, observed: &Observed, now: Instant) -> Step {
    use VmState::*;
    if let Some(t) = observed.not_before {
        if now < t && !matches!(desired, Desired::Invalid) {
            return Step::WaitUntil(t);
        }
    }
    let (want, fields, policy) = match desired {
        Desired::Invalid => {
            return if observed.exists {
                Step::Blocked("the declaration is invalid; the instance is left as it is".into())
            } else {
                Step::Blocked("the declaration is invalid".into())
            };
        }
        Desired::Absent => {
            if !observed.exists {
                return Step::Converged;
            }
            return match observed.state {
                Unknown => Step::ForceKill,
                // A paused guest resumes first so it can shut down cleanly
                // and flush its overlay.
                Paused => Step::Resume,
                Running | Created => Step::PowerOff,
                Shutdown => Step::StopVmm,
                Standby => Step::DiscardSnapshot,
                Stopped => Step::Remove,
            };
        }
        Desired::Present { state, restart_fields, restart } => (*state, restart_fields, *restart),
    };
    if !observed.exists {
        return Step::Provision;
    }
    if observed.state == Stopped && observed.ended.is_some() {
        return Step::RecordExit;
    }
    // A VM made from an older declaration needs a restart to pick it up.
    let stale = observed.applied.as_ref().is_some_and(|a| a != fields);
    // A guest that ended by itself stays down if the policy says so, until
    // the declaration changes or says otherwise.
    let held = match (&observed.exited, observed.state) {
        (Some((end, ran_with)), Stopped) if ran_with.as_ref() == Some(fields) && !restarts(policy, *end) => {
            Some(*end)
        }
        (Some(_), _) | (None, _) => None,
    };
    match (want, observed.state) {
        (_, Unknown) => Step::Blocked(
            "the VMM does not answer; only deleting the declaration can clear it".into(),
        ),
        (DesiredState::Running, Stopped) => match held {
            Some(end) => Step::Blocked(format!("{end}; restart = \"{policy}\" leaves it stopped")),
            None => Step::Create,
        },
        (DesiredState::Running, Created) if stale => Step::PowerOff,
        (DesiredState::Running, Created) => Step::Boot,
        (DesiredState::Running, Running) if stale => Step::PowerOff,
        // A lost network is repaired by a standby/restore cycle: the
        // restored VMM opens the TAP anew, and the guest keeps its state.
        (DesiredState::Running, Running) if observed.network_lost => Step::Pause,
        (DesiredState::Running, Running) if observed.has_snapshot => Step::DropStaleSnapshot,
        (DesiredState::Running, Running) => Step::Converged,
        (DesiredState::Running, Paused) if observed.network_lost => Step::Snapshot,
        (DesiredState::Running, Paused) => Step::Resume,
        (DesiredState::Running, Shutdown) => Step::StopVmm,
        (DesiredState::Running, Standby) if stale => Step::DiscardSnapshot,
        (DesiredState::Running, Standby) => Step::Restore,

        (DesiredState::Standby, Stopped) => Step::Create,
        (DesiredState::Standby, Created) if stale => Step::PowerOff,
        (DesiredState::Standby, Created) => Step::Boot,
        // Snapshotting a VM of an outdated declaration would only be thrown
        // away at restore: restart it first.
        (DesiredState::Standby, Running) if stale => Step::PowerOff,
        (DesiredState::Standby, Running) => Step::Pause,
        (DesiredState::Standby, Paused) if stale => Step::Resume,
        (DesiredState::Standby, Paused) => Step::Snapshot,
        (DesiredState::Standby, Shutdown) => Step::StopVmm,
        // A stale snapshot stays until the instance is wanted running; the
        // pending change shows in status meanwhile.
        (DesiredState::Standby, Standby) => Step::Converged,

        (DesiredState::Stopped, Stopped) if observed.exited.is_some() => Step::ForgetExit,
        (DesiredState::Stopped, Stopped) => Step::Converged,
        (DesiredState::Stopped, Paused) => Step::Resume,
        (DesiredState::Stopped, Created | Running) => Step::PowerOff,
        (DesiredState::Stopped, Shutdown) => Step::StopVmm,
        (DesiredState::Stopped, Standby) => Step::DiscardSnapshot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ALL_STATES;
    use serde_json::json;
    use std::time::Duration;
    use VmState::*;

    fn present(state: DesiredState) -> Desired {
        Desired::Present { state, restart_fields: json!({"memory": 1}), restart: RestartPolicy::Always }
    }

    fn observed(state: VmState) -> Observed {
        Observed {
            exists: true,
            state,
            has_snapshot: state == Standby,
            applied: Some(json!({"memory": 1})),
            not_before: None,
            ended: None,
            network_lost: false,
            exited: None,
        }
    }

    /// Follows the plan through a simulated world where every step succeeds,
    /// returning the path of steps to convergence.
    fn walk(desired: &Desired, mut obs: Observed) -> Vec<Step> {
        let now = Instant::now();
        let mut steps = Vec::new();
        for _ in 0..20 {
            let step = plan(desired, &obs, now);
            if !step.acts() {
                return steps;
            }
            if let Some(to) = step.hop(obs.state) {
                assert!(obs.state.can_transition_to(to), "{step:?} from {} is not a hop", obs.state);
                obs.state = to;
            }
            match &step {
                Step::Provision => obs.exists = true,
                Step::Create => {
                    if let Desired::Present { restart_fields, .. } = desired {
                        obs.applied = Some(restart_fields.clone());
                    }
                    obs.exited = None;
                }
                Step::RecordExit => {
                    obs.exited = obs.ended.take().map(|end| (end, obs.applied.clone()));
                    if !obs.has_snapshot {
                        obs.applied = None;
                    }
                }
                Step::ForgetExit => obs.exited = None,
                Step::Snapshot => obs.has_snapshot = true,
                Step::DiscardSnapshot | Step::DropStaleSnapshot => obs.has_snapshot = false,
                Step::StopVmm => {
                    if let Some(end) = obs.ended.take() {
                        obs.exited = Some((end, obs.applied.clone()));
                    }
                    if !obs.has_snapshot {
                        obs.applied = None
                    }
                }
                // A guest that powers off takes its VMM along on some backends;
                // the state machine path is the same either way.
                Step::ForceKill => obs.state = if obs.has_snapshot { Standby } else { Stopped },
                Step::Remove => obs.exists = false,
                _ => {}
            }
            steps.push(step);
        }
        panic!("no convergence: {steps:?}");
    }

    #[test]
    fn every_desired_state_converges_from_every_observable_state() {
        use Step::*;
        let cases: &[(DesiredState, VmState, &[Step])] = &[
            (DesiredState::Running, Stopped, &[Create, Boot]),
            (DesiredState::Running, Created, &[Boot]),
            (DesiredState::Running, Running, &[]),
            (DesiredState::Running, Paused, &[Resume]),
            (DesiredState::Running, Shutdown, &[StopVmm, Create, Boot]),
            (DesiredState::Running, Standby, &[Restore, Resume, DropStaleSnapshot]),
            (DesiredState::Standby, Stopped, &[Create, Boot, Pause, Snapshot]),
            (DesiredState::Standby, Running, &[Pause, Snapshot]),
            (DesiredState::Standby, Paused, &[Snapshot]),
            (DesiredState::Standby, Standby, &[]),
            (DesiredState::Stopped, Running, &[PowerOff, StopVmm]),
            (DesiredState::Stopped, Paused, &[Resume, PowerOff, StopVmm]),
            (DesiredState::Stopped, Created, &[PowerOff, StopVmm]),
            (DesiredState::Stopped, Standby, &[DiscardSnapshot]),
            (DesiredState::Stopped, Stopped, &[]),
        ];
        for (want, from, expected) in cases {
            let mut obs = observed(*from);
            if *from == Standby && *want == DesiredState::Running {
                obs.has_snapshot = true;
            }
            let got = walk(&present(*want), obs);
            assert_eq!(&got, expected, "{want} from {from}");
        }
    }

    #[test]
    fn removal_deletes_from_every_state_but_unknown_is_killed_first() {
        for from in ALL_STATES {
            let steps = walk(&Desired::Absent, observed(from));
            assert_eq!(steps.last(), Some(&Step::Remove), "from {from}: {steps:?}");
            if from == Unknown {
                assert_eq!(steps[0], Step::ForceKill);
            }
        }
        let gone = Observed { exists: false, ..observed(Stopped) };
        assert_eq!(plan(&Desired::Absent, &gone, Instant::now()), Step::Converged);
    }

    #[test]
    fn invalid_declaration_touches_nothing_in_any_state() {
        for from in ALL_STATES {
            let step = plan(&Desired::Invalid, &observed(from), Instant::now());
            assert!(matches!(step, Step::Blocked(_)), "{from}: {step:?}");
        }
    }

    #[test]
    fn unknown_is_blocked_unless_deleted() {
        for want in [DesiredState::Running, DesiredState::Standby, DesiredState::Stopped] {
            assert!(matches!(plan(&present(want), &observed(Unknown), Instant::now()), Step::Blocked(_)));
        }
    }

    #[test]
    fn a_changed_declaration_restarts_the_vm() {
        use Step::*;
        let desired = Desired::Present { state: DesiredState::Running, restart_fields: json!({"memory": 2}), restart: RestartPolicy::Always };
        assert_eq!(walk(&desired, observed(Running)), vec![PowerOff, StopVmm, Create, Boot]);
        // From standby the old snapshot is useless: cold boot the new spec.
        let mut obs = observed(Standby);
        obs.has_snapshot = true;
        assert_eq!(walk(&desired, obs), vec![DiscardSnapshot, Create, Boot]);
        // Declared stopped: no restart needed, nothing to do.
        let stopped = Desired::Present { state: DesiredState::Stopped, restart_fields: json!({"memory": 2}), restart: RestartPolicy::Always };
        assert_eq!(walk(&stopped, Observed { applied: None, ..observed(Stopped) }), vec![]);
    }

    #[test]
    fn missing_guest_is_provisioned_first() {
        let obs = Observed { exists: false, applied: None, ..observed(Stopped) };
        let steps = walk(&present(DesiredState::Running), obs);
        assert_eq!(steps, vec![Step::Provision, Step::Create, Step::Boot]);
    }

    #[test]
    fn backoff_waits_then_acts() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let obs = Observed { not_before: Some(later), ..observed(Stopped) };
        assert_eq!(plan(&present(DesiredState::Running), &obs, now), Step::WaitUntil(later));
        assert_eq!(plan(&present(DesiredState::Running), &obs, later), Step::Create);
    }

    #[test]
    fn every_acting_step_is_a_valid_hop_or_bookkeeping() {
        let desired = [
            Desired::Absent,
            Desired::Invalid,
            present(DesiredState::Running),
            present(DesiredState::Standby),
            present(DesiredState::Stopped),
            Desired::Present { state: DesiredState::Running, restart_fields: json!({"memory": 9}), restart: RestartPolicy::Always },
        ];
        for d in &desired {
            for from in ALL_STATES {
                for has_snapshot in [false, true] {
                    let obs = Observed { has_snapshot, ..observed(from) };
                    let step = plan(d, &obs, Instant::now());
                    if let Some(to) = step.hop(from) {
                        assert!(from.can_transition_to(to), "{d:?} {from}: {step:?}");
                    }
                }
            }
        }
    }

    fn running_with(restart: RestartPolicy) -> Desired {
        Desired::Present { state: DesiredState::Running, restart_fields: json!({"memory": 1}), restart }
    }

    #[test]
    fn the_restart_policy_decides_after_the_guest_ends_by_itself() {
        use GuestEnd::*;
        use RestartPolicy::*;
        let ends = [Exited { status: 0 }, Exited { status: 1 }, Killed { signal: 9 }, StopRequested, Unknown];
        for policy in [Always, OnFailure, Never] {
            for end in ends {
                let expected = match (policy, end) {
                    (Always, _) => true,
                    (OnFailure, Exited { status: 0 }) => false,
                    (OnFailure, _) => true,
                    (Never, _) => false,
                };
                assert_eq!(restarts(policy, end), expected, "{policy} after {end}");
                // QEMU exits with its guest: Stopped, with the VMM on record.
                let obs = Observed { ended: Some(end), ..observed(Stopped) };
                let steps = walk(&running_with(policy), obs.clone());
                let want = if expected { vec![Step::RecordExit, Step::Create, Step::Boot] } else { vec![Step::RecordExit] };
                assert_eq!(steps, want, "{policy} after {end}");
                // Cloud Hypervisor keeps its VMM: Shutdown first.
                let obs = Observed { ended: Some(end), ..observed(Shutdown) };
                let steps = walk(&running_with(policy), obs);
                let want = if expected { vec![Step::StopVmm, Step::Create, Step::Boot] } else { vec![Step::StopVmm] };
                assert_eq!(steps, want, "{policy} after {end} (Shutdown)");
            }
        }
    }

    #[test]
    fn a_held_exit_is_visible_and_lifted_by_a_change_or_a_stop() {
        let end = GuestEnd::Exited { status: 0 };
        let held = Observed { applied: None, exited: Some((end, Some(json!({"memory": 1})))), ..observed(Stopped) };
        match plan(&running_with(RestartPolicy::OnFailure), &held, Instant::now()) {
            Step::Blocked(why) => assert_eq!(why, "the app exited with status 0; restart = \"on-failure\" leaves it stopped"),
            other => panic!("expected Blocked, got {other:?}"),
        }
        // The policy changed to one that restarts: boot.
        assert_eq!(plan(&running_with(RestartPolicy::Always), &held, Instant::now()), Step::Create);
        // The declaration changed: boot the new one.
        let changed = Desired::Present {
            state: DesiredState::Running,
            restart_fields: json!({"memory": 2}),
            restart: RestartPolicy::Never,
        };
        assert_eq!(walk(&changed, held.clone()), vec![Step::Create, Step::Boot]);
        // Declared stopped, the ending is forgotten; running again boots.
        assert_eq!(walk(&present(DesiredState::Stopped), held.clone()), vec![Step::ForgetExit]);
        let forgotten = Observed { exited: None, ..held };
        assert_eq!(walk(&running_with(RestartPolicy::Never), forgotten), vec![Step::Create, Step::Boot]);
    }

    #[test]
    fn a_lost_network_is_repaired_by_a_standby_restore_cycle_only_when_wanted_running() {
        let lost = |state| Observed { network_lost: true, ..observed(state) };
        let running = present(DesiredState::Running);
        assert_eq!(plan(&running, &lost(Running), Instant::now()), Step::Pause);
        assert_eq!(plan(&running, &lost(Paused), Instant::now()), Step::Snapshot);
        // The restored VMM opened the TAP again: the usual path back.
        assert_eq!(walk(&running, observed(Standby)), vec![Step::Restore, Step::Resume, Step::DropStaleSnapshot]);
        // A change of declaration is a restart, which reconnects as well.
        let stale = Observed { applied: Some(json!({"memory": 2})), ..lost(Running) };
        assert_eq!(plan(&running, &stale, Instant::now()), Step::PowerOff);
        // Going to standby or stopped anyway: no detour.
        assert_eq!(plan(&present(DesiredState::Standby), &lost(Running), Instant::now()), Step::Pause);
        assert_eq!(plan(&present(DesiredState::Standby), &lost(Paused), Instant::now()), Step::Snapshot);
        assert_eq!(plan(&present(DesiredState::Stopped), &lost(Running), Instant::now()), Step::PowerOff);
        assert_eq!(plan(&Desired::Absent, &lost(Running), Instant::now()), Step::PowerOff);
        // Backing off still waits.
        let later = Instant::now() + Duration::from_secs(5);
        let waiting = Observed { not_before: Some(later), ..lost(Running) };
        assert_eq!(plan(&running, &waiting, Instant::now()), Step::WaitUntil(later));
    }
}
