//! Tests of `Store` as a whole: guest lifecycle, crash leftovers, listing
//! and lookup. Snapshot, metadata-format and primitive tests live beside
//! their modules.

use std::fs;
use std::path::Path;

use tempfile::TempDir;
use ulid::Ulid;

use super::*;
use crate::hypervisor::HypervisorKind;

/// A fresh store holding one guest called `name`.
pub(crate) fn store_with_guest(name: &str) -> (TempDir, Store, Metadata) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_and_recover(tmp.path()).unwrap();
    let m = store
        .create_guest(name, HypervisorKind::CloudHypervisor)
        .unwrap();
    (tmp, store, m)
}

fn id(s: &str) -> Ulid {
    Ulid::from_string(s).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn open_creates_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("var/lib/hypeman");
    let store = Store::open_and_recover(&data).unwrap();
    assert_eq!(store.data_dir(), data);
    assert_eq!(entries(&data), vec!["guests", "images", "system"]);
    // Re-opening an existing data dir is fine.
    Store::open_and_recover(&data).unwrap();
}

#[test]
fn open_refuses_a_data_dir_too_long_for_sockets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d".repeat(100));
    match Store::open_and_recover(&data) {
        Err(StoreError::SocketPathTooLong { path, .. }) => assert!(path.starts_with(&data)),
        other => panic!("expected SocketPathTooLong, got {other:?}"),
    }
}

#[test]
fn create_guest_builds_a_complete_directory() {
    let (_tmp, store, m) = store_with_guest("web");
    assert_eq!(m.name, "web");
    assert_eq!(m.version, CURRENT_VERSION);
    assert_eq!(m.hypervisor, HypervisorKind::CloudHypervisor);
    let paths = store.guest_paths(m.id);
    assert!(paths.logs_dir.is_dir());
    assert_eq!(store.read_metadata(m.id).unwrap(), m);
    assert_eq!(
        entries(&store.data_dir().join("guests")),
        vec![m.id.to_string()]
    );
    assert_eq!(entries(&paths.dir), vec!["logs", "metadata.json"]);
}

#[test]
fn create_guest_refuses_a_taken_name() {
    let (_tmp, store, m) = store_with_guest("web");
    match store.create_guest("web", HypervisorKind::Qemu) {
        Err(e @ StoreError::NameTaken { .. }) => {
            assert_eq!(
                e.to_string(),
                format!("the name \"web\" is already used by guest {}", m.id)
            );
        }
        other => panic!("expected NameTaken, got {other:?}"),
    }
    assert_eq!(store.list().unwrap().guests.len(), 1);
}

#[test]
fn a_crashed_create_is_invisible_and_removed_by_open() {
    let (tmp, store, m) = store_with_guest("web");
    // A create killed after writing its staging dir but before the rename.
    let crashed = Ulid::new();
    let staging = tmp.path().join(format!("guests/.{crashed}.tmp"));
    fs::create_dir_all(staging.join("logs")).unwrap();
    fs::write(staging.join("metadata.json"), b"{\"version\": 1, \"na").unwrap();

    let listing = store.list().unwrap();
    assert_eq!(listing.guests, vec![m.clone()]);
    assert!(listing.unreadable.is_empty());
    assert!(matches!(
        store.read_metadata(crashed),
        Err(StoreError::GuestNotFound { .. })
    ));
    drop(store);

    let store = Store::open_and_recover(tmp.path()).unwrap();
    assert!(!staging.exists());
    assert_eq!(entries(&tmp.path().join("guests")), vec![m.id.to_string()]);
    assert_eq!(store.list().unwrap().guests, vec![m]);
}

#[test]
fn delete_guest_removes_everything_and_is_idempotent() {
    let (tmp, store, m) = store_with_guest("web");
    let partial = store.begin_snapshot(m.id).unwrap();
    fs::write(partial.join("memory"), b"m").unwrap();
    store
        .commit_snapshot(
            m.id,
            &SnapshotInfo::new(HypervisorKind::CloudHypervisor, "v44", "h", 1),
        )
        .unwrap();

    store.delete_guest(m.id).unwrap();
    assert!(entries(&tmp.path().join("guests")).is_empty());
    assert!(store.list().unwrap().guests.is_empty());
    assert!(matches!(
        store.read_metadata(m.id),
        Err(StoreError::GuestNotFound { .. })
    ));
    store.delete_guest(m.id).unwrap();
    store.delete_guest(Ulid::new()).unwrap();
    // The name is free again.
    store.create_guest("web", HypervisorKind::Qemu).unwrap();
}

#[test]
fn a_crashed_delete_is_invisible_and_finished_by_open() {
    let (tmp, store, m) = store_with_guest("web");
    let keep = store.create_guest("db", HypervisorKind::Qemu).unwrap();
    // delete_guest's rename happened, the removal did not (or only partly).
    let deleting = tmp.path().join(format!("guests/.{}.deleting", m.id));
    fs::rename(store.guest_paths(m.id).dir, &deleting).unwrap();
    fs::remove_file(deleting.join("metadata.json")).unwrap();

    assert_eq!(store.list().unwrap().guests, vec![keep.clone()]);
    assert!(store.list().unwrap().unreadable.is_empty());
    drop(store);

    let store = Store::open_and_recover(tmp.path()).unwrap();
    assert!(!deleting.exists());
    assert_eq!(store.list().unwrap().guests, vec![keep]);
}

#[test]
fn delete_replaces_a_stale_deleting_dir() {
    let (tmp, store, m) = store_with_guest("web");
    let deleting = tmp.path().join(format!("guests/.{}.deleting", m.id));
    fs::create_dir_all(deleting.join("logs")).unwrap();
    store.delete_guest(m.id).unwrap();
    assert!(entries(&tmp.path().join("guests")).is_empty());
}

#[test]
fn write_metadata_round_trips_and_stamps_updated_at() {
    let (_tmp, store, mut m) = store_with_guest("web");
    m.last_error = Some("boot failed".into());
    m.vmm = Some(VmmRecord {
        pid: 7,
        pid_start_time: 99,
        socket: store.guest_paths(m.id).ch_socket,
        version: None,
    });
    m.updated_at = "1970-01-01T00:00:00.000Z".into();
    store.write_metadata(&m).unwrap();

    let back = store.read_metadata(m.id).unwrap();
    assert_ne!(back.updated_at, m.updated_at);
    assert_eq!(
        Metadata {
            updated_at: m.updated_at.clone(),
            ..back
        },
        m
    );
    assert!(entries(&store.guest_paths(m.id).dir)
        .iter()
        .all(|n| !n.ends_with(".tmp")));
}

#[test]
fn write_metadata_does_not_resurrect_a_deleted_guest() {
    let (tmp, store, m) = store_with_guest("web");
    store.delete_guest(m.id).unwrap();
    assert!(matches!(
        store.write_metadata(&m),
        Err(StoreError::GuestNotFound { .. })
    ));
    assert!(entries(&tmp.path().join("guests")).is_empty());
}

#[test]
fn a_crash_between_temp_write_and_rename_keeps_the_old_metadata() {
    let (tmp, store, mut m) = store_with_guest("web");
    m.last_error = Some("old".into());
    store.write_metadata(&m).unwrap();
    let before = store.read_metadata(m.id).unwrap();

    // write_metadata's first half, then the process dies.
    let paths = store.guest_paths(m.id);
    let mut newer = before.clone();
    newer.last_error = Some("new".into());
    let staged = durable::stage(
        &paths.metadata,
        &metadata::encode(&newer, &paths.metadata).unwrap(),
    )
    .unwrap();
    let temp = staged.temp_path().to_path_buf();
    drop(staged);

    assert!(temp.exists());
    assert_eq!(store.read_metadata(m.id).unwrap(), before);
    assert_eq!(store.list().unwrap().guests, vec![before.clone()]);
    drop(store);

    let store = Store::open_and_recover(tmp.path()).unwrap();
    assert!(!temp.exists(), "open sweeps the stray temp file");
    assert_eq!(store.read_metadata(m.id).unwrap(), before);
    assert_eq!(
        store.read_metadata(m.id).unwrap().last_error.as_deref(),
        Some("old")
    );
}

#[test]
fn list_reports_a_corrupt_guest_without_hiding_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_and_recover(tmp.path()).unwrap();
    let zed = store.create_guest("zed", HypervisorKind::Qemu).unwrap();
    let bad = store.create_guest("bad", HypervisorKind::Qemu).unwrap();
    let api = store
        .create_guest("api", HypervisorKind::CloudHypervisor)
        .unwrap();
    fs::write(
        store.guest_paths(bad.id).metadata,
        b"{\"version\": 1, \"id\": ",
    )
    .unwrap();
    fs::create_dir(tmp.path().join("guests/not-a-guest")).unwrap();

    let listing = store.list().unwrap();
    let names: Vec<&str> = listing.guests.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["api", "zed"]);
    assert_eq!(listing.guests[0].id, api.id);
    assert_eq!(listing.guests[1].id, zed.id);
    assert_eq!(listing.unreadable.len(), 2, "{:?}", listing.unreadable);
    assert!(listing
        .unreadable
        .iter()
        .any(|e| matches!(e, StoreError::Parse { path, .. } if *path == store.guest_paths(bad.id).metadata)));
    assert!(listing
        .unreadable
        .iter()
        .any(|e| matches!(e, StoreError::NotAGuest { path } if path.ends_with("not-a-guest"))));
}

#[test]
fn metadata_under_the_wrong_directory_is_refused() {
    let (_tmp, store, m) = store_with_guest("web");
    let other = Ulid::new();
    fs::create_dir(store.guest_paths(other).dir).unwrap();
    fs::copy(
        store.guest_paths(m.id).metadata,
        store.guest_paths(other).metadata,
    )
    .unwrap();
    assert!(
        matches!(store.read_metadata(other), Err(StoreError::IdMismatch { found, .. }) if found == m.id)
    );
}

/// Three guests whose IDs share prefixes: A and B share "01J0000000", C differs early.
fn lookup_fixture() -> (TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_and_recover(tmp.path()).unwrap();
    store
        .create_guest_with_id(
            id("01J0000000AAAAAAAAAAAAAAAA"),
            "alpha",
            HypervisorKind::Qemu,
        )
        .unwrap();
    store
        .create_guest_with_id(
            id("01J0000000BBBBBBBBBBBBBBBB"),
            "beta",
            HypervisorKind::Qemu,
        )
        .unwrap();
    // A name that looks like an ID prefix of the others.
    store
        .create_guest_with_id(
            id("01K1111111CCCCCCCCCCCCCCCC"),
            "01J",
            HypervisorKind::Qemu,
        )
        .unwrap();
    (tmp, store)
}

#[test]
fn lookup_by_exact_id_in_any_case() {
    let (_tmp, store) = lookup_fixture();
    assert_eq!(
        store.lookup("01J0000000AAAAAAAAAAAAAAAA").unwrap().name,
        "alpha"
    );
    assert_eq!(
        store.lookup("01j0000000aaaaaaaaaaaaaaaa").unwrap().name,
        "alpha"
    );
}

#[test]
fn lookup_by_exact_name_wins_over_prefix() {
    let (_tmp, store) = lookup_fixture();
    assert_eq!(
        store.lookup("beta").unwrap().id,
        id("01J0000000BBBBBBBBBBBBBBBB")
    );
    // "01J" is a prefix of two IDs, but it is also an exact name.
    assert_eq!(
        store.lookup("01J").unwrap().id,
        id("01K1111111CCCCCCCCCCCCCCCC")
    );
}

#[test]
fn lookup_by_unique_prefix_case_insensitively() {
    let (_tmp, store) = lookup_fixture();
    assert_eq!(store.lookup("01J0000000B").unwrap().name, "beta");
    assert_eq!(store.lookup("01j0000000a").unwrap().name, "alpha");
    assert_eq!(store.lookup("01K").unwrap().name, "01J");
}

#[test]
fn lookup_ambiguous_prefix_names_every_match() {
    let (_tmp, store) = lookup_fixture();
    match store.lookup("01j0") {
        Err(e @ StoreError::Ambiguous { .. }) => {
            insta::assert_snapshot!(e.to_string(), @r#""01j0" matches more than one guest: 01J0000000AAAAAAAAAAAAAAAA (alpha), 01J0000000BBBBBBBBBBBBBBBB (beta)"#)
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
}

#[test]
fn lookup_ambiguous_prefix_includes_unreadable_guests() {
    let (_tmp, store) = lookup_fixture();
    fs::write(
        store.guest_paths(id("01J0000000BBBBBBBBBBBBBBBB")).metadata,
        b"garbage",
    )
    .unwrap();
    match store.lookup("01J0") {
        Err(StoreError::Ambiguous { matches, .. }) => {
            assert_eq!(
                matches,
                vec![
                    "01J0000000AAAAAAAAAAAAAAAA (alpha)",
                    "01J0000000BBBBBBBBBBBBBBBB (unreadable)"
                ]
            );
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
}

#[test]
fn lookup_not_found() {
    let (_tmp, store) = lookup_fixture();
    for query in ["nope", "01Z", "", "01J0000000AAAAAAAAAAAAAAAB"] {
        match store.lookup(query) {
            Err(StoreError::NotFound { query: q }) => assert_eq!(q, query),
            other => panic!("{query:?}: expected NotFound, got {other:?}"),
        }
    }
    assert_eq!(
        StoreError::NotFound {
            query: "nope".into()
        }
        .to_string(),
        "no guest matches \"nope\""
    );
}
