//! The real certificate source: a fresh key and CSR for the token's identity, sent to the Istio
//! CA API with the token (re-read every time) as bearer credential.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use palisade_ca::{CaClient, CaClientError, CaClientOptions};
use palisade_identity::{KeyType, TrustDomain};
use tokio::sync::Mutex;

use crate::source::{CertificateSource, FetchError, Issued};
use crate::token::TokenFile;

/// How to reach the CA and what to ask for.
#[derive(Debug, Clone)]
pub struct CaSourceConfig {
    /// `host:port` of the CA.
    pub ca_addr: String,
    /// PEM roots the CA's serving certificate must chain to.
    pub ca_root_pem: Vec<u8>,
    /// The service-account token.
    pub token: TokenFile,
    /// Trust domain of the workload's SPIFFE ID (and of the CA's).
    pub trust_domain: TrustDomain,
    /// Key algorithm of every new key.
    pub key_type: KeyType,
    /// Requested lifetime; `None` lets the CA choose (24 h by default).
    pub ttl: Option<Duration>,
    /// Sent as `ClusterID` metadata.
    pub cluster_id: Option<String>,
    /// TCP+TLS connect timeout.
    pub connect_timeout: Duration,
}

/// Certificates from the CA. The gRPC connection is made on first use and dropped after
/// connection-level failures, so a CA that restarts is reconnected to.
#[derive(Debug)]
pub struct CaSource {
    config: Arc<CaSourceConfig>,
    client: Mutex<Option<CaClient>>,
}

impl CaSource {
    /// A source for `config`; nothing is contacted yet.
    pub fn new(config: CaSourceConfig) -> Self {
        Self {
            config: Arc::new(config),
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<CaClient, FetchError> {
        let mut guard = self.client.lock().await;
        if let Some(client) = guard.as_ref() {
            return Ok(client.clone());
        }
        let options = CaClientOptions {
            trust_domain: Some(self.config.trust_domain.clone()),
            connect_timeout: self.config.connect_timeout,
            ..CaClientOptions::default()
        };
        let client = CaClient::connect(&self.config.ca_addr, &self.config.ca_root_pem, options)
            .await
            .map_err(|e| self.map_error(e))?;
        tracing::debug!(ca = %self.config.ca_addr, "connected to the CA");
        *guard = Some(client.clone());
        Ok(client)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    fn map_error(&self, e: CaClientError) -> FetchError {
        match e {
            CaClientError::Connect { addr, reason } => FetchError::Connect { addr, reason },
            CaClientError::Refused { code, message } => FetchError::Refused { code, message },
            CaClientError::EmptyChain => {
                FetchError::BadResponse("the CA returned an empty chain".to_owned())
            }
            other @ (CaClientError::Root(_)
            | CaClientError::Tls(_)
            | CaClientError::Address(_)
            | CaClientError::Metadata(_)) => FetchError::Config(other.to_string()),
        }
    }

    async fn fetch_once(&self) -> Result<Issued, FetchError> {
        // Re-read on every request: projected tokens are replaced before they expire.
        let (token, id) = self.config.token.read_identity(&self.config.trust_domain)?;
        let key_type = self.config.key_type;
        let csr_id = id.clone();
        // RSA key generation takes tens of milliseconds: keep it off the async workers.
        let key_and_csr = tokio::task::spawn_blocking(move || {
            palisade_identity::generate_key_and_csr(&csr_id, key_type)
        })
        .await
        .map_err(|e| FetchError::Key(e.to_string()))?
        .map_err(|e| FetchError::Key(e.to_string()))?;

        let client = self.client().await?;
        let chain = match client
            .create_certificate(
                &key_and_csr.csr_pem,
                Some(&token.jwt),
                self.config.ttl,
                self.config.cluster_id.as_deref(),
            )
            .await
        {
            Ok(chain) => chain,
            Err(e) => {
                let e = self.map_error(e);
                if e.reason() == "connect" {
                    // The connection is suspect (CA restarted, network change): start afresh.
                    self.forget_client().await;
                }
                return Err(e);
            }
        };
        Issued::from_ca_chain(&chain, key_and_csr.key.der, &id)
    }
}

impl CertificateSource for CaSource {
    fn fetch(&self) -> impl Future<Output = Result<Issued, FetchError>> + Send {
        self.fetch_once()
    }
}
