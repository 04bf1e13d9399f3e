//! The names one workload's sidecar answers, built from its mesh config. Pure.
//!
//! What a workload gets:
//!
//! - every host of every ServiceEntry (wildcard hosts excepted: a wildcard names no address),
//!   answered with the ServiceEntry's single-address `addresses` (IPv4 as A, IPv6 as AAAA;
//!   a CIDR wider than one address is a range, not an answer), or, when it declares none, with
//!   the VIP the control plane allocated to the host;
//! - for a host of the form `NAME.NAMESPACE.svc` or `NAME.NAMESPACE.svc.DOMAIN` (the Kubernetes
//!   service names the mesh uses, e.g. `reviews.backend.svc`), the short forms a Kubernetes
//!   search path would let an application type: `NAME.NAMESPACE` and `NAME.NAMESPACE.svc`
//!   everywhere, and `NAME` alone in a workload of `NAMESPACE`. A declared host always wins over
//!   a short form of another host. The resolver then needs no search domains (the names are
//!   answered as typed), and with search domains, the expanded names the stub resolver tries
//!   first are forwarded and fail upstream, as on a host without a mesh.
//!
//! A workload has no name of its own, as in Istio: it is reached through a ServiceEntry that
//! selects it (or by its address).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses of one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl Addresses {
    fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) if !self.v4.contains(&a) => self.v4.push(a),
            IpAddr::V6(a) if !self.v6.contains(&a) => self.v6.push(a),
            _ => {}
        }
    }
}

/// Lowercase names without the trailing dot to their addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    names: HashMap<String, Addresses>,
}

impl NameTable {
    /// A table for a workload in `namespace`.
    pub fn builder(namespace: &str) -> TableBuilder {
        TableBuilder {
            namespace: namespace.to_ascii_lowercase(),
            hosts: HashMap::new(),
            short: HashMap::new(),
        }
    }

    /// The addresses of `name` (any case, with or without the trailing dot), if it is a mesh
    /// name.
    pub fn lookup(&self, name: &str) -> Option<&Addresses> {
        let name = name.strip_suffix('.').unwrap_or(name);
        match self.names.get(name) {
            Some(a) => Some(a),
            None if name.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.names.get(&name.to_ascii_lowercase())
            }
            None => None,
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Every name with its addresses, sorted by name (for the admin dump).
    pub fn entries(&self) -> Vec<(&str, &Addresses)> {
        let mut entries: Vec<(&str, &Addresses)> =
            self.names.iter().map(|(n, a)| (n.as_str(), a)).collect();
        entries.sort_unstable_by_key(|(n, _)| *n);
        entries
    }
}

/// Collects hosts, then builds a [`NameTable`].
#[derive(Debug, Clone)]
pub struct TableBuilder {
    namespace: String,
    hosts: HashMap<String, Addresses>,
    short: HashMap<String, Addresses>,
}

impl TableBuilder {
    /// `host` answers `addresses` (merged with any other declaration of the same host). A
    /// wildcard host, an IP address or an empty name is ignored; so is a host without
    /// addresses.
    pub fn host(&mut self, host: &str, addresses: impl IntoIterator<Item = IpAddr>) -> &mut Self {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if host.is_empty() || host.contains('*') || host.parse::<IpAddr>().is_ok() {
            return self;
        }
        let mut found = Addresses::default();
        for ip in addresses {
            found.add(ip);
        }
        if found.v4.is_empty() && found.v6.is_empty() {
            return self;
        }
        for short in short_forms(&host, &self.namespace) {
            let entry = self.short.entry(short).or_default();
            for &a in &found.v4 {
                entry.add(IpAddr::V4(a));
            }
            for &a in &found.v6 {
                entry.add(IpAddr::V6(a));
            }
        }
        let entry = self.hosts.entry(host).or_default();
        for a in found.v4 {
            entry.add(IpAddr::V4(a));
        }
        for a in found.v6 {
            entry.add(IpAddr::V6(a));
        }
        self
    }

    pub fn build(self) -> NameTable {
        let mut names = self.short;
        // Declared hosts win over short forms.
        names.extend(self.hosts);
        NameTable { names }
    }
}

/// The short forms of a `NAME.NAMESPACE.svc[.DOMAIN]` host for a client in `namespace`.
fn short_forms(host: &str, namespace: &str) -> Vec<String> {
    let labels: Vec<&str> = host.split('.').collect();
    let [name, ns, "svc", rest @ ..] = labels.as_slice() else {
        return Vec::new();
    };
    let mut out = vec![format!("{name}.{ns}")];
    if !rest.is_empty() {
        out.push(format!("{name}.{ns}.svc"));
    }
    if *ns == namespace {
        out.push((*name).to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// IPv4 and IPv6 addresses of an answer.
    type Answer = (&'static [&'static str], &'static [&'static str]);

    fn table(namespace: &str) -> NameTable {
        let mut b = NameTable::builder(namespace);
        b.host("reviews.backend.svc", [ip("240.240.1.1")])
            .host("ratings.backend.svc.cluster.local", [ip("240.240.1.2")])
            .host("productpage.frontend.svc", [ip("240.240.1.3")])
            .host("api.example.com", [ip("192.0.2.10"), ip("2001:db8::10")])
            .host("v6only.example.com", [ip("2001:db8::11")])
            .host("*.wild.example.com", [ip("192.0.2.99")])
            .host("noaddress.example.com", [])
            // A declared host that is also another host's short form wins.
            .host("reviews.backend", [ip("192.0.2.20")])
            // The same host in two ServiceEntries: both addresses.
            .host("Shared.example.com.", [ip("192.0.2.30")])
            .host("shared.example.com", [ip("192.0.2.31"), ip("192.0.2.30")]);
        b.build()
    }

    #[test]
    fn lookups() {
        // (client namespace, query, IPv4 answer, IPv6 answer); None: not a mesh name.
        #[rustfmt::skip]
        let cases: &[(&str, &str, Option<Answer>)] = &[
            ("frontend", "reviews.backend.svc", Some((&["240.240.1.1"], &[]))),
            ("frontend", "REVIEWS.Backend.SVC.", Some((&["240.240.1.1"], &[]))),
            ("frontend", "reviews.backend", Some((&["192.0.2.20"], &[]))),
            ("frontend", "reviews", None),
            ("backend", "reviews", Some((&["240.240.1.1"], &[]))),
            ("backend", "ratings", Some((&["240.240.1.2"], &[]))),
            ("frontend", "ratings.backend", Some((&["240.240.1.2"], &[]))),
            ("frontend", "ratings.backend.svc", Some((&["240.240.1.2"], &[]))),
            ("frontend", "ratings.backend.svc.cluster.local", Some((&["240.240.1.2"], &[]))),
            ("frontend", "productpage", Some((&["240.240.1.3"], &[]))),
            ("frontend", "api.example.com", Some((&["192.0.2.10"], &["2001:db8::10"]))),
            ("frontend", "v6only.example.com", Some((&[], &["2001:db8::11"]))),
            ("frontend", "shared.example.com", Some((&["192.0.2.30", "192.0.2.31"], &[]))),
            ("frontend", "x.wild.example.com", None),
            ("frontend", "*.wild.example.com", None),
            ("frontend", "noaddress.example.com", None),
            ("frontend", "example.com", None),
            ("frontend", "svc", None),
            ("frontend", "", None),
        ];
        for (ns, name, want) in cases {
            let t = table(ns);
            let got = t.lookup(name).map(|a| {
                (
                    a.v4.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    a.v6.iter().map(ToString::to_string).collect::<Vec<_>>(),
                )
            });
            let want = want.map(|(v4, v6)| {
                (
                    v4.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    v6.iter().map(ToString::to_string).collect::<Vec<_>>(),
                )
            });
            assert_eq!(got, want, "{name} from {ns}");
        }
        let backend = table("backend");
        let names: Vec<&str> = backend.entries().iter().map(|(n, _)| *n).collect();
        assert_eq!(names.first(), Some(&"api.example.com"));
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        assert!(
            names.contains(&"reviews")
                && !table("frontend")
                    .entries()
                    .iter()
                    .any(|(n, _)| *n == "reviews")
        );
    }
}
