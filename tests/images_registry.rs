//! Pulls images through a real local registry (Debian's `docker-registry`
//! on 127.0.0.1), pushed with `skopeo` from layouts built with `umoci`.
//!
//! Skips, saying why, when any of the tools is missing. Prints the
//! measured pull+convert and cache-hit times.
//!
//! `bench_pull_convert` (ignored; a benchmark) prints a markdown table of
//! pull+convert, cache-hit and disk figures for a small image and a
//! 10 000-file one, as erofs and as ext4:
//! `cargo test --release --test images_registry bench_pull_convert -- --ignored --nocapture`
//! (`HYPEMAN_BENCH_DIR` picks the filesystem it works in; default `$TMPDIR`).

mod support;

use support::registry::{build_image, many_files_tree, missing_tool, push, Registry};
use support::run_ok as run;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hypeman::images::{ImageInfo, ImageStore, ImageStoreOptions, Progress, PullEvent, RootfsFormat};

fn extract(image: &Path, into: &Path) {
    run(Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(image));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_real_registry_then_serve_from_cache() {
    if !support::gate::tools(support::registry::TOOLS) {
        return;
    }
    let tmp = support::tempdir();
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
    many_files_tree(&many, 20, 1000);
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

    // A truncated root disk (guests died of SIGBUS on one) is pulled and
    // converted again rather than handed out; an unreadable image.json
    // costs only its own image, and pulling it repairs it.
    let len = fs::metadata(&info.rootfs).unwrap().len();
    fs::OpenOptions::new().write(true).open(&info.rootfs).unwrap().set_len(len / 2).unwrap();
    let gets = registry.blob_gets();
    let repaired = store.ensure(&reference).await.unwrap();
    assert_eq!((repaired.digest.as_str(), store.conversions()), (info.digest.as_str(), 4));
    assert_eq!(fs::metadata(&repaired.rootfs).unwrap().len(), len);
    std::thread::sleep(Duration::from_millis(200));
    assert!(registry.blob_gets() > gets, "the damaged image was pulled again");
    fs::write(multi.rootfs.with_file_name("image.json"), "{").unwrap();
    let listing = store.list().unwrap();
    assert_eq!(listing.images.len(), 2);
    assert_eq!(listing.damaged.len(), 1);
    assert_eq!(listing.damaged[0].digest, multi.digest);
    let multi_again = store.ensure(&format!("{}/test/multi:1", registry.host())).await.unwrap();
    assert_eq!(multi_again.digest, multi.digest);
    assert_eq!(store.conversions(), 5);
    assert!(store.list().unwrap().damaged.is_empty());

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
    assert_eq!(store.conversions(), 5);

    // Offline with a damaged disk: refused, not booted into; the layout,
    // which has the blobs, repairs it.
    fs::OpenOptions::new().write(true).open(&info.rootfs).unwrap().set_len(len / 2).unwrap();
    assert!(store.ensure(&reference).await.is_err());
    store.ensure(&format!("oci:{}:busybox", layout.display())).await.unwrap();
    assert_eq!(fs::metadata(&info.rootfs).unwrap().len(), len);
    assert_eq!(store.conversions(), 6);

    println!(
        "registry pull+convert: busybox {first:.2?} ({} KiB disk, {} KiB unpacked); \
         20k files {many_time:.2?} ({} KiB disk, {} KiB unpacked); cache hit {hit:.2?}",
        info.size_bytes / 1024,
        info.unpacked_bytes / 1024,
        many_info.size_bytes / 1024,
        many_info.unpacked_bytes / 1024,
    );
}

/// When each stage of a pull began, from the events the store reports,
/// and the layer bytes it resolved to.
#[derive(Default)]
struct StageClock {
    marks: Mutex<Vec<(Stage, Instant)>>,
    layer_bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Fetch,
    Unpack,
    Mkfs,
    Done,
}

impl Progress for StageClock {
    fn event(&self, event: &PullEvent<'_>) {
        let stage = match *event {
            PullEvent::Resolved { bytes, .. } => {
                self.layer_bytes.store(bytes, Ordering::Relaxed);
                Stage::Fetch
            }
            PullEvent::Unpacking { index: 1, .. } => Stage::Unpack,
            PullEvent::Building { .. } => Stage::Mkfs,
            PullEvent::Built { .. } => Stage::Done,
            _ => return,
        };
        self.marks.lock().unwrap().push((stage, Instant::now()));
    }
}

impl StageClock {
    /// How long `stage` lasted: until the next stage began.
    fn length(&self, stage: Stage) -> Duration {
        let marks = self.marks.lock().unwrap();
        let at = marks.iter().position(|(s, _)| *s == stage);
        match at.and_then(|i| Some((marks[i].1, marks.get(i + 1)?.1))) {
            Some((from, to)) => to - from,
            None => panic!("no {stage:?} stage among {:?}", marks.iter().map(|m| m.0).collect::<Vec<_>>()),
        }
    }
}

/// Bytes `path` occupies on the host as a directory tree.
fn du(path: &Path) -> u64 {
    let meta = fs::symlink_metadata(path).unwrap();
    let own = meta.blocks() * 512;
    if meta.is_dir() {
        own + fs::read_dir(path).unwrap().map(|e| du(&e.unwrap().path())).sum::<u64>()
    } else {
        own
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn kib(bytes: u64) -> String {
    format!("{} KiB", bytes.div_ceil(1024))
}

/// Medians of one image in one format.
struct Figures {
    info: ImageInfo,
    layer_bytes: u64,
    total: Duration,
    fetch: Duration,
    unpack: Duration,
    mkfs: Duration,
    hit: Duration,
}

/// `runs` pulls into empty stores, then cache hits on the last one, which
/// must fetch no blob.
async fn measure(registry: &Registry, work: &Path, reference: &str, format: RootfsFormat, runs: usize) -> Figures {
    let (mut totals, mut fetch, mut unpack, mut mkfs) = (vec![], vec![], vec![], vec![]);
    let mut last = None;
    let data_dir = |run: usize| work.join(format!("data-{}-{run}", format.as_str()));
    for run in 0..runs {
        let options = ImageStoreOptions {
            insecure_registries: vec![registry.host()],
            docker_config: Some(work.join("no-docker-config.json")),
            format,
            ..ImageStoreOptions::default()
        };
        let store = ImageStore::open(&data_dir(run), options).unwrap();
        let clock = StageClock::default();
        let started = Instant::now();
        let info = store.ensure_reporting(reference, &clock).await.unwrap();
        totals.push(started.elapsed());
        fetch.push(clock.length(Stage::Fetch));
        unpack.push(clock.length(Stage::Unpack));
        mkfs.push(clock.length(Stage::Mkfs));
        last = Some((store, info, clock.layer_bytes.load(Ordering::Relaxed)));
    }
    let (store, info, layer_bytes) = last.unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let gets = registry.blob_gets();
    let mut hits = vec![];
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(store.ensure(reference).await.unwrap(), info);
        hits.push(started.elapsed());
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(registry.blob_gets(), gets, "a cache hit fetched blobs");
    assert_eq!(store.conversions(), 1);
    for run in 0..runs {
        fs::remove_dir_all(data_dir(run)).unwrap();
    }
    Figures {
        info,
        layer_bytes,
        total: median(totals),
        fetch: median(fetch),
        unpack: median(unpack),
        mkfs: median(mkfs),
        hit: median(hits),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored --nocapture, in release mode"]
async fn bench_pull_convert() {
    // Asked for explicitly, so a missing tool is a failure, not a skip.
    assert_eq!(missing_tool(), None, "a registry tool is not installed");
    const RUNS: usize = 3;
    // The registry storage, layouts and image caches all live here.
    let base = std::env::var_os("HYPEMAN_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let registry = Registry::start(tmp.path());
    let layout = tmp.path().join("layout");

    let small = tmp.path().join("small");
    support::busybox_tree(&small, &["sh", "ls", "cat", "echo"]);
    build_image(&layout, "busybox", &[(Some(&small.join("bin")), "/bin")], "/bin/busybox");
    let many = tmp.path().join("many");
    many_files_tree(&many, 10, 1000);
    build_image(&layout, "files10k", &[(Some(&many), "/many")], "/bin/true");
    push(&layout, "busybox", &registry, "bench/busybox:1");
    push(&layout, "files10k", &registry, "bench/files10k:1");

    let mut formats = vec![RootfsFormat::Erofs];
    if support::which("mkfs.ext4") {
        formats.push(RootfsFormat::Ext4);
    }
    let images = [("busybox (1 layer)", "bench/busybox:1", &small), ("10 000 files", "bench/files10k:1", &many)];
    let mut table = String::from(
        "| image | disk | pull+convert | fetch | unpack | mkfs | cache hit | layers fetched | file contents | as a directory | disk size |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, repo, tree) in images {
        let reference = format!("{}/{repo}", registry.host());
        for &format in &formats {
            let f = measure(&registry, tmp.path(), &reference, format, RUNS).await;
            table.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {:.1} ms | {} | {} | {} | {} |\n",
                format.as_str(),
                ms(f.total),
                ms(f.fetch),
                ms(f.unpack),
                ms(f.mkfs),
                f.hit.as_secs_f64() * 1000.0,
                kib(f.layer_bytes),
                kib(f.info.unpacked_bytes),
                kib(du(tree)),
                kib(f.info.size_bytes),
            ));
        }
    }
    println!(
        "\nimage pipeline, {} build, in {}, median of {RUNS} pulls into empty caches and of 5 cache hits:\n\n{table}",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        base.display()
    );
}
