//! A fake Cloud Hypervisor for hypeman's tests. No KVM, no guest: it speaks
//! the real server's protocol and follows its rules closely enough that a
//! client which works against it makes the same requests of the real one.
//!
//! - [`http`]: micro-http's framing: `Content-Length` bodies only, a 204
//!   without any length, a 200 with `Content-Length: 0`, one request at a
//!   time.
//! - [`openapi`]: a small validator that checks every request body against
//!   Cloud Hypervisor's OpenAPI document, stricter than OpenAPI in one way:
//!   a property the spec does not list is an error (the real server
//!   silently ignores misspelt fields).
//! - [`vmm`]: the VMM: the VM's states and which request is allowed in
//!   which, error codes and bodies of each era (plain text before v47, a
//!   JSON array after; 500 up to v52, 404 for a missing VM from v53), snapshot
//!   and restore through real files, virtio-mem resizes that take time,
//!   v53's refusal to snapshot while an on-demand restore prefaults, and an
//!   emulated guest that prints a counter to the serial port.
//! - [`server`]: serving all of it on a unix socket, in a test's own
//!   process or as the `fake-cloud-hypervisor` binary standing in for
//!   `cloud-hypervisor`.
//! - [`vsock`]: the hybrid vsock device, and behind it a guest agent that
//!   answers hypeman's time requests, its clock behind after a restore.

pub mod fds;
pub mod http;
pub mod openapi;
pub mod server;
pub mod vmm;
pub mod vsock;
