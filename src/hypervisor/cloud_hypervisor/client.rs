//! The REST client of one Cloud Hypervisor VMM, over its `--api-socket`.
//!
//! The server is micro-http (reference/hypervisors.md §1.1): HTTP/1.1 with
//! `Content-Length` bodies only (a chunked body breaks the connection), a
//! 204 without any length, and one HTTP thread that blocks on each request
//! until the VMM has finished it. So every call here opens its own
//! connection (as `ch-remote` does), sends a body of known length, reads
//! exactly the reply, and closes; callers serialise calls per VMM, and the
//! slow endpoints (boot, snapshot, restore) get long timeouts.
//!
//! The HTTP is reqwest's, bound to the socket, with its pool turned off
//! and `Connection: close` on every request, so no connection is reused
//! and each one ends as its reply is read, never left idle for a server
//! that serves one connection at a time. No redirects, no proxies, no
//! retries: a `PUT` is sent once.
//!
//! Errors keep the server's own message chain: plain text before v47, a
//! JSON array of strings (outermost first) from v47 on. Any 2xx is success.
//! [`Refusal`] reads what a refusal means from the server's own words, as
//! the real v53.0 binary sends them (reference/hypervisors.md, "Checked
//! against the real cloud-hypervisor v53.0 binary"), so callers decide on a
//! typed value and no caller matches text.

use super::api;
use reqwest::{header, Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{endpoint} got no reply within {secs}s")]
    Timeout { endpoint: Endpoint, secs: u64 },
    #[error("HTTP exchange of {endpoint} failed")]
    Http {
        endpoint: Endpoint,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot set up an HTTP client for {}", socket.display())]
    Client {
        socket: PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot encode the body of {endpoint}")]
    Encode {
        endpoint: Endpoint,
        #[source]
        source: serde_json::Error,
    },
    #[error("{endpoint} answered {status} with an unexpected body {body:?}")]
    Decode {
        endpoint: Endpoint,
        status: u16,
        body: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cloud Hypervisor refused {endpoint} ({status}): {}", messages.join(": "))]
    Refused {
        endpoint: Endpoint,
        status: u16,
        /// The server's error chain, outermost first.
        messages: Vec<String>,
    },
    /// v53 went on refusing because an on-demand restore was still
    /// prefaulting guest memory when the wait ran out.
    #[error(
        "{endpoint} was refused for {} because Cloud Hypervisor was still prefaulting the memory of an on-demand restore (\"{RESTORE_IN_PROGRESS}\"); gave up",
        humantime::format_duration(*waited)
    )]
    StillRestoring { endpoint: Endpoint, waited: Duration },
    /// The request carrying descriptors, written by hand (reqwest cannot
    /// send SCM_RIGHTS), failed on the wire.
    #[error("{endpoint} with descriptors failed on {}", socket.display())]
    Wire {
        endpoint: Endpoint,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{endpoint} got a reply that is not HTTP: {reply:?}")]
    BadReply { endpoint: Endpoint, reply: String },
}

/// The root cause v53 gives while an on-demand restore prefaults (#8556);
/// its tail, "restore is still in progress", is what is matched.
pub const RESTORE_IN_PROGRESS: &str = "VM on-demand memory restore is still in progress";

/// What a refusal means, from the server's words. Each variant is a text
/// the real server sends; the v46 spellings are the errors' `Debug` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No VM (or no config): 404 from v53, "VM is not created" before,
    /// `VmNotCreated` up to v46.
    NotCreated,
    /// "VM is not running": pause, resume, shutdown or the power button
    /// on a VMM whose VM is not booted (only created, or none at all).
    NotRunning,
    /// "VM is already created": a second create, a boot of a booted VM,
    /// a restore into a VMM that holds a VM.
    AlreadyCreated,
    /// "Invalid transition: InvalidStateTransition(Paused, Paused)": the
    /// VM is not in a state the call leads out of; `from == to` means it is
    /// already where the call would take it.
    InvalidTransition { from: api::VmState, to: api::VmState },
    /// [`RESTORE_IN_PROGRESS`]: snapshot or migration during v53's prefault.
    RestoreInProgress,
    /// "File exists (os error 17)": snapshot files are created `O_EXCL`.
    FileExists,
    /// "Destination is not a directory: \"/dir\"" (snapshot or restore).
    NotADirectory,
    /// 400: the body did not fit the server's types (`["Bad Request"]`
    /// for a body on an endpoint that takes none).
    BadRequest,
    /// Anything else; the message chain says what.
    Other,
}

impl Refusal {
    /// Reads `messages` (outermost first) as answered with `status`.
    pub fn of(status: u16, messages: &[String]) -> Refusal {
        let root = messages.last().map(String::as_str).unwrap_or_default();
        // Up to v46 the whole body is one `Debug` form, `VmPause(VmNotRunning)`.
        let debug = |name: &str| messages.iter().any(|m| m.contains(name));
        if status == 404 || root == "VM is not created" || debug("VmNotCreated") {
            Refusal::NotCreated
        } else if root == "VM is not running" || debug("VmNotRunning") {
            Refusal::NotRunning
        } else if root == "VM is already created" || debug("VmAlreadyCreated") {
            Refusal::AlreadyCreated
        } else if root.ends_with("restore is still in progress") {
            Refusal::RestoreInProgress
        } else if root.ends_with("File exists (os error 17)") {
            Refusal::FileExists
        } else if messages.iter().any(|m| m.starts_with("Destination is not a directory")) {
            Refusal::NotADirectory
        } else if let Some((from, to)) = messages.iter().find_map(|m| invalid_transition(m)) {
            Refusal::InvalidTransition { from, to }
        } else if status == 400 {
            Refusal::BadRequest
        } else {
            Refusal::Other
        }
    }
}

/// `InvalidStateTransition(Paused, Paused)` anywhere in `message`.
fn invalid_transition(message: &str) -> Option<(api::VmState, api::VmState)> {
    let inside = message.split_once("InvalidStateTransition(")?.1;
    let (from, rest) = inside.split_once(", ")?;
    let to = rest.split(')').next()?;
    let state = |name: &str| serde_json::from_value::<api::VmState>(serde_json::Value::String(name.to_string())).ok();
    Some((state(from)?, state(to)?))
}

impl ApiError {
    /// Nothing listens on the socket: no VMM, or a stale socket file.
    pub fn is_not_listening(&self) -> bool {
        matches!(
            self,
            ApiError::Connect { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
        )
    }

    /// What the server meant, when it refused.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            ApiError::Refused { status, messages, .. } => Some(Refusal::of(*status, messages)),
            _ => None,
        }
    }

    /// The VMM holds no VM: 404 from v53, a 500 saying so before: "VM is
    /// not created" in v47–v52's chain, the error's `Debug` form up to v46
    /// (`VmInfo(VmNotCreated)`).
    pub fn is_not_created(&self) -> bool {
        self.refusal() == Some(Refusal::NotCreated)
    }

    /// The server said anything at all (as opposed to a transport failure).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ApiError::Refused { .. })
    }
}

/// The endpoints hypeman uses, with their method and how long each may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmPause,
    VmResume,
    VmPowerButton,
    VmShutdown,
    VmDelete,
    VmInfo,
    VmResize,
    VmAddDisk,
    VmAddNet,
    VmRemoveDevice,
    VmSnapshot,
    VmRestore,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::VmmPing => "vmm.ping",
            Endpoint::VmmShutdown => "vmm.shutdown",
            Endpoint::VmCreate => "vm.create",
            Endpoint::VmBoot => "vm.boot",
            Endpoint::VmPause => "vm.pause",
            Endpoint::VmResume => "vm.resume",
            Endpoint::VmPowerButton => "vm.power-button",
            Endpoint::VmShutdown => "vm.shutdown",
            Endpoint::VmDelete => "vm.delete",
            Endpoint::VmInfo => "vm.info",
            Endpoint::VmResize => "vm.resize",
            Endpoint::VmAddDisk => "vm.add-disk",
            Endpoint::VmAddNet => "vm.add-net",
            Endpoint::VmRemoveDevice => "vm.remove-device",
            Endpoint::VmSnapshot => "vm.snapshot",
            Endpoint::VmRestore => "vm.restore",
        }
    }

    fn method(self) -> Method {
        match self {
            Endpoint::VmmPing | Endpoint::VmInfo => Method::GET,
            Endpoint::VmmShutdown
            | Endpoint::VmCreate
            | Endpoint::VmBoot
            | Endpoint::VmPause
            | Endpoint::VmResume
            | Endpoint::VmPowerButton
            | Endpoint::VmShutdown
            | Endpoint::VmDelete
            | Endpoint::VmResize
            | Endpoint::VmAddDisk
            | Endpoint::VmAddNet
            | Endpoint::VmRemoveDevice
            | Endpoint::VmSnapshot
            | Endpoint::VmRestore => Method::PUT,
        }
    }

    /// The server answers only when the VMM thread is done, and a request
    /// queues behind any slow one in progress.
    pub fn timeout(self) -> Duration {
        match self {
            Endpoint::VmmPing | Endpoint::VmInfo => Duration::from_secs(10),
            Endpoint::VmPause
            | Endpoint::VmResume
            | Endpoint::VmPowerButton
            | Endpoint::VmResize
            | Endpoint::VmRemoveDevice
            | Endpoint::VmmShutdown
            | Endpoint::VmShutdown
            | Endpoint::VmDelete => Duration::from_secs(30),
            Endpoint::VmCreate | Endpoint::VmBoot | Endpoint::VmAddDisk | Endpoint::VmAddNet => Duration::from_secs(120),
            // Writing or reading all of guest memory.
            Endpoint::VmSnapshot | Endpoint::VmRestore => Duration::from_secs(600),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.path())
    }
}

/// The server's error chain from a reply body: a JSON array of strings
/// (v47 on), or plain text (before, although its Content-Type says JSON).
pub fn error_messages(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return Vec::new();
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        Ok(serde_json::Value::String(s)) => vec![s],
        _ => vec![text.to_string()],
    }
}

/// A Cloud Hypervisor version, from `cloud-hypervisor --version`
/// (`cloud-hypervisor v53.0`, `v53.0-12-gdeadbeef`) or `vmm.ping`
/// (`"version": "53.0.0"`). Both spellings print the same, so a snapshot's
/// recorded version compares equal to the binary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ChVersion {
    /// The first `[v]MAJOR.MINOR[.PATCH]` word of `text`.
    pub fn parse(text: &str) -> Option<ChVersion> {
        text.split_whitespace().find_map(|word| {
            let word = word.strip_prefix('v').unwrap_or(word);
            let numeric: String = word.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let mut parts = numeric.split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u32>().ok());
            let major = parts.next()??;
            let minor = parts.next()??;
            let patch = parts.next().flatten().unwrap_or(0);
            Some(ChVersion { major, minor, patch })
        })
    }

    /// What `vmm.ping` says the VMM is: its `version`, or when that does
    /// not parse, its `build_version`.
    pub fn of_ping(ping: &api::VmmPingResponse) -> Option<ChVersion> {
        ChVersion::parse(&ping.version).or_else(|| ping.build_version.as_deref().and_then(ChVersion::parse))
    }

    /// From v49 a TAP given without `ip`/`mask` keeps the addresses it
    /// has (none, on a bridge port); before, it got 192.168.249.1/24.
    pub fn leaves_tap_addresses_alone(self) -> bool {
        self.major >= 49
    }

    /// From v53 a missing VM is a 404 rather than a 500.
    pub fn not_found_is_404(self) -> bool {
        self.major >= 53
    }
}

impl fmt::Display for ChVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A client of the VMM behind one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    http: reqwest::Client,
}

/// A successful reply: its status and body.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl ApiClient {
    pub fn new(socket: &Path) -> Result<ApiClient, ApiError> {
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .http1_only()
            // No idle connections: each request gets its own, closed after
            // its reply.
            .pool_max_idle_per_host(0)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            // reqwest is built with rustls (for oci-client); by default each
            // client would read every system CA root (milliseconds, and an
            // error on a host with none) for a socket that never speaks TLS.
            .tls_certs_only(std::iter::empty())
            .build()
            .map_err(|source| ApiError::Client { socket: socket.to_path_buf(), source })?;
        Ok(ApiClient { socket: socket.to_path_buf(), http })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    #[tracing::instrument(skip(self, body), fields(socket = %self.socket.display()), level = "debug", err(Display))]
    async fn send(&self, endpoint: Endpoint, body: Option<Vec<u8>>, timeout: Duration) -> Result<Reply, ApiError> {
        let exchange = self.exchange(endpoint, body);
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout { endpoint, secs: timeout.as_secs() })??;
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(ApiError::Refused { endpoint, status: reply.status.as_u16(), messages: error_messages(&reply.body) })
        }
    }

    /// One request on a fresh connection, closed afterwards.
    async fn exchange(&self, endpoint: Endpoint, body: Option<Vec<u8>>) -> Result<Reply, ApiError> {
        // The host names no one: every connection goes to the socket.
        let url = format!("http://localhost/api/v1/{}", endpoint.path());
        let mut request = self
            .http
            .request(endpoint.method(), url)
            .header(header::ACCEPT, "application/json")
            // Without it the connection, though never reused, is closed
            // later by a background task (on a current-thread runtime, not
            // before the caller yields), and a server that serves one
            // connection at a time waits on it. With it, the connection
            // ends as its reply is read.
            .header(header::CONNECTION, "close");
        if let Some(b) = body {
            // A body of known size goes out with its Content-Length, never
            // chunked: micro-http cannot read a chunked body.
            request = request.header(header::CONTENT_TYPE, "application/json").body(b);
        }
        let response = request.send().await.map_err(|e| self.transport(endpoint, e))?;
        let status = response.status();
        // A 204 ends at its headers; a 200 from `vmm.shutdown` may be
        // followed at once by the server closing: the reply is read either way.
        let body = response.bytes().await.map_err(|e| self.transport(endpoint, e))?;
        Ok(Reply { status, body: body.to_vec() })
    }

    /// A failure to connect keeps the OS error, so that "nothing listens"
    /// can be told apart from a VMM that answers badly.
    fn transport(&self, endpoint: Endpoint, e: reqwest::Error) -> ApiError {
        if e.is_connect() {
            if let Some(source) = io_cause(&e) {
                return ApiError::Connect { socket: self.socket.clone(), source };
            }
        }
        ApiError::Http { endpoint, source: e }
    }

    async fn put_empty(&self, endpoint: Endpoint) -> Result<(), ApiError> {
        self.send(endpoint, None, endpoint.timeout()).await.map(|_| ())
    }

    async fn put_json<T: Serialize>(&self, endpoint: Endpoint, body: &T) -> Result<Reply, ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ApiError::Encode { endpoint, source })?;
        self.send(endpoint, Some(bytes), endpoint.timeout()).await
    }

    /// A PUT whose request carries descriptors as SCM_RIGHTS on its first
    /// bytes, as the server takes them (micro-http receives with
    /// `recvmsg`). Written and read by hand on one connection, closed
    /// after the reply: the same request reqwest would send, with
    /// `Content-Length` and `Connection: close`.
    async fn put_json_with_fds<T: Serialize>(&self, endpoint: Endpoint, body: &T, fds: &[std::os::fd::RawFd]) -> Result<Reply, ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ApiError::Encode { endpoint, source })?;
        let mut request = format!(
            "PUT /api/v1/{} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            endpoint.path(),
            bytes.len()
        )
        .into_bytes();
        request.extend_from_slice(&bytes);
        let wire = |source| ApiError::Wire { endpoint, socket: self.socket.clone(), source };
        let exchange = async {
            let mut stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect { socket: self.socket.clone(), source })?;
            crate::hypervisor::fdpass::send_all(&stream, &request, fds).await.map_err(wire)?;
            // micro-http keeps every connection open whatever the request
            // says (it answers `Connection: keep-alive` and closes only
            // when the client hangs up), so the reply ends where its
            // length says, never at the connection's end.
            let mut raw = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if reply_length(&raw).is_some() {
                    break;
                }
                let n = tokio::io::AsyncReadExt::read(&mut stream, &mut chunk).await.map_err(wire)?;
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&chunk[..n]);
            }
            parse_reply(endpoint, &raw)
        };
        let timeout = endpoint.timeout();
        let reply = tokio::time::timeout(timeout, exchange).await.map_err(|_| ApiError::Timeout { endpoint, secs: timeout.as_secs() })??;
        if reply.status.is_success() {
            Ok(reply)
        } else {
            Err(ApiError::Refused { endpoint, status: reply.status.as_u16(), messages: error_messages(&reply.body) })
        }
    }

    fn decode<T: DeserializeOwned>(endpoint: Endpoint, reply: &Reply) -> Result<T, ApiError> {
        serde_json::from_slice(&reply.body).map_err(|source| ApiError::Decode {
            endpoint,
            status: reply.status.as_u16(),
            body: String::from_utf8_lossy(&reply.body).into_owned(),
            source,
        })
    }

    /// `vmm.ping` with its own timeout: probes must not hang on a VMM that
    /// accepts connections but never answers.
    pub async fn ping_within(&self, timeout: Duration) -> Result<api::VmmPingResponse, ApiError> {
        let reply = self.send(Endpoint::VmmPing, None, timeout).await?;
        Self::decode(Endpoint::VmmPing, &reply)
    }

    pub async fn ping(&self) -> Result<api::VmmPingResponse, ApiError> {
        self.ping_within(Endpoint::VmmPing.timeout()).await
    }

    pub async fn info_within(&self, timeout: Duration) -> Result<api::VmInfo, ApiError> {
        let reply = self.send(Endpoint::VmInfo, None, timeout).await?;
        Self::decode(Endpoint::VmInfo, &reply)
    }

    pub async fn info(&self) -> Result<api::VmInfo, ApiError> {
        self.info_within(Endpoint::VmInfo.timeout()).await
    }

    pub async fn create(&self, config: &api::VmConfig) -> Result<(), ApiError> {
        self.put_json(Endpoint::VmCreate, config).await.map(|_| ())
    }

    pub async fn boot(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmBoot).await
    }

    pub async fn pause(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmPause).await
    }

    pub async fn resume(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmResume).await
    }

    pub async fn power_button(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmPowerButton).await
    }

    pub async fn shutdown(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmShutdown).await
    }

    pub async fn delete(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmDelete).await
    }

    /// Sets the guest's total memory, in bytes.
    pub async fn resize_memory(&self, desired_ram: u64) -> Result<(), ApiError> {
        self.put_json(Endpoint::VmResize, &api::VmResize { desired_ram: Some(desired_ram) }).await.map(|_| ())
    }

    /// Hot-plugs into a booted VM (200 with the device's PCI address) or
    /// cold-adds to a created one (204, no body).
    pub async fn add_disk(&self, disk: &api::DiskConfig) -> Result<Option<api::PciDeviceInfo>, ApiError> {
        let reply = self.put_json(Endpoint::VmAddDisk, disk).await?;
        if reply.body.is_empty() {
            return Ok(None);
        }
        Self::decode(Endpoint::VmAddDisk, &reply).map(Some)
    }

    pub async fn remove_device(&self, id: &str) -> Result<(), ApiError> {
        self.put_json(Endpoint::VmRemoveDevice, &api::VmRemoveDevice { id: id.to_string() }).await.map(|_| ())
    }

    /// Snapshots the paused VM into the existing, empty directory `dir`.
    pub async fn snapshot(&self, dir: &Path) -> Result<(), ApiError> {
        let body = api::VmSnapshotConfig { destination_url: file_url(dir) };
        self.put_json(Endpoint::VmSnapshot, &body).await.map(|_| ())
    }

    /// Snapshots as [`snapshot`](Self::snapshot) does, waiting out v53's
    /// prefault after an on-demand restore: while the server answers
    /// [`Refusal::RestoreInProgress`] the snapshot is asked again, every
    /// 50 ms at first and at most every second, for up to `within`; then
    /// [`ApiError::StillRestoring`]. The refusal comes before any file is
    /// written, so `dir` is still empty for the next attempt.
    pub async fn snapshot_after_prefault(&self, dir: &Path, within: Duration) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.snapshot(dir).await {
                Err(e) if e.refusal() == Some(Refusal::RestoreInProgress) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(ApiError::StillRestoring { endpoint: Endpoint::VmSnapshot, waited: within });
                    }
                    tracing::debug!(retry_in = ?pause, "an on-demand restore is still prefaulting; snapshot asked again");
                    tokio::time::sleep(pause.min(deadline - now)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                done => return done,
            }
        }
    }

    /// Restores; the descriptors of `config.net_fds` (in order, as many as
    /// their `num_fds` add up to) go with the request.
    pub async fn restore(&self, config: &api::RestoreConfig, fds: &[std::os::fd::RawFd]) -> Result<(), ApiError> {
        if fds.is_empty() {
            return self.put_json(Endpoint::VmRestore, config).await.map(|_| ());
        }
        self.put_json_with_fds(Endpoint::VmRestore, config, fds).await.map(|_| ())
    }

    /// Adds a NIC backed by `fds` (a TAP the VMM may not open itself). To
    /// a created VM, before its boot: it joins the config (204). `vm.create`
    /// would drop descriptors sent with it, so this is how a VM gets one.
    pub async fn add_net(&self, net: &api::NetConfig, fds: &[std::os::fd::RawFd]) -> Result<(), ApiError> {
        self.put_json_with_fds(Endpoint::VmAddNet, net, fds).await.map(|_| ())
    }

    /// Ends the VMM process; it replies (200, empty) and then exits.
    pub async fn vmm_shutdown(&self) -> Result<(), ApiError> {
        self.put_empty(Endpoint::VmmShutdown).await
    }
}

/// How many bytes of `raw` make one whole reply, once they have all
/// arrived: the head, then `Content-Length` bytes of body, or none for a
/// 204 or 304 (micro-http sends those without any length). `None` while
/// more is due, and for a reply with a body but no length, which only the
/// connection's end can close.
fn reply_length(raw: &[u8]) -> Option<usize> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?;
    if status == "204" || status == "304" {
        return Some(split + 4);
    }
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())?;
    let whole = split + 4 + length;
    (raw.len() >= whole).then_some(whole)
}

/// A whole HTTP/1.1 reply: its status and its body (`Content-Length` long
/// when given, none for a 204 or 304, else what follows the headers up to
/// the connection's end).
fn parse_reply(endpoint: Endpoint, raw: &[u8]) -> Result<Reply, ApiError> {
    let bad = || ApiError::BadReply { endpoint, reply: String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned() };
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(bad)?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>().map_err(|_| bad()))
        .transpose()?;
    let rest = &raw[split + 4..];
    let body = match length {
        _ if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED => Vec::new(),
        Some(n) if n <= rest.len() => rest[..n].to_vec(),
        Some(_) => return Err(bad()),
        None => rest.to_vec(),
    };
    Ok(Reply { status, body })
}

/// The OS error under a reqwest error, rebuilt as an owned `io::Error`
/// with the same code (the chain holds it only by reference).
fn io_cause(e: &reqwest::Error) -> Option<std::io::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(match io.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(io.kind(), io.to_string()),
            });
        }
        cause = c.source();
    }
    None
}

/// `file:///abs/dir`, as `vm.snapshot` and `vm.restore` take directories.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_whole_when_its_length_has_arrived() {
        let ok = b"HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(reply_length(ok), Some(ok.len()), "a 204 ends with its head");
        assert_eq!(reply_length(&ok[..ok.len() - 1]), None, "the head is not complete yet");
        let refused = b"HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n[\"no tap\"]  ";
        assert_eq!(reply_length(&refused[..refused.len() - 1]), None, "one byte of the body is still due");
        assert_eq!(reply_length(refused), Some(refused.len()));
        let mut more = refused.to_vec();
        more.extend_from_slice(b"HTTP/1.1 204");
        assert_eq!(reply_length(&more), Some(refused.len()), "what follows is not this reply's");
        let unbounded = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}";
        assert_eq!(reply_length(unbounded), None, "no length: only the connection's end closes it");
        let reply = parse_reply(Endpoint::VmAddNet, &more).unwrap();
        assert_eq!((reply.status.as_u16(), reply.body.as_slice()), (400, &b"[\"no tap\"]  "[..]));
    }

    /// A request with descriptors against a server that, as micro-http,
    /// keeps the connection open after its reply: the descriptors and the
    /// whole body arrive with it, and the call returns on the reply, not
    /// on the connection's end (which would never come).
    #[tokio::test]
    async fn descriptors_go_with_the_request_and_the_reply_ends_by_its_length() {
        use fake_cloud_hypervisor::http;
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in [http::Response::no_content(), http::Response::json(400, &serde_json::json!(["Error from API", "no TAP"]))] {
                let (stream, _) = listener.accept().unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = std::io::BufReader::new(fake_cloud_hypervisor::fds::FdStream::new(stream));
                let request = http::read_request(&mut reader, &mut writer).unwrap();
                let fds = reader.get_mut().take_fds();
                let contents: Vec<String> = fds.into_iter().map(|fd| std::io::read_to_string(std::fs::File::from(fd)).unwrap()).collect();
                http::write_response(&mut writer, &reply).unwrap();
                // Held open until the client hangs up, as micro-http does.
                let closed = matches!(http::read_request(&mut reader, &mut writer), Err(http::ReadError::Closed));
                seen.push((request.path, request.body, contents, closed));
            }
            seen
        });
        let tap = dir.path().join("tap");
        std::fs::write(&tap, "the tap").unwrap();
        // One open file each: a shared one's offset would be read past.
        let (first, second) = (std::fs::File::open(&tap).unwrap(), std::fs::File::open(&tap).unwrap());
        let client = ApiClient::new(&socket).unwrap();
        let net = api::NetConfig { tap: None, mac: "02:00:00:00:00:09".into(), id: "net0".into(), rate_limiter_config: None };
        let t0 = std::time::Instant::now();
        client.add_net(&net, &[first.as_raw_fd()]).await.unwrap();
        let refused = client.add_net(&net, &[second.as_raw_fd()]).await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "waited for the connection's end: {:?}", t0.elapsed());
        assert!(matches!(&refused, ApiError::Refused { status: 400, messages, .. } if messages == &["Error from API", "no TAP"]), "{refused:?}");
        let seen = server.join().unwrap();
        for (path, body, contents, closed) in seen {
            assert_eq!(path, "/api/v1/vm.add-net");
            assert_eq!(serde_json::from_slice::<api::NetConfig>(&body).unwrap(), net, "the body arrived whole");
            assert_eq!(contents, ["the tap"], "the descriptor is the file sent");
            assert!(closed, "the client hung up after the reply");
        }
    }

    #[test]
    fn error_bodies_of_every_era_become_a_chain() {
        assert_eq!(
            error_messages(br#"["Error from API","The VM could not be paused","InvalidStateTransition(Paused, Paused)"]"#),
            ["Error from API", "The VM could not be paused", "InvalidStateTransition(Paused, Paused)"]
        );
        assert_eq!(error_messages(b"VmNotCreated\n"), ["VmNotCreated"]);
        assert_eq!(error_messages(b"\"one\""), ["one"]);
        assert!(error_messages(b"  ").is_empty());
    }

    #[test]
    fn versions_from_both_spellings_compare_equal() {
        let cli = ChVersion::parse("cloud-hypervisor v53.0").unwrap();
        let ping = ChVersion::parse("53.0.0").unwrap();
        assert_eq!(cli, ping);
        assert_eq!(cli.to_string(), "53.0.0");
        assert_eq!(ChVersion::parse("cloud-hypervisor v49.0-12-gdeadbeef").unwrap().to_string(), "49.0.0");
        assert_eq!(ChVersion::parse("v52.1.3").unwrap(), ChVersion { major: 52, minor: 1, patch: 3 });
        assert_eq!(ChVersion::parse("cloud-hypervisor"), None);
        assert_eq!(ChVersion::parse("v53"), None);
        assert!(ChVersion::parse("53.0").unwrap().not_found_is_404());
        assert!(!ChVersion::parse("52.0").unwrap().not_found_is_404());
    }

    #[test]
    fn a_ping_falls_back_to_its_build_version() {
        let ping = |version: &str, build: Option<&str>| api::VmmPingResponse {
            build_version: build.map(str::to_string),
            version: version.to_string(),
            pid: None,
            features: vec![],
        };
        let v53 = ChVersion { major: 53, minor: 0, patch: 0 };
        assert_eq!(ChVersion::of_ping(&ping("53.0.0", Some("v52.0"))), Some(v53), "version comes first");
        assert_eq!(ChVersion::of_ping(&ping("", Some("v53.0-12-gdeadbeef"))), Some(v53));
        assert_eq!(ChVersion::of_ping(&ping("unknown", None)), None);
        assert_eq!(ChVersion::of_ping(&ping("unknown", Some("dirty"))), None);
    }

    #[test]
    fn refusals_are_classified_across_versions() {
        let refused = |status, messages: &[&str]| ApiError::Refused {
            endpoint: Endpoint::VmInfo,
            status,
            messages: messages.iter().map(|m| m.to_string()).collect(),
        };
        assert!(refused(404, &["Error from API", "The VM info is not available", "VM is not created"]).is_not_created());
        assert!(refused(500, &["Error from API", "The VM info is not available", "VM is not created"]).is_not_created());
        assert!(refused(404, &[]).is_not_created());
        // Up to v46 the body is the error's Debug form.
        assert!(refused(500, &["VmInfo(VmNotCreated)"]).is_not_created());
        assert!(refused(500, &["VmBoot(VmNotCreated)"]).is_not_created());
        assert!(!refused(500, &["VmPause(InvalidStateTransition(Paused, Paused))"]).is_not_created());
        assert!(!refused(500, &["Error from API", "InvalidStateTransition(Running, Running)"]).is_not_created());
        let gone = ApiError::Connect {
            socket: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(gone.is_not_listening());
        assert!(!gone.is_refusal());
    }

    /// Every refusal the real v53.0 binary was seen to send (the bodies
    /// from reference/hypervisors.md), and what each means.
    #[test]
    fn the_real_v53_refusals_are_typed() {
        use api::VmState::{Paused, Running};
        let chain = |headline: &str, causes: &[&str]| {
            let mut m = vec!["Error from API".to_string(), headline.to_string()];
            m.extend(causes.iter().map(|c| c.to_string()));
            m
        };
        let table: Vec<(u16, Vec<String>, Refusal)> = vec![
            (404, chain("The VM info is not available", &["VM is not created"]), Refusal::NotCreated),
            (500, chain("Error triggering power button", &["VM is not running"]), Refusal::NotRunning),
            (500, chain("The VM could not resume", &["VM is not running"]), Refusal::NotRunning),
            (500, chain("The VM could not shutdown", &["VM is not running"]), Refusal::NotRunning),
            (400, vec!["Bad Request".to_string()], Refusal::BadRequest),
            (500, chain("The VM could not be created", &["VM is already created"]), Refusal::AlreadyCreated),
            (500, chain("The VM could not boot", &["VM is already created"]), Refusal::AlreadyCreated),
            (500, chain("The VM could not boot", &["Cannot open kernel file", "No such file or directory (os error 2)"]), Refusal::Other),
            (
                500,
                chain(
                    "The VM could not be paused",
                    &["Cannot pause VM", "Failed to pause migratable component", "Invalid transition: InvalidStateTransition(Paused, Paused)"],
                ),
                Refusal::InvalidTransition { from: Paused, to: Paused },
            ),
            (
                500,
                chain("The VM could not be snapshotted", &["Error creating VM config snapshot file", "File exists (os error 17)"]),
                Refusal::FileExists,
            ),
            (500, chain("The VM could not be snapshotted", &["Destination is not a directory: \"/nonexistent/dir\""]), Refusal::NotADirectory),
            (500, chain("The VM could not be snapshotted", &[RESTORE_IN_PROGRESS]), Refusal::RestoreInProgress),
            (500, chain("Error starting migration sender", &[RESTORE_IN_PROGRESS]), Refusal::RestoreInProgress),
            (500, chain("The VM could not be restored", &["VM is already created"]), Refusal::AlreadyCreated),
            (
                500,
                chain(
                    "The VM could not be restored",
                    &["Cannot restore VM", "Failed to send migratable component snapshot", "Destination is not a directory: \"/nonexistent\""],
                ),
                Refusal::NotADirectory,
            ),
            (
                500,
                chain("The VM could not be resized", &["ResizeError(new size 0x0 and requested_size are identical\n\nStack backtrace:\n   0: x"]),
                Refusal::Other,
            ),
            (
                500,
                chain(
                    "The disk could not be added to the VM",
                    &["Cannot open disk path", "I/O error (path=/nonexistent.raw op=open)", "No such file or directory (os error 2)"],
                ),
                Refusal::Other,
            ),
            // Up to v46: the error's Debug form, one plain-text message.
            (500, vec!["VmPause(InvalidStateTransition(Running, Paused))".to_string()], Refusal::InvalidTransition { from: Running, to: Paused }),
            (500, vec!["VmResume(VmNotRunning)".to_string()], Refusal::NotRunning),
            // "restoring" alone is no longer read as the prefault: the real
            // server never says it.
            (500, chain("The VM could not be snapshotted", &["VM is restoring"]), Refusal::Other),
            (500, chain("The VM could not be snapshotted", &["restore is still in progress: no, it is not"]), Refusal::Other),
        ];
        for (status, messages, want) in table {
            assert_eq!(Refusal::of(status, &messages), want, "{status} {messages:?}");
        }
        let err = ApiError::StillRestoring { endpoint: Endpoint::VmSnapshot, waited: Duration::from_millis(1500) };
        assert_eq!(
            err.to_string(),
            "vm.snapshot was refused for 1s 500ms because Cloud Hypervisor was still prefaulting the memory of an on-demand restore (\"VM on-demand memory restore is still in progress\"); gave up"
        );
        assert_eq!(err.refusal(), None, "not the server's word but the client's");
    }

    #[test]
    fn every_endpoint_has_its_own_path() {
        let all = [
            Endpoint::VmmPing,
            Endpoint::VmmShutdown,
            Endpoint::VmCreate,
            Endpoint::VmBoot,
            Endpoint::VmPause,
            Endpoint::VmResume,
            Endpoint::VmPowerButton,
            Endpoint::VmShutdown,
            Endpoint::VmDelete,
            Endpoint::VmInfo,
            Endpoint::VmResize,
            Endpoint::VmAddDisk,
            Endpoint::VmRemoveDevice,
            Endpoint::VmSnapshot,
            Endpoint::VmRestore,
        ];
        let mut paths: Vec<&str> = all.iter().map(|e| e.path()).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), all.len());
        assert!(Endpoint::VmSnapshot.timeout() > Endpoint::VmInfo.timeout());
    }
}
