//! Pulls images through a real local registry (Debian's `docker-registry`
//! on 127.0.0.1), pushed with `skopeo` from layouts built with `umoci`.
//!
//! Skips, saying why, when any of the tools is missing. Prints the
//! measured pull+convert and cache-hit times.

mod support;

use support::run_ok as run;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypeman::images::{ImageStore, ImageStoreOptions};
use sha2::{Digest, Sha256};

const TOOLS: &[&str] = &[
    "/usr/bin/docker-registry",
    "/usr/bin/skopeo",
    "/usr/bin/umoci",
    "/bin/busybox",
    "/usr/bin/mkfs.erofs",
    "/usr/bin/fsck.erofs",
];

fn missing_tool() -> Option<&'static str> {
    TOOLS.iter().copied().find(|t| !Path::new(t).exists())
}

struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, port, log }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob downloads the registry has served so far (from its access log).
    fn blob_gets(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/"))
            .count()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn umoci(args: &[&str]) {
    run(Command::new("umoci").args(args));
}

/// Builds `layout:tag`, one `umoci insert` layer per `(source, target)`,
/// or a whiteout layer when the source is `None`.
fn build_image(layout: &Path, tag: &str, layers: &[(Option<&Path>, &str)], entrypoint: &str) {
    let image = format!("{}:{tag}", layout.display());
    if !layout.exists() {
        umoci(&["init", "--layout", &layout.display().to_string()]);
    }
    umoci(&["new", "--image", &image]);
    for (source, target) in layers {
        match source {
            Some(src) => umoci(&[
                "insert",
                "--image",
                &image,
                &src.display().to_string(),
                target,
            ]),
            None => umoci(&["insert", "--image", &image, "--whiteout", target]),
        }
    }
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        entrypoint,
        "--config.env",
        "HELLO=world",
        "--config.workingdir",
        "/",
    ]);
}

/// Pushes and returns the digest of the manifest the registry now serves.
fn push(layout: &Path, tag: &str, registry: &Registry, name: &str) -> String {
    let dest = format!("docker://{}/{name}", registry.host());
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(&dest));
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(raw.status.success());
    format!("sha256:{:x}", Sha256::digest(&raw.stdout))
}

fn extract(image: &Path, into: &Path) {
    run(Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(image));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_real_registry_then_serve_from_cache() {
    if let Some(tool) = missing_tool() {
        println!("skipping registry test: {tool} is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut registry = Registry::start(tmp.path());
    let layout = tmp.path().join("layout");

    // busybox: one layer with the static binary and a symlink.
    let bb = tmp.path().join("bb");
    fs::create_dir_all(bb.join("bin")).unwrap();
    fs::copy("/bin/busybox", bb.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bb.join("bin/sh")).unwrap();
    build_image(
        &layout,
        "busybox",
        &[(Some(&bb.join("bin")), "/bin")],
        "/bin/busybox",
    );

    // multi: a file deleted by a whiteout in a later layer, and a hard link.
    let l1 = tmp.path().join("l1");
    fs::create_dir_all(&l1).unwrap();
    fs::write(l1.join("keep"), "kept\n").unwrap();
    fs::write(l1.join("doomed"), "gone\n").unwrap();
    let l3 = tmp.path().join("l3");
    fs::create_dir_all(&l3).unwrap();
    fs::write(l3.join("original"), "linked\n").unwrap();
    fs::hard_link(l3.join("original"), l3.join("link")).unwrap();
    build_image(
        &layout,
        "multi",
        &[
            (Some(&l1), "/data"),
            (None, "/data/doomed"),
            (Some(&l3), "/links"),
        ],
        "/bin/true",
    );

    // many: 20 000 small files.
    let many = tmp.path().join("many");
    for d in 0..20 {
        let sub = many.join(format!("d{d:02}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..1000 {
            fs::write(sub.join(format!("f{f:04}")), format!("{d}/{f}\n")).unwrap();
        }
    }
    build_image(&layout, "many", &[(Some(&many), "/many")], "/bin/true");

    let busybox_digest = push(&layout, "busybox", &registry, "test/busybox:1");
    let multi_digest = push(&layout, "multi", &registry, "test/multi:1");
    let many_digest = push(&layout, "many", &registry, "test/many:1");

    let options = ImageStoreOptions {
        insecure_registries: vec![registry.host()],
        // No credentials file: anonymous access.
        docker_config: Some(tmp.path().join("no-docker-config.json")),
        ..ImageStoreOptions::default()
    };
    let store = ImageStore::open(&tmp.path().join("data"), options).unwrap();
    let reference = format!("{}/test/busybox:1", registry.host());

    let started = Instant::now();
    let info = store.ensure(&reference).await.unwrap();
    let first = started.elapsed();
    assert_eq!(info.digest, busybox_digest);
    assert!(info.rootfs.ends_with("rootfs.erofs") && info.rootfs.exists());
    assert_eq!(info.config.entrypoint, ["/bin/busybox"]);
    assert!(info.config.env.contains(&"HELLO=world".to_string()));
    let x = tmp.path().join("x-busybox");
    extract(&info.rootfs, &x);
    assert_eq!(
        fs::read(x.join("bin/busybox")).unwrap(),
        fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        fs::read_link(x.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );

    // Second ensure: a manifest request at most, no blob downloads, no conversion.
    std::thread::sleep(Duration::from_millis(200));
    let gets = registry.blob_gets();
    assert!(
        gets >= 2,
        "the first pull downloaded blobs ({gets} seen in the registry log)"
    );
    let started = Instant::now();
    let again = store.ensure(&reference).await.unwrap();
    let hit = started.elapsed();
    assert_eq!(again, info);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(registry.blob_gets(), gets, "cache hit downloaded blobs");
    assert_eq!(store.conversions(), 1);

    let multi = store
        .ensure(&format!("{}/test/multi:1", registry.host()))
        .await
        .unwrap();
    assert_eq!(multi.digest, multi_digest);
    let xm = tmp.path().join("x-multi");
    extract(&multi.rootfs, &xm);
    assert_eq!(fs::read_to_string(xm.join("data/keep")).unwrap(), "kept\n");
    assert!(!xm.join("data/doomed").exists(), "whiteout applied");
    assert_eq!(
        fs::read_to_string(xm.join("links/link")).unwrap(),
        "linked\n"
    );
    assert_eq!(
        fs::read_to_string(xm.join("links/original")).unwrap(),
        "linked\n"
    );

    let started = Instant::now();
    let many_info = store
        .ensure(&format!("{}/test/many:1", registry.host()))
        .await
        .unwrap();
    let many_time = started.elapsed();
    assert_eq!(many_info.digest, many_digest);
    let xn = tmp.path().join("x-many");
    extract(&many_info.rootfs, &xn);
    assert_eq!(
        fs::read_to_string(xn.join("many/d19/f0999")).unwrap(),
        "19/999\n"
    );

    // Registry gone: the last resolved digest serves the tag.
    registry.stop();
    let offline = store.ensure(&reference).await.unwrap();
    assert_eq!(offline.digest, info.digest);

    // The same image from the local layout, offline: same manifest, same cache entry.
    let local = store
        .ensure(&format!("oci:{}:busybox", layout.display()))
        .await
        .unwrap();
    assert_eq!(local.digest, info.digest);
    assert_eq!(store.conversions(), 3);

    println!(
        "registry pull+convert: busybox {first:.2?} ({} KiB disk, {} KiB unpacked); \
         20k files {many_time:.2?} ({} KiB disk, {} KiB unpacked); cache hit {hit:.2?}",
        info.size_bytes / 1024,
        info.unpacked_bytes / 1024,
        many_info.size_bytes / 1024,
        many_info.unpacked_bytes / 1024,
    );
}
