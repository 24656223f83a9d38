//! One look at an instance, as the daemon would take it: its declaration
//! read with `declaration::desired::read`, as the daemon's owners read it,
//! and its state observed through `Instances::observe`, which changes
//! nothing. `status` and `plan` are renderings of this.
//!
//! Owns which names exist (declared ∪ stored) and how a NAME typed by a user
//! resolves. Must not act on anything it sees.

use super::{CliError, Context};
use crate::declaration::{self, DeclFile, Desired};
use crate::instances::{error_chain, Observation};
use crate::state::VmState;
use crate::store::{Metadata, StoreError};
use std::collections::BTreeMap;

/// What one instance is and what its declaration wants.
#[derive(Debug, Clone)]
pub(crate) struct View {
    pub name: String,
    pub desired: Desired,
    /// Always filled: when observing failed, the state is `Unknown` and
    /// the metadata is what the store listing held.
    pub observation: Observation,
    /// Why the state could not be observed (no backend for its hypervisor,
    /// an unreadable store entry).
    pub observe_error: Option<String>,
}

/// Looks at the instance `name`. `listed` is its metadata from a listing
/// taken just before, used only when observing fails.
pub(crate) async fn look(ctx: &Context, name: &str, listed: Option<&Metadata>) -> View {
    let desired = declaration::desired::read(&ctx.instances_dir, name, &ctx.instances.settings().limits);
    let (observation, observe_error) = match ctx.instances.observe(name).await {
        Ok(observation) => {
            let blind = observation.blind.clone();
            (observation, blind)
        }
        Err(e) => {
            let store = ctx.instances.store();
            let meta = listed.cloned();
            let snapshot = meta
                .as_ref()
                .and_then(|m| store.snapshot(m.id).ok().flatten());
            let observation = Observation { meta, state: VmState::Unknown, snapshot, ..Observation::nothing() };
            (observation, Some(error_chain(&e)))
        }
    };
    View {
        name: name.to_string(),
        desired,
        observation,
        observe_error,
    }
}

/// Every instance name worth showing: each declaration file with a valid
/// name (valid content or not) and each guest in the store, with its
/// metadata when it has a guest. Sorted by name.
pub(crate) fn names(ctx: &Context) -> Result<BTreeMap<String, Option<Metadata>>, CliError> {
    let mut all: BTreeMap<String, Option<Metadata>> = BTreeMap::new();
    // A missing directory declares nothing; `desired::read` reports it for
    // every stored instance.
    if let Ok(entries) = std::fs::read_dir(&ctx.instances_dir) {
        for entry in entries.flatten() {
            if let DeclFile::Instance(name) = declaration::instance_name(&entry.path()) {
                all.insert(name, None);
            }
        }
    }
    let listing = ctx
        .instances
        .store()
        .list()
        .map_err(|e| ctx.store_error(e))?;
    // A damaged record that still says its name is shown under it (its
    // look says what is wrong); `status` lists the others on their own.
    for unreadable in &listing.unreadable {
        match (&unreadable.name, unreadable.id) {
            (Some(name), Some(_)) => {
                all.entry(name.clone()).or_insert(None);
            }
            (None, _) | (Some(_), None) => {
                tracing::debug!(error = %error_chain(&unreadable.problem), "a guest record without a readable name");
            }
        }
    }
    for meta in listing.guests {
        all.insert(meta.name.clone(), Some(meta));
    }
    Ok(all)
}

/// Resolves what a user typed to an instance name: a guest's name, ID or
/// unique ID prefix (the store's lookup), or the name of a declaration
/// whose guest does not exist yet. A declared name wins over an ID prefix
/// it happens to share.
pub(crate) fn resolve(ctx: &Context, query: &str) -> Result<String, CliError> {
    let declared = declaration::is_valid_name(query)
        && std::fs::symlink_metadata(ctx.instances_dir.join(format!("{query}.toml"))).is_ok();
    match ctx.instances.store().lookup(query) {
        Ok(meta) => Ok(meta.name),
        Err(StoreError::NotFound { .. } | StoreError::Ambiguous { .. }) if declared => {
            Ok(query.to_string())
        }
        // Its look says what is wrong with the record.
        Err(StoreError::MaybeHeldByUnreadable { name, .. }) => Ok(name),
        Err(StoreError::NotFound { .. }) => Err(CliError::NotFound {
            query: query.to_string(),
            instances_dir: ctx.instances_dir.clone(),
        }),
        Err(e @ StoreError::Ambiguous { .. }) => Err(CliError::Lookup(e)),
        Err(e) => Err(ctx.store_error(e)),
    }
}

/// The view the daemon's owner of `name` took last (`look`), or, before
/// its first look, what the files say: the declaration and the record, in
/// state `Unknown` with that reason. Looks at no VMM.
pub(crate) fn from_look(ctx: &Context, name: &str, look: Option<&crate::reconcile::Look>) -> View {
    match look {
        Some(look) => View {
            name: name.to_string(),
            desired: look.desired.clone(),
            observation: look.observation.clone(),
            observe_error: look.observe_error.clone(),
        },
        None => {
            let desired = declaration::desired::read(&ctx.instances_dir, name, &ctx.instances.settings().limits);
            let meta = ctx.instances.store().find_by_name(name).ok().flatten();
            let observation = Observation { meta, state: VmState::Unknown, ..Observation::nothing() };
            View { name: name.to_string(), desired, observation, observe_error: Some("the daemon has not looked at it yet".into()) }
        }
    }
}
