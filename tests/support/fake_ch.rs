//! The fake Cloud Hypervisor for the tests: its OpenAPI document, its
//! binary (built on first use), and `cloud-hypervisor` wrapper scripts that
//! run it with per-test settings.

use fake_cloud_hypervisor::openapi::OpenApi;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

/// The OpenAPI document the fake checks requests against: the copy bundled
/// with the fake, or `HYPEMAN_CH_OPENAPI`.
pub fn spec_path() -> PathBuf {
    std::env::var_os("HYPEMAN_CH_OPENAPI").map(PathBuf::from).unwrap_or_else(OpenApi::bundled)
}

pub fn spec() -> Arc<OpenApi> {
    static SPEC: OnceLock<Arc<OpenApi>> = OnceLock::new();
    SPEC.get_or_init(|| Arc::new(OpenApi::load(&spec_path()).expect("the OpenAPI document loads")))
        .clone()
}

/// The `fake-cloud-hypervisor` binary. It belongs to another workspace
/// member, so Cargo does not build it for this package's tests: it is
/// built here, once per test process (a no-op when up to date).
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HYPEMAN_FAKE_CH_BINARY") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let release = std::env::current_exe()
            .ok()
            .is_some_and(|exe| exe.components().any(|c| c.as_os_str() == "release"));
        let mut cmd = Command::new(cargo);
        cmd.current_dir(super::manifest_dir())
            .args(["build", "--quiet", "-p", "fake-cloud-hypervisor", "--bin", "fake-cloud-hypervisor"])
            .arg("--message-format=json-render-diagnostics");
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build for the fake");
        assert!(out.status.success(), "building fake-cloud-hypervisor failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "fake-cloud-hypervisor")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo names the fake's executable")
    })
    .clone()
}

/// `file` placed in `dir` under `name`, readable (and runnable) by anyone:
/// VMMs run as their own users, who may not pass through the checkout's
/// directories (a fresh clone in a `0700` temp dir). A hard link when it
/// can be, a copy otherwise.
fn reachable_copy(file: &Path, dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let at = dir.join(".fake-ch");
    std::fs::create_dir_all(&at).unwrap();
    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).unwrap();
    let to = at.join(name);
    if !to.exists() && std::fs::hard_link(file, &to).is_err() {
        std::fs::copy(file, &to).unwrap();
    }
    let mode = std::fs::metadata(&to).unwrap().permissions().mode() | 0o444;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    to
}

/// Writes `dir/cloud-hypervisor`: a script that runs the fake with the
/// spec and `env` set, so each test tunes its own VMMs. The fake and its
/// spec are placed in `dir` first, where a VMM's own user reaches them.
pub fn wrapper(dir: &Path, env: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let spec = reachable_copy(&spec_path(), dir, "openapi.yaml");
    let fake = reachable_copy(&binary(), dir, "fake-cloud-hypervisor");
    let mut script = String::from("#!/bin/sh\n");
    script.push_str(&format!("export FAKE_CH_OPENAPI={}\n", quote(&spec.display().to_string())));
    for (k, v) in env {
        script.push_str(&format!("export {k}={}\n", quote(v)));
    }
    script.push_str(&format!("exec {} \"$@\"\n", quote(&fake.display().to_string())));
    let path = dir.join("cloud-hypervisor");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Lines of a fake VMM's log that report a request the spec refuses.
/// A `hypeman.toml` for the daemon driving the fake through a wrapper
/// made in `dir` with `env`, with stand-in kernel and init files there and
/// the short timers the daemon tests wait on.
#[allow(dead_code)]
pub fn daemon_settings(dir: &Path, env: &[(&str, &str)]) -> String {
    let binary = wrapper(dir, env);
    for file in ["vmlinuz", "init"] {
        std::fs::write(dir.join(file), file).unwrap();
    }
    format!(
        "default_hypervisor = \"cloud-hypervisor\"\n[cloud_hypervisor]\nbinary = \"{}\"\n\
         [guest]\nkernel = \"{}\"\ninit = \"{}\"\n\
         [reconcile]\nresync_interval = \"2s\"\nhealth_interval = \"200ms\"\n\
         backoff_initial = \"200ms\"\nbackoff_max = \"2s\"\nstop_grace = \"3s\"\n",
        binary.display(),
        dir.join("vmlinuz").display(),
        dir.join("init").display()
    )
}

pub fn violations(vmm_log: &Path) -> Vec<String> {
    std::fs::read_to_string(vmm_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("SPEC VIOLATION") || l.contains("malformed request"))
        .map(str::to_string)
        .collect()
}
