//! Security of the operator-facing surfaces, with real processes:
//!
//! - the sidecar's admin endpoint redacts key material in `/config_dump`, changes log levels
//!   only on POST (a GET gets 405 and changes nothing), and every admin endpoint listens on
//!   loopback by default;
//! - a JWKS fetched over plain http is accepted (as Istio does) but `palisade analyze` and the
//!   control plane's log warn about it, the log once per rule and URI;
//! - a control plane started on a mesh directory that does not validate keeps its CA serving,
//!   reports the errors, and pushes config as soon as the directory is fixed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_mesh::{PALISADE, wait_for};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh::{Echo, Mesh, Transport, http1};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection: status, head (lowercased), body.
async fn request(addr: &str, method: &str, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\ncontent-length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let (status, body) = agent_mesh::parse_response(&raw).unwrap();
    (status, head.to_ascii_lowercase(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_redacts_key_material_and_mutates_only_on_post() {
    // An RSA public key and an HMAC secret, inline in a RequestAuthentication.
    let rsa_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let rsa = EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).unwrap();
    let mut rsa_jwk =
        serde_json::to_value(Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap()).unwrap();
    rsa_jwk["kid"] = json!("rsa-1");
    let modulus = rsa_jwk["n"].as_str().unwrap().to_owned();
    let secret = b"an-hmac-secret-of-32-bytes-long!";
    let k = URL_SAFE_NO_PAD.encode(secret);
    let jwks = json!({"keys": [rsa_jwk, {"kty": "oct", "kid": "hmac-1", "alg": "HS256", "k": k}]})
        .to_string();
    let addr = "127.0.47.1";
    let files = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: api, namespace: adm}}
spec: {{address: {addr}, serviceAccount: api, labels: {{app: api}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: api, namespace: adm}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api, namespace: adm}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: https://inline.example
    jwks: '{jwks}'
"#
    );
    let mesh = Mesh::start(&[("workloads.yaml", &files)]).await;
    let app = Echo::start().await;
    let sidecar = mesh
        .sidecar(
            "adm/api",
            "adm",
            "api",
            &["--app-port".to_owned(), format!("8080={}", app.port())],
        )
        .await;

    // /config_dump: the rule is there, its keys are not.
    let (status, _, body) = request(&sidecar.admin, "GET", "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    for leaked in [modulus.as_str(), k.as_str()] {
        assert!(!body.contains(leaked), "key material {leaked:?} in {body}");
    }
    let dump: Value = serde_json::from_str(&body).unwrap();
    let rule = &dump["pushed"]["requestAuthentications"][0]["spec"]["jwtRules"][0];
    assert_eq!(rule["issuer"], "https://inline.example", "{dump}");
    let shown: Value = serde_json::from_str(rule["jwks"].as_str().unwrap()).unwrap();
    let keys = shown["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{shown}");
    // Which keys are there stays readable; their material does not.
    assert_eq!(
        (
            &keys[0]["kty"],
            &keys[0]["kid"],
            &keys[0]["n"],
            &keys[0]["e"]
        ),
        (
            &json!("RSA"),
            &json!("rsa-1"),
            &json!("[redacted]"),
            &json!("[redacted]")
        ),
        "{shown}"
    );
    assert_eq!(
        keys[1],
        json!({"kty": "oct", "kid": "hmac-1", "alg": "HS256", "k": "[redacted]"}),
        "{shown}"
    );
    // The sidecar still enforces with the real keys: an HS256 token signed with the secret passes.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hmac-1".into());
    let token = jsonwebtoken::encode(
        &header,
        &json!({"iss": "https://inline.example", "sub": "alice", "exp": now + 600}),
        &EncodingKey::from_secret(secret),
    )
    .unwrap();
    let inbound = format!("{addr}:8080");
    let bearer = format!("Bearer {token}");
    let (status, body) = http1(
        &inbound,
        &Transport::Plain,
        "GET",
        "/with-token",
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // /logging: GET is refused with 405 and changes nothing.
    for target in ["/logging?rbac=debug", "/logging"] {
        let (status, head, body) = request(&sidecar.admin, "GET", target).await;
        assert_eq!(status, 405, "GET {target}: {head}\n{body}");
        assert!(head.contains("\r\nallow: post"), "GET {target}: {head}");
        assert!(body.contains("POST"), "GET {target}: {body}");
    }
    let (status, _, body) = request(&sidecar.admin, "POST", "/logging").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("rbac: info"),
        "the GET changed the level: {body}"
    );
    // POST changes it: allowed decisions are logged from now on.
    let (status, body) = sidecar.admin_post("/logging?rbac=debug").await;
    assert_eq!(
        (status, body.contains("rbac: debug")),
        (200, true),
        "{body}"
    );
    let (status, _, _) = request(&sidecar.admin, "POST", "/logging?rbac=loud").await;
    assert_eq!(status, 400);
    let (status, body) = http1(&inbound, &Transport::Plain, "GET", "/debug-me", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_for(
        "the allowed decision in the sidecar's log",
        Duration::from_secs(10),
        async || {
            let log = sidecar.stderr();
            (log.contains("enforced allowed") && log.contains("/debug-me")).then_some(())
        },
    )
    .await;
    // Read-only endpoints still answer GET.
    assert_eq!(request(&sidecar.admin, "GET", "/ready").await.0, 200);
}

/// The `[default: ...]` of `--admin` in `palisade <cmd> --help`.
fn admin_default(cmd: &str) -> SocketAddr {
    let out = Command::new(PALISADE)
        .args([cmd, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd} --help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let (_, rest) = help
        .split_once("--admin <")
        .unwrap_or_else(|| panic!("no --admin in {cmd} --help:\n{help}"));
    // Only this option's text: up to the next option.
    let own = rest.split("\n  -").next().unwrap();
    let (_, default) = own
        .split_once("[default: ")
        .unwrap_or_else(|| panic!("--admin of {cmd} has no default:\n{own}"));
    default.split(']').next().unwrap().parse().unwrap()
}

#[test]
fn admin_endpoints_listen_on_loopback_by_default() {
    for cmd in ["proxy", "sidecar", "agent", "controlplane"] {
        let addr = admin_default(cmd);
        assert!(addr.ip().is_loopback(), "palisade {cmd}: admin on {addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_jwks_is_accepted_but_warned_about_once() {
    let rsa_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let rsa = EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).unwrap();
    let jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    let (addr, hits, _server) =
        mesh::document_server("127.0.0.1", json!({"keys": [jwk]}).to_string()).await;
    let port = addr.port();
    let uri = format!("http://127.0.0.1:{port}/keys");
    let files = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: api, namespace: plain}}
spec: {{address: 127.0.47.2, serviceAccount: api, labels: {{app: api}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: keys-over-http, namespace: plain}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: https://plain.example
    jwksUri: {uri}
"#
    );
    // Refresh fast, so that the keys are fetched many times during the test.
    let mesh = Mesh::start_with_env(
        &[("workloads.yaml", &files)],
        &[("PALISADE_JWKS_REFRESH", "100ms")],
    )
    .await;

    // `palisade analyze` names the resource, the issuer, the URI and the risk.
    let out = Command::new(PALISADE)
        .args(["analyze", "--config"])
        .arg(&mesh.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("[jwks-over-plaintext]"))
        .unwrap_or_else(|| panic!("no jwks-over-plaintext warning:\n{text}"));
    for needle in [
        "RequestAuthentication plain/keys-over-http",
        "\"https://plain.example\"",
        uri.as_str(),
        "swap the keys",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }

    // The control plane fetches the keys anyway (Istio accepts http) and warns.
    let warning = |log: &str| -> usize {
        log.lines()
            .filter(|l| {
                l.contains("JWKS fetched over plain http")
                    && l.contains("plain/keys-over-http")
                    && l.contains("https://plain.example")
                    && l.contains(&uri)
            })
            .count()
    };
    wait_for(
        "the control plane's warning",
        Duration::from_secs(10),
        async || (warning(&mesh.cp.stderr_text()) > 0).then_some(()),
    )
    .await;
    // Several refreshes and a directory reload later, still one warning.
    let before = hits.load(Ordering::SeqCst);
    mesh.write_config(
        "extra.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: plain}\nspec: {rules: [{}]}\n",
    );
    wait_for(
        "a reload and three more JWKS fetches",
        Duration::from_secs(15),
        async || {
            let reloaded = mesh.cp.stderr_text().contains("mesh config reloaded");
            (reloaded && hits.load(Ordering::SeqCst) >= before + 3).then_some(())
        },
    )
    .await;
    let log = mesh.cp.stderr_text();
    assert_eq!(warning(&log), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_directory_keeps_the_ca_serving_and_is_pushed_once_fixed() {
    let workloads = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: fix}
spec: {address: 127.0.47.3, serviceAccount: web, labels: {app: web}, ports: {http: 8080}}
"#;
    let good = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reads, namespace: fix}\nspec:\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n";
    let broken = good.replace("methods", "methodz");
    // `Mesh::start` fails the test if the control plane exits.
    let mesh = Mesh::start(&[("workloads.yaml", workloads), ("policy.yaml", &broken)]).await;
    wait_for(
        "the errors in the control plane's log",
        Duration::from_secs(10),
        async || {
            let log = mesh.cp.stderr_text();
            (log.contains("invalid mesh config")
                && log.contains("policy.yaml")
                && log.contains("methodz"))
            .then_some(())
        },
    )
    .await;

    // The CA issues certificates meanwhile.
    let svid = mesh.cert("fix", "web");
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/fix/sa/web"
    );

    // A sidecar started now waits for config; the fix reaches it.
    let app = Echo::start().await;
    let fix = async {
        wait_for(
            "the sidecar's deferred ADS subscription",
            Duration::from_secs(20),
            async || {
                mesh.cp
                    .stderr_text()
                    .contains("ADS subscription deferred")
                    .then_some(())
            },
        )
        .await;
        mesh.write_config("policy.yaml", good);
    };
    let args = ["--app-port".to_owned(), format!("8080={}", app.port())];
    let (sidecar, ()) = tokio::join!(mesh.sidecar("fix/web", "fix", "web", &args), fix);
    let (status, _, body) = request(&sidecar.admin, "GET", "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).unwrap();
    let policies = dump["authorizationPolicies"].as_array().unwrap();
    assert!(
        policies
            .iter()
            .any(|p| p["id"].as_str().unwrap_or("").contains("reads")),
        "{dump}"
    );
    // The fixed policy is enforced: GET passes, POST is denied.
    let inbound = "127.0.47.3:8080";
    let (status, body) = http1(inbound, &Transport::Plain, "GET", "/", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = http1(inbound, &Transport::Plain, "POST", "/", &[])
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
}
