//! The owner of one instance: a task that alone observes it, plans for it
//! and acts on it, so two reconciles of one instance can never run at once.
//!
//! It waits in one `select!` over everything that can move it: the stop
//! signal, requests (each answered on its own oneshot), nudges (a file
//! changed; a stored permit, so a burst is one), and one timer that stands for whatever comes next (the next
//! step, a backoff, the debounce after a nudge, the grace of a removed
//! declaration or of a pressed power button, the health tick). Each wake
//! reads the declaration, observes, plans and takes at most one step, then
//! sets the timer: a step that acted is followed at once, but requests and
//! the stop signal are heard between any two steps.

use super::plan::{plan, Hold, Outcome, Recall, Step, StepKind, PRESS_AGAIN_EVERY};
use super::policy::{backoff, error_policy, Next};
use crate::declaration::spec::DesiredState;
use crate::exit::GuestEnd;
use crate::declaration::{self, Desired};
use crate::instances::{error_chain, Instances, Observation};
use crate::state::VmState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, Level};

/// A guard against a planner/executor disagreement looping forever: this
/// many acting steps in a row without reaching a resting plan is a bug.
const MAX_STEPS_IN_A_ROW: usize = 32;

/// How long a declaration must stay gone before its instance is stopped
/// and deleted. Editors save by renaming the file away and writing a new
/// one (vim's backup), and `git checkout` removes and re-creates files: a
/// gap of a few milliseconds must not restart, let alone delete, a guest.
pub const ABSENT_GRACE: Duration = Duration::from_secs(1);

/// A guest that stays up this long is no longer crash-looping.
pub const STABLE_AFTER: Duration = Duration::from_secs(300);

/// What an owner needs from the daemon; shared by every owner.
pub struct Ctx {
    pub instances: Arc<Instances>,
    pub instances_dir: PathBuf,
}

impl Ctx {
    pub fn new(instances: Arc<Instances>, instances_dir: PathBuf) -> Ctx {
        Ctx { instances, instances_dir }
    }
}

/// A question for an instance's owner, answered on its oneshot.
#[derive(Debug)]
pub enum Request {
    /// What the owner knows of its instance right now.
    View(oneshot::Sender<OwnerView>),
    /// Its last look, as `status` and `plan` show it (the daemon's API
    /// answers from these: no second look at the VMM).
    Look(oneshot::Sender<Option<Arc<Look>>>),
    /// `hypeman restart`: boot the guest afresh, as declared. Answered
    /// with what will happen, or why nothing will (the declaration is the
    /// source of truth: a guest declared stopped or standby is not booted).
    Restart(oneshot::Sender<Result<String, String>>),
}

/// What an owner's last look found and what it made of it: the
/// declaration, the observation, and the next step as `plan` words it,
/// with the backoff that holds it when there is one.
#[derive(Debug, Clone)]
pub struct Look {
    pub desired: Desired,
    pub observation: Observation,
    /// Why the state could not be observed (fully, or at all).
    pub observe_error: Option<String>,
    pub action: String,
    pub at: std::time::SystemTime,
    /// The step being taken as the look was published, when one was.
    pub busy: Option<String>,
}

/// The owner's own view of its instance: what it saw last and did last.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerView {
    pub name: String,
    /// `running`, `standby`, `stopped`, `absent`, `invalid`; `None` before
    /// the first look.
    pub desired: Option<&'static str>,
    /// The state of the last look.
    pub state: Option<VmState>,
    /// The last step planned.
    pub last_step: Option<StepKind>,
    /// The last step's error and what follows it, until a step succeeds.
    pub error: Option<String>,
    /// Acting steps taken since the owner started.
    pub steps: u64,
}

/// What an owner remembers between wakes; lost on restart, harmlessly.
struct Memory {
    failures: u32,
    hold: Option<Hold>,
    /// The declaration the hold began under. A different one (fixed,
    /// edited, or deleted) is not made to wait for the old one's backoff.
    hold_for: Option<Desired>,
    /// The state the last look found, or the state the last step left the
    /// instance in; `None` after a failed step, whose effect is unknown.
    last_seen: Option<VmState>,
    crashes: u32,
    running_since: Option<Instant>,
    /// When the declaration was first seen gone, in this run of absences.
    absent_since: Option<Instant>,
    /// The power button was pressed; the guest has until then.
    stopping: Option<Instant>,
    /// When to press it again, for a guest that has not reacted yet.
    press_again: Option<Instant>,
    /// Since the VMM stopped answering, plus the stop grace.
    unanswered_until: Option<Instant>,
    steps_in_a_row: usize,
    view: OwnerView,
    look: Option<Arc<Look>>,
    published: Option<watch::Sender<Option<Arc<Look>>>>,
    /// A restart was asked for and the guest has not been booted since.
    restart: bool,
}

impl Memory {
    fn new(name: &str) -> Memory {
        Memory {
            failures: 0,
            hold: None,
            hold_for: None,
            last_seen: None,
            crashes: 0,
            running_since: None,
            absent_since: None,
            stopping: None,
            press_again: None,
            unanswered_until: None,
            steps_in_a_row: 0,
            view: OwnerView { name: name.to_string(), desired: None, state: None, last_step: None, error: None, steps: 0 },
            look: None,
            published: None,
            restart: false,
        }
    }

    /// Holds back as `hold` says, for what `desired` asked.
    fn hold(&mut self, desired: &Desired, hold: Hold) {
        self.hold = Some(hold);
        self.hold_for = Some(desired.clone());
    }

    /// Holds back for `wait` from `now`, for what `desired` asked.
    fn back_off(&mut self, desired: &Desired, now: Instant, wait: Duration) -> Instant {
        let until = now + wait;
        self.hold(desired, Hold::Until(until));
        until
    }

    /// A look that converged or a step that succeeded: no failure holds
    /// anything back any more.
    fn succeeded(&mut self) {
        self.failures = 0;
        self.hold = None;
        self.view.error = None;
    }

    /// Forgets failures and crashes when the declaration changed since the
    /// hold began: the user acted, so act on it now.
    fn forget_hold_unless(&mut self, desired: &Desired) -> bool {
        if matches!(desired, Desired::Invalid(_)) || self.hold.is_none() {
            return false;
        }
        if self.hold_for.as_ref() == Some(desired) {
            return false;
        }
        self.hold = None;
        self.hold_for = None;
        self.failures = 0;
        self.crashes = 0;
        true
    }

    /// A removal is acted on only once the declaration stayed gone for
    /// [`ABSENT_GRACE`]: until when to wait, or `None` to act now.
    fn absent_wait(&mut self, desired: &Desired, acts: bool, now: Instant) -> Option<Instant> {
        if *desired != Desired::Absent {
            self.absent_since = None;
            return None;
        }
        if !acts {
            return None;
        }
        let ready = *self.absent_since.get_or_insert(now) + ABSENT_GRACE;
        (now < ready).then_some(ready)
    }

    /// Tracks how long the guest has been running: one that stayed up
    /// [`STABLE_AFTER`] is no longer crash-looping.
    fn note_running(&mut self, state: VmState, now: Instant) {
        if state == VmState::Running {
            let since = *self.running_since.get_or_insert(now);
            if now.duration_since(since) >= STABLE_AFTER {
                self.crashes = 0;
            }
        } else {
            self.running_since = None;
        }
    }
}

/// When the next look is due after a nudge at `now`: at once, unless the
/// last look caused by a nudge was less than `debounce` ago. A burst of
/// nudges becomes one more look.
fn nudged_due(due: Instant, last_nudged_wake: Option<Instant>, now: Instant, debounce: Duration) -> Instant {
    let ready = last_nudged_wake.map_or(now, |t| t + debounce).max(now);
    due.min(ready)
}

/// The channels an owner listens on.
pub struct Inbox {
    /// A nudge is a stored permit: any number of them before the owner
    /// looks are one look.
    pub nudge: Arc<tokio::sync::Notify>,
    /// Closed when the reconciler lets the owner go.
    pub requests: mpsc::Receiver<Request>,
    pub stop: watch::Receiver<bool>,
    /// Where the owner puts each look as it is taken, and the step it is
    /// in: read when the owner is too deep in a step to answer at once.
    pub published: watch::Sender<Option<Arc<Look>>>,
}

/// Runs the owner of `name` until it is stopped or let go (its request
/// channel closed). `previous` is the task of an owner of the same name
/// that was let go before this one started: it may still be finishing a
/// step, so it is awaited first, and two owners of one name never overlap.
pub async fn run(name: String, ctx: Arc<Ctx>, mut inbox: Inbox, previous: Option<tokio::task::JoinHandle<()>>) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let settings = ctx.instances.settings().reconcile.clone();
    let mut mem = Memory::new(&name);
    mem.published = Some(inbox.published.clone());
    // Started because of a nudge: the first look is due now.
    let mut due = Instant::now();
    let mut nudged = true;
    let mut last_nudged_wake: Option<Instant> = None;
    loop {
        if *inbox.stop.borrow() {
            return;
        }
        tokio::select! {
            biased;
            _ = inbox.stop.changed() => return,
            request = inbox.requests.recv() => match request {
                Some(request) => {
                    if answer(request, &mut mem) {
                        due = Instant::now();
                    }
                }
                // Let go by the reconciler: finish quietly.
                None => return,
            },
            _ = inbox.nudge.notified() => {
                due = nudged_due(due, last_nudged_wake, Instant::now(), settings.debounce);
                nudged = true;
            }
            // A look due now skips the timer, whose 1 ms granularity would
            // otherwise be paid between every two steps.
            _ = wait_until(due) => {
                // One of `instances::TURNS`: looks and steps of many
                // instances at once wait their turn here.
                let Some(_turn) = ctx.instances.turn().await else { return };
                if *inbox.stop.borrow() {
                    return;
                }
                last_nudged_wake = if nudged { Some(Instant::now()) } else { None };
                nudged = false;
                // Boxed: an owner sleeps far longer than it steps, and its
                // task would otherwise hold room for the largest step's
                // state for good.
                due = Box::pin(tick(&name, &ctx, &mut mem))
                    .instrument(tracing::info_span!("reconcile", instance = %name))
                    .await;
            }
        }
    }
}

/// Returns at `due`, at once when it has passed.
async fn wait_until(due: Instant) {
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

/// Answers `request`; whether the owner should look again at once.
fn answer(request: Request, mem: &mut Memory) -> bool {
    match request {
        Request::Restart(reply) => {
            let decided = restart_decision(mem.look.as_deref(), &mem.view.name);
            let act = decided.is_ok();
            if act {
                mem.restart = true;
                // The user asked: no backoff or crash count holds it back.
                mem.hold = None;
                mem.hold_for = None;
                mem.failures = 0;
                mem.crashes = 0;
            }
            let _ = reply.send(decided);
            return act;
        }
        Request::View(reply) => {
            let _ = reply.send(mem.view.clone());
        }
        Request::Look(reply) => {
            let _ = reply.send(mem.look.clone());
        }
    }
    false
}

/// What a restart of `name` does, from the owner's last look, or why it
/// does nothing.
fn restart_decision(look: Option<&Look>, name: &str) -> Result<String, String> {
    let Some(look) = look else {
        return Err(format!("{name} has not been looked at yet; try again in a moment"));
    };
    match &look.desired {
        Desired::Present(spec) if spec.state == DesiredState::Running => Ok(match look.observation.state {
            VmState::Running | VmState::Paused | VmState::Created => {
                format!("{name} will be shut down (gracefully, then as a stop would) and booted again; its declaration is unchanged")
            }
            VmState::Standby => format!("{name} will be restored from standby, shut down and booted afresh; its declaration is unchanged"),
            _ => format!("{name} will be booted; its declaration is unchanged"),
        }),
        Desired::Present(spec) => Err(format!(
            "{name} is declared {}: a restart boots only what is declared running (the declaration is the source of truth; set state = \"running\" to boot it)",
            spec.state
        )),
        Desired::Absent => Err(format!("{name} has no declaration (it is being removed)")),
        Desired::Invalid(why) => Err(format!("{name}'s declaration is invalid, so nothing is done with it: {why}")),
    }
}

/// One wake: read the declaration, look, plan, and take at most one step.
/// Returns when to wake next (earlier if nudged or asked).
async fn tick(name: &str, ctx: &Ctx, mem: &mut Memory) -> Instant {
    let instances = &ctx.instances;
    let settings = &instances.settings().reconcile;
    // Boxed, like the step below: an owner holds room for what it awaits
    // only while it looks.
    let desired = Box::pin(read_desired(ctx, name)).await;
    if mem.forget_hold_unless(&desired) {
        tracing::info!(instance = name, "the declaration changed; not waiting out the backoff");
    }
    let obs = match Box::pin(instances.observe(name)).await {
        Ok(o) => o,
        Err(e) => {
            mem.failures += 1;
            tracing::error!(instance = name, error = %error_chain(&e), "cannot observe the instance");
            let wait = backoff(settings, mem.failures);
            // The record as last seen; the state is what nobody knows now.
            let meta = mem.look.as_ref().and_then(|l| l.observation.meta.clone());
            mem.look = Some(Arc::new(Look {
                desired,
                observation: Observation { meta, state: VmState::Unknown, ..Observation::nothing() },
                observe_error: Some(error_chain(&e)),
                action: format!("cannot observe (looked at again in {})", seconds(wait)),
                at: std::time::SystemTime::now(),
                busy: None,
            }));
            publish(mem, None);
            return Instant::now() + wait;
        }
    };
    if matches!(obs.state, VmState::Stopped | VmState::Standby) && obs.meta.as_ref().is_some_and(|m| m.vmm.is_none()) {
        // Nothing is on its way down any more.
        mem.stopping = None;
        mem.press_again = None;
    }
    mem.unanswered_until = match obs.state {
        VmState::Unknown => Some(mem.unanswered_until.unwrap_or_else(|| Instant::now() + settings.stop_grace)),
        _ => None,
    };
    notice_surprises(name, instances, mem, &desired, &obs).await;
    let now = Instant::now();
    // A restart asked under a declaration that no longer says running is
    // dropped: the declaration decides.
    if !matches!(&desired, Desired::Present(spec) if spec.state == DesiredState::Running) {
        mem.restart = false;
    }
    let recall = Recall {
        restart: mem.restart,
        hold: mem.hold,
        stopping: mem.stopping,
        press_again: mem.press_again,
        unanswered_until: mem.unanswered_until,
    };
    let step = plan(&desired, &obs.observed(recall), now);
    mem.view.desired = Some(desired.label());
    mem.view.state = Some(obs.state);
    mem.view.last_step = Some(step.kind());
    let held = match mem.hold {
        Some(Hold::Until(t)) if t > now => format!(" (held: next attempt in {}, after: {})", seconds(t - now), mem.view.error.as_deref().unwrap_or("a failure")),
        _ => String::new(),
    };
    mem.look = Some(Arc::new(Look {
        desired: desired.clone(),
        observation: obs.clone(),
        observe_error: obs.blind.clone(),
        action: format!("{step}{held}"),
        at: std::time::SystemTime::now(),
        busy: None,
    }));
    publish(mem, step.acts().then(|| step.to_string()));
    if let Some(ready) = mem.absent_wait(&desired, step.acts(), now) {
        return ready;
    }
    let rest = if obs.state.requires_vmm() { settings.health_interval } else { settings.resync_interval };
    if !step.acts() {
        mem.steps_in_a_row = 0;
    }
    match &step {
        Step::Converged => {
            mem.succeeded();
            if obs.meta.as_ref().is_some_and(|m| m.last_error.is_some()) {
                let _ = instances.record_error(name, None).await;
            }
            return now + rest;
        }
        Step::Blocked(why) => {
            // What the look saw comes first: a VMM that does not answer
            // because its backend is not installed says so.
            let message = match (desired.invalid(), &obs.unreachable) {
                (Some(invalid), _) => invalid.to_string(),
                (None, Some(seen)) if obs.state == VmState::Unknown => format!("{seen}: {why}"),
                (None, _) => why.clone(),
            };
            // Once per new reason, not on every resync; in the guest's
            // `hypeman.log` too when it has one.
            if obs.meta.as_ref().and_then(|m| m.last_error.as_deref()) != Some(message.as_str()) {
                match &obs.meta {
                    Some(meta) => instances.event(meta, tracing::Level::WARN, &message),
                    None => tracing::warn!(instance = name, "{message}"),
                }
                let _ = instances.record_error(name, Some(message)).await;
            }
            return now + rest;
        }
        Step::WaitUntil(t) | Step::AwaitPowerOff(t) => return *t,
        // Looked at again on the usual timer, for a VMM that dies meanwhile;
        // nothing is tried until the declaration changes.
        Step::AwaitChange => return now + rest,
        _ => {}
    }
    mem.steps_in_a_row += 1;
    if mem.steps_in_a_row > MAX_STEPS_IN_A_ROW {
        mem.steps_in_a_row = 0;
        tracing::error!(instance = name, "no convergence after {MAX_STEPS_IN_A_ROW} steps; trying again later");
        return now + settings.resync_interval;
    }
    mem.view.steps += 1;
    match Box::pin(instances.execute(name, &step, &obs)).await {
        Ok(outcome) => {
            mem.succeeded();
            if step.kind() == StepKind::Create {
                // Booted afresh: a restart asked for is done.
                mem.restart = false;
            }
            match outcome.check(step.kind(), obs.state) {
                Ok(at) => mem.last_seen = Some(at),
                Err(e) => {
                    tracing::error!(instance = name, step = %step, outcome = ?outcome, error = %error_chain(&e), "the step ended where the state machine does not go");
                    mem.last_seen = None;
                }
            }
            // Forgotten only by a look that finds no VMM on record (above):
            // a step on the way (a stale socket cleared) must not make the
            // stop the owner asked for look like the guest's own ending.
            if let Outcome::PowerButtonPressed { deadline } = outcome {
                // The grace runs from the first press.
                mem.stopping = mem.stopping.or(Some(deadline));
                mem.press_again = Some(Instant::now() + PRESS_AGAIN_EVERY);
            }
            // The next step is due at once.
            Instant::now()
        }
        Err(e) => {
            mem.failures += 1;
            mem.last_seen = None;
            // A failure ends the run of steps; the backoff paces what follows.
            mem.steps_in_a_row = 0;
            let next = error_policy(e.kind(), mem.failures, settings);
            let until = match next {
                Next::RetryAfter(wait) | Next::RecheckSpace(wait) => mem.back_off(&desired, Instant::now(), wait),
                Next::AwaitChange => {
                    mem.hold(&desired, Hold::ForChange);
                    Instant::now() + rest
                }
            };
            let text = format!("{step} failed: {}; {}", error_chain(&e), next.describe());
            // A disk that stays full is said once, not at every recheck.
            if !(matches!(next, Next::RecheckSpace(_)) && mem.failures > 1) {
                warn(instances, name, &obs, &text);
            }
            mem.view.error = Some(text.clone());
            let _ = instances.record_error(name, Some(text)).await;
            // What the failure left (a guest resumed, its error recorded) is
            // what `status` shows until the next look, which the backoff may
            // put far off: look once now, act on nothing.
            if let Ok(after) = Box::pin(instances.observe(name)).await {
                mem.look = Some(Arc::new(Look {
                    desired: desired.clone(),
                    observation: after.clone(),
                    observe_error: after.blind.clone(),
                    action: format!("{step} failed; {}", next.describe()),
                    at: std::time::SystemTime::now(),
                    busy: None,
                }));
                publish(mem, None);
            }
            until
        }
    }
}

/// Puts the last look where readers find it without asking, marked with
/// the step about to be taken (`busy`), if any.
fn publish(mem: &Memory, busy: Option<String>) {
    if let (Some(tx), Some(look)) = (&mem.published, &mem.look) {
        let look = match busy {
            Some(step) => Arc::new(Look { busy: Some(step), ..(**look).clone() }),
            None => look.clone(),
        };
        tx.send_replace(Some(look));
    }
}

/// A wait as a person reads it: `27s`, `1.5s`.
fn seconds(d: Duration) -> String {
    match d.as_secs() {
        0..=9 => format!("{:.1}s", d.as_secs_f64()),
        s => format!("{s}s"),
    }
}

/// A warning about the instance: an event in its `hypeman.log` too when
/// it has a guest record.
fn warn(instances: &Instances, name: &str, obs: &Observation, line: &str) {
    match &obs.meta {
        Some(meta) => instances.event(meta, Level::WARN, line),
        None => tracing::warn!(instance = name, "{line}"),
    }
}

/// What the declaration of `name` asks for, read on the blocking pool.
async fn read_desired(ctx: &Ctx, name: &str) -> Desired {
    let dir = ctx.instances_dir.clone();
    let name_owned = name.to_string();
    let limits = ctx.instances.settings().limits.clone();
    match ctx.instances.run_blocking(move || declaration::desired::read(&dir, &name_owned, &limits)).await {
        Ok(desired) => desired,
        Err(e) => Desired::Invalid(format!("reading the declaration failed: {}", error_chain(&e)).into()),
    }
}

/// Notices a VMM that died or a guest that powered off without being asked,
/// and backs off restarts of a guest that keeps doing so.
async fn notice_surprises(name: &str, instances: &Instances, mem: &mut Memory, desired: &Desired, obs: &Observation) {
    let now_state = obs.state;
    let settings = &instances.settings().reconcile;
    let was = mem.last_seen.replace(now_state);
    mem.note_running(now_state, Instant::now());
    let Some(was) = was else { return };
    // Down because the owner pressed the power button: no surprise.
    if mem.stopping.is_some() || !matches!(was, VmState::Running | VmState::Paused) {
        return;
    }
    let what = match now_state {
        VmState::Shutdown => "the guest powered off",
        VmState::Stopped | VmState::Standby => "the VMM exited",
        VmState::Unknown => "the VMM stopped answering",
        VmState::Created | VmState::Running | VmState::Paused => return,
    };
    // How it ended, when the console tells (a kernel panic, init failing).
    let what = match &obs.ended {
        Some(end @ (GuestEnd::KernelPanic { .. } | GuestEnd::InitFailed { .. })) => format!("{what}: {end}"),
        Some(_) | None => what.to_string(),
    };
    warn(instances, name, obs, &format!("{what} (was {was})"));
    // A crash loop is a guest that keeps ending and is booted again: one
    // whose restart policy leaves it down (`on-failure` after exit 0,
    // `never`) is not looping, and is not told "booting again".
    let boots_again = |spec: &crate::declaration::spec::InstanceSpec| {
        obs.ended.as_ref().is_none_or(|end| super::plan::restarts(spec.restart, end))
    };
    if matches!(desired, Desired::Present(spec) if spec.state == DesiredState::Running && boots_again(spec)) {
        mem.crashes += 1;
        if mem.crashes > 1 {
            let wait = backoff(settings, mem.crashes - 1);
            mem.back_off(desired, Instant::now(), wait);
            // Shown by `status` until the next boot succeeds.
            let _ = instances.record_error(name, Some(crash_loop_message(&what, mem.crashes, wait))).await;
        }
    }
}

/// What `status` shows while a guest that keeps ending waits to boot again.
fn crash_loop_message(what: &str, crashes: u32, wait: Duration) -> String {
    format!(
        "crash loop: {what} ({crashes} times in a row); booting again in {} (backoff)",
        humantime::format_duration(wait)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declaration::spec::InstanceSpec;

    fn running(memory: &str) -> Desired {
        let text = format!("image = \"busybox\"\nmemory = \"{memory}\"\n");
        let spec: InstanceSpec =
            declaration::parse_instance(std::path::Path::new("instances/web.toml"), &text, &Default::default()).unwrap();
        Desired::Present(Arc::new(spec))
    }

    /// What a sleeping owner costs: its task holds the `run` future for
    /// good, and a look in progress only boxes what it awaits.
    #[tokio::test]
    async fn an_owner_and_its_look_stay_small() {
        use crate::hypervisor::Backends;
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::Store::open(tmp.path()).unwrap());
        let settings = Arc::new(crate::settings::Settings::defaults());
        let provisioner = Arc::new(crate::instances::provision::FakeProvisioner);
        let instances = Arc::new(Instances::new(store, Backends::default(), settings, provisioner));
        let ctx = Arc::new(Ctx::new(instances, tmp.path().join("instances")));
        let nudge = Arc::new(tokio::sync::Notify::new());
        let (_r, requests) = mpsc::channel(1);
        let (_s, stop) = watch::channel(false);
        let owner = run("web".into(), ctx.clone(), Inbox { nudge, requests, stop, published: watch::channel(None).0 }, None);
        let mut mem = Memory::new("web");
        let look = tick("web", &ctx, &mut mem);
        let (owner_bytes, look_bytes) = (std::mem::size_of_val(&owner), std::mem::size_of_val(&look));
        eprintln!("owner future {owner_bytes} bytes, look {look_bytes} bytes");
        assert!(owner_bytes <= 1024, "an owner's task holds {owner_bytes} bytes");
        assert!(look_bytes <= 2048, "a look holds {look_bytes} bytes while it waits");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_nudges_is_one_more_look_after_the_debounce() {
        let debounce = Duration::from_millis(100);
        let idle = Instant::now() + Duration::from_secs(30);
        // The first nudge after a quiet spell is looked at at once.
        let now = Instant::now();
        assert_eq!(nudged_due(idle, None, now, debounce), now);
        // A nudge right after a nudged look waits out the debounce...
        let looked = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        let first = nudged_due(idle, Some(looked), Instant::now(), debounce);
        assert_eq!(first, looked + debounce);
        // ...and later ones in the window do not move it.
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(nudged_due(first, Some(looked), Instant::now(), debounce), first);
        // Past the window, at once; never later than a look already due.
        tokio::time::advance(Duration::from_millis(200)).await;
        let now = Instant::now();
        assert_eq!(nudged_due(idle, Some(looked), now, debounce), now);
        assert_eq!(nudged_due(looked, Some(looked), now, debounce), looked);
    }

    #[tokio::test(start_paused = true)]
    async fn a_removal_waits_out_the_absence_grace_and_a_return_resets_it() {
        let mut mem = Memory::new("web");
        let gone = Instant::now();
        assert_eq!(mem.absent_wait(&Desired::Absent, true, gone), Some(gone + ABSENT_GRACE));
        tokio::time::advance(ABSENT_GRACE / 2).await;
        assert_eq!(mem.absent_wait(&Desired::Absent, true, Instant::now()), Some(gone + ABSENT_GRACE), "counted from the first look");
        // Nothing to act on: no wait.
        assert_eq!(mem.absent_wait(&Desired::Absent, false, Instant::now()), None);
        tokio::time::advance(ABSENT_GRACE / 2).await;
        assert_eq!(mem.absent_wait(&Desired::Absent, true, Instant::now()), None, "gone for the whole grace");
        // The file came back (an editor's save): the next absence starts anew.
        assert_eq!(mem.absent_wait(&running("256MiB"), true, Instant::now()), None);
        let again = Instant::now();
        assert_eq!(mem.absent_wait(&Desired::Absent, true, again), Some(again + ABSENT_GRACE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backoff_holds_for_its_declaration_only() {
        let mut mem = Memory::new("web");
        let desired = running("256MiB");
        mem.failures = 3;
        mem.crashes = 2;
        let until = mem.back_off(&desired, Instant::now(), Duration::from_secs(8));
        assert_eq!(mem.hold, Some(Hold::Until(until)));
        assert!(!mem.forget_hold_unless(&desired), "the same declaration waits");
        assert!(!mem.forget_hold_unless(&Desired::Invalid("x".into())), "an invalid one changes nothing");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(mem.forget_hold_unless(&running("512MiB")), "an edit is acted on at once");
        assert_eq!((mem.hold, mem.failures, mem.crashes), (None, 0, 0));
        assert!(!mem.forget_hold_unless(&running("512MiB")), "nothing left to forget");
    }

    #[tokio::test(start_paused = true)]
    async fn crashes_are_forgotten_once_the_guest_stayed_up() {
        let mut mem = Memory::new("web");
        mem.crashes = 3;
        mem.note_running(VmState::Running, Instant::now());
        tokio::time::advance(STABLE_AFTER - Duration::from_secs(1)).await;
        mem.note_running(VmState::Running, Instant::now());
        assert_eq!(mem.crashes, 3, "not yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        mem.note_running(VmState::Running, Instant::now());
        assert_eq!(mem.crashes, 0);
        // Down in between: the clock starts again.
        mem.crashes = 1;
        mem.note_running(VmState::Stopped, Instant::now());
        mem.note_running(VmState::Running, Instant::now());
        tokio::time::advance(STABLE_AFTER / 2).await;
        mem.note_running(VmState::Running, Instant::now());
        assert_eq!(mem.crashes, 1);
    }
}
