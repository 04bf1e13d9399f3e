//! The upstream resolvers: the `nameserver` lines of `resolv.conf`, read once when the sidecar
//! starts (before its own DNS is redirected to itself, which `palisade iptables install` never
//! does for the sidecar's uid anyway).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::DnsError;

/// The system's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The nameservers of a `resolv.conf` text, port 53, in order; lines that are not a
/// `nameserver` with an IP address (comments, `search`, `options`, a scoped IPv6 address) are
/// skipped.
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        let addr = SocketAddr::new(ip, 53);
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The nameservers of the `resolv.conf` at `path`.
pub fn read(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    std::fs::read_to_string(path)
        .map(|text| nameservers(&text))
        .map_err(|cause| DnsError::ResolvConf {
            path: path.to_owned(),
            cause,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameserver_lines_only() {
        let text = "# generated\nsearch backend.svc svc\nnameserver 10.0.0.10\n\
                    nameserver  ::1 # local\noptions ndots:5\nnameserver fe80::1%eth0\n\
                    nameserver bogus\n; comment\nnameserver 10.0.0.10\n";
        let got: Vec<String> = nameservers(text).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.0.10:53", "[::1]:53"]);
        assert!(nameservers("").is_empty());
    }
}
