//! Secrets through `env_files`, with the real daemon and a real QEMU guest
//! (TCG): the app prints variables from an env file and from `[env]`, and
//! the values are then looked for everywhere the daemon writes or prints —
//! the data dir (but the app's own console and the config disk the guest
//! needs), `hypeman.log`, the daemon's log, `status` and `status --json`,
//! `plan` and `validate`. Then the file is changed (the guest restarts with
//! the new value) and broken (the boot fails naming the file and line, not
//! the value). Gated like `e2e_qemu`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::daemon::{World, COUNTER};

const FILE_MARKER: &str = "file-secret-7f3a91";
const ROTATED_MARKER: &str = "rotated-secret-c40d2e";
const INLINE_MARKER: &str = "inline-secret-5b8e07";
const BROKEN_MARKER: &str = "broken-secret-e19f44";

fn write_private(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn cli(w: &World, args: &[&str]) -> String {
    let out = w.hypeman().args(args).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every output of the daemon and the CLI, by where it came from; and the
/// data dir's files but the app's console (where the app printed them on
/// purpose), the config disk (which must hold them: checked too), the
/// guest's overlay (its own disk, which only the guest writes) and the
/// image cache (made from the image alone): the last two are a GiB to scan.
fn leaks(w: &World, markers: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let outputs = [
        ("daemon log", w.daemon_log_text()),
        ("status", cli(w, &["status"])),
        ("status --json", cli(w, &["status", "--json"])),
        ("status counter --json", cli(w, &["status", "counter", "--json"])),
        ("plan", cli(w, &["plan"])),
        ("validate", cli(w, &["validate"])),
        ("logs --source hypeman", cli(w, &["logs", "counter", "--source", "hypeman"])),
    ];
    for (what, text) in &outputs {
        for m in markers {
            if text.contains(m) {
                found.push(format!("{what} holds {m}"));
            }
        }
    }
    let mut files = Vec::new();
    files_under(&w.data, &mut files);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if ["app.log", "config.erofs", "overlay.raw"].contains(&name.as_str()) || file.starts_with(w.data.join("images")) {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap_or_default();
        for m in markers {
            // The record keeps `[env]` to see a change (0600, see README).
            if name == "metadata.json" && *m == INLINE_MARKER {
                continue;
            }
            if contains(&bytes, m) {
                found.push(format!("{} holds {m}", file.display()));
            }
        }
    }
    found
}

fn wait_for(what: &str, patience: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < patience, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

#[test]
fn env_file_values_reach_the_app_and_nothing_else() {
    let Some((kernel_dir, init)) = support::real_vm("the env_files end-to-end test", &["umoci", "mkfs.erofs", "mkfs.ext4", "fsck.erofs"])
    else {
        return;
    };
    let mut w = World::qemu(&kernel_dir, &init);
    let secrets = w.tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let (first, second) = (secrets.join("web.env"), secrets.join("override.env"));
    write_private(&first, &format!("# the database\nDB_PASSWORD='{FILE_MARKER}'\nSHARED=from-first\nINLINE_WINS=from-file\n"));
    write_private(&second, "export SHARED=\"from-second\"\n");
    w.extra = format!(
        "env_files = [\"{}\", \"{}\"]\n[env]\nINLINE_SECRET = \"{INLINE_MARKER}\"\nINLINE_WINS = \"inline\"\n",
        first.display(),
        second.display()
    );
    w.script = format!("echo APPENV DB_PASSWORD=$DB_PASSWORD SHARED=$SHARED INLINE_WINS=$INLINE_WINS INLINE_SECRET=$INLINE_SECRET; {COUNTER}");
    let app_env = |w: &World| -> Vec<String> {
        let Some(id) = w.status()["id"].as_str().map(str::to_string) else { return Vec::new() };
        let log = std::fs::read_to_string(w.data.join("guests").join(id).join("logs/app.log")).unwrap_or_default();
        log.lines().filter_map(|l| l.trim().strip_prefix("APPENV ").map(str::to_string)).collect()
    };

    w.start();
    let t = Instant::now();
    w.declare("running");
    w.wait("Running");
    w.wait_counter_above(1);
    eprintln!("boot with env files: {:.2}s", t.elapsed().as_secs_f64());
    assert_eq!(
        app_env(&w),
        vec![format!("DB_PASSWORD={FILE_MARKER} SHARED=from-second INLINE_WINS=inline INLINE_SECRET={INLINE_MARKER}")],
        "image < env_files in order < [env]"
    );
    let dir = w.guest_dir();
    let disk = std::fs::read(dir.join("config.erofs")).unwrap();
    assert!(contains(&disk, FILE_MARKER), "the config disk carries the value to the guest (the search can find it)");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Readable by its own VMM's gid only (VMMs run as their own users).
    use std::os::unix::fs::MetadataExt;
    let config_gid = std::fs::metadata(dir.join("config.erofs")).unwrap().gid();
    assert_eq!(mode(&dir.join("config.erofs")), 0o640, "the config disk");
    assert!((70000..=70999).contains(&config_gid), "the config disk's group is its VMM's own, not {config_gid}");
    assert!(!dir.join("config.json").exists(), "no plaintext copy of the config");
    let meta = std::fs::read_to_string(dir.join("metadata.json")).unwrap();
    assert!(meta.contains(&*first.to_string_lossy()) && meta.contains("sha256:"), "the record keeps paths and a digest:\n{meta}");
    eprintln!("modes: metadata.json {:o}, config.erofs {:o}", mode(&dir.join("metadata.json")), mode(&dir.join("config.erofs")));
    let found = leaks(&w, &[FILE_MARKER, INLINE_MARKER]);
    assert!(found.is_empty(), "values leaked:\n{}", found.join("\n"));

    // A rotated secret restarts the guest with the new value; the
    // declaration is not touched. (Resync every 2 s in these settings.)
    write_private(&first, &format!("DB_PASSWORD={ROTATED_MARKER}\nSHARED=from-first\n"));
    let took = wait_for("the rotated value in the app", w.patience, || {
        app_env(&w).last().is_some_and(|l| l.starts_with(&format!("DB_PASSWORD={ROTATED_MARKER} ")))
    });
    eprintln!("rotated env file → the app has the new value in {:.2}s", took.as_secs_f64());
    let hypeman_log = std::fs::read_to_string(dir.join("logs/hypeman.log")).unwrap();
    assert!(hypeman_log.contains("env_files"), "the restart names the field:\n{hypeman_log}");
    let found = leaks(&w, &[FILE_MARKER, ROTATED_MARKER, INLINE_MARKER]);
    assert!(found.is_empty(), "values leaked:\n{}", found.join("\n"));

    // A broken file: the next cold boot fails naming the file and line.
    w.declare("stopped");
    w.wait("Stopped");
    write_private(&first, &format!("SHARED=x\n{BROKEN_MARKER}\n"));
    w.declare("running");
    let want = format!("{}:2: expected NAME=value", first.display());
    let took = wait_for("the boot to fail on the env file", w.patience, || {
        w.status()["last_error"].as_str().is_some_and(|e| e.contains(&want))
    });
    eprintln!("broken env file → last_error in {:.2}s: {}", took.as_secs_f64(), w.status()["last_error"]);
    let found = leaks(&w, &[FILE_MARKER, ROTATED_MARKER, INLINE_MARKER, BROKEN_MARKER]);
    assert!(found.is_empty(), "values leaked:\n{}", found.join("\n"));

    // Fixed: the changed file is noticed and the guest boots.
    write_private(&first, "DB_PASSWORD=fixed\n");
    let took = wait_for("the fixed file to boot", w.patience, || app_env(&w).last().is_some_and(|l| l.starts_with("DB_PASSWORD=fixed ")));
    eprintln!("fixed env file → the app has its value in {:.2}s", took.as_secs_f64());
    w.wait("Running");
    w.declare("stopped");
    w.wait("Stopped");
    w.stop_daemon();
}
