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
        evict_unused_after: Duration::from_secs(7 * 24 * 3600),
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
    assert_eq!(pushed_jwks(&resolver, &inline).0, "{\"keys\": []}");
    // The old source is unused now, but kept: the rule that comes back has its keys at once,
    // without waiting for a fetch.
    assert!(
        resolver.inner.entries.lock().unwrap()[&Source::Issuer(format!("http://{}", srv.addr))]
            .unused_since
            .borrow()
            .is_some(),
        "the old source is marked unused"
    );
    srv.mode.store(0, Ordering::SeqCst);
    resolver.sync(&snap);
    assert!(pushed_jwks(&resolver, &snap).0.contains("\"k1\""));
}

/// A loopback URL where nothing listens: fetches fail at once, without a server to keep.
fn closed_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/keys", l.local_addr().unwrap())
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const MINUTE: Duration = Duration::from_secs(60);

/// Virtual time (the clock is paused and jumps to the next timer): seven days take no time.
/// Fetches still run (and fail fast); they may hold the clock for a moment, so the checks keep
/// a minute of margin either side of the eviction time.
#[tokio::test(start_paused = true)]
async fn sources_unused_for_seven_days_are_evicted() {
    let url = closed_url();
    let with = snapshot(&format!("{{issuer: iss, jwksUri: \"{url}\"}}"));
    let without = snapshot(r#"{issuer: iss, jwks: "{\"keys\": []}"}"#);
    let source = Source::Uri(url);
    let resolver = JwksResolver::new(JwksOptions::default());
    assert_eq!(
        resolver.inner.options.evict_unused_after,
        7 * DAY,
        "the default"
    );
    let cached = |r: &JwksResolver| r.cached_sources().contains(&source);

    // In use: never evicted, however long.
    resolver.sync(&with);
    tokio::time::sleep(8 * DAY).await;
    assert!(cached(&resolver), "a source in use was evicted");

    // Unused from now on: kept for seven days, then evicted.
    resolver.sync(&without);
    tokio::time::sleep(2 * DAY).await;
    // Used again, then unused again: the seven days start over.
    resolver.sync(&with);
    resolver.sync(&without);
    tokio::time::sleep(7 * DAY - MINUTE).await;
    assert!(
        cached(&resolver),
        "evicted before seven days unused (counted from the first time it went unused?)"
    );
    tokio::time::sleep(2 * MINUTE).await;
    assert!(!cached(&resolver), "still cached after seven days unused");

    // A rule that names it again starts afresh.
    resolver.sync(&with);
    assert!(cached(&resolver));
}

/// The refresh task evicts on time by itself: no later reload is needed.
#[tokio::test(start_paused = true)]
async fn eviction_follows_the_configured_age() {
    let url = closed_url();
    let with = snapshot(&format!("{{issuer: iss, jwksUri: \"{url}\"}}"));
    let without = snapshot(r#"{issuer: iss, jwks: "{\"keys\": []}"}"#);
    let options = JwksOptions {
        evict_unused_after: DAY,
        ..JwksOptions::default()
    };
    let resolver = JwksResolver::new(options);
    resolver.sync(&with);
    resolver.sync(&without);
    tokio::time::sleep(DAY - MINUTE).await;
    assert_eq!(resolver.cached_sources().len(), 1);
    tokio::time::sleep(2 * MINUTE).await;
    assert!(resolver.cached_sources().is_empty());
}

#[test]
fn timings_from_mesh_yaml_and_the_environment() {
    let mesh = palisade_policy::mesh::MeshConfig::from_yaml(
        "jwksResolver: {refreshInterval: 5m, retryInitialInterval: 10s, retryMaxInterval: 30m, evictUnusedAfter: 48h}",
        "mesh.yaml",
    )
    .unwrap();
    let from_mesh = JwksOptions::from(mesh.jwks_timings());
    let none = |_: &str| None;
    assert_eq!(
        from_mesh.with_env(none),
        JwksOptions {
            refresh: Duration::from_secs(300),
            retry_initial: Duration::from_secs(10),
            retry_max: Duration::from_secs(1800),
            evict_unused_after: 2 * DAY,
        }
    );
    // The environment wins over mesh.yaml.
    let env = |k: &str| match k {
        ENV_REFRESH => Some("2s".to_owned()),
        ENV_RETRY => Some("1s".to_owned()),
        _ => None,
    };
    assert_eq!(
        from_mesh.with_env(env),
        JwksOptions {
            refresh: Duration::from_secs(2),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            evict_unused_after: 2 * DAY,
        }
    );
    // Invalid values are ignored (and logged): mesh.yaml stays in force.
    let bad = |k: &str| (k == ENV_REFRESH).then(|| "often".to_owned());
    assert_eq!(from_mesh.with_env(bad), from_mesh);
    let zero = |k: &str| (k == ENV_RETRY).then(|| "0s".to_owned());
    assert_eq!(from_mesh.with_env(zero), from_mesh);
    // A long retry never makes the maximum shorter than the first delay.
    let long = |k: &str| (k == ENV_RETRY).then(|| "2h".to_owned());
    let o = from_mesh.with_env(long);
    assert_eq!(
        (o.retry_initial, o.retry_max),
        (
            2 * 3600 * Duration::from_secs(1),
            2 * 3600 * Duration::from_secs(1)
        )
    );
    // Without mesh.yaml settings: the defaults.
    assert_eq!(
        JwksOptions::default(),
        JwksOptions::from(palisade_policy::mesh::JwksTimings::default())
    );
}

#[tokio::test]
async fn fetches_are_counted_by_result() {
    let srv = server().await;
    let snap = snapshot(&format!(
        "{{issuer: iss, jwksUri: \"http://{}/keys\"}}",
        srv.addr
    ));
    let metrics = ControlMetrics::default();
    let resolver = JwksResolver::with_metrics(fast(), metrics.clone());
    resolver.sync(&snap);
    wait_for(&resolver, &snap, "500").await;
    srv.mode.store(1, Ordering::SeqCst);
    wait_for(&resolver, &snap, "\"k1\"").await;
    assert!(metrics.jwks_fetch_count(false) >= 1);
    assert!(metrics.jwks_fetch_count(true) >= 1);
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
