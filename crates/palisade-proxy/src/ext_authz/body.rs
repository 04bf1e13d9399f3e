//! The request body the proxy forwards to the app, and its buffering for authorizers that want
//! the body (`includeRequestBodyInCheck`).
//!
//! The usual request streams: [`RequestBody::Streaming`] wraps hyper's body and adds nothing.
//! Only when a CUSTOM provider that applies asks for the body does [`buffer`] read up to
//! `maxRequestBytes` (plus at most one frame) into memory; the app then gets those bytes
//! followed by whatever the client still sends, so it always receives the whole body unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The body of a request forwarded to the app.
#[derive(Debug)]
pub enum RequestBody {
    /// Straight from the client (no authorizer wanted the body).
    Streaming(Incoming),
    /// The head read for the authorizers, then the rest of the client's body.
    Buffered(Buffered),
}

/// The part of a body read ahead, and what remains.
#[derive(Debug, Default)]
pub struct Buffered {
    head: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
}

impl RequestBody {
    /// The bytes read ahead, when [`buffer`] ran.
    pub fn head(&self) -> Option<&[u8]> {
        match self {
            RequestBody::Streaming(_) => None,
            RequestBody::Buffered(b) => Some(b.head.as_deref().unwrap_or_default()),
        }
    }

    /// True when the client sent more than the bytes read ahead.
    pub fn has_more(&self) -> bool {
        match self {
            RequestBody::Streaming(b) => !b.is_end_stream(),
            RequestBody::Buffered(b) => b.rest.as_ref().is_some_and(|r| !r.is_end_stream()),
        }
    }
}

/// Reads `body` until it ends or more than `max` bytes are in hand (so an oversized body is
/// known as such). Only the first `max` bytes go to the authorizers; all of them go to the app.
pub async fn buffer(mut body: Incoming, max: usize) -> Result<RequestBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(RequestBody::Buffered(Buffered::default()));
    }
    let cap = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
        .min(max.saturating_add(1));
    let mut head = BytesMut::with_capacity(cap);
    let mut trailers = None;
    let mut ended = false;
    while head.len() <= max {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(frame) => match frame?.into_data() {
                Ok(data) => head.extend_from_slice(&data),
                Err(frame) => {
                    // Trailers end the body.
                    trailers = frame.into_trailers().ok();
                    ended = true;
                    break;
                }
            },
        }
    }
    Ok(RequestBody::Buffered(Buffered {
        head: Some(head.freeze()).filter(|h| !h.is_empty()),
        trailers,
        rest: (!ended).then_some(body),
    }))
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Buffered(b) => {
                if let Some(h) = b.head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                if let Some(t) = b.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                match &mut b.rest {
                    Some(r) => Pin::new(r).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(b) => b.is_end_stream(),
            RequestBody::Buffered(b) => {
                b.head.is_none()
                    && b.trailers.is_none()
                    && b.rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(b) => b.size_hint(),
            RequestBody::Buffered(b) => {
                let head = b.head.as_ref().map_or(0, |h| h.len() as u64);
                let rest = b
                    .rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(head));
                if let Some(u) = rest.upper() {
                    hint.set_upper(u.saturating_add(head));
                }
                hint
            }
        }
    }
}
