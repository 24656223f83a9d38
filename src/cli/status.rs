//! `hypeman status`: one [`InstanceStatus`] per instance, as JSON (the keys
//! are a contract) or as an aligned table.
//!
//! Owns the meaning of each key: what "desired" says when the file is gone
//! or broken, which error is the one worth showing, and when a change is
//! pending. Observation itself is `view`'s.

use super::view::{self, View};
use super::{CliError, Context};
use crate::declaration::spec::HypervisorKind;
use crate::state::VmState;
use serde::Serialize;
use std::io::{self, Write};

/// One instance as `status --json` prints it. Exactly these keys, in this
/// order; `null` where a value does not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    /// The guest's ULID; `null` until the daemon creates it.
    pub id: Option<String>,
    /// `running`, `standby` or `stopped` as declared; `absent` when the file
    /// is gone (the daemon deletes the instance); `invalid` when it does not
    /// parse or validate (the daemon leaves the instance alone).
    pub desired_state: String,
    pub state: VmState,
    /// What the guest runs on, else what its declaration asks for; `null`
    /// for an invalid declaration without a guest.
    pub hypervisor: Option<HypervisorKind>,
    pub ip: Option<String>,
    /// The live VMM process.
    pub pid: Option<u32>,
    pub has_snapshot: bool,
    pub last_error: Option<String>,
    /// e.g. `"memory, vcpus (restart needed)"`.
    pub pending_change: Option<String>,
    /// The declared volumes, with the host path each is attached from
    /// (symlinks resolved when the declaration was read); empty when the
    /// declaration is not valid.
    pub volumes: Vec<VolumeStatus>,
}

/// One volume as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VolumeStatus {
    /// The guest mount point.
    pub path: String,
    /// The host path the VM is given.
    pub source: std::path::PathBuf,
    /// The source as the declaration wrote it.
    pub declared: std::path::PathBuf,
    pub readonly: bool,
    pub block_device: bool,
}

/// The status of every instance, declared or stored, sorted by name.
pub async fn status_all(ctx: &Context) -> Result<Vec<InstanceStatus>, CliError> {
    let mut all = Vec::new();
    for (name, listed) in view::names(ctx)? {
        let view = view::look(ctx, &name, listed.as_ref()).await;
        all.push(from_view(ctx, &view));
    }
    // Records too damaged to say whose they are: each listed on its own,
    // with its path and problem (every instance not found otherwise says it
    // may be theirs).
    let listing = ctx.instances.store().list().map_err(|e| ctx.store_error(e))?;
    for unreadable in &listing.unreadable {
        if let (None, Some(id)) = (&unreadable.name, unreadable.id) {
            all.push(nameless(id, &crate::instances::error_chain(&unreadable.problem)));
        }
    }
    Ok(all)
}

/// The statuses the daemon's API gives: each owner's last look (`looks`,
/// by name), rendered as `status` renders a look of its own, then the
/// records too damaged to name.
pub(crate) fn status_from_looks(
    ctx: &Context,
    looks: &[(String, Option<std::sync::Arc<crate::reconcile::Look>>)],
    damaged: &[crate::reconcile::Nameless],
) -> Vec<InstanceStatus> {
    let mut all: Vec<InstanceStatus> = looks.iter().map(|(name, look)| from_view(ctx, &view::from_look(ctx, name, look.as_deref()))).collect();
    all.extend(damaged.iter().map(|d| nameless(d.id, &d.problem)));
    all
}

/// One status from the daemon's last look at `name`.
pub(crate) fn status_from_look(ctx: &Context, name: &str, look: Option<&crate::reconcile::Look>) -> InstanceStatus {
    from_view(ctx, &view::from_look(ctx, name, look))
}

/// The row of a guest record whose name cannot be read.
fn nameless(id: ulid::Ulid, problem: &str) -> InstanceStatus {
    InstanceStatus {
        name: NAMELESS.to_string(),
        id: Some(id.to_string()),
        desired_state: "absent".to_string(),
        state: VmState::Unknown,
        hypervisor: None,
        ip: None,
        pid: None,
        has_snapshot: false,
        last_error: Some(format!(
            "{problem}; it may be the record of any instance not found otherwise, so none is created until it is repaired (README: Repairing a damaged record)"
        )),
        pending_change: None,
        volumes: Vec::new(),
    }
}

/// The name `status` shows for a guest record whose name cannot be read:
/// not a valid instance name, so it is never taken for one.
pub const NAMELESS: &str = "(unreadable)";

/// The status of the instance `query` names (name, ID, unique ID prefix,
/// or a declared name not created yet).
pub async fn status_of(ctx: &Context, query: &str) -> Result<InstanceStatus, CliError> {
    let name = view::resolve(ctx, query)?;
    Ok(status_by_name(ctx, &name).await)
}

/// The status of `name` whether or not it exists: a name neither declared
/// nor stored is `Stopped` with desired state `absent`.
pub(crate) async fn status_by_name(ctx: &Context, name: &str) -> InstanceStatus {
    let listed = ctx.instances.store().find_by_name(name).ok().flatten();
    let view = view::look(ctx, name, listed.as_ref()).await;
    from_view(ctx, &view)
}

fn from_view(ctx: &Context, view: &View) -> InstanceStatus {
    let obs = &view.observation;
    let meta = obs.meta.as_ref();
    let hypervisor = meta
        .map(|m| m.hypervisor)
        .or_else(|| view.desired.spec().map(|s| ctx.instances.resolve_kind(s)));
    // The most pressing first: a declaration that is not applied, a state
    // that could not be read, what the daemon recorded, and why a VMM does
    // not answer.
    let last_error = obs
        .unreadable_record
        .clone()
        .or_else(|| view.desired.invalid().map(str::to_string))
        .or_else(|| view.observe_error.clone())
        .or_else(|| meta.and_then(|m| m.last_error.clone()))
        // A loss stays on record until the declaration says what now.
        .or_else(|| meta.and_then(|m| m.lost.clone()))
        .or_else(|| obs.unreachable.clone());
    // A stopped guest has no VM to restart: a declaration recorded for a
    // create that has not happened yet is not a change.
    let pending_change = match (meta, view.desired.spec()) {
        (Some(_), Some(_)) if obs.state == VmState::Stopped => None,
        (Some(meta), Some(spec)) => meta.applied.as_ref().and_then(|applied| {
            let changed = crate::reconcile::plan::restart_changes(spec, applied, meta.hypervisor, obs.overlay_bytes);
            (!changed.is_empty()).then(|| format!("{} (restart needed)", changed.join(", ")))
        }),
        (None, _) | (_, None) => None,
    };
    InstanceStatus {
        name: view.name.clone(),
        id: meta.map(|m| m.id.to_string()),
        desired_state: view.desired.label().to_string(),
        state: obs.state,
        hypervisor,
        ip: meta.and_then(|m| m.network.as_ref()).map(|n| n.ip.clone()),
        pid: obs.vmm.as_ref().map(|h| h.pid),
        has_snapshot: obs.has_snapshot(),
        last_error,
        pending_change,
        volumes: view.desired.spec().map_or_else(Vec::new, |spec| {
            spec.volumes
                .iter()
                .map(|v| VolumeStatus {
                    path: v.mount.clone(),
                    source: v.source.clone(),
                    declared: v.declared.clone(),
                    readonly: v.readonly,
                    block_device: v.block_device,
                })
                .collect()
        }),
    }
}

/// An aligned table, then one line per pending change and per error.
pub(crate) fn write_table(out: &mut impl Write, rows: &[InstanceStatus]) -> io::Result<()> {
    let dash = || "-".to_string();
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.id.clone().unwrap_or_else(dash),
                s.desired_state.clone(),
                s.state.to_string(),
                s.hypervisor.map_or_else(dash, |h| h.to_string()),
                s.ip.clone().unwrap_or_else(dash),
                s.pid.map_or_else(dash, |p| p.to_string()),
                if s.has_snapshot { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "ID",
        "DESIRED",
        "STATE",
        "HYPERVISOR",
        "IP",
        "PID",
        "SNAPSHOT",
    ];
    write_aligned(out, &header, &cells)?;
    let mut notes = Vec::new();
    for s in rows {
        for v in &s.volumes {
            let declared = if v.declared == v.source {
                String::new()
            } else {
                format!(" (declared as {})", v.declared.display())
            };
            notes.push(format!("{}: volume {}: {}{declared}", s.name, v.path, v.source.display()));
        }
        if let Some(p) = &s.pending_change {
            notes.push(format!("{}: pending change: {p}", s.name));
        }
        if let Some(e) = &s.last_error {
            notes.push(format!("{}: error: {e}", s.name));
        }
    }
    if !notes.is_empty() {
        writeln!(out)?;
        for note in notes {
            writeln!(out, "{note}")?;
        }
    }
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart, no trailing
/// blanks.
fn write_aligned<const N: usize>(
    out: &mut impl Write,
    header: &[&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = header.map(str::to_string);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}
