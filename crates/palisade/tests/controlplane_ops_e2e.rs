//! Operating the control plane, with real processes:
//!
//! - its admin endpoint's `/metrics` counts config pushes, connected proxies, certificates
//!   signed and refused (by reason) and JWKS fetches (by result);
//! - it rotates its ADS serving certificate before expiry, and proxies keep connecting;
//! - `mesh.yaml`'s `jwksResolver` timings apply, and a bad one stops it with the file, the
//!   field and the reason.
//!
//! Workload and JWKS server addresses: 127.0.64.x.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_mesh::{PALISADE, http_get, wait_for};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use mesh::Mesh;
use palisade_identity::{CertInfo, CertSource, ServerIdentity};
use serde_json::json;
use tokio::net::TcpStream;

/// The value of the sample `name` (with its labels, as rendered) in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(mesh: &Mesh) -> String {
    let (status, body) = http_get(&mesh.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Serves a fresh RSA key set on `ip`; its URL and the count of fetches.
async fn jwks_server(ip: &str) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let key = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).unwrap();
    let doc =
        json!({"keys": [Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap()]}).to_string();
    let (addr, hits, task) = mesh::document_server(ip, doc).await;
    (format!("http://{addr}/keys"), hits, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_pushes_proxies_certificates_and_jwks_fetches() {
    let (good, hits, _server) = jwks_server("127.0.64.10").await;
    // Nothing listens there: every fetch fails.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.64.10:0").unwrap();
        format!("http://{}/keys", l.local_addr().unwrap())
    };
    let files = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: api, namespace: ops}}
spec: {{address: 127.0.64.1, serviceAccount: api, labels: {{app: api}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api, namespace: ops}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: https://good.example
    jwksUri: {good}
  - issuer: https://down.example
    jwksUri: {closed}
"#
    );
    // mesh.yaml's timings reach the resolver: refreshes every 200 ms (20 min by default).
    let mesh_yaml = "trustDomain: cluster.local\njwksResolver: {refreshInterval: 200ms, retryInitialInterval: 200ms, retryMaxInterval: 1s}\n";
    let mesh = Mesh::start(&[("mesh.yaml", mesh_yaml), ("workloads.yaml", &files)]).await;

    // Before any proxy: no stream, no push.
    let before = scrape(&mesh).await;
    assert_eq!(
        sample(&before, "palisade_control_connected_proxies"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, "palisade_control_config_pushes_total"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(&before, "palisade_control_config_nacks_total"),
        Some(0.0),
        "{before}"
    );

    // A proxy connects (its certificate is signed), a client's CSR is signed, and a request
    // with a token for another audience is refused.
    let sidecar = mesh.sidecar("ops/api", "ops", "api", &[]).await;
    mesh.cert("ops", "client");
    let token = Command::new(PALISADE)
        .args(["token", "issue", "--state"])
        .arg(&mesh.state)
        .args([
            "--namespace",
            "ops",
            "--service-account",
            "client",
            "--audience",
            "someone-else",
        ])
        .output()
        .unwrap();
    assert!(token.status.success());
    let other_audience = mesh.path().join("other-audience.jwt");
    std::fs::write(&other_audience, &token.stdout).unwrap();
    let out = Command::new(PALISADE)
        .args(["cert", "request", "--ca-addr", &mesh.ca, "--ca-root"])
        .arg(mesh.root())
        .arg("--token-file")
        .arg(&other_audience)
        .arg("--out")
        .arg(mesh.path().join("refused"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a token for another audience was accepted"
    );

    let body = wait_for(
        "metrics after a proxy connected",
        Duration::from_secs(20),
        async || {
            let body = scrape(&mesh).await;
            let fetched = sample(
                &body,
                "palisade_control_jwks_fetches_total{result=\"success\"}",
            )? >= 3.0;
            let failed = sample(
                &body,
                "palisade_control_jwks_fetches_total{result=\"failure\"}",
            )? >= 3.0;
            (fetched && failed).then_some(body)
        },
    )
    .await;
    assert_eq!(
        sample(&body, "palisade_control_connected_proxies"),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(&body, "palisade_control_config_pushes_total").unwrap() >= 1.0,
        "{body}"
    );
    assert!(
        sample(&body, "palisade_ca_certificates_issued_total").unwrap() >= 2.0,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "palisade_ca_requests_refused_total{reason=\"token_audience\"}"
        ),
        Some(1.0),
        "{body}"
    );
    // Three refreshes within seconds: mesh.yaml's 200 ms, not the 20 min default.
    assert!(hits.load(Ordering::SeqCst) >= 3);

    // The proxy goes away: the gauge follows.
    let mut sidecar = sidecar;
    sidecar.proc.stop();
    wait_for(
        "connected proxies back to 0",
        Duration::from_secs(20),
        async || {
            (sample(&scrape(&mesh).await, "palisade_control_connected_proxies")? == 0.0)
                .then_some(())
        },
    )
    .await;
}

/// The certificate the ADS port presents now, verified as a proxy verifies it (chain to the
/// mesh root, the control plane's SPIFFE ID, validity now), over mutual TLS with `client`.
async fn ads_certificate(mesh: &Mesh, client: &palisade_identity::Svid) -> CertInfo {
    let config = palisade_identity::client_config(
        Some(CertSource::from(client)),
        &mesh.bundle(),
        ServerIdentity::Path(palisade_ca::CONTROL_PLANE_PATH.to_owned()),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(&mesh.xds).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("palisade-controlplane").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("the ADS certificate no longer verifies");
    let (_, conn) = tls.get_ref();
    let chain = conn.peer_certificates().unwrap().to_vec();
    palisade_identity::inspect_chain(&chain).unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_serving_certificate_rotates_and_proxies_keep_connecting() {
    let files = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: a, namespace: rot}
spec: {address: 127.0.64.2, serviceAccount: a, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b, namespace: rot}
spec: {address: 127.0.64.3, serviceAccount: b, ports: {http: 8080}}
"#;
    // Four seconds: rotated every two.
    let mesh = Mesh::start_with(&[("workloads.yaml", files)], &[], &["--xds-cert-ttl", "4s"]).await;
    let a = mesh.sidecar("rot/a", "rot", "a", &[]).await;
    let client = mesh.cert("rot", "client");

    let first = ads_certificate(&mesh, &client).await;
    // The knob applies: four seconds after issue (NotBefore is backdated two minutes).
    let lifetime = first.not_after - first.not_before;
    assert!(
        lifetime <= time::Duration::seconds(2 * 60 + 5),
        "lifetime {lifetime}"
    );
    // A new certificate is presented after rotation, and still after the first one expired.
    let current = wait_for(
        "a new ADS certificate after the first one expired",
        Duration::from_secs(30),
        async || {
            let now = ads_certificate(&mesh, &client).await;
            (now.serial != first.serial && time::OffsetDateTime::now_utc() > first.not_after)
                .then_some(now)
        },
    )
    .await;
    assert_eq!(current.uri_sans, first.uri_sans);

    // A proxy that connects now gets its config (its handshake met a rotated certificate),
    // and the one connected before is still connected.
    let _b = mesh.sidecar("rot/b", "rot", "b", &[]).await;
    assert_eq!(a.admin_get("/ready").await.0, 200);
    wait_for(
        "both proxies connected",
        Duration::from_secs(20),
        async || {
            let (_, body) = http_get(&mesh.admin, "/metrics").await.ok()?;
            (sample(&body, "palisade_control_connected_proxies")? == 2.0).then_some(())
        },
    )
    .await;
    assert!(
        mesh.cp
            .stderr_text()
            .contains("ADS serving certificate rotated"),
        "{}",
        mesh.cp.stderr_text()
    );
}

#[test]
fn a_bad_jwks_timing_in_mesh_yaml_names_the_file_the_field_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mesh");
    std::fs::create_dir_all(&config).unwrap();
    let mesh_yaml = config.join("mesh.yaml");
    std::fs::write(&mesh_yaml, "jwksResolver: {refreshInterval: 0s}\n").unwrap();
    let out = Command::new(PALISADE)
        .args(["controlplane", "--state"])
        .arg(dir.path().join("state"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--xds-listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want = format!(
        "{}: MeshConfig: jwksResolver.refreshInterval: must be greater than 0",
        mesh_yaml.display()
    );
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
}
