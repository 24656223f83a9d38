//! Address management: which IPv4 address of the bridge's subnet a guest
//! gets. Pure: the caller passes the addresses held by every other guest
//! (a [`LeaseIndex`] built from their metadata) and persists the lease it
//! gets back before anything uses it, so a lease survives restarts and a
//! crash between choosing and recording only means choosing again.
//!
//! Layout of a subnet `N/p`: `N` is the network address, `N+1` the gateway
//! (on the bridge), the broadcast address is never handed out, and guests
//! get the addresses in between. A guest's search starts at a point derived
//! from its ULID and walks upwards (wrapping) to the first free address.
//! So the same guest asks for the same address every time, and a released
//! address is not the next one handed out (peers may still hold it in their
//! ARP caches); the lowest-free alternative would reuse it at once.

use super::names;
use super::NetworkError;
use crate::store::NetworkLease;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use ulid::Ulid;

/// The largest subnet prefix that still leaves room for one guest.
pub const MAX_PREFIX: u8 = 30;
/// Below this the search space stops being a sensible bridge.
pub const MIN_PREFIX: u8 = 8;

/// An IPv4 network in CIDR form, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Subnet, NetworkError> {
        let bad = |reason: String| Err(NetworkError::BadSubnet { reason });
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return bad(format!(
                "the prefix length must be between {MIN_PREFIX} and {MAX_PREFIX}, not {prefix}"
            ));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            let base = Ipv4Addr::from(u32::from(network) & subnet.mask());
            return bad(format!("{network} has host bits set for /{prefix}; write {base}/{prefix}"));
        }
        Ok(subnet)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The bridge's address: the first one after the network address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// How many addresses guests can get.
    pub fn guest_capacity(&self) -> u32 {
        // Network address, gateway and broadcast are not for guests.
        (1u32 << (32 - u32::from(self.prefix))) - 3
    }

    fn first_guest(&self) -> u32 {
        u32::from(self.network) + 2
    }

    /// Whether `ip` is one of the addresses guests may hold.
    pub fn is_guest_address(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip >= self.first_guest() && ip < self.first_guest() + self.guest_capacity()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = NetworkError;

    /// `10.100.0.0/16`.
    fn from_str(s: &str) -> Result<Subnet, NetworkError> {
        let bad = || NetworkError::BadSubnet {
            reason: format!("{s:?} is not an IPv4 subnet such as \"10.100.0.0/16\""),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Subnet::new(network, prefix)
    }
}

/// The addresses other guests hold, as the guest looking for one sees
/// them.
pub trait Taken {
    fn is_taken(&self, ip: Ipv4Addr) -> bool;
    /// How many of `subnet`'s guest addresses are taken (for the error
    /// that says it is full).
    fn taken_in(&self, subnet: &Subnet) -> usize;
}

impl Taken for BTreeSet<Ipv4Addr> {
    fn is_taken(&self, ip: Ipv4Addr) -> bool {
        self.contains(&ip)
    }

    fn taken_in(&self, subnet: &Subnet) -> usize {
        self.iter().filter(|ip| subnet.is_guest_address(**ip)).count()
    }
}

/// Which guest holds which address: every guest's recorded lease, kept in
/// memory so that leasing an address needs no read of every guest's
/// metadata. The metadata stays the truth: the caller builds the index from
/// it and records each lease change once it is persisted.
#[derive(Debug, Default)]
pub struct LeaseIndex {
    by_guest: HashMap<Ulid, Ipv4Addr>,
    /// (address, holder). Two guests can hold one address (a copied guest
    /// directory) until one of them is given another.
    holders: BTreeSet<(Ipv4Addr, Ulid)>,
}

impl LeaseIndex {
    /// Records that guest `id` holds `lease` (none: no address). An
    /// unparsable lease holds none, as [`still_valid`] replaces it.
    pub fn set(&mut self, id: Ulid, lease: Option<&NetworkLease>) {
        if let Some(old) = self.by_guest.remove(&id) {
            self.holders.remove(&(old, id));
        }
        if let Some(ip) = lease.and_then(|l| l.ip.parse().ok()) {
            self.by_guest.insert(id, ip);
            self.holders.insert((ip, id));
        }
    }

    /// Whether the index has guest `id` holding what its metadata records
    /// (`recorded`): if not, the store changed behind the index's back.
    pub fn agrees(&self, id: Ulid, recorded: Option<&NetworkLease>) -> bool {
        self.by_guest.get(&id).copied() == recorded.and_then(|l| l.ip.parse().ok())
    }

    /// How many guests hold an address.
    pub fn len(&self) -> usize {
        self.by_guest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_guest.is_empty()
    }

    /// The addresses every guest but `id` holds.
    pub fn others_of(&self, id: Ulid) -> OthersOf<'_> {
        OthersOf { index: self, id }
    }

    fn holders_of(&self, ip: Ipv4Addr) -> impl Iterator<Item = Ulid> + '_ {
        self.holders.range((ip, Ulid::nil())..=(ip, Ulid::from(u128::MAX))).map(|(_, id)| *id)
    }
}

/// [`LeaseIndex::others_of`].
pub struct OthersOf<'a> {
    index: &'a LeaseIndex,
    id: Ulid,
}

impl Taken for OthersOf<'_> {
    fn is_taken(&self, ip: Ipv4Addr) -> bool {
        self.index.holders_of(ip).any(|holder| holder != self.id)
    }

    fn taken_in(&self, subnet: &Subnet) -> usize {
        let ips: BTreeSet<Ipv4Addr> = self
            .index
            .holders
            .iter()
            .filter(|(ip, holder)| *holder != self.id && subnet.is_guest_address(*ip))
            .map(|(ip, _)| *ip)
            .collect();
        ips.len()
    }
}

/// Where guest `id`'s search starts, as an offset into the guest range.
fn start_offset(id: Ulid, capacity: u32) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(u128::from(id).to_be_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(capacity)) as u32
}

/// A free address for guest `id`: the first at or after its start point
/// (wrapping) that no other guest holds.
pub fn allocate(subnet: &Subnet, id: Ulid, taken: &impl Taken) -> Result<Ipv4Addr, NetworkError> {
    let capacity = subnet.guest_capacity();
    let start = start_offset(id, capacity);
    (0..capacity)
        .map(|step| Ipv4Addr::from(subnet.first_guest() + (start + step) % capacity))
        .find(|ip| !taken.is_taken(*ip))
        .ok_or_else(|| NetworkError::Exhausted { subnet: *subnet, in_use: taken.taken_in(subnet) })
}

/// The full lease record of guest `id` holding `ip`.
pub fn lease(subnet: &Subnet, id: Ulid, ip: Ipv4Addr) -> NetworkLease {
    NetworkLease {
        ip: ip.to_string(),
        cidr: subnet.prefix(),
        gateway: subnet.gateway().to_string(),
        mac: names::format_mac(&names::mac(id)),
        tap: names::tap_name(id),
    }
}

/// Whether a recorded lease still matches guest `id` on `subnet` and does
/// not collide with an address `others` hold. A lease that does not (the
/// subnet setting changed, or a copied guest directory) is replaced.
pub fn still_valid(
    recorded: &NetworkLease,
    subnet: &Subnet,
    id: Ulid,
    others: &impl Taken,
) -> bool {
    match recorded.ip.parse::<Ipv4Addr>() {
        Ok(ip) => {
            subnet.is_guest_address(ip) && !others.is_taken(ip) && *recorded == lease(subnet, id, ip)
        }
        Err(_) => false,
    }
}

/// Guest `id`'s lease: the recorded one while it is still valid, else a
/// fresh one. `others` are the leases every other guest holds.
pub fn lease_for(
    subnet: &Subnet,
    id: Ulid,
    recorded: Option<&NetworkLease>,
    others: &impl Taken,
) -> Result<NetworkLease, NetworkError> {
    match recorded {
        Some(l) if still_valid(l, subnet, id, others) => Ok(l.clone()),
        _ => Ok(lease(subnet, id, allocate(subnet, id, others)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        s.parse().expect("valid subnet")
    }

    #[test]
    fn parses_and_describes_subnets() {
        let s = subnet("10.100.0.0/16");
        assert_eq!(s.to_string(), "10.100.0.0/16");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(s.guest_capacity(), 65533);
        assert!(s.is_guest_address(Ipv4Addr::new(10, 100, 0, 2)));
        assert!(s.is_guest_address(Ipv4Addr::new(10, 100, 255, 254)));
        for not_guest in ["10.100.0.0", "10.100.0.1", "10.100.255.255", "10.101.0.2"] {
            assert!(!s.is_guest_address(not_guest.parse().unwrap()), "{not_guest}");
        }
        assert_eq!(subnet("192.168.7.0/30").guest_capacity(), 1);
    }

    #[test]
    fn rejects_bad_subnets_with_a_reason() {
        let cases = [
            ("10.100.0.0", "not an IPv4 subnet"),
            ("10.100.0.0/", "not an IPv4 subnet"),
            ("10.100.0.0/+8", "not an IPv4 subnet"),
            ("fd00::/64", "not an IPv4 subnet"),
            ("10.100.0.0/31", "between 8 and 30, not 31"),
            ("10.0.0.0/7", "between 8 and 30, not 7"),
            ("10.100.0.1/16", "write 10.100.0.0/16"),
        ];
        for (text, want) in cases {
            let err = text.parse::<Subnet>().expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn allocation_is_deterministic_and_skips_taken_addresses() {
        let s = subnet("10.100.0.0/16");
        let id = Ulid::from_string("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let first = allocate(&s, id, &BTreeSet::new()).unwrap();
        assert_eq!(first, allocate(&s, id, &BTreeSet::new()).unwrap());
        assert!(s.is_guest_address(first));
        let taken = BTreeSet::from([first]);
        let second = allocate(&s, id, &taken).unwrap();
        assert_ne!(second, first);
        assert_eq!(u32::from(second), u32::from(first) + 1, "walks upwards from the start point");
    }

    #[test]
    fn different_guests_start_at_different_points() {
        let s = subnet("10.100.0.0/16");
        let ips: BTreeSet<Ipv4Addr> = (0..50u128)
            .map(|n| allocate(&s, Ulid::from(n << 64 | 7), &BTreeSet::new()).unwrap())
            .collect();
        assert!(ips.len() > 45, "start points collide too often: {}", ips.len());
    }

    #[test]
    fn allocation_wraps_and_fills_a_small_subnet_then_reports_exhaustion() {
        // A /29 has 5 guest addresses: .2 to .6.
        let s = subnet("192.168.7.0/29");
        let mut taken = BTreeSet::new();
        for n in 0..5u128 {
            let ip = allocate(&s, Ulid::from(n), &taken).unwrap();
            assert!(s.is_guest_address(ip), "{ip}");
            assert!(taken.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(
            taken.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["192.168.7.2", "192.168.7.3", "192.168.7.4", "192.168.7.5", "192.168.7.6"]
        );
        let err = allocate(&s, Ulid::from(99u128), &taken).unwrap_err();
        assert_eq!(err.to_string(), "no free address left in 192.168.7.0/29 (5 in use)");
        // Released: the freed address is the one handed out next.
        taken.remove(&"192.168.7.4".parse().unwrap());
        assert_eq!(allocate(&s, Ulid::from(99u128), &taken).unwrap().to_string(), "192.168.7.4");
    }

    #[test]
    fn addresses_outside_the_subnet_do_not_count_against_it() {
        let s = subnet("192.168.7.0/30");
        let foreign = BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(allocate(&s, Ulid::nil(), &foreign).unwrap(), Ipv4Addr::new(192, 168, 7, 2));
    }

    #[test]
    fn a_lease_stays_valid_until_settings_or_others_say_otherwise() {
        let s = subnet("10.100.0.0/16");
        let id = Ulid::from_string("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let ip = allocate(&s, id, &BTreeSet::new()).unwrap();
        let l = lease(&s, id, ip);
        assert_eq!(l.gateway, "10.100.0.1");
        assert_eq!(l.cidr, 16);
        assert!(still_valid(&l, &s, id, &BTreeSet::new()));
        assert!(!still_valid(&l, &subnet("10.200.0.0/16"), id, &BTreeSet::new()), "subnet changed");
        assert!(!still_valid(&l, &s, id, &BTreeSet::from([ip])), "someone else holds it");
        assert!(!still_valid(&l, &s, Ulid::nil(), &BTreeSet::new()), "another guest's lease");
        let mut garbled = l.clone();
        garbled.ip = "ten".into();
        assert!(!still_valid(&garbled, &s, id, &BTreeSet::new()));
    }

    #[test]
    fn the_index_tracks_who_holds_what() {
        let s = subnet("192.168.7.0/29");
        let (a, b, c) = (Ulid::from(1u128), Ulid::from(2u128), Ulid::from(3u128));
        let ip = |last: u8| Ipv4Addr::new(192, 168, 7, last);
        let mut index = LeaseIndex::default();
        index.set(a, Some(&lease(&s, a, ip(2))));
        index.set(b, Some(&lease(&s, b, ip(3))));
        assert_eq!(index.len(), 2);
        assert!(index.others_of(a).is_taken(ip(3)));
        assert!(!index.others_of(a).is_taken(ip(2)), "a guest's own address is not taken to it");
        assert!(index.others_of(c).is_taken(ip(2)));
        assert_eq!(index.others_of(c).taken_in(&s), 2);

        // A new lease moves the guest; its old address is free again.
        index.set(a, Some(&lease(&s, a, ip(4))));
        assert!(!index.others_of(c).is_taken(ip(2)));
        assert!(index.others_of(c).is_taken(ip(4)));
        assert!(index.agrees(a, Some(&lease(&s, a, ip(4)))));
        assert!(!index.agrees(a, Some(&lease(&s, a, ip(2)))), "the record moved behind its back");
        assert!(!index.agrees(c, Some(&lease(&s, c, ip(5)))), "a guest it has never seen");
        assert!(index.agrees(c, None));

        // Removed: no longer held, and nothing is left of it.
        index.set(a, None);
        assert!(!index.others_of(c).is_taken(ip(4)));
        assert_eq!(index.len(), 1);

        // Two guests on one address (a copied guest): taken to each of them.
        index.set(c, Some(&lease(&s, c, ip(3))));
        assert!(index.others_of(b).is_taken(ip(3)));
        assert!(index.others_of(c).is_taken(ip(3)));
        assert_eq!(index.others_of(a).taken_in(&s), 1, "one address, however many holders");
        index.set(b, None);
        assert!(!index.others_of(c).is_taken(ip(3)));

        // An unparsable lease holds nothing.
        let mut garbled = lease(&s, b, ip(6));
        garbled.ip = "garbage".into();
        index.set(b, Some(&garbled));
        assert!(!index.others_of(c).is_taken(ip(6)));
        assert!(index.agrees(b, Some(&garbled)));
    }

    #[test]
    fn allocation_against_the_index_matches_allocation_against_a_set() {
        let s = subnet("192.168.7.0/29");
        let mut index = LeaseIndex::default();
        let mut set = BTreeSet::new();
        let mut last = None;
        for n in 0..5u128 {
            let id = Ulid::from(n);
            let ip = allocate(&s, id, &index.others_of(id)).unwrap();
            assert_eq!(ip, allocate(&s, id, &set).unwrap());
            index.set(id, Some(&lease(&s, id, ip)));
            set.insert(ip);
            last = Some(ip);
        }
        let late = Ulid::from(99u128);
        let err = allocate(&s, late, &index.others_of(late)).unwrap_err();
        assert_eq!(err.to_string(), "no free address left in 192.168.7.0/29 (5 in use)");
        // In a full subnet a guest asking again gets its own address back.
        let id = Ulid::from(4u128);
        let again = lease_for(&s, id, None, &index.others_of(id)).unwrap();
        assert_eq!(Some(again.ip.parse().unwrap()), last);
    }
}
