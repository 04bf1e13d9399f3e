//! The inbound path's connections to the application: HTTP/1.1 on loopback, one pool per
//! worker (see [`crate::workers`]).
//!
//! A connection is dialed only when none of the pool's connections to that address is free at
//! the moment a request needs one, so the pool never holds more connections than the worker had
//! requests in flight at once. (hyper-util's pool races a new dial against a connection coming
//! back and keeps both: after a burst it held several times more idle connections than requests
//! were in flight, about 20 KiB each.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::ext_authz::body::RequestBody;

/// Connections kept per application address and worker; past it, a connection closes once its
/// exchange ends.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection unused this long is closed when the pool next looks at it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request did not reach the application.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connect to {addr}: {cause}")]
    Connect {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("HTTP/1.1 to {addr}: {cause}")]
    Http {
        addr: SocketAddr,
        cause: hyper::Error,
    },
}

struct Conn<B> {
    sender: SendRequest<B>,
    last_used: Instant,
}

/// One worker's connections to its application, by address. Generic over the request body only
/// for tests; the proxy sends [`RequestBody`].
pub struct AppPool<B = RequestBody> {
    conns: Mutex<HashMap<SocketAddr, Vec<Conn<B>>>>,
}

impl<B> Default for AppPool<B> {
    fn default() -> Self {
        Self {
            conns: Mutex::default(),
        }
    }
}

impl<B> std::fmt::Debug for AppPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPool").finish_non_exhaustive()
    }
}

impl<B> AppPool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `req` to the application at `addr` and returns its response head (the body streams).
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<B>,
    ) -> Result<Response<Incoming>, AppError> {
        let http = |cause| AppError::Http { addr, cause };
        let (sender, pooled) = match self.checkout(addr) {
            Some(s) => (s, true),
            None => (connect(addr).await?, false),
        };
        match self.exchange(addr, sender, req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // The application closed the pooled connection just as we picked it, and the
                // request came back unsent: once more, on a new connection.
                Some(unsent) if pooled => {
                    let fresh = connect(addr).await?;
                    self.exchange(addr, fresh, unsent)
                        .await
                        .map_err(|e| http(e.into_error()))
                }
                _ => Err(http(e.into_error())),
            },
        }
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        mut sender: SendRequest<B>,
        req: Request<B>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<B>>> {
        let exchange = sender.try_send_request(req);
        // Back in the pool at once: busy until this exchange ends, then free again.
        self.checkin(addr, sender);
        exchange.await
    }

    /// A free connection to `addr`, dropping closed and long-idle ones on the way.
    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<B>> {
        let mut all = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = all.get_mut(&addr)?;
        let now = Instant::now();
        // Keep a connection unless it is closed, or free and unused for too long.
        list.retain(|c| {
            let stale = c.sender.is_ready() && now.duration_since(c.last_used) > IDLE_TIMEOUT;
            !c.sender.is_closed() && !stale
        });
        let free = list.iter().position(|c| c.sender.is_ready())?;
        Some(list.swap_remove(free).sender)
    }

    fn checkin(&self, addr: SocketAddr, sender: SendRequest<B>) {
        let mut all = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = all.entry(addr).or_default();
        if list.len() < MAX_CONNECTIONS {
            list.push(Conn {
                sender,
                last_used: Instant::now(),
            });
        }
    }

    /// Connections held to `addr` (busy or free).
    pub fn len(&self, addr: SocketAddr) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&addr)
            .map_or(0, Vec::len)
    }
}

/// Dials the application and starts the connection's task on the current worker.
async fn connect<B>(addr: SocketAddr) -> Result<SendRequest<B>, AppError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| AppError::ConnectTimeout(addr))?
        .map_err(|cause| AppError::Connect { addr, cause })?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|cause| AppError::Http { addr, cause })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "application connection ended with an error");
        }
    });
    sender
        .ready()
        .await
        .map_err(|cause| AppError::Http { addr, cause })?;
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A keep-alive HTTP/1.1 app that answers every request after `delay`, counting connections.
    /// With `close_after_first`, it closes each connection once its first response is written.
    async fn app(delay: Duration, close_after_first: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        tokio::time::sleep(delay).await;
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(resp).await.is_err() || close_after_first {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &AppPool<Empty<Bytes>>, addr: SocketAddr) -> String {
        let req = Request::get("/")
            .header("host", "app")
            .body(Empty::new())
            .unwrap();
        let resp = pool.send(addr, req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = app(Duration::ZERO, false).await;
        let pool = AppPool::default();
        for _ in 0..20 {
            assert_eq!(get(&pool, addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.len(addr), 1);
    }

    /// A burst dials one connection per request in flight and no more; afterwards the burst's
    /// connections serve the next burst.
    #[tokio::test]
    async fn bursts_hold_no_more_connections_than_requests_in_flight() {
        let (addr, accepted) = app(Duration::from_millis(20), false).await;
        let pool = Arc::new(AppPool::default());
        for _ in 0..3 {
            let mut burst = Vec::new();
            for _ in 0..8 {
                let pool = Arc::clone(&pool);
                burst.push(tokio::spawn(async move { get(&pool, addr).await }));
            }
            for r in burst {
                assert_eq!(r.await.unwrap(), "ok");
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
        assert_eq!(pool.len(addr), 8);
    }

    /// The app closes pooled connections; every request still succeeds (a request picked for a
    /// connection that turns out closed comes back unsent and goes out on a new one).
    #[tokio::test]
    async fn connections_closed_by_the_app_are_replaced() {
        let (addr, accepted) = app(Duration::ZERO, true).await;
        let pool = AppPool::default();
        for _ in 0..10 {
            assert_eq!(get(&pool, addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn unreachable_app_is_an_error_naming_the_address() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = AppPool::<Empty<Bytes>>::default();
        let req = Request::get("/").body(Empty::new()).unwrap();
        let err = pool.send(addr, req).await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
