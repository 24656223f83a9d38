//! Names derived from a guest's ULID: its TAP device and its MAC address.
//! Pure and stable, so a restarted daemon (or a restore, which needs the
//! same TAP and MAC the snapshot was taken with) computes the same ones.

use super::NetworkError;
use ulid::Ulid;

/// Linux interface names are at most 15 bytes (`IFNAMSIZ` 16 with the NUL).
pub const IFNAME_MAX: usize = 15;

/// Every TAP hypeman makes starts with this, so an administrator can tell
/// them apart (and a firewall or networkd rule can match `hm*`).
pub const TAP_PREFIX: &str = "hm";

/// `hm` + the last 13 characters of the ULID, lower-cased: 15 bytes. Those
/// characters are the ULID's random part (the first 10 are its timestamp,
/// which guests created together share), 65 bits of it.
pub fn tap_name(id: Ulid) -> String {
    let text = id.to_string().to_ascii_lowercase();
    let suffix = &text[text.len() - (IFNAME_MAX - TAP_PREFIX.len())..];
    format!("{TAP_PREFIX}{suffix}")
}

/// A locally administered unicast MAC (`02:…`), the other five bytes from
/// a hash of the ULID.
pub fn mac(id: Ulid) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(u128::from(id).to_be_bytes());
    let mut mac = [0u8; 6];
    mac[0] = 0x02;
    mac[1..].copy_from_slice(&digest[..5]);
    mac
}

/// `02:ab:cd:ef:01:23`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An interface name the kernel will take and that cannot be confused with
/// a path or option: 1–15 bytes of `[A-Za-z0-9._-]`.
pub fn check_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Ulid {
        Ulid::from_string("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap()
    }

    #[test]
    fn tap_names_are_short_stable_and_from_the_random_part() {
        assert_eq!(tap_name(id()), "hm4rrffq69g5fav");
        assert_eq!(tap_name(id()).len(), IFNAME_MAX);
        check_ifname(&tap_name(id())).unwrap();
        // Same millisecond, different randomness: different TAPs.
        let a = Ulid::from_parts(1_700_000_000_000, 1);
        let b = Ulid::from_parts(1_700_000_000_000, 2);
        assert_ne!(tap_name(a), tap_name(b));
    }

    #[test]
    fn macs_are_locally_administered_unicast_and_stable() {
        let m = mac(id());
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(m, mac(id()));
        assert_ne!(m, mac(Ulid::nil()));
        let text = format_mac(&m);
        assert_eq!(hypeman_contract::config::parse_mac(&text).unwrap(), m);
        assert_eq!(format_mac(&[2, 0, 0x0a, 0x64, 0, 0xff]), "02:00:0a:64:00:ff");
    }

    #[test]
    fn interface_names() {
        for ok in ["hypeman0", "br-lan", "a", "x_1.2", "fifteen-chars-x"] {
            check_ifname(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "sixteen-chars-xx", "a b", "a/b", "..", "eth0\n", "ä"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
