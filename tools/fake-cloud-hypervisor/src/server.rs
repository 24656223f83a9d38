//! Serving the fake VMM on a unix socket: one connection and one request
//! at a time, as micro-http's single thread does. Every request body is
//! checked against the OpenAPI document first; a violation is recorded and
//! answered with a 400, so the client's test fails loudly.

use crate::http::{self, ReadError, Request, Response};
use crate::openapi::OpenApi;
use crate::vmm::{After, Options, Vmm};
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A client that connects and then says nothing is dropped after this.
/// micro-http itself never drops one: a client still there this long after
/// its reply is waiting for an end the real server never sends, which is
/// reported (see `serve_connection`).
const IDLE: Duration = Duration::from_secs(10);

/// One request, the status it got, and the connection it came on.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request: Request,
    pub status: u16,
    /// Connections are numbered from 0 in the order they were accepted, so
    /// a test can tell a reused connection from a fresh one.
    pub connection: u64,
}

/// Everything the server shares with whoever watches it.
pub struct Shared {
    pub vmm: Mutex<Vmm>,
    exchanges: Mutex<Vec<Exchange>>,
    violations: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Shared {
    pub fn new(options: Options) -> Shared {
        Shared {
            vmm: Mutex::new(Vmm::new(options)),
            exchanges: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().expect("poisoned").clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().expect("poisoned").clone()
    }
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The VMM exits: `vmm.shutdown`, or the guest powered off.
    Exit,
    /// [`FakeServer`] was dropped.
    Stopped,
}

/// Answers one request: routing, method, spec check, then the VMM.
pub fn respond(shared: &Shared, spec: &OpenApi, request: &Request, fds: Vec<std::os::fd::OwnedFd>, log: &dyn Fn(&str)) -> (Response, After) {
    let Some(endpoint) = request.path.strip_prefix("/api/v1/") else {
        return (Response::bare(404), After::Continue);
    };
    if request.method != "GET" && request.method != "PUT" {
        return (Response::bare(400), After::Continue);
    }
    match Vmm::method_of(endpoint) {
        None => return (Response::bare(404), After::Continue),
        Some(m) if m != request.method => return (Response::bare(405), After::Continue),
        Some(_) => {}
    }
    if !request.body.is_empty() && matches!(spec.request_schema(&format!("/{endpoint}"), &request.method), Ok(None)) {
        // The real server answers a body on an endpoint that takes none
        // with a bare `["Bad Request"]`; it is still the client's mistake.
        let problem = format!("{} /{endpoint} takes no body", request.method);
        log(&format!("SPEC VIOLATION {problem}"));
        shared.violations.lock().expect("poisoned").push(format!("{endpoint}: {problem}"));
        return (Response::json(400, &serde_json::json!(["Bad Request"])), After::Continue);
    }
    if let Err(problems) = spec.validate_request(&format!("/{endpoint}"), &request.method, &request.body) {
        for p in &problems {
            log(&format!("SPEC VIOLATION {} /{endpoint}: {p}", request.method));
        }
        shared.violations.lock().expect("poisoned").extend(problems.iter().map(|p| format!("{endpoint}: {p}")));
        let mut chain = vec!["spec violation".to_string()];
        chain.extend(problems);
        return (Response::json(400, &serde_json::json!(chain)), After::Continue);
    }
    shared.vmm.lock().expect("poisoned").handle_with_fds(endpoint, &request.body, fds)
}

/// Serves `listener` until the VMM exits or `shared` is told to stop.
pub fn serve(listener: &UnixListener, shared: &Shared, spec: &OpenApi, log: &dyn Fn(&str)) -> Ended {
    for (number, conn) in (0u64..).zip(listener.incoming()) {
        if shared.stop.load(Ordering::SeqCst) {
            return Ended::Stopped;
        }
        let Ok(stream) = conn else { continue };
        if let Some(Ended::Exit) = serve_connection(stream, number, shared, spec, log) {
            return Ended::Exit;
        }
    }
    Ended::Stopped
}

fn serve_connection(stream: UnixStream, connection: u64, shared: &Shared, spec: &OpenApi, log: &dyn Fn(&str)) -> Option<Ended> {
    let _ = stream.set_read_timeout(Some(IDLE));
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(crate::fds::FdStream::new(stream));
    let mut answered = 0u64;
    loop {
        let mut request = match http::read_request(&mut reader, &mut writer) {
            Ok(r) => r,
            Err(ReadError::Io(e)) if answered > 0 && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                // Against the real server this client would wait forever:
                // micro-http answers `Connection: keep-alive` and keeps the
                // connection until the client hangs up, whatever the request
                // said. Reading a reply to the connection's end is a bug.
                let problem = format!(
                    "connection {connection} was left open {}s after its reply: micro-http never closes a connection, so a client that reads a reply to the connection's end hangs",
                    IDLE.as_secs()
                );
                log(&format!("SPEC VIOLATION {problem}"));
                shared.violations.lock().expect("poisoned").push(problem);
                return None;
            }
            Err(ReadError::Closed) | Err(ReadError::Io(_)) => return None,
            Err(ReadError::Malformed(why)) => {
                log(&format!("malformed request: {why}"));
                shared.violations.lock().expect("poisoned").push(format!("malformed request: {why}"));
                let _ = http::write_response(&mut writer, &Response::json(400, &serde_json::json!([why])));
                return None;
            }
        };
        // Descriptors that came with this request's bytes are its own.
        let fds = reader.get_mut().take_fds();
        request.fds = fds.iter().map(crate::fds::tap_name).collect();
        let (response, after) = respond(shared, spec, &request, fds, log);
        // The descriptors a request brought, by what they are (a TAP's name).
        let brought = match request.fds.is_empty() {
            true => String::new(),
            false => {
                let what: Vec<String> = request.fds.iter().map(|f| f.clone().unwrap_or_else(|e| e)).collect();
                format!(" fds=[{}]", what.join(","))
            }
        };
        log(&format!("{} {} -> {}{brought}", request.method, request.path, response.status));
        shared.exchanges.lock().expect("poisoned").push(Exchange { request, status: response.status, connection });
        let written = http::write_response(&mut writer, &response);
        answered += 1;
        if after == After::Exit {
            return Some(Ended::Exit);
        }
        written.ok()?;
    }
}

/// The fake in a test's own process, on a background thread.
pub struct FakeServer {
    shared: Arc<Shared>,
    socket: PathBuf,
    thread: Option<std::thread::JoinHandle<Ended>>,
}

impl FakeServer {
    pub fn start(socket: &Path, options: Options, spec: Arc<OpenApi>) -> std::io::Result<FakeServer> {
        let listener = UnixListener::bind(socket)?;
        let shared = Arc::new(Shared::new(options));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-cloud-hypervisor".into())
            .spawn(move || serve(&listener, &s, &spec, &|_| {}))?;
        Ok(FakeServer { shared, socket: socket.to_path_buf(), thread: Some(thread) })
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Every request so far, in order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.exchanges()
    }

    /// Every spec violation so far.
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations()
    }

    pub fn with_vmm<R>(&self, f: impl FnOnce(&mut Vmm) -> R) -> R {
        f(&mut self.shared.vmm.lock().expect("poisoned"))
    }

    /// Whether the VMM has exited (its serving thread is done).
    pub fn exited(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
