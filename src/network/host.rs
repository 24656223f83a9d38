//! The kernel side of guest networking, in the daemon's network namespace:
//! the bridge with the gateway address, and the guests' TAPs. Every call
//! makes something so (or removes it) and is safe to repeat; none decides
//! names or addresses (see `ipam` and `names`).
//!
//! Netlink (through `rtnetlink`) does the bridge, addresses, ports and link
//! state. A TAP cannot be created over netlink (the tun driver refuses
//! `RTM_NEWLINK`), so it is made the way `ip tuntap add` does: `TUNSETIFF`
//! on `/dev/net/tun`, then `TUNSETPERSIST` so it outlives the descriptor.
//! The hypervisor opens it again by name.

use super::ipam::Subnet;
use super::names::check_ifname;
use super::NetworkError;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use std::net::IpAddr;
use std::os::fd::AsRawFd;

/// A netlink connection to the current network namespace; clones share it.
#[derive(Clone)]
pub struct HostNetwork {
    handle: Handle,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().raw_os_error(),
        _ => None,
    }
}

fn kind_of(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

/// What the kernel says about a guest's TAP, as far as its health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapFacts {
    /// A port of the guest bridge.
    pub on_bridge: bool,
    /// Administratively up.
    pub up: bool,
    /// Has carrier: a process (the VMM) holds a descriptor attached to it.
    /// A persistent TAP nobody has open has none.
    pub carrier: bool,
}

/// The health of a running guest's TAP, decided from what was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapHealth {
    /// Present, on the bridge, up and held by the VMM.
    Fine,
    /// Held by the VMM but off the bridge or down: `ensure_tap` fixes it in
    /// place and the guest's traffic flows again.
    Misplaced,
    /// No TAP of that name: it was deleted while the VMM ran.
    Missing,
    /// A TAP of that name that no VMM holds: a new device made after the
    /// one the VMM opened was deleted. The VMM's descriptor stays bound to
    /// the deleted device, so this one carries nothing for the guest.
    Orphaned,
}

/// The pure half of the health check: what `facts` (`None`: no such
/// link) mean for a guest whose VMM should be holding the TAP.
pub fn tap_health(facts: Option<TapFacts>) -> TapHealth {
    match facts {
        None => TapHealth::Missing,
        Some(TapFacts { carrier: false, .. }) => TapHealth::Orphaned,
        Some(TapFacts { on_bridge: true, up: true, carrier: true }) => TapHealth::Fine,
        Some(TapFacts { on_bridge: false, .. } | TapFacts { up: false, .. }) => TapHealth::Misplaced,
    }
}

fn carrier_of(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| matches!(a, LinkAttribute::Carrier(c) if *c != 0))
}

fn controller_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

impl HostNetwork {
    /// Opens the connection; must be called inside a tokio runtime, which
    /// drives it until the `HostNetwork` is dropped.
    pub fn connect() -> Result<HostNetwork, NetworkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
        tokio::spawn(connection);
        Ok(HostNetwork { handle })
    }

    fn netlink(op: &'static str, interface: &str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
        let interface = interface.to_string();
        move |source| NetworkError::Netlink { op, interface, source }
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetworkError> {
        check_ifname(name)?;
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Self::netlink("look up", name)(e)),
        }
    }

    /// The bridge `name`, up and holding the subnet's gateway address; made
    /// if missing. Returns its interface index. An existing bridge is
    /// reused with whatever else it carries; an existing non-bridge of that
    /// name is an error, never replaced.
    pub async fn ensure_bridge(&self, name: &str, subnet: &Subnet) -> Result<u32, NetworkError> {
        let link = match self.link(name).await? {
            Some(link) => link,
            None => {
                match self.handle.link().add(LinkBridge::new(name).build()).execute().await {
                    Ok(()) => tracing::info!(bridge = name, "created the guest bridge"),
                    // Made meanwhile by someone else: fine, it is checked below.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(Self::netlink("create bridge", name)(e)),
                }
                self.link(name).await?.ok_or_else(|| NetworkError::WrongKind {
                    interface: name.to_string(),
                    expected: "bridge (it vanished right after it was made)",
                })?
            }
        };
        if kind_of(&link) != Some(&InfoKind::Bridge) {
            return Err(NetworkError::WrongKind { interface: name.to_string(), expected: "bridge" });
        }
        let index = link.header.index;
        let gateway = IpAddr::V4(subnet.gateway());
        let addresses: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(Self::netlink("list the addresses of", name))?;
        let has_gateway = addresses.iter().any(|a| {
            a.header.prefix_len == subnet.prefix()
                && a.attributes.iter().any(|attr| matches!(attr, AddressAttribute::Local(ip) | AddressAttribute::Address(ip) if *ip == gateway))
        });
        if !has_gateway {
            match self.handle.address().add(index, gateway, subnet.prefix()).execute().await {
                Ok(()) => tracing::info!(bridge = name, address = %subnet.gateway(), "gave the bridge the gateway address"),
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(Self::netlink("add the gateway address to", name)(e)),
            }
        }
        // Checked first: the health check passes here on every look at a
        // live guest, and a bridge that is up needs no write.
        if !link.header.flags.contains(LinkFlags::Up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(Self::netlink("bring up", name))?;
        }
        Ok(index)
    }

    /// The interface index of the bridge `name` when it is there and up;
    /// `None` when it is gone or down. Changes nothing.
    pub async fn bridge_index_if_up(&self, name: &str) -> Result<Option<u32>, NetworkError> {
        Ok(self
            .link(name)
            .await?
            .filter(|link| kind_of(link) == Some(&InfoKind::Bridge) && link.header.flags.contains(LinkFlags::Up))
            .map(|link| link.header.index))
    }

    /// The TAP `name`, persistent, a port of the bridge `bridge_index`, up;
    /// made if missing. An existing interface of that name that is not a
    /// TAP is an error.
    pub async fn ensure_tap(&self, name: &str, bridge_index: u32) -> Result<(), NetworkError> {
        let link = match self.link(name).await? {
            Some(link) => link,
            None => {
                create_persistent_tap(name)?;
                tracing::info!(tap = name, "created a guest TAP");
                self.link(name).await?.ok_or_else(|| NetworkError::WrongKind {
                    interface: name.to_string(),
                    expected: "TAP (it vanished right after it was made)",
                })?
            }
        };
        if kind_of(&link) != Some(&InfoKind::Tun) {
            return Err(NetworkError::WrongKind { interface: name.to_string(), expected: "TAP" });
        }
        let index = link.header.index;
        if controller_of(&link) != Some(bridge_index) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).controller(bridge_index).build())
                .execute()
                .await
                .map_err(Self::netlink("attach to the bridge", name))?;
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(Self::netlink("bring up", name))
    }

    /// What the kernel says about the TAP `name` (`None`: there is none),
    /// for [`tap_health`]. An interface of that name that is not a TAP is
    /// an error.
    pub async fn tap_facts(&self, name: &str, bridge_index: u32) -> Result<Option<TapFacts>, NetworkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(None);
        };
        if kind_of(&link) != Some(&InfoKind::Tun) {
            return Err(NetworkError::WrongKind { interface: name.to_string(), expected: "TAP" });
        }
        Ok(Some(TapFacts {
            on_bridge: controller_of(&link) == Some(bridge_index),
            up: link.header.flags.contains(LinkFlags::Up),
            carrier: carrier_of(&link),
        }))
    }

    /// Removes the TAP `name`; `false` when there was none. Refuses to
    /// remove an interface of that name that is not a TAP.
    pub async fn delete_tap(&self, name: &str) -> Result<bool, NetworkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        if kind_of(&link) != Some(&InfoKind::Tun) {
            return Err(NetworkError::WrongKind { interface: name.to_string(), expected: "TAP" });
        }
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => {
                tracing::info!(tap = name, "removed a guest TAP");
                Ok(true)
            }
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Self::netlink("remove", name)(e)),
        }
    }
}

// `TUNSETIFF` and `TUNSETPERSIST` from <linux/if_tun.h>: `_IOW('T', n, int)`,
// although TUNSETIFF really takes a `struct ifreq *`.
nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tun_set_persist,
    nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>())
);

nix::ioctl_write_int_bad!(
    tun_set_owner,
    nix::request_code_write!(b'T', 204, std::mem::size_of::<libc::c_int>())
);

/// Gives the persistent TAP `name` to `uid` (`TUNSETOWNER`), so a VMM
/// running as that uid may attach to it without CAP_NET_ADMIN; `None`
/// takes any owner away (a root VMM needs none). Only while no VMM holds
/// the TAP: attaching to it here would fail while one does.
pub fn set_tap_owner(name: &str, uid: Option<u32>) -> Result<(), NetworkError> {
    let tun = open_tap(name)?;
    // (uid_t)-1 is "no owner" to the tun driver.
    let owner = uid.unwrap_or(u32::MAX) as libc::c_int;
    // SAFETY: the fd is attached to the TAP; the argument is a plain int.
    unsafe { tun_set_owner(tun.as_raw_fd(), owner) }
        .map_err(|e| NetworkError::Tap { op: "set the owner of", tap: name.to_string(), source: e.into() })?;
    Ok(())
}

/// `ip tuntap add NAME mode tap vnet_hdr`, without the `ip`.
fn create_persistent_tap(name: &str) -> Result<(), NetworkError> {
    let tun = open_tap(name)?;
    // SAFETY: the fd is attached to the new TAP; the argument is a plain int.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }
        .map_err(|e| NetworkError::Tap { op: "make persistent", tap: name.to_string(), source: e.into() })?;
    Ok(())
}

/// A descriptor attached to the TAP `name` (made if missing, gone again
/// with the descriptor unless made persistent), as a VMM holds one.
fn open_tap(name: &str) -> Result<std::fs::File, NetworkError> {
    check_ifname(name)?;
    let err = |op: &'static str| {
        let tap = name.to_string();
        move |source: std::io::Error| NetworkError::Tap { op, tap, source }
    };
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(err("open /dev/net/tun for"))?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is open for the call and `req` is the ifreq it reads.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.map_err(|e| err("create")(e.into()))?;
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on a thread of its own inside a fresh network namespace
    /// (`unshare(CLONE_NEWNET)` moves only the calling thread), with a
    /// current-thread runtime there. `None` when this process may not make
    /// namespaces or TAPs (not root): the test then says so and passes
    /// nothing off as checked.
    fn in_private_netns<T: Send + 'static>(
        body: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> Option<T> {
        let ran = std::thread::spawn(move || {
            // SAFETY: unshare(2) on this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
                return None;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            Some(rt.block_on(body()))
        })
        .join()
        .expect("namespace thread");
        // Decided on the test's own thread, so a failure is the test's.
        crate::test_gate::capability("root (CAP_NET_ADMIN) and /dev/net/tun", ran.is_some());
        ran
    }

    #[test]
    fn bridge_and_tap_are_made_once_reused_and_removed() {
        let ran = in_private_netns(|| {
            Box::pin(async {
                let subnet: Subnet = "10.55.0.0/24".parse().unwrap();
                let net = HostNetwork::connect().unwrap();
                assert!(net.link("hbtest0").await.unwrap().is_none());
                let bridge = net.ensure_bridge("hbtest0", &subnet).await.unwrap();
                assert_eq!(net.ensure_bridge("hbtest0", &subnet).await.unwrap(), bridge, "reused");
                let addresses: Vec<_> = net
                    .handle
                    .address()
                    .get()
                    .set_link_index_filter(bridge)
                    .execute()
                    .try_collect()
                    .await
                    .unwrap();
                let v4: Vec<_> = addresses
                    .iter()
                    .filter(|a| a.header.family == rtnetlink::packet_route::AddressFamily::Inet)
                    .collect();
                assert_eq!(v4.len(), 1, "the gateway address, once: {addresses:?}");
                assert_eq!(v4[0].header.prefix_len, 24);
                assert!(v4[0].attributes.contains(&AddressAttribute::Local("10.55.0.1".parse().unwrap())));
                let up = || async { net.link("hbtest0").await.unwrap().unwrap().header.flags.contains(LinkFlags::Up) };
                assert!(up().await);
                net.handle.link().set(LinkUnspec::new_with_index(bridge).down().build()).execute().await.unwrap();
                assert!(!up().await);
                net.ensure_bridge("hbtest0", &subnet).await.unwrap();
                assert!(up().await, "a bridge set down is brought up again");

                net.ensure_tap("hmtesttap000001", bridge).await.unwrap();
                net.ensure_tap("hmtesttap000001", bridge).await.unwrap();
                let tap = net.link("hmtesttap000001").await.unwrap().expect("made");
                assert_eq!(kind_of(&tap), Some(&InfoKind::Tun));
                assert_eq!(controller_of(&tap), Some(bridge));

                // Not ours to touch: a bridge named like a TAP, a TAP
                // named like the bridge.
                let err = net.delete_tap("hbtest0").await.unwrap_err();
                assert_eq!(err.to_string(), "hbtest0 exists but is not a TAP");
                let err = net.ensure_bridge("hmtesttap000001", &subnet).await.unwrap_err();
                assert_eq!(err.to_string(), "hmtesttap000001 exists but is not a bridge");

                assert!(net.delete_tap("hmtesttap000001").await.unwrap());
                assert!(!net.delete_tap("hmtesttap000001").await.unwrap(), "already gone");
                assert!(net.link("hmtesttap000001").await.unwrap().is_none());
            })
        });
        if ran.is_none() {
            eprintln!("bridge_and_tap_are_made_once_reused_and_removed did not run");
        }
    }

    #[test]
    fn the_health_of_a_tap_follows_from_its_facts() {
        let facts = |on_bridge, up, carrier| Some(TapFacts { on_bridge, up, carrier });
        assert_eq!(tap_health(None), TapHealth::Missing);
        assert_eq!(tap_health(facts(true, true, true)), TapHealth::Fine);
        assert_eq!(tap_health(facts(false, true, true)), TapHealth::Misplaced);
        assert_eq!(tap_health(facts(true, false, true)), TapHealth::Misplaced);
        assert_eq!(tap_health(facts(false, false, true)), TapHealth::Misplaced);
        for (on_bridge, up) in [(true, true), (true, false), (false, true), (false, false)] {
            assert_eq!(tap_health(facts(on_bridge, up, false)), TapHealth::Orphaned, "{on_bridge} {up}");
        }
    }

    /// What the daemon's health check relies on, against the real kernel:
    /// a TAP a VMM holds has carrier; deleting it leaves the VMM's
    /// descriptor bound to the dead device, and a TAP made again under the
    /// same name is a different device that descriptor never reaches.
    #[test]
    fn a_deleted_tap_made_again_is_not_the_one_the_vmm_holds() {
        let ran = in_private_netns(|| {
            Box::pin(async {
                use std::io::Write;
                let subnet: Subnet = "10.56.0.0/24".parse().unwrap();
                let net = HostNetwork::connect().unwrap();
                let bridge = net.ensure_bridge("hbtest1", &subnet).await.unwrap();
                let tap = "hmtesttap000002";
                net.ensure_tap(tap, bridge).await.unwrap();
                let health = || async { tap_health(net.tap_facts(tap, bridge).await.unwrap()) };
                assert_eq!(health().await, TapHealth::Orphaned, "nobody holds it yet");

                let mut vmm = open_tap(tap).unwrap();
                assert_eq!(health().await, TapHealth::Fine);
                let index = net.link(tap).await.unwrap().unwrap().header.index;
                net.handle.link().set(LinkUnspec::new_with_index(index).down().build()).execute().await.unwrap();
                assert_eq!(health().await, TapHealth::Misplaced);
                net.ensure_tap(tap, bridge).await.unwrap();
                assert_eq!(health().await, TapHealth::Fine, "fixed in place, still held");

                net.delete_tap(tap).await.unwrap();
                assert_eq!(health().await, TapHealth::Missing);
                net.ensure_tap(tap, bridge).await.unwrap();
                assert_eq!(health().await, TapHealth::Orphaned, "the VMM's descriptor does not reach the new TAP");
                // A virtio-net frame header and a minimal Ethernet frame.
                let err = vmm.write_all(&[0u8; 12 + 60]).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::EBADFD), "bound to the deleted device: {err}");
            })
        });
        if ran.is_none() {
            eprintln!("a_deleted_tap_made_again_is_not_the_one_the_vmm_holds did not run");
        }
    }
}
