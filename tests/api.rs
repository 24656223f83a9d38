//! The daemon's local API (issue 12, item 1) through the real binaries: the
//! daemon with the fake Cloud Hypervisor, `hypeman status|plan|wait` asking
//! it. What it answers is what the stored view says of the same state; the
//! socket is the owner's alone; a daemon killed leaves a socket the next
//! one replaces; bad requests are answered, never hung on.

mod support;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use support::daemon::World;

fn world() -> Option<World> {
    if !support::gate::tools(&["umoci", "mkfs.erofs", "mkfs.ext4"]) {
        return None;
    }
    let mut w = World::new("ch.sock", |tmp| (support::fake_ch::daemon_settings(tmp, &[]), support::busybox_image(tmp, &["sh"])));
    w.patience = Duration::from_secs(60);
    Some(w)
}

fn cli(w: &World, args: &[&str]) -> (String, String, bool) {
    let out = w.hypeman().args(args).output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned(), out.status.success())
}

/// One raw request line, the reply line.
fn raw(socket: &std::path::Path, line: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

#[test]
fn status_plan_and_wait_ask_the_daemon_and_agree_with_the_stored_view() {
    let Some(mut w) = world() else { return };
    w.start();
    w.declare("running");
    w.wait("Running");
    let socket = w.data.join("hypeman.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket is its owner's alone");

    let (api, stderr, ok) = cli(&w, &["status", "--json"]);
    assert!(ok && stderr.is_empty(), "{stderr}");
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    assert_eq!(api[0]["state"], "Running", "{api}");
    let (one, _, _) = cli(&w, &["status", "counter", "--json"]);
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one, api[0]);

    // Without the socket the CLI looks for itself, and says so.
    let hidden = w.data.join("hypeman.sock.hidden");
    std::fs::rename(&socket, &hidden).unwrap();
    let (stored, stderr, ok) = cli(&w, &["status", "--json"]);
    std::fs::rename(&hidden, &socket).unwrap();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("does not answer on") && stderr.contains("showing the stored view"), "{stderr}");
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored, api, "the daemon's view and the stored view agree");

    let (plan, _, ok) = cli(&w, &["plan"]);
    assert!(ok && plan.contains("counter") && plan.contains("Running -> running"), "{plan}");
    let (_, stderr, ok) = cli(&w, &["status", "nosuch"]);
    assert!(!ok && stderr.contains("no instance matches \"nosuch\""), "{stderr}");

    // Answered, not hung on: garbage, another version, an oversized line.
    let r = raw(&socket, b"hello\n");
    assert_eq!((r["ok"].as_bool(), r["kind"].as_str()), (Some(false), Some("bad-request")), "{r}");
    let r = raw(&socket, b"{\"v\":9,\"op\":\"status\"}\n");
    assert_eq!(r["kind"], "version", "{r}");
    let mut huge = vec![b'x'; 70 * 1024];
    huge.push(b'\n');
    let r = raw(&socket, &huge);
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    let r = raw(&socket, b"{\"v\":1,\"op\":\"ping\"}\n");
    assert_eq!(r["result"]["protocol"], 1, "{r}");

    // A killed daemon leaves its socket; the next replaces it.
    w.kill_daemon();
    assert!(socket.exists(), "left behind by kill -9");
    let (_, stderr, _) = cli(&w, &["status"]);
    assert!(stderr.contains("no daemon is running"), "{stderr}");
    let ready = |w: &World| w.daemon_log_text().matches("hypeman daemon ready").count();
    let before = ready(&w);
    w.start();
    let t0 = std::time::Instant::now();
    while ready(&w) <= before {
        assert!(t0.elapsed() < Duration::from_secs(30), "the daemon never became ready:\n{}", w.daemon_log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = UnixStream::connect(&socket).expect("the new daemon listens");
    s.write_all(b"{\"v\":1,\"op\":\"status\"}\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "{reply}");
    w.declare("stopped");
    w.wait("Stopped");
    w.stop_daemon();
    assert!(!socket.exists(), "removed at a clean exit");
}

/// `hypeman events` streams what happens as it happens: the same lines the
/// instance's `hypeman.log` records, with timestamps; no daemon, no stream.
#[test]
fn events_stream_what_hypeman_log_records() {
    let Some(mut w) = world() else { return };
    let (_, stderr, ok) = cli(&w, &["events"]);
    assert!(!ok && stderr.contains("events needs a running daemon"), "{stderr}");
    w.start();
    w.declare("running");
    w.wait("Running");
    let child = w.hypeman().args(["events", "counter", "--json"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Subscribed once its first line is in; the stream then says every step.
    std::thread::sleep(Duration::from_millis(500));
    w.declare("standby");
    w.wait("Standby");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "interrupted is a clean end");
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(!events.is_empty(), "no events");
    let log = std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap();
    for e in &events {
        assert_eq!(e["instance"], "counter");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(log.contains(message), "{message:?} is not in hypeman.log:\n{log}");
    }
    let said: Vec<&str> = events.iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(said.iter().any(|m| m.contains("snapshot")), "the standby's steps were streamed: {said:?}");
    w.stop_daemon();
}

/// `hypeman restart` boots the guest afresh through the daemon, leaving
/// its declaration alone; one declared stopped is not booted, and says why.
#[test]
fn restart_boots_afresh_and_the_declaration_stays_the_truth() {
    let Some(mut w) = world() else { return };
    let (_, stderr, ok) = cli(&w, &["restart", "counter"]);
    assert!(!ok && stderr.contains("restart needs a running daemon"), "{stderr}");
    w.start();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(3);
    let pid = w.status()["pid"].as_u64().unwrap();
    let declaration = std::fs::read_to_string(w.config.join("instances/counter.toml")).unwrap();
    let (out, stderr, ok) = cli(&w, &["restart", "counter"]);
    assert!(ok, "{stderr}");
    assert!(out.contains("will be shut down") && out.contains("declaration is unchanged"), "{out}");
    let t0 = std::time::Instant::now();
    while w.status()["pid"].as_u64().is_none_or(|p| p == pid) || w.status()["state"] != "Running" {
        assert!(t0.elapsed() < Duration::from_secs(60), "never restarted: {}", w.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(w.guest_dir().join("logs/hypeman.log")).unwrap();
    assert!(log.contains("a restart was asked for (hypeman restart)"), "{log}");
    assert_eq!(std::fs::read_to_string(w.config.join("instances/counter.toml")).unwrap(), declaration, "the file is untouched");
    // Booted afresh: its counter starts again.
    let t0 = std::time::Instant::now();
    while !w.counters().windows(2).any(|p| p[1] < p[0]) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the counter did not start over: {:?}", w.counters());
        std::thread::sleep(Duration::from_millis(50));
    }

    w.declare("stopped");
    w.wait("Stopped");
    let (_, stderr, ok) = cli(&w, &["restart", "counter"]);
    assert!(!ok && stderr.contains("is declared stopped"), "{stderr}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.status()["state"], "Stopped", "not booted against its declaration");
    let (_, stderr, ok) = cli(&w, &["restart", "nosuch"]);
    assert!(!ok && stderr.contains("no instance matches"), "{stderr}");
    w.stop_daemon();
}
