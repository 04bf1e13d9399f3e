//! Rule indexes: each compiled rule is filed under a value the request must carry for the rule to
//! match (an exact peer principal or namespace, an exact path or path prefix, a source CIDR, a
//! destination port), or on the short "always check" list. A decision looks up the request's values
//! and evaluates only the candidates, so its cost does not grow with the number of policies.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use crate::matcher::PeerIdentity;

/// A small, fast, non-cryptographic hasher (FxHash). Keys come from configuration, so adversarial
/// collisions are not a concern; lookups with request data only probe.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The value a rule is filed under.
#[derive(Debug, Clone)]
pub(crate) enum IndexKeys {
    Principals(Vec<Box<str>>),
    Namespaces(Vec<Box<str>>),
    Paths {
        exact: Vec<Box<str>>,
        prefixes: Vec<Box<str>>,
    },
    SourceNets(Vec<ipnet::IpNet>),
    Ports(Vec<u16>),
    /// Checked on every request.
    Always,
    /// Can never match (a policy without rules): not filed anywhere.
    Never,
}

/// A byte trie of path prefixes.
#[derive(Debug, Default, Clone)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default, Clone)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    rules: Vec<u32>,
}

impl PrefixTrie {
    fn insert(&mut self, prefix: &str, rule: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut node = 0usize;
        for &b in prefix.as_bytes() {
            let next = match self.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[node].children[i].1 as usize,
                Err(i) => {
                    let id = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.insert(i, (b, id as u32));
                    id
                }
            };
            node = next;
        }
        self.nodes[node].rules.push(rule);
    }

    #[inline]
    fn collect(&self, path: &str, out: &mut Candidates) {
        let Some(mut node) = self.nodes.first() else {
            return;
        };
        out.extend(&node.rules);
        for &b in path.as_bytes() {
            match node.children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => {
                    node = &self.nodes[node.children[i].1 as usize];
                    out.extend(&node.rules);
                }
                Err(_) => return,
            }
        }
    }
}

/// CIDRs grouped by prefix length: a lookup masks the address once per distinct length.
#[derive(Debug, Default, Clone)]
struct NetIndex {
    v4: Vec<(u8, FxMap<u32, Vec<u32>>)>,
    v6: Vec<(u8, FxMap<u128, Vec<u32>>)>,
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}
fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

impl NetIndex {
    fn insert(&mut self, net: ipnet::IpNet, rule: u32) {
        match net {
            ipnet::IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = mask4(u32::from(n.network()), len);
                let pos = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(p) => p,
                    None => {
                        self.v4.push((len, FxMap::default()));
                        self.v4.len() - 1
                    }
                };
                self.v4[pos].1.entry(key).or_default().push(rule);
            }
            ipnet::IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = mask6(u128::from(n.network()), len);
                let pos = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(p) => p,
                    None => {
                        self.v6.push((len, FxMap::default()));
                        self.v6.len() - 1
                    }
                };
                self.v6[pos].1.entry(key).or_default().push(rule);
            }
        }
    }

    #[inline]
    fn collect(&self, ip: IpAddr, out: &mut Candidates) {
        match crate::matcher::canonical_ip(ip) {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for (len, map) in &self.v4 {
                    if let Some(r) = map.get(&mask4(a, *len)) {
                        out.extend(r);
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for (len, map) in &self.v6 {
                    if let Some(r) = map.get(&mask6(a, *len)) {
                        out.extend(r);
                    }
                }
            }
        }
    }
}

/// The index of one rule set. Rule numbers are positions in the set, which is sorted by policy id,
/// so the smallest candidate that matches is the one Envoy would report.
#[derive(Debug, Default, Clone)]
pub(crate) struct RuleIndex {
    principals: FxMap<Box<str>, Vec<u32>>,
    namespaces: FxMap<Box<str>, Vec<u32>>,
    paths: FxMap<Box<str>, Vec<u32>>,
    prefixes: PrefixTrie,
    nets: NetIndex,
    ports: FxMap<u16, Vec<u32>>,
    always: Vec<u32>,
}

/// What the index needs from a request.
pub(crate) struct IndexQuery<'a> {
    /// The peer: its principal, and the namespace keys that principal yields (several when
    /// `/ns/` repeats).
    pub peer: Option<PeerIdentity<'a>>,
    pub path: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    pub port: u16,
}

impl RuleIndex {
    pub fn insert(&mut self, rule: u32, keys: &IndexKeys) {
        match keys {
            IndexKeys::Principals(v) => {
                for k in v {
                    push_unique(self.principals.entry(k.clone()).or_default(), rule);
                }
            }
            IndexKeys::Namespaces(v) => {
                for k in v {
                    push_unique(self.namespaces.entry(k.clone()).or_default(), rule);
                }
            }
            IndexKeys::Paths { exact, prefixes } => {
                for k in exact {
                    push_unique(self.paths.entry(k.clone()).or_default(), rule);
                }
                for p in prefixes {
                    self.prefixes.insert(p, rule);
                }
            }
            IndexKeys::SourceNets(v) => {
                for n in v {
                    self.nets.insert(*n, rule);
                }
            }
            IndexKeys::Ports(v) => {
                for p in v {
                    push_unique(self.ports.entry(*p).or_default(), rule);
                }
            }
            IndexKeys::Always => self.always.push(rule),
            IndexKeys::Never => {}
        }
    }

    /// Candidate rules for a request, sorted and deduplicated.
    #[inline]
    pub fn candidates(&self, q: &IndexQuery<'_>, out: &mut Candidates) {
        out.extend(&self.always);
        if let Some(peer) = q.peer {
            if let Some(r) = self.principals.get(peer.principal) {
                out.extend(r);
            }
            for ns in peer.namespace_keys() {
                if let Some(r) = self.namespaces.get(ns) {
                    out.extend(r);
                }
            }
        }
        if let Some(path) = q.path {
            if let Some(r) = self.paths.get(path) {
                out.extend(r);
            }
            self.prefixes.collect(path, out);
        }
        if let Some(ip) = q.source_ip {
            self.nets.collect(ip, out);
        }
        if let Some(r) = self.ports.get(&q.port) {
            out.extend(r);
        }
        out.sort_dedup();
    }
}

fn push_unique(v: &mut Vec<u32>, rule: u32) {
    if v.last() != Some(&rule) {
        v.push(rule);
    }
}

/// A candidate list that lives on the stack for the common case.
pub(crate) struct Candidates {
    inline: [u32; 32],
    len: usize,
    spill: Vec<u32>,
}

impl Candidates {
    pub fn new() -> Self {
        Candidates {
            inline: [0; 32],
            len: 0,
            spill: Vec::new(),
        }
    }

    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }

    #[inline]
    fn extend(&mut self, rules: &[u32]) {
        if self.spill.is_empty() && self.len + rules.len() <= self.inline.len() {
            self.inline[self.len..self.len + rules.len()].copy_from_slice(rules);
            self.len += rules.len();
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline[..self.len]);
            }
            self.spill.extend_from_slice(rules);
        }
    }

    #[inline]
    fn sort_dedup(&mut self) {
        if self.spill.is_empty() {
            let s = &mut self.inline[..self.len];
            s.sort_unstable();
            let mut w = 0;
            for r in 0..s.len() {
                if w == 0 || s[w - 1] != s[r] {
                    s[w] = s[r];
                    w += 1;
                }
            }
            self.len = w;
        } else {
            self.spill.sort_unstable();
            self.spill.dedup();
        }
    }

    #[inline]
    pub fn as_slice(&self) -> &[u32] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }
}
