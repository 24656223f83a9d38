//! A real local registry (Debian's `docker-registry` on 127.0.0.1) and
//! images built with `umoci` and pushed to it with `skopeo`, for the tests
//! and the benchmark that pull through hypeman.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::run_ok as run;

pub const TOOLS: &[&str] = &[
    "/usr/bin/docker-registry",
    "/usr/bin/skopeo",
    "/usr/bin/umoci",
    "/bin/busybox",
    "/usr/bin/mkfs.erofs",
    "/usr/bin/fsck.erofs",
];

/// The first of [`TOOLS`] that is not installed.
pub fn missing_tool() -> Option<&'static str> {
    TOOLS.iter().copied().find(|t| !Path::new(t).exists())
}

/// A `docker-registry serve` child on a free port, killed on drop.
pub struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
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

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob downloads the registry has served so far (from its access log).
    pub fn blob_gets(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/"))
            .count()
    }

    pub fn stop(&mut self) {
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
pub fn build_image(layout: &Path, tag: &str, layers: &[(Option<&Path>, &str)], entrypoint: &str) {
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
pub fn push(layout: &Path, tag: &str, registry: &Registry, name: &str) -> String {
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

/// `root/d00/f0000` …: `dirs` directories of `per_dir` small files each.
pub fn many_files_tree(root: &Path, dirs: usize, per_dir: usize) {
    for d in 0..dirs {
        let sub = root.join(format!("d{d:02}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..per_dir {
            fs::write(sub.join(format!("f{f:04}")), format!("{d}/{f}\n")).unwrap();
        }
    }
}
