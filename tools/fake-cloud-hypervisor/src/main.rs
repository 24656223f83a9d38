//! `fake-cloud-hypervisor`: stands in for the `cloud-hypervisor` binary in
//! hypeman's daemon tests. It takes the real command line as far as
//! hypeman uses it (`--api-socket path=…`, `--version`), serves the API
//! until `vmm.shutdown` or a guest power-off, and logs every request to
//! stderr (the VMM log). Its guest prints a counter on the serial port.
//!
//! Tuned through the environment, which the daemon passes on:
//! - `FAKE_CH_OPENAPI`: the OpenAPI document to validate against
//!   (required: without it the fake refuses to start);
//! - `FAKE_CH_VERSION` (`53.0.0`): the version it claims and behaves as;
//! - `FAKE_CH_SNAPSHOT_DELAY_MS`, `FAKE_CH_RESIZE_MS`;
//! - `FAKE_CH_PREFAULT_MS` (0): how long an on-demand restore goes on
//!   prefaulting after `vm.restore` answers (v53), refusing snapshots and
//!   migrations meanwhile;
//! - `FAKE_CH_NO_USERFAULTFD=1`: on-demand restores are refused;
//! - `FAKE_CH_IGNORE_POWER_BUTTON=1`;
//! - `FAKE_CH_AUDIT_LOG`: a file every log line is also appended to, so a
//!   test can read what all its VMMs were asked after their guest
//!   directories are gone.

use fake_cloud_hypervisor::openapi::OpenApi;
use fake_cloud_hypervisor::server::{self, Ended, Shared};
use fake_cloud_hypervisor::vmm::{Options, Version};
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn env_ms(name: &str, default: u64) -> Result<Duration, String> {
    match std::env::var(name) {
        Err(_) => Ok(Duration::from_millis(default)),
        Ok(v) => v.parse().map(Duration::from_millis).map_err(|_| format!("{name}={v:?} is not a number of milliseconds")),
    }
}

fn options() -> Result<Options, String> {
    let version = match std::env::var("FAKE_CH_VERSION") {
        Err(_) => Version::V53,
        Ok(v) => Version::parse(&v).ok_or_else(|| format!("FAKE_CH_VERSION={v:?} is not a version"))?,
    };
    Ok(Options {
        version,
        snapshot_delay: env_ms("FAKE_CH_SNAPSHOT_DELAY_MS", 0)?,
        prefault: env_ms("FAKE_CH_PREFAULT_MS", 0)?,
        userfaultfd: std::env::var("FAKE_CH_NO_USERFAULTFD").as_deref() != Ok("1"),
        resize_time: env_ms("FAKE_CH_RESIZE_MS", 60)?,
        ignore_power_button: std::env::var("FAKE_CH_IGNORE_POWER_BUTTON").as_deref() == Ok("1"),
        pid: std::process::id(),
    })
}

/// `--api-socket path=/x` or `--api-socket=path=/x`.
fn parse_args(args: &[String]) -> Result<Option<PathBuf>, String> {
    let mut socket = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = match arg.as_str() {
            // Its default is on; the fake has no filter to install, and
            // takes the switch as the real binary does.
            "--seccomp" => match it.next().map(String::as_str) {
                Some("true" | "false" | "log") => continue,
                other => return Err(format!("--seccomp {other:?}: expected true, false or log")),
            },
            "--api-socket" => it.next().ok_or("--api-socket needs a value")?.clone(),
            a if a.starts_with("--api-socket=") => a["--api-socket=".len()..].to_string(),
            other => return Err(format!("unknown argument {other:?}")),
        };
        let path = value
            .split(',')
            .find_map(|kv| kv.strip_prefix("path="))
            .ok_or_else(|| format!("--api-socket {value:?}: only path= is supported"))?;
        socket = Some(PathBuf::from(path));
    }
    Ok(socket)
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = options()?;
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("cloud-hypervisor v{}", opts.version);
        return Ok(());
    }
    let socket = parse_args(&args)?.ok_or("no --api-socket given")?;
    let spec_path = std::env::var_os("FAKE_CH_OPENAPI").ok_or("FAKE_CH_OPENAPI is not set: no spec to validate against")?;
    let spec = Arc::new(OpenApi::load(&PathBuf::from(spec_path))?);
    if socket.exists() && opts.version.major >= 53 {
        // v53 holds an OFD lock on <path>.lock and removes a stale socket
        // itself; before, bind() below fails on it.
        let _ = std::fs::remove_file(&socket);
    }
    let listener = UnixListener::bind(&socket).map_err(|e| format!("Error creating API socket {}: {e}", socket.display()))?;
    let shared = Arc::new(Shared::new(opts.clone()));
    eprintln!("fake-cloud-hypervisor {} (pid {}) serving {}", opts.version, opts.pid, socket.display());
    let ticker = shared.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        ticker.vmm.lock().expect("poisoned").tick();
    });
    let audit = std::env::var_os("FAKE_CH_AUDIT_LOG")
        .map(|p| std::fs::OpenOptions::new().create(true).append(true).open(&p))
        .transpose()
        .map_err(|e| format!("cannot open FAKE_CH_AUDIT_LOG: {e}"))?;
    let log = |line: &str| {
        eprintln!("{line}");
        if let Some(mut f) = audit.as_ref() {
            let _ = writeln!(f, "[{}] {line}", opts.pid);
        }
    };
    let ended = server::serve(&listener, &shared, &spec, &log);
    if ended == Ended::Exit {
        eprintln!("fake-cloud-hypervisor exiting");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-cloud-hypervisor: {e}");
            ExitCode::FAILURE
        }
    }
}
