//! The `hypeman` binary as a user runs it: exit codes, where output goes,
//! and which of `--data-dir`, `HYPEMAN_DATA_DIR` and the settings file
//! wins. Computations are tested in-process in `src/cli/tests.rs`.

mod support;

use anyhow::{Context as _, Result};
use hypeman::declaration::spec::HypervisorKind;
use hypeman::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hypeman() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hypeman"));
    // The caller's environment must not leak into what is tested.
    cmd.env_remove("HYPEMAN_CONFIG_DIR")
        .env_remove("HYPEMAN_DATA_DIR")
        .env_remove("RUST_LOG");
    cmd
}

fn run(cmd: &mut Command) -> Result<(i32, String, String)> {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().context("run hypeman")?;
    Ok((
        status.code().context("killed by a signal")?,
        String::from_utf8(stdout)?,
        String::from_utf8(stderr)?,
    ))
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn validate_accepts_the_examples() -> Result<()> {
    let (code, out, err) = run(hypeman()
        .arg("validate")
        .arg("--config-dir")
        .arg(examples()))?;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "ok: 3 instances\n", "")
    );
    Ok(())
}

#[test]
fn validate_reads_the_config_dir_from_the_environment() -> Result<()> {
    let (code, out, _) = run(hypeman()
        .arg("validate")
        .env("HYPEMAN_CONFIG_DIR", examples()))?;
    assert_eq!((code, out.as_str()), (0, "ok: 3 instances\n"));
    Ok(())
}

#[test]
fn validate_prints_one_located_line_per_problem_and_fails() -> Result<()> {
    let tmp = support::tempdir();
    let instances = tmp.path().join("instances");
    std::fs::create_dir(&instances)?;
    std::fs::write(instances.join("ok.toml"), "image = \"busybox\"\n")?;
    std::fs::write(
        instances.join("bad.toml"),
        "image = \"busybox\"\nvcpus = 0\nmemory = \"lots\"\n",
    )?;
    std::fs::write(instances.join("Bad_Name.toml"), "image = \"busybox\"\n")?;
    let (code, out, err) = run(hypeman()
        .arg("validate")
        .arg("--config-dir")
        .arg(tmp.path()))?;
    assert_eq!(code, 1, "{err}");
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let dir = instances.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{dir}/Bad_Name.toml:1:1: ")),
        "{err}"
    );
    assert!(lines[1].starts_with(&format!("{dir}/bad.toml:2:")), "{err}");
    assert!(lines[2].starts_with(&format!("{dir}/bad.toml:3:")), "{err}");
    Ok(())
}

#[test]
fn validate_fails_on_a_missing_config_dir() -> Result<()> {
    let tmp = support::tempdir();
    let missing = tmp.path().join("nope");
    let (code, _, err) = run(hypeman().arg("validate").arg("--config-dir").arg(&missing))?;
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "{}:1:1: does not exist: --config-dir (or HYPEMAN_CONFIG_DIR) names the directory holding hypeman.toml and instances/\n",
            missing.display()
        )
    );
    let file = tmp.path().join("file");
    std::fs::write(&file, "")?;
    let (code, _, err) = run(hypeman().arg("validate").arg("--config-dir").arg(&file))?;
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{}:1:1: not a directory: ", file.display())), "{err}");
    Ok(())
}

#[test]
fn validate_fails_on_a_missing_instances_dir() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (code, out, err) = run(hypeman().arg("validate").arg("--config-dir").arg(tmp.path()))?;
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(
        err,
        format!(
            "{}/instances:1:1: does not exist: declarations are <config-dir>/instances/<name>.toml (create the directory, even if empty)\n",
            tmp.path().display()
        )
    );
    std::fs::create_dir(tmp.path().join("instances"))?;
    let (code, out, _) = run(hypeman().arg("validate").arg("--config-dir").arg(tmp.path()))?;
    assert_eq!((code, out.as_str()), (0, "ok: 0 instances\n"));
    Ok(())
}

#[test]
fn status_json_on_an_empty_data_dir_is_an_empty_array() -> Result<()> {
    let tmp = support::tempdir();
    let data = tmp.path().join("data");
    let (code, out, err) = run(hypeman()
        .args(["status", "--json", "--config-dir"])
        .arg(tmp.path())
        .arg("--data-dir")
        .arg(&data))?;
    assert_eq!((code, out.trim(), err.as_str()), (0, "[]", ""));
    assert!(!data.exists(), "status must not create the data dir");
    Ok(())
}

/// A config dir with no declarations whose settings point at `file/`, and
/// three data dirs each holding one guest named for where it is.
fn three_data_dirs(tmp: &Path) -> Result<PathBuf> {
    let config = tmp.join("config");
    std::fs::create_dir_all(config.join("instances"))?;
    std::fs::write(
        config.join("hypeman.toml"),
        format!(
            "data_dir = {:?}\ndefault_hypervisor = \"qemu\"\n[cloud_hypervisor]\nbinary = {:?}\n",
            tmp.join("file"),
            tmp.join("no-such-cloud-hypervisor")
        ),
    )?;
    for which in ["flag", "env", "file"] {
        Store::open(&tmp.join(which))?
            // Cloud Hypervisor, whose binary the settings name but which
            // is not there.
            .create_guest(&format!("from-{which}"), HypervisorKind::CloudHypervisor)?;
    }
    Ok(config)
}

fn names_in(status_json: &str) -> Result<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(status_json)?;
    let list = value.as_array().context("an array")?;
    Ok(list
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect())
}

#[test]
fn data_dir_flag_beats_environment_beats_settings_file() -> Result<()> {
    let tmp = support::tempdir();
    let config = three_data_dirs(tmp.path())?;
    let status = || {
        let mut cmd = hypeman();
        cmd.args(["status", "--json", "--config-dir"]).arg(&config);
        cmd
    };

    let (code, out, err) = run(status()
        .env("HYPEMAN_DATA_DIR", tmp.path().join("env"))
        .arg("--data-dir")
        .arg(tmp.path().join("flag")))?;
    assert_eq!(
        (code, names_in(&out)?),
        (0, vec!["from-flag".to_string()]),
        "{err}"
    );

    let (_, out, _) = run(status().env("HYPEMAN_DATA_DIR", tmp.path().join("env")))?;
    assert_eq!(names_in(&out)?, ["from-env"]);

    let (_, out, _) = run(&mut status())?;
    assert_eq!(names_in(&out)?, ["from-file"]);
    Ok(())
}

#[test]
fn a_guest_whose_backend_is_missing_is_stopped_with_the_reason_not_a_failure() -> Result<()> {
    let tmp = support::tempdir();
    let config = three_data_dirs(tmp.path())?;
    let (code, out, err) = run(hypeman()
        .args(["status", "from-file", "--json", "--config-dir"])
        .arg(&config))?;
    assert_eq!(code, 0, "{err}");
    let value: serde_json::Value = serde_json::from_str(&out)?;
    // No VMM on record: nothing can be running, whatever the backend.
    assert_eq!(value["state"], "Stopped");
    assert_eq!(value["desired_state"], "absent");
    assert_eq!(
        value["last_error"],
        "no cloud-hypervisor backend is available on this host"
    );
    let keys: Vec<&str> = value
        .as_object()
        .context("an object")?
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = [
        "name",
        "id",
        "desired_state",
        "state",
        "hypervisor",
        "ip",
        "pid",
        "has_snapshot",
        "last_error",
        "pending_change",
        "volumes",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    Ok(())
}

#[test]
fn unknown_names_and_invalid_settings_fail_with_one_message() -> Result<()> {
    let tmp = support::tempdir();
    let data = tmp.path().join("data");
    let (code, out, err) = run(hypeman()
        .args(["status", "nope", "--config-dir"])
        .arg(tmp.path())
        .arg("--data-dir")
        .arg(&data))?;
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("hypeman: no instance matches \"nope\""),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    std::fs::write(tmp.path().join("hypeman.toml"), "colour = \"red\"\n")?;
    let (code, _, err) = run(hypeman().arg("plan").arg("--config-dir").arg(tmp.path()))?;
    assert_eq!(code, 1);
    let settings = tmp.path().join("hypeman.toml");
    assert!(
        err.contains(&format!("\n{}:1:1: ", settings.display())),
        "{err}"
    );
    Ok(())
}

#[test]
fn wait_times_out_with_the_last_state() -> Result<()> {
    let tmp = support::tempdir();
    std::fs::create_dir(tmp.path().join("instances"))?;
    std::fs::write(
        tmp.path().join("instances/web.toml"),
        "image = \"busybox\"\n",
    )?;
    let (code, _, err) = run(hypeman()
        .args([
            "wait",
            "web",
            "--state",
            "running",
            "--timeout",
            "200ms",
            "--config-dir",
        ])
        .arg(tmp.path())
        .arg("--data-dir")
        .arg(tmp.path().join("data")))?;
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "hypeman: no daemon is running on {}: declarations are not being applied (start `hypeman daemon`)\n\
             hypeman: web did not become Running within 200ms: it is Stopped, last error: none\n",
            tmp.path().join("data").display()
        )
    );
    Ok(())
}

#[test]
fn a_usage_error_exits_2() -> Result<()> {
    let (code, _, err) = run(hypeman().args(["wait", "web", "--state", "asleep"]))?;
    assert_eq!(code, 2, "{err}");
    Ok(())
}

/// `image pull|ls|rm|prune` on an OCI layout built with umoci: pull prints
/// the digest, ls names the instance using it, rm refuses while it is used,
/// prune removes it once unused.
#[test]
fn image_cache_commands() -> Result<()> {
    if !support::gate::tools(&["umoci", "/bin/busybox"]) {
        return Ok(());
    }
    let tmp = support::tempdir();
    let t = tmp.path();
    let layout = t.join("oci");
    let sh = |args: &[&str]| -> Result<()> {
        let out = Command::new("umoci").args(args).output()?;
        anyhow::ensure!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    sh(&["init", "--layout", layout.to_str().context("utf8")?])?;
    let image = format!("{}:bb", layout.display());
    sh(&["new", "--image", &image])?;
    sh(&["insert", "--image", &image, "/bin/busybox", "/bin/busybox"])?;
    let config = t.join("etc");
    std::fs::create_dir_all(config.join("instances"))?;
    let args = |cmd: &mut Command| {
        cmd.arg("--config-dir").arg(&config).arg("--data-dir").arg(t.join("data"));
    };
    let reference = format!("oci:{image}");
    let mut pull = hypeman();
    pull.args(["image", "pull", &reference]);
    args(&mut pull);
    let (code, out, err) = run(&mut pull)?;
    assert_eq!(code, 0, "{err}");
    let digest = out.trim().to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");
    assert_eq!(out, format!("{digest}\n"), "stdout holds the digest alone");
    // stderr is a pipe here: plain progress lines, one per event.
    assert!(err.contains("  verified in ") && err.contains("built the erofs disk"), "{err}");
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    let (code, again, err) = run(&mut pull)?;
    assert_eq!((code, again), (0, out.clone()));
    assert!(err.contains(&format!("cached {}", &digest[7..19])), "{err}");

    std::fs::write(config.join("instances/one.toml"), format!("image = \"{reference}\"\nstate = \"stopped\"\n"))?;
    let mut ls = hypeman();
    ls.args(["image", "ls", "--json"]);
    args(&mut ls);
    let (code, out, _) = run(&mut ls)?;
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(rows[0]["digest"], digest.as_str());
    assert_eq!(rows[0]["used_by"], serde_json::json!(["one"]));

    let mut rm = hypeman();
    rm.args(["image", "rm", &digest[..15]]);
    args(&mut rm);
    let (code, _, err) = run(&mut rm)?;
    assert_ne!(code, 0);
    assert!(err.contains("is used by one; not removed"), "{err}");

    std::fs::remove_file(config.join("instances/one.toml"))?;
    let mut prune = hypeman();
    prune.args(["image", "prune"]);
    args(&mut prune);
    let (code, out, err) = run(&mut prune)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("removed {digest}")), "{out}");
    let (_, out, _) = run(&mut ls)?;
    assert_eq!(out.trim(), "[]");
    Ok(())
}

/// The daemon's log, when stderr is a file (a journal, `> daemon.log`),
/// has no terminal colour codes; a second daemon on the same data dir is
/// refused with one clear line; SIGTERM ends the first with status 0.
#[test]
fn a_daemon_logs_plain_text_and_a_second_one_is_refused() -> Result<()> {
    let tmp = support::tempdir();
    std::fs::create_dir(tmp.path().join("instances"))?;
    std::fs::write(tmp.path().join("instances/idle.toml"), "image = \"busybox\"\nstate = \"stopped\"\n")?;
    std::fs::write(tmp.path().join("hypeman.toml"), "default_hypervisor = \"qemu\"\n")?;
    let data = tmp.path().join("data");
    let log_path = tmp.path().join("daemon.log");
    let mut daemon = hypeman()
        .arg("daemon")
        .arg("--config-dir")
        .arg(tmp.path())
        .arg("--data-dir")
        .arg(&data)
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log_path)?.contains("hypeman daemon ready") {
        if std::time::Instant::now() > deadline {
            let _ = daemon.kill();
            anyhow::bail!("the daemon never got ready: {}", std::fs::read_to_string(&log_path)?);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = run(hypeman()
        .arg("daemon")
        .arg("--config-dir")
        .arg(tmp.path())
        .arg("--data-dir")
        .arg(&data));
    let plan = |tmp: &Path| run(hypeman().arg("plan").arg("--config-dir").arg(tmp).arg("--data-dir").arg(&data));
    let (_, _, plan_beside_a_daemon) = plan(tmp.path())?;
    let killed = Command::new("kill").arg("-TERM").arg(daemon.id().to_string()).status()?;
    let status = daemon.wait()?;
    let (code, out, plan_alone) = plan(tmp.path())?;
    assert_eq!(plan_beside_a_daemon, "", "no note while a daemon runs");
    assert_eq!((code, out.as_str()), (0, "idle  Stopped -> stopped: nothing to do\n"));
    assert_eq!(
        plan_alone,
        format!(
            "hypeman: no daemon is running on {}: declarations are not being applied (start `hypeman daemon`)\n",
            data.display()
        )
    );
    let (code, out, err) = second?;
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!("hypeman: the daemon failed: another hypeman daemon already manages {}\n", data.display())
    );
    assert!(killed.success());
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(&log_path)?;
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
    assert!(log.contains("stopping; VMs keep running"), "{log}");
    Ok(())
}
