//! The outside format of an instance declaration: serde types that mirror the
//! TOML file exactly, with spans kept for validation messages. Nothing here
//! checks meaning; `validate` turns these into an `InstanceSpec`. Unknown keys
//! are rejected at every level so a typo is an error, not a silent default.
//!
//! Values that validation checks are read loosely (`i64` for counts, strings
//! for enums) so that one bad value is reported with the others instead of
//! stopping the parse at the first.
//!
//! The whole format, with defaults (sizes and rates: see `config_file::units`):
//!
//! ```toml
//! image = "docker.io/library/nginx:alpine"  # required; or "oci:/abs/dir[:tag]", "oci-archive:/abs/file[:tag]"
//! state = "running"            # running | standby | stopped
//! restart = "always"           # always | on-failure | never: when the guest ends on its own
//! hypervisor = "cloud-hypervisor"  # cloud-hypervisor | qemu; default: the settings' default_hypervisor
//! vcpus = 1                    # 1..=limits.max_vcpus
//! memory = "512MiB"            # >= 80MiB, a multiple of 2MiB
//! hotplug_memory = "0"         # 0 or a multiple of 128MiB; memory + hotplug_memory <= limits.max_memory
//! overlay_size = "1GiB"        # 16MiB..=limits.max_overlay_size
//! entrypoint = ["/bin/sh", "-c"]  # default: the image's
//! cmd = ["echo hi"]            # default: the image's
//! workdir = "/srv"             # absolute; default: the image's
//! devices = ["0000:01:00.0"]   # PCI BDF or /sys/bus/pci/devices/<BDF>, passed through with VFIO
//!
//! env_files = ["/run/secrets/web.env"]  # absolute; NAME=value lines read by the daemon at each
//!                              # cold boot, never stored (format: `env_file`); image env <
//!                              # env_files in order < [env]
//!
//! [env]                        # names: [A-Za-z_][A-Za-z0-9_]*
//! GREETING = "hello"
//!
//! [network]                    # a TAP on the settings' bridge and a static IPv4 address
//! enabled = false
//! bandwidth_down = "100Mbit"   # host → guest rate; default: unlimited (not with QEMU)
//! bandwidth_up = "10MiB/s"     # guest → host rate; default: unlimited (not with QEMU)
//!
//! [disk_io]                    # applies to every disk of the instance
//! bytes_per_sec = "50MiB/s"    # a rate; default: unlimited
//! iops = 1000                  # operations per second; default: unlimited
//!
//! [[volumes]]                  # zero or more
//! source = "/var/lib/data.raw" # absolute host path of a raw disk image (a regular file), no `..`;
//!                              # symlinks are resolved once, when the file is read
//! path = "/data"               # absolute guest mount point, not "/"
//! readonly = false
//! block_device = false         # true: source must be a block device instead of a file
//! ```
//!
//! Sizes of the input itself are bounded (`[limits]` in hypeman.toml): the
//! file by `max_declaration_size` (1MiB), each `entrypoint`/`cmd` argument
//! and each `NAME=value` of `env` by the guest kernel's 131071 bytes, and
//! all of them together by `max_exec_size` (1MiB, counted as the kernel
//! does: bytes + NUL + 8-byte pointer per string).
//!
//! `[network]` and `[disk_io]` may also be written inline
//! (`disk_io = { iops = 1000 }`); TOML treats both spellings alike.

use crate::config_file::units::RawQuantity;
use crate::config_file::RawInt;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInstance {
    pub image: Option<Spanned<String>>,
    pub state: Option<Spanned<String>>,
    pub restart: Option<Spanned<String>>,
    pub hypervisor: Option<Spanned<String>>,
    pub vcpus: Option<Spanned<RawInt>>,
    pub memory: Option<Spanned<RawQuantity>>,
    pub hotplug_memory: Option<Spanned<RawQuantity>>,
    pub overlay_size: Option<Spanned<RawQuantity>>,
    pub entrypoint: Option<RawArgv>,
    pub cmd: Option<RawArgv>,
    pub workdir: Option<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub env_files: Vec<Spanned<String>>,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub disk_io: RawDiskIo,
    #[serde(default)]
    pub devices: Vec<Spanned<String>>,
    #[serde(default)]
    pub volumes: Vec<Spanned<RawVolume>>,
}

/// `[network]`: `enabled`, and rates (see `units`) per direction.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub enabled: Option<bool>,
    pub bandwidth_down: Option<Spanned<RawQuantity>>,
    pub bandwidth_up: Option<Spanned<RawQuantity>>,
}

/// `[disk_io]`: `bytes_per_sec` is a rate (see `units`), `iops` a count.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiskIo {
    pub bytes_per_sec: Option<Spanned<RawQuantity>>,
    pub iops: Option<Spanned<RawInt>>,
}

/// One `[[volumes]]` entry. `source` and `path` are optional here only so a
/// missing one is reported alongside the file's other problems.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVolume {
    pub source: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub readonly: Option<bool>,
    pub block_device: Option<bool>,
}

/// `entrypoint` and `cmd`: a list of strings, one per argument. A single
/// string (as `docker-compose` allows) is refused with an example of the
/// list, since splitting it into words would guess at quoting.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawArgv(pub Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for RawArgv {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ArgvVisitor;

        impl<'de> Visitor<'de> for ArgvVisitor {
            type Value = RawArgv;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings, one per argument, such as [\"nginx\", \"-g\", \"daemon off;\"]")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawArgv, A::Error> {
                let mut args = Vec::new();
                while let Some(arg) = seq.next_element::<Spanned<String>>()? {
                    args.push(arg);
                }
                Ok(RawArgv(args))
            }
        }

        deserializer.deserialize_seq(ArgvVisitor)
    }
}
