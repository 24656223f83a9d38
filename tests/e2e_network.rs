//! Guest networking with real components: the `hypeman daemon` binary runs
//! inside a network namespace made here, creates its bridge and the guests'
//! TAPs there, and boots busybox guests under QEMU TCG with
//! `[network] enabled = true`. Traffic is proven both ways and between
//! guests: each guest fetches a file from an HTTP server the test runs on
//! the bridge address, the host fetches a page from the first guest's
//! `httpd`, and the second guest fetches it too.
//!
//! A standby and restore of the first guest keep its TAP and its address,
//! and every path still works afterwards.
//!
//! Gated like the other real-VM tests (`HYPEMAN_REAL_VM=1`). Everything
//! happens inside the namespace, which is removed (with every process in
//! it, all started here) even when the test fails.
//!
//! `vm-tests/network-scenario.nix` is the same scenario as a NixOS VM test
//! (the NixOS module's bridge, firewall and NAT, on both hypervisors with
//! KVM); its subtests are named after the steps of
//! `guests_reach_the_host_the_host_reaches_them_and_they_reach_each_other`
//! below. Keep the two in step.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BRIDGE: &str = "hyptest0";
const GATEWAY: &str = "10.77.0.1";
const HOST_PORT: u16 = 8081;
const GUEST_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(120);

/// A network namespace of this test's own; dropping it kills what runs in
/// it (the daemon, QEMU and httpd this test started) and deletes it.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        // Unique per test: the tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("hypeman-test-{}-{n}", std::process::id());
        // A namespace left by an earlier run that had this pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        support::run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        support::run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// `program` run inside the namespace.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn ip(&self, args: &[&str]) -> String {
        support::run_ok(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pids = Command::new("ip").args(["netns", "pids", &self.name]).output();
        if let Ok(out) = pids {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

struct World {
    tmp: tempfile::TempDir,
    config: PathBuf,
    data: PathBuf,
    image: String,
    daemon: Option<Child>,
    server: Option<Child>,
    // Last, so the processes above are reaped before the namespace goes.
    ns: Netns,
}

impl World {
    fn new(kernel_dir: &Path, init: &Path) -> World {
        let ns = Netns::new();
        let tmp = support::tempdir();
        let network = format!("[network]\nbridge = \"{BRIDGE}\"\nsubnet = \"10.77.0.0/24\"\ndns = [\"{GATEWAY}\"]\n");
        let (config, data) = support::tcg_config_dir(tmp.path(), kernel_dir, init, &network);
        let image = support::busybox_image(
            tmp.path(),
            &["sh", "sleep", "echo", "cat", "mkdir", "grep", "hostname", "httpd", "wget", "sync", "ls"],
        );
        World { tmp, config, data, image, daemon: None, server: None, ns }
    }

    /// An HTTP server in the namespace on every address, so on the bridge
    /// address as soon as the daemon makes the bridge.
    fn serve(&mut self) {
        let www = self.tmp.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("ping"), "pong-from-host\n").unwrap();
        let child = self
            .ns
            .command("busybox")
            .args(["httpd", "-f", "-p", &HOST_PORT.to_string(), "-h"])
            .arg(&www)
            .stdin(Stdio::null())
            .spawn()
            .expect("start httpd");
        self.server = Some(child);
    }

    fn hypeman(&self) -> Command {
        support::hypeman(&[], &self.config, &self.data)
    }

    /// The daemon runs inside the namespace, so its bridge and TAPs are
    /// made there; the CLI needs no namespace (it talks over unix sockets).
    fn start(&mut self) {
        let cmd = support::hypeman(&["ip", "netns", "exec", &self.ns.name], &self.config, &self.data);
        self.daemon = Some(support::spawn_daemon(cmd, &self.tmp.path().join("daemon.log")));
    }

    fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    fn declare(&self, name: &str, state: &str, script: &str) {
        self.declare_with(name, state, script, "[network]\nenabled = true\n");
    }

    /// A declaration running `script`, with `tables` (TOML) appended.
    fn declare_with(&self, name: &str, state: &str, script: &str, tables: &str) {
        let body = format!(
            "image = \"{}\"\nstate = \"{state}\"\nmemory = \"256MiB\"\ncmd = [\"sh\", \"-c\", '{script}']\n{tables}",
            self.image
        );
        let dir = self.config.join("instances");
        std::fs::write(dir.join(format!(".{name}.tmp")), body).unwrap();
        std::fs::rename(dir.join(format!(".{name}.tmp")), dir.join(format!("{name}.toml"))).unwrap();
    }

    fn status(&self, name: &str) -> Value {
        serde_json::from_str(&support::run_ok(self.hypeman().args(["status", name, "--json"]))).unwrap()
    }

    fn daemon_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.tmp.path().join("daemon.log")).unwrap_or_default();
        log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn wait(&self, name: &str, state: &str) {
        let out = self.hypeman().args(["wait", name, "--state", state, "--timeout", "120s"]).output().unwrap();
        assert!(
            out.status.success(),
            "{name} never became {state}: {}\n--- daemon log tail ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log_tail()
        );
    }

    fn app_log(&self, name: &str) -> String {
        let Some(id) = self.status(name)["id"].as_str().map(str::to_string) else { return String::new() };
        std::fs::read_to_string(self.data.join("guests").join(id).join("logs/app.log")).unwrap_or_default()
    }

    /// The numbers of `name`'s console lines `<prefix> <n>`, in order.
    fn numbers(&self, name: &str, prefix: &str) -> Vec<u64> {
        self.app_log(name)
            .lines()
            .filter_map(|l| l.trim().strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
            .collect()
    }

    /// Waits until `name`'s console has a line starting with `prefix`.
    fn wait_line(&self, name: &str, prefix: &str) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.app_log(name);
            if let Some(line) = log.lines().map(str::trim).find(|l| l.starts_with(prefix)) {
                return line.to_string();
            }
            assert!(t0.elapsed() < TIMEOUT, "{name} never printed {prefix:?}; console:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for child in [self.daemon.take(), self.server.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // QEMU processes run detached in the namespace; `Netns` kills them.
    }
}

/// Serves its own page; fetches `url` from inside the guest until it
/// answers, then prints `<tag> <body>`; then fetches it again once a second
/// for ever, printing `REACH <n>` (n counts attempts) after each answer. A
/// restored guest continues its count where it stopped (a cold boot would
/// start again at 1), and new `REACH` lines show the path works again.
fn guest_script(fetch: &str, tag: &str) -> String {
    format!(
        "mkdir -p /www; echo hello-from-$(hostname) > /www/index.html; httpd -p {GUEST_PORT} -h /www; \
         echo RESOLV $(grep nameserver /etc/resolv.conf); echo HOSTS $(grep $(hostname) /etc/hosts); \
         i=0; while [ $i -lt 100 ]; do if got=$(wget -q -O - {fetch}); then echo {tag} $got; break; fi; \
         i=$((i+1)); sleep 0.3; done; \
         n=0; while true; do sleep 1; n=$((n+1)); if wget -q -O /dev/null {fetch}; then echo REACH $n; fi; done"
    )
}

/// The numbers in `now` that came after `before`: the console log may go
/// on from where it was or start afresh when a VMM is started again.
fn after<'a>(before: &[u64], now: &'a [u64]) -> &'a [u64] {
    if now.starts_with(before) {
        &now[before.len()..]
    } else {
        now
    }
}

/// The round-trip times `busybox ping` printed: (min, avg) in ms.
fn rtt(ping_output: &str) -> Option<(f64, f64)> {
    let line = ping_output.lines().find(|l| l.contains("min/avg/max"))?;
    let numbers = line.split('=').nth(1)?.trim().split(' ').next()?;
    let mut parts = numbers.split('/').map(|n| n.parse::<f64>());
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

#[test]
fn guests_reach_the_host_the_host_reaches_them_and_they_reach_each_other() {
    let Some((kernel_dir, init)) = support::real_vm("the guest network test", &["umoci", "mkfs.erofs", "mkfs.ext4", "ip"]) else {
        return;
    };
    let mut w = World::new(&kernel_dir, &init);
    w.serve();
    w.start();

    let t = Instant::now();
    let web_script = guest_script(&format!("http://{GATEWAY}:{HOST_PORT}/ping"), "HOST_SAYS");
    w.declare("web", "running", &web_script);
    w.wait("web", "Running");
    let web = w.status("web");
    let web_ip = web["ip"].as_str().expect("web has an address").to_string();
    assert!(web_ip.starts_with("10.77.0.") && web_ip != GATEWAY, "{web_ip}");

    // Guest → host, through the TAP and the bridge.
    assert_eq!(w.wait_line("web", "HOST_SAYS"), "HOST_SAYS pong-from-host");
    eprintln!("web: declared → fetched from the host in {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(w.wait_line("web", "RESOLV"), format!("RESOLV nameserver {GATEWAY}"));
    assert_eq!(w.wait_line("web", "HOSTS"), format!("HOSTS {web_ip} web"));

    // Host → guest.
    let page = support::run_ok(w.ns.command("busybox").args(["wget", "-q", "-O", "-", &format!("http://{web_ip}:{GUEST_PORT}/")]));
    assert_eq!(page.trim(), "hello-from-web");
    let ping = support::run_ok(w.ns.command("busybox").args(["ping", "-c", "10", "-i", "0.2", &web_ip]));
    assert!(ping.contains("10 packets received"), "{ping}");
    if let Some((min, avg)) = rtt(&ping) {
        eprintln!("host → web ping under TCG: rtt min {min:.2} ms, avg {avg:.2} ms (10/10 received)");
    }

    // Bridge and TAP are where the daemon put them.
    let id = web["id"].as_str().unwrap().to_string();
    let tap = format!("hm{}", &id.to_ascii_lowercase()[13..]);
    let ports = w.ns.ip(&["-o", "link", "show", "master", BRIDGE]);
    assert!(ports.contains(&tap), "{tap} is not on {BRIDGE}: {ports}");
    let addr = w.ns.ip(&["-o", "-4", "addr", "show", "dev", BRIDGE]);
    assert!(addr.contains(&format!("{GATEWAY}/24")), "{addr}");

    // A second guest: its own address, and it reaches the first one.
    w.declare("peer", "running", &guest_script(&format!("http://{web_ip}:{GUEST_PORT}/"), "PEER_SAYS"));
    w.wait("peer", "Running");
    let peer_ip = w.status("peer")["ip"].as_str().expect("peer has an address").to_string();
    assert_ne!(peer_ip, web_ip);
    assert_eq!(w.wait_line("peer", "PEER_SAYS"), "PEER_SAYS hello-from-web");

    // Standby keeps the TAP (the snapshot's NIC is bound to it by name) and
    // the address; the restored guest is reached by the host and its peer
    // and reaches the host, on the same address, and it was restored, not
    // booted again: its count goes on.
    w.wait_line("web", "REACH");
    w.declare("web", "standby", &web_script);
    w.wait("web", "Standby");
    assert!(w.ns.has_link(&tap), "a guest in standby keeps its TAP\n{}", w.daemon_log_tail());
    assert_eq!(w.status("web")["ip"].as_str(), Some(web_ip.as_str()), "the lease is kept in standby");
    let web_before = w.numbers("web", "REACH");
    let peer_before = w.numbers("peer", "REACH");
    let t = Instant::now();
    w.declare("web", "running", &web_script);
    w.wait("web", "Running");
    eprintln!("web: restored in {:.2}s (declaration written → Running)", t.elapsed().as_secs_f64());
    assert_eq!(w.status("web")["ip"].as_str(), Some(web_ip.as_str()), "the restored guest keeps its address");
    let page = support::run_ok(w.ns.command("busybox").args(["wget", "-q", "-O", "-", &format!("http://{web_ip}:{GUEST_PORT}/")]));
    assert_eq!(page.trim(), "hello-from-web", "host → guest after the restore");
    let last_before = *web_before.last().expect("web reached the host before its standby");
    let t0 = Instant::now();
    loop {
        let now = w.numbers("web", "REACH");
        if let Some(&first) = after(&web_before, &now).first() {
            assert!(first > last_before, "web's count restarted ({last_before} before standby, {first} after): a cold boot, not a restore");
            break;
        }
        assert!(t0.elapsed() < TIMEOUT, "web never reached the host after its restore; console:\n{}", w.app_log("web"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let t0 = Instant::now();
    while after(&peer_before, &w.numbers("peer", "REACH")).is_empty() {
        assert!(t0.elapsed() < TIMEOUT, "peer never reached web after its restore; console:\n{}", w.app_log("peer"));
        std::thread::sleep(Duration::from_millis(200));
    }

    // Stopped: the TAP goes, the address stays the guest's.
    w.declare("web", "stopped", &web_script);
    w.wait("web", "Stopped");
    let t0 = Instant::now();
    while w.ns.has_link(&tap) {
        assert!(t0.elapsed() < Duration::from_secs(10), "a stopped guest's TAP is removed\n{}", w.daemon_log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.status("web")["ip"].as_str(), Some(web_ip.as_str()), "the lease is kept");

    // Deleted: the guest's record and its lease go.
    std::fs::remove_file(w.config.join("instances/web.toml")).unwrap();
    let t0 = Instant::now();
    while w.data.join("guests").join(&id).exists() {
        assert!(t0.elapsed() < TIMEOUT, "web never deleted\n{}", w.daemon_log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(w.config.join("instances/peer.toml")).unwrap();
    let t0 = Instant::now();
    while w.ns.ip(&["-o", "link", "show", "master", BRIDGE]).contains(": hm") {
        assert!(t0.elapsed() < TIMEOUT, "peer's TAP never removed\n{}", w.daemon_log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    w.stop_daemon();
}

/// A declared `[[volumes]]` disk is found by its serial, mounted where the
/// declaration says, readable and writable by the app; without `[network]`
/// the guest has loopback only. It is declared through a symlink, which is
/// resolved once: `status` shows the file the VM was given.
#[test]
fn a_volume_is_mounted_and_the_app_writes_to_it() {
    let Some((kernel_dir, init)) = support::real_vm("the volume test", &["umoci", "mkfs.erofs", "mkfs.ext4", "debugfs", "ip"]) else {
        return;
    };
    let mut w = World::new(&kernel_dir, &init);
    let seed = w.tmp.path().join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(seed.join("seed.txt"), "seeded-on-the-host\n").unwrap();
    let volume = w.tmp.path().join("data.ext4");
    std::fs::File::create(&volume).unwrap().set_len(32 << 20).unwrap();
    support::run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&seed).arg(&volume));
    let link = w.tmp.path().join("data-link.ext4");
    std::os::unix::fs::symlink(&volume, &link).unwrap();
    w.start();

    let script = "echo SEED $(cat /data/seed.txt); echo written-by-the-guest > /data/proof.txt; sync; \
                  echo LINKS $(ls /sys/class/net); echo VOLUME_DONE; sleep 3600";
    w.declare_with("vol", "running", script, &format!("[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n", link.display()));
    w.wait("vol", "Running");
    let shown = &w.status("vol")["volumes"][0];
    assert_eq!(shown["source"], std::fs::canonicalize(&volume).unwrap().display().to_string());
    assert_eq!(shown["declared"], link.display().to_string());
    w.wait_line("vol", "VOLUME_DONE");
    assert_eq!(w.wait_line("vol", "SEED"), "SEED seeded-on-the-host");
    assert_eq!(w.wait_line("vol", "LINKS"), "LINKS lo", "no NIC without [network]");
    assert_eq!(w.status("vol")["ip"], Value::Null);
    let console = w.app_log("vol");
    assert!(console.contains("volume vol0 (/dev/vdd, ext4) mounted on /data"), "{console}");

    w.declare_with("vol", "stopped", script, &format!("[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n", link.display()));
    w.wait("vol", "Stopped");
    let proof = support::run_ok(Command::new("debugfs").args(["-R", "cat /proof.txt"]).arg(&volume));
    assert_eq!(proof.trim(), "written-by-the-guest");
    w.stop_daemon();
}

/// A file the app wrote to a volume just before standby, without `sync`,
/// is on the volume once the instance is declared stopped: leaving standby
/// restores the guest and shuts it down through its power button, so its
/// page cache is written back, where discarding the snapshot would lose it.
/// The image is checked as a fresh mount would see it: its journal
/// replayed on a copy (`e2fsck -fy`), then read with `debugfs`.
#[test]
fn a_volume_write_just_before_standby_survives_declaring_stopped() {
    let Some((kernel_dir, init)) =
        support::real_vm("the standby flush test", &["umoci", "mkfs.erofs", "mkfs.ext4", "debugfs", "e2fsck", "ip"])
    else {
        return;
    };
    let mut w = World::new(&kernel_dir, &init);
    let volume = w.tmp.path().join("data.ext4");
    std::fs::File::create(&volume).unwrap().set_len(32 << 20).unwrap();
    support::run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&volume));
    w.start();
    let script = "echo unsynced-but-kept > /data/late.txt; echo WROTE; sleep 3600";
    let extra = format!("[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n", volume.display());
    w.declare_with("late", "running", script, &extra);
    w.wait("late", "Running");
    w.wait_line("late", "WROTE");
    w.declare_with("late", "standby", script, &extra);
    w.wait("late", "Standby");
    w.declare_with("late", "stopped", script, &extra);
    w.wait("late", "Stopped");
    let copy = w.tmp.path().join("check.ext4");
    std::fs::copy(&volume, &copy).unwrap();
    // Exit status 1 means "errors corrected" (a replayed journal); only
    // more than that is a damaged filesystem.
    let fsck = Command::new("e2fsck").args(["-fy"]).arg(&copy).output().unwrap();
    assert!(fsck.status.code().is_some_and(|c| c <= 1), "e2fsck: {fsck:?}");
    let kept = support::run_ok(Command::new("debugfs").args(["-R", "cat /late.txt"]).arg(&copy));
    assert_eq!(kept.trim(), "unsynced-but-kept");
    let id = w.status("late")["id"].as_str().expect("an id").to_string();
    let hypeman = std::fs::read_to_string(w.data.join("guests").join(id).join("logs/hypeman.log")).unwrap();
    assert!(hypeman.contains("restore from standby (from Standby)"), "{hypeman}");
    assert!(!hypeman.contains("discard snapshot"), "{hypeman}");
    w.stop_daemon();
}

/// A TAP deleted behind the daemon's back while its guest runs: the health
/// check makes it again and, since the VMM's descriptor stays bound to the
/// deleted device, reconnects the guest by a standby/restore cycle, not a
/// reboot. The host reaches the guest's own server again over the new TAP,
/// and the guest's log says what happened.
#[test]
fn a_guest_whose_tap_is_deleted_is_reconnected_without_a_reboot() {
    let Some((kernel_dir, init)) = support::real_vm("the lost TAP test", &["umoci", "mkfs.erofs", "mkfs.ext4", "ip"]) else {
        return;
    };
    let mut w = World::new(&kernel_dir, &init);
    w.serve();
    w.start();
    let script = guest_script(&format!("http://{GATEWAY}:{HOST_PORT}/ping"), "HOST_SAYS");
    w.declare("web", "running", &script);
    w.wait("web", "Running");
    assert_eq!(w.wait_line("web", "HOST_SAYS"), "HOST_SAYS pong-from-host");
    let web = w.status("web");
    let (id, ip) = (web["id"].as_str().unwrap().to_string(), web["ip"].as_str().unwrap().to_string());
    let tap = format!("hm{}", &id.to_ascii_lowercase()[13..]);
    let fetch = || w.ns.command("busybox").args(["wget", "-q", "-O", "-", &format!("http://{ip}:{GUEST_PORT}/")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&fetch().stdout).trim(), "hello-from-web");

    let t = Instant::now();
    w.ns.ip(&["link", "del", &tap]);
    let log_path = w.data.join("guests").join(&id).join("logs/hypeman.log");
    let t0 = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("drop stale snapshot: done") {
            break log;
        }
        assert!(t0.elapsed() < TIMEOUT, "never restored; hypeman.log:\n{log}\n{}", w.daemon_log_tail());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(log.contains(&format!("the guest lost its network: TAP {tap} was deleted")), "{log}");
    assert_eq!(log.matches("create VM (from").count(), 1, "restored, not booted again:\n{log}");
    w.wait("web", "Running");
    let t0 = Instant::now();
    loop {
        let out = fetch();
        if String::from_utf8_lossy(&out.stdout).trim() == "hello-from-web" {
            break;
        }
        assert!(t0.elapsed() < TIMEOUT, "host never reached web again: {}\n{log}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("web: TAP deleted → reached again in {:.2}s", t.elapsed().as_secs_f64());
    let link = w.ns.ip(&["-o", "link", "show", "dev", &tap]);
    assert!(link.contains(&format!("master {BRIDGE}")) && link.contains("LOWER_UP"), "on the bridge, held by the VMM: {link}");
    w.stop_daemon();
}
