//! Requests that turn their connection into a tunnel: an HTTP/1.1 `Upgrade` (WebSocket, say)
//! and `CONNECT`. Such a request is authorized once, as the request it is; it then goes to the
//! far side (the destination's sidecar, or the application) on an HTTP/1.1 connection of its
//! own, since an upgraded connection is never shared. Only when the far side accepts (`101` for
//! an upgrade, `2xx` for `CONNECT`) do both connections switch, and from then on the bytes flow
//! both ways untouched until either side closes. Any other answer goes back as an ordinary
//! response and nothing is tunnelled: bytes a client sends early are read as HTTP and checked as
//! such, never passed on unchecked.

use std::time::Duration;

use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::framing::FramingGuard;
use crate::metrics::TunnelLabels;
use crate::sniff::Rewind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the far side has to answer a tunnel request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What kind of tunnel a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tunnel {
    /// HTTP/1.1 `Upgrade` to the protocol named (the header's value, sent on as it came).
    Upgrade(HeaderValue),
    /// `CONNECT` (HTTP/1.1, or HTTP/2's `CONNECT` stream).
    Connect,
}

impl Tunnel {
    /// The tunnel `req` asks for, if any. `Upgrade: h2c` is not one: it is a hop's own affair
    /// and is stripped like any hop-by-hop header (Envoy does the same).
    pub fn requested<B>(req: &Request<B>) -> Option<Tunnel> {
        if req.method() == Method::CONNECT {
            return Some(Tunnel::Connect);
        }
        if req.version() != http::Version::HTTP_11 || !has_token(req.headers(), "upgrade") {
            return None;
        }
        let value = req.headers().get(UPGRADE)?;
        let first = value.to_str().ok()?.split(',').next()?.trim();
        if first.is_empty() || first.eq_ignore_ascii_case("h2c") {
            return None;
        }
        Some(Tunnel::Upgrade(value.clone()))
    }

    /// Puts the upgrade headers back after the hop-by-hop strip: they belong to one hop, but a
    /// proxy that forwards an upgrade sends them on (RFC 9110 section 7.8).
    pub fn restore_headers(&self, headers: &mut HeaderMap) {
        if let Tunnel::Upgrade(protocol) = self {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, protocol.clone());
        }
    }

    /// Did the far side accept the tunnel?
    pub fn accepted(&self, status: StatusCode) -> bool {
        match self {
            Tunnel::Upgrade(_) => status == StatusCode::SWITCHING_PROTOCOLS,
            Tunnel::Connect => status.is_success(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Tunnel::Upgrade(_) => "upgrade",
            Tunnel::Connect => "connect",
        }
    }
}

/// Does a `Connection` header list `token`?
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A stream a tunnel copies between.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Turns a downstream connection hyper hands back after the switch into the stream to copy:
/// made per connection type by [`unguard`].
pub type Unwrap = fn(Upgraded) -> Box<dyn Io>;

/// The downstream stream of an HTTP/1.1 connection served over `FramingGuard<S>`, with the
/// framing check taken off (what follows the switch is not HTTP) and the bytes it and hyper
/// had read, in order. Any other connection (an HTTP/2 `CONNECT` stream) is used as it is.
pub fn unguard<S>(upgraded: Upgraded) -> Box<dyn Io>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match upgraded.downcast::<TokioIo<FramingGuard<S>>>() {
        Ok(parts) => {
            let (inner, held) = parts.io.into_inner().into_parts();
            let mut prefix = parts.read_buf.to_vec();
            prefix.extend_from_slice(&held);
            Box::new(Rewind::new(prefix, inner))
        }
        Err(other) => Box::new(TokioIo::new(other)),
    }
}

/// Why a tunnel request got no answer from the far side.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Dial(BoxError),
    #[error("HTTP/1.1 handshake: {0}")]
    Handshake(hyper::Error),
    #[error("sending the request: {0}")]
    Send(hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Sends a tunnel request on a fresh HTTP/1.1 connection `io` and returns the answer. The
/// connection is this request's alone; it ends with the answer, or becomes the tunnel's far end
/// (take it with `hyper::upgrade::on` on the response).
pub async fn send<I, B>(io: I, req: Request<B>) -> Result<Response<Incoming>, TunnelError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await
        .map_err(TunnelError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel request connection ended with an error");
        }
    });
    match tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req)).await {
        Ok(r) => r.map_err(TunnelError::Send),
        Err(_) => Err(TunnelError::Timeout(ANSWER_TIMEOUT)),
    }
}

/// Joins the two sides once both have switched, in a task of its own: the client's connection
/// (`downstream`, unwrapped by `unwrap`) and the far side's (the `OnUpgrade` of its answer).
pub fn splice(
    tunnel: &Tunnel,
    downstream: OnUpgrade,
    unwrap: Unwrap,
    upstream: OnUpgrade,
    opened: Family<TunnelLabels, Counter>,
    recheck: Option<Recheck>,
) {
    let kind = tunnel.kind();
    tokio::spawn(async move {
        let (down, up) = tokio::join!(downstream, upstream);
        let (down, up) = match (down, up) {
            (Ok(d), Ok(u)) => (d, u),
            (d, u) => {
                tracing::info!(
                    kind,
                    downstream = ?d.err(),
                    upstream = ?u.err(),
                    "tunnel not opened: a side did not switch"
                );
                return;
            }
        };
        opened.get_or_create(&TunnelLabels { kind }).inc();
        let mut down = unwrap(down);
        let mut up = TokioIo::new(up);
        let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
        let Some(mut recheck) = recheck else {
            log_end(kind, copy.await);
            return;
        };
        tokio::pin!(copy);
        loop {
            tokio::select! {
                end = &mut copy => return log_end(kind, end),
                changed = recheck.generation.changed() => {
                    if changed.is_err() {
                        // No config will come any more: the tunnel stays as authorized.
                        return log_end(kind, copy.await);
                    }
                    let Some(cfg) = recheck.shared.config.load_full() else { continue };
                    if !(recheck.allowed)(&recheck.shared, &cfg) {
                        recheck.shared.metrics.tcp_closed_by_policy.inc();
                        tracing::info!(
                            target: "palisade::rbac",
                            kind,
                            version = %cfg.version,
                            "open tunnel closed: the new policy denies the request that opened it"
                        );
                        // Dropping both ends closes them.
                        return;
                    }
                }
            }
        }
    });
}

fn log_end(kind: &'static str, end: std::io::Result<(u64, u64)>) {
    match end {
        Ok((sent, received)) => tracing::debug!(kind, sent, received, "tunnel closed"),
        Err(e) => tracing::debug!(kind, error = %e, "tunnel ended with an error"),
    }
}

/// What keeps an open inbound tunnel authorized: on every new config, the request that opened
/// it is decided again (DENY/ALLOW; a CUSTOM provider is not asked again), and a tunnel the new
/// policy denies is closed, as an open TCP connection is.
pub struct Recheck {
    pub shared: std::sync::Arc<crate::Shared>,
    /// Subscribed before the opening request was authorized, so no config is missed.
    pub generation: tokio::sync::watch::Receiver<u64>,
    pub allowed: StillAllowed,
}

/// Decides the opening request again under a config.
pub type StillAllowed = Box<dyn Fn(&crate::Shared, &crate::ProxyConfig) -> bool + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, version: http::Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(if method == "CONNECT" { "svc:443" } else { "/" })
            .version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap_or_default()
    }

    /// Method, version, headers, and the tunnel asked for.
    type Case = (
        &'static str,
        http::Version,
        &'static [(&'static str, &'static str)],
        Option<Tunnel>,
    );

    /// Which requests ask for a tunnel, as Envoy tells them.
    #[test]
    fn tunnel_requests() {
        use http::Version as V;
        let ws = || Some(Tunnel::Upgrade(HeaderValue::from_static("websocket")));
        let cases: [Case; 9] = [
            ("CONNECT", V::HTTP_11, &[], Some(Tunnel::Connect)),
            ("CONNECT", V::HTTP_2, &[], Some(Tunnel::Connect)),
            (
                "GET",
                V::HTTP_11,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                ws(),
            ),
            (
                "GET",
                V::HTTP_11,
                &[
                    ("connection", "keep-alive, upgrade"),
                    ("upgrade", "websocket"),
                ],
                ws(),
            ),
            // `Upgrade` without `Connection: upgrade` asks for nothing (RFC 9110 section 7.8).
            ("GET", V::HTTP_11, &[("upgrade", "websocket")], None),
            ("GET", V::HTTP_11, &[("connection", "upgrade")], None),
            // h2c is the hop's own business.
            (
                "GET",
                V::HTTP_11,
                &[
                    ("connection", "upgrade, http2-settings"),
                    ("upgrade", "h2c"),
                ],
                None,
            ),
            // HTTP/1.0 has no upgrade; HTTP/2 forbids the headers.
            (
                "GET",
                V::HTTP_10,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                None,
            ),
            (
                "GET",
                V::HTTP_2,
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                None,
            ),
        ];
        for (method, version, headers, want) in cases {
            assert_eq!(
                Tunnel::requested(&req(method, version, headers)),
                want,
                "{method} {version:?} {headers:?}"
            );
        }
    }

    #[test]
    fn only_the_switching_answer_opens_the_tunnel() {
        let ws = Tunnel::Upgrade(HeaderValue::from_static("websocket"));
        assert!(ws.accepted(StatusCode::SWITCHING_PROTOCOLS));
        for s in [200, 204, 400, 403, 426, 503] {
            assert!(
                !ws.accepted(StatusCode::from_u16(s).unwrap_or_default()),
                "{s}"
            );
        }
        for s in [200, 204] {
            assert!(Tunnel::Connect.accepted(StatusCode::from_u16(s).unwrap_or_default()));
        }
        for s in [101, 301, 403, 407, 503] {
            assert!(
                !Tunnel::Connect.accepted(StatusCode::from_u16(s).unwrap_or_default()),
                "{s}"
            );
        }
    }

    #[test]
    fn restored_headers_name_the_protocol_only() {
        let ws = Tunnel::Upgrade(HeaderValue::from_static("websocket"));
        let mut h = HeaderMap::new();
        ws.restore_headers(&mut h);
        assert_eq!(
            h.get(CONNECTION).map(HeaderValue::as_bytes),
            Some(&b"upgrade"[..])
        );
        assert_eq!(
            h.get(UPGRADE).map(HeaderValue::as_bytes),
            Some(&b"websocket"[..])
        );
        let mut h = HeaderMap::new();
        Tunnel::Connect.restore_headers(&mut h);
        assert!(h.is_empty());
    }
}
