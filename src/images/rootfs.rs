//! Turns an unpacked root directory into a read-only disk image for the
//! guest: erofs by default (`mkfs.erofs`, from a directory because Debian's
//! 1.5 has no `--tar`), ext4 (`mkfs.ext4 -d`) as the fallback format.
//!
//! This module owns the mkfs invocations and the ext4 sizing rule. It does
//! not unpack, and it does not decide where the image lives: it writes the
//! file it is given and nothing else.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The filesystem of an image's root disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootfsFormat {
    #[default]
    Erofs,
    Ext4,
}

impl RootfsFormat {
    /// The disk's file name inside an image directory.
    pub fn file_name(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "rootfs.erofs",
            RootfsFormat::Ext4 => "rootfs.ext4",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "erofs",
            RootfsFormat::Ext4 => "ext4",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot measure {}", path.display())]
    Measure {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a directory tree needs on a block filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// File contents rounded up to 4 KiB blocks, plus one block per directory
    /// and per long symlink.
    pub block_bytes: u64,
    /// Inodes, hard links counted once.
    pub inodes: u64,
}

/// Walks `dir` without following symlinks.
pub fn measure(dir: &Path) -> Result<TreeUsage, RootfsError> {
    let mut usage = TreeUsage::default();
    let mut seen_links = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Measure { path, source }
    };
    while let Some(d) = stack.pop() {
        usage.inodes += 1;
        usage.block_bytes += BLOCK;
        for entry in fs::read_dir(&d).map_err(err(&d))? {
            let entry = entry.map_err(err(&d))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(err(&path))?;
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if meta.nlink() > 1 && !seen_links.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.inodes += 1;
            if meta.is_file() || meta.file_type().is_symlink() && meta.len() > 60 {
                usage.block_bytes += meta.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(usage)
}

const BLOCK: u64 = 4096;

/// ext4 size and inode count for a tree: 30 % over its blocks plus room for
/// inode tables and metadata, and 20 % more inodes than files. Too few
/// inodes, not too few bytes, is what images with many small files hit.
pub fn ext4_geometry(usage: TreeUsage) -> (u64, u64) {
    const INODE_SIZE: u64 = 256;
    let inodes = usage.inodes + usage.inodes / 5 + 1024;
    let bytes = usage.block_bytes + usage.block_bytes * 3 / 10 + inodes * INODE_SIZE + (32 << 20);
    let rounded = bytes.div_ceil(4 << 20) * (4 << 20);
    (rounded, inodes)
}

/// Writes `out` (which must not exist) as a disk holding `dir`.
pub fn build(dir: &Path, out: &Path, format: RootfsFormat) -> Result<(), RootfsError> {
    match format {
        RootfsFormat::Erofs => build_erofs(dir, out),
        RootfsFormat::Ext4 => build_ext4(dir, out),
    }
}

fn build_erofs(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    // Made here, 0600, for mkfs.erofs to open and fill: a file it creates
    // itself gets 0644 less the umask.
    crate::durable::private_file()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|source| RootfsError::Create { path: out.to_path_buf(), source })?;
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet");
    if erofs_supports_lz4() {
        cmd.arg("-zlz4");
    }
    cmd.arg(out).arg(dir);
    run("mkfs.erofs", &mut cmd)
}

/// Whether this `mkfs.erofs` lists lz4 among its compressors (Debian's 1.5
/// does when built with liblz4; a build without it would refuse `-zlz4`).
fn erofs_supports_lz4() -> bool {
    static LZ4: OnceLock<bool> = OnceLock::new();
    *LZ4.get_or_init(|| {
        Command::new("mkfs.erofs")
            .arg("--help")
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .any(|l| l.contains("Available compressors") && l.contains("lz4"))
            })
            .unwrap_or(false)
    })
}

fn build_ext4(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    let usage = measure(dir)?;
    let (bytes, inodes) = ext4_geometry(usage);
    let file = crate::durable::private_file()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|source| RootfsError::Create {
            path: out.to_path_buf(),
            source,
        })?;
    file.set_len(bytes).map_err(|source| RootfsError::Measure {
        path: out.to_path_buf(),
        source,
    })?;
    drop(file);
    let mut cmd = Command::new("mkfs.ext4");
    // No journal and no reserved blocks: the disk is attached read-only.
    cmd.args([
        "-q",
        "-F",
        "-b",
        "4096",
        "-I",
        "256",
        "-m",
        "0",
        "-O",
        "^has_journal",
    ])
    .arg("-N")
    .arg(inodes.to_string())
    .arg("-d")
    .arg(dir)
    .arg(out);
    run("mkfs.ext4", &mut cmd)
}

fn run(program: &'static str, cmd: &mut Command) -> Result<(), RootfsError> {
    let output = cmd
        .output()
        .map_err(|source| RootfsError::Spawn { program, source })?;
    if output.status.success() {
        return Ok(());
    }
    let text = [output.stderr, output.stdout].concat();
    let mut stderr = String::from_utf8_lossy(&text).trim().to_string();
    if stderr.len() > 2000 {
        let mut cut = 2000;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
    }
    Err(RootfsError::Failed {
        program,
        status: output.status,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_geometry_grows_with_files_not_just_bytes() {
        let small_files = TreeUsage {
            block_bytes: 20_000 * BLOCK,
            inodes: 20_001,
        };
        let (bytes, inodes) = ext4_geometry(small_files);
        assert!(inodes >= 24_000, "{inodes}");
        assert!(bytes >= 20_000 * BLOCK * 13 / 10 + inodes * 256, "{bytes}");
        assert_eq!(bytes % (4 << 20), 0);
        let empty = ext4_geometry(TreeUsage::default());
        assert!(empty.0 >= 32 << 20 && empty.1 >= 1024);
    }

    /// The sizing bug this guards against: a fixed inode ratio runs out
    /// with many small files.
    #[test]
    fn twenty_thousand_small_files_fit_in_both_formats() {
        if !crate::test_gate::tools(&["mkfs.ext4", "mkfs.erofs", "debugfs"]) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        for d in 0..20 {
            let sub = root.join(format!("d{d:02}"));
            fs::create_dir_all(&sub).unwrap();
            for f in 0..1000 {
                fs::write(sub.join(format!("f{f:04}")), format!("file {d} {f}\n")).unwrap();
            }
        }
        let usage = measure(&root).unwrap();
        assert_eq!(usage.inodes, 20_000 + 21);

        let ext4 = tmp.path().join("rootfs.ext4");
        let started = std::time::Instant::now();
        build(&root, &ext4, RootfsFormat::Ext4).unwrap();
        eprintln!("ext4, 20k files: {:?}", started.elapsed());
        let out = Command::new("debugfs")
            .arg("-R")
            .arg("cat /d19/f0999")
            .arg(&ext4)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "file 19 999\n");

        let erofs = tmp.path().join("rootfs.erofs");
        let started = std::time::Instant::now();
        build(&root, &erofs, RootfsFormat::Erofs).unwrap();
        eprintln!("erofs, 20k files: {:?}", started.elapsed());
        assert!(fs::metadata(&erofs).unwrap().len() > 0);
        let out = Command::new("fsck.erofs").arg(&erofs).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_failing_mkfs_reports_its_output() {
        if !crate::test_gate::tools(&["mkfs.erofs"]) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let err = build(
            &tmp.path().join("missing"),
            &tmp.path().join("out"),
            RootfsFormat::Erofs,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                RootfsError::Failed {
                    program: "mkfs.erofs",
                    ..
                }
            ),
            "{err}"
        );
    }
}
