//! The HTTP side (`envoyExtAuthzHttp`): every request is a check of the request it describes
//! (method, path, Host and the headers the proxy chose to send); 200 allows, anything else
//! denies with the policy's status, headers and body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::{RegoAuthorizer, input_from_attributes};

/// The largest check body read.
const MAX_BODY: usize = 1024 * 1024;

/// The HTTP check request as the Rego `input`, in the same shape as a gRPC check.
pub fn input(
    parts: &http::request::Parts,
    body: &[u8],
    peer: SocketAddr,
    local: SocketAddr,
) -> Value {
    let mut headers = Map::new();
    for (k, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(Value::String(s)) => {
                s.push(',');
                s.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_owned(), Value::String(v));
            }
        }
    }
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    input_from_attributes(json!({
        "source": {"address": {"socketAddress": {"address": peer.ip().to_string(), "portValue": peer.port()}}},
        "destination": {"address": {"socketAddress": {"address": local.ip().to_string(), "portValue": local.port()}}},
        "request": {"http": {
            "method": parts.method.as_str(),
            "path": path,
            "host": host,
            "headers": headers,
            "protocol": format!("{:?}", parts.version),
            "size": body.len().to_string(),
            "body": String::from_utf8_lossy(body),
        }},
    }))
}

async fn check(
    authz: &RegoAuthorizer,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "check body too large"),
    };
    let input = input(&parts, &body, peer, local);
    let decision = match authz.decide(&input) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "policy evaluation failed");
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "policy evaluation failed",
            );
        }
    };
    tracing::info!(allowed = decision.allowed, method = %parts.method, path = %parts.uri, "HTTP check");
    let (status, body) = if decision.allowed {
        (StatusCode::OK, String::new())
    } else {
        (
            decision
                .http_status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::FORBIDDEN),
            decision.body.clone(),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let extra = decision.headers.iter().chain(if decision.allowed {
        decision.response_headers_to_add.iter()
    } else {
        Default::default()
    });
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    resp
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Serves HTTP checks on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    authz: Arc<RegoAuthorizer>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => r?,
            () = &mut shutdown => return Ok(()),
        };
        let authz = Arc::clone(&authz);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let authz = Arc::clone(&authz);
                async move { Ok::<_, Infallible>(check(&authz, req, peer, local).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
