//! Verification keys from a JWKS document (inline, or fetched by the control plane and inlined
//! into the pushed config). Keys that cannot be used are skipped, not fatal: one odd key in a
//! provider's document must not take the others down.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// The largest JWKS document accepted (bytes).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// The most keys kept from one document.
pub const MAX_KEYS: usize = 64;
/// Member the control plane's JWKS resolver adds to an empty key set when it has never fetched
/// the document: the proxy then answers "Jwks remote fetch is failed" (and fails closed).
pub const FETCH_ERROR_MEMBER: &str = "x-palisade-fetch-error";

/// The key families a token's `alg` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Rsa,
    /// With the curve, so that ES256 never tries a P-384 key.
    Ec(Curve),
    Ed,
    /// Symmetric: only from an inline `jwks` (the resolver drops `oct` keys from remote ones).
    Hmac,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
}

/// The family (and curve) an algorithm needs.
pub fn family_of(alg: Algorithm) -> Option<Family> {
    Some(match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
        Algorithm::ES256 => Family::Ec(Curve::P256),
        Algorithm::ES384 => Family::Ec(Curve::P384),
        Algorithm::EdDSA => Family::Ed,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        _ => return None,
    })
}

/// One usable key.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when the JWK names one: the token must use exactly it.
    pub alg: Option<Algorithm>,
    pub family: Family,
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

/// The keys of one JWT rule.
#[derive(Debug, Clone)]
pub enum KeySet {
    Keys(Vec<Key>),
    /// The control plane could not fetch the document and has no earlier copy: fail closed.
    FetchFailed(String),
}

impl KeySet {
    /// The keys a token with `kid`/`alg` may be verified with.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        let keys: &[Key] = match self {
            KeySet::Keys(k) => k,
            KeySet::FetchFailed(_) => &[],
        };
        let family = family_of(alg);
        keys.iter().filter(move |k| {
            Some(k.family) == family
                && k.alg.is_none_or(|a| a == alg)
                && match (kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    // A token without kid tries every key; a key without kid matches any kid.
                    _ => true,
                }
        })
    }
}

/// Why a JWKS document is unusable as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS document is {0} bytes, more than the {MAX_JWKS_BYTES} allowed")]
    TooLarge(usize),
    #[error("JWKS document is not JSON: {0}")]
    Json(String),
    #[error("JWKS document has no \"keys\" array")]
    NoKeys,
}

/// Parses a JWKS document; unusable keys are returned as warnings.
pub fn parse_jwks(doc: &str) -> Result<(KeySet, Vec<String>), JwksError> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge(doc.len()));
    }
    let v: Value = serde_json::from_str(doc).map_err(|e| JwksError::Json(e.to_string()))?;
    let list = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JwksError::NoKeys)?;
    if list.is_empty()
        && let Some(reason) = v.get(FETCH_ERROR_MEMBER).and_then(Value::as_str)
    {
        return Ok((KeySet::FetchFailed(reason.to_owned()), Vec::new()));
    }
    let mut keys = Vec::new();
    let mut warnings = Vec::new();
    for (i, raw) in list.iter().enumerate() {
        if keys.len() >= MAX_KEYS {
            warnings.push(format!(
                "keys[{i}..]: only the first {MAX_KEYS} keys are used"
            ));
            break;
        }
        match parse_key(raw) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(e) => warnings.push(format!("keys[{i}]: {e}")),
        }
    }
    Ok((KeySet::Keys(keys), warnings))
}

/// One JWK; `Ok(None)` for keys not meant for signatures (`use: enc`).
fn parse_key(raw: &Value) -> Result<Option<Key>, String> {
    if raw.get("use").and_then(Value::as_str) == Some("enc") {
        return Ok(None);
    }
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
    let alg = match raw.get("alg").and_then(Value::as_str) {
        None => None,
        Some(a) => Some(
            a.parse::<Algorithm>()
                .map_err(|_| format!("unsupported alg {a:?}"))?,
        ),
    };
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Family::Ec(Curve::P256),
            EllipticCurve::P384 => Family::Ec(Curve::P384),
            ref c => return Err(format!("unsupported curve {c:?}")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Family::Ed,
            ref c => return Err(format!("unsupported curve {c:?}")),
        },
        AlgorithmParameters::OctetKey(_) => Family::Hmac,
        _ => return Err("unsupported key type".to_owned()),
    };
    if let Some(a) = alg
        && family_of(a) != Some(family)
    {
        return Err(format!("alg {a:?} does not fit the key type"));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    Ok(Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        family,
        key,
    }))
}
