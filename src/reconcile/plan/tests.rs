use super::*;
use crate::declaration::spec::InstanceSpec;
use crate::hypervisor::VmmHandle;
use crate::store::SnapshotInfo;
use std::sync::Arc;
use crate::declaration::spec::{DesiredState, RestartPolicy};
use crate::state::ALL_STATES;
use std::time::Duration;
use StepKind::*;
use VmState::*;

fn spec_with(state: DesiredState, memory: u64, restart: RestartPolicy) -> Arc<InstanceSpec> {
    let text = format!("image = \"busybox\"\nstate = \"{state}\"\nmemory = \"{memory}MiB\"\nrestart = \"{restart}\"\n");
    let spec = crate::declaration::parse_instance(std::path::Path::new("instances/web.toml"), &text, &Default::default())
        .expect("valid");
    Arc::new(spec)
}

fn present(state: DesiredState) -> Desired {
    Desired::Present(spec_with(state, 256, RestartPolicy::Always))
}

fn applied() -> crate::store::AppliedDeclaration {
    spec_with(DesiredState::Running, 256, RestartPolicy::Always).applied_for(HypervisorKind::Qemu)
}

fn vmm() -> VmmHandle {
    VmmHandle { pid: 42, pid_start_time: 7, socket: "/g/qmp.sock".into(), version: Some("9".into()) }
}

fn snapshot() -> SnapshotInfo {
    SnapshotInfo::new(HypervisorKind::Qemu, "9", "h", 0)
}

fn observed(state: VmState) -> Observed {
    let live = state.requires_vmm();
    Observed {
        exists: true,
        state,
        hypervisor: Some(HypervisorKind::Qemu),
        vmm: live.then(vmm),
        recorded_vmm: (live || state == Unknown).then(vmm),
        snapshot: (state == Standby).then(snapshot),
        applied: Some(applied()),
        ..Observed::nothing()
    }
}

/// Follows the plan through a simulated world where every step succeeds
/// (and a pressed power button powers the guest off at once), returning
/// the path of steps to convergence.
fn walk(desired: &Desired, mut obs: Observed) -> Vec<StepKind> {
    let now = Instant::now();
    let mut steps = Vec::new();
    for _ in 0..20 {
        let step = plan(desired, &obs, now);
        if !step.acts() {
            return steps;
        }
        let from = obs.state;
        if let Some(to) = step.hop() {
            assert!(from.can_transition_to(to), "{step:?} from {from} is not a hop");
        }
        let outcome = match &step {
            Step::Restore { .. } => Outcome::Done,
            Step::Kill { .. } => Outcome::Killed,
            _ => Outcome::Done,
        };
        if let Some(to) = step.hop() {
            obs.state = to;
        }
        match &step {
            Step::Provision { .. } => {
                obs.exists = true;
                obs.hypervisor = Some(HypervisorKind::Qemu);
            }
            Step::Create { spec } => {
                obs.applied = Some(spec.applied_for(HypervisorKind::Qemu));
                // Made, or grown to a larger declared size; never cut back.
                obs.overlay_bytes = Some(obs.overlay_bytes.unwrap_or(0).max(spec.overlay_size.bytes()));
                obs.exited = None;
                obs.lost = None;
                obs.vmm = Some(vmm());
                obs.recorded_vmm = Some(vmm());
                // As the owner does: booted afresh, a restart asked is done.
                obs.restart = false;
            }
            Step::Restore { .. } => {
                obs.vmm = Some(vmm());
                obs.recorded_vmm = Some(vmm());
            }
            Step::RecordExit { .. } => {
                obs.exited = obs.ended.take().map(|end| (end, obs.applied.clone()));
                obs.recorded_vmm = None;
                if !obs.has_snapshot() {
                    obs.applied = None;
                }
            }
            Step::ForgetExit => {
                obs.exited = None;
                obs.lost = None;
            }
            Step::Snapshot { .. } => {
                obs.snapshot = Some(snapshot());
                obs.vmm = None;
                obs.recorded_vmm = None;
            }
            Step::DiscardSnapshot | Step::DropStaleSnapshot { .. } => obs.snapshot = None,
            Step::StopVmm { .. } => {
                if let Some(end) = obs.ended.take() {
                    obs.exited = Some((end, obs.applied.clone()));
                }
                obs.vmm = None;
                obs.recorded_vmm = None;
                if !obs.has_snapshot() {
                    obs.applied = None
                }
            }
            Step::ForceKill { .. } => {
                obs.state = if obs.has_snapshot() { Standby } else { Stopped };
                obs.vmm = None;
                obs.recorded_vmm = None;
            }
            Step::Remove => obs.exists = false,
            _ => {}
        }
        assert!(outcome.check(step.kind(), from).is_ok(), "{step:?} from {from}: {outcome:?}");
        steps.push(step.kind());
    }
    panic!("no convergence: {steps:?}");
}

#[test]
fn every_desired_state_converges_from_every_observable_state() {
    let cases: &[(DesiredState, VmState, &[StepKind])] = &[
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
        // Through the guest, so that it flushes what it had not written.
        (DesiredState::Stopped, Standby, &[Restore, Resume, DropStaleSnapshot, PowerOff, StopVmm]),
        (DesiredState::Stopped, Stopped, &[]),
    ];
    for (want, from, expected) in cases {
        let mut obs = observed(*from);
        if *from == Standby && *want == DesiredState::Running {
            obs.snapshot = Some(snapshot());
        }
        let got = walk(&present(*want), obs);
        assert_eq!(&got, expected, "{want} from {from}");
    }
}

#[test]
fn removal_deletes_from_every_state_but_unknown_is_killed_first() {
    for from in ALL_STATES {
        let steps = walk(&Desired::Absent, observed(from));
        assert_eq!(steps.last(), Some(&Remove), "from {from}: {steps:?}");
        if from == Unknown {
            assert_eq!(steps[0], ForceKill);
        }
    }
    let gone = Observed { exists: false, ..observed(Stopped) };
    assert_eq!(plan(&Desired::Absent, &gone, Instant::now()), Step::Converged);
}

#[test]
fn invalid_declaration_touches_nothing_in_any_state() {
    for from in ALL_STATES {
        let step = plan(&Desired::Invalid("bad".into()), &observed(from), Instant::now());
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
    let desired = Desired::Present(spec_with(DesiredState::Running, 512, RestartPolicy::Always));
    assert_eq!(walk(&desired, observed(Running)), vec![PowerOff, StopVmm, Create, Boot]);
    // From standby the guest is restored as it was and shut down cleanly
    // (it may not have written everything yet), then boots the new spec.
    let mut obs = observed(Standby);
    obs.snapshot = Some(snapshot());
    assert_eq!(
        walk(&desired, obs.clone()),
        vec![Restore, Resume, DropStaleSnapshot, PowerOff, StopVmm, Create, Boot]
    );
    // The resumed guest does not grow its memory back only to shut down.
    let paused = Observed { state: Paused, vmm: Some(vmm()), recorded_vmm: Some(vmm()), ..obs.clone() };
    assert!(matches!(plan(&desired, &paused, Instant::now()), Step::Resume { regrow: None, .. }));
    let running = Observed { state: Running, ..paused };
    assert!(matches!(plan(&desired, &running, Instant::now()), Step::DropStaleSnapshot { regrow: None, .. }));
    // Declared stopped: no restart needed, nothing to do.
    let stopped = Desired::Present(spec_with(DesiredState::Stopped, 512, RestartPolicy::Always));
    assert_eq!(walk(&stopped, Observed { applied: None, ..observed(Stopped) }), vec![]);
}

#[test]
fn missing_guest_is_provisioned_first() {
    let steps = walk(&present(DesiredState::Running), Observed::nothing());
    assert_eq!(steps, vec![Provision, Create, Boot]);
}

#[test]
fn backoff_waits_then_acts() {
    let now = Instant::now();
    let later = now + Duration::from_secs(5);
    let obs = Observed { hold: Some(Hold::Until(later)), ..observed(Stopped) };
    assert_eq!(plan(&present(DesiredState::Running), &obs, now), Step::WaitUntil(later));
    assert_eq!(plan(&present(DesiredState::Running), &obs, later).kind(), Create);
}

#[test]
fn an_error_that_needs_a_change_waits_for_one() {
    let obs = Observed { hold: Some(Hold::ForChange), ..observed(Stopped) };
    let far = Instant::now() + Duration::from_secs(3600);
    assert_eq!(plan(&present(DesiredState::Running), &obs, far), Step::AwaitChange);
    assert_eq!(plan(&Desired::Absent, &obs, far), Step::AwaitChange);
    // An invalid declaration is reported as such, held or not.
    assert!(matches!(plan(&Desired::Invalid("x".into()), &obs, far), Step::Blocked(_)));
}

#[test]
fn every_acting_step_is_a_valid_hop_or_bookkeeping() {
    let desired = [
        Desired::Absent,
        Desired::Invalid("bad".into()),
        present(DesiredState::Running),
        present(DesiredState::Standby),
        present(DesiredState::Stopped),
        Desired::Present(spec_with(DesiredState::Running, 768, RestartPolicy::Always)),
    ];
    for d in &desired {
        for from in ALL_STATES {
            for has_snapshot in [false, true] {
                let obs = Observed { snapshot: has_snapshot.then(snapshot), ..observed(from) };
                let step = plan(d, &obs, Instant::now());
                if let Some(to) = step.hop() {
                    assert!(from.can_transition_to(to), "{d:?} {from}: {step:?}");
                }
            }
        }
    }
}

fn running_with(restart: RestartPolicy) -> Desired {
    Desired::Present(spec_with(DesiredState::Running, 256, restart))
}

#[test]
fn the_restart_policy_decides_after_the_guest_ends_by_itself() {
    use GuestEnd::*;
    use RestartPolicy::*;
    let ends = [
        Exited { status: 0 },
        Exited { status: 1 },
        Killed { signal: 9 },
        StopRequested,
        KernelPanic { reason: "No working init found".into() },
        GuestEnd::Unknown,
    ];
    for policy in [Always, OnFailure, Never] {
        for end in ends.clone() {
            let expected = match (policy, &end) {
                (Always, _) => true,
                (OnFailure, Exited { status: 0 }) => false,
                (OnFailure, _) => true,
                (Never, _) => false,
            };
            assert_eq!(restarts(policy, &end), expected, "{policy} after {end}");
            // QEMU exits with its guest: Stopped, with the VMM on record.
            let obs = Observed { ended: Some(end.clone()), vmm: None, recorded_vmm: Some(vmm()), ..observed(Stopped) };
            let steps = walk(&running_with(policy), obs.clone());
            let want = if expected { vec![RecordExit, Create, Boot] } else { vec![RecordExit] };
            assert_eq!(steps, want, "{policy} after {end}");
            // Cloud Hypervisor keeps its VMM: Shutdown first.
            let obs = Observed { ended: Some(end.clone()), ..observed(Shutdown) };
            let steps = walk(&running_with(policy), obs);
            let want = if expected { vec![StopVmm, Create, Boot] } else { vec![StopVmm] };
            assert_eq!(steps, want, "{policy} after {end} (Shutdown)");
        }
    }
}

#[test]
fn a_held_exit_is_visible_and_lifted_by_a_change_or_a_stop() {
    let end = GuestEnd::Exited { status: 0 };
    let held = Observed { applied: None, exited: Some((end, Some(applied()))), ..observed(Stopped) };
    match plan(&running_with(RestartPolicy::OnFailure), &held, Instant::now()) {
        Step::Blocked(why) => assert_eq!(why, "the app exited with status 0; restart = \"on-failure\" leaves it stopped"),
        other => panic!("expected Blocked, got {other:?}"),
    }
    // The policy changed to one that restarts: boot.
    assert_eq!(plan(&running_with(RestartPolicy::Always), &held, Instant::now()).kind(), Create);
    // The declaration changed: boot the new one.
    let changed = Desired::Present(spec_with(DesiredState::Running, 512, RestartPolicy::Never));
    assert_eq!(walk(&changed, held.clone()), vec![Create, Boot]);
    // Declared stopped, the ending is forgotten; running again boots.
    assert_eq!(walk(&present(DesiredState::Stopped), held.clone()), vec![ForgetExit]);
    let forgotten = Observed { exited: None, ..held.clone() };
    assert_eq!(walk(&running_with(RestartPolicy::Never), forgotten), vec![Create, Boot]);
    // `hypeman restart` boots it without a change to the declaration.
    let asked = Observed { restart: true, ..held };
    assert_eq!(plan(&running_with(RestartPolicy::OnFailure), &asked, Instant::now()).kind(), Create);
}

/// `hypeman restart` of a running guest: down gracefully, as for a changed
/// declaration, saying why; nothing for one declared standby or stopped.
#[test]
fn a_restart_asked_for_shuts_a_running_guest_down_and_nothing_else() {
    let running = Observed { restart: true, vmm: Some(vmm()), applied: Some(applied()), ..observed(Running) };
    match plan(&running_with(RestartPolicy::OnFailure), &running, Instant::now()) {
        Step::PowerOff { booted: true, changed, .. } => assert_eq!(changed, ["a restart was asked for (hypeman restart)"]),
        other => panic!("expected a graceful power off, got {other:?}"),
    }
    assert_ne!(plan(&present(DesiredState::Standby), &running, Instant::now()).kind(), PowerOff);
}

#[test]
fn a_lost_network_is_repaired_by_a_standby_restore_cycle_only_when_wanted_running() {
    let lost = |state| Observed { tap: Some(TapHealth::Missing), ..observed(state) };
    let running = present(DesiredState::Running);
    let now = Instant::now();
    assert_eq!(plan(&running, &lost(Running), now).kind(), Pause);
    assert_eq!(plan(&running, &lost(Paused), now).kind(), Snapshot);
    // The restored VMM opened the TAP again: the usual path back.
    assert_eq!(walk(&running, observed(Standby)), vec![Restore, Resume, DropStaleSnapshot]);
    // A change of declaration is a restart, which reconnects as well.
    let changed = spec_with(DesiredState::Running, 512, RestartPolicy::Always).applied_for(HypervisorKind::Qemu);
    let stale = Observed { applied: Some(changed), ..lost(Running) };
    assert_eq!(plan(&running, &stale, now).kind(), PowerOff);
    // Going to standby or stopped anyway: no detour.
    assert_eq!(plan(&present(DesiredState::Standby), &lost(Running), now).kind(), Pause);
    assert_eq!(plan(&present(DesiredState::Standby), &lost(Paused), now).kind(), Snapshot);
    assert_eq!(plan(&present(DesiredState::Stopped), &lost(Running), now).kind(), PowerOff);
    assert_eq!(plan(&Desired::Absent, &lost(Running), now).kind(), PowerOff);
    // Backing off still waits.
    let later = now + Duration::from_secs(5);
    let waiting = Observed { hold: Some(Hold::Until(later)), ..lost(Running) };
    assert_eq!(plan(&running, &waiting, now), Step::WaitUntil(later));
    // A TAP that is only off the bridge is put back in place.
    let misplaced = Observed { tap: Some(TapHealth::Misplaced), ..observed(Running) };
    assert_eq!(plan(&running, &misplaced, now), Step::RepairTap);
}

#[test]
fn a_pressed_power_button_gets_its_grace_then_the_vmm_is_killed() {
    let now = Instant::now();
    let deadline = now + Duration::from_millis(300);
    let stopping = Observed { stopping: Some(deadline), ..observed(Running) };
    let stopped = present(DesiredState::Stopped);
    assert_eq!(plan(&stopped, &stopping, now), Step::AwaitPowerOff(now + STOP_POLL));
    assert_eq!(plan(&stopped, &stopping, deadline - Duration::from_millis(10)), Step::AwaitPowerOff(deadline));
    assert_eq!(plan(&stopped, &stopping, deadline), Step::Kill { vmm: vmm() });
    // Wanted running again meanwhile: the guest is on its way down anyway.
    assert_eq!(plan(&present(DesiredState::Running), &stopping, now).kind(), AwaitPowerOff);
    // Down inside its VMM: not an ending of its own.
    let down = Observed { ended: Some(GuestEnd::StopRequested), ..Observed { state: Shutdown, ..stopping.clone() } };
    assert_eq!(plan(&stopped, &down, now), Step::StopVmm { vmm: vmm(), end: None });
    // Gone with its VMM (QEMU): forgotten, not recorded as an exit.
    let gone = Observed { state: Stopped, vmm: None, ended: Some(GuestEnd::StopRequested), ..stopping.clone() };
    assert_eq!(plan(&stopped, &gone, now), Step::ForgetVmm);
    let gone = &gone;
    // A VMM that stops answering while its guest powers off is on its way
    // out, not stuck: waited for, then killed by its record.
    let exiting = Observed { state: Unknown, vmm: None, ..stopping.clone() };
    assert_eq!(plan(&stopped, &exiting, now), Step::AwaitPowerOff(now + STOP_POLL));
    assert_eq!(plan(&stopped, &exiting, deadline), Step::Kill { vmm: vmm() });
    // An invalid declaration saved meanwhile does not hold up the kill.
    let invalid = Desired::Invalid("broken".into());
    assert_eq!(plan(&invalid, &stopping, now).kind(), AwaitPowerOff);
    assert_eq!(plan(&invalid, &stopping, deadline), Step::Kill { vmm: vmm() });
    // QEMU gone with its guest, its socket file left: the stop is forgotten
    // as the owner's, before the socket is cleared.
    let left = Observed { stale_socket: Some("/g/qmp.sock".into()), ..gone.clone() };
    assert_eq!(plan(&stopped, &left, now), Step::ForgetVmm);
    let forgotten = Observed { recorded_vmm: None, ended: None, ..left };
    assert_eq!(plan(&stopped, &forgotten, now).kind(), ClearStaleSocket);
    // Killed after the grace, the path goes through Shutdown.
    assert_eq!(Outcome::Killed.check(Kill, Running), Ok(Stopped));
    assert_eq!(Outcome::Killed.check(PowerOff, Created), Ok(Stopped));
}

#[test]
fn a_press_the_guest_missed_is_repeated_until_the_grace_ends() {
    let now = Instant::now();
    let deadline = now + Duration::from_secs(30);
    let again = now + PRESS_AGAIN_EVERY;
    let stopping = Observed { stopping: Some(deadline), press_again: Some(again), ..observed(Running) };
    let stopped = present(DesiredState::Stopped);
    assert_eq!(plan(&stopped, &stopping, again - Duration::from_millis(10)), Step::AwaitPowerOff(again));
    assert_eq!(plan(&stopped, &stopping, again), Step::PressAgain { vmm: vmm() });
    assert_eq!(plan(&stopped, &stopping, deadline), Step::Kill { vmm: vmm() }, "the grace is not extended");
    // A VM not booted hears nothing; one whose VMM is on its way out is
    // not pressed.
    for state in [Created, Unknown] {
        let o = Observed { state, ..stopping.clone() };
        assert_eq!(plan(&stopped, &o, again).kind(), AwaitPowerOff, "{state}");
    }
}

#[test]
fn a_hung_vmm_declared_stopped_is_killed_after_the_grace() {
    let now = Instant::now();
    let until = now + Duration::from_secs(30);
    let hung = Observed { unanswered_until: Some(until), ..observed(Unknown) };
    let stopped = present(DesiredState::Stopped);
    assert_eq!(plan(&stopped, &hung, now), Step::WaitUntil(until));
    assert_eq!(plan(&stopped, &hung, until), Step::ForceKill { vmm: vmm() });
    // Killed, it is stopped like any guest whose VMM went away.
    assert_eq!(walk(&stopped, Observed { unanswered_until: Some(now - Duration::from_millis(1)), ..observed(Unknown) }), vec![ForceKill]);
    // Wanted running, it is left alone: it may yet answer.
    assert!(matches!(plan(&present(DesiredState::Running), &hung, until), Step::Blocked(_)));
    // A VMM not on record cannot be killed by its record.
    let stray = Observed { recorded_vmm: None, ..hung };
    assert!(matches!(plan(&stopped, &stray, until), Step::Blocked(_)));
}

#[test]
fn a_restore_that_falls_back_to_a_cold_boot_is_a_path_the_table_knows() {
    let why = Outcome::SnapshotUnusable { why: "another version".into() };
    assert_eq!(why.check(Restore, Standby), Ok(Stopped));
    assert_eq!(Outcome::Done.check(Restore, Standby), Ok(Paused));
    assert!(Outcome::Done.check(Restore, Stopped).is_err(), "a restore from Stopped is refused");
    assert_eq!(Outcome::PowerButtonPressed { deadline: Instant::now() }.check(PowerOff, Running), Ok(Running));
}

#[test]
fn bookkeeping_comes_before_hops() {
    let now = Instant::now();
    let other = VmmHandle { pid: 43, ..vmm() };
    let unrecorded = Observed { recorded_vmm: Some(other), ..observed(Running) };
    assert_eq!(plan(&present(DesiredState::Running), &unrecorded, now), Step::Adopt { vmm: vmm() });
    let stale = Observed { stale_socket: Some("/g/qmp.sock".into()), ..observed(Stopped) };
    assert_eq!(plan(&present(DesiredState::Running), &stale, now).kind(), ClearStaleSocket);
    assert_eq!(plan(&Desired::Absent, &stale, now).kind(), ClearStaleSocket);
    assert!(matches!(plan(&Desired::Invalid("x".into()), &stale, now), Step::Blocked(_)));
}

#[test]
fn an_unreadable_record_that_may_be_this_instance_holds_everything() {
    let now = Instant::now();
    let why = "the guest record /d/guests/01J/metadata.json cannot be read".to_string();
    // What observe reports: no guest, state unknown, and why.
    let unreadable = Observed { state: Unknown, unreadable_record: Some(why.clone()), ..Observed::nothing() };
    let all = [
        present(DesiredState::Running),
        present(DesiredState::Standby),
        present(DesiredState::Stopped),
        Desired::Absent,
        Desired::Invalid("bad".into()),
    ];
    for desired in &all {
        // Never Provision (a second VMM), never Remove (its data), never Converged (it is not).
        assert_eq!(plan(desired, &unreadable, now), Step::Blocked(why.clone()), "{desired:?}");
        let held = Observed { hold: Some(Hold::ForChange), ..unreadable.clone() };
        assert_eq!(plan(desired, &held, now), Step::Blocked(why.clone()), "{desired:?}");
    }
}

#[test]
fn a_default_hypervisor_that_flips_restarts_nothing() {
    // Pinned at provision to Cloud Hypervisor (then the host's default);
    // the declaration names none, and the host's default is QEMU now. The
    // planner never reads the settings' default: the record pins it.
    let spec = spec_with(DesiredState::Running, 256, RestartPolicy::Always);
    assert_eq!(spec.hypervisor, None);
    let on_ch = spec.applied_for(HypervisorKind::CloudHypervisor);
    let obs = |state| Observed {
        hypervisor: Some(HypervisorKind::CloudHypervisor),
        applied: Some(on_ch.clone()),
        ..observed(state)
    };
    let desired = Desired::Present(spec.clone());
    assert_eq!(walk(&desired, obs(Running)), Vec::<StepKind>::new());
    assert_eq!(walk(&desired, obs(Standby)), vec![Restore, Resume, DropStaleSnapshot]);
    // A record converted from an old release that did not say its
    // hypervisor reads as the pinned one.
    let unsaid = crate::store::AppliedDeclaration { hypervisor: None, ..on_ch.clone() };
    assert!(spec.changes_since(&unsaid, HypervisorKind::CloudHypervisor).is_empty());
    // A declaration that names another hypervisor is a change.
    let text = "image = \"busybox\"\nmemory = \"256MiB\"\nhypervisor = \"qemu\"\n";
    let moved = crate::declaration::parse_instance(std::path::Path::new("instances/web.toml"), text, &Default::default()).unwrap();
    assert_eq!(moved.changes_since(&on_ch, HypervisorKind::CloudHypervisor), vec!["hypervisor"]);
}

#[test]
fn a_field_the_record_lacks_reads_as_its_default_and_changes_nothing() {
    // A record of an older release that knew only these fields.
    let old: crate::store::AppliedDeclaration = serde_json::from_value(serde_json::json!({
        "version": 1, "image": "busybox", "hypervisor": "qemu", "memory_bytes": 268435456u64,
    }))
    .unwrap();
    let spec = spec_with(DesiredState::Running, 256, RestartPolicy::Always);
    assert!(spec.changes_since(&old, HypervisorKind::Qemu).is_empty(), "{:?}", spec.changes_since(&old, HypervisorKind::Qemu));
    let desired = Desired::Present(spec);
    let running = Observed { applied: Some(old.clone()), ..observed(Running) };
    assert_eq!(walk(&desired, running), Vec::<StepKind>::new(), "no restart");
    let standby = Observed { applied: Some(old), ..observed(Standby) };
    assert_eq!(walk(&desired, standby), vec![Restore, Resume, DropStaleSnapshot], "no discard");
}

/// Property tests over every field of [`Observed`], each drawn from the
/// values that matter to the planner (and a few that should not).
mod props {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;

    fn end() -> impl Strategy<Value = GuestEnd> {
        select(vec![
            GuestEnd::Exited { status: 0 },
            GuestEnd::Exited { status: 3 },
            GuestEnd::Killed { signal: 9 },
            GuestEnd::StopRequested,
            GuestEnd::InitFailed { reason: "no entrypoint".into() },
            GuestEnd::KernelPanic { reason: "No working init found".into() },
            GuestEnd::Unknown,
        ])
    }

    fn applied_values() -> Vec<crate::store::AppliedDeclaration> {
        vec![
            applied(),
            spec_with(DesiredState::Running, 512, RestartPolicy::Always).applied_for(HypervisorKind::Qemu),
            spec_with(DesiredState::Running, 256, RestartPolicy::Always).applied_for(HypervisorKind::CloudHypervisor),
        ]
    }

    fn handle() -> impl Strategy<Value = VmmHandle> {
        select(vec![vmm(), VmmHandle { pid: 43, ..vmm() }])
    }

    /// Offsets from the planning instant, in ms: past, now, future.
    fn offset() -> impl Strategy<Value = i64> {
        select(vec![-1000i64, -1, 0, 1, 30, 1000])
    }

    fn at(now: Instant, ms: i64) -> Instant {
        if ms >= 0 {
            now + Duration::from_millis(ms as u64)
        } else {
            now - Duration::from_millis((-ms) as u64)
        }
    }

    prop_compose! {
        fn observed_at(now: Instant)(
            exists in any::<bool>(),
            state in select(ALL_STATES.to_vec()),
            hypervisor in proptest::option::of(select(vec![HypervisorKind::Qemu, HypervisorKind::CloudHypervisor])),
            vmm in proptest::option::of(handle()),
            recorded_vmm in proptest::option::of(handle()),
            has_snapshot in any::<bool>(),
            applied in proptest::option::of(select(applied_values())),
            hold in proptest::option::of(prop_oneof![offset().prop_map(Some), Just(None)]),
            ended in proptest::option::of(end()),
            tap in proptest::option::of(select(vec![TapHealth::Fine, TapHealth::Misplaced, TapHealth::Missing, TapHealth::Orphaned])),
            exited in proptest::option::of((end(), proptest::option::of(select(applied_values())))),
            stale_socket in any::<bool>(),
            stopping in proptest::option::of(offset()),
            press_again in proptest::option::of(offset()),
            unanswered_until in proptest::option::of(offset()),
            unreadable in proptest::bool::weighted(0.05),
            lost in any::<bool>(),
            overlay_bytes in proptest::option::of(select(vec![512u64 << 20, 1 << 30, 2 << 30])),
            restart in proptest::bool::weighted(0.1),
        ) -> Observed {
            Observed {
                restart,
                exists,
                state,
                hypervisor,
                vmm,
                recorded_vmm,
                snapshot: has_snapshot.then(snapshot),
                applied,
                hold: hold.map(|h| match h { Some(ms) => Hold::Until(at(now, ms)), None => Hold::ForChange }),
                ended,
                tap,
                exited,
                stale_socket: stale_socket.then(|| "/g/qmp.sock".into()),
                stopping: stopping.map(|ms| at(now, ms)),
                press_again: press_again.map(|ms| at(now, ms)),
                unanswered_until: unanswered_until.map(|ms| at(now, ms)),
                unreadable_record: unreadable.then(|| "the guest record /g/metadata.json cannot be read".to_string()),
                lost: lost.then(|| "the guest's running state was lost".into()),
                overlay_bytes,
            }
        }
    }

    fn desired() -> impl Strategy<Value = Desired> {
        let specs: Vec<Desired> = [DesiredState::Running, DesiredState::Standby, DesiredState::Stopped]
            .into_iter()
            .flat_map(|state| {
                [(256, RestartPolicy::Always), (512, RestartPolicy::Never), (256, RestartPolicy::OnFailure)]
                    .map(|(memory, restart)| Desired::Present(spec_with(state, memory, restart)))
            })
            .chain([Desired::Absent, Desired::Invalid("bad".into())])
            .collect();
        select(specs)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        #[test]
        fn the_plan_holds_its_invariants_for_any_observation(
            (now, o, d) in Just(Instant::now()).prop_flat_map(|now| (Just(now), observed_at(now), desired()))
        ) {
            let step = plan(&d, &o, now);
            // Pure: the same inputs plan the same step.
            prop_assert_eq!(&plan(&d, &o, now), &step);
            // A record that may be this instance's and cannot be read holds
            // everything: no second guest, no removal, whatever is declared.
            if o.unreadable_record.is_some() {
                prop_assert!(matches!(step, Step::Blocked(_)), "{:?}", step);
                return Ok(());
            }
            // Every hop is one the table allows.
            if let Some(to) = step.hop() {
                prop_assert!(o.state.can_transition_to(to), "{:?} from {}", step, o.state);
            }
            // An invalid declaration is never acted on; only a stop the
            // owner began is finished.
            let finishing = matches!(o.state, Running | Created | Unknown)
                && o.stopping.is_some_and(|deadline| now < deadline || o.vmm.is_some() || o.recorded_vmm.is_some());
            if matches!(d, Desired::Invalid(_)) {
                prop_assert!(
                    matches!(step, Step::Blocked(_))
                        || (finishing && matches!(step, Step::AwaitPowerOff(_) | Step::PressAgain { .. } | Step::Kill { .. } | Step::WaitUntil(_) | Step::AwaitChange)),
                    "{:?}", step
                );
            }
            // Holding back is honoured, except by a declaration that cannot act.
            let acts_at_all = (!matches!(d, Desired::Invalid(_)) || finishing) && (d != Desired::Absent || o.exists);
            match o.hold {
                Some(Hold::ForChange) if acts_at_all => prop_assert_eq!(&step, &Step::AwaitChange),
                Some(Hold::Until(t)) if acts_at_all && now < t => prop_assert_eq!(&step, &Step::WaitUntil(t)),
                _ => {}
            }
            // Steps carry the VMM that was seen, never another.
            match &step {
                Step::Boot { vmm } | Step::Pause { vmm, .. } | Step::Resume { vmm, .. } | Step::Snapshot { vmm }
                | Step::PowerOff { vmm, .. } | Step::StopVmm { vmm, .. }
                | Step::DropStaleSnapshot { vmm, .. } | Step::Adopt { vmm } => {
                    prop_assert_eq!(Some(vmm), o.vmm.as_ref());
                }
                // The VMM that answered, else the one on record (it stopped
                // answering on its way out).
                Step::Kill { vmm } => {
                    prop_assert_eq!(Some(vmm), o.vmm.as_ref().or(o.recorded_vmm.as_ref()));
                    prop_assert!(o.stopping.is_some());
                }
                // Only when deleted, or declared stopped once the grace is over.
                Step::ForceKill { vmm } => {
                    prop_assert_eq!(Some(vmm), o.recorded_vmm.as_ref());
                    prop_assert_eq!(o.state, Unknown);
                    let stopped = matches!(&d, Desired::Present(s) if s.state == DesiredState::Stopped);
                    prop_assert!(
                        d == Desired::Absent || (stopped && o.unanswered_until.is_some_and(|t| now >= t)),
                        "{:?}", d
                    );
                }
                // Again only within the grace, once due, to a running guest.
                Step::PressAgain { vmm } => {
                    prop_assert_eq!(Some(vmm), o.vmm.as_ref());
                    prop_assert_eq!(o.state, Running);
                    prop_assert!(o.stopping.is_some_and(|t| now < t));
                    prop_assert!(o.press_again.is_some_and(|t| now >= t));
                }
                Step::Restore { snapshot, spec } => {
                    prop_assert_eq!(Some(snapshot), o.snapshot.as_ref());
                    prop_assert_eq!(o.state, Standby);
                    prop_assert_eq!(&d, &Desired::Present(spec.clone()));
                }
                Step::Create { spec } => {
                    prop_assert!(o.exists);
                    prop_assert_eq!(&d, &Desired::Present(spec.clone()));
                }
                Step::Provision { .. } => prop_assert!(!o.exists),
                // Data goes only when the declaration is gone.
                Step::Remove => {
                    prop_assert_eq!(&d, &Desired::Absent);
                    prop_assert_eq!(o.state, Stopped);
                }
                // Unrestored only when the declaration is gone.
                Step::DiscardSnapshot => {
                    prop_assert_eq!(o.state, Standby);
                    prop_assert_eq!(&d, &Desired::Absent);
                }
                // A guest the owner is stopping is not taken for one that ended.
                Step::RecordExit { .. } => prop_assert!(o.stopping.is_none()),
                Step::ClearStaleSocket { .. } => prop_assert!(matches!(o.state, Stopped | Standby)),
                Step::Converged | Step::Blocked(_) | Step::WaitUntil(_) | Step::AwaitChange
                | Step::AwaitPowerOff(_) | Step::RepairTap | Step::ForgetVmm | Step::ForgetExit => {}
            }
            if let Step::StopVmm { end: Some(_), .. } = &step {
                prop_assert!(o.stopping.is_none(), "an ending of its own while being stopped");
            }
            // A pressed power button gets its grace, then the kill.
            if let (Step::Kill { .. }, Some(deadline)) = (&step, o.stopping) {
                prop_assert!(now >= deadline);
            }
            if let Step::AwaitPowerOff(t) = step {
                prop_assert!(t > now && t <= now + STOP_POLL);
                if o.state == Running {
                    prop_assert!(o.press_again.is_none_or(|p| p <= now || t <= p), "wakes for the next press");
                }
            }
        }

        #[test]
        fn any_consistent_start_converges(
            (state, d, has_snapshot) in (select(ALL_STATES.to_vec()), desired(), any::<bool>())
        ) {
            // `walk` simulates a world where every step succeeds.
            let start = Observed { snapshot: (has_snapshot || state == Standby).then(snapshot), ..observed(state) };
            let steps = walk(&d, start);
            // The longest way: a stale paused VM restored beside its snapshot
            // and wanted in standby is resumed, leaves the snapshot, is
            // restarted and snapshotted again (8 steps).
            prop_assert!(steps.len() <= 8, "{:?}", steps);
        }
    }
}

/// A guest whose VMM died while its snapshot was written: a fresh boot is
/// never saved as its standby; declaring running boots it anew, declaring
/// stopped acknowledges the loss.
#[test]
fn a_guest_whose_running_state_was_lost_is_not_booted_afresh_as_its_standby() {
    let why = "the guest's running state was lost: its VMM (pid 42) died while its snapshot was written";
    let lost = Observed { lost: Some(why.into()), applied: None, ..observed(Stopped) };
    let now = Instant::now();
    match plan(&present(DesiredState::Standby), &lost, now) {
        Step::Blocked(said) => {
            assert!(said.starts_with(why), "{said}");
            assert!(said.contains("declare it running"), "{said}");
        }
        other => panic!("expected Blocked, got {other:?}"),
    }
    assert_eq!(plan(&present(DesiredState::Running), &lost, now).kind(), Create);
    assert_eq!(walk(&present(DesiredState::Stopped), lost.clone()), vec![ForgetExit]);
    // Once forgotten (or booted anew), standby works as ever.
    let forgotten = Observed { lost: None, ..lost };
    assert_eq!(plan(&present(DesiredState::Standby), &forgotten, now).kind(), Create);
}

const MIB: u64 = 1 << 20;

/// A running spec declaring `overlay` (and `memory` MiB).
fn with_overlay(state: DesiredState, memory: u64, overlay: &str) -> Arc<InstanceSpec> {
    let text = format!("image = \"busybox\"\nstate = \"{state}\"\nmemory = \"{memory}MiB\"\noverlay_size = \"{overlay}\"\n");
    Arc::new(crate::declaration::parse_instance(std::path::Path::new("instances/web.toml"), &text, &Default::default()).expect("valid"))
}

/// A guest made from `applied()` (a 1 GiB overlay) whose overlay file is
/// `overlay_bytes` long.
fn with_file(state: VmState, overlay_bytes: u64) -> Observed {
    Observed { overlay_bytes: Some(overlay_bytes), ..observed(state) }
}

#[test]
fn a_larger_overlay_size_restarts_the_guest_to_grow_it() {
    let grown = Desired::Present(with_overlay(DesiredState::Running, 256, "2GiB"));
    match plan(&grown, &with_file(Running, 1 << 30), Instant::now()) {
        Step::PowerOff { booted: true, changed, .. } => assert_eq!(changed, vec!["overlay_size"]),
        other => panic!("expected a power off, got {other:?}"),
    }
    assert_eq!(walk(&grown, with_file(Running, 1 << 30)), vec![PowerOff, StopVmm, Create, Boot]);
}

#[test]
fn a_smaller_overlay_size_is_refused_and_the_guest_keeps_running() {
    let shrunk = Desired::Present(with_overlay(DesiredState::Running, 256, "512MiB"));
    let why = "overlay_size cannot shrink (the overlay is 1GiB, declared 512MiB); keeping 1GiB: \
               delete the instance to start over with a smaller one";
    assert_eq!(plan(&shrunk, &with_file(Running, 1 << 30), Instant::now()), Step::Blocked(why.into()));
    assert_eq!(walk(&shrunk, with_file(Running, 1 << 30)), vec![], "nothing is done to the guest");
    // In standby it is not restored for it either.
    assert_eq!(plan(&Desired::Present(with_overlay(DesiredState::Standby, 256, "512MiB")), &with_file(Standby, 1 << 30), Instant::now()),
        Step::Blocked(why.into()));
    // The old size declared again: nothing to say any more.
    let back = Desired::Present(with_overlay(DesiredState::Running, 256, "1GiB"));
    assert_eq!(plan(&back, &with_file(Running, 1 << 30), Instant::now()), Step::Converged);
    // A size between the refused one and the overlay's is still a shrink.
    let between = Desired::Present(with_overlay(DesiredState::Running, 256, "768MiB"));
    assert!(matches!(plan(&between, &with_file(Running, 1 << 30), Instant::now()), Step::Blocked(w) if w.contains("declared 768MiB")));
}

#[test]
fn other_fields_changed_with_a_refused_shrink_are_still_applied() {
    let both = Desired::Present(with_overlay(DesiredState::Running, 512, "512MiB"));
    match plan(&both, &with_file(Running, 1 << 30), Instant::now()) {
        Step::PowerOff { changed, .. } => assert_eq!(changed, vec!["memory"], "the overlay is not what is restarted for"),
        other => panic!("expected a power off, got {other:?}"),
    }
    // The restart applies the memory; the overlay keeps its size, and once
    // the new VM runs the refusal is said.
    let mut obs = with_file(Running, 1 << 30);
    assert_eq!(walk(&both, obs.clone()), vec![PowerOff, StopVmm, Create, Boot]);
    obs.applied = Some(with_overlay(DesiredState::Running, 512, "512MiB").applied_for(HypervisorKind::Qemu));
    assert!(matches!(plan(&both, &obs, Instant::now()), Step::Blocked(w) if w.starts_with("overlay_size cannot shrink")));
    // Now recorded as applied, the smaller size is no pending change.
    let spec = with_overlay(DesiredState::Running, 512, "512MiB");
    assert!(restart_changes(&spec, obs.applied.as_ref().unwrap(), HypervisorKind::Qemu, Some(1 << 30)).is_empty());
    // A size between that and the overlay's is no restart either.
    let between = with_overlay(DesiredState::Running, 512, "768MiB");
    assert!(restart_changes(&between, obs.applied.as_ref().unwrap(), HypervisorKind::Qemu, Some(1 << 30)).is_empty());
}

/// An older hypeman recorded a larger size it never applied (the overlay
/// stayed as it was): an upgrade restarts nothing for it; the next create
/// grows the overlay.
#[test]
fn a_size_recorded_but_never_applied_restarts_nothing() {
    let spec = with_overlay(DesiredState::Running, 256, "2GiB");
    let recorded = Observed { applied: Some(spec.applied_for(HypervisorKind::Qemu)), ..with_file(Running, 1 << 30) };
    assert_eq!(plan(&Desired::Present(spec.clone()), &recorded, Instant::now()), Step::Converged);
    assert!(restart_changes(&spec, recorded.applied.as_ref().unwrap(), HypervisorKind::Qemu, Some(1 << 30)).is_empty());
    // Without a file to look at, the recorded declaration alone decides.
    let grown = with_overlay(DesiredState::Running, 256, "2GiB");
    assert_eq!(restart_changes(&grown, &applied(), HypervisorKind::Qemu, None), vec!["overlay_size"]);
    assert_eq!(restart_changes(&grown, &applied(), HypervisorKind::Qemu, Some(512 * MIB)), vec!["overlay_size"]);
}

#[test]
fn a_held_guest_is_not_booted_for_a_refused_shrink() {
    let end = GuestEnd::Exited { status: 0 };
    let held = Observed { applied: None, exited: Some((end, Some(applied()))), ..with_file(Stopped, 1 << 30) };
    let shrunk = Desired::Present(with_overlay(DesiredState::Running, 256, "512MiB"));
    let never = |d: &Desired| match d {
        Desired::Present(spec) => Desired::Present(Arc::new(InstanceSpec { restart: RestartPolicy::Never, ..(**spec).clone() })),
        other => other.clone(),
    };
    assert_eq!(plan(&never(&shrunk), &held, Instant::now()).kind(), Blocked);
    let grown = Desired::Present(with_overlay(DesiredState::Running, 256, "2GiB"));
    assert_eq!(plan(&never(&grown), &held, Instant::now()).kind(), Create, "a grow is a change");
}

#[test]
fn a_guest_whose_vmm_died_unrecorded_is_not_booted_afresh_as_its_standby() {
    // The daemon was killed too, before it could record the loss: the next
    // look finds only a VMM gone without an exit line.
    let crashed = Observed { exited: Some((GuestEnd::Unknown, None)), ..observed(Stopped) };
    let now = Instant::now();
    match plan(&present(DesiredState::Standby), &crashed, now) {
        Step::Blocked(said) => {
            assert!(said.contains("its running state went with it"), "{said}");
            assert!(said.contains("declare it stopped, then standby again"), "{said}");
        }
        other => panic!("expected Blocked, got {other:?}"),
    }
    assert_eq!(walk(&present(DesiredState::Stopped), crashed.clone()), vec![ForgetExit]);
    // An app that ended by itself is not a loss hypeman caused: a standby
    // of a fresh boot is what is asked for.
    let exited = Observed { exited: Some((GuestEnd::Exited { status: 0 }, None)), ..observed(Stopped) };
    assert_eq!(plan(&present(DesiredState::Standby), &exited, now).kind(), Create);
}
