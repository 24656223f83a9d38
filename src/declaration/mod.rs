//! Instance declarations: `<config-dir>/instances/<name>.toml` files, read,
//! parsed and validated into [`spec::InstanceSpec`], with every problem
//! reported as `path:line:column: message`.
//!
//! This module owns the file format, the naming rules, and which files in the
//! instances directory count as declarations. It never acts on what it reads:
//! deciding what an invalid or missing declaration means for a running
//! instance is the reconciler's job (a file that does not validate must leave
//! its instance untouched, so [`scan_dir`] keeps those apart from removed
//! ones).
//!
//! ```text
//! text ──toml+serde──► raw::RawInstance ──validate──► spec::InstanceSpec
//!          │ syntax / shape error (one)     │ meaning errors (all of them)
//!          └────────────► Vec<Diagnostic> ◄─┘
//! ```

pub mod desired;
pub mod env_file;
pub mod host;
mod limits;
mod raw;
pub mod spec;
mod validate;

// Problem reports are the config-file toolkit's; re-exported so the path
// `declaration::Diagnostic` keeps working.
pub use crate::config_file::Diagnostic;
pub use desired::Desired;
pub use host::{HostFiles, SourceKind, VolumeHost};
pub use limits::{Limits, EXEC_STRING_MAX, EXEC_TOTAL_CEILING};
pub use validate::{
    DEFAULT_HOTPLUG_MEMORY, DEFAULT_MEMORY, DEFAULT_OVERLAY_SIZE, DEFAULT_VCPUS, HOTPLUG_ALIGN,
    MEMORY_ALIGN, MIN_MEMORY, MIN_OVERLAY_SIZE,
};

use crate::config_file::Problems;
use spec::InstanceSpec;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Why a declaration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeclarationError {
    #[error("cannot read declaration {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("declaration {} is larger than limits.max_declaration_size ({limit})", path.display())]
    TooLarge {
        path: PathBuf,
        /// Its size when it was looked at; `None` when it grew while read.
        size: Option<u64>,
        limit: crate::config_file::ByteSize,
    },
    #[error("invalid declaration {}", path.display())]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

impl DeclarationError {
    /// The error as `path:line:column: message` lines, for `hypeman validate`
    /// and the daemon's report of a declaration it is not applying.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            DeclarationError::Read { path, source } => {
                vec![Diagnostic::whole_file(path, read_problem(path, source))]
            }
            DeclarationError::TooLarge { path, size, limit } => {
                let size = match size {
                    Some(bytes) => format!("is {},", crate::config_file::units::human_bytes(*bytes)),
                    None => "grew while it was read and".to_string(),
                };
                vec![Diagnostic::whole_file(
                    path,
                    format!(
                        "{size} over limits.max_declaration_size ({limit}); it is not read: \
                         a declaration needs a few KiB, so this is likely the wrong file"
                    ),
                )]
            }
            DeclarationError::Invalid { diagnostics, .. } => diagnostics.clone(),
        }
    }
}

/// Why a declaration could not be read, and what to do about it.
fn read_problem(path: &Path, source: &io::Error) -> String {
    if source.kind() == io::ErrorKind::NotFound {
        if let Ok(target) = std::fs::read_link(path) {
            return format!(
                "a symbolic link to {}, which does not exist: fix the link or remove it",
                target.display()
            );
        }
    }
    if path.is_dir() {
        return not_a_file_problem(true);
    }
    format!("cannot read: {source}")
}

/// The problem with a `*.toml` entry that is not a regular file.
fn not_a_file_problem(is_dir: bool) -> String {
    let what = if is_dir { "a directory" } else { "not a regular file" };
    format!("{what}: instances/ holds one <name>.toml file per instance; move it away or rename it")
}

/// Whether `name` is a valid instance name: 1 to 63 of `[a-z0-9-]`, starting
/// and ending with a letter or digit (a DNS label, so it can name a host, a
/// tap device suffix and a directory without escaping).
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= 63 && edge(first) && edge(last) && b.iter().all(|c| edge(c) || *c == b'-')
        }
        _ => false,
    }
}

fn invalid_name_message(file_name: &str, stem: &str) -> String {
    format!(
        "file name {file_name:?}: {stem:?} is not a valid instance name \
         (1 to 63 of a-z, 0-9 and `-`, starting and ending with a letter or digit)"
    )
}

/// Parse and validate one declaration. Pure: `path` is used for the instance
/// name (its stem) and in messages only, and volume sources are taken as
/// written, not looked at ([`load_instance`] looks).
pub fn parse_instance(
    path: &Path,
    text: &str,
    limits: &Limits,
) -> Result<InstanceSpec, Vec<Diagnostic>> {
    parse_instance_on(path, text, limits, &host::Unchecked)
}

/// [`parse_instance`], with volume sources resolved and checked by `host`.
pub fn parse_instance_on(
    path: &Path,
    text: &str,
    limits: &Limits,
    host: &dyn VolumeHost,
) -> Result<InstanceSpec, Vec<Diagnostic>> {
    let mut problems = Problems::new(path, text);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !is_valid_name(&stem) {
        let file_name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        problems.file(invalid_name_message(&file_name, &stem));
    }
    let raw: raw::RawInstance = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            problems.push(Diagnostic::from_toml(path, text, &e));
            return Err(problems.into_sorted());
        }
    };
    let spec = validate::validate(&mut problems, stem, path.to_path_buf(), raw, limits, host);
    problems.finish(spec)
}

/// Read, parse and validate one declaration file. Follows symlinks: on NixOS
/// the files in `/etc` are links into the store. A file over
/// `limits.max_declaration_size` is refused by its size before anything is
/// read, and never read past the limit (it may grow, or be a device).
/// Volume sources are looked at on this host (see [`HostFiles`]), and the
/// env files are read for their digest (see [`spec::InstanceSpec::env_files_digest`]).
pub fn load_instance(path: &Path, limits: &Limits) -> Result<InstanceSpec, DeclarationError> {
    let read_err = |source| DeclarationError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let limit = limits.max_declaration_size;
    let too_large = |size| DeclarationError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if size > limit.0 {
        return Err(too_large(Some(size)));
    }
    let text = read_at_most(file, limit.0).map_err(read_err)?.ok_or_else(|| too_large(None))?;
    let mut spec = parse_instance_on(path, &text, limits, &HostFiles).map_err(|diagnostics| DeclarationError::Invalid {
        path: path.to_path_buf(),
        diagnostics,
    })?;
    spec.env_files_digest = env_file::digest_of(&spec.env_files, limits.max_exec_size.0);
    Ok(spec)
}

/// The text `reader` holds, if it is at most `limit` bytes; `None` when it
/// holds more. Reads at most `limit + 1` bytes whatever its size.
fn read_at_most(reader: impl Read, limit: u64) -> io::Result<Option<String>> {
    let mut bytes = Vec::new();
    reader.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(None);
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The instances directory of a config dir: where declarations live.
pub fn instances_dir(config_dir: &Path) -> PathBuf {
    config_dir.join("instances")
}

/// What a file in the instances directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclFile {
    /// A declaration of the instance with this name.
    Instance(String),
    /// Meant as a declaration (`*.toml`) but its stem is not a valid name;
    /// holds the file name. Reported, never applied.
    InvalidName(String),
    /// Not a declaration: another extension, a dotfile, an editor's swap,
    /// backup, lock or temporary file.
    Ignored,
}

/// Classify a path by its file name alone (no IO), so the watcher can map a
/// file event to an instance name even after the file is gone. The one rule
/// for which names are declarations: the scan and `watch::candidate_name`
/// both use it.
///
/// Only `*.toml` counts. Names starting with `.` (dotfiles, Emacs `.#x.toml`
/// lock links, vim's `.x.toml.swp`, hypeman's own temp files) or `#` (Emacs
/// `#x.toml#` autosaves) are ignored; `x.toml~`, `x.toml.swp`, `x.toml.tmp`
/// and vim's `4913` probe fail the extension test. Editors write these next
/// to the real file while it is being edited, and treating them as
/// declarations would create phantom instances. A directory named `x.toml`
/// is classified like a file here; the scan reports it as not a file.
pub fn instance_name(path: &Path) -> DeclFile {
    let Some(file_name) = path.file_name() else {
        return DeclFile::Ignored;
    };
    let file_name = file_name.to_string_lossy();
    if file_name.starts_with('.') || file_name.starts_with('#') {
        return DeclFile::Ignored;
    }
    match file_name.strip_suffix(".toml") {
        Some(stem) if is_valid_name(stem) => DeclFile::Instance(stem.to_string()),
        Some(_) => DeclFile::InvalidName(file_name.into_owned()),
        None => DeclFile::Ignored,
    }
}

/// Everything found in an instances directory.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Declarations that parsed and validated, by instance name.
    pub valid: BTreeMap<String, InstanceSpec>,
    /// Declarations with a valid name whose file could not be read or did
    /// not validate, by instance name. Their instances exist as far as the
    /// user is concerned: leave them untouched, never treat them as removed.
    pub invalid: BTreeMap<String, Vec<Diagnostic>>,
    /// Problems that belong to no instance: `*.toml` files with invalid
    /// names, and a directory that could not be listed.
    pub problems: Vec<Diagnostic>,
    /// False when the directory could not be listed fully. Then an instance
    /// missing from `valid` and `invalid` may still be declared: nothing may
    /// be deleted on the strength of this scan.
    pub complete: bool,
}

impl ScanResult {
    /// Every problem, in file order: what `hypeman validate` prints.
    pub fn all_diagnostics(&self) -> Vec<Diagnostic> {
        let mut all: Vec<Diagnostic> = self
            .invalid
            .values()
            .flatten()
            .chain(&self.problems)
            .cloned()
            .collect();
        all.sort();
        all
    }
}

/// Read every declaration in `instances_dir`. A missing directory is an empty,
/// complete result: it may simply not have been created yet.
pub fn scan_dir(instances_dir: &Path, limits: &Limits) -> ScanResult {
    let mut result = ScanResult {
        complete: true,
        ..ScanResult::default()
    };
    let entries = match std::fs::read_dir(instances_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return result,
        Err(e) => {
            result.complete = false;
            result.problems.push(Diagnostic::whole_file(
                instances_dir,
                format!("cannot list directory: {e}"),
            ));
            return result;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                result.complete = false;
                result.problems.push(Diagnostic::whole_file(
                    instances_dir,
                    format!("cannot list directory: {e}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        match instance_name(&path) {
            DeclFile::Ignored => {}
            DeclFile::InvalidName(file_name) => {
                let stem = file_name.strip_suffix(".toml").unwrap_or(&file_name);
                result.problems.push(Diagnostic::whole_file(
                    &path,
                    invalid_name_message(&file_name, stem),
                ));
            }
            DeclFile::Instance(name) => {
                // `metadata` follows symlinks, so a link to a directory or a
                // dangling link is caught here, not mistaken for a file.
                let outcome = match std::fs::metadata(&path) {
                    Ok(meta) if !meta.is_file() => Err(vec![Diagnostic::whole_file(
                        &path,
                        not_a_file_problem(meta.is_dir()),
                    )]),
                    Ok(_) | Err(_) => load_instance(&path, limits).map_err(|e| e.diagnostics()),
                };
                match outcome {
                    Ok(spec) => {
                        result.valid.insert(name, spec);
                    }
                    Err(diagnostics) => {
                        result.invalid.insert(name, diagnostics);
                    }
                }
            }
        }
    }
    result.problems.sort();
    result
}

#[cfg(test)]
mod tests;
