//! The initrd every guest boots: `/init` (hypeman-init), the kernel modules
//! it needs and `/lib/modules/load-order` listing them in load order.
//!
//! The archive is a pure function of its contents (cpio with mtime 0), so
//! the cache key is a hash of exactly those contents: a new init binary, a
//! different kernel release or a rebuilt module gives a new key and a new
//! initrd, and an unchanged setup is found again without writing anything.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::durable::{self, DurableError};
use hypeman_contract::modules::{format_load_order, MODULE_LOAD_ORDER};

use super::cpio::CpioWriter;
use super::modules::{ModuleTree, GUEST_MODULES};
use super::SystemError;

/// Bumped when the archive layout changes, so old cache entries are not reused.
const LAYOUT_VERSION: &str = "hypeman-initrd-v1";

/// A built (or found) initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initrd {
    pub path: PathBuf,
    /// Hex SHA-256 of the contents; the cache directory's name.
    pub hash: String,
    /// `None` when no modules directory was given (everything built in).
    pub kernel_release: Option<String>,
    /// Module files in load order, relative to the release directory.
    pub modules: Vec<String>,
    /// Whether this call wrote the file (false: it came from the cache).
    pub built: bool,
}

/// Everything that goes into the archive, read into memory (a few MB).
struct Contents {
    init: Vec<u8>,
    kernel_release: Option<String>,
    /// (path relative to the release directory, bytes), in load order.
    modules: Vec<(String, Vec<u8>)>,
}

impl Contents {
    fn gather(init_binary: &Path, modules_dir: Option<&Path>) -> Result<Contents, SystemError> {
        let init =
            std::fs::read(init_binary).map_err(|e| SystemError::io("read", init_binary, e))?;
        let Some(modules_dir) = modules_dir else {
            return Ok(Contents {
                init,
                kernel_release: None,
                modules: Vec::new(),
            });
        };
        let tree = ModuleTree::open(modules_dir)?;
        let mut modules = Vec::new();
        for rel in tree.resolve(GUEST_MODULES)? {
            let path = tree.dir().join(&rel);
            let bytes = std::fs::read(&path).map_err(|e| SystemError::io("read", &path, e))?;
            modules.push((rel, bytes));
        }
        Ok(Contents {
            init,
            kernel_release: Some(tree.release().to_owned()),
            modules,
        })
    }

    /// Length-prefixed fields, so no two different contents hash alike.
    fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(LAYOUT_VERSION.as_bytes());
        field(&self.init);
        field(self.kernel_release.as_deref().unwrap_or("").as_bytes());
        for (rel, bytes) in &self.modules {
            field(rel.as_bytes());
            field(bytes);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Where a module lives inside the initrd, without the leading `/`.
    fn module_path(&self, rel: &str) -> String {
        format!(
            "lib/modules/{}/{rel}",
            self.kernel_release.as_deref().unwrap_or("")
        )
    }

    fn write_cpio<W: Write>(&self, out: W) -> Result<W, SystemError> {
        let mut cpio = CpioWriter::new(out);
        // The kernel's unpacker needs every parent directory before its files.
        let mut dirs = std::collections::BTreeSet::new();
        dirs.insert("lib".to_owned());
        dirs.insert("lib/modules".to_owned());
        for (rel, _) in &self.modules {
            let path = self.module_path(rel);
            let mut parent = Path::new(&path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(p.to_string_lossy().into_owned());
                parent = p.parent();
            }
        }
        // BTreeSet order puts every parent before its children.
        for dir in &dirs {
            cpio.dir(dir, 0o755)?;
        }
        cpio.file("init", 0o755, &self.init)?;
        let mut listed = Vec::with_capacity(self.modules.len());
        for (rel, bytes) in &self.modules {
            let path = self.module_path(rel);
            cpio.file(&path, 0o644, bytes)?;
            listed.push(format!("/{path}"));
        }
        let order = format_load_order(listed.iter().map(String::as_str));
        cpio.file(
            MODULE_LOAD_ORDER.trim_start_matches('/'),
            0o644,
            order.as_bytes(),
        )?;
        cpio.finish()
    }

    fn summary(&self, path: PathBuf, hash: String, built: bool) -> Initrd {
        Initrd {
            path,
            hash,
            kernel_release: self.kernel_release.clone(),
            modules: self.modules.iter().map(|(rel, _)| rel.clone()).collect(),
            built,
        }
    }
}

/// Writes the initrd for `init_binary` and the guest modules of
/// `modules_dir` (if any) to `out`, atomically (temp file, fsync, rename).
pub fn build_initrd(
    init_binary: &Path,
    modules_dir: Option<&Path>,
    out: &Path,
) -> Result<Initrd, SystemError> {
    let contents = Contents::gather(init_binary, modules_dir)?;
    let hash = contents.hash();
    write_atomically(&contents, out)?;
    Ok(contents.summary(out.to_path_buf(), hash, true))
}

/// The cache directory, one `<hash>/initrd.cpio` entry per set of inputs.
fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("system/initrd")
}

/// Entries being pruned are renamed to this prefix first: a name
/// `cached_initrd` never looks up, so a crash halfway through a removal
/// leaves nothing that could be booted, only something to sweep.
const PRUNING_PREFIX: &str = ".pruning-";

/// The key the initrd for these inputs has (or would have) in the cache.
pub fn initrd_hash(init_binary: &Path, modules_dir: Option<&Path>) -> Result<String, SystemError> {
    Ok(Contents::gather(init_binary, modules_dir)?.hash())
}

/// The cache key of `path` when it is an initrd of the cache under
/// `data_dir` (as launch records name them), else `None`.
pub fn cached_initrd_hash(data_dir: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(cache_dir(data_dir)).ok()?;
    let mut parts = rel.components();
    let hash = parts.next()?.as_os_str().to_str()?;
    (!hash.starts_with('.')).then(|| hash.to_string())
}

/// Which entries of the cache (directory names) go: every entry not in
/// `keep`, and the leftovers of removals a crash cut short.
fn prunable<'a>(entries: &'a [String], keep: &BTreeSet<String>) -> Vec<&'a String> {
    entries.iter().filter(|name| name.starts_with(PRUNING_PREFIX) || !keep.contains(*name)).collect()
}

/// Removes every cached initrd whose key is not in `keep`; returns the keys
/// removed. Each entry is renamed out of the way first and then deleted,
/// so it is either whole under its key or gone from it.
pub fn prune_initrds(data_dir: &Path, keep: &BTreeSet<String>) -> Result<Vec<String>, SystemError> {
    let dir = cache_dir(data_dir);
    let listing = match std::fs::read_dir(&dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SystemError::io("list", &dir, e)),
    };
    let mut entries = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| SystemError::io("list", &dir, e))?;
        // Names that are not UTF-8 are not ours.
        if let Ok(name) = entry.file_name().into_string() {
            entries.push(name);
        }
    }
    let mut removed = Vec::new();
    for name in prunable(&entries, keep) {
        let doomed = match name.strip_prefix(PRUNING_PREFIX) {
            Some(_) => dir.join(name),
            None => {
                let doomed = dir.join(format!("{PRUNING_PREFIX}{name}"));
                let from = dir.join(name);
                std::fs::rename(&from, &doomed).map_err(|e| SystemError::io("move aside", &from, e))?;
                removed.push(name.clone());
                doomed
            }
        };
        std::fs::remove_dir_all(&doomed).map_err(|e| SystemError::io("remove", &doomed, e))?;
    }
    // What a build killed mid-write left beside the initrds that stay.
    for name in entries.iter().filter(|name| keep.contains(*name)) {
        durable::sweep_dead_temp_files(&dir.join(name))?;
    }
    Ok(removed)
}

/// The initrd under `<data_dir>/system/initrd/<hash>/initrd.cpio`, built
/// only if no initrd with the same contents exists yet.
pub fn cached_initrd(
    data_dir: &Path,
    init_binary: &Path,
    modules_dir: Option<&Path>,
) -> Result<Initrd, SystemError> {
    let contents = Contents::gather(init_binary, modules_dir)?;
    let hash = contents.hash();
    let dir = cache_dir(data_dir).join(&hash);
    let path = dir.join("initrd.cpio");
    if path.is_file() {
        return Ok(contents.summary(path, hash, false));
    }
    durable::create_dir_all(&dir)?;
    write_atomically(&contents, &path)?;
    Ok(contents.summary(path, hash, true))
}

/// Streams the archive into a temp file beside `out` and publishes it with
/// [`durable`]'s commit (fsync, rename, fsync the directory).
fn write_atomically(contents: &Contents, out: &Path) -> Result<(), SystemError> {
    durable::stage_with(out, |file, temp| {
        let mut writer = contents.write_cpio(std::io::BufWriter::new(file))?;
        writer.flush().map_err(|e| SystemError::io("write", temp, e))
    })?
    .commit()?;
    Ok(())
}

/// The file primitives' failures, as this module has always named them.
impl From<DurableError> for SystemError {
    fn from(e: DurableError) -> SystemError {
        match e {
            DurableError::Io { op, path, source } => SystemError::Io { op, path, source },
            DurableError::Rename { to, source, .. } => SystemError::Io { op: "rename into place", path: to, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::cpio::tests::parse;

    /// A fake kernel tree with a few modules whose contents are their names.
    fn fake_kernel(root: &Path, release: &str) -> PathBuf {
        let rel = root.join("lib/modules").join(release);
        let dep = "kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/lib/libcrc32c.ko:\n\
                   kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n\
                   kernel/fs/overlayfs/overlay.ko:\n\
                   kernel/sound/unused.ko:\n";
        for line in dep.lines() {
            let (module, _) = line.split_once(':').expect("colon");
            let path = rel.join(module);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, module.as_bytes()).expect("write module");
        }
        std::fs::write(rel.join("modules.dep"), dep).expect("write dep");
        std::fs::write(rel.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n")
            .expect("write builtin");
        root.join("lib/modules")
    }

    #[test]
    fn the_archive_holds_init_modules_and_their_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let init = tmp.path().join("hypeman-init");
        std::fs::write(&init, b"\x7fELF init").expect("write init");
        let modules = fake_kernel(tmp.path(), "6.1.0-test");
        let out = tmp.path().join("initrd.cpio");
        let built = build_initrd(&init, Some(&modules), &out).expect("build");
        assert_eq!(built.kernel_release.as_deref(), Some("6.1.0-test"));

        let entries = parse(&std::fs::read(&out).expect("read"));
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(find("init").1, libc::S_IFREG | 0o755);
        assert_eq!(find("init").2, b"\x7fELF init");
        let order = String::from_utf8(find("lib/modules/load-order").2.clone()).expect("utf-8");
        let listed: Vec<&str> = order.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            listed,
            [
                "/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko",
                "/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko",
                "/lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko",
                "/lib/modules/6.1.0-test/kernel/drivers/net/virtio_net.ko",
                "/lib/modules/6.1.0-test/kernel/lib/libcrc32c.ko",
                "/lib/modules/6.1.0-test/kernel/fs/erofs/erofs.ko",
                "/lib/modules/6.1.0-test/kernel/fs/overlayfs/overlay.ko",
            ]
        );
        // What init parses is exactly what the builder wrote.
        let parsed = hypeman_contract::modules::parse_load_order(&order);
        assert_eq!(parsed.len(), listed.len());
        for path in &listed {
            let entry = find(path.trim_start_matches('/'));
            assert_eq!(
                entry.2,
                path.rsplit("6.1.0-test/").next().expect("rel").as_bytes()
            );
        }
        assert!(
            entries.iter().all(|e| !e.0.contains("unused")),
            "only needed modules"
        );
        // Every file's parent directory comes before it.
        for (i, (name, _, _)) in entries.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                assert!(
                    entries[..i].iter().any(|e| e.0 == parent),
                    "{parent} before {name}"
                );
            }
        }
    }

    #[test]
    fn without_modules_the_initrd_is_init_and_an_empty_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let init = tmp.path().join("init-bin");
        std::fs::write(&init, b"init").expect("write");
        let out = tmp.path().join("i.cpio");
        let built = build_initrd(&init, None, &out).expect("build");
        assert!(built.modules.is_empty() && built.kernel_release.is_none());
        let names: Vec<String> = parse(&std::fs::read(&out).expect("read"))
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            names,
            ["lib", "lib/modules", "init", "lib/modules/load-order"]
        );
    }

    #[test]
    fn the_cache_is_hit_until_init_or_kernel_changes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let init = tmp.path().join("hypeman-init");
        std::fs::write(&init, b"init v1").expect("write");
        let modules = fake_kernel(&tmp.path().join("k1"), "6.1.0-one");

        let first = cached_initrd(&data, &init, Some(&modules)).expect("first");
        assert!(first.built);
        assert_eq!(
            first.path,
            data.join("system/initrd")
                .join(&first.hash)
                .join("initrd.cpio")
        );
        let again = cached_initrd(&data, &init, Some(&modules)).expect("again");
        assert!(!again.built, "unchanged inputs are served from the cache");
        assert_eq!(again.path, first.path);

        std::fs::write(&init, b"init v2").expect("rewrite");
        let new_init = cached_initrd(&data, &init, Some(&modules)).expect("new init");
        assert!(new_init.built && new_init.hash != first.hash);

        let other_kernel = fake_kernel(&tmp.path().join("k2"), "6.1.0-two");
        let new_kernel = cached_initrd(&data, &init, Some(&other_kernel)).expect("new kernel");
        assert!(new_kernel.built && new_kernel.hash != new_init.hash);

        // A module rebuilt in place (same release) is a change too.
        std::fs::write(
            modules.join("6.1.0-one/kernel/fs/overlayfs/overlay.ko"),
            b"rebuilt",
        )
        .expect("rewrite");
        let new_module = cached_initrd(&data, &init, Some(&modules)).expect("new module");
        assert!(new_module.built && new_module.hash != new_init.hash);

        let leftovers: Vec<_> = std::fs::read_dir(new_module.path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, ["initrd.cpio"], "no temp files left behind");
    }

    #[test]
    fn errors_name_the_missing_input() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = cached_initrd(tmp.path(), &tmp.path().join("nope"), None).expect_err("no init");
        assert_eq!(
            err.to_string(),
            format!("cannot read {}", tmp.path().join("nope").display())
        );
    }

    #[test]
    fn pruning_keeps_what_is_kept_and_sweeps_cut_short_removals() {
        let keep: BTreeSet<String> = ["aa".to_string()].into();
        let entries: Vec<String> = ["aa", "bb", ".pruning-cc", ".pruning-aa"].map(String::from).into();
        assert_eq!(prunable(&entries, &keep), ["bb", ".pruning-cc", ".pruning-aa"]);
        assert!(prunable(&[], &keep).is_empty());
    }

    #[test]
    fn old_initrds_are_pruned_and_kept_ones_still_served() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        assert!(prune_initrds(&data, &BTreeSet::new()).expect("no cache yet").is_empty());
        let init = tmp.path().join("hypeman-init");
        std::fs::write(&init, b"init v1").expect("write");
        let old = cached_initrd(&data, &init, None).expect("v1");
        std::fs::write(&init, b"init v2").expect("rewrite");
        let snapshotted = cached_initrd(&data, &init, None).expect("v2");
        std::fs::write(&init, b"init v3").expect("rewrite");
        let current = cached_initrd(&data, &init, None).expect("v3");
        assert_eq!(initrd_hash(&init, None).expect("hash"), current.hash);
        assert_eq!(cached_initrd_hash(&data, &snapshotted.path), Some(snapshotted.hash.clone()));
        assert_eq!(cached_initrd_hash(&data, Path::new("/boot/initrd.img")), None);
        // A removal a crash cut short.
        let cut_short = data.join("system/initrd/.pruning-0123");
        std::fs::create_dir_all(&cut_short).expect("mkdir");
        std::fs::write(cut_short.join("initrd.cpio"), b"half").expect("write");

        let keep: BTreeSet<String> = [current.hash.clone(), snapshotted.hash.clone()].into();
        assert_eq!(prune_initrds(&data, &keep).expect("prune"), [old.hash.as_str()]);
        assert!(!old.path.exists() && !cut_short.exists());
        assert!(snapshotted.path.is_file() && current.path.is_file());
        let mut left: Vec<_> = std::fs::read_dir(data.join("system/initrd"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        let mut want = vec![current.hash.clone(), snapshotted.hash.clone()];
        want.sort();
        assert_eq!(left, want);
        assert!(!cached_initrd(&data, &init, None).expect("v3 again").built, "the current one is still served");
        assert!(prune_initrds(&data, &keep).expect("again").is_empty(), "nothing more to do");
    }
}
