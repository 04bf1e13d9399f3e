//! Virtual IPs for ServiceEntries that declare no `addresses` (Istio's DNS auto-allocation),
//! from [`VIP_NET`], 240.240.0.0/16 (in 240.0.0.0/4, reserved: never a real host's address).
//!
//! The control plane allocates them, so that every sidecar answers a name with the same address
//! and routes that address to the same service; they travel in the workload config. The scheme
//! keeps an address stable across unrelated edits:
//!
//! - each host starts at a slot derived from a hash of its (lowercase) name, FNV-1a, which does
//!   not depend on the Rust version or the process;
//! - hosts are placed in sorted order, a taken slot probed forward (wrapping), so the result is
//!   a function of the set of hosts, not of file or resource order;
//! - what was handed out before (`previous`) is kept first: adding a host never moves another,
//!   even when their hashes collide (from scratch, a collision is settled by sorted order);
//! - addresses the mesh declares (`reserved`: ServiceEntry `addresses`, workload addresses) are
//!   never handed out, and a previous VIP that a new declaration covers is allocated again.
//!
//! The first and last addresses of the range (`.0.0`, `.255.255`) are not used.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

/// The range virtual IPs come from.
pub const VIP_NET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(240, 240, 0, 0), 16);

/// Allocates a VIP in [`VIP_NET`] to each of `hosts` (lowercased, deduplicated), keeping the
/// VIPs of `previous` that are still free, never one inside `reserved`. Hosts beyond the range's
/// capacity (65,534) get none.
pub fn allocate<'a>(
    hosts: impl IntoIterator<Item = &'a str>,
    reserved: &[IpNet],
    previous: &BTreeMap<String, Ipv4Addr>,
) -> BTreeMap<String, Ipv4Addr> {
    Range::FULL.allocate(hosts, reserved, previous)
}

/// Slots `first..first + size` of the /16, offsets from 240.240.0.0.
#[derive(Debug, Clone, Copy)]
struct Range {
    first: u32,
    size: u32,
}

impl Range {
    const FULL: Range = Range {
        first: 1,
        size: (1 << 16) - 2,
    };

    fn addr(self, slot: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(VIP_NET.network()) + self.first + slot)
    }

    fn slot(self, addr: Ipv4Addr) -> Option<u32> {
        let offset = u32::from(addr).checked_sub(u32::from(VIP_NET.network()))?;
        let slot = offset.checked_sub(self.first)?;
        (slot < self.size).then_some(slot)
    }

    fn allocate<'a>(
        self,
        hosts: impl IntoIterator<Item = &'a str>,
        reserved: &[IpNet],
        previous: &BTreeMap<String, Ipv4Addr>,
    ) -> BTreeMap<String, Ipv4Addr> {
        let hosts: BTreeSet<String> = hosts.into_iter().map(str::to_ascii_lowercase).collect();
        let is_reserved = |a: Ipv4Addr| reserved.iter().any(|n| n.contains(&IpAddr::V4(a)));
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        let mut out = BTreeMap::new();
        // What was handed out before stays, unless it is no longer free.
        for host in &hosts {
            let Some(&addr) = previous.get(host) else {
                continue;
            };
            if let Some(slot) = self.slot(addr)
                && !is_reserved(addr)
                && taken.insert(slot)
            {
                out.insert(host.clone(), addr);
            }
        }
        for host in &hosts {
            if out.contains_key(host) {
                continue;
            }
            let start = u32::try_from(fnv1a(host.as_bytes()) % u64::from(self.size)).unwrap_or(0);
            let free = (0..self.size)
                .map(|i| (start + i) % self.size)
                .find(|&slot| !taken.contains(&slot) && !is_reserved(self.addr(slot)));
            match free {
                Some(slot) => {
                    taken.insert(slot);
                    out.insert(host.clone(), self.addr(slot));
                }
                None => {
                    tracing::warn!(%host, "no virtual IP left in {VIP_NET}: the host gets none");
                }
            }
        }
        out
    }
}

/// 64-bit FNV-1a: stable across processes, platforms and compiler versions.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn none() -> BTreeMap<String, Ipv4Addr> {
        BTreeMap::new()
    }

    #[test]
    fn same_hosts_same_addresses_whatever_the_order_or_case() {
        let a = allocate(["reviews.backend.svc", "api.example.com"], &[], &none());
        let b = allocate(["API.example.com", "reviews.backend.svc"], &[], &none());
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        // Pinned: the hash is part of the contract (sidecars and control planes of different
        // builds must agree).
        let h = fnv1a(b"reviews.backend.svc") % u64::from(Range::FULL.size);
        assert_eq!(
            a["reviews.backend.svc"],
            Range::FULL.addr(u32::try_from(h).unwrap())
        );
    }

    #[test]
    fn collisions_are_probed_in_sorted_order_and_previous_wins() {
        // Two slots: every pair of hosts collides or not; both always get one.
        let tiny = Range { first: 1, size: 2 };
        let got = tiny.allocate(["b", "a"], &[], &none());
        assert_ne!(got["a"], got["b"]);
        // "c" joins a full range: nothing left for it, the others keep theirs.
        let more = tiny.allocate(["a", "b", "c"], &[], &got);
        assert_eq!((more["a"], more["b"]), (got["a"], got["b"]));
        assert!(!more.contains_key("c"));
        // A previous address is kept even where the hash would place another host first.
        let only_b = tiny.allocate(["b"], &[], &none());
        let both = tiny.allocate(["a", "b"], &[], &only_b);
        assert_eq!(both["b"], only_b["b"]);
    }

    #[test]
    fn declared_addresses_are_never_handed_out() {
        let tiny = Range { first: 1, size: 3 };
        let free = tiny.allocate(["x"], &[], &none());
        // Declare x's address: x moves, and never onto a reserved address.
        let reserved = [IpNet::from(IpAddr::V4(free["x"]))];
        let moved = tiny.allocate(["x"], &reserved, &free);
        assert_ne!(moved["x"], free["x"]);
        // A declared CIDR covering the whole range leaves nothing.
        let all = ["240.240.0.0/16".parse::<IpNet>().unwrap()];
        assert!(allocate(["x"], &all, &none()).is_empty());
        // A previous VIP outside the range is not kept.
        let stale = BTreeMap::from([("x".to_owned(), Ipv4Addr::new(10, 0, 0, 1))]);
        assert!(VIP_NET.contains(&allocate(["x"], &[], &stale)["x"]));
    }

    fn host() -> impl Strategy<Value = String> {
        "[a-z]{1,6}(\\.[a-z]{1,4}){0,2}"
    }

    proptest! {
        /// Adding hosts never changes the VIPs of the hosts there before; no two hosts share a
        /// VIP; every VIP is in 240.240.0.0/16, not its first or last address, and not
        /// declared.
        #[test]
        fn adding_hosts_never_moves_existing_ones(
            before in proptest::collection::btree_set(host(), 0..40),
            added in proptest::collection::btree_set(host(), 0..20),
            declared in proptest::collection::vec(1u32..65535, 0..20),
            tiny in any::<bool>(),
        ) {
            // A tiny range makes collisions certain; the full one is what runs.
            let range = if tiny { Range { first: 1, size: 80 } } else { Range::FULL };
            let reserved: Vec<IpNet> = declared
                .iter()
                .map(|&o| IpNet::from(IpAddr::V4(Ipv4Addr::from(u32::from(VIP_NET.network()) + o))))
                .collect();
            let first = range.allocate(before.iter().map(String::as_str), &reserved, &none());
            let all = before.iter().chain(&added).map(String::as_str);
            let second = range.allocate(all, &reserved, &first);
            for (h, a) in &first {
                prop_assert_eq!(second.get(h), Some(a), "{} moved", h);
            }
            for map in [&first, &second] {
                let distinct: BTreeSet<_> = map.values().collect();
                prop_assert_eq!(distinct.len(), map.len());
                for a in map.values() {
                    prop_assert!(VIP_NET.contains(a));
                    prop_assert!(*a != VIP_NET.network() && *a != VIP_NET.broadcast());
                    prop_assert!(!reserved.iter().any(|n| n.contains(&IpAddr::V4(*a))));
                }
            }
            // With room to spare every host gets one, and from scratch the order does not matter.
            if !tiny {
                prop_assert_eq!(second.len(), before.union(&added).count());
                let reversed: Vec<&str> = before.iter().rev().map(String::as_str).collect();
                prop_assert_eq!(range.allocate(reversed, &reserved, &none()), first);
            }
        }
    }
}
