//! JWT request authentication with real processes: the control plane fetches a JWKS from a
//! real HTTP server on loopback and pushes the keys to a `palisade sidecar`, which refuses bad
//! tokens with Istio's statuses and messages. The JWKS server is down at start (fail closed),
//! comes up (keys arrive), and goes down again (the last good keys keep working).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/mesh.rs"]
mod mesh;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_mesh::wait_for;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh::Mesh;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves `doc` on any path while `up`, else answers 503.
struct JwksServer {
    port: u16,
    up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn jwks_server(doc: String, up: bool) -> JwksServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let flag = Arc::new(AtomicBool::new(up));
    let f = flag.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            let (f, doc) = (f.clone(), doc.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let (status, body) = if f.load(Ordering::SeqCst) {
                    ("200 OK", doc)
                } else {
                    ("503 Service Unavailable", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    JwksServer {
        port,
        up: flag,
        task,
    }
}

/// An app that answers with the request's headers and target as JSON.
async fn header_echo() -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let headers: serde_json::Map<String, Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    Value::String(v.to_str().unwrap_or("").to_owned()),
                                )
                            })
                            .collect();
                        let body = json!({"target": req.uri().to_string(), "headers": headers})
                            .to_string();
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, task)
}

/// One plaintext HTTP/1.1 request: status, lowercase header lines, body.
async fn get(addr: &str, target: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Starts the control plane like `Mesh::start`, with fast JWKS retries.
async fn start_mesh(files: &[(&str, &str)]) -> Mesh {
    Mesh::start_with_env(
        files,
        &[
            ("PALISADE_JWKS_RETRY", "200ms"),
            ("PALISADE_JWKS_REFRESH", "500ms"),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authentication_end_to_end() {
    let rsa_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let rsa = EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let doc = json!({"keys": [jwk]}).to_string();
    // Issuer A's JWKS is up from the start; issuer B's is down at start.
    let srv_a = jwks_server(doc.clone(), true).await;
    let srv_b = jwks_server(doc, false).await;
    let addr = "127.0.33.1";
    let files = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: api, namespace: jwt}}
spec: {{address: {addr}, serviceAccount: api, labels: {{app: api}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: api, namespace: jwt}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api, namespace: jwt}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: https://a.example
    audiences: [api]
    jwksUri: http://127.0.0.1:{pa}/keys
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
  - issuer: https://b.example
    jwksUri: http://127.0.0.1:{pb}/keys
"#,
        pa = srv_a.port,
        pb = srv_b.port
    );
    let mesh = start_mesh(&[("workloads.yaml", &files)]).await;
    let (app_port, _app) = header_echo().await;
    let sidecar = mesh
        .sidecar(
            "jwt/api",
            "jwt",
            "api",
            &["--app-port".to_owned(), format!("8080={app_port}")],
        )
        .await;
    let target = format!("{addr}:8080");

    let t = now();
    let claims = |iss: &str, extra: Value| {
        let mut c = json!({"iss": iss, "sub": "alice", "aud": "api", "exp": t + 600, "iat": t});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey, c: &Value| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, c, key).unwrap()
    };
    let a = |extra: Value| {
        sign(
            Algorithm::RS256,
            "k1",
            &rsa,
            &claims("https://a.example", extra),
        )
    };
    let valid = a(json!({}));

    // Wait for the keys of issuer A to reach the proxy.
    wait_for(
        "issuer A's keys at the proxy",
        Duration::from_secs(20),
        async || {
            let (s, _, _) = get(
                &target,
                "/",
                &[("authorization", &format!("Bearer {valid}"))],
            )
            .await;
            (s == 200).then_some(())
        },
    )
    .await;

    let tampered = {
        let mut p: Vec<String> = valid.split('.').map(str::to_owned).collect();
        p[1] = b64(&claims("https://a.example", json!({"sub": "mallory"})));
        p.join(".")
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none"})),
        b64(&claims("https://a.example", json!({})))
    );
    let hs = sign(
        Algorithm::HS256,
        "k1",
        &EncodingKey::from_secret(rsa_kp.public_key_pem().as_bytes()),
        &claims("https://a.example", json!({})),
    );
    let big = a(json!({"pad": "x".repeat(20_000)}));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            a(json!({"exp": t - 3600})),
            401,
            "Jwt is expired",
        ),
        (
            "not yet valid",
            a(json!({"nbf": t + 3600})),
            401,
            "Jwt not yet valid",
        ),
        (
            "wrong issuer",
            sign(
                Algorithm::RS256,
                "k1",
                &rsa,
                &claims("https://evil.example", json!({})),
            ),
            401,
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            a(json!({"aud": "other"})),
            403,
            "Audiences in Jwt are not allowed",
        ),
        (
            "unknown kid",
            sign(
                Algorithm::RS256,
                "k9",
                &rsa,
                &claims("https://a.example", json!({})),
            ),
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "tampered signature",
            tampered,
            401,
            "Jwt verification fails",
        ),
        ("alg none", none, 401, "Jwt header [alg] is not supported"),
        (
            "HS256 keyed with the RSA public key",
            hs,
            401,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        ("oversized", big, 401, "Jwt is too large"),
        (
            "issuer B: JWKS down since start (fail closed)",
            sign(
                Algorithm::RS256,
                "k1",
                &rsa,
                &claims("https://b.example", json!({})),
            ),
            401,
            "Jwks remote fetch is failed",
        ),
    ];
    let mut failures = Vec::new();
    for (what, token, status, msg) in &cases {
        let (s, head, body) = get(
            &target,
            "/items?q=1",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        let www_ok = *status != 401
            || head.contains(&format!(
                "www-authenticate: bearer realm=\"http://{target}/items\", error=\"invalid_token\""
            ));
        if s != *status || body != *msg || !www_ok {
            failures.push(format!(
                "{what}: want {status} {msg:?}, got {s} {body:?}\n{head}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- sidecar log:\n{}",
        failures.join("\n"),
        sidecar.stderr()
    );

    // Valid: the app sees the claim header, not the token; no token passes without identity.
    let (s, _, body) = get(
        &target,
        "/",
        &[
            ("authorization", &format!("Bearer {valid}")),
            ("x-jwt-sub", "spoofed"),
        ],
    )
    .await;
    assert_eq!(s, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-jwt-sub"], "alice");
    assert!(echo["headers"].get("authorization").is_none(), "{body}");
    let (s, _, body) = get(&target, "/", &[("x-jwt-sub", "spoofed")]).await;
    assert_eq!(s, 200);
    assert!(
        serde_json::from_str::<Value>(&body).unwrap()["headers"]
            .get("x-jwt-sub")
            .is_none(),
        "{body}"
    );

    // Issuer B's JWKS comes up: the retry fetches it and pushes the keys.
    srv_b.up.store(true, Ordering::SeqCst);
    let b_token = sign(
        Algorithm::RS256,
        "k1",
        &rsa,
        &claims("https://b.example", json!({})),
    );
    wait_for(
        "issuer B's keys after its JWKS came up",
        Duration::from_secs(20),
        async || {
            let (s, _, _) = get(
                &target,
                "/",
                &[("authorization", &format!("Bearer {b_token}"))],
            )
            .await;
            (s == 200).then_some(())
        },
    )
    .await;

    // Both go down: several failed refreshes later the last good keys still verify.
    srv_a.up.store(false, Ordering::SeqCst);
    srv_b.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for token in [&valid, &b_token] {
        let (s, _, body) = get(
            &target,
            "/",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    assert!(mesh.cp.stderr_text().contains("JWKS fetch failed"));
}
