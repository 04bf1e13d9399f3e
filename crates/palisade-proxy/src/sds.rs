//! The SDS client: streams `default` (certificate and key) and `ROOTCA` (trust anchors) from
//! the agent's Unix socket, the way Envoy does, and publishes them on a `watch` channel.
//! Reconnects with backoff; every rotation pushed by the agent replaces the material.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use palisade_identity::Svid;
use palisade_xds::ClientTypeState;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::certs::CertMaterial;

pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Starts streaming secrets from `socket`; the channel holds the latest complete material.
pub fn stream_certificates(socket: PathBuf) -> watch::Receiver<Option<Arc<CertMaterial>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            match run_once(&socket, &tx).await {
                Ok(()) => {
                    tracing::info!(socket = %socket.display(), "SDS stream closed by the agent; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(socket = %socket.display(), error = %e, "SDS stream failed; retrying")
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    rx
}

#[derive(Default)]
struct Held {
    chain: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    roots: Option<Vec<u8>>,
}

async fn run_once(
    socket: &Path,
    tx: &watch::Sender<Option<Arc<CertMaterial>>>,
) -> Result<(), String> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://sds.local")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let mut state =
        ClientTypeState::new(SECRET_TYPE_URL, ["default".to_owned(), "ROOTCA".to_owned()]);
    let (req_tx, req_rx) = mpsc::channel(4);
    req_tx
        .send(state.initial_request())
        .await
        .map_err(|e| e.to_string())?;
    let mut responses = client
        .stream_secrets(ReceiverStream::new(req_rx))
        .await
        .map_err(|e| format!("StreamSecrets: {e}"))?
        .into_inner();
    let mut held = Held::default();
    while let Some(resp) = responses
        .message()
        .await
        .map_err(|e| format!("StreamSecrets: {e}"))?
    {
        let result = apply(&resp, &mut held, tx);
        if let Err(e) = &result {
            tracing::error!(error = %e, "SDS response rejected");
        }
        let answer = state.answer(&resp, result);
        if req_tx.send(answer).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Option<Vec<u8>> {
    match ds.as_ref()?.specifier.as_ref()? {
        Specifier::InlineBytes(b) => Some(b.clone()),
        Specifier::InlineString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn apply(
    resp: &DiscoveryResponse,
    held: &mut Held,
    tx: &watch::Sender<Option<Arc<CertMaterial>>>,
) -> Result<(), String> {
    for any in &resp.resources {
        let secret =
            Secret::decode(any.value.as_slice()).map_err(|e| format!("bad Secret: {e}"))?;
        match (secret.name.as_str(), secret.r#type) {
            ("default", Some(secret::Type::TlsCertificate(c))) => {
                held.chain = inline(&c.certificate_chain);
                held.key = inline(&c.private_key);
            }
            ("ROOTCA", Some(secret::Type::ValidationContext(v))) => {
                held.roots = inline(&v.trusted_ca)
            }
            (name, _) => return Err(format!("unexpected secret {name:?}")),
        }
    }
    let (Some(chain), Some(key), Some(roots)) = (&held.chain, &held.key, &held.roots) else {
        return Ok(());
    };
    let svid = Svid::from_pem(chain, key).map_err(|e| format!("default: {e}"))?;
    let roots = palisade_identity::pem::parse_certs(roots).map_err(|e| format!("ROOTCA: {e}"))?;
    if roots.is_empty() {
        return Err("ROOTCA holds no certificate".to_owned());
    }
    tx.send_replace(Some(Arc::new(CertMaterial { svid, roots })));
    Ok(())
}
