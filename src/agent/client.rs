//! One conversation with the guest agent over a connected byte stream:
//! requests go out with fresh ids, and only the reply naming a request's
//! id answers it. Anything else (a broken frame, a reply left over from an
//! earlier connection on the same serial port) is skipped.

use super::AgentError;
use hypeman_contract::agent::{Decoder, Frame, Message, TimeSource, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The version and build the agent announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub agent: String,
}

/// What one `set_time` did, for the instance's log.
#[derive(Debug, Clone, PartialEq)]
pub struct ClockStep {
    /// Guest minus host before the step, in seconds, corrected for half
    /// the round trip (negative: the guest was behind).
    pub skew_before_s: f64,
    /// The same just after the step.
    pub skew_after_s: f64,
    pub source: TimeSource,
    pub round_trip: Duration,
    pub hello: Hello,
}

impl std::fmt::Display for ClockStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |s: f64| if s < 0.0 { "behind" } else { "ahead" };
        let of = |s: f64| if s < 0.0 { "" } else { " of" };
        write!(
            f,
            "guest clock set: it was {:.3} s {}{} the host's, now {:.3} s {} (stepped to {}; round trip {:.1} ms; agent {}, protocol {})",
            self.skew_before_s.abs(),
            side(self.skew_before_s),
            of(self.skew_before_s),
            self.skew_after_s.abs(),
            side(self.skew_after_s),
            self.source,
            self.round_trip.as_secs_f64() * 1000.0,
            self.hello.agent,
            self.hello.version,
        )
    }
}

/// The host's `CLOCK_REALTIME` in ns since the epoch.
pub fn realtime_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

pub struct AgentClient<S> {
    stream: S,
    socket: PathBuf,
    decoder: Decoder,
    next_request: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AgentClient<S> {
    pub fn new(stream: S, socket: PathBuf) -> AgentClient<S> {
        // Ids start somewhere new on every connection, so a late reply to an
        // earlier connection's request cannot pass for one to this one.
        let start = (realtime_ns() as u64 ^ (u64::from(std::process::id()) << 20)) as u32;
        AgentClient { stream, socket, decoder: Decoder::new(), next_request: start | 1 }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> AgentError + '_ {
        |source| AgentError::Io { socket: self.socket.clone(), source }
    }

    /// Sends `message` on the control stream and waits for its reply.
    pub async fn request(&mut self, message: Message) -> Result<Message, AgentError> {
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        let wire = Frame { stream: 0, request, message }.encode();
        self.stream.write_all(&wire).await.map_err(self.io())?;
        let mut buf = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut buf).await.map_err(self.io())?;
            if n == 0 {
                return Err(AgentError::Closed { socket: self.socket.clone() });
            }
            let answered = self.decoder.push(&buf[..n]).into_iter().flatten().find(|f| f.stream == 0 && f.request == request);
            if let Some(frame) = answered {
                return Ok(frame.message);
            }
        }
    }

    pub async fn hello(&mut self) -> Result<Hello, AgentError> {
        let request = "hello";
        match self.request(Message::Hello { min_version: MIN_PROTOCOL_VERSION, max_version: PROTOCOL_VERSION }).await? {
            Message::HelloReply { version, agent } => Ok(Hello { version, agent }),
            other => Err(refusal(request, other)),
        }
    }

    pub async fn ping(&mut self, payload: u64) -> Result<Duration, AgentError> {
        let sent = Instant::now();
        match self.request(Message::Ping { payload }).await? {
            Message::Pong { payload: got } if got == payload => Ok(sent.elapsed()),
            other => Err(refusal("ping", other)),
        }
    }

    /// Sends the host's time now; the agent steps to it (or to its better
    /// reading of the host clock).
    pub async fn set_time(&mut self, hello: Hello) -> Result<ClockStep, AgentError> {
        let sent = Instant::now();
        let host_ns = realtime_ns();
        let reply = self.request(Message::SetTime { host_realtime_ns: host_ns }).await?;
        let round_trip = sent.elapsed();
        match reply {
            Message::TimeSet { before_ns, after_ns, source } => {
                // The guest read its clock about half a round trip after
                // the host read its own.
                let half = round_trip.as_nanos() as i64 / 2;
                let host_then = host_ns + half;
                Ok(ClockStep {
                    skew_before_s: (before_ns - host_then) as f64 / 1e9,
                    skew_after_s: (after_ns - host_then) as f64 / 1e9,
                    source,
                    round_trip,
                    hello,
                })
            }
            other => Err(refusal("set_time", other)),
        }
    }
}

fn refusal(request: &'static str, got: Message) -> AgentError {
    match got {
        Message::Error { code, message } => AgentError::Refused { request, code, message },
        other => AgentError::Unexpected { request, got: format!("{other:?}") },
    }
}
