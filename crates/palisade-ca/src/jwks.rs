//! Extra token issuers from the mesh config: their JWKS from a file, an http(s) URI or inline
//! JSON. Files and URIs are re-read periodically; a failed refresh keeps the previous keys, and
//! an issuer whose keys never loaded has none, so its tokens are refused (fail closed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;

use crate::token::{IssuerKeys, TokenAuthenticator};

/// Refresh period for JWKS files and URIs (istiod refreshes every 20 minutes).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// First retry delay after a failed fetch; doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(60);
pub const MAX_RETRY: Duration = Duration::from_secs(60 * 60);
/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Uri(String),
    Inline(String),
}

/// A trusted token issuer besides the control plane's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    pub issuer: String,
    pub jwks: JwksSource,
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JWKS: {0}")]
    Parse(String),
    #[error("fetching {uri}: {reason}")]
    Fetch { uri: String, reason: String },
}

/// Parses a JWKS document. Keys of unknown types make the whole document invalid.
pub fn parse_jwks(json: &str) -> Result<JwkSet, JwksError> {
    serde_json::from_str(json).map_err(|e| JwksError::Parse(e.to_string()))
}

/// Loads the keys of `source` once.
pub async fn load(source: &JwksSource) -> Result<JwkSet, JwksError> {
    match source {
        JwksSource::Inline(json) => parse_jwks(json),
        JwksSource::File(path) => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|source| JwksError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
            parse_jwks(&text).map_err(|e| match e {
                JwksError::Parse(r) => JwksError::Parse(format!("{}: {r}", path.display())),
                other => other,
            })
        }
        JwksSource::Uri(uri) => parse_jwks(&fetch(uri).await?),
    }
}

/// Keeps one issuer's keys fresh.
#[derive(Debug)]
pub struct Refresher {
    issuer: String,
    source: JwksSource,
    keys: Arc<IssuerKeys>,
    /// Whether the first load failed (then retries start at once with backoff).
    loaded: bool,
}

impl Refresher {
    /// Re-reads the source forever: every [`REFRESH_INTERVAL`] after a success, with backoff
    /// after failures. Cancel by dropping the future.
    pub async fn run(self) {
        let mut retry = FIRST_RETRY;
        let mut delay = if self.loaded {
            REFRESH_INTERVAL
        } else {
            FIRST_RETRY
        };
        loop {
            tokio::time::sleep(delay).await;
            match load(&self.source).await {
                Ok(set) => {
                    tracing::debug!(issuer = %self.issuer, keys = set.keys.len(), "JWKS refreshed");
                    self.keys.replace(set);
                    retry = FIRST_RETRY;
                    delay = REFRESH_INTERVAL;
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.issuer, error = %e, retry_in = ?retry, "JWKS refresh failed; keeping previous keys");
                    delay = retry;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }
}

/// Adds every configured issuer to `auth`. Inline and file keys must load now (a broken config
/// is an error); a URI that cannot be fetched yet leaves the issuer without keys and retries.
/// Returns the refreshers to run for file and URI sources.
pub async fn install(
    auth: &mut TokenAuthenticator,
    issuers: &[IssuerConfig],
) -> Result<Vec<Refresher>, JwksError> {
    let mut refreshers = Vec::new();
    for cfg in issuers {
        let (set, loaded) = match (&cfg.jwks, load(&cfg.jwks).await) {
            (_, Ok(set)) => (set, true),
            (JwksSource::Uri(_), Err(e)) => {
                tracing::warn!(issuer = %cfg.issuer, error = %e, "JWKS fetch failed; tokens of this issuer are refused until it succeeds");
                (JwkSet { keys: Vec::new() }, false)
            }
            (_, Err(e)) => return Err(e),
        };
        let keys = IssuerKeys::new(set);
        auth.add_issuer(cfg.issuer.clone(), Arc::clone(&keys));
        if !matches!(cfg.jwks, JwksSource::Inline(_)) {
            refreshers.push(Refresher {
                issuer: cfg.issuer.clone(),
                source: cfg.jwks.clone(),
                keys,
                loaded,
            });
        }
    }
    Ok(refreshers)
}

/// GETs `uri` (http or https; https verified against the system roots) and returns the body.
pub async fn fetch(uri: &str) -> Result<String, JwksError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(uri))
        .await
        .map_err(|_| JwksError::Fetch {
            uri: uri.to_owned(),
            reason: format!("timed out after {FETCH_TIMEOUT:?}"),
        })?
}

async fn fetch_inner(uri: &str) -> Result<String, JwksError> {
    let fail = |reason: String| JwksError::Fetch {
        uri: uri.to_owned(),
        reason,
    };
    let parsed: http::Uri = uri.parse().map_err(|e| fail(format!("invalid URI: {e}")))?;
    let host = parsed
        .host()
        .ok_or_else(|| fail("URI has no host".to_owned()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => return Err(fail(format!("unsupported scheme {other:?}"))),
    };
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let authority = parsed
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let request = http::Request::get(parsed.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let body = if https {
        let config = system_tls_config().map_err(fail)?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| fail(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| fail(e.to_string()))?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    };
    body.map_err(fail)
}

async fn send<IO>(io: IO, request: http::Request<Empty<Bytes>>) -> Result<String, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string());
    let result = async {
        let response = response?;
        if !response.status().is_success() {
            return Err(format!("HTTP status {}", response.status()));
        }
        let bytes = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }
    .await;
    driver.abort();
    result
}

/// TLS to public JWKS endpoints: the system's CA bundle (`SSL_CERT_FILE` or the usual paths).
fn system_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .into_iter()
            .map(PathBuf::from),
        );
    let mut roots = rustls::RootCertStore::empty();
    for path in candidates {
        if let Ok(certs) = palisade_identity::pem::read_certs(&path) {
            roots.add_parsable_certificates(certs);
            break;
        }
    }
    if roots.is_empty() {
        return Err("no system CA bundle found (set SSL_CERT_FILE)".to_owned());
    }
    let config = rustls::ClientConfig::builder_with_provider(palisade_identity::crypto_provider())
        .with_protocol_versions(palisade_identity::tls::PROTOCOL_VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
