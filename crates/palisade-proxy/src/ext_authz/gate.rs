//! The inbound HTTP steps before DENY/ALLOW: CUSTOM (ask the external authorizers a matching
//! CUSTOM policy names), then JWT authentication. [`check`] either refuses the request with the
//! answer the client gets, or returns a [`Gate`] whose claims feed the policy engine and whose
//! header edits are applied to the request and response.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde_json::Value;

use super::body::{RequestBody, buffer};
use super::{AllowEffects, CheckInput, Decision};
use crate::config::ProxyConfig;
use crate::inbound::{Body, ConnInfo, Headers, host_of};
use crate::jwt;

/// What passed: the validated token (if any) and the authorizers' header edits.
#[derive(Debug, Default)]
pub struct Gate {
    pub jwt: Option<Box<jwt::Verified>>,
    pub effects: Option<AllowEffects>,
}

impl Gate {
    /// The validated claims, for `RequestContext::jwt`.
    pub fn claims(&self) -> Option<&Value> {
        self.jwt.as_ref().map(|v| &v.claims)
    }

    /// Request edits before forwarding to the app: output headers only the proxy may set, the
    /// JWT rule's outputs (and the token stripped unless forwarded), the authorizers' headers.
    pub fn apply_upstream<B>(&self, cfg: &ProxyConfig, req: &mut Request<B>) {
        if !cfg.jwt.is_empty() {
            cfg.jwt.strip_output_headers(req.headers_mut());
            if let Some(v) = &self.jwt {
                let query = req.uri().query().map(str::to_owned);
                if let Some(q) = cfg.jwt.apply(v, req.headers_mut(), query.as_deref()) {
                    let path = req.uri().path();
                    let pq = if q.is_empty() {
                        path.to_owned()
                    } else {
                        format!("{path}?{q}")
                    };
                    let mut parts = req.uri().clone().into_parts();
                    if let Ok(pq) = pq.parse() {
                        parts.path_and_query = Some(pq);
                        if let Ok(u) = http::Uri::from_parts(parts) {
                            *req.uri_mut() = u;
                        }
                    }
                }
            }
        }
        if let Some(e) = &self.effects {
            e.apply_upstream(req.headers_mut());
        }
    }

    /// Response edits (`headersToDownstreamOnAllow`, `response_headers_to_add`).
    pub fn apply_downstream(&self, headers: &mut http::HeaderMap) {
        if let Some(e) = &self.effects {
            e.apply_downstream(headers);
        }
    }
}

fn response(
    status: StatusCode,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    body: Bytes,
) -> Response<Body> {
    let mut resp = Response::new(Body::local(body));
    *resp.status_mut() = status;
    for (k, v) in headers {
        resp.headers_mut().append(k, v);
    }
    resp
}

/// The providers of the CUSTOM policies that match the request, in order.
fn custom_providers<B>(cfg: &ProxyConfig, info: &ConnInfo, req: &Request<B>) -> Vec<String> {
    let headers = Headers(req.headers());
    let ctx = info.request_context(req, &headers, None, cfg.wire.mesh.num_trusted_proxies());
    // A bad request (400) is answered by the authorization step that follows.
    cfg.policy
        .evaluate(&ctx)
        .map(|v| v.custom.iter().map(|s| (*s).to_owned()).collect())
        .unwrap_or_default()
}

/// Asks the providers `names`; `Err` is the denial to send.
async fn custom(
    shared: &crate::Shared,
    cfg: &ProxyConfig,
    info: &ConnInfo,
    req: &Request<RequestBody>,
    names: &[&str],
) -> Result<AllowEffects, Response<Body>> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let source_uri = info.principal.as_ref().map(|p| format!("spiffe://{p}"));
    let own = shared.certs.tls().map(|s| s.own_id.to_string());
    let input = CheckInput {
        source: info.source,
        destination: std::net::SocketAddr::new(info.local_ip, info.port),
        source_principal: source_uri.as_deref(),
        destination_principal: own.as_deref(),
        method: req.method().as_str(),
        path,
        host: host_of(req),
        scheme: "http",
        protocol: if req.version() == http::Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        headers: req.headers(),
        sni: info.sni.as_deref(),
        body: req.body().head(),
        body_truncated: req.body().has_more(),
    };
    match cfg.ext_authz.check(names, &input).await {
        Decision::Allow(e) => Ok(e),
        Decision::Deny(d) => {
            tracing::info!(
                target: "palisade::rbac",
                workload = %cfg.workload,
                port = info.port,
                principal = info.principal.as_deref().unwrap_or("-"),
                method = %req.method(),
                path,
                provider = %d.provider,
                status = d.status.as_u16(),
                reason = %d.reason,
                "enforced denied by CUSTOM provider {}",
                d.provider
            );
            Err(response(d.status, d.headers, d.body))
        }
    }
}

/// Reads the body ahead when an authorizer wants it: `req` keeps the whole body for the app.
async fn read_ahead(req: &mut Request<RequestBody>, max: usize) -> Result<(), hyper::Error> {
    let placeholder = RequestBody::Buffered(super::body::Buffered::default());
    if let RequestBody::Streaming(b) = std::mem::replace(req.body_mut(), placeholder) {
        *req.body_mut() = buffer(b, max).await?;
    }
    Ok(())
}

/// CUSTOM, then JWT. `Err` is the answer to send instead of forwarding. When a provider that
/// applies wants the body, it is read ahead here (see [`super::body`]).
pub async fn check(
    shared: &crate::Shared,
    cfg: &ProxyConfig,
    info: &ConnInfo,
    req: &mut Request<RequestBody>,
) -> Result<Gate, Response<Body>> {
    let mut gate = Gate::default();
    if !cfg.policy.providers().is_empty() {
        let names = custom_providers(cfg, info, req);
        if !names.is_empty() {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let wanted = cfg.ext_authz.body_bytes_wanted(&refs);
            // Both futures are large and rarely taken: boxed, they stay out of the per-request
            // future, which the HTTP/2 server moves into a new task for every stream.
            if wanted > 0
                && let Err(e) = Box::pin(read_ahead(req, wanted)).await
            {
                tracing::debug!(error = %e, "reading the request body for ext_authz failed");
                return Err(response(
                    StatusCode::BAD_REQUEST,
                    Vec::new(),
                    Bytes::from_static(b"Bad Request"),
                ));
            }
            gate.effects = Some(Box::pin(custom(shared, cfg, info, req, &refs)).await?);
        }
    }
    let req = &*req;
    let outcome = cfg.jwt.authenticate(req.headers(), req.uri().query());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let host = host_of(req);
    match outcome {
        jwt::Outcome::NoToken => {}
        jwt::Outcome::Valid(v) => gate.jwt = Some(v),
        jwt::Outcome::Invalid(f) => {
            let (status, www, body) = jwt::deny_parts(f, host, path);
            tracing::info!(
                target: "palisade::rbac",
                workload = %cfg.workload,
                port = info.port,
                principal = info.principal.as_deref().unwrap_or("-"),
                method = %req.method(),
                path,
                status = status.as_u16(),
                "JWT authentication failed: {body}"
            );
            let headers = www
                .map(|v| (http::header::WWW_AUTHENTICATE, v))
                .into_iter()
                .collect();
            return Err(response(status, headers, Bytes::from(body)));
        }
    }
    Ok(gate)
}
