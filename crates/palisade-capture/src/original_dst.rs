//! The sidecar's side of capture: where a redirected connection was going before iptables
//! `REDIRECT` rewrote it to the capture port (`SO_ORIGINAL_DST`, read from conntrack through
//! socket2's safe wrapper), and the address the sidecar dials its application from.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;

use socket2::SockRef;

/// The source address of the sidecar's connections to its own application (Istio's
/// `InboundPassthroughBindIpv4`): the OUTPUT chain lets it through over `lo` uncaptured, and the
/// application sees a loopback peer. 127.0.0.0/8 is all loopback on Linux, so binding it needs
/// no setup.
pub const INBOUND_PASSTHROUGH_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// The destination `stream` had before the nat table redirected it, as conntrack remembers it.
/// For a connection that was not redirected conntrack reports the destination it really has,
/// the listener itself (see [`redirected_destination`]); without a conntrack entry, an error.
pub fn original_dst<S: AsFd>(stream: &S) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    original.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST returned a non-IP address",
        )
    })
}

/// The destination a captured connection is to be sent to, or `None` when there is none to
/// honour: the original destination is the capture listener itself (someone connected to the
/// capture port directly, or the connection was never redirected), which forwarding would turn
/// into a loop. IPv4-mapped IPv6 addresses compare as IPv4.
pub fn redirected_destination(original: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
    let canonical = |a: SocketAddr| SocketAddr::new(canonical_ip(a.ip()), a.port());
    let original = canonical(original);
    (original != canonical(local)).then_some(original)
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address as it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_other_than_the_listener_is_honoured() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        #[rustfmt::skip]
        let cases: [(&str, &str, Option<&str>); 6] = [
            ("10.0.0.2:8080", "10.0.0.1:15001", Some("10.0.0.2:8080")),
            // Redirected to the capture port from the workload's own address: a different port.
            ("10.0.0.1:8080", "10.0.0.1:15001", Some("10.0.0.1:8080")),
            // Not redirected: conntrack reports the listener itself.
            ("10.0.0.1:15001", "10.0.0.1:15001", None),
            ("[::ffff:10.0.0.1]:15001", "10.0.0.1:15001", None),
            ("10.0.0.1:15001", "[::ffff:10.0.0.1]:15001", None),
            ("[2001:db8::2]:80", "[2001:db8::1]:15001", Some("[2001:db8::2]:80")),
        ];
        for (original, local, want) in cases {
            assert_eq!(
                redirected_destination(a(original), a(local)),
                want.map(a),
                "{original} on {local}"
            );
        }
    }

    /// A connection that iptables did not touch has no NAT'd original destination: the call
    /// fails (no conntrack entry) or reports the listener, never something else.
    #[test]
    fn an_unredirected_connection_reports_no_other_destination() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        match original_dst(&accepted) {
            Ok(original) => assert_eq!(redirected_destination(original, local), None),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}
