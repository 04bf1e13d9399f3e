//! Protocol detection on a fresh stream: TLS ClientHello or not (PERMISSIVE), then HTTP/2
//! preface, HTTP/1 request line, or opaque TCP. Bytes read to decide are replayed by [`Rewind`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// How long a client may stay silent before its stream is taken for opaque TCP (protocols in
/// which the server speaks first).
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method we recognize, plus the space.
const MAX_METHOD: usize = 16;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
        }
    }
}

/// `Some` once `buf` decides; `None` when more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD) {
        if b == b' ' {
            return Some(if i >= 3 {
                Protocol::Http1
            } else {
                Protocol::Tcp
            });
        }
        // Methods are uppercase tokens (GET, POST, M-SEARCH...).
        if !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Some(Protocol::Tcp);
        }
    }
    if buf.len() < MAX_METHOD {
        None
    } else {
        Some(Protocol::Tcp)
    }
}

/// Reads until the protocol is known (or the client is silent / done): returns it and the
/// stream with the read bytes put back.
pub async fn detect<S: AsyncRead + Unpin>(mut stream: S) -> (Protocol, Rewind<S>) {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let protocol = loop {
        if let Some(p) = classify(&buf) {
            break p;
        }
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Protocol::Tcp,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    (protocol, Rewind::new(buf, stream))
}

/// A stream that first yields `prefix`, then reads from `inner`.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let rest = &self.prefix[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        let table: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"G", None),
            (b"GET", None),
            (b"GET /", Some(Protocol::Http1)),
            (b"M-SEARCH * HTTP/1.1", Some(Protocol::Http1)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Protocol::Http2)),
            (b"PRI * HTTP/2.0", None),
            (b"PRI /x HTTP/1.1", Some(Protocol::Http1)),
            (b"get / HTTP/1.1", Some(Protocol::Tcp)),
            (b"\x16\x03\x01", Some(Protocol::Tcp)),
            (b"hello world", Some(Protocol::Tcp)),
            (b"AB /", Some(Protocol::Tcp)),
            (b"ABCDEFGHIJKLMNOPQRST", Some(Protocol::Tcp)),
        ];
        for (input, want) in table {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[tokio::test]
    async fn detect_replays_what_it_read() {
        let (mut a, b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"POST /x HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let (p, mut s) = detect(b).await;
        assert_eq!(p, Protocol::Http1);
        drop(a);
        let mut all = String::new();
        s.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "POST /x HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp() {
        let (_a, b) = tokio::io::duplex(64);
        let (p, _) = detect(b).await;
        assert_eq!(p, Protocol::Tcp);
    }
}
