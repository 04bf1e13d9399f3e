//! `envoyExtAuthzHttp`: the check is an HTTP request to the authorizer with the original method
//! and `pathPrefix` + path (query included); Host, Content-Length and the headers named by
//! `includeRequestHeadersInCheck` (exact, `prefix*`, `*suffix`) are sent, plus
//! `includeAdditionalHeadersInCheck`, plus the body up to `maxRequestBytes` when configured.
//! A 200 allows (`headersToUpstreamOnAllow` / `headersToDownstreamOnAllow` pick headers of the
//! answer); any other status denies with that status, its body and `headersToDownstreamOnDeny`
//! (all its headers when unset, as Envoy does).

use ::http::header::{HeaderName, HeaderValue};
use ::http::{HeaderMap, Method, Request, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade_policy::mesh::ExtAuthzHttpProvider;

use super::{AllowEffects, Answer, CheckInput, Common, MAX_DENY_BODY, NamePattern, any_match};

/// Headers never copied between the check and the request or response.
const NEVER_COPIED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "proxy-connection",
    "te",
    "trailer",
];

fn copyable(name: &str) -> bool {
    !NEVER_COPIED.contains(&name)
}

/// One HTTP authorizer.
#[derive(Debug, Clone)]
pub struct HttpClient {
    authority: String,
    path_prefix: String,
    include: Vec<NamePattern>,
    additional: Vec<(HeaderName, HeaderValue)>,
    to_upstream: Vec<NamePattern>,
    to_downstream_on_allow: Vec<NamePattern>,
    to_downstream_on_deny: Vec<NamePattern>,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn patterns(list: &[String]) -> Vec<NamePattern> {
    list.iter().map(|s| NamePattern::parse(s)).collect()
}

impl HttpClient {
    pub fn new(p: &ExtAuthzHttpProvider) -> Result<Self, String> {
        let mut additional = Vec::new();
        for (k, v) in &p.include_additional_headers_in_check {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("includeAdditionalHeadersInCheck {k:?}: {e}"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| format!("includeAdditionalHeadersInCheck {k:?}: {e}"))?;
            additional.push((name, value));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(Self {
            authority: super::grpc::authority(&p.service, p.port),
            path_prefix: p
                .path_prefix
                .clone()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_owned(),
            include: patterns(&p.include_request_headers_in_check),
            additional,
            to_upstream: patterns(&p.headers_to_upstream_on_allow),
            to_downstream_on_allow: patterns(&p.headers_to_downstream_on_allow),
            to_downstream_on_deny: patterns(&p.headers_to_downstream_on_deny),
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The check request for one request.
    pub fn check_request(&self, input: &CheckInput<'_>) -> Result<Request<Full<Bytes>>, String> {
        let method = Method::from_bytes(input.method.as_bytes()).map_err(|e| e.to_string())?;
        let uri = format!(
            "http://{}{}{}",
            self.authority, self.path_prefix, input.path
        );
        let body = Bytes::copy_from_slice(input.body.unwrap_or_default());
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(input.host) {
            h.insert(::http::header::HOST, v);
        }
        h.insert(
            ::http::header::CONTENT_LENGTH,
            HeaderValue::from(body.len()),
        );
        for (k, v) in input.headers {
            if copyable(k.as_str()) && any_match(&self.include, k.as_str()) {
                h.append(k.clone(), v.clone());
            }
        }
        for (k, v) in &self.additional {
            h.insert(k.clone(), v.clone());
        }
        if input.body_truncated {
            h.insert(
                "x-envoy-auth-partial-body",
                HeaderValue::from_static("true"),
            );
        }
        Ok(req)
    }

    pub(crate) async fn check(&self, _common: &Common, input: &CheckInput<'_>) -> Answer {
        let req = match self.check_request(input) {
            Ok(r) => r,
            Err(e) => return Answer::Error(e),
        };
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => return Answer::Error(format!("authorizer unreachable: {e}")),
        };
        let (parts, body) = resp.into_parts();
        let body = match read_capped(body, MAX_DENY_BODY).await {
            Ok(b) => b,
            Err(e) => return Answer::Error(format!("reading the authorizer's answer: {e}")),
        };
        self.map_response(parts.status, &parts.headers, body)
    }

    /// Maps the authorizer's answer.
    pub(crate) fn map_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Answer {
        let pick = |pats: &[NamePattern], all_when_empty: bool| -> Vec<(HeaderName, HeaderValue)> {
            headers
                .iter()
                .filter(|(k, _)| {
                    copyable(k.as_str())
                        && ((all_when_empty && pats.is_empty()) || any_match(pats, k.as_str()))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if status == StatusCode::OK {
            Answer::Allow(AllowEffects {
                upstream_set: pick(&self.to_upstream, false),
                upstream_remove: Vec::new(),
                downstream_add: pick(&self.to_downstream_on_allow, false),
            })
        } else {
            Answer::Deny {
                status,
                headers: pick(&self.to_downstream_on_deny, true),
                body,
                reason: format!("denied by the authorizer (HTTP {})", status.as_u16()),
            }
        }
    }
}

/// Reads at most `cap` bytes of a body (the rest is dropped).
async fn read_capped<B>(mut body: B, cap: usize) -> Result<Bytes, String>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= cap {
                break;
            }
        }
    }
    Ok(out.freeze())
}
