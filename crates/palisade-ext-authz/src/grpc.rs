//! The gRPC side: `envoy.service.auth.v3.Authorization/Check`.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValue, HeaderValueOption, address, socket_address,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::{Decision, RegoAuthorizer, input_from_attributes};

/// gRPC codes used in answers.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;

fn address_json(a: Option<&Address>) -> Value {
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            let port = match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            json!({"socketAddress": {"address": s.address, "portValue": port}})
        }
        _ => Value::Null,
    }
}

fn peer_json(p: Option<&Peer>) -> Value {
    match p {
        Some(p) => json!({
            "address": address_json(p.address.as_ref()),
            "principal": p.principal,
            "service": p.service,
            "labels": p.labels,
        }),
        None => Value::Null,
    }
}

/// The check request as the Rego `input` (protobuf JSON field names).
pub fn input(req: &CheckRequest) -> Value {
    let Some(a) = &req.attributes else {
        return input_from_attributes(json!({}));
    };
    let http = a.request.as_ref().and_then(|r| r.http.as_ref());
    let http_json = match http {
        Some(h) => json!({
            "id": h.id,
            "method": h.method,
            "headers": h.headers,
            "path": h.path,
            "host": h.host,
            "scheme": h.scheme,
            "protocol": h.protocol,
            "size": h.size.to_string(),
            "body": h.body,
        }),
        None => Value::Null,
    };
    let time = a.request.as_ref().and_then(|r| r.time.as_ref()).map_or(
        Value::Null,
        |t| json!({"seconds": t.seconds, "nanos": t.nanos}),
    );
    input_from_attributes(json!({
        "source": peer_json(a.source.as_ref()),
        "destination": peer_json(a.destination.as_ref()),
        "request": {"time": time, "http": http_json},
        "contextExtensions": a.context_extensions,
        "tlsSession": a.tls_session.as_ref().map(|t| json!({"sni": t.sni})),
    }))
}

fn options(map: &std::collections::BTreeMap<String, String>) -> Vec<HeaderValueOption> {
    map.iter()
        .map(|(k, v)| HeaderValueOption {
            header: Some(HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..HeaderValue::default()
            }),
            ..HeaderValueOption::default()
        })
        .collect()
}

/// The `CheckResponse` for a decision.
pub fn response(d: &Decision) -> CheckResponse {
    if d.allowed {
        CheckResponse {
            status: Some(RpcStatus {
                code: OK,
                ..RpcStatus::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: options(&d.headers),
                headers_to_remove: d.request_headers_to_remove.clone(),
                response_headers_to_add: options(&d.response_headers_to_add),
                ..OkHttpResponse::default()
            })),
            ..CheckResponse::default()
        }
    } else {
        CheckResponse {
            status: Some(RpcStatus {
                code: PERMISSION_DENIED,
                ..RpcStatus::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(d.http_status.unwrap_or(403)),
                }),
                headers: options(&d.headers),
                body: d.body.clone(),
            })),
            ..CheckResponse::default()
        }
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    authz: Arc<RegoAuthorizer>,
}

#[tonic::async_trait]
impl Authorization for Service {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let input = input(request.get_ref());
        match self.authz.decide(&input) {
            Ok(d) => {
                tracing::info!(
                    allowed = d.allowed,
                    method = input["attributes"]["request"]["http"]["method"]
                        .as_str()
                        .unwrap_or("-"),
                    path = input["attributes"]["request"]["http"]["path"]
                        .as_str()
                        .unwrap_or("-"),
                    "gRPC check"
                );
                Ok(tonic::Response::new(response(&d)))
            }
            Err(e) => {
                tracing::error!(error = %e, "policy evaluation failed");
                Err(tonic::Status::internal(e.to_string()))
            }
        }
    }
}

/// Serves `Authorization/Check` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    authz: Arc<RegoAuthorizer>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Service { authz }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
