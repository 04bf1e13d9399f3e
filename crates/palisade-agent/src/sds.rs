//! The SDS server: Envoy's `SecretDiscoveryService/StreamSecrets` on a Unix socket, serving
//! the workload certificate as `default` and the trust anchors as `ROOTCA`.
//!
//! The secret manager's `watch` state is turned into an xDS snapshot ([`SdsServer::publish`]);
//! `palisade-xds` does the protocol (versions, nonces, ACK/NACK) and pushes every open stream
//! when the snapshot changes. Names other than `default` and `ROOTCA` end the stream with
//! `NOT_FOUND`; a subscription to `default` before the first certificate simply waits (Envoy
//! keeps the listener warming meanwhile).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::util::pack_any;
use palisade_xds::{
    Change, NamePolicy, RequestKind, RequestOutcome, ResponseStream, SnapshotCache, StreamObserver,
    StreamOptions,
};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status, Streaming};

use crate::manager::{SecretState, SecretWatch};
use crate::metrics::AgentMetrics;

/// The type URL of SDS resources.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload certificate's resource name.
pub const DEFAULT: &str = "default";
/// The trust anchors' resource name.
pub const ROOTCA: &str = "ROOTCA";

/// Serving SDS failed.
#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    /// The socket could not be prepared or bound.
    #[error("cannot listen on SDS socket {path}: {cause}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The gRPC server failed.
    #[error("SDS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The SDS server: a snapshot of `default`/`ROOTCA` and the gRPC service over it.
#[derive(Clone)]
pub struct SdsServer {
    cache: Arc<SnapshotCache>,
    options: Arc<StreamOptions>,
    observer: Arc<SdsObserver>,
}

impl std::fmt::Debug for SdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdsServer").finish_non_exhaustive()
    }
}

impl SdsServer {
    /// A server with nothing to serve yet; feed it with [`SdsServer::publish`].
    pub fn new(metrics: AgentMetrics) -> Self {
        let known = [DEFAULT.to_owned(), ROOTCA.to_owned()].into();
        Self {
            cache: Arc::new(SnapshotCache::new()),
            options: Arc::new(
                StreamOptions::new().serve(SECRET_TYPE_URL, NamePolicy::Known(known)),
            ),
            observer: Arc::new(SdsObserver { metrics }),
        }
    }

    /// Brings the SDS snapshot in line with one manager state.
    pub fn update(&self, state: &SecretState) -> bool {
        self.cache.apply(secrets_of(state))
    }

    /// Keeps the snapshot in line with the manager's state until the manager goes away.
    pub fn publish(&self, mut state: SecretWatch) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let current = state.borrow_and_update().clone();
                if this.update(&current) {
                    tracing::debug!("SDS secrets updated");
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// The tonic service, to add to any server.
    pub fn service(&self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self.clone())
    }

    /// Binds the Unix socket at `path` (replacing a stale socket left by an earlier run).
    pub fn bind(path: &Path) -> Result<UnixListener, SdsError> {
        let bind_err = |cause| SdsError::Bind {
            path: path.to_owned(),
            cause,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt as _;
                if !meta.file_type().is_socket() {
                    return Err(SdsError::NotASocket {
                        path: path.to_owned(),
                    });
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        UnixListener::bind(path).map_err(bind_err)
    }

    /// Serves SDS on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), SdsError> {
        tonic::transport::Server::builder()
            .add_service(self.service())
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsServer {
    type DeltaSecretsStream = tokio_stream::Empty<Result<DeltaDiscoveryResponse, Status>>;
    type StreamSecretsStream = ResponseStream;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "delta SDS is not supported; use StreamSecrets (state of the world)",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Ok(Response::new(palisade_xds::serve_stream(
            request.into_inner(),
            self.cache.subscribe(),
            self.options.clone(),
            self.observer.clone(),
        )))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "FetchSecrets is not supported; use StreamSecrets",
        ))
    }
}

/// The SDS resources for a manager state: `default` once a certificate exists, `ROOTCA` when
/// there are roots.
pub fn secrets_of(state: &SecretState) -> Vec<Change> {
    let mut changes = Vec::with_capacity(2);
    match &state.svid {
        Some(svid) => changes.push(Change::Set {
            type_url: SECRET_TYPE_URL.to_owned(),
            name: DEFAULT.to_owned(),
            body: pack_any(tls_certificate_secret(
                svid.chain_pem(),
                svid.private_key_pem(),
            )),
        }),
        None => changes.push(Change::Remove {
            type_url: SECRET_TYPE_URL.to_owned(),
            name: DEFAULT.to_owned(),
        }),
    }
    if state.roots.is_empty() {
        changes.push(Change::Remove {
            type_url: SECRET_TYPE_URL.to_owned(),
            name: ROOTCA.to_owned(),
        });
    } else {
        changes.push(Change::Set {
            type_url: SECRET_TYPE_URL.to_owned(),
            name: ROOTCA.to_owned(),
            body: pack_any(validation_context_secret(
                palisade_identity::pem::certs_to_pem(&state.roots),
            )),
        });
    }
    changes
}

fn inline(bytes: String) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.into_bytes())),
        ..Default::default()
    })
}

/// `default`: the certificate chain (leaf first) and private key, inline PEM.
pub fn tls_certificate_secret(chain_pem: String, key_pem: String) -> Secret {
    Secret {
        name: DEFAULT.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: inline(key_pem),
            ..Default::default()
        })),
    }
}

/// `ROOTCA`: the trusted CA certificates, inline PEM.
pub fn validation_context_secret(roots_pem: String) -> Secret {
    Secret {
        name: ROOTCA.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(roots_pem),
                ..Default::default()
            },
        )),
    }
}

/// Counts SDS streams, pushes and NACKs.
struct SdsObserver {
    metrics: AgentMetrics,
}

impl StreamObserver for SdsObserver {
    fn on_open(&self, stream: u64) {
        self.metrics.sds_streams.inc();
        tracing::debug!(stream, "SDS stream opened");
    }

    fn on_request(&self, stream: u64, _type_url: &str, outcome: &RequestOutcome) {
        if let RequestKind::Nack { message, .. } = &outcome.kind {
            self.metrics.sds_nacks.inc();
            tracing::warn!(stream, %message, "the proxy rejected a secret");
        }
    }

    fn on_response(&self, stream: u64, resp: &DiscoveryResponse) {
        self.metrics.sds_pushes.inc();
        tracing::info!(
            stream,
            version = %resp.version_info,
            resources = resp.resources.len(),
            "secrets pushed to the proxy"
        );
    }

    fn on_close(&self, stream: u64, error: Option<&Status>) {
        self.metrics.sds_streams.dec();
        match error {
            Some(status) => tracing::warn!(stream, %status, "SDS stream closed with an error"),
            None => tracing::debug!(stream, "SDS stream closed"),
        }
    }
}

#[cfg(test)]
mod tests;
