//! Exactness end to end: `meshMTLS.minProtocolVersion` in `mesh.yaml` reaches a running sidecar's
//! inbound mTLS listener over ADS, in both directions, and a bad value is refused by the control
//! plane with an error naming the file, the field and the reason.
//!
//! Workload addresses are loopback IPs in 127.0.61.x (other test files use other ranges).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::sync::Arc;
use std::time::Duration;

use agent_mesh::{parse_response, wait_for};
use mesh::{Echo, Mesh, Transport, echo_json, http1};
use palisade_identity::{
    ServerIdentity, SpiffeId, SpiffeServerVerifier, Svid, SvidResolver, TrustBundle,
    crypto_provider,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ADDR: &str = "127.0.61.1";
const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

fn workloads() -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: demo}}
spec:
  address: {ADDR}
  serviceAccount: server
  labels: {{app: server}}
  ports: {{http: 8080}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: strict, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: STRICT}}
"#
    )
}

/// `GET /` over mutual TLS from a client that speaks TLS 1.2 only (what an older Envoy or a
/// legacy mTLS client with a mesh certificate does). `Err` when the handshake or the request
/// fails.
async fn get_with_tls12_only(cert: &Svid, bundle: &TrustBundle) -> Result<u16, String> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            bundle.clone(),
            ServerIdentity::OneOf(vec![SpiffeId::parse(SERVER_ID).unwrap()]),
        ))
        .with_client_cert_resolver(SvidResolver::new(cert));
    cfg.alpn_protocols = vec![b"istio-http/1.1".to_vec()];
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(format!("{ADDR}:8080")).await?;
        let name = rustls::pki_types::ServerName::try_from("workload.local").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let req = format!("GET / HTTP/1.1\r\nHost: {ADDR}:8080\r\nConnection: close\r\n\r\n");
        tls.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        tls.read_to_end(&mut raw).await?;
        parse_response(&raw).map(|(status, _)| status)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_protocol_version_is_pushed_to_the_sidecar() {
    let w = workloads();
    let mesh = Mesh::start(&[("workloads.yaml", &w)]).await;
    let app = Echo::start().await;
    let sidecar = mesh
        .sidecar(
            "demo/server",
            "demo",
            "server",
            &["--app-port".into(), format!("8080={}", app.port())],
        )
        .await;
    let bundle = mesh.bundle();
    let cert = mesh.cert("demo", "client");
    let default_client = Transport::mtls(cert.clone(), SERVER_ID, bundle.clone());
    let target = format!("{ADDR}:8080");

    // Istio's default minimum is TLS 1.2: the legacy client gets in.
    assert_eq!(get_with_tls12_only(&cert, &bundle).await, Ok(200));

    mesh.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\nmeshMTLS: {minProtocolVersion: TLSV1_3}\n",
    );
    let refused = wait_for(
        "the sidecar to refuse TLS 1.2 after meshMTLS.minProtocolVersion: TLSV1_3",
        Duration::from_secs(30),
        async || get_with_tls12_only(&cert, &bundle).await.err(),
    )
    .await;
    assert!(
        refused.contains("ProtocolVersion") || refused.contains("incompatible"),
        "refused for another reason than the TLS version: {refused}\n{}",
        sidecar.stderr()
    );
    // A TLS 1.3 client is still served.
    let (status, body) = http1(&target, &default_client, "GET", "/v13", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(echo_json(&body)["path"], "/v13");

    // An invalid value is refused by the control plane, naming the file, the field and why; the
    // sidecar keeps the last good config.
    mesh.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\nmeshMTLS: {minProtocolVersion: TLSV1_1}\n",
    );
    // One log line with all of it (the log format may quote or escape the value).
    let parts = [
        "mesh.yaml: MeshConfig: meshMTLS.minProtocolVersion: ",
        "TLSV1_1",
        "is not a TLS version the mesh can require: expected TLSV1_2 or TLSV1_3",
    ];
    let log = wait_for(
        "the control plane to reject minProtocolVersion TLSV1_1",
        Duration::from_secs(30),
        async || {
            let log = mesh.cp.stderr_text() + &mesh.cp.stdout_text();
            log.lines()
                .any(|l| parts.iter().all(|p| l.contains(p)))
                .then_some(log)
        },
    )
    .await;
    assert!(log.contains("mesh config change rejected"), "{log}");
    assert!(get_with_tls12_only(&cert, &bundle).await.is_err());

    // Back to TLS 1.2: the legacy client is accepted again.
    mesh.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\nmeshMTLS: {minProtocolVersion: TLSV1_2}\n",
    );
    wait_for(
        "the sidecar to accept TLS 1.2 again",
        Duration::from_secs(30),
        async || get_with_tls12_only(&cert, &bundle).await.ok(),
    )
    .await;
}
