//! The Cloud Hypervisor REST client against the fake server in this
//! process, on a temp unix socket: the wire format, the state rules, the
//! error styles of v46, v49 and v53, slow snapshots, v53's prefault
//! refusal. Every body the client sends is validated against the v53.0
//! OpenAPI document; the fake answers a violation with a 400 and records
//! it, and each test ends by asserting there were none.

mod support;

use fake_cloud_hypervisor::server::FakeServer;
use fake_cloud_hypervisor::vmm::{Options, Version, VmState};
use hypeman::declaration::spec::IoLimit;
use hypeman::hypervisor::cloud_hypervisor::api::{self, MemoryRestoreMode};
use hypeman::hypervisor::cloud_hypervisor::client::{ApiClient, ApiError, Endpoint};
use hypeman::hypervisor::cloud_hypervisor::config;
use hypeman::hypervisor::{DiskConfig, VmConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Bench {
    tmp: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        Bench { tmp: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn server(&self, name: &str, options: Options) -> (FakeServer, ApiClient) {
        let socket = self.path(name);
        let server = FakeServer::start(&socket, options, support::fake_ch::spec()).unwrap();
        (server, ApiClient::new(&socket).unwrap())
    }

    fn file(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, name).unwrap();
        p
    }

    /// A launch configuration whose files exist, so the fake can boot it.
    fn config(&self, hotplug: u64) -> VmConfig {
        let disk = |id: &str, readonly, limit| DiskConfig { id: id.into(), path: self.file(&format!("{id}.img")), readonly, limit };
        VmConfig {
            vcpus: 2,
            memory_bytes: 512 << 20,
            hotplug_memory_bytes: hotplug,
            kernel: self.file("vmlinuz"),
            initrd: Some(self.file("initrd.cpio")),
            cmdline: "console=ttyS0".into(),
            disks: vec![
                disk("rootfs", true, IoLimit::default()),
                disk("overlay", false, IoLimit { bytes_per_sec: Some(10 << 20), ops_per_sec: Some(100) }),
                disk("config", true, IoLimit::default()),
            ],
            net: None,
            devices: vec![],
            serial_log: self.path("app.log"),
            vsock: Some(hypeman::hypervisor::VsockConfig { cid: 3, socket: self.path("vsock.sock") }),
            agent: None,
        }
    }
}

fn v(major: u32) -> Options {
    Options { version: Version { major, minor: 0, patch: 0 }, ..Options::default() }
}

fn assert_clean(server: &FakeServer) {
    assert_eq!(server.violations(), Vec::<String>::new(), "requests that break the OpenAPI spec");
    for x in server.exchanges() {
        let r = &x.request;
        assert!(r.header("transfer-encoding").is_none(), "{} {} was chunked", r.method, r.path);
        if !r.body.is_empty() {
            assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()), "{}", r.path);
        }
        assert_eq!(r.header("host"), Some("localhost"));
    }
}

fn refused(e: &ApiError) -> (u16, Vec<String>) {
    match e {
        ApiError::Refused { status, messages, .. } => (*status, messages.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn wait_memory(client: &ApiClient, want: u64) {
    let t0 = Instant::now();
    loop {
        let got = client.info().await.unwrap().memory_actual_size;
        if got == Some(want) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "memory stuck at {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_vm_lives_through_create_resize_snapshot_restore_and_shutdown() {
    let b = Bench::new();
    let (server, client) = b.server("ch.sock", Options { prefault: Duration::from_millis(300), ..v(53) });
    let cfg = b.config(1 << 30);

    let ping = client.ping().await.unwrap();
    assert_eq!(ping.version, "53.0.0");
    assert_eq!(ping.pid, Some(i64::from(std::process::id())));

    client.create(&config::vm_config(&cfg)).await.unwrap();
    let refusal = client.create(&config::vm_config(&cfg)).await.unwrap_err();
    assert_eq!(refused(&refusal), (500, vec!["Error from API".into(), "The VM could not be created".into(), "VM is already created".to_string()]));
    assert_eq!(client.info().await.unwrap().state, api::VmState::Created);
    client.boot().await.unwrap();
    let info = client.info().await.unwrap();
    assert_eq!(info.state, api::VmState::Running);
    assert_eq!(info.memory_actual_size, Some((512 << 20) + (1 << 30)), "all hotplug memory is plugged at boot");
    assert_eq!(info.config["memory"]["hotplug_method"], "VirtioMem");

    // Shrink to the boot memory. The server reports the new size at once
    // (its config's size + hotplugged_size); the guest unplugs over time,
    // which no reply shows: only the snapshot's size does, below.
    client.resize_memory(512 << 20).await.unwrap();
    let info = client.info().await.unwrap();
    assert_eq!(info.memory_actual_size, Some(512 << 20));
    assert_eq!(info.config["memory"]["hotplugged_size"], serde_json::Value::Null);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let below = client.resize_memory(256 << 20).await.unwrap_err();
    assert_eq!(refused(&below).0, 500);

    // Hot-plug into the booted VM: 200 with a PCI address; then unplug.
    let extra = DiskConfig { id: "vol9".into(), path: b.file("vol9.img"), readonly: true, limit: IoLimit::default() };
    let pci = client.add_disk(&config::disk(&extra)).await.unwrap().expect("a hot-plug returns its PCI address");
    assert_eq!(pci.id, "vol9");
    assert!(client.add_disk(&config::disk(&extra)).await.is_err(), "ids are unique");
    client.remove_device("vol9").await.unwrap();
    assert!(client.remove_device("vol9").await.is_err());

    // Snapshot only when paused.
    let snap = b.path("snap");
    std::fs::create_dir(&snap).unwrap();
    assert!(refused(&client.snapshot(&snap).await.unwrap_err()).1[2].contains("InvalidStateTransition"));
    client.pause().await.unwrap();
    assert_eq!(refused(&client.pause().await.unwrap_err()).0, 500, "pausing a paused VM is a 500, not the spec's 405");
    client.snapshot(&snap).await.unwrap();
    for name in ["config.json", "state.json", "memory-ranges"] {
        assert!(snap.join(name).is_file(), "{name}");
    }
    assert_eq!(std::fs::metadata(snap.join("memory-ranges")).unwrap().len(), 512 << 20);
    assert!(client.snapshot(&snap).await.is_err(), "files are created O_EXCL: the directory must be empty");

    // vmm.shutdown: 200 with Content-Length: 0, then the process is gone.
    client.vmm_shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(server.exited());
    assert_clean(&server);

    // Restore into a fresh VMM, on demand; it comes back paused.
    let (server2, client2) = b.server("ch2.sock", Options { prefault: Duration::from_millis(300), ..v(53) });
    let body = config::restore_config(&snap, Some(MemoryRestoreMode::OnDemand));
    client2.restore(&body).await.unwrap();
    let info = client2.info().await.unwrap();
    assert_eq!((info.state, info.memory_actual_size), (api::VmState::Paused, Some(512 << 20)));
    assert!(client2.restore(&body).await.is_err(), "restore only into an empty VMM");
    client2.resume().await.unwrap();
    client2.resize_memory((512 << 20) + (1 << 30)).await.unwrap();
    wait_memory(&client2, (512 << 20) + (1 << 30)).await;

    // v53 prefaults after resuming an on-demand restore and refuses
    // snapshots meanwhile.
    client2.pause().await.unwrap();
    let snap2 = b.path("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let busy = client2.snapshot(&snap2).await.unwrap_err();
    assert!(busy.is_restoring(), "{busy:?}");
    tokio::time::sleep(Duration::from_millis(350)).await;
    client2.snapshot(&snap2).await.unwrap();

    client2.resume().await.unwrap();
    client2.power_button().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(server2.exited(), "a guest power-off ends the VMM process");
    assert_clean(&server2);
}

#[tokio::test]
async fn a_missing_vm_is_reported_in_the_style_of_each_version() {
    let b = Bench::new();
    let cases = [
        // (version, status, body is a JSON array)
        (46, 500, false),
        (49, 500, true),
        (52, 500, true),
        (53, 404, true),
    ];
    for (major, status, json) in cases {
        let (server, client) = b.server(&format!("v{major}.sock"), v(major));
        let e = client.info().await.unwrap_err();
        assert!(e.is_not_created(), "v{major}: {e:?}");
        let (got, messages) = refused(&e);
        assert_eq!(got, status, "v{major}");
        if json {
            assert_eq!(messages, ["Error from API", "The VM information is not available", "VM is not created"], "v{major}");
            assert_eq!(
                e.to_string(),
                format!("Cloud Hypervisor refused vm.info ({status}): Error from API: The VM information is not available: VM is not created")
            );
        } else {
            // Up to v46: the server's error in its Debug form.
            assert_eq!(messages, ["VmInfo(VmNotCreated)"], "v{major}");
        }
        let e = client.boot().await.unwrap_err();
        assert!(e.is_not_created() && matches!(e, ApiError::Refused { endpoint: Endpoint::VmBoot, .. }), "v{major}: {e:?}");
        assert_clean(&server);
    }
}

#[tokio::test]
async fn old_servers_get_no_restore_mode_and_the_fake_would_refuse_one() {
    let b = Bench::new();
    let (server, client) = b.server("v49.sock", v(49));
    let dir = b.path("nothing");
    std::fs::create_dir(&dir).unwrap();
    let e = client.restore(&config::restore_config(&dir, Some(MemoryRestoreMode::Copy))).await.unwrap_err();
    assert_eq!(refused(&e), (400, vec!["Error from API".into(), "The VM could not be restored".into(), "unknown field `memory_restore_mode`".into()]));
    // What hypeman sends a v49 server: the bare source URL.
    let e = client.restore(&config::restore_config(&dir, None)).await.unwrap_err();
    assert!(refused(&e).1[2].starts_with("Error reading config.json"), "{e}");
    assert_clean(&server);
}

#[tokio::test]
async fn on_demand_restore_without_userfaultfd_is_refused() {
    let b = Bench::new();
    let (server, client) = b.server("uffd.sock", Options { userfaultfd: false, ..v(53) });
    let e = client.restore(&config::restore_config(&b.path("x"), Some(MemoryRestoreMode::OnDemand))).await.unwrap_err();
    assert!(refused(&e).1[2].contains("userfaultfd"), "{e}");
    assert_eq!(server.with_vmm(|v| v.state()), None, "a refused restore leaves the VMM empty");
    assert_clean(&server);
}

#[tokio::test]
async fn a_slow_snapshot_holds_up_every_other_request() {
    let b = Bench::new();
    let (server, client) = b.server("slow.sock", Options { snapshot_delay: Duration::from_millis(400), ..v(53) });
    client.create(&config::vm_config(&b.config(0))).await.unwrap();
    client.boot().await.unwrap();
    client.pause().await.unwrap();
    let dir = b.path("snap");
    std::fs::create_dir(&dir).unwrap();
    let t0 = Instant::now();
    let snapshot = {
        let client = client.clone();
        let dir = dir.clone();
        tokio::spawn(async move { client.snapshot(&dir).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // One HTTP thread: the info queues behind the snapshot.
    let info = client.info().await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(400), "vm.info answered during the snapshot");
    snapshot.await.unwrap().unwrap();
    assert_eq!(info.state, api::VmState::Paused);
    let resize = client.resize_memory(1 << 30).await.unwrap_err();
    assert!(refused(&resize).1[2].contains("no hotplug memory"), "{resize}");
    assert_clean(&server);
}

/// Raw bytes on the wire: a 204 has no length, `vmm.shutdown`'s 200 says
/// `Content-Length: 0`; the client reads both.
#[tokio::test]
async fn replies_are_framed_as_micro_http_frames_them() {
    let b = Bench::new();
    let (server, client) = b.server("raw.sock", v(53));
    let raw = |request: &str| {
        let mut s = std::os::unix::net::UnixStream::connect(b.path("raw.sock")).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let body = serde_json::to_string(&config::vm_config(&b.config(0))).unwrap();
    let created = raw(&format!("PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    assert_eq!(created, "HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n");
    let chunked = raw("PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(chunked.starts_with("HTTP/1.1 400"), "{chunked}");
    let typo = r#"{"desired_rams": 1}"#;
    let violated = raw(&format!("PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{typo}", typo.len()));
    assert!(violated.starts_with("HTTP/1.1 400") && violated.contains("not a property the API defines"), "{violated}");
    assert_eq!(server.violations().len(), 2, "the chunked request and the misspelt field are both recorded");
    assert!(raw("GET /api/v1/vm.boot HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(raw("GET /api/v1/vm.nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    client.boot().await.unwrap();
    let bye = raw("PUT /api/v1/vmm.shutdown HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(bye.starts_with("HTTP/1.1 200 OK\r\n") && bye.ends_with("Content-Length: 0\r\n\r\n"), "{bye}");
    assert_eq!(server.with_vmm(|v| v.state()), Some(VmState::Running));
}

/// micro-http gets what `ch-remote` gives it: a connection per request,
/// closed by the client once the reply is read, and bodies sent with their
/// `Content-Length`. The fake serves one connection at a time, so a
/// connection left open would hold up the next one for its idle timeout.
#[tokio::test]
async fn each_request_comes_on_a_connection_of_its_own_closed_with_its_reply() {
    let b = Bench::new();
    let (server, client) = b.server("conn.sock", v(53));
    let t0 = Instant::now();
    client.ping().await.unwrap();
    client.create(&config::vm_config(&b.config(0))).await.unwrap();
    client.boot().await.unwrap();
    assert_eq!(client.info().await.unwrap().state, api::VmState::Running);
    assert_eq!(refused(&client.resize_memory(1 << 30).await.unwrap_err()).0, 500);
    client.pause().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "a request waited on an earlier connection: {:?}", t0.elapsed());

    // Without yielding to the runtime, so nothing could close the last
    // connection late: a raw request is served at once, not after the
    // fake's idle timeout.
    let mut raw = std::os::unix::net::UnixStream::connect(b.path("conn.sock")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    raw.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    raw.read_to_string(&mut reply).expect("the client's last connection was still open");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");

    let exchanges = server.exchanges();
    let paths: Vec<&str> = exchanges.iter().map(|x| x.request.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/api/v1/vmm.ping", "/api/v1/vm.create", "/api/v1/vm.boot", "/api/v1/vm.info", "/api/v1/vm.resize", "/api/v1/vm.pause", "/api/v1/vm.info"]
    );
    let connections: Vec<u64> = exchanges.iter().map(|x| x.connection).collect();
    assert!(connections.windows(2).all(|w| w[0] < w[1]), "a connection carried two requests: {connections:?}");
    for x in &exchanges[..exchanges.len() - 1] {
        assert_eq!(x.request.header("connection"), Some("close"), "{}", x.request.path);
    }
    for path in ["/api/v1/vm.create", "/api/v1/vm.resize"] {
        let r = &exchanges.iter().find(|x| x.request.path == path).unwrap().request;
        assert!(!r.body.is_empty(), "{path}");
        assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()), "{path}");
        assert_eq!(r.header("transfer-encoding"), None, "{path}");
    }
    assert_clean(&server);
}

/// No server at all, or a socket file nobody listens on (a VMM that
/// died): both are "not listening", with the OS error kept, and neither
/// is a refusal.
#[tokio::test]
async fn a_socket_nobody_serves_is_not_a_refusal() {
    let b = Bench::new();
    let missing = ApiClient::new(&b.path("none.sock")).unwrap().ping().await.unwrap_err();
    assert!(matches!(&missing, ApiError::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{missing:?}");
    assert!(missing.is_not_listening() && !missing.is_refusal());
    let stale = b.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let e = ApiClient::new(&stale).unwrap().info().await.unwrap_err();
    assert!(matches!(&e, ApiError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused), "{e:?}");
    assert!(e.is_not_listening() && !e.is_refusal());
    assert_eq!(e.to_string(), format!("cannot connect to {}", stale.display()));
}

#[test]
fn every_body_the_client_builds_for_a_representative_declaration_meets_the_spec() {
    let spec = support::fake_ch::spec();
    let b = Bench::new();
    let mut cfg = b.config(3 << 30);
    cfg.net = Some(hypeman::hypervisor::NetConfig {
        tap: "hm-x".into(),
        mac: "02:00:00:00:00:01".into(),
        limit_down: IoLimit { bytes_per_sec: Some(1 << 20), ops_per_sec: Some(10) },
        limit_up: IoLimit::default(),
    });
    cfg.devices = vec!["0000:01:00.0".into()];
    let check = |path: &str, body: serde_json::Value| {
        spec.validate_request(path, "PUT", body.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{path}: {e:#?}"));
    };
    check("/vm.create", serde_json::to_value(config::vm_config(&cfg)).unwrap());
    check("/vm.add-disk", serde_json::to_value(config::disk(&cfg.disks[1])).unwrap());
    check("/vm.resize", serde_json::to_value(api::VmResize { desired_ram: Some(1 << 30) }).unwrap());
    check("/vm.remove-device", serde_json::to_value(api::VmRemoveDevice { id: "x".into() }).unwrap());
    check("/vm.snapshot", serde_json::to_value(api::VmSnapshotConfig { destination_url: "file:///s".into() }).unwrap());
    for mode in [None, Some(MemoryRestoreMode::Copy), Some(MemoryRestoreMode::OnDemand)] {
        check("/vm.restore", serde_json::to_value(config::restore_config(Path::new("/s"), mode)).unwrap());
    }
}
