//! The address allocator: given a range set, what is blocked and where the last allocation
//! ended, pick the next address (host-local's round-robin), or check a requested one.
//!
//! Pure: the on-disk allocations live in `ipam_store`, which feeds this module plain sets.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Range;

/// Allocation failures.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every address of the set is taken, reserved or a gateway.
    #[error("no free address in range set {0}")]
    Exhausted(String),
    /// The requested address cannot be given out.
    #[error("requested address {ip} is not available: {reason}")]
    Unavailable {
        /// The address.
        ip: IpAddr,
        /// Why.
        reason: &'static str,
    },
}

impl IpamError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::Exhausted(_) => crate::protocol::code::RANGE_EXHAUSTED,
            Self::Unavailable { .. } => crate::protocol::code::ADDRESS_UNAVAILABLE,
        }
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        // Callers only pass values derived from IPv4 addresses within a subnet, so the
        // truncation cannot drop set bits.
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// `ip + delta`, wrapping within the address family.
pub fn offset(ip: IpAddr, delta: i64) -> IpAddr {
    let v = to_u128(ip);
    let n = if delta >= 0 {
        v.wrapping_add(delta as u128)
    } else {
        v.wrapping_sub(delta.unsigned_abs() as u128)
    };
    let n = if ip.is_ipv4() { n & 0xffff_ffff } else { n };
    from_u128(n, ip.is_ipv4())
}

fn describe(set: &[Range]) -> String {
    set.iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `ip` may be handed out from `range` at all (ignoring what is taken).
fn allocatable(range: &Range, ip: IpAddr) -> bool {
    let in_range = ip >= range.start && ip <= range.end && range.subnet.contains(&ip);
    let v4_bcast = range.subnet.addr().is_ipv4() && ip == range.subnet.broadcast();
    in_range && ip != range.subnet.network() && !v4_bcast && ip != range.gateway
}

/// Checks a requested address against the set. Returns the index of the range holding it.
pub fn check_requested(
    set: &[Range],
    reserved: &HashSet<IpAddr>,
    taken: &HashSet<IpAddr>,
    ip: IpAddr,
) -> Result<usize, IpamError> {
    let idx = set
        .iter()
        .position(|r| ip >= r.start && ip <= r.end)
        .ok_or(IpamError::Unavailable {
            ip,
            reason: "outside the range set",
        })?;
    if set.iter().any(|r| r.gateway == ip) {
        return Err(IpamError::Unavailable {
            ip,
            reason: "it is the gateway",
        });
    }
    if !allocatable(&set[idx], ip) {
        return Err(IpamError::Unavailable {
            ip,
            reason: "network or broadcast address",
        });
    }
    if reserved.contains(&ip) {
        return Err(IpamError::Unavailable {
            ip,
            reason: "reserved",
        });
    }
    if taken.contains(&ip) {
        return Err(IpamError::Unavailable {
            ip,
            reason: "already allocated",
        });
    }
    Ok(idx)
}

/// Picks the first free address after `last` (wrapping over the set's ranges in order).
pub fn pick(
    set: &[Range],
    reserved: &HashSet<IpAddr>,
    taken: &HashSet<IpAddr>,
    last: Option<IpAddr>,
) -> Result<IpAddr, IpamError> {
    if set.is_empty() {
        return Err(IpamError::Exhausted(String::new()));
    }
    // Start after `last` when it lies in the set, else at the first range's start.
    let (mut ri, mut cur) = match last.and_then(|l| {
        set.iter()
            .position(|r| l >= r.start && l <= r.end)
            .map(|i| (i, l))
    }) {
        Some((i, l)) if l < set[i].end => (i, to_u128(l) + 1),
        Some((i, _)) => ((i + 1) % set.len(), to_u128(set[(i + 1) % set.len()].start)),
        None => (0, to_u128(set[0].start)),
    };
    let total: u128 = set
        .iter()
        .map(|r| to_u128(r.end) - to_u128(r.start) + 1)
        .fold(0u128, u128::saturating_add);
    // Among blocked+1 distinct addresses at least one is free, so the walk is bounded by the
    // number of blocked addresses, not the (possibly 2^64) size of the range.
    let blocked = (reserved.len() + taken.len() + 3 * set.len()) as u128;
    let steps = total.min(blocked + 1);
    let mut step = 0u128;
    while step < steps {
        let range = &set[ri];
        let ip = from_u128(cur, range.start.is_ipv4());
        if allocatable(range, ip) && !reserved.contains(&ip) && !taken.contains(&ip) {
            return Ok(ip);
        }
        step += 1;
        if cur >= to_u128(range.end) {
            ri = (ri + 1) % set.len();
            cur = to_u128(set[ri].start);
        } else {
            cur += 1;
        }
    }
    Err(IpamError::Exhausted(describe(set)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn range(subnet: &str, start: &str, end: &str) -> Range {
        let subnet: IpNet = subnet.parse().unwrap();
        Range {
            subnet,
            start: start.parse().unwrap(),
            end: end.parse().unwrap(),
            gateway: offset(subnet.network(), 1),
        }
    }

    fn ips(list: &[&str]) -> HashSet<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn offsets() {
        assert_eq!(
            offset("10.0.0.255".parse().unwrap(), 1).to_string(),
            "10.0.1.0"
        );
        assert_eq!(
            offset("10.0.0.0".parse().unwrap(), -1).to_string(),
            "9.255.255.255"
        );
        assert_eq!(
            offset("fd00::ffff".parse().unwrap(), 1).to_string(),
            "fd00::1:0"
        );
    }

    #[test]
    fn first_pick_skips_gateway() {
        let set = [range("10.0.0.0/24", "10.0.0.1", "10.0.0.254")];
        let ip = pick(&set, &HashSet::new(), &HashSet::new(), None).unwrap();
        assert_eq!(ip.to_string(), "10.0.0.2");
    }

    #[test]
    fn round_robin_after_last_and_wraps() {
        let set = [range("10.0.0.0/24", "10.0.0.2", "10.0.0.5")];
        let last = Some("10.0.0.3".parse().unwrap());
        assert_eq!(
            pick(&set, &HashSet::new(), &HashSet::new(), last)
                .unwrap()
                .to_string(),
            "10.0.0.4"
        );
        let last = Some("10.0.0.5".parse().unwrap());
        assert_eq!(
            pick(&set, &HashSet::new(), &HashSet::new(), last)
                .unwrap()
                .to_string(),
            "10.0.0.2"
        );
        let taken = ips(&["10.0.0.2", "10.0.0.3"]);
        assert_eq!(
            pick(&set, &ips(&["10.0.0.4"]), &taken, last)
                .unwrap()
                .to_string(),
            "10.0.0.5"
        );
    }

    #[test]
    fn multiple_ranges_in_a_set() {
        let set = [
            range("10.0.0.0/24", "10.0.0.2", "10.0.0.3"),
            range("10.0.1.0/24", "10.0.1.2", "10.0.1.3"),
        ];
        let taken = ips(&["10.0.0.2", "10.0.0.3"]);
        assert_eq!(
            pick(&set, &HashSet::new(), &taken, None)
                .unwrap()
                .to_string(),
            "10.0.1.2"
        );
    }

    #[test]
    fn exhaustion() {
        let set = [range("10.0.0.0/29", "10.0.0.1", "10.0.0.6")];
        let taken = ips(&["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        let ip = pick(&set, &HashSet::new(), &taken, None).unwrap();
        assert_eq!(ip.to_string(), "10.0.0.6");
        let taken = ips(&["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        let e = pick(&set, &HashSet::new(), &taken, None).unwrap_err();
        assert_eq!(e.code(), 100);
    }

    #[test]
    fn huge_v6_range_is_bounded() {
        let set = [range("fd00::/64", "fd00::1", "fd00::ffff:ffff:ffff:ffff")];
        let taken = ips(&["fd00::2", "fd00::3"]);
        assert_eq!(
            pick(&set, &HashSet::new(), &taken, None)
                .unwrap()
                .to_string(),
            "fd00::4"
        );
    }

    #[test]
    fn requested() {
        let set = [range("10.0.0.0/24", "10.0.0.1", "10.0.0.254")];
        let none = HashSet::new();
        assert_eq!(
            check_requested(&set, &none, &none, "10.0.0.9".parse().unwrap()).unwrap(),
            0
        );
        for (ip, taken, reserved) in [
            ("10.0.0.1", none.clone(), none.clone()),
            ("10.0.1.9", none.clone(), none.clone()),
            ("10.0.0.9", ips(&["10.0.0.9"]), none.clone()),
            ("10.0.0.9", none.clone(), ips(&["10.0.0.9"])),
        ] {
            let e = check_requested(&set, &reserved, &taken, ip.parse().unwrap()).unwrap_err();
            assert_eq!(e.code(), 101);
        }
    }
}
