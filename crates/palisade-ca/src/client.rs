//! A client of the CA: TLS verified against the mesh root and the CA's SPIFFE identity, then
//! `CreateCertificate` with a bearer token (first issuance) or a client certificate (renewal).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use palisade_identity::{CertSource, ServerIdentity, SpiffeId, TrustBundle, TrustDomain};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::server::CONTROL_PLANE_PATH;

/// Client errors. `Refused` carries the CA's gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("CA root: {0}")]
    Root(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] palisade_identity::TlsError),
    #[error("invalid CA address {0:?}")]
    Address(String),
    #[error("cannot connect to the CA at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("CA refused the request: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("CA returned an empty certificate chain")]
    EmptyChain,
    #[error("invalid metadata value: {0}")]
    Metadata(String),
}

impl CaClientError {
    /// The gRPC status code when the CA answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How to reach and check the CA.
#[derive(Debug, Clone)]
pub struct CaClientOptions {
    /// Which server identity to accept. Default: the control plane's path
    /// (`/ns/istio-system/sa/palisade-controlplane`) in [`CaClientOptions::trust_domain`], or in
    /// any trust domain when that is unknown (the mesh root still anchors the chain).
    pub server_identity: Option<ServerIdentity>,
    /// The mesh trust domain, when known.
    pub trust_domain: Option<TrustDomain>,
    /// Present this SVID (renewal by certificate).
    pub client_cert: Option<CertSource>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for CaClientOptions {
    fn default() -> Self {
        Self {
            server_identity: None,
            trust_domain: None,
            client_cert: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A connected CA client. Cheap to clone; requests share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct CaClient {
    grpc: IstioCertificateServiceClient<Channel>,
    server_id: Arc<Mutex<Option<SpiffeId>>>,
}

impl CaClient {
    /// Connects to `addr` (`host:port`), trusting the PEM roots in `root_pem`.
    pub async fn connect(
        addr: &str,
        root_pem: &[u8],
        options: CaClientOptions,
    ) -> Result<Self, CaClientError> {
        let roots = palisade_identity::pem::parse_certs(root_pem)
            .map_err(|e| CaClientError::Root(e.to_string()))?;
        // The bundle's trust domain only matters for identity checks that use it.
        let td = match &options.trust_domain {
            Some(td) => td.clone(),
            None => TrustDomain::new(palisade_identity::spiffe::DEFAULT_TRUST_DOMAIN)
                .map_err(|e| CaClientError::Root(e.to_string()))?,
        };
        let bundle =
            TrustBundle::new(td.clone(), roots).map_err(|e| CaClientError::Root(e.to_string()))?;
        let expected = match (options.server_identity.clone(), &options.trust_domain) {
            (Some(e), _) => e,
            (None, Some(td)) => ServerIdentity::OneOf(vec![
                SpiffeId::new(td.clone(), CONTROL_PLANE_PATH)
                    .map_err(|e| CaClientError::Root(e.to_string()))?,
            ]),
            (None, None) => ServerIdentity::PathInAnyTrustDomain(CONTROL_PLANE_PATH.to_owned()),
        };
        let mut tls =
            palisade_identity::client_config(options.client_cert.clone(), &bundle, expected)?;
        tls.alpn_protocols = vec![b"h2".to_vec()];

        // The URI only names the authority: the connector below does TCP and TLS itself.
        let uri: Uri = format!("http://{addr}")
            .parse()
            .map_err(|_| CaClientError::Address(addr.to_owned()))?;
        let endpoint = Endpoint::from(uri)
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout);
        let server_id = Arc::new(Mutex::new(None));
        let connector = TlsConnector {
            addr: addr.to_owned(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            server_id: Arc::clone(&server_id),
        };
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| CaClientError::Connect {
                addr: addr.to_owned(),
                reason: error_chain(&e),
            })?;
        Ok(Self {
            grpc: IstioCertificateServiceClient::new(channel),
            server_id,
        })
    }

    /// The CA's SPIFFE ID as verified on the last connection (tells the trust domain).
    pub fn server_identity(&self) -> Option<SpiffeId> {
        self.server_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends a CSR; returns the PEM chain, leaf first and root last. `token` is the bearer
    /// token (None when renewing by client certificate); `ttl` None asks for the CA's default.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        token: Option<&str>,
        ttl: Option<Duration>,
        cluster_id: Option<&str>,
    ) -> Result<Vec<String>, CaClientError> {
        let validity = ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: validity,
            metadata: None,
        });
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| CaClientError::Metadata("authorization".to_owned()))?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(cluster) = cluster_id {
            let value = cluster
                .parse()
                .map_err(|_| CaClientError::Metadata("ClusterID".to_owned()))?;
            request.metadata_mut().insert("clusterid", value);
        }
        let response = self
            .grpc
            .clone()
            .create_certificate(request)
            .await
            .map_err(|s| CaClientError::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            })?;
        let chain = response.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(CaClientError::EmptyChain);
        }
        Ok(chain)
    }
}

impl CaClient {
    /// Sends a hand-built request as is (metadata included): for tests and tools that need to
    /// send what a well-behaved client never would.
    pub async fn call_raw(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<Vec<String>, tonic::Status> {
        self.grpc
            .clone()
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        // Some errors already print their source; do not repeat it.
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

/// tower connector: TCP to the CA address, then TLS with the SPIFFE verifier.
#[derive(Clone)]
struct TlsConnector {
    addr: String,
    tls: tokio_rustls::TlsConnector,
    server_id: Arc<Mutex<Option<SpiffeId>>>,
}

type ConnectFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
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
            let stream = this.tls.connect(name, tcp).await?;
            let id = palisade_identity::peer_spiffe_id(stream.get_ref().1.peer_certificates());
            *this.server_id.lock().unwrap_or_else(|p| p.into_inner()) = id;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
