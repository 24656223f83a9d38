//! Declaration tests: the examples, every distinct error message, and the
//! directory scan's treatment of odd files.

use super::*;
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
