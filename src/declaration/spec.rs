//! Validated, internal instance types. Built only by `declaration::parse`;
//! never serialized to disk (the outside format is the TOML file; what a
//! guest's record keeps of it is the store's `AppliedDeclaration`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

// Types a spec names that belong to the layers below (the config-file
// toolkit's sizes, the hypervisor's backends and limits); re-exported so the
// paths `declaration::spec::{ByteSize, HypervisorKind, IoLimit}` keep working.
pub use crate::config_file::ByteSize;
pub use crate::hypervisor::{HypervisorKind, IoLimit};
use crate::store::{AppliedDeclaration, AppliedLimit, AppliedNetwork, AppliedVolume, APPLIED_VERSION};

/// What the user wants an instance to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesiredState {
    Running,
    Standby,
    Stopped,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Standby => "standby",
            DesiredState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do when the guest ends on its own while declared `running`
/// (the app exited, or the VMM died). A stop the daemon asked for is not
/// an ending of this kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RestartPolicy {
    /// Boot it again, with crash-loop backoff. The default: `running` is a
    /// standing order, as for a service.
    #[default]
    Always,
    /// Boot it again unless the app exited with status 0.
    OnFailure,
    /// Leave it stopped; status says how it ended.
    Never,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NetworkSpec {
    pub enabled: bool,
    /// Host → guest.
    pub bandwidth_down: IoLimit,
    /// Guest → host.
    pub bandwidth_up: IoLimit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeSpec {
    /// Host path of the raw disk image (or block device) the VM is given:
    /// `declared` with its symlinks resolved when the declaration was read
    /// on this host (as declared when it was not there, or not looked at).
    pub source: PathBuf,
    /// The source as the declaration wrote it: what the guest's record
    /// keeps, so a link that points elsewhere is not a declaration change.
    pub declared: PathBuf,
    /// The source must be a block device rather than a regular file.
    pub block_device: bool,
    /// Absolute mount point in the guest.
    pub mount: String,
    pub readonly: bool,
}

/// One validated instance declaration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceSpec {
    /// The declaration file stem.
    pub name: String,
    /// The declaration file it came from.
    pub source: PathBuf,
    pub image: String,
    pub state: DesiredState,
    pub restart: RestartPolicy,
    /// `None`: the settings' `default_hypervisor`.
    pub hypervisor: Option<HypervisorKind>,
    pub vcpus: u32,
    pub memory: ByteSize,
    pub hotplug_memory: ByteSize,
    pub overlay_size: ByteSize,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Files of `NAME=value` lines (`declaration::env_file`), read by the
    /// provisioner at every cold boot; their values are never kept here.
    pub env_files: Vec<PathBuf>,
    /// A digest of what `env_files` held when the declaration was read
    /// (`env_file::digest`), so that a changed file restarts the guest like
    /// a changed declaration. `None` when there are none, or they could not
    /// be read then (nothing is known, so nothing counts as changed).
    pub env_files_digest: Option<String>,
    pub network: NetworkSpec,
    pub disk_io: IoLimit,
    /// Host PCI devices passed through with VFIO, as sysfs paths or BDFs.
    pub devices: Vec<String>,
    pub volumes: Vec<VolumeSpec>,
}

impl InstanceSpec {
    /// Everything that needs a restart to take effect, as the guest's
    /// record keeps it: every field except `state` and `restart` (applied
    /// by the state machine) and the file it came from, with the hypervisor
    /// the VM runs on. Stored in metadata before a VM is created, so a
    /// changed declaration shows up as a pending change naming its fields.
    pub fn restart_fields(&self, resolved_hypervisor: HypervisorKind) -> AppliedDeclaration {
        let limit = |l: &IoLimit| AppliedLimit { bytes_per_sec: l.bytes_per_sec, ops_per_sec: l.ops_per_sec };
        AppliedDeclaration {
            version: APPLIED_VERSION,
            image: self.image.clone(),
            hypervisor: Some(resolved_hypervisor),
            vcpus: self.vcpus,
            memory_bytes: self.memory.0,
            hotplug_memory_bytes: self.hotplug_memory.0,
            overlay_size_bytes: self.overlay_size.0,
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            workdir: self.workdir.clone(),
            env: self.env.clone(),
            env_files: self.env_files.clone(),
            env_files_digest: self.env_files_digest.clone(),
            network: AppliedNetwork {
                enabled: self.network.enabled,
                bandwidth_down: limit(&self.network.bandwidth_down),
                bandwidth_up: limit(&self.network.bandwidth_up),
            },
            disk_io: limit(&self.disk_io),
            devices: self.devices.clone(),
            volumes: self
                .volumes
                .iter()
                .map(|v| AppliedVolume { source: v.declared.clone(), mount: v.mount.clone(), readonly: v.readonly })
                .collect(),
        }
    }
}

impl InstanceSpec {
    /// The hypervisor this declaration runs on, for a guest whose record
    /// pinned `pinned` when it was created: the declaration's own choice,
    /// else the pinned one (never the settings' default of today).
    pub fn hypervisor_for(&self, pinned: HypervisorKind) -> HypervisorKind {
        self.hypervisor.unwrap_or(pinned)
    }

    /// The declaration a VM made now from this one records.
    pub fn applied_for(&self, pinned: HypervisorKind) -> AppliedDeclaration {
        self.restart_fields(self.hypervisor_for(pinned))
    }

    /// The restart fields whose value in this declaration differs from the
    /// one `applied` (what the VM or snapshot was made from) recorded; empty
    /// when none does. The one rule for "a restart is needed", used by the
    /// planner, the executor's log and `status`.
    ///
    /// Field by field: a field a newer release added reads from an older
    /// record as its default, and so differs only when the declaration sets
    /// it otherwise. A declaration that names no hypervisor keeps the one
    /// the VM was made on (`pinned` when the record does not say), so a
    /// host whose default hypervisor changes restarts nothing. Env files
    /// that cannot be read now (no digest) count as unchanged: a guest is
    /// not taken down for a boot that would fail; the next boot says why.
    pub fn changes_since(&self, applied: &AppliedDeclaration, pinned: HypervisorKind) -> Vec<String> {
        let ran_on = applied.hypervisor.unwrap_or(pinned);
        let recorded = AppliedDeclaration { hypervisor: Some(ran_on), ..applied.clone() };
        let mut desired = self.restart_fields(self.hypervisor.unwrap_or(ran_on));
        if desired.env_files_digest.is_none() && desired.env_files == recorded.env_files {
            desired.env_files_digest = recorded.env_files_digest.clone();
        }
        let mut changed: Vec<String> = recorded.differing_fields(&desired).into_iter().map(str::to_string).collect();
        changed.sort();
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field missing from a record reads as the store's default for it,
    /// which must be the declaration's: else an old record would differ
    /// from a declaration that never set the field.
    #[test]
    fn the_records_defaults_are_the_declarations() {
        let spec = crate::declaration::parse_instance(
            std::path::Path::new("instances/web.toml"),
            "image = \"busybox\"\n",
            &Default::default(),
        )
        .expect("valid");
        let defaults = AppliedDeclaration { image: "busybox".into(), hypervisor: Some(HypervisorKind::Qemu), ..AppliedDeclaration::default() };
        assert_eq!(spec.applied_for(HypervisorKind::Qemu), defaults);
        assert!(spec.changes_since(&AppliedDeclaration { image: "busybox".into(), ..AppliedDeclaration::default() }, HypervisorKind::Qemu).is_empty());
    }
}
