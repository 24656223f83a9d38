//! What one instance's declaration asks for, read fresh from its file:
//! [`Desired`]. This is the reconciler's only input from the config dir.
//!
//! Built from the file alone: nothing here asks the executor, the store or
//! the settings' defaults (the hypervisor a declaration leaves open is the
//! one pinned in the guest's record when it was created). Reading blocks on
//! the filesystem; async callers run [`read`] in `spawn_blocking`.

use super::spec::InstanceSpec;
use super::{load_instance, DeclarationError, Limits};
use std::path::Path;
use std::sync::Arc;

/// What the declaration of one instance asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    /// No declaration file: the instance and its data are to go.
    Absent,
    /// The file exists but does not parse or validate (or the whole
    /// instances directory is gone): hands off. Holds why, as
    /// `path:line:column: message` problems joined by `; `.
    Invalid(Arc<str>),
    /// A valid declaration.
    Present(Arc<InstanceSpec>),
}

impl Desired {
    /// `running`, `standby`, `stopped`, `absent` or `invalid`: how status
    /// and plan name what is wanted.
    pub fn label(&self) -> &'static str {
        match self {
            Desired::Absent => "absent",
            Desired::Invalid(_) => "invalid",
            Desired::Present(spec) => spec.state.as_str(),
        }
    }

    /// The declaration, when it is valid.
    pub fn spec(&self) -> Option<&Arc<InstanceSpec>> {
        match self {
            Desired::Present(spec) => Some(spec),
            Desired::Absent | Desired::Invalid(_) => None,
        }
    }

    /// Why the declaration is not applied, when it is invalid.
    pub fn invalid(&self) -> Option<&str> {
        match self {
            Desired::Invalid(why) => Some(why),
            Desired::Absent | Desired::Present(_) => None,
        }
    }
}

/// Reads what `instances_dir/name.toml` asks for.
pub fn read(instances_dir: &Path, name: &str, limits: &Limits) -> Desired {
    let path = instances_dir.join(format!("{name}.toml"));
    match load_instance(&path, limits) {
        Ok(spec) => Desired::Present(Arc::new(spec)),
        Err(DeclarationError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(&path).is_err() =>
        {
            if instances_dir.is_dir() {
                Desired::Absent
            } else {
                // A vanished directory is more likely a rebuild in progress or
                // a mistake than an order to delete every instance.
                Desired::Invalid(
                    format!("{} is missing; instances are left as they are", instances_dir.display()).into(),
                )
            }
        }
        Err(e) => {
            let text = match &e {
                DeclarationError::Invalid { diagnostics, .. } => {
                    diagnostics.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("; ")
                }
                other => crate::error_chain(other),
            };
            Desired::Invalid(text.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_as_present_absent_or_invalid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("instances");
        std::fs::create_dir(&dir).unwrap();
        let limits = Limits::default();
        assert_eq!(read(&dir, "web", &limits), Desired::Absent);
        std::fs::write(dir.join("web.toml"), "image = \"busybox\"\nstate = \"standby\"\n").unwrap();
        match read(&dir, "web", &limits) {
            Desired::Present(spec) => assert_eq!(spec.state.as_str(), "standby"),
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.join("web.toml"), "image = 3\n").unwrap();
        let desired = read(&dir, "web", &limits);
        assert!(desired.invalid().is_some_and(|why| why.contains("web.toml:1:")), "{desired:?}");
        // A dangling symlink is a declaration that cannot be read, not a removal.
        std::fs::remove_file(dir.join("web.toml")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nowhere.toml"), dir.join("web.toml")).unwrap();
        assert_eq!(read(&dir, "web", &limits).label(), "invalid");
        // No directory at all: nothing is deleted.
        assert_eq!(read(&tmp.path().join("gone"), "web", &limits).label(), "invalid");
    }
}
