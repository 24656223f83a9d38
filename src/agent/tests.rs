//! The client against a small in-process agent that speaks the contract's
//! protocol on a temp unix socket, with the quirks a real channel has:
//! leftovers of an earlier connection, a guest that never answers, Cloud
//! Hypervisor's vsock handshake.

use super::*;
use hypeman_contract::agent::{Decoder, ErrorCode, Frame, Message, TimeSource};
use tokio::net::UnixListener;

/// How the fake agent behaves.
#[derive(Clone, Copy)]
enum Guest {
    /// Answers, its clock `behind_s` behind the host's until set.
    Agent { behind_s: i64 },
    /// Like `Agent`, after sending a cut-off frame and a reply to a request
    /// this connection never made.
    AgentWithLeftovers { behind_s: i64 },
    /// Accepts and reads, never answers (an init without an agent).
    Silent,
    /// Refuses set_time.
    Refusing,
}

/// Serves one connection on `listener`, answering as `guest`; with
/// `handshake`, expects Cloud Hypervisor's `CONNECT` line first and
/// answers it with `handshake`.
async fn serve(listener: UnixListener, guest: Guest, handshake: Option<&'static str>) {
    let (mut s, _) = listener.accept().await.unwrap();
    if let Some(reply) = handshake {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        assert_eq!(line, format!("CONNECT {}", hypeman_contract::agent::VSOCK_PORT).as_bytes());
        if reply.is_empty() {
            return;
        }
        s.write_all(reply.as_bytes()).await.unwrap();
    }
    if let Guest::AgentWithLeftovers { .. } = guest {
        let stale = Frame { stream: 0, request: 1, message: Message::Pong { payload: 1 } }.encode();
        s.write_all(&stale[..stale.len() / 2]).await.unwrap();
        let stray = Frame { stream: 0, request: 2, message: Message::TimeSet { before_ns: 0, after_ns: 0, source: TimeSource::Sent } };
        s.write_all(&stray.encode()).await.unwrap();
    }
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 1024];
    let mut offset_ns: i64 = match guest {
        Guest::Agent { behind_s } | Guest::AgentWithLeftovers { behind_s } => -behind_s * 1_000_000_000,
        Guest::Silent | Guest::Refusing => 0,
    };
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        for frame in decoder.push(&buf[..n]).into_iter().flatten() {
            let message = match (guest, frame.message) {
                (Guest::Silent, _) => continue,
                (_, Message::Hello { .. }) => Message::HelloReply { version: 1, agent: "fake".into() },
                (Guest::Refusing, _) => Message::Error { code: ErrorCode::Failed, message: "EPERM".into() },
                (_, Message::SetTime { host_realtime_ns }) => {
                    let before_ns = client::realtime_ns() + offset_ns;
                    offset_ns = host_realtime_ns - client::realtime_ns();
                    Message::TimeSet { before_ns, after_ns: client::realtime_ns() + offset_ns, source: TimeSource::Sent }
                }
                (_, other) => panic!("unexpected {other:?}"),
            };
            s.write_all(&Frame { message, ..frame }.encode()).await.unwrap();
        }
    }
}

fn listen(dir: &Path) -> (PathBuf, UnixListener) {
    let socket = dir.join(SOCKET_FILE);
    let listener = UnixListener::bind(&socket).unwrap();
    (socket, listener)
}

#[tokio::test]
async fn set_time_reports_the_skew_it_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, listener) = listen(dir.path());
    let guest = tokio::spawn(serve(listener, Guest::Agent { behind_s: 42 }, None));
    let step = step_clock(&Transport::Serial { socket }).await.unwrap();
    assert!((step.skew_before_s + 42.0).abs() < 0.5, "{step:?}");
    assert!(step.skew_after_s.abs() < 0.5, "{step:?}");
    assert_eq!(step.hello.agent, "fake");
    let line = step.to_string();
    assert!(line.starts_with("guest clock set: it was 42.0"), "{line}");
    assert!(line.contains(" s behind the host's, now 0.0"), "{line}");
    guest.await.unwrap();
}

#[tokio::test]
async fn leftovers_of_an_earlier_connection_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, listener) = listen(dir.path());
    let guest = tokio::spawn(serve(listener, Guest::AgentWithLeftovers { behind_s: 7 }, None));
    let step = step_clock(&Transport::Serial { socket }).await.unwrap();
    assert!((step.skew_before_s + 7.0).abs() < 0.5, "{step:?}");
    guest.await.unwrap();
}

#[tokio::test]
async fn a_guest_without_an_agent_times_out_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, listener) = listen(dir.path());
    let _guest = tokio::spawn(serve(listener, Guest::Silent, None));
    let t = std::time::Instant::now();
    let err = step_clock_within(&Transport::Serial { socket }, Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, AgentError::Timeout { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(err.to_string(), "no answer from the guest agent within 200 ms (an init without an agent?)");
}

#[tokio::test]
async fn no_socket_is_no_channel() {
    let dir = tempfile::tempdir().unwrap();
    let transport = Transport::for_guest(HypervisorKind::Qemu, dir.path());
    let err = step_clock(&transport).await.unwrap_err();
    assert!(matches!(err, AgentError::NoChannel { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("no agent channel at {}", dir.path().join("agent.sock").display()));
}

#[tokio::test]
async fn a_refusal_carries_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, listener) = listen(dir.path());
    let _guest = tokio::spawn(serve(listener, Guest::Refusing, None));
    let err = step_clock(&Transport::Serial { socket }).await.unwrap_err();
    assert_eq!(err.to_string(), "the guest agent refused set_time: failed: EPERM");
}

#[tokio::test]
async fn cloud_hypervisor_vsock_needs_its_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let transport = Transport::for_guest(HypervisorKind::CloudHypervisor, dir.path());
    let (_, listener) = listen(dir.path());
    let guest = tokio::spawn(serve(listener, Guest::Agent { behind_s: 3 }, Some("OK 1073741824\n")));
    let step = step_clock(&transport).await.unwrap();
    assert!((step.skew_before_s + 3.0).abs() < 0.5, "{step:?}");
    guest.await.unwrap();

    // Nothing listens on the guest port: Cloud Hypervisor closes the socket.
    std::fs::remove_file(transport.socket()).unwrap();
    let (_, listener) = listen(dir.path());
    let _guest = tokio::spawn(serve(listener, Guest::Agent { behind_s: 0 }, Some("")));
    let err = step_clock(&transport).await.unwrap_err();
    assert!(matches!(err, AgentError::Handshake { ref reply, .. } if reply.is_empty()), "{err:?}");
}

#[tokio::test]
async fn ping_echoes_its_payload() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let agent = tokio::spawn(async move {
        let mut d = Decoder::new();
        let mut buf = [0u8; 256];
        loop {
            let n = b.read(&mut buf).await.unwrap();
            if let Some(f) = d.push(&buf[..n]).into_iter().flatten().next() {
                let Message::Ping { payload } = f.message else { panic!("{f:?}") };
                b.write_all(&Frame { message: Message::Pong { payload }, ..f }.encode()).await.unwrap();
                return;
            }
        }
    });
    let mut client = AgentClient::new(a, "pair".into());
    client.ping(0xfeed).await.unwrap();
    agent.await.unwrap();
}
