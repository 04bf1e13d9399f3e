//! The ADS server: `envoy.service.discovery.v3.AggregatedDiscoveryService` over mutual TLS.
//! The first request tells the two kinds of proxy apart:
//! - Palisade's sidecar subscribes to [`crate::wire::WORKLOAD_CONFIG_TYPE_URL`] by workload
//!   name and is served from the snapshot cache;
//! - an Envoy subscribes to listeners and clusters (wildcard) and names its workload in its
//!   node; it is served the translation of that workload's config ([`crate::envoy`]), over
//!   state-of-the-world or delta ADS (`DeltaAggregatedResources`, Envoy's `DELTA_GRPC`).
//!
//! The proxy authenticates with its SVID. A stream may only read the config of WorkloadEntries
//! whose namespace and service account are those of the client certificate's SPIFFE ID, so a
//! compromised workload cannot read another workload's policy; other names end the stream with
//! `PERMISSION_DENIED` (first request) or `NOT_FOUND` (later requests). Every stream is listed
//! in the [`ProxyRegistry`] (kind, versions pushed and ACKed, the last NACK).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use palisade_identity::{CertSource, ClientAuth, SpiffeId, TrustBundle};
use palisade_policy::MeshSnapshot;
use palisade_xds::{NamePolicy, NoObserver, SnapshotCache, StreamObserver, StreamOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use crate::envoy::EnvoyNode;
use crate::proxies::{ProxyKind, ProxyRegistry};
use crate::wire::WORKLOAD_CONFIG_TYPE_URL;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serving ADS failed.
#[derive(Debug, thiserror::Error)]
pub enum AdsError {
    #[error("ADS TLS config: {0}")]
    Tls(#[from] palisade_identity::TlsError),
    #[error("ADS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The ADS service over a snapshot cache, authorizing names by the client's identity.
#[derive(Clone)]
pub struct AdsServer {
    cache: Arc<SnapshotCache>,
    mesh: watch::Receiver<Arc<MeshSnapshot>>,
    /// The watcher's status, when known: generation 0 means no valid config was loaded yet.
    status: Option<watch::Receiver<Arc<crate::ConfigStatus>>>,
    /// Sees every stream: pushes, NACKs, open streams (metrics).
    observer: Arc<dyn StreamObserver>,
    metrics: crate::ControlMetrics,
    proxies: ProxyRegistry,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").finish_non_exhaustive()
    }
}

/// Who is on the other end of an ADS connection (the same mTLS connection facts as the CA's).
pub use palisade_ca::server::{TlsConn, TlsConnectInfo as PeerInfo};

impl AdsServer {
    /// Serves `cache`; `mesh` (the watcher's snapshot channel) tells which workloads an
    /// identity may read.
    pub fn new(cache: Arc<SnapshotCache>, mesh: watch::Receiver<Arc<MeshSnapshot>>) -> Self {
        Self {
            cache,
            mesh,
            status: None,
            observer: Arc::new(NoObserver),
            metrics: crate::ControlMetrics::default(),
            proxies: ProxyRegistry::new(),
        }
    }

    /// Counts pushes, NACKs and connected proxies in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::ControlMetrics) -> Self {
        self.observer = Arc::new(metrics.clone());
        self.metrics = metrics;
        self
    }

    /// Lists every stream in `proxies` (shared with the admin endpoint's `/debug/syncz`).
    pub fn with_proxies(mut self, proxies: ProxyRegistry) -> Self {
        self.proxies = proxies;
        self
    }

    /// Tells subscribers apart while the mesh directory has never been valid: they get
    /// `UNAVAILABLE` (retry later) rather than a refusal that blames their identity.
    pub fn with_status(mut self, status: watch::Receiver<Arc<crate::ConfigStatus>>) -> Self {
        self.status = Some(status);
        self
    }

    /// The workloads `id` may read: same namespace and service account.
    pub fn allowed_names(&self, id: &SpiffeId) -> BTreeSet<String> {
        let Some((ns, sa)) = id.workload() else {
            return BTreeSet::new();
        };
        let mesh = self.mesh.borrow().clone();
        mesh.workload_entries
            .iter()
            .filter(|w| w.resource.metadata.namespace() == ns && w.resource.service_account() == sa)
            .map(|w| w.resource.key())
            .collect()
    }

    /// Serves ADS on `listener` over mutual TLS (`cert` is the control plane's serving
    /// certificate; clients must present a mesh certificate) until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        cert: CertSource,
        bundle: &TrustBundle,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AdsError> {
        let mut tls = palisade_identity::server_config(cert, bundle, ClientAuth::Required)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
        let accept = tokio::spawn(accept_loop(listener, acceptor, tx));
        let result = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(self))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
            .await;
        accept.abort();
        result.map_err(AdsError::from)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<Result<TlsConn, std::io::Error>>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "ADS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(TlsConn::new(stream, remote))).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(peer = %remote, error = %e, "ADS TLS handshake failed")
                }
                Err(_) => tracing::info!(peer = %remote, "ADS TLS handshake timed out"),
            }
        });
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = AdsResponses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let Opened {
            id,
            remote,
            allowed,
            first,
            requests,
        } = self.open(request).await?;
        if crate::envoy::is_envoy_type(&first.type_url) {
            return self.serve_envoy(id, remote, allowed, first, requests);
        }
        if let Some(name) = first.resource_names.iter().find(|n| !allowed.contains(*n)) {
            tracing::warn!(%id, workload = %name, "ADS subscription refused: identity does not match the workload");
            return Err(Status::permission_denied(format!(
                "{id} may not read the config of workload {name:?} (namespace and service account must match the certificate)"
            )));
        }
        tracing::info!(
            %id,
            ?remote,
            workloads = ?first.resource_names,
            "ADS stream opened"
        );
        let status = self.proxies.register(
            ProxyKind::Palisade,
            &first.resource_names.join(","),
            &id.to_string(),
            remote,
            Arc::clone(&self.observer),
        );
        let options =
            StreamOptions::new().serve(WORKLOAD_CONFIG_TYPE_URL, NamePolicy::Known(allowed));
        let stream = tokio_stream::once(Ok(first)).chain(requests);
        Ok(Response::new(Box::pin(palisade_xds::serve_stream(
            stream,
            self.cache.subscribe(),
            Arc::new(options),
            status,
        ))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let Opened {
            id,
            remote,
            allowed,
            first,
            requests,
        } = self.open(request).await?;
        if !crate::envoy::is_envoy_type(&first.type_url) {
            return Err(Status::invalid_argument(format!(
                "delta ADS serves Envoy's listeners and clusters, not {:?} (Palisade's sidecar uses StreamAggregatedResources)",
                first.type_url
            )));
        }
        let (out, status, guard) = self.envoy_stream(&id, remote, &allowed, first.node.as_ref())?;
        let stream = tokio_stream::once(Ok(first)).chain(requests);
        let responses = palisade_xds::serve_delta_stream(
            stream,
            out.subscribe(),
            Arc::new(envoy_stream_options()),
            status,
        );
        Ok(Response::new(Box::pin(responses.map(move |r| {
            let _ = &guard;
            r
        }))))
    }
}

/// A stream's first request and what the connection says of its client.
struct Opened<T> {
    id: SpiffeId,
    remote: Option<String>,
    /// The workloads the client's identity may read.
    allowed: BTreeSet<String>,
    first: T,
    requests: Streaming<T>,
}

fn envoy_stream_options() -> StreamOptions {
    StreamOptions::new()
        .serve(crate::envoy::cluster_type_url(), NamePolicy::Any)
        .serve(crate::envoy::listener_type_url(), NamePolicy::Any)
        .allow_wildcard(true)
}

/// The responses of one ADS stream; for an Envoy, the stream also owns the task that
/// translates its config (aborted when the stream is dropped).
pub type AdsResponses =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// The responses of one delta ADS stream (Envoy only), owning its translation task.
pub type DeltaResponses = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>,
>;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AdsServer {
    /// Checks a client and reads its first request: it must present a mesh certificate, and
    /// the control plane must have loaded a valid config.
    async fn open<T: prost::Message + Default + 'static>(
        &self,
        request: Request<Streaming<T>>,
    ) -> Result<Opened<T>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let Some(id) = peer.as_ref().and_then(|p| p.peer_identity.clone()) else {
            return Err(Status::unauthenticated(
                "a mesh client certificate is required",
            ));
        };
        if let Some(status) = &self.status
            && status.borrow().generation == 0
        {
            tracing::warn!(%id, "ADS subscription deferred: no valid mesh config loaded yet");
            return Err(Status::unavailable(
                "the control plane has no valid mesh config yet (see its log); retry later",
            ));
        }
        let mut requests = request.into_inner();
        let allowed = self.allowed_names(&id);
        // Check the first request here so that a refusal says why (later ones get NOT_FOUND).
        let first = match requests.message().await? {
            Some(first) => first,
            None => return Err(Status::cancelled("stream closed before its first request")),
        };
        let remote = peer.and_then(|p| p.remote_addr).map(|a| a.to_string());
        Ok(Opened {
            id,
            remote,
            allowed,
            first,
            requests,
        })
    }

    /// An Envoy's stream (either protocol): its node names the workload, the identity must match
    /// it, and it gets its own cache of listeners and clusters translated from that workload's
    /// config, by a task that lives as long as the returned guard.
    fn envoy_stream(
        &self,
        id: &SpiffeId,
        remote: Option<String>,
        allowed: &BTreeSet<String>,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    ) -> Result<
        (
            Arc<SnapshotCache>,
            Arc<crate::proxies::StreamStatus>,
            AbortOnDrop,
        ),
        Status,
    > {
        let node = EnvoyNode::from_node(node).map_err(|e| {
            tracing::warn!(%id, error = %e, "Envoy ADS subscription refused");
            Status::invalid_argument(e.to_string())
        })?;
        if !allowed.contains(&node.workload) {
            tracing::warn!(%id, workload = %node.workload, "Envoy ADS subscription refused: identity does not match the workload");
            return Err(Status::permission_denied(format!(
                "{id} may not read the config of workload {:?} (namespace and service account must match the certificate)",
                node.workload
            )));
        }
        tracing::info!(%id, ?remote, workload = %node.workload, app_ports = ?node.app_ports, "Envoy ADS stream opened");
        let status = self.proxies.register(
            ProxyKind::Envoy,
            &node.workload,
            &id.to_string(),
            remote,
            Arc::clone(&self.observer),
        );
        let out = Arc::new(SnapshotCache::new());
        let translator = crate::envoy::spawn_translator(
            self.cache.subscribe(),
            node,
            Arc::clone(&out),
            Arc::clone(&status),
            self.metrics.clone(),
        );
        Ok((out, status, AbortOnDrop(translator)))
    }

    /// An Envoy's state-of-the-world stream.
    fn serve_envoy(
        &self,
        id: SpiffeId,
        remote: Option<String>,
        allowed: BTreeSet<String>,
        first: DiscoveryRequest,
        requests: Streaming<DiscoveryRequest>,
    ) -> Result<Response<AdsResponses>, Status> {
        let (out, status, guard) = self.envoy_stream(&id, remote, &allowed, first.node.as_ref())?;
        // Envoy may spell a wildcard subscription as "*" (the newer form) or as no names.
        let stream = tokio_stream::once(Ok(first)).chain(requests).map(|r| {
            r.map(|mut req| {
                req.resource_names.retain(|n| n != "*");
                req
            })
        });
        let responses = palisade_xds::serve_stream(
            stream,
            out.subscribe(),
            Arc::new(envoy_stream_options()),
            status,
        );
        Ok(Response::new(Box::pin(responses.map(move |r| {
            let _ = &guard;
            r
        }))))
    }
}
