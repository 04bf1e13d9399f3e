//! RequestAuthentication to Envoy's `jwt_authn` filter, as istiod's
//! `pilot/pkg/security/authn/policy_applier.go` (`convertToEnvoyJwtConfig`) builds it: every
//! applicable jwtRule, sorted by issuer, is provider `origins-N` with its payload in the
//! filter's dynamic metadata under `payload` (what RBAC's `request.auth.*` matchers read),
//! and one rule on prefix `/` whose requirement lets a request without a token through (RBAC
//! decides) but refuses an invalid one with 401.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{RouteMatch, route_match};
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3::{
    JwtAuthentication, JwtClaimToHeader, JwtHeader, JwtProvider, JwtRequirement,
    JwtRequirementAndList, JwtRequirementOrList, RequirementRule, jwt_provider, jwt_requirement,
    requirement_rule,
};
use envoy_types::pb::google::protobuf::Empty;
use palisade_policy::resolve::ResolvedJwtRule;
use palisade_policy::workload_config::JWKS_FETCH_ERROR_MEMBER;

use crate::TranslateError;

/// Envoy's JWT filter name (istiod's `EnvoyJwtFilterName`).
pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
/// Where each provider puts the verified payload (istiod's `EnvoyJwtFilterPayload`).
pub const PAYLOAD_KEY: &str = "payload";
/// Claims Envoy splits on spaces before matching, besides the rule's own (istiod's defaults).
const DEFAULT_SPACE_DELIMITED: [&str; 2] = ["permission", "scope"];

/// A JWKS with one RSA public key whose private key was discarded when it was generated: what a
/// rule whose JWKS the control plane could not fetch gets, so Envoy loads the provider and no
/// token verifies (fail closed, as istiod's `PublicOnlyJwks` and Palisade's sidecar do).
pub const PUBLIC_ONLY_JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"palisade-jwks-fetch-failed","alg":"RS256","use":"sig","e":"AQAB","n":"vk3jjezf5h_FIcj2qMVxzSbVXFj-JhoqvTgOXnn9DD0hx-7o7-elsR4-ezhEy3Q6lyXMfL2ioU2buhAB_t2DB7AeoHDond0JMDSbKYIT2UiQgeyyLkSA3rbc1Bjo5M4p7LOxP0fCEvqM98j8jWbZDuUW8IJJNQZSlKQGp6Ek0Kics04sLDEYQ3YElCrqybpAhEm0Bh6QTH2PBjd9m74hwQmxnRZ9VGFefe4Wo-zxU2LtC1y4WZsGXq3X1v3EhPGmp7W_qKT0tC8EGX2lh5ue0U1WObQ1Syr_uNKJN4hqwMhkM4K1WAK_sBz9J-mPPYsC9H3hvQCgWJ8JeQ-Pshik8w"}]}"#;

/// The `jwt_authn` config of the workload's rules, `None` when none applies.
pub fn build(rules: &[ResolvedJwtRule]) -> Result<Option<JwtAuthentication>, TranslateError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let mut sorted: Vec<&ResolvedJwtRule> = rules.iter().collect();
    // Stable, like istiod's SortBy: rules of one issuer keep their policy order.
    sorted.sort_by(|a, b| a.rule.issuer.cmp(&b.rule.issuer));
    let mut providers = HashMap::new();
    let mut each_or_missing = Vec::new();
    let mut any_provider = Vec::new();
    for (i, r) in sorted.iter().enumerate() {
        let name = format!("origins-{i}");
        providers.insert(name.clone(), provider(r)?);
        each_or_missing.push(requires_any(vec![
            provider_name(&name),
            JwtRequirement {
                requires_type: Some(jwt_requirement::RequiresType::AllowMissing(Empty {})),
            },
        ]));
        any_provider.push(provider_name(&name));
    }
    let requires = if each_or_missing.len() == 1 {
        each_or_missing.swap_remove(0)
    } else {
        // istiod: any one provider alone (providers sharing a token location), or each token
        // valid for its provider where present.
        any_provider.push(JwtRequirement {
            requires_type: Some(jwt_requirement::RequiresType::RequiresAll(
                JwtRequirementAndList {
                    requirements: each_or_missing,
                },
            )),
        });
        requires_any(any_provider)
    };
    Ok(Some(JwtAuthentication {
        providers,
        rules: vec![RequirementRule {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                ..Default::default()
            }),
            requirement_type: Some(requirement_rule::RequirementType::Requires(requires)),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    }))
}

fn provider_name(name: &str) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(jwt_requirement::RequiresType::ProviderName(name.to_owned())),
    }
}

fn requires_any(requirements: Vec<JwtRequirement>) -> JwtRequirement {
    JwtRequirement {
        requires_type: Some(jwt_requirement::RequiresType::RequiresAny(
            JwtRequirementOrList { requirements },
        )),
    }
}

fn provider(r: &ResolvedJwtRule) -> Result<JwtProvider, TranslateError> {
    let rule = &r.rule;
    let jwks = local_jwks(r)?;
    let mut space_delimited: Vec<String> = rule
        .space_delimited_claims
        .iter()
        .cloned()
        .chain(DEFAULT_SPACE_DELIMITED.iter().map(|c| (*c).to_owned()))
        .collect();
    space_delimited.sort();
    space_delimited.dedup();
    Ok(JwtProvider {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        forward: rule.forward_original_token,
        forward_payload_header: rule.output_payload_to_header.clone(),
        payload_in_metadata: PAYLOAD_KEY.to_owned(),
        normalize_payload_in_metadata: Some(jwt_provider::NormalizePayload {
            space_delimited_claims: space_delimited,
        }),
        claim_to_headers: rule
            .output_claim_to_headers
            .iter()
            .map(|c| JwtClaimToHeader {
                header_name: c.header.clone(),
                claim_name: c.claim.clone(),
                ..Default::default()
            })
            .collect(),
        // Empty locations take Envoy's defaults (Authorization: Bearer, access_token), which
        // are Istio's; istiod leaves them empty too.
        from_headers: rule
            .from_headers
            .iter()
            .map(|h| JwtHeader {
                name: h.name.clone(),
                value_prefix: h.prefix.clone(),
            })
            .collect(),
        from_params: rule.from_params.clone(),
        from_cookies: rule.from_cookies.clone(),
        jwks_source_specifier: Some(jwt_provider::JwksSourceSpecifier::LocalJwks(DataSource {
            specifier: Some(data_source::Specifier::InlineString(jwks)),
            ..Default::default()
        })),
        ..Default::default()
    })
}

/// The inline JWKS the control plane resolved. A key set without keys (the fetch-error marker,
/// or `{"keys": []}` as written) becomes the public-only key set: Envoy refuses a provider
/// whose JWKS has no key (the listener would be rejected, where istiod pushes it as is), and
/// Palisade's sidecar refuses that rule's tokens, which the public-only key set does too.
fn local_jwks(r: &ResolvedJwtRule) -> Result<String, TranslateError> {
    let jwks = r.rule.jwks.trim();
    if jwks.is_empty() {
        return Err(TranslateError::not_translated(
            &format!("RequestAuthentication {}", r.policy),
            &format!("spec.jwtRules[issuer={}].jwksUri", r.rule.issuer),
            "the control plane did not resolve the JWKS inline; remote JWKS is not generated",
        ));
    }
    let doc = serde_json::from_str::<serde_json::Value>(jwks).ok();
    let failed = doc
        .as_ref()
        .and_then(|v| v.get(JWKS_FETCH_ERROR_MEMBER))
        .is_some();
    let no_keys = doc
        .as_ref()
        .and_then(|v| v.get("keys"))
        .and_then(serde_json::Value::as_array)
        .is_some_and(Vec::is_empty);
    Ok(if failed || no_keys {
        PUBLIC_ONLY_JWKS.to_owned()
    } else {
        jwks.to_owned()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use palisade_policy::api::{ClaimToHeader, JwtHeader as IstioHeader, JwtRule};
    use serde_json::{Value, json};

    const KEYS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"x","y":"y","kid":"k"}]}"#;

    fn rule(issuer: &str, f: impl FnOnce(&mut JwtRule)) -> ResolvedJwtRule {
        let mut rule = JwtRule {
            issuer: issuer.to_owned(),
            jwks: KEYS.to_owned(),
            ..Default::default()
        };
        f(&mut rule);
        ResolvedJwtRule {
            policy: "ns/ra".to_owned(),
            rule,
        }
    }

    fn json_of(rules: &[ResolvedJwtRule]) -> Value {
        crate::json::any(&envoy_types::util::pack_any(build(rules).unwrap().unwrap()))
    }

    fn p(name: &str) -> Value {
        json!({"provider_name": name})
    }

    fn or_missing(name: &str) -> Value {
        json!({"requires_any": {"requirements": [p(name), {"allow_missing": {}}]}})
    }

    /// istiod's `convertToEnvoyJwtConfig` (pilot/pkg/security/authn/policy_applier.go):
    /// providers by issuer order, the requirement shape for one and for several providers.
    #[test]
    fn requirement_shapes() {
        let cases: Vec<(&str, Vec<ResolvedJwtRule>, Vec<&str>, Value)> = vec![
            (
                "one provider: it or no token",
                vec![rule("https://a", |_| {})],
                vec!["https://a"],
                or_missing("origins-0"),
            ),
            (
                "several, sorted by issuer: any alone, or each valid where present",
                vec![rule("https://b", |_| {}), rule("https://a", |_| {})],
                vec!["https://a", "https://b"],
                json!({"requires_any": {"requirements": [
                    p("origins-0"),
                    p("origins-1"),
                    {"requires_all": {"requirements": [or_missing("origins-0"), or_missing("origins-1")]}},
                ]}}),
            ),
        ];
        for (name, rules, issuers, requires) in cases {
            let doc = json_of(&rules);
            assert_eq!(doc["rules"][0]["match"], json!({"prefix": "/"}), "{name}");
            assert_eq!(doc["rules"][0]["requires"], requires, "{name}");
            assert_eq!(doc["bypass_cors_preflight"], true, "{name}");
            for (i, iss) in issuers.iter().enumerate() {
                assert_eq!(
                    doc["providers"][format!("origins-{i}")]["issuer"],
                    *iss,
                    "{name}"
                );
            }
        }
        assert_eq!(build(&[]).unwrap(), None);
    }

    #[test]
    fn provider_fields() {
        let full = rule("https://a", |r| {
            r.audiences = vec!["api".to_owned()];
            r.forward_original_token = true;
            r.output_payload_to_header = "x-payload".to_owned();
            r.output_claim_to_headers = vec![ClaimToHeader {
                header: "x-sub".to_owned(),
                claim: "sub".to_owned(),
            }];
            r.from_headers = vec![IstioHeader {
                name: "x-token".to_owned(),
                prefix: "Tok ".to_owned(),
            }];
            r.from_params = vec!["t".to_owned()];
            r.from_cookies = vec!["session".to_owned()];
            r.space_delimited_claims = vec!["roles".to_owned(), "scope".to_owned()];
        });
        let cases = [
            (
                "every field",
                full,
                json!({
                    "issuer": "https://a",
                    "audiences": ["api"],
                    "forward": true,
                    "from_headers": [{"name": "x-token", "value_prefix": "Tok "}],
                    "from_params": ["t"],
                    "from_cookies": ["session"],
                    "forward_payload_header": "x-payload",
                    "payload_in_metadata": "payload",
                    "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "roles", "scope"]},
                    "claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}],
                    "local_jwks": {"inline_string": KEYS},
                }),
            ),
            (
                "defaults: Envoy's token locations (Authorization: Bearer, access_token)",
                rule("https://a", |_| {}),
                json!({
                    "issuer": "https://a",
                    "payload_in_metadata": "payload",
                    "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]},
                    "local_jwks": {"inline_string": KEYS},
                }),
            ),
        ];
        for (name, r, want) in cases {
            assert_eq!(json_of(&[r])["providers"]["origins-0"], want, "{name}");
        }
    }

    /// A rule whose keys the control plane could not fetch, or with an empty key set, gets the
    /// public-only key set (fail closed, a config Envoy loads); one without resolved keys is
    /// refused.
    #[test]
    fn keys_that_cannot_verify_fail_closed() {
        let marker = format!(r#"{{"keys":[],"{JWKS_FETCH_ERROR_MEMBER}":"timeout"}}"#);
        for jwks in [marker.as_str(), r#"{"keys": []}"#] {
            let r = rule("https://a", |r| r.jwks = jwks.to_owned());
            assert_eq!(
                json_of(&[r])["providers"]["origins-0"]["local_jwks"]["inline_string"],
                PUBLIC_ONLY_JWKS,
                "{jwks}"
            );
        }
        let keys: Value = serde_json::from_str(PUBLIC_ONLY_JWKS).unwrap();
        assert_eq!(keys["keys"][0]["kty"], "RSA");
        let r = rule("https://a", |r| {
            r.jwks.clear();
            r.jwks_uri = "https://a/keys".to_owned();
        });
        let e = build(&[r]).unwrap_err().to_string();
        assert!(
            e.contains("RequestAuthentication ns/ra: spec.jwtRules[issuer=https://a].jwksUri")
                && e.contains("not translated"),
            "{e}"
        );
    }
}
