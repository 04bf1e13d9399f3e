//! The response bodies the proxy hands back downstream: another workload's (read by hyper), the
//! application's (read by [`crate::app`]), or one the proxy wrote itself (a refusal, an error).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::app::AppBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub enum Body {
    /// From another workload through its sidecar.
    Upstream(Incoming),
    /// From the local application.
    App(AppBody),
    /// Written by the proxy.
    Local(Full<Bytes>),
}

impl Body {
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        Body::Local(Full::new(bytes.into()))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        fn boxed<E: Into<BoxError>>(
            p: Poll<Option<Result<Frame<Bytes>, E>>>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            p.map(|o| o.map(|r| r.map_err(Into::into)))
        }
        match self.get_mut() {
            Body::Upstream(b) => boxed(Pin::new(b).poll_frame(cx)),
            Body::App(b) => boxed(Pin::new(b).poll_frame(cx)),
            Body::Local(b) => boxed(Pin::new(b).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Upstream(b) => b.is_end_stream(),
            Body::App(b) => b.is_end_stream(),
            Body::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Upstream(b) => b.size_hint(),
            Body::App(b) => b.size_hint(),
            Body::Local(b) => b.size_hint(),
        }
    }
}
