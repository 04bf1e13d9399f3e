//! Table-driven JWT cases with real keys: every refusal with its status and message.

use std::sync::OnceLock;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{EncodingKey, Header};
use palisade_policy::api::{ClaimToHeader, JwtHeader, JwtRule};
use serde_json::json;

use super::*;

const ISS: &str = "https://issuer.example";
const NOW: u64 = 1_800_000_000;

struct Keys {
    rsa: EncodingKey,
    rsa_public_pem: String,
    other_rsa: EncodingKey,
    ec: EncodingKey,
    jwks: String,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let gen_rsa = || rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let rsa_kp = gen_rsa();
        let rsa = EncodingKey::from_rsa_pem(rsa_kp.serialize_pem().as_bytes()).unwrap();
        let other_rsa = EncodingKey::from_rsa_pem(gen_rsa().serialize_pem().as_bytes()).unwrap();
        let ec_kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ec = EncodingKey::from_ec_pem(ec_kp.serialize_pem().as_bytes()).unwrap();
        let mut rsa_jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
        rsa_jwk.common.key_id = Some("rsa-1".into());
        rsa_jwk.common.key_algorithm = None;
        let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
        ec_jwk.common.key_id = Some("ec-1".into());
        let jwks = json!({"keys": [rsa_jwk, ec_jwk]}).to_string();
        Keys {
            rsa,
            rsa_public_pem: rsa_kp.public_key_pem(),
            other_rsa,
            ec,
            jwks,
        }
    })
}

fn rule(audiences: &[&str]) -> ResolvedJwtRule {
    ResolvedJwtRule {
        policy: "shop/jwt".into(),
        rule: JwtRule {
            issuer: ISS.into(),
            audiences: audiences.iter().map(|s| (*s).to_owned()).collect(),
            jwks: keys().jwks.clone(),
            ..JwtRule::default()
        },
    }
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"iss": ISS, "sub": "alice", "aud": "shop", "exp": NOW + 600, "iat": NOW});
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    c
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[test]
fn outcomes_as_istio() {
    let k = keys();
    let rs = |c: Value| sign(Algorithm::RS256, Some("rsa-1"), &k.rsa, &c);
    let valid = rs(claims(json!({})));
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
        parts[1] = b64(&claims(json!({"sub": "mallory"})));
        parts.join(".")
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    // The classic key confusion: HMAC keyed with the RSA public key's PEM text.
    let hs_with_public = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(k.rsa_public_pem.as_bytes()),
        &claims(json!({})),
    );
    let oversized = rs(claims(json!({"pad": "x".repeat(MAX_TOKEN_BYTES)})));
    let cases: Vec<(&str, String, Result<&str, JwtFailure>)> = vec![
        ("valid RS256", valid.clone(), Ok("alice")),
        (
            "valid ES256",
            sign(Algorithm::ES256, Some("ec-1"), &k.ec, &claims(json!({}))),
            Ok("alice"),
        ),
        (
            "valid without kid",
            sign(Algorithm::RS256, None, &k.rsa, &claims(json!({}))),
            Ok("alice"),
        ),
        (
            "aud list",
            rs(claims(json!({"aud": ["x", "shop"]}))),
            Ok("alice"),
        ),
        (
            "within skew",
            rs(claims(json!({"exp": NOW - 30}))),
            Ok("alice"),
        ),
        (
            "expired",
            rs(claims(json!({"exp": NOW - 120}))),
            Err(JwtFailure::Expired),
        ),
        (
            "not yet valid",
            rs(claims(json!({"nbf": NOW + 3600}))),
            Err(JwtFailure::NotYetValid),
        ),
        (
            "wrong issuer",
            rs(claims(json!({"iss": "https://evil.example"}))),
            Err(JwtFailure::IssuerNotConfigured),
        ),
        (
            "wrong audience",
            rs(claims(json!({"aud": "other"}))),
            Err(JwtFailure::AudienceNotAllowed),
        ),
        (
            "no audience",
            rs(claims(json!({"aud": null}))),
            Err(JwtFailure::AudienceNotAllowed),
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("nope"), &k.rsa, &claims(json!({}))),
            Err(JwtFailure::KeyNotFound),
        ),
        (
            "other key, same kid",
            sign(
                Algorithm::RS256,
                Some("rsa-1"),
                &k.other_rsa,
                &claims(json!({})),
            ),
            Err(JwtFailure::VerificationFails),
        ),
        (
            "tampered payload",
            tampered,
            Err(JwtFailure::VerificationFails),
        ),
        ("alg none", alg_none, Err(JwtFailure::AlgNotSupported)),
        (
            "HS256 keyed with the RSA public key",
            hs_with_public,
            Err(JwtFailure::KeyNotFound),
        ),
        ("oversized", oversized, Err(JwtFailure::TooLarge)),
        (
            "two sections",
            "abc.def".to_owned(),
            Err(JwtFailure::BadFormat),
        ),
        ("garbage", "a.b.c".to_owned(), Err(JwtFailure::BadFormat)),
        (
            "exp not a number",
            rs(claims(json!({"exp": "soon"}))),
            Err(JwtFailure::VerificationFails),
        ),
    ];
    let (authn, warnings) = JwtAuthn::build(&[rule(&["shop"])]);
    assert!(warnings.is_empty(), "{warnings:?}");
    for (name, token, want) in cases {
        let got = authn.authenticate_at(&bearer(&token), None, NOW);
        match (got, want) {
            (Outcome::Valid(v), Ok(sub)) => assert_eq!(v.claims["sub"], sub, "{name}"),
            (Outcome::Invalid(f), Err(w)) => assert_eq!(f, w, "{name}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn statuses_and_messages() {
    let (s, www, body) = deny_parts(JwtFailure::Expired, "web.shop:8080", "/a/b?x=1");
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        www.unwrap(),
        "Bearer realm=\"http://web.shop:8080/a/b\", error=\"invalid_token\""
    );
    assert_eq!(body, "Jwt is expired");
    let (s, www, body) = deny_parts(JwtFailure::AudienceNotAllowed, "h", "/");
    assert_eq!(
        (s, www, body.as_str()),
        (
            StatusCode::FORBIDDEN,
            None,
            "Audiences in Jwt are not allowed"
        )
    );
    let msgs = [
        (JwtFailure::NotYetValid, "Jwt not yet valid"),
        (JwtFailure::VerificationFails, "Jwt verification fails"),
        (
            JwtFailure::IssuerNotConfigured,
            "Jwt issuer is not configured",
        ),
        (
            JwtFailure::KeyNotFound,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (JwtFailure::FetchFailed, "Jwks remote fetch is failed"),
    ];
    for (f, m) in msgs {
        assert_eq!(f.to_string(), m);
        assert_eq!(f.status(), StatusCode::UNAUTHORIZED);
    }
}

#[test]
fn no_token_or_no_rules_means_no_identity() {
    let (authn, _) = JwtAuthn::build(&[rule(&[])]);
    assert!(matches!(
        authn.authenticate_at(&HeaderMap::new(), Some("a=b"), NOW),
        Outcome::NoToken
    ));
    let mut h = HeaderMap::new();
    h.insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
    assert!(matches!(
        authn.authenticate_at(&h, None, NOW),
        Outcome::NoToken
    ));
    let (none, _) = JwtAuthn::build(&[]);
    assert!(matches!(
        none.authenticate_at(&bearer("x.y.z"), None, NOW),
        Outcome::NoToken
    ));
}

#[test]
fn fetch_failure_and_missing_keys_fail_closed() {
    let token = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &keys().rsa,
        &claims(json!({})),
    );
    let mut failed = rule(&[]);
    failed.rule.jwks =
        json!({"keys": [], keys::FETCH_ERROR_MEMBER: "connection refused"}).to_string();
    let mut missing = rule(&[]);
    missing.rule.jwks.clear();
    let mut empty = rule(&[]);
    empty.rule.jwks = r#"{"keys": []}"#.into();
    for (r, want) in [
        (failed, JwtFailure::FetchFailed),
        (missing, JwtFailure::FetchFailed),
        (empty, JwtFailure::KeyNotFound),
    ] {
        let (authn, _) = JwtAuthn::build(&[r]);
        match authn.authenticate_at(&bearer(&token), None, NOW) {
            Outcome::Invalid(f) => assert_eq!(f, want),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn hmac_only_with_inline_symmetric_key() {
    let secret = b"0123456789abcdef0123456789abcdef";
    let mut r = rule(&[]);
    r.rule.jwks = json!({"keys": [{"kty": "oct", "kid": "s1", "k": URL_SAFE_NO_PAD.encode(secret), "alg": "HS256"}]}).to_string();
    let (authn, w) = JwtAuthn::build(&[r]);
    assert!(w.is_empty(), "{w:?}");
    let good = sign(
        Algorithm::HS256,
        Some("s1"),
        &EncodingKey::from_secret(secret),
        &claims(json!({})),
    );
    assert!(matches!(
        authn.authenticate_at(&bearer(&good), None, NOW),
        Outcome::Valid(_)
    ));
    // An RS256 token cannot be checked with the symmetric key.
    let rs = sign(
        Algorithm::RS256,
        Some("s1"),
        &keys().rsa,
        &claims(json!({})),
    );
    assert!(matches!(
        authn.authenticate_at(&bearer(&rs), None, NOW),
        Outcome::Invalid(JwtFailure::KeyNotFound)
    ));
}

#[test]
fn locations_and_outputs() {
    let mut r = rule(&[]);
    r.rule.from_headers = vec![JwtHeader {
        name: "x-jwt".into(),
        prefix: "Token ".into(),
    }];
    r.rule.from_params = vec!["tok".into()];
    r.rule.output_payload_to_header = "x-jwt-payload".into();
    r.rule.output_claim_to_headers = vec![
        ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        },
        ClaimToHeader {
            header: "x-team".into(),
            claim: "org.team".into(),
        },
        ClaimToHeader {
            header: "x-groups".into(),
            claim: "groups".into(),
        },
    ];
    let (authn, _) = JwtAuthn::build(&[r]);
    let c = claims(json!({"org": {"team": "blue"}, "groups": ["a", "b"]}));
    let token = sign(Algorithm::RS256, Some("rsa-1"), &keys().rsa, &c);

    // The default location is not used when the rule names its own.
    assert!(matches!(
        authn.authenticate_at(&bearer(&token), None, NOW),
        Outcome::NoToken
    ));

    let mut h = HeaderMap::new();
    h.insert(
        "x-jwt",
        HeaderValue::from_str(&format!("Token {token}")).unwrap(),
    );
    h.insert("x-sub", "spoofed".parse().unwrap());
    authn.strip_output_headers(&mut h);
    assert!(h.get("x-sub").is_none());
    let Outcome::Valid(v) = authn.authenticate_at(&h, None, NOW) else {
        panic!()
    };
    assert_eq!(authn.apply(&v, &mut h, None), None);
    assert!(
        h.get("x-jwt").is_none(),
        "stripped: forwardOriginalToken is false"
    );
    assert_eq!(h["x-sub"], "alice");
    assert_eq!(h["x-team"], "blue");
    assert_eq!(h["x-groups"], "a,b");
    let payload = URL_SAFE_NO_PAD
        .decode(h["x-jwt-payload"].as_bytes())
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap(), c);

    let q = format!("a=1&tok={token}&b=2");
    let mut h = HeaderMap::new();
    let Outcome::Valid(v) = authn.authenticate_at(&h, Some(&q), NOW) else {
        panic!()
    };
    assert_eq!(
        authn.apply(&v, &mut h, Some(&q)).as_deref(),
        Some("a=1&b=2")
    );
}

#[test]
fn forward_original_token_keeps_it() {
    let mut r = rule(&[]);
    r.rule.forward_original_token = true;
    let (authn, _) = JwtAuthn::build(&[r]);
    let token = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &keys().rsa,
        &claims(json!({})),
    );
    let mut h = bearer(&token);
    let Outcome::Valid(v) = authn.authenticate_at(&h, None, NOW) else {
        panic!()
    };
    authn.apply(&v, &mut h, None);
    assert!(h.get("authorization").is_some());
}

#[test]
fn rules_of_other_issuers_and_jwks_limits() {
    // Two issuers: each token goes to its own rule.
    let mut other = rule(&[]);
    other.rule.issuer = "https://other.example".into();
    other.rule.jwks = r#"{"keys": []}"#.into();
    let (authn, _) = JwtAuthn::build(&[other, rule(&[])]);
    let token = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &keys().rsa,
        &claims(json!({})),
    );
    let Outcome::Valid(v) = authn.authenticate_at(&bearer(&token), None, NOW) else {
        panic!()
    };
    assert_eq!(v.provider, 1);

    let big = format!(
        "{{\"keys\": [], \"pad\": \"{}\"}}",
        "x".repeat(MAX_JWKS_BYTES)
    );
    assert!(matches!(
        keys::parse_jwks(&big),
        Err(keys::JwksError::TooLarge(_))
    ));
    let (set, w) = keys::parse_jwks(
        r#"{"keys": [{"kty": "RSA", "n": "", "e": "AQAB", "alg": "ES256"}, {"kty": "zzz"}]}"#,
    )
    .unwrap();
    assert!(
        matches!(set, KeySet::Keys(ref k) if k.is_empty()),
        "{set:?}"
    );
    assert_eq!(w.len(), 2, "{w:?}");
}

/// A request's headers from `(name, value)` pairs (repeats appended).
fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

const ISS_B: &str = "https://b.example";

/// Tokens signed with the test key: `tok(iss, sub, extra claims)`.
fn tok(iss: &str, sub: &str, extra: Value) -> String {
    let mut c = claims(extra);
    c["iss"] = json!(iss);
    c["sub"] = json!(sub);
    sign(Algorithm::RS256, Some("rsa-1"), &keys().rsa, &c)
}

#[test]
fn every_token_is_verified() {
    let alice = tok(ISS, "alice", json!({}));
    let bob = tok(ISS, "bob", json!({}));
    let carol = tok(ISS_B, "carol", json!({}));
    let forged = {
        let mut p: Vec<String> = alice.split('.').map(str::to_owned).collect();
        p[1] = b64(&claims(json!({"sub": "mallory"})));
        p.join(".")
    };
    let expired = tok(ISS, "alice", json!({"exp": NOW - 3600}));
    let wrong_aud = tok(ISS, "alice", json!({"aud": "other"}));
    let stranger = tok("https://evil.example", "eve", json!({}));
    let bearer = |t: &str| format!("Bearer {t}");
    let mut b = rule(&[]);
    b.rule.issuer = ISS_B.into();
    // Rule A wants audience "shop"; rule B checks none. Both read the default locations.
    let (authn, w) = JwtAuthn::build(&[rule(&["shop"]), b]);
    assert!(w.is_empty(), "{w:?}");
    let many_q = vec![format!("access_token={alice}"); MAX_TOKENS + 1].join("&");

    // (case, headers, query, Ok((principal's sub, tokens verified)) or the refusal)
    type Want = Result<(&'static str, usize), JwtFailure>;
    let cases: Vec<(&str, HeaderMap, Option<String>, Want)> = vec![
        (
            "valid header, forged query",
            headers(&[("authorization", &bearer(&alice))]),
            Some(format!("access_token={forged}")),
            Err(JwtFailure::VerificationFails),
        ),
        (
            "forged header, valid query",
            headers(&[("authorization", &bearer(&forged))]),
            Some(format!("access_token={alice}")),
            Err(JwtFailure::VerificationFails),
        ),
        (
            "valid header, garbage query",
            headers(&[("authorization", &bearer(&alice))]),
            Some("access_token=abc".into()),
            Err(JwtFailure::BadFormat),
        ),
        (
            "valid header, empty query token (Envoy: a malformed token)",
            headers(&[("authorization", &bearer(&alice))]),
            Some("access_token=".into()),
            Err(JwtFailure::BadFormat),
        ),
        (
            "valid header, query token of an unknown issuer",
            headers(&[("authorization", &bearer(&alice))]),
            Some(format!("access_token={stranger}")),
            Err(JwtFailure::IssuerNotConfigured),
        ),
        (
            "valid header, expired query token",
            headers(&[("authorization", &bearer(&alice))]),
            Some(format!("access_token={expired}")),
            Err(JwtFailure::Expired),
        ),
        (
            "valid query, header token with a wrong audience: 403",
            headers(&[("authorization", &bearer(&wrong_aud))]),
            Some(format!("access_token={alice}")),
            Err(JwtFailure::AudienceNotAllowed),
        ),
        (
            "two bad: Envoy reports the last extracted (the query's) first",
            headers(&[("authorization", &bearer(&expired))]),
            Some("access_token=abc".into()),
            Err(JwtFailure::BadFormat),
        ),
        (
            "two Authorization headers, both valid: one malformed token (as Envoy)",
            headers(&[
                ("authorization", &bearer(&alice)),
                ("authorization", &bearer(&bob)),
            ]),
            None,
            Err(JwtFailure::BadFormat),
        ),
        (
            "repeated query parameter, second forged (Envoy reads only the first)",
            HeaderMap::new(),
            Some(format!("access_token={alice}&access_token={forged}")),
            Err(JwtFailure::VerificationFails),
        ),
        (
            "too many tokens",
            HeaderMap::new(),
            Some(many_q),
            Err(JwtFailure::TooMany),
        ),
        (
            "two valid of one issuer: the header's is the identity",
            headers(&[("authorization", &bearer(&alice))]),
            Some(format!("a=1&access_token={bob}")),
            Ok(("alice", 2)),
        ),
        (
            "the same, swapped",
            headers(&[("authorization", &bearer(&bob))]),
            Some(format!("access_token={alice}")),
            Ok(("bob", 2)),
        ),
        (
            "two valid of two issuers: the header's is the identity",
            headers(&[("authorization", &bearer(&alice))]),
            Some(format!("access_token={carol}")),
            Ok(("alice", 2)),
        ),
        (
            "the same, swapped",
            headers(&[("authorization", &bearer(&carol))]),
            Some(format!("access_token={alice}")),
            Ok(("carol", 2)),
        ),
        (
            "one valid token",
            headers(&[("authorization", &bearer(&carol))]),
            Some("a=b".into()),
            Ok(("carol", 1)),
        ),
    ];
    for (name, h, q, want) in cases {
        let got = authn.authenticate_at(&h, q.as_deref(), NOW);
        match (got, want) {
            (Outcome::Valid(v), Ok((sub, n))) => {
                assert_eq!(v.claims["sub"], sub, "{name}");
                assert_eq!(v.all().count(), n, "{name}");
            }
            (Outcome::Invalid(f), Err(w)) => assert_eq!(f, w, "{name}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn every_configured_header_is_verified() {
    let alice = tok(ISS, "alice", json!({}));
    let bob = tok(ISS, "bob", json!({}));
    let bad = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &keys().other_rsa,
        &claims(json!({})),
    );
    let mut r = rule(&[]);
    r.rule.from_headers = vec![
        JwtHeader {
            name: "x-jwt".into(),
            prefix: String::new(),
        },
        JwtHeader {
            name: "Authorization".into(),
            prefix: "Bearer ".into(),
        },
    ];
    let (authn, _) = JwtAuthn::build(&[r]);
    let auth = |t: &str| ("authorization", format!("Bearer {t}"));
    // (case, request headers, the identity's sub or the refusal)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Result<&'a str, JwtFailure>);
    let cases: Vec<Case<'_>> = vec![
        (
            "valid Authorization, forged x-jwt",
            vec![auth(&alice), ("x-jwt", bad.clone())],
            Err(JwtFailure::VerificationFails),
        ),
        (
            "forged Authorization, valid x-jwt",
            vec![auth(&bad), ("x-jwt", alice.clone())],
            Err(JwtFailure::VerificationFails),
        ),
        // Envoy's order sorts header locations by name: authorization before x-jwt, whatever
        // the rule's order.
        (
            "both valid",
            vec![auth(&alice), ("x-jwt", bob.clone())],
            Ok("alice"),
        ),
        (
            "both valid, swapped",
            vec![auth(&bob), ("x-jwt", alice.clone())],
            Ok("bob"),
        ),
        ("x-jwt only", vec![("x-jwt", alice.clone())], Ok("alice")),
        (
            "a token in the query is not looked at",
            vec![("x-jwt", alice.clone())],
            Ok("alice"),
        ),
    ];
    for (name, pairs, want) in cases {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let got =
            authn.authenticate_at(&headers(&pairs), Some(&format!("access_token={bad}")), NOW);
        match (got, want) {
            (Outcome::Valid(v), Ok(sub)) => assert_eq!(v.claims["sub"], sub, "{name}"),
            (Outcome::Invalid(f), Err(w)) => assert_eq!(f, w, "{name}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn every_token_is_stripped_unless_its_rule_forwards_it() {
    let alice = tok(ISS, "alice", json!({}));
    let bob = tok(ISS, "bob", json!({}));
    let carol = tok(ISS_B, "carol", json!({}));
    let bob_cookie = format!("session={bob}");
    let with = |forward_a: bool, forward_b: bool| {
        let mut a = rule(&[]);
        a.rule.forward_original_token = forward_a;
        a.rule.from_headers = vec![JwtHeader {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        }];
        a.rule.from_params = vec!["access_token".into()];
        a.rule.from_cookies = vec!["session".into()];
        a.rule.output_claim_to_headers = vec![ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        }];
        let mut b = a.clone();
        b.rule.issuer = ISS_B.into();
        b.rule.forward_original_token = forward_b;
        JwtAuthn::build(&[a, b]).0
    };
    // (case, forward A, forward B, cookie, query) => (authorization kept, cookie after, query after)
    type Case<'a> = (&'a str, bool, bool, String, String);
    type Want<'a> = (bool, Option<&'a str>, Option<String>);
    let cases: Vec<(Case<'_>, Want<'_>)> = vec![
        (
            (
                "nothing forwarded",
                false,
                false,
                format!("a=1; session={bob}"),
                format!("x=1&access_token={bob}&y=2"),
            ),
            (false, Some("a=1"), Some("x=1&y=2".into())),
        ),
        (
            (
                "A forwards",
                true,
                false,
                format!("session={bob}"),
                format!("access_token={bob}"),
            ),
            (true, Some(bob_cookie.as_str()), None),
        ),
        (
            (
                "only B's token (the query) is stripped",
                true,
                false,
                "a=1".into(),
                format!("access_token={carol}"),
            ),
            (true, Some("a=1"), Some(String::new())),
        ),
        (
            (
                "only A's tokens are stripped",
                false,
                true,
                format!("session={bob}"),
                format!("access_token={carol}&z"),
            ),
            (false, None, None),
        ),
    ];
    for ((name, fa, fb, cookie, query), (auth_kept, cookie_after, query_after)) in cases {
        let authn = with(fa, fb);
        let mut h = headers(&[
            ("authorization", &format!("Bearer {alice}")),
            ("cookie", &cookie),
            ("x-sub", "spoofed"),
        ]);
        authn.strip_output_headers(&mut h);
        let Outcome::Valid(v) = authn.authenticate_at(&h, Some(&query), NOW) else {
            panic!("{name}")
        };
        assert_eq!(v.claims["sub"], "alice", "{name}");
        let q = authn.apply(&v, &mut h, Some(&query));
        assert_eq!(h.contains_key("authorization"), auth_kept, "{name}");
        assert_eq!(
            h.get("cookie").map(|c| c.to_str().unwrap()),
            cookie_after,
            "{name}"
        );
        assert_eq!(q, query_after, "{name}");
        // One claim header per token, the identity's last (Envoy appends them in that order).
        let subs: Vec<&str> = h
            .get_all("x-sub")
            .iter()
            .map(|s| s.to_str().unwrap())
            .collect();
        assert_eq!(subs.last(), Some(&"alice"), "{name}");
        assert_eq!(subs.len(), v.all().count(), "{name}");
    }
}
