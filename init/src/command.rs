//! What to run: Docker's entrypoint/cmd rules, the environment the app gets,
//! and `PATH` lookup inside the app's root. Pure apart from looking at files
//! under a root directory given as a parameter.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hypeman_contract::config::{GuestConfig, DEFAULT_PATH};
use crate::error::InitError;
use crate::user::Identity;

/// `entrypoint ++ cmd`; with no entrypoint, `cmd[0]` is the program.
pub fn argv(config: &GuestConfig) -> Vec<String> {
    config
        .entrypoint
        .iter()
        .chain(&config.cmd)
        .cloned()
        .collect()
}

/// The app's environment: the config's variables plus the ones Docker
/// provides when the image does not (`PATH`, `HOME`, `HOSTNAME`).
pub fn environment(config: &GuestConfig, identity: &Identity) -> BTreeMap<String, String> {
    let mut env = config.env.clone();
    env.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    env.entry("HOME".to_owned())
        .or_insert_with(|| identity.home.clone());
    env.entry("HOSTNAME".to_owned())
        .or_insert_with(|| config.hostname.clone());
    env
}

/// Finds `program` the way `execvp` would, but in the filesystem under
/// `root` and with the app's `PATH`, not init's. A name with a `/` is used
/// as given (relative names resolve against the workdir at exec time).
/// The returned path is as seen from inside `root`.
pub fn resolve_program(program: &str, path_var: &str, root: &Path) -> Result<PathBuf, InitError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(InitError::ProgramNotFound {
            program: program.to_owned(),
            path: path_var.to_owned(),
        });
    }
    for dir in path_var.split(':').filter(|d| d.starts_with('/')) {
        let inside = Path::new(dir).join(program);
        let on_host = root.join(inside.strip_prefix("/").unwrap_or(&inside));
        // metadata follows symlinks, as exec does (busybox applets are links).
        if let Ok(meta) = std::fs::metadata(&on_host) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(inside);
            }
        }
    }
    Err(InitError::ProgramNotFound {
        program: program.to_owned(),
        path: path_var.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(entrypoint: &[&str], cmd: &[&str]) -> GuestConfig {
        GuestConfig {
            version: 1,
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            workdir: "/".to_owned(),
            user: None,
            hostname: "box".to_owned(),
            network: None,
            volumes: Vec::new(),
            stop_grace_ms: None,
        }
    }

    #[test]
    fn argv_follows_docker_rules() {
        assert_eq!(
            argv(&config(&[], &["nginx", "-g", "daemon off;"])),
            ["nginx", "-g", "daemon off;"]
        );
        assert_eq!(
            argv(&config(&["/entry.sh"], &["serve"])),
            ["/entry.sh", "serve"]
        );
        assert_eq!(
            argv(&config(&["/entry.sh", "-x"], &[])),
            ["/entry.sh", "-x"]
        );
    }

    #[test]
    fn environment_fills_docker_defaults_without_overriding() {
        let mut c = config(&[], &["x"]);
        c.env.insert("PATH".to_owned(), "/opt/bin".to_owned());
        c.env.insert("GREETING".to_owned(), "hello".to_owned());
        let env = environment(
            &c,
            &Identity {
                uid: 101,
                gid: 101,
                home: "/srv".to_owned(),
            },
        );
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["HOME"], "/srv");
        assert_eq!(env["HOSTNAME"], "box");
        assert_eq!(env["GREETING"], "hello");
        let env = environment(&config(&[], &["x"]), &Identity::root());
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn resolves_through_path_inside_the_root() {
        let root = std::env::temp_dir().join(format!("hypeman-init-cmd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["bin", "usr/bin", "opt"] {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        let exe = root.join("bin/busybox");
        std::fs::write(&exe, b"#!").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("symlink");
        std::fs::write(root.join("usr/bin/data"), b"not executable").expect("write");

        assert_eq!(
            resolve_program("sh", "/usr/bin:/bin", &root).expect("sh"),
            Path::new("/bin/sh")
        );
        assert_eq!(
            resolve_program("/opt/app", "/bin", &root).expect("abs"),
            Path::new("/opt/app")
        );
        assert_eq!(
            resolve_program("./run", "/bin", &root).expect("rel"),
            Path::new("./run")
        );
        for (program, path) in [
            ("data", "/usr/bin"),
            ("opt", "/"),
            ("sh", "relative:/usr/bin"),
            ("", "/bin"),
        ] {
            let err = resolve_program(program, path, &root).expect_err(program);
            assert!(
                matches!(err, InitError::ProgramNotFound { .. }),
                "{program}: {err}"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
