//! The config disk: what the host writes onto it (`config.json`, validated
//! the same way on both sides), the serials by which init finds each disk,
//! and where things live in the guest.
//!
//! This module only describes and validates; it does no IO beyond parsing
//! bytes handed to it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The only `config.json` version this init reads.
pub const CONFIG_VERSION: u32 = 1;

/// File name of the config at the root of the config disk.
pub const CONFIG_FILE: &str = "config.json";

/// Virtio serial of the image's read-only root disk.
pub const SERIAL_ROOTFS: &str = "rootfs";
/// Virtio serial of the writable overlay disk.
pub const SERIAL_OVERLAY: &str = "overlay";
/// Virtio serial of the read-only config disk.
pub const SERIAL_CONFIG: &str = "config";
/// Prefix every volume serial starts with (`vol0`, `vol1`, …).
pub const SERIAL_VOLUME_PREFIX: &str = "vol";
/// Virtio-blk serials are at most 20 bytes (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_MAX_LEN: usize = 20;

/// Directory name inside the overlay disk for overlayfs' upper layer.
pub const OVERLAY_UPPER: &str = "upper";
/// Directory name inside the overlay disk for overlayfs' work directory.
pub const OVERLAY_WORK: &str = "work";

/// Docker's default `PATH` for a container whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime config of one guest, merged on the host from the image config
/// and the declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    pub version: u32,
    /// Docker semantics: the program run is `entrypoint ++ cmd`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute; created if the image lacks it, like Docker does.
    #[serde(default = "default_workdir")]
    pub workdir: String,
    /// `uid[:gid]` or `name[:group]`, resolved in the image's `/etc/passwd`;
    /// `None` runs as root.
    #[serde(default)]
    pub user: Option<String>,
    pub hostname: String,
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    #[serde(default)]
    pub volumes: Vec<VolumeConfig>,
    /// How long the host gives the guest to power off once it pressed the
    /// power button (its `stop_grace`), in milliseconds: init fits the
    /// app's SIGTERM → SIGKILL window inside it (see [`app_stop_window`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
}

/// The app's window between SIGTERM and SIGKILL when the host gives no
/// grace: Docker's default.
pub const DEFAULT_APP_STOP_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// What init keeps of the host's grace for itself after the app's window:
/// reaping what is left, syncing, unmounting, powering off.
pub const WIND_DOWN_RESERVE: std::time::Duration = std::time::Duration::from_secs(5);

/// The app's window between SIGTERM and SIGKILL inside a host grace of
/// `host_grace`: all of it but the wind-down reserve, and never less than
/// half of it, so that the guest powers off by itself before the host
/// kills it.
pub fn app_stop_window(host_grace: Option<std::time::Duration>) -> std::time::Duration {
    match host_grace {
        None => DEFAULT_APP_STOP_WINDOW,
        Some(grace) => grace.saturating_sub(WIND_DOWN_RESERVE).max(grace / 2),
    }
}

/// Static IPv4 configuration of the guest's one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Picks the interface: `aa:bb:cc:dd:ee:ff`, the MAC the host gave the NIC.
    pub mac: String,
}

/// One extra disk mounted into the app's filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Virtio serial of the disk; starts with [`SERIAL_VOLUME_PREFIX`].
    pub serial: String,
    /// Absolute mount point inside the app's root.
    pub mount: String,
    #[serde(default)]
    pub readonly: bool,
}

fn default_workdir() -> String {
    "/".to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),

    #[error("config has no numeric \"version\" field")]
    MissingVersion,

    #[error("config has version {found}, this init reads version {CONFIG_VERSION}")]
    UnsupportedVersion { found: u64 },

    #[error("nothing to run: the image defines no entrypoint or cmd, and the declaration sets neither (set `cmd` or `entrypoint` in it)")]
    NothingToRun,

    #[error("{field} must be an absolute path, not {value:?}")]
    NotAbsolute { field: &'static str, value: String },

    #[error("network prefix length {0} is larger than 32")]
    PrefixTooLong(u8),

    #[error("network mac {0:?} is not six colon-separated hex bytes")]
    BadMac(String),

    #[error("volume serial {0:?} must start with \"vol\" and be at most 20 bytes")]
    BadVolumeSerial(String),

    #[error("volume serial {0:?} is used twice")]
    DuplicateVolume(String),

    #[error("hostname {0:?} is empty, too long or has characters other than letters, digits, '-' and '.'")]
    BadHostname(String),

    #[error("environment variable name {0:?} is empty or contains '=' or NUL")]
    BadEnvName(String),

    #[error("{field} contains a NUL byte")]
    Nul { field: &'static str },
}

impl GuestConfig {
    /// Parses and validates `config.json`. The version is checked before
    /// the shape, so a newer host gets "unsupported version", not a
    /// confusing unknown-field error.
    pub fn parse(bytes: &[u8]) -> Result<GuestConfig, ConfigError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(ConfigError::Json)?;
        let version = value
            .get("version")
            .and_then(serde_json::Value::as_u64)
            .ok_or(ConfigError::MissingVersion)?;
        if version != u64::from(CONFIG_VERSION) {
            return Err(ConfigError::UnsupportedVersion { found: version });
        }
        let config: GuestConfig = serde_json::from_value(value).map_err(ConfigError::Json)?;
        config.validate()?;
        Ok(config)
    }

    /// Serializes for the config disk, after the same validation the guest
    /// applies, so a bad config fails on the host rather than at boot.
    pub fn to_json(&self) -> Result<Vec<u8>, ConfigError> {
        self.validate()?;
        serde_json::to_vec_pretty(self).map_err(ConfigError::Json)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion {
                found: u64::from(self.version),
            });
        }
        if self.entrypoint.is_empty() && self.cmd.is_empty() {
            return Err(ConfigError::NothingToRun);
        }
        for arg in self.entrypoint.iter().chain(&self.cmd) {
            no_nul("entrypoint/cmd", arg)?;
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(ConfigError::BadEnvName(name.clone()));
            }
            no_nul("env", value)?;
        }
        absolute("workdir", &self.workdir)?;
        if let Some(user) = &self.user {
            no_nul("user", user)?;
        }
        let host_ok = !self.hostname.is_empty()
            && self.hostname.len() <= 64
            && self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !host_ok {
            return Err(ConfigError::BadHostname(self.hostname.clone()));
        }
        if let Some(net) = &self.network {
            if net.prefix_len > 32 {
                return Err(ConfigError::PrefixTooLong(net.prefix_len));
            }
            parse_mac(&net.mac)?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for vol in &self.volumes {
            if !vol.serial.starts_with(SERIAL_VOLUME_PREFIX)
                || vol.serial.len() > SERIAL_MAX_LEN
                || vol.serial.contains(char::is_whitespace)
            {
                return Err(ConfigError::BadVolumeSerial(vol.serial.clone()));
            }
            if !seen.insert(vol.serial.as_str()) {
                return Err(ConfigError::DuplicateVolume(vol.serial.clone()));
            }
            absolute("volume mount", &vol.mount)?;
        }
        Ok(())
    }

    /// Every disk serial the guest must find before it can go on.
    pub fn required_serials(&self) -> Vec<String> {
        let mut serials = vec![SERIAL_ROOTFS.to_owned(), SERIAL_OVERLAY.to_owned()];
        serials.extend(self.volumes.iter().map(|v| v.serial.clone()));
        serials
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::BadMac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn absolute(field: &'static str, value: &str) -> Result<(), ConfigError> {
    no_nul(field, value)?;
    if value.starts_with('/') {
        Ok(())
    } else {
        Err(ConfigError::NotAbsolute {
            field,
            value: value.to_owned(),
        })
    }
}

fn no_nul(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.contains('\0') {
        Err(ConfigError::Nul { field })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apps_stop_window_fits_inside_the_hosts_grace() {
        use std::time::Duration;
        let s = Duration::from_secs;
        assert_eq!(app_stop_window(None), s(10));
        assert_eq!(app_stop_window(Some(s(30))), s(25));
        assert_eq!(app_stop_window(Some(s(120))), s(115));
        // A short grace: half of it, so the guest still powers off itself.
        assert_eq!(app_stop_window(Some(s(6))), s(3));
        assert_eq!(app_stop_window(Some(Duration::from_millis(300))), Duration::from_millis(150));
        for grace in [0, 1, 999, 5_000, 10_000, 3_600_000] {
            let grace = Duration::from_millis(grace);
            assert!(app_stop_window(Some(grace)) <= grace, "{grace:?}");
        }
    }

    #[test]
    fn a_config_without_a_grace_still_parses() {
        let c = GuestConfig::parse(FULL.as_bytes()).expect("valid");
        assert_eq!(c.stop_grace_ms, None);
        let with: serde_json::Value = serde_json::from_str(FULL).unwrap();
        let mut with = with.as_object().unwrap().clone();
        with.insert("stop_grace_ms".into(), 30_000.into());
        let c = GuestConfig::parse(&serde_json::to_vec(&with).unwrap()).expect("valid");
        assert_eq!(c.stop_grace_ms, Some(30_000));
    }

    const FULL: &str = r#"{
        "version": 1,
        "entrypoint": ["/docker-entrypoint.sh"],
        "cmd": ["nginx", "-g", "daemon off;"],
        "env": {"PATH": "/usr/bin:/bin", "GREETING": "hello"},
        "workdir": "/srv",
        "user": "101:101",
        "hostname": "web",
        "network": {"ip": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.1",
                    "dns": ["1.1.1.1", "2606:4700::1111"], "mac": "52:54:00:12:34:56"},
        "volumes": [{"serial": "vol0", "mount": "/data", "readonly": false}]
    }"#;

    #[test]
    fn parses_a_full_config() {
        let c = GuestConfig::parse(FULL.as_bytes()).expect("valid");
        assert_eq!(c.cmd, ["nginx", "-g", "daemon off;"]);
        assert_eq!(c.env["GREETING"], "hello");
        assert_eq!(c.user.as_deref(), Some("101:101"));
        let net = c.network.as_ref().expect("network");
        assert_eq!(net.ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(net.dns.len(), 2);
        assert_eq!(c.required_serials(), ["rootfs", "overlay", "vol0"]);
    }

    #[test]
    fn round_trips_through_json() {
        let c = GuestConfig::parse(FULL.as_bytes()).expect("valid");
        let again = GuestConfig::parse(&c.to_json().expect("encode")).expect("re-parse");
        assert_eq!(c, again);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = GuestConfig::parse(br#"{"version":1,"cmd":["/bin/sh"],"hostname":"a"}"#)
            .expect("valid");
        assert_eq!(c.workdir, "/");
        assert!(c.entrypoint.is_empty() && c.env.is_empty() && c.volumes.is_empty());
        assert!(c.network.is_none() && c.user.is_none());
    }

    #[test]
    fn rejects_with_a_message_naming_the_problem() {
        let cases: &[(&str, &str)] = &[
            (r#"{"cmd":["x"]}"#, "no numeric \"version\""),
            (
                r#"{"version":2,"whatever":true}"#,
                "version 2, this init reads version 1",
            ),
            (r#"{"version":1,"hostname":"a"}"#, "nothing to run: the image defines no entrypoint or cmd, and the declaration sets neither (set `cmd` or `entrypoint` in it)"),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","bogus":1}"#,
                "expected shape",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","workdir":"srv"}"#,
                "workdir must be an absolute path",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a b"}"#,
                "hostname \"a b\"",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","env":{"A=B":"c"}}"#,
                "\"A=B\"",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","network":{"ip":"10.0.0.2","prefix_len":33,"gateway":"10.0.0.1","mac":"52:54:00:00:00:01"}}"#,
                "prefix length 33",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","network":{"ip":"10.0.0.2","prefix_len":24,"gateway":"10.0.0.1","mac":"52:54:00:00:01"}}"#,
                "mac \"52:54:00:00:01\"",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","volumes":[{"serial":"data","mount":"/d"}]}"#,
                "serial \"data\"",
            ),
            (
                r#"{"version":1,"cmd":["x"],"hostname":"a","volumes":[{"serial":"vol0","mount":"/d"},{"serial":"vol0","mount":"/e"}]}"#,
                "used twice",
            ),
        ];
        for (input, want) in cases {
            let err = GuestConfig::parse(input.as_bytes()).expect_err(input);
            assert!(
                err.to_string().contains(want),
                "{input}: {err} lacks {want:?}"
            );
        }
    }

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:ef").expect("mac"),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
