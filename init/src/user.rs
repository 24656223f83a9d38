//! Resolving the image's `user` (`uid[:gid]` or `name[:group]`) against the
//! image's own `/etc/passwd` and `/etc/group`, the way Docker does, with the
//! root directory as a parameter so it can be tested on the host.

use std::path::Path;

use crate::error::InitError;

/// Who the app runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// From passwd, for `HOME` when the config sets none; `/` if unknown.
    pub home: String,
}

impl Identity {
    pub fn root() -> Identity {
        Identity {
            uid: 0,
            gid: 0,
            home: "/root".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// Entries of a passwd file; malformed lines are skipped, as libc does.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

/// The gid of group `name` in a group file.
fn group_gid(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            f[2].parse().ok()
        } else {
            None
        }
    })
}

/// A missing passwd or group file is an empty one (scratch images have none).
fn read_or_empty(path: &Path) -> Result<String, InitError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(InitError::io("read", path, e)),
    }
}

/// Resolves `spec` inside the filesystem rooted at `root`.
pub fn resolve(spec: &str, root: &Path) -> Result<Identity, InitError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(InitError::BadUser {
            user: spec.to_owned(),
        });
    }
    let passwd = parse_passwd(&read_or_empty(&root.join("etc/passwd"))?);
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                // Docker: a numeric uid unknown to passwd runs with gid 0.
                gid: 0,
                home: "/".to_owned(),
            })),
        Err(_) => passwd.iter().find(|e| e.name == user).cloned(),
    };
    let entry = entry.ok_or_else(|| InitError::UnknownUser {
        user: user.to_owned(),
        file: "/etc/passwd",
    })?;
    let gid = match group {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_gid(&read_or_empty(&root.join("etc/group"))?, g).ok_or_else(|| {
                InitError::UnknownUser {
                    user: g.to_owned(),
                    file: "/etc/group",
                }
            })?,
        },
    };
    Ok(Identity {
        uid: entry.uid,
        gid,
        home: if entry.home.is_empty() {
            "/".to_owned()
        } else {
            entry.home
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          broken line\n\
                          nginx:x:101:102:nginx:/var/cache/nginx:/sbin/nologin\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:nginx\nnginx:x:102:\n";

    fn image_root(tag: &str) -> std::path::PathBuf {
        let root =
            std::env::temp_dir().join(format!("hypeman-init-user-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/passwd"), PASSWD).expect("passwd");
        std::fs::write(root.join("etc/group"), GROUP).expect("group");
        root
    }

    #[test]
    fn resolves_every_spec_form() {
        let root = image_root("forms");
        let cases: &[(&str, u32, u32, &str)] = &[
            ("nginx", 101, 102, "/var/cache/nginx"),
            ("101", 101, 102, "/var/cache/nginx"),
            ("nginx:www-data", 101, 33, "/var/cache/nginx"),
            ("nginx:7", 101, 7, "/var/cache/nginx"),
            ("1234", 1234, 0, "/"),
            ("1234:5678", 1234, 5678, "/"),
            ("root", 0, 0, "/root"),
        ];
        for (spec, uid, gid, home) in cases {
            let id = resolve(spec, &root).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                (id.uid, id.gid, id.home.as_str()),
                (*uid, *gid, *home),
                "{spec}"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn unknown_names_are_errors_that_name_the_file() {
        let root = image_root("unknown");
        let err = resolve("postgres", &root).expect_err("unknown user");
        assert_eq!(
            err.to_string(),
            "user \"postgres\" is not in the image's /etc/passwd"
        );
        let err = resolve("nginx:docker", &root).expect_err("unknown group");
        assert_eq!(
            err.to_string(),
            "user \"docker\" is not in the image's /etc/group"
        );
        assert!(matches!(
            resolve(":1", &root),
            Err(InitError::BadUser { .. })
        ));
        assert!(matches!(
            resolve("1:", &root),
            Err(InitError::BadUser { .. })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_image_without_passwd_still_takes_numeric_ids() {
        let root =
            std::env::temp_dir().join(format!("hypeman-init-user-scratch-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&root);
        assert_eq!(resolve("1000:1000", &root).expect("numeric").uid, 1000);
        assert!(resolve("app", &root).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }
}
