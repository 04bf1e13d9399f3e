//! Inbound: the workload's listeners. Transport per the port's mTLS mode, protocol as the port
//! declares it (HTTP parsed as HTTP, TCP never parsed; only undeclared ports are sniffed), then
//! per-request (HTTP) or per-connection (TCP) authorization, then the app. What the application
//! receives is what was authorized: the normalized path, the proxy's own identity header, no
//! hop-by-hop headers.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use palisade_policy::api::MtlsMode;
use palisade_policy::{HeaderLookup, HttpAttributes, PortProtocol, RequestContext};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;
use crate::authz::{Outcome, authorize};
use crate::ext_authz::body::RequestBody;
use crate::framing::FramingGuard;
use crate::headers::{XFCC, check_http1_head};
use crate::limits::{ConnectionCap, Idle};
use crate::sniff::{Hello, Protocol, Rewind, detect, detect_http, read_client_hello};
use crate::upgrade::{Tunnel, TunnelError, Unwrap, unguard};

pub use crate::body::Body;
pub use crate::headers::strip_hop_by_hop;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Facts about one inbound connection, fixed at accept/handshake time.
#[derive(Debug)]
pub struct ConnInfo {
    pub port: u16,
    pub source: SocketAddr,
    pub local_ip: IpAddr,
    /// Verified peer principal `<td>/ns/<ns>/sa/<sa>` (mTLS only).
    pub principal: Option<String>,
    pub sni: Option<String>,
    /// The `x-forwarded-client-cert` value for this peer (mTLS only).
    pub xfcc: Option<HeaderValue>,
    /// Redirected by iptables to the inbound capture port: the application listens on `port`
    /// of `local_ip` itself (see [`app_target`]).
    pub captured: bool,
}

impl ConnInfo {
    /// What the policy engine sees of this connection as opaque TCP.
    pub fn tcp_context(&self) -> RequestContext<'_> {
        RequestContext {
            port: self.port,
            destination_ip: Some(self.local_ip),
            source_ip: Some(self.source.ip()),
            remote_ip: None,
            peer_principal: self.principal.as_deref(),
            sni: self.sni.as_deref(),
            http: None,
            jwt: None,
        }
    }

    /// What the policy engine sees of `req` on this connection (`headers` wraps its headers).
    /// `trusted_proxies`: the mesh's `numTrustedProxies`, for the client address.
    pub fn request_context<'a, B>(
        &'a self,
        req: &'a Request<B>,
        headers: &'a Headers<'a>,
        jwt: Option<&'a serde_json::Value>,
        trusted_proxies: u32,
    ) -> RequestContext<'a> {
        let remote_ip = (trusted_proxies > 0)
            .then(|| crate::headers::remote_ip(req.headers(), self.source.ip(), trusted_proxies));
        RequestContext {
            port: self.port,
            destination_ip: Some(self.local_ip),
            source_ip: Some(self.source.ip()),
            remote_ip,
            peer_principal: self.principal.as_deref(),
            sni: self.sni.as_deref(),
            http: Some(HttpAttributes {
                method: req.method().as_str(),
                path: request_path(req),
                host: host_of(req),
                headers,
            }),
            jwt,
        }
    }
}

/// The request target the policy sees as `:path`: none for `CONNECT` (its target is an
/// authority, and Envoy's `:path` is absent), so that no `paths` rule matches it.
fn request_path<B>(req: &Request<B>) -> &str {
    if req.method() == http::Method::CONNECT {
        return "";
    }
    req.uri().path_and_query().map_or("/", |p| p.as_str())
}

/// Accepts on one inbound listener; `cap` is shared by every worker accepting on it.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, port: u16, cap: ConnectionCap) {
    loop {
        let (tcp, source) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(port, error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            shared.metrics.connection("inbound", "over_limit");
            tracing::warn!(port, %source, "inbound connection refused: the listener is at its connection limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            shared.metrics.active_connections.inc();
            handle(&shared, tcp, source, port).await;
            shared.metrics.active_connections.dec();
            drop(permit);
        });
    }
}

fn mode_name(m: MtlsMode) -> &'static str {
    m.as_str()
}

async fn handle(shared: &Arc<Shared>, tcp: TcpStream, source: SocketAddr, port: u16) {
    handle_conn(shared, tcp, source, port, None).await;
}

/// A connection redirected to the inbound capture port, `dst` its original destination: served
/// as the workload's port `dst.port()` (its mTLS mode, declared protocol and policies; a port
/// the workload does not declare is sniffed, under the workload-wide mode), then to the
/// application at `dst` (see [`app_target`]).
pub(crate) async fn handle_captured(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    source: SocketAddr,
    dst: SocketAddr,
) {
    handle_conn(shared, tcp, source, dst.port(), Some(dst.ip())).await;
}

/// `captured_ip`: the original destination's address, for a captured connection (the socket's
/// own local address is where iptables redirected it).
async fn handle_conn(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    source: SocketAddr,
    port: u16,
    captured_ip: Option<IpAddr>,
) {
    let Some(cfg) = shared.config.load_full() else {
        return;
    };
    let mode = cfg.policy.mtls().for_port(port).mode;
    let declared = cfg
        .inbound_port(port)
        .map_or(PortProtocol::Unknown, |p| p.protocol);
    let local_ip = captured_ip.unwrap_or_else(|| tcp.local_addr().map_or(cfg.address, |a| a.ip()));
    let captured = captured_ip.is_some();
    drop(cfg);
    let limits = shared.options.limits;
    let plain_info = || ConnInfo {
        port,
        source,
        local_ip,
        principal: None,
        sni: None,
        xfcc: None,
        captured,
    };
    let tls = match mode {
        MtlsMode::Disable => false,
        MtlsMode::Strict => {
            // Look at the first byte only to tell a plaintext client from a failed handshake.
            if !looks_like_tls(&tcp).await {
                shared
                    .metrics
                    .handshake(mode_name(mode), "refused_plaintext");
                tracing::info!(port, %source, "STRICT port: plaintext connection refused");
                return;
            }
            true
        }
        MtlsMode::Permissive | MtlsMode::Unset => looks_like_tls(&tcp).await,
    };
    let tcp = Idle::new(tcp, limits.idle_timeout);
    if !tls {
        shared.metrics.handshake(mode_name(mode), "plaintext");
        serve_declared(shared, Arc::new(plain_info()), tcp, declared, None).await;
        return;
    }
    let stream = if mode == MtlsMode::Strict {
        Rewind::new(Vec::new(), tcp)
    } else {
        // PERMISSIVE: mTLS only for clients offering a mesh ALPN (Istio's filter chain match);
        // other TLS is the application's own (HTTPS, a database) and passes through untouched.
        let (hello, stream) = read_client_hello(tcp, TLS_HANDSHAKE_TIMEOUT).await;
        if let Hello::Alpn(offered) = &hello
            && !offered
                .iter()
                .any(|p| crate::certs::MESH_ALPN.contains(&p.as_slice()))
        {
            shared.metrics.handshake(mode_name(mode), "tls_passthrough");
            serve_tcp(shared, Arc::new(plain_info()), stream).await;
            return;
        }
        stream
    };
    let Some(state) = shared.certs.tls() else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&state.server));
    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.metrics.handshake(mode_name(mode), "failed");
            tracing::info!(port, %source, mode = mode_name(mode), error = %e, "inbound TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.handshake(mode_name(mode), "failed");
            return;
        }
    };
    shared.metrics.handshake(mode_name(mode), "mtls");
    let (_, session) = stream.get_ref();
    let peer_certs = session.peer_certificates();
    let peer_id = palisade_identity::peer_spiffe_id(peer_certs);
    let xfcc = match (&peer_id, peer_certs.and_then(|c| c.first())) {
        (Some(id), Some(leaf)) => {
            let v = format!(
                "By={};Hash={};URI={}",
                state.own_id,
                crate::certs::cert_sha256_hex(leaf.as_ref()),
                id
            );
            HeaderValue::from_str(&v).ok()
        }
        _ => None,
    };
    let alpn = match session.alpn_protocol() {
        Some(b"h2" | b"istio-h2") => Some(Protocol::Http2),
        Some(b"http/1.1" | b"istio-http/1.1" | b"istio-http/1.0") => Some(Protocol::Http1),
        _ => None,
    };
    let info = Arc::new(ConnInfo {
        port,
        source,
        local_ip,
        principal: peer_id.as_ref().map(palisade_identity::SpiffeId::principal),
        sni: session.server_name().map(str::to_owned),
        xfcc,
        captured,
    });
    serve_declared(shared, info, stream, declared, alpn).await;
}

/// Serves a (plaintext or decrypted) stream as its port declares: HTTP (HTTP/2 by ALPN or
/// preface, else HTTP/1; never TCP), opaque TCP, or, undeclared, whatever sniffing finds.
async fn serve_declared<S>(
    shared: &Arc<Shared>,
    info: Arc<ConnInfo>,
    stream: S,
    declared: PortProtocol,
    alpn: Option<Protocol>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if declared.is_opaque() {
        return serve_tcp(shared, info, stream).await;
    }
    if declared.is_http() {
        if let Some(p) = alpn {
            return serve_http(shared, info, stream, p).await;
        }
        let timeout = shared.options.limits.header_read_timeout;
        if let Some((p, stream)) = detect_http(stream, timeout).await {
            serve_http(shared, info, stream, p).await;
        }
        return;
    }
    match alpn {
        Some(p) => serve_http(shared, info, stream, p).await,
        None => serve_stream(shared, info, stream).await,
    }
}

/// PERMISSIVE/STRICT: is the first byte a TLS handshake record? A silent client counts as not.
async fn looks_like_tls(tcp: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(crate::sniff::SNIFF_TIMEOUT, tcp.peek(&mut b)).await,
        Ok(Ok(1)) if b[0] == 0x16
    )
}

/// Sniffs HTTP/1, HTTP/2 or TCP on a stream of an undeclared port and serves it.
async fn serve_stream<S>(shared: &Arc<Shared>, info: Arc<ConnInfo>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, stream) = detect(stream).await;
    match protocol {
        Protocol::Tcp => serve_tcp(shared, info, stream).await,
        p => serve_http(shared, info, stream, p).await,
    }
}

async fn serve_http<S>(shared: &Arc<Shared>, info: Arc<ConnInfo>, stream: S, protocol: Protocol)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared.metrics.connection("inbound", protocol.as_str());
    let io = TokioIo::new(stream);
    let svc_shared = Arc::clone(shared);
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(request(&shared, &info, req, unguard::<S>).await) }
    });
    let limits = &shared.options.limits;
    let result = if protocol == Protocol::Http2 {
        limits.http2_server().serve_connection(io, service).await
    } else {
        let io = TokioIo::new(FramingGuard::new(
            io.into_inner(),
            limits.h1_max_header_size(),
        ));
        limits
            .http1_server()
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
    }
}

/// `http::HeaderMap` as the policy engine's header source.
pub struct Headers<'a>(pub &'a http::HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        for v in self.0.get_all(name) {
            if let Ok(s) = v.to_str() {
                out(s);
            }
        }
    }
}

/// `Host` (HTTP/1) or `:authority` (HTTP/2).
pub fn host_of<B>(req: &Request<B>) -> &str {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
        .unwrap_or("")
}

pub fn text_response(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::local(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp
}

/// The request target the application receives: the path exactly as authorization normalized
/// it, with the query as sent (after the JWT step took its token out of it). `None` when the
/// path does not normalize (authorization refused it already).
fn forwarded_target(uri: &Uri, mode: palisade_policy::PathNormalization) -> Option<Uri> {
    let path = palisade_policy::normalize_path(uri.path(), mode).ok()?;
    if let std::borrow::Cow::Borrowed(_) = path {
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        return Some(Uri::from(pq));
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    Uri::try_from(target).ok()
}

async fn request(
    shared: &Arc<Shared>,
    info: &Arc<ConnInfo>,
    req: Request<Incoming>,
    unwrap: Unwrap,
) -> Response<Body> {
    let grpc = crate::grpc::is_grpc(req.headers());
    let resp = authorize_and_forward(shared, info, req, unwrap).await;
    // The proxy's own refusals reach a gRPC client as gRPC statuses, as Envoy sends them.
    if grpc && resp.status() != StatusCode::OK && matches!(resp.body(), Body::Local(_)) {
        return crate::grpc::local_reply(resp);
    }
    resp
}

async fn authorize_and_forward(
    shared: &Arc<Shared>,
    info: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    unwrap: Unwrap,
) -> Response<Body> {
    // Taken before anything else looks at the request: the client's side of a tunnel, should
    // the application accept it.
    let tunnel = Tunnel::requested(&req).map(|t| (t, hyper::upgrade::on(&mut req)));
    // A tunnel outlives its request: it is decided again on every config from this one on.
    let generation = tunnel.is_some().then(|| {
        let mut g = shared.config_gen.subscribe();
        g.borrow_and_update();
        g
    });
    let Some(cfg) = shared.config.load_full() else {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "no config\n");
    };
    let Some((app, protocol)) = app_target(&cfg, info) else {
        return text_response(StatusCode::NOT_FOUND, "no such port\n");
    };
    if req.version() <= http::Version::HTTP_11
        && let Err(e) = check_http1_head(req.version(), req.headers())
    {
        tracing::info!(target: "palisade::rbac", port = info.port, source = %info.source, error = %e, "request rejected before authorization");
        return text_response(e.status(), "Bad Request");
    }
    let mut req = req.map(RequestBody::Streaming);
    // CUSTOM (ext_authz) then JWT authentication; see `ext_authz::gate`.
    let gate = match crate::ext_authz::gate::check(shared, &cfg, info, &mut req).await {
        Ok(g) => g,
        Err(refused) => return refused,
    };
    let trusted_proxies = cfg.wire.mesh.num_trusted_proxies();
    let outcome = {
        let headers = Headers(req.headers());
        let ctx = info.request_context(&req, &headers, gate.claims(), trusted_proxies);
        authorize(&cfg, &ctx, true, &shared.rbac_log)
    };
    match outcome {
        Outcome::Allow => {}
        Outcome::Deny => return text_response(StatusCode::FORBIDDEN, "RBAC: access denied"),
        Outcome::BadRequest => return text_response(StatusCode::BAD_REQUEST, "Bad Request"),
    }
    let recheck =
        generation.map(|generation| tunnel_recheck(shared, info, &req, &gate, generation));
    // HTTP/2 requests carry the authority in the URI: keep it as Host for the HTTP/1.1 app.
    if !req.headers().contains_key(HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(HOST, v);
    }
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    if let Some((t, _)) = &tunnel {
        t.restore_headers(headers);
    }
    headers.remove(&XFCC);
    if let Some(x) = &info.xfcc {
        headers.insert(XFCC, x.clone());
    }
    gate.apply_upstream(&cfg, &mut req);
    // Origin form for the app (`GET /path HTTP/1.1`), with the path that was authorized; the
    // Host header names the service. (`CONNECT` keeps its authority.)
    if req.method() != http::Method::CONNECT {
        let Some(target) = forwarded_target(req.uri(), cfg.policy.normalization()) else {
            return text_response(StatusCode::BAD_REQUEST, "Bad Request");
        };
        *req.uri_mut() = target;
    }
    if let Some((tunnel, downstream)) = tunnel {
        drop(cfg);
        let side = Downstream {
            tunnel,
            on_upgrade: downstream,
            unwrap,
        };
        return Box::pin(tunnel_to_app(
            shared, info.port, &gate, side, app, req, recheck,
        ))
        .await;
    }
    if matches!(protocol, PortProtocol::Grpc | PortProtocol::Http2) {
        drop(cfg);
        let answer = Box::pin(shared.app_h2_pool().send(app, req)).await;
        return from_app(&gate, info.port, answer, Body::Upstream);
    }
    *req.version_mut() = http::Version::HTTP_11;
    drop(cfg);
    // Boxed (as hyper-util's client boxes its response future): the exchange holds the request
    // while it is handed over, and inlined it would double this future's size.
    let answer = Box::pin(shared.app_pool().send(app, req)).await;
    from_app(&gate, info.port, answer, Body::App)
}

/// The client's side of a tunnel request.
struct Downstream {
    tunnel: Tunnel,
    on_upgrade: OnUpgrade,
    unwrap: Unwrap,
}

/// How an open tunnel is decided again: the opening request as it was authorized (method,
/// target, headers, JWT claims) and the connection's facts, under each new config.
fn tunnel_recheck(
    shared: &Arc<Shared>,
    info: &Arc<ConnInfo>,
    req: &Request<RequestBody>,
    gate: &crate::ext_authz::gate::Gate,
    generation: tokio::sync::watch::Receiver<u64>,
) -> crate::upgrade::Recheck {
    let mut opening = Request::new(());
    *opening.method_mut() = req.method().clone();
    *opening.uri_mut() = req.uri().clone();
    *opening.version_mut() = req.version();
    *opening.headers_mut() = req.headers().clone();
    let claims = gate.claims().cloned();
    let info = Arc::clone(info);
    crate::upgrade::Recheck {
        shared: Arc::clone(shared),
        generation,
        allowed: Box::new(move |shared, cfg| {
            let headers = Headers(opening.headers());
            let ctx = info.request_context(
                &opening,
                &headers,
                claims.as_ref(),
                cfg.wire.mesh.num_trusted_proxies(),
            );
            authorize(cfg, &ctx, true, &shared.rbac_log) == Outcome::Allow
        }),
    }
}

/// An authorized tunnel request (`Upgrade`, `CONNECT`) to the application, on a connection of
/// its own; the tunnel opens when the application accepts it.
async fn tunnel_to_app(
    shared: &Shared,
    port: u16,
    gate: &crate::ext_authz::gate::Gate,
    side: Downstream,
    app: SocketAddr,
    mut req: Request<RequestBody>,
    recheck: Option<crate::upgrade::Recheck>,
) -> Response<Body> {
    *req.version_mut() = http::Version::HTTP_11;
    let answer = match crate::app::connect(app, shared.app_source()).await {
        Ok(tcp) => crate::upgrade::send(TokioIo::new(tcp), req).await,
        Err(e) => Err(TunnelError::Dial(e.into())),
    };
    let mut resp = from_app(gate, port, answer, Body::Upstream);
    if side.tunnel.accepted(resp.status()) && !matches!(resp.body(), Body::Local(_)) {
        let upstream = hyper::upgrade::on(&mut resp);
        crate::upgrade::splice(
            &side.tunnel,
            side.on_upgrade,
            side.unwrap,
            upstream,
            shared.metrics.tunnels.clone(),
            recheck,
        );
        side.tunnel.restore_headers(resp.headers_mut());
    }
    resp
}

/// The application's answer as the client gets it, or Envoy's 503 when there is none.
fn from_app<B, E: std::fmt::Display>(
    gate: &crate::ext_authz::gate::Gate,
    port: u16,
    answer: Result<Response<B>, E>,
    body: impl FnOnce(B) -> Body,
) -> Response<Body> {
    match answer {
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            gate.apply_downstream(resp.headers_mut());
            resp.map(body)
        }
        Err(e) => {
            tracing::info!(port, error = %e, "no response from the application");
            text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers",
            )
        }
    }
}

/// Opaque TCP: authorize once (CUSTOM, then DENY/ALLOW), then splice to the app; re-checked on
/// every new config.
async fn serve_tcp<S>(shared: &Arc<Shared>, info: Arc<ConnInfo>, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared.metrics.connection("inbound", "tcp");
    let mut generation = shared.config_gen.subscribe();
    generation.borrow_and_update();
    let Some(cfg) = shared.config.load_full() else {
        return;
    };
    let mut custom = crate::ext_authz::network::ConnectionGate::default();
    if tcp_decision(shared, &cfg, &info, &mut custom).await != Outcome::Allow {
        return;
    }
    let Some((app, _)) = app_target(&cfg, &info) else {
        return;
    };
    drop(cfg);
    let mut upstream = match crate::app::dial(app, shared.app_source()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(port = info.port, %app, error = %e, "application unreachable");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let copy = tokio::io::copy_bidirectional(&mut stream, &mut upstream);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            changed = generation.changed() => {
                if changed.is_err() { return; }
                let Some(cfg) = shared.config.load_full() else { continue };
                if tcp_decision(shared, &cfg, &info, &mut custom).await != Outcome::Allow {
                    shared.metrics.tcp_closed_by_policy.inc();
                    tracing::info!(
                        target: "palisade::rbac",
                        port = info.port,
                        source = %info.source,
                        version = %cfg.version,
                        "open TCP connection closed: the new policy denies it"
                    );
                    return;
                }
            }
        }
    }
}

/// The application's address for a connection, and what its port declares. Explicit listeners:
/// the port's configured application port on 127.0.0.1. Captured connections: the original
/// destination itself (the workload's address, the port the client dialed), declared or not.
/// That is Istio's behaviour since 1.10: dialed from 127.0.0.6 it travels over `lo` and reaches
/// an application bound to the workload's address or to every address, never one bound to
/// 127.0.0.1 only (a local admin port, the sidecar's own), which other workloads must not reach.
pub fn app_target(cfg: &crate::ProxyConfig, info: &ConnInfo) -> Option<(SocketAddr, PortProtocol)> {
    let declared = cfg.inbound_port(info.port);
    if info.captured {
        let app = SocketAddr::new(info.local_ip, info.port);
        return Some((app, declared.map_or(PortProtocol::Unknown, |p| p.protocol)));
    }
    declared.map(|p| (p.app, p.protocol))
}

/// CUSTOM first (Envoy's network ext_authz, see `ext_authz::network`), then DENY/ALLOW.
async fn tcp_decision(
    shared: &Shared,
    cfg: &crate::ProxyConfig,
    info: &ConnInfo,
    custom: &mut crate::ext_authz::network::ConnectionGate,
) -> Outcome {
    if !custom.check(shared, cfg, info).await {
        return Outcome::Deny;
    }
    let ctx = info.tcp_context();
    authorize(cfg, &ctx, false, &shared.rbac_log)
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns (here: an `async fn`'s future), without calling it.
    fn future_size<A, B, C, D, R>(_f: impl Fn(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// The HTTP/2 server moves every request's future into a task of its own; a large one (the
    /// ext_authz call inlined, ~10 KiB) made those copies the proxy's main cost.
    #[test]
    fn request_future_stays_small() {
        let size = future_size::<
            &std::sync::Arc<super::Shared>,
            &std::sync::Arc<super::ConnInfo>,
            super::Request<super::Incoming>,
            super::Unwrap,
            _,
        >(super::request);
        let inner = future_size::<
            &std::sync::Arc<super::Shared>,
            &std::sync::Arc<super::ConnInfo>,
            super::Request<super::Incoming>,
            super::Unwrap,
            _,
        >(super::authorize_and_forward);
        let size = size.max(inner);
        assert!(size <= 2048, "inbound request future is {size} bytes");
    }
}
