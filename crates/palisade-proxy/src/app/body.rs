//! A response body read straight off the application's connection. The connection goes back to
//! its pool the moment the body ends cleanly; a body dropped before its end closes it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use super::PoolRef;
use super::h1::{BodyDecoder, Decoded, WireError};

/// Bytes asked of the socket per read while a body streams.
const BODY_READ: usize = 16 * 1024;

/// Why a response body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum AppBodyError {
    #[error("reading the application's response from {addr}: {cause}")]
    Io { addr: SocketAddr, cause: io::Error },
    #[error("the application at {addr} closed the connection before the response body ended")]
    Truncated { addr: SocketAddr },
    #[error("bad response body from the application at {addr}: {cause}")]
    Wire { addr: SocketAddr, cause: WireError },
}

/// The application's response body.
#[derive(Debug, Default)]
pub struct AppBody {
    live: Option<Live>,
}

/// The connection a response body is read from.
#[derive(Debug)]
pub(super) enum Conn {
    /// The whole connection: it may go back to the pool when the body ends.
    Whole(TcpStream),
    /// Its read half only: the request body is still being written (full duplex), or its
    /// writing failed. Closed when the body ends; the upload, if any, is cut then.
    Reading {
        half: OwnedReadHalf,
        /// Held only to be cut when the body ends.
        _upload: Option<Upload>,
    },
}

impl Conn {
    pub(super) fn reading(half: OwnedReadHalf, upload: Option<Upload>) -> Self {
        Conn::Reading {
            half,
            _upload: upload,
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Whole(s) => s,
            Conn::Reading { half, .. } => half.as_ref(),
        }
    }
}

/// A request body being written while its response streams back; cut when dropped (the app
/// has answered in full, or the client went away).
#[derive(Debug)]
pub(super) struct Upload(pub(super) tokio::task::JoinHandle<()>);

impl Drop for Upload {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A body still coming in on its connection.
#[derive(Debug)]
pub(super) struct Live {
    pub(super) stream: Conn,
    /// Bytes read and not yet handed on (the head's leftovers first).
    pub(super) buf: BytesMut,
    pub(super) decoder: BodyDecoder,
    /// The connection may take another request once this body has ended.
    pub(super) reusable: bool,
    pub(super) pool: PoolRef,
    pub(super) addr: SocketAddr,
}

impl AppBody {
    pub(super) fn streaming(live: Live) -> Self {
        AppBody { live: Some(live) }
    }

    /// A body with no bytes (its connection, if any, already went back).
    pub fn empty() -> Self {
        AppBody { live: None }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = AppBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AppBodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(live) = this.live.as_mut() else {
                return Poll::Ready(None);
            };
            let addr = live.addr;
            let step = match live.decoder.decode(&mut live.buf) {
                Ok(Decoded::NeedMore) => {
                    match ready!(poll_fill(live.stream.tcp(), &mut live.buf, cx)) {
                        Ok(0) if live.decoder.ends_at_eof() => {
                            live.reusable = false;
                            Ok(Decoded::End)
                        }
                        Ok(0) => Err(AppBodyError::Truncated { addr }),
                        Ok(_) => continue,
                        Err(cause) => Err(AppBodyError::Io { addr, cause }),
                    }
                }
                decoded => decoded.map_err(|cause| AppBodyError::Wire { addr, cause }),
            };
            match step {
                Ok(Decoded::Data(b)) if b.is_empty() => continue,
                Ok(Decoded::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Ok(Decoded::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Decoded::End | Decoded::NeedMore) => {
                    if let Some(live) = this.live.take() {
                        // Extra bytes after the body: the app is out of step; do not reuse.
                        if live.reusable
                            && live.buf.is_empty()
                            && let Conn::Whole(stream) = live.stream
                        {
                            live.pool.checkin(live.addr, stream);
                        }
                    }
                    return Poll::Ready(None);
                }
                Err(e) => {
                    // The connection is in an unknown state: closed with the body.
                    this.live = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.live.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.live.as_ref() {
            None => SizeHint::with_exact(0),
            Some(l) => l
                .decoder
                .remaining()
                .map_or_else(SizeHint::new, SizeHint::with_exact),
        }
    }
}

/// Reads what the socket has into `buf`'s spare room (made first when short): `Ok(0)` at EOF.
pub(super) fn poll_fill(
    stream: &TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(BODY_READ);
    }
    loop {
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready!(stream.poll_read_ready(cx))?;
            }
            r => return Poll::Ready(r),
        }
    }
}
