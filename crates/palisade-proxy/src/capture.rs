//! Capture mode (`--capture`): the two listeners iptables redirects a workload's TCP to
//! (`palisade iptables install`), and what happens to each connection, by its original
//! destination (`SO_ORIGINAL_DST`):
//!
//! - Inbound (port 15006): served as the workload's port `dst.port()` by [`crate::inbound`]
//!   (its mTLS mode, declared protocol, policies; an undeclared port is sniffed under the
//!   workload-wide mode, as Istio's inbound passthrough chains do), then to the application at
//!   the original destination, dialed from 127.0.0.6 over `lo` (Istio since 1.10: an
//!   application bound to 127.0.0.1 only is not exposed to other workloads).
//! - Outbound (port 15001): [`crate::ProxyConfig::captured_outbound`] decides. A mesh
//!   destination gets what the explicit outbound path gives it (auto mTLS with its SPIFFE ID
//!   checked; HTTP detected and sent through the pools, authorized by the destination's
//!   sidecar; other TCP spliced). Anything else passes through as plain TCP (`ALLOW_ANY`) or is
//!   refused (`REGISTRY_ONLY`: closed, or 502 for HTTP).
//!
//! The sidecar's own connections (to the application, to peers, to the control plane) are not
//! captured again because iptables exempts the sidecar's uid/gid and the 127.0.0.6 source; a
//! sidecar that does not run as that uid would loop its passthrough connections back into
//! itself, which [`Loops`] detects and refuses.

use std::collections::HashSet;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::config::CapturedOutbound;
use crate::limits::{ConnectionCap, Idle};
use crate::outbound::{Target, serve_app_http, splice_to};
use crate::sniff::{Protocol, detect};
use crate::{ProxyError, Shared};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ports the capture rules redirect to (`palisade iptables install`'s
/// `--inbound-capture-port` and `--outbound-capture-port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturePorts {
    pub inbound: u16,
    pub outbound: u16,
}

impl Default for CapturePorts {
    fn default() -> Self {
        Self {
            inbound: palisade_capture::rules::DEFAULT_INBOUND_CAPTURE_PORT,
            outbound: palisade_capture::rules::DEFAULT_OUTBOUND_CAPTURE_PORT,
        }
    }
}

/// The address the proxy dials its application from: 127.0.0.6 in capture mode (see
/// [`crate::app::dial`]), any address otherwise.
pub fn app_source(capture: Option<CapturePorts>) -> Option<std::net::IpAddr> {
    capture.map(|_| palisade_capture::INBOUND_PASSTHROUGH_SOURCE.into())
}

/// The bound capture listeners: IPv4 always, IPv6 when the namespace has it.
#[derive(Debug)]
pub struct Listeners {
    inbound: Vec<std::net::TcpListener>,
    outbound: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// Every bound address, inbound first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.inbound
            .iter()
            .chain(&self.outbound)
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// Binds both capture ports on every address (where redirected connections arrive): one IPv4
/// socket, and one IPv6-only socket when IPv6 is there (`SO_ORIGINAL_DST` is per family).
pub fn bind(ports: CapturePorts) -> Result<Listeners, ProxyError> {
    let both = |port: u16| -> Result<Vec<std::net::TcpListener>, ProxyError> {
        let v4 = SocketAddr::from(([0, 0, 0, 0], port));
        let mut out = vec![
            std::net::TcpListener::bind(v4)
                .map_err(|cause| ProxyError::Bind { addr: v4, cause })?,
        ];
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match bind_v6_only(v6) {
            Ok(l) => out.push(l),
            Err(e) => tracing::info!(addr = %v6, error = %e, "no IPv6 capture listener"),
        }
        Ok(out)
    };
    Ok(Listeners {
        inbound: both(ports.inbound)?,
        outbound: both(ports.outbound)?,
    })
}

fn bind_v6_only(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves the capture listeners on every worker.
pub fn serve(
    shared: &Arc<Shared>,
    listeners: Listeners,
) -> Result<Vec<JoinHandle<()>>, ProxyError> {
    let max = shared.options.limits.max_connections;
    let mut tasks = Vec::new();
    let inbound_cap = ConnectionCap::new(max);
    for l in listeners.inbound {
        let addr = local(&l);
        let s = Arc::clone(shared);
        let cap = inbound_cap.clone();
        let served = shared
            .workers
            .serve(l, move |l| serve_inbound(Arc::clone(&s), l, cap.clone()));
        tasks.extend(served.map_err(|cause| ProxyError::Bind { addr, cause })?);
        tracing::info!(%addr, "inbound capture listener open");
    }
    let outbound_cap = ConnectionCap::new(max);
    let loops = Arc::new(Loops::default());
    for l in listeners.outbound {
        let addr = local(&l);
        let s = Arc::clone(shared);
        let cap = outbound_cap.clone();
        let loops = Arc::clone(&loops);
        let served = shared.workers.serve(l, move |l| {
            serve_outbound(Arc::clone(&s), l, cap.clone(), Arc::clone(&loops))
        });
        tasks.extend(served.map_err(|cause| ProxyError::Bind { addr, cause })?);
        tracing::info!(%addr, "outbound capture listener open");
    }
    Ok(tasks)
}

fn local(l: &std::net::TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The original destination of a redirected connection, or `None` (logged) when it has none
/// to honour.
fn destination(tcp: &TcpStream, direction: &str) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    match palisade_capture::original_dst(tcp) {
        Ok(original) => {
            let dst = palisade_capture::redirected_destination(original, local);
            if dst.is_none() {
                tracing::info!(direction, %local, "connection to the capture port itself refused");
            }
            dst
        }
        Err(e) => {
            tracing::info!(direction, %local, error = %e, "no original destination: connection refused");
            None
        }
    }
}

async fn serve_inbound(shared: Arc<Shared>, listener: TcpListener, cap: ConnectionCap) {
    loop {
        let (tcp, source) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "inbound capture accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            shared.metrics.connection("inbound", "over_limit");
            tracing::warn!(%source, "inbound connection refused: the capture listener is at its connection limit");
            continue;
        };
        let Some(dst) = destination(&tcp, "inbound") else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            shared.metrics.active_connections.inc();
            crate::inbound::handle_captured(&shared, tcp, source, dst).await;
            shared.metrics.active_connections.dec();
            drop(permit);
        });
    }
}

/// The local ports of the passthrough connections in flight. A connection from one of them
/// arriving at the outbound capture port is the sidecar's own, captured again (the sidecar does
/// not run as the uid iptables exempts): forwarding it would dial the same destination again,
/// and again. Ports suffice: a port taken by `bind` is not handed to another socket of the
/// namespace.
#[derive(Debug, Default)]
pub struct Loops(Mutex<HashSet<u16>>);

impl Loops {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_own(&self, source: SocketAddr) -> bool {
        self.set().contains(&source.port())
    }
}

/// A passthrough connection's entry in [`Loops`], removed when it ends.
struct Registered<'a> {
    loops: &'a Loops,
    port: u16,
}

impl<'a> Registered<'a> {
    fn new(loops: &'a Loops, port: u16) -> Self {
        loops.set().insert(port);
        Self { loops, port }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.loops.set().remove(&self.port);
    }
}

async fn serve_outbound(
    shared: Arc<Shared>,
    listener: TcpListener,
    cap: ConnectionCap,
    loops: Arc<Loops>,
) {
    loop {
        let (tcp, source) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "outbound capture accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if loops.is_own(source) {
            tracing::error!(
                %source,
                "the sidecar's own connection was captured: run it as the uid or gid that \
                 `palisade iptables install` exempts (--proxy-uid, --proxy-gid)"
            );
            continue;
        }
        let Some(permit) = cap.admit() else {
            shared.metrics.connection("outbound", "over_limit");
            tracing::warn!(
                "outbound connection refused: the capture listener is at its connection limit"
            );
            continue;
        };
        let Some(dst) = destination(&tcp, "outbound") else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let loops = Arc::clone(&loops);
        tokio::spawn(async move {
            outbound(&shared, tcp, dst, &loops).await;
            drop(permit);
        });
    }
}

/// One captured outbound connection, to `dst`.
async fn outbound(shared: &Arc<Shared>, tcp: TcpStream, dst: SocketAddr, loops: &Loops) {
    let Some(cfg) = shared.config.load_full() else {
        return;
    };
    let decision = cfg.captured_outbound(dst);
    let mode = cfg.outbound_mode;
    drop(cfg);
    let app = Idle::new(tcp, shared.options.limits.idle_timeout);
    match decision {
        CapturedOutbound::Mesh { up, protocol } => {
            // As on the inbound side: a declared protocol is never sniffed (a server-first
            // protocol on a TCP port waits for nothing), only an undeclared port is. The
            // destination's sidecar authorizes each HTTP request; anything else is one stream.
            if protocol.is_opaque() {
                shared.metrics.connection("outbound", "captured_tcp");
                let mut app = app;
                splice_to(shared, &mut app, &up).await;
                return;
            }
            let detected = if protocol.is_http() {
                let timeout = shared.options.limits.header_read_timeout;
                crate::sniff::detect_http(app, timeout).await
            } else {
                Some(detect(app).await)
            };
            match detected {
                Some((Protocol::Tcp, mut stream)) => {
                    shared.metrics.connection("outbound", "captured_tcp");
                    splice_to(shared, &mut stream, &up).await;
                }
                Some((protocol, stream)) => {
                    // An address and port always make an authority.
                    let Ok(authority) = http::uri::Authority::try_from(dst.to_string()) else {
                        return;
                    };
                    let target = Target::Captured(authority);
                    serve_app_http(Arc::clone(shared), stream, protocol, target).await;
                }
                None => {}
            }
        }
        CapturedOutbound::Passthrough => {
            shared.metrics.connection("outbound", "passthrough");
            passthrough(app, dst, loops).await;
        }
        CapturedOutbound::BlackHole => {
            shared.metrics.connection("outbound", "blackhole");
            tracing::info!(
                destination = %dst,
                mode = mode.as_str(),
                "outbound connection outside the mesh refused"
            );
            let (protocol, stream) = detect(app).await;
            if protocol != Protocol::Tcp {
                serve_app_http(Arc::clone(shared), stream, protocol, Target::BlackHole).await;
            }
        }
    }
}

/// Plain TCP to a destination outside the mesh, byte for byte, without policy.
async fn passthrough(mut app: Idle<TcpStream>, dst: SocketAddr, loops: &Loops) {
    let any = match dst {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    // Bound before connecting, so that its port is in `loops` before the connection could
    // arrive back at the capture port.
    let socket = match dst {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .and_then(|s| {
        s.bind(any)?;
        let port = s.local_addr()?.port();
        Ok((s, port))
    });
    let (socket, port) = match socket {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(destination = %dst, error = %e, "passthrough: cannot open a socket");
            return;
        }
    };
    let _registered = Registered::new(loops, port);
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(destination = %dst, error = %e, "passthrough connect failed");
            return;
        }
        Err(_) => {
            tracing::info!(destination = %dst, "passthrough connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
        tracing::debug!(destination = %dst, error = %e, "passthrough connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A passthrough connection's port marks connections from it as the sidecar's own while it
    /// lasts, and only then; other ports are the application's.
    #[test]
    fn own_ports_are_known_while_their_connections_last() {
        let loops = Loops::default();
        let from = |port: u16| SocketAddr::from(([10, 0, 0, 2], port));
        {
            let _a = Registered::new(&loops, 40001);
            let _b = Registered::new(&loops, 40002);
            for (port, own) in [(40001, true), (40002, true), (40003, false)] {
                assert_eq!(loops.is_own(from(port)), own, "{port}");
            }
        }
        assert!(!loops.is_own(from(40001)));
        assert!(!loops.is_own(from(40002)));
    }

    #[test]
    fn capture_ports_default_to_istios() {
        assert_eq!(
            CapturePorts::default(),
            CapturePorts {
                inbound: 15006,
                outbound: 15001
            }
        );
    }
}
