//! The real `hypeman daemon` binary driven through files, as a user drives
//! it, and the lifecycle scenario every backend must pass: create, standby,
//! restore, daemon killed and restarted (adoption), VMM killed (brought
//! back), stop, delete. `e2e_qemu` runs it with real microVMs, and
//! `e2e_cloud_hypervisor` with the fake Cloud Hypervisor binary.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The guest program of the scenarios: a counter on the serial console.
/// (The fake Cloud Hypervisor's guest prints the same lines by itself.)
pub const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo COUNTER $i; sleep 0.2; done";

pub struct World {
    pub tmp: tempfile::TempDir,
    pub config: PathBuf,
    pub data: PathBuf,
    pub image: String,
    pub memory: String,
    /// The app's `sh -c` script.
    pub script: String,
    /// More declaration lines, e.g. `hotplug_memory = "256MiB"`.
    pub extra: String,
    /// The VMM's API socket in a guest directory (`qmp.sock`, `ch.sock`).
    pub socket: &'static str,
    /// How long any one wait may take.
    pub patience: Duration,
    /// A directory put first on the daemon's `PATH` (and so its VMMs'), to
    /// stand in for a tool they run, such as QEMU's `exec:cat`.
    pub path_first: Option<PathBuf>,
    daemon: Option<Child>,
}

impl World {
    /// The daemon set up for real QEMU guests under TCG (`tcg_settings`),
    /// declaring the busybox image with what the counter app needs.
    pub fn qemu(kernel_dir: &Path, init: &Path) -> World {
        let settings = super::tcg_settings(kernel_dir, init, "");
        World::new("qmp.sock", |tmp| (settings, super::busybox_image(tmp, &["sh", "sleep", "echo", "cat"])))
    }

    /// A config dir and an empty instances dir in a temp dir; `setup`
    /// gets that temp dir and returns the settings (`hypeman.toml`) and the
    /// image to declare.
    pub fn new(socket: &'static str, setup: impl FnOnce(&Path) -> (String, String)) -> World {
        let tmp = super::tempdir();
        let config = tmp.path().join("etc");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(config.join("instances")).unwrap();
        let (settings, image) = setup(tmp.path());
        std::fs::write(config.join("hypeman.toml"), settings).unwrap();
        World {
            tmp,
            config,
            data,
            image,
            memory: "256MiB".into(),
            script: COUNTER.into(),
            extra: String::new(),
            socket,
            patience: Duration::from_secs(90),
            path_first: None,
            daemon: None,
        }
    }

    pub fn hypeman(&self) -> Command {
        super::hypeman(&[], &self.config, &self.data)
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.tmp.path().join("daemon.log")
    }

    pub fn daemon_log_text(&self) -> String {
        std::fs::read_to_string(self.daemon_log()).unwrap_or_default()
    }

    /// Replaces `key = …` in the settings (before `start`).
    pub fn reconcile_setting(&self, key: &str, value: &str) {
        let path = self.config.join("hypeman.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text: Vec<String> = text
            .lines()
            .map(|l| if l.starts_with(&format!("{key} =")) { format!("{key} = {value}") } else { l.to_string() })
            .collect();
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
    }

    pub fn start(&mut self) {
        let mut cmd = self.hypeman();
        if let Some(dir) = &self.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", dir.display()));
        }
        self.daemon = Some(super::spawn_daemon(cmd, &self.daemon_log()));
    }

    /// SIGKILL: nothing orderly happens.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn declare(&self, state: &str) {
        let body = format!(
            "image = \"{}\"\nstate = \"{state}\"\nmemory = \"{}\"\ncmd = [\"sh\", \"-c\", \"{}\"]\n{}",
            self.image, self.memory, self.script, self.extra
        );
        let dir = self.config.join("instances");
        std::fs::write(dir.join(".counter.tmp"), body).unwrap();
        std::fs::rename(dir.join(".counter.tmp"), dir.join("counter.toml")).unwrap();
    }

    pub fn status(&self) -> Value {
        let out = super::run_ok(self.hypeman().args(["status", "counter", "--json"]));
        serde_json::from_str(&out).unwrap()
    }

    fn daemon_log_tail(&self) -> String {
        let log = self.daemon_log_text();
        log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn wait(&self, state: &str) {
        let timeout = format!("{}s", self.patience.as_secs());
        let out = self.hypeman().args(["wait", "counter", "--state", state, "--timeout", &timeout]).output().unwrap();
        if !out.status.success() {
            panic!(
                "counter never became {state}: {}\n--- daemon log tail ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.daemon_log_tail()
            );
        }
    }

    pub fn guest_dir(&self) -> PathBuf {
        let id = self.status()["id"].as_str().expect("created").to_string();
        self.data.join("guests").join(id)
    }

    pub fn counters(&self) -> Vec<u64> {
        // Not provisioned yet: no log, no lines.
        let Some(id) = self.status()["id"].as_str().map(str::to_string) else { return Vec::new() };
        let log = std::fs::read_to_string(self.data.join("guests").join(id).join("logs/app.log")).unwrap_or_default();
        log.lines().filter_map(|l| l.trim().strip_prefix("COUNTER ")?.trim().parse().ok()).collect()
    }

    pub fn wait_counter_above(&self, n: u64) -> Duration {
        let t0 = Instant::now();
        while self.counters().last().copied().unwrap_or(0) <= n {
            if t0.elapsed() >= self.patience {
                let app = std::fs::read_to_string(self.guest_dir().join("logs/app.log")).unwrap_or_default();
                let tail: Vec<&str> = app.lines().rev().take(15).collect();
                panic!("counter stuck at {:?}; app.log ends:\n{}", self.counters().last(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        t0.elapsed()
    }

    pub fn vmm_running(&self) -> bool {
        hypeman::hypervisor::process::find_by_argument(&self.guest_dir().join(self.socket)).is_some()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_daemon();
        // Leave no VMM behind, whatever the test did.
        if let Ok(dir) = std::fs::read_dir(self.data.join("guests")) {
            for g in dir.flatten() {
                while let Some(p) = hypeman::hypervisor::process::find_by_argument(&g.path().join(self.socket)) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGKILL);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// The scenario of the NixOS VM test, through the daemon binary: each
/// backend passes the same steps. Prints the time of each phase.
/// The VMM `pid` runs as its own user (the default, `[vmm] users =
/// "per-instance"`), with no capabilities, and sandboxed: QEMU's seccomp
/// filter is on (`Seccomp: 2`), Cloud Hypervisor was asked for its own.
pub fn assert_own_user(pid: u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.split_whitespace().next().unwrap_or("").to_string());
    let uid: u32 = field("Uid:").unwrap().parse().unwrap();
    assert!((70000..=70999).contains(&uid), "VMM {pid} runs as uid {uid}:\n{status}");
    assert_eq!(field("CapEff:").as_deref(), Some("0000000000000000"), "{status}");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap().replace('\0', " ");
    let sandboxed = field("Seccomp:").as_deref() == Some("2") || cmdline.contains("--seccomp true");
    assert!(sandboxed, "VMM {pid} is not sandboxed: {cmdline}\n{status}");
}

pub fn lifecycle(w: &mut World) {
    w.start();

    let t = Instant::now();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(3);
    eprintln!("cold boot: file written → COUNTER 3 in {:.2}s", t.elapsed().as_secs_f64());
    let pid = w.status()["pid"].as_u64().expect("a live VMM");
    assert_own_user(pid);

    // Standby: no VMM left, a complete snapshot on disk.
    let t = Instant::now();
    w.declare("standby");
    w.wait("Standby");
    eprintln!("standby: {:.2}s", t.elapsed().as_secs_f64());
    assert!(!w.vmm_running(), "standby leaves no VMM");
    let snap = w.guest_dir().join("snapshots/snapshot-latest");
    assert!(snap.join("snapshot.json").exists(), "snapshot is complete");
    let last = *w.counters().last().unwrap();

    // Restore: the counter continues, it does not restart at 1.
    let t = Instant::now();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(last);
    eprintln!("restore: state edit → next COUNTER in {:.2}s", t.elapsed().as_secs_f64());
    let after: Vec<u64> = w.counters();
    let first_new = after.iter().skip_while(|&&c| c != last).nth(1).copied();
    assert_eq!(first_new, Some(last + 1), "the guest continued where it stopped: {:?}", &after[after.len().saturating_sub(10)..]);
    assert_ne!(w.status()["pid"].as_u64(), Some(pid), "a new VMM restored it");
    assert_own_user(w.status()["pid"].as_u64().unwrap());

    // The daemon killed hard and restarted adopts the VMM: no second one.
    let pid = w.status()["pid"].as_u64().unwrap();
    w.kill_daemon();
    w.start();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(w.status()["pid"].as_u64(), Some(pid), "the same VMM, adopted");
    assert_eq!(w.status()["state"], "Running");

    // The VMM killed behind the daemon's back: noticed, brought back.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t0 = Instant::now();
    loop {
        let s = w.status();
        if s["state"] == "Running" && s["pid"].as_u64().is_some_and(|p| p != pid) {
            break;
        }
        assert!(t0.elapsed() < w.patience, "never brought back: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }

    w.declare("stopped");
    w.wait("Stopped");
    assert!(!w.vmm_running());

    let dir = w.guest_dir();
    std::fs::remove_file(w.config.join("instances/counter.toml")).unwrap();
    let t0 = Instant::now();
    while dir.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "data never deleted");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.stop_daemon();
}
