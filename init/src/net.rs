//! The guest's network: loopback up, then the one virtio NIC (picked by the
//! MAC the host gave it) with a static IPv4 address and a default route, all
//! through the classic `SIOCSIF*`/`SIOCADDRT` ioctls; plus the text of
//! `/etc/resolv.conf`. The kernel's `ip=` cannot do this because virtio_net
//! is a module loaded after the kernel's own IP autoconfig has run.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::error::InitError;

/// The interface whose `address` in `<sys_root>/class/net` is `mac`, and the
/// names of all interfaces seen (for the error message).
pub fn interface_by_mac(sys_root: &Path, mac: &[u8; 6]) -> Result<Option<String>, InitError> {
    let dir = sys_root.join("class/net");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(InitError::io("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| InitError::io("list", &dir, e))?;
        let Ok(text) = std::fs::read_to_string(entry.path().join("address")) else {
            continue;
        };
        if hypeman_contract::config::parse_mac(text.trim()).ok().as_ref() == Some(mac) {
            return Ok(Some(entry.file_name().to_string_lossy().into_owned()));
        }
    }
    Ok(None)
}

/// All interface names, for error messages.
pub fn interface_names(sys_root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_root.join("class/net"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `/24` → `255.255.255.0`.
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    Ipv4Addr::from(mask)
}

/// Contents of `/etc/resolv.conf` for the given servers.
pub fn resolv_conf(dns: &[IpAddr]) -> String {
    let mut text = String::from("# written by hypeman-init\n");
    for server in dns {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

/// Contents of `/etc/hosts`: loopback names, and the hostname on the
/// guest's own address (on `127.0.1.1`, Debian's convention, without one).
pub fn hosts_file(hostname: &str, ip: Option<Ipv4Addr>) -> String {
    let own = ip.map_or_else(|| "127.0.1.1".to_string(), |ip| ip.to_string());
    format!(
        "# written by hypeman-init\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{own}\t{hostname}\n"
    )
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux, and the
    // kernel reads the address back as sockaddr_in because of sin_family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An `AF_INET` datagram socket: the handle every `SIOC*` ioctl goes through.
struct ControlSocket(OwnedFd);

impl ControlSocket {
    fn open() -> Result<ControlSocket, InitError> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(InitError::last_os("open a network control socket"));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        Ok(ControlSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn request(interface: &str) -> Result<libc::ifreq, InitError> {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let name = interface.as_bytes();
        if name.len() >= req.ifr_name.len() || name.contains(&0) {
            return Err(InitError::Nul {
                what: format!("interface name {interface:?}"),
            });
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name) {
            *dst = *src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl<T>(
        &self,
        op: &'static str,
        interface: &str,
        code: libc::c_ulong,
        arg: &mut T,
    ) -> Result<(), InitError> {
        // SAFETY: `arg` is the struct type the request code expects. The
        // request's C type differs between libcs (`c_ulong` on glibc, `c_int`
        // on musl); the codes fit either.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), code as _, arg as *mut T) };
        if rc == 0 {
            Ok(())
        } else {
            Err(InitError::Net {
                op,
                interface: interface.to_owned(),
                source: std::io::Error::last_os_error(),
            })
        }
    }

    fn set_up(&self, interface: &str) -> Result<(), InitError> {
        let mut req = Self::request(interface)?;
        self.ioctl("read flags", interface, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl("bring up", interface, libc::SIOCSIFFLAGS, &mut req)
    }
}

/// Brings `lo` up; apps expect 127.0.0.1 even without a network.
pub fn loopback_up() -> Result<(), InitError> {
    ControlSocket::open()?.set_up("lo")
}

/// Address, link up and default route for `interface`.
pub fn configure(
    interface: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> Result<(), InitError> {
    let sock = ControlSocket::open()?;

    let mut req = ControlSocket::request(interface)?;
    req.ifr_ifru.ifru_addr = sockaddr(ip);
    sock.ioctl("set the address", interface, libc::SIOCSIFADDR, &mut req)?;

    let mut req = ControlSocket::request(interface)?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix_len));
    sock.ioctl("set the netmask", interface, libc::SIOCSIFNETMASK, &mut req)?;

    sock.set_up(interface)?;

    let mut dev = Vec::from(interface.as_bytes());
    dev.push(0);
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route.rt_dev = dev.as_mut_ptr().cast::<libc::c_char>();
    sock.ioctl(
        "add the default route",
        interface,
        libc::SIOCADDRT,
        &mut route,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_from_prefix_lengths() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
    }

    #[test]
    fn resolv_conf_lists_servers_in_order() {
        let text = resolv_conf(&[
            "10.0.2.3".parse().expect("ip"),
            "2606:4700::1111".parse().expect("ip"),
        ]);
        assert_eq!(
            text,
            "# written by hypeman-init\nnameserver 10.0.2.3\nnameserver 2606:4700::1111\n"
        );
    }

    #[test]
    fn hosts_file_names_the_guest_on_its_address() {
        assert_eq!(
            hosts_file("web", Some(Ipv4Addr::new(10, 100, 3, 4))),
            "# written by hypeman-init\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.100.3.4\tweb\n"
        );
        assert!(hosts_file("batch", None).ends_with("\n127.0.1.1\tbatch\n"));
    }

    #[test]
    fn finds_the_interface_by_mac_in_a_fake_sysfs() {
        let sys = std::env::temp_dir().join(format!("hypeman-init-net-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for (name, mac) in [
            ("lo", "00:00:00:00:00:00"),
            ("eth0", "52:54:00:12:34:56"),
            ("eth1", "52:54:00:AA:BB:CC"),
        ] {
            std::fs::create_dir_all(sys.join("class/net").join(name)).expect("mkdir");
            std::fs::write(
                sys.join("class/net").join(name).join("address"),
                format!("{mac}\n"),
            )
            .expect("write");
        }
        let mac = hypeman_contract::config::parse_mac("52:54:00:aa:bb:cc").expect("mac");
        assert_eq!(
            interface_by_mac(&sys, &mac).expect("scan").as_deref(),
            Some("eth1")
        );
        let absent = hypeman_contract::config::parse_mac("52:54:00:00:00:99").expect("mac");
        assert_eq!(interface_by_mac(&sys, &absent).expect("scan"), None);
        assert_eq!(interface_names(&sys), ["eth0", "eth1", "lo"]);
        let _ = std::fs::remove_dir_all(&sys);
    }
}
