//! Sending descriptors to a VMM over its unix control socket (SCM_RIGHTS):
//! QEMU's `getfd` and Cloud Hypervisor's `vm.add-net`/`vm.restore` take
//! them on the same message as the request's first bytes. Shared by both
//! clients; a plain byte stream cannot carry them, hence `sendmsg`.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use tokio::net::UnixStream;

/// Writes all of `bytes` to `stream`, `fds` riding on the first message
/// only (the receiver takes them with the first bytes it reads).
pub async fn send_all(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let rest = &bytes[sent..];
        let with = if sent == 0 { fds } else { &[] };
        match stream.try_io(tokio::io::Interest::WRITABLE, || send_with_fds(stream.as_raw_fd(), rest, with)) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `sendmsg` of `bytes`, with `fds` as SCM_RIGHTS when there are any.
pub fn send_with_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let data_len = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(data_len) long, so the
        // first header and the descriptors fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg) as *mut RawFd, fds.len());
        }
    }
    // SAFETY: every pointer in msg points into live buffers above.
    let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two descriptors and a message longer than one write arrive whole:
    /// the receiver finds both with the first bytes, and they are the
    /// files that were sent.
    #[tokio::test]
    async fn descriptors_ride_on_the_first_bytes() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let sender = UnixStream::from_std(a).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<std::fs::File> = ["one", "two"]
            .iter()
            .map(|n| {
                std::fs::write(dir.path().join(n), n).unwrap();
                std::fs::File::open(dir.path().join(n)).unwrap()
            })
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let payload = vec![b'x'; 300_000];
        // Received as the fake Cloud Hypervisor receives, with recvmsg.
        let reader = std::thread::spawn(move || {
            let mut stream = fake_cloud_hypervisor::fds::FdStream::new(b);
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut stream, &mut all).unwrap();
            (stream.take_fds(), all.len())
        });
        send_all(&sender, &payload, &raw).await.unwrap();
        drop(sender);
        let (got, total) = reader.join().unwrap();
        assert_eq!(total, payload.len());
        assert_eq!(got.len(), 2);
        for (fd, want) in got.into_iter().zip(["one", "two"]) {
            let file = std::fs::File::from(fd);
            assert_eq!(std::io::read_to_string(file).unwrap(), want);
        }
    }
}
