//! Real TLS handshakes on loopback with rcgen-made SVIDs.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

fn test_ca(org: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = p.self_signed(&key).unwrap().der().clone();
    TestCa {
        issuer: Issuer::new(p, key),
        root,
    }
}

fn svid(ca: &TestCa, id: &str) -> Svid {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(2);
    p.not_after = now + time::Duration::hours(1);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Svid::from_pem(
        format!("{}{}", cert.pem(), crate::pem::cert_to_pem(&ca.root)).as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .unwrap()
}

fn bundle(ca: &TestCa, td: &str, aliases: &[&str]) -> TrustBundle {
    TrustBundle::new(TrustDomain::new(td).unwrap(), vec![ca.root.clone()])
        .unwrap()
        .with_aliases(aliases.iter().map(|a| TrustDomain::new(a).unwrap()))
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// Outcome of one handshake plus a small exchange: each side's view of the peer's SPIFFE ID.
#[derive(Debug)]
struct Outcome {
    server: Result<Option<SpiffeId>, String>,
    client: Result<Option<SpiffeId>, String>,
}

async fn handshake(server: ServerConfig, client: ClientConfig) -> Outcome {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = peer_spiffe_id(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let client = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("palisade.invalid").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_spiffe_id(tls.get_ref().1.peer_certificates());
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        // With TLS 1.3 the server judges the client certificate after the client finished its
        // side: a refusal shows up here, as an alert or EOF.
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    }
    .await;
    let server = server_task.await.unwrap();
    Outcome { server, client }
}

#[tokio::test]
async fn mtls_table() {
    let mesh = test_ca("cluster.local");
    let foreign = test_ca("elsewhere");
    let server_id = "spiffe://cluster.local/ns/prod/sa/server";
    let client_id = "spiffe://cluster.local/ns/prod/sa/client";

    struct Case {
        name: &'static str,
        server_svid: Svid,
        client_svid: Option<Svid>,
        server_bundle_aliases: &'static [&'static str],
        expected: ServerIdentity,
        client_auth: ClientAuth,
        /// Ok(client id seen by the server) or the text the failing side's error contains.
        want: Result<Option<&'static str>, &'static str>,
    }
    let cases = vec![
        Case {
            name: "right SAN accepted both ways",
            server_svid: svid(&mesh, server_id),
            client_svid: Some(svid(&mesh, client_id)),
            server_bundle_aliases: &[],
            expected: ServerIdentity::OneOf(vec![id(server_id)]),
            client_auth: ClientAuth::Required,
            want: Ok(Some(client_id)),
        },
        Case {
            name: "wrong server SAN refused by the client",
            server_svid: svid(&mesh, "spiffe://cluster.local/ns/prod/sa/impostor"),
            client_svid: Some(svid(&mesh, client_id)),
            server_bundle_aliases: &[],
            expected: ServerIdentity::OneOf(vec![id(server_id)]),
            client_auth: ClientAuth::Required,
            want: Err("is not one of the expected"),
        },
        Case {
            name: "server from a foreign CA refused",
            server_svid: svid(&foreign, server_id),
            client_svid: Some(svid(&mesh, client_id)),
            server_bundle_aliases: &[],
            expected: ServerIdentity::OneOf(vec![id(server_id)]),
            client_auth: ClientAuth::Required,
            want: Err("UnknownIssuer"),
        },
        Case {
            name: "client from a foreign CA refused",
            server_svid: svid(&mesh, server_id),
            client_svid: Some(svid(&foreign, client_id)),
            server_bundle_aliases: &[],
            expected: ServerIdentity::TrustDomain,
            client_auth: ClientAuth::Required,
            want: Err("UnknownIssuer"),
        },
        Case {
            name: "client in an alias trust domain accepted",
            server_svid: svid(&mesh, server_id),
            client_svid: Some(svid(&mesh, "spiffe://old.domain/ns/prod/sa/client")),
            server_bundle_aliases: &["old.domain"],
            expected: ServerIdentity::TrustDomain,
            client_auth: ClientAuth::Required,
            want: Ok(Some("spiffe://old.domain/ns/prod/sa/client")),
        },
        Case {
            name: "client in an unknown trust domain refused",
            server_svid: svid(&mesh, server_id),
            client_svid: Some(svid(&mesh, "spiffe://other.domain/ns/prod/sa/client")),
            server_bundle_aliases: &["old.domain"],
            expected: ServerIdentity::TrustDomain,
            client_auth: ClientAuth::Required,
            want: Err("outside trust domains"),
        },
        Case {
            name: "missing client certificate refused when required",
            server_svid: svid(&mesh, server_id),
            client_svid: None,
            server_bundle_aliases: &[],
            expected: ServerIdentity::TrustDomain,
            client_auth: ClientAuth::Required,
            want: Err("CertificateRequired"),
        },
        Case {
            name: "missing client certificate fine when optional",
            server_svid: svid(&mesh, server_id),
            client_svid: None,
            server_bundle_aliases: &[],
            expected: ServerIdentity::TrustDomain,
            client_auth: ClientAuth::Optional,
            want: Ok(None),
        },
        Case {
            name: "server path check",
            server_svid: svid(&mesh, server_id),
            client_svid: None,
            server_bundle_aliases: &[],
            expected: ServerIdentity::Path("/ns/prod/sa/server".to_owned()),
            client_auth: ClientAuth::Optional,
            want: Ok(None),
        },
        Case {
            name: "server path mismatch",
            server_svid: svid(&mesh, server_id),
            client_svid: None,
            server_bundle_aliases: &[],
            expected: ServerIdentity::Path("/ns/istio-system/sa/istiod".to_owned()),
            client_auth: ClientAuth::Optional,
            want: Err("is not /ns/istio-system/sa/istiod"),
        },
        Case {
            name: "server outside the client's trust domain",
            server_svid: svid(&mesh, "spiffe://other.domain/ns/prod/sa/server"),
            client_svid: None,
            server_bundle_aliases: &[],
            expected: ServerIdentity::TrustDomain,
            client_auth: ClientAuth::Optional,
            want: Err("outside trust domains"),
        },
    ];

    for case in cases {
        let server_bundle = bundle(&mesh, "cluster.local", case.server_bundle_aliases);
        let client_bundle = bundle(&mesh, "cluster.local", &[]);
        let server_cfg =
            server_config(&case.server_svid, &server_bundle, case.client_auth).unwrap();
        let client_cfg = client_config(
            case.client_svid.as_ref().map(CertSource::from),
            &client_bundle,
            case.expected.clone(),
        )
        .unwrap();
        let out = handshake(server_cfg, client_cfg).await;
        match case.want {
            Ok(client_seen) => {
                let server_seen = out.server.unwrap_or_else(|e| panic!("{}: {e}", case.name));
                assert_eq!(
                    server_seen.map(|i| i.to_string()).as_deref(),
                    client_seen,
                    "{}",
                    case.name
                );
                let client_saw = out.client.unwrap_or_else(|e| panic!("{}: {e}", case.name));
                assert_eq!(
                    client_saw.unwrap().to_string(),
                    case.server_svid.spiffe_id().to_string(),
                    "{}",
                    case.name
                );
            }
            Err(text) => {
                assert!(
                    out.client.is_err(),
                    "{}: client succeeded: {out:?}",
                    case.name
                );
                let errors = format!("{:?} {:?}", out.server, out.client);
                assert!(
                    errors.contains(text),
                    "{}: expected {text:?} in {errors}",
                    case.name
                );
            }
        }
    }
}

#[tokio::test]
async fn tls12_peer_still_works() {
    let mesh = test_ca("cluster.local");
    let b = bundle(&mesh, "cluster.local", &[]);
    let server = server_config(
        svid(&mesh, "spiffe://cluster.local/ns/a/sa/s"),
        &b,
        ClientAuth::Required,
    )
    .unwrap();
    let client = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            b.clone(),
            ServerIdentity::TrustDomain,
        ))
        .with_client_cert_resolver(SvidResolver::new(&svid(
            &mesh,
            "spiffe://cluster.local/ns/a/sa/c",
        )));
    let out = handshake(server, client).await;
    assert_eq!(
        out.server.unwrap().unwrap().to_string(),
        "spiffe://cluster.local/ns/a/sa/c"
    );
}

/// `meshMTLS.minProtocolVersion: TLSV1_3`: the server offers TLS 1.3 only, so a TLS 1.2-only
/// client is refused while a default client still gets in.
#[tokio::test]
async fn tls13_minimum_refuses_a_tls12_client() {
    let mesh = test_ca("cluster.local");
    let b = bundle(&mesh, "cluster.local", &[]);
    let server = server_config_min(
        svid(&mesh, "spiffe://cluster.local/ns/a/sa/s"),
        &b,
        ClientAuth::Required,
        MinTlsVersion::Tls13,
    )
    .unwrap();
    let offered: Vec<_> = MinTlsVersion::Tls13
        .versions()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(offered, [rustls::ProtocolVersion::TLSv1_3]);
    let tls12_client = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            b.clone(),
            ServerIdentity::TrustDomain,
        ))
        .with_client_cert_resolver(SvidResolver::new(&svid(
            &mesh,
            "spiffe://cluster.local/ns/a/sa/c",
        )));
    let out = handshake(server.clone(), tls12_client).await;
    let errors = format!("{:?} {:?}", out.server, out.client);
    assert!(out.server.is_err(), "server accepted TLS 1.2: {errors}");
    assert!(
        errors.contains("PeerIncompatible") || errors.contains("ProtocolVersion"),
        "not refused for its version: {errors}"
    );
    let client = client_config(
        Some(CertSource::Fixed(Box::new(svid(
            &mesh,
            "spiffe://cluster.local/ns/a/sa/c",
        )))),
        &b,
        ServerIdentity::TrustDomain,
    )
    .unwrap();
    let out = handshake(server, client).await;
    assert_eq!(
        out.server.unwrap().unwrap().to_string(),
        "spiffe://cluster.local/ns/a/sa/c"
    );
}

#[tokio::test]
async fn resolver_rotation_serves_the_new_svid() {
    let mesh = test_ca("cluster.local");
    let b = bundle(&mesh, "cluster.local", &[]);
    let first = svid(&mesh, "spiffe://cluster.local/ns/a/sa/s");
    let second = svid(&mesh, "spiffe://cluster.local/ns/a/sa/s2");
    let resolver = SvidResolver::new(&first);
    let server = server_config(Arc::clone(&resolver), &b, ClientAuth::Optional).unwrap();
    let client = client_config(None, &b, ServerIdentity::TrustDomain).unwrap();
    let out = handshake(server.clone(), client.clone()).await;
    assert_eq!(out.client.unwrap().unwrap(), *first.spiffe_id());
    resolver.update(&second);
    // A fresh client: a resumed session would report the certificate of the first handshake.
    let client = client_config(None, &b, ServerIdentity::TrustDomain).unwrap();
    let out = handshake(server, client).await;
    assert_eq!(out.client.unwrap().unwrap(), *second.spiffe_id());
}

#[test]
fn svid_refuses_a_mismatched_key() {
    let mesh = test_ca("cluster.local");
    let good = svid(&mesh, "spiffe://cluster.local/ns/a/sa/s");
    let other_key = KeyPair::generate().unwrap();
    let err = Svid::from_pem(
        good.chain_pem().as_bytes(),
        other_key.serialize_pem().as_bytes(),
    )
    .unwrap_err();
    assert!(matches!(err, TlsError::Key(_)), "{err}");
    assert!(matches!(
        Svid::new(vec![], good.private_key().clone_key()),
        Err(TlsError::EmptyChain)
    ));
    assert_eq!(good.chain().len(), 2);
    assert!(good.not_after() > good.not_before());
}
