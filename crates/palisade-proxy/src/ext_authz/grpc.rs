//! `envoyExtAuthzGrpc`: Envoy's `envoy.service.auth.v3.Authorization/Check` over HTTP/2.
//!
//! The check request carries what Envoy's does: source and destination address and principal,
//! the HTTP request (id, method, path with query, host, scheme, protocol, size, every header with
//! the `:method`/`:path`/`:authority`/`:scheme` pseudo-headers, the body when configured), the
//! time and the TLS SNI.

use std::collections::HashMap;
use std::time::SystemTime;

use ::http::StatusCode;
use ::http::header::{HeaderName, HeaderValue};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValueOption, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::Timestamp;
use tonic::transport::{Channel, Endpoint};

use super::{AllowEffects, Answer, CheckInput, Common, MAX_DENY_BODY};

/// A lazily connected, reused channel to one authorizer.
/// The channel is made on first use, inside the runtime (config builds may run outside one).
#[derive(Debug)]
pub struct GrpcClient {
    endpoint: Endpoint,
    channel: std::sync::OnceLock<Channel>,
}

/// `host:port` as a URI authority (IPv6 literals bracketed).
pub(crate) fn authority(service: &str, port: u32) -> String {
    if service.contains(':') && !service.starts_with('[') {
        format!("[{service}]:{port}")
    } else {
        format!("{service}:{port}")
    }
}

impl GrpcClient {
    pub fn new(service: &str, port: u32) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(format!("http://{}", authority(service, port)))
            .map_err(|e| format!("bad service address {service:?}:{port}: {e}"))?
            .tcp_nodelay(true);
        Ok(Self {
            endpoint,
            channel: std::sync::OnceLock::new(),
        })
    }

    pub(crate) async fn check(&self, common: &Common, input: &CheckInput<'_>) -> Answer {
        self.send(common, check_request(common, input)).await
    }

    /// Sends a prepared check request (an HTTP request's, or a TCP connection's from
    /// [`super::network`]).
    pub(crate) async fn send(&self, common: &Common, check: CheckRequest) -> Answer {
        let channel = self
            .channel
            .get_or_init(|| self.endpoint.connect_lazy())
            .clone();
        let mut client = AuthorizationClient::new(channel);
        let mut req = tonic::Request::new(check);
        req.set_timeout(common.timeout);
        match client.check(req).await {
            Ok(resp) => map_response(resp.into_inner()),
            Err(status) => Answer::Error(format!("gRPC {:?}: {}", status.code(), status.message())),
        }
    }
}

pub(crate) fn socket_address(a: std::net::SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..SocketAddress::default()
        })),
    }
}

/// Headers as Envoy puts them in `HttpRequest.headers`: lowercase names, repeated values joined
/// with `,`, plus the HTTP/2 pseudo-headers.
pub fn header_map(input: &CheckInput<'_>) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::with_capacity(input.headers.keys_len() + 4);
    for (k, v) in input.headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        out.entry(k.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    out.insert(":authority".into(), input.host.to_owned());
    out.insert(":method".into(), input.method.to_owned());
    out.insert(":path".into(), input.path.to_owned());
    out.insert(":scheme".into(), input.scheme.to_owned());
    out
}

/// The `CheckRequest` for one request.
pub fn check_request(common: &Common, input: &CheckInput<'_>) -> CheckRequest {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let size = input
        .headers
        .get(::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    let id = input
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (body, raw_body) = match input.body {
        Some(b) if common.pack_as_bytes => (String::new(), b.to_vec()),
        Some(b) => (String::from_utf8_lossy(b).into_owned(), Vec::new()),
        None => (String::new(), Vec::new()),
    };
    let mut headers = header_map(input);
    if input.body_truncated {
        // Envoy marks a body cut at maxRequestBytes.
        headers.insert("x-envoy-auth-partial-body".into(), "true".into());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(socket_address(input.source)),
                principal: input.source_principal.unwrap_or_default().to_owned(),
                ..Peer::default()
            }),
            destination: Some(Peer {
                address: Some(socket_address(input.destination)),
                principal: input.destination_principal.unwrap_or_default().to_owned(),
                ..Peer::default()
            }),
            request: Some(Request {
                time: Some(Timestamp {
                    seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                }),
                http: Some(HttpRequest {
                    id,
                    method: input.method.to_owned(),
                    headers,
                    path: input.path.to_owned(),
                    host: input.host.to_owned(),
                    scheme: input.scheme.to_owned(),
                    size,
                    protocol: input.protocol.to_owned(),
                    body,
                    raw_body,
                    ..HttpRequest::default()
                }),
            }),
            tls_session: input.sni.map(|s| TlsSession { sni: s.to_owned() }),
            ..AttributeContext::default()
        }),
    }
}

fn header_pairs(options: &[HeaderValueOption]) -> Vec<(HeaderName, HeaderValue)> {
    options
        .iter()
        .filter_map(|o| o.header.as_ref())
        .filter_map(|h| {
            let value = if h.value.is_empty() && !h.raw_value.is_empty() {
                HeaderValue::from_bytes(&h.raw_value).ok()?
            } else {
                HeaderValue::from_str(&h.value).ok()?
            };
            Some((HeaderName::from_bytes(h.key.as_bytes()).ok()?, value))
        })
        .collect()
}

/// Maps the authorizer's answer: OK allows with its header edits; anything else denies with the
/// denied response's status (403 when unset), headers and body; an error response is an error.
pub(crate) fn map_response(resp: CheckResponse) -> Answer {
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    let message = resp
        .status
        .as_ref()
        .map(|s| s.message.clone())
        .unwrap_or_default();
    match (code, resp.http_response) {
        (_, Some(HttpResponse::ErrorResponse(e))) => Answer::Error(format!(
            "authorizer error response (status {})",
            e.status.map_or(0, |s| s.code)
        )),
        (0, ok) => {
            let mut effects = AllowEffects::default();
            if let Some(HttpResponse::OkResponse(ok)) = ok {
                effects.upstream_set = header_pairs(&ok.headers);
                effects.upstream_remove = ok
                    .headers_to_remove
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect();
                effects.downstream_add = header_pairs(&ok.response_headers_to_add);
            }
            Answer::Allow(effects)
        }
        (code, denied) => {
            let (status, headers, body) = match denied {
                Some(HttpResponse::DeniedResponse(d)) => {
                    let status = d
                        .status
                        .and_then(|s| u16::try_from(s.code).ok())
                        .filter(|c| *c > 0)
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .unwrap_or(StatusCode::FORBIDDEN);
                    let mut body = d.body.into_bytes();
                    body.truncate(MAX_DENY_BODY);
                    (status, header_pairs(&d.headers), Bytes::from(body))
                }
                _ => (StatusCode::FORBIDDEN, Vec::new(), Bytes::new()),
            };
            Answer::Deny {
                status,
                headers,
                body,
                reason: format!(
                    "denied by the authorizer (gRPC code {code}{}{message})",
                    if message.is_empty() { "" } else { ": " }
                ),
            }
        }
    }
}
