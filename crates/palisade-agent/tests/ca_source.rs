//! The agent's CA source against the real CA, in process, over TLS and gRPC: a fresh key per
//! certificate, the token re-read each time, key types, ClusterID, reconnection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade_agent::{CaSource, CaSourceConfig, CertificateSource, FetchError, TokenFile};
use palisade_ca::{CaOptions, CaServer, ISTIO_CA_AUDIENCE, TokenIssuer};
use palisade_identity::{KeyAlgorithm, KeyType, TrustDomain};
use time::OffsetDateTime;

struct Ca {
    addr: String,
    root_pem: Vec<u8>,
    state: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ca {
    async fn start(state: &Path, cluster_id: Option<&str>, addr: &str) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut options = CaOptions::new(state, TrustDomain::new("cluster.local").unwrap());
        options.cluster_id = cluster_id.map(str::to_owned);
        let mut registry = prometheus_client::registry::Registry::default();
        let server = CaServer::prepare(options, &mut registry).await.unwrap();
        let root_pem = std::fs::read(server.root_cert_path()).unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            root_pem,
            state: state.to_owned(),
            stop: Some(stop),
            task,
        }
    }

    fn token(&self, sa: &str, file: &Path) {
        let issuer = TokenIssuer::load_or_create(&self.state).unwrap();
        let jwt = issuer
            .issue(
                "demo",
                sa,
                &[ISTIO_CA_AUDIENCE.to_owned()],
                Duration::from_secs(600),
            )
            .unwrap();
        std::fs::write(file, jwt).unwrap();
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A graceful stop: `serve` then stops its accept loop and frees the port.
        let stopped = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        assert!(stopped.is_ok(), "the CA did not stop");
    }

    fn source(&self, token: &Path, key_type: KeyType, cluster_id: Option<&str>) -> CaSource {
        CaSource::new(CaSourceConfig {
            ca_addr: self.addr.clone(),
            ca_root_pem: self.root_pem.clone(),
            token: TokenFile::new(token),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            key_type,
            ttl: Some(Duration::from_secs(600)),
            cluster_id: cluster_id.map(str::to_owned),
            connect_timeout: Duration::from_secs(2),
        })
    }
}

#[tokio::test]
async fn every_certificate_has_a_fresh_key_and_the_tokens_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(&dir.path().join("state"), None, "127.0.0.1:0").await;
    let token = dir.path().join("token");
    ca.token("client", &token);

    for (key_type, algorithm) in [
        (KeyType::EcdsaP256, KeyAlgorithm::EcdsaP256),
        (KeyType::Rsa2048, KeyAlgorithm::Rsa { bits: 2048 }),
    ] {
        let source = ca.source(&token, key_type, None);
        let first = source.fetch().await.unwrap();
        let second = source.fetch().await.unwrap();
        for issued in [&first, &second] {
            let leaf = issued.svid.leaf_info();
            assert_eq!(
                issued.svid.spiffe_id().to_string(),
                "spiffe://cluster.local/ns/demo/sa/client"
            );
            assert_eq!(leaf.key_algorithm, algorithm);
            let left = leaf.not_after - OffsetDateTime::now_utc();
            assert!(
                left <= time::Duration::seconds(600) && left > time::Duration::seconds(590),
                "{left}"
            );
            // The root came back separately, not inside the served chain.
            assert_eq!(
                issued.roots,
                palisade_identity::pem::parse_certs(&ca.root_pem).unwrap()
            );
            assert_eq!(issued.svid.chain().len(), 1);
        }
        assert_ne!(
            first.svid.private_key_pem(),
            second.svid.private_key_pem(),
            "a renewal reuses the key"
        );
        assert_ne!(
            first.svid.leaf_info().serial,
            second.svid.leaf_info().serial
        );
    }
    ca.stop().await;
}

#[tokio::test]
async fn the_token_is_read_again_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(&dir.path().join("state"), None, "127.0.0.1:0").await;
    let token = dir.path().join("token");
    let source = ca.source(&token, KeyType::EcdsaP256, None);

    ca.token("first", &token);
    let a = source.fetch().await.unwrap();
    ca.token("second", &token);
    let b = source.fetch().await.unwrap();
    assert!(a.svid.spiffe_id().to_string().ends_with("/sa/first"));
    assert!(b.svid.spiffe_id().to_string().ends_with("/sa/second"));

    std::fs::remove_file(&token).unwrap();
    let err = source.fetch().await.unwrap_err();
    assert_eq!(err.reason(), "token");
    assert!(
        err.to_string().contains(&token.display().to_string()),
        "{err}"
    );
    ca.stop().await;
}

#[tokio::test]
async fn cluster_id_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(&dir.path().join("state"), Some("east"), "127.0.0.1:0").await;
    let token = dir.path().join("token");
    ca.token("client", &token);
    assert!(
        ca.source(&token, KeyType::EcdsaP256, Some("east"))
            .fetch()
            .await
            .is_ok()
    );
    let err = ca
        .source(&token, KeyType::EcdsaP256, Some("west"))
        .fetch()
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Refused { .. }),
        "{err:?}: another cluster's request must be refused"
    );
    assert_eq!(err.reason(), "unauthenticated", "{err}");
    ca.stop().await;
}

#[tokio::test]
async fn reconnects_after_the_ca_restarts_and_refuses_a_ca_with_another_root() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ca = Ca::start(&state, None, "127.0.0.1:0").await;
    let addr = ca.addr.clone();
    let token = dir.path().join("token");
    ca.token("client", &token);
    let source = ca.source(&token, KeyType::EcdsaP256, None);
    source.fetch().await.unwrap();
    ca.stop().await;

    let err = source.fetch().await.unwrap_err();
    assert_eq!(err.reason(), "connect", "{err}");

    // Same state, same port: the same source gets certificates again.
    let ca = Ca::start(&state, None, &addr).await;
    source.fetch().await.unwrap();

    // A CA whose certificate does not chain to the configured root is not trusted.
    let other = Ca::start(&dir.path().join("other-state"), None, "127.0.0.1:0").await;
    let config_pointing_elsewhere = CaSource::new(CaSourceConfig {
        ca_addr: other.addr.clone(),
        ca_root_pem: ca.root_pem.clone(),
        token: TokenFile::new(&token),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        key_type: KeyType::EcdsaP256,
        ttl: None,
        cluster_id: None,
        connect_timeout: Duration::from_secs(2),
    });
    let err = config_pointing_elsewhere.fetch().await.unwrap_err();
    assert_eq!(err.reason(), "connect", "{err}");
    ca.stop().await;
    other.stop().await;
}
