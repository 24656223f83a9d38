//! Validated, internal instance types. Built only by `declaration::parse`;
//! never serialized to disk (the outside format is the TOML file).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

// Types a spec names that belong to the layers below (the config-file
// toolkit's sizes, the hypervisor's backends and limits); re-exported so the
// paths `declaration::spec::{ByteSize, HypervisorKind, IoLimit}` keep working.
pub use crate::config_file::ByteSize;
pub use crate::hypervisor::{HypervisorKind, IoLimit};

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
    /// Host path of a raw disk image.
    pub source: PathBuf,
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
    pub network: NetworkSpec,
    pub disk_io: IoLimit,
    /// Host PCI devices passed through with VFIO, as sysfs paths or BDFs.
    pub devices: Vec<String>,
    pub volumes: Vec<VolumeSpec>,
}

impl InstanceSpec {
    /// Everything that needs a restart to take effect, as canonical JSON:
    /// every field except `state` and `restart` (applied by the state
    /// machine) and the file it came from. Stored in metadata when a VM is created, so a
    /// changed declaration shows up as a pending change naming its fields.
    pub fn restart_fields(&self, resolved_hypervisor: HypervisorKind) -> serde_json::Value {
        let limit = |l: &IoLimit| serde_json::json!([l.bytes_per_sec, l.ops_per_sec]);
        serde_json::json!({
            "image": self.image,
            "hypervisor": resolved_hypervisor.as_str(),
            "vcpus": self.vcpus,
            "memory": self.memory.0,
            "hotplug_memory": self.hotplug_memory.0,
            "overlay_size": self.overlay_size.0,
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "workdir": self.workdir,
            "env": self.env,
            "network": [self.network.enabled, limit(&self.network.bandwidth_down), limit(&self.network.bandwidth_up)],
            "disk_io": limit(&self.disk_io),
            "devices": self.devices,
            "volumes": self.volumes.iter().map(|v| serde_json::json!([v.source, v.mount, v.readonly])).collect::<Vec<_>>(),
        })
    }
}

impl InstanceSpec {
    /// The hypervisor this declaration runs on, for a guest whose record
    /// pinned `pinned` when it was created: the declaration's own choice,
    /// else the pinned one (never the settings' default of today).
    pub fn hypervisor_for(&self, pinned: HypervisorKind) -> HypervisorKind {
        self.hypervisor.unwrap_or(pinned)
    }

    /// The restart fields a VM made now from this declaration records.
    pub fn applied_for(&self, pinned: HypervisorKind) -> serde_json::Value {
        self.restart_fields(self.hypervisor_for(pinned))
    }

    /// The restart fields that differ between `applied` (what the VM or
    /// snapshot was made from) and this declaration; empty when none does.
    /// The one rule for "a restart is needed", used by the planner, the
    /// executor's log and `status`.
    pub fn changes_since(&self, applied: &serde_json::Value, pinned: HypervisorKind) -> Vec<String> {
        changed_fields(applied, &self.applied_for(pinned))
    }
}

/// The top-level keys whose values differ between two `restart_fields`.
pub fn changed_fields(applied: &serde_json::Value, desired: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(d)) = (applied.as_object(), desired.as_object()) else {
        return vec!["(all)".to_string()];
    };
    let mut keys: Vec<String> = a
        .keys()
        .chain(d.keys())
        .filter(|k| a.get(*k) != d.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}
