//! The admin endpoint: `/stats` (Prometheus text), `/config_dump` (JSON, key material
//! redacted), `/certs` (JSON), `POST /logging?rbac=debug|info` (RBAC decision logging at run
//! time), `/ready` (`LIVE` once the proxy has its certificate and config and its listeners are
//! open).
//!
//! As in Envoy, every endpoint that changes state takes POST only: a GET (which a browser
//! fetches for any page that links to it) gets 405 and changes nothing. The endpoint listens on
//! loopback unless told otherwise.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::Shared;
use crate::authz::{RBAC_DEBUG, RBAC_INFO};

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/stats" | "/metrics" | "/stats/prometheus" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &shared.registry) {
                Ok(()) => respond(StatusCode::OK, "text/plain; version=0.0.4", out),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/ready" => {
            if shared.ready.load(Ordering::SeqCst) {
                respond(StatusCode::OK, "text/plain", "LIVE\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "PRE_INITIALIZING\n".into(),
                )
            }
        }
        "/config_dump" => respond(
            StatusCode::OK,
            "application/json",
            config_dump(shared).to_string(),
        ),
        "/certs" => respond(
            StatusCode::OK,
            "application/json",
            certs(shared).to_string(),
        ),
        "/logging" => {
            if req.method() != http::Method::POST {
                return post_required(req.method());
            }
            logging(shared, req.uri().query().unwrap_or(""))
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /stats /config_dump /certs /ready, POST /logging?rbac=debug|info\n".into(),
        ),
    }
}

/// 405 for a mutating endpoint reached with another method than POST.
fn post_required(method: &http::Method) -> Response<Full<Bytes>> {
    let mut r = respond(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        format!("method {method} not allowed: this endpoint changes state, use POST\n"),
    );
    r.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
    r
}

fn logging(shared: &Shared, query: &str) -> Response<Full<Bytes>> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (k, v) {
            ("rbac", "debug" | "trace") => shared.rbac_log.set(RBAC_DEBUG),
            ("rbac", "info" | "warning" | "error" | "off") => shared.rbac_log.set(RBAC_INFO),
            _ => {
                return respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown logger or level {pair:?}: use rbac=debug or rbac=info\n"),
                );
            }
        }
    }
    // POST without a query only lists the levels.
    if !query.is_empty() {
        tracing::info!(rbac = shared.rbac_log.name(), "log levels changed");
    }
    respond(
        StatusCode::OK,
        "text/plain",
        format!("active loggers:\n  rbac: {}\n", shared.rbac_log.name()),
    )
}

fn config_dump(shared: &Shared) -> serde_json::Value {
    let Some(cfg) = shared.config.load_full() else {
        return json!({ "workload": shared.options.workload, "config": null });
    };
    let policy = &cfg.policy;
    let policies: Vec<_> = policy
        .policies()
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "action": p.action.as_str(), "dryRun": p.dry_run,
                "scope": p.scope, "rules": p.rule_count,
            })
        })
        .collect();
    let bound = shared
        .inbound_bound
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    // In capture mode every port comes through the capture listener, to the application at the
    // workload's address (see `inbound::app_target`).
    let capture = shared.options.capture;
    json!({
        "workload": cfg.workload,
        "version": cfg.version,
        "address": cfg.address.to_string(),
        "mtls": policy.mtls(),
        "inbound": cfg.inbound.iter().map(|p| json!({
            "name": p.name, "port": p.port,
            "listen": match capture {
                Some(c) => format!("capture port {}", c.inbound),
                None => p.listen.to_string(),
            },
            "app": match capture {
                Some(_) => std::net::SocketAddr::new(cfg.address, p.port).to_string(),
                None => p.app.to_string(),
            },
            "mode": policy.mtls().for_port(p.port).mode.as_str(),
            "bound": capture.is_some() || bound.contains(&p.listen),
        })).collect::<Vec<_>>(),
        "capture": capture.map(|c| json!({
            "inboundPort": c.inbound,
            "outboundPort": c.outbound,
            "outboundTrafficPolicy": cfg.outbound_mode.as_str(),
        })),
        // Mesh DNS: where unknown names go, and every name this sidecar answers.
        "dns": shared.options.dns.as_ref().map(|d| json!({
            "upstreams": d.upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "names": cfg.dns.entries().into_iter().map(|(name, a)| {
                let addrs: Vec<String> = a.v4.iter().map(ToString::to_string)
                    .chain(a.v6.iter().map(ToString::to_string)).collect();
                (name.to_owned(), json!(addrs))
            }).collect::<serde_json::Map<_, _>>(),
        })),
        "authorizationPolicies": policies,
        "routes": cfg.route_keys(),
        // What the control plane pushed, with key material redacted.
        "pushed": cfg.wire.redacted(),
    })
}

fn certs(shared: &Shared) -> serde_json::Value {
    let Some(m) = shared.certs.material() else {
        return json!({ "certificates": [] });
    };
    let leaf = m.svid.leaf_info();
    let roots: Vec<_> = m
        .roots
        .iter()
        .filter_map(|r| palisade_identity::CertInfo::parse(r).ok())
        .map(|r| json!({ "serial_number": r.serial, "subject": r.subject }))
        .collect();
    json!({
        "certificates": [{
            "identity": m.svid.spiffe_id().to_string(),
            "serial_number": leaf.serial,
            "not_before": leaf.not_before.to_string(),
            "not_after": leaf.not_after.to_string(),
            "chain_length": m.svid.chain().len(),
        }],
        "roots": roots,
    })
}
