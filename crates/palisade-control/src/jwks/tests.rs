//! The resolver against a real HTTP server on loopback that can be switched off.

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"k1","n":"sXch","e":"AQAB"},{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}"#;

/// 0: down (500), 1: serves JWKS, 2: serves another JWKS.
struct Server {
    addr: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    let task = tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let m = m.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tcp.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let (status, body) = match m.load(Ordering::SeqCst) {
                    0 => ("500 Internal Server Error", String::new()),
                    _ if req.starts_with("GET /.well-known/openid-configuration") => (
                        "200 OK",
                        format!("{{\"jwks_uri\": \"http://{addr}/keys\"}}"),
                    ),
                    1 => ("200 OK", JWKS.to_owned()),
                    _ => ("200 OK", JWKS.replace("k1", "k2")),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            });
        }
    });
    Server { addr, mode, task }
}

fn snapshot(rule: &str) -> MeshSnapshot {
    let files = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: web, namespace: shop}}\nspec: {{address: 127.0.10.1, ports: {{http: 8080}}}}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  jwtRules: [{rule}]\n"
    );
    MeshSnapshot::from_sources(None, &[("w.yaml".to_owned(), files)]).unwrap()
}

fn pushed_jwks(resolver: &JwksResolver, snap: &MeshSnapshot) -> (String, String) {
    let mut cfg = crate::compute::workload_config(snap, "shop/web").unwrap();
    resolver.inline(&mut cfg);
    let r = &cfg.request_authentications[0].spec.jwt_rules[0];
    (r.jwks.clone(), r.jwks_uri.clone())
}

async fn wait_for(resolver: &JwksResolver, snap: &MeshSnapshot, want: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (doc, _) = pushed_jwks(resolver, snap);
        if doc.contains(want) {
            return doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {want:?}; last {doc}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fast() -> JwksOptions {
    JwksOptions {
        refresh: Duration::from_millis(100),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn down_at_start_then_up_then_down_keeps_last_good_keys() {
    let srv = server().await;
    let snap = snapshot(&format!(
        "{{issuer: iss, jwksUri: \"http://{}/keys\"}}",
        srv.addr
    ));
    let resolver = JwksResolver::new(fast());
    let mut changes = resolver.changes();
    resolver.sync(&snap);

    // Down at start: an empty key set that says why (fail closed).
    let doc = wait_for(&resolver, &snap, "500").await;
    let v: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["keys"], serde_json::json!([]));
    assert!(
        v[FETCH_ERROR_MEMBER].as_str().unwrap().contains("500"),
        "{doc}"
    );
    let (_, uri) = pushed_jwks(&resolver, &snap);
    assert_eq!(uri, "", "jwksUri is cleared once keys are inline");

    // Up: the retry picks the keys up and the change is announced; symmetric keys are dropped.
    srv.mode.store(1, Ordering::SeqCst);
    let doc = wait_for(&resolver, &snap, "\"k1\"").await;
    assert!(!doc.contains("oct"), "{doc}");
    tokio::time::timeout(Duration::from_secs(1), changes.changed())
        .await
        .unwrap()
        .unwrap();

    // Down again: the last good keys stay, across several failed refreshes.
    srv.mode.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pushed_jwks(&resolver, &snap).0.contains("\"k1\""));

    // Rotated at the source: the refresh brings the new keys.
    srv.mode.store(2, Ordering::SeqCst);
    wait_for(&resolver, &snap, "\"k2\"").await;
}

#[tokio::test]
async fn oidc_discovery_and_unneeded_sources() {
    let srv = server().await;
    srv.mode.store(1, Ordering::SeqCst);
    let snap = snapshot(&format!("{{issuer: \"http://{}\"}}", srv.addr));
    let resolver = JwksResolver::new(fast());
    resolver.sync(&snap);
    wait_for(&resolver, &snap, "\"k1\"").await;

    // Inline keys are never fetched or rewritten.
    let inline = snapshot(r#"{issuer: iss, jwks: "{\"keys\": []}"}"#);
    resolver.sync(&inline);
    assert!(
        resolver.inner.entries.lock().unwrap().is_empty(),
        "the old source is dropped"
    );
    assert_eq!(pushed_jwks(&resolver, &inline).0, "{\"keys\": []}");
}

#[test]
fn normalize_checks_documents() {
    assert!(normalize("nope").is_err());
    assert!(normalize(r#"{"keys": [{"kty": "oct", "k": "x"}]}"#).is_err());
    assert_eq!(
        normalize(JWKS).unwrap(),
        r#"{"keys":[{"e":"AQAB","kid":"k1","kty":"RSA","n":"sXch"}]}"#
    );
}

#[tokio::test]
async fn resources_carry_inline_keys() {
    let srv = server().await;
    let snap = snapshot(&format!(
        "{{issuer: iss, jwksUri: \"http://{}/keys\"}}",
        srv.addr
    ));
    let resolver = JwksResolver::new(fast());
    let (changes, _) = workload_resources(&snap, &[], Some(&resolver)).unwrap();
    let palisade_xds::Change::Set { body, .. } = &changes[0] else {
        panic!()
    };
    let cfg = crate::wire::from_any(body).unwrap();
    let rule = &cfg.request_authentications[0].spec.jwt_rules[0];
    assert!(
        rule.jwks_uri.is_empty() && rule.jwks.contains(FETCH_ERROR_MEMBER),
        "{rule:?}"
    );
}

#[test]
fn plaintext_sources_are_reported_once_per_rule_and_uri() {
    let resolver = JwksResolver::new(JwksOptions::default());
    let http = snapshot(r#"{issuer: "https://idp", jwksUri: "http://idp/keys"}"#);
    let first = resolver.new_plaintext_sources(&http);
    assert_eq!(
        first,
        vec![PlaintextSource {
            request_authentication: "shop/jwt".into(),
            issuer: "https://idp".into(),
            uri: "http://idp/keys".into(),
        }]
    );
    // A reload or a refresh of the same config: nothing new to say.
    assert!(resolver.new_plaintext_sources(&http).is_empty());
    // Another URI for the same rule is news; so is the first one once it came back.
    let other = snapshot(r#"{issuer: "http://idp2"}"#);
    let second = resolver.new_plaintext_sources(&other);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(
        second[0].uri,
        "http://idp2/.well-known/openid-configuration"
    );
    assert_eq!(resolver.new_plaintext_sources(&http), first);
    // https is never reported.
    let https = snapshot(r#"{issuer: "https://idp", jwksUri: "https://idp/keys"}"#);
    assert!(resolver.new_plaintext_sources(&https).is_empty());
}
