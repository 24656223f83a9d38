//! The daemon's local API, its protocol and its client (the server is the
//! CLI's `cli::serve`, handed to the daemon as a hook): a unix socket in the data dir (`hypeman.sock`,
//! `0600`, root's) that `hypeman status`, `plan` and `wait` ask instead of
//! looking at every VMM themselves. Answers come from the daemon's own
//! view: each instance's owner task answers with its last look (a request
//! on its channel, a oneshot reply; see `reconcile::Directory`), so nothing
//! probes a VMM socket a second time and a status of 1000 instances costs
//! no VMM round trip at all.
//!
//! ```text
//!  CLI ──{"v":1,"op":"status","name":"web"}\n──► server ──Request::Look──► owner(web)
//!      ◄─{"v":1,"ok":true,"result":{…}}\n─────        ◄──── its last look ──┘
//! ```
//!
//! The protocol is newline-delimited JSON, one request per connection
//! (first line), one reply line, then the server closes. `v` is the
//! protocol version: a request of another version is answered with an
//! error naming the versions this daemon speaks, never ignored. Fields are
//! only ever added within a version; a removal or a change of meaning is a
//! new version. Streams (events, followed logs: issue 12) will send many
//! reply lines on one connection.

pub mod client;
pub mod protocol;

pub use protocol::Op;

/// The socket's file name in the data dir.
pub const SOCKET_FILE: &str = "hypeman.sock";

/// The socket of the daemon on `data_dir`.
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join(SOCKET_FILE)
}
