//! `hypeman plan`: the next step the daemon would take for each instance,
//! from the same `reconcile::plan` the daemon runs, fed with the same
//! declaration and observation. Only the next hop is shown: later hops
//! depend on how this one turns out.
//!
//! The daemon's error backoff lives in its memory, not on disk, so a plan
//! here never says "backing off"; it says what the next attempt would be.

use super::view::{self, View};
use super::{CliError, Context};
use crate::reconcile::plan::plan;
use crate::state::VmState;
use std::io::{self, Write};
use tokio::time::Instant;

/// One line of `hypeman plan`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanRow {
    pub name: String,
    pub state: VmState,
    /// As in `status`: running, standby, stopped, absent or invalid.
    pub desired: String,
    /// The step (`create VM`, `nothing to do`, `blocked: …`), or why the
    /// instance cannot even be looked at.
    pub action: String,
}

/// What the daemon would do next for every instance, sorted by name.
pub async fn plan_rows(ctx: &Context) -> Result<Vec<PlanRow>, CliError> {
    let mut rows = Vec::new();
    for (name, listed) in view::names(ctx)? {
        let view = view::look(ctx, &name, listed.as_ref()).await;
        rows.push(row(&view, Instant::now()));
    }
    Ok(rows)
}

/// The daemon's plan: each owner's next step as it worded it at its last
/// look, with the backoff holding it and the step it is taking now.
pub(crate) fn rows_from_looks(ctx: &Context, looks: &[(String, Option<std::sync::Arc<crate::reconcile::Look>>)]) -> Vec<PlanRow> {
    looks
        .iter()
        .map(|(name, look)| match look {
            Some(look) => PlanRow {
                name: name.clone(),
                state: look.observation.state,
                desired: look.desired.label().to_string(),
                action: match &look.busy {
                    Some(step) => format!("{step} (in progress)"),
                    None => look.action.clone(),
                },
            },
            None => row(&view::from_look(ctx, name, None), Instant::now()),
        })
        .collect()
}

fn row(view: &View, now: Instant) -> PlanRow {
    let obs = &view.observation;
    let action = match (&view.observe_error, &obs.blind) {
        // What the plan would do, and why it cannot do much of it.
        (Some(e), Some(_)) => {
            let observed = obs.observed(Default::default());
            format!("{} ({e})", plan(&view.desired, &observed, now))
        }
        // The daemon fails the same observation and retries later.
        (Some(e), None) => format!("cannot observe: {e}"),
        (None, _) => {
            let observed = obs.observed(Default::default());
            plan(&view.desired, &observed, now).to_string()
        }
    };
    PlanRow {
        name: view.name.clone(),
        state: obs.state,
        desired: view.desired.label().to_string(),
        action,
    }
}

/// `web  Stopped -> running: create VM`, names and states aligned.
pub(crate) fn write_plan(out: &mut impl Write, rows: &[PlanRow]) -> io::Result<()> {
    let name_w = rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0);
    let state_w = rows
        .iter()
        .map(|r| r.state.as_str().len())
        .max()
        .unwrap_or(0);
    for r in rows {
        writeln!(
            out,
            "{:<name_w$}  {:<state_w$} -> {}: {}",
            r.name,
            r.state.as_str(),
            r.desired,
            r.action
        )?;
    }
    Ok(())
}
