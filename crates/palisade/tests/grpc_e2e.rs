//! gRPC applications behind a Palisade sidecar pair: a real tonic server on a port named `grpc`
//! (HTTP/2 with prior knowledge from the sidecar to it, as Istio selects the protocol), a real
//! tonic client through its own sidecar's outbound listener. Unary and bidirectional streaming
//! calls are allowed or denied by path (`/package.Service/Method`); trailers and gRPC statuses
//! pass end to end, and a denied call reaches the client as Envoy answers it: HTTP 200 with
//! `grpc-status: 7` (PERMISSION_DENIED) and `grpc-message: RBAC: access denied`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mesh::Mesh;
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Response, Status, Streaming};

const SERVER: &str = "127.0.62.1";
const CLIENT: &str = "127.0.62.2";

fn files() -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: demo}}
spec: {{address: {SERVER}, serviceAccount: server, labels: {{app: server}}, ports: {{grpc: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: demo}}
spec: {{address: {CLIENT}, serviceAccount: client, labels: {{app: client}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: grpc, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/demo/sa/client]}}}}]
    to:
    - operation:
        paths:
        - /envoy.service.auth.v3.Authorization/Check
        - /envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets
"#
    )
}

/// Answers Check with the caller identity the sidecar vouched for, in the status message.
struct Checker;

#[tonic::async_trait]
impl Authorization for Checker {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        if req.get_ref().attributes.is_some() {
            return Err(Status::not_found("the application's own answer"));
        }
        let xfcc = req
            .metadata()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let mut resp = Response::new(CheckResponse {
            status: Some(RpcStatus {
                code: 0,
                message: xfcc,
                details: Vec::new(),
            }),
            ..Default::default()
        });
        resp.metadata_mut()
            .insert("x-served-by", "checker".parse().unwrap());
        Ok(resp)
    }
}

/// Echoes every streamed request's version back; the unary and delta calls answer too (the
/// sidecar must be what refuses them).
struct Streamer;

type Out<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Streamer {
    type DeltaSecretsStream = Out<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Out<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let one = tokio_stream::once(Ok(DeltaDiscoveryResponse::default()));
        Ok(Response::new(Box::pin(one)))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let out = req.into_inner().map(|r| {
            r.map(|r| DiscoveryResponse {
                version_info: format!("{}-ack", r.version_info),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn fetch_secrets(
        &self,
        _req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Ok(Response::new(DiscoveryResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_through_a_sidecar_pair() {
    let files = files();
    let mesh = Mesh::start(&[("mesh-files.yaml", &files)]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    let server_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Checker))
            .add_service(SecretDiscoveryServiceServer::new(Streamer))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let server = mesh
        .sidecar(
            "demo/server",
            "demo",
            "server",
            &["--app-port".to_owned(), format!("8080={app_port}")],
        )
        .await;
    let client = mesh.sidecar("demo/client", "demo", "client", &[]).await;

    // The client application speaks h2c to its sidecar's outbound listener; `:authority` names
    // the destination, as a gRPC client configured with the service's address would send it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client.outbound))
        .unwrap()
        .origin(format!("http://{SERVER}:8080").parse().unwrap())
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();

    // Unary, allowed: the answer, its metadata, and the caller identity the app saw.
    let mut authz = AuthorizationClient::new(channel.clone());
    let resp = authz.check(CheckRequest::default()).await.unwrap();
    assert_eq!(resp.metadata().get("x-served-by").unwrap(), "checker");
    let message = resp.into_inner().status.unwrap().message;
    assert!(
        message.contains("URI=spiffe://cluster.local/ns/demo/sa/client"),
        "{message}"
    );

    // Bidirectional streaming, allowed: three requests, three answers in order, then the
    // server's OK status in the trailers when the client ends its side.
    let mut sds = SecretDiscoveryServiceClient::new(channel.clone());
    let requests = tokio_stream::iter((1..=3).map(|i| DiscoveryRequest {
        version_info: format!("v{i}"),
        ..Default::default()
    }));
    let mut answers = sds.stream_secrets(requests).await.unwrap().into_inner();
    let mut versions = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        versions.push(a.version_info);
    }
    assert_eq!(versions, ["v1-ack", "v2-ack", "v3-ack"]);

    // Unary and streaming, denied by path: PERMISSION_DENIED with Envoy's message.
    let err = sds
        .fetch_secrets(DiscoveryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(err.message(), "RBAC: access denied");
    let err = sds
        .delta_secrets(tokio_stream::iter([DeltaDiscoveryRequest::default()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // An application's own error status passes through untouched.
    let err = authz
        .check(CheckRequest {
            attributes: Some(Default::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "the application's own answer");

    // The refusals were the server sidecar's decisions.
    assert!(server.stat("palisade_rbac_decisions", &["denied"]).await >= 2.0);
    server_task.abort();
}
