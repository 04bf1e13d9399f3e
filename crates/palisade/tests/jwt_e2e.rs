//! JWT request authentication with real processes: the control plane fetches a JWKS from a
//! real HTTP server on loopback and pushes the keys to a `palisade sidecar`, which refuses bad
//! tokens with Istio's statuses and messages. The JWKS server is down at start (fail closed),
//! comes up (keys arrive), and goes down again (the last good keys keep working).
//!
//! `several_tokens_like_envoy` sends requests carrying several tokens to a sidecar and to a real
//! Envoy 1.40 configured as Istio configures it for the same RequestAuthentication, both in
//! front of the same app, and compares the answers and what the app received. Needs Envoy:
//! `scripts/install-envoy.sh` (or `PALISADE_ENVOY`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/agent_mesh.rs"]
mod agent_mesh;
#[path = "common/envoy.rs"]
mod envoy;
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

/// An app that answers with the request's headers (name to list of values) and target as JSON.
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
                        // Every value of a repeated header, so none can hide behind another.
                        let mut headers = serde_json::Map::new();
                        for (k, v) in req.headers() {
                            let values = headers
                                .entry(k.as_str().to_owned())
                                .or_insert_with(|| Value::Array(Vec::new()));
                            if let Value::Array(a) = values {
                                a.push(Value::String(v.to_str().unwrap_or("").to_owned()));
                            }
                        }
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
    assert_eq!(echo["headers"]["x-jwt-sub"], json!(["alice"]));
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

/// Envoy's `jwt_authn` filter as Istio's `convertToEnvoyJwtConfig` builds it from a workload's
/// JWT rules (`providers`: Envoy `JwtProvider`s in rule order): providers `origins-<i>` writing
/// their payload to the metadata key `payload`; one provider requires `{origins-0 OR
/// allow_missing}`, several require `{P1 OR P2 ... OR AND({P1 OR allow_missing}, ...)}`.
fn istio_jwt_authn(providers: &[Value]) -> Value {
    let mut by_name = serde_json::Map::new();
    let mut inner_and = Vec::new();
    let mut outer_or = Vec::new();
    for (i, p) in providers.iter().enumerate() {
        let name = format!("origins-{i}");
        let mut p = p.clone();
        p["payload_in_metadata"] = json!("payload");
        p["normalize_payload_in_metadata"] =
            json!({"space_delimited_claims": ["permission", "scope"]});
        by_name.insert(name.clone(), p);
        inner_and.push(json!({"requires_any": {"requirements": [
            {"provider_name": name}, {"allow_missing": {}}
        ]}}));
        outer_or.push(json!({"provider_name": name}));
    }
    let requires = if inner_and.len() == 1 {
        inner_and.remove(0)
    } else {
        outer_or.push(json!({"requires_all": {"requirements": inner_and}}));
        json!({"requires_any": {"requirements": outer_or}})
    };
    json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": by_name,
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
            "bypass_cors_preflight": true
        }
    })
}

/// The app's view of one request: (target, headers), or `None` when the proxy refused it.
type Seen = Option<(String, Value)>;

async fn send(addr: &str, target: &str, headers: &[(&str, String)]) -> (u16, Seen) {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, body) = get(addr, target, &h).await;
    let seen = serde_json::from_str::<Value>(&body)
        .ok()
        .filter(|_| status == 200)
        .map(|v| {
            (
                v["target"].as_str().unwrap_or("").to_owned(),
                v["headers"].clone(),
            )
        });
    (status, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tokens_like_envoy() {
    let rsa_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let rsa = EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).unwrap();
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let other = EncodingKey::from_rsa_pem(other.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks = json!({"keys": [jwk]}).to_string();
    let (a_iss, b_iss) = ("https://a.example", "https://b.example");
    let t = now();
    let token = |iss: &str, sub: &str, key: &EncodingKey| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("k1".into());
        let c = json!({"iss": iss, "sub": sub, "aud": "api", "exp": t + 600, "iat": t});
        jsonwebtoken::encode(&h, &c, key).unwrap()
    };
    let alice = token(a_iss, "alice", &rsa);
    let bob = token(a_iss, "bob", &rsa);
    let carol = token(b_iss, "carol", &rsa);
    let forged = token(a_iss, "mallory", &other);

    // Workload `multi`: issuer A at the default locations, token stripped, `sub` output; issuer
    // B at the same locations, token forwarded. Workload `hdrs`: issuer A in two headers.
    let (multi_addr, hdrs_addr) = ("127.0.33.2", "127.0.33.3");
    let files = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: multi, namespace: jwt}}
spec: {{address: {multi_addr}, serviceAccount: multi, labels: {{app: multi}}, ports: {{http: 8080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: hdrs, namespace: jwt}}
spec: {{address: {hdrs_addr}, serviceAccount: hdrs, labels: {{app: hdrs}}, ports: {{http: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: all, namespace: jwt}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: multi, namespace: jwt}}
spec:
  selector: {{matchLabels: {{app: multi}}}}
  jwtRules:
  - issuer: {a_iss}
    jwks: '{jwks}'
    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
  - issuer: {b_iss}
    jwks: '{jwks}'
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: hdrs, namespace: jwt}}
spec:
  selector: {{matchLabels: {{app: hdrs}}}}
  jwtRules:
  - issuer: {a_iss}
    jwks: '{jwks}'
    fromHeaders: [{{name: Authorization, prefix: "Bearer "}}, {{name: x-jwt-assertion}}]
"#
    );
    // The same rules as Envoy providers, as istiod translates them.
    let local = json!({"inline_string": jwks});
    let envoy_multi = istio_jwt_authn(&[
        json!({"issuer": a_iss, "local_jwks": local, "forward": false,
               "claim_to_headers": [{"header_name": "x-jwt-sub", "claim_name": "sub"}]}),
        json!({"issuer": b_iss, "local_jwks": local, "forward": true}),
    ]);
    let envoy_hdrs = istio_jwt_authn(&[json!({
        "issuer": a_iss, "local_jwks": local, "forward": false,
        "from_headers": [
            {"name": "Authorization", "value_prefix": "Bearer "},
            {"name": "x-jwt-assertion", "value_prefix": ""}
        ]
    })]);

    let mesh = Mesh::start(&[("workloads.yaml", &files)]).await;
    let (app_port, _app) = header_echo().await;
    let app_arg = ["--app-port".to_owned(), format!("8080={app_port}")];
    let _multi = mesh.sidecar("jwt/multi", "jwt", "multi", &app_arg).await;
    let _hdrs = mesh.sidecar("jwt/hdrs", "jwt", "hdrs", &app_arg).await;
    let (em_port, eh_port) = (agent_mesh::free_port(), agent_mesh::free_port());
    let em = envoy::Envoy::start(
        mesh.path(),
        "envoy-jwt-multi",
        &envoy::http_filters_bootstrap(em_port, app_port, vec![envoy_multi]),
    )
    .await;
    let eh = envoy::Envoy::start(
        mesh.path(),
        "envoy-jwt-hdrs",
        &envoy::http_filters_bootstrap(eh_port, app_port, vec![envoy_hdrs]),
    )
    .await;
    let proxies = [
        (format!("{multi_addr}:8080"), format!("127.0.0.1:{em_port}")),
        (format!("{hdrs_addr}:8080"), format!("127.0.0.1:{eh_port}")),
    ];
    for (palisade, envoy) in &proxies {
        wait_for(
            "both proxies verify a token",
            Duration::from_secs(30),
            async || {
                let auth = [("authorization", format!("Bearer {alice}"))];
                let (p, _) = send(palisade, "/", &auth).await;
                let (e, _) = send(envoy, "/", &auth).await;
                (p == 200 && e == 200).then_some(())
            },
        )
        .await;
    }

    let auth = |t: &str| ("authorization", format!("Bearer {t}"));
    let assertion = |t: &str| ("x-jwt-assertion", t.to_owned());
    // (case, workload: 0 multi / 1 hdrs, target, headers, Palisade's status, Envoy's status)
    type Case = (
        &'static str,
        usize,
        String,
        Vec<(&'static str, String)>,
        u16,
        u16,
    );
    let cases: Vec<Case> = vec![
        ("no token", 0, "/x".into(), vec![], 200, 200),
        (
            "forged alone",
            0,
            "/x".into(),
            vec![auth(&forged)],
            401,
            401,
        ),
        (
            "valid header, forged query",
            0,
            format!("/x?access_token={forged}"),
            vec![auth(&alice)],
            401,
            401,
        ),
        (
            "forged header, valid query",
            0,
            format!("/x?access_token={alice}"),
            vec![auth(&forged)],
            401,
            401,
        ),
        (
            "valid header, malformed query",
            0,
            "/x?access_token=abc".into(),
            vec![auth(&alice)],
            401,
            401,
        ),
        (
            "valid header, empty query token",
            0,
            "/x?access_token=".into(),
            vec![auth(&alice)],
            401,
            401,
        ),
        (
            "two Authorization headers, both valid",
            0,
            "/x".into(),
            vec![auth(&alice), auth(&bob)],
            401,
            401,
        ),
        (
            "two valid of A (header and query)",
            0,
            format!("/x?a=1&access_token={bob}&b=2"),
            vec![auth(&alice)],
            200,
            200,
        ),
        // Envoy runs one verifier per provider over all tokens at that provider's locations, so
        // tokens of two issuers at shared locations pass only when a verifier that ran earlier
        // stripped one of them: here B forwards its token, A's verifier then meets it ("Jwt
        // issuer is not configured"); in the next case A strips its token first and Envoy
        // passes. Palisade verifies each token against its own issuer's rule, in both cases.
        (
            "A valid header (stripped), B valid query (forwarded)",
            0,
            format!("/x?access_token={carol}"),
            vec![auth(&alice)],
            200,
            401,
        ),
        (
            "B valid header (forwarded), A valid query (stripped)",
            0,
            format!("/x?access_token={alice}"),
            vec![auth(&carol)],
            200,
            200,
        ),
        (
            "B valid header, A forged query",
            0,
            format!("/x?access_token={forged}"),
            vec![auth(&carol)],
            401,
            401,
        ),
        // Envoy reads only the first of a repeated query parameter (and strips them all when
        // the rule does not forward, but passes the unverified one on when it does): Palisade
        // verifies every occurrence.
        (
            "repeated query parameter, the second forged",
            0,
            format!("/x?access_token={alice}&access_token={forged}"),
            vec![],
            401,
            200,
        ),
        (
            "fromHeaders: valid Authorization, forged x-jwt-assertion",
            1,
            "/x".into(),
            vec![auth(&alice), assertion(&forged)],
            401,
            401,
        ),
        (
            "fromHeaders: forged Authorization, valid x-jwt-assertion",
            1,
            "/x".into(),
            vec![auth(&forged), assertion(&alice)],
            401,
            401,
        ),
        (
            "fromHeaders: both valid",
            1,
            "/x".into(),
            vec![auth(&alice), assertion(&bob)],
            200,
            200,
        ),
        (
            "fromHeaders: the query is not a location of this rule",
            1,
            format!("/x?access_token={forged}"),
            vec![assertion(&alice)],
            200,
            200,
        ),
    ];
    let verified = [&alice, &bob, &carol];
    let mut failures = Vec::new();
    for (what, w, target, headers, want_p, want_e) in &cases {
        let (palisade, envoy) = &proxies[*w];
        let (p, seen) = send(palisade, target, headers).await;
        let (e, _) = send(envoy, target, headers).await;
        if (p, e) != (*want_p, *want_e) {
            failures.push(format!(
                "{what}: Palisade {p} (want {want_p}), Envoy {e} (want {want_e})"
            ));
        }
        // What reached the app through Palisade: never the forged token; no token that a
        // non-forwarding rule verified; B's tokens as they came.
        if let Some((got_target, got_headers)) = seen {
            let text = format!("{got_target} {got_headers}");
            if text.contains(&forged) && *w == 0 {
                failures.push(format!("{what}: the forged token reached the app: {text}"));
            }
            for tok in verified {
                let sent = target.contains(tok.as_str())
                    || headers.iter().any(|(_, v)| v.contains(tok.as_str()));
                let kept = text.contains(tok.as_str());
                let forwarded = tok == &carol;
                if sent && kept != forwarded {
                    failures.push(format!(
                        "{what}: token of {} {} the app: {text}",
                        if forwarded {
                            "B (forwarded)"
                        } else {
                            "A (not forwarded)"
                        },
                        if kept { "reached" } else { "did not reach" }
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- Envoy (multi) log:\n{}",
        failures.join("\n"),
        em.proc.stderr_text()
    );

    // The request identity is the header token's, as in Envoy's metadata: the claim header the
    // app reads last is alice's; bob's (from the query) comes first.
    let (s, seen) = send(
        &proxies[0].0,
        &format!("/x?access_token={bob}"),
        &[auth(&alice)],
    )
    .await;
    assert_eq!(s, 200);
    let (got_target, got_headers) = seen.unwrap();
    assert_eq!(got_target, "/x");
    assert_eq!(got_headers["x-jwt-sub"], json!(["bob", "alice"]));
    assert!(got_headers.get("authorization").is_none(), "{got_headers}");
    let _ = eh;
}
