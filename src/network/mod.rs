//! Guest networking on the host: one Linux bridge that carries the gateway
//! address, one persistent TAP per guest attached to it, and a static IPv4
//! address per guest handed out from the bridge's subnet.
//!
//! ```text
//!   host netns                          guest
//!   hypeman0 (bridge, 10.100.0.1/16)
//!    ├─ hm<13 chars of ULID> (TAP) ◄──► virtio-net, MAC 02:xx:…, 10.100.x.y/16
//!    └─ hm… (TAP)                       default route via 10.100.0.1
//! ```
//!
//! The decisions are pure and live in [`ipam`] (which address, the lease
//! record) and [`names`] (TAP name and MAC, both derived from the guest's
//! ULID). The kernel calls live in [`host`]: netlink (rtnetlink) for the
//! bridge, addresses, ports and link state, and the `/dev/net/tun` ioctls
//! for the TAP itself, which netlink cannot create.
//!
//! This module does not decide when a guest gets or loses its lease or its
//! TAP (that is `instances`), does not route or NAT traffic beyond the
//! bridge (outbound access is the host administrator's choice; see the
//! README), and never touches an interface whose name it did not derive.
//!
//! Crash safety: every step is "make it so" and safe to repeat. A lease is
//! written to the guest's metadata before its TAP is made, so a TAP always
//! has a record naming it; an existing bridge, address or TAP is reused.

pub mod host;
pub mod ipam;
pub mod names;

use std::net::Ipv4Addr;

pub use ipam::Subnet;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("no free address left in {subnet} ({in_use} in use)")]
    Exhausted { subnet: Subnet, in_use: usize },

    #[error("the recorded lease {ip} is not an address of {subnet}")]
    ForeignLease { ip: Ipv4Addr, subnet: Subnet },

    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),

    #[error("cannot {op} {interface}")]
    Netlink {
        op: &'static str,
        interface: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("cannot {op} TAP {tap}")]
    Tap {
        op: &'static str,
        tap: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{interface} exists but is not a {expected}")]
    WrongKind {
        interface: String,
        expected: &'static str,
    },

    #[error("{reason}")]
    BadSubnet { reason: String },

    #[error("interface name {0:?} is empty, longer than 15 bytes or has characters other than letters, digits, '-', '_' and '.'")]
    BadName(String),
}
