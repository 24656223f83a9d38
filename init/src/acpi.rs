//! Hearing the ACPI power button: the host's graceful stop.
//!
//! QEMU's `system_powerdown` (microvm through its GED device, q35 through
//! the fixed power button) and Cloud Hypervisor's `vm.power-button` both
//! end in an ACPI notify on the guest's power button device. The kernel's
//! `button` driver (a module on Debian's kernels; the initrd carries it)
//! turns that into an event on the generic-netlink family `acpi_event`,
//! multicast group `acpi_mc_group` — the channel `acpid` listens on. Init
//! joins that group; it needs no evdev, no `/dev/input` and no daemon.
//!
//! The byte formats (request building, reply and event parsing) are pure
//! functions, tested below; the socket calls are the thin rest.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const FAMILY_NAME: &str = "acpi_event";
const GROUP_NAME: &str = "acpi_mc_group";
/// The device class the `button` driver reports for a power button.
const POWER_BUTTON_CLASS: &str = "button/power";

// <linux/netlink.h>, <linux/genetlink.h>: not all are in the libc crate.
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
/// The attribute type bits; the top two are the nested/byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `<linux/acpi.h>` (kernel side, `drivers/acpi/event.c`).
const ACPI_GENL_CMD_EVENT: u8 = 1;
const ACPI_GENL_ATTR_EVENT: u16 = 1;
/// `struct acpi_genl_event { char device_class[20]; char bus_id[15];
/// u32 type; u32 data; }`: 35 bytes of names, padded to 36, then two u32.
const EVENT_CLASS_LEN: usize = 20;
const EVENT_BUS_ID_LEN: usize = 15;
const EVENT_LEN: usize = 44;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot {op} the generic netlink socket")]
    Socket {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel has no {FAMILY_NAME:?} netlink family")]
    NoFamily {
        #[source]
        source: std::io::Error,
    },
    #[error("the {FAMILY_NAME:?} family has no {GROUP_NAME:?} multicast group")]
    NoGroup,
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// One ACPI event as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiEvent {
    pub device_class: String,
    pub bus_id: String,
    pub kind: u32,
    pub data: u32,
}

impl AcpiEvent {
    pub fn is_power_button(&self) -> bool {
        self.device_class == POWER_BUTTON_CLASS
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// `(type, payload)` of each netlink attribute in `bytes`; stops at the
/// first one whose length does not fit.
fn attributes(bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u16_at(bytes, at), u16_at(bytes, at + 2)) {
        let len = usize::from(len);
        if len < NLA_HDRLEN || at + len > bytes.len() {
            break;
        }
        out.push((kind & NLA_TYPE_MASK, &bytes[at + NLA_HDRLEN..at + len]));
        at += align4(len);
    }
    out
}

/// `(type, body after the netlink header)` of each message in a datagram.
fn messages(bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(bytes, at), u16_at(bytes, at + 4)) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || at + len > bytes.len() {
            break;
        }
        out.push((kind, &bytes[at + NLMSG_HDRLEN..at + len]));
        at += align4(len);
    }
    out
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The `CTRL_CMD_GETFAMILY` request for `name`.
pub fn family_request(name: &str, seq: u32) -> Vec<u8> {
    let attr_len = NLA_HDRLEN + name.len() + 1;
    let total = NLMSG_HDRLEN + GENL_HDRLEN + align4(attr_len);
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&GENL_ID_CTRL.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[CTRL_CMD_GETFAMILY, 1, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
    m.extend_from_slice(name.as_bytes());
    m.resize(total, 0);
    m
}

/// What the controller answered about a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FamilyReply {
    /// `(family id, id of the multicast group asked for)`.
    Found { family: u16, group: Option<u32> },
    /// The kernel refused, with this errno (`ENOENT`: no such family).
    Error(i32),
}

/// Parses the controller's reply to [`family_request`], looking for `group`.
pub fn parse_family_reply(bytes: &[u8], group: &str) -> Result<FamilyReply, AcpiError> {
    for (kind, body) in messages(bytes) {
        match kind {
            NLMSG_ERROR => {
                let errno =
                    u32_at(body, 0).ok_or(AcpiError::Malformed("short error message"))? as i32;
                return Ok(FamilyReply::Error(-errno));
            }
            NLMSG_DONE => continue,
            GENL_ID_CTRL => {
                let attrs = body
                    .get(GENL_HDRLEN..)
                    .ok_or(AcpiError::Malformed("short reply"))?;
                let mut family = None;
                let mut group_id = None;
                for (attr, payload) in attributes(attrs) {
                    match attr {
                        CTRL_ATTR_FAMILY_ID => family = u16_at(payload, 0),
                        CTRL_ATTR_MCAST_GROUPS => {
                            for (_, grp) in attributes(payload) {
                                let fields = attributes(grp);
                                let name = fields
                                    .iter()
                                    .find(|(k, _)| *k == CTRL_ATTR_MCAST_GRP_NAME)
                                    .map(|(_, v)| c_string(v));
                                let id = fields
                                    .iter()
                                    .find(|(k, _)| *k == CTRL_ATTR_MCAST_GRP_ID)
                                    .and_then(|(_, v)| u32_at(v, 0));
                                if name.as_deref() == Some(group) {
                                    group_id = id;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let family = family.ok_or(AcpiError::Malformed("reply without a family id"))?;
                return Ok(FamilyReply::Found {
                    family,
                    group: group_id,
                });
            }
            _ => {}
        }
    }
    Err(AcpiError::Malformed("no reply message"))
}

/// The ACPI events in one datagram of the `acpi_event` family.
pub fn parse_events(bytes: &[u8], family: u16) -> Vec<AcpiEvent> {
    let mut out = Vec::new();
    for (kind, body) in messages(bytes) {
        if kind != family || body.first() != Some(&ACPI_GENL_CMD_EVENT) {
            continue;
        }
        let Some(attrs) = body.get(GENL_HDRLEN..) else {
            continue;
        };
        for (attr, payload) in attributes(attrs) {
            if attr != ACPI_GENL_ATTR_EVENT || payload.len() < EVENT_LEN {
                continue;
            }
            out.push(AcpiEvent {
                device_class: c_string(&payload[..EVENT_CLASS_LEN]),
                bus_id: c_string(&payload[EVENT_CLASS_LEN..EVENT_CLASS_LEN + EVENT_BUS_ID_LEN]),
                kind: u32_at(payload, 36).unwrap_or(0),
                data: u32_at(payload, 40).unwrap_or(0),
            });
        }
    }
    out
}

/// A socket subscribed to the kernel's ACPI events.
pub struct AcpiEvents {
    fd: OwnedFd,
    family: u16,
}

fn sys(op: &'static str) -> AcpiError {
    AcpiError::Socket {
        op,
        source: std::io::Error::last_os_error(),
    }
}

impl AcpiEvents {
    /// Opens a generic netlink socket, resolves the family and joins its
    /// multicast group. Non-blocking, so a poll loop can drain it.
    pub fn subscribe() -> Result<AcpiEvents, AcpiError> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(sys("open"));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let request = family_request(FAMILY_NAME, 1);
        // SAFETY: sockaddr_nl is plain data; a zeroed one addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buffer and address are live for the call.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(sys("send on"));
        }
        let mut buf = vec![0u8; 8192];
        // SAFETY: buf is writable for its length.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(sys("receive on"));
        }
        let (family, group) = match parse_family_reply(&buf[..got as usize], GROUP_NAME)? {
            FamilyReply::Found {
                family,
                group: Some(group),
            } => (family, group),
            FamilyReply::Found { group: None, .. } => return Err(AcpiError::NoGroup),
            FamilyReply::Error(errno) => {
                return Err(AcpiError::NoFamily {
                    source: std::io::Error::from_raw_os_error(errno),
                })
            }
        };
        // SAFETY: setsockopt with a u32 option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(sys("join the multicast group of"));
        }
        // SAFETY: fcntl on our own descriptor.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Ok(AcpiEvents { fd, family })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Every event waiting on the socket (none if nothing is pending).
    pub fn drain(&self) -> Vec<AcpiEvent> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: buf is writable for its length.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got <= 0 {
                return out;
            }
            out.extend(parse_events(&buf[..got as usize], self.family));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = NLA_HDRLEN + payload.len();
        let mut a = Vec::new();
        a.extend_from_slice(&(len as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align4(len), 0);
        a
    }

    fn message(kind: u16, cmd: u8, attrs: &[u8]) -> Vec<u8> {
        let total = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, 1, 0, 0]);
        m.extend_from_slice(attrs);
        m
    }

    fn event_payload(class: &str, bus: &str, kind: u32, data: u32) -> Vec<u8> {
        let mut p = vec![0u8; EVENT_LEN];
        p[..class.len()].copy_from_slice(class.as_bytes());
        p[EVENT_CLASS_LEN..EVENT_CLASS_LEN + bus.len()].copy_from_slice(bus.as_bytes());
        p[36..40].copy_from_slice(&kind.to_ne_bytes());
        p[40..44].copy_from_slice(&data.to_ne_bytes());
        p
    }

    #[test]
    fn family_request_is_a_padded_getfamily_message() {
        let m = family_request("acpi_event", 9);
        // 16 header + 4 genl + (4 + 11 → 16) attribute.
        assert_eq!(m.len(), 36);
        assert_eq!(u32_at(&m, 0), Some(36));
        assert_eq!(u16_at(&m, 4), Some(GENL_ID_CTRL));
        assert_eq!(u32_at(&m, 8), Some(9));
        assert_eq!(m[16], CTRL_CMD_GETFAMILY);
        assert_eq!(
            attributes(&m[20..]),
            vec![(CTRL_ATTR_FAMILY_NAME, &b"acpi_event\0"[..])]
        );
    }

    #[test]
    fn finds_the_family_and_its_multicast_group() {
        let group = |index: u16, name: &str, id: u32| {
            let mut fields = attr(CTRL_ATTR_MCAST_GRP_ID, &id.to_ne_bytes());
            fields.extend(attr(
                CTRL_ATTR_MCAST_GRP_NAME,
                format!("{name}\0").as_bytes(),
            ));
            attr(index | 0x8000, &fields)
        };
        let mut groups = group(1, "other", 3);
        groups.extend(group(2, "acpi_mc_group", 11));
        let mut attrs = attr(CTRL_ATTR_FAMILY_NAME, b"acpi_event\0");
        attrs.extend(attr(CTRL_ATTR_FAMILY_ID, &27u16.to_ne_bytes()));
        attrs.extend(attr(CTRL_ATTR_MCAST_GROUPS | 0x8000, &groups));
        let reply = message(GENL_ID_CTRL, 1, &attrs);
        assert_eq!(
            parse_family_reply(&reply, "acpi_mc_group").unwrap(),
            FamilyReply::Found {
                family: 27,
                group: Some(11)
            }
        );
        assert_eq!(
            parse_family_reply(&reply, "missing").unwrap(),
            FamilyReply::Found {
                family: 27,
                group: None
            }
        );
    }

    #[test]
    fn a_missing_family_is_the_kernels_errno() {
        let mut reply = Vec::new();
        reply.extend_from_slice(&36u32.to_ne_bytes());
        reply.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        reply.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse_family_reply(&reply, GROUP_NAME).unwrap(),
            FamilyReply::Error(libc::ENOENT)
        );
        assert!(matches!(
            parse_family_reply(&[1, 2, 3], GROUP_NAME),
            Err(AcpiError::Malformed(_))
        ));
    }

    #[test]
    fn parses_power_button_events_and_ignores_the_rest() {
        let mut datagram = message(
            27,
            ACPI_GENL_CMD_EVENT,
            &attr(
                ACPI_GENL_ATTR_EVENT,
                &event_payload("button/power", "PNP0C0C:00", 0x80, 1),
            ),
        );
        // Another family's message and a truncated event: skipped.
        datagram.extend(message(
            30,
            ACPI_GENL_CMD_EVENT,
            &attr(ACPI_GENL_ATTR_EVENT, &event_payload("x", "y", 1, 1)),
        ));
        datagram.extend(message(
            27,
            ACPI_GENL_CMD_EVENT,
            &attr(ACPI_GENL_ATTR_EVENT, &[0; 10]),
        ));
        datagram.extend(message(
            27,
            ACPI_GENL_CMD_EVENT,
            &attr(
                ACPI_GENL_ATTR_EVENT,
                &event_payload("ac_adapter", "ACPI0003:00", 0x80, 0),
            ),
        ));
        let events = parse_events(&datagram, 27);
        assert_eq!(
            events,
            vec![
                AcpiEvent {
                    device_class: "button/power".into(),
                    bus_id: "PNP0C0C:00".into(),
                    kind: 0x80,
                    data: 1
                },
                AcpiEvent {
                    device_class: "ac_adapter".into(),
                    bus_id: "ACPI0003:00".into(),
                    kind: 0x80,
                    data: 0
                },
            ]
        );
        assert!(events[0].is_power_button());
        assert!(!events[1].is_power_button());
    }
}
