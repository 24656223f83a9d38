//! What every guest boots besides its own disks: the kernel's modules, the
//! initrd that carries `hypeman-init` and those modules, and the host facts
//! the kernel command line needs (`tsc_early_khz=`).
//!
//! This module assembles and caches files under `<data_dir>/system/`; it
//! never starts a VM and never touches the host's `/boot` or `/lib/modules`
//! unless a setting points there.

mod cpio;
mod elf;
mod initrd;
mod modules;
mod tsc;

use std::path::PathBuf;

pub use cpio::CpioWriter;
pub use elf::{check_init, linkage, ElfError, InitError, Linkage, STATIC_INIT_BUILD};
pub use initrd::{build_initrd, cached_initrd, cached_initrd_hash, initrd_hash, prune_initrds, Initrd};
pub use modules::{kernel_release, ModuleTree, GUEST_MODULES};
pub use tsc::{host_tsc_khz, tsc_khz_from_cpuinfo};

/// The guest's PID 1 the daemon puts in the initrd: `configured` (the
/// settings' `[guest] init`), else
/// `hypeman-init` next to the running executable (where a release installs
/// it). `validate` checks the same file the daemon will use.
pub fn init_binary(configured: Option<&std::path::Path>) -> PathBuf {
    match configured {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("hypeman-init")))
            .unwrap_or_else(|| PathBuf::from("hypeman-init")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a kernel modules directory: neither it nor exactly one subdirectory holds a modules.dep (run `depmod -b ROOT RELEASE`)")]
    NotAModulesDir { path: PathBuf },

    #[error("{path}:{line}: not a modules.dep line (`module.ko: dep.ko …`)")]
    BadDepLine { path: PathBuf, line: usize },

    #[error(
        "kernel {release} has no module {name}: it is neither built in nor listed in modules.dep"
    )]
    ModuleMissing { name: String, release: String },

    #[error("module {path} is compressed; hypeman loads plain .ko files only (decompress the modules and rerun depmod)")]
    CompressedModule { path: PathBuf },

    #[error("modules.dep has a dependency cycle through {module}")]
    DependencyCycle { module: String },

    #[error("{name} is too large for a cpio newc archive")]
    TooLarge { name: String },

    #[error("/proc/cpuinfo has no usable \"cpu MHz\" line")]
    NoCpuMhz,
}

impl SystemError {
    fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> SystemError {
        SystemError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
