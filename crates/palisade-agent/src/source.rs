//! Where certificates come from. The secret manager only knows the [`CertificateSource`]
//! trait; [`crate::ca::CaSource`] is the real one (fresh key, CSR, Istio CA call).

use std::future::Future;
use std::time::Duration;

use palisade_identity::{CertificateDer, PrivateKeyDer, SpiffeId, Svid};

use crate::token::TokenError;

/// A certificate just issued: the SVID (leaf and intermediates, with its key) and the roots
/// the CA returned (the last element of its chain).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The workload's certificate chain and private key.
    pub svid: Svid,
    /// Trust anchors that came with it (may be empty).
    pub roots: Vec<CertificateDer<'static>>,
}

impl Issued {
    /// Builds an [`Issued`] from the CA's PEM chain (leaf first, root last) and the key that
    /// signed the CSR, checking that the key matches and the identity is `expected`.
    pub fn from_ca_chain(
        chain_pem: &[String],
        key: PrivateKeyDer<'static>,
        expected: &SpiffeId,
    ) -> Result<Self, FetchError> {
        let mut certs = Vec::with_capacity(chain_pem.len());
        for (i, pem) in chain_pem.iter().enumerate() {
            let parsed = palisade_identity::pem::parse_certs(pem.as_bytes()).map_err(|e| {
                FetchError::BadResponse(format!("certificate {i} of the chain: {e}"))
            })?;
            certs.extend(parsed);
        }
        if certs.len() < 2 {
            return Err(FetchError::BadResponse(format!(
                "expected the leaf and at least the root, got {} certificate(s)",
                certs.len()
            )));
        }
        let root = certs.pop().into_iter().collect();
        let svid = Svid::new(certs, key).map_err(|e| FetchError::BadResponse(e.to_string()))?;
        if svid.spiffe_id() != expected {
            return Err(FetchError::BadResponse(format!(
                "the certificate is for {} but {expected} was requested",
                svid.spiffe_id()
            )));
        }
        Ok(Self { svid, roots: root })
    }
}

/// Why getting a certificate failed. [`FetchError::reason`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The token could not be read or names no identity.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Key or CSR generation failed.
    #[error("key or CSR generation failed: {0}")]
    Key(String),
    /// The CA could not be reached (connection refused, TLS failure...).
    #[error("cannot reach the CA at {addr}: {reason}")]
    Connect {
        /// The CA's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The CA answered with an error status.
    #[error("the CA refused the request ({code:?}): {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
    /// The CA's answer cannot be used.
    #[error("unusable certificate from the CA: {0}")]
    BadResponse(String),
    /// No answer in time.
    #[error("no answer from the CA within {0:?}")]
    Timeout(Duration),
    /// The agent's own configuration is unusable (bad root file, bad cluster ID...).
    #[error("agent configuration: {0}")]
    Config(String),
}

impl FetchError {
    /// A short stable label for metrics: `token`, `key`, `connect`, `unauthenticated`,
    /// `invalid_argument`, `ca_error`, `bad_response`, `timeout`, `config`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::Key(_) => "key",
            Self::Connect { .. } => "connect",
            Self::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            } => "unauthenticated",
            Self::Refused {
                code: tonic::Code::InvalidArgument,
                ..
            } => "invalid_argument",
            // Unavailable: the CA is not there. Cancelled and Unknown ("transport error") are
            // what tonic reports when the connection broke under a request (the CA restarted);
            // the CA itself never answers with them.
            Self::Refused {
                code: tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown,
                ..
            } => "connect",
            Self::Refused { .. } => "ca_error",
            Self::BadResponse(_) => "bad_response",
            Self::Timeout(_) => "timeout",
            Self::Config(_) => "config",
        }
    }
}

/// Something that issues certificates on demand. Each call must use a fresh key.
pub trait CertificateSource: Send + Sync + 'static {
    /// Gets a new certificate now.
    fn fetch(&self) -> impl Future<Output = Result<Issued, FetchError>> + Send;
}
