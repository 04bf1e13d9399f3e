//! The inbound path's connections to the application: HTTP/1.1 on loopback, one pool per
//! worker (see [`crate::workers`]), spoken by the proxy itself ([`h1`]); HTTP/2 with prior
//! knowledge for ports that declare it (gRPC), through hyper ([`h2`]).
//!
//! Why not hyper's client here: each of its connections is a task with a request channel and
//! its own read and write buffers, ~60 KiB per connection once a 64-connection load has passed
//! (a heap profile of the server sidecar put three quarters of its heap there). A connection
//! here is its socket while idle; a read buffer exists only while a response is being read, and
//! the response body ([`body::AppBody`]) reads straight off the socket on the request's own
//! task, then puts the connection back.
//!
//! A connection is dialed only when no idle one to that address is left, so the pool never
//! holds more connections than the worker had requests in flight at once.

pub mod body;
pub mod h1;
pub mod h2;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use body::{AppBody, AppBodyError};
use h1::{BodyDecoder, RequestFraming, ResponseFraming, WireError};

/// Connections kept per application address and worker; past it, a connection closes once its
/// exchange ends.
pub const MAX_CONNECTIONS: usize = 64;
/// An idle connection unused this long is closed when the pool next looks at that address.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first read of a response: most heads fit, and an allocation this small comes from
/// glibc's per-thread cache (up to 1,032 bytes) instead of its locked bins, once per request. A
/// larger head grows the buffer; a body is read in larger pieces ([`body`]).
const HEAD_READ: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response from the application.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connect to {addr}: {cause}")]
    Connect { addr: SocketAddr, cause: io::Error },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("HTTP/1.1 to {addr}: {cause}")]
    Io { addr: SocketAddr, cause: io::Error },
    #[error("HTTP/1.1 to {addr}: the connection closed before a response")]
    Closed { addr: SocketAddr },
    #[error("HTTP/1.1 to {addr}: bad response from the application: {cause}")]
    Wire { addr: SocketAddr, cause: WireError },
    #[error("HTTP/1.1 to {addr}: request not sent: {cause}")]
    Request { addr: SocketAddr, cause: WireError },
    #[error("HTTP/1.1 to {addr}: request body: {cause}")]
    RequestBody { addr: SocketAddr, cause: BoxError },
    #[error(
        "HTTP/1.1 to {addr}: the request body did not match its content-length ({sent} bytes for {declared})"
    )]
    RequestLength {
        addr: SocketAddr,
        sent: u64,
        declared: u64,
    },
}

struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// One worker's connections to its application, by address.
#[derive(Debug, Default, Clone)]
pub struct AppPool {
    inner: PoolRef,
    /// The address connections are dialed from (capture mode: 127.0.0.6, see [`dial`]).
    source: Option<IpAddr>,
}

/// The pool as a response body holds it, to give its connection back.
#[derive(Default, Clone)]
pub(crate) struct PoolRef(Arc<Mutex<HashMap<SocketAddr, Vec<Idle>>>>);

impl std::fmt::Debug for PoolRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolRef").finish_non_exhaustive()
    }
}

impl PoolRef {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used idle connection to `addr` that is still open; closes the ones
    /// idle too long on the way.
    fn checkout(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut all = self.lock();
        let list = all.get_mut(&addr)?;
        let now = Instant::now();
        list.retain(|c| now.duration_since(c.since) < IDLE_TIMEOUT);
        while let Some(c) = list.pop() {
            if still_open(&c.stream) {
                return Some(c.stream);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, stream: TcpStream) {
        let mut all = self.lock();
        let list = all.entry(addr).or_default();
        if list.len() < MAX_CONNECTIONS {
            list.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }
}

/// An idle connection has nothing to read: EOF or stray bytes mean the app closed it or is out
/// of step.
fn still_open(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl AppPool {
    /// A pool whose connections come from `source` (any local address when `None`).
    pub fn from_source(source: Option<IpAddr>) -> Self {
        Self {
            inner: PoolRef::default(),
            source,
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to the application at `addr` and returns the
    /// response once its head is in; the body streams from the connection.
    pub async fn send<B>(
        &self,
        addr: SocketAddr,
        req: Request<B>,
    ) -> Result<Response<AppBody>, AppError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let (parts, mut body) = req.into_parts();
        let framing = h1::request_framing(
            &parts.headers,
            body.is_end_stream(),
            body.size_hint().exact(),
        )
        .map_err(|cause| AppError::Request { addr, cause })?;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = Vec::with_capacity(512);
        h1::encode_head(&parts.method, path, &parts.headers, framing, &mut head);
        let (stream, reused) = match self.inner.checkout(addr) {
            Some(s) => (s, true),
            None => (connect(addr, self.source).await?, false),
        };
        let exchange = Exchange {
            addr,
            method: &parts.method,
            head: &head,
            framing,
        };
        if framing != RequestFraming::Empty {
            // Never retried: the body may be partly consumed.
            return exchange
                .run_with_body(stream, body)
                .await
                .map(|x| x.into_response(&self.inner))
                .map_err(|f| f.error);
        }
        let answered = match exchange.run(stream, &mut body).await {
            // The app closed a pooled connection as it was picked: a request without a body
            // and with an idempotent method (RFC 9110 section 9.2.2) goes once more, on a new
            // connection. Nothing of the response had arrived.
            Err(Failure {
                error,
                nothing_back: true,
            }) if reused && parts.method.is_idempotent() => {
                tracing::debug!(%addr, %error, "pooled application connection closed; retrying");
                exchange
                    .run(connect(addr, self.source).await?, &mut body)
                    .await
            }
            first => first,
        };
        answered
            .map(|x| x.into_response(&self.inner))
            .map_err(|f| f.error)
    }

    /// Idle connections held to `addr`.
    pub fn idle(&self, addr: SocketAddr) -> usize {
        self.inner.lock().get(&addr).map_or(0, Vec::len)
    }
}

/// One request on one connection.
struct Exchange<'a> {
    addr: SocketAddr,
    method: &'a Method,
    head: &'a [u8],
    framing: RequestFraming,
}

struct Failure {
    error: AppError,
    /// No byte of a response arrived (the request may be retried when safe).
    nothing_back: bool,
}

/// A response head in, and what is needed to read its body.
struct Answered {
    addr: SocketAddr,
    head: h1::ResponseHead,
    framing: ResponseFraming,
    stream: body::Conn,
    buf: BytesMut,
    reusable: bool,
}

impl Answered {
    fn into_response(self, pool: &PoolRef) -> Response<AppBody> {
        let body = if self.framing == ResponseFraming::Empty {
            if self.reusable
                && self.buf.is_empty()
                && let body::Conn::Whole(stream) = self.stream
            {
                pool.checkin(self.addr, stream);
            }
            AppBody::empty()
        } else {
            AppBody::streaming(body::Live {
                stream: self.stream,
                buf: self.buf,
                decoder: BodyDecoder::new(self.framing),
                reusable: self.reusable,
                pool: pool.clone(),
                addr: self.addr,
            })
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.head.status;
        *resp.version_mut() = self.head.version;
        *resp.headers_mut() = self.head.headers;
        resp
    }
}

impl Exchange<'_> {
    /// A request with a body: written while the response head is read, and, when the app answers
    /// first, written on beside the response (full duplex: an app may stream its answer while
    /// it reads). An upload still going when the response ends is cut, and the connection is
    /// not reused.
    async fn run_with_body<B>(&self, stream: TcpStream, body: B) -> Result<Answered, Failure>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let addr = self.addr;
        let (mut rd, wr) = stream.into_split();
        let head = self.head.to_vec();
        let framing = self.framing;
        let mut upload = Box::pin(async move {
            let (mut wr, mut body) = (wr, body);
            write_request(addr, &mut wr, &head, framing, &mut body)
                .await
                .map(|()| wr)
        });
        let mut buf = BytesMut::with_capacity(HEAD_READ);
        let mut sent = None;
        let head = {
            let read = read_head(addr, &mut rd, &mut buf);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    biased;
                    w = &mut upload, if sent.is_none() => match w {
                        // The client's body failed or overran: the app would wait for the rest.
                        Err(e) if !matches!(e, AppError::Io { .. }) => {
                            return Err(Failure { error: e, nothing_back: false });
                        }
                        w => sent = Some(w),
                    },
                    h = &mut read => break h,
                }
            }
        };
        let head = head.map_err(|error| Failure {
            nothing_back: buf.is_empty(),
            error,
        })?;
        let resp_framing = h1::response_framing(self.method, &head).map_err(|cause| Failure {
            error: AppError::Wire { addr, cause },
            nothing_back: false,
        })?;
        let (stream, reusable) = match sent {
            Some(Ok(wr)) => match rd.reunite(wr) {
                Ok(stream) => (
                    body::Conn::Whole(stream),
                    h1::keep_alive(&head, resp_framing),
                ),
                Err(e) => (body::Conn::reading(e.0, None), false),
            },
            Some(Err(e)) => {
                tracing::debug!(%addr, error = %e, "writing the request to the application failed");
                (body::Conn::reading(rd, None), false)
            }
            None => {
                let task = tokio::spawn(async move {
                    match upload.await {
                        // No FIN at the end of the body: an app may take a half-closed
                        // connection for a client gone away. It closes with the read half.
                        Ok(wr) => wr.forget(),
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "request body to the application ended early");
                        }
                    }
                });
                (body::Conn::reading(rd, Some(body::Upload(task))), false)
            }
        };
        Ok(Answered {
            addr,
            head,
            framing: resp_framing,
            stream,
            buf,
            reusable,
        })
    }

    /// A request without a body: the head written while the response head is read.
    async fn run<B>(&self, mut stream: TcpStream, body: &mut B) -> Result<Answered, Failure>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let addr = self.addr;
        let mut buf = BytesMut::with_capacity(HEAD_READ);
        let (head, sent) = {
            let (mut rd, mut wr) = stream.split();
            let write = write_request(addr, &mut wr, self.head, self.framing, body);
            let read = read_head(addr, &mut rd, &mut buf);
            tokio::pin!(write, read);
            let mut sent = None;
            let head = loop {
                tokio::select! {
                    biased;
                    w = &mut write, if sent.is_none() => match w {
                        // The client's body failed or overran: the app would wait for the rest.
                        Err(e) if !matches!(e, AppError::Io { .. }) => {
                            return Err(Failure { error: e, nothing_back: false });
                        }
                        w => sent = Some(w),
                    },
                    h = &mut read => break h,
                }
            };
            (head, sent)
        };
        let head = match head {
            Ok(h) => h,
            Err(error) => {
                let nothing_back = buf.is_empty();
                if let Some(Err(w)) = sent {
                    tracing::debug!(%addr, error = %w, "writing the request to the application failed");
                }
                return Err(Failure {
                    error,
                    nothing_back,
                });
            }
        };
        let framing = h1::response_framing(self.method, &head).map_err(|cause| Failure {
            error: AppError::Wire { addr, cause },
            nothing_back: false,
        })?;
        let reusable = matches!(sent, Some(Ok(()))) && h1::keep_alive(&head, framing);
        Ok(Answered {
            addr,
            head,
            framing,
            stream: body::Conn::Whole(stream),
            buf,
            reusable,
        })
    }
}

/// The head, then the body framed as `framing` says.
async fn write_request<W, B>(
    addr: SocketAddr,
    wr: &mut W,
    head: &[u8],
    framing: RequestFraming,
    body: &mut B,
) -> Result<(), AppError>
where
    W: AsyncWrite + Unpin,
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let io = |cause| AppError::Io { addr, cause };
    wr.write_all(head).await.map_err(io)?;
    if framing == RequestFraming::Empty {
        return Ok(());
    }
    let mut sent: u64 = 0;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| AppError::RequestBody {
            addr,
            cause: e.into(),
        })?;
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                trailers = f.into_trailers().ok();
                break;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            RequestFraming::Length(declared) if sent > declared => {
                return Err(AppError::RequestLength {
                    addr,
                    sent,
                    declared,
                });
            }
            RequestFraming::Chunked => {
                wr.write_all(&h1::chunk_header(data.len()))
                    .await
                    .map_err(io)?;
                wr.write_all(&data).await.map_err(io)?;
                wr.write_all(b"\r\n").await.map_err(io)?;
            }
            _ => wr.write_all(&data).await.map_err(io)?,
        }
    }
    match framing {
        RequestFraming::Length(declared) if sent != declared => Err(AppError::RequestLength {
            addr,
            sent,
            declared,
        }),
        RequestFraming::Chunked => wr
            .write_all(&h1::last_chunk(trailers.as_ref()))
            .await
            .map_err(io),
        _ => Ok(()),
    }
}

/// Reads until a final response head is in `buf` (1xx interim responses skipped); leaves the
/// bytes after it in `buf`.
async fn read_head<R: AsyncRead + Unpin>(
    addr: SocketAddr,
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<h1::ResponseHead, AppError> {
    loop {
        match h1::parse_response_head(buf) {
            Ok(Some(head)) if head.status == http::StatusCode::SWITCHING_PROTOCOLS => {
                return Err(AppError::Wire {
                    addr,
                    cause: WireError::UnexpectedUpgrade,
                });
            }
            Ok(Some(head)) if head.status.is_informational() => {
                buf.advance(head.len);
                continue;
            }
            Ok(Some(head)) => {
                buf.advance(head.len);
                return Ok(head);
            }
            Ok(None) => {}
            Err(cause) => return Err(AppError::Wire { addr, cause }),
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(buf.capacity().max(HEAD_READ));
        }
        match rd.read_buf(buf).await {
            Ok(0) => return Err(AppError::Closed { addr }),
            Ok(_) => {}
            Err(cause) => return Err(AppError::Io { addr, cause }),
        }
    }
}

/// Dials the application.
pub(crate) async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, AppError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, dial(addr, source))
        .await
        .map_err(|_| AppError::ConnectTimeout(addr))?
        .map_err(|cause| AppError::Connect { addr, cause })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A TCP connection to `addr` from `source` (port chosen by the kernel). In capture mode the
/// sidecar dials its application from 127.0.0.6 (`::6` for IPv6, which must be on `lo`), as
/// Istio does: the nat table's OUTPUT rules let that source through over `lo` instead of
/// capturing the connection again, and the application sees a loopback peer.
pub async fn dial(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let source = match (source, addr) {
        (IpAddr::V4(_), SocketAddr::V6(_)) => {
            IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6))
        }
        _ => source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// A keep-alive HTTP/1.1 app that answers every request after `delay`, counting connections.
    /// With `close_after_first`, it closes each connection once its first response is written.
    async fn app(delay: Duration, close_after_first: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let (addr, accepted, _) = scripted(move |_| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                close_after_first,
                delay,
            )
        })
        .await;
        (addr, accepted)
    }

    type Script = dyn Fn(&[u8]) -> (Vec<u8>, bool, Duration) + Send + Sync;

    /// An app that reads each request whole (head, then the body by its framing), passes its
    /// raw bytes to `respond`, and writes back what that returns (then closes when told to).
    /// Also returns the connection count and the raw requests.
    async fn scripted(
        respond: impl Fn(&[u8]) -> (Vec<u8>, bool, Duration) + Send + Sync + 'static,
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let respond: Arc<Script> = Arc::new(respond);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let respond = Arc::clone(&respond);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    loop {
                        let Some(raw) = read_request(&mut s, &mut buf).await else {
                            return;
                        };
                        let (resp, close, delay) = respond(&raw);
                        let _ = tx.send(raw);
                        tokio::time::sleep(delay).await;
                        if s.write_all(&resp).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted, rx)
    }

    async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> bool {
        matches!(s.read_buf(buf).await, Ok(n) if n > 0)
    }

    async fn read_request(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Vec<u8>> {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(s, buf).await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let mut raw = buf.split_to(head_end).to_vec();
        if head.contains("transfer-encoding: chunked") {
            // Decoded afresh after every read until the last chunk and trailers are in.
            loop {
                let mut view = buf.clone();
                let mut d = h1::ChunkedDecoder::default();
                loop {
                    match d.decode(&mut view).unwrap() {
                        h1::Decoded::End => {
                            let used = buf.len() - view.len();
                            raw.extend_from_slice(&buf.split_to(used));
                            return Some(raw);
                        }
                        h1::Decoded::NeedMore => break,
                        _ => {}
                    }
                }
                if !fill(s, buf).await {
                    return None;
                }
            }
        } else if let Some(cl) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let n: usize = cl.trim().parse().unwrap();
            while buf.len() < n {
                if !fill(s, buf).await {
                    return None;
                }
            }
            raw.extend_from_slice(&buf.split_to(n));
        }
        Some(raw)
    }

    async fn get(pool: &AppPool, addr: SocketAddr) -> String {
        let req = Request::get("/")
            .header("host", "app")
            .body(Empty::<Bytes>::new())
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
        assert_eq!(pool.idle(addr), 1);
    }

    /// A burst dials one connection per request in flight and no more; afterwards the burst's
    /// connections serve the next burst.
    #[tokio::test]
    async fn bursts_hold_no_more_connections_than_requests_in_flight() {
        let (addr, accepted) = app(Duration::from_millis(20), false).await;
        let pool = AppPool::default();
        for _ in 0..3 {
            let mut burst = Vec::new();
            for _ in 0..8 {
                let pool = pool.clone();
                burst.push(tokio::spawn(async move { get(&pool, addr).await }));
            }
            for r in burst {
                assert_eq!(r.await.unwrap(), "ok");
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 8);
        assert_eq!(pool.idle(addr), 8);
    }

    /// The app closes every connection after one response; every request still succeeds on a
    /// new connection (a closed idle connection is never handed out, or, closed just as it was
    /// picked, the idempotent request goes again).
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
        let req = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        let err = AppPool::default().send(addr, req).await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    /// Every response framing: the body and trailers arrive whole, and the connection is reused
    /// exactly when the framing and `connection` allow it.
    #[tokio::test]
    async fn response_bodies_in_every_framing() {
        let cases: [(Method, &str, bool, &str, usize, bool); 8] = [
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                false,
                "hello",
                0,
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\n",
                false,
                "hello!",
                1,
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\n\r\nuntil close",
                true,
                "until close",
                0,
                false,
            ),
            (
                Method::HEAD,
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                false,
                "",
                0,
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                "",
                0,
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                false,
                "ok",
                0,
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                true,
                "ok",
                0,
                false,
            ),
            (
                Method::GET,
                "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
                true,
                "ok",
                0,
                false,
            ),
        ];
        for (method, raw, close, want, ntrailers, reused) in cases {
            let (addr, accepted, _) =
                scripted(move |_| (raw.as_bytes().to_vec(), close, Duration::ZERO)).await;
            let pool = AppPool::default();
            for _ in 0..2 {
                let req = Request::builder()
                    .method(method.clone())
                    .uri("/")
                    .header("host", "app")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = pool.send(addr, req).await.unwrap();
                let collected = resp.into_body().collect().await.unwrap();
                let trailers = collected.trailers().map_or(0, HeaderMap::len);
                assert_eq!(collected.to_bytes(), want.as_bytes(), "{raw:?}");
                assert_eq!(trailers, ntrailers, "{raw:?}");
            }
            let want_conns = if reused { 1 } else { 2 };
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                want_conns,
                "connections for {raw:?}"
            );
        }
    }

    async fn sent_as<B>(body: B, headers: &[(&str, &str)]) -> Result<String, AppError>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let (addr, _, mut raw) = scripted(|_| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
                false,
                Duration::ZERO,
            )
        })
        .await;
        let mut req = Request::post("/up?x=1").header("host", "app");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = AppPool::default()
            .send(addr, req.body(body).unwrap())
            .await?;
        assert_eq!(resp.status(), 200);
        Ok(String::from_utf8(raw.recv().await.unwrap()).unwrap())
    }

    /// A body of `parts` whose length is not known up front (as an HTTP/2 client's).
    type Frames =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn frames(parts: Vec<Frame<Bytes>>) -> Frames {
        StreamBody::new(futures::stream::iter(
            parts.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    /// What the app receives for each kind of request body.
    #[tokio::test]
    async fn request_bodies_are_framed() {
        let head = "POST /up?x=1 HTTP/1.1\r\nhost: app\r\n";
        assert_eq!(
            sent_as(Empty::<Bytes>::new(), &[]).await.unwrap(),
            format!("{head}content-length: 0\r\n\r\n")
        );
        assert_eq!(
            sent_as(Full::new(Bytes::from_static(b"abc")), &[])
                .await
                .unwrap(),
            format!("{head}content-length: 3\r\n\r\nabc")
        );
        // An HTTP/2 client's body of unknown length, with trailers: chunked.
        let mut t = HeaderMap::new();
        t.insert("x-t", http::HeaderValue::from_static("1"));
        let body = frames(vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(Bytes::from_static(b"cde")),
            Frame::trailers(t),
        ]);
        assert_eq!(
            sent_as(body, &[("transfer-encoding", "chunked")])
                .await
                .unwrap(),
            format!(
                "{head}transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\nx-t: 1\r\n\r\n"
            )
        );
        // The client's content-length stands; a body that does not match it is refused.
        let body = frames(vec![Frame::data(Bytes::from_static(b"abc"))]);
        assert_eq!(
            sent_as(body, &[("content-length", "3")]).await.unwrap(),
            format!("{head}content-length: 3\r\n\r\nabc")
        );
        let body = frames(vec![Frame::data(Bytes::from_static(b"abc"))]);
        let err = sent_as(body, &[("content-length", "5")]).await.unwrap_err();
        assert!(
            matches!(
                err,
                AppError::RequestLength {
                    sent: 3,
                    declared: 5,
                    ..
                }
            ),
            "{err}"
        );
        let body = frames(vec![Frame::data(Bytes::from_static(b"abcdef"))]);
        let err = sent_as(body, &[("content-length", "5")]).await.unwrap_err();
        assert!(
            matches!(
                err,
                AppError::RequestLength {
                    sent: 6,
                    declared: 5,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// What the app sends that is not a usable response is an error naming the app; nothing
    /// panics and nothing is passed on as a response.
    #[tokio::test]
    async fn bad_responses_are_errors_naming_the_app() {
        let huge = format!(
            "HTTP/1.1 200 OK\r\nx: {}\r\n\r\n",
            "a".repeat(h1::MAX_HEAD_BYTES)
        );
        let cases: Vec<(String, &str)> = vec![
            ("SSH-2.0-OpenSSH_9\r\n\r\n".into(), "not HTTP/1.x"),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n".into(),
                "invalid content-length",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n".into(),
                "101 Switching Protocols",
            ),
            (huge, "larger than"),
            (String::new(), "closed before a response"),
        ];
        for (raw, reason) in cases {
            let bytes = raw.clone().into_bytes();
            let (addr, _, _) = scripted(move |_| (bytes.clone(), true, Duration::ZERO)).await;
            let req = Request::get("/")
                .header("host", "app")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let err = AppPool::default()
                .send(addr, req)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&addr.to_string()) && err.contains(reason),
                "{raw:.40?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn truncated_bodies_are_errors() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        ] {
            let (addr, _, _) =
                scripted(move |_| (raw.as_bytes().to_vec(), true, Duration::ZERO)).await;
            let req = Request::get("/")
                .header("host", "app")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = AppPool::default().send(addr, req).await.unwrap();
            let err = resp.into_body().collect().await.unwrap_err();
            assert!(
                matches!(err, AppBodyError::Truncated { .. }),
                "{raw:?}: {err}"
            );
        }
    }

    /// Full duplex: an app that sends its answer's head at once and then echoes the body as it
    /// reads it gets the whole body, each part sent after the previous echo came back.
    #[tokio::test]
    async fn an_app_answering_first_still_gets_the_whole_body() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = BytesMut::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                assert!(fill(&mut s, &mut buf).await);
            }
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let _ = buf.split_to(end);
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            let mut decoder = h1::ChunkedDecoder::default();
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    h1::Decoded::Data(d) if !d.is_empty() => {
                        let out = [&h1::chunk_header(d.len())[..], &d, b"\r\n"].concat();
                        s.write_all(&out).await.unwrap();
                    }
                    h1::Decoded::End => break,
                    h1::Decoded::NeedMore => assert!(fill(&mut s, &mut buf).await),
                    _ => {}
                }
            }
            s.write_all(b"0\r\n\r\n").await.unwrap();
        });
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::post("/")
            .header("host", "app")
            .header("transfer-encoding", "chunked")
            .body(body)
            .unwrap();
        let pool = AppPool::default();
        let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, req))
            .await
            .expect("the head arrives while the body is open")
            .unwrap();
        let mut body = resp.into_body();
        for part in ["one", "two", "three"] {
            if part != "one" {
                tx.send(Ok(Frame::data(Bytes::from(part)))).await.unwrap();
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("{part} is echoed while the body is open"))
                .unwrap()
                .unwrap();
            assert_eq!(frame.into_data().unwrap(), part);
        }
        drop(tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert!(rest.is_empty());
    }

    /// An app that answers before reading the body (413, say) gets no more of it; its answer
    /// comes back and the connection is not reused.
    #[tokio::test]
    async fn an_early_answer_ends_the_upload() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            // Keep the connection open, reading nothing more.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::post("/").header("host", "app").body(body).unwrap();
        let pool = AppPool::default();
        let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, req))
            .await
            .expect("the early answer arrives while the body is still open")
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(
            pool.idle(addr),
            0,
            "a connection with a half-sent body is not reused"
        );
        drop(tx);
    }
}
