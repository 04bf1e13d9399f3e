//! Upstream connections of the outbound side: plaintext or mutual TLS, as one type that
//! hyper-util's pooling client can use (it learns from [`Connection`] whether HTTP/2 was
//! negotiated, and then multiplexes requests on one connection).

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// An upstream connection. (Not boxed: connections live in the pool, and most are TLS.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum MeshConn {
    Plain(TokioIo<TcpStream>),
    Tls {
        io: TokioIo<TlsStream<TcpStream>>,
        h2: bool,
    },
}

impl Connection for MeshConn {
    fn connected(&self) -> Connected {
        match self {
            MeshConn::Plain(_) => Connected::new(),
            MeshConn::Tls { h2: true, .. } => Connected::new().negotiated_h2(),
            MeshConn::Tls { .. } => Connected::new(),
        }
    }
}

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshConn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MeshConn::Tls { io, .. } => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshConn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MeshConn::Tls { io, .. } => Pin::new(io).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshConn::Plain(io) => Pin::new(io).poll_flush(cx),
            MeshConn::Tls { io, .. } => Pin::new(io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshConn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MeshConn::Tls { io, .. } => Pin::new(io).poll_shutdown(cx),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MeshConn::Plain(io) => io.is_write_vectored(),
            MeshConn::Tls { io, .. } => io.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshConn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MeshConn::Tls { io, .. } => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }
}
