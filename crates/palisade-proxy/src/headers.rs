//! Headers the proxy owns on the way to the application and back: the hop-by-hop headers that
//! never cross it (RFC 9110 section 7.6.1, as Envoy strips them), the client address it trusts
//! from `X-Forwarded-For`, and the HTTP/1.1 head checks it makes before authorization (Envoy's
//! codec answers these with 400 before any filter runs).

use std::net::IpAddr;

use http::header::{CONNECTION, HOST, HeaderName, HeaderValue, TE};
use http::{HeaderMap, StatusCode};

/// The identity header the proxy sets from the verified peer certificate; a client's own value
/// never reaches the application.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that belong to one hop and are not forwarded (`TE` is handled apart: `trailers`
/// survives, as gRPC needs it).
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TRAILER,
];

/// Headers a `Connection` option may not remove: the message's own framing and target.
const NOT_NOMINATABLE: [HeaderName; 2] = [HOST, http::header::CONTENT_LENGTH];

/// Removes the hop-by-hop headers: the fixed list, every header `Connection` names, and `TE`
/// unless it asks for `trailers` (then exactly `te: trailers` stays).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !NOT_NOMINATABLE.contains(n))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if headers.contains_key(TE) {
        let trailers = headers
            .get_all(TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
            });
        headers.remove(TE);
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// The client address for `remoteIpBlocks` / `remote.ip`: with `trusted_proxies` = N > 0 the
/// Nth `X-Forwarded-For` entry from the right (each trusted proxy appended the address of whoever
/// connected to it); with 0, or when the header has fewer entries or a bad one there, the peer
/// itself. A client can thus never name its own address past the hops the operator trusts.
pub fn remote_ip(headers: &HeaderMap, peer: IpAddr, trusted_proxies: u32) -> IpAddr {
    if trusted_proxies == 0 || !headers.contains_key(XFF) {
        return peer;
    }
    let Some(nth) = usize::try_from(trusted_proxies - 1).ok() else {
        return peer;
    };
    headers
        .get_all(XFF)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .rev()
        .nth(nth)
        .and_then(|e| e.trim().parse::<IpAddr>().ok())
        .unwrap_or(peer)
}

/// An HTTP/1.1 request head the proxy refuses before authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("more than one Host header")]
    RepeatedHost,
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
}

impl HeadError {
    pub fn status(self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// Checks what the HTTP/1.1 parser leaves to its caller (RFC 9112 section 3.2: exactly one
/// `Host`). A repeated `Host` would let a policy decide on one value while the application
/// reads another.
pub fn check_http1_head(version: http::Version, headers: &HeaderMap) -> Result<(), HeadError> {
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(HeadError::RepeatedHost),
        (None, _) if version == http::Version::HTTP_11 => Err(HeadError::MissingHost),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn names(m: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        // (headers in, headers that remain)
        /// Headers in, and the headers that remain.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let table: &[Case] = &[
            (
                &[("connection", "close"), ("keep-alive", "5"), ("x", "1")],
                &["x: 1"],
            ),
            (
                &[
                    ("connection", "x-secret, Foo"),
                    ("x-secret", "a"),
                    ("foo", "b"),
                    ("bar", "c"),
                ],
                &["bar: c"],
            ),
            (
                &[
                    ("connection", "host, content-length"),
                    ("host", "h"),
                    ("content-length", "0"),
                ],
                &["content-length: 0", "host: h"],
            ),
            (&[("te", "trailers")], &["te: trailers"]),
            (&[("te", "gzip, trailers;q=1")], &["te: trailers"]),
            (&[("te", "gzip")], &[]),
            (&[("trailer", "grpc-status"), ("upgrade", "websocket")], &[]),
            (
                &[
                    ("proxy-authorization", "Basic x"),
                    ("proxy-connection", "keep-alive"),
                ],
                &[],
            ),
        ];
        for (input, want) in table {
            let mut m = map(input);
            strip_hop_by_hop(&mut m);
            assert_eq!(names(&m), want.to_vec(), "{input:?}");
        }
    }

    #[test]
    fn remote_ip_trusts_only_configured_hops() {
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        // (XFF values, trusted hops, expected remote ip)
        let table: &[(&[&str], u32, &str)] = &[
            (&[], 0, "10.0.0.9"),
            (&["1.2.3.4"], 0, "10.0.0.9"),
            (&["1.2.3.4"], 1, "1.2.3.4"),
            (&["6.6.6.6, 1.2.3.4"], 1, "1.2.3.4"),
            (&["6.6.6.6", "1.2.3.4"], 1, "1.2.3.4"),
            (&["6.6.6.6, 1.2.3.4, 5.5.5.5"], 2, "1.2.3.4"),
            (&["1.2.3.4"], 2, "10.0.0.9"),
            (&["not-an-ip"], 1, "10.0.0.9"),
            (&["2001:db8::1"], 1, "2001:db8::1"),
        ];
        for (xff, n, want) in table {
            let pairs: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            let got = remote_ip(&map(&pairs), peer, *n);
            assert_eq!(got.to_string(), *want, "{xff:?} with {n} trusted");
        }
    }

    #[test]
    fn http1_heads_need_exactly_one_host() {
        use http::Version;
        assert_eq!(
            check_http1_head(Version::HTTP_11, &map(&[("host", "a")])),
            Ok(())
        );
        assert_eq!(
            check_http1_head(Version::HTTP_11, &map(&[("host", "a"), ("host", "b")])),
            Err(HeadError::RepeatedHost)
        );
        assert_eq!(
            check_http1_head(Version::HTTP_11, &map(&[])),
            Err(HeadError::MissingHost)
        );
        assert_eq!(check_http1_head(Version::HTTP_10, &map(&[])), Ok(()));
    }
}
