//! `hypeman image pull|ls|rm|prune`: the image cache under `<data-dir>/images`.
//!
//! An image is "in use" when a declaration names it or a guest on disk was
//! made from it; `rm` refuses those and `prune` keeps them. The cache itself
//! (pulling, verifying, converting) is `crate::images`; this module only
//! decides what to show and what may go.

use super::progress::{human, StderrProgress};
use super::CliError;
use crate::declaration::scan_dir;
use crate::images::reference::ImageRef;
use crate::images::{ImageInfo, ImageListing, ImageStore};
use crate::settings::Settings;
use crate::store::Store;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// What references each instance uses: declared ones first, then what the
/// guests on disk were made from (an instance being deleted still counts).
pub fn image_users(config_dir: &Path, settings: &Settings) -> BTreeMap<String, String> {
    let mut users = BTreeMap::new();
    let scan = scan_dir(&config_dir.join("instances"), &settings.limits);
    for (name, spec) in &scan.valid {
        users.insert(name.clone(), canonical(&spec.image));
    }
    if let Ok(store) = Store::open_read_only(&settings.data_dir) {
        if let Ok(listing) = store.list() {
            for m in listing.guests {
                let image = m.applied.as_ref().map(|a| a.image.as_str()).filter(|i| !i.is_empty()).map(canonical);
                if let Some(image) = image {
                    users.entry(m.name).or_insert(image);
                }
            }
        }
    }
    users
}

fn canonical(reference: &str) -> String {
    ImageRef::parse(reference).map(|r| r.canonical()).unwrap_or_else(|_| reference.to_string())
}

/// The instances using `info`, by name.
pub fn users_of(info: &ImageInfo, users: &BTreeMap<String, String>) -> Vec<String> {
    users
        .iter()
        .filter(|(_, image)| info.references.contains(image) || image.ends_with(&format!("@{}", info.digest)))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The cached image `query` names: a digest (`sha256:…`, or its hex, or a
/// unique hex prefix) or a reference it was pulled as.
pub fn find(images: &[ImageInfo], query: &str) -> Result<ImageInfo, CliError> {
    let hex = query.strip_prefix("sha256:").unwrap_or(query);
    let want = canonical(query);
    let hits: Vec<&ImageInfo> = images
        .iter()
        .filter(|i| {
            i.references.contains(&want)
                || (!hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) && i.digest["sha256:".len()..].starts_with(hex))
        })
        .collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(CliError::Image(format!("no cached image matches {query:?}"))),
        many => Err(CliError::Image(format!(
            "{query:?} matches {} images: {}",
            many.len(),
            many.iter().map(|i| i.digest.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn list(store: &ImageStore) -> Result<ImageListing, CliError> {
    store.list().map_err(|e| CliError::Image(crate::instances::error_chain(&e)))
}

/// Pulls `reference`, drawing progress on `progress` (stderr), and prints
/// only the digest on `out`: scripts read it from there.
pub async fn pull<W: Write + Send>(store: &ImageStore, reference: &str, progress: &StderrProgress<W>, out: &mut impl Write) -> Result<(), CliError> {
    progress.say(&format!("pulling {reference}"));
    let started = std::time::Instant::now();
    let result = store.ensure_reporting(reference, progress).await;
    progress.finish();
    let info = result.map_err(|e| CliError::Image(crate::instances::error_chain(&e)))?;
    progress.say(&format!(
        "{} ({}, {} on disk) in {:.2}s",
        info.rootfs.display(),
        info.format.as_str(),
        human(info.size_bytes),
        started.elapsed().as_secs_f64()
    ));
    writeln!(out, "{}", info.digest).map_err(CliError::Output)
}

#[derive(serde::Serialize)]
struct Row {
    digest: String,
    references: Vec<String>,
    format: String,
    size_bytes: u64,
    unpacked_bytes: u64,
    used_by: Vec<String>,
    /// Why the image cannot be used as it is; `null` for a sound one.
    /// Pulling it again repairs it.
    damaged: Option<String>,
}

pub fn ls(store: &ImageStore, users: &BTreeMap<String, String>, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let listing = list(store)?;
    let mut rows: Vec<Row> = listing
        .images
        .into_iter()
        .map(|i| Row {
            used_by: users_of(&i, users),
            digest: i.digest,
            references: i.references,
            format: i.format.as_str().to_string(),
            size_bytes: i.size_bytes,
            unpacked_bytes: i.unpacked_bytes,
            damaged: None,
        })
        .collect();
    // What a damaged record held is unknown; its digest is its name.
    rows.extend(listing.damaged.into_iter().map(|d| Row {
        digest: d.digest,
        references: Vec::new(),
        format: "-".to_string(),
        size_bytes: 0,
        unpacked_bytes: 0,
        used_by: Vec::new(),
        damaged: Some(format!("{}; `hypeman image pull` repairs it, `hypeman image rm` removes it", d.damage)),
    }));
    if json {
        let text = serde_json::to_string_pretty(&rows).map_err(CliError::Json)?;
        return writeln!(out, "{text}").map_err(CliError::Output);
    }
    let w = |out: &mut dyn Write, a: &str, b: &str, c: &str, d: &str| writeln!(out, "{a:<45} {b:<19} {c:>9}  {d}");
    w(out, "REFERENCE", "DIGEST", "SIZE", "USED BY").map_err(CliError::Output)?;
    for r in &rows {
        let reference = match &r.damaged {
            Some(why) => format!("(damaged: {why})"),
            None => r.references.first().cloned().unwrap_or_else(|| "-".into()),
        };
        let short = &r.digest[..r.digest.len().min(19)];
        let used = if r.used_by.is_empty() { "-".to_string() } else { r.used_by.join(",") };
        let size = if r.damaged.is_some() { "-".to_string() } else { human(r.size_bytes) };
        w(out, &reference, short, &size, &used).map_err(CliError::Output)?;
    }
    Ok(())
}

pub fn rm(store: &ImageStore, users: &BTreeMap<String, String>, query: &str, out: &mut impl Write) -> Result<(), CliError> {
    let listing = list(store)?;
    // A damaged image has no references to check: by its digest only.
    if let Some(damaged) = listing.damaged.iter().find(|d| d.digest == query || hex_of(&d.digest) == query) {
        store.remove(&damaged.digest).map_err(|e| CliError::Image(crate::instances::error_chain(&e)))?;
        return writeln!(out, "removed {}", damaged.digest).map_err(CliError::Output);
    }
    let info = find(&listing.images, query)?;
    let using = users_of(&info, users);
    if !using.is_empty() {
        return Err(CliError::Image(format!("{} is used by {}; not removed", info.digest, using.join(", "))));
    }
    store.remove(&info.digest).map_err(|e| CliError::Image(crate::instances::error_chain(&e)))?;
    writeln!(out, "removed {}", info.digest).map_err(CliError::Output)
}

pub fn prune(store: &ImageStore, users: &BTreeMap<String, String>, out: &mut impl Write) -> Result<(), CliError> {
    let mut freed = 0;
    // Damaged images are left: whose they are cannot be told (`image ls`
    // shows them).
    for info in list(store)?.images {
        if users_of(&info, users).is_empty() {
            store.remove(&info.digest).map_err(|e| CliError::Image(crate::instances::error_chain(&e)))?;
            freed += info.size_bytes;
            writeln!(out, "removed {}", info.digest).map_err(CliError::Output)?;
        }
    }
    writeln!(out, "freed {}", human(freed)).map_err(CliError::Output)
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{ImageConfig, RootfsFormat};

    fn info(digest_hex: &str, reference: &str) -> ImageInfo {
        ImageInfo {
            digest: format!("sha256:{digest_hex}"),
            references: vec![canonical(reference)],
            rootfs: "/x".into(),
            format: RootfsFormat::Erofs,
            config: ImageConfig { entrypoint: vec![], cmd: vec![], env: vec![], workdir: None, user: None },
            size_bytes: 1,
            unpacked_bytes: 1,
        }
    }

    #[test]
    fn find_by_reference_digest_and_prefix() {
        let a = "a".repeat(64);
        let b = format!("ab{}", "c".repeat(62));
        let images = vec![info(&a, "busybox:1"), info(&b, "docker.io/library/nginx:alpine")];
        assert_eq!(find(&images, "nginx:alpine").unwrap().digest, format!("sha256:{b}"));
        assert_eq!(find(&images, &format!("sha256:{a}")).unwrap().digest, format!("sha256:{a}"));
        assert_eq!(find(&images, "abc").unwrap().digest, format!("sha256:{b}"));
        assert!(find(&images, "a").unwrap_err().to_string().contains("matches 2 images"));
        assert!(find(&images, "redis").unwrap_err().to_string().contains("no cached image"));
    }

    /// An image whose record cannot be read is listed as damaged (with a
    /// way out) and can be removed by its digest.
    #[test]
    fn a_damaged_image_is_listed_and_removable() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), Default::default()).unwrap();
        let hex = "c".repeat(64);
        let dir = tmp.path().join("images").join(&hex);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("image.json"), b"{ truncated").unwrap();
        let mut out = Vec::new();
        ls(&store, &BTreeMap::new(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap().replace(&tmp.path().display().to_string(), "[tmp]");
        assert_eq!(
            text.lines().nth(1).unwrap(),
            format!(
                "(damaged: its record [tmp]/images/{hex}/image.json cannot be read: key must be a string at line 1 column 3; \
                 `hypeman image pull` repairs it, `hypeman image rm` removes it) sha256:cccccccccccc         -  -"
            )
        );
        let mut out = Vec::new();
        ls(&store, &BTreeMap::new(), true, &mut out).unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(rows[0]["damaged"].as_str().unwrap().starts_with("its record "), "{rows}");
        let mut out = Vec::new();
        rm(&store, &BTreeMap::new(), &hex, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("removed sha256:{hex}\n"));
        assert!(!dir.exists());
    }

    #[test]
    fn users_match_canonical_references() {
        let i = info(&"a".repeat(64), "busybox:1");
        let mut users = BTreeMap::new();
        users.insert("web".to_string(), canonical("docker.io/library/busybox:1"));
        users.insert("db".to_string(), canonical("postgres:16"));
        assert_eq!(users_of(&i, &users), vec!["web".to_string()]);
    }
}
