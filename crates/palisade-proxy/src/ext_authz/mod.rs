//! CUSTOM authorization: the clients of external authorizers named by a workload's CUSTOM
//! AuthorizationPolicies (MeshConfig `extensionProviders`).
//!
//! - `envoyExtAuthzGrpc`: Envoy's `envoy.service.auth.v3.Authorization/Check` ([`grpc`]).
//! - `envoyExtAuthzHttp`: the original request's method and path (after `pathPrefix`) with the
//!   selected headers, answered 200 to allow ([`http`]).
//!
//! [`ExtAuthz::build`] makes one client per provider when a config is installed (connections are
//! opened lazily and reused). [`ExtAuthz::check`] asks every provider a matching CUSTOM policy
//! names, in order (Palisade allows several per workload; Istio only one): the first denial is
//! the answer, with the authorizer's status, headers and body; allows merge their header edits.
//! A provider that cannot be asked (error, timeout, unknown) is `failOpen` ? allow :
//! `statusOnError` (default 403).
//!
//! TCP connections: one check per connection with the peer identity, `envoyExtAuthzGrpc`
//! providers only, a denial closes the connection ([`network`]).

pub mod body;
pub mod gate;
pub mod grpc;
pub mod http;
pub mod network;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{HeaderName, HeaderValue};
use ::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use palisade_policy::MeshConfig;
use palisade_policy::mesh::ExtensionProvider;

/// Istio's default ext_authz timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The largest denial body passed on to the client.
pub const MAX_DENY_BODY: usize = 64 * 1024;

/// What the check request is built from: the request as the proxy received it.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The peer's SPIFFE URI (`spiffe://...`), mTLS only.
    pub source_principal: Option<&'a str>,
    /// This workload's SPIFFE URI.
    pub destination_principal: Option<&'a str>,
    pub method: &'a str,
    /// Path with query.
    pub path: &'a str,
    pub host: &'a str,
    pub scheme: &'a str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub headers: &'a HeaderMap,
    pub sni: Option<&'a str>,
    /// The buffered request body (at most the provider's `maxRequestBytes`), when one was read.
    pub body: Option<&'a [u8]>,
    /// True when the client sent more than `body` (each provider also cuts `body` at its own
    /// `maxRequestBytes`).
    pub body_truncated: bool,
}

/// Header edits of allowing authorizers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowEffects {
    /// Set (replace) on the request to the app.
    pub upstream_set: Vec<(HeaderName, HeaderValue)>,
    /// Removed from the request to the app.
    pub upstream_remove: Vec<HeaderName>,
    /// Added to the response to the client.
    pub downstream_add: Vec<(HeaderName, HeaderValue)>,
}

impl AllowEffects {
    /// Applies the request edits.
    pub fn apply_upstream(&self, headers: &mut HeaderMap) {
        for h in &self.upstream_remove {
            headers.remove(h);
        }
        for (k, v) in &self.upstream_set {
            headers.insert(k.clone(), v.clone());
        }
    }

    /// Applies the response edits.
    pub fn apply_downstream(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.downstream_add {
            headers.append(k.clone(), v.clone());
        }
    }
}

/// The answer sent to the client when an authorizer denies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The provider that denied, and why (for the RBAC log).
    pub provider: String,
    pub reason: String,
}

/// The outcome of the CUSTOM step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(AllowEffects),
    Deny(DenyResponse),
}

/// One provider's answer before `failOpen` is applied.
#[derive(Debug)]
pub(crate) enum Answer {
    Allow(AllowEffects),
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
        reason: String,
    },
    Error(String),
}

/// Settings every provider kind has.
#[derive(Debug, Clone)]
pub struct Common {
    pub name: String,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: StatusCode,
    /// `includeRequestBodyInCheck.maxRequestBytes` (0: no body).
    pub max_request_bytes: usize,
    pub allow_partial_message: bool,
    pub pack_as_bytes: bool,
}

#[derive(Debug)]
enum Client {
    Grpc(grpc::GrpcClient),
    Http(http::HttpClient),
    /// Configured wrong: every check is an error (fail open or closed as configured).
    Broken(String),
}

#[derive(Debug)]
struct Provider {
    common: Common,
    client: Client,
}

/// The workload's authorizers.
#[derive(Debug, Clone, Default)]
pub struct ExtAuthz {
    providers: HashMap<String, Arc<Provider>>,
}

fn parse_status(s: Option<&str>) -> StatusCode {
    s.and_then(|s| s.trim().parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FORBIDDEN)
}

fn common(p: &ExtensionProvider) -> Option<Common> {
    let (timeout, fail_open, status_on_error, body) =
        match (&p.envoy_ext_authz_grpc, &p.envoy_ext_authz_http) {
            (Some(g), _) => (
                &g.timeout,
                g.fail_open,
                &g.status_on_error,
                &g.include_request_body_in_check,
            ),
            (None, Some(h)) => (
                &h.timeout,
                h.fail_open,
                &h.status_on_error,
                &h.include_request_body_in_check,
            ),
            (None, None) => return None,
        };
    Some(Common {
        name: p.name.clone(),
        timeout: timeout
            .as_deref()
            .and_then(|t| palisade_policy::validate::parse_duration(t).ok())
            .unwrap_or(DEFAULT_TIMEOUT),
        fail_open,
        status_on_error: parse_status(status_on_error.as_deref()),
        max_request_bytes: body.as_ref().map_or(0, |b| b.max_request_bytes as usize),
        allow_partial_message: body.as_ref().is_some_and(|b| b.allow_partial_message),
        pack_as_bytes: body.as_ref().is_some_and(|b| b.pack_as_bytes),
    })
}

impl ExtAuthz {
    /// One client per extension provider of the mesh config. Must run inside a Tokio runtime.
    pub fn build(mesh: &MeshConfig) -> Self {
        let mut providers = HashMap::new();
        for p in &mesh.extension_providers {
            let Some(common) = common(p) else { continue };
            let client = match (&p.envoy_ext_authz_grpc, &p.envoy_ext_authz_http) {
                (Some(g), _) => grpc::GrpcClient::new(&g.service, g.port)
                    .map_or_else(Client::Broken, Client::Grpc),
                (None, Some(h)) => {
                    http::HttpClient::new(h).map_or_else(Client::Broken, Client::Http)
                }
                (None, None) => continue,
            };
            if let Client::Broken(e) = &client {
                tracing::error!(provider = %p.name, error = %e, "ext_authz provider cannot be used");
            }
            providers.insert(p.name.clone(), Arc::new(Provider { common, client }));
        }
        Self { providers }
    }

    /// The largest body any of `names` wants in its check request (0: none).
    pub fn body_bytes_wanted(&self, names: &[&str]) -> usize {
        names
            .iter()
            .filter_map(|n| self.providers.get(*n))
            .map(|p| p.common.max_request_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Asks the providers `names` in order. The first denial wins; allows accumulate.
    pub async fn check(&self, names: &[&str], input: &CheckInput<'_>) -> Decision {
        let mut effects = AllowEffects::default();
        for name in names {
            let Some(p) = self.providers.get(*name) else {
                // Validation keeps this from happening; if it does, fail closed.
                return Decision::Deny(DenyResponse {
                    status: StatusCode::FORBIDDEN,
                    headers: Vec::new(),
                    body: Bytes::new(),
                    provider: (*name).to_owned(),
                    reason: "extension provider is not defined".to_owned(),
                });
            };
            let max = p.common.max_request_bytes;
            let body = input.body.filter(|_| max > 0);
            let truncated = body.is_some_and(|b| input.body_truncated || b.len() > max);
            if truncated && !p.common.allow_partial_message {
                // Envoy's answer to a body over maxRequestBytes without allowPartialMessage.
                return Decision::Deny(DenyResponse {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    headers: Vec::new(),
                    body: Bytes::from_static(b"Payload Too Large"),
                    provider: p.common.name.clone(),
                    reason: format!("request body over maxRequestBytes ({max})"),
                });
            }
            let input = CheckInput {
                body: body.map(|b| &b[..b.len().min(max)]),
                body_truncated: truncated,
                ..*input
            };
            let answer = match &p.client {
                Client::Broken(e) => Answer::Error(e.clone()),
                client => {
                    match tokio::time::timeout(p.common.timeout, ask(client, &p.common, &input))
                        .await
                    {
                        Ok(a) => a,
                        Err(_) => Answer::Error(format!("timed out after {:?}", p.common.timeout)),
                    }
                }
            };
            match answer {
                Answer::Allow(e) => {
                    effects.upstream_remove.extend(e.upstream_remove);
                    effects.upstream_set.extend(e.upstream_set);
                    effects.downstream_add.extend(e.downstream_add);
                }
                Answer::Deny {
                    status,
                    headers,
                    body,
                    reason,
                } => {
                    return Decision::Deny(DenyResponse {
                        status,
                        headers,
                        body,
                        provider: p.common.name.clone(),
                        reason,
                    });
                }
                Answer::Error(e) if p.common.fail_open => {
                    tracing::warn!(provider = %p.common.name, error = %e, "ext_authz failed; failOpen allows the request");
                }
                Answer::Error(e) => {
                    tracing::warn!(provider = %p.common.name, error = %e, "ext_authz failed; request denied");
                    return Decision::Deny(DenyResponse {
                        status: p.common.status_on_error,
                        headers: Vec::new(),
                        body: Bytes::new(),
                        provider: p.common.name.clone(),
                        reason: format!("authorizer error: {e}"),
                    });
                }
            }
        }
        Decision::Allow(effects)
    }
}

async fn ask(client: &Client, common: &Common, input: &CheckInput<'_>) -> Answer {
    match client {
        Client::Grpc(c) => c.check(common, input).await,
        Client::Http(c) => c.check(common, input).await,
        Client::Broken(e) => Answer::Error(e.clone()),
    }
}

/// A header-name pattern of the extension provider options: `abc` exact, `abc*` prefix, `*abc`
/// suffix; names compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl NamePattern {
    pub fn parse(s: &str) -> Self {
        let s = s.trim().to_ascii_lowercase();
        if let Some(p) = s.strip_suffix('*') {
            NamePattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            NamePattern::Suffix(p.to_owned())
        } else {
            NamePattern::Exact(s)
        }
    }

    /// `name` is lowercase (as `http::HeaderName`s are).
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(p) => name == p,
            NamePattern::Prefix(p) => name.starts_with(p.as_str()),
            NamePattern::Suffix(p) => name.ends_with(p.as_str()),
        }
    }
}

pub(crate) fn any_match(patterns: &[NamePattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

#[cfg(test)]
mod tests;
