//! Declaration tests: the examples, every distinct error message, and the
//! directory scan's treatment of odd files.

use super::*;
use host::SourceKind;
use spec::{ByteSize, DesiredState, HypervisorKind, IoLimit, RestartPolicy};
use std::fs;
use std::os::unix::fs::symlink;

const GIB: u64 = ByteSize::GIB;
const MIB: u64 = ByteSize::MIB;

fn parse(text: &str) -> Result<InstanceSpec, Vec<Diagnostic>> {
    parse_instance(Path::new("instances/web.toml"), text, &Limits::default())
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics.iter().map(|d| format!("{d}\n")).collect()
}

#[test]
fn every_example_declaration_is_valid_and_matches_its_snapshot() {
    let dir = manifest_dir().join("examples/instances");
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut names = Vec::new();
    for path in paths {
        let DeclFile::Instance(name) = instance_name(&path) else {
            panic!(
                "{} in examples/instances is not a declaration",
                path.display()
            );
        };
        let text = fs::read_to_string(&path).unwrap();
        // A relative path keeps the snapshot independent of the checkout.
        let shown = Path::new("examples/instances").join(path.file_name().unwrap());
        let spec = match parse_instance(&shown, &text, &Limits::default()) {
            Ok(spec) => spec,
            Err(d) => panic!("example is invalid:\n{}", render(&d)),
        };
        assert_eq!(spec.name, name);
        insta::assert_debug_snapshot!(format!("example_{name}"), spec);
        names.push(name);
    }
    assert_eq!(names, ["batch", "hello", "web"]);

    let scan = scan_dir(&dir, &Limits::default());
    assert!(scan.complete);
    assert_eq!(scan.all_diagnostics(), []);
    assert_eq!(
        scan.valid.keys().collect::<Vec<_>>(),
        ["batch", "hello", "web"]
    );
}

#[test]
fn an_image_alone_gets_every_default() {
    let spec = parse("image = \"docker.io/library/busybox:latest\"\n").unwrap();
    assert_eq!(spec.name, "web");
    assert_eq!(spec.source, Path::new("instances/web.toml"));
    assert_eq!(spec.state, DesiredState::Running);
    assert_eq!(spec.restart, RestartPolicy::Always);
    assert_eq!(spec.hypervisor, None);
    assert_eq!(spec.vcpus, 1);
    assert_eq!(spec.memory, ByteSize(512 * MIB));
    assert_eq!(spec.hotplug_memory, ByteSize(0));
    assert_eq!(spec.overlay_size, ByteSize(GIB));
    assert_eq!(
        (spec.entrypoint, spec.cmd, spec.workdir),
        (None, None, None)
    );
    assert!(spec.env.is_empty() && spec.devices.is_empty() && spec.volumes.is_empty());
    assert!(!spec.network.enabled);
    assert_eq!(spec.network.bandwidth_down, IoLimit::default());
    assert_eq!(spec.disk_io, IoLimit::default());
}

#[test]
fn values_are_converted_to_their_internal_form() {
    let spec = parse(
        r#"
        image = "oci-archive:/srv/app.tar:v2"
        state = "standby"
        restart = "on-failure"
        hypervisor = "cloud-hypervisor"
        vcpus = 32
        memory = 1073741824
        hotplug_memory = "0.5GiB"
        overlay_size = "1T"
        entrypoint = []
        workdir = "/"
        env = { _X = "a=b", Y1 = "" }
        network = { enabled = true, bandwidth_down = 1000, bandwidth_up = "1Gbit/s" }
        disk_io = { iops = 1 }
        devices = []
        volumes = [
            { source = "/srv/a.raw", path = "/mnt//a/", readonly = true },
            { source = "/srv/b.raw", path = "/mnt/a/b" },
        ]
        "#,
    )
    .unwrap();
    assert_eq!(spec.state, DesiredState::Standby);
    assert_eq!(spec.restart, RestartPolicy::OnFailure);
    assert_eq!(spec.hypervisor, Some(HypervisorKind::CloudHypervisor));
    assert_eq!(spec.vcpus, 32);
    assert_eq!(spec.memory, ByteSize(GIB));
    assert_eq!(spec.hotplug_memory, ByteSize(512 * MIB));
    assert_eq!(spec.overlay_size, ByteSize(1024 * GIB));
    assert_eq!(spec.entrypoint, Some(vec![]));
    assert_eq!(spec.env["_X"], "a=b");
    assert_eq!(spec.network.bandwidth_down.bytes_per_sec, Some(1000));
    assert_eq!(spec.network.bandwidth_up.bytes_per_sec, Some(125_000_000));
    assert_eq!(
        spec.disk_io,
        IoLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(1)
        }
    );
    assert_eq!(spec.volumes[0].mount, "/mnt/a");
    assert!(spec.volumes[0].readonly && !spec.volumes[1].readonly);
}

/// The hotplug floor at the sizes measured under QEMU (validate.rs,
/// `hotplug_boot_memory`): what booted is accepted, one step below is not.
#[test]
fn hotplug_memory_needs_boot_memory_for_its_page_array() {
    let accepted = |memory: &str, hotplug: &str| {
        parse(&format!("image = \"x\"\nmemory = \"{memory}\"\nhotplug_memory = \"{hotplug}\"\n")).is_ok()
    };
    for (memory, hotplug) in [("82MiB", "128MiB"), ("96MiB", "1GiB"), ("128MiB", "128MiB"), ("128MiB", "3GiB"), ("80MiB", "0")] {
        assert!(accepted(memory, hotplug), "{memory} + {hotplug} booted and must be accepted");
    }
    for (memory, hotplug) in [("80MiB", "128MiB"), ("80MiB", "1GiB"), ("94MiB", "1GiB"), ("126MiB", "3GiB"), ("128MiB", "4GiB")] {
        assert!(!accepted(memory, hotplug), "{memory} + {hotplug} must be refused");
    }
}

#[test]
fn both_spellings_of_a_device_become_its_sysfs_path() {
    let spec = parse(
        "image = \"x\"\ndevices = [\"0000:01:00.0\", \"/sys/bus/pci/devices/0000:AF:00.1/\"]\n",
    )
    .unwrap();
    assert_eq!(
        spec.devices,
        [
            "/sys/bus/pci/devices/0000:01:00.0",
            "/sys/bus/pci/devices/0000:af:00.1"
        ]
    );
}

struct Case {
    title: &'static str,
    file: &'static str,
    limits: Limits,
    text: &'static str,
}

fn case(title: &'static str, text: &'static str) -> Case {
    Case {
        title,
        file: "instances/web.toml",
        limits: Limits::default(),
        text,
    }
}

/// One input per distinct message, all rendered into one snapshot: reading
/// it is reviewing every error a user can get from a declaration.
#[test]
fn every_error_message() {
    let small = Limits {
        max_vcpus: 4,
        max_memory: ByteSize(256 * MIB),
        max_overlay_size: ByteSize(512 * MIB),
        ..Limits::default()
    };
    let cases = [
        case("syntax error", "image = docker.io/busybox\n"),
        case("duplicate key", "image = \"a\"\nimage = \"b\"\n"),
        case("duplicate key in a table", "image = \"a\"\n[env]\nA = \"1\"\n\"A\" = \"2\"\n"),
        case("duplicate table", "image = \"a\"\n[network]\nenabled = true\n[network]\nenabled = false\n"),
        case("unknown top-level key", "image = \"x\"\nmemroy = \"1GiB\"\n"),
        case("unknown key in [network]", "image = \"x\"\n[network]\nenabled = true\nbandwidth = \"1Mbit\"\n"),
        case("unknown key in [disk_io]", "image = \"x\"\n[disk_io]\nops_per_sec = 5\n"),
        case("unknown key in [[volumes]]", "image = \"x\"\n[[volumes]]\nsource = \"/a\"\npath = \"/a\"\nro = true\n"),
        case("[volumes] instead of [[volumes]]", "image = \"x\"\n[volumes]\nsource = \"/a\"\n"),
        case("wrong type for a count", "image = \"x\"\nvcpus = \"2\"\n"),
        case("wrong type for a size", "image = \"x\"\nmemory = true\n"),
        case("wrong type in env", "image = \"x\"\n[env]\nDEBUG = 1\n"),
        case("missing image", "vcpus = 1\n"),
        case("empty image", "image = \" \"\n"),
        case("image with a space", "image = \"busybox latest\"\n"),
        case("relative oci layout", "image = \"oci:images/busybox:latest\"\n"),
        case("relative oci archive", "image = \"oci-archive:busybox.tar\"\n"),
        case("unknown state", "image = \"x\"\nstate = \"paused\"\n"),
        case("unknown restart policy", "image = \"x\"\nrestart = \"unless-stopped\"\n"),
        case("unknown hypervisor", "image = \"x\"\nhypervisor = \"firecracker\"\n"),
        case("zero vcpus", "image = \"x\"\nvcpus = 0\n"),
        case("negative vcpus", "image = \"x\"\nvcpus = -2\n"),
        case("too many vcpus", "image = \"x\"\nvcpus = 33\n"),
        case("huge vcpus", "image = \"x\"\nvcpus = 99999999999999999999\n"),
        case("size without a number", "image = \"x\"\nmemory = \"GiB\"\n"),
        case("unknown size unit", "image = \"x\"\nmemory = \"1Gigs\"\n"),
        case("ambiguous size unit", "image = \"x\"\nmemory = \"1GB\"\n"),
        case("negative size", "image = \"x\"\nmemory = -536870912\n"),
        case("float size", "image = \"x\"\nmemory = 1.5\n"),
        case("fractional bytes", "image = \"x\"\noverlay_size = \"100.3KiB\"\n"),
        case("size overflow", "image = \"x\"\noverlay_size = \"99999999TiB\"\n"),
        case("empty size", "image = \"x\"\nmemory = \"\"\n"),
        case("memory too small", "image = \"x\"\nmemory = \"32MiB\"\n"),
        case("cmd as a single string", "image = \"x\"\ncmd = \"nginx -g 'daemon off;'\"\n"),
        case("memory as a bare number is bytes", "image = \"x\"\nmemory = 512\n"),
        case("memory as a unit-less string is bytes", "image = \"x\"\nmemory = \"1024\"\n"),
        case("memory not 2MiB-aligned", "image = \"x\"\nmemory = \"513MiB\"\n"),
        case("memory over the limit", "image = \"x\"\nmemory = \"128GiB\"\n"),
        case("hotplug not 128MiB-aligned", "image = \"x\"\nhotplug_memory = \"100MiB\"\n"),
        case("memory + hotplug over the limit", "image = \"x\"\nmemory = \"32GiB\"\nhotplug_memory = \"33GiB\"\n"),
        case("hotplug memory whose page array does not fit", "image = \"x\"\nmemory = \"128MiB\"\nhotplug_memory = \"4GiB\"\n"),
        case(
            "hotplug memory with a passthrough device",
            "image = \"x\"\nmemory = \"128MiB\"\nhotplug_memory = \"128MiB\"\ndevices = [\"0000:01:00.0\"]\n",
        ),
        case("overlay too small", "image = \"x\"\noverlay_size = \"1MiB\"\n"),
        case("overlay over the limit", "image = \"x\"\noverlay_size = \"2TiB\"\n"),
        Case {
            title: "defaults over small limits",
            file: "instances/web.toml",
            limits: small.clone(),
            text: "image = \"x\"\n",
        },
        Case { title: "vcpus over a small limit", file: "instances/web.toml", limits: small, text: "image = \"x\"\nvcpus = 8\nmemory = \"128MiB\"\noverlay_size = \"64MiB\"\n" },
        case("empty program", "image = \"x\"\nentrypoint = [\"\", \"-c\"]\n"),
        case("NUL in an argument", "image = \"x\"\ncmd = [\"echo\", \"a\\u0000b\"]\n"),
        case("relative workdir", "image = \"x\"\nworkdir = \"app\"\n"),
        case("bad env names", "image = \"x\"\n[env]\n\"1ST\" = \"a\"\n\"MY-VAR\" = \"b\"\n\"OK\" = \"c\\u0000\"\n"),
        case("rate without /s or bit", "image = \"x\"\n[network]\nenabled = true\nbandwidth_down = \"100M\"\n"),
        case("network limit under qemu", "image = \"x\"\nhypervisor = \"qemu\"\n[network]\nenabled = true\nbandwidth_down = \"100Mbit\"\nbandwidth_up = \"1MiB/s\"\n"),
        case("unknown rate unit", "image = \"x\"\n[network]\nbandwidth_up = \"10Mbps\"\n"),
        case("ambiguous rate unit", "image = \"x\"\n[network]\nbandwidth_up = \"10MB/s\"\n"),
        case("rate of fractional bytes", "image = \"x\"\n[network]\nbandwidth_up = \"1bit\"\n"),
        case("zero rate", "image = \"x\"\n[disk_io]\nbytes_per_sec = \"0MiB/s\"\n"),
        case("zero iops", "image = \"x\"\n[disk_io]\niops = 0\n"),
        case("bad devices", "image = \"x\"\ndevices = [\"01:00.0\", \"/dev/vfio/12\", \"0000:01:00.0\", \"/sys/bus/pci/devices/0000:01:00.0\"]\n"),
        case("standby with a device", "image = \"x\"\nstate = \"standby\"\ndevices = [\"0000:01:00.0\"]\n"),
        case("volume without source and path", "image = \"x\"\n[[volumes]]\nreadonly = true\n"),
        case("inline volume without path", "image = \"x\"\nvolumes = [{ source = \"/srv/a.raw\" }]\n"),
        case("bad volume paths", "image = \"x\"\n[[volumes]]\nsource = \"data.raw\"\npath = \"data\"\n[[volumes]]\nsource = \"/srv/b.raw\"\npath = \"/\"\n[[volumes]]\nsource = \"/srv/c.raw\"\npath = \"/srv/../etc\"\n"),
        case("volume reuse", "image = \"x\"\n[[volumes]]\nsource = \"/srv/a.raw\"\npath = \"/data\"\n[[volumes]]\nsource = \"/srv/a.raw\"\npath = \"/data/\"\n"),
        case("env_files not a list", "image = \"x\"\nenv_files = \"/run/secrets/web.env\"\n"),
        case(
            "bad env_files paths",
            "image = \"x\"\nenv_files = [\"web.env\", \"/run/secrets/../web.env\", \"/run/secrets/\", \"/run/a\\tb.env\", \"/run/secrets/web.env\", \"/run/secrets/web.env\"]\n",
        ),
        Case { title: "invalid file name", file: "instances/Web_1.toml", limits: Limits::default(), text: "image = \"x\"\n" },
        Case { title: "invalid file name and syntax error", file: "instances/-web.toml", limits: Limits::default(), text: "image = \n" },
        case(
            "many problems in one file: all are reported, in file order",
            "image = \"x\"\nstate = \"on\"\nvcpus = 0\nmemory = \"1GB\"\nworkdir = \"tmp\"\n[network]\nbandwidth_down = \"100M\"\n",
        ),
    ];
    let mut out = String::new();
    for c in &cases {
        let diagnostics = match parse_instance(Path::new(c.file), c.text, &c.limits) {
            Ok(spec) => panic!("{}: accepted: {spec:?}", c.title),
            Err(d) => d,
        };
        out.push_str(&format!("── {} ──\n{}", c.title, c.text));
        out.push_str(
            &render(&diagnostics)
                .lines()
                .map(|l| format!("  → {l}\n"))
                .collect::<String>(),
        );
        out.push('\n');
    }
    insta::assert_snapshot!("error_messages", out);
}

#[test]
fn locations_point_at_the_offending_value() {
    let d = parse("image = \"x\"\n\n[network]\n  bandwidth_up =   \"1X/s\"\n").unwrap_err();
    assert_eq!((d[0].line, d[0].column), (4, 20));
    let d = parse("image = \"x\"\n[env]\n  OK = \"a\"\n  \"a b\" = \"c\"\n").unwrap_err();
    assert_eq!((d[0].line, d[0].column), (4, 3));
}

#[test]
fn instance_names_come_from_declaration_files_only() {
    let cases = [
        ("web.toml", DeclFile::Instance("web".into())),
        (
            "/etc/hypeman/instances/a-1.toml",
            DeclFile::Instance("a-1".into()),
        ),
        ("0.toml", DeclFile::Instance("0".into())),
        ("Web.toml", DeclFile::InvalidName("Web.toml".into())),
        ("web_1.toml", DeclFile::InvalidName("web_1.toml".into())),
        ("-web.toml", DeclFile::InvalidName("-web.toml".into())),
        ("web-.toml", DeclFile::InvalidName("web-.toml".into())),
        (
            "web.prod.toml",
            DeclFile::InvalidName("web.prod.toml".into()),
        ),
        ("web.toml", DeclFile::Instance("web".into())),
        (".toml", DeclFile::Ignored),
        (".web.toml", DeclFile::Ignored),
        (".web.toml.swp", DeclFile::Ignored),
        (".#web.toml", DeclFile::Ignored),
        ("#web.toml#", DeclFile::Ignored),
        ("web.toml~", DeclFile::Ignored),
        ("web.toml.swp", DeclFile::Ignored),
        ("web.toml.tmp", DeclFile::Ignored),
        ("web.TOML", DeclFile::Ignored),
        ("web", DeclFile::Ignored),
        ("README.md", DeclFile::Ignored),
        ("/", DeclFile::Ignored),
    ];
    for (path, want) in cases {
        assert_eq!(instance_name(Path::new(path)), want, "{path}");
    }
    let long = format!("{}.toml", "a".repeat(63));
    assert_eq!(
        instance_name(Path::new(&long)),
        DeclFile::Instance("a".repeat(63))
    );
    let too_long = format!("{}.toml", "a".repeat(64));
    assert_eq!(
        instance_name(Path::new(&too_long)),
        DeclFile::InvalidName(too_long.clone())
    );
}

#[test]
fn names_follow_the_dns_label_rule() {
    for ok in ["a", "0", "web", "web-1", "a--b", &"x".repeat(63)] {
        assert!(is_valid_name(ok), "{ok}");
    }
    for bad in ["", "-", "-a", "a-", "A", "a_b", "a.b", "é", &"x".repeat(64)] {
        assert!(!is_valid_name(bad), "{bad}");
    }
}

/// Messages with the temp dir replaced, so assertions read like the output.
fn relative(dir: &Path, diagnostics: &[Diagnostic]) -> Vec<String> {
    diagnostics
        .iter()
        .map(|d| d.to_string().replace(&format!("{}/", dir.display()), ""))
        .collect()
}

#[test]
fn scan_sorts_files_into_valid_invalid_and_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("instances");
    let store = tmp.path().join("store");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&store).unwrap();
    let write = |name: &str, text: &str| fs::write(dir.join(name), text).unwrap();

    write("good.toml", "image = \"busybox\"\n");
    write("broken.toml", "image = \"busybox\"\nvcpus = 0\n");
    write("Bad_Name.toml", "image = \"busybox\"\n");
    for ignored in [
        ".hidden.toml",
        "#good.toml#",
        "good.toml~",
        "good.toml.swp",
        ".good.toml.swp",
        "good.toml.tmp",
        "notes.txt",
    ] {
        write(ignored, "this is not toml = = =");
    }
    fs::create_dir(dir.join("adir.toml")).unwrap();
    // NixOS: /etc entries are links into the store, whose names differ.
    fs::write(
        store.join("abc123-linked.toml"),
        "image = \"busybox\"\nstate = \"stopped\"\n",
    )
    .unwrap();
    symlink(store.join("abc123-linked.toml"), dir.join("linked.toml")).unwrap();
    symlink(store.join("missing.toml"), dir.join("dangling.toml")).unwrap();
    // Emacs' lock file is a dangling symlink; it must not show up at all.
    symlink("user@host.1234:1", dir.join(".#good.toml")).unwrap();

    let scan = scan_dir(&dir, &Limits::default());
    assert!(scan.complete);
    assert_eq!(scan.valid.keys().collect::<Vec<_>>(), ["good", "linked"]);
    assert_eq!(scan.valid["linked"].state, DesiredState::Stopped);
    assert_eq!(scan.valid["linked"].source, dir.join("linked.toml"));
    assert_eq!(
        scan.invalid.keys().collect::<Vec<_>>(),
        ["adir", "broken", "dangling"]
    );
    assert_eq!(
        relative(&dir, &scan.invalid["adir"]),
        ["adir.toml:1:1: a directory: instances/ holds one <name>.toml file per instance; move it away or rename it"]
    );
    assert_eq!(
        relative(&dir, &scan.invalid["broken"]),
        ["broken.toml:2:9: vcpus = 0: must be between 1 and 32 (limits.max_vcpus)"]
    );
    assert_eq!(
        relative(&dir, &scan.invalid["dangling"]),
        [format!(
            "dangling.toml:1:1: a symbolic link to {}, which does not exist: fix the link or remove it",
            store.join("missing.toml").display()
        )]
    );
    assert_eq!(
        relative(&dir, &scan.problems),
        ["Bad_Name.toml:1:1: file name \"Bad_Name.toml\": \"Bad_Name\" is not a valid instance name \
          (1 to 63 of a-z, 0-9 and `-`, starting and ending with a letter or digit)"]
    );
    assert_eq!(scan.all_diagnostics().len(), 4);
}

#[test]
fn a_missing_directory_is_an_empty_complete_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let scan = scan_dir(&tmp.path().join("instances"), &Limits::default());
    assert!(scan.complete);
    assert!(scan.valid.is_empty() && scan.invalid.is_empty() && scan.problems.is_empty());
}

#[test]
fn an_unlistable_directory_makes_an_incomplete_scan() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where the directory should be: listing fails, and not with
    // NotFound, so the scan must say it saw nothing rather than "no instances".
    let not_a_dir = tmp.path().join("instances");
    fs::write(&not_a_dir, "").unwrap();
    let scan = scan_dir(&not_a_dir, &Limits::default());
    assert!(!scan.complete);
    assert_eq!(scan.problems.len(), 1);
    assert!(
        scan.problems[0]
            .message
            .starts_with("cannot list directory: "),
        "{}",
        scan.problems[0]
    );
}

#[test]
fn load_follows_symlinks_and_names_the_instance_after_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("0abc-hypeman-web.toml");
    fs::write(&target, "image = \"nginx\"\n").unwrap();
    let link = tmp.path().join("web.toml");
    symlink(&target, &link).unwrap();
    let spec = load_instance(&link, &Limits::default()).unwrap();
    assert_eq!(
        (spec.name.as_str(), spec.source.as_path()),
        ("web", link.as_path())
    );
}

#[test]
fn load_errors_carry_the_path_and_render_as_diagnostics() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("gone.toml");
    let err = load_instance(&missing, &Limits::default()).unwrap_err();
    assert!(matches!(err, DeclarationError::Read { .. }));
    assert_eq!(
        err.to_string(),
        format!("cannot read declaration {}", missing.display())
    );
    assert_eq!(
        err.diagnostics()[0].to_string(),
        format!(
            "{}:1:1: cannot read: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let bad = tmp.path().join("bad.toml");
    fs::write(&bad, "image = \"x\"\nvcpus = 0\nstate = \"on\"\n").unwrap();
    let err = load_instance(&bad, &Limits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("invalid declaration {}", bad.display())
    );
    assert_eq!(err.diagnostics().len(), 2);
}

/// The format reference in `raw.rs` is a valid declaration, so it cannot
/// drift from what the parser accepts.
#[test]
fn the_format_reference_in_the_docs_is_valid() {
    let source = include_str!("raw.rs");
    let start = source.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
    let end = start + source[start..].find("//! ```\n").unwrap();
    let text: String = source[start..end]
        .lines()
        .map(|l| {
            format!(
                "{}\n",
                l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
            )
        })
        .collect();
    let spec = parse(&text).unwrap_or_else(|d| panic!("{text}\n{}", render(&d)));
    assert_eq!(spec.network.bandwidth_up.bytes_per_sec, Some(10 << 20));
    assert_eq!(spec.volumes.len(), 1);
}

/// Answers for a host with the files it is given; every other path does
/// not exist.
struct FakeHost(Vec<(&'static str, Result<host::Inspected, io::ErrorKind>)>);

impl VolumeHost for FakeHost {
    fn inspect(&self, source: &Path) -> io::Result<Option<host::Inspected>> {
        match self.0.iter().find(|(p, _)| Path::new(p) == source) {
            Some((_, Ok(found))) => Ok(Some(found.clone())),
            Some((_, Err(kind))) => Err(io::Error::from(*kind)),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

fn found(resolved: &str, kind: SourceKind) -> Result<host::Inspected, io::ErrorKind> {
    Ok(host::Inspected { resolved: resolved.into(), kind })
}

fn fake_host() -> FakeHost {
    FakeHost(vec![
        ("/srv/data.raw", found("/srv/data.raw", SourceKind::File)),
        ("/srv/link.raw", found("/srv/data.raw", SourceKind::File)),
        ("/srv/dir", found("/srv/dir", SourceKind::Directory)),
        ("/dev/sdb", found("/dev/sdb", SourceKind::BlockDevice)),
        ("/dev/disk/by-id/x", found("/dev/sdb", SourceKind::BlockDevice)),
        ("/dev/null", found("/dev/null", SourceKind::Other)),
        ("/srv/secret.raw", Err(io::ErrorKind::PermissionDenied)),
        ("/srv/data.raw/x", Err(io::ErrorKind::NotADirectory)),
    ])
}

/// Long values shown by their first 100 characters of each line, so the
/// snapshot shows the input without holding megabytes.
fn abbreviated(text: &str) -> String {
    text.lines()
        .map(|l| match l.char_indices().nth(100) {
            Some((cut, _)) => format!("{}… ({} bytes)\n", &l[..cut], l.len()),
            None => format!("{l}\n"),
        })
        .collect()
}

/// An `[env]` value is never repeated in a message (they reach the
/// daemon's log and `status`): only its name and position are.
#[test]
fn no_message_shows_an_env_value() {
    let marker = "s3cr3t-marker";
    let max = EXEC_STRING_MAX as usize;
    let texts = [
        format!("image = \"x\"\n[env]\nDB_PASSWORD = \"{marker}\\u0000\"\n"),
        format!("image = \"x\"\n[env]\nDB_PASSWORD = \"{marker}{}\"\n", "x".repeat(max)),
        format!(
            "image = \"x\"\ncmd = [{}]\n[env]\nDB_PASSWORD = \"{marker}{}\"\n",
            vec![format!("\"{}\"", "y".repeat(max)); 7].join(", "),
            "x".repeat(max - 30)
        ),
    ];
    for text in &texts {
        let diagnostics = parse_instance(Path::new("instances/web.toml"), text, &Limits::default()).unwrap_err();
        let shown = render(&diagnostics);
        assert!(shown.contains("env.DB_PASSWORD = …:"), "{shown}");
        assert!(!shown.contains(marker), "{shown}");
    }
}

/// `load_instance` reads the env files for their digest (never keeping
/// their values): the digest follows the variables, and is `None` while a
/// file cannot be used.
#[test]
fn loading_a_declaration_takes_its_env_files_digest() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let env = tmp.path().join("web.env");
    let decl = tmp.path().join("web.toml");
    std::fs::write(&decl, format!("image = \"x\"\nenv_files = [\"{}\"]\n", env.display())).unwrap();
    let digest = || load_instance(&decl, &Limits::default()).expect("valid").env_files_digest;
    assert_eq!(digest(), None, "no file yet: nothing known, and still a valid declaration");
    std::fs::write(&env, "TOKEN=one\n").unwrap();
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    let one = digest().expect("readable");
    std::fs::write(&env, "# rotated\nTOKEN = \"one\"\n").unwrap();
    assert_eq!(digest().as_ref(), Some(&one), "the same variables");
    std::fs::write(&env, "TOKEN=tok-value-2\n").unwrap();
    let two = digest().expect("readable");
    assert_ne!(one, two);
    let spec = load_instance(&decl, &Limits::default()).unwrap();
    assert!(!format!("{spec:?}").contains("tok-value-2"), "the values are not in the spec");
    std::fs::write(&env, "TOKEN\n").unwrap();
    assert_eq!(digest(), None, "malformed: nothing known");
}

/// A changed env file is a change (named `env_files`) to a guest whose
/// record has another digest; a file that cannot be read now is not.
#[test]
fn a_changed_env_file_is_a_pending_change_and_an_unreadable_one_is_not() {
    use crate::hypervisor::HypervisorKind::Qemu;
    let spec = parse_instance(Path::new("instances/web.toml"), "image = \"x\"\nenv_files = [\"/run/secrets/web.env\"]\n", &Limits::default()).unwrap();
    let with = |digest: Option<&str>| InstanceSpec { env_files_digest: digest.map(str::to_string), ..spec.clone() };
    let applied = with(Some("sha256:aa")).applied_for(Qemu);
    assert!(with(Some("sha256:aa")).changes_since(&applied, Qemu).is_empty());
    assert_eq!(with(Some("sha256:bb")).changes_since(&applied, Qemu), vec!["env_files"]);
    assert!(with(None).changes_since(&applied, Qemu).is_empty(), "unknown now: not a change");
    // Another list of files is a change whatever can be read.
    let other = InstanceSpec { env_files: vec!["/run/secrets/other.env".into()], ..with(None) };
    assert_eq!(other.changes_since(&applied, Qemu), vec!["env_files"]);
    // A record from before env_files (none, no digest) and a declaration without any: no change.
    let plain = parse_instance(Path::new("instances/web.toml"), "image = \"x\"\n", &Limits::default()).unwrap();
    let old: crate::store::AppliedDeclaration = serde_json::from_str("{\"image\": \"x\", \"hypervisor\": \"qemu\"}").unwrap();
    assert!(plain.changes_since(&old, Qemu).is_empty());
    assert!(!serde_json::to_string(&plain.applied_for(Qemu)).unwrap().contains("env_files"), "left out when empty");
}

/// Every message about the size of the input and about volume sources
/// on the host, rendered into one snapshot.
#[test]
fn every_input_limit_and_volume_source_message() {
    let max = EXEC_STRING_MAX as usize;
    let big = |n: usize| "x".repeat(n);
    let nine_big_args = format!(
        "image = \"x\"\ncmd = [{}]\n",
        (0..9).map(|_| format!("\"{}\"", big(120_000))).collect::<Vec<_>>().join(", ")
    );
    let many_empty_args = format!(
        "image = \"x\"\nentrypoint = [\"/bin/true\"]\ncmd = [{}]\n",
        vec!["\"\""; 120_000].join(",")
    );
    let cases: Vec<(&str, String)> = vec![
        ("an argument one byte over the kernel's", format!("image = \"x\"\nentrypoint = [\"/bin/echo\", \"{}\"]\n", big(max + 1))),
        ("an environment string over the kernel's", format!("image = \"x\"\n[env]\nBIG = \"{}\"\n", big(max - 3))),
        ("arguments that together pass max_exec_size", nine_big_args),
        ("empty arguments count their NUL and pointer", many_empty_args),
        (
            "cmd and env together: reported where the total passes",
            format!(
                "image = \"x\"\ncmd = [{}]\n[env]\n{}",
                vec![format!("\"{}\"", big(max)); 4].join(", "),
                ["A", "B", "C", "D", "E"].map(|k| format!("{k} = \"{}\"\n", big(max - 2))).concat()
            ),
        ),
        ("volume source with ..", "image = \"x\"\n[[volumes]]\nsource = \"/srv/../etc/shadow\"\npath = \"/data\"\n".into()),
        ("volume source that is a directory", "image = \"x\"\n[[volumes]]\nsource = \"/srv/dir\"\npath = \"/data\"\n".into()),
        ("block device without block_device", "image = \"x\"\n[[volumes]]\nsource = \"/dev/disk/by-id/x\"\npath = \"/data\"\n".into()),
        ("block_device = true on a file", "image = \"x\"\n[[volumes]]\nsource = \"/srv/link.raw\"\npath = \"/data\"\nblock_device = true\n".into()),
        ("a character device", "image = \"x\"\n[[volumes]]\nsource = \"/dev/null\"\npath = \"/data\"\n".into()),
        ("a source that cannot be looked at", "image = \"x\"\n[[volumes]]\nsource = \"/srv/data.raw/x\"\npath = \"/data\"\n".into()),
        (
            "two links to one file",
            "image = \"x\"\n[[volumes]]\nsource = \"/srv/data.raw\"\npath = \"/a\"\n[[volumes]]\nsource = \"/srv/link.raw\"\npath = \"/b\"\n".into(),
        ),
    ];
    let mut out = String::new();
    for (title, text) in &cases {
        let diagnostics = match parse_instance_on(Path::new("instances/web.toml"), text, &Limits::default(), &fake_host()) {
            Ok(spec) => panic!("{title}: accepted: {:?}", spec.volumes),
            Err(d) => d,
        };
        out.push_str(&format!("── {title} ──\n{}", abbreviated(text)));
        out.push_str(&render(&diagnostics).lines().map(|l| format!("  → {l}\n")).collect::<String>());
        out.push('\n');
    }
    insta::assert_snapshot!("input_limit_messages", out);
}

#[test]
fn the_kernels_limits_are_met_exactly() {
    let max = EXEC_STRING_MAX as usize;
    let text = format!(
        "image = \"x\"\ncmd = [\"{}\"]\n[env]\nAB = \"{}\"\n",
        "x".repeat(max),
        "y".repeat(max - 3)
    );
    let spec = parse(&text).unwrap_or_else(|d| panic!("{}", render(&d)));
    assert_eq!(spec.cmd.unwrap()[0].len(), max);
    // A total exactly at the limit passes; one byte more does not.
    let limits = |max_exec_size| Limits { max_exec_size: ByteSize(max_exec_size), ..Limits::default() };
    let text = "image = \"x\"\ncmd = [\"abc\", \"\"]\n[env]\nK = \"v\"\n";
    let cost = (3 + 9) + 9 + (3 + 9);
    assert!(parse_instance(Path::new("instances/web.toml"), text, &limits(cost)).is_ok());
    let d = parse_instance(Path::new("instances/web.toml"), text, &limits(cost - 1)).unwrap_err();
    assert_eq!((d.len(), d[0].line), (1, 4), "{}", render(&d));
}

#[test]
fn volume_sources_are_resolved_once_and_kept_as_declared_for_the_record() {
    let text = "image = \"x\"\n[[volumes]]\nsource = \"/srv/link.raw\"\npath = \"/a\"\n\
                [[volumes]]\nsource = \"/dev/disk/by-id/x\"\npath = \"/b\"\nblock_device = true\n\
                [[volumes]]\nsource = \"/srv/later.raw\"\npath = \"/c\"\n\
                [[volumes]]\nsource = \"/srv/secret.raw\"\npath = \"/d\"\n";
    let spec = parse_instance_on(Path::new("instances/web.toml"), text, &Limits::default(), &fake_host())
        .unwrap_or_else(|d| panic!("{}", render(&d)));
    let got: Vec<_> = spec
        .volumes
        .iter()
        .map(|v| (v.source.to_str().unwrap(), v.declared.to_str().unwrap(), v.block_device))
        .collect();
    assert_eq!(
        got,
        [
            ("/srv/data.raw", "/srv/link.raw", false),
            ("/dev/sdb", "/dev/disk/by-id/x", true),
            // Not there yet, or not visible to this user: taken as
            // written, checked when the VM is made.
            ("/srv/later.raw", "/srv/later.raw", false),
            ("/srv/secret.raw", "/srv/secret.raw", false),
        ]
    );
    // The guest's record keeps what the file says, so a link that now
    // points elsewhere is not a declaration change.
    let applied = spec.applied_for(HypervisorKind::Qemu);
    assert_eq!(applied.volumes[0].source, Path::new("/srv/link.raw"));
    // Without a host (parse_instance), nothing is looked at.
    let pure = parse(text).unwrap();
    assert_eq!(pure.volumes[0].source, Path::new("/srv/link.raw"));
}

#[test]
fn load_resolves_volume_symlinks_on_this_host() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real.raw");
    fs::write(&real, b"disk").unwrap();
    symlink(&real, tmp.path().join("link.raw")).unwrap();
    let decl = tmp.path().join("web.toml");
    fs::write(
        &decl,
        format!("image = \"x\"\n[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n", tmp.path().join("link.raw").display()),
    )
    .unwrap();
    let spec = load_instance(&decl, &Limits::default()).unwrap();
    assert_eq!(spec.volumes[0].source, fs::canonicalize(&real).unwrap());
    fs::write(
        &decl,
        format!("image = \"x\"\n[[volumes]]\nsource = \"{}\"\npath = \"/data\"\n", tmp.path().display()),
    )
    .unwrap();
    let err = load_instance(&decl, &Limits::default()).unwrap_err();
    let d = err.diagnostics();
    assert_eq!((d[0].line, d[0].column), (3, 10));
    assert!(d[0].message.ends_with(": is a directory; a volume is a raw disk image file (or a block device with block_device = true)"), "{}", d[0]);
}

/// A declaration over the size limit is refused by its size, naming the
/// file, without being read: a sparse 2 GiB file costs no memory.
#[test]
fn a_declaration_over_the_size_limit_is_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.toml");
    fs::File::create(&path).unwrap().set_len(2 * GIB).unwrap();
    let err = load_instance(&path, &Limits::default()).unwrap_err();
    assert!(matches!(err, DeclarationError::TooLarge { size: Some(n), .. } if n == 2 * GIB), "{err:?}");
    assert_eq!(
        err.diagnostics()[0].to_string(),
        format!(
            "{}:1:1: is 2.0 GiB, over limits.max_declaration_size (1MiB); it is not read: \
             a declaration needs a few KiB, so this is likely the wrong file",
            path.display()
        )
    );
    // The scan and the daemon's reader report it as an invalid declaration.
    let scan = scan_dir(tmp.path(), &Limits::default());
    assert_eq!(scan.invalid["huge"].len(), 1);
    assert!(desired::read(tmp.path(), "huge", &Limits::default()).invalid().unwrap().contains("max_declaration_size"));
    // Exactly at the limit is read.
    let limit = Limits { max_declaration_size: ByteSize(12), ..Limits::default() };
    fs::write(&path, "image = \"x\"\n").unwrap();
    assert!(load_instance(&path, &limit).is_ok());
    fs::write(&path, "image = \"xy\"\n").unwrap();
    assert!(matches!(load_instance(&path, &limit), Err(DeclarationError::TooLarge { size: Some(13), .. })));
}

/// The reader stops one byte past the limit whatever the source holds (a
/// file that grows after its size was looked at, or a device).
#[test]
fn the_reader_reads_at_most_one_byte_past_the_limit() {
    struct Endless(u64);
    impl io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(b'a');
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
    }
    let mut source = Endless(0);
    assert_eq!(read_at_most(&mut source, MIB).unwrap(), None);
    assert_eq!(source.0, MIB + 1);
    assert_eq!(read_at_most(&b"image = 1"[..], 9).unwrap().as_deref(), Some("image = 1"));
    assert_eq!(read_at_most(&[0xffu8, 0xfe][..], 9).unwrap_err().kind(), io::ErrorKind::InvalidData);
}
