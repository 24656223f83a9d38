//! Workers: one task per instance name, never two reconciles of one
//! instance at once. A worker loops observe → plan → execute until the plan
//! says converged, blocked or wait, then sleeps until nudged or requeued.

use super::plan::{plan, Desired, Step};
use crate::declaration::{self, DeclarationError};
use crate::instances::{error_chain, Instances};
use crate::state::VmState;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

/// A guard against a planner/executor disagreement looping forever.
const MAX_STEPS_PER_PASS: usize = 32;

/// How long a declaration must stay gone before its instance is stopped
/// and deleted. Editors save by renaming the file away and writing a new
/// one (vim's backup), and `git checkout` removes and re-creates files: a
/// gap of a few milliseconds must not restart, let alone delete, a guest.
const ABSENT_GRACE: Duration = Duration::from_secs(1);

/// A guest that stays up this long is no longer crash-looping.
const STABLE_AFTER: Duration = Duration::from_secs(300);

struct Ctx {
    instances: Arc<Instances>,
    instances_dir: PathBuf,
}

/// Owns the workers. Not `Clone`: the daemon's main loop holds it.
pub struct Reconciler {
    ctx: Arc<Ctx>,
    workers: HashMap<String, mpsc::Sender<()>>,
    tasks: JoinSet<()>,
    stop: watch::Sender<bool>,
}

/// Something a test or the daemon can await: the reconciler's tasks.
pub struct ReconcilerHandle {
    tasks: JoinSet<()>,
}

impl Reconciler {
    pub fn new(instances: Arc<Instances>, instances_dir: PathBuf) -> Reconciler {
        let (stop, _) = watch::channel(false);
        Reconciler {
            ctx: Arc::new(Ctx { instances, instances_dir }),
            workers: HashMap::new(),
            tasks: JoinSet::new(),
            stop,
        }
    }

    /// Asks the instance's worker to look again, starting it if needed.
    pub fn nudge(&mut self, name: &str) {
        if let Some(tx) = self.workers.get(name) {
            match tx.try_send(()) {
                // Full: a pass is already pending, which will see this change.
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => return,
                Err(mpsc::error::TrySendError::Closed(())) => {}
            }
        }
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(());
        self.workers.insert(name.to_string(), tx);
        let ctx = self.ctx.clone();
        let stop = self.stop.subscribe();
        let name = name.to_string();
        self.tasks.spawn(async move { run_worker(name, ctx, rx, stop).await });
    }

    /// Every name worth a look: declared files (valid or not) and guests
    /// in the store. Workers for names that are neither are let go.
    pub fn nudge_all(&mut self) {
        let mut names: Vec<String> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.ctx.instances_dir) {
            for entry in entries.flatten() {
                if let declaration::DeclFile::Instance(name) = declaration::instance_name(&entry.path()) {
                    names.push(name);
                }
            }
        }
        match self.ctx.instances.store().list() {
            Ok(listing) => names.extend(listing.guests.into_iter().map(|m| m.name)),
            Err(e) => tracing::error!(error = %error_chain(&e), "cannot list guests"),
        }
        names.sort();
        names.dedup();
        self.workers.retain(|n, _| names.binary_search(n).is_ok());
        for name in &names {
            self.nudge(name);
        }
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Stops every worker after its current step (each step is safe to cut
    /// short, but finishing it is kinder), waiting at most `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        self.workers.clear();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(timeout, drain).await.is_err() {
            tracing::warn!("workers did not finish their steps in time; abandoning them");
            self.tasks.abort_all();
        }
    }

    /// Detaches the tasks, for a test that wants to await them itself.
    pub fn into_handle(self) -> ReconcilerHandle {
        ReconcilerHandle { tasks: self.tasks }
    }
}

impl ReconcilerHandle {
    pub fn abort(mut self) {
        self.tasks.abort_all();
    }
}

/// What a worker remembers between passes; lost on restart, harmlessly.
#[derive(Default)]
struct Memory {
    failures: u32,
    not_before: Option<Instant>,
    /// The state seen last, and whether we acted since.
    last_seen: Option<VmState>,
    acted: bool,
    /// The last step was a `PowerOff` that succeeded: the shut-down guest
    /// the next look finds is the daemon's doing, not an ending.
    powered_off: bool,
    crashes: u32,
    running_since: Option<Instant>,
    /// The declaration `not_before` was set under. A different one (fixed,
    /// edited, or deleted) is not made to wait for the old one's backoff.
    backoff_for: Option<Desired>,
    /// When the declaration was first seen gone, in this run of absences.
    absent_since: Option<Instant>,
}

impl Memory {
    /// Starts a backoff of `wait` for what `desired` asked.
    fn back_off(&mut self, desired: &Desired, wait: Duration) -> Instant {
        let until = Instant::now() + wait;
        self.not_before = Some(until);
        self.backoff_for = Some(desired.clone());
        until
    }

    /// Forgets failures and crashes when the declaration changed since the
    /// backoff began: the user acted, so act on it now.
    fn forget_backoff_unless(&mut self, desired: &Desired) -> bool {
        if matches!(desired, Desired::Invalid) || self.not_before.is_none() {
            return false;
        }
        if self.backoff_for.as_ref() == Some(desired) {
            return false;
        }
        self.not_before = None;
        self.backoff_for = None;
        self.failures = 0;
        self.crashes = 0;
        true
    }
}

async fn run_worker(name: String, ctx: Arc<Ctx>, mut rx: mpsc::Receiver<()>, mut stop: watch::Receiver<bool>) {
    let mut mem = Memory::default();
    let settings = ctx.instances.settings().reconcile.clone();
    let mut last_nudged_pass: Option<Instant> = None;
    // A worker is started with a nudge already queued.
    if rx.recv().await.is_none() {
        return;
    }
    loop {
        if *stop.borrow() {
            return;
        }
        // Debounce: passes caused by nudges are at least `debounce` apart.
        if let Some(t) = last_nudged_pass {
            let ready = t + settings.debounce;
            if Instant::now() < ready {
                tokio::select! {
                    _ = tokio::time::sleep_until(ready) => {}
                    _ = stop.changed() => return,
                }
            }
        }
        while rx.try_recv().is_ok() {}
        last_nudged_pass = Some(Instant::now());
        let requeue = reconcile_pass(&name, &ctx, &mut mem, &stop)
            .instrument(tracing::info_span!("reconcile", instance = %name))
            .await;
        let Some(requeue) = requeue else { return };
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            msg = rx.recv() => match msg {
                Some(()) => {}
                // Let go by the reconciler: finish quietly.
                None => return,
            },
            _ = tokio::time::sleep_until(requeue) => last_nudged_pass = None,
        }
    }
}

/// What the declaration wants, read fresh from disk: the desired state,
/// the spec when it is valid, and why it is not applied when it is not.
/// Shared with the CLI, so `status` and `plan` read declarations exactly as
/// the daemon does.
pub(crate) fn read_desired(
    instances: &Instances,
    instances_dir: &Path,
    name: &str,
) -> (Desired, Option<crate::declaration::spec::InstanceSpec>, Option<String>) {
    let path = instances_dir.join(format!("{name}.toml"));
    let limits = &instances.settings().limits;
    match declaration::load_instance(&path, limits) {
        Ok(spec) => {
            let kind = instances.resolve_kind(&spec);
            let restart_fields = spec.restart_fields(kind);
            (Desired::Present { state: spec.state, restart_fields, restart: spec.restart }, Some(spec), None)
        }
        Err(DeclarationError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(&path).is_err() =>
        {
            if instances_dir.is_dir() {
                (Desired::Absent, None, None)
            } else {
                // A vanished directory is more likely a rebuild in progress or
                // a mistake than an order to delete every instance.
                (Desired::Invalid, None, Some(format!("{} is missing; instances are left as they are", instances_dir.display())))
            }
        }
        Err(e) => {
            let text = match &e {
                DeclarationError::Invalid { diagnostics, .. } => {
                    diagnostics.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("; ")
                }
                other => error_chain(other),
            };
            (Desired::Invalid, None, Some(text))
        }
    }
}

fn backoff(settings: &crate::settings::ReconcileSettings, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    settings.backoff_initial.saturating_mul(1u32 << exp).min(settings.backoff_max)
}

/// One pass: steps until there is nothing to do now. Returns when to look
/// again, or `None` when the worker should end (stopping).
async fn reconcile_pass(name: &str, ctx: &Ctx, mem: &mut Memory, stop: &watch::Receiver<bool>) -> Option<Instant> {
    let settings = &ctx.instances.settings().reconcile;
    for _ in 0..MAX_STEPS_PER_PASS {
        if *stop.borrow() {
            return None;
        }
        let (desired, spec, invalid) = read_desired(&ctx.instances, &ctx.instances_dir, name);
        if mem.forget_backoff_unless(&desired) {
            tracing::info!(instance = name, "the declaration changed; not waiting out the backoff");
        }
        let powered_off = std::mem::take(&mut mem.powered_off);
        // Boxed: a worker sleeps far longer than it steps, and its task
        // would otherwise hold room for the largest step's state for good.
        let obs = match Box::pin(ctx.instances.observe_after(name, powered_off)).await {
            Ok(o) => o,
            Err(e) => {
                mem.failures += 1;
                let wait = backoff(settings, mem.failures);
                tracing::error!(instance = name, error = %error_chain(&e), "cannot observe the instance");
                return Some(Instant::now() + wait);
            }
        };
        if let Err(e) = ctx.instances.adopt(&obs) {
            tracing::warn!(instance = name, error = %error_chain(&e), "cannot record the adopted VMM");
        }
        notice_surprises(name, ctx, mem, &desired, &obs);
        let observed = obs.observed(mem.not_before);
        let now = Instant::now();
        let step = plan(&desired, &observed, now);
        if desired != Desired::Absent {
            mem.absent_since = None;
        } else if step.acts() {
            // Act on a removal only once the file has stayed gone a while.
            let ready = *mem.absent_since.get_or_insert(now) + ABSENT_GRACE;
            if now < ready {
                return Some(ready);
            }
        }
        match &step {
            Step::Converged => {
                mem.failures = 0;
                mem.not_before = None;
                let _ = ctx.instances.record_error(name, None);
                let next = if obs.state.requires_vmm() { settings.health_interval } else { settings.resync_interval };
                return Some(now + next);
            }
            Step::Blocked(why) => {
                let message = invalid.unwrap_or_else(|| why.clone());
                // Once per new reason, not on every resync.
                if obs.meta.as_ref().and_then(|m| m.last_error.as_deref()) != Some(message.as_str()) {
                    tracing::warn!(instance = name, "{message}");
                }
                let _ = ctx.instances.record_error(name, Some(message));
                let next = if obs.state.requires_vmm() { settings.health_interval } else { settings.resync_interval };
                return Some(now + next);
            }
            Step::WaitUntil(t) => return Some(*t),
            _ => {}
        }
        tracing::info!(instance = name, from = %obs.state, step = %step, "reconcile step");
        mem.acted = true;
        match Box::pin(ctx.instances.execute(name, &step, spec.as_ref(), &obs)).await {
            Ok(()) => {
                mem.failures = 0;
                mem.not_before = None;
                mem.powered_off = step == Step::PowerOff;
            }
            Err(e) => {
                mem.failures += 1;
                let wait = backoff(settings, mem.failures);
                mem.back_off(&desired, wait);
                let text = format!("{step} failed: {}", error_chain(&e));
                tracing::warn!(instance = name, retry_in = ?wait, "{text}");
                let _ = ctx.instances.record_error(name, Some(text));
                return mem.not_before;
            }
        }
    }
    tracing::error!(instance = name, "no convergence after {MAX_STEPS_PER_PASS} steps; trying again later");
    Some(Instant::now() + settings.resync_interval)
}

/// Notices a VMM that died or a guest that powered off without being asked,
/// and backs off restarts of a guest that keeps doing so.
fn notice_surprises(name: &str, ctx: &Ctx, mem: &mut Memory, desired: &Desired, obs: &crate::instances::Observation) {
    let now_state = obs.state;
    let settings = &ctx.instances.settings().reconcile;
    let was = mem.last_seen.replace(now_state);
    let acted = std::mem::replace(&mut mem.acted, false);
    if now_state == VmState::Running {
        let since = *mem.running_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= STABLE_AFTER {
            mem.crashes = 0;
        }
    } else {
        mem.running_since = None;
    }
    let Some(was) = was else { return };
    if acted || !matches!(was, VmState::Running | VmState::Paused) {
        return;
    }
    let what = match now_state {
        VmState::Shutdown => "the guest powered off",
        VmState::Stopped | VmState::Standby => "the VMM exited",
        VmState::Unknown => "the VMM stopped answering",
        VmState::Created | VmState::Running | VmState::Paused => return,
    };
    tracing::warn!(instance = name, was = %was, "{what}");
    if let Some(meta) = &obs.meta {
        if let Ok(log) = crate::logs::InstanceLog::open(&ctx.instances.store().guest_paths(meta.id).hypeman_log) {
            let _ = log.append(&format!("{what} (was {was})"));
        }
    }
    if matches!(desired, Desired::Present { state: crate::declaration::spec::DesiredState::Running, .. }) {
        mem.crashes += 1;
        if mem.crashes > 1 {
            let wait = backoff(settings, mem.crashes - 1);
            mem.back_off(desired, wait);
            // Shown by `status` until the next boot succeeds.
            let _ = ctx.instances.record_error(name, Some(crash_loop_message(what, mem.crashes, wait)));
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

/// The instances directory of a config dir.
pub fn instances_dir(config_dir: &Path) -> PathBuf {
    config_dir.join("instances")
}
