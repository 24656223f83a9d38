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
        .any(|u| matches!(&u.problem, StoreError::Parse { path, .. } if *path == store.guest_paths(bad.id).metadata)
            && u.id == Some(bad.id)));
    assert!(listing
        .unreadable
        .iter()
        .any(|u| matches!(&u.problem, StoreError::NotAGuest { path } if path.ends_with("not-a-guest")) && u.id.is_none()));
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

/// A store with guests `web` (whose record is then replaced by `bytes`)
/// and `db`, reopened as the daemon opens it.
fn store_with_damaged_web(bytes: &[u8]) -> (TempDir, Store, Metadata, Metadata) {
    let (tmp, store, web) = store_with_guest("web");
    let db = store.create_guest("db", HypervisorKind::Qemu).unwrap();
    fs::write(store.guest_paths(web.id).metadata, bytes).unwrap();
    drop(store);
    let store = Store::open_and_recover(tmp.path()).unwrap();
    (tmp, store, web, db)
}

/// `web` as a newer hypeman would write it: its version first, as every
/// hypeman writes it, and a member this one does not know.
fn newer_record(web: &Metadata) -> Vec<u8> {
    let text = String::from_utf8(serde_json::to_vec_pretty(web).unwrap()).unwrap();
    let current = format!("\"version\": {CURRENT_VERSION},");
    assert!(text.contains(&current));
    let newer = format!("\"version\": {},\n  \"something_new\": {{ \"name\": \"not the name\" }},", CURRENT_VERSION + 1);
    text.replacen(&current, &newer, 1).into_bytes()
}

fn maybe_held(result: Result<Option<Metadata>, StoreError>) -> Option<(String, std::path::PathBuf)> {
    match result {
        Err(StoreError::MaybeHeldByUnreadable { name, path, .. }) => Some((name, path)),
        Ok(_) | Err(_) => None,
    }
}

#[test]
fn a_truncated_record_that_still_says_its_name_is_never_absent_under_it() {
    let (tmp0, s0, web0) = store_with_guest("web");
    let whole = fs::read(s0.guest_paths(web0.id).metadata).unwrap();
    drop((tmp0, s0));
    let cut = String::from_utf8(whole.clone()).unwrap().find("\"created_at\"").unwrap();
    let (_tmp, store, web, db) = store_with_damaged_web(&whole[..cut]);
    let path = store.guest_paths(web.id).metadata;
    assert_eq!(maybe_held(store.find_by_name("web")), Some(("web".to_string(), path.clone())));
    // Other names are answered as usual: the record says it is not theirs.
    assert_eq!(store.find_by_name("db").unwrap().map(|m| m.id), Some(db.id));
    assert!(store.find_by_name("api").unwrap().is_none());
    // No second guest of that name.
    assert!(matches!(
        store.create_guest("web", HypervisorKind::Qemu),
        Err(StoreError::MaybeHeldByUnreadable { .. })
    ));
    let listing = store.list().unwrap();
    assert_eq!(listing.unreadable.len(), 1);
    let u = &listing.unreadable[0];
    assert_eq!((u.id, u.name.as_deref(), u.path.clone()), (Some(web.id), Some("web"), path));
    assert!(matches!(u.problem, StoreError::Parse { .. }));
    assert!(!u.is_newer());
}

#[test]
fn a_record_without_a_readable_name_may_hold_any_name_not_found_otherwise() {
    let (_tmp, store, web, db) = store_with_damaged_web(b"{\"vers");
    let path = store.guest_paths(web.id).metadata;
    for name in ["web", "api", "anything"] {
        assert_eq!(maybe_held(store.find_by_name(name)), Some((name.to_string(), path.clone())), "{name}");
    }
    assert_eq!(store.find_by_name("db").unwrap().map(|m| m.id), Some(db.id), "a readable guest is found");
    assert!(store.create_guest("api", HypervisorKind::Qemu).is_err());
    // A missing record says nothing either.
    fs::remove_file(&path).unwrap();
    assert!(maybe_held(store.find_by_name("api")).is_some());
    // A stray entry is not a record: it holds no name.
    fs::write(&path, serde_json::to_vec(&web).unwrap()).unwrap();
    fs::create_dir(store.guest_paths(web.id).dir.parent().unwrap().join("lost+found")).unwrap();
    assert!(store.find_by_name("api").unwrap().is_none());
}

#[test]
fn a_record_from_a_newer_hypeman_is_never_rewritten_deleted_or_repaired() {
    let (_tmp0, s0, web0) = store_with_guest("web");
    let newer = newer_record(&web0);
    drop((_tmp0, s0));
    let (tmp, store, web, _db) = store_with_damaged_web(&newer);
    let paths = store.guest_paths(web.id);
    // What a crash of the newer hypeman may have left: a temp file and a
    // partial snapshot. Repair at open must leave them to it.
    let temp = paths.dir.join(".metadata.json.1.0.tmp");
    fs::write(&temp, b"{}").unwrap();
    fs::create_dir_all(paths.snapshot_partial()).unwrap();
    drop(store);
    let store = Store::open_and_recover(tmp.path()).unwrap();
    assert!(temp.exists(), "temp files beside a newer record are kept");
    assert!(paths.snapshot_partial().exists(), "a newer hypeman's partial snapshot is kept");

    let listing = store.list().unwrap();
    assert!(listing.unreadable[0].is_newer());
    assert_eq!(listing.unreadable[0].name.as_deref(), Some("web"));
    assert!(maybe_held(store.find_by_name("web")).is_some());

    // Even a caller holding a record of its own cannot write or delete it.
    let err = store.write_metadata(&web).unwrap_err();
    assert!(matches!(err, StoreError::NewerRecord { found, .. } if found == u64::from(CURRENT_VERSION) + 1), "{err:?}");
    assert!(matches!(store.delete_guest(web.id), Err(StoreError::NewerRecord { .. })));
    assert_eq!(fs::read(&paths.metadata).unwrap(), newer, "byte for byte as the newer hypeman left it");
    assert!(paths.dir.exists());

    // A truncated newer record is refused as well, as far as it says.
    let cut = &newer[..newer.len() / 2];
    fs::write(&paths.metadata, cut).unwrap();
    assert!(matches!(store.write_metadata(&web), Err(StoreError::NewerRecord { .. })));
    assert_eq!(fs::read(&paths.metadata).unwrap(), cut);
}

#[test]
fn a_damaged_record_of_this_format_may_be_written_over_whole() {
    let (_tmp, store, web, _db) = store_with_damaged_web(b"{\"version\": 3, \"id\": \"01");
    store.write_metadata(&web).unwrap();
    assert_eq!(store.find_by_name("web").unwrap().map(|m| m.id), Some(web.id));
}
