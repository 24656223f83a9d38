//! Image references as users write them in `image = "..."`: the three
//! containers-transports(5) forms hypeman accepts, parsed and normalised.
//!
//! This module owns the grammar and the canonical spelling of a reference
//! (the key of the `refs/` index). It does no IO: it does not check that a
//! layout directory exists or that a registry answers, and it does not make
//! relative layout paths absolute (the caller knows what they are relative to).

use std::fmt;
use std::path::PathBuf;

/// The registry a reference without a domain names.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag a registry reference without tag or digest names.
pub const DEFAULT_TAG: &str = "latest";

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// `[docker://]registry/repository[:tag][@sha256:…]`.
    Registry(RegistryRef),
    /// `oci:<dir>[:<tag>]`: an OCI image layout directory.
    Layout { dir: PathBuf, tag: Option<String> },
    /// `oci-archive:<file>[:<tag>]`: a tar of an OCI image layout.
    Archive { file: PathBuf, tag: Option<String> },
}

/// A normalised registry reference: `registry` has `docker.io` filled in,
/// `repository` has `library/` filled in for Docker Hub's official images.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    pub registry: String,
    pub repository: String,
    /// `None` only when `digest` is set.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("unsupported transport `{0}:` (use a registry reference, `oci:` or `oci-archive:`)")]
    UnsupportedTransport(String),
    #[error("`{0}:` needs a path")]
    MissingPath(&'static str),
    #[error("invalid registry `{0}`")]
    InvalidRegistry(String),
    #[error("invalid repository `{0}` (lowercase letters, digits and `._-` separators)")]
    InvalidRepository(String),
    #[error("invalid tag `{0}`")]
    InvalidTag(String),
    #[error("invalid digest `{0}` (expected sha256: and 64 lowercase hex digits)")]
    InvalidDigest(String),
}

impl ImageRef {
    /// Parses one `image = "..."` value.
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, tag) = split_path_tag(rest, "oci-archive")?;
            return Ok(ImageRef::Archive { file, tag });
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split_path_tag(rest, "oci")?;
            return Ok(ImageRef::Layout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return RegistryRef::parse(rest).map(ImageRef::Registry);
        }
        // Other containers-transports(5) names are refused by name rather
        // than misread as a Docker Hub image with a tag (`dir:/x`).
        if let Some((scheme, _)) = s.split_once(':') {
            if KNOWN_TRANSPORTS.contains(&scheme) {
                return Err(ReferenceError::UnsupportedTransport(scheme.to_string()));
            }
        }
        RegistryRef::parse(s).map(ImageRef::Registry)
    }

    /// The canonical spelling: equal images by name spell equally.
    pub fn canonical(&self) -> String {
        self.to_string()
    }
}

/// containers-transports(5) names other than the ones hypeman supports.
const KNOWN_TRANSPORTS: &[&str] = &[
    "containers-storage",
    "dir",
    "docker-archive",
    "docker-daemon",
    "sif",
];

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::Layout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
            ImageRef::Archive { file, tag } => {
                write!(f, "oci-archive:{}", file.display())?;
                tag.iter().try_for_each(|t| write!(f, ":{t}"))
            }
        }
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `path[:tag]`, split at the first colon as containers/image does (so a
/// layout path cannot contain `:`).
fn split_path_tag(
    rest: &str,
    transport: &'static str,
) -> Result<(PathBuf, Option<String>), ReferenceError> {
    let (path, tag) = match rest.split_once(':') {
        Some((p, t)) => (p, Some(t)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(ReferenceError::MissingPath(transport));
    }
    let tag = match tag {
        None => None,
        Some(t) if valid_layout_tag(t) => Some(t.to_string()),
        Some(t) => return Err(ReferenceError::InvalidTag(t.to_string())),
    };
    Ok((PathBuf::from(path), tag))
}

/// Layout `ref.name` annotations are freer than registry tags, but must not
/// be empty or contain whitespace or `@`.
fn valid_layout_tag(t: &str) -> bool {
    !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '@') && t.len() <= 255
}

impl RegistryRef {
    /// Parses `[registry/]repository[:tag][@digest]` with Docker's
    /// normalisation (`alpine` is `docker.io/library/alpine:latest`).
    pub fn parse(s: &str) -> Result<RegistryRef, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => {
                if !valid_digest(d) {
                    return Err(ReferenceError::InvalidDigest(d.to_string()));
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last colon that follows the last slash.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name[last_slash + i + 1..];
                if !valid_tag(tag) {
                    return Err(ReferenceError::InvalidTag(tag.to_string()));
                }
                (&name[..last_slash + i], Some(tag.to_string()))
            }
            None => (name, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if !valid_registry(&registry) {
            return Err(ReferenceError::InvalidRegistry(registry));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DEFAULT_REGISTRY.to_string(),
            _ => registry,
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !valid_repository(&repository) {
            return Err(ReferenceError::InvalidRepository(repository));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = match r.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (r, None),
    };
    let host_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty() && repo.len() <= 255 && repo.split('/').all(valid_path_component)
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn valid_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let bytes = t.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `sha256:` and 64 lowercase hex digits: the only algorithm hypeman verifies.
pub(crate) fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn registry_references_normalise() {
        let d = D;
        let cases: &[(&str, &str)] = &[
            ("alpine", "docker.io/library/alpine:latest"),
            ("alpine:3.20", "docker.io/library/alpine:3.20"),
            (
                "docker.io/library/alpine:3.20",
                "docker.io/library/alpine:3.20",
            ),
            ("docker://alpine", "docker.io/library/alpine:latest"),
            (
                "index.docker.io/library/nginx:alpine",
                "docker.io/library/nginx:alpine",
            ),
            ("user/app", "docker.io/user/app:latest"),
            (
                "ghcr.io/org/team/app:v1.2-rc_3",
                "ghcr.io/org/team/app:v1.2-rc_3",
            ),
            ("localhost/app", "localhost/app:latest"),
            (
                "127.0.0.1:5000/test/busybox:1",
                "127.0.0.1:5000/test/busybox:1",
            ),
            ("registry:5000/app", "registry:5000/app:latest"),
            ("docker://127.0.0.1:5000/app:1", "127.0.0.1:5000/app:1"),
            ("my_repo/a.b__c--d", "docker.io/my_repo/a.b__c--d:latest"),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.canonical(), *want, "{input}");
        }
        let with_digest = format!("127.0.0.1:5000/app@{d}");
        let r = ImageRef::parse(&with_digest).unwrap();
        assert_eq!(
            r,
            ImageRef::Registry(RegistryRef {
                registry: "127.0.0.1:5000".into(),
                repository: "app".into(),
                tag: None,
                digest: Some(d.into()),
            })
        );
        assert_eq!(r.canonical(), with_digest);
        let both = ImageRef::parse(&format!("alpine:3.20@{d}")).unwrap();
        assert_eq!(
            both.canonical(),
            format!("docker.io/library/alpine:3.20@{d}")
        );
    }

    #[test]
    fn layout_and_archive_references() {
        let cases: &[(&str, ImageRef)] = &[
            (
                "oci:/srv/layout",
                ImageRef::Layout {
                    dir: "/srv/layout".into(),
                    tag: None,
                },
            ),
            (
                "oci:/srv/layout:v1",
                ImageRef::Layout {
                    dir: "/srv/layout".into(),
                    tag: Some("v1".into()),
                },
            ),
            (
                "oci:rel/dir:latest",
                ImageRef::Layout {
                    dir: "rel/dir".into(),
                    tag: Some("latest".into()),
                },
            ),
            (
                "oci-archive:/tmp/img.tar",
                ImageRef::Archive {
                    file: "/tmp/img.tar".into(),
                    tag: None,
                },
            ),
            (
                "oci-archive:img.tar:1.0",
                ImageRef::Archive {
                    file: "img.tar".into(),
                    tag: Some("1.0".into()),
                },
            ),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&got, want, "{input}");
            assert_eq!(got.canonical(), *input, "{input} round-trips");
        }
    }

    #[test]
    fn bad_references_are_refused() {
        let cases: &[(&str, ReferenceError)] = &[
            ("", ReferenceError::Empty),
            ("   ", ReferenceError::Empty),
            ("oci:", ReferenceError::MissingPath("oci")),
            (
                "oci-archive::tag",
                ReferenceError::MissingPath("oci-archive"),
            ),
            ("oci:/x:", ReferenceError::InvalidTag("".into())),
            (
                "Alpine",
                ReferenceError::InvalidRepository("library/Alpine".into()),
            ),
            ("alpine:", ReferenceError::InvalidTag("".into())),
            ("alpine:-x", ReferenceError::InvalidTag("-x".into())),
            (
                "alpine@sha256:abc",
                ReferenceError::InvalidDigest("sha256:abc".into()),
            ),
            (
                "alpine@md5:0123",
                ReferenceError::InvalidDigest("md5:0123".into()),
            ),
            (
                "reg.io//app",
                ReferenceError::InvalidRepository("/app".into()),
            ),
            (
                "reg.io/app/",
                ReferenceError::InvalidRepository("app/".into()),
            ),
            (
                "bad_host.io/app",
                ReferenceError::InvalidRegistry("bad_host.io".into()),
            ),
            (
                "reg.io:port/app",
                ReferenceError::InvalidRegistry("reg.io:port".into()),
            ),
            (
                "dir:/some/dir",
                ReferenceError::UnsupportedTransport("dir".into()),
            ),
            (
                "docker-archive:/x.tar",
                ReferenceError::UnsupportedTransport("docker-archive".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).as_ref(), Err(want), "{input}");
        }
    }
}
