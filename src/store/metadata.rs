//! `metadata.json`: the persisted record of one guest, and the versioned
//! JSON reading shared with the snapshot marker.
//!
//! Reading looks at `version` before anything else, so a file written by a
//! newer hypeman is reported as such rather than as a confusing field error.
//! When the format changes: bump `CURRENT_VERSION`, keep the old shape,
//! convert in [`decode_metadata`], and add a fixture of the new version next
//! to `fixtures/metadata-v1.json` (every one of which must keep parsing
//! forever).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

use super::applied::{self, AppliedDeclaration, APPLIED_VERSION};
use super::error::StoreError;
use crate::hypervisor::HypervisorKind;
use crate::exit::GuestEnd;

/// The metadata format this build writes and the newest it reads.
/// 2 added `exited`; a version-1 file reads as one without it. 3 made
/// `applied` (and `exited.applied`) a typed [`AppliedDeclaration`]; the
/// untyped objects of versions 1 and 2 are converted on read.
pub const CURRENT_VERSION: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub version: u32,
    pub id: Ulid,
    /// The declaration file stem; unique among guests.
    pub name: String,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    pub hypervisor: HypervisorKind,
    /// The live VMM process, if one was started.
    pub vmm: Option<VmmRecord>,
    /// The declaration the current VM or snapshot was made from; written
    /// before its VMM is started, so a VMM found after a crash is never
    /// without it. Boxed: a record is held by every look in progress.
    pub applied: Option<Box<AppliedDeclaration>>,
    pub last_error: Option<String>,
    pub network: Option<NetworkLease>,
    /// How the guest last ended on its own, until it boots again or is
    /// declared stopped; the restart policy decides from it.
    #[serde(default)]
    pub exited: Option<ExitRecord>,
    /// Why the guest's running state was lost (its VMM died while its
    /// snapshot was written), until the declaration says what now: a
    /// fresh boot is never presented as the user's standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// The declaration has said what now (it was stopped after the loss, or
    /// already was): the loss stays in `status` until the guest boots
    /// again, but no longer holds anything back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost_answered: bool,
    /// The uid this guest's VMM runs as (`[vmm] users = "per-instance"`),
    /// recorded before its first VMM starts and kept until the guest is
    /// removed, so a restore and an adopted VMM keep the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_uid: Option<u32>,
    /// RFC 3339; set by `Store::write_metadata` on every write.
    pub updated_at: String,
}

/// A guest that ended without the daemon asking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    pub end: GuestEnd,
    /// The declaration the ended VM ran with: a changed declaration
    /// boots again whatever the policy.
    pub applied: Option<Box<AppliedDeclaration>>,
    /// RFC 3339, when the daemon noticed.
    pub at: String,
}

/// A started VMM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot):
    /// a pid with a different start time is some other process.
    pub pid_start_time: u64,
    /// The API socket (CH) or QMP socket (QEMU).
    pub socket: PathBuf,
    pub version: Option<String>,
}

/// The guest's address on the host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkLease {
    pub ip: String,
    /// Prefix length.
    pub cidr: u8,
    pub gateway: String,
    pub mac: String,
    pub tap: String,
}

impl Metadata {
    /// A fresh record for a guest that has never run.
    pub fn new(id: Ulid, name: &str, hypervisor: HypervisorKind) -> Metadata {
        let now = now_rfc3339();
        Metadata {
            version: CURRENT_VERSION,
            id,
            name: name.to_string(),
            created_at: now.clone(),
            hypervisor,
            vmm: None,
            applied: None,
            last_error: None,
            network: None,
            exited: None,
            lost: None,
            lost_answered: false,
            vmm_uid: None,
            updated_at: now,
        }
    }
}

/// The current time as the store writes it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Pretty JSON with a trailing newline, as written to disk.
pub(crate) fn encode<T: Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses `bytes` as JSON and returns it with its `version`, refusing
/// versions this build does not know (0 included: versions start at 1).
pub(crate) fn versioned_value(
    bytes: &[u8],
    path: &Path,
    supported: u32,
) -> Result<(u32, serde_json::Value), StoreError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| StoreError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    let found = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| StoreError::MissingVersion {
            path: path.to_path_buf(),
        })?;
    match u32::try_from(found) {
        Ok(v) if (1..=supported).contains(&v) => Ok((v, value)),
        _ => Err(StoreError::UnsupportedVersion {
            path: path.to_path_buf(),
            found,
            supported,
        }),
    }
}

/// Decodes the bytes of a `metadata.json` read from `path`.
pub(crate) fn decode_metadata(bytes: &[u8], path: &Path) -> Result<Metadata, StoreError> {
    let (version, mut value) = versioned_value(bytes, path, CURRENT_VERSION)?;
    let parse = |source| StoreError::Parse {
        path: path.to_path_buf(),
        source,
    };
    let m: Metadata = match version {
        // Version 1 lacks only `exited`, which defaults to none; both keep
        // the applied declaration as an untyped object.
        1 | 2 => {
            convert_legacy_applied(&mut value).map_err(parse)?;
            serde_json::from_value(value).map_err(parse)?
        }
        3 => serde_json::from_value(value).map_err(parse)?,
        // `versioned_value` admits only 1..=CURRENT_VERSION.
        found => {
            return Err(StoreError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: u64::from(found),
                supported: CURRENT_VERSION,
            })
        }
    };
    let newest = [m.applied.as_ref(), m.exited.as_ref().and_then(|e| e.applied.as_ref())]
        .into_iter()
        .flatten()
        .map(|a| a.version)
        .max();
    match newest {
        Some(found) if found == 0 || found > APPLIED_VERSION => Err(StoreError::UnsupportedAppliedVersion {
            path: path.to_path_buf(),
            found,
            supported: APPLIED_VERSION,
        }),
        Some(_) | None => Ok(m),
    }
}

/// Replaces the untyped `applied` objects of a version 1 or 2 record (its
/// own and its exit record's) by their typed form.
fn convert_legacy_applied(value: &mut serde_json::Value) -> Result<(), serde_json::Error> {
    let convert = |slot: Option<&mut serde_json::Value>| -> Result<(), serde_json::Error> {
        if let Some(slot) = slot {
            if !slot.is_null() {
                *slot = serde_json::to_value(applied::from_legacy(slot.take())?)?;
            }
        }
        Ok(())
    };
    convert(value.get_mut("applied"))?;
    convert(value.get_mut("exited").and_then(|e| e.get_mut("applied")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_V1: &str = include_str!("fixtures/metadata-v1.json");
    const FIXTURE_V2: &str = include_str!("fixtures/metadata-v2.json");
    const FIXTURE_V3: &str = include_str!("fixtures/metadata-v3.json");

    fn sample() -> Metadata {
        let mut m = Metadata::new(Ulid::new(), "web", HypervisorKind::CloudHypervisor);
        m.vmm = Some(VmmRecord {
            pid: 4242,
            pid_start_time: 123456,
            socket: PathBuf::from("/var/lib/hypeman/guests/01ARZ3NDEKTSV4RRFFQ69G5FAV/ch.sock"),
            version: Some("v44.0".into()),
        });
        m.applied = Some(Box::new(AppliedDeclaration {
            image: "docker.io/library/nginx:alpine".into(),
            hypervisor: Some(HypervisorKind::CloudHypervisor),
            vcpus: 2,
            env: [("GREETING".to_string(), "hello".to_string())].into(),
            ..AppliedDeclaration::default()
        }));
        m.network = Some(NetworkLease {
            ip: "10.100.0.2".into(),
            cidr: 16,
            gateway: "10.100.0.1".into(),
            mac: "02:00:0a:64:00:02".into(),
            tap: "hm-01arz3nd".into(),
        });
        m.exited = Some(ExitRecord {
            end: GuestEnd::Killed { signal: 9 },
            applied: m.applied.clone(),
            at: "2026-01-15T09:31:02.456Z".into(),
        });
        m
    }

    #[test]
    fn fixture_v1_still_parses() {
        let m = decode_metadata(FIXTURE_V1.as_bytes(), Path::new("metadata-v1.json")).unwrap();
        assert_eq!(m.version, 1);
        assert_eq!(m.exited, None, "version 1 has no exit record");
        assert_eq!(m.id.to_string(), "01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert_eq!(m.name, "web");
        assert_eq!(m.hypervisor, HypervisorKind::Qemu);
        let vmm = m.vmm.expect("fixture has a vmm");
        assert_eq!((vmm.pid, vmm.pid_start_time), (4242, 987654));
        assert_eq!(m.network.expect("fixture has a lease").cidr, 16);
        let applied = m.applied.expect("fixture has applied fields");
        assert_eq!(applied.vcpus, 2);
        assert_eq!(applied.memory_bytes, 1 << 30);
        assert_eq!(applied.hypervisor, Some(HypervisorKind::Qemu));
        // Fields the old object did not have read as their defaults.
        assert_eq!(applied.overlay_size_bytes, AppliedDeclaration::default().overlay_size_bytes);
        assert_eq!(applied.cmd, None);
    }

    #[test]
    fn fixture_v2_still_parses() {
        let m = decode_metadata(FIXTURE_V2.as_bytes(), Path::new("metadata-v2.json")).unwrap();
        assert_eq!(m.version, 2);
        assert!(m.vmm.is_none());
        let exited = m.exited.expect("fixture has an exit");
        assert_eq!(exited.end, GuestEnd::Exited { status: 3 });
        assert_eq!(exited.applied.expect("with the fields it ran with").vcpus, 2);
        assert_eq!(m.applied.expect("applied").image, "docker.io/library/nginx:alpine");
    }

    #[test]
    fn fixture_v3_still_parses_and_is_what_this_build_writes() {
        let m = decode_metadata(FIXTURE_V3.as_bytes(), Path::new("metadata-v3.json")).unwrap();
        assert_eq!(m.version, 3);
        let applied = m.applied.as_ref().expect("fixture has applied fields");
        assert_eq!(applied.version, APPLIED_VERSION);
        assert_eq!(applied.cmd.as_deref(), Some(&["sh".to_string(), "-c".into(), "echo hi".into()][..]));
        assert_eq!(m.exited.as_ref().and_then(|e| e.applied.as_ref()), Some(applied));
        // Golden: encoding what was read gives the fixture back byte for
        // byte, so the format cannot drift without a new version.
        assert_eq!(String::from_utf8(encode(&m, Path::new("m.json")).unwrap()).unwrap(), FIXTURE_V3);
    }

    #[test]
    fn every_old_fixture_converts_to_what_the_current_format_reads_back() {
        for (name, text) in [("v1", FIXTURE_V1), ("v2", FIXTURE_V2)] {
            let old = decode_metadata(text.as_bytes(), Path::new(name)).unwrap();
            let bytes = encode(&Metadata { version: CURRENT_VERSION, ..old.clone() }, Path::new(name)).unwrap();
            let again = decode_metadata(&bytes, Path::new(name)).unwrap();
            assert_eq!(again, Metadata { version: CURRENT_VERSION, ..old }, "{name}");
        }
    }

    #[test]
    fn a_legacy_applied_object_of_another_shape_is_a_parse_error() {
        let mut value: serde_json::Value = serde_json::from_str(FIXTURE_V2).unwrap();
        value["applied"]["vcpus"] = serde_json::json!("two");
        let bytes = serde_json::to_vec(&value).unwrap();
        assert!(matches!(decode_metadata(&bytes, Path::new("m.json")), Err(StoreError::Parse { .. })));
    }

    #[test]
    fn an_applied_declaration_of_a_newer_format_is_refused() {
        let mut value: serde_json::Value = serde_json::from_str(FIXTURE_V3).unwrap();
        value["applied"]["version"] = serde_json::json!(APPLIED_VERSION + 1);
        let bytes = serde_json::to_vec(&value).unwrap();
        assert!(matches!(
            decode_metadata(&bytes, Path::new("m.json")),
            Err(StoreError::UnsupportedAppliedVersion { .. })
        ));
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let bytes = encode(&m, Path::new("m.json")).unwrap();
        assert_eq!(decode_metadata(&bytes, Path::new("m.json")).unwrap(), m);
    }

    #[test]
    fn metadata_json_shape() {
        insta::assert_json_snapshot!(sample(), {
            ".id" => "[id]",
            ".created_at" => "[timestamp]",
            ".updated_at" => "[timestamp]",
        });
    }

    #[test]
    fn newer_version_is_reported_as_such_even_with_unknown_fields() {
        let bytes =
            br#"{ "version": 4, "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "shiny_new_field": true }"#;
        match decode_metadata(bytes, Path::new("/d/metadata.json")) {
            Err(
                e @ StoreError::UnsupportedVersion {
                    found: 4,
                    supported: 3,
                    ..
                },
            ) => {
                assert_eq!(
                    e.to_string(),
                    "/d/metadata.json has format version 4, this hypeman reads versions up to 3"
                );
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }

    #[test]
    fn version_zero_missing_or_non_numeric_is_refused() {
        let p = Path::new("m.json");
        assert!(matches!(
            decode_metadata(br#"{"version": 0}"#, p),
            Err(StoreError::UnsupportedVersion { found: 0, .. })
        ));
        assert!(matches!(
            decode_metadata(br#"{"name": "web"}"#, p),
            Err(StoreError::MissingVersion { .. })
        ));
        assert!(matches!(
            decode_metadata(br#"{"version": "1"}"#, p),
            Err(StoreError::MissingVersion { .. })
        ));
        assert!(matches!(
            decode_metadata(b"{ not json", p),
            Err(StoreError::Parse { .. })
        ));
    }

    #[test]
    fn unknown_fields_in_current_version_are_refused() {
        let mut value: serde_json::Value = serde_json::from_str(FIXTURE_V3).unwrap();
        value["surprise"] = serde_json::json!(1);
        let bytes = serde_json::to_vec(&value).unwrap();
        assert!(matches!(
            decode_metadata(&bytes, Path::new("m.json")),
            Err(StoreError::Parse { .. })
        ));
    }
}
