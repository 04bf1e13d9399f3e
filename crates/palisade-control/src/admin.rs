//! The control plane's admin endpoint (HTTP/1.1, loopback by default, istiod's monitoring port
//! 15014): `GET /metrics` (also `/stats/prometheus`) in the Prometheus text format, with the
//! CA's `palisade_ca_*` and the config side's `palisade_control_*` (see [`crate::metrics`]);
//! `GET /debug/syncz`: the connected proxies as JSON (see [`crate::proxies`]).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The admin endpoint over a metrics registry; cheap to clone.
#[derive(Clone)]
pub struct AdminServer {
    registry: Arc<Registry>,
    proxies: crate::ProxyRegistry,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer").finish_non_exhaustive()
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

impl AdminServer {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            proxies: crate::ProxyRegistry::new(),
        }
    }

    /// Serves `proxies` on `/debug/syncz`.
    pub fn with_proxies(mut self, proxies: crate::ProxyRegistry) -> Self {
        self.proxies = proxies;
        self
    }

    /// Answers one request.
    pub fn handle(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            let mut resp = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET is supported\n",
            );
            resp.headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match path {
            "/metrics" | "/stats/prometheus" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                crate::metrics::render(&self.registry),
            ),
            "/debug/syncz" => match serde_json::to_vec_pretty(&self.proxies.list()) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            },
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /metrics or /debug/syncz\n",
            ),
        }
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown` completes.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = admin.handle(req.method(), req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    #[tokio::test]
    async fn serves_metrics_on_get_only() {
        let mut registry = Registry::default();
        let m = crate::metrics::ControlMetrics::register(&mut registry);
        m.config_pushes.inc();
        let admin = AdminServer::new(Arc::new(registry));
        let resp = admin.handle(&Method::GET, "/metrics");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("palisade_control_config_pushes_total 1"),
            "{text}"
        );
        assert_eq!(
            admin.handle(&Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            admin.handle(&Method::GET, "/other").status(),
            StatusCode::NOT_FOUND
        );
    }
}
