//! Request authentication with JWT, driven by a workload's combined RequestAuthentication rules.
//!
//! [`JwtAuthn::build`] turns the resolved rules (keys already inline: the control plane's JWKS
//! resolver fetches `jwksUri` and pushes the keys, so nothing is fetched on the request path) into
//! verifiers, once per pushed config. [`JwtAuthn::authenticate`] then decides one request the way
//! Istio's sidecar does:
//! - no token at any configured location: the request passes with no request identity;
//! - a token that does not validate against a rule of its issuer: 401 with
//!   `WWW-Authenticate: Bearer realm="<request URL>", error="invalid_token"` and Envoy's message;
//! - a valid token whose audiences are not allowed: 403.
//!
//! Every token at every location of every rule is verified, and one failure refuses the request
//! (Envoy 1.40 as Istio configures it does the same): a good token must not carry a forged one
//! past the proxy to an app that might read it. With several valid tokens the request identity
//! is that of the first in Envoy's extraction order (headers, then query parameters, then
//! cookies; each sorted by name), which is the payload Envoy leaves in its metadata.
//!
//! Safety rails: a fixed algorithm allow-list (no `none`), the key family must fit the `alg`
//! (an RSA/EC public key is never used as an HMAC secret), bounded clock skew, size limits on
//! tokens and JWKS documents. [`JwtAuthn::apply`] performs the rule's outputs on the request
//! sent to the app: `outputPayloadToHeader`, `outputClaimToHeaders`, and the token is stripped
//! unless `forwardOriginalToken`.

pub mod extract;
pub mod keys;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use jsonwebtoken::{Algorithm, Validation};
use palisade_policy::resolve::ResolvedJwtRule;
use serde_json::Value;

pub use extract::Location;
pub use keys::{KeySet, MAX_JWKS_BYTES};

/// The largest token accepted (bytes); larger ones are refused without being parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew allowed on `exp` and `nbf` (Envoy's default).
pub const CLOCK_SKEW_SECS: u64 = 60;
/// The most tokens verified for one request; more are refused without being verified (each
/// signature check costs, and no client needs this many).
pub const MAX_TOKENS: usize = 8;

/// One rule, ready to verify.
#[derive(Debug, Clone)]
pub struct Provider {
    /// `namespace/name` of the RequestAuthentication.
    pub policy: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySet,
    pub locations: Vec<Location>,
    pub payload_header: Option<HeaderName>,
    pub claim_headers: Vec<(HeaderName, String)>,
    pub forward: bool,
}

/// A workload's JWT authentication.
#[derive(Debug, Clone, Default)]
pub struct JwtAuthn {
    providers: Vec<Provider>,
    /// Every location of every rule, deduplicated, in Envoy's extraction order.
    locations: Vec<Location>,
    /// Every output header of every rule: removed from client requests so they cannot be spoofed.
    output_headers: Vec<HeaderName>,
}

/// Why a token was refused. `Display` gives Envoy's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtFailure {
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    #[error("Jwt is too large")]
    TooLarge,
    #[error("Too many Jwts in the request")]
    TooMany,
    #[error("Jwt header [alg] is not supported")]
    AlgNotSupported,
    #[error("Jwt issuer is not configured")]
    IssuerNotConfigured,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Jwt verification fails")]
    VerificationFails,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    KeyNotFound,
    #[error("Jwks remote fetch is failed")]
    FetchFailed,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
}

impl JwtFailure {
    /// 403 for audiences, 401 for everything else (as Envoy's jwt_authn filter answers).
    pub fn status(self) -> StatusCode {
        match self {
            JwtFailure::AudienceNotAllowed => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// Ranks failures across rules of one issuer: the most informative wins.
    fn rank(self) -> u8 {
        match self {
            JwtFailure::AudienceNotAllowed => 6,
            JwtFailure::Expired | JwtFailure::NotYetValid => 5,
            JwtFailure::VerificationFails => 4,
            JwtFailure::KeyNotFound => 3,
            JwtFailure::FetchFailed => 2,
            _ => 1,
        }
    }
}

/// A token that validated. The one [`Outcome::Valid`] holds is the request identity; the
/// request's other tokens (all verified too) are in `more`.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Index of the rule that accepted it.
    pub provider: usize,
    pub claims: Value,
    /// The payload segment as it came (base64url), for `outputPayloadToHeader`.
    pub payload_b64: String,
    /// Where it was found (stripped before the app unless `forwardOriginalToken`).
    pub location: Location,
    /// The request's other tokens, in extraction order (each with an empty `more`).
    pub more: Vec<Verified>,
}

impl Verified {
    /// This token and the others, in extraction order.
    pub fn all(&self) -> impl DoubleEndedIterator<Item = &Verified> {
        std::iter::once(self).chain(self.more.iter())
    }
}

/// The result of authentication.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// No RequestAuthentication applies, or no token was presented: no request identity.
    NoToken,
    Valid(Box<Verified>),
    Invalid(JwtFailure),
}

/// Parts of an unverified token.
struct Parsed<'t> {
    alg: Algorithm,
    kid: Option<String>,
    payload_b64: &'t str,
    claims: Value,
}

fn parse_token(token: &str) -> Result<Parsed<'_>, JwtFailure> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtFailure::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtFailure::BadFormat);
    };
    let header: Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtFailure::BadFormat)?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtFailure::AlgNotSupported)?;
    // The allow-list: the algorithms this build verifies. `none` is never among them.
    let alg = match alg_name {
        "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" | "ES256" | "ES384" | "EdDSA"
        | "HS256" | "HS384" | "HS512" => alg_name
            .parse::<Algorithm>()
            .map_err(|_| JwtFailure::AlgNotSupported)?,
        _ => return Err(JwtFailure::AlgNotSupported),
    };
    let claims: Value = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(Value::is_object)
        .ok_or(JwtFailure::BadFormat)?;
    Ok(Parsed {
        alg,
        kid: header.get("kid").and_then(Value::as_str).map(str::to_owned),
        payload_b64: p,
        claims,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A numeric date claim: absent is fine, anything but a non-negative number is not.
fn numeric_date(claims: &Value, name: &str) -> Result<Option<u64>, JwtFailure> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(JwtFailure::VerificationFails),
    }
}

/// The token's audiences (`aud` as a string or a list).
fn audiences(claims: &Value) -> Vec<&str> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

impl Provider {
    /// Verifies a parsed token against this rule (its issuer already matches).
    fn verify(&self, token: &str, t: &Parsed<'_>, now: u64) -> Result<(), JwtFailure> {
        if let KeySet::FetchFailed(_) = self.keys {
            return Err(JwtFailure::FetchFailed);
        }
        let mut validation = Validation::new(t.alg);
        // Times, issuer and audience are checked below with Istio's messages and our skew.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut tried = false;
        let mut verified = false;
        for key in self.keys.candidates(t.kid.as_deref(), t.alg) {
            tried = true;
            if jsonwebtoken::decode::<Value>(token, &key.key, &validation).is_ok() {
                verified = true;
                break;
            }
        }
        if !tried {
            return Err(JwtFailure::KeyNotFound);
        }
        if !verified {
            return Err(JwtFailure::VerificationFails);
        }
        if let Some(exp) = numeric_date(&t.claims, "exp")?
            && now > exp.saturating_add(CLOCK_SKEW_SECS)
        {
            return Err(JwtFailure::Expired);
        }
        if let Some(nbf) = numeric_date(&t.claims, "nbf")?
            && now.saturating_add(CLOCK_SKEW_SECS) < nbf
        {
            return Err(JwtFailure::NotYetValid);
        }
        if !self.audiences.is_empty() {
            let auds = audiences(&t.claims);
            if !self.audiences.iter().any(|a| auds.contains(&a.as_str())) {
                return Err(JwtFailure::AudienceNotAllowed);
            }
        }
        Ok(())
    }
}

fn header_name(name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.trim().as_bytes()).ok()
}

impl JwtAuthn {
    /// Builds the verifiers of a workload's rules. Returns warnings for what was skipped (keys
    /// that cannot be used, bad header names); a rule whose JWKS is unusable fails closed.
    pub fn build(rules: &[ResolvedJwtRule]) -> (Self, Vec<String>) {
        let mut out = JwtAuthn::default();
        let mut warnings = Vec::new();
        for r in rules {
            let rule = &r.rule;
            let keys = if rule.jwks.is_empty() {
                // Not inlined by the control plane (yet): nothing can verify, fail closed.
                KeySet::FetchFailed("no keys pushed for this rule".to_owned())
            } else {
                match keys::parse_jwks(&rule.jwks) {
                    Ok((k, w)) => {
                        warnings.extend(w.into_iter().map(|w| format!("{}: jwks {w}", r.policy)));
                        k
                    }
                    Err(e) => {
                        warnings.push(format!("{}: {e}", r.policy));
                        KeySet::Keys(Vec::new())
                    }
                }
            };
            let mut locations = Vec::new();
            for h in &rule.from_headers {
                match header_name(&h.name) {
                    Some(name) => locations.push(Location::Header {
                        name,
                        prefix: h.prefix.clone(),
                    }),
                    None => warnings.push(format!("{}: bad header name {:?}", r.policy, h.name)),
                }
            }
            locations.extend(rule.from_params.iter().cloned().map(Location::Param));
            locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations = Location::defaults();
            }
            for l in &locations {
                if !out.locations.contains(l) {
                    out.locations.push(l.clone());
                }
            }
            out.locations.sort_by_key(Location::order_key);
            let payload_header = if rule.output_payload_to_header.is_empty() {
                None
            } else {
                header_name(&rule.output_payload_to_header)
            };
            let claim_headers: Vec<(HeaderName, String)> = rule
                .output_claim_to_headers
                .iter()
                .filter_map(|c| Some((header_name(&c.header)?, c.claim.clone())))
                .collect();
            out.output_headers.extend(payload_header.iter().cloned());
            out.output_headers
                .extend(claim_headers.iter().map(|(h, _)| h.clone()));
            out.providers.push(Provider {
                policy: r.policy.clone(),
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                keys,
                locations,
                payload_header,
                claim_headers,
                forward: rule.forward_original_token,
            });
        }
        (out, warnings)
    }

    /// True when no RequestAuthentication applies.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// Authenticates one request from its headers and query string.
    pub fn authenticate(&self, headers: &HeaderMap, query: Option<&str>) -> Outcome {
        self.authenticate_at(headers, query, now_secs())
    }

    /// [`Self::authenticate`] at a given time (seconds since the epoch).
    pub fn authenticate_at(&self, headers: &HeaderMap, query: Option<&str>, now: u64) -> Outcome {
        if self.providers.is_empty() {
            return Outcome::NoToken;
        }
        let mut found = Vec::new();
        for l in &self.locations {
            for token in l.find_all(headers, query) {
                if found.len() == MAX_TOKENS {
                    return Outcome::Invalid(JwtFailure::TooMany);
                }
                found.push((token, l));
            }
        }
        // Envoy verifies from the last token extracted to the first and answers with the first
        // failure it meets: the same order gives the same message when several tokens are bad.
        let mut verified = Vec::with_capacity(found.len());
        for (token, location) in found.iter().rev() {
            match self.verify_token(token, location, now) {
                Ok(v) => verified.push(v),
                Err(f) => return Outcome::Invalid(f),
            }
        }
        verified.reverse();
        let mut tokens = verified.into_iter();
        match tokens.next() {
            None => Outcome::NoToken,
            Some(mut first) => {
                first.more = tokens.collect();
                Outcome::Valid(Box::new(first))
            }
        }
    }

    /// Verifies one token found at `location` against the rules of its issuer that read there.
    fn verify_token(
        &self,
        token: &str,
        location: &Location,
        now: u64,
    ) -> Result<Verified, JwtFailure> {
        let parsed = parse_token(token)?;
        let iss = parsed
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let mut failure: Option<JwtFailure> = None;
        for (i, p) in self.providers.iter().enumerate() {
            // A rule takes tokens of its issuer (any issuer when it names none, keyed by jwksUri)
            // found at one of its own locations.
            if !(p.issuer.is_empty() || p.issuer == iss) || !p.locations.contains(location) {
                continue;
            }
            match p.verify(token, &parsed, now) {
                Ok(()) => {
                    return Ok(Verified {
                        provider: i,
                        payload_b64: parsed.payload_b64.to_owned(),
                        claims: parsed.claims,
                        location: location.clone(),
                        more: Vec::new(),
                    });
                }
                Err(f) => {
                    if failure.is_none_or(|g| f.rank() > g.rank()) {
                        failure = Some(f);
                    }
                }
            }
        }
        Err(failure.unwrap_or(JwtFailure::IssuerNotConfigured))
    }

    /// Removes every output header of every rule from a client request: only the proxy sets them.
    pub fn strip_output_headers(&self, headers: &mut HeaderMap) {
        for h in &self.output_headers {
            headers.remove(h);
        }
    }

    /// Applies the accepting rules' outputs to the request sent to the app, for every token of
    /// the request, and strips each token from where it came unless its rule forwards it.
    /// Returns the new path-and-query's query when a token must be removed from the query string.
    pub fn apply(
        &self,
        v: &Verified,
        headers: &mut HeaderMap,
        query: Option<&str>,
    ) -> Option<String> {
        let mut new_query: Option<String> = None;
        // Envoy handles the last token first and appends each one's output headers; the request
        // identity's values therefore come last, and the app sees them in the same order.
        for t in v.all().rev() {
            let Some(p) = self.providers.get(t.provider) else {
                continue;
            };
            if let Some(h) = &p.payload_header
                && let Ok(value) = HeaderValue::from_str(&t.payload_b64)
            {
                headers.append(h.clone(), value);
            }
            for (h, claim) in &p.claim_headers {
                if let Some(value) = claim_value(&t.claims, claim)
                    && let Ok(value) = HeaderValue::from_str(&value)
                {
                    headers.append(h.clone(), value);
                }
            }
            if !p.forward {
                let current = new_query.as_deref().or(query);
                if let Some(q) = t.location.strip(headers, current) {
                    new_query = Some(q);
                }
            }
        }
        new_query
    }
}

/// A claim (`a.b.c` walks nested objects) as a header value: strings as they are, numbers and
/// booleans printed, lists of those joined with commas; objects are not output.
pub fn claim_value(claims: &Value, path: &str) -> Option<String> {
    let v = claims.get(path).or_else(|| {
        let mut cur = claims;
        for seg in path.split('.') {
            cur = cur.get(seg)?;
        }
        Some(cur)
    })?;
    match v {
        Value::Array(a) => {
            let items: Vec<String> = a.iter().filter_map(scalar).collect();
            (!items.is_empty()).then(|| items.join(","))
        }
        other => scalar(other),
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The 401/403 answer for a refused token: status, `WWW-Authenticate` (401 only) and the message
/// as body. `realm` is the request URL without the query, as Envoy sends it.
pub fn deny_parts(
    failure: JwtFailure,
    host: &str,
    path: &str,
) -> (StatusCode, Option<HeaderValue>, String) {
    let status = failure.status();
    let www = (status == StatusCode::UNAUTHORIZED).then(|| {
        let path = path.split('?').next().unwrap_or("/");
        let realm = format!("http://{host}{path}").replace('"', "%22");
        HeaderValue::from_str(&format!(
            "Bearer realm=\"{realm}\", error=\"invalid_token\""
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""))
    });
    (status, www, failure.to_string())
}

#[cfg(test)]
mod tests;
