//! gRPC clients get the proxy's own refusals as gRPC statuses, as Envoy converts its local
//! replies for them: HTTP 200, `content-type: application/grpc`, and the status in
//! `grpc-status` / `grpc-message` with no body (a trailers-only response). A bare 403 would
//! reach a gRPC client as an opaque transport error instead of PERMISSION_DENIED.

use bytes::Bytes;
use futures::FutureExt as _;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt as _;

use crate::body::Body;

/// Whether a request is gRPC (`content-type: application/grpc` or `application/grpc+...`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim_start();
            v.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
                && v[16..].chars().next().is_none_or(|c| c == '+' || c == ';')
        })
}

/// The gRPC status for an HTTP status, as gRPC's HTTP mapping (and Envoy) has it.
pub fn status_for(http: StatusCode) -> u8 {
    match http.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded outside printable ASCII (and `%` itself).
fn encode_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The proxy's own response `resp` (its body is in memory) as a trailers-only gRPC response.
pub fn local_reply(mut resp: Response<Body>) -> Response<Body> {
    let text = resp
        .body_mut()
        .frame()
        .now_or_never()
        .flatten()
        .and_then(Result::ok)
        .and_then(|f| f.into_data().ok())
        .unwrap_or_default();
    let message = encode_message(&String::from_utf8_lossy(&text));
    let status = status_for(resp.status());
    let mut headers = std::mem::take(resp.headers_mut());
    headers.remove(CONTENT_LENGTH);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(u16::from(status)));
    if let Ok(v) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", v);
    }
    let mut out = Response::new(Body::local(Bytes::new()));
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grpc_requests_are_recognised_by_content_type() {
        let table = [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("application/json", false),
        ];
        for (ct, want) in table {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), want, "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn refusals_become_trailers_only_grpc_responses() {
        let mut denied =
            crate::inbound::text_response(StatusCode::FORBIDDEN, "RBAC: access denied");
        denied
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        let r = local_reply(denied);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["grpc-message"], "RBAC: access denied");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let r = local_reply(crate::inbound::text_response(
            StatusCode::UNAUTHORIZED,
            "Jwt is missing\n",
        ));
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(r.headers()["grpc-message"], "Jwt is missing");
        assert_eq!(encode_message("50% é"), "50%25 %C3%A9");
        assert_eq!(status_for(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(status_for(StatusCode::IM_A_TEAPOT), 2);
    }
}
