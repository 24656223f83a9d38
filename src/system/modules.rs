//! Which kernel modules a guest needs and in what order to load them,
//! resolved from the kernel's own `modules.dep` (parsed here; no `modprobe`
//! on the host). Names compare with `-` and `_` as equal, as the kernel does.
//! A wanted module that the kernel has built in needs nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::SystemError;

/// What hypeman-init needs, in the order a user would think of them; the
/// resolver adds dependencies first. `true` marks modules boot cannot do
/// without; the others (CPU-specific crc32c, virtio-mem, …) are skipped if
/// the kernel lacks them.
pub const GUEST_MODULES: &[(&str, bool)] = &[
    ("virtio_ring", false),
    ("virtio", false),
    ("virtio_mmio", false),
    ("virtio_pci_modern_dev", false),
    ("virtio_pci_legacy_dev", false),
    ("virtio_pci", false),
    ("virtio_blk", true),
    ("virtio_console", false),
    ("failover", false),
    ("net_failover", false),
    ("virtio_net", true),
    ("crc32c-intel", false),
    ("libcrc32c", false),
    ("erofs", true),
    ("overlay", true),
    ("virtio_mem", false),
    // The agent channel under Cloud Hypervisor (its hybrid vsock); under
    // QEMU it is a virtio-serial port (virtio_console above).
    ("vsock", false),
    ("vmw_vsock_virtio_transport_common", false),
    ("vmw_vsock_virtio_transport", false),
    // The host's clock for the agent's step after a restore; it loads only
    // on KVM and fails harmlessly (ENODEV) elsewhere.
    ("ptp_kvm", false),
    // The ACPI power button: how init hears the host's graceful stop
    // (QEMU system_powerdown, Cloud Hypervisor vm.power-button).
    ("button", false),
    // Built into Debian's cloud kernel; a module (with jbd2, mbcache, crc16…)
    // in the generic one.
    ("ext4", true),
];

/// `ext4-foo.ko` and `ext4_foo.ko.xz` are both module `ext4_foo`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn is_compressed(path: &str) -> bool {
    !path.ends_with(".ko")
}

/// One kernel's module tree: `modules.dep` and `modules.builtin`.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    dir: PathBuf,
    release: String,
    /// Path relative to `dir` → its dependencies, as listed.
    deps: BTreeMap<String, Vec<String>>,
    /// Normalised module name → path relative to `dir`.
    by_name: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

/// Finds the release directory: `modules_dir` itself if it holds a
/// `modules.dep`, else its only subdirectory that does (so both
/// `K/lib/modules` and `K/lib/modules/6.1.0-56-cloud-amd64` work).
fn release_dir(modules_dir: &Path) -> Result<PathBuf, SystemError> {
    if modules_dir.join("modules.dep").is_file() {
        return Ok(modules_dir.to_path_buf());
    }
    let entries =
        std::fs::read_dir(modules_dir).map_err(|e| SystemError::io("list", modules_dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SystemError::io("list", modules_dir, e))?;
        if entry.path().join("modules.dep").is_file() {
            found.push(entry.path());
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(_) => Err(SystemError::NotAModulesDir {
            path: modules_dir.to_path_buf(),
        }),
    }
}

/// The kernel release (`6.1.0-56-cloud-amd64`) a modules directory is for.
pub fn kernel_release(modules_dir: &Path) -> Result<String, SystemError> {
    let dir = release_dir(modules_dir)?;
    Ok(dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default())
}

impl ModuleTree {
    /// Reads `modules.dep` (required) and `modules.builtin` (optional).
    pub fn open(modules_dir: &Path) -> Result<ModuleTree, SystemError> {
        let dir = release_dir(modules_dir)?;
        let release = kernel_release(&dir)?;
        let dep_path = dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path)
            .map_err(|e| SystemError::io("read", &dep_path, e))?;
        let builtin_path = dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(SystemError::io("read", builtin_path, e)),
        };
        ModuleTree::parse(&dir, &release, &dep, &builtin)
    }

    /// Builds the tree from the two files' contents.
    pub fn parse(
        dir: &Path,
        release: &str,
        dep: &str,
        builtin: &str,
    ) -> Result<ModuleTree, SystemError> {
        let mut deps = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for (index, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, rest) = line
                .split_once(':')
                .ok_or_else(|| SystemError::BadDepLine {
                    path: dir.join("modules.dep"),
                    line: index + 1,
                })?;
            let module = module.trim().to_owned();
            if module.is_empty() {
                return Err(SystemError::BadDepLine {
                    path: dir.join("modules.dep"),
                    line: index + 1,
                });
            }
            by_name.insert(module_name(&module), module.clone());
            deps.insert(module, rest.split_whitespace().map(str::to_owned).collect());
        }
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        Ok(ModuleTree {
            dir: dir.to_path_buf(),
            release: release.to_owned(),
            deps,
            by_name,
            builtin,
        })
    }

    pub fn release(&self) -> &str {
        &self.release
    }

    /// The release directory; module paths are relative to it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The module files to load, relative to [`ModuleTree::dir`], each after
    /// everything it depends on. Built-in modules are left out; a missing
    /// required module is an error, a missing optional one is skipped.
    pub fn resolve(&self, wanted: &[(&str, bool)]) -> Result<Vec<String>, SystemError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for (name, required) in wanted {
            let key = name.replace('-', "_");
            if self.builtin.contains(&key) {
                continue;
            }
            match self.by_name.get(&key) {
                Some(path) => self.visit(path, &mut Vec::new(), &mut done, &mut order)?,
                None if *required => {
                    return Err(SystemError::ModuleMissing {
                        name: (*name).to_owned(),
                        release: self.release.clone(),
                    })
                }
                None => {}
            }
        }
        for path in &order {
            if is_compressed(path) {
                return Err(SystemError::CompressedModule {
                    path: self.dir.join(path),
                });
            }
        }
        Ok(order)
    }

    /// Depth-first, dependencies before the module. `modules.dep` lists a
    /// module's dependencies with the ones to load last first, so they are
    /// visited in reverse, matching `modprobe --show-depends`.
    fn visit(
        &self,
        path: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), SystemError> {
        if done.contains(path) {
            return Ok(());
        }
        if stack.iter().any(|p| p == path) {
            return Err(SystemError::DependencyCycle {
                module: module_name(path),
            });
        }
        stack.push(path.to_owned());
        for dep in self.deps.get(path).into_iter().flatten().rev() {
            self.visit(dep, stack, done, order)?;
        }
        stack.pop();
        done.insert(path.to_owned());
        order.push(path.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trimmed copy of Debian 6.1 cloud's modules.dep, plus a decoy.
    const DEP: &str = "\
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio_mem.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/acpi/button.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/ptp/ptp_kvm.ko:
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n";

    fn names(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn resolves_the_guest_set_in_the_order_modprobe_gives() {
        let tree = ModuleTree::parse(Path::new("/k"), "6.1.0-56-cloud-amd64", DEP, BUILTIN)
            .expect("parse");
        let order = tree.resolve(GUEST_MODULES).expect("resolve");
        // The order measured with `modprobe --show-depends` in reference/this-machine.md §3.
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_blk",
                "virtio_console",
                "failover",
                "net_failover",
                "virtio_net",
                "crc32c_intel",
                "libcrc32c",
                "erofs",
                "overlay",
                "virtio_mem",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "ptp_kvm",
                "button",
            ]
        );
        assert_eq!(order[11], "kernel/arch/x86/crypto/crc32c-intel.ko");
    }

    #[test]
    fn dependencies_come_first_whatever_the_request_order() {
        let tree = ModuleTree::parse(Path::new("/k"), "r", DEP, "").expect("parse");
        let order = tree
            .resolve(&[("virtio-net", true), ("erofs", true)])
            .expect("resolve");
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "libcrc32c",
                "erofs"
            ]
        );
    }

    #[test]
    fn ext4_as_a_module_brings_its_dependencies() {
        let dep = "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
                   kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n";
        let tree = ModuleTree::parse(Path::new("/k"), "generic", dep, "").expect("parse");
        let order = tree.resolve(&[("ext4", true)]).expect("resolve");
        assert_eq!(names(&order), ["jbd2", "mbcache", "crc16", "ext4"]);
    }

    #[test]
    fn missing_required_modules_fail_and_optional_ones_are_skipped() {
        let tree = ModuleTree::parse(Path::new("/k"), "6.1-x", DEP, "").expect("parse");
        let err = tree
            .resolve(&[("ext4", true)])
            .expect_err("ext4 is nowhere");
        assert_eq!(
            err.to_string(),
            "kernel 6.1-x has no module ext4: it is neither built in nor listed in modules.dep"
        );
        assert!(tree
            .resolve(&[("vhost", false)])
            .expect("optional")
            .is_empty());
    }

    #[test]
    fn compressed_modules_are_reported_clearly() {
        let tree = ModuleTree::parse(
            Path::new("/k"),
            "r",
            "kernel/fs/overlayfs/overlay.ko.zst:\n",
            "",
        )
        .expect("parse");
        let err = tree.resolve(&[("overlay", true)]).expect_err("compressed");
        assert!(
            err.to_string()
                .contains("/k/kernel/fs/overlayfs/overlay.ko.zst is compressed"),
            "{err}"
        );
    }

    #[test]
    fn cycles_and_malformed_lines_are_errors() {
        let tree =
            ModuleTree::parse(Path::new("/k"), "r", "a.ko: b.ko\nb.ko: a.ko\n", "").expect("parse");
        assert!(matches!(
            tree.resolve(&[("a", true)]),
            Err(SystemError::DependencyCycle { .. })
        ));
        let err = ModuleTree::parse(Path::new("/k"), "r", "a.ko:\nno colon here\n", "")
            .expect_err("bad line");
        assert_eq!(
            err.to_string(),
            "/k/modules.dep:2: not a modules.dep line (`module.ko: dep.ko …`)"
        );
    }

    #[test]
    fn finds_the_release_from_either_level() {
        let root = tempfile::tempdir().expect("tempdir");
        let modules = root.path().join("lib/modules");
        let rel = modules.join("6.1.0-56-cloud-amd64");
        std::fs::create_dir_all(&rel).expect("mkdir");
        assert!(matches!(
            kernel_release(&modules),
            Err(SystemError::NotAModulesDir { .. })
        ));
        std::fs::write(rel.join("modules.dep"), DEP).expect("write");
        assert_eq!(
            kernel_release(&modules).expect("parent"),
            "6.1.0-56-cloud-amd64"
        );
        assert_eq!(
            kernel_release(&rel).expect("itself"),
            "6.1.0-56-cloud-amd64"
        );
        let tree = ModuleTree::open(&modules).expect("open");
        assert_eq!(tree.dir(), rel);
        assert_eq!(tree.release(), "6.1.0-56-cloud-amd64");
    }
}
