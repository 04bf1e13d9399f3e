//! Outbound: the application's HTTP proxy listener and its declared TCP upstreams. The
//! destination is a ServiceEntry host or a workload address; auto mTLS decides the transport.
//! HTTP goes through one pooling client: connections are reused, and HTTP/2 (negotiated by
//! ALPN with a Palisade server sidecar) carries many requests on one connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::certs::Carries;
use crate::config::Upstream;
use crate::inbound::{Body, strip_hop_by_hop, text_response};
use crate::io::MeshConn;
use crate::limits::{ConnectionCap, Idle};
use crate::upgrade::{Tunnel, TunnelError, Unwrap, unguard};
use crate::{Shared, TcpUpstream};

/// A pooling client to other workloads.
pub type MeshClient = Client<MeshConnector, Incoming>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One worker's pools to other workloads.
///
/// Two clients because the pool can only share a connection attempt between concurrent
/// requests when it knows beforehand that the connection will be HTTP/2. With ALPN deciding,
/// a burst of first requests to a sidecar would open one mTLS connection each, to end up with
/// as many HTTP/2 connections. So the first connection to an authority goes through `auto`,
/// which learns from ALPN whether the authority speaks HTTP/2 ([`MeshPools::speaks_h2`]); from
/// then on `h2` carries its requests, one connection per authority, multiplexed.
pub struct MeshPools {
    auto: MeshClient,
    h2: MeshClient,
}

impl MeshPools {
    pub fn new(shared: Weak<Shared>) -> Self {
        let build = |h2_only: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                // HTTP/1.1 upstreams: hyper-util's pool may dial more connections than requests
                // in flight (see `app`); idle ones are capped.
                .pool_max_idle_per_host(crate::app::MAX_CONNECTIONS)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2_only)
                .build(MeshConnector {
                    shared: shared.clone(),
                    h2_only,
                })
        };
        Self {
            auto: build(false),
            h2: build(true),
        }
    }

    /// The client for `authority`: `h2` once a connection to it negotiated HTTP/2.
    pub fn client(&self, shared: &Shared, authority: &str) -> &MeshClient {
        if shared.speaks_h2(authority) {
            &self.h2
        } else {
            &self.auto
        }
    }
}

/// Splits `host[:port]` (IPv6 in brackets); port defaults to `default_port`.
pub fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, p.parse().ok()?)),
        None => Some((authority, default_port)),
    }
}

/// Connects to an upstream: plaintext, or mutual TLS checking the destination's SPIFFE ID.
pub async fn connect(
    shared: &Shared,
    up: &Upstream,
    carries: Carries,
) -> std::io::Result<MeshConn> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(up.addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {} timed out", up.addr),
            )
        })??;
    let _ = tcp.set_nodelay(true);
    let Some(id) = &up.mtls else {
        shared.metrics.connection("outbound", "plaintext");
        return Ok(MeshConn::Plain(TokioIo::new(tcp)));
    };
    let state = shared
        .certs
        .tls()
        .ok_or_else(|| std::io::Error::other("no workload certificate yet"))?;
    let cfg = state
        .client_for(id, carries)
        .map_err(std::io::Error::other)?;
    let name = ServerName::IpAddress(up.addr.ip().into());
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
        .inspect_err(|e| tracing::info!(upstream = %up.addr, expected = %id, error = %e, "outbound mTLS handshake failed"))?;
    let h2 = matches!(tls.get_ref().1.alpn_protocol(), Some(b"h2" | b"istio-h2"));
    shared
        .metrics
        .connection("outbound", if h2 { "mtls_h2" } else { "mtls" });
    Ok(MeshConn::Tls {
        io: TokioIo::new(tls),
        h2,
    })
}

/// hyper-util connector: resolves the request authority with the current config.
#[derive(Clone)]
pub struct MeshConnector {
    shared: Weak<Shared>,
    /// For the HTTP/2-only pool: a connection that did not negotiate HTTP/2 is refused.
    h2_only: bool,
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshConn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<MeshConn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let shared = self.shared.clone();
        let h2_only = self.h2_only;
        Box::pin(async move {
            let shared = shared
                .upgrade()
                .ok_or_else(|| std::io::Error::other("proxy stopped"))?;
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
            let (host, port) = split_host_port(authority, 80).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("bad authority {authority:?}"),
                )
            })?;
            let cfg = shared
                .config
                .load_full()
                .ok_or_else(|| std::io::Error::other("no config yet"))?;
            let up = mesh_target(&cfg, host, port).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no route to {authority}"),
                )
            })?;
            drop(cfg);
            let conn = connect(&shared, &up, Carries::Http).await?;
            let h2 = matches!(conn, MeshConn::Tls { h2: true, .. });
            shared.learn_h2(authority, h2);
            if h2_only && !h2 {
                // The authority's endpoints changed protocol; the next request goes through the
                // ALPN-deciding pool again.
                return Err(std::io::Error::other(format!(
                    "{authority} no longer negotiates HTTP/2"
                )));
            }
            Ok(conn)
        })
    }
}

/// The application-facing HTTP proxy listener (HTTP/1.1 and HTTP/2 prior knowledge).
pub async fn serve_http(shared: Arc<Shared>, listener: TcpListener, cap: ConnectionCap) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            shared.metrics.connection("outbound", "over_limit");
            tracing::warn!("outbound connection refused: the listener is at its connection limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let limits = shared.options.limits;
            // HTTP/2 with prior knowledge or HTTP/1.1, as the application speaks.
            let tcp = Idle::new(tcp, limits.idle_timeout);
            if let Some((protocol, stream)) =
                crate::sniff::detect_http(tcp, limits.header_read_timeout).await
            {
                serve_app_http(shared, stream, protocol, Target::Proxy).await;
            }
            drop(permit);
        });
    }
}

/// Where the application's requests on one connection go.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// The outbound proxy listener: each request names its destination (absolute URI or Host).
    Proxy,
    /// A captured connection to a mesh destination: every request goes to its original
    /// destination (as an authority, made once per connection), whatever its Host says (the
    /// destination's sidecar authorizes that Host).
    Captured(http::uri::Authority),
    /// A captured connection nothing may receive (`REGISTRY_ONLY`): 502, as Envoy's
    /// `BlackHoleCluster` answers.
    BlackHole,
}

/// Serves the application's HTTP (HTTP/1.1 framed as strictly as the mesh's, or HTTP/2) on one
/// connection, sending its requests to `target`.
pub(crate) async fn serve_app_http(
    shared: Arc<Shared>,
    stream: AppConn,
    protocol: crate::sniff::Protocol,
    target: Target,
) {
    let svc_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        let target = target.clone();
        async move {
            let resp = match target {
                Target::Proxy => request(&shared, req, unguard::<AppConn>).await,
                Target::Captured(authority) => {
                    captured_request(&shared, req, unguard::<AppConn>, authority).await
                }
                Target::BlackHole => {
                    text_response(StatusCode::BAD_GATEWAY, "no route to the destination\n")
                }
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let limits = shared.options.limits;
    let io = TokioIo::new(stream);
    let result = if protocol == crate::sniff::Protocol::Http2 {
        limits.http2_server().serve_connection(io, service).await
    } else {
        // Requests from the application are framed as strictly as the mesh's.
        let guarded =
            crate::framing::FramingGuard::new(io.into_inner(), limits.h1_max_header_size());
        limits
            .http1_server()
            .serve_connection(TokioIo::new(guarded), service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "outbound HTTP connection ended with an error");
    }
}

/// The application's connection to the outbound listener, as its HTTP server reads it.
pub(crate) type AppConn = crate::sniff::Rewind<Idle<TcpStream>>;

async fn request(shared: &Shared, mut req: Request<Incoming>, unwrap: Unwrap) -> Response<Body> {
    // Taken first: the application's side of a tunnel, should the destination accept it.
    let tunnel = Tunnel::requested(&req).map(|t| (t, hyper::upgrade::on(&mut req)));
    // The destination: the absolute URI's authority (proxy form), else Host.
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => match req
            .headers()
            .get(HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        {
            Some(a) => a,
            None => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "no destination: use an absolute URI or a Host header\n",
                );
            }
        },
    };
    let routed = {
        let Some(cfg) = shared.config.load_full() else {
            return text_response(StatusCode::SERVICE_UNAVAILABLE, "no config\n");
        };
        split_host_port(authority.as_str(), 80)
            .is_some_and(|(h, p)| cfg.route(h, p).is_some_and(|r| !r.endpoints.is_empty()))
    };
    if !routed {
        tracing::info!(destination = %authority, "outbound: no route");
        return text_response(StatusCode::BAD_GATEWAY, "no route to the destination\n");
    }
    // In proxy form the URI's authority wins over any Host header (RFC 9112 section 3.2.2).
    if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(HOST, v);
    }
    forward(shared, req, tunnel, unwrap, authority).await
}

/// A request of a captured connection to a mesh destination: to `dst`, its original
/// destination. The Host header stays as the application wrote it (a name the destination's
/// policy may match on); only a request without one (nor an `:authority`) gets the address.
async fn captured_request(
    shared: &Shared,
    mut req: Request<Incoming>,
    unwrap: Unwrap,
    authority: http::uri::Authority,
) -> Response<Body> {
    let tunnel = Tunnel::requested(&req).map(|t| (t, hyper::upgrade::on(&mut req)));
    // HTTP/2 carries the name in `:authority`.
    let host = req
        .uri()
        .authority()
        .map_or(authority.as_str(), |a| a.as_str());
    if !req.headers().contains_key(HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        req.headers_mut().insert(HOST, v);
    }
    forward(shared, req, tunnel, unwrap, authority).await
}

/// Sends a routed request to `authority` through the pools (or, a tunnel, on a connection of
/// its own).
async fn forward(
    shared: &Shared,
    mut req: Request<Incoming>,
    tunnel: Option<(Tunnel, OnUpgrade)>,
    unwrap: Unwrap,
    authority: http::uri::Authority,
) -> Response<Body> {
    strip_hop_by_hop(req.headers_mut());
    if let Some((tunnel, on_upgrade)) = tunnel {
        tunnel.restore_headers(req.headers_mut());
        return Box::pin(tunnel_to_mesh(
            shared, tunnel, on_upgrade, unwrap, authority, req,
        ))
        .await;
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(detach_from_read_buffer(&mut req));
    match Uri::from_parts(parts) {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => return text_response(StatusCode::BAD_REQUEST, "Bad Request\n"),
    }
    // The pooling client picks HTTP/2 when the upstream negotiated it.
    *req.version_mut() = http::Version::HTTP_11;
    let client = shared
        .mesh_pools()
        .client(shared, req.uri().authority().map_or("", |a| a.as_str()));
    match client.request(req).await {
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            resp.map(Body::Upstream)
        }
        Err(e) => {
            tracing::info!(error = %e, source = ?std::error::Error::source(&e), "outbound request failed");
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers\n",
            )
        }
    }
}

/// A tunnel request (`Upgrade`, `CONNECT`) to its destination, on an HTTP/1.1 connection of its
/// own (mTLS offering HTTP/1.1 only); the destination's sidecar authorizes it. The tunnel opens
/// when the destination accepts.
async fn tunnel_to_mesh(
    shared: &Shared,
    tunnel: Tunnel,
    on_upgrade: OnUpgrade,
    unwrap: Unwrap,
    authority: http::uri::Authority,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let target = split_host_port(authority.as_str(), 80).and_then(|(host, port)| {
        let cfg = shared.config.load_full()?;
        mesh_target(&cfg, host, port)
    });
    let Some(up) = target else {
        return text_response(StatusCode::BAD_GATEWAY, "no route to the destination\n");
    };
    // Origin form for an upgrade (`GET /chat HTTP/1.1`); `CONNECT` keeps its authority.
    if tunnel != Tunnel::Connect {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
    *req.version_mut() = http::Version::HTTP_11;
    let answer = match connect(shared, &up, Carries::Http1).await {
        Ok(conn) => crate::upgrade::send(conn, req).await,
        Err(e) => Err(TunnelError::Dial(e.into())),
    };
    match answer {
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            if tunnel.accepted(resp.status()) {
                let upstream = hyper::upgrade::on(&mut resp);
                crate::upgrade::splice(
                    &tunnel,
                    on_upgrade,
                    unwrap,
                    upstream,
                    shared.metrics.tunnels.clone(),
                    // The server's sidecar decides whether the tunnel may stay open.
                    None,
                );
                tunnel.restore_headers(resp.headers_mut());
            }
            resp.map(Body::Upstream)
        }
        Err(e) => {
            tracing::info!(upstream = %up.addr, error = %e, "outbound tunnel request failed");
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers\n",
            )
        }
    }
}

/// The endpoint for `host:port`: its route, else (an IP address) the mesh workload that has it
/// (what a captured connection's destination may be, see
/// [`crate::config::ProxyConfig::captured_outbound`]).
fn mesh_target(cfg: &crate::ProxyConfig, host: &str, port: u16) -> Option<Upstream> {
    if let Some(up) = cfg.route(host, port).and_then(|r| r.pick()) {
        return Some(up.clone());
    }
    let ip: std::net::IpAddr = host.parse().ok()?;
    match cfg.captured_outbound(SocketAddr::new(ip, port)) {
        crate::config::CapturedOutbound::Mesh { up, .. } => Some(up),
        _ => None,
    }
}

/// Moves the request's header values and path out of the connection's read buffer into one
/// allocation of their own, and returns the path.
///
/// hyper parses an HTTP/1.1 head in place: the values and the URI it hands over point into the
/// connection's read buffer. While the request is in flight hyper keeps reading that connection
/// (to notice a client that goes away), finds its buffer shared, and allocates a second one,
/// 8 KiB or more, for every connection (a heap profile at 64 connections: ~13 KiB each). One
/// copy of the few hundred bytes of a head leaves the buffer to hyper alone.
fn detach_from_read_buffer<B>(req: &mut Request<B>) -> http::uri::PathAndQuery {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let path_len = path.len();
    let total = path_len + req.headers().values().map(HeaderValue::len).sum::<usize>();
    let mut copy = bytes::BytesMut::with_capacity(total);
    copy.extend_from_slice(path.as_bytes());
    for v in req.headers().values() {
        copy.extend_from_slice(v.as_bytes());
    }
    let copy = copy.freeze();
    let mut at = path_len;
    for v in req.headers_mut().values_mut() {
        let n = v.len();
        // Valid already (they were header values); on the impossible failure the value stays.
        if let Ok(mut fresh) = HeaderValue::from_maybe_shared(copy.slice(at..at + n)) {
            fresh.set_sensitive(v.is_sensitive());
            *v = fresh;
        }
        at += n;
    }
    http::uri::PathAndQuery::from_maybe_shared(copy.slice(..path_len))
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
}

/// A declared TCP upstream: every accepted connection is spliced to the destination.
pub async fn serve_tcp(
    shared: Arc<Shared>,
    listener: TcpListener,
    up: TcpUpstream,
    cap: ConnectionCap,
) {
    loop {
        let (app, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "outbound TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            shared.metrics.connection("outbound", "over_limit");
            tracing::warn!(listen = %up.listen, "outbound TCP connection refused: the listener is at its connection limit");
            continue;
        };
        let _ = app.set_nodelay(true);
        let mut app = Idle::new(app, shared.options.limits.idle_timeout);
        let shared = Arc::clone(&shared);
        let up = up.clone();
        tokio::spawn(async move {
            let target = shared
                .config
                .load_full()
                .and_then(|cfg| cfg.route(&up.host, up.port).and_then(|r| r.pick()).cloned());
            let Some(target) = target else {
                tracing::info!(host = %up.host, port = up.port, "outbound TCP: no route");
                return;
            };
            splice_to(&shared, &mut app, &target).await;
            drop(permit);
        });
    }
}

/// Opaque TCP from the application to a mesh upstream (auto mTLS), until either side ends.
pub(crate) async fn splice_to<S>(shared: &Shared, app: &mut S, target: &Upstream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let conn = match connect(shared, target, Carries::Tcp).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(upstream = %target.addr, error = %e, "outbound TCP connect failed");
            return;
        }
    };
    let result = match conn {
        MeshConn::Plain(io) => tokio::io::copy_bidirectional(app, &mut io.into_inner()).await,
        MeshConn::Tls { io, .. } => tokio::io::copy_bidirectional(app, &mut io.into_inner()).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "outbound TCP connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy changes where the bytes live, nothing else: every value (repeated names,
    /// sensitivity, non-ASCII bytes) and the path are as they were.
    #[test]
    fn detaching_keeps_the_head_as_it_was() {
        type Fields = &'static [(&'static str, &'static [u8])];
        let cases: [(&str, Fields); 4] = [
            (
                "/api/x?q=1&r=%20",
                &[("host", b"svc:80"), ("x-a", b"1"), ("x-a", b"2")],
            ),
            (
                "http://svc/",
                &[("authorization", b"Bearer t"), ("x-latin", b"caf\xe9")],
            ),
            ("http://svc", &[]),
            ("*", &[("x-empty", b"")]),
        ];
        for (uri, headers) in cases {
            let mut req = Request::builder().uri(uri);
            for (k, v) in headers {
                let mut v = HeaderValue::from_bytes(v).unwrap();
                v.set_sensitive(*k == "authorization");
                req = req.header(*k, v);
            }
            let mut req = req.body(()).unwrap();
            let before = req.headers().clone();
            let want_path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let path = detach_from_read_buffer(&mut req);
            assert_eq!(path.as_str(), want_path, "{uri}");
            assert_eq!(req.headers(), &before, "{uri}");
            for (a, b) in req.headers().values().zip(before.values()) {
                assert_eq!(a.is_sensitive(), b.is_sensitive(), "{uri}");
            }
        }
    }
}
