//! AuthorizationPolicy to Envoy RBAC, as istiod generates it (`pilot/pkg/security/authz/builder`
//! and `model`): one RBAC filter per action (AUDIT as `LOG`, then DENY, then ALLOW), each rule a
//! policy named `ns[NS]-policy[NAME]-rule[N]`, dry-run policies as `shadow_rules` with Istio's
//! stat prefixes, a policy without rules as an explicit never-matching policy. Each `from` is
//! one principal and each `to` one permission (`and_ids` / `and_rules` of `or_ids` / `or_rules`
//! per field, `not_id` / `not_rule` for `not*` values); `when` conditions join the principals or
//! the permissions by key. On TCP filter chains HTTP-only fields make an ALLOW rule disappear
//! and are removed from DENY and AUDIT rules (istiod's `checkError`).
//! `requestPrincipals` and `request.auth.*` match the `jwt_authn` payload in dynamic metadata
//! (`payload.iss` / `payload.sub`, claim paths), as istiod's generators do without the Istio
//! authn filter.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TypedExtensionConfig};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    ListMatcher, MetadataMatcher, OrMatcher, PathMatcher, RegexMatcher, StringMatcher,
    ValueMatcher, list_matcher, metadata_matcher, path_matcher, string_matcher, value_matcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use palisade_policy::api::{AuthorizationPolicy, AuthzAction, Rule};
use palisade_policy::compile::expand_principals;
use palisade_policy::resolve::AppliedPolicy;
use palisade_policy::validate::{WhenKey, parse_ip_or_cidr, parse_port, parse_when_key};

use crate::TranslateError;

/// Envoy's HTTP RBAC filter name.
pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";
/// Envoy's network RBAC filter name.
pub const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// istiod's `RBACTCPFilterStatPrefix`.
pub const TCP_STAT_PREFIX: &str = "tcp.";
/// istiod's `RBACShadowRulesAllowStatPrefix`.
pub const SHADOW_ALLOW_STAT_PREFIX: &str = "istio_dry_run_allow_";
/// istiod's `RBACShadowRulesDenyStatPrefix`.
pub const SHADOW_DENY_STAT_PREFIX: &str = "istio_dry_run_deny_";

const SPIFFE: &str = "spiffe://";

/// The enforced and shadow rules of one action.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltRules {
    pub action: rbac::Action,
    /// `None` when no enforced policy of this action applies.
    pub rules: Option<Rbac>,
    /// `None` when no dry-run policy of this action applies.
    pub shadow_rules: Option<Rbac>,
}

impl BuiltRules {
    fn shadow_stat_prefix(&self) -> &'static str {
        match (&self.shadow_rules, self.action) {
            (Some(_), rbac::Action::Allow) => SHADOW_ALLOW_STAT_PREFIX,
            (Some(_), rbac::Action::Deny) => SHADOW_DENY_STAT_PREFIX,
            _ => "",
        }
    }

    /// The HTTP filter config.
    pub fn http(&self) -> HttpRbac {
        HttpRbac {
            rules: self.rules.clone(),
            shadow_rules: self.shadow_rules.clone(),
            shadow_rules_stat_prefix: self.shadow_stat_prefix().to_owned(),
            ..Default::default()
        }
    }

    /// The network filter config.
    pub fn network(&self) -> NetworkRbac {
        NetworkRbac {
            rules: self.rules.clone(),
            shadow_rules: self.shadow_rules.clone(),
            shadow_rules_stat_prefix: self.shadow_stat_prefix().to_owned(),
            stat_prefix: TCP_STAT_PREFIX.to_owned(),
            ..Default::default()
        }
    }
}

/// The RBAC rule sets of a workload, in istiod's filter order (AUDIT, DENY, ALLOW); actions with
/// no applicable policy are absent. `for_tcp` builds the network-filter variant.
pub fn build(
    policies: &[AppliedPolicy],
    trust_domains: &[String],
    for_tcp: bool,
) -> Result<Vec<BuiltRules>, TranslateError> {
    if let Some(custom) = policies.iter().find(|p| p.action() == AuthzAction::Custom) {
        // The place for ext_authz: istiod puts a shadow RBAC + ext_authz pair first.
        return Err(TranslateError::not_translated(
            &what(&custom.policy),
            "spec.action",
            "CUSTOM (ext_authz) is translated in a later step",
        ));
    }
    let mut out = Vec::new();
    for (action, envoy_action) in [
        (AuthzAction::Audit, rbac::Action::Log),
        (AuthzAction::Deny, rbac::Action::Deny),
        (AuthzAction::Allow, rbac::Action::Allow),
    ] {
        let of_action: Vec<&AppliedPolicy> =
            policies.iter().filter(|p| p.action() == action).collect();
        if of_action.is_empty() {
            continue;
        }
        let mut enforce = HashMap::new();
        let mut shadow = HashMap::new();
        let (mut has_enforce, mut has_dry_run) = (false, false);
        for applied in of_action {
            let p = &applied.policy;
            let target = if applied.dry_run {
                has_dry_run = true;
                &mut shadow
            } else {
                has_enforce = true;
                &mut enforce
            };
            let rules = p.spec.rules.as_deref().unwrap_or_default();
            if rules.is_empty() {
                target.insert(policy_name(p, 0), match_never());
                continue;
            }
            for (i, rule) in rules.iter().enumerate() {
                let ctx = RuleContext {
                    what: what(p),
                    rule: i,
                    policy_ns: p.metadata.namespace(),
                    trust_domains,
                    for_tcp,
                    action,
                };
                if let Some(generated) = generate(&ctx, rule)? {
                    target.insert(policy_name(p, i), generated);
                }
            }
        }
        let rbac_of = |policies| Rbac {
            action: envoy_action as i32,
            policies,
            ..Default::default()
        };
        out.push(BuiltRules {
            action: envoy_action,
            rules: has_enforce.then(|| rbac_of(enforce)),
            shadow_rules: has_dry_run.then(|| rbac_of(shadow)),
        });
    }
    Ok(out)
}

/// `ns[NS]-policy[NAME]-rule[N]`.
pub fn policy_name(p: &AuthorizationPolicy, rule: usize) -> String {
    format!(
        "ns[{}]-policy[{}]-rule[{rule}]",
        p.metadata.namespace(),
        p.metadata.name
    )
}

fn what(p: &AuthorizationPolicy) -> String {
    format!(
        "AuthorizationPolicy {}/{}",
        p.metadata.namespace(),
        p.metadata.name
    )
}

/// istiod's `rbacPolicyMatchNever`.
fn match_never() -> Policy {
    Policy {
        permissions: vec![Permission {
            rule: Some(permission::Rule::NotRule(Box::new(perm_any()))),
        }],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(princ_any()))),
        }],
        ..Default::default()
    }
}

fn perm_any() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn princ_any() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

struct RuleContext<'a> {
    what: String,
    rule: usize,
    policy_ns: &'a str,
    trust_domains: &'a [String],
    for_tcp: bool,
    action: AuthzAction,
}

/// An attribute with its values, in the order istiod's model lists them.
struct Attr {
    key: AttrKey,
    /// The field as written, for errors.
    field: String,
    values: Vec<String>,
    not_values: Vec<String>,
}

#[derive(Clone)]
enum AttrKey {
    Principal,
    RequestPrincipal,
    Namespace,
    ServiceAccount,
    TrustDomain,
    RemoteIp,
    SourceIp,
    Host,
    Method,
    Path,
    Port,
    DestIp,
    Sni,
    Header(String),
    /// `request.auth.audiences` / `presenter` / `claims[...]`: the claim path in the payload.
    JwtClaim(Vec<String>),
    /// Envoy filter metadata: filter name and key.
    EnvoyFilter(String, String),
}

impl AttrKey {
    fn http_only(&self) -> bool {
        matches!(
            self,
            AttrKey::RequestPrincipal
                | AttrKey::Host
                | AttrKey::Method
                | AttrKey::Path
                | AttrKey::Header(_)
                | AttrKey::JwtClaim(_)
        )
    }

    /// Whether the attribute is matched by a principal (else a permission).
    fn is_principal(&self) -> bool {
        !matches!(
            self,
            AttrKey::Host
                | AttrKey::Method
                | AttrKey::Path
                | AttrKey::Port
                | AttrKey::DestIp
                | AttrKey::Sni
                | AttrKey::EnvoyFilter(..)
        )
    }
}

fn attr(key: AttrKey, field: &str, values: &[String], not_values: &[String]) -> Option<Attr> {
    (!values.is_empty() || !not_values.is_empty()).then(|| Attr {
        key,
        field: field.to_owned(),
        values: values.to_vec(),
        not_values: not_values.to_vec(),
    })
}

/// One rule as an RBAC policy; `None` when istiod skips it (an ALLOW rule with HTTP-only fields
/// on a TCP filter chain).
fn generate(ctx: &RuleContext<'_>, rule: &Rule) -> Result<Option<Policy>, TranslateError> {
    let mut when_principals = Vec::new();
    let mut when_permissions = Vec::new();
    for (j, c) in rule.when.iter().flatten().enumerate() {
        let field = format!("rules[{}].when[{j}] {}", ctx.rule, c.key);
        let key = parse_when_key(&c.key).map_err(|e| TranslateError::invalid(&ctx.what, e))?;
        let key = match key {
            WhenKey::RequestHeader(name) => AttrKey::Header(name),
            WhenKey::SourceIp => AttrKey::SourceIp,
            WhenKey::RemoteIp => AttrKey::RemoteIp,
            WhenKey::SourceNamespace => AttrKey::Namespace,
            WhenKey::SourcePrincipal => AttrKey::Principal,
            WhenKey::SourceServiceAccount => AttrKey::ServiceAccount,
            WhenKey::SourceTrustDomain => AttrKey::TrustDomain,
            WhenKey::RequestPrincipal => AttrKey::RequestPrincipal,
            WhenKey::RequestAudiences => AttrKey::JwtClaim(vec!["aud".to_owned()]),
            WhenKey::RequestPresenter => AttrKey::JwtClaim(vec!["azp".to_owned()]),
            WhenKey::RequestClaim(path) => AttrKey::JwtClaim(path),
            WhenKey::DestinationIp => AttrKey::DestIp,
            WhenKey::DestinationPort => AttrKey::Port,
            WhenKey::ConnectionSni => AttrKey::Sni,
            WhenKey::EnvoyFilter { filter, key } => AttrKey::EnvoyFilter(filter, key),
        };
        if let Some(a) = attr(key, &field, &c.values, &c.not_values) {
            if a.key.is_principal() {
                when_principals.push(a);
            } else {
                when_permissions.push(a);
            }
        }
    }
    let mut principal_lists: Vec<Vec<Attr>> = Vec::new();
    for (j, from) in rule.from.iter().flatten().enumerate() {
        let mut list = Vec::new();
        if let Some(s) = &from.source {
            let f = |name: &str| format!("rules[{}].from[{j}].source.{name}", ctx.rule);
            let fields = [
                (
                    AttrKey::Principal,
                    "principals",
                    &s.principals,
                    &s.not_principals,
                ),
                (
                    AttrKey::RequestPrincipal,
                    "requestPrincipals",
                    &s.request_principals,
                    &s.not_request_principals,
                ),
                (
                    AttrKey::Namespace,
                    "namespaces",
                    &s.namespaces,
                    &s.not_namespaces,
                ),
                (
                    AttrKey::ServiceAccount,
                    "serviceAccounts",
                    &s.service_accounts,
                    &s.not_service_accounts,
                ),
                (
                    AttrKey::TrustDomain,
                    "trustDomains",
                    &s.trust_domains,
                    &s.not_trust_domains,
                ),
                (
                    AttrKey::RemoteIp,
                    "remoteIpBlocks",
                    &s.remote_ip_blocks,
                    &s.not_remote_ip_blocks,
                ),
                (
                    AttrKey::SourceIp,
                    "ipBlocks",
                    &s.ip_blocks,
                    &s.not_ip_blocks,
                ),
            ];
            for (key, name, values, not_values) in fields {
                list.extend(attr(key, &f(name), values, not_values));
            }
        }
        principal_lists.push(list);
    }
    if principal_lists.is_empty() {
        principal_lists.push(Vec::new());
    }
    let mut permission_lists: Vec<Vec<Attr>> = Vec::new();
    for (j, to) in rule.to.iter().flatten().enumerate() {
        let mut list = Vec::new();
        if let Some(o) = &to.operation {
            let f = |name: &str| format!("rules[{}].to[{j}].operation.{name}", ctx.rule);
            let fields = [
                (AttrKey::Host, "hosts", &o.hosts, &o.not_hosts),
                (AttrKey::Method, "methods", &o.methods, &o.not_methods),
                (AttrKey::Path, "paths", &o.paths, &o.not_paths),
                (AttrKey::Port, "ports", &o.ports, &o.not_ports),
            ];
            for (key, name, values, not_values) in fields {
                list.extend(attr(key, &f(name), values, not_values));
            }
        }
        permission_lists.push(list);
    }
    if permission_lists.is_empty() {
        permission_lists.push(Vec::new());
    }

    let mut permissions = Vec::new();
    for list in &permission_lists {
        let mut and = Vec::new();
        for a in list.iter().chain(&when_permissions) {
            match attr_matchers(ctx, a, permission_of)? {
                Some(m) => and.extend(m),
                None => return Ok(None),
            }
        }
        if and.is_empty() {
            and.push(perm_any());
        }
        permissions.push(Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules: and })),
        });
    }
    let mut principals = Vec::new();
    for list in &principal_lists {
        let mut and = Vec::new();
        for a in list.iter().chain(&when_principals) {
            match principal_matchers(ctx, a)? {
                Some(m) => and.extend(m),
                None => return Ok(None),
            }
        }
        if and.is_empty() {
            and.push(princ_any());
        }
        principals.push(Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids: and })),
        });
    }
    Ok(Some(Policy {
        permissions,
        principals,
        ..Default::default()
    }))
}

/// A matcher Envoy can express for one value, or why not.
trait Matcher: Sized {
    fn or(items: Vec<Self>) -> Self;
    fn not(item: Self) -> Self;
}

impl Matcher for Permission {
    fn or(rules: Vec<Self>) -> Self {
        Permission {
            rule: Some(permission::Rule::OrRules(permission::Set { rules })),
        }
    }
    fn not(item: Self) -> Self {
        Permission {
            rule: Some(permission::Rule::NotRule(Box::new(item))),
        }
    }
}

impl Matcher for Principal {
    fn or(ids: Vec<Self>) -> Self {
        Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
        }
    }
    fn not(item: Self) -> Self {
        Principal {
            identifier: Some(principal::Identifier::NotId(Box::new(item))),
        }
    }
}

/// What one value of an attribute becomes.
enum ValueOutcome<M> {
    Matcher(M),
    /// HTTP-only on TCP (istiod's generator error).
    HttpOnly,
}

/// `or` of the values and `not(or)` of the not-values; `None` when the whole rule is skipped
/// (ALLOW with an HTTP-only field on TCP). DENY and AUDIT lose the HTTP-only values instead.
fn attr_matchers<M: Matcher>(
    ctx: &RuleContext<'_>,
    a: &Attr,
    one: fn(&RuleContext<'_>, &Attr, &str) -> Result<ValueOutcome<M>, TranslateError>,
) -> Result<Option<Vec<M>>, TranslateError> {
    let mut out = Vec::new();
    for (values, negate) in [(&a.values, false), (&a.not_values, true)] {
        let mut or = Vec::new();
        for v in expand(ctx, a, values) {
            match one(ctx, a, &v)? {
                ValueOutcome::Matcher(m) => or.push(m),
                ValueOutcome::HttpOnly if ctx.action == AuthzAction::Allow => return Ok(None),
                ValueOutcome::HttpOnly => {}
            }
        }
        if !or.is_empty() {
            let m = M::or(or);
            out.push(if negate { M::not(m) } else { m });
        }
    }
    Ok(Some(out))
}

/// Principal values over the trust-domain bundle (istiod's `MigrateTrustDomain`, applied to
/// every rule: `cluster.local/...` stands for the mesh's own trust domain even without aliases).
fn expand(ctx: &RuleContext<'_>, a: &Attr, values: &[String]) -> Vec<String> {
    match a.key {
        AttrKey::Principal => expand_principals(values, ctx.trust_domains),
        _ => values.to_vec(),
    }
}

fn not_translated<M>(
    ctx: &RuleContext<'_>,
    a: &Attr,
    reason: &str,
) -> Result<ValueOutcome<M>, TranslateError> {
    if ctx.for_tcp && a.key.http_only() {
        return Ok(ValueOutcome::HttpOnly);
    }
    Err(TranslateError::not_translated(&ctx.what, &a.field, reason))
}

// `Permission.metadata` is deprecated in Envoy's API in favour of `sourced_metadata`, but it is
// what istiod generates for `experimental.envoy.filters.*` conditions and Envoy 1.40 accepts it.
#[allow(deprecated)]
fn permission_of(
    ctx: &RuleContext<'_>,
    a: &Attr,
    v: &str,
) -> Result<ValueOutcome<Permission>, TranslateError> {
    if ctx.for_tcp && a.key.http_only() {
        return Ok(ValueOutcome::HttpOnly);
    }
    let rule = match &a.key {
        AttrKey::Host => permission::Rule::Header(host_matcher(v)),
        AttrKey::Method => permission::Rule::Header(header_matcher(":method", v)),
        AttrKey::Path => path_rule(v),
        AttrKey::Port => {
            permission::Rule::DestinationPort(u32::from(parse_port(v).ok_or_else(|| {
                TranslateError::invalid(&ctx.what, format!("{}: bad port {v:?}", a.field))
            })?))
        }
        AttrKey::DestIp => permission::Rule::DestinationIp(cidr(ctx, a, v)?),
        AttrKey::Sni => permission::Rule::RequestedServerName(string_matcher(v, "")),
        AttrKey::EnvoyFilter(filter, key) => permission::Rule::Metadata(MetadataMatcher {
            filter: filter.clone(),
            path: vec![metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(key.clone())),
            }],
            value: Some(ValueMatcher {
                match_pattern: Some(value_matcher::MatchPattern::StringMatch(string_matcher(
                    v, "",
                ))),
            }),
            invert: false,
        }),
        _ => {
            return Err(TranslateError::invalid(
                &ctx.what,
                format!("{} is not an operation attribute", a.field),
            ));
        }
    };
    Ok(ValueOutcome::Matcher(Permission { rule: Some(rule) }))
}

fn principal_of(
    ctx: &RuleContext<'_>,
    a: &Attr,
    v: &str,
) -> Result<ValueOutcome<Principal>, TranslateError> {
    use principal::Identifier;
    if ctx.for_tcp && a.key.http_only() {
        return Ok(ValueOutcome::HttpOnly);
    }
    let id = match &a.key {
        AttrKey::Principal => authenticated(string_matcher(v, SPIFFE)),
        AttrKey::Namespace => authenticated(regex(format!(".*/ns/{}/.*", v.replace('*', ".*")))),
        AttrKey::ServiceAccount => {
            let (ns, sa) = v.split_once('/').unwrap_or((ctx.policy_ns, v));
            authenticated(regex(format!(
                "spiffe://.+/ns/{}/(.+/|)sa/{}(/.+)?",
                quote_meta(ns),
                quote_meta(sa)
            )))
        }
        AttrKey::SourceIp => Identifier::DirectRemoteIp(cidr(ctx, a, v)?),
        AttrKey::RemoteIp => Identifier::RemoteIp(cidr(ctx, a, v)?),
        AttrKey::Header(name) => Identifier::Header(header_matcher(name, v)),
        AttrKey::RequestPrincipal | AttrKey::JwtClaim(_) => {
            return Err(TranslateError::invalid(
                &ctx.what,
                format!("{} is matched on all its values at once", a.field),
            ));
        }
        AttrKey::TrustDomain => {
            return not_translated(ctx, a, "trust-domain matchers are not generated yet");
        }
        _ => {
            return Err(TranslateError::invalid(
                &ctx.what,
                format!("{} is not a source attribute", a.field),
            ));
        }
    };
    Ok(ValueOutcome::Matcher(Principal {
        identifier: Some(id),
    }))
}

/// A source attribute's matchers. JWT attributes are istiod's "extended" generators, which see
/// all values at once (`requestPrincipalGenerator`, `requestClaimGenerator`, ... in
/// `pilot/pkg/security/authz/model/generator.go`): the values give one principal, the
/// not-values one `not_id` of one principal; the others go value by value.
fn principal_matchers(
    ctx: &RuleContext<'_>,
    a: &Attr,
) -> Result<Option<Vec<Principal>>, TranslateError> {
    let extended: fn(&AttrKey, &[String]) -> Option<Principal> = match a.key {
        AttrKey::RequestPrincipal => request_principals,
        AttrKey::JwtClaim(_) => jwt_claims,
        _ => return attr_matchers(ctx, a, principal_of),
    };
    if ctx.for_tcp {
        // istiod's checkError: the rule is skipped for ALLOW, the attribute dropped otherwise.
        return Ok((ctx.action != AuthzAction::Allow).then(Vec::new));
    }
    let mut out = Vec::new();
    out.extend(extended(&a.key, &a.values));
    out.extend(extended(&a.key, &a.not_values).map(<Principal as Matcher>::not));
    Ok(Some(out))
}

// `Principal.metadata` is deprecated for `sourced_metadata`, but it is what istiod generates for
// `request.auth.*` and Envoy 1.40 accepts it.
#[allow(deprecated)]
fn principal_metadata(m: MetadataMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Metadata(m)),
    }
}

/// A matcher on the jwt_authn payload at `path`.
fn jwt_payload(path: &[String], value: value_matcher::MatchPattern) -> MetadataMatcher {
    MetadataMatcher {
        filter: crate::jwt::JWT_FILTER.to_owned(),
        path: std::iter::once(crate::jwt::PAYLOAD_KEY)
            .chain(path.iter().map(String::as_str))
            .map(|k| metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(k.to_owned())),
            })
            .collect(),
        value: Some(ValueMatcher {
            match_pattern: Some(value),
        }),
        invert: false,
    }
}

/// istiod's `requestPrincipalGenerator`: `ISS/SUB` split at the last `/` (issuers are URLs),
/// each value `and_ids` of the payload's `iss` and `sub`, with `*` wildcards on either side.
fn request_principals(_: &AttrKey, values: &[String]) -> Option<Principal> {
    use string_matcher::MatchPattern::{Exact, Prefix, Suffix};
    let any = || regex(".+".to_owned());
    let mut or: Vec<Principal> = values
        .iter()
        .map(|value| {
            let (iss, sub) = match value.rsplit_once('/') {
                Some((i, s)) => (i, Some(s)),
                None => (value.as_str(), None),
            };
            let (m_iss, m_sub) = if value == "*" {
                (any(), any())
            } else if let Some(rest) = value.strip_prefix('*') {
                match sub {
                    Some(sub) => (
                        if iss == "*" {
                            any()
                        } else {
                            pattern(
                                Suffix(iss.strip_prefix('*').unwrap_or(iss).to_owned()),
                                false,
                            )
                        },
                        pattern(Exact(sub.to_owned()), false),
                    ),
                    None => (any(), pattern(Suffix(rest.to_owned()), false)),
                }
            } else if let Some(rest) = value.strip_suffix('*') {
                match sub {
                    Some(sub) => (
                        pattern(Exact(iss.to_owned()), false),
                        if sub == "*" {
                            any()
                        } else {
                            pattern(
                                Prefix(sub.strip_suffix('*').unwrap_or(sub).to_owned()),
                                false,
                            )
                        },
                    ),
                    None => (pattern(Prefix(rest.to_owned()), false), any()),
                }
            } else {
                (
                    pattern(Exact(iss.to_owned()), false),
                    pattern(Exact(sub.unwrap_or_default().to_owned()), false),
                )
            };
            let claim = |c: &str, m| {
                principal_metadata(jwt_payload(
                    &[c.to_owned()],
                    value_matcher::MatchPattern::StringMatch(m),
                ))
            };
            Principal {
                identifier: Some(principal::Identifier::AndIds(principal::Set {
                    ids: vec![claim("iss", m_iss), claim("sub", m_sub)],
                })),
            }
        })
        .collect();
    match or.len() {
        0 => None,
        1 => or.pop(),
        _ => Some(<Principal as Matcher>::or(or)),
    }
}

/// istiod's `requestClaimGenerator` (and audiences, presenter): one matcher on the claim path
/// whose value is either a list holding one of the values or one of the values itself.
fn jwt_claims(key: &AttrKey, values: &[String]) -> Option<Principal> {
    let AttrKey::JwtClaim(path) = key else {
        return None;
    };
    let mut each: Vec<ValueMatcher> = values
        .iter()
        .map(|v| ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::StringMatch(string_matcher(
                v, "",
            ))),
        })
        .collect();
    let one_of = match each.len() {
        0 => return None,
        1 => each.pop()?,
        _ => ValueMatcher {
            match_pattern: Some(value_matcher::MatchPattern::OrMatch(OrMatcher {
                value_matchers: each,
            })),
        },
    };
    let list = ValueMatcher {
        match_pattern: Some(value_matcher::MatchPattern::ListMatch(Box::new(
            ListMatcher {
                match_pattern: Some(list_matcher::MatchPattern::OneOf(Box::new(one_of.clone()))),
            },
        ))),
    };
    Some(principal_metadata(jwt_payload(
        path,
        value_matcher::MatchPattern::OrMatch(OrMatcher {
            value_matchers: vec![list, one_of],
        }),
    )))
}

fn authenticated(m: StringMatcher) -> principal::Identifier {
    principal::Identifier::Authenticated(principal::Authenticated {
        principal_name: Some(m),
    })
}

fn cidr(ctx: &RuleContext<'_>, a: &Attr, v: &str) -> Result<CidrRange, TranslateError> {
    let net = parse_ip_or_cidr(v)
        .map_err(|e| TranslateError::invalid(&ctx.what, format!("{}: {e}", a.field)))?;
    // istiod keeps the address as written (`5.6.7.8/16` stays `5.6.7.8`); Envoy masks it.
    let address = v.split_once('/').map_or(v, |(addr, _)| addr);
    Ok(CidrRange {
        address_prefix: address.to_owned(),
        prefix_len: Some(UInt32Value {
            value: u32::from(net.prefix_len()),
        }),
    })
}

/// A full-string RE2 match (Envoy's default engine; istiod no longer sets `google_re2`).
pub(crate) fn regex(r: String) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r,
            ..Default::default()
        })),
        ignore_case: false,
    }
}

fn pattern(p: string_matcher::MatchPattern, ignore_case: bool) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(p),
        ignore_case,
    }
}

/// istiod's `StringMatcherWithPrefix`: `*` any non-empty value (`.+`), `*x` a suffix (a regex
/// after a prefix), `x*` a prefix, else exact; `prefix` is prepended (`spiffe://` for principals).
pub(crate) fn string_matcher(v: &str, prefix: &str) -> StringMatcher {
    use string_matcher::MatchPattern::*;
    if v == "*" {
        regex(".+".to_owned())
    } else if let Some(s) = v.strip_prefix('*') {
        if prefix.is_empty() {
            pattern(Suffix(s.to_owned()), false)
        } else {
            regex(format!("{prefix}.*{s}"))
        }
    } else if let Some(p) = v.strip_suffix('*') {
        pattern(Prefix(format!("{prefix}{p}")), false)
    } else {
        pattern(Exact(format!("{prefix}{v}")), false)
    }
}

/// istiod's `HeaderMatcher`: `*` presence, `*x` suffix, `x*` prefix, else exact.
fn header_matcher(name: &str, v: &str) -> HeaderMatcher {
    use string_matcher::MatchPattern::*;
    let spec = if v == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else if let Some(s) = v.strip_prefix('*') {
        header_matcher::HeaderMatchSpecifier::StringMatch(pattern(Suffix(s.to_owned()), false))
    } else if let Some(p) = v.strip_suffix('*') {
        header_matcher::HeaderMatchSpecifier::StringMatch(pattern(Prefix(p.to_owned()), false))
    } else {
        header_matcher::HeaderMatchSpecifier::StringMatch(pattern(Exact(v.to_owned()), false))
    };
    HeaderMatcher {
        name: name.to_owned(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

/// istiod's `HostMatcher` on `:authority`: as [`header_matcher`], case-insensitive.
fn host_matcher(v: &str) -> HeaderMatcher {
    let mut m = header_matcher(":authority", v);
    if let Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) =
        &mut m.header_match_specifier
    {
        s.ignore_case = true;
    }
    m
}

/// A `paths` value: a URI template (`{*}`, `{**}`) as Envoy's `uri_template` matcher, else
/// istiod's path string matcher on the normalized path without the query.
fn path_rule(v: &str) -> permission::Rule {
    if v.contains("{*}") || v.contains("{**}") {
        let template = v.replace("{**}", "**").replace("{*}", "*");
        return permission::Rule::UriTemplate(TypedExtensionConfig {
            name: "uri-template".to_owned(),
            typed_config: Some(pack_any(UriTemplateMatchConfig {
                path_template: template,
            })),
        });
    }
    permission::Rule::UrlPath(PathMatcher {
        rule: Some(path_matcher::Rule::Path(string_matcher(v, ""))),
    })
}

/// RE2 quoting of a literal (Go's `regexp.QuoteMeta`).
fn quote_meta(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use palisade_policy::MeshSnapshot;

    fn resolve(yaml: &str) -> Vec<AppliedPolicy> {
        let we = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: httpbin, namespace: foo}\nspec: {address: 127.0.67.1, labels: {app: httpbin, version: v1}, ports: {http: 8080}}\n---\n";
        let s = MeshSnapshot::from_sources(
            Some(("mesh.yaml", "trustDomain: cluster.local\n")),
            &[("p.yaml".to_owned(), format!("{we}{yaml}"))],
        )
        .unwrap();
        s.resolve_workload("foo/httpbin").unwrap().authorization
    }

    fn json_of(built: &[BuiltRules], tcp: bool) -> serde_json::Value {
        serde_json::Value::Array(
            built
                .iter()
                .map(|b| {
                    if tcp {
                        crate::json::network_rbac(&b.network())
                    } else {
                        crate::json::http_rbac(&b.http())
                    }
                })
                .collect(),
        )
    }

    /// Istio's golden outputs (pilot/pkg/security/authz/builder/testdata), in Envoy's JSON.
    #[test]
    fn istio_golden_shapes() {
        let cases: &[(&str, &str, bool, serde_json::Value)] = &[
            (
                "dry-run-mix (tcp)",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-1, namespace: foo, annotations: {"istio.io/dry-run": "true"}}
spec: {action: ALLOW, rules: [{to: [{operation: {ports: ["80"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-2, namespace: foo, annotations: {"istio.io/dry-run": "false"}}
spec: {action: ALLOW, rules: [{to: [{operation: {ports: ["9000"]}}]}]}
"#,
                true,
                serde_json::json!([{
                    "rules": {"policies": {"ns[foo]-policy[httpbin-2]-rule[0]": {
                        "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 9000}]}}]}}],
                        "principals": [{"and_ids": {"ids": [{"any": true}]}}]}}},
                    "shadow_rules": {"policies": {"ns[foo]-policy[httpbin-1]-rule[0]": {
                        "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 80}]}}]}}],
                        "principals": [{"and_ids": {"ids": [{"any": true}]}}]}}},
                    "shadow_rules_stat_prefix": "istio_dry_run_allow_",
                    "stat_prefix": "tcp."
                }]),
            ),
            (
                "allow-only-http (tcp): the ALLOW rules vanish, the deny-all stays",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["id-1"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {namespaces: ["ns-1"]}}]
    to: [{operation: {hosts: ["example.com"]}}]
"#,
                true,
                serde_json::json!([{"rules": {}, "stat_prefix": "tcp."}]),
            ),
            (
                "deny on tcp keeps the rule without its HTTP fields",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["ns-1"]}}]
    to: [{operation: {methods: ["GET"]}}]
"#,
                true,
                serde_json::json!([{"rules": {"action": "DENY", "policies": {"ns[foo]-policy[httpbin-deny]-rule[0]": {
                    "permissions": [{"and_rules": {"rules": [{"any": true}]}}],
                    "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [{"authenticated": {"principal_name": {"safe_regex": {"regex": ".*/ns/ns-1/.*"}}}}]}}]}}]
                }}}, "stat_prefix": "tcp."}]),
            ),
            (
                "allow-nil-rule: a policy without rules never matches",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-none, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin, version: v1}}}
"#,
                false,
                serde_json::json!([{"rules": {"policies": {"ns[foo]-policy[allow-none]-rule[0]": {
                    "permissions": [{"not_rule": {"any": true}}],
                    "principals": [{"not_id": {"any": true}}]
                }}}}]),
            ),
            (
                "principal forms, not-values, hosts, paths, methods, headers",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: full, namespace: foo}
spec:
  rules:
  - from: [{source: {principals: ["principal", "principal-prefix-*", "*-suffix-principal", "*"], notNamespaces: ["not-ns-prefix-*"]}}]
    to: [{operation: {hosts: ["*.suffix.com"], methods: ["GET"], paths: ["/prefix/*", "/api/{*}/x/{**}"]}}]
    when: [{key: "request.headers[X-header]", values: ["header-prefix-*"]}]
"#,
                false,
                serde_json::json!([{"rules": {"policies": {"ns[foo]-policy[full]-rule[0]": {
                    "permissions": [{"and_rules": {"rules": [
                        {"or_rules": {"rules": [{"header": {"name": ":authority", "string_match": {"suffix": ".suffix.com", "ignore_case": true}}}]}},
                        {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}]}},
                        {"or_rules": {"rules": [
                            {"url_path": {"path": {"prefix": "/prefix/"}}},
                            {"uri_template": {"name": "uri-template", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                                "path_template": "/api/*/x/**"}}}
                        ]}}
                    ]}}],
                    "principals": [{"and_ids": {"ids": [
                        {"or_ids": {"ids": [
                            {"authenticated": {"principal_name": {"exact": "spiffe://principal"}}},
                            {"authenticated": {"principal_name": {"prefix": "spiffe://principal-prefix-"}}},
                            {"authenticated": {"principal_name": {"safe_regex": {"regex": "spiffe://.*-suffix-principal"}}}},
                            {"authenticated": {"principal_name": {"safe_regex": {"regex": ".+"}}}}
                        ]}},
                        {"not_id": {"or_ids": {"ids": [
                            {"authenticated": {"principal_name": {"safe_regex": {"regex": ".*/ns/not-ns-prefix-.*/.*"}}}}
                        ]}}},
                        {"or_ids": {"ids": [{"header": {"name": "X-header", "string_match": {"prefix": "header-prefix-"}}}]}}
                    ]}}]
                }}}}]),
            ),
        ];
        for (name, yaml, tcp, want) in cases {
            let built = build(&resolve(yaml), &["cluster.local".to_owned()], *tcp).unwrap();
            assert_eq!(&json_of(&built, *tcp), want, "{name}");
        }
    }

    #[test]
    fn untranslated_inputs_are_errors_naming_policy_and_field() {
        let cases: &[(&str, &str, bool, Option<&str>)] = &[
            (
                "requestPrincipals on TCP ALLOW: the rule is skipped as istiod skips it",
                "spec: {rules: [{from: [{source: {requestPrincipals: [\"a/b\"]}}]}]}",
                true,
                None,
            ),
            (
                "CUSTOM",
                "spec: {action: CUSTOM, provider: {name: authz}, rules: [{}]}",
                false,
                Some("spec.action"),
            ),
        ];
        for (name, spec, tcp, want) in cases {
            let yaml = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\n{spec}\n"
            );
            let mesh_ok = !yaml.contains("CUSTOM");
            let policies = if mesh_ok {
                resolve(&yaml)
            } else {
                // CUSTOM needs a provider in the mesh config to validate.
                let s = MeshSnapshot::from_sources(
                    Some((
                        "mesh.yaml",
                        "trustDomain: cluster.local\nextensionProviders: [{name: authz, envoyExtAuthzGrpc: {service: a.b, port: 9000}}]\n",
                    )),
                    &[(
                        "p.yaml".to_owned(),
                        format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: httpbin, namespace: foo}}\nspec: {{address: 127.0.67.1}}\n---\n{yaml}"),
                    )],
                )
                .unwrap();
                s.resolve_workload("foo/httpbin").unwrap().authorization
            };
            let got = build(&policies, &["cluster.local".to_owned()], *tcp);
            match want {
                Some(w) => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(w), "{name}: {e}");
                    assert!(e.contains("not translated"), "{name}: {e}");
                }
                None => {
                    let built = got.unwrap();
                    assert!(
                        built[0].rules.as_ref().unwrap().policies.is_empty(),
                        "{name}"
                    );
                }
            }
        }
    }

    /// `request.auth.*` on the jwt_authn payload, as istiod's generators shape it (goldens:
    /// `pilot/pkg/security/authz/builder/testdata/http/single-policy-out.yaml` for
    /// requestPrincipals, `allow-full-rule-out.yaml` for audiences and claims).
    #[test]
    fn jwt_attributes_match_the_jwt_authn_payload() {
        use serde_json::{Value, json};
        let meta = |path: &[&str], value: Value| {
            let mut p = vec![json!({"key": "payload"})];
            p.extend(path.iter().map(|k| json!({"key": k})));
            json!({"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": p, "value": value}})
        };
        let s = |m: Value| json!({"string_match": m});
        let any = || s(json!({"safe_regex": {"regex": ".+"}}));
        let rp = |iss: Value, sub: Value| json!({"and_ids": {"ids": [meta(&["iss"], iss), meta(&["sub"], sub)]}});
        let claim = |path: &[&str], one: Value| {
            meta(
                path,
                json!({"or_match": {"value_matchers": [{"list_match": {"one_of": one.clone()}}, one]}}),
            )
        };
        let cases: Vec<(&str, &str, Value)> = vec![
            (
                "exact ISS/SUB, the issuer a URL",
                r#"from: [{source: {requestPrincipals: ["https://a.example/x/alice"]}}]"#,
                rp(
                    s(json!({"exact": "https://a.example/x"})),
                    s(json!({"exact": "alice"})),
                ),
            ),
            (
                "no slash: an issuer with an empty subject",
                r#"from: [{source: {requestPrincipals: ["iss"]}}]"#,
                rp(s(json!({"exact": "iss"})), s(json!({"exact": ""}))),
            ),
            (
                "*",
                r#"from: [{source: {requestPrincipals: ["*"]}}]"#,
                rp(any(), any()),
            ),
            (
                "*/SUB",
                r#"from: [{source: {requestPrincipals: ["*/bob"]}}]"#,
                rp(any(), s(json!({"exact": "bob"}))),
            ),
            (
                "*ISS-SUFFIX/SUB",
                r#"from: [{source: {requestPrincipals: ["*.example/bob"]}}]"#,
                rp(s(json!({"suffix": ".example"})), s(json!({"exact": "bob"}))),
            ),
            (
                "*SUFFIX without slash: a subject suffix",
                r#"from: [{source: {requestPrincipals: ["*@corp"]}}]"#,
                rp(any(), s(json!({"suffix": "@corp"}))),
            ),
            (
                "ISS/*",
                r#"from: [{source: {requestPrincipals: ["https://a/*"]}}]"#,
                rp(s(json!({"exact": "https://a"})), any()),
            ),
            (
                "ISS/SUB-PREFIX*",
                r#"from: [{source: {requestPrincipals: ["https://a/svc-*"]}}]"#,
                rp(
                    s(json!({"exact": "https://a"})),
                    s(json!({"prefix": "svc-"})),
                ),
            ),
            (
                "PREFIX* without slash: an issuer prefix",
                r#"from: [{source: {requestPrincipals: ["https:*"]}}]"#,
                rp(s(json!({"prefix": "https:"})), any()),
            ),
            (
                "two values: or_ids; not-values: not_id of the or",
                r#"from: [{source: {requestPrincipals: ["a/b", "c/d"], notRequestPrincipals: ["e/f"]}}]"#,
                json!([
                    {"or_ids": {"ids": [
                        rp(s(json!({"exact": "a"})), s(json!({"exact": "b"}))),
                        rp(s(json!({"exact": "c"})), s(json!({"exact": "d"}))),
                    ]}},
                    {"not_id": rp(s(json!({"exact": "e"})), s(json!({"exact": "f"})))},
                ]),
            ),
            (
                "request.auth.principal in when: the requestPrincipals generator",
                r#"when: [{key: request.auth.principal, values: ["https://a/bob"]}]"#,
                rp(s(json!({"exact": "https://a"})), s(json!({"exact": "bob"}))),
            ),
            (
                "audiences: a list or a string",
                r#"when: [{key: request.auth.audiences, values: [api]}]"#,
                claim(&["aud"], s(json!({"exact": "api"}))),
            ),
            (
                "presenter",
                r#"when: [{key: request.auth.presenter, values: ["web-*"]}]"#,
                claim(&["azp"], s(json!({"prefix": "web-"}))),
            ),
            (
                "nested claim, several values",
                r#"when: [{key: "request.auth.claims[org][team]", values: [blue, "*-x"]}]"#,
                claim(
                    &["org", "team"],
                    json!({"or_match": {"value_matchers": [s(json!({"exact": "blue"})), s(json!({"suffix": "-x"}))]}}),
                ),
            ),
            (
                "notValues of a claim",
                r#"when: [{key: "request.auth.claims[groups]", notValues: [guests]}]"#,
                json!({"not_id": claim(&["groups"], s(json!({"exact": "guests"})))}),
            ),
        ];
        for (name, rule, want) in cases {
            let yaml = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec: {{rules: [{{{rule}}}]}}\n"
            );
            let built = build(&resolve(&yaml), &["cluster.local".to_owned()], false).unwrap();
            let got = &json_of(&built, false)[0]["rules"]["policies"]["ns[foo]-policy[p]-rule[0]"]
                ["principals"][0]["and_ids"]["ids"];
            let want = if want.is_array() { want } else { json!([want]) };
            assert_eq!(got, &want, "{name}");
        }
        // On TCP, ALLOW skips the rule and DENY drops the attribute (istiod's checkError).
        for (action, want) in [("ALLOW", json!(null)), ("DENY", json!([{"any": true}]))] {
            let yaml = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec: {{action: {action}, rules: [{{when: [{{key: \"request.auth.claims[iss]\", values: [x]}}]}}]}}\n"
            );
            let built = build(&resolve(&yaml), &["cluster.local".to_owned()], true).unwrap();
            let got = &json_of(&built, true)[0]["rules"]["policies"]["ns[foo]-policy[p]-rule[0]"]["principals"]
                [0]["and_ids"]["ids"];
            assert_eq!(got, &want, "{action}");
        }
    }

    #[test]
    fn principals_follow_the_trust_domain_bundle() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\nspec: {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]}]}\n";
        let cases: &[(&[&str], &[&str])] = &[
            (&["cluster.local"], &["spiffe://cluster.local/ns/a/sa/b"]),
            // `cluster.local` names the local trust domain, aliases or not.
            (&["td1"], &["spiffe://td1/ns/a/sa/b"]),
            (
                &["td1", "cluster.local"],
                &["spiffe://td1/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b"],
            ),
        ];
        for (bundle, want) in cases {
            let bundle: Vec<String> = bundle.iter().map(|s| (*s).to_owned()).collect();
            let built = build(&resolve(yaml), &bundle, false).unwrap();
            let doc = json_of(&built, false).to_string();
            for w in *want {
                assert!(doc.contains(w), "{bundle:?}: {w} not in {doc}");
            }
            assert_eq!(
                doc.matches("spiffe://").count(),
                want.len(),
                "{bundle:?}: {doc}"
            );
        }
    }

    #[test]
    fn string_matcher_forms() {
        let cases = [
            ("*", "", serde_json::json!({"safe_regex": {"regex": ".+"}})),
            (
                "a*",
                "spiffe://",
                serde_json::json!({"prefix": "spiffe://a"}),
            ),
            ("*a", "", serde_json::json!({"suffix": "a"})),
            (
                "*a",
                "spiffe://",
                serde_json::json!({"safe_regex": {"regex": "spiffe://.*a"}}),
            ),
            ("a", "spiffe://", serde_json::json!({"exact": "spiffe://a"})),
        ];
        for (v, prefix, want) in cases {
            assert_eq!(
                crate::json::string_matcher(&string_matcher(v, prefix)),
                want,
                "{v} {prefix}"
            );
        }
        assert_eq!(quote_meta("a.b*"), "a\\.b\\*");
    }
}
