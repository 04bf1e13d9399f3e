//! The SDS server over a real Unix socket with a real tonic client speaking Envoy's API.

use std::time::Duration;

use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use palisade_xds::ClientTypeState;
use prost::Message as _;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::*;
use crate::manager::CertStatus;
use crate::test_ca::TestCa;

const ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

struct Harness {
    _dir: tempfile::TempDir,
    server: SdsServer,
    channel: Channel,
    metrics: AgentMetrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sds").join("socket");
        let metrics = AgentMetrics::default();
        let server = SdsServer::new(metrics.clone());
        let listener = SdsServer::bind(&path).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        let channel =
            Endpoint::try_from("http://sds.invalid")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .unwrap();
        Self {
            _dir: dir,
            server,
            channel,
            metrics,
            stop: Some(stop),
        }
    }

    async fn open(&self, names: &[&str]) -> Stream {
        let (tx, rx) = mpsc::channel(8);
        let mut state = ClientTypeState::new(SECRET_TYPE_URL, names.iter().map(|s| s.to_string()));
        tx.send(state.initial_request()).await.unwrap();
        let responses = SecretDiscoveryServiceClient::new(self.channel.clone())
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream {
            tx,
            responses,
            state,
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    state: ClientTypeState,
}

impl Stream {
    async fn next(&mut self) -> Result<DiscoveryResponse, Status> {
        tokio::time::timeout(Duration::from_secs(5), self.responses.next())
            .await
            .expect("an SDS message within 5 s")
            .expect("the stream is open")
    }

    /// Receives a response, ACKs it, and returns its secrets by name.
    async fn next_acked(&mut self) -> (DiscoveryResponse, Vec<Secret>) {
        let resp = self.next().await.unwrap();
        let secrets = decode(&resp);
        let ack = self.state.answer(&resp, Ok(()));
        self.tx.send(ack).await.unwrap();
        (resp, secrets)
    }

    async fn silent_for(&mut self, ms: u64) {
        let got = tokio::time::timeout(Duration::from_millis(ms), self.responses.next()).await;
        assert!(got.is_err(), "unexpected SDS message: {got:?}");
    }
}

fn decode(resp: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(resp.type_url, SECRET_TYPE_URL);
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, SECRET_TYPE_URL);
            Secret::decode(any.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline_of(ds: &Option<DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

fn state(ca: &TestCa, with_cert: bool) -> SecretState {
    SecretState {
        svid: with_cert.then(|| ca.issue(ID, Duration::from_secs(3600)).svid),
        roots: vec![ca.root.clone()],
        status: if with_cert {
            CertStatus::Active
        } else {
            CertStatus::Pending
        },
        next_attempt: None,
        last_error: None,
        consecutive_failures: 0,
        issued: u64::from(with_cert),
    }
}

#[tokio::test]
async fn serves_default_and_rootca_and_pushes_every_stream_on_rotation() {
    let h = Harness::start().await;
    let ca = TestCa::new();
    let first = state(&ca, true);
    h.server.update(&first);

    let mut cert_a = h.open(&[DEFAULT]).await;
    let mut cert_b = h.open(&[DEFAULT]).await;
    let mut roots = h.open(&[ROOTCA]).await;

    for s in [&mut cert_a, &mut cert_b] {
        let (resp, secrets) = s.next_acked().await;
        assert!(!resp.nonce.is_empty());
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].name, DEFAULT);
        let Some(secret::Type::TlsCertificate(tls)) = &secrets[0].r#type else {
            panic!("default must be a tls_certificate: {:?}", secrets[0]);
        };
        let svid = first.svid.as_ref().unwrap();
        assert_eq!(inline_of(&tls.certificate_chain), svid.chain_pem());
        assert_eq!(inline_of(&tls.private_key), svid.private_key_pem());
    }
    let (_, secrets) = roots.next_acked().await;
    let Some(secret::Type::ValidationContext(vc)) = &secrets[0].r#type else {
        panic!("ROOTCA must be a validation_context");
    };
    assert_eq!(secrets[0].name, ROOTCA);
    assert_eq!(
        inline_of(&vc.trusted_ca),
        palisade_identity::pem::certs_to_pem(std::slice::from_ref(&ca.root))
    );

    // Rotation: a new certificate reaches both `default` streams; ROOTCA did not change.
    let second = state(&ca, true);
    assert!(h.server.update(&second));
    let new_chain = second.svid.as_ref().unwrap().chain_pem();
    for s in [&mut cert_a, &mut cert_b] {
        let (resp, secrets) = s.next_acked().await;
        let Some(secret::Type::TlsCertificate(tls)) = &secrets[0].r#type else {
            panic!("tls_certificate expected");
        };
        assert_eq!(inline_of(&tls.certificate_chain), new_chain);
        assert_eq!(s.state.accepted_version(), resp.version_info);
    }
    roots.silent_for(200).await;
    assert!(h.metrics.sds_pushes.get() >= 5);
    assert_eq!(h.metrics.sds_streams.get(), 3);
}

#[tokio::test]
async fn default_waits_for_the_first_certificate_while_rootca_is_served() {
    let h = Harness::start().await;
    let ca = TestCa::new();
    h.server.update(&state(&ca, false));
    let mut both = h.open(&[DEFAULT, ROOTCA]).await;
    let (_, secrets) = both.next_acked().await;
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [ROOTCA]);

    let mut cert = h.open(&[DEFAULT]).await;
    cert.silent_for(200).await;

    h.server.update(&state(&ca, true));
    let (_, secrets) = cert.next_acked().await;
    assert_eq!(secrets[0].name, DEFAULT);
    let (_, secrets) = both.next_acked().await;
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    // Resources come sorted by name.
    assert_eq!(names, [ROOTCA, DEFAULT]);
}

#[tokio::test]
async fn unknown_names_get_a_clear_error() {
    let h = Harness::start().await;
    h.server.update(&state(&TestCa::new(), true));
    let mut s = h.open(&["file-cert:/etc/certs/cert-chain.pem"]).await;
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message()
            .contains("file-cert:/etc/certs/cert-chain.pem")
            && err.message().contains("ROOTCA")
            && err.message().contains("default"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn nack_is_counted_and_not_answered_with_the_same_secret() {
    let h = Harness::start().await;
    let ca = TestCa::new();
    h.server.update(&state(&ca, true));
    let mut s = h.open(&[DEFAULT]).await;
    let resp = s.next().await.unwrap();
    let nack = s
        .state
        .answer(&resp, Err("Failed to load certificate chain".into()));
    s.tx.send(nack).await.unwrap();
    s.silent_for(200).await;
    assert_eq!(h.metrics.sds_nacks.get(), 1);
    // The next rotation is sent.
    h.server.update(&state(&ca, true));
    let (next, _) = s.next_acked().await;
    assert_ne!(next.version_info, resp.version_info);
}

#[tokio::test]
async fn fetch_and_delta_are_unimplemented() {
    let h = Harness::start().await;
    let mut client = SecretDiscoveryServiceClient::new(h.channel.clone());
    let err = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: vec![DEFAULT.into()],
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let err = client
        .delta_secrets(tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

#[test]
fn stale_non_socket_files_are_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let err = SdsServer::bind(&file).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}
