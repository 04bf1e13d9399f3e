//! rustls for SPIFFE mTLS: the workload's own certificate ([`Svid`], [`SvidResolver`] for
//! rotation), verifiers that check the chain against the mesh roots and then the SPIFFE ID
//! ([`SpiffeServerVerifier`], [`SpiffeClientVerifier`]), and config builders with an explicit
//! aws-lc-rs provider (TLS 1.3 preferred, TLS 1.2 minimum).
//!
//! SVIDs carry no DNS SAN, so the stock server verifier (which matches the server name) cannot be
//! used: the chain is verified with rustls' webpki helper, then the URI SAN is matched.

use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsErr,
    OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use time::OffsetDateTime;

use crate::bundle::TrustBundle;
use crate::cert::{CertError, CertInfo};
use crate::pem::PemError;
use crate::spiffe::{SpiffeId, TrustDomain};

/// TLS material or configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("leaf certificate: {0}")]
    Leaf(#[from] CertError),
    #[error("private key does not match the leaf certificate or is unusable: {0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Pem(#[from] PemError),
}

/// The process-wide aws-lc-rs provider Palisade builds every TLS config with.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())))
}

/// Protocol versions, most preferred first: TLS 1.3, then 1.2 as the floor.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// An X.509-SVID: a certificate chain (leaf first) with its private key, checked to match.
pub struct Svid {
    id: SpiffeId,
    leaf: CertInfo,
    key: PrivateKeyDer<'static>,
    certified: Arc<CertifiedKey>,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            leaf: self.leaf.clone(),
            key: self.key.clone_key(),
            certified: Arc::clone(&self.certified),
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.leaf.serial)
            .field("not_after", &self.leaf.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Checks that the leaf carries exactly one SPIFFE ID and that `key` belongs to it.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf_der = chain.first().ok_or(TlsError::EmptyChain)?;
        let leaf = CertInfo::parse(leaf_der)?;
        let id = leaf.spiffe_id()?;
        let certified = CertifiedKey::from_der(chain, key.clone_key(), &crypto_provider())
            .map_err(|e| TlsError::Key(e.to_string()))?;
        Ok(Self {
            id,
            leaf,
            key,
            certified: Arc::new(certified),
        })
    }

    /// From PEM: the chain (leaf first) and the private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Self::new(
            crate::pem::parse_certs(chain_pem)?,
            crate::pem::parse_private_key(key_pem)?,
        )
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    /// What the leaf says (serial, validity, SANs...).
    pub fn leaf_info(&self) -> &CertInfo {
        &self.leaf
    }

    pub fn not_before(&self) -> OffsetDateTime {
        self.leaf.not_before
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.leaf.not_after
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn chain_pem(&self) -> String {
        crate::pem::certs_to_pem(self.chain())
    }

    pub fn private_key_pem(&self) -> String {
        crate::pem::private_key_to_pem(&self.key)
    }

    /// The rustls form of this SVID.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }
}

/// A certificate resolver whose SVID can be replaced while connections keep using the config:
/// serve the new certificate after rotation without rebuilding listeners.
#[derive(Debug)]
pub struct SvidResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl SvidResolver {
    pub fn new(svid: &Svid) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(svid.certified_key()),
        })
    }

    /// Serve `svid` from now on.
    pub fn update(&self, svid: &Svid) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = svid.certified_key();
    }

    fn get(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Which server identities a client accepts (after the chain is verified against the roots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentity {
    /// Exactly one of these SPIFFE IDs.
    OneOf(Vec<SpiffeId>),
    /// Any SPIFFE ID in the bundle's trust domain or one of its aliases.
    TrustDomain,
    /// Any SPIFFE ID in the bundle's trust domains with exactly this path (e.g. the control
    /// plane's `/ns/istio-system/sa/...`).
    Path(String),
    /// This exact path in whatever trust domain, for a client that knows the roots but not yet
    /// the trust domain (the roots still anchor the chain).
    PathInAnyTrustDomain(String),
}

impl ServerIdentity {
    fn check(&self, id: &SpiffeId, bundle: &TrustBundle) -> Result<(), String> {
        let ok = match self {
            Self::OneOf(ids) => ids.contains(id),
            Self::TrustDomain => bundle.accepts(id),
            Self::Path(path) => bundle.accepts(id) && id.path() == path,
            Self::PathInAnyTrustDomain(path) => id.path() == path,
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            Self::OneOf(ids) => format!(
                "server SPIFFE ID {id} is not one of the expected [{}]",
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::TrustDomain => {
                format!(
                    "server SPIFFE ID {id} is outside trust domains [{}]",
                    tds(bundle)
                )
            }
            Self::Path(path) => format!(
                "server SPIFFE ID {id} is not {path} in trust domains [{}]",
                tds(bundle)
            ),
            Self::PathInAnyTrustDomain(path) => {
                format!("server SPIFFE ID {id} does not have the path {path}")
            }
        })
    }
}

fn tds(bundle: &TrustBundle) -> String {
    bundle
        .trust_domains()
        .map(TrustDomain::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn identity_error(message: String) -> TlsErr {
    #[derive(Debug)]
    struct SpiffeMismatch(String);
    impl fmt::Display for SpiffeMismatch {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for SpiffeMismatch {}
    TlsErr::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        SpiffeMismatch(message),
    ))))
}

fn leaf_spiffe_id(end_entity: &CertificateDer<'_>) -> Result<SpiffeId, TlsErr> {
    crate::cert::spiffe_id_of(end_entity).map_err(|e| identity_error(e.to_string()))
}

/// Client side: verifies the server chain against the mesh roots, then its SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: ServerIdentity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: TrustBundle, expected: ServerIdentity) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            expected,
            algorithms: crypto_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsErr> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.root_store(),
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = leaf_spiffe_id(end_entity)?;
        self.expected
            .check(&id, &self.bundle)
            .map_err(identity_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsErr> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsErr> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether a server asks for, or insists on, a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// mTLS: a verified mesh client certificate is mandatory (STRICT).
    Required,
    /// A client certificate is verified if presented, but not required (e.g. the CA: renewal by
    /// certificate, first issuance by token).
    Optional,
}

/// Server side: verifies the client chain against the mesh roots, then that its SPIFFE ID is in
/// the trust domain or an alias.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    chain: Arc<dyn ClientCertVerifier>,
    mode: ClientAuth,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: TrustBundle, mode: ClientAuth) -> Result<Arc<Self>, TlsError> {
        let builder =
            WebPkiClientVerifier::builder_with_provider(bundle.root_store(), crypto_provider());
        let builder = match mode {
            ClientAuth::Required => builder,
            ClientAuth::Optional => builder.allow_unauthenticated(),
        };
        let chain = builder
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(Self {
            bundle,
            chain,
            mode,
        }))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mode == ClientAuth::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsErr> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = leaf_spiffe_id(end_entity)?;
        if !self.bundle.accepts(&id) {
            return Err(identity_error(format!(
                "client SPIFFE ID {id} is outside trust domains [{}]",
                tds(&self.bundle)
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsErr> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsErr> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The verified peer's SPIFFE ID, from the certificates a finished handshake reports
/// (`peer_certificates()`); only meaningful with the verifiers above in place.
pub fn peer_spiffe_id(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = peer_certs?.first()?;
    crate::cert::spiffe_id_of(leaf).ok()
}

/// The lowest TLS version a server accepts (Istio's `meshMTLS.minProtocolVersion`); the highest
/// is always TLS 1.3.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MinTlsVersion {
    /// Istio's default.
    #[default]
    Tls12,
    Tls13,
}

impl MinTlsVersion {
    /// The versions offered, most preferred first.
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        match self {
            MinTlsVersion::Tls12 => PROTOCOL_VERSIONS,
            MinTlsVersion::Tls13 => TLS13_ONLY,
        }
    }
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Server config presenting `cert` (an [`Svid`] or a [`SvidResolver`] for rotation) and verifying
/// clients against `bundle`; TLS 1.2 and 1.3.
pub fn server_config(
    cert: impl Into<CertSource>,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    server_config_min(cert, bundle, client_auth, MinTlsVersion::default())
}

/// [`server_config`] accepting no TLS version below `min`.
pub fn server_config_min(
    cert: impl Into<CertSource>,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    min: MinTlsVersion,
) -> Result<ServerConfig, TlsError> {
    let verifier = SpiffeClientVerifier::new(bundle.clone(), client_auth)?;
    let builder = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(min.versions())
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier);
    Ok(builder.with_cert_resolver(cert.into().resolver()))
}

/// Client config verifying the server against `bundle` and `expected`, presenting `cert` when
/// given (mTLS) and nothing otherwise.
pub fn client_config(
    cert: Option<CertSource>,
    bundle: &TrustBundle,
    expected: ServerIdentity,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle.clone(), expected));
    Ok(match cert {
        Some(cert) => builder.with_client_cert_resolver(cert.resolver()),
        None => builder.with_no_client_auth(),
    })
}

/// Where a config takes its own certificate from: a fixed SVID or a rotating resolver.
#[derive(Debug, Clone)]
pub enum CertSource {
    Fixed(Box<Svid>),
    Rotating(Arc<SvidResolver>),
}

impl CertSource {
    fn resolver(self) -> Arc<SvidResolver> {
        match self {
            Self::Fixed(svid) => SvidResolver::new(&svid),
            Self::Rotating(r) => r,
        }
    }
}

impl From<Svid> for CertSource {
    fn from(svid: Svid) -> Self {
        Self::Fixed(Box::new(svid))
    }
}

impl From<&Svid> for CertSource {
    fn from(svid: &Svid) -> Self {
        Self::Fixed(Box::new(svid.clone()))
    }
}

impl From<Arc<SvidResolver>> for CertSource {
    fn from(r: Arc<SvidResolver>) -> Self {
        Self::Rotating(r)
    }
}

#[cfg(test)]
mod tests;
