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
use hypeman::hypervisor::cloud_hypervisor::client::{ApiClient, ApiError, Endpoint, Refusal, RESTORE_IN_PROGRESS};
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
            user: None,
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

    // Restore into a fresh VMM, on demand; it comes back paused. v53
    // prefaults from then on and refuses snapshots meanwhile.
    let (server2, client2) = b.server("ch2.sock", Options { prefault: Duration::from_secs(3600), ..v(53) });
    let body = config::restore_config(&snap, Some(MemoryRestoreMode::OnDemand));
    client2.restore(&body, &[]).await.unwrap();
    let info = client2.info().await.unwrap();
    assert_eq!((info.state, info.memory_actual_size), (api::VmState::Paused, Some(512 << 20)));
    assert!(client2.restore(&body, &[]).await.is_err(), "restore only into an empty VMM");
    let snap2 = b.path("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let busy = client2.snapshot(&snap2).await.unwrap_err();
    assert_eq!(busy.refusal(), Some(Refusal::RestoreInProgress), "{busy:?}");
    assert_eq!(std::fs::read_dir(&snap2).unwrap().count(), 0, "refused before any file is written");
    server2.with_vmm(|v| v.end_prefault());
    assert!(!server2.with_vmm(|v| v.prefaulting()));
    client2.resume().await.unwrap();
    client2.resize_memory((512 << 20) + (1 << 30)).await.unwrap();
    wait_memory(&client2, (512 << 20) + (1 << 30)).await;
    client2.pause().await.unwrap();
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
            assert_eq!(messages, ["Error from API", "The VM info is not available", "VM is not created"], "v{major}");
            assert_eq!(
                e.to_string(),
                format!("Cloud Hypervisor refused vm.info ({status}): Error from API: The VM info is not available: VM is not created")
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
    let e = client.restore(&config::restore_config(&dir, Some(MemoryRestoreMode::Copy)), &[]).await.unwrap_err();
    assert_eq!(refused(&e), (400, vec!["Error from API".into(), "The VM could not be restored".into(), "unknown field `memory_restore_mode`".into()]));
    // What hypeman sends a v49 server: the bare source URL.
    let e = client.restore(&config::restore_config(&dir, None), &[]).await.unwrap_err();
    assert!(refused(&e).1[2].starts_with("Error reading config.json"), "{e}");
    assert_clean(&server);
}

#[tokio::test]
async fn on_demand_restore_without_userfaultfd_is_refused() {
    let b = Bench::new();
    let (server, client) = b.server("uffd.sock", Options { userfaultfd: false, ..v(53) });
    std::fs::create_dir(b.path("x")).unwrap();
    let e = client.restore(&config::restore_config(&b.path("x"), Some(MemoryRestoreMode::OnDemand)), &[]).await.unwrap_err();
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

/// Raw requests to a fake on `socket`: the status and the exact body, so a
/// test compares bytes, not what the client makes of them.
fn raw(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(b) = body {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    s.write_all(request.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers in {reply:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
    if status == 204 {
        assert!(!head.contains("Content-Length"), "a 204 has no length: {head:?}");
    } else {
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head:?}");
    }
    (status, body.to_string())
}

/// A raw request (method, endpoint, body) to one fake: status and body.
type Put = Box<dyn Fn(&str, &str, Option<&str>) -> (u16, String)>;

/// The body of a v53 refusal: `["Error from API", headline, causes…]`.
fn chain(headline: &str, causes: &[&str]) -> String {
    let mut items = vec!["Error from API", headline];
    items.extend_from_slice(causes);
    serde_json::to_string(&items).unwrap()
}

impl Bench {
    /// A server of `options` on `name` and the raw requests to it.
    fn raw_server(&self, name: &str, options: Options) -> (FakeServer, Put) {
        let socket = self.path(name);
        let server = FakeServer::start(&socket, options, support::fake_ch::spec()).unwrap();
        (server, Box::new(move |method: &str, endpoint: &str, body: Option<&str>| raw(&socket, method, endpoint, body)))
    }

    fn create_body(&self, hotplug: u64) -> String {
        serde_json::to_string(&config::vm_config(&self.config(hotplug))).unwrap()
    }

    /// A snapshot of a booted VM, taken by a v53 server that then exits.
    async fn snapshot(&self, name: &str) -> PathBuf {
        let (server, client) = self.server(&format!("{name}.sock"), v(53));
        client.create(&config::vm_config(&self.config(0))).await.unwrap();
        client.boot().await.unwrap();
        client.pause().await.unwrap();
        let dir = self.path(name);
        std::fs::create_dir(&dir).unwrap();
        client.snapshot(&dir).await.unwrap();
        client.vmm_shutdown().await.unwrap();
        assert_clean(&server);
        dir
    }
}

const NOT_RUNNING: &str = "VM is not running";
const ALREADY_CREATED: &str = "VM is already created";
const ENOENT: &str = "No such file or directory (os error 2)";

// One test per case checked against the real v53.0 binary
// (reference/hypervisors.md, "Checked against the real cloud-hypervisor
// v53.0 binary"): status and body byte for byte.

#[test]
fn v53_before_create() {
    let b = Bench::new();
    let (server, put) = b.raw_server("before.sock", v(53));
    assert_eq!(put("GET", "vm.info", None), (404, chain("The VM info is not available", &["VM is not created"])));
    assert_eq!(put("PUT", "vm.power-button", None), (500, chain("Error triggering power button", &[NOT_RUNNING])));
    assert_eq!(put("PUT", "vm.resume", None), (500, chain("The VM could not resume", &[NOT_RUNNING])));
    assert_eq!(put("PUT", "vm.shutdown", None), (500, chain("The VM could not shutdown", &[NOT_RUNNING])));
    assert_eq!(put("PUT", "vm.delete", None), (204, String::new()));
    assert!(server.violations().is_empty());
}

#[test]
fn v53_a_body_on_an_endpoint_that_takes_none_is_a_bare_bad_request() {
    let b = Bench::new();
    let (server, put) = b.raw_server("body.sock", v(53));
    assert_eq!(put("PUT", "vm.create", Some(&b.create_body(0))).0, 204);
    assert_eq!(put("PUT", "vm.boot", Some("{}")), (400, r#"["Bad Request"]"#.to_string()));
    assert_eq!(server.with_vmm(|v| v.state()), Some(VmState::Created), "the boot was not made");
    assert_eq!(put("PUT", "vm.boot", None).0, 204);
    assert_eq!(put("PUT", "vm.pause", Some("{}")), (400, r#"["Bad Request"]"#.to_string()));
    assert_eq!(server.with_vmm(|v| v.state()), Some(VmState::Running));
    assert_eq!(server.violations().len(), 2, "still the client's mistake: {:?}", server.violations());
}

#[test]
fn v53_create_twice_boot_twice_and_a_missing_kernel() {
    let b = Bench::new();
    let (_server, put) = b.raw_server("twice.sock", v(53));
    let body = b.create_body(0);
    assert_eq!(put("PUT", "vm.create", Some(&body)), (204, String::new()));
    assert_eq!(put("PUT", "vm.create", Some(&body)), (500, chain("The VM could not be created", &[ALREADY_CREATED])));
    assert_eq!(put("PUT", "vm.boot", None), (204, String::new()));
    assert_eq!(put("PUT", "vm.boot", None), (500, chain("The VM could not boot", &[ALREADY_CREATED])));

    let (_server, put) = b.raw_server("nokernel.sock", v(53));
    let mut cfg = b.config(0);
    cfg.kernel = b.path("no-such-vmlinuz");
    assert_eq!(put("PUT", "vm.create", Some(&serde_json::to_string(&config::vm_config(&cfg)).unwrap())).0, 204);
    assert_eq!(put("PUT", "vm.boot", None), (500, chain("The VM could not boot", &["Cannot open kernel file", ENOENT])));
}

#[test]
fn v53_pause_twice() {
    let b = Bench::new();
    let (_server, put) = b.raw_server("pause.sock", v(53));
    assert_eq!(put("PUT", "vm.create", Some(&b.create_body(0))).0, 204);
    assert_eq!(put("PUT", "vm.pause", None), (500, chain("The VM could not be paused", &[NOT_RUNNING])), "created, not booted");
    assert_eq!(put("PUT", "vm.boot", None).0, 204);
    assert_eq!(put("PUT", "vm.pause", None), (204, String::new()));
    assert_eq!(
        put("PUT", "vm.pause", None),
        (
            500,
            chain(
                "The VM could not be paused",
                &["Cannot pause VM", "Failed to pause migratable component", "Invalid transition: InvalidStateTransition(Paused, Paused)"]
            )
        )
    );
}

#[test]
fn v53_snapshot_into_a_used_or_a_missing_directory() {
    use std::os::unix::fs::PermissionsExt;
    let b = Bench::new();
    let (_server, put) = b.raw_server("snap.sock", v(53));
    assert_eq!(put("PUT", "vm.create", Some(&b.create_body(0))).0, 204);
    assert_eq!(put("PUT", "vm.boot", None).0, 204);
    assert_eq!(put("PUT", "vm.pause", None).0, 204);
    let dir = b.path("snap");
    std::fs::create_dir(&dir).unwrap();
    let to = |d: &Path| serde_json::json!({ "destination_url": format!("file://{}", d.display()) }).to_string();
    assert_eq!(put("PUT", "vm.snapshot", Some(&to(&dir))), (204, String::new()));
    for name in ["config.json", "state.json", "memory-ranges"] {
        let mode = std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    assert_eq!(
        put("PUT", "vm.snapshot", Some(&to(&dir))),
        (500, chain("The VM could not be snapshotted", &["Error creating VM config snapshot file", "File exists (os error 17)"]))
    );
    let missing = b.path("nonexistent/dir");
    assert_eq!(
        put("PUT", "vm.snapshot", Some(&to(&missing))),
        (500, chain("The VM could not be snapshotted", &[&format!("Destination is not a directory: \"{}\"", missing.display())]))
    );
}

#[tokio::test]
async fn v53_snapshot_and_migration_while_an_on_demand_restore_prefaults() {
    let b = Bench::new();
    let snap = b.snapshot("snap").await;
    let restore = |mode| serde_json::to_string(&config::restore_config(&snap, Some(mode))).unwrap();
    let (server, put) = b.raw_server("ondemand.sock", Options { prefault: Duration::from_secs(3600), ..v(53) });
    assert_eq!(put("PUT", "vm.restore", Some(&restore(MemoryRestoreMode::OnDemand))), (204, String::new()));
    let dir = b.path("again");
    std::fs::create_dir(&dir).unwrap();
    let to = serde_json::json!({ "destination_url": format!("file://{}", dir.display()) }).to_string();
    let refused = chain("The VM could not be snapshotted", &[RESTORE_IN_PROGRESS]);
    assert_eq!(refused, r#"["Error from API","The VM could not be snapshotted","VM on-demand memory restore is still in progress"]"#);
    assert_eq!(put("PUT", "vm.snapshot", Some(&to)), (500, refused.clone()), "right after the restore, paused");
    assert_eq!(put("PUT", "vm.resume", None).0, 204);
    assert_eq!(put("PUT", "vm.pause", None).0, 204);
    assert_eq!(put("PUT", "vm.snapshot", Some(&to)), (500, refused), "resumed and paused again, still prefaulting");
    let migrate = serde_json::json!({ "destination_url": "unix:/tmp/nowhere.sock" }).to_string();
    assert_eq!(put("PUT", "vm.send-migration", Some(&migrate)), (500, chain("Error starting migration sender", &[RESTORE_IN_PROGRESS])));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing written");
    server.with_vmm(|v| v.end_prefault());
    assert_eq!(put("PUT", "vm.snapshot", Some(&to)), (204, String::new()));
    assert!(server.violations().is_empty(), "{:?}", server.violations());

    // A copy restore, or an on-demand one on v52, has no such window.
    for (name, mode, options) in [
        ("copy.sock", MemoryRestoreMode::Copy, Options { prefault: Duration::from_secs(3600), ..v(53) }),
        ("v52.sock", MemoryRestoreMode::OnDemand, Options { prefault: Duration::from_secs(3600), ..v(52) }),
    ] {
        let (_server, put) = b.raw_server(name, options);
        assert_eq!(put("PUT", "vm.restore", Some(&restore(mode))).0, 204, "{name}");
        let dir = b.path(&format!("{name}.snap"));
        std::fs::create_dir(&dir).unwrap();
        let to = serde_json::json!({ "destination_url": format!("file://{}", dir.display()) }).to_string();
        assert_eq!(put("PUT", "vm.snapshot", Some(&to)), (204, String::new()), "{name}");
    }
}

#[tokio::test]
async fn v53_restore_into_a_used_vmm_or_from_a_missing_directory() {
    let b = Bench::new();
    let snap = b.snapshot("snap").await;
    let (_server, put) = b.raw_server("restore.sock", v(53));
    let from = |d: &Path| serde_json::to_string(&config::restore_config(d, Some(MemoryRestoreMode::OnDemand))).unwrap();
    let missing = b.path("nonexistent");
    assert_eq!(
        put("PUT", "vm.restore", Some(&from(&missing))),
        (
            500,
            chain(
                "The VM could not be restored",
                &[
                    "Cannot restore VM",
                    "Failed to send migratable component snapshot",
                    &format!("Destination is not a directory: \"{}\"", missing.display())
                ]
            )
        )
    );
    assert_eq!(put("PUT", "vm.restore", Some(&from(&snap))), (204, String::new()));
    assert_eq!(put("PUT", "vm.restore", Some(&from(&snap))), (500, chain("The VM could not be restored", &[ALREADY_CREATED])));
    let (_server, put) = b.raw_server("created.sock", v(53));
    assert_eq!(put("PUT", "vm.create", Some(&b.create_body(0))).0, 204);
    assert_eq!(put("PUT", "vm.restore", Some(&from(&snap))), (500, chain("The VM could not be restored", &[ALREADY_CREATED])), "a config is a VM");
}

#[test]
fn v53_resize_to_the_size_it_has_is_a_long_multi_line_refusal() {
    let b = Bench::new();
    let (_server, put) = b.raw_server("resize.sock", v(53));
    assert_eq!(put("PUT", "vm.create", Some(&b.create_body(1 << 30))).0, 204);
    assert_eq!(put("PUT", "vm.boot", None).0, 204);
    let resize = |bytes: u64| serde_json::json!({ "desired_ram": bytes }).to_string();
    let full = (512 << 20) + (1 << 30);
    let identical = |hotplugged: &str| {
        let (status, body) = put("PUT", "vm.resize", Some(&resize(if hotplugged == "0x0" { 512 << 20 } else { full })));
        assert_eq!(status, 500);
        let messages: Vec<String> = serde_json::from_str(&body).unwrap();
        assert_eq!(messages[..2], ["Error from API", "The VM could not be resized"]);
        let root = messages.last().unwrap();
        let first = format!("ResizeError(new size {hotplugged} and requested_size are identical");
        assert!(root.starts_with(&first), "{root}");
        assert!(root.contains("\nStack backtrace:\n") && root.lines().count() > 5, "long and multi-line: {root}");
        // What the client makes of it: the chain, lines and all.
        assert_eq!(hypeman::hypervisor::cloud_hypervisor::client::error_messages(body.as_bytes()), messages);
        assert_eq!(Refusal::of(status, &messages), Refusal::Other);
    };
    identical("0x40000000");
    assert_eq!(put("PUT", "vm.resize", Some(&resize(512 << 20))), (204, String::new()), "shrinking virtio-mem");
    identical("0x0");
    assert_eq!(put("PUT", "vm.resize", Some(&resize(full))), (204, String::new()), "growing virtio-mem");
}

#[test]
fn v53_add_disk_of_a_missing_path() {
    let b = Bench::new();
    let (_server, put) = b.raw_server("disk.sock", v(53));
    assert_eq!(put("PUT", "vm.create", Some(&b.create_body(0))).0, 204);
    assert_eq!(put("PUT", "vm.boot", None).0, 204);
    let disk = DiskConfig { id: "vol1".into(), path: "/nonexistent.raw".into(), readonly: false, limit: IoLimit::default() };
    assert_eq!(
        put("PUT", "vm.add-disk", Some(&serde_json::to_string(&config::disk(&disk)).unwrap())),
        (
            500,
            chain(
                "The disk could not be added to the VM",
                &["Cannot open disk path", "I/O error (path=/nonexistent.raw op=open)", ENOENT]
            )
        )
    );
}

#[test]
fn v53_a_free_page_reporting_balloon_is_accepted() {
    let b = Bench::new();
    let (server, put) = b.raw_server("balloon.sock", v(53));
    let mut body = serde_json::to_value(config::vm_config(&b.config(0))).unwrap();
    body["balloon"] = serde_json::json!({ "size": 0, "free_page_reporting": true });
    assert_eq!(put("PUT", "vm.create", Some(&body.to_string())), (204, String::new()));
    assert!(server.violations().is_empty(), "{:?}", server.violations());
}

#[test]
fn v53_vmm_shutdown_is_a_200_with_an_empty_body_and_the_end() {
    let b = Bench::new();
    let (server, put) = b.raw_server("bye.sock", v(53));
    assert_eq!(put("PUT", "vmm.shutdown", None), (200, String::new()));
    let t0 = Instant::now();
    while !server.exited() {
        assert!(t0.elapsed() < Duration::from_secs(5), "the VMM did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A standby right after an on-demand restore: the snapshot is asked again
/// until the prefault ends, then taken.
#[tokio::test]
async fn a_snapshot_right_after_an_on_demand_restore_waits_for_the_prefault() {
    let b = Bench::new();
    let snap = b.snapshot("snap").await;
    let (server, client) = b.server("wait.sock", Options { prefault: Duration::from_millis(500), ..v(53) });
    client.restore(&config::restore_config(&snap, Some(MemoryRestoreMode::OnDemand)), &[]).await.unwrap();
    let t0 = Instant::now();
    let dir = b.path("again");
    std::fs::create_dir(&dir).unwrap();
    client.snapshot_after_prefault(&dir, Duration::from_secs(30)).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(400), "taken during the prefault: {:?}", t0.elapsed());
    assert!(dir.join("memory-ranges").is_file());
    let snapshots: Vec<u16> = server.exchanges().iter().filter(|x| x.request.path == "/api/v1/vm.snapshot").map(|x| x.status).collect();
    assert!(snapshots.len() >= 2 && snapshots[..snapshots.len() - 1].iter().all(|&s| s == 500), "{snapshots:?}");
    assert_eq!(snapshots.last(), Some(&204));
    assert_clean(&server);
}

/// A prefault that does not end within the bound: a clear error, nothing
/// written, the VM still paused.
#[tokio::test]
async fn a_prefault_that_never_ends_fails_the_snapshot_clearly() {
    let b = Bench::new();
    let snap = b.snapshot("snap").await;
    let (server, client) = b.server("never.sock", Options { prefault: Duration::from_secs(3600), ..v(53) });
    client.restore(&config::restore_config(&snap, Some(MemoryRestoreMode::OnDemand)), &[]).await.unwrap();
    let dir = b.path("again");
    std::fs::create_dir(&dir).unwrap();
    let t0 = Instant::now();
    let e = client.snapshot_after_prefault(&dir, Duration::from_millis(300)).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "bounded: {:?}", t0.elapsed());
    assert!(matches!(e, ApiError::StillRestoring { endpoint: Endpoint::VmSnapshot, .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "vm.snapshot was refused for 300ms because Cloud Hypervisor was still prefaulting the memory of an on-demand restore (\"VM on-demand memory restore is still in progress\"); gave up"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(server.with_vmm(|v| v.state()), Some(VmState::Paused));
    assert_clean(&server);
}
