//! The ADS client: subscribes to this workload's `WorkloadConfig` over mutual TLS (our SVID;
//! the server must be the control plane), compiles every push, installs it or NACKs it with the
//! errors (the previous config keeps serving), and reconnects with backoff.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use palisade_xds::ClientTypeState;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::ProxyConfig;
use crate::{CONTROL_PLANE_PATH, Shared};
use palisade_policy::workload_config::{WORKLOAD_CONFIG_TYPE_URL, WorkloadConfig};

/// Runs forever: connect, stream, apply; on failure wait and reconnect.
pub async fn run(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        // Mutual TLS needs our certificate first.
        if shared.certs.tls().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        match run_once(&shared, &mut backoff).await {
            Ok(()) => {
                tracing::info!(control_plane = %shared.options.control_plane, "ADS stream closed; reconnecting")
            }
            Err(e) => {
                tracing::warn!(control_plane = %shared.options.control_plane, error = %e, "ADS stream failed; retrying")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn run_once(shared: &Arc<Shared>, backoff: &mut Duration) -> Result<(), String> {
    let state = shared.certs.tls().ok_or("no certificate")?;
    let tls = state
        .control_plane_client(CONTROL_PLANE_PATH)
        .map_err(|e| e.to_string())?;
    let connector = TlsConnector {
        addr: shared.options.control_plane.clone(),
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
    };
    let channel = tonic::transport::Endpoint::from_static("http://control-plane.local")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let node = Node {
        id: shared.options.workload.clone(),
        cluster: shared.options.workload.clone(),
        ..Default::default()
    };
    let mut sub = ClientTypeState::new(WORKLOAD_CONFIG_TYPE_URL, [shared.options.workload.clone()])
        .with_node(node);
    let (tx, rx) = mpsc::channel(4);
    tx.send(sub.initial_request())
        .await
        .map_err(|e| e.to_string())?;
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("StreamAggregatedResources: {e}"))?
        .into_inner();
    while let Some(resp) = responses
        .message()
        .await
        .map_err(|e| format!("StreamAggregatedResources: {e}"))?
    {
        *backoff = Duration::from_millis(200);
        let result = apply(shared, &resp);
        if let Err(e) = &result {
            shared.metrics.config_rejected.inc();
            tracing::error!(version = %resp.version_info, error = %e, "config rejected (NACK); the previous config stays in force");
        }
        if tx.send(sub.answer(&resp, result)).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn apply(shared: &Shared, resp: &DiscoveryResponse) -> Result<(), String> {
    let want = &shared.options.workload;
    let Some(any) = resp.resources.iter().find(|_| true) else {
        return Err(format!(
            "workload {want} is not in the mesh (empty response)"
        ));
    };
    if any.type_url != WORKLOAD_CONFIG_TYPE_URL {
        return Err(format!("unexpected resource type {:?}", any.type_url));
    }
    let wire =
        WorkloadConfig::from_json(&any.value).map_err(|e| format!("bad WorkloadConfig: {e}"))?;
    let cfg = ProxyConfig::build(
        resp.version_info.clone(),
        wire,
        want,
        &shared.options.app_ports,
    )
    .map_err(|e| e.to_string())?;
    shared.install(cfg);
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Clone)]
struct TlsConnector {
    addr: String,
    tls: tokio_rustls::TlsConnector,
}

type Conn = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Conn, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&this.addr).await?;
            let _ = tcp.set_nodelay(true);
            let host = this
                .addr
                .rsplit_once(':')
                .map_or(this.addr.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            Ok(TokioIo::new(this.tls.connect(name, tcp).await?))
        })
    }
}
