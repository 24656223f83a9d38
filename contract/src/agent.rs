//! The host↔guest agent protocol: how the daemon and the agent inside
//! hypeman-init talk over the agent channel (a virtio-serial port under
//! QEMU, a vsock port under Cloud Hypervisor). Pure encoding and decoding;
//! neither side's IO lives here.
//!
//! ```text
//!  on the wire:  00 | COBS( version kind stream:u32 request:u32 body… crc32 ) | 00
//!                ^ leading delimiter          little-endian integers     ^ frame end
//! ```
//!
//! Why this framing: the channel outlives its ends. A virtio-serial port
//! stays open in the guest while the host side comes and goes (a daemon
//! restarts, a restore brings a new VMM), so the agent may hold half a frame
//! from a connection that is gone when the next one starts talking. COBS
//! keeps `00` out of every encoded frame, so a `00` always ends one: the
//! stale half ends at the new connection's leading `00` and fails its CRC,
//! and the new frames decode. Nothing waits for a length that will never
//! arrive, and an oversized run without a delimiter is dropped, so a peer
//! can neither wedge nor bloat the decoder.
//!
//! Frames carry a request id (a reply names the request it answers) and a
//! stream id (0 is the control stream). Everything today is on stream 0;
//! later streams (exec's stdin/stdout, file copies) get their own ids and
//! kinds from [`Kind`]'s reserved range, so several can interleave on one
//! channel. A peer that meets a kind it does not know answers
//! [`ErrorCode::Unsupported`] for that request id instead of dropping it.

use std::fmt;

/// The newest protocol version this build speaks. [`Message::Hello`]
/// carries the range the host speaks; the agent answers with the version
/// both will use.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The framing's own version: the first byte of every decoded frame. It
/// changes only if the header layout does.
pub const FRAME_VERSION: u8 = 1;

/// The virtio-serial port's name (QEMU `virtserialport,name=…`), which the
/// guest finds under `/sys/class/virtio-ports/*/name`.
pub const SERIAL_PORT_NAME: &str = "org.hypeman.agent.0";

/// The AF_VSOCK port the agent listens on (Cloud Hypervisor: the host
/// sends `CONNECT <port>` on the hybrid vsock socket).
pub const VSOCK_PORT: u32 = 10_240;

/// The largest frame body. Bulk data (exec output, file copies) will be
/// cut into frames of at most this size.
pub const MAX_BODY: usize = 64 * 1024;

/// The longest string a message carries (names, error messages).
const MAX_STR: usize = 4096;
/// The frame delimiter.
const DELIMITER: u8 = 0;
/// Header bytes before the body: version, kind, stream, request.
const HEADER: usize = 1 + 1 + 4 + 4;
const CRC: usize = 4;
/// The longest encoded frame (COBS adds a byte per 254).
const MAX_ENCODED: usize = HEADER + MAX_BODY + CRC + (HEADER + MAX_BODY + CRC) / 254 + 2;

/// A frame's type. Numbers are part of the protocol: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    HelloReply = 2,
    Ping = 3,
    Pong = 4,
    SetTime = 5,
    TimeSet = 6,
    Error = 7,
    // 0x10..=0x1f are reserved for streams (open, data, close, window).
}

impl Kind {
    fn from_u8(n: u8) -> Option<Kind> {
        Some(match n {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            3 => Kind::Ping,
            4 => Kind::Pong,
            5 => Kind::SetTime,
            6 => Kind::TimeSet,
            7 => Kind::Error,
            _ => return None,
        })
    }
}

/// Which clock the agent stepped the guest's to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// The host's time as sent in [`Message::SetTime`].
    Sent = 0,
    /// The host clock read through `ptp_kvm` (`/dev/ptp0`) at the step,
    /// which does not suffer the message's transit time.
    PtpKvm = 1,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The kind (or a stream) is not known to this agent.
    Unsupported = 1,
    /// No protocol version in common.
    Version = 2,
    /// A body that does not parse for its kind.
    BadRequest = 3,
    /// The agent understood and tried, and the system call failed.
    Failed = 4,
}

impl ErrorCode {
    fn from_u16(n: u16) -> ErrorCode {
        match n {
            1 => ErrorCode::Unsupported,
            2 => ErrorCode::Version,
            3 => ErrorCode::BadRequest,
            // An unknown code from a newer peer is still a failure.
            _ => ErrorCode::Failed,
        }
    }
}

/// One message, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Host → guest: the versions the host speaks.
    Hello { min_version: u16, max_version: u16 },
    /// Guest → host: the version both use and the agent's build version.
    HelloReply { version: u16, agent: String },
    /// Either way; answered by [`Message::Pong`] with the same payload.
    Ping { payload: u64 },
    Pong { payload: u64 },
    /// Host → guest: the host's `CLOCK_REALTIME` when it sent this, in ns
    /// since the epoch.
    SetTime { host_realtime_ns: i64 },
    /// Guest → host: the guest's `CLOCK_REALTIME` just before and just after
    /// the step, and what it stepped to.
    TimeSet { before_ns: i64, after_ns: i64, source: TimeSource },
    /// The request failed.
    Error { code: ErrorCode, message: String },
    /// A kind this build does not know, kept so the receiver can answer it.
    Unknown { kind: u8, body: Vec<u8> },
}

/// A message with its addressing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// 0: the control stream.
    pub stream: u32,
    /// Chosen by the requester; a reply carries the request's.
    pub request: u32,
    pub message: Message,
}

/// Why bytes between two delimiters are not a frame. The receiver drops
/// such bytes and goes on with the next frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the frame is not valid COBS")]
    Cobs,
    #[error("the frame is {0} bytes, shorter than a header and checksum")]
    Short(usize),
    #[error("the frame's checksum does not match")]
    Checksum,
    #[error("frame version {0} is not known")]
    Version(u8),
    #[error("the body of a {0:?} frame does not parse")]
    Body(Kind),
    #[error("more than {MAX_ENCODED} bytes without a frame delimiter")]
    TooLong,
}

impl Frame {
    /// The frame's bytes on the wire, leading delimiter included.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(HEADER + 32);
        raw.push(FRAME_VERSION);
        let (kind, body) = self.message.kind_and_body();
        raw.push(kind);
        raw.extend_from_slice(&self.stream.to_le_bytes());
        raw.extend_from_slice(&self.request.to_le_bytes());
        raw.extend_from_slice(&body);
        let crc = crc32(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        let mut wire = Vec::with_capacity(raw.len() + raw.len() / 254 + 3);
        wire.push(DELIMITER);
        cobs_encode(&raw, &mut wire);
        wire.push(DELIMITER);
        wire
    }

    /// Parses the COBS-encoded bytes between two delimiters.
    fn decode(encoded: &[u8]) -> Result<Frame, FrameError> {
        let raw = cobs_decode(encoded).ok_or(FrameError::Cobs)?;
        if raw.len() < HEADER + CRC {
            return Err(FrameError::Short(raw.len()));
        }
        let (signed, crc) = raw.split_at(raw.len() - CRC);
        if crc32(signed).to_le_bytes() != crc {
            return Err(FrameError::Checksum);
        }
        if signed[0] != FRAME_VERSION {
            return Err(FrameError::Version(signed[0]));
        }
        let kind = signed[1];
        let stream = u32::from_le_bytes([signed[2], signed[3], signed[4], signed[5]]);
        let request = u32::from_le_bytes([signed[6], signed[7], signed[8], signed[9]]);
        let message = Message::parse(kind, &signed[HEADER..])?;
        Ok(Frame { stream, request, message })
    }
}

impl Message {
    fn kind_and_body(&self) -> (u8, Vec<u8>) {
        let mut b = Vec::new();
        let kind = match self {
            Message::Hello { min_version, max_version } => {
                b.extend_from_slice(&min_version.to_le_bytes());
                b.extend_from_slice(&max_version.to_le_bytes());
                Kind::Hello as u8
            }
            Message::HelloReply { version, agent } => {
                b.extend_from_slice(&version.to_le_bytes());
                put_str(&mut b, agent);
                Kind::HelloReply as u8
            }
            Message::Ping { payload } => {
                b.extend_from_slice(&payload.to_le_bytes());
                Kind::Ping as u8
            }
            Message::Pong { payload } => {
                b.extend_from_slice(&payload.to_le_bytes());
                Kind::Pong as u8
            }
            Message::SetTime { host_realtime_ns } => {
                b.extend_from_slice(&host_realtime_ns.to_le_bytes());
                Kind::SetTime as u8
            }
            Message::TimeSet { before_ns, after_ns, source } => {
                b.extend_from_slice(&before_ns.to_le_bytes());
                b.extend_from_slice(&after_ns.to_le_bytes());
                b.push(*source as u8);
                Kind::TimeSet as u8
            }
            Message::Error { code, message } => {
                b.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str(&mut b, message);
                Kind::Error as u8
            }
            Message::Unknown { kind, body } => {
                b.extend_from_slice(body);
                *kind
            }
        };
        (kind, b)
    }

    fn parse(kind: u8, body: &[u8]) -> Result<Message, FrameError> {
        let Some(known) = Kind::from_u8(kind) else {
            return Ok(Message::Unknown { kind, body: body.to_vec() });
        };
        let mut r = Reader { rest: body };
        let message = match known {
            Kind::Hello => r.u16().zip(r.u16()).map(|(min_version, max_version)| Message::Hello { min_version, max_version }),
            Kind::HelloReply => r.u16().zip(r.str()).map(|(version, agent)| Message::HelloReply { version, agent }),
            Kind::Ping => r.u64().map(|payload| Message::Ping { payload }),
            Kind::Pong => r.u64().map(|payload| Message::Pong { payload }),
            Kind::SetTime => r.i64().map(|host_realtime_ns| Message::SetTime { host_realtime_ns }),
            Kind::TimeSet => (|| {
                let before_ns = r.i64()?;
                let after_ns = r.i64()?;
                let source = match r.u8()? {
                    0 => TimeSource::Sent,
                    1 => TimeSource::PtpKvm,
                    _ => return None,
                };
                Some(Message::TimeSet { before_ns, after_ns, source })
            })(),
            Kind::Error => r.u16().zip(r.str()).map(|(code, message)| Message::Error { code: ErrorCode::from_u16(code), message }),
        };
        // Trailing bytes are left for a newer minor version's fields.
        message.ok_or(FrameError::Body(known))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut at a character boundary: they are messages
    // for a log, not data.
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|n| n as i64)
    }
    fn str(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// Reassembles frames from a byte stream, whatever its chunking, and
/// recovers from garbage and cut-off frames at the next delimiter.
#[derive(Debug, Default)]
pub struct Decoder {
    pending: Vec<u8>,
    /// Dropping bytes until the next delimiter (the run was too long).
    skipping: bool,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Feeds `bytes`; returns every frame (or broken frame) they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if byte == DELIMITER {
                if self.skipping {
                    self.skipping = false;
                    out.push(Err(FrameError::TooLong));
                } else if !self.pending.is_empty() {
                    out.push(Frame::decode(&self.pending));
                }
                self.pending.clear();
            } else if !self.skipping {
                if self.pending.len() == MAX_ENCODED {
                    self.pending.clear();
                    self.skipping = true;
                } else {
                    self.pending.push(byte);
                }
            }
        }
        out
    }

    /// Forgets a partial frame: the connection it came on is gone.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.skipping = false;
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn is_mid_frame(&self) -> bool {
        !self.pending.is_empty() || self.skipping
    }
}

fn cobs_encode(raw: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0);
    let mut code: u8 = 1;
    for &byte in raw {
        if byte == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(byte);
            code += 1;
            if code == 0xff {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

fn cobs_decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let code = encoded[i] as usize;
        if code == 0 || i + code > encoded.len() {
            return None;
        }
        out.extend_from_slice(&encoded[i + 1..i + code]);
        i += code;
        if code < 0xff && i < encoded.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's): catches the bytes a cut-off
/// frame and the next one glue into.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

impl fmt::Display for TimeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeSource::Sent => "the host's time as sent",
            TimeSource::PtpKvm => "the host clock through ptp_kvm",
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Version => "no common protocol version",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Failed => "failed",
        })
    }
}

/// The version the agent picks for a host that speaks `min..=max`: the
/// newest both speak, or `None`.
pub fn negotiate(min: u16, max: u16) -> Option<u16> {
    let best = max.min(PROTOCOL_VERSION);
    (best >= min.max(MIN_PROTOCOL_VERSION)).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello { min_version: 1, max_version: 3 },
            Message::HelloReply { version: 1, agent: "0.1.0".into() },
            Message::Ping { payload: u64::MAX },
            Message::Pong { payload: 0 },
            Message::SetTime { host_realtime_ns: 1_796_177_518_645_310_123 },
            Message::SetTime { host_realtime_ns: -5 },
            Message::TimeSet { before_ns: 1, after_ns: 2, source: TimeSource::PtpKvm },
            Message::TimeSet { before_ns: 0, after_ns: i64::MIN, source: TimeSource::Sent },
            Message::Error { code: ErrorCode::Unsupported, message: "kind 0x11 ünknown".into() },
            Message::Unknown { kind: 0x11, body: vec![0, 0, 1, 0, 0xff] },
        ]
    }

    fn frame(request: u32, message: Message) -> Frame {
        Frame { stream: 0, request, message }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn cobs_round_trips_zeros_and_long_runs() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1, 0, 2],
            (1..=254).collect(),
            (0..=255).collect(),
            vec![7; 1000],
            [vec![0; 3], vec![9; 600], vec![0]].concat(),
        ];
        for raw in cases {
            let mut enc = Vec::new();
            cobs_encode(&raw, &mut enc);
            assert!(!enc.contains(&0), "no zero in {enc:?}");
            assert_eq!(cobs_decode(&enc), Some(raw.clone()));
        }
        assert_eq!(cobs_decode(&[3, 1]), None, "a code that overruns");
    }

    #[test]
    fn every_message_round_trips_in_one_push_and_byte_by_byte() {
        let frames: Vec<Frame> = every_message().into_iter().enumerate().map(|(i, m)| Frame { stream: i as u32 * 7, request: 1000 + i as u32, message: m }).collect();
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let got: Vec<Frame> = Decoder::new().push(&wire).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, frames);
        let mut d = Decoder::new();
        let mut one_by_one = Vec::new();
        for b in &wire {
            one_by_one.extend(d.push(std::slice::from_ref(b)).into_iter().map(Result::unwrap));
        }
        assert_eq!(one_by_one, frames);
        assert!(!d.is_mid_frame());
    }

    #[test]
    fn the_wire_bytes_of_a_ping_are_stable() {
        // The format is a contract between builds: these bytes must not move.
        let wire = frame(0x0102_0304, Message::Ping { payload: 0x0a0b }).encode();
        assert_eq!(
            wire,
            [0, 3, 1, 3, 1, 1, 1, 7, 4, 3, 2, 1, 11, 10, 1, 1, 1, 1, 1, 5, 48, 248, 163, 171, 0]
        );
    }

    #[test]
    fn a_cut_off_frame_from_an_old_connection_does_not_wedge_the_next() {
        let old = frame(1, Message::SetTime { host_realtime_ns: 42 }).encode();
        let new = frame(2, Message::Ping { payload: 9 }).encode();
        for cut in 1..old.len() - 1 {
            let mut d = Decoder::new();
            let mut got = d.push(&old[..cut]);
            got.extend(d.push(&new));
            let frames: Vec<Frame> = got.into_iter().filter_map(Result::ok).collect();
            assert_eq!(frames, [frame(2, Message::Ping { payload: 9 })], "cut at {cut}");
        }
    }

    #[test]
    fn garbage_is_reported_and_skipped() {
        let mut d = Decoder::new();
        let good = frame(5, Message::Pong { payload: 1 });
        let mut wire = b"\x00hello\x00\x01\x01\x00".to_vec();
        wire.extend(good.encode());
        let got = d.push(&wire);
        assert!(got.iter().filter(|r| r.is_err()).count() >= 2, "{got:?}");
        assert_eq!(got.last(), Some(&Ok(good)));
        // A flipped bit is a checksum failure, not a wrong message.
        let mut raw = vec![FRAME_VERSION, Kind::SetTime as u8, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        let crc = crc32(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(Decoder::new().push(&wire_of(&raw)), [Ok(frame(6, Message::SetTime { host_realtime_ns: 1 << 40 }))]);
        raw[15] ^= 0x10;
        assert_eq!(Decoder::new().push(&wire_of(&raw)), [Err(FrameError::Checksum)]);
    }

    #[test]
    fn an_endless_run_is_dropped_at_a_bounded_size() {
        let mut d = Decoder::new();
        let junk = vec![0x55u8; MAX_ENCODED * 3];
        assert!(d.push(&junk).is_empty());
        assert!(d.pending.len() <= MAX_ENCODED);
        let good = frame(1, Message::Ping { payload: 3 });
        let got = d.push(&good.encode());
        assert_eq!(got, [Err(FrameError::TooLong), Ok(good)]);
    }

    #[test]
    fn reset_forgets_a_partial_frame() {
        let mut d = Decoder::new();
        let wire = frame(1, Message::Ping { payload: 1 }).encode();
        d.push(&wire[..6]);
        assert!(d.is_mid_frame());
        d.reset();
        assert!(!d.is_mid_frame());
        // Without its leading delimiter the next frame still decodes.
        assert_eq!(d.push(&wire[1..]), [Ok(frame(1, Message::Ping { payload: 1 }))]);
    }

    /// `raw` (header, body, checksum) on the wire, checksum as given.
    fn wire_of(raw: &[u8]) -> Vec<u8> {
        let mut wire = vec![0];
        cobs_encode(raw, &mut wire);
        wire.push(0);
        wire
    }

    fn signed(mut raw: Vec<u8>) -> Vec<u8> {
        let crc = crc32(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        raw
    }

    #[test]
    fn short_bodies_are_errors_of_their_kind() {
        let raw = signed(vec![FRAME_VERSION, Kind::SetTime as u8, 0, 0, 0, 0, 1, 0, 0, 0, 1, 2]);
        assert_eq!(Decoder::new().push(&wire_of(&raw)), [Err(FrameError::Body(Kind::SetTime))]);
        let raw = signed(vec![9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Decoder::new().push(&wire_of(&raw)), [Err(FrameError::Version(9))]);
        assert_eq!(Decoder::new().push(&wire_of(&signed(vec![1, 2]))), [Err(FrameError::Short(6))]);
    }

    #[test]
    fn versions_are_negotiated_to_the_newest_common_one() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 4), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000);
        let got = Decoder::new().push(&frame(1, Message::Error { code: ErrorCode::Failed, message: long }).encode());
        match &got[..] {
            [Ok(Frame { message: Message::Error { message, .. }, .. })] => {
                assert!(message.len() <= MAX_STR && message.len() > MAX_STR - 2, "{}", message.len());
            }
            other => panic!("{other:?}"),
        }
    }
}
