//! What can be done to one instance and what it did: the vocabulary
//! between the planner (`reconcile::plan`, which chooses a [`Step`] from an
//! [`Observed`]) and the executor (`execute.rs`, which carries it out and
//! says what happened as an [`Outcome`]).
//!
//! A [`Step`] holds its inputs (the declaration for a create, the live VMM
//! for a pause, the snapshot for a restore), so the executor never finds an
//! input missing at run time. An [`Outcome`]'s path through the state
//! machine is checked against the table like the planned hop was. Pure
//! data: nothing here does IO.

use crate::declaration::spec::{HypervisorKind, InstanceSpec};
use crate::exit::GuestEnd;
use crate::hypervisor::VmmHandle;
use crate::network::host::TapHealth;
use crate::state::{StateError, VmState};
use crate::store::{AppliedDeclaration, SnapshotInfo};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often a guest whose power button was pressed is looked at until it
/// is down or its grace is over.
pub const STOP_POLL: Duration = Duration::from_millis(50);

/// How often the power button is pressed again while a guest has not
/// powered off: a press the guest missed while still booting is repeated
/// until it hears one or its grace ends.
pub const PRESS_AGAIN_EVERY: Duration = Duration::from_secs(1);

/// What is true right now, as observed through the store and the VMM, plus
/// what the instance's owner remembers of its own recent actions.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The store holds a guest of this name.
    pub exists: bool,
    pub state: VmState,
    /// The hypervisor pinned in the guest's record when it was created.
    pub hypervisor: Option<HypervisorKind>,
    /// The VMM that answered, when one did.
    pub vmm: Option<VmmHandle>,
    /// The VMM the guest's record names, alive or not.
    pub recorded_vmm: Option<VmmHandle>,
    /// The complete snapshot on disk.
    pub snapshot: Option<SnapshotInfo>,
    /// The declaration the current VM or snapshot was made from.
    pub applied: Option<AppliedDeclaration>,
    /// The owner holds back after an error: no step until then, or until
    /// the declaration changes.
    pub hold: Option<Hold>,
    /// How the guest ended, when it looks ended and nothing has dealt with
    /// it yet: its VMM is on record but gone (`Stopped`), or it powered off
    /// inside a live VMM (`Shutdown`). Whether it ended by itself depends
    /// on `stopping`.
    pub ended: Option<GuestEnd>,
    /// How the live VM's TAP looks, for a guest with a network whose VMM
    /// holds its TAP open.
    pub tap: Option<TapHealth>,
    /// The recorded ending (see `Metadata::exited`) and the declaration
    /// the ended VM ran with.
    pub exited: Option<(GuestEnd, Option<AppliedDeclaration>)>,
    /// A VMM socket file that no process serves any more.
    pub stale_socket: Option<PathBuf>,
    /// The owner pressed the guest's power button; the guest has until
    /// then to power off.
    pub stopping: Option<Instant>,
    /// While stopping: when the power button is pressed again, for a guest
    /// that missed the press (it was still booting, its init not yet
    /// listening). Init acts on the first press it hears and ignores the
    /// rest.
    pub press_again: Option<Instant>,
    /// The VMM stopped answering: a guest declared stopped has its VMM
    /// killed from then on (the grace a power button would have had).
    pub unanswered_until: Option<Instant>,
    /// `hypeman restart` asked for a fresh boot, not yet done: a running
    /// guest is shut down (gracefully) and booted again, one held stopped by
    /// its restart policy is booted.
    pub restart: bool,
    /// A guest record that cannot be read may be this instance's (see
    /// `Observation::unreadable_record`): why nothing may be done.
    pub unreadable_record: Option<String>,
    /// Why the guest's running state was lost (see `Metadata::lost`), while
    /// the declaration has not said what now since.
    pub lost: Option<String>,
    /// The size of the guest's overlay file now, when it has one: what a
    /// declared `overlay_size` is held against (the applied declaration
    /// may name a size that was refused, or one an older hypeman never
    /// applied).
    pub overlay_bytes: Option<u64>,
}

/// What a power off says it is for when `hypeman restart` asked for it,
/// in place of the changed fields of a declaration.
pub const RESTART_ASKED: &str = "a restart was asked for (hypeman restart)";

/// What an instance's owner remembers of its own recent doings, which no
/// look at the instance can see: handed to [`Observation::observed`].
///
/// [`Observation::observed`]: super::Observation::observed
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Recall {
    /// `hypeman restart` asked, not yet done (see `Observed::restart`).
    pub restart: bool,
    pub hold: Option<Hold>,
    pub stopping: Option<Instant>,
    pub press_again: Option<Instant>,
    pub unanswered_until: Option<Instant>,
}

impl Observed {
    /// Nothing of this name in the store.
    pub fn nothing() -> Observed {
        Observed {
            exists: false,
            state: VmState::Stopped,
            hypervisor: None,
            vmm: None,
            recorded_vmm: None,
            snapshot: None,
            applied: None,
            hold: None,
            ended: None,
            tap: None,
            exited: None,
            stale_socket: None,
            stopping: None,
            press_again: None,
            unanswered_until: None,
            restart: false,
            unreadable_record: None,
            lost: None,
            overlay_bytes: None,
        }
    }

    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }
}

/// Why the owner is not acting now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A transient error: try again at this instant.
    Until(Instant),
    /// An error that only a change of the declaration or the settings can
    /// clear.
    ForChange,
}

/// Boot and hotplug memory, for a pause that gives hotplug memory back and
/// a resume that plugs it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub boot_bytes: u64,
    pub hotplug_bytes: u64,
}

impl Memory {
    /// The memory of `spec`, when it has hotplug memory to give back.
    pub fn of(spec: &InstanceSpec) -> Option<Memory> {
        let hotplug_bytes = spec.hotplug_memory.bytes();
        (hotplug_bytes > 0).then_some(Memory { boot_bytes: spec.memory.bytes(), hotplug_bytes })
    }
}

/// Why a running guest is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseFor {
    /// On the way to standby (or to a snapshot).
    Standby,
    /// Its TAP was deleted while it ran: a standby/restore cycle opens the
    /// TAP anew and the guest keeps its state.
    ReconnectNetwork,
}

/// The next thing to do for one instance. Every variant that acts is a
/// single hop of the state machine, or bookkeeping outside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to do: observed matches desired.
    Converged,
    /// Nothing can be done until something outside changes.
    Blocked(String),
    /// Backing off after an error; look again at this instant.
    WaitUntil(Instant),
    /// An error that needs a change of the declaration or the settings;
    /// nothing is tried until one comes.
    AwaitChange,
    /// The power button was pressed; look again at this instant.
    AwaitPowerOff(Instant),
    /// Create the guest's record and directory (it stays `Stopped`); the
    /// record pins the hypervisor the guest runs on.
    Provision { spec: Arc<InstanceSpec> },
    /// Record a live VMM the guest's record does not name (the daemon died
    /// between starting it and recording it).
    Adopt { vmm: VmmHandle },
    /// Remove a VMM socket file no process serves.
    ClearStaleSocket { socket: PathBuf },
    /// Put a live VM's TAP back on the bridge and up.
    RepairTap,
    /// `Stopped → Created`: prepare disks, start the VMM, create the VM.
    Create { spec: Arc<InstanceSpec> },
    /// `Created → Running`.
    Boot { vmm: VmmHandle },
    /// `Running → Paused`, giving back hotplug memory first when `shrink`.
    Pause { vmm: VmmHandle, shrink: Option<Memory>, why: PauseFor },
    /// `Paused → Running`, plugging the hotplug memory again when `regrow`
    /// (a VM just restored from a snapshot that was shrunk).
    Resume { vmm: VmmHandle, regrow: Option<Memory> },
    /// `Paused → Standby`: snapshot, then end the VMM.
    Snapshot { vmm: VmmHandle },
    /// `Standby → Paused`: a new VMM restores the snapshot, under the
    /// launch configuration it was taken with (whatever the declaration
    /// says now: a guest of an older declaration is restored to be shut
    /// down cleanly). `spec` is the declaration, for the guest's lease.
    Restore { spec: Arc<InstanceSpec>, snapshot: SnapshotInfo },
    /// `Running|Created → Shutdown`: the power button (a `Created` VM, which
    /// nothing booted could hear, is killed). `changed` names the restart
    /// fields it is powered off to apply, when that is why.
    PowerOff { vmm: VmmHandle, booted: bool, changed: Vec<String> },
    /// The guest has not powered off yet: press its power button again
    /// (it may have missed the first press while still booting).
    PressAgain { vmm: VmmHandle },
    /// The guest did not power off within its grace: kill its VMM.
    Kill { vmm: VmmHandle },
    /// `Shutdown → Stopped`: end the VMM; `end` is how the guest ended when
    /// it powered off by itself.
    StopVmm { vmm: VmmHandle, end: Option<GuestEnd> },
    /// `Standby → Stopped`: remove the snapshot, unrestored. Only for an
    /// instance whose declaration is gone (its data goes with it); leaving
    /// standby otherwise restores the guest and shuts it down.
    DiscardSnapshot,
    /// A running VM restored from a snapshot: the snapshot is stale now.
    DropStaleSnapshot { vmm: VmmHandle, regrow: Option<Memory> },
    /// `Unknown`: kill the unanswering VMM (only on delete).
    ForceKill { vmm: VmmHandle },
    /// A VMM that went away by itself: drop its record, keep how the guest
    /// ended for the restart policy and status.
    RecordExit { end: GuestEnd },
    /// A VMM that exited with its guest after the daemon pressed the power
    /// button: drop its record; nothing ended by itself.
    ForgetVmm,
    /// Declared stopped: the last ending, or a loss of the running state,
    /// no longer holds back a boot (the loss stays in `status` until one).
    ForgetExit,
    /// `Stopped`, declaration gone: remove the guest and all its data.
    Remove,
}

/// A [`Step`] without its inputs: for logs, tests and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    Converged,
    Blocked,
    WaitUntil,
    AwaitChange,
    AwaitPowerOff,
    Provision,
    Adopt,
    ClearStaleSocket,
    RepairTap,
    Create,
    Boot,
    Pause,
    Resume,
    Snapshot,
    Restore,
    PowerOff,
    PressAgain,
    Kill,
    StopVmm,
    DiscardSnapshot,
    DropStaleSnapshot,
    ForceKill,
    RecordExit,
    ForgetVmm,
    ForgetExit,
    Remove,
}

impl Step {
    pub fn kind(&self) -> StepKind {
        match self {
            Step::Converged => StepKind::Converged,
            Step::Blocked(_) => StepKind::Blocked,
            Step::WaitUntil(_) => StepKind::WaitUntil,
            Step::AwaitChange => StepKind::AwaitChange,
            Step::AwaitPowerOff(_) => StepKind::AwaitPowerOff,
            Step::Provision { .. } => StepKind::Provision,
            Step::Adopt { .. } => StepKind::Adopt,
            Step::ClearStaleSocket { .. } => StepKind::ClearStaleSocket,
            Step::RepairTap => StepKind::RepairTap,
            Step::Create { .. } => StepKind::Create,
            Step::Boot { .. } => StepKind::Boot,
            Step::Pause { .. } => StepKind::Pause,
            Step::Resume { .. } => StepKind::Resume,
            Step::Snapshot { .. } => StepKind::Snapshot,
            Step::Restore { .. } => StepKind::Restore,
            Step::PowerOff { .. } => StepKind::PowerOff,
            Step::PressAgain { .. } => StepKind::PressAgain,
            Step::Kill { .. } => StepKind::Kill,
            Step::StopVmm { .. } => StepKind::StopVmm,
            Step::DiscardSnapshot => StepKind::DiscardSnapshot,
            Step::DropStaleSnapshot { .. } => StepKind::DropStaleSnapshot,
            Step::ForceKill { .. } => StepKind::ForceKill,
            Step::RecordExit { .. } => StepKind::RecordExit,
            Step::ForgetVmm => StepKind::ForgetVmm,
            Step::ForgetExit => StepKind::ForgetExit,
            Step::Remove => StepKind::Remove,
        }
    }

    /// The hop this step means to take, checked against the table before
    /// acting. What it took is its [`Outcome`]'s.
    pub fn hop(&self) -> Option<VmState> {
        self.kind().hop()
    }

    /// Whether the step changes anything (and so is worth a log line).
    pub fn acts(&self) -> bool {
        self.kind().acts()
    }
}

impl StepKind {
    /// See [`Step::hop`].
    pub fn hop(self) -> Option<VmState> {
        use VmState::*;
        match self {
            StepKind::Create => Some(Created),
            StepKind::Boot | StepKind::Resume => Some(Running),
            StepKind::Pause | StepKind::Restore => Some(Paused),
            StepKind::Snapshot => Some(Standby),
            StepKind::PowerOff => Some(Shutdown),
            StepKind::StopVmm | StepKind::DiscardSnapshot => Some(Stopped),
            StepKind::Converged
            | StepKind::Blocked
            | StepKind::WaitUntil
            | StepKind::AwaitChange
            | StepKind::AwaitPowerOff
            | StepKind::Provision
            | StepKind::Adopt
            | StepKind::ClearStaleSocket
            | StepKind::RepairTap
            | StepKind::PressAgain
            | StepKind::Kill
            | StepKind::DropStaleSnapshot
            | StepKind::ForceKill
            | StepKind::RecordExit
            | StepKind::ForgetVmm
            | StepKind::ForgetExit
            | StepKind::Remove => None,
        }
    }

    pub fn acts(self) -> bool {
        match self {
            StepKind::Converged
            | StepKind::Blocked
            | StepKind::WaitUntil
            | StepKind::AwaitChange
            | StepKind::AwaitPowerOff => false,
            StepKind::Provision
            | StepKind::Adopt
            | StepKind::ClearStaleSocket
            | StepKind::RepairTap
            | StepKind::Create
            | StepKind::Boot
            | StepKind::Pause
            | StepKind::Resume
            | StepKind::Snapshot
            | StepKind::Restore
            | StepKind::PowerOff
            | StepKind::PressAgain
            | StepKind::Kill
            | StepKind::StopVmm
            | StepKind::DiscardSnapshot
            | StepKind::DropStaleSnapshot
            | StepKind::ForceKill
            | StepKind::RecordExit
            | StepKind::ForgetVmm
            | StepKind::ForgetExit
            | StepKind::Remove => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Converged => "nothing to do",
            StepKind::Blocked => "blocked",
            StepKind::WaitUntil => "backing off after an error",
            StepKind::AwaitChange => "waiting for a change to the declaration or settings",
            StepKind::AwaitPowerOff => "waiting for the guest to power off",
            StepKind::Provision => "provision",
            StepKind::Adopt => "adopt the running VMM",
            StepKind::ClearStaleSocket => "remove a stale VMM socket",
            StepKind::RepairTap => "put the guest's TAP back",
            StepKind::Create => "create VM",
            StepKind::Boot => "boot",
            StepKind::Pause => "pause",
            StepKind::Resume => "resume",
            StepKind::Snapshot => "snapshot to standby",
            StepKind::Restore => "restore from standby",
            StepKind::PowerOff => "power off",
            StepKind::PressAgain => "press the power button again",
            StepKind::Kill => "kill the VMM after the stop grace",
            StepKind::StopVmm => "stop VMM",
            StepKind::DiscardSnapshot => "discard snapshot",
            StepKind::DropStaleSnapshot => "drop stale snapshot",
            StepKind::ForceKill => "kill unresponsive VMM",
            StepKind::RecordExit => "record how the guest ended",
            StepKind::ForgetVmm => "forget the VMM that exited with its guest",
            StepKind::ForgetExit => "forget the last exit",
            StepKind::Remove => "remove instance data",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Blocked(why) => write!(f, "blocked: {why}"),
            other => f.write_str(other.kind().as_str()),
        }
    }
}

/// What carrying out a step did, as far as the state machine is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The step took its planned hop (or, for bookkeeping, did its job).
    Done,
    /// The power button was pressed; the guest has until `deadline` to
    /// power off. Still where it was.
    PowerButtonPressed { deadline: Instant },
    /// The VM was killed (a `Created` VM, or one past its stop grace): it
    /// went down and its VMM is gone.
    Killed,
    /// The snapshot could not be restored (another hypervisor, another
    /// version of it, a file it needs is gone) and was discarded: what the
    /// guest had not written is lost, and the record says why.
    SnapshotUnusable { why: String },
}

impl Outcome {
    /// The states `step`, taken from `from`, went through to end here.
    pub fn path(&self, step: StepKind, from: VmState) -> Vec<VmState> {
        use VmState::*;
        match self {
            Outcome::Done => match step {
                // A VMM that exits with its guest is first shut down.
                StepKind::ForgetVmm | StepKind::RecordExit | StepKind::ForceKill => vec![],
                other => other.hop().into_iter().collect(),
            },
            Outcome::PowerButtonPressed { .. } => vec![],
            Outcome::Killed => match from {
                Shutdown => vec![Stopped],
                // A VMM that did not answer has no hops; the next look
                // finds what is left.
                Unknown => vec![],
                Stopped | Created | Running | Paused | Standby => vec![Shutdown, Stopped],
            },
            Outcome::SnapshotUnusable { .. } => vec![Stopped],
        }
    }

    /// Checks every hop of the path against the table; returns where the
    /// instance is now.
    pub fn check(&self, step: StepKind, from: VmState) -> Result<VmState, StateError> {
        let mut at = from;
        for to in self.path(step, from) {
            at = at.hop(to)?.to;
        }
        Ok(at)
    }
}

