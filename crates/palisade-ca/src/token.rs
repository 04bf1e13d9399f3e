//! Service-account tokens: the control plane's own issuer (the role the Kubernetes API server
//! plays for projected tokens) and the authenticator that turns a bearer token into a caller
//! identity.
//!
//! Checks, in order: JWT shape; `alg` on the allow-list (never `none`, never HMAC: the CA only
//! holds public keys); a known `iss`; a key of the issuer that matches `kid` and the algorithm's
//! key family and curve; the signature; `exp`/`nbf` with at most 60 s skew; `aud` containing
//! `istio-ca`. The identity comes from the `kubernetes.io` claims, else from
//! `sub: system:serviceaccount:<ns>:<sa>`; when both are present they must agree.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use palisade_identity::pem::{self as pemio, FileMode};
use palisade_identity::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

/// The audience the CA requires.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";
/// `iss` of the tokens the control plane issues itself.
pub const PALISADE_TOKEN_ISSUER: &str = "palisade-controlplane";
/// Token signing key in the state directory (ECDSA P-256, PKCS#8, mode 0600).
pub const TOKEN_KEY_FILE: &str = "token-signing-key.pem";
/// The issuer's public keys, as a JWKS document, in the state directory.
pub const TOKEN_JWKS_FILE: &str = "token-jwks.json";
/// Largest clock skew tolerated on `exp` and `nbf`, in seconds.
pub const MAX_SKEW_SECS: u64 = 60;
/// Largest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Algorithms a token may be signed with. HMAC is absent on purpose: the CA holds public keys
/// only, and accepting HS* would let anyone who knows a public key forge tokens.
pub const ALLOWED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// Why a token does not authenticate its bearer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token in the request")]
    Missing,
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("token uses alg \"none\" (unsigned)")]
    AlgNone,
    #[error("token algorithm {0:?} is not allowed")]
    DisallowedAlgorithm(String),
    #[error("token issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("issuer {issuer:?} has no key matching kid {kid:?} and algorithm {alg}")]
    NoMatchingKey {
        issuer: String,
        kid: Option<String>,
        alg: String,
    },
    #[error("token signature does not verify against issuer {0:?}'s keys")]
    BadSignature(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audience {0:?} does not contain \"istio-ca\"")]
    WrongAudience(Vec<String>),
    #[error("token lacks the {0:?} claim")]
    MissingClaim(String),
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
    #[error("token issuing failed: {0}")]
    Issue(String),
}

impl TokenError {
    /// The `reason` label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "token_missing",
            Self::Malformed(_) => "token_malformed",
            Self::AlgNone | Self::DisallowedAlgorithm(_) => "token_algorithm",
            Self::UnknownIssuer(_) => "token_issuer",
            Self::NoMatchingKey { .. } | Self::BadSignature(_) => "token_signature",
            Self::Expired | Self::NotYetValid => "token_time",
            Self::WrongAudience(_) => "token_audience",
            Self::MissingClaim(_) | Self::BadClaims(_) => "token_claims",
            Self::Issue(_) => "internal",
        }
    }
}

/// `aud` is a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(a) => vec![a.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// The claims of a projected service-account token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(
        rename = "kubernetes.io",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serviceaccount: Option<NamedObject>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedObject {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl ServiceAccountClaims {
    /// `(namespace, service_account)` from `kubernetes.io`, else from `sub`; both must agree.
    pub fn service_account(&self) -> Result<(String, String), TokenError> {
        let from_sub = self.sub.as_deref().and_then(|s| {
            let rest = s.strip_prefix("system:serviceaccount:")?;
            let (ns, sa) = rest.split_once(':')?;
            Some((ns.to_owned(), sa.to_owned()))
        });
        let from_k8s = self.kubernetes.as_ref().and_then(|k| {
            Some((
                k.namespace.clone()?,
                k.serviceaccount.as_ref()?.name.clone(),
            ))
        });
        match (from_k8s, from_sub) {
            (Some(k), Some(s)) if k != s => Err(TokenError::BadClaims(format!(
                "kubernetes.io says {}/{} but sub says {}/{}",
                k.0, k.1, s.0, s.1
            ))),
            (Some(k), _) => Ok(k),
            (None, Some(s)) => Ok(s),
            (None, None) => Err(TokenError::MissingClaim(
                "kubernetes.io.namespace/serviceaccount or sub".to_owned(),
            )),
        }
    }
}

/// Reads a token's service account without verifying anything: for the client side only (to
/// know which identity to put in a CSR). The CA verifies for itself.
pub fn peek_service_account(token: &str) -> Result<(String, String), TokenError> {
    let parts = split_token(token)?;
    let claims: ServiceAccountClaims = decode_json_part(parts.1, "payload")?;
    claims.service_account()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

fn split_token(token: &str) -> Result<(&str, &str, &str), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => Err(TokenError::Malformed(
            "expected three dot-separated parts".to_owned(),
        )),
    }
}

fn decode_json_part<T: serde::de::DeserializeOwned>(
    part: &str,
    what: &str,
) -> Result<T, TokenError> {
    let bytes = b64()
        .decode(part)
        .map_err(|e| TokenError::Malformed(format!("{what}: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Malformed(format!("{what}: {e}")))
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
}

/// The control plane's own service-account token issuer (ES256).
pub struct TokenIssuer {
    issuer: String,
    kid: String,
    key: EncodingKey,
    jwks: JwkSet,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// Loads the signing key from `state_dir`, creating it on first use, and (re)writes the
    /// public JWKS next to it.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TokenError> {
        let key_path = state_dir.join(TOKEN_KEY_FILE);
        let io = |e: pemio::PemError| TokenError::Issue(e.to_string());
        if !key_path.exists() {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| TokenError::Issue(e.to_string()))?;
            pemio::create_file_exclusive(
                &key_path,
                key.serialize_pem().as_bytes(),
                FileMode::Secret,
            )
            .map_err(io)?;
        }
        let pem = pemio::read_file(&key_path).map_err(io)?;
        let issuer = Self::from_pem(PALISADE_TOKEN_ISSUER, &pem)?;
        let json = serde_json::to_vec_pretty(&issuer.jwks)
            .map_err(|e| TokenError::Issue(e.to_string()))?;
        pemio::write_file_atomic(&state_dir.join(TOKEN_JWKS_FILE), &json, FileMode::Public)
            .map_err(io)?;
        Ok(issuer)
    }

    /// An issuer named `issuer` signing with a PEM ECDSA P-256 key.
    pub fn from_pem(issuer: &str, key_pem: &[u8]) -> Result<Self, TokenError> {
        let key = EncodingKey::from_ec_pem(key_pem)
            .map_err(|e| TokenError::Issue(format!("token signing key: {e}")))?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(|e| TokenError::Issue(e.to_string()))?;
        let kid = jwk
            .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .map_err(|e| TokenError::Issue(e.to_string()))?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(Self {
            issuer: issuer.to_owned(),
            kid,
            key,
            jwks: JwkSet { keys: vec![jwk] },
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public keys, to verify this issuer's tokens.
    pub fn jwks(&self) -> &JwkSet {
        &self.jwks
    }

    /// A token for `namespace`/`service_account`, valid from now for `ttl`.
    pub fn issue(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[String],
        ttl: Duration,
    ) -> Result<String, TokenError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.issue_at(namespace, service_account, audiences, now, ttl)
    }

    /// A token as if issued at `issued_at` (Unix seconds): tests use it for expired tokens.
    pub fn issue_at(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[String],
        issued_at: i64,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        // The names become SPIFFE path segments: refuse what could never be an identity.
        let td = TrustDomain::new("cluster.local").map_err(|e| TokenError::Issue(e.to_string()))?;
        SpiffeId::for_service_account(td, namespace, service_account)
            .map_err(|e| TokenError::Issue(format!("invalid namespace or service account: {e}")))?;
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = ServiceAccountClaims {
            iss: Some(self.issuer.clone()),
            sub: Some(format!(
                "system:serviceaccount:{namespace}:{service_account}"
            )),
            aud: Some(match audiences {
                [one] => Audience::One(one.clone()),
                many => Audience::Many(many.to_vec()),
            }),
            exp: Some(issued_at.saturating_add(ttl_secs)),
            iat: Some(issued_at),
            nbf: Some(issued_at),
            kubernetes: Some(KubernetesClaims {
                namespace: Some(namespace.to_owned()),
                serviceaccount: Some(NamedObject {
                    name: service_account.to_owned(),
                    uid: Some(random_uid()),
                }),
            }),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| TokenError::Issue(e.to_string()))
    }
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = palisade_identity::cert::CertInfo::serial_hex(&b);
    let h = format!("{h:0>32}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The keys of one trusted issuer; replaceable when a JWKS is refreshed.
#[derive(Debug, Default)]
pub struct IssuerKeys {
    keys: RwLock<Arc<JwkSet>>,
    /// Bumped on every replacement: verification results cached under older keys are dropped.
    generation: AtomicU64,
}

impl IssuerKeys {
    pub fn new(jwks: JwkSet) -> Arc<Self> {
        Arc::new(Self {
            keys: RwLock::new(Arc::new(jwks)),
            generation: AtomicU64::new(0),
        })
    }

    /// Replaces the key set (after a refresh).
    pub fn replace(&self, jwks: JwkSet) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(jwks);
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> Arc<JwkSet> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// An authenticated token bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCaller {
    pub issuer: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: SpiffeId,
}

/// Verifies bearer tokens from the trusted issuers.
#[derive(Debug, Clone)]
pub struct TokenAuthenticator {
    trust_domain: TrustDomain,
    audience: String,
    /// Key sets per issuer name; several sources may serve one issuer.
    issuers: HashMap<String, Vec<Arc<IssuerKeys>>>,
    cache: Option<Arc<VerifiedCache>>,
}

/// Successful verifications, keyed by the exact token text. A caller that presents the same
/// token many times (a node agent requesting certificates for many workloads, retries) pays for
/// the signature check once. An entry is used only while the token is still within its validity
/// (same skew rule) and the issuer's keys have not changed since.
#[derive(Debug)]
struct VerifiedCache {
    capacity: usize,
    entries: Mutex<HashMap<String, CachedCaller>>,
}

#[derive(Debug, Clone)]
struct CachedCaller {
    caller: TokenCaller,
    exp: i64,
    generation: u64,
}

impl VerifiedCache {
    fn get(&self, token: &str, now: i64, generation: u64) -> Option<TokenCaller> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let hit = entries.get(token)?;
        let fresh =
            hit.generation == generation && now <= hit.exp.saturating_add(MAX_SKEW_SECS as i64);
        fresh.then(|| hit.caller.clone())
    }

    fn put(&self, token: &str, entry: CachedCaller, now: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, e| now <= e.exp.saturating_add(MAX_SKEW_SECS as i64));
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(token.to_owned(), entry);
    }
}

impl TokenAuthenticator {
    /// Identities are minted in `trust_domain`; tokens must be for `istio-ca`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            audience: ISTIO_CA_AUDIENCE.to_owned(),
            issuers: HashMap::new(),
            cache: None,
        }
    }

    /// Remembers up to `capacity` successful verifications (0 turns the cache off).
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0).then(|| {
            Arc::new(VerifiedCache {
                capacity,
                entries: Mutex::new(HashMap::new()),
            })
        });
        self
    }

    fn generation(&self, issuer: &str) -> u64 {
        self.issuers.get(issuer).map_or(0, |sets| {
            sets.iter()
                .map(|k| k.generation.load(Ordering::Relaxed))
                .fold(sets.len() as u64, u64::wrapping_add)
        })
    }

    /// Trusts `issuer` with these keys (in addition to keys already known for it).
    pub fn add_issuer(&mut self, issuer: impl Into<String>, keys: Arc<IssuerKeys>) {
        self.issuers.entry(issuer.into()).or_default().push(keys);
    }

    /// The issuers trusted so far.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.keys().map(String::as_str)
    }

    /// Verifies `token` and returns who it speaks for.
    pub fn authenticate(&self, token: &str) -> Result<TokenCaller, TokenError> {
        let (h, p, _) = split_token(token)?;
        let header: RawHeader = decode_json_part(h, "header")?;
        let alg_name = header
            .alg
            .ok_or_else(|| TokenError::Malformed("header has no alg".to_owned()))?;
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone);
        }
        let alg = ALLOWED_ALGORITHMS
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == alg_name)
            .ok_or_else(|| TokenError::DisallowedAlgorithm(alg_name.clone()))?;

        // The issuer is read before verification only to pick its keys; it is verified below.
        let unverified: ServiceAccountClaims = decode_json_part(p, "payload")?;
        let issuer = unverified
            .iss
            .ok_or_else(|| TokenError::MissingClaim("iss".to_owned()))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let generation = self.generation(&issuer);
        if let Some(cache) = &self.cache
            && let Some(caller) = cache.get(token, now, generation)
        {
            return Ok(caller);
        }
        let key_sets: Vec<Arc<JwkSet>> = self
            .issuers
            .get(&issuer)
            .ok_or_else(|| TokenError::UnknownIssuer(issuer.clone()))?
            .iter()
            .map(|k| k.get())
            .collect();

        let candidates: Vec<&Jwk> = key_sets
            .iter()
            .flat_map(|set| set.keys.iter())
            .filter(|k| match (&header.kid, &k.common.key_id) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .filter(|k| key_fits(k, alg))
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::NoMatchingKey {
                issuer,
                kid: header.kid,
                alg: alg_name,
            });
        }

        let mut validation = Validation::new(alg);
        validation.leeway = MAX_SKEW_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);

        let mut last = TokenError::BadSignature(issuer.clone());
        for jwk in candidates {
            let key = match DecodingKey::from_jwk(jwk) {
                Ok(k) => k,
                Err(_) => continue,
            };
            match jsonwebtoken::decode::<ServiceAccountClaims>(token, &key, &validation) {
                Ok(data) => {
                    let exp = data.claims.exp.unwrap_or(0);
                    let caller = self.caller(issuer, data.claims)?;
                    if let Some(cache) = &self.cache {
                        let entry = CachedCaller {
                            caller: caller.clone(),
                            exp,
                            generation,
                        };
                        cache.put(token, entry, now);
                    }
                    return Ok(caller);
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                            TokenError::BadSignature(issuer.clone())
                        }
                        K::ExpiredSignature => return Err(TokenError::Expired),
                        K::ImmatureSignature => return Err(TokenError::NotYetValid),
                        K::InvalidAudience => {
                            return Err(TokenError::WrongAudience(
                                unverified
                                    .aud
                                    .as_ref()
                                    .map(Audience::to_vec)
                                    .unwrap_or_default(),
                            ));
                        }
                        K::MissingRequiredClaim(c) => {
                            return Err(TokenError::MissingClaim(c.clone()));
                        }
                        other => return Err(TokenError::Malformed(format!("{other:?}"))),
                    };
                }
            }
        }
        Err(last)
    }

    fn caller(
        &self,
        issuer: String,
        claims: ServiceAccountClaims,
    ) -> Result<TokenCaller, TokenError> {
        // The signature covered these claims; the audience check above already ran, but an
        // explicit re-check keeps the rule visible here.
        let aud = claims
            .aud
            .as_ref()
            .map(Audience::to_vec)
            .unwrap_or_default();
        if !aud.iter().any(|a| a == &self.audience) {
            return Err(TokenError::WrongAudience(aud));
        }
        let (namespace, service_account) = claims.service_account()?;
        let identity =
            SpiffeId::for_service_account(self.trust_domain.clone(), &namespace, &service_account)
                .map_err(|e| {
                    TokenError::BadClaims(format!("{namespace}/{service_account}: {e}"))
                })?;
        Ok(TokenCaller {
            issuer,
            namespace,
            service_account,
            identity,
        })
    }
}

/// Whether a JWK may verify a token signed with `alg`: same key family and curve, and the JWK's
/// own `alg` (when set) equal to it. Symmetric keys never fit.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(key_alg) = jwk.common.key_algorithm
        && format!("{key_alg:?}") != format!("{alg:?}")
    {
        return false;
    }
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn issuer() -> TokenIssuer {
        let key = rcgen::KeyPair::generate().unwrap();
        TokenIssuer::from_pem(PALISADE_TOKEN_ISSUER, key.serialize_pem().as_bytes()).unwrap()
    }

    fn authenticator(trusted: &TokenIssuer) -> TokenAuthenticator {
        let mut a = TokenAuthenticator::new(TrustDomain::new("cluster.local").unwrap());
        a.add_issuer(trusted.issuer(), IssuerKeys::new(trusted.jwks().clone()));
        a
    }

    fn aud(a: &str) -> Vec<String> {
        vec![a.to_owned()]
    }

    fn b64url(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token with arbitrary claims, signed by `issuer`'s key.
    fn signed_claims(issuer: &TokenIssuer, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(issuer.kid.clone());
        jsonwebtoken::encode(&header, claims, &issuer.key).unwrap()
    }

    #[test]
    fn token_table() {
        let ours = issuer();
        let theirs = issuer();
        let auth = authenticator(&ours);
        let t = now();
        let hour = Duration::from_secs(3600);
        let valid = ours
            .issue("default", "web", &aud("istio-ca"), hour)
            .unwrap();
        let payload = valid.split('.').nth(1).unwrap().to_owned();
        let none_token = format!("{}.{payload}.", b64url(br#"{"alg":"none","typ":"JWT"}"#));
        // HS256 "signed" with the issuer's public JWKS as the secret: the classic confusion.
        let hs_header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let hs_token = format!("{hs_header}.{payload}.{}", b64url(b"whatever"));

        let cases: Vec<(&str, String, Result<&str, TokenError>)> = vec![
            (
                "valid",
                valid.clone(),
                Ok("spiffe://cluster.local/ns/default/sa/web"),
            ),
            (
                "several audiences including istio-ca",
                ours.issue(
                    "default",
                    "web",
                    &["other".to_owned(), "istio-ca".to_owned()],
                    hour,
                )
                .unwrap(),
                Ok("spiffe://cluster.local/ns/default/sa/web"),
            ),
            (
                "expired 30 s ago: within skew",
                ours.issue_at("default", "web", &aud("istio-ca"), t - 3630, hour)
                    .unwrap(),
                Ok("spiffe://cluster.local/ns/default/sa/web"),
            ),
            (
                "expired",
                ours.issue_at("default", "web", &aud("istio-ca"), t - 7200, hour)
                    .unwrap(),
                Err(TokenError::Expired),
            ),
            (
                "not yet valid",
                ours.issue_at("default", "web", &aud("istio-ca"), t + 600, hour)
                    .unwrap(),
                Err(TokenError::NotYetValid),
            ),
            (
                "wrong audience",
                ours.issue("default", "web", &aud("other"), hour).unwrap(),
                Err(TokenError::WrongAudience(aud("other"))),
            ),
            (
                "signed by another key",
                theirs
                    .issue("default", "web", &aud("istio-ca"), hour)
                    .unwrap(),
                Err(TokenError::NoMatchingKey {
                    issuer: PALISADE_TOKEN_ISSUER.to_owned(),
                    kid: Some(theirs.kid.clone()),
                    alg: "ES256".to_owned(),
                }),
            ),
            ("alg none", none_token, Err(TokenError::AlgNone)),
            (
                "HMAC",
                hs_token,
                Err(TokenError::DisallowedAlgorithm("HS256".to_owned())),
            ),
            (
                "unknown issuer",
                TokenIssuer::from_pem(
                    "someone-else",
                    rcgen::KeyPair::generate()
                        .unwrap()
                        .serialize_pem()
                        .as_bytes(),
                )
                .unwrap()
                .issue("default", "web", &aud("istio-ca"), hour)
                .unwrap(),
                Err(TokenError::UnknownIssuer("someone-else".to_owned())),
            ),
            (
                "sub and kubernetes.io disagree",
                signed_claims(
                    &ours,
                    &serde_json::json!({
                        "iss": PALISADE_TOKEN_ISSUER, "aud": "istio-ca", "exp": t + 600,
                        "sub": "system:serviceaccount:prod:admin",
                        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "web"}}
                    }),
                ),
                Err(TokenError::BadClaims(
                    "kubernetes.io says default/web but sub says prod/admin".to_owned(),
                )),
            ),
            (
                "identity from sub only",
                signed_claims(
                    &ours,
                    &serde_json::json!({
                        "iss": PALISADE_TOKEN_ISSUER, "aud": ["istio-ca"], "exp": t + 600,
                        "sub": "system:serviceaccount:prod:admin"
                    }),
                ),
                Ok("spiffe://cluster.local/ns/prod/sa/admin"),
            ),
            (
                "no audience",
                signed_claims(
                    &ours,
                    &serde_json::json!({
                        "iss": PALISADE_TOKEN_ISSUER, "exp": t + 600,
                        "sub": "system:serviceaccount:prod:admin"
                    }),
                ),
                Err(TokenError::MissingClaim("aud".to_owned())),
            ),
            (
                "no expiry",
                signed_claims(
                    &ours,
                    &serde_json::json!({
                        "iss": PALISADE_TOKEN_ISSUER, "aud": "istio-ca",
                        "sub": "system:serviceaccount:prod:admin"
                    }),
                ),
                Err(TokenError::MissingClaim("exp".to_owned())),
            ),
            (
                "namespace that would inject path segments",
                signed_claims(
                    &ours,
                    &serde_json::json!({
                        "iss": PALISADE_TOKEN_ISSUER, "aud": "istio-ca", "exp": t + 600,
                        "sub": "system:serviceaccount:a/sa/b:c"
                    }),
                ),
                Err(TokenError::BadClaims(String::new())),
            ),
            (
                "tampered payload",
                {
                    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
                    let claims = serde_json::json!({
                        "iss": PALISADE_TOKEN_ISSUER, "aud": "istio-ca", "exp": t + 600,
                        "sub": "system:serviceaccount:kube-system:admin"
                    });
                    parts[1] = b64url(claims.to_string().as_bytes());
                    parts.join(".")
                },
                Err(TokenError::BadSignature(PALISADE_TOKEN_ISSUER.to_owned())),
            ),
            (
                "not a JWT",
                "abc".to_owned(),
                Err(TokenError::Malformed(String::new())),
            ),
            (
                "empty",
                String::new(),
                Err(TokenError::Malformed(String::new())),
            ),
        ];
        for (name, token, want) in cases {
            let got = auth.authenticate(&token);
            match (&got, &want) {
                (Ok(caller), Ok(id)) => assert_eq!(caller.identity.to_string(), *id, "{name}"),
                // Errors with free text are compared by kind only.
                (Err(TokenError::Malformed(_)), Err(TokenError::Malformed(_))) => {}
                (Err(TokenError::BadClaims(_)), Err(TokenError::BadClaims(m))) if m.is_empty() => {}
                (Err(e), Err(w)) => assert_eq!(e, w, "{name}"),
                _ => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn verified_tokens_are_cached_until_keys_change() {
        let ours = issuer();
        let keys = IssuerKeys::new(ours.jwks().clone());
        let mut auth =
            TokenAuthenticator::new(TrustDomain::new("cluster.local").unwrap()).with_cache(2);
        auth.add_issuer(ours.issuer(), Arc::clone(&keys));
        let hour = Duration::from_secs(3600);
        let token = ours
            .issue("default", "web", &aud("istio-ca"), hour)
            .unwrap();
        let first = auth.authenticate(&token).unwrap();
        assert_eq!(auth.authenticate(&token).unwrap(), first);
        let cache = auth.cache.as_ref().unwrap();
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        // Capacity is bounded.
        for sa in ["a", "b", "c"] {
            let t = ours.issue("default", sa, &aud("istio-ca"), hour).unwrap();
            auth.authenticate(&t).unwrap();
            assert!(cache.entries.lock().unwrap().len() <= 2);
        }
        // The issuer's keys rotate away: the cached result is not used any more.
        auth.authenticate(&token).unwrap();
        keys.replace(issuer().jwks().clone());
        assert!(matches!(
            auth.authenticate(&token),
            Err(TokenError::NoMatchingKey { .. })
        ));
        // An entry past its token's expiry is never served: the token is verified afresh
        // (here it carries a broken signature, so the fresh check refuses it).
        keys.replace(ours.jwks().clone());
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[2] = "AAAA";
        let forged = parts.join(".");
        let t = now();
        let stale = CachedCaller {
            caller: first.clone(),
            exp: t - 61,
            generation: auth.generation(ours.issuer()),
        };
        cache.put(&forged, stale, t);
        assert!(matches!(
            auth.authenticate(&forged),
            Err(TokenError::BadSignature(_))
        ));
    }

    #[test]
    fn issued_token_has_projected_claims() {
        let ours = issuer();
        let token = ours
            .issue("prod", "api", &aud("istio-ca"), Duration::from_secs(600))
            .unwrap();
        let claims: ServiceAccountClaims =
            decode_json_part(token.split('.').nth(1).unwrap(), "payload").unwrap();
        assert_eq!(claims.iss.as_deref(), Some(PALISADE_TOKEN_ISSUER));
        assert_eq!(
            claims.sub.as_deref(),
            Some("system:serviceaccount:prod:api")
        );
        assert_eq!(claims.aud, Some(Audience::One("istio-ca".to_owned())));
        let (iat, nbf, exp) = (
            claims.iat.unwrap(),
            claims.nbf.unwrap(),
            claims.exp.unwrap(),
        );
        assert_eq!(exp - iat, 600);
        assert_eq!(nbf, iat);
        let k8s = claims.kubernetes.unwrap();
        assert_eq!(k8s.namespace.as_deref(), Some("prod"));
        let sa = k8s.serviceaccount.unwrap();
        assert_eq!(sa.name, "api");
        assert_eq!(sa.uid.unwrap().len(), 36);
        assert_eq!(
            peek_service_account(&token).unwrap(),
            ("prod".to_owned(), "api".to_owned())
        );
        assert!(
            ours.issue("a/b", "api", &aud("istio-ca"), Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn state_dir_key_is_reused_and_jwks_written() {
        let dir = tempfile::tempdir().unwrap();
        let first = TokenIssuer::load_or_create(dir.path()).unwrap();
        let second = TokenIssuer::load_or_create(dir.path()).unwrap();
        assert_eq!(first.kid, second.kid);
        let jwks = std::fs::read_to_string(dir.path().join(TOKEN_JWKS_FILE)).unwrap();
        let parsed: JwkSet = serde_json::from_str(&jwks).unwrap();
        assert_eq!(parsed.keys.len(), 1);
        assert_eq!(
            parsed.keys[0].common.key_id.as_deref(),
            Some(first.kid.as_str())
        );
        // The JWKS file alone verifies the issuer's tokens.
        let mut auth = TokenAuthenticator::new(TrustDomain::new("td").unwrap());
        auth.add_issuer(PALISADE_TOKEN_ISSUER, IssuerKeys::new(parsed));
        let token = second
            .issue("ns", "sa", &aud("istio-ca"), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            auth.authenticate(&token).unwrap().identity.to_string(),
            "spiffe://td/ns/ns/sa/sa"
        );
    }
}
