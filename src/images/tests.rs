use super::*;
use std::io::Write;
use std::process::Command;

/// Writes `bytes` as a blob of the layout at `dir` and returns its descriptor JSON.
fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let digest = source::sha256_digest(bytes);
    let path = dir.join("blobs/sha256").join(hex_of(&digest));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
}

fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        match link {
            Some(l) => b.append_link(&mut h, name, l).unwrap(),
            None => b.append_data(&mut h, name, *data).unwrap(),
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A two-layer image manifest: the second layer deletes a file of the
/// first and hard-links another. Returns the manifest descriptor.
fn image_manifest(dir: &Path, marker: &str) -> serde_json::Value {
    use tar::EntryType::*;
    let l1 = tar_of(&[
        ("etc", Directory, b"", None),
        ("etc/motd", Regular, marker.as_bytes(), None),
        ("etc/doomed", Regular, b"bye", None),
    ]);
    let l2 = tar_of(&[
        ("etc/.wh.doomed", Regular, b"", None),
        ("etc/motd.link", Link, b"", Some("etc/motd")),
    ]);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "Env": ["PATH=/bin"], "WorkingDir": "/srv", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(dir, "application/vnd.oci.image.config.v1+json", config.to_string().as_bytes()),
        "layers": [
            blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&l1)),
            blob(dir, "application/vnd.oci.image.layer.v1.tar", &l2),
        ],
    });
    blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().as_bytes(),
    )
}

fn write_index(dir: &Path, entries: Vec<serde_json::Value>) {
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": entries});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

fn tagged(mut desc: serde_json::Value, tag: &str) -> serde_json::Value {
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    desc
}

/// Lists an erofs image's files by extracting it.
fn erofs_extract(image: &Path, into: &Path) {
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn temp_names(store: &ImageStore) -> Vec<String> {
    fs::read_dir(&store.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_image_is_converted_once_and_then_served_from_cache() {
    if !crate::test_gate::tools(&["mkfs.erofs", "fsck.erofs"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let manifest = image_manifest(&layout, "hello");
    write_index(&layout, vec![tagged(manifest.clone(), "v1")]);
    let store = ImageStore::open(&tmp.path().join("data"), ImageStoreOptions::default()).unwrap();
    let reference = format!("oci:{}:v1", layout.display());

    let info = store.ensure(&reference).await.unwrap();
    assert_eq!(info.digest, manifest["digest"]);
    assert_eq!(info.references, std::slice::from_ref(&reference));
    assert_eq!(info.format, RootfsFormat::Erofs);
    assert_eq!(
        info.config,
        ImageConfig {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into()],
            workdir: Some("/srv".into()),
            user: Some("1000".into()),
        }
    );
    assert_eq!(
        info.rootfs,
        tmp.path()
            .join("data/images")
            .join(hex_of(&info.digest))
            .join("rootfs.erofs")
    );
    assert_eq!(info.unpacked_bytes, 5 + 3);
    let extracted = tmp.path().join("x");
    erofs_extract(&info.rootfs, &extracted);
    assert_eq!(fs::read(extracted.join("etc/motd")).unwrap(), b"hello");
    assert_eq!(fs::read(extracted.join("etc/motd.link")).unwrap(), b"hello");
    assert!(!extracted.join("etc/doomed").exists());
    assert!(temp_names(&store).is_empty());

    // With every blob gone from the layout, only the cache can answer.
    fs::remove_dir_all(layout.join("blobs")).unwrap();
    let again = store.ensure(&reference).await.unwrap();
    assert_eq!(again, info);

    // A changed index.json is re-read, but the digest is cached: no blob needed.
    let manifest_again = image_manifest(&layout, "hello");
    write_index(
        &layout,
        vec![
            tagged(manifest_again, "v1"),
            tagged(manifest.clone(), "other"),
        ],
    );
    let blobs_dir = layout.join("blobs/sha256");
    for entry in fs::read_dir(&blobs_dir).unwrap() {
        let path = entry.unwrap().path();
        if !manifest["digest"]
            .as_str()
            .unwrap()
            .ends_with(&*path.file_name().unwrap().to_string_lossy())
        {
            fs::remove_file(path).unwrap();
        }
    }
    assert_eq!(store.ensure(&reference).await.unwrap().digest, info.digest);
    assert_eq!(store.conversions(), 1);

    assert_eq!(store.list().unwrap().images.len(), 1);
    store.remove(&info.digest).unwrap();
    assert_eq!(store.list().unwrap(), ImageListing::default());
    assert!(!info.rootfs.exists());
    assert!(matches!(
        store.remove(&info.digest),
        Err(ImageError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ensures_convert_once() {
    if !crate::test_gate::tools(&["mkfs.erofs"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let manifest = image_manifest(&layout, "x");
    write_index(
        &layout,
        vec![tagged(manifest.clone(), "a"), tagged(manifest, "b")],
    );
    let store =
        std::sync::Arc::new(ImageStore::open(tmp.path(), ImageStoreOptions::default()).unwrap());
    let (s1, s2) = (store.clone(), store.clone());
    let (r1, r2) = (
        format!("oci:{}:a", layout.display()),
        format!("oci:{}:b", layout.display()),
    );
    let (a, b) = tokio::join!(
        tokio::spawn(async move { s1.ensure(&r1).await }),
        tokio::spawn(async move { s2.ensure(&r2).await }),
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a.digest, b.digest);
    assert_eq!(store.conversions(), 1);
    let info = store.get(&a.digest).unwrap().unwrap();
    assert_eq!(info.references.len(), 2, "{:?}", info.references);
}

#[tokio::test]
async fn tampered_blob_is_rejected_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let manifest = image_manifest(&layout, "x");
    write_index(&layout, vec![manifest]);
    // Corrupt the gzip layer (the largest blob that is not JSON).
    let victim = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let mut bytes = fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&victim, bytes).unwrap();
    let store = ImageStore::open(tmp.path(), ImageStoreOptions::default()).unwrap();
    let err = store
        .ensure(&format!("oci:{}", layout.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Digest { .. }), "{err}");
    assert_eq!(store.list().unwrap(), ImageListing::default());
    assert!(temp_names(&store).is_empty());
}

#[tokio::test]
async fn index_picks_the_host_platform_and_archives_work() {
    if !crate::test_gate::tools(&["mkfs.ext4", "debugfs"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let amd64 = image_manifest(&layout, "amd64");
    let arm64 = image_manifest(&layout, "arm64");
    let platform = |mut d: serde_json::Value, arch: &str| {
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        d
    };
    let (host, other) = if source::host_arch() == "arm64" {
        (arm64, amd64)
    } else {
        (amd64, arm64)
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [platform(other, "s390x"), platform(host.clone(), source::host_arch())],
    });
    let index_desc = blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    );
    write_index(&layout, vec![tagged(index_desc, "multi")]);

    // The layout as an archive, with a hostile extra entry that must be ignored.
    let archive = tmp.path().join("image.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    let mut h = tar::Header::new_gnu();
    let name = b"../escaped-from-archive";
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    b.finish().unwrap();

    let options = ImageStoreOptions {
        format: RootfsFormat::Ext4,
        ..ImageStoreOptions::default()
    };
    let store = ImageStore::open(&tmp.path().join("data"), options).unwrap();
    let info = store
        .ensure(&format!("oci-archive:{}:multi", archive.display()))
        .await
        .unwrap();
    assert_eq!(info.digest, host["digest"]);
    assert_eq!(info.format, RootfsFormat::Ext4);
    assert!(info.rootfs.ends_with("rootfs.ext4"));
    let out = Command::new("debugfs")
        .arg("-R")
        .arg("cat /etc/motd")
        .arg(&info.rootfs)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), source::host_arch());
    assert!(!tmp.path().join("escaped-from-archive").exists());
    assert!(!tmp.path().join("data/escaped-from-archive").exists());
    let err = store
        .ensure(&format!("oci-archive:{}:nope", archive.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::TagNotFound { .. }), "{err}");
}

#[tokio::test]
async fn bad_references_and_unknown_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path(), ImageStoreOptions::default()).unwrap();
    assert!(matches!(
        store.ensure("Bad Ref").await,
        Err(ImageError::Reference { .. })
    ));
    assert!(matches!(
        store.ensure("dir:/x").await,
        Err(ImageError::Reference { .. })
    ));
    assert_eq!(store.get("sha256:nothex").unwrap(), None);
    assert!(matches!(
        store.remove("sha256:00"),
        Err(ImageError::NotFound(_))
    ));
    let missing = store
        .ensure(&format!("oci:{}", tmp.path().join("none").display()))
        .await;
    assert!(matches!(missing, Err(ImageError::Io { .. })), "{missing:?}");
}

/// The record of a freshly converted image names its disk's length and
/// digest; a disk truncated, altered in place or removed after that is
/// converted again on the next use (not handed to a guest), with the same
/// digest and contents; an unreadable `image.json` costs only its image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_entry_is_converted_again_and_affects_only_itself() {
    if !crate::test_gate::tools(&["mkfs.erofs", "fsck.erofs"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    write_index(&one, vec![tagged(image_manifest(&one, "first"), "v1")]);
    write_index(&two, vec![tagged(image_manifest(&two, "second"), "v1")]);
    let store = ImageStore::open(&tmp.path().join("data"), ImageStoreOptions::default()).unwrap();
    let (ref_one, ref_two) = (format!("oci:{}:v1", one.display()), format!("oci:{}:v1", two.display()));
    let info = store.ensure(&ref_one).await.unwrap();
    let other = store.ensure(&ref_two).await.unwrap();
    assert_eq!(store.conversions(), 2);

    let record = read_record(&store.image_dir(&info.digest).join(RECORD_FILE)).unwrap();
    let len = fs::metadata(&info.rootfs).unwrap().len();
    assert_eq!(record.rootfs_len, Some(len));
    assert_eq!(record.rootfs_sha256.as_deref(), Some(verify::sha256_file(&info.rootfs).unwrap().as_str()));

    // Truncated (what made guests die of SIGBUS): size, every use.
    fs::File::options().write(true).open(&info.rootfs).unwrap().set_len(len / 2).unwrap();
    let listing = store.list().unwrap();
    assert_eq!(listing.images, vec![other.clone()]);
    assert_eq!(listing.damaged.len(), 1);
    assert_eq!(
        listing.damaged[0].damage,
        Damage::Length { path: info.rootfs.clone(), expected: len, actual: len / 2 }
    );
    let again = store.ensure(&ref_one).await.unwrap();
    assert_eq!((again.digest.as_str(), store.conversions()), (info.digest.as_str(), 3));
    assert_eq!(fs::metadata(&again.rootfs).unwrap().len(), len);
    let extracted = tmp.path().join("x1");
    erofs_extract(&again.rootfs, &extracted);
    assert_eq!(fs::read(extracted.join("etc/motd")).unwrap(), b"first");

    // Same length, one byte flipped: the digest, in a store (a daemon run)
    // that has not checked this disk yet.
    let mut bytes = fs::read(&again.rootfs).unwrap();
    bytes[len as usize / 2] ^= 0xff;
    fs::write(&again.rootfs, &bytes).unwrap();
    let fresh = ImageStore::open(&tmp.path().join("data"), ImageStoreOptions::default()).unwrap();
    assert_eq!(fresh.list().unwrap().images.len(), 2, "a listing checks sizes only");
    fresh.ensure(&ref_one).await.unwrap();
    assert_eq!(fresh.conversions(), 1);
    let rebuilt = read_record(&store.image_dir(&info.digest).join(RECORD_FILE)).unwrap();
    assert_eq!(rebuilt.rootfs_sha256, Some(verify::sha256_file(&info.rootfs).unwrap()));
    let extracted = tmp.path().join("x2");
    erofs_extract(&info.rootfs, &extracted);
    assert_eq!(fs::read(extracted.join("etc/motd")).unwrap(), b"first");

    // A corrupt image.json: listed as damaged, the other image still
    // listed, and a pull repairs it.
    let record_path = store.image_dir(&other.digest).join(RECORD_FILE);
    fs::write(&record_path, b"{ not json").unwrap();
    let listing = store.list().unwrap();
    assert_eq!(listing.images.len(), 1);
    assert_eq!(listing.images[0].digest, info.digest);
    assert!(matches!(&listing.damaged[0].damage, Damage::Record { path, .. } if *path == record_path), "{listing:?}");
    assert_eq!(listing.damaged[0].digest, other.digest);
    let repaired = store.ensure(&ref_two).await.unwrap();
    assert_eq!(repaired, other);
    assert_eq!(store.list().unwrap().damaged, vec![]);
    assert!(temp_names(&store).is_empty());
}
