//! Descriptors on the API socket, as micro-http receives them: every read
//! is a `recvmsg`, and SCM_RIGHTS descriptors that arrive with a request's
//! bytes belong to that request (Cloud Hypervisor's `vm.add-net` and
//! `vm.restore` take TAPs that way). A received TAP is checked to be one,
//! and its interface name kept for the tests to see.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one read takes (micro-http's limit is larger; a
/// VM here has one NIC).
const MAX_FDS: usize = 16;

/// A stream whose reads collect the descriptors sent with the bytes.
pub struct FdStream {
    stream: UnixStream,
    received: Vec<OwnedFd>,
}

impl FdStream {
    pub fn new(stream: UnixStream) -> FdStream {
        FdStream { stream, received: Vec::new() }
    }

    /// The descriptors received so far, taken.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.received)
    }
}

impl Read for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: every pointer in msg points into live buffers above.
        let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: walking the control messages the kernel just wrote.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        self.received.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(n as usize)
    }
}

/// The interface a TUN/TAP descriptor is attached to (`TUNGETIFF`), or
/// why it is not one.
pub fn tap_name(fd: &OwnedFd) -> Result<String, String> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // TUNGETIFF = _IOR('T', 210, unsigned int).
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    // SAFETY: the fd is open and `req` is the ifreq the call fills.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req) } != 0 {
        return Err(format!("descriptor {} is not a TAP: {}", fd.as_raw_fd(), io::Error::last_os_error()));
    }
    let name: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(String::from_utf8_lossy(&name).into_owned())
}
