//! What one downstream connection may cost, on every listener (inbound, outbound HTTP, outbound
//! TCP): request headers capped (Envoy's `max_request_headers_kb`, 60 KiB), a deadline to send
//! them (a half-sent request does not hold a connection forever), an idle timeout (Envoy's
//! `idle_timeout`, one hour, for HTTP and TCP proxying alike), and a cap on concurrent
//! connections per listener. Set by the operator (`palisade proxy --help`).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Limits of every listener of one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The size of a request's header block, in bytes (HTTP/1.1 head; HTTP/2 header list).
    pub max_request_headers: usize,
    /// How long a client has to send a whole request head (HTTP/1.1), or its first bytes.
    pub header_read_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Concurrent downstream connections per listener; more are closed at accept.
    pub max_connections: usize,
}

/// The smallest header cap hyper's HTTP/1.1 server accepts as a buffer size.
const MIN_HEADER_BYTES: usize = 8 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_headers: 60 * 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 16 * 1024,
        }
    }
}

impl Limits {
    /// The header cap as hyper's HTTP/1.1 server takes it.
    pub fn h1_max_header_size(&self) -> usize {
        self.max_request_headers.max(MIN_HEADER_BYTES)
    }

    /// hyper's HTTP/1.1 read buffer: the head plus room for body bytes read with it.
    pub fn h1_max_buf_size(&self) -> usize {
        self.h1_max_header_size() + 16 * 1024
    }

    /// The HTTP/2 header list cap.
    pub fn h2_max_header_list_size(&self) -> u32 {
        u32::try_from(self.max_request_headers).unwrap_or(u32::MAX)
    }

    /// hyper's HTTP/1.1 server configured with these limits.
    pub fn http1_server(&self) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_header_size(self.h1_max_header_size())
            .max_buf_size(self.h1_max_buf_size());
        b
    }

    /// hyper's HTTP/2 server configured with these limits.
    pub fn http2_server(
        &self,
    ) -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
        let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        b.timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(self.h2_max_header_list_size());
        b
    }
}

/// The connection cap of one listener, shared by the workers that accept on it.
#[derive(Debug, Clone)]
pub struct ConnectionCap(Arc<Semaphore>);

impl ConnectionCap {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))))
    }

    /// A slot for one more connection, or `None` when the listener is full.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.0).try_acquire_owned().ok()
    }
}

/// A stream that fails with `TimedOut` once neither direction moved for `timeout`.
///
/// Activity only stamps an `Instant`; the timer is re-armed lazily when it fires early, so the
/// data path does not touch the timer wheel per read or write.
#[derive(Debug)]
pub struct Idle<S> {
    inner: S,
    timeout: Duration,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl<S> Idle<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            timeout,
            last: now,
            sleep: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    /// Ready with an error once the stream has been idle for the whole timeout.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let deadline = self.last + self.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection idle timeout",
                ));
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        if matches!(r, Ok(n) if n > 0) {
            this.last = Instant::now();
        }
        Poll::Ready(r)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs));
        if matches!(r, Ok(n) if n > 0) {
            this.last = Instant::now();
        }
        Poll::Ready(r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn idle_stream_times_out_and_activity_postpones_it() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut idle = Idle::new(b, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        tokio::time::advance(Duration::from_secs(6)).await;
        a.write_all(b"hi").await.unwrap();
        assert_eq!(idle.read(&mut buf).await.unwrap(), 2);
        // 6 s after the last byte: still open (the first deadline passed at 10 s).
        let started = Instant::now();
        let err = idle.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn connection_cap_admits_up_to_max() {
        let cap = ConnectionCap::new(2);
        let a = cap.admit().unwrap();
        let _b = cap.admit().unwrap();
        assert!(cap.admit().is_none());
        drop(a);
        assert!(cap.admit().is_some());
    }

    #[test]
    fn header_cap_respects_hypers_minimum() {
        let l = Limits {
            max_request_headers: 1024,
            ..Limits::default()
        };
        assert_eq!(l.h1_max_header_size(), 8 * 1024);
        assert_eq!(Limits::default().h1_max_header_size(), 60 * 1024);
    }
}
