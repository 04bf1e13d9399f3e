//! HTTP/2 with prior knowledge (h2c) to the application, for ports that declare `grpc`,
//! `http2` or `h2c` (Istio's protocol selection): one multiplexed connection per application
//! address and worker, dialed on first use and again when it closes. Trailers (gRPC's
//! `grpc-status`) pass in both directions as HTTP/2 frames.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::ext_authz::body::RequestBody;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an HTTP/2 request got no response from the application.
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    #[error("connect to {addr}: {cause}")]
    Connect {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("HTTP/2 to {addr}: {cause}")]
    Http {
        addr: SocketAddr,
        cause: hyper::Error,
    },
    #[error("HTTP/2 to {addr}: request target: {cause}")]
    Target {
        addr: SocketAddr,
        cause: http::Error,
    },
}

/// One worker's HTTP/2 connections to the application.
#[derive(Debug, Default)]
pub struct H2Pool {
    conns: Mutex<HashMap<SocketAddr, SendRequest<RequestBody>>>,
    /// The address connections are dialed from (see [`super::dial`]).
    source: Option<std::net::IpAddr>,
}

impl H2Pool {
    /// A pool whose connections come from `source` (any local address when `None`).
    pub fn from_source(source: Option<std::net::IpAddr>) -> Self {
        Self {
            conns: Mutex::default(),
            source,
        }
    }

    /// Sends `req` (origin form, `Host` naming the service) to the application at `addr`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, H2Error> {
        let mut req = absolute(req).map_err(|cause| H2Error::Target { addr, cause })?;
        *req.version_mut() = http::Version::HTTP_2;
        let mut sender = match self.live(addr) {
            Some(s) => s,
            None => self.connect(addr).await?,
        };
        if sender.ready().await.is_err() {
            // The connection ended between requests: one new one.
            sender = self.connect(addr).await?;
            sender
                .ready()
                .await
                .map_err(|cause| H2Error::Http { addr, cause })?;
        }
        sender
            .send_request(req)
            .await
            .map_err(|cause| H2Error::Http { addr, cause })
    }

    fn live(&self, addr: SocketAddr) -> Option<SendRequest<RequestBody>> {
        let mut conns = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match conns.get(&addr) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                conns.remove(&addr);
                None
            }
            None => None,
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<RequestBody>, H2Error> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, super::dial(addr, self.source))
            .await
            .map_err(|_| H2Error::ConnectTimeout(addr))?
            .map_err(|cause| H2Error::Connect { addr, cause })?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|cause| H2Error::Http { addr, cause })?;
        // The connection runs on this worker, as its requests do.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HTTP/2 connection to the application ended");
            }
        });
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(addr, sender.clone());
        Ok(sender)
    }
}

/// HTTP/2 carries the authority as `:authority`: the request's `Host` becomes the URI's
/// authority (and is not sent again as a header).
fn absolute<B>(mut req: Request<B>) -> Result<Request<B>, http::Error> {
    let authority = req
        .headers_mut()
        .remove(http::header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_else(|| "localhost".to_owned());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()?;
    Ok(req)
}
