//! The agent's admin endpoint (HTTP/1.1, loopback by default):
//!
//! - `GET /certs`: [`CertsReport`] as JSON (identity, serial, validity, next rotation).
//! - `GET /metrics`, `/stats/prometheus`, `/stats`: Prometheus text format.
//! - `GET /healthz/ready`: 200 once a valid certificate is served, 503 before.
//!
//! [`fetch_report`] is the client side used by `palisade proxy-config secret`.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};

use crate::manager::{CertStatus, SecretWatch};
use crate::report::CertsReport;

/// Admin endpoint failures (client side).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Could not reach the admin endpoint.
    #[error("cannot reach the agent's admin endpoint at {addr}: {cause}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin request to {addr} failed: {reason}")]
    Http {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The answer is not a certificate report.
    #[error("unexpected answer from {addr}: {reason}")]
    BadAnswer {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct Admin {
    state: SecretWatch,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

type Body = Full<Bytes>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

impl Admin {
    /// An admin endpoint over the manager's state and a metrics registry.
    pub fn new(state: SecretWatch, registry: Arc<Registry>) -> Self {
        Self { state, registry }
    }

    /// Answers one request.
    pub fn handle(&self, method: &Method, path: &str) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET is supported\n",
            );
        }
        match path {
            "/certs" => {
                let report =
                    CertsReport::from_state(&self.state.borrow(), OffsetDateTime::now_utc());
                match serde_json::to_vec_pretty(&report) {
                    Ok(body) => respond(StatusCode::OK, "application/json", body),
                    Err(e) => respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("cannot encode the report: {e}\n"),
                    ),
                }
            }
            "/metrics" | "/stats/prometheus" | "/stats" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(_) => respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "cannot encode metrics\n",
                    ),
                }
            }
            "/healthz/ready" => {
                if self.state.borrow().status == CertStatus::Active {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "no valid workload certificate yet\n",
                    )
                }
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /certs, /metrics, /stats, /healthz/ready\n",
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
                        // Accept errors (e.g. too many open files) are transient; keep serving.
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

/// `GET path` on an admin endpoint; returns the status and body.
pub async fn get(addr: &str, path: &str) -> Result<(StatusCode, Bytes), AdminError> {
    let http_err = |reason: String| AdminError::Http {
        addr: addr.to_owned(),
        reason,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|cause| AdminError::Connect {
            addr: addr.to_owned(),
            cause,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http_err(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header(header::HOST, addr)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| http_err(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http_err(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http_err(e.to_string()))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// Reads `/certs` from an agent.
pub async fn fetch_report(addr: &str) -> Result<CertsReport, AdminError> {
    let (status, body) = get(addr, "/certs").await?;
    if !status.is_success() {
        return Err(AdminError::BadAnswer {
            addr: addr.to_owned(),
            reason: format!("HTTP {status}"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| AdminError::BadAnswer {
        addr: addr.to_owned(),
        reason: format!("not a certificate report: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::manager::{ManagerConfig, SecretState};
    use crate::metrics::AgentMetrics;
    use crate::source::{CertificateSource, FetchError, Issued};
    use crate::test_ca::TestCa;

    struct Once(TestCa);

    impl CertificateSource for Once {
        fn fetch(&self) -> impl Future<Output = Result<Issued, FetchError>> + Send {
            let issued = self.0.issue(
                "spiffe://cluster.local/ns/demo/sa/client",
                Duration::from_secs(3600),
            );
            async move { Ok(issued) }
        }
    }

    #[tokio::test]
    async fn serves_certs_metrics_and_readiness_over_http() {
        let metrics = AgentMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.failure("connect");

        // Before any certificate: not ready, WARMING.
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(SecretState {
            svid: None,
            roots: vec![],
            status: CertStatus::Pending,
            next_attempt: None,
            last_error: None,
            consecutive_failures: 0,
            issued: 0,
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(Admin::new(rx, Arc::new(registry)).serve(listener, async {
            let _ = stopped.await;
        }));

        let (status, _) = get(&addr, "/healthz/ready").await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            fetch_report(&addr).await.unwrap().secrets[0].status,
            "WARMING"
        );

        // With a certificate from a running manager.
        let handle = crate::manager::spawn(
            Once(TestCa::new()),
            vec![],
            ManagerConfig::default(),
            metrics.clone(),
        );
        let mut state = handle.subscribe();
        let current = state.wait_for(|s| s.issued == 1).await.unwrap().clone();
        tx.send_replace(current.clone());

        let report = fetch_report(&addr).await.unwrap();
        assert_eq!(
            report.identity.as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/client")
        );
        let leaf = current.svid.as_ref().unwrap().leaf_info();
        assert_eq!(
            report.secrets[0].serial_number.as_deref(),
            Some(crate::report::envoy_serial(&leaf.serial).as_str())
        );
        assert!(report.next_rotation.is_some());
        let (status, _) = get(&addr, "/healthz/ready").await.unwrap();
        assert_eq!(status, StatusCode::OK);

        let (status, body) = get(&addr, "/metrics").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let expiry = leaf.not_after.unix_timestamp();
        assert!(
            text.lines().any(
                |l| l.starts_with("palisade_agent_cert_expiry_timestamp_seconds ")
                    && l.contains(&expiry.to_string())
            ),
            "{text}"
        );
        assert!(
            text.contains("palisade_agent_cert_failures_total{reason=\"connect\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("palisade_agent_certs_issued_total 1"),
            "{text}"
        );
        let (_, stats) = get(&addr, "/stats").await.unwrap();
        assert_eq!(stats, body);

        let (status, _) = get(&addr, "/nope").await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_admin_is_a_clear_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let err = fetch_report(&addr).await.unwrap_err().to_string();
        assert!(err.contains(&addr) && err.contains("cannot reach"), "{err}");
    }
}
