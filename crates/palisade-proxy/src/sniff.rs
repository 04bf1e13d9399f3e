//! Protocol detection on a fresh stream. For a port that declares no protocol: HTTP/2 preface,
//! HTTP/1 request line, or opaque TCP ([`detect`]). For a port declared HTTP: HTTP/2 preface or
//! HTTP/1, never TCP ([`detect_http`]): what does not parse gets a 400 from the HTTP server
//! instead of being piped to the application. Bytes read to decide are replayed by [`Rewind`].

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
/// How much of a request line detection reads before it decides without it.
const MAX_SNIFF: usize = 8 * 1024;

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

/// HTTP token characters (RFC 9110 section 5.6.2), which a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `Some` once `buf` decides; `None` when more bytes are needed.
///
/// Anything an HTTP/1 server would take for a request is HTTP, so that the proxy (not the
/// application) parses it: empty lines before the request line (RFC 9112 section 2.2 asks
/// servers to skip them) and methods in lowercase (which authorization then refuses with 400)
/// included. A lowercase word is HTTP only when its line ends in `HTTP/1.x`, so that text
/// protocols such as memcached's (`get key`) stay TCP.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let Some(start) = buf.iter().position(|&b| b != b'\r' && b != b'\n') else {
        // Only empty lines so far.
        return (buf.len() >= MAX_SNIFF).then_some(Protocol::Tcp);
    };
    let line = &buf[start..];
    let Some(space) = line.iter().take(MAX_METHOD).position(|&b| b == b' ') else {
        if line.iter().take(MAX_METHOD).any(|&b| !is_tchar(b)) || line.len() >= MAX_METHOD {
            return Some(Protocol::Tcp);
        }
        return None;
    };
    let method = &line[..space];
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Some(Protocol::Tcp);
    }
    // Uppercase methods (GET, POST, M-SEARCH...): HTTP without waiting for the whole line.
    if method.len() >= 3
        && method
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Some(Protocol::Http1);
    }
    match line.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let l = line[..end].strip_suffix(b"\r").unwrap_or(&line[..end]);
            let version = l.len().checked_sub(8).map(|i| &l[i..]);
            let http = version.is_some_and(|v| {
                v.eq_ignore_ascii_case(b"HTTP/1.1") || v.eq_ignore_ascii_case(b"HTTP/1.0")
            });
            Some(if http { Protocol::Http1 } else { Protocol::Tcp })
        }
        None if buf.len() >= MAX_SNIFF => Some(Protocol::Tcp),
        None => None,
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
        let mut chunk = [0u8; 512];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Protocol::Tcp,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    (protocol, Rewind::new(buf, stream))
}

/// For a port declared HTTP: HTTP/2 when the stream starts with the HTTP/2 preface, else
/// HTTP/1 (the HTTP/1 server answers 400 to whatever is not a request). `None` when the client
/// sends nothing usable within `timeout` or closes.
pub async fn detect_http<S: AsyncRead + Unpin>(
    mut stream: S,
    timeout: Duration,
) -> Option<(Protocol, Rewind<S>)> {
    let mut buf = Vec::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Some((Protocol::Http1, Rewind::new(buf, stream)));
        }
        if n == H2_PREFACE.len() {
            return Some((Protocol::Http2, Rewind::new(buf, stream)));
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - buf.len();
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What the start of a TLS stream says about its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// A ClientHello offering these ALPN protocols (empty: no ALPN extension).
    Alpn(Vec<Vec<u8>>),
    /// Not a ClientHello that fits one record (the caller terminates TLS and lets the handshake
    /// judge it).
    Unreadable,
}

/// Reads the ALPN protocols of a TLS ClientHello from the first record in `buf`.
pub fn client_hello_alpn(buf: &[u8]) -> Hello {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 {
        return Hello::Unreadable;
    }
    let record_len = usize::from(buf[3]) << 8 | usize::from(buf[4]);
    let Some(record) = buf.get(5..5 + record_len) else {
        return Hello::Incomplete;
    };
    let parse = || -> Option<Vec<Vec<u8>>> {
        let mut r = R(record);
        if r.u8()? != 1 {
            return None; // not a ClientHello
        }
        let len = r.take(3)?;
        let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
        let mut body = R(r.take(len)?);
        body.take(2 + 32)?; // legacy_version, random
        body.vec8()?; // legacy_session_id
        body.vec16()?; // cipher_suites
        body.vec8()?; // legacy_compression_methods
        if body.0.is_empty() {
            return Some(Vec::new());
        }
        let mut exts = R(body.vec16()?);
        while !exts.0.is_empty() {
            let kind = exts.u16()?;
            let data = exts.vec16()?;
            if kind == 16 {
                let mut list = R(data);
                let mut names = R(list.vec16()?);
                let mut out = Vec::new();
                while !names.0.is_empty() {
                    out.push(names.vec8()?.to_vec());
                }
                return Some(out);
            }
        }
        Some(Vec::new())
    };
    parse().map_or(Hello::Unreadable, Hello::Alpn)
}

/// Reads a TLS stream's first record (at most `timeout`) and returns what its ClientHello
/// offers, with the stream rewound.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    mut stream: S,
    timeout: Duration,
) -> (Hello, Rewind<S>) {
    let mut buf = Vec::with_capacity(2048);
    let deadline = tokio::time::Instant::now() + timeout;
    let hello = loop {
        match client_hello_alpn(&buf) {
            Hello::Incomplete => {}
            h => break h,
        }
        let mut chunk = [0u8; 2048];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Hello::Unreadable,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    (hello, Rewind::new(buf, stream))
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
            (b"get / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"get / HTTP/1.1", None),
            (b"get key\r\n", Some(Protocol::Tcp)),
            (b"\r\nGET /w HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"\r\n\r\n", None),
            (b"\n\nget /w http/1.0\n", Some(Protocol::Http1)),
            (b"\r\nhello world\r\n", Some(Protocol::Tcp)),
            (b"x\x00y", Some(Protocol::Tcp)),
            (b"\x16\x03\x01", Some(Protocol::Tcp)),
            (b"AB /", None),
            (b"AB / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"hello world", None),
            (b"hello world\r\n", Some(Protocol::Tcp)),
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

    /// A real ClientHello (rustls') with and without ALPN, cut at every length.
    #[test]
    fn reads_alpn_from_a_client_hello() {
        fn hello(alpn: &[&[u8]]) -> Vec<u8> {
            let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            let name = rustls::pki_types::ServerName::try_from("example.com").unwrap();
            let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
            let mut out = Vec::new();
            conn.write_tls(&mut out).unwrap();
            out
        }
        let mesh = hello(&[b"istio-h2", b"h2"]);
        assert_eq!(
            client_hello_alpn(&mesh),
            Hello::Alpn(vec![b"istio-h2".to_vec(), b"h2".to_vec()])
        );
        for cut in 0..mesh.len() {
            assert_eq!(client_hello_alpn(&mesh[..cut]), Hello::Incomplete, "{cut}");
        }
        assert_eq!(client_hello_alpn(&hello(&[])), Hello::Alpn(Vec::new()));
        assert_eq!(client_hello_alpn(b"GET / HTTP/1.1\r\n"), Hello::Unreadable);
        let mut broken = mesh.clone();
        broken[5] = 2; // a ServerHello
        assert_eq!(client_hello_alpn(&broken), Hello::Unreadable);
    }

    #[tokio::test]
    async fn declared_http_is_http1_or_http2_never_tcp() {
        let (mut a, b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"hello")
            .await
            .unwrap();
        let (p, _) = detect_http(b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http1);

        let (mut a, b) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, H2_PREFACE)
            .await
            .unwrap();
        let (p, mut s) = detect_http(b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http2);
        drop(a);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, H2_PREFACE);

        let (_a, b) = tokio::io::duplex(64);
        assert!(detect_http(b, Duration::from_millis(20)).await.is_none());
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp() {
        let (_a, b) = tokio::io::duplex(64);
        let (p, _) = detect(b).await;
        assert_eq!(p, Protocol::Tcp);
    }
}
