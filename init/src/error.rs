//! The one error type of init (outside the shared config format). Every
//! variant names what init was doing and on which path or device, because
//! its message is all a user sees on the console before the VM powers off.

use std::path::PathBuf;

use hypeman_contract::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot mount {what} ({fstype}) on {target}")]
    Mount {
        what: String,
        fstype: String,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("disks with serial {missing:?} did not appear within {waited_s} s (found: {found:?})")]
    DisksMissing {
        missing: Vec<String>,
        found: Vec<String>,
        waited_s: u64,
    },

    #[error("serial {serial:?} is on both {first} and {second}")]
    DuplicateSerial {
        serial: String,
        first: String,
        second: String,
    },

    #[error(
        "the overlay disk {device} has no ext4 filesystem; the host must format it before boot"
    )]
    OverlayUnformatted { device: PathBuf },

    #[error("cannot read {path} from the config disk")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },

    #[error("user {user:?} is not in the image's {file}")]
    UnknownUser { user: String, file: &'static str },

    #[error("user {user:?} is not a valid uid[:gid] or name[:group]")]
    BadUser { user: String },

    #[error("{program:?} was not found in PATH {path:?}")]
    ProgramNotFound { program: String, path: String },

    #[error("cannot execute {program}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("no network interface has MAC {mac} (interfaces: {found:?})")]
    NoInterface { mac: String, found: Vec<String> },

    #[error("cannot {op} on interface {interface}")]
    Net {
        op: &'static str,
        interface: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} contains a NUL byte")]
    Nul { what: String },
}

impl InitError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        InitError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Wraps the current `errno` after a failed libc call.
    pub(crate) fn last_os(op: &'static str) -> Self {
        InitError::Sys {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// The whole chain on one line, for the console: `a: b: c`.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
