//! The gRPC CA: `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS.
//!
//! TLS is terminated with tokio-rustls (tonic's own TLS cannot take the SPIFFE verifier): each
//! accepted TCP connection is handshaken in its own task with a timeout, so a slow or garbage
//! peer never blocks the accept loop, and the handshaken streams are fed to tonic through
//! `serve_with_incoming_shutdown`. A client certificate is optional: when present and verified
//! against the mesh roots, it authenticates a renewal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use palisade_identity::{
    CertSource, ClientAuth, SpiffeId, SvidResolver, TrustBundle, TrustDomain, peer_spiffe_id,
};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};

use crate::authority::{Authority, IssuancePolicy, IssueError};
use crate::jwks::{IssuerConfig, JwksError, Refresher};
use crate::metrics::CaMetrics;
use crate::pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::pb::{IstioCertificateRequest, IstioCertificateResponse};
use crate::signer::{CaKeyType, Signer, SignerError};
use crate::token::{TokenAuthenticator, TokenError, TokenIssuer};
use crate::validity::{ExpiryWatch, ValidityError};

/// Default CA address (istiod's port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15012";
/// The control plane's own SPIFFE path: the CA's serving certificate carries it.
pub const CONTROL_PLANE_PATH: &str = "/ns/istio-system/sa/palisade-controlplane";
/// Status message for every authentication failure (istiod's wording). The precise reason is
/// logged and counted, never sent to the caller.
pub const AUTH_FAILURE: &str = "request authenticate failure";
/// A peer has this long to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the CA's serving certificate; renewed at half-life.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Errors setting up or running the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Signer(#[from] SignerError),
    #[error("token issuer: {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    Jwks(#[from] JwksError),
    /// The CA's chain is outside its validity at start: it could sign nothing, not even the
    /// certificate its own port presents.
    #[error("the CA cannot sign: {0}")]
    SigningCert(#[from] ValidityError),
    #[error("serving certificate: {0}")]
    Serving(String),
    #[error("TLS: {0}")]
    Tls(#[from] palisade_identity::TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Everything the control plane's CA needs to start.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Holds the root key (self-signed mode), the token issuer key and `root-cert.pem`.
    pub state_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub trust_domain_aliases: Vec<TrustDomain>,
    /// Key type of a newly created self-signed root.
    pub key_type: CaKeyType,
    /// Sign as this plug-in intermediate CA instead of the self-signed root.
    pub plugin_dir: Option<PathBuf>,
    /// Token issuers trusted besides the control plane's own.
    pub extra_issuers: Vec<IssuerConfig>,
    pub policy: IssuancePolicy,
    /// When set, a request carrying another `ClusterID` is refused.
    pub cluster_id: Option<String>,
    /// DNS names added to the serving certificate, for clients that check host names.
    pub serving_dns_names: Vec<String>,
    /// How many verified tokens to remember (0: verify every time).
    pub token_cache: usize,
}

impl CaOptions {
    pub fn new(state_dir: impl Into<PathBuf>, trust_domain: TrustDomain) -> Self {
        Self {
            state_dir: state_dir.into(),
            trust_domain,
            trust_domain_aliases: Vec::new(),
            key_type: CaKeyType::default(),
            plugin_dir: None,
            extra_issuers: Vec::new(),
            policy: IssuancePolicy::default(),
            cluster_id: None,
            serving_dns_names: vec!["localhost".to_owned(), "istiod.istio-system.svc".to_owned()],
            token_cache: 4096,
        }
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A verified mesh client certificate (renewal).
    Certificate,
    /// A service-account token.
    Token,
}

impl AuthMethod {
    fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Token => "token",
        }
    }
}

/// Connection facts tonic hands to each request (see [`tonic::transport::server::Connected`]).
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The client's SPIFFE ID, when it presented a certificate that verified.
    pub peer_identity: Option<SpiffeId>,
}

/// A handshaken TLS stream that tells tonic who is on the other end. The control plane's ADS
/// server serves over the same kind of connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl TlsConn {
    /// Wraps a server-side TLS stream, reading the client's verified SPIFFE ID once.
    pub fn new(stream: tokio_rustls::server::TlsStream<TcpStream>, remote: SocketAddr) -> Self {
        let peer_identity = peer_spiffe_id(stream.get_ref().1.peer_certificates());
        Self {
            inner: stream,
            info: TlsConnectInfo {
                remote_addr: Some(remote),
                peer_identity,
            },
        }
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A refused request: what the caller gets and what the log and metrics get.
struct Refusal {
    status: Status,
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn unauthenticated(e: &TokenError) -> Self {
        Self {
            status: Status::unauthenticated(AUTH_FAILURE),
            reason: e.reason(),
            detail: e.to_string(),
        }
    }

    fn issue(e: &IssueError) -> Self {
        let status = if e.is_caller_error() {
            Status::invalid_argument(e.to_string())
        } else if let IssueError::SigningCert(_) = e {
            // Internal, as for any failure of the CA itself, but with the reason: the caller can
            // do nothing about it, and the operator reading the agent's log must see which CA
            // certificate to replace. CA certificates are public (every chain carries them).
            Status::internal(e.to_string())
        } else {
            Status::internal("failed to sign the certificate")
        };
        Self {
            status,
            reason: e.reason(),
            detail: e.to_string(),
        }
    }
}

/// The `IstioCertificateService` implementation.
#[derive(Debug, Clone)]
pub struct CaService {
    authority: Arc<Authority>,
    tokens: Arc<TokenAuthenticator>,
    metrics: CaMetrics,
    cluster_id: Option<String>,
}

impl CaService {
    pub fn new(
        authority: Arc<Authority>,
        tokens: Arc<TokenAuthenticator>,
        metrics: CaMetrics,
        cluster_id: Option<String>,
    ) -> Self {
        Self {
            authority,
            tokens,
            metrics,
            cluster_id,
        }
    }

    /// Authenticators in istiod's order: verified client certificate, then bearer token.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(SpiffeId, AuthMethod), Refusal> {
        if let Some(id) = request
            .extensions()
            .get::<TlsConnectInfo>()
            .and_then(|i| i.peer_identity.clone())
        {
            return Ok((id, AuthMethod::Certificate));
        }
        if let (Some(want), Some(got)) = (
            self.cluster_id.as_deref(),
            request
                .metadata()
                .get("clusterid")
                .and_then(|v| v.to_str().ok()),
        ) && want != got
        {
            return Err(Refusal {
                status: Status::unauthenticated(AUTH_FAILURE),
                reason: "cluster_id",
                detail: format!("ClusterID {got:?} is not this CA's cluster {want:?}"),
            });
        }
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::unauthenticated(&TokenError::Missing))?;
        let caller = self
            .tokens
            .authenticate(token)
            .map_err(|e| Refusal::unauthenticated(&e))?;
        Ok((caller.identity, AuthMethod::Token))
    }

    fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, (Refusal, Option<SpiffeId>)> {
        let (caller, method) = self.authenticate(&request).map_err(|r| (r, None))?;
        let req = request.get_ref();
        let started = Instant::now();
        let issued = self
            .authority
            .issue(&req.csr, &caller, req.validity_duration)
            .map_err(|e| (Refusal::issue(&e), Some(caller.clone())))?;
        self.metrics
            .sign_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.issued.inc();
        tracing::info!(
            identity = %issued.identity,
            serial = %issued.serial,
            not_after = %issued.not_after,
            auth = method.as_str(),
            "certificate issued"
        );
        Ok(IstioCertificateResponse {
            cert_chain: issued.chain_pem(),
        })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let remote = request
            .extensions()
            .get::<TlsConnectInfo>()
            .and_then(|i| i.remote_addr);
        match self.handle(request) {
            Ok(resp) => Ok(Response::new(resp)),
            Err((refusal, caller)) => {
                self.metrics.refuse(refusal.reason);
                tracing::warn!(
                    reason = refusal.reason,
                    detail = %refusal.detail,
                    caller = caller.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                    peer = remote.map(|a| a.to_string()).unwrap_or_default(),
                    code = ?refusal.status.code(),
                    "certificate request refused"
                );
                Err(refusal.status)
            }
        }
    }
}

/// The control plane's CA, ready to serve: keys loaded, root bundle written.
pub struct CaServer {
    authority: Arc<Authority>,
    service: CaService,
    bundle: TrustBundle,
    serving_identity: SpiffeId,
    serving_dns_names: Vec<String>,
    resolver: Arc<SvidResolver>,
    refreshers: Vec<Refresher>,
    metrics: CaMetrics,
    root_cert_path: PathBuf,
    expiry: ExpiryWatch,
}

impl std::fmt::Debug for CaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("serving_identity", &self.serving_identity.to_string())
            .field("root_cert_path", &self.root_cert_path)
            .finish_non_exhaustive()
    }
}

impl CaServer {
    /// Loads (or creates) the CA key and the token issuer in the state directory, writes
    /// `root-cert.pem`, loads the extra issuers' keys and registers the metrics in `registry`.
    pub async fn prepare(options: CaOptions, registry: &mut Registry) -> Result<Self, CaError> {
        std::fs::create_dir_all(&options.state_dir).map_err(|e| SignerError::BadFile {
            path: options.state_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let signer = match &options.plugin_dir {
            Some(dir) => Signer::load_plugin(dir)?,
            None => Signer::load_or_create_root(
                &options.state_dir,
                &options.trust_domain,
                options.key_type,
            )?,
        };
        let root_cert_path = signer.write_root_bundle(&options.state_dir)?;
        // Written even when the chain is out of validity: `palisade ca status` then says which
        // certificate and since when.
        signer.write_chain(&options.state_dir)?;
        tracing::info!(
            source = ?signer.source(),
            key = %signer.key_algorithm(),
            not_after = %signer.not_after(),
            root = %root_cert_path.display(),
            "CA signing key ready"
        );
        let metrics = CaMetrics::register(registry);
        let expiry = ExpiryWatch::new(signer.chain_certs().to_vec(), metrics.clone());
        let now = time::OffsetDateTime::now_utc();
        expiry.update_gauges(now);
        expiry.log_warnings(now);
        // Refuse to start rather than serve a port whose certificate nobody can verify: the CA's
        // own serving certificate would chain through the invalid certificate. The error names
        // it, and the chain written above lets `palisade ca status` show it.
        crate::validity::check_chain(signer.chain_certs(), now)?;
        let bundle = TrustBundle::new(options.trust_domain.clone(), signer.roots().to_vec())
            .map_err(|e| CaError::Serving(e.to_string()))?
            .with_aliases(options.trust_domain_aliases.iter().cloned());

        let issuer = TokenIssuer::load_or_create(&options.state_dir)?;
        let mut tokens =
            TokenAuthenticator::new(options.trust_domain.clone()).with_cache(options.token_cache);
        tokens.add_issuer(
            issuer.issuer(),
            crate::token::IssuerKeys::new(issuer.jwks().clone()),
        );
        let refreshers = crate::jwks::install(&mut tokens, &options.extra_issuers).await?;

        let authority = Arc::new(Authority::new(signer, options.policy.clone()));
        let serving_identity = SpiffeId::new(options.trust_domain.clone(), CONTROL_PLANE_PATH)
            .map_err(|e| CaError::Serving(e.to_string()))?;
        let serving =
            issue_serving_cert(&authority, &serving_identity, &options.serving_dns_names)?;
        let resolver = SvidResolver::new(&serving);
        let service = CaService::new(
            Arc::clone(&authority),
            Arc::new(tokens),
            metrics.clone(),
            options.cluster_id.clone(),
        );
        Ok(Self {
            authority,
            service,
            bundle,
            serving_identity,
            serving_dns_names: options.serving_dns_names,
            resolver,
            refreshers,
            metrics,
            root_cert_path,
            expiry,
        })
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }

    /// `<state>/root-cert.pem`.
    pub fn root_cert_path(&self) -> &std::path::Path {
        &self.root_cert_path
    }

    /// The SPIFFE ID on the CA's serving certificate.
    pub fn serving_identity(&self) -> &SpiffeId {
        &self.serving_identity
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Serves on `listener` until `shutdown` completes, then drains open requests.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), CaError> {
        let mut tls = palisade_identity::server_config(
            CertSource::Rotating(Arc::clone(&self.resolver)),
            &self.bundle,
            ClientAuth::Optional,
        )?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsConn, std::io::Error>>(128);
        let metrics = self.metrics.clone();
        let accept_loop = tokio::spawn(accept_loop(listener, acceptor, tx, metrics));
        let rotation = tokio::spawn(rotate_serving_cert(
            Arc::clone(&self.authority),
            Arc::clone(&self.resolver),
            self.serving_identity.clone(),
            self.serving_dns_names.clone(),
        ));
        let refreshers: Vec<_> = self
            .refreshers
            .into_iter()
            .map(|r| tokio::spawn(r.run()))
            .collect();
        let expiry = tokio::spawn(self.expiry.run(time::OffsetDateTime::now_utc, None));

        let result = tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(self.service))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
            .await;
        accept_loop.abort();
        rotation.abort();
        expiry.abort();
        for r in refreshers {
            r.abort();
        }
        result.map_err(CaError::from)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<Result<TlsConn, std::io::Error>>,
    metrics: CaMetrics,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(TlsConn::new(stream, remote))).await;
                }
                Ok(Err(e)) => {
                    metrics.handshake_failures.inc();
                    tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.handshake_failures.inc();
                    tracing::debug!(peer = %remote, "TLS handshake timed out");
                }
            }
        });
    }
}

fn issue_serving_cert(
    authority: &Authority,
    identity: &SpiffeId,
    dns_names: &[String],
) -> Result<palisade_identity::Svid, CaError> {
    let key = rcgen::KeyPair::generate().map_err(|e| CaError::Serving(e.to_string()))?;
    let mut sans = Vec::new();
    for name in dns_names {
        let dns = rcgen::string::Ia5String::try_from(name.as_str())
            .map_err(|e| CaError::Serving(format!("DNS name {name:?}: {e}")))?;
        sans.push(rcgen::SanType::DnsName(dns));
    }
    sans.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    sans.push(rcgen::SanType::IpAddress(
        std::net::Ipv6Addr::LOCALHOST.into(),
    ));
    let issued = authority
        .sign_for_key(&key, identity, SERVING_CERT_TTL, &sans, Instant::now())
        .map_err(|e| CaError::Serving(e.to_string()))?;
    let key_der = palisade_identity::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    palisade_identity::Svid::new(issued.chain, key_der).map_err(CaError::from)
}

/// Re-issues the serving certificate at half its lifetime.
async fn rotate_serving_cert(
    authority: Arc<Authority>,
    resolver: Arc<SvidResolver>,
    identity: SpiffeId,
    dns_names: Vec<String>,
) {
    loop {
        tokio::time::sleep(SERVING_CERT_TTL / 2).await;
        match issue_serving_cert(&authority, &identity, &dns_names) {
            Ok(svid) => {
                resolver.update(&svid);
                tracing::info!(serial = %svid.leaf_info().serial, "CA serving certificate rotated");
            }
            Err(e) => tracing::error!(error = %e, "CA serving certificate rotation failed"),
        }
    }
}
