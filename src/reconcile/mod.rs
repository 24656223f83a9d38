//! The reconciler: one owner task per instance ([`owner`]), each looking,
//! planning ([`plan::plan`]) and acting until converged; errors mapped to
//! what follows by [`policy::error_policy`].
//!
//! ```text
//!  watch / resync ──nudge(name)──► Reconciler ──► owner(name): select! { stop, request, nudge, timer }
//!                                                   └─ tick: declaration::desired::read → Instances::observe
//!                                                            → plan → Instances::execute → Outcome
//! ```
//!
//! Level-triggered: a nudge carries no event, only a name, and every wake
//! reads the latest declaration and observes the latest state. Bursts of
//! nudges are coalesced (the first acts at once, the rest within the
//! debounce window become one more look). Every instance is looked at again
//! on a timer as a safety net, and a live VMM more often, to notice when it
//! dies. Single-flight comes from ownership: only an instance's owner acts
//! on it, and a new owner of a name waits until the one let go is gone.

pub mod owner;
pub mod plan;
pub mod policy;

pub use owner::{Look, OwnerView, Request};

use crate::declaration::{self, DeclFile};
use crate::instances::{error_chain, Instances};
use owner::{Ctx, Inbox};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How many requests may wait for one owner.
const REQUEST_QUEUE: usize = 16;

/// The live owners' request channels by name, shared with the tasks that
/// ask them (the daemon's API): cheap to clone, updated by the reconciler
/// as owners start and are let go.
/// One owner as the directory lists it: its request channel, and the look
/// it last published.
type Listed = (mpsc::Sender<Request>, watch::Receiver<Option<Arc<Look>>>);

#[derive(Clone, Default)]
pub struct Directory {
    nameless: Arc<std::sync::RwLock<Vec<Nameless>>>,
    owners: Arc<std::sync::RwLock<std::collections::BTreeMap<String, Listed>>>,
}

/// How long an owner may take to answer before its published look is
/// used: it answers between two steps, and a step (a snapshot of a large
/// guest) can take many seconds.
const LOOK_ANSWER: Duration = Duration::from_millis(50);

impl Directory {
    /// Every owner's last look, by name, sorted; `None` for an owner that
    /// has not looked yet. All are asked at once; one deep in a step gives
    /// the look it published before the step (marked `busy`).
    pub async fn looks(&self) -> Vec<(String, Option<Arc<Look>>)> {
        let owners: Vec<_> = self.owners.read().expect("poisoned").iter().map(|(n, o)| (n.clone(), o.clone())).collect();
        let mut pending = Vec::with_capacity(owners.len());
        for (name, (sender, published)) in owners {
            let (reply, answer) = oneshot::channel();
            let asked = sender.try_send(Request::Look(reply)).is_ok();
            pending.push((name, asked.then_some(answer), published));
        }
        let deadline = tokio::time::Instant::now() + LOOK_ANSWER;
        let mut out = Vec::with_capacity(pending.len());
        for (name, answer, published) in pending {
            let answered = match answer {
                Some(a) => tokio::time::timeout_at(deadline, a).await.ok().and_then(Result::ok),
                None => None,
            };
            let look = match answered {
                Some(look) => look,
                None => published.borrow().clone(),
            };
            out.push((name, look));
        }
        out
    }

    /// The last look of the owner of `name` (`None`: no owner, or none yet).
    pub async fn look(&self, name: &str) -> Option<Arc<Look>> {
        let (sender, published) = self.owners.read().expect("poisoned").get(name).cloned()?;
        let (reply, answer) = oneshot::channel();
        if sender.try_send(Request::Look(reply)).is_ok() {
            if let Ok(Ok(look)) = tokio::time::timeout(LOOK_ANSWER, answer).await {
                return look;
            }
        }
        let look = published.borrow().clone();
        look
    }

    /// The records too damaged to name, as of the last listing (every
    /// resync).
    pub fn nameless(&self) -> Vec<Nameless> {
        self.nameless.read().expect("poisoned").clone()
    }

    /// Asks the owner of `name` to boot its guest afresh (see
    /// `owner::Request::Restart`); `None` when no owner runs for it.
    pub async fn restart(&self, name: &str) -> Option<Result<String, String>> {
        let (sender, _) = self.owners.read().expect("poisoned").get(name).cloned()?;
        let (reply, answer) = oneshot::channel();
        sender.send(Request::Restart(reply)).await.ok()?;
        answer.await.ok()
    }

    /// Whether an owner runs for `name`.
    pub fn has(&self, name: &str) -> bool {
        self.owners.read().expect("poisoned").contains_key(name)
    }
}

/// Owns the owners. Not `Clone`: the daemon's main loop holds it.
pub struct Reconciler {
    ctx: Arc<Ctx>,
    owners: HashMap<String, OwnerHandle>,
    /// Every live owner's request channel, by name, for those who ask
    /// from outside the main loop (the daemon's API).
    directory: Directory,
    /// Owners let go (their name was neither declared nor stored) whose
    /// task may still be finishing a step; the next owner of the name waits
    /// for it.
    retired: HashMap<String, JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

struct OwnerHandle {
    nudge: Arc<tokio::sync::Notify>,
    requests: mpsc::Sender<Request>,
    task: JoinHandle<()>,
}

impl Reconciler {
    pub fn new(instances: Arc<Instances>, instances_dir: PathBuf) -> Reconciler {
        let (stop, _) = watch::channel(false);
        Reconciler {
            ctx: Arc::new(Ctx::new(instances, instances_dir)),
            owners: HashMap::new(),
            directory: Directory::default(),
            retired: HashMap::new(),
            stop,
        }
    }

    /// Asks the instance's owner to look again, starting it if needed.
    pub fn nudge(&mut self, name: &str) {
        let previous = match self.owners.get(name) {
            // A pending nudge stays one: the owner's next look sees this change.
            Some(owner) if !owner.requests.is_closed() => {
                owner.nudge.notify_one();
                return;
            }
            // The owner ended (stopped, or it panicked): start anew.
            Some(_) => self.owners.remove(name).map(|o| o.task),
            None => self.retired.remove(name),
        };
        let nudge = Arc::new(tokio::sync::Notify::new());
        let (requests, request_rx) = mpsc::channel(REQUEST_QUEUE);
        let (published, looks) = watch::channel(None);
        let inbox = Inbox { nudge: nudge.clone(), requests: request_rx, stop: self.stop.subscribe(), published };
        let task = tokio::spawn(owner::run(name.to_string(), self.ctx.clone(), inbox, previous));
        self.directory.owners.write().expect("poisoned").insert(name.to_string(), (requests.clone(), looks));
        self.owners.insert(name.to_string(), OwnerHandle { nudge, requests, task });
    }

    /// Every name worth a look: declared files (valid or not) and guests
    /// in the store. Owners of names that are neither are let go.
    pub async fn nudge_all(&mut self) {
        let ctx = self.ctx.clone();
        let (names, nameless) = tokio::task::spawn_blocking(move || known_names(&ctx)).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "listing the instances failed");
            (Vec::new(), Vec::new())
        });
        *self.directory.nameless.write().expect("poisoned") = nameless;
        self.nudge_only(&names);
    }

    /// Lets go of the owners of names not in `names` (sorted) and nudges
    /// every one of `names`.
    fn nudge_only(&mut self, names: &[String]) {
        let gone: Vec<String> = self.owners.keys().filter(|n| names.binary_search(n).is_err()).cloned().collect();
        for name in gone {
            self.directory.owners.write().expect("poisoned").remove(&name);
            if let Some(owner) = self.owners.remove(&name) {
                // Dropping its request sender lets it go after its current step.
                self.retired.insert(name, owner.task);
            }
        }
        self.retired.retain(|_, task| !task.is_finished());
        for name in names {
            self.nudge(name);
        }
    }

    /// The owners' request channels, for asking them from other tasks.
    pub fn directory(&self) -> Directory {
        self.directory.clone()
    }

    pub fn worker_count(&self) -> usize {
        self.owners.len()
    }

    /// What the owner of `name` knows, or `None` when no owner runs for it.
    pub async fn view(&self, name: &str) -> Option<OwnerView> {
        let owner = self.owners.get(name)?;
        let (reply, answer) = oneshot::channel();
        owner.requests.send(Request::View(reply)).await.ok()?;
        answer.await.ok()
    }

    /// Stops every owner after its current step (each step is safe to cut
    /// short, but finishing it is kinder), waiting at most `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        let mut tasks: Vec<JoinHandle<()>> = self.owners.drain().map(|(_, o)| o.task).collect();
        tasks.extend(self.retired.drain().map(|(_, t)| t));
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let drain = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(timeout, drain).await.is_err() {
            tracing::warn!("owners did not finish their steps in time; abandoning them");
            for abort in aborts {
                abort.abort();
            }
        }
    }
}

/// Declared names (valid or not) and stored guests' names, sorted, unique.
fn known_names(ctx: &Ctx) -> (Vec<String>, Vec<Nameless>) {
    let mut names: Vec<String> = Vec::new();
    let mut nameless = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&ctx.instances_dir) {
        for entry in entries.flatten() {
            if let DeclFile::Instance(name) = declaration::instance_name(&entry.path()) {
                names.push(name);
            }
        }
    }
    match ctx.instances.store().list() {
        Ok(listing) => {
            names.extend(listing.guests.into_iter().map(|m| m.name));
            nameless.extend(
                listing
                    .unreadable
                    .iter()
                    .filter(|u| u.name.is_none())
                    .filter_map(|u| u.id.map(|id| Nameless { id, problem: error_chain(&u.problem) })),
            );
        }
        Err(e) => tracing::error!(error = %error_chain(&e), "cannot list guests"),
    }
    names.sort();
    names.dedup();
    (names, nameless)
}

/// A guest record too damaged to say whose it is, as the last listing
/// found it: it has no owner, so `status` lists it on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nameless {
    pub id: ulid::Ulid,
    pub problem: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declaration::spec::HypervisorKind;
    use crate::hypervisor::fake::{FakeHypervisor, Op};
    use crate::hypervisor::Backends;
    use crate::instances::provision::FakeProvisioner;
    use crate::settings::Settings;
    use crate::state::VmState;
    use crate::store::Store;

    struct World {
        _tmp: tempfile::TempDir,
        fake: FakeHypervisor,
        reconciler: Reconciler,
    }

    fn world() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("instances");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("web.toml"), "image = \"busybox\"\n").unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.default_hypervisor = HypervisorKind::Qemu;
        settings.reconcile.debounce = Duration::from_millis(1);
        let store = Arc::new(Store::open(&settings.data_dir).unwrap());
        let fake = FakeHypervisor::new(HypervisorKind::Qemu);
        let backends = Backends { cloud_hypervisor: None, qemu: Some(Arc::new(fake.clone())) };
        let instances = Arc::new(Instances::new(store, backends, Arc::new(settings), Arc::new(FakeProvisioner)));
        World { _tmp: tmp, fake, reconciler: Reconciler::new(instances, dir) }
    }

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn converged_running(reconciler: &Reconciler) -> OwnerView {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(view) = reconciler.view("web").await {
                if view.state == Some(VmState::Running) && view.last_step == Some(plan::StepKind::Converged) {
                    return view;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "never converged");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// An owner let go while it is inside a step finishes that step before
    /// the next owner of its name starts: one VM, never two creates at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_owner_waits_for_the_one_let_go() {
        let mut w = world();
        w.fake.hold(Op::Create);
        w.reconciler.nudge("web");
        until("the create to start", || w.fake.calls().contains(&Op::Create)).await;
        // Let go mid-step (as a listing that misses the name would), then
        // nudged again at once.
        w.reconciler.nudge_only(&[]);
        w.reconciler.nudge("web");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let creates = || w.fake.calls().iter().filter(|op| **op == Op::Create).count();
        assert_eq!(creates(), 1, "the second owner did not start while the first was in its step");
        w.fake.release(Op::Create);
        let view = converged_running(&w.reconciler).await;
        assert_eq!(creates(), 1);
        assert_eq!(w.fake.vmms_started(), 1);
        assert_eq!(view.error, None);
        w.reconciler.shutdown(Duration::from_secs(5)).await;
    }

    /// The owner answers requests on their oneshot, between its steps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owner_answers_what_it_knows() {
        let mut w = world();
        assert_eq!(w.reconciler.view("web").await, None, "no owner yet");
        w.reconciler.nudge("web");
        let view = converged_running(&w.reconciler).await;
        assert_eq!(view.name, "web");
        assert_eq!(view.desired, Some("running"));
        assert_eq!(view.steps, 3, "provision, create, boot");
        // Still answering while a step is held.
        w.fake.hold(Op::Pause);
        std::fs::write(w.reconciler.ctx.instances_dir.join("web.toml"), "image = \"busybox\"\nstate = \"standby\"\n").unwrap();
        w.reconciler.nudge("web");
        until("the pause to start", || w.fake.calls().contains(&Op::Pause)).await;
        w.fake.release(Op::Pause);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let view = w.reconciler.view("web").await.expect("an owner");
            if view.state == Some(VmState::Standby) && view.last_step == Some(plan::StepKind::Converged) {
                assert_eq!(view.desired, Some("standby"));
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never stood by: {view:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        w.reconciler.shutdown(Duration::from_secs(5)).await;
    }
}
