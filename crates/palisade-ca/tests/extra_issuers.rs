//! Token issuers from the mesh config: JWKS from a file, from an http URI served on loopback,
//! and inline. Each issuer's tokens authenticate at the CA; others are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use palisade_ca::jwks::{IssuerConfig, JwksSource};
use palisade_ca::metrics::Registry;
use palisade_ca::{CaClient, CaClientOptions, CaOptions, CaServer, TokenIssuer};
use palisade_identity::{KeyType, SpiffeId, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn issuer(name: &str) -> TokenIssuer {
    let key = rcgen::KeyPair::generate().unwrap();
    TokenIssuer::from_pem(name, key.serialize_pem().as_bytes()).unwrap()
}

/// Serves `body` as application/json to every request, on loopback.
async fn json_server(body: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/keys.json"), task)
}

#[tokio::test]
async fn file_uri_and_inline_issuers() {
    let from_file = issuer("https://file.issuer.test");
    let from_uri = issuer("https://uri.issuer.test");
    let inline = issuer("https://inline.issuer.test");
    let unknown = issuer("https://unknown.issuer.test");

    let state = tempfile::tempdir().unwrap();
    let jwks_file = state.path().join("file-jwks.json");
    std::fs::write(&jwks_file, serde_json::to_string(from_file.jwks()).unwrap()).unwrap();
    let (uri, http) = json_server(serde_json::to_string(from_uri.jwks()).unwrap()).await;
    assert!(
        palisade_ca::jwks::load(&JwksSource::Uri(uri.clone()))
            .await
            .is_ok()
    );

    let td = TrustDomain::new("example.org").unwrap();
    let mut options = CaOptions::new(state.path(), td.clone());
    options.extra_issuers = vec![
        IssuerConfig {
            issuer: from_file.issuer().to_owned(),
            jwks: JwksSource::File(jwks_file),
        },
        IssuerConfig {
            issuer: from_uri.issuer().to_owned(),
            jwks: JwksSource::Uri(uri),
        },
        IssuerConfig {
            issuer: inline.issuer().to_owned(),
            jwks: JwksSource::Inline(serde_json::to_string(inline.jwks()).unwrap()),
        },
    ];
    let mut registry = Registry::default();
    let server = CaServer::prepare(options, &mut registry).await.unwrap();
    let metrics = server.metrics().clone();
    let root = std::fs::read(server.root_cert_path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));

    let client = CaClient::connect(&addr, &root, CaClientOptions::default())
        .await
        .unwrap();
    assert_eq!(
        client.server_identity().unwrap().trust_domain().as_str(),
        "example.org"
    );
    let id = SpiffeId::for_service_account(td, "team", "svc").unwrap();
    let csr = palisade_identity::generate_key_and_csr(&id, KeyType::EcdsaP256)
        .unwrap()
        .csr_pem;
    let aud = ["istio-ca".to_owned()];
    let ttl = Duration::from_secs(300);
    for (name, tokens, accepted) in [
        ("file", &from_file, true),
        ("uri", &from_uri, true),
        ("inline", &inline, true),
        ("unknown issuer", &unknown, false),
    ] {
        let token = tokens.issue("team", "svc", &aud, ttl).unwrap();
        let got = client
            .create_certificate(&csr, Some(&token), None, None)
            .await;
        assert_eq!(got.is_ok(), accepted, "{name}: {got:?}");
    }
    assert_eq!(metrics.refused_count("token_issuer"), 1);

    let bad = [
        JwksSource::Inline("{not json".to_owned()),
        JwksSource::File(state.path().join("missing.json")),
        JwksSource::Uri("ftp://example.invalid/keys".to_owned()),
    ];
    for source in bad {
        assert!(
            palisade_ca::jwks::load(&source).await.is_err(),
            "{source:?}"
        );
    }
    let _ = tx.send(());
    serving.await.unwrap().unwrap();
    http.abort();
}
