//! Registry credentials from a Docker-style `config.json` (`auths` entries
//! with base64 `user:pass`, or `username`/`password`).
//!
//! This module owns finding that file (an explicit path, else
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`) and matching
//! a registry host to its entry. It does not run credential helpers
//! (`credsStore`, `credHelpers`) or exchange identity tokens; registries
//! needing those are reached anonymously, with a debug log saying why.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

/// Credentials for one registry, as the registry client wants them.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read registry credentials {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid registry credentials {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// The config file to read: `explicit`, else `$DOCKER_CONFIG/config.json`,
/// else `$HOME/.docker/config.json`.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `registry` (`host[:port]`) from the config at `path`.
/// A missing file means anonymous; an unreadable or malformed one is an error.
pub fn lookup(path: Option<&Path>, registry: &str) -> Result<Credentials, AuthError> {
    let Some(path) = path else {
        return Ok(Credentials::Anonymous);
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(source) => {
            return Err(AuthError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let invalid = |reason: String| AuthError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let config: DockerConfig = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let want = canonical_host(registry);
    let Some((key, entry)) = config.auths.iter().find(|(k, _)| canonical_host(k) == want) else {
        return Ok(Credentials::Anonymous);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| invalid(format!("`auths.{key}.auth` is not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| invalid(format!("`auths.{key}.auth` is not UTF-8")))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| invalid(format!("`auths.{key}.auth` is not `user:password`")))?;
        return Ok(Credentials::Basic {
            username: username.to_string(),
            password: password.to_string(),
        });
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Credentials::Basic {
            username: username.clone(),
            password: password.clone(),
        });
    }
    if entry.identity_token.is_some() {
        tracing::debug!(
            registry,
            "identity tokens are not supported; pulling anonymously"
        );
    }
    Ok(Credentials::Anonymous)
}

/// `https://index.docker.io/v1/` and `docker.io` name the same registry.
fn canonical_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auths_entries_match_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                    "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                    "token.example": {{"identitytoken": "x"}}
                }}, "credsStore": "desktop"}}"#
            ),
        )
        .unwrap();
        let basic = |u: &str, p: &str| Credentials::Basic {
            username: u.into(),
            password: p.into(),
        };
        assert_eq!(
            lookup(Some(&path), "docker.io").unwrap(),
            basic("alice", "s3cr:et")
        );
        assert_eq!(
            lookup(Some(&path), "127.0.0.1:5000").unwrap(),
            basic("bob", "pw")
        );
        assert_eq!(
            lookup(Some(&path), "token.example").unwrap(),
            Credentials::Anonymous
        );
        assert_eq!(
            lookup(Some(&path), "ghcr.io").unwrap(),
            Credentials::Anonymous
        );
        assert_eq!(
            lookup(Some(&dir.path().join("none.json")), "docker.io").unwrap(),
            Credentials::Anonymous
        );
        assert_eq!(
            format!("{:?}", basic("a", "secret")),
            "Basic(a, <redacted>)"
        );

        std::fs::write(&path, r#"{"auths": {"docker.io": {"auth": "%%%"}}}"#).unwrap();
        assert!(matches!(
            lookup(Some(&path), "docker.io"),
            Err(AuthError::Invalid { .. })
        ));
    }

    #[test]
    fn explicit_path_wins() {
        assert_eq!(
            config_path(Some(Path::new("/x/config.json"))),
            Some(PathBuf::from("/x/config.json"))
        );
    }
}
