//! The CA over real gRPC + TLS on loopback, with the crate's own client: issuance, renewal by
//! client certificate, refusals with their status codes, metrics, garbage on the port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use palisade_ca::metrics::Registry;
use palisade_ca::{CaClient, CaClientOptions, CaOptions, CaServer, TokenIssuer};
use palisade_identity::{
    CertInfo, CertSource, KeyType, ServerIdentity, SpiffeId, Svid, TrustDomain,
};
use tokio::io::AsyncWriteExt;

struct Running {
    addr: String,
    root_pem: Vec<u8>,
    tokens: TokenIssuer,
    metrics: palisade_ca::metrics::CaMetrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), palisade_ca::CaError>>,
    _state: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn start() -> Running {
    let state = tempfile::tempdir().unwrap();
    let options = CaOptions::new(state.path(), TrustDomain::new("cluster.local").unwrap());
    let mut registry = Registry::default();
    let server = CaServer::prepare(options, &mut registry).await.unwrap();
    let metrics = server.metrics().clone();
    let root_pem = std::fs::read(server.root_cert_path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    let tokens = TokenIssuer::load_or_create(state.path()).unwrap();
    Running {
        addr,
        root_pem,
        tokens,
        metrics,
        stop: Some(tx),
        task,
        _state: state,
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn token(r: &Running, ns: &str, sa: &str) -> String {
    r.tokens
        .issue(ns, sa, &["istio-ca".to_owned()], Duration::from_secs(600))
        .unwrap()
}

#[tokio::test]
async fn issue_renew_and_refuse() {
    let ca = start().await;
    let client = CaClient::connect(&ca.addr, &ca.root_pem, CaClientOptions::default())
        .await
        .unwrap();
    assert_eq!(
        client.server_identity().unwrap().to_string(),
        "spiffe://cluster.local/ns/istio-system/sa/palisade-controlplane"
    );
    let web = id("spiffe://cluster.local/ns/default/sa/web");

    // First issuance by token.
    let kc = palisade_identity::generate_key_and_csr(&web, KeyType::EcdsaP256).unwrap();
    let chain = client
        .create_certificate(&kc.csr_pem, Some(&token(&ca, "default", "web")), None, None)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].as_bytes(), ca.root_pem.as_slice(), "root last");
    let svid = Svid::from_pem(chain.concat().as_bytes(), kc.key.pem.as_bytes()).unwrap();
    assert_eq!(svid.spiffe_id(), &web);

    // Renewal: the client certificate alone authenticates, no token.
    let renewing = CaClient::connect(
        &ca.addr,
        &ca.root_pem,
        CaClientOptions {
            client_cert: Some(CertSource::from(&svid)),
            ..CaClientOptions::default()
        },
    )
    .await
    .unwrap();
    let next = palisade_identity::generate_key_and_csr(&web, KeyType::Rsa2048).unwrap();
    let renewed = renewing
        .create_certificate(&next.csr_pem, None, Some(Duration::from_secs(3600)), None)
        .await
        .unwrap();
    let info =
        CertInfo::parse(&palisade_identity::pem::parse_certs(renewed[0].as_bytes()).unwrap()[0])
            .unwrap();
    assert_eq!(info.spiffe_id().unwrap(), web);
    assert_eq!(info.lifetime(), time::Duration::seconds(3600 + 120));
    // ... but only for its own identity.
    let other = palisade_identity::generate_key_and_csr(
        &id("spiffe://cluster.local/ns/kube-system/sa/admin"),
        KeyType::EcdsaP256,
    )
    .unwrap();
    let err = renewing
        .create_certificate(&other.csr_pem, None, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");

    // Refusals over the wire: status code and message.
    // (name, CSR, token, TTL seconds, expected code, expected message prefix)
    type Case<'a> = (&'a str, String, Option<String>, i64, tonic::Code, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no token",
            kc.csr_pem.clone(),
            None,
            0,
            tonic::Code::Unauthenticated,
            "request authenticate failure",
        ),
        (
            "garbage token",
            kc.csr_pem.clone(),
            Some("not.a.token".to_owned()),
            0,
            tonic::Code::Unauthenticated,
            "request authenticate failure",
        ),
        (
            "token for another namespace",
            kc.csr_pem.clone(),
            Some(token(&ca, "other", "web")),
            0,
            tonic::Code::InvalidArgument,
            "CSR asks for identity spiffe://cluster.local/ns/default/sa/web but the caller is spiffe://cluster.local/ns/other/sa/web",
        ),
        (
            "TTL above 90 days",
            kc.csr_pem.clone(),
            Some(token(&ca, "default", "web")),
            91 * 86_400,
            tonic::Code::InvalidArgument,
            "requested TTL 7862400s is greater than the max allowed TTL 7776000s",
        ),
        (
            "random bytes as CSR",
            "\u{7}\u{0}random\u{1f}bytes".to_owned(),
            Some(token(&ca, "default", "web")),
            0,
            tonic::Code::InvalidArgument,
            "CSR is not PEM",
        ),
    ];
    for (name, csr, tok, ttl, code, message) in cases {
        let mut request = tonic::Request::new(palisade_ca::pb::IstioCertificateRequest {
            csr,
            validity_duration: ttl,
            metadata: None,
        });
        if let Some(t) = tok {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        // The raw gRPC stub, to send exactly what each case needs.
        let status = raw_call(&ca, request).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().starts_with(message),
            "{name}: {:?} does not start with {message:?}",
            status.message()
        );
    }
    assert_eq!(ca.metrics.issued.get(), 2);
    assert_eq!(ca.metrics.refused_count("token_missing"), 1);
    assert_eq!(ca.metrics.refused_count("token_malformed"), 1);
    assert_eq!(ca.metrics.refused_count("csr_identity_mismatch"), 2);
    assert_eq!(ca.metrics.refused_count("ttl"), 1);
    assert_eq!(ca.metrics.refused_count("csr_malformed"), 1);
    ca.stop().await;
}

/// Calls CreateCertificate through the crate's client transport with a hand-built request.
async fn raw_call(
    ca: &Running,
    request: tonic::Request<palisade_ca::pb::IstioCertificateRequest>,
) -> Result<Vec<String>, tonic::Status> {
    let client = CaClient::connect(&ca.addr, &ca.root_pem, CaClientOptions::default())
        .await
        .unwrap();
    client.call_raw(request).await
}

#[tokio::test]
async fn garbage_on_the_port_does_not_disturb_the_server() {
    let ca = start().await;
    // Several garbage streams, one left open and silent, one closing mid-handshake.
    let mut silent = tokio::net::TcpStream::connect(&ca.addr).await.unwrap();
    silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    for n in 0..5u8 {
        let mut s = tokio::net::TcpStream::connect(&ca.addr).await.unwrap();
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(n))
            .collect();
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
    }
    let client = CaClient::connect(&ca.addr, &ca.root_pem, CaClientOptions::default())
        .await
        .unwrap();
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let kc = palisade_identity::generate_key_and_csr(&web, KeyType::EcdsaP256).unwrap();
    let chain = client
        .create_certificate(&kc.csr_pem, Some(&token(&ca, "default", "web")), None, None)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    // The handshake failures were counted (the silent one is still pending).
    for _ in 0..50 {
        if ca.metrics.handshake_failures.get() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ca.metrics.handshake_failures.get() >= 5);
    drop(silent);
    ca.stop().await;
}

#[tokio::test]
async fn client_checks_the_ca_identity() {
    let ca = start().await;
    // The CA's certificate is for cluster.local: a client expecting another trust domain or
    // another identity refuses it.
    for options in [
        CaClientOptions {
            trust_domain: Some(TrustDomain::new("example.org").unwrap()),
            ..CaClientOptions::default()
        },
        CaClientOptions {
            server_identity: Some(ServerIdentity::OneOf(vec![id(
                "spiffe://cluster.local/ns/istio-system/sa/istiod",
            )])),
            ..CaClientOptions::default()
        },
    ] {
        let err = CaClient::connect(&ca.addr, &ca.root_pem, options)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }
    // A client trusting another root refuses it too.
    let other = tempfile::tempdir().unwrap();
    let other_root = palisade_ca::Signer::load_or_create_root(
        other.path(),
        &TrustDomain::new("cluster.local").unwrap(),
        palisade_ca::CaKeyType::EcdsaP256,
    )
    .unwrap();
    let other_pem = palisade_identity::pem::certs_to_pem(other_root.roots());
    let err = CaClient::connect(&ca.addr, other_pem.as_bytes(), CaClientOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
    ca.stop().await;
}
