//! The real provisioner: everything a declared instance needs on disk before
//! a hypervisor can boot it — the image's root disk (cached by digest), a
//! sparse ext4 overlay (formatted once, grown when declared larger, never
//! recreated while it exists: `overlay.rs`),
//! the read-only config disk that `hypeman-init` reads, and the initrd —
//! and, with `[network] enabled`, the host bridge and the guest's TAP.
//!
//! The merge of image config and declaration is [`guest_config`], a pure
//! function; the rest is IO, each piece written to a temp name and renamed
//! into place so a crash never leaves a half-made disk under its real name.

use super::provision::{ProvisionError, Provisioner};
use crate::declaration::spec::InstanceSpec;
use crate::durable;
use crate::hypervisor::{AgentChannel, DiskConfig, VmConfig};
use crate::images::{ImageConfig, ImageStore};
use crate::settings::Settings;
use crate::store::{GuestPaths, Metadata};
use async_trait::async_trait;
use crate::hypervisor::NetConfig;
use crate::network::host::{tap_health, HostNetwork, TapHealth};
use crate::network::NetworkError;
use crate::settings::NetworkSettings;
use crate::store::NetworkLease;
use hypeman_contract::config::{
    GuestConfig, NetworkConfig, VolumeConfig, CONFIG_FILE, CONFIG_VERSION, SERIAL_CONFIG, SERIAL_OVERLAY,
    SERIAL_ROOTFS, SERIAL_VOLUME_PREFIX,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// The kernel arguments hypeman always passes; `[guest] cmdline` follows.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet init_on_free=1";

pub struct ImageProvisioner {
    images: Arc<ImageStore>,
    settings: Arc<Settings>,
    init_binary: PathBuf,
    /// The netlink connection every network call shares (the health check
    /// runs on each look at a live guest): opened at the first call, and
    /// dropped after a failed one so that the next opens a fresh one.
    host: std::sync::Mutex<Option<HostNetwork>>,
}

impl ImageProvisioner {
    pub fn new(settings: Arc<Settings>) -> Result<ImageProvisioner, ProvisionError> {
        let images = ImageStore::open(&settings.data_dir, settings.image_store_options())
            .map_err(|e| ProvisionError::Other(format!("cannot open the image store: {}", super::error_chain(&e))))?;
        let init_binary = crate::system::init_binary(settings.guest.init.as_deref());
        Ok(ImageProvisioner { images: Arc::new(images), settings, init_binary, host: std::sync::Mutex::new(None) })
    }

    /// The shared netlink connection, opened if there is none.
    fn host(&self) -> Result<HostNetwork, NetworkError> {
        let mut slot = self.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*slot {
            Some(host) => Ok(host.clone()),
            None => Ok(slot.insert(HostNetwork::connect()?).clone()),
        }
    }

    /// Passes `result` on, dropping the shared connection when it failed:
    /// the failure may have been the connection's.
    fn settle<T>(&self, result: Result<T, NetworkError>) -> Result<T, NetworkError> {
        if result.is_err() {
            *self.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        result
    }

    /// The bridge, and the TAP `tap` on it: `prepare`'s host side.
    async fn ensure_tap(&self, tap: &str) -> Result<(), NetworkError> {
        let host = self.host()?;
        let bridge = host.ensure_bridge(&self.settings.network.bridge, &self.settings.network.subnet).await?;
        host.ensure_tap(tap, bridge).await
    }

    /// [`Self::ensure_tap`], then the TAP handed to the VMM's uid: only
    /// before a VMM starts, never while one holds the TAP. A root VMM
    /// needs no owner (CAP_NET_ADMIN), and one left from per-instance
    /// days does it no harm.
    async fn ensure_tap_for(&self, tap: &str, user: Option<&crate::hypervisor::VmmUser>) -> Result<(), NetworkError> {
        self.ensure_tap(tap).await?;
        match user {
            Some(u) => crate::network::host::set_tap_owner(tap, Some(u.uid)),
            None => Ok(()),
        }
    }

    /// `tap_health`'s host side: how the TAP `tap` looks on the bridge,
    /// changing nothing. A bridge that is gone or down leaves every TAP
    /// off it, which `repair_network` (`ensure_tap`) puts right.
    async fn look_at_tap(&self, tap: &str) -> Result<TapHealth, NetworkError> {
        let host = self.host()?;
        let bridge = host.bridge_index_if_up(&self.settings.network.bridge).await?;
        let health = tap_health(host.tap_facts(tap, bridge.unwrap_or(0)).await?);
        Ok(match (health, bridge) {
            (TapHealth::Fine, None) => TapHealth::Misplaced,
            (health, _) => health,
        })
    }
}

/// The network section of the config disk for a guest holding `lease`.
pub fn guest_network(lease: &NetworkLease, settings: &NetworkSettings) -> Result<NetworkConfig, ProvisionError> {
    let bad = || ProvisionError::Other(format!("the recorded network lease {lease:?} is malformed"));
    Ok(NetworkConfig {
        ip: lease.ip.parse().map_err(|_| bad())?,
        prefix_len: lease.cidr,
        gateway: lease.gateway.parse().map_err(|_| bad())?,
        dns: settings.dns.clone(),
        mac: lease.mac.clone(),
    })
}

/// The guest's runtime config: the declaration overrides the image, with
/// Docker's rule that a declared entrypoint drops the image's cmd. The
/// environment is the image's, then `file_env` (the declaration's env files,
/// read by [`env_from_files`]) over it, then the declaration's `[env]`.
pub fn guest_config(
    spec: &InstanceSpec,
    image: &ImageConfig,
    file_env: &std::collections::BTreeMap<String, String>,
    network: Option<NetworkConfig>,
) -> GuestConfig {
    let entrypoint = spec.entrypoint.clone().unwrap_or_else(|| image.entrypoint.clone());
    let cmd = match (&spec.cmd, &spec.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => image.cmd.clone(),
    };
    let mut env: std::collections::BTreeMap<String, String> = image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    env.extend(file_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    GuestConfig {
        version: CONFIG_VERSION,
        entrypoint,
        cmd,
        env,
        workdir: spec.workdir.clone().or_else(|| image.workdir.clone().filter(|w| !w.is_empty())).unwrap_or_else(|| "/".into()),
        user: image.user.clone().filter(|u| !u.is_empty()),
        hostname: spec.name.clone(),
        network,
        volumes: spec
            .volumes
            .iter()
            .enumerate()
            .map(|(i, v)| VolumeConfig { serial: format!("{SERIAL_VOLUME_PREFIX}{i}"), mount: v.mount.clone(), readonly: v.readonly })
            .collect(),
        stop_grace_ms: None,
    }
}

/// The variables of the declaration's env files, read now: at every cold
/// boot, so that a rotated secret reaches the next boot, and never kept
/// (they go to the config disk only). What the app gets from the
/// declaration, files included, must fit `limits.max_exec_size`. A file
/// other users may read still works, with a warning in `hypeman.log`.
fn env_from_files(
    spec: &InstanceSpec,
    limits: &crate::declaration::Limits,
    guest: &GuestPaths,
    name: &str,
) -> Result<std::collections::BTreeMap<String, String>, ProvisionError> {
    use crate::declaration::env_file;
    if spec.env_files.is_empty() {
        return Ok(Default::default());
    }
    let files = env_file::read_all(&spec.env_files, limits.max_exec_size.0)?;
    for file in files.iter().filter(|f| f.world_readable) {
        let line = format!(
            "env file {} can be read by every user of the host: chmod o-r it (its secrets are not safe there)",
            file.path.display()
        );
        super::event(guest, name, tracing::Level::WARN, &line);
    }
    let from_files = env_file::merged(&files);
    let mut all = from_files.clone();
    all.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env_file::check_exec_size(spec.entrypoint.as_deref(), spec.cmd.as_deref(), &all, limits.max_exec_size)?;
    Ok(from_files)
}

/// Every volume source is still what the declaration was validated
/// against, looked at just before the VMM is given its path.
fn check_volumes(spec: &InstanceSpec) -> Result<(), ProvisionError> {
    for (index, v) in spec.volumes.iter().enumerate() {
        crate::declaration::host::check_at_use(&v.source, v.block_device).map_err(|problem| ProvisionError::Volume {
            index,
            path: v.source.clone(),
            missing: problem == crate::declaration::host::MISSING,
            problem,
        })?;
    }
    Ok(())
}

fn disk_error<'a>(what: &'static str, path: &'a Path) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> ProvisionError + 'a {
    move |source| ProvisionError::Disk { what, path: path.to_path_buf(), source }
}

fn run(cmd: &mut Command) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{:?} failed ({}): {}", cmd, out.status, String::from_utf8_lossy(&out.stderr).trim()).into())
    }
}

/// The overlay at `path` with `size` bytes: made once, grown when the
/// declaration asks for more (see `instances::overlay`), never recreated.
pub fn ensure_overlay(path: &Path, size: u64) -> Result<super::overlay::Ensured, ProvisionError> {
    super::overlay::ensure(path, size)
        .map_err(|e| ProvisionError::Disk { what: "overlay", path: path.to_path_buf(), source: e.into() })
}

/// [`ensure_overlay`] for a guest, saying a grow in its `hypeman.log`.
fn prepare_overlay(guest: &GuestPaths, name: &str, size: u64) -> Result<(), ProvisionError> {
    let said = match ensure_overlay(&guest.overlay, size)? {
        super::overlay::Ensured::Grown { from, to } => Some(format!(
            "overlay grown from {} to {} (the file and its filesystem)",
            crate::config_file::ByteSize(from),
            crate::config_file::ByteSize(to)
        )),
        super::overlay::Ensured::Completed { size } => Some(format!(
            "an interrupted overlay grow was completed: its filesystem fills its {} again",
            crate::config_file::ByteSize(size)
        )),
        super::overlay::Ensured::Made | super::overlay::Ensured::Kept => None,
    };
    if let Some(line) = said {
        super::event(guest, name, tracing::Level::INFO, &line);
    }
    Ok(())
}

/// Writes the config disk: an erofs image holding `config.json`. The
/// JSON's SHA-256 beside the disk (written after it) lets an unchanged
/// config skip the rebuild, which keeps `mkfs.erofs` off the restore path.
/// A digest rather than a copy, so the environment (secrets from env files
/// among it) is on the host once, in the disk the guest needs; a copy that
/// older releases kept (`config.json`) is removed.
pub fn write_config_disk(path: &Path, config: &GuestConfig) -> Result<(), ProvisionError> {
    use sha2::Digest;
    let err = disk_error("config disk", path);
    let json = config.to_json().map_err(|e| err(e.into()))?;
    let digest = format!("sha256:{:x}\n", sha2::Sha256::digest(&json));
    let recorded = path.with_extension("sha256");
    let old_copy = path.with_extension("json");
    durable::remove_file_if_exists(&old_copy).map_err(|e| err(e.into()))?;
    if path.exists() && std::fs::read(&recorded).is_ok_and(|old| old == digest.as_bytes()) {
        return Ok(());
    }
    // A temp name, so a daemon killed while it builds leaves something the
    // next start's sweep of the guest dir removes.
    let staging = durable::temp_path(path);
    durable::create_dir(&staging).map_err(|e| err(e.into()))?;
    let tmp = durable::temp_path(path);
    let built = (|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut file = durable::private_file().write(true).create_new(true).open(staging.join(CONFIG_FILE))?;
        std::io::Write::write_all(&mut file, &json)?;
        // Made here, 0600, for mkfs.erofs to open and fill (one it made
        // itself would be 0644 less the umask).
        durable::private_file().write(true).create_new(true).open(&tmp)?;
        run(Command::new("mkfs.erofs").arg("--quiet").arg(&tmp).arg(&staging))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    if let Err(e) = built {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    durable::publish(&tmp, path).map_err(|e| err(e.into()))?;
    durable::write_atomic(&recorded, digest.as_bytes()).map_err(|e| err(e.into()))?;
    Ok(())
}

#[async_trait]
impl Provisioner for ImageProvisioner {
    async fn prepare(&self, spec: &InstanceSpec, guest: &GuestPaths, meta: &Metadata) -> Result<VmConfig, ProvisionError> {
        // Checked first: a guest that silently has no network is worse
        // than one that does not start.
        let lease = match (spec.network.enabled, &meta.network) {
            (true, Some(lease)) => Some(lease),
            (true, None) => return Err(ProvisionError::NoLease),
            (false, _) => None,
        };
        let network = lease.map(|l| guest_network(l, &self.settings.network)).transpose()?;
        check_volumes(spec)?;
        let file_env = env_from_files(spec, &self.settings.limits, guest, &meta.name)?;
        let kernel = self.settings.guest.kernel.clone().ok_or(ProvisionError::NoKernel)?;
        // Checked here rather than left to the VMM, whose message would be
        // buried in its log after the image work.
        std::fs::File::open(&kernel).map_err(|source| ProvisionError::Kernel { path: kernel.clone(), source })?;
        // Before any image work: a dynamically linked init boots a guest
        // that panics ("No working init found"), which then looks like the
        // VMM's failure. Not-an-ELF is left to the kernel (test stand-ins).
        match crate::system::check_init(&self.init_binary) {
            Err(e @ crate::system::InitError::Dynamic { .. }) => return Err(ProvisionError::Init(e)),
            Ok(()) | Err(crate::system::InitError::NotElf { .. } | crate::system::InitError::Read { .. }) => {}
        }
        let image = self
            .images
            .ensure(&spec.image)
            .await
            .map_err(|e| ProvisionError::Image { reference: spec.image.clone(), source: e.into() })?;
        let (paths, name, size) = (guest.clone(), meta.name.clone(), spec.overlay_size.bytes());
        // Init fits the app's stop window inside the host's grace.
        let grace_ms = u64::try_from(self.settings.reconcile.stop_grace.as_millis()).unwrap_or(u64::MAX);
        let config = GuestConfig { stop_grace_ms: Some(grace_ms), ..guest_config(spec, &image.config, &file_env, network) };
        let data_dir = self.settings.data_dir.clone();
        let init = self.init_binary.clone();
        let modules = self.settings.guest.modules_dir.clone();
        let initrd = tokio::task::spawn_blocking(move || -> Result<PathBuf, ProvisionError> {
            prepare_overlay(&paths, &name, size)?;
            write_config_disk(&paths.config_disk, &config)?;
            let initrd = crate::system::cached_initrd(&data_dir, &init, modules.as_deref())
                .map_err(|e| ProvisionError::Disk { what: "initrd", path: init.clone(), source: e.into() })?;
            Ok(initrd.path)
        })
        .await
        .map_err(|e| ProvisionError::Other(format!("provisioning task failed: {e}")))??;
        // Passthrough devices stay with a root VMM: `/dev/vfio/N` is root's,
        // and their DMA mappings pin all guest RAM (RLIMIT_MEMLOCK), which
        // an unprivileged VMM is not granted.
        let user = match spec.devices.is_empty() {
            true => super::vmm_users::vmm_user(&self.settings, meta),
            false => None,
        };
        let net = match lease {
            Some(lease) => {
                self.settle(self.ensure_tap_for(&lease.tap, user.as_ref()).await)?;
                Some(NetConfig {
                    tap: lease.tap.clone(),
                    mac: lease.mac.clone(),
                    limit_down: spec.network.bandwidth_down,
                    limit_up: spec.network.bandwidth_up,
                })
            }
            None => None,
        };
        // No VMM runs while a VM is prepared: a socket left by the last one
        // is stale, and a VMM that binds rather than replaces it would fail.
        let agent_socket = crate::agent::socket_path(&guest.dir);
        crate::durable::remove_file_if_exists(&agent_socket)
            .map_err(|e| ProvisionError::Disk { what: "agent socket", path: agent_socket.clone(), source: e.into() })?;
        let mut cmdline = BASE_CMDLINE.to_string();
        if !self.settings.guest.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.settings.guest.cmdline);
        }
        let disk = |id: &str, path: &Path, readonly: bool| DiskConfig { id: id.to_string(), path: path.to_path_buf(), readonly, limit: spec.disk_io };
        let mut disks = vec![
            disk(SERIAL_ROOTFS, &image.rootfs, true),
            disk(SERIAL_OVERLAY, &guest.overlay, false),
            disk(SERIAL_CONFIG, &guest.config_disk, true),
        ];
        for (i, v) in spec.volumes.iter().enumerate() {
            disks.push(disk(&format!("{SERIAL_VOLUME_PREFIX}{i}"), &v.source, v.readonly));
        }
        Ok(VmConfig {
            vcpus: spec.vcpus,
            memory_bytes: spec.memory.bytes(),
            hotplug_memory_bytes: spec.hotplug_memory.bytes(),
            kernel,
            initrd: Some(initrd),
            cmdline,
            disks,
            net,
            devices: spec.devices.iter().map(PathBuf::from).collect(),
            serial_log: guest.app_log.clone(),
            vsock: None,
            agent: Some(AgentChannel { socket: agent_socket }),
            user,
        })
    }

    async fn prepare_restore(&self, _meta: &Metadata, config: &VmConfig) -> Result<(), ProvisionError> {
        super::provision::files_present(super::provision::launch_files(config))?;
        // The VMM binds the agent's socket anew (see `prepare`).
        if let Some(agent) = &config.agent {
            crate::durable::remove_file_if_exists(&agent.socket)
                .map_err(|e| ProvisionError::Disk { what: "agent socket", path: agent.socket.clone(), source: e.into() })?;
        }
        if let Some(net) = &config.net {
            self.settle(self.ensure_tap_for(&net.tap, config.user.as_ref()).await)?;
        }
        Ok(())
    }

    async fn release(&self, meta: &Metadata) -> Result<(), ProvisionError> {
        if let Some(lease) = &meta.network {
            self.settle(async { self.host()?.delete_tap(&lease.tap).await }.await)?;
        }
        Ok(())
    }

    async fn prune_cache(&self, in_use: &[PathBuf]) -> Result<(), ProvisionError> {
        let data_dir = self.settings.data_dir.clone();
        let init = self.init_binary.clone();
        let modules = self.settings.guest.modules_dir.clone();
        let in_use = in_use.to_vec();
        let removed = tokio::task::spawn_blocking(move || {
            let initrd_err = |e: crate::system::SystemError| ProvisionError::Disk { what: "initrd", path: init.clone(), source: e.into() };
            let current = crate::system::initrd_hash(&init, modules.as_deref()).map_err(initrd_err)?;
            let mut keep: std::collections::BTreeSet<String> =
                in_use.iter().filter_map(|p| crate::system::cached_initrd_hash(&data_dir, p)).collect();
            keep.insert(current);
            crate::system::prune_initrds(&data_dir, &keep).map_err(initrd_err)
        })
        .await
        .map_err(|e| ProvisionError::Other(format!("pruning task failed: {e}")))??;
        if !removed.is_empty() {
            tracing::info!(removed = removed.len(), "pruned initrds no VM or snapshot uses");
        }
        Ok(())
    }

    async fn tap_health(&self, meta: &Metadata) -> Result<Option<TapHealth>, ProvisionError> {
        let Some(lease) = &meta.network else {
            return Ok(None);
        };
        Ok(Some(self.settle(self.look_at_tap(&lease.tap).await)?))
    }

    async fn repair_network(&self, meta: &Metadata) -> Result<(), ProvisionError> {
        let Some(lease) = &meta.network else {
            return Ok(());
        };
        // A deleted bridge comes back too; its TAPs fell off it and are put
        // back on.
        Ok(self.settle(self.ensure_tap(&lease.tap).await)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declaration::parse_instance;
    use crate::settings::Limits;

    fn spec(text: &str) -> InstanceSpec {
        parse_instance(Path::new("instances/web.toml"), text, &Limits::default()).expect("valid")
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "NGINX_VERSION=1.27".into()],
            workdir: Some("/srv".into()),
            user: Some("101:101".into()),
        }
    }

    /// What validation saw may have changed by the time the VM is made:
    /// a source that became a directory (or a symlink) is refused and
    /// waits for a change; one that went missing is retried.
    #[test]
    fn a_volume_source_is_looked_at_again_before_the_vm_is_made() {
        use crate::instances::{ErrorKind, InstanceError};
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d.raw");
        std::fs::write(&disk, b"disk").unwrap();
        let text = format!("image = \"x\"\n[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n", disk.display());
        let decl = tmp.path().join("web.toml");
        std::fs::write(&decl, text).unwrap();
        let spec = crate::declaration::load_instance(&decl, &Limits::default()).expect("valid");
        check_volumes(&spec).expect("a regular file");

        std::fs::remove_file(&disk).unwrap();
        let err = check_volumes(&spec).unwrap_err();
        assert!(matches!(err, ProvisionError::Volume { missing: true, .. }), "{err}");
        assert_eq!(InstanceError::Provision(err).kind(), ErrorKind::Transient);

        std::fs::create_dir(&disk).unwrap();
        let err = check_volumes(&spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "volumes[0]: the source {} is a directory; a volume is a raw disk image file (or a block device \
                 with block_device = true) (it changed since the declaration was read)",
                spec.volumes[0].source.display()
            )
        );
        assert_eq!(InstanceError::Provision(err).kind(), ErrorKind::NeedsChange);
    }

    #[test]
    fn declaration_overrides_the_image_config() {
        let merged = guest_config(
            &spec("image = \"nginx\"\ncmd = [\"nginx\", \"-T\"]\n[env]\nNGINX_VERSION = \"pinned\"\nEXTRA = \"1\"\n[[volumes]]\nsource = \"/var/lib/d.raw\"\npath = \"/data\"\nreadonly = true\n"),
            &image(),
            &Default::default(),
            None,
        );
        insta::assert_json_snapshot!("config_disk_contents", merged);
    }

    #[test]
    fn the_config_disk_carries_the_lease_and_the_settings_dns() {
        let settings = NetworkSettings {
            dns: vec!["10.100.0.1".parse().unwrap(), "2606:4700::1111".parse().unwrap()],
            ..NetworkSettings::default()
        };
        let id = ulid::Ulid::from_string("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let lease = crate::network::ipam::lease(&settings.subnet, id, "10.100.7.9".parse().unwrap());
        let network = guest_network(&lease, &settings).unwrap();
        let merged = guest_config(&spec("image = \"nginx\"\n[network]\nenabled = true\n"), &image(), &Default::default(), Some(network));
        merged.validate().expect("the guest accepts it");
        insta::assert_json_snapshot!("config_disk_network", merged.network);
        let mut garbled = lease.clone();
        garbled.gateway = "gw".into();
        assert!(guest_network(&garbled, &settings).unwrap_err().to_string().contains("malformed"));
    }

    /// image env < env files (a later one wins) < `[env]`; the values go to
    /// the config disk's config only, and a file that cannot be used stops
    /// the boot naming the file and line, never the value.
    #[test]
    fn env_files_sit_between_the_image_and_the_declaration() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&tmp.path().join("data")).unwrap();
        let meta = store.create_guest("web", crate::declaration::spec::HypervisorKind::Qemu).unwrap();
        let guest = store.guest_paths(meta.id);
        let (a, b) = (tmp.path().join("a.env"), tmp.path().join("b.env"));
        for (file, text) in [(&a, "NGINX_VERSION=from-a\nSHARED=a\nONLY_A=1\n"), (&b, "SHARED=b\nEXTRA=from-b\n")] {
            std::fs::write(file, text).unwrap();
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let text = format!(
            "image = \"nginx\"\nenv_files = [\"{}\", \"{}\"]\n[env]\nEXTRA = \"inline\"\n",
            a.display(),
            b.display()
        );
        let spec = spec(&text);
        let file_env = env_from_files(&spec, &Limits::default(), &guest, "web").unwrap();
        let merged = guest_config(&spec, &image(), &file_env, None);
        let got: Vec<(&str, &str)> = merged.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("EXTRA", "inline"),
                ("NGINX_VERSION", "from-a"),
                ("ONLY_A", "1"),
                ("PATH", "/usr/bin:/bin"),
                ("SHARED", "b"),
            ]
        );
        let log = std::fs::read_to_string(&guest.hypeman_log).unwrap_or_default();
        assert!(!log.contains("env file"), "no warning for private files: {log}");

        // Readable by all: used, and said.
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
        env_from_files(&spec, &Limits::default(), &guest, "web").unwrap();
        let log = std::fs::read_to_string(&guest.hypeman_log).unwrap();
        assert!(log.contains(&format!("env file {} can be read by every user of the host", a.display())), "{log}");
        assert!(!log.contains("from-a"), "{log}");

        std::fs::write(&b, "SHARED=b\nsecret-value-without-a-name\n").unwrap();
        let err = env_from_files(&spec, &Limits::default(), &guest, "web").unwrap_err();
        let shown = crate::error_chain(&err);
        assert_eq!(shown, format!("{}:2: expected NAME=value (the line is not shown, it may hold a secret)", b.display()));
        assert_eq!(crate::instances::InstanceError::Provision(err).kind(), crate::instances::ErrorKind::NeedsChange);

        std::fs::remove_file(&b).unwrap();
        let err = env_from_files(&spec, &Limits::default(), &guest, "web").unwrap_err();
        assert!(crate::error_chain(&err).starts_with(&format!("env file {} cannot be read: No such file", b.display())), "{err}");
        assert_eq!(crate::instances::InstanceError::Provision(err).kind(), crate::instances::ErrorKind::Transient);

        // The app's strings with the files' must fit max_exec_size.
        std::fs::write(&b, format!("BIG={}\n", "x".repeat(102_350))).unwrap();
        let small = Limits { max_exec_size: crate::config_file::ByteSize(100 * 1024), ..Limits::default() };
        let err = env_from_files(&spec, &small, &guest, "web").unwrap_err();
        assert!(err.to_string().starts_with("entrypoint, cmd, env and env_files pass limits.max_exec_size (100KiB"), "{err}");
    }

    #[test]
    fn a_declared_entrypoint_drops_the_image_cmd() {
        let merged = guest_config(&spec("image = \"nginx\"\nentrypoint = [\"/bin/sh\"]\n"), &image(), &Default::default(), None);
        assert_eq!(merged.entrypoint, vec!["/bin/sh"]);
        assert!(merged.cmd.is_empty());
        let kept = guest_config(&spec("image = \"nginx\"\n"), &image(), &Default::default(), None);
        assert_eq!(kept.cmd, image().cmd);
        assert_eq!(kept.workdir, "/srv");
    }

    #[tokio::test]
    async fn networking_without_a_lease_is_refused_not_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.guest.kernel = Some("/nonexistent/vmlinuz".into());
        let store = crate::store::Store::open(&settings.data_dir).unwrap();
        let meta = store.create_guest("web", crate::declaration::spec::HypervisorKind::Qemu).unwrap();
        let provisioner = ImageProvisioner::new(Arc::new(settings)).unwrap();
        let spec = spec("image = \"nginx\"\n[network]\nenabled = true\n");
        let err = provisioner.prepare(&spec, &store.guest_paths(meta.id), &meta).await.unwrap_err();
        assert!(matches!(err, ProvisionError::NoLease), "{err}");
        assert!(!store.guest_paths(meta.id).overlay.exists(), "nothing was made");
    }

    #[tokio::test]
    async fn a_missing_kernel_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        let store = crate::store::Store::open(&settings.data_dir).unwrap();
        let meta = store.create_guest("web", crate::declaration::spec::HypervisorKind::Qemu).unwrap();
        let provisioner = ImageProvisioner::new(Arc::new(settings)).unwrap();
        let err = provisioner.prepare(&spec("image = \"nginx\"\n"), &store.guest_paths(meta.id), &meta).await.unwrap_err();
        assert!(matches!(err, ProvisionError::NoKernel), "{err}");
    }

    #[tokio::test]
    async fn an_unreadable_kernel_is_named_before_any_work() {
        let tmp = tempfile::tempdir().unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.guest.kernel = Some(tmp.path().join("vmlinuz"));
        let store = crate::store::Store::open(&settings.data_dir).unwrap();
        let meta = store.create_guest("web", crate::declaration::spec::HypervisorKind::Qemu).unwrap();
        let provisioner = ImageProvisioner::new(Arc::new(settings)).unwrap();
        let err = provisioner.prepare(&spec("image = \"nginx\"\n"), &store.guest_paths(meta.id), &meta).await.unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            format!(
                "cannot read the guest kernel {} (set by [guest] kernel in hypeman.toml): No such file or directory (os error 2)",
                tmp.path().join("vmlinuz").display()
            )
        );
        assert!(!store.guest_paths(meta.id).overlay.exists(), "nothing was made");
    }

    /// A dynamically linked init (this test binary is one) is refused
    /// before any disk work, naming the file and the static build.
    #[tokio::test]
    async fn a_dynamically_linked_init_is_refused_before_any_work() {
        let tmp = tempfile::tempdir().unwrap();
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.guest.kernel = Some(tmp.path().join("vmlinuz"));
        std::fs::write(tmp.path().join("vmlinuz"), b"kernel").unwrap();
        let dynamic = std::env::current_exe().unwrap();
        settings.guest.init = Some(dynamic.clone());
        let store = crate::store::Store::open(&settings.data_dir).unwrap();
        let meta = store.create_guest("web", crate::declaration::spec::HypervisorKind::Qemu).unwrap();
        let provisioner = ImageProvisioner::new(Arc::new(settings)).unwrap();
        let err = provisioner.prepare(&spec("image = \"nginx\"\n"), &store.guest_paths(meta.id), &meta).await.unwrap_err();
        let shown = crate::error_chain(&err);
        assert!(shown.starts_with(&format!("the guest init {} is dynamically linked (", dynamic.display())), "{shown}");
        assert!(shown.ends_with(&format!("build a static one with `{}`", crate::system::STATIC_INIT_BUILD)), "{shown}");
        assert!(!store.guest_paths(meta.id).overlay.exists(), "nothing was made");
    }

    #[test]
    fn config_disk_holds_the_config() {
        if !crate::test_gate::tools(&["mkfs.erofs", "fsck.erofs"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.erofs");
        let config = guest_config(&spec("image = \"nginx\"\n"), &image(), &Default::default(), None);
        write_config_disk(&p, &config).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "the disk holds the env");
        assert!(!p.with_extension("json").exists(), "no plaintext copy beside it");
        let out = dir.path().join("out");
        let status = Command::new("fsck.erofs").arg(format!("--extract={}", out.display())).arg(&p).status().unwrap();
        assert!(status.success());
        let back = GuestConfig::parse(&std::fs::read(out.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(back, config);
        // Unchanged: not rebuilt. Changed: rebuilt with the new content.
        let built = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_config_disk(&p, &config).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), built);
        let mut changed = config.clone();
        changed.hostname = "other".into();
        write_config_disk(&p, &changed).unwrap();
        let out2 = dir.path().join("out2");
        let status = Command::new("fsck.erofs").arg(format!("--extract={}", out2.display())).arg(&p).status().unwrap();
        assert!(status.success());
        let back = GuestConfig::parse(&std::fs::read(out2.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(back.hostname, "other");
    }

    #[tokio::test]
    async fn pruning_keeps_the_current_initrd_and_those_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let init = tmp.path().join("hypeman-init");
        let mut settings = Settings::defaults();
        settings.data_dir = tmp.path().join("data");
        settings.guest.init = Some(init.clone());
        let built = |text: &str| {
            std::fs::write(&init, text).unwrap();
            crate::system::cached_initrd(&settings.data_dir, &init, None).unwrap().path
        };
        let (old, in_use, current) = (built("v1"), built("v2"), built("v3"));
        let provisioner = ImageProvisioner::new(Arc::new(settings.clone())).unwrap();
        provisioner.prune_cache(&[in_use.clone(), "/boot/initrd.img".into()]).await.unwrap();
        assert!(!old.exists());
        assert!(in_use.is_file() && current.is_file());
        // No longer in use: it goes; the current one never does.
        provisioner.prune_cache(&[]).await.unwrap();
        assert!(!in_use.exists() && current.is_file());
        // Without the init binary the current key is unknown: nothing goes.
        built("v4");
        std::fs::remove_file(&init).unwrap();
        assert!(provisioner.prune_cache(&[]).await.is_err());
        assert!(current.is_file());
    }
}
