//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each service gets a lookup table of
//! `KEEL_MAGLEV_M` (prime) entries naming backends; the tc program indexes it with a flow hash.
//! When one backend of N goes, only about 1/N of the entries change owner, so external flows
//! without a conntrack entry (another node, after a restart) mostly keep their backend.
//!
//! Written by hand: the table is 30 lines and no maintained crate builds Maglev tables.

use keel_ebpf::L4Addr;

/// FNV-1a 64 over the backend's address and port, with a seed: stable across runs and hosts.
fn hash(be: &L4Addr, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in be
        .addr
        .iter()
        .chain(&be.port.to_ne_bytes())
        .chain(&[be.family])
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The lookup table: `m` entries, each an index into `backends`. `m` must be prime and larger
/// than the number of backends; an empty `backends` gives an empty table.
pub fn table(backends: &[L4Addr], m: usize) -> Vec<usize> {
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    // Order by address so the table does not depend on the order endpoints were listed in.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let perm: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| {
            let offset = (hash(&backends[i], 0x5bd1_e995) % m as u64) as usize;
            let skip = (hash(&backends[i], 0x27d4_eb2f) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; order.len()];
    let mut entry = vec![usize::MAX; m];
    let mut filled = 0;
    'outer: loop {
        for (slot, &(offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[slot] * skip) % m;
            while entry[c] != usize::MAX {
                next[slot] += 1;
                c = (offset + next[slot] * skip) % m;
            }
            entry[c] = order[slot];
            next[slot] += 1;
            filled += 1;
            if filled == m {
                break 'outer;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u8) -> Vec<L4Addr> {
        (1..=n)
            .map(|i| L4Addr::new(format!("10.1.0.{i}").parse().unwrap(), 8080, 0))
            .collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let bs = backends(10);
        let t = table(&bs, 1021);
        for i in 0..bs.len() {
            let n = t.iter().filter(|&&e| e == i).count();
            assert!((90..=115).contains(&n), "backend {i} owns {n} of 1021");
        }
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let bs = backends(10);
        let before: Vec<L4Addr> = table(&bs, 1021).into_iter().map(|i| bs[i]).collect();
        let fewer: Vec<L4Addr> = bs.iter().copied().filter(|b| *b != bs[3]).collect();
        let after: Vec<L4Addr> = table(&fewer, 1021).into_iter().map(|i| fewer[i]).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let forced = before.iter().filter(|b| **b == bs[3]).count();
        assert!(moved >= forced);
        assert!(
            moved as f64 / 1021.0 <= 0.15,
            "{moved} of 1021 entries moved ({forced} had to)"
        );
    }

    #[test]
    fn order_of_endpoints_does_not_matter() {
        let bs = backends(5);
        let mut rev = bs.clone();
        rev.reverse();
        let a: Vec<L4Addr> = table(&bs, 251).into_iter().map(|i| bs[i]).collect();
        let b: Vec<L4Addr> = table(&rev, 251).into_iter().map(|i| rev[i]).collect();
        assert_eq!(a, b);
    }
}
