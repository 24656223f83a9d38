//! Where manifests and blobs come from: a registry (through `oci-client`)
//! or an OCI image layout on disk (an `oci-archive:` is extracted to one
//! first). Both resolve a reference to one platform's image manifest and
//! copy blobs to files, verifying every sha256 digest themselves.
//!
//! This module owns manifest parsing, platform selection and digest checks.
//! It does not unpack layers, build disks or decide what is cached.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::progress::{Progress, PullEvent, Silent};
use super::reference::{valid_digest, RegistryRef};
use super::ImageError;

/// The manifest media types hypeman accepts from a registry.
const ACCEPTED_MANIFESTS: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Largest manifest or image config read into memory.
const MAX_DOCUMENT: u64 = 8 << 20;

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image manifest or an index, told apart by their fields.
#[derive(Debug, Clone, Deserialize)]
struct Document {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// One platform's image manifest, verified.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub manifest_digest: String,
    /// The index the manifest was picked from, when there was one.
    pub index_digest: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A place to read manifests and blobs from.
pub(crate) enum Source<'a> {
    Registry {
        client: &'a oci_client::Client,
        reference: RegistryRef,
        auth: RegistryAuth,
    },
    Layout {
        dir: PathBuf,
    },
}

/// The OCI platform architecture name of this host.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Source<'_> {
    /// Resolves the reference (registry) or tag (layout) to a manifest.
    pub(crate) async fn resolve(
        &self,
        display: &str,
        tag: Option<&str>,
    ) -> Result<Resolved, ImageError> {
        let (bytes, digest) = match self {
            Source::Registry { reference, .. } => {
                let wanted = reference.digest.clone();
                let bytes = self
                    .fetch_manifest(
                        wanted
                            .as_deref()
                            .or(reference.tag.as_deref())
                            .unwrap_or("latest"),
                    )
                    .await?;
                let digest = sha256_digest(&bytes);
                if let Some(wanted) = wanted {
                    check_digest(&wanted, &digest)?;
                }
                (bytes, digest)
            }
            Source::Layout { dir } => {
                let index_path = dir.join("index.json");
                let index_bytes = read_document(&index_path)?;
                let index: Document =
                    serde_json::from_slice(&index_bytes).map_err(|e| ImageError::Manifest {
                        reference: display.to_string(),
                        reason: format!("index.json: {e}"),
                    })?;
                let entries = index.manifests.unwrap_or_default();
                let entry = pick_tagged(&entries, tag).ok_or_else(|| ImageError::TagNotFound {
                    reference: display.to_string(),
                    tag: tag.map(str::to_string),
                })?;
                let digest = entry.digest.clone();
                (self.fetch_manifest(&digest).await?, digest)
            }
        };
        let doc = parse_document(&bytes, display)?;
        if let (None, Some(entries)) = (&doc.config, &doc.manifests) {
            let arch = host_arch();
            let entry = entries
                .iter()
                .find(|e| {
                    e.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                .ok_or_else(|| ImageError::NoPlatform {
                    reference: display.to_string(),
                    arch,
                })?;
            let inner = self.fetch_manifest(&entry.digest).await?;
            let inner_doc = parse_document(&inner, display)?;
            return into_resolved(inner_doc, entry.digest.clone(), Some(digest), display);
        }
        into_resolved(doc, digest, None, display)
    }

    /// Fetches a manifest by digest (verified) or, for a registry, by tag.
    async fn fetch_manifest(&self, tag_or_digest: &str) -> Result<Vec<u8>, ImageError> {
        let bytes = match self {
            Source::Registry {
                client,
                reference,
                auth,
            } => {
                let r = if tag_or_digest.contains(':') {
                    oci_client::Reference::with_digest(
                        reference.registry.clone(),
                        reference.repository.clone(),
                        tag_or_digest.to_string(),
                    )
                } else {
                    oci_client::Reference::with_tag(
                        reference.registry.clone(),
                        reference.repository.clone(),
                        tag_or_digest.to_string(),
                    )
                };
                let (bytes, _) = client
                    .pull_manifest_raw(&r, auth, ACCEPTED_MANIFESTS)
                    .await
                    .map_err(|source| ImageError::Registry {
                        reference: reference.to_string(),
                        source: Box::new(source),
                    })?;
                bytes.to_vec()
            }
            Source::Layout { dir } => read_document(&blob_path(dir, tag_or_digest)?)?,
        };
        if valid_digest(tag_or_digest) {
            check_digest(tag_or_digest, &sha256_digest(&bytes))?;
        }
        Ok(bytes)
    }

    /// Reads a small blob (the image config) into memory, verified.
    pub(crate) async fn fetch_small_blob(
        &self,
        desc: &Descriptor,
        scratch: &Path,
    ) -> Result<Vec<u8>, ImageError> {
        if desc.size > MAX_DOCUMENT {
            return Err(ImageError::Manifest {
                reference: desc.digest.clone(),
                reason: format!("config blob of {} bytes is too large", desc.size),
            });
        }
        self.fetch_blob(desc, scratch, &Silent).await?;
        let bytes = std::fs::read(scratch).map_err(ImageError::io("read", scratch))?;
        let _ = std::fs::remove_file(scratch);
        Ok(bytes)
    }

    /// Copies a blob to `dest`, checking its size and sha256 digest as it
    /// is written and reporting each chunk to `progress`.
    pub(crate) async fn fetch_blob(
        &self,
        desc: &Descriptor,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), ImageError> {
        if !valid_digest(&desc.digest) {
            return Err(ImageError::Manifest {
                reference: desc.digest.clone(),
                reason: "blob digest is not sha256".into(),
            });
        }
        progress.event(&PullEvent::BlobStarted {
            digest: &desc.digest,
            size: desc.size,
        });
        let mut sink = BlobSink::create(desc, dest, progress).await?;
        match self {
            Source::Registry {
                client,
                reference,
                auth,
            } => {
                let r = oci_client::Reference::with_digest(
                    reference.registry.clone(),
                    reference.repository.clone(),
                    desc.digest.clone(),
                );
                client
                    .store_auth_if_needed(r.resolve_registry(), auth)
                    .await;
                let oci_desc = OciDescriptor {
                    media_type: desc.media_type.clone(),
                    digest: desc.digest.clone(),
                    size: i64::try_from(desc.size).unwrap_or(i64::MAX),
                    ..Default::default()
                };
                let mut stream = client
                    .pull_blob_stream(&r, &oci_desc)
                    .await
                    .map_err(|source| ImageError::Registry {
                        reference: reference.to_string(),
                        source: Box::new(source),
                    })?;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(ImageError::io("download", dest))?;
                    if !sink.push(&chunk).await? {
                        break;
                    }
                }
            }
            Source::Layout { dir } => {
                let src = blob_path(dir, &desc.digest)?;
                let mut input = tokio::fs::File::open(&src)
                    .await
                    .map_err(ImageError::io("open", &src))?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = input
                        .read(&mut buf)
                        .await
                        .map_err(ImageError::io("read", &src))?;
                    if n == 0 || !sink.push(&buf[..n]).await? {
                        break;
                    }
                }
            }
        }
        let (digest, size) = sink.finish().await?;
        if size != desc.size {
            return Err(ImageError::Size {
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: size,
            });
        }
        check_digest(&desc.digest, &digest)?;
        progress.event(&PullEvent::BlobVerified {
            digest: &desc.digest,
            size,
        });
        Ok(())
    }
}

/// Where a blob's chunks go, from either source: a file, a running sha256
/// and byte count, and the progress receiver.
struct BlobSink<'a> {
    desc: &'a Descriptor,
    dest: &'a Path,
    progress: &'a dyn Progress,
    file: tokio::fs::File,
    hasher: Sha256,
    size: u64,
}

impl<'a> BlobSink<'a> {
    async fn create(
        desc: &'a Descriptor,
        dest: &'a Path,
        progress: &'a dyn Progress,
    ) -> Result<BlobSink<'a>, ImageError> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::durable::FILE_MODE)
            .open(dest)
            .await
            .map_err(ImageError::io("create", dest))?;
        Ok(BlobSink {
            desc,
            dest,
            progress,
            file,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Writes one chunk. Returns false once more bytes have arrived than
    /// the descriptor announced: the blob is wrong, and the rest need not
    /// be read to know it.
    async fn push(&mut self, chunk: &[u8]) -> Result<bool, ImageError> {
        self.size += chunk.len() as u64;
        if self.size > self.desc.size {
            return Ok(false);
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .await
            .map_err(ImageError::io("write", self.dest))?;
        self.progress.event(&PullEvent::BlobProgress {
            digest: &self.desc.digest,
            done: self.size,
            size: self.desc.size,
        });
        Ok(true)
    }

    /// The digest and size of what was pushed.
    async fn finish(mut self) -> Result<(String, u64), ImageError> {
        self.file
            .flush()
            .await
            .map_err(ImageError::io("write", self.dest))?;
        Ok((format!("sha256:{:x}", self.hasher.finalize()), self.size))
    }
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    if !valid_digest(digest) {
        return Err(ImageError::Manifest {
            reference: dir.display().to_string(),
            reason: format!("bad digest `{digest}`"),
        });
    }
    let (alg, hex) = digest.split_at(6);
    Ok(dir.join("blobs").join(alg).join(&hex[1..]))
}

fn read_document(path: &Path) -> Result<Vec<u8>, ImageError> {
    let file = std::fs::File::open(path).map_err(ImageError::io("open", path))?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut bytes)
        .map_err(ImageError::io("read", path))?;
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(ImageError::Manifest {
            reference: path.display().to_string(),
            reason: "document too large".into(),
        });
    }
    Ok(bytes)
}

/// `org.opencontainers.image.ref.name` picks a layout entry; without a tag,
/// a layout holding exactly one manifest needs none.
fn pick_tagged<'a>(entries: &'a [Descriptor], tag: Option<&str>) -> Option<&'a Descriptor> {
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    match tag {
        Some(tag) => entries
            .iter()
            .find(|e| e.annotations.get(REF_NAME).is_some_and(|n| n == tag)),
        None if entries.len() == 1 => entries.first(),
        None => entries
            .iter()
            .find(|e| e.annotations.get(REF_NAME).is_some_and(|n| n == "latest")),
    }
}

fn parse_document(bytes: &[u8], display: &str) -> Result<Document, ImageError> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| ImageError::Manifest {
        reference: display.to_string(),
        reason: e.to_string(),
    })?;
    if doc.media_type.contains("schema1") || doc.media_type.contains("v1+prettyjws") {
        return Err(ImageError::Manifest {
            reference: display.to_string(),
            reason: "Docker schema 1 manifests are not supported".into(),
        });
    }
    Ok(doc)
}

fn into_resolved(
    doc: Document,
    manifest_digest: String,
    index_digest: Option<String>,
    display: &str,
) -> Result<Resolved, ImageError> {
    let config = doc.config.ok_or_else(|| ImageError::Manifest {
        reference: display.to_string(),
        reason: "manifest has no config".into(),
    })?;
    Ok(Resolved {
        manifest_digest,
        index_digest,
        config,
        layers: doc.layers,
    })
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn check_digest(expected: &str, actual: &str) -> Result<(), ImageError> {
    if expected == actual {
        Ok(())
    } else {
        Err(ImageError::Digest {
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// Extracts the parts of an OCI layout from an `oci-archive:` tar into
/// `dest`: `index.json` and `blobs/sha256/<hex>` only, so no name in the
/// archive can place a file anywhere else.
pub(crate) fn extract_archive(archive: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = std::fs::File::open(archive).map_err(ImageError::io("open", archive))?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let blobs = dest.join("blobs/sha256");
    crate::durable::create_dir_all(&blobs)?;
    let bad = |e: io::Error| ImageError::io("read", archive)(e);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw);
        let name = name.trim_start_matches("./");
        let target = if name == "index.json" {
            dest.join("index.json")
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            if !valid_digest(&format!("sha256:{hex}")) {
                continue;
            }
            blobs.join(hex)
        } else {
            continue;
        };
        let mut out = crate::durable::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target)
            .map_err(ImageError::io("create", &target))?;
        io::copy(&mut entry, &mut out).map_err(ImageError::io("write", &target))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(digest: &str, tag: Option<&str>) -> Descriptor {
        let mut annotations = HashMap::new();
        if let Some(t) = tag {
            annotations.insert(
                "org.opencontainers.image.ref.name".to_string(),
                t.to_string(),
            );
        }
        Descriptor {
            media_type: String::new(),
            digest: digest.into(),
            size: 1,
            platform: None,
            annotations,
        }
    }

    #[test]
    fn layout_tags_pick_entries() {
        let one = [desc("a", None)];
        assert_eq!(
            pick_tagged(&one, None).map(|d| d.digest.as_str()),
            Some("a")
        );
        let two = [desc("a", Some("1")), desc("b", Some("latest"))];
        assert_eq!(
            pick_tagged(&two, Some("1")).map(|d| d.digest.as_str()),
            Some("a")
        );
        assert_eq!(
            pick_tagged(&two, None).map(|d| d.digest.as_str()),
            Some("b")
        );
        assert!(pick_tagged(&two, Some("2")).is_none());
    }

    /// Keeps the events it receives, as their debug text.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl Progress for Recorder {
        fn event(&self, event: &PullEvent<'_>) {
            self.0.lock().unwrap().push(format!("{event:?}"));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    #[tokio::test]
    async fn layout_blobs_are_verified_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let good = sha256_digest(b"hello");
        std::fs::write(blobs.join(&good[7..]), b"hello").unwrap();
        // A blob whose contents do not match its name.
        let lying = sha256_digest(b"other");
        std::fs::write(blobs.join(&lying[7..]), b"tampered").unwrap();
        let src = Source::Layout {
            dir: dir.path().to_path_buf(),
        };
        let out = dir.path().join("out");
        let seen = Recorder::default();
        let mut d = desc(&good, None);
        d.size = 5;
        src.fetch_blob(&d, &out, &seen).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello");
        assert_eq!(
            seen.take(),
            [
                format!("BlobStarted {{ digest: {good:?}, size: 5 }}"),
                format!("BlobProgress {{ digest: {good:?}, done: 5, size: 5 }}"),
                format!("BlobVerified {{ digest: {good:?}, size: 5 }}"),
            ]
        );
        let mut bad = desc(&lying, None);
        bad.size = 8;
        assert!(matches!(
            src.fetch_blob(&bad, &out, &seen).await,
            Err(ImageError::Digest { .. })
        ));
        assert!(
            !seen.take().iter().any(|e| e.starts_with("BlobVerified")),
            "a blob that failed its digest check is not reported verified"
        );
        d.size = 4;
        assert!(matches!(
            src.fetch_blob(&d, &out, &seen).await,
            Err(ImageError::Size { .. })
        ));
        assert!(!seen.take().iter().any(|e| e.starts_with("BlobVerified")));
    }
}
