//! The applied declaration: what the current VM or snapshot of a guest was
//! made from, as its record keeps it.
//!
//! A typed struct with its own `version`, and a serde default for every
//! field equal to the declaration's own default for it. So a record written
//! before a field existed reads as that field's default, and a declaration
//! that leaves the new field alone changes nothing: an upgrade that adds a
//! field restarts no guest and discards no snapshot. The comparison is per
//! field ([`AppliedDeclaration::differing_fields`]); which fields a
//! declaration's value counts for is the declaration's rule
//! (`InstanceSpec::changes_since`). Pure data: no IO.
//!
//! Records of metadata versions 1 and 2 kept an untyped JSON object instead
//! (the shape of `InstanceSpec::restart_fields` up to then); [`from_legacy`]
//! converts it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hypervisor::HypervisorKind;

/// The format of [`AppliedDeclaration`] this build writes and the newest it
/// reads.
pub const APPLIED_VERSION: u32 = 1;

/// The declaration defaults a field missing from a record reads as. They
/// must stay equal to `declaration::validate`'s defaults (a test there
/// checks it): the store may not name the declaration module.
const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
const DEFAULT_OVERLAY_SIZE_BYTES: u64 = 1 << 30;

/// Everything of a declaration that needs a restart to take effect: every
/// field except `state` and `restart`, which the state machine applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedDeclaration {
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default)]
    pub image: String,
    /// The hypervisor the VM was made on. `None` (only in a converted old
    /// record that lacked it) means the record's pinned one.
    #[serde(default)]
    pub hypervisor: Option<HypervisorKind>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: u64,
    #[serde(default)]
    pub hotplug_memory_bytes: u64,
    #[serde(default = "default_overlay_size_bytes")]
    pub overlay_size_bytes: u64,
    /// `None`: the image's.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `None`: the image's.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `None`: the image's.
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The declared env files' paths; their values are never recorded.
    /// Left out when empty, so records without any read as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_files: Vec<PathBuf>,
    /// A digest of what the env files held (`declaration::env_file::digest`):
    /// a changed file is seen as a change without its values being kept.
    /// `None`: no env files, or they could not be read when this was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_files_digest: Option<String>,
    #[serde(default)]
    pub network: AppliedNetwork,
    #[serde(default)]
    pub disk_io: AppliedLimit,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<AppliedVolume>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedNetwork {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub bandwidth_down: AppliedLimit,
    #[serde(default)]
    pub bandwidth_up: AppliedLimit,
}

/// A rate limit; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedLimit {
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub ops_per_sec: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedVolume {
    pub source: PathBuf,
    pub mount: String,
    #[serde(default)]
    pub readonly: bool,
}

fn default_version() -> u32 {
    APPLIED_VERSION
}
fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_memory_bytes() -> u64 {
    DEFAULT_MEMORY_BYTES
}
fn default_overlay_size_bytes() -> u64 {
    DEFAULT_OVERLAY_SIZE_BYTES
}

impl Default for AppliedDeclaration {
    /// What a record that says nothing reads as: every field its default.
    fn default() -> AppliedDeclaration {
        AppliedDeclaration {
            version: APPLIED_VERSION,
            image: String::new(),
            hypervisor: None,
            vcpus: DEFAULT_VCPUS,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            hotplug_memory_bytes: 0,
            overlay_size_bytes: DEFAULT_OVERLAY_SIZE_BYTES,
            entrypoint: None,
            cmd: None,
            workdir: None,
            env: BTreeMap::new(),
            env_files: Vec::new(),
            env_files_digest: None,
            network: AppliedNetwork::default(),
            disk_io: AppliedLimit::default(),
            devices: Vec::new(),
            volumes: Vec::new(),
        }
    }
}

impl AppliedDeclaration {
    /// The names of the fields whose values differ, in declaration order;
    /// empty when none does. `version` is the format's, not a field.
    /// Every field is named here, so a new one cannot be forgotten.
    pub fn differing_fields(&self, other: &AppliedDeclaration) -> Vec<&'static str> {
        let AppliedDeclaration {
            version: _,
            image,
            hypervisor,
            vcpus,
            memory_bytes,
            hotplug_memory_bytes,
            overlay_size_bytes,
            entrypoint,
            cmd,
            workdir,
            env,
            env_files,
            env_files_digest,
            network,
            disk_io,
            devices,
            volumes,
        } = self;
        let fields = [
            ("image", *image != other.image),
            ("hypervisor", *hypervisor != other.hypervisor),
            ("vcpus", *vcpus != other.vcpus),
            ("memory", *memory_bytes != other.memory_bytes),
            ("hotplug_memory", *hotplug_memory_bytes != other.hotplug_memory_bytes),
            ("overlay_size", *overlay_size_bytes != other.overlay_size_bytes),
            ("entrypoint", *entrypoint != other.entrypoint),
            ("cmd", *cmd != other.cmd),
            ("workdir", *workdir != other.workdir),
            ("env", *env != other.env),
            ("env_files", *env_files != other.env_files || *env_files_digest != other.env_files_digest),
            ("network", *network != other.network),
            ("disk_io", *disk_io != other.disk_io),
            ("devices", *devices != other.devices),
            ("volumes", *volumes != other.volumes),
        ];
        fields.into_iter().filter(|(_, differs)| *differs).map(|(name, _)| name).collect()
    }
}

/// The untyped object of metadata versions 1 and 2, as
/// `InstanceSpec::restart_fields` wrote it: sizes in bytes under their bare
/// names, limits as `[bytes_per_sec, ops_per_sec]`, the network as
/// `[enabled, down, up]`, volumes as `[source, mount, readonly]`. Every key
/// is optional: a missing one reads as its default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyApplied {
    #[serde(default)]
    image: String,
    #[serde(default)]
    hypervisor: Option<HypervisorKind>,
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    #[serde(default = "default_memory_bytes")]
    memory: u64,
    #[serde(default)]
    hotplug_memory: u64,
    #[serde(default = "default_overlay_size_bytes")]
    overlay_size: u64,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    network: LegacyNetwork,
    #[serde(default)]
    disk_io: LegacyLimit,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    volumes: Vec<(PathBuf, String, bool)>,
}

type LegacyLimit = (Option<u64>, Option<u64>);
type LegacyNetwork = (bool, LegacyLimit, LegacyLimit);

fn limit((bytes_per_sec, ops_per_sec): LegacyLimit) -> AppliedLimit {
    AppliedLimit { bytes_per_sec, ops_per_sec }
}

/// Converts the untyped applied object of a version 1 or 2 record.
pub(crate) fn from_legacy(value: serde_json::Value) -> Result<AppliedDeclaration, serde_json::Error> {
    let old: LegacyApplied = serde_json::from_value(value)?;
    let (enabled, down, up) = old.network;
    Ok(AppliedDeclaration {
        version: APPLIED_VERSION,
        image: old.image,
        hypervisor: old.hypervisor,
        vcpus: old.vcpus,
        memory_bytes: old.memory,
        hotplug_memory_bytes: old.hotplug_memory,
        overlay_size_bytes: old.overlay_size,
        entrypoint: old.entrypoint,
        cmd: old.cmd,
        workdir: old.workdir,
        env: old.env,
        env_files: Vec::new(),
        env_files_digest: None,
        network: AppliedNetwork { enabled, bandwidth_down: limit(down), bandwidth_up: limit(up) },
        disk_io: limit(old.disk_io),
        devices: old.devices,
        volumes: old
            .volumes
            .into_iter()
            .map(|(source, mount, readonly)| AppliedVolume { source, mount, readonly })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_says_nothing_reads_as_every_default() {
        let read: AppliedDeclaration = serde_json::from_str("{}").unwrap();
        assert_eq!(read, AppliedDeclaration::default());
        let legacy = from_legacy(serde_json::json!({})).unwrap();
        assert_eq!(legacy, AppliedDeclaration::default());
    }

    #[test]
    fn a_legacy_object_converts_field_by_field() {
        let old = serde_json::json!({
            "image": "docker.io/library/busybox:latest",
            "hypervisor": "qemu",
            "vcpus": 2,
            "memory": 268435456u64,
            "hotplug_memory": 0,
            "overlay_size": 1073741824u64,
            "entrypoint": null,
            "cmd": ["sh", "-c", "echo hi"],
            "workdir": null,
            "env": { "A": "1" },
            "network": [true, [null, null], [1000, null]],
            "disk_io": [52428800, 1000],
            "devices": [],
            "volumes": [["/var/lib/data.raw", "/data", false]],
        });
        let new = from_legacy(old).unwrap();
        assert_eq!(new.hypervisor, Some(HypervisorKind::Qemu));
        assert_eq!((new.vcpus, new.memory_bytes), (2, 256 << 20));
        assert_eq!(new.cmd.as_deref(), Some(&["sh".to_string(), "-c".into(), "echo hi".into()][..]));
        assert_eq!(new.env.get("A").map(String::as_str), Some("1"));
        assert!(new.network.enabled);
        assert_eq!(new.network.bandwidth_up.bytes_per_sec, Some(1000));
        assert_eq!(new.disk_io, AppliedLimit { bytes_per_sec: Some(52428800), ops_per_sec: Some(1000) });
        assert_eq!(new.volumes, vec![AppliedVolume { source: "/var/lib/data.raw".into(), mount: "/data".into(), readonly: false }]);
    }

    #[test]
    fn a_legacy_object_of_another_shape_is_refused() {
        assert!(from_legacy(serde_json::json!({ "vcpus": "two" })).is_err());
        assert!(from_legacy(serde_json::json!({ "surprise": 1 })).is_err());
        assert!(from_legacy(serde_json::json!([1, 2])).is_err());
    }

    #[test]
    fn only_differing_fields_are_named() {
        let a = AppliedDeclaration { image: "x".into(), ..AppliedDeclaration::default() };
        assert!(a.differing_fields(&a.clone()).is_empty());
        let b = AppliedDeclaration { vcpus: 4, env: [("K".into(), "v".into())].into(), ..a.clone() };
        assert_eq!(a.differing_fields(&b), vec!["vcpus", "env"]);
        // The format's version is not a field of the declaration.
        let c = AppliedDeclaration { version: 7, ..a.clone() };
        assert!(a.differing_fields(&c).is_empty());
    }
}
