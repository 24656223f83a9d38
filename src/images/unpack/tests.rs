use super::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// A tar built entry by entry with raw names, so hostile names that
/// `tar::Builder`'s path checks would refuse can be written.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    fn entry(
        mut self,
        name: &[u8],
        kind: EntryType,
        data: &[u8],
        link: Option<&[u8]>,
        mode: u32,
    ) -> Layer {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().expect("gnu header");
            gnu.name[..name.len()].copy_from_slice(name);
            if let Some(link) = link {
                gnu.linkname[..link.len()].copy_from_slice(link);
            }
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.0.append(&h, data).expect("append");
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Layer {
        self.entry(name.as_bytes(), EntryType::Regular, data, None, 0o644)
    }
    fn dir(self, name: &str) -> Layer {
        self.entry(name.as_bytes(), EntryType::Directory, b"", None, 0o755)
    }
    fn symlink(self, name: &str, target: &str) -> Layer {
        self.entry(
            name.as_bytes(),
            EntryType::Symlink,
            b"",
            Some(target.as_bytes()),
            0o777,
        )
    }
    fn hardlink(self, name: &str, target: &str) -> Layer {
        self.entry(
            name.as_bytes(),
            EntryType::Link,
            b"",
            Some(target.as_bytes()),
            0o644,
        )
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().expect("finish tar")
    }
}

/// `base/root` is unpacked into; `base/sentinel` must stay as it was.
struct Fixture {
    base: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let base = tempfile::tempdir().unwrap();
        fs::create_dir(base.path().join("root")).unwrap();
        fs::create_dir(base.path().join("sentinel")).unwrap();
        Fixture { base }
    }
    fn root(&self) -> PathBuf {
        self.base.path().join("root")
    }
    fn sentinel(&self) -> PathBuf {
        self.base.path().join("sentinel")
    }
    fn unpack(&self, layers: &[Vec<u8>]) -> Result<UnpackStats, UnpackError> {
        self.unpack_with(layers, UnpackOptions::default())
    }
    fn unpack_with(
        &self,
        layers: &[Vec<u8>],
        options: UnpackOptions,
    ) -> Result<UnpackStats, UnpackError> {
        let mut u = Unpacker::new(&self.root(), options)?;
        for layer in layers {
            u.apply_layer(layer.as_slice())?;
        }
        u.finish()
    }
    fn sentinel_names(&self) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(self.sentinel())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
    /// Nothing besides `root` and `sentinel` appeared next to the root.
    fn assert_nothing_outside(&self) {
        let mut names: Vec<_> = fs::read_dir(self.base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["root", "sentinel"]);
    }
}

#[test]
fn hostile_layers_are_rejected_and_nothing_escapes() {
    let sentinel_target = |f: &Fixture| f.sentinel().to_string_lossy().into_owned();
    type Case = (
        &'static str,
        fn(&Fixture, String) -> Vec<Vec<u8>>,
        fn(&UnpackError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (
            "dotdot file",
            |_, _| vec![Layer::new().file("../sentinel/escaped", b"x").bytes()],
            |e| matches!(e, UnpackError::Escape { .. }),
        ),
        (
            "dotdot in the middle",
            |_, _| {
                vec![Layer::new()
                    .dir("a")
                    .file("a/../../sentinel/escaped", b"x")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::Escape { .. }),
        ),
        (
            "absolute symlink then write through it",
            |_, s| {
                vec![Layer::new()
                    .symlink("a", &s)
                    .file("a/escaped", b"x")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "relative dotdot symlink chain then write through it",
            |_, _| {
                vec![Layer::new()
                    .dir("d")
                    .symlink("d/up", "../..")
                    .file("d/up/sentinel/escaped", b"x")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "symlink then directory through it",
            |_, s| vec![Layer::new().symlink("a", &s).dir("a/escaped").bytes()],
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "symlink in a later layer replaces a directory",
            |_, s| {
                vec![
                    Layer::new().dir("etc").bytes(),
                    Layer::new()
                        .symlink("etc", &s)
                        .file("etc/escaped", b"x")
                        .bytes(),
                ]
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "hardlink to dotdot",
            |_, _| vec![Layer::new().hardlink("passwd", "../../etc/passwd").bytes()],
            |e| matches!(e, UnpackError::HardlinkTarget { .. }),
        ),
        (
            "hardlink through a symlink",
            |_, s| {
                vec![Layer::new()
                    .symlink("s", &s)
                    .hardlink("stolen", "s/victim")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::HardlinkTarget { .. }),
        ),
        (
            "hardlink placed through a symlink",
            |_, s| {
                vec![Layer::new()
                    .file("f", b"x")
                    .symlink("s", &s)
                    .hardlink("s/escaped", "f")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "whiteout of dotdot",
            |_, _| vec![Layer::new().dir("a").file("a/.wh...", b"").bytes()],
            |e| matches!(e, UnpackError::Whiteout { .. }),
        ),
        (
            "whiteout path with dotdot",
            |_, _| vec![Layer::new().file("../sentinel/.wh.victim", b"").bytes()],
            |e| matches!(e, UnpackError::Escape { .. }),
        ),
        (
            "whiteout through a symlink",
            |_, s| {
                vec![Layer::new()
                    .symlink("s", &s)
                    .file("s/.wh.victim", b"")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
        (
            "opaque marker through a symlink",
            |_, s| {
                vec![Layer::new()
                    .symlink("s", &s)
                    .file("s/.wh..wh..opq", b"")
                    .bytes()]
            },
            |e| matches!(e, UnpackError::ThroughSymlink { .. }),
        ),
    ];
    for (name, build, expected) in cases {
        let f = Fixture::new();
        fs::write(f.sentinel().join("victim"), b"keep").unwrap();
        let layers = build(&f, sentinel_target(&f));
        let err = f.unpack(&layers).expect_err(name);
        assert!(expected(&err), "{name}: unexpected error {err:?}");
        assert_eq!(f.sentinel_names(), ["victim"], "{name}: sentinel changed");
        assert_eq!(
            fs::read(f.sentinel().join("victim")).unwrap(),
            b"keep",
            "{name}"
        );
        f.assert_nothing_outside();
    }
}

#[test]
fn absolute_paths_land_inside_the_root() {
    let f = Fixture::new();
    let layer = Layer::new()
        .file("/abs/path", b"inside")
        .file("./dot/x", b"y")
        .bytes();
    f.unpack(&[layer]).unwrap();
    assert_eq!(fs::read(f.root().join("abs/path")).unwrap(), b"inside");
    assert_eq!(fs::read(f.root().join("dot/x")).unwrap(), b"y");
    f.assert_nothing_outside();
    assert!(f.sentinel_names().is_empty());
}

#[test]
fn writing_a_file_over_a_hardlink_does_not_change_the_other_name() {
    let f = Fixture::new();
    let lower = Layer::new()
        .file("a", b"original")
        .hardlink("b", "a")
        .bytes();
    let upper = Layer::new().file("b", b"replaced").bytes();
    f.unpack(&[lower, upper]).unwrap();
    assert_eq!(fs::read(f.root().join("a")).unwrap(), b"original");
    assert_eq!(fs::read(f.root().join("b")).unwrap(), b"replaced");
}

#[test]
fn whiteouts_and_opaque_directories_follow_layer_order() {
    let f = Fixture::new();
    let l1 = Layer::new()
        .dir("etc")
        .file("etc/keep", b"1")
        .file("etc/gone", b"1")
        .dir("var/cache")
        .file("var/cache/old", b"1")
        .dir("var/cache/sub")
        .file("var/cache/sub/deep", b"1")
        .dir("tree/a/b")
        .file("tree/a/b/c", b"1")
        .bytes();
    // The opaque marker comes after a same-layer entry, which must survive.
    let l2 = Layer::new()
        .file("etc/.wh.gone", b"")
        .file("var/cache/new", b"2")
        .file("var/cache/.wh..wh..opq", b"")
        .file(".wh.tree", b"")
        .file(".wh.never-existed", b"")
        .bytes();
    f.unpack(&[l1, l2]).unwrap();
    let root = f.root();
    assert!(root.join("etc/keep").exists());
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists());
    let mut cache: Vec<_> = fs::read_dir(root.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    cache.sort();
    assert_eq!(cache, ["new"]);
    assert!(!root.join("tree").exists());
}

#[test]
fn links_modes_and_times_are_kept() {
    let f = Fixture::new();
    let layer = Layer::new()
        .dir("bin")
        .entry(
            b"bin/busybox",
            EntryType::Regular,
            b"#!binary",
            None,
            0o4755,
        )
        .hardlink("bin/sh", "bin/busybox")
        .hardlink("bin/ls", "/bin/busybox")
        .symlink("bin/abs", "/nonexistent/target")
        .symlink("bin/rel", "../etc/passwd")
        .entry(b"ro", EntryType::Directory, b"", None, 0o555)
        .file("ro/inside", b"x")
        .entry(b"fifo", EntryType::Fifo, b"", None, 0o640)
        .bytes();
    f.unpack(&[layer]).unwrap();
    let root = f.root();
    let bb = fs::metadata(root.join("bin/busybox")).unwrap();
    assert_eq!(bb.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(bb.mtime(), 1_600_000_000);
    assert_eq!(fs::metadata(root.join("bin/sh")).unwrap().ino(), bb.ino());
    assert_eq!(fs::metadata(root.join("bin/ls")).unwrap().ino(), bb.ino());
    assert_eq!(bb.nlink(), 3);
    assert_eq!(
        fs::read_link(root.join("bin/abs")).unwrap(),
        Path::new("/nonexistent/target")
    );
    assert_eq!(
        fs::read_link(root.join("bin/rel")).unwrap(),
        Path::new("../etc/passwd")
    );
    let ro = fs::metadata(root.join("ro")).unwrap();
    assert_eq!(ro.permissions().mode() & 0o7777, 0o555);
    // Applied after its child was created.
    assert_eq!(ro.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(root.join("bin")).unwrap().mtime(),
        1_600_000_000
    );
    let fifo = fs::symlink_metadata(root.join("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
    assert_eq!(fifo.permissions().mode() & 0o777, 0o640);
}

#[test]
fn ownership_and_devices_depend_on_privilege() {
    let layer = || {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_cksum();
        b.append_data(&mut h, "owned", &b"x"[..]).unwrap();
        let mut d = tar::Header::new_gnu();
        d.set_entry_type(EntryType::Char);
        d.set_size(0);
        d.set_mode(0o666);
        d.set_device_major(1).unwrap();
        d.set_device_minor(3).unwrap();
        d.set_cksum();
        b.append_data(&mut d, "dev/null", io::empty()).unwrap();
        b.into_inner().unwrap()
    };

    let f = Fixture::new();
    let unprivileged = UnpackOptions {
        privileged: false,
        ..UnpackOptions::default()
    };
    let stats = f.unpack_with(&[layer()], unprivileged).unwrap();
    assert_eq!(stats.devices_skipped, 1);
    assert_eq!(stats.ownership_skipped, 1);
    assert!(!f.root().join("dev/null").exists());
    assert!(f.root().join("owned").exists());

    if nix::unistd::geteuid().is_root() {
        let f = Fixture::new();
        let privileged = UnpackOptions {
            privileged: true,
            ..UnpackOptions::default()
        };
        let stats = f.unpack_with(&[layer()], privileged).unwrap();
        assert_eq!(stats.devices_skipped, 0);
        let owned = fs::metadata(f.root().join("owned")).unwrap();
        assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
        let dev = fs::symlink_metadata(f.root().join("dev/null")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &dev.file_type()
        ));
        assert_eq!(dev.rdev(), libc::makedev(1, 3));
    }
}

#[test]
fn pax_xattrs_are_applied_or_counted() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.hypeman", &b"yes"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "tagged", &b"x"[..]).unwrap();
    let f = Fixture::new();
    let stats = f.unpack(&[b.into_inner().unwrap()]).unwrap();
    let path = std::ffi::CString::new(f.root().join("tagged").as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 16];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.hypeman".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if stats.xattrs_skipped == 0 {
        assert_eq!(&buf[..n as usize], b"yes");
    } else {
        assert!(n < 0, "skipped xattr is absent");
    }
}

#[test]
fn size_and_entry_limits_stop_unpacking() {
    let f = Fixture::new();
    let small = UnpackOptions {
        limits: UnpackLimits {
            max_bytes: 10,
            max_entries: 100,
        },
        ..UnpackOptions::default()
    };
    let big = Layer::new()
        .file("a", b"123456")
        .file("b", b"123456")
        .bytes();
    assert!(matches!(
        f.unpack_with(&[big], small),
        Err(UnpackError::TooLarge { limit: 10 })
    ));

    let f = Fixture::new();
    let few = UnpackOptions {
        limits: UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 3,
        },
        ..UnpackOptions::default()
    };
    let many = Layer::new()
        .file("1", b"")
        .file("2", b"")
        .file("3", b"")
        .file("4", b"")
        .bytes();
    assert!(matches!(
        f.unpack_with(&[many], few),
        Err(UnpackError::TooManyEntries { limit: 3 })
    ));
}

#[test]
fn compressed_layers_are_detected() {
    let tar = Layer::new().file("hello", b"world").bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(tar.as_slice(), 1).unwrap();
    for (name, layer) in [("tar", tar.clone()), ("gzip", gz), ("zstd", zst)] {
        let f = Fixture::new();
        f.unpack(&[layer]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            fs::read(f.root().join("hello")).unwrap(),
            b"world",
            "{name}"
        );
    }
    let f = Fixture::new();
    let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0].to_vec();
    assert!(matches!(
        f.unpack(&[xz]),
        Err(UnpackError::Compression("xz"))
    ));
}

#[test]
fn normalize_table() {
    let ok: &[(&str, &[&str])] = &[
        ("a/b", &["a", "b"]),
        ("/a//b/", &["a", "b"]),
        ("./a/./b", &["a", "b"]),
        ("./", &[]),
        ("/", &[]),
        ("a/..b/c..", &["a", "..b", "c.."]),
    ];
    for (input, want) in ok {
        let got: Vec<_> = normalize(input.as_bytes())
            .unwrap()
            .iter()
            .map(|c| show(c))
            .collect();
        assert_eq!(&got, want, "{input}");
    }
    for bad in ["..", "../a", "a/../b", "a/..", "/../etc"] {
        assert!(normalize(bad.as_bytes()).is_none(), "{bad}");
    }
}

#[test]
fn a_tar_without_trailer_is_complete_but_a_cut_one_is_not() {
    let full = Layer::new()
        .dir("d")
        .file("d/a", b"12345")
        .file("d/b", b"kept\n")
        .bytes();
    // 4 headers/blocks: d, d/a header + data block, d/b header, then "kept\n".
    let no_trailer = full[..512 * 4 + 5].to_vec();
    let f = Fixture::new();
    f.unpack(&[no_trailer]).unwrap();
    assert_eq!(fs::read(f.root().join("d/b")).unwrap(), b"kept\n");
    let cut = full[..512 * 4 + 3].to_vec();
    let f = Fixture::new();
    assert!(matches!(f.unpack(&[cut]), Err(UnpackError::Read(_))));
}

/// Under the daemon's umask (0077) a directory no layer names, made for a
/// path below it, is still the conventional 0755 the guest expects; one a
/// layer names has the layer's mode.
#[test]
fn parents_no_layer_names_are_0755_whatever_the_umask() {
    use nix::sys::stat::{umask, Mode};
    let f = Fixture::new();
    let layer = Layer::new()
        .file("usr/share/doc/readme", b"x")
        .entry(b"srv", EntryType::Directory, b"", None, 0o750)
        .file("srv/data/file", b"y")
        .bytes();
    // Process-wide: a test running meanwhile creates its files 0600/0700,
    // which none of them checks for openness.
    let old = umask(Mode::from_bits_truncate(0o077));
    let unpacked = f.unpack(&[layer]);
    umask(old);
    unpacked.unwrap();
    let mode = |p: &str| fs::metadata(f.root().join(p)).unwrap().permissions().mode() & 0o7777;
    for implicit in ["usr", "usr/share", "usr/share/doc", "srv/data"] {
        assert_eq!(mode(implicit), 0o755, "{implicit}");
    }
    assert_eq!(mode("srv"), 0o750);
    assert_eq!(mode("usr/share/doc/readme"), 0o644);
}
