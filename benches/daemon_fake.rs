//! The daemon against the fake hypervisor at 1, 100 and 1000 declared
//! instances: startup time, time from a declaration write to the first
//! backend call (median, p99), and resident memory. Then 100 and 1000
//! networked instances (`[network] enabled`): each create leases an
//! address; the fake provisioner makes no TAP, so no netlink is touched.
//! All runs share one process, one after another, so the figures are
//! comparable.
//!
//! Run: `cargo bench --bench daemon_fake`, or with sizes to run only those
//! (`cargo bench --bench daemon_fake -- 1000`), `net` for only the
//! networked runs, `plain` for only the others.

use hypeman::daemon::{self, DaemonConfig};
use hypeman::declaration::spec::HypervisorKind;
use hypeman::hypervisor::fake::{FakeHypervisor, Op};
use hypeman::hypervisor::Backends;
use hypeman::instances::provision::FakeProvisioner;
use hypeman::settings::Settings;
use hypeman::store::Store;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn write_atomic(dir: &Path, name: &str, state: &str, networked: bool) {
    let mut body = format!("image = \"docker.io/library/busybox:latest\"\nstate = \"{state}\"\nmemory = \"128MiB\"\n");
    if networked {
        body.push_str("[network]\nenabled = true\n");
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.toml"))).unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run(n: usize, samples: usize, networked: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let config_dir = tmp.path().join("etc");
    let dir = config_dir.join("instances");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        write_atomic(&dir, &format!("vm{i}"), "running", networked);
    }
    let mut settings = Settings::defaults();
    settings.data_dir = tmp.path().join("data");
    settings.default_hypervisor = HypervisorKind::Qemu;
    settings.reconcile.debounce = Duration::ZERO;
    // The fake starts no VMM processes: none to run as other users (and
    // the temp dir above the data dir is private).
    settings.vmm.users = hypeman::settings::VmmUsers::Root;
    let settings = Arc::new(settings);
    let fake = FakeHypervisor::new(HypervisorKind::Qemu);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = DaemonConfig {
        config_dir: config_dir.clone(),
        settings: settings.clone(),
        backends: Backends { cloud_hypervisor: None, qemu: Some(Arc::new(fake.clone())) },
        provisioner: Arc::new(FakeProvisioner),
        handle_sighup: false,
        api: Some(hypeman::cli::serve::hook(config_dir.clone(), settings.clone())),
    };
    let rss_before = rss_mib();
    let started = Instant::now();
    let task = tokio::spawn(daemon::run(cfg, async {
        let _ = rx.await;
    }));
    // Startup: until every declared instance is running.
    while fake.call_count(Op::Boot) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let startup = started.elapsed();
    let rss_up = rss_mib();
    if !networked && n >= 100 {
        status_side_by_side(n, &config_dir, &settings.data_dir).await;
    }

    let store = Store::open(&settings.data_dir).unwrap();
    let mut lat = Vec::with_capacity(samples);
    for s in 0..samples {
        let name = format!("vm{}", s % n);
        let socket = store.guest_paths(store.find_by_name(&name).unwrap().unwrap().id).qmp_socket;
        // Alternate stop / start; the first acting call is power-off or create.
        let (state, op) = if (s / n) % 2 == 0 { ("stopped", Op::PowerOff) } else { ("running", Op::Create) };
        let before = fake.call_times(op, &socket).len();
        let t0 = Instant::now();
        write_atomic(&dir, &name, state, networked);
        let first = loop {
            let times = fake.call_times(op, &socket);
            if times.len() > before {
                break times[before];
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        lat.push(first.duration_since(t0));
        // Let that instance settle before the next sample.
        let done = if op == Op::PowerOff { Op::ShutdownVmm } else { Op::Boot };
        while fake.call_times(done, &socket).len() <= before {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    lat.sort();
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    if networked {
        let leased = store.list().unwrap().guests.iter().filter(|g| g.network.is_some()).count();
        assert_eq!(leased, n, "every networked guest holds a lease");
    }
    let kind = if networked { "networked" } else { "instances" };
    println!(
        "{n:>5} {kind:<9} | startup to all running {:>8.1} ms | write→first call median {:>6.2} ms  p99 {:>6.2} ms ({} samples) | RSS {:>6.1} MiB (+{:.1} MiB)",
        startup.as_secs_f64() * 1e3,
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.len(),
        rss_up,
        rss_up - rss_before,
    );
}

/// `hypeman status --json` run as a user runs it, answered by the daemon
/// over its API, next to the same command with the API socket moved away
/// (the stored view: the CLI reads every record and probes every VMM
/// socket itself), interleaved, medians; and the API request alone.
async fn status_side_by_side(n: usize, config_dir: &Path, data_dir: &Path) {
    let socket = hypeman::api::socket_path(data_dir);
    let (config_dir, data_dir) = (config_dir.to_path_buf(), data_dir.to_path_buf());
    let cli = move || {
        let t0 = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hypeman"))
            .arg("--config-dir")
            .arg(&config_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rows.len(), n);
        (t0.elapsed(), String::from_utf8_lossy(&out.stderr).contains("stored view"))
    };
    let (mut api, mut stored, mut request, mut start) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        // The floor: the same binary starting and printing its version.
        let t0 = Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hypeman")).arg("--version").output().await.unwrap();
        assert!(out.status.success());
        start.push(t0.elapsed());
        let c = cli.clone();
        let (t, fell_back) = tokio::task::spawn_blocking(c).await.unwrap();
        assert!(!fell_back, "the daemon answered");
        api.push(t);
        let t0 = Instant::now();
        let rows = hypeman::api::client::ask(socket.parent().unwrap(), hypeman::api::Op::Status { name: None }).await.unwrap().unwrap();
        request.push(t0.elapsed());
        assert_eq!(rows.as_array().map(Vec::len), Some(n));
        if stored.len() < 5 {
            let hidden = socket.with_extension("hidden");
            std::fs::rename(&socket, &hidden).unwrap();
            let c = cli.clone();
            let (t, fell_back) = tokio::task::spawn_blocking(c).await.unwrap();
            std::fs::rename(&hidden, &socket).unwrap();
            assert!(fell_back, "the CLI looked for itself");
            stored.push(t);
        }
    }
    for v in [&mut api, &mut stored, &mut request, &mut start] {
        v.sort();
    }
    let ms = |v: &[Duration]| percentile(v, 0.5).as_secs_f64() * 1e3;
    println!(
        "{n:>5} instances | `hypeman status --json`: via the API {:>7.1} ms (request alone {:>6.1} ms, `hypeman --version` {:>5.1} ms), stored view {:>7.1} ms: {:.1}x (medians of {}, {} and {})",
        ms(&api),
        ms(&request),
        ms(&start),
        ms(&stored),
        ms(&stored) / ms(&api),
        api.len(),
        request.len(),
        stored.len()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other word picks what runs.
    let words: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let sizes: Vec<usize> = words.iter().filter_map(|w| w.parse().ok()).collect();
    let wanted = |n: usize, networked: bool| {
        let kind = if networked { "net" } else { "plain" };
        (sizes.is_empty() || sizes.contains(&n))
            && (!words.iter().any(|w| w == "net" || w == "plain") || words.iter().any(|w| w == kind))
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("hypeman daemon against the fake hypervisor ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    rt.block_on(async {
        for (n, samples, networked) in [(1, 100, false), (100, 200, false), (1000, 400, false), (100, 200, true), (1000, 400, true)] {
            if wanted(n, networked) {
                run(n, samples, networked).await;
            }
        }
    });
}
