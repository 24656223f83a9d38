//! OCI images to read-only root disks, cached by manifest digest.
//!
//! ```text
//!  "alpine:3.20" ─parse─► ImageRef ─resolve─► manifest digest ─┬─ cached? ─► ImageInfo
//!  "oci:dir:tag"           (reference)        (source: registry │
//!  "oci-archive:f"                             or layout dir)   └─ lock digest, fetch + verify
//!                                                                  blobs, unpack (unpack.rs),
//!                                                                  mkfs (rootfs.rs), publish
//! ```
//!
//! This module owns `<data_dir>/images/`:
//!
//! ```text
//! images/<hex>/            complete only once image.json exists; published by
//!   rootfs.erofs|.ext4     renaming a finished temp dir, so never half-written
//!   image.json             records the disk's length and sha256, checked before
//!                          the disk is handed out (verify.rs); a disk or record
//!                          that does not match is converted again
//! images/refs/<sha256(reference)>.json   reference → digest, for cache hits
//!                                        without a registry round trip
//! images/locks/<hex>.lock  flock: one conversion per digest, across processes
//! images/.tmp-<pid>-<n>/   work in progress; swept on open if <pid> is gone
//! ```
//!
//! It must not know about instances: which images are in use, and whether
//! one may be removed, is decided by its callers.

pub mod auth;
pub mod progress;
pub mod reference;
pub mod rootfs;
mod source;
pub mod unpack;
pub mod verify;

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::durable::{self, DurableError};

use self::auth::{AuthError, Credentials};
pub use self::progress::{LogProgress, Progress, PullEvent, Silent};
pub use self::reference::{ImageRef, ReferenceError, RegistryRef};
pub use self::rootfs::{RootfsError, RootfsFormat};
use self::source::{Resolved, Source};
pub use self::unpack::{UnpackError, UnpackLimits, UnpackOptions, UnpackStats};
pub use self::verify::Damage;

/// What the guest needs from the image config to run the app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// A cached image, ready to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The platform manifest's digest, `sha256:<hex>`.
    pub digest: String,
    /// Canonical references that resolved to this image.
    pub references: Vec<String>,
    pub rootfs: PathBuf,
    pub format: RootfsFormat,
    pub config: ImageConfig,
    /// Bytes the root disk occupies on the host.
    pub size_bytes: u64,
    /// Bytes of file contents in the unpacked layers.
    pub unpacked_bytes: u64,
}

/// How the store pulls and converts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStoreOptions {
    /// `host:port` registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// A Docker `config.json` with `auths`; default `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    pub format: RootfsFormat,
    pub limits: UnpackLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference `{reference}`")]
    Reference {
        reference: String,
        #[source]
        source: ReferenceError,
    },
    #[error("registry request for {reference} failed")]
    Registry {
        reference: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("invalid manifest for {reference}: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("{reference} has no manifest for linux/{arch}")]
    NoPlatform {
        reference: String,
        arch: &'static str,
    },
    #[error("{reference}: {}", match tag { Some(t) => format!("no manifest tagged `{t}`"), None => "several manifests and no tag given".to_string() })]
    TagNotFound {
        reference: String,
        tag: Option<String>,
    },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Digest { expected: String, actual: String },
    #[error("blob {digest} has {actual} bytes, the manifest says {expected}")]
    Size {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("invalid image config {digest}: {reason}")]
    Config { digest: String, reason: String },
    #[error(transparent)]
    Credentials(#[from] AuthError),
    #[error("cannot unpack {digest}")]
    Unpack {
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("cannot build the root disk of {digest}")]
    Rootfs {
        digest: String,
        #[source]
        source: RootfsError,
    },
    #[error("no cached image {0}")]
    NotFound(String),
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("background task failed: {0}")]
    Task(String),
}

impl ImageError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.to_path_buf();
        move |source| ImageError::Io { op, path, source }
    }

    /// The registry could not be reached at all (as opposed to answering no).
    fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ImageError::Registry { source, .. }
                if matches!(**source, oci_client::errors::OciDistributionError::RequestError(_))
        )
    }
}

/// `image.json`, the last file written into an image directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageRecord {
    version: u32,
    digest: String,
    #[serde(default)]
    index_digest: Option<String>,
    references: Vec<String>,
    format: RootfsFormat,
    rootfs: String,
    config: ImageConfig,
    layers: Vec<String>,
    size_bytes: u64,
    unpacked_bytes: u64,
    blob_bytes: u64,
    /// The root disk's length and hex sha256, taken when it was built, so
    /// a disk changed since is found before a guest boots from it. Records
    /// written before these were have neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rootfs_len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rootfs_sha256: Option<String>,
}

impl ImageRecord {
    fn expected(&self) -> verify::Expected<'_> {
        verify::Expected { len: self.rootfs_len, allocated: self.size_bytes, sha256: self.rootfs_sha256.as_deref() }
    }
}

/// A cached image that cannot be used as it is, for listings: `image ls`
/// shows it, and pulling it again replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedImage {
    pub digest: String,
    pub dir: PathBuf,
    pub damage: Damage,
}

/// Every cached image, usable or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageListing {
    pub images: Vec<ImageInfo>,
    pub damaged: Vec<DamagedImage>,
}

const RECORD_VERSION: u32 = 1;
const RECORD_FILE: &str = "image.json";

/// `refs/<sha256(reference)>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefRecord {
    version: u32,
    reference: String,
    digest: String,
    /// For local sources: the source file as it was when resolved. A match
    /// means the digest is still right without reading the source.
    #[serde(default)]
    source: Option<Fingerprint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fingerprint {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Fingerprint> {
        let m = fs::metadata(path).ok()?;
        Some(Fingerprint {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ino: m.ino(),
        })
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The image cache. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct ImageStore {
    dir: PathBuf,
    options: ImageStoreOptions,
    client: oci_client::Client,
    /// Layer sets unpacked and converted by this store (not cache hits).
    conversions: AtomicU64,
    /// Root disks whose digest this store has checked.
    verified: verify::Verified,
}

impl ImageStore {
    /// Opens (creating) `<data_dir>/images` and sweeps work left by dead processes.
    pub fn open(data_dir: &Path, options: ImageStoreOptions) -> Result<ImageStore, ImageError> {
        let dir = data_dir.join("images");
        for sub in ["refs", "locks"] {
            durable::create_dir_all(&dir.join(sub))?;
        }
        sweep_temp_dirs(&dir);
        let config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(
                options.insecure_registries.clone(),
            ),
            // Index resolution is ours (source.rs), so it is verified like the rest.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(300)),
            ..Default::default()
        };
        Ok(ImageStore {
            dir,
            options,
            client: oci_client::Client::new(config),
            conversions: AtomicU64::new(0),
            verified: verify::Verified::default(),
        })
    }

    /// Returns the cached image for `reference`, pulling and converting it
    /// first when needed. Registry tags are re-resolved (one manifest
    /// request, no blobs) unless the registry is unreachable, in which case
    /// the last known digest is used. Progress goes to the log ([`LogProgress`]).
    pub async fn ensure(&self, reference: &str) -> Result<ImageInfo, ImageError> {
        self.ensure_reporting(reference, &LogProgress).await
    }

    /// [`ImageStore::ensure`], telling `progress` what it does.
    #[tracing::instrument(skip(self, progress), fields(digest))]
    pub async fn ensure_reporting(
        &self,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<ImageInfo, ImageError> {
        let parsed = ImageRef::parse(reference).map_err(|source| ImageError::Reference {
            reference: reference.to_string(),
            source,
        })?;
        let parsed = absolutize(parsed)?;
        let canonical = parsed.canonical();
        match &parsed {
            ImageRef::Registry(r) => {
                if r.digest.is_some() {
                    if let Some(info) = self.cached_ref(&canonical, None, progress)? {
                        return Ok(info);
                    }
                }
                let creds = auth::lookup(
                    auth::config_path(self.options.docker_config.as_deref()).as_deref(),
                    &r.registry,
                )?;
                let auth = match creds {
                    Credentials::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
                    Credentials::Basic { username, password } => {
                        oci_client::secrets::RegistryAuth::Basic(username, password)
                    }
                };
                let source = Source::Registry {
                    client: &self.client,
                    reference: r.clone(),
                    auth,
                };
                let resolved = match source.resolve(&canonical, None).await {
                    Ok(resolved) => resolved,
                    Err(e) if e.is_unreachable() => {
                        if let Some(info) = self.cached_ref(&canonical, None, progress)? {
                            tracing::warn!(reference = %canonical, error = %e, "registry unreachable; using the cached image");
                            return Ok(info);
                        }
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                };
                self.materialize(&source, resolved, &canonical, None, progress)
                    .await
            }
            ImageRef::Layout { dir, tag } => {
                let fingerprint = Fingerprint::of(&dir.join("index.json"));
                if let Some(info) = self.cached_ref(&canonical, fingerprint, progress)? {
                    return Ok(info);
                }
                let source = Source::Layout { dir: dir.clone() };
                let resolved = source.resolve(&canonical, tag.as_deref()).await?;
                self.materialize(&source, resolved, &canonical, fingerprint, progress)
                    .await
            }
            ImageRef::Archive { file, tag } => {
                let fingerprint = Fingerprint::of(file);
                if let Some(info) = self.cached_ref(&canonical, fingerprint, progress)? {
                    return Ok(info);
                }
                let work = self.temp_dir()?;
                let layout = work.path.join("layout");
                let (archive, dest) = (file.clone(), layout.clone());
                blocking(move || source::extract_archive(&archive, &dest)).await?;
                let source = Source::Layout { dir: layout };
                let resolved = source.resolve(&canonical, tag.as_deref()).await?;
                self.materialize(&source, resolved, &canonical, fingerprint, progress)
                    .await
            }
        }
    }

    /// How many images this store has converted since it was opened; cache
    /// hits do not count. For progress reporting and tests.
    pub fn conversions(&self) -> u64 {
        self.conversions.load(Ordering::Relaxed)
    }

    /// Every complete cached image; one whose record cannot be read or
    /// whose root disk's size does not match it is listed as damaged, and
    /// the others are listed as ever. (The digest is not checked here: a
    /// listing must stay cheap.)
    pub fn list(&self) -> Result<ImageListing, ImageError> {
        let mut out = ImageListing::default();
        for entry in fs::read_dir(&self.dir).map_err(ImageError::io("list", &self.dir))? {
            let entry = entry.map_err(ImageError::io("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_hex_digest(&name) {
                continue;
            }
            let digest = format!("sha256:{name}");
            match self.load_checked(&digest, true) {
                Ok(Some(info)) => out.images.push(info),
                Ok(None) => {}
                Err(damage) => out.damaged.push(DamagedImage { dir: self.image_dir(&digest), digest, damage }),
            }
        }
        out.images.sort_by(|a, b| a.digest.cmp(&b.digest));
        out.damaged.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// One cached image by digest, if complete.
    pub fn get(&self, digest: &str) -> Result<Option<ImageInfo>, ImageError> {
        if !reference::valid_digest(digest) {
            return Ok(None);
        }
        self.load(digest)
    }

    /// Removes a cached image and the references pointing at it.
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        if !reference::valid_digest(digest) {
            return Err(ImageError::NotFound(digest.to_string()));
        }
        let image_dir = self.image_dir(digest);
        if !image_dir.exists() {
            return Err(ImageError::NotFound(digest.to_string()));
        }
        let refs = self.dir.join("refs");
        for entry in fs::read_dir(&refs).map_err(ImageError::io("list", &refs))? {
            let entry = entry.map_err(ImageError::io("list", &refs))?;
            let path = entry.path();
            let points_here = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<RefRecord>(&b).ok())
                .is_some_and(|r| r.digest == digest);
            if points_here {
                fs::remove_file(&path).map_err(ImageError::io("remove", &path))?;
            }
        }
        // Renamed away first so a crash never leaves a half-deleted image
        // under its real name.
        let trash = self.temp_dir()?;
        let doomed = trash.path.join("doomed");
        fs::rename(&image_dir, &doomed).map_err(ImageError::io("rename", &image_dir))?;
        durable::fsync_dir(&self.dir)?;
        drop(trash);
        Ok(())
    }

    /// The cached image `reference` last resolved to, if it is still
    /// complete and (for local sources) the source is unchanged.
    fn cached_ref(
        &self,
        canonical: &str,
        fingerprint: Option<Fingerprint>,
        progress: &dyn Progress,
    ) -> Result<Option<ImageInfo>, ImageError> {
        let path = self.ref_path(canonical);
        let Ok(bytes) = fs::read(&path) else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_slice::<RefRecord>(&bytes) else {
            tracing::warn!(path = %path.display(), "ignoring unreadable reference record");
            return Ok(None);
        };
        if record.reference != canonical || record.source != fingerprint {
            return Ok(None);
        }
        // A damaged image is no cache hit: the caller resolves and
        // converts it again (under its lock), or fails without booting it.
        let info = match self.load_checked(&record.digest, false) {
            Ok(info) => info,
            Err(damage) => {
                tracing::warn!(digest = %record.digest, problem = %damage, "cached image is damaged; it is not used");
                None
            }
        };
        if info.is_some() {
            progress.event(&PullEvent::Cached {
                digest: &record.digest,
            });
        }
        Ok(info)
    }

    /// Converts `resolved` unless its digest is already cached, under the
    /// digest's lock, and records `canonical` as pointing at it.
    async fn materialize(
        &self,
        source: &Source<'_>,
        resolved: Resolved,
        canonical: &str,
        fingerprint: Option<Fingerprint>,
        progress: &dyn Progress,
    ) -> Result<ImageInfo, ImageError> {
        let digest = resolved.manifest_digest.clone();
        tracing::Span::current().record("digest", digest.as_str());
        progress.event(&PullEvent::Resolved {
            digest: &digest,
            layers: resolved.layers.len(),
            bytes: resolved.layers.iter().map(|l| l.size).sum(),
        });
        let _lock = self.lock(&digest).await?;
        let found = match self.load_checked(&digest, false) {
            Ok(found) => found,
            Err(damage) => {
                tracing::warn!(digest = %digest, problem = %damage, "cached image is damaged; converting it again");
                self.discard(&digest)?;
                None
            }
        };
        let info = match found {
            Some(info) => {
                for layer in &resolved.layers {
                    progress.event(&PullEvent::LayerCached {
                        digest: &layer.digest,
                        size: layer.size,
                    });
                }
                progress.event(&PullEvent::Cached { digest: &digest });
                info
            }
            None => self.convert(source, &resolved, canonical, progress).await?,
        };
        let info = if info.references.iter().any(|r| r == canonical) {
            info
        } else {
            self.add_reference(&digest, canonical)?
        };
        let record = RefRecord {
            version: RECORD_VERSION,
            reference: canonical.to_string(),
            digest: digest.clone(),
            source: fingerprint,
        };
        durable::write_atomic(&self.ref_path(canonical), &to_json(&record))?;
        Ok(info)
    }

    async fn convert(
        &self,
        source: &Source<'_>,
        resolved: &Resolved,
        canonical: &str,
        progress: &dyn Progress,
    ) -> Result<ImageInfo, ImageError> {
        let digest = resolved.manifest_digest.clone();
        self.conversions.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let work = self.temp_dir()?;
        let blobs = work.path.join("blobs");
        durable::create_dir(&blobs)?;

        let config_bytes = source
            .fetch_small_blob(&resolved.config, &blobs.join("config"))
            .await?;
        let config = parse_config(&config_bytes, &resolved.config.digest)?;
        let mut layer_files = Vec::new();
        let mut blob_bytes = 0;
        for (i, layer) in resolved.layers.iter().enumerate() {
            let path = blobs.join(format!("layer-{i}"));
            source.fetch_blob(layer, &path, progress).await?;
            blob_bytes += layer.size;
            layer_files.push(path);
        }
        let fetched = started.elapsed();

        let format = self.options.format;
        let root = work.path.join("rootfs");
        let disk = work.path.join(format.file_name());
        let options = UnpackOptions {
            limits: self.options.limits,
            ..UnpackOptions::default()
        };
        durable::create_dir(&root)?;
        // The tree's root becomes the guest's `/`, whose mode is the image's
        // business, not the host's: the conventional 0755 (a 0700 `/` locks
        // out the image's non-root user). The work dir above it is 0700, so
        // no one else reaches it meanwhile.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).map_err(ImageError::io("set the mode of", &root))?;
        let mut unpacker =
            unpack::Unpacker::new(&root, options).map_err(unpack_error(&digest))?;
        let count = layer_files.len();
        // One blocking task per layer, so each layer's start can be reported.
        for (i, path) in layer_files.into_iter().enumerate() {
            progress.event(&PullEvent::Unpacking {
                index: i + 1,
                count,
            });
            let unpack_err = unpack_error(&digest);
            unpacker = blocking(move || {
                let file = fs::File::open(&path).map_err(ImageError::io("open", &path))?;
                unpacker.apply_layer(file).map_err(unpack_err)?;
                // The blob is no longer needed; free its space early.
                let _ = fs::remove_file(&path);
                Ok(unpacker)
            })
            .await?;
        }
        let unpack_err = unpack_error(&digest);
        let stats = blocking(move || unpacker.finish().map_err(unpack_err)).await?;
        let _ = fs::remove_dir(&blobs);
        progress.event(&PullEvent::Unpacked {
            layers: stats.layers,
            entries: stats.entries,
            bytes: stats.bytes,
        });

        progress.event(&PullEvent::Building { format });
        let (d, disk2) = (digest.clone(), disk.clone());
        blocking(move || {
            rootfs::build(&root, &disk2, format)
                .map_err(|source| ImageError::Rootfs { digest: d, source })?;
            durable::fsync_file(&disk2)?;
            fs::remove_dir_all(&root).map_err(ImageError::io("remove", &root))
        })
        .await?;

        let disk_meta = fs::metadata(&disk).map_err(ImageError::io("inspect", &disk))?;
        let size_bytes = disk_meta.blocks() * 512;
        let disk3 = disk.clone();
        let rootfs_sha256 = blocking(move || verify::sha256_file(&disk3).map_err(ImageError::io("read", &disk3))).await?;
        progress.event(&PullEvent::Built { format, size_bytes });
        let record = ImageRecord {
            version: RECORD_VERSION,
            digest: digest.clone(),
            index_digest: resolved.index_digest.clone(),
            references: vec![canonical.to_string()],
            format,
            rootfs: format.file_name().to_string(),
            config,
            layers: resolved.layers.iter().map(|l| l.digest.clone()).collect(),
            size_bytes,
            unpacked_bytes: stats.bytes,
            blob_bytes,
            rootfs_len: Some(disk_meta.len()),
            rootfs_sha256: Some(rootfs_sha256),
        };
        // Also fsyncs the work directory, so every entry in it is durable
        // before the rename below publishes it.
        durable::write_atomic(&work.path.join(RECORD_FILE), &to_json(&record))?;
        let final_dir = self.image_dir(&digest);
        fs::rename(&work.path, &final_dir).map_err(ImageError::io("publish", &final_dir))?;
        durable::fsync_dir(&self.dir)?;
        work.disarm();
        tracing::info!(
            reference = canonical,
            digest = %digest,
            fetch_ms = fetched.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            unpacked_bytes = stats.bytes,
            disk_bytes = size_bytes,
            "image converted"
        );
        self.load(&digest)?.ok_or(ImageError::NotFound(digest))
    }

    /// Moves a damaged image's directory out of the way (its references
    /// stay: they are pointed at the image again once it is converted).
    /// Renamed first, as in `remove`, so a crash leaves no half-deleted
    /// image under its real name. Callers hold the digest's lock.
    fn discard(&self, digest: &str) -> Result<(), ImageError> {
        let image_dir = self.image_dir(digest);
        let trash = self.temp_dir()?;
        match fs::rename(&image_dir, trash.path.join("doomed")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("rename", &image_dir)(e)),
        }
        durable::fsync_dir(&self.dir)?;
        drop(trash);
        Ok(())
    }

    /// [`ImageStore::load`], and the root disk checked against its record
    /// (the digest too unless `size_only`; see `verify`): `Err` for an image
    /// that is there but cannot be used as it is.
    fn load_checked(&self, digest: &str, size_only: bool) -> Result<Option<ImageInfo>, Damage> {
        let path = self.image_dir(digest).join(RECORD_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let record = read_record(&path).map_err(|e| Damage::Record {
            path: path.clone(),
            reason: match e {
                ImageError::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            },
        })?;
        let rootfs = self.image_dir(digest).join(record.format.file_name());
        self.verified.check(&rootfs, record.expected(), size_only)?;
        Ok(Some(self.info_of(rootfs, record)))
    }

    fn add_reference(&self, digest: &str, canonical: &str) -> Result<ImageInfo, ImageError> {
        let path = self.image_dir(digest).join(RECORD_FILE);
        let mut record = read_record(&path)?;
        if !record.references.iter().any(|r| r == canonical) {
            record.references.push(canonical.to_string());
            record.references.sort();
            durable::write_atomic(&path, &to_json(&record))?;
        }
        self.load(digest)?
            .ok_or(ImageError::NotFound(digest.to_string()))
    }

    fn load(&self, digest: &str) -> Result<Option<ImageInfo>, ImageError> {
        let dir = self.image_dir(digest);
        let path = dir.join(RECORD_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let record = read_record(&path)?;
        let rootfs = dir.join(record.format.file_name());
        Ok(Some(self.info_of(rootfs, record)))
    }

    fn info_of(&self, rootfs: PathBuf, record: ImageRecord) -> ImageInfo {
        ImageInfo {
            digest: record.digest,
            references: record.references,
            rootfs,
            format: record.format,
            config: record.config,
            size_bytes: record.size_bytes,
            unpacked_bytes: record.unpacked_bytes,
        }
    }

    /// Holds an exclusive flock on the digest's lock file. A flock taken
    /// through a separate open conflicts even within one process, so this
    /// serialises tasks of this daemon and a concurrent CLI alike.
    async fn lock(&self, digest: &str) -> Result<nix::fcntl::Flock<fs::File>, ImageError> {
        let path = self
            .dir
            .join("locks")
            .join(format!("{}.lock", hex_of(digest)));
        blocking(move || {
            let file = durable::private_file()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(ImageError::io("open", &path))?;
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| ImageError::io("lock", &path)(e.into()))
        })
        .await
    }

    fn temp_dir(&self) -> Result<TempDir, ImageError> {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{TEMP_PREFIX}{}-{seq}", durable::process_token()));
        durable::create_dir(&path)?;
        Ok(TempDir { path, armed: true })
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        self.dir.join(hex_of(digest))
    }

    fn ref_path(&self, canonical: &str) -> PathBuf {
        let hash = source::sha256_digest(canonical.as_bytes());
        self.dir
            .join("refs")
            .join(format!("{}.json", hex_of(&hash)))
    }
}

/// A work directory removed on drop unless published.
struct TempDir {
    path: PathBuf,
    armed: bool,
}

impl TempDir {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove image work directory");
            }
        }
    }
}

/// Prefix of the work directories of pulls and removals: `.tmp-TOKEN-SEQ`,
/// TOKEN being the creator's [`durable::process_token`].
const TEMP_PREFIX: &str = ".tmp-";

/// Removes the work a dead process left in the image cache: `.tmp-TOKEN-SEQ`
/// directories and the temp files of record writes (in `refs/` and each
/// image's directory) whose creator is gone, even if its pid lingers as a
/// zombie or was reused. A live pull's work (this daemon's or a CLI's
/// beside it) is kept. Best effort: what cannot be removed now is tried at
/// the next open.
fn sweep_temp_dirs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let swept = match name.strip_prefix(TEMP_PREFIX) {
            // An older release's `.tmp-PID-SEQ` has no token: no one's.
            Some(rest) => {
                let token = rest.rsplit_once('-').map(|(token, _seq)| token);
                if token.is_some_and(durable::token_is_live) {
                    continue;
                }
                tracing::debug!(path = %entry.path().display(), "removing image work left by a dead process");
                durable::remove_dir_all_if_exists(&entry.path())
            }
            None if name == "refs" || is_hex_digest(&name) => durable::sweep_dead_temp_files(&entry.path()),
            None => continue,
        };
        if let Err(e) = swept {
            tracing::warn!(error = %crate::error_chain(&e), "cannot sweep the image cache; it is tried again at the next start");
        }
    }
}

fn unpack_error(digest: &str) -> impl FnOnce(UnpackError) -> ImageError + Send + 'static {
    let digest = digest.to_string();
    move |source| ImageError::Unpack { digest, source }
}

fn absolutize(r: ImageRef) -> Result<ImageRef, ImageError> {
    let abs = |p: PathBuf| std::path::absolute(&p).map_err(ImageError::io("resolve", &p));
    Ok(match r {
        ImageRef::Layout { dir, tag } => ImageRef::Layout {
            dir: abs(dir)?,
            tag,
        },
        ImageRef::Archive { file, tag } => ImageRef::Archive {
            file: abs(file)?,
            tag,
        },
        other @ ImageRef::Registry(_) => other,
    })
}

/// The fields of an OCI/Docker image config that hypeman uses.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawRuntime>,
}

#[derive(Deserialize)]
struct RawRuntime {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

fn parse_config(bytes: &[u8], digest: &str) -> Result<ImageConfig, ImageError> {
    let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| ImageError::Config {
        digest: digest.to_string(),
        reason: e.to_string(),
    })?;
    let Some(rt) = raw.config else {
        return Ok(ImageConfig::default());
    };
    Ok(ImageConfig {
        entrypoint: rt.entrypoint.unwrap_or_default(),
        cmd: rt.cmd.unwrap_or_default(),
        env: rt.env.unwrap_or_default(),
        workdir: rt.working_dir.filter(|w| !w.is_empty()),
        user: rt.user.filter(|u| !u.is_empty()),
    })
}

fn read_record(path: &Path) -> Result<ImageRecord, ImageError> {
    let bytes = fs::read(path).map_err(ImageError::io("read", path))?;
    let record: ImageRecord = serde_json::from_slice(&bytes).map_err(|e| ImageError::Io {
        op: "parse",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    if record.version != RECORD_VERSION {
        return Err(ImageError::Io {
            op: "parse",
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown version {}", record.version),
            ),
        });
    }
    Ok(record)
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn is_hex_digest(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests;
