//! The `hypeman` command line: argument parsing, and one function per
//! command over the library.
//!
//! Owns the user-facing contracts of DESIGN.md ("Contracts"): command and
//! option names, `status --json` keys, `validate`'s `path:line:column:
//! message` lines and exit codes. Commands other than `daemon` only read:
//! they open the store with [`Store::open_read_only`] (no repair beside a
//! live daemon) and never call a hypervisor operation that changes a VM.
//! What the daemon would *do* is computed by the same `reconcile::plan` the
//! daemon uses, so `hypeman plan` cannot drift from it.
//!
//! ```text
//!  args ──clap──► Command ──► validate | status | wait | logs | plan | daemon
//!                                │        └──────┴──────┘
//!                                │     view::look (declaration + observe)
//!                                ▼
//!                     settings + declaration::scan_dir
//! ```
//!
//! Errors are one [`CliError`]; `main` prints its chain once. `validate`
//! reports problems through its exit code and output, not as an error.

mod image;
mod logs;
mod plan;
mod progress;
pub mod serve;
mod status;
mod validate;
mod view;
mod wait;

pub use logs::LogSource;
pub use plan::{plan_rows, PlanRow};
pub use status::{status_all, status_of, InstanceStatus};
pub use validate::validate;
pub use wait::wait_for;

use crate::declaration::spec::InstanceSpec;
use crate::declaration::Diagnostic;
use crate::hypervisor::{Backends, VmConfig};
use crate::instances::{Instances, ProvisionError, Provisioner};
use crate::settings::{Settings, SettingsError};
use crate::state::VmState;
use crate::store::{GuestPaths, Metadata, Store, StoreError};
use async_trait::async_trait;
use clap::{Parser, Subcommand};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How often `wait` looks at the instance.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Declarative microVM manager: converges <config-dir>/instances/*.toml onto
/// Cloud Hypervisor or QEMU microVMs.
#[derive(Debug, Parser)]
#[command(name = "hypeman", version)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// Settings (hypeman.toml) and declarations (instances/*.toml) live here.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "HYPEMAN_CONFIG_DIR",
        hide_env_values = true,
        default_value = "/etc/hypeman",
        display_order = 100
    )]
    pub config_dir: PathBuf,
    /// Guests, images and logs live here [default: data_dir from
    /// hypeman.toml, else /var/lib/hypeman].
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "HYPEMAN_DATA_DIR",
        hide_env_values = true,
        display_order = 101
    )]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the reconciling daemon until SIGTERM or SIGINT.
    ///
    /// VMs keep running after it exits and are adopted when it starts again.
    Daemon,
    /// Check the settings and every declaration.
    ///
    /// Prints `ok: N instances` on stdout and exits 0, or prints one
    /// `path:line:column: message` line per problem on stderr and exits 1.
    Validate,
    /// Show instances: declared ones and those still on disk.
    ///
    /// JSON keys: name, id, desired_state, state, hypervisor, ip, pid,
    /// has_snapshot, last_error, pending_change.
    Status {
        /// An instance name, guest ID or unique ID prefix.
        name: Option<String>,
        /// One JSON object for NAME, else a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Wait until an instance is in a state.
    ///
    /// Exits 0 once it is, non-zero with the last state seen on timeout.
    Wait {
        /// An instance name, guest ID or unique ID prefix.
        name: String,
        /// Stopped, Created, Running, Paused, Shutdown, Standby or Unknown
        /// (any case).
        #[arg(long, value_parser = parse_state)]
        state: VmState,
        /// How long to wait, e.g. 30s, 2m, 1h 30m.
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print an instance's log.
    ///
    /// Bytes as written, except that the app log's serial-console line
    /// endings (\r\n) are printed as \n; with --follow, until interrupted.
    Logs {
        /// An instance name, guest ID or unique ID prefix.
        name: String,
        /// Which of the instance's logs to read.
        #[arg(long, value_enum, default_value_t = LogSource::App)]
        source: LogSource,
        /// How many lines from the end to print first.
        #[arg(long, value_name = "N", default_value_t = 100)]
        tail: usize,
        /// Keep printing what is appended, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Show what the daemon would do next for every instance.
    ///
    /// One line each: `NAME  STATE -> DESIRED: STEP`. Only the next step is
    /// shown; later ones depend on how it turns out.
    Plan,
    /// Boot an instance afresh, as declared (needs a running daemon).
    ///
    /// A running guest is shut down (gracefully, then as a stop would) and
    /// booted again; one held stopped by its restart policy is booted. The
    /// declaration is not changed, and an instance declared stopped or
    /// standby is not booted.
    Restart {
        /// An instance name, guest ID or unique ID prefix.
        name: String,
    },
    /// Stream the daemon's events as they happen (the lines of hypeman.log).
    ///
    /// Steps, errors, restarts, what the daemon found changed: the same
    /// lines as each instance's `hypeman.log`.
    ///
    /// One line each: `TIME  NAME  LEVEL  MESSAGE`, or JSON objects with
    /// --json; until interrupted. Needs a running daemon.
    Events {
        /// Only this instance's (a name, guest ID or unique ID prefix).
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Manage the image cache.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image into the cache (registry, oci:DIR[:TAG] or
    /// oci-archive:FILE[:TAG]) and print its digest.
    Pull {
        /// The image, spelled as in a declaration's `image`.
        reference: String,
    },
    /// List cached images with their size and the instances using them.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a cached image; refused while an instance uses it.
    Rm {
        /// A reference it was pulled as, its digest, or a unique digest prefix.
        image: String,
    },
    /// Remove every cached image that no instance uses.
    Prune,
}

fn parse_state(s: &str) -> Result<VmState, String> {
    s.parse::<VmState>().map_err(|e| e.to_string())
}

/// Everything a command can fail with. `validate` findings are not errors:
/// they are its output.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("the settings are invalid:\n{}", lines(diagnostics))]
    InvalidSettings { diagnostics: Vec<Diagnostic> },
    #[error(transparent)]
    Settings(SettingsError),
    #[error("cannot read the data dir {}", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    /// A lookup that matched more than one guest, or could not be made.
    #[error(transparent)]
    Lookup(StoreError),
    #[error("no instance matches {query:?}: it is not declared in {} and no guest has that name or ID", instances_dir.display())]
    NotFound {
        query: String,
        instances_dir: PathBuf,
    },
    #[error("instance {name} has not been created yet, so it has no logs")]
    NotCreated { name: String },
    #[error(
        "{name} did not become {want} within {}: it is {seen}, last error: {}",
        humantime::format_duration(*timeout),
        last_error.as_deref().unwrap_or("none")
    )]
    WaitTimeout {
        name: String,
        want: VmState,
        timeout: Duration,
        seen: VmState,
        last_error: Option<String>,
    },
    #[error("cannot read the {source_name} log of {name}")]
    Logs {
        name: String,
        source_name: &'static str,
        #[source]
        source: crate::logs::LogsError,
    },
    #[error("cannot write the output")]
    Output(#[source] io::Error),
    #[error("cannot encode the output as JSON")]
    Json(#[source] serde_json::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot listen for signals")]
    Signals(#[source] io::Error),
    #[error("{0}")]
    Image(String),
    #[error("cannot set up provisioning")]
    Provision(#[source] ProvisionError),
    #[error("the daemon failed")]
    Daemon(#[source] crate::daemon::DaemonError),
    #[error(transparent)]
    Api(#[from] crate::api::client::ClientError),
    #[error("no daemon answers on {}: {what} needs a running daemon (start `hypeman daemon`)", socket.display())]
    NoDaemonFor { what: &'static str, socket: PathBuf },
}

fn lines(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses the process arguments and runs the command. `main` prints the
/// error chain; clap itself exits 2 on a usage error.
pub fn run() -> Result<ExitCode, CliError> {
    // Before any thread or child exists, so all of them (the daemon's VMMs,
    // mkfs, `image pull`'s work) create nothing others can read.
    crate::durable::set_umask();
    let cli = Cli::parse();
    init_tracing(&cli.command);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(dispatch(cli))
}

/// Logs go to stderr; `RUST_LOG` overrides the level. The daemon logs its
/// rare state changes at info; a command only has something to say when a
/// thing is wrong.
fn init_tracing(command: &Command) {
    let default = match command {
        Command::Daemon => "info",
        Command::Validate
        | Command::Status { .. }
        | Command::Wait { .. }
        | Command::Logs { .. }
        | Command::Plan
        | Command::Events { .. }
        | Command::Restart { .. }
        | Command::Image { .. } => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Fails only when a subscriber is already set, which then stays.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        // Colours only for a person at a terminal, not in a log file or journal.
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    let GlobalArgs {
        config_dir,
        data_dir,
    } = cli.global;
    if let Command::Validate = cli.command {
        let stdout = io::stdout();
        let stderr = io::stderr();
        return validate(
            &config_dir,
            data_dir.as_deref(),
            &mut stdout.lock(),
            &mut stderr.lock(),
        );
    }
    let settings = Arc::new(load_settings(&config_dir, data_dir.as_deref())?);
    if let Command::Daemon = cli.command {
        run_daemon(config_dir, settings).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Image { command } = &cli.command {
        return image_command(&config_dir, &settings, command).await;
    }
    let stdout = io::stdout();
    // The daemon's own view when one answers, asked before anything is
    // opened here; else the store's, looked at by this command (and said so).
    if let Command::Status { name, json } = &cli.command {
        let asked = crate::api::Op::Status { name: name.clone() };
        // One status or a list, as asked: read as a list either way.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Answer {
            One(Box<InstanceStatus>),
            All(Vec<InstanceStatus>),
        }
        if let Some(answer) = crate::api::client::ask_as::<Answer>(&settings.data_dir, asked).await? {
            let mut out = io::BufWriter::new(stdout.lock());
            match (answer, json) {
                (Answer::One(one), true) => write_json(&mut out, &one)?,
                (Answer::One(one), false) => status::write_table(&mut out, std::slice::from_ref(&*one)).map_err(CliError::Output)?,
                (Answer::All(all), true) => write_json(&mut out, &all)?,
                (Answer::All(all), false) => status::write_table(&mut out, &all).map_err(CliError::Output)?,
            }
            out.flush().map_err(CliError::Output)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    if let Command::Restart { name } = &cli.command {
        #[derive(serde::Deserialize)]
        struct Restarting {
            message: String,
        }
        let asked = crate::api::Op::Restart { name: name.clone() };
        let answer = crate::api::client::ask_as::<Restarting>(&settings.data_dir, asked)
            .await?
            .ok_or_else(|| CliError::NoDaemonFor { what: "restart", socket: crate::api::socket_path(&settings.data_dir) })?;
        writeln!(stdout.lock(), "{}", answer.message).map_err(CliError::Output)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Events { name, json } = &cli.command {
        let stop = shutdown_signal()?;
        return events(&settings.data_dir, name.clone(), *json, stop).await;
    }
    if let Command::Plan = &cli.command {
        if let Some(rows) = crate::api::client::ask_as::<Vec<PlanRow>>(&settings.data_dir, crate::api::Op::Plan).await? {
            plan::write_plan(&mut stdout.lock(), &rows).map_err(CliError::Output)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let backends = backends(&settings);
    let ctx = Context::open(&config_dir, settings, backends)?;
    match cli.command {
        Command::Status { name, json } => {
            let mut out = stdout.lock();
            note_if_no_answer(&ctx);
            match name {
                Some(query) => {
                    let status = status_of(&ctx, &query).await?;
                    note_if_no_daemon(&ctx);
                    if json {
                        write_json(&mut out, &status)?;
                    } else {
                        status::write_table(&mut out, std::slice::from_ref(&status))
                            .map_err(CliError::Output)?;
                    }
                }
                None => {
                    let all = status_all(&ctx).await?;
                    if !all.is_empty() {
                        note_if_no_daemon(&ctx);
                    }
                    if json {
                        write_json(&mut out, &all)?;
                    } else {
                        status::write_table(&mut out, &all).map_err(CliError::Output)?;
                    }
                }
            }
        }
        Command::Wait {
            name,
            state,
            timeout,
        } => {
            note_if_no_daemon(&ctx);
            let status = wait_for(&ctx, &name, state, timeout, WAIT_POLL).await?;
            writeln!(stdout.lock(), "{} is {}", status.name, status.state)
                .map_err(CliError::Output)?;
        }
        Command::Logs {
            name,
            source,
            tail,
            follow,
        } => {
            let mut out = stdout.lock();
            let stop = shutdown_signal()?;
            let opts = logs::LogsOptions { which: source, tail, follow };
            logs::logs(&ctx, &name, opts, &mut out, &mut io::stderr().lock(), stop).await?;
        }
        Command::Plan => {
            note_if_no_answer(&ctx);
            let rows = plan_rows(&ctx).await?;
            if !rows.is_empty() {
                note_if_no_daemon(&ctx);
            }
            plan::write_plan(&mut stdout.lock(), &rows).map_err(CliError::Output)?;
        }
        // Returned above: they need no guest store.
        Command::Validate | Command::Daemon | Command::Image { .. } | Command::Events { .. } | Command::Restart { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn image_command(config_dir: &Path, settings: &Settings, command: &ImageCommand) -> Result<ExitCode, CliError> {
    let store = crate::images::ImageStore::open(&settings.data_dir, settings.image_store_options())
        .map_err(|e| CliError::Image(crate::instances::error_chain(&e)))?;
    let (stdout, stderr) = (io::stdout(), io::stderr());
    let mut out = stdout.lock();
    match command {
        ImageCommand::Pull { reference } => {
            let style = if stderr.is_terminal() { progress::Style::Terminal } else { progress::Style::Plain };
            image::pull(&store, reference, &progress::StderrProgress::new(style, stderr), &mut out).await?
        }
        ImageCommand::Ls { json } => image::ls(&store, &image::image_users(config_dir, settings), *json, &mut out)?,
        ImageCommand::Rm { image: query } => image::rm(&store, &image::image_users(config_dir, settings), query, &mut out)?,
        ImageCommand::Prune => image::prune(&store, &image::image_users(config_dir, settings), &mut out)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `hypeman events`: prints the daemon's event stream until `stop` or the
/// daemon goes.
async fn events(data_dir: &Path, name: Option<String>, json: bool, stop: impl std::future::Future<Output = ()>) -> Result<ExitCode, CliError> {
    let mut stream = crate::api::client::stream(data_dir, crate::api::Op::Events { name }).await?.ok_or_else(|| {
        CliError::NoDaemonFor { what: "events", socket: crate::api::socket_path(data_dir) }
    })?;
    tokio::pin!(stop);
    let stdout = io::stdout();
    loop {
        let event = tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            e = stream.next::<crate::events::Event>() => e?,
        };
        let Some(event) = event else {
            eprintln!("hypeman: the daemon closed the event stream (it stopped?)");
            return Ok(ExitCode::FAILURE);
        };
        let mut out = stdout.lock();
        match json {
            true => writeln!(out, "{}", serde_json::to_string(&event).map_err(CliError::Json)?),
            false => writeln!(out, "{}  {}  {:<5}  {}", event.time, event.instance, event.level, event.message),
        }
        .map_err(CliError::Output)?;
        out.flush().map_err(CliError::Output)?;
    }
}

/// Says on stderr that a daemon holds the data dir but does not answer on
/// its API socket (one older than the API, or wedged): what follows is
/// the stored view, the VMMs looked at by this command.
fn note_if_no_answer(ctx: &Context) {
    let data_dir = ctx.instances.store().data_dir();
    if crate::daemon::is_running(data_dir) == Some(true) {
        eprintln!(
            "hypeman: the daemon on {} does not answer on {}; showing the stored view (VMMs probed by this command)",
            data_dir.display(),
            crate::api::socket_path(data_dir).display()
        );
    }
}

/// Says on stderr, beside a command's normal output, that no daemon runs
/// on the data dir: declarations are then not applied, and `status`
/// shows the last state the daemon left.
fn note_if_no_daemon(ctx: &Context) {
    let data_dir = ctx.instances.store().data_dir();
    if crate::daemon::is_running(data_dir) == Some(false) {
        eprintln!(
            "hypeman: no daemon is running on {}: declarations are not being applied (start `hypeman daemon`)",
            data_dir.display()
        );
    }
}

fn write_json<T: serde::Serialize>(out: &mut impl Write, value: &T) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(CliError::Json)?;
    writeln!(out).map_err(CliError::Output)
}

/// Loads `<config_dir>/hypeman.toml`; `data_dir` (flag or environment)
/// wins over the file's `data_dir`.
pub fn load_settings(config_dir: &Path, data_dir: Option<&Path>) -> Result<Settings, CliError> {
    Settings::load(config_dir, data_dir).map_err(|e| match e {
        SettingsError::Invalid { diagnostics, .. } => CliError::InvalidSettings { diagnostics },
        read @ SettingsError::Read { .. } => CliError::Settings(read),
    })
}

/// The hypervisor backends this build can drive on this host: Cloud
/// Hypervisor when `[cloud_hypervisor] binary` is found (a path, or a name
/// on `PATH`), and QEMU from `[qemu] binary` and `accel`. The test fake is
/// never returned. An instance whose backend is missing shows as `Unknown`
/// in `status`, with the reason as its last error.
pub fn backends(settings: &Settings) -> Backends {
    Backends {
        cloud_hypervisor: crate::settings::find_executable(&settings.cloud_hypervisor.binary).map(|binary| {
            Arc::new(crate::hypervisor::cloud_hypervisor::CloudHypervisorBackend::new(binary)) as Arc<dyn crate::hypervisor::Hypervisor>
        }),
        qemu: Some(Arc::new(crate::hypervisor::qemu::QemuBackend::new(
            settings.qemu.binary.clone(),
            settings.qemu.accel,
        ))),
    }
}

/// Runs the daemon until SIGTERM or SIGINT. VMs keep running after it stops.
pub async fn run_daemon(config_dir: PathBuf, settings: Arc<Settings>) -> Result<(), CliError> {
    let shutdown = shutdown_signal()?;
    let provisioner = crate::instances::image_provisioner::ImageProvisioner::new(settings.clone())
        .map_err(CliError::Provision)?;
    let cfg = crate::daemon::DaemonConfig {
        api: Some(serve::hook(config_dir.clone(), settings.clone())),
        config_dir,
        backends: backends(&settings),
        settings,
        provisioner: Arc::new(provisioner),
        handle_sighup: true,
    };
    crate::daemon::run(cfg, shutdown).await.map_err(CliError::Daemon)
}

/// Resolves when the process gets SIGINT (Ctrl-C) or SIGTERM. The handlers
/// are installed when this is called, not when the future is first polled,
/// so a signal in between is not lost.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).map_err(CliError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(CliError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// What a read-only command works with: the declarations' directory and an
/// [`Instances`] to observe through.
pub struct Context {
    instances_dir: PathBuf,
    instances: Instances,
}

impl Context {
    /// Opens the data dir read-only, with `backends` to observe VMMs.
    pub fn open(
        config_dir: &Path,
        settings: Arc<Settings>,
        backends: Backends,
    ) -> Result<Context, CliError> {
        let store =
            Store::open_read_only(&settings.data_dir).map_err(|source| CliError::Store {
                path: settings.data_dir.clone(),
                source,
            })?;
        let instances = Instances::new(Arc::new(store), backends, settings, Arc::new(ObserveOnly));
        Ok(Context::new(config_dir, instances))
    }

    /// A context over any [`Instances`]; tests pass one with the fake backend.
    pub fn new(config_dir: &Path, instances: Instances) -> Context {
        Context {
            instances_dir: crate::declaration::instances_dir(config_dir),
            instances,
        }
    }

    pub fn instances(&self) -> &Instances {
        &self.instances
    }

    /// A context over the daemon's own store that never looks at a VMM
    /// (no backends): the daemon's API renders its owners' looks with it.
    pub fn for_daemon(config_dir: &Path, store: Arc<Store>, settings: Arc<Settings>) -> Context {
        let none = Backends { cloud_hypervisor: None, qemu: None };
        Context::new(config_dir, Instances::new(store, none, settings, Arc::new(ObserveOnly)))
    }

    fn store_error(&self, source: StoreError) -> CliError {
        CliError::Store {
            path: self.instances.store().data_dir().to_path_buf(),
            source,
        }
    }
}

/// The provisioner of a CLI that only observes: commands other than
/// `daemon` never create or restore a VM, so being asked is a bug.
struct ObserveOnly;

#[async_trait]
impl Provisioner for ObserveOnly {
    async fn prepare(
        &self,
        spec: &InstanceSpec,
        _guest: &GuestPaths,
        _meta: &Metadata,
    ) -> Result<VmConfig, ProvisionError> {
        Err(ProvisionError::Other(format!(
            "{} cannot be prepared from the command line; only the daemon creates VMs",
            spec.name
        )))
    }
}

#[cfg(test)]
mod tests;
