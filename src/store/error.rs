//! The one error type of the store. Context (path, id, name) lives in fields;
//! the underlying cause is the `#[source]`, printed once by whoever reports
//! the chain.

use std::path::PathBuf;

use ulid::Ulid;

use crate::durable::DurableError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not valid JSON of the expected shape")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot encode {path} as JSON")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path} has no numeric \"version\" field")]
    MissingVersion { path: PathBuf },

    #[error("{path} has format version {found}, this hypeman reads versions up to {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },

    #[error("{path} holds an applied declaration of format version {found}, this hypeman reads versions up to {supported}")]
    UnsupportedAppliedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A write or delete refused: the record on disk is of a newer format
    /// than this build writes, and only the hypeman that wrote it may
    /// change it.
    #[error("{path} was written by a newer hypeman (format version {found}); this one (up to {supported}) leaves it untouched")]
    NewerRecord {
        path: PathBuf,
        found: u64,
        supported: u32,
    },

    /// A name looked up while a guest record that may hold it cannot be
    /// read: the guest is neither found nor absent.
    #[error("the guest record {path} cannot be read, and it may be the record of {name:?}")]
    MaybeHeldByUnreadable {
        name: String,
        path: PathBuf,
        #[source]
        problem: Box<StoreError>,
    },

    #[error("{path} describes guest {found}, not the guest whose directory holds it")]
    IdMismatch { path: PathBuf, found: Ulid },

    #[error("{path} is not a guest directory")]
    NotAGuest { path: PathBuf },

    #[error("guest {id} does not exist")]
    GuestNotFound { id: Ulid },

    #[error("the name {name:?} is already used by guest {id}")]
    NameTaken { name: String, id: Ulid },

    #[error("no guest matches {query:?}")]
    NotFound { query: String },

    #[error("{query:?} matches more than one guest: {}", matches.join(", "))]
    Ambiguous { query: String, matches: Vec<String> },

    #[error("the snapshot is damaged: {path}: {problem}")]
    DamagedSnapshot { path: PathBuf, problem: String },

    #[error("no snapshot is being written at {path}")]
    NoPartialSnapshot { path: PathBuf },

    #[error("socket path {path} is {len} bytes, longer than the {max}-byte limit of a unix socket address")]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
}

impl StoreError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }
}

/// The store's file primitives are [`crate::durable`]'s; their failures
/// become the store's own variants, so callers see one error type.
impl From<DurableError> for StoreError {
    fn from(e: DurableError) -> StoreError {
        match e {
            DurableError::Io { op, path, source } => StoreError::Io { op, path, source },
            DurableError::Rename { from, to, source } => StoreError::Rename { from, to, source },
        }
    }
}
