//! Compilation of a workload's resolved policies into a [`CompiledPolicy`]: every rule turned into
//! precompiled checks (string patterns, CIDRs, path templates, principals expanded over the trust
//! domain aliases), one variant for HTTP requests and one for TCP connections (Istio's
//! HTTP-only-fields-on-TCP rule), sorted by Istio's policy id and indexed for fast lookup.

use std::net::IpAddr;

use crate::api::*;
use crate::index::{IndexKeys, RuleIndex};
use crate::matcher::*;
use crate::mesh::MeshConfig;
use crate::normalize::PathNormalization;
use crate::resolve::{MtlsResolution, PolicyScope, ResolvedJwtRule, ResolvedPolicies};
use crate::validate::{WhenKey, parse_port, parse_when_key};

/// Errors that stop compilation. Validated snapshots do not produce them; they exist so that
/// unvalidated input can never panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("AuthorizationPolicy {policy}: {field}: {reason}")]
    Invalid {
        policy: String,
        field: String,
        reason: String,
    },
    #[error("unknown workload {0:?}")]
    UnknownWorkload(String),
}

/// Facts about one applicable AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// `ns[<ns>]-policy[<name>]`.
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub action: AuthzAction,
    pub dry_run: bool,
    pub scope: PolicyScope,
    /// `None` when `rules` is unset or empty (matches nothing).
    pub rule_count: usize,
    /// Index into the provider list (CUSTOM only).
    pub provider: Option<usize>,
}

impl PolicyInfo {
    /// `ns[<ns>]-policy[<name>]`.
    pub fn label(&self) -> String {
        self.id.clone()
    }
}

/// The attribute a check reads.
#[derive(Debug, Clone)]
pub(crate) enum Attr {
    Principal(StrSet),
    RequestPrincipal(Box<[RequestPrincipalPattern]>),
    Namespace(Box<[NamespacePattern]>),
    /// `(namespace, service account)` pairs.
    ServiceAccount(Box<[(Box<str>, Box<str>)]>),
    TrustDomain(StrSet),
    SourceIp(IpSet),
    RemoteIp(IpSet),
    DestIp(IpSet),
    Port(Box<[u16]>),
    Host(StrSet),
    Method(StrSet),
    Path(Box<[PathPattern]>),
    /// Lowercase header name.
    Header(Box<str>, StrSet),
    Claim(Box<[Box<str>]>, StrSet),
    Audiences(StrSet),
    Presenter(StrSet),
    Sni(StrSet),
    /// Envoy filter metadata: Palisade has none, so the attribute is always absent.
    EnvoyFilter,
}

impl Attr {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Attr::RequestPrincipal(_)
                | Attr::Host(_)
                | Attr::Method(_)
                | Attr::Path(_)
                | Attr::Header(..)
                | Attr::Claim(..)
                | Attr::Audiences(_)
                | Attr::Presenter(_)
        )
    }
}

/// One AND-ed condition: an attribute against values, or (negated) against `not*` values.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub attr: Attr,
    pub negate: bool,
    /// The field as written, e.g. `source.notPrincipals` or `when[1] request.headers[x-a] notValues`.
    pub field: Box<str>,
    /// The values as written (for explanations).
    pub values: Box<[String]>,
}

/// Checks that must all hold; `label` is `from[0]`, `to[1]` or `when`.
#[derive(Debug, Clone)]
pub(crate) struct Clause {
    pub label: Box<str>,
    pub checks: Box<[Check]>,
}

/// One compiled rule of one policy.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    /// `ns[<ns>]-policy[<name>]-rule[<i>]`.
    pub id: Box<str>,
    pub policy: u32,
    pub rule: u32,
    /// Alternatives (OR); empty means any source.
    pub from: Box<[Clause]>,
    /// Alternatives (OR); empty means any operation.
    pub to: Box<[Clause]>,
    pub when: Clause,
    /// A policy without rules: matches nothing.
    pub never: bool,
    /// TCP variant of a DENY/AUDIT/CUSTOM rule: HTTP-only constraints that were dropped.
    pub dropped: Vec<String>,
}

/// A rule set sorted by id, with its index.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleSet {
    pub rules: Vec<CompiledRule>,
    pub index: RuleIndex,
}

/// A rule left out of the TCP engine.
#[derive(Debug, Clone)]
pub(crate) struct SkippedRule {
    pub policy: u32,
    pub id: String,
    pub reason: SkipReason,
}

/// Why a rule is not applied to TCP connections.
#[derive(Debug, Clone)]
pub(crate) enum SkipReason {
    /// An ALLOW rule that uses these HTTP-only fields.
    HttpFields(Vec<String>),
    /// A CUSTOM rule whose provider is `envoyExtAuthzHttp`: Istio puts the ext_authz network
    /// filter on TCP filter chains for `envoyExtAuthzGrpc` providers only.
    HttpProvider,
}

/// The rules for one protocol.
#[derive(Debug, Clone, Default)]
pub(crate) struct Engine {
    pub custom: RuleSet,
    pub deny: RuleSet,
    pub allow: RuleSet,
    pub audit: RuleSet,
    pub dry_allow: RuleSet,
    pub dry_deny: RuleSet,
    pub skipped: Vec<SkippedRule>,
}

/// A workload's policy, compiled for evaluation. Build with [`CompiledPolicy::compile`] (or
/// [`crate::MeshSnapshot::compile_workload`]); evaluate with [`CompiledPolicy::evaluate`] and
/// [`CompiledPolicy::explain`].
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub(crate) workload: Option<String>,
    pub(crate) normalization: PathNormalization,
    pub(crate) mtls: MtlsResolution,
    pub(crate) jwt_rules: Vec<ResolvedJwtRule>,
    pub(crate) space_delimited_claims: Vec<String>,
    pub(crate) policies: Vec<PolicyInfo>,
    pub(crate) providers: Vec<String>,
    pub(crate) http: Engine,
    pub(crate) tcp: Engine,
    pub(crate) workload_ip: Option<IpAddr>,
    pub(crate) enforced_allow: usize,
    pub(crate) has_dry_run: bool,
}

/// Claims Envoy splits on spaces by default.
const DEFAULT_SPACE_DELIMITED: [&str; 2] = ["scope", "permission"];

impl CompiledPolicy {
    /// Compiles resolved policies. `workload` names the workload in explanations and its address
    /// is the default `destination.ip`.
    pub fn compile(
        resolved: &ResolvedPolicies,
        mesh: &MeshConfig,
        workload: Option<&WorkloadEntry>,
    ) -> Result<CompiledPolicy, CompileError> {
        let bundle = mesh.trust_domain_bundle();
        let mut providers: Vec<String> = Vec::new();
        let mut policies = Vec::new();
        let mut http = Engine::default();
        let mut tcp = Engine::default();
        let mut enforced_allow = 0;
        let mut has_dry_run = false;
        for applied in &resolved.authorization {
            let p = &applied.policy;
            let action = p.action();
            let provider = if action == AuthzAction::Custom {
                let name = p
                    .spec
                    .provider
                    .as_ref()
                    .map(|x| x.name.clone())
                    .unwrap_or_default();
                Some(match providers.iter().position(|x| *x == name) {
                    Some(i) => i,
                    None => {
                        providers.push(name);
                        providers.len() - 1
                    }
                })
            } else {
                None
            };
            // Istio ignores a CUSTOM policy with an HTTP provider on TCP filter chains ("ignored
            // CUSTOM action with HTTP provider on TCP filter chain"); an undefined provider stays
            // (the proxy fails closed on it).
            let http_provider = provider.is_some_and(|i| {
                mesh.extension_providers.iter().any(|e| {
                    e.name == providers[i]
                        && e.envoy_ext_authz_http.is_some()
                        && e.envoy_ext_authz_grpc.is_none()
                })
            });
            let rules = p.spec.rules.as_deref().unwrap_or_default();
            let info = PolicyInfo {
                id: format!("ns[{}]-policy[{}]", p.metadata.namespace(), p.metadata.name),
                namespace: p.metadata.namespace().to_owned(),
                name: p.metadata.name.clone(),
                action,
                dry_run: applied.dry_run,
                scope: applied.scope,
                rule_count: rules.len(),
                provider,
            };
            let pidx = policies.len() as u32;
            if action == AuthzAction::Allow && !applied.dry_run {
                enforced_allow += 1;
            }
            has_dry_run |= applied.dry_run;
            let label = info.label();
            let key = format!("{}/{}", info.namespace, info.name);
            policies.push(info);
            if rules.is_empty() {
                // Istio emits an explicit never-matching policy named rule[0].
                for engine in [&mut http, &mut tcp] {
                    set_for(engine, action, applied.dry_run)
                        .rules
                        .push(CompiledRule {
                            id: format!("{label}-rule[0]").into(),
                            policy: pidx,
                            rule: 0,
                            from: Box::new([]),
                            to: Box::new([]),
                            when: Clause {
                                label: "when".into(),
                                checks: Box::new([]),
                            },
                            never: true,
                            dropped: Vec::new(),
                        });
                }
                continue;
            }
            for (i, rule) in rules.iter().enumerate() {
                let id = format!("{label}-rule[{i}]");
                for (engine, is_http) in [(&mut http, true), (&mut tcp, false)] {
                    if !is_http && http_provider {
                        engine.skipped.push(SkippedRule {
                            policy: pidx,
                            id: id.clone(),
                            reason: SkipReason::HttpProvider,
                        });
                        continue;
                    }
                    match compile_rule(rule, &key, &p.metadata, action, is_http, &bundle)? {
                        RuleOutcome::Compiled {
                            from,
                            to,
                            when,
                            dropped,
                        } => set_for(engine, action, applied.dry_run)
                            .rules
                            .push(CompiledRule {
                                id: id.clone().into(),
                                policy: pidx,
                                rule: i as u32,
                                from,
                                to,
                                when,
                                never: false,
                                dropped,
                            }),
                        RuleOutcome::SkippedOnTcp(fields) => engine.skipped.push(SkippedRule {
                            policy: pidx,
                            id: id.clone(),
                            reason: SkipReason::HttpFields(fields),
                        }),
                    }
                }
            }
        }
        for engine in [&mut http, &mut tcp] {
            for set in [
                &mut engine.custom,
                &mut engine.deny,
                &mut engine.allow,
                &mut engine.audit,
                &mut engine.dry_allow,
                &mut engine.dry_deny,
            ] {
                finish_set(set);
            }
        }
        let mut space_delimited_claims: Vec<String> = DEFAULT_SPACE_DELIMITED
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for r in &resolved.jwt_rules {
            for c in &r.rule.space_delimited_claims {
                if !space_delimited_claims.contains(c) {
                    space_delimited_claims.push(c.clone());
                }
            }
        }
        Ok(CompiledPolicy {
            workload: workload.map(WorkloadEntry::key),
            normalization: mesh.path_normalization_mode(),
            mtls: resolved.mtls.clone(),
            jwt_rules: resolved.jwt_rules.clone(),
            space_delimited_claims,
            policies,
            providers,
            http,
            tcp,
            workload_ip: workload.and_then(|w| w.spec.address.parse().ok()),
            enforced_allow,
            has_dry_run,
        })
    }

    /// The workload this was compiled for (`namespace/name`), when known.
    pub fn workload(&self) -> Option<&str> {
        self.workload.as_deref()
    }

    /// The applicable AuthorizationPolicies.
    pub fn policies(&self) -> &[PolicyInfo] {
        &self.policies
    }

    /// The mTLS resolution (workload and port modes).
    pub fn mtls(&self) -> &MtlsResolution {
        &self.mtls
    }

    /// The combined JWT rules.
    pub fn jwt_rules(&self) -> &[ResolvedJwtRule] {
        &self.jwt_rules
    }

    /// Extension providers named by applicable CUSTOM policies.
    pub fn providers(&self) -> &[String] {
        &self.providers
    }

    /// CUSTOM policies that are never asked about TCP connections because their provider is
    /// `envoyExtAuthzHttp` (Istio installs the ext_authz network filter for `envoyExtAuthzGrpc`
    /// providers only): each such policy once, with its provider's name.
    pub fn custom_not_on_tcp(&self) -> Vec<(&PolicyInfo, &str)> {
        let mut out: Vec<(&PolicyInfo, &str)> = Vec::new();
        for s in &self.tcp.skipped {
            if !matches!(s.reason, SkipReason::HttpProvider) {
                continue;
            }
            if let Some(info) = self.policies.get(s.policy as usize)
                && let Some(name) = info.provider.and_then(|i| self.providers.get(i))
                && !out.iter().any(|(i, _)| i.id == info.id)
            {
                out.push((info, name.as_str()));
            }
        }
        out
    }

    /// The path normalization applied before path matching.
    pub fn normalization(&self) -> PathNormalization {
        self.normalization
    }

    /// Number of compiled rules (HTTP variant), for metrics and benches.
    pub fn rule_count(&self) -> usize {
        let e = &self.http;
        e.custom.rules.len()
            + e.deny.rules.len()
            + e.allow.rules.len()
            + e.audit.rules.len()
            + e.dry_allow.rules.len()
            + e.dry_deny.rules.len()
    }
}

fn set_for(engine: &mut Engine, action: AuthzAction, dry_run: bool) -> &mut RuleSet {
    match (action, dry_run) {
        (AuthzAction::Custom, _) => &mut engine.custom,
        (AuthzAction::Deny, false) => &mut engine.deny,
        (AuthzAction::Deny, true) => &mut engine.dry_deny,
        (AuthzAction::Allow, false) => &mut engine.allow,
        (AuthzAction::Allow, true) => &mut engine.dry_allow,
        (AuthzAction::Audit, _) => &mut engine.audit,
    }
}

fn finish_set(set: &mut RuleSet) {
    // Envoy keeps RBAC policies in a map ordered by name: the first match in that order is the one
    // reported, so rule numbers follow the id order.
    set.rules.sort_by(|a, b| a.id.cmp(&b.id));
    let mut index = RuleIndex::default();
    for (i, r) in set.rules.iter().enumerate() {
        index.insert(i as u32, &index_keys(r));
    }
    set.index = index;
}

enum RuleOutcome {
    Compiled {
        from: Box<[Clause]>,
        to: Box<[Clause]>,
        when: Clause,
        dropped: Vec<String>,
    },
    SkippedOnTcp(Vec<String>),
}

/// Builds checks for a rule on one protocol, applying the HTTP-only-on-TCP rule.
struct RuleBuilder<'a> {
    is_http: bool,
    action: AuthzAction,
    bundle: &'a [String],
    policy_ns: &'a str,
    dropped: Vec<String>,
    skip_fields: Vec<String>,
}

impl RuleBuilder<'_> {
    fn push(&mut self, checks: &mut Vec<Check>, location: &str, check: Check) {
        if !self.is_http && check.attr.http_only() {
            let what = format!("{location}.{}", check.field);
            if self.action == AuthzAction::Allow {
                self.skip_fields.push(what);
            } else {
                self.dropped.push(what);
            }
            return;
        }
        checks.push(check);
    }

    fn values_check(
        &mut self,
        checks: &mut Vec<Check>,
        location: &str,
        field: &str,
        values: &[String],
        attr: impl Fn(&[String]) -> Attr,
        negate: bool,
    ) {
        if values.is_empty() {
            return;
        }
        let check = Check {
            attr: attr(values),
            negate,
            field: field.into(),
            values: values.into(),
        };
        self.push(checks, location, check);
    }
}

fn compile_rule(
    rule: &Rule,
    policy_key: &str,
    meta: &ObjectMeta,
    action: AuthzAction,
    is_http: bool,
    bundle: &[String],
) -> Result<RuleOutcome, CompileError> {
    let mut b = RuleBuilder {
        is_http,
        action,
        bundle,
        policy_ns: meta.namespace(),
        dropped: Vec::new(),
        skip_fields: Vec::new(),
    };
    let mut from = Vec::new();
    for (j, f) in rule.from.iter().flatten().enumerate() {
        let loc = format!("from[{j}]");
        let Some(src) = &f.source else {
            return Err(invalid(policy_key, &format!("{loc}.source"), "must be set"));
        };
        from.push(Clause {
            checks: source_checks(src, &loc, &mut b).into(),
            label: loc.into(),
        });
    }
    let mut to = Vec::new();
    for (j, t) in rule.to.iter().flatten().enumerate() {
        let loc = format!("to[{j}]");
        let Some(op) = &t.operation else {
            return Err(invalid(
                policy_key,
                &format!("{loc}.operation"),
                "must be set",
            ));
        };
        to.push(Clause {
            checks: operation_checks(op, &loc, &mut b).into(),
            label: loc.into(),
        });
    }
    let mut when = Vec::new();
    for (j, c) in rule.when.iter().flatten().enumerate() {
        let key = parse_when_key(&c.key)
            .map_err(|e| invalid(policy_key, &format!("when[{j}].key"), &e))?;
        for (values, negate, which) in [
            (&c.values, false, "values"),
            (&c.not_values, true, "notValues"),
        ] {
            if values.is_empty() {
                continue;
            }
            let attr = when_attr(&key, values, &b);
            let check = Check {
                attr,
                negate,
                field: format!("{} {which}", c.key).into(),
                values: values.as_slice().into(),
            };
            b.push(&mut when, &format!("when[{j}]"), check);
        }
    }
    if !b.skip_fields.is_empty() {
        return Ok(RuleOutcome::SkippedOnTcp(b.skip_fields));
    }
    Ok(RuleOutcome::Compiled {
        from: from.into(),
        to: to.into(),
        when: Clause {
            label: "when".into(),
            checks: when.into(),
        },
        dropped: b.dropped,
    })
}

fn invalid(policy: &str, field: &str, reason: &str) -> CompileError {
    CompileError::Invalid {
        policy: policy.to_owned(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn source_checks(src: &Source, loc: &str, b: &mut RuleBuilder<'_>) -> Vec<Check> {
    let mut c = Vec::new();
    let bundle = b.bundle.to_vec();
    let ns = b.policy_ns.to_owned();
    let principals =
        |v: &[String]| Attr::Principal(StrSet::new(&expand_principals(v, &bundle), false));
    let sas = |v: &[String]| Attr::ServiceAccount(service_accounts(v, &ns));
    let tds =
        |v: &[String]| Attr::TrustDomain(StrSet::new(&expand_trust_domains(v, &bundle), false));
    b.values_check(
        &mut c,
        loc,
        "source.principals",
        &src.principals,
        principals,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "source.notPrincipals",
        &src.not_principals,
        principals,
        true,
    );
    let rps = |v: &[String]| {
        Attr::RequestPrincipal(
            v.iter()
                .map(|x| RequestPrincipalPattern::parse(x))
                .collect(),
        )
    };
    b.values_check(
        &mut c,
        loc,
        "source.requestPrincipals",
        &src.request_principals,
        rps,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "source.notRequestPrincipals",
        &src.not_request_principals,
        rps,
        true,
    );
    let nss = |v: &[String]| Attr::Namespace(namespaces(v));
    b.values_check(
        &mut c,
        loc,
        "source.namespaces",
        &src.namespaces,
        nss,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "source.notNamespaces",
        &src.not_namespaces,
        nss,
        true,
    );
    b.values_check(
        &mut c,
        loc,
        "source.serviceAccounts",
        &src.service_accounts,
        sas,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "source.notServiceAccounts",
        &src.not_service_accounts,
        sas,
        true,
    );
    b.values_check(
        &mut c,
        loc,
        "source.trustDomains",
        &src.trust_domains,
        tds,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "source.notTrustDomains",
        &src.not_trust_domains,
        tds,
        true,
    );
    let ips = |v: &[String]| Attr::SourceIp(IpSet::new(v));
    b.values_check(&mut c, loc, "source.ipBlocks", &src.ip_blocks, ips, false);
    b.values_check(
        &mut c,
        loc,
        "source.notIpBlocks",
        &src.not_ip_blocks,
        ips,
        true,
    );
    let rips = |v: &[String]| Attr::RemoteIp(IpSet::new(v));
    b.values_check(
        &mut c,
        loc,
        "source.remoteIpBlocks",
        &src.remote_ip_blocks,
        rips,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "source.notRemoteIpBlocks",
        &src.not_remote_ip_blocks,
        rips,
        true,
    );
    c
}

fn operation_checks(op: &Operation, loc: &str, b: &mut RuleBuilder<'_>) -> Vec<Check> {
    let mut c = Vec::new();
    let hosts = |v: &[String]| Attr::Host(StrSet::new(v, true));
    b.values_check(&mut c, loc, "operation.hosts", &op.hosts, hosts, false);
    b.values_check(
        &mut c,
        loc,
        "operation.notHosts",
        &op.not_hosts,
        hosts,
        true,
    );
    let ports = |v: &[String]| Attr::Port(v.iter().filter_map(|p| parse_port(p)).collect());
    b.values_check(&mut c, loc, "operation.ports", &op.ports, ports, false);
    b.values_check(
        &mut c,
        loc,
        "operation.notPorts",
        &op.not_ports,
        ports,
        true,
    );
    let methods = |v: &[String]| Attr::Method(StrSet::new(v, false));
    b.values_check(
        &mut c,
        loc,
        "operation.methods",
        &op.methods,
        methods,
        false,
    );
    b.values_check(
        &mut c,
        loc,
        "operation.notMethods",
        &op.not_methods,
        methods,
        true,
    );
    let paths = |v: &[String]| Attr::Path(v.iter().map(|p| PathPattern::parse(p)).collect());
    b.values_check(&mut c, loc, "operation.paths", &op.paths, paths, false);
    b.values_check(
        &mut c,
        loc,
        "operation.notPaths",
        &op.not_paths,
        paths,
        true,
    );
    c
}

fn when_attr(key: &WhenKey, values: &[String], b: &RuleBuilder<'_>) -> Attr {
    match key {
        WhenKey::RequestHeader(name) => {
            Attr::Header(name.to_ascii_lowercase().into(), StrSet::new(values, false))
        }
        WhenKey::SourceIp => Attr::SourceIp(IpSet::new(values)),
        WhenKey::RemoteIp => Attr::RemoteIp(IpSet::new(values)),
        WhenKey::SourceNamespace => Attr::Namespace(namespaces(values)),
        WhenKey::SourcePrincipal => {
            Attr::Principal(StrSet::new(&expand_principals(values, b.bundle), false))
        }
        WhenKey::SourceServiceAccount => {
            Attr::ServiceAccount(service_accounts(values, b.policy_ns))
        }
        WhenKey::SourceTrustDomain => {
            Attr::TrustDomain(StrSet::new(&expand_trust_domains(values, b.bundle), false))
        }
        WhenKey::RequestPrincipal => Attr::RequestPrincipal(
            values
                .iter()
                .map(|x| RequestPrincipalPattern::parse(x))
                .collect(),
        ),
        WhenKey::RequestAudiences => Attr::Audiences(StrSet::new(values, false)),
        WhenKey::RequestPresenter => Attr::Presenter(StrSet::new(values, false)),
        WhenKey::RequestClaim(path) => Attr::Claim(
            path.iter().map(|s| s.as_str().into()).collect(),
            StrSet::new(values, false),
        ),
        WhenKey::DestinationIp => Attr::DestIp(IpSet::new(values)),
        WhenKey::DestinationPort => {
            Attr::Port(values.iter().filter_map(|p| parse_port(p)).collect())
        }
        WhenKey::ConnectionSni => Attr::Sni(StrSet::new(values, false)),
        WhenKey::EnvoyFilter { .. } => Attr::EnvoyFilter,
    }
}

fn namespaces(values: &[String]) -> Box<[NamespacePattern]> {
    values.iter().map(|v| NamespacePattern::parse(v)).collect()
}

fn service_accounts(values: &[String], policy_ns: &str) -> Box<[(Box<str>, Box<str>)]> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((ns, sa)) => (ns.into(), sa.into()),
            None => (policy_ns.into(), v.as_str().into()),
        })
        .collect()
}

/// Istio's bidirectional glob between a trust domain and a list (either side may carry `*`).
fn td_glob_match(a: &str, list: &[String]) -> bool {
    let prefix = |a: &str, p: &str| p.strip_suffix('*').is_some_and(|p| a.starts_with(p));
    let suffix = |a: &str, p: &str| p.strip_prefix('*').is_some_and(|p| a.ends_with(p));
    list.iter()
        .any(|s| a == s || s == "*" || prefix(a, s) || prefix(s, a) || suffix(a, s) || suffix(s, a))
}

/// Principal values over the trust-domain bundle: a principal whose trust domain is in the bundle
/// (or is the literal `cluster.local`) gets one copy per bundle member.
pub fn expand_principals(values: &[String], bundle: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for v in values {
        let parts: Vec<&str> = v.split('/').collect();
        if parts.len() != 5 || parts[0] == "*" {
            out.push(v.clone());
            continue;
        }
        let td = parts[0];
        if !(td_glob_match(td, bundle) || td == crate::mesh::DEFAULT_TRUST_DOMAIN) {
            out.push(v.clone());
            continue;
        }
        let mut copies: Vec<String> = Vec::new();
        for member in bundle {
            let suffix_kept = td.strip_prefix('*').is_some_and(|s| member.ends_with(s));
            let p = if suffix_kept {
                v.clone()
            } else {
                format!("{member}/{}", parts[1..].join("/"))
            };
            if !copies.contains(&p) {
                copies.push(p);
            }
        }
        for p in copies {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Trust-domain values over the bundle: a bundle member expands to the whole bundle.
pub fn expand_trust_domains(values: &[String], bundle: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        if bundle.contains(v) {
            for m in bundle {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        } else if !out.contains(v) {
            out.push(v.clone());
        }
    }
    out
}

/// What a rule is filed under (see [`crate::index`]).
fn index_keys(rule: &CompiledRule) -> IndexKeys {
    if rule.never {
        return IndexKeys::Never;
    }
    // A key kind qualifies when every `from` alternative requires it, or `when` requires it.
    fn from_key<T>(rule: &CompiledRule, pick: impl Fn(&Check) -> Option<Vec<T>>) -> Option<Vec<T>> {
        if let Some(v) = rule.when.checks.iter().find_map(&pick) {
            return Some(v);
        }
        if rule.from.is_empty() {
            return None;
        }
        let mut all = Vec::new();
        for clause in rule.from.iter() {
            all.extend(clause.checks.iter().find_map(&pick)?);
        }
        Some(all)
    }
    fn to_key<T>(rule: &CompiledRule, pick: impl Fn(&Check) -> Option<Vec<T>>) -> Option<Vec<T>> {
        if let Some(v) = rule.when.checks.iter().find_map(&pick) {
            return Some(v);
        }
        if rule.to.is_empty() {
            return None;
        }
        let mut all = Vec::new();
        for clause in rule.to.iter() {
            all.extend(clause.checks.iter().find_map(&pick)?);
        }
        Some(all)
    }
    let exact = |set: &StrSet| {
        set.exact_values()
            .map(|v| v.into_iter().map(Box::<str>::from).collect::<Vec<_>>())
    };
    if let Some(keys) = from_key(rule, |c| match (&c.attr, c.negate) {
        (Attr::Principal(s), false) => exact(s),
        _ => None,
    }) {
        return IndexKeys::Principals(keys);
    }
    if let Some(keys) = from_key(rule, |c| match (&c.attr, c.negate) {
        (Attr::Namespace(pats), false) => pats
            .iter()
            .map(|p| p.exact().map(Box::<str>::from))
            .collect(),
        _ => None,
    }) {
        return IndexKeys::Namespaces(keys);
    }
    if let Some(keys) = to_key(rule, |c| match (&c.attr, c.negate) {
        (Attr::Path(ps), false) => ps
            .iter()
            .map(|p| match p {
                PathPattern::Str(StrPattern::Exact(e)) => Some((true, e.clone())),
                PathPattern::Str(StrPattern::Prefix(p)) if !p.is_empty() => {
                    Some((false, p.clone()))
                }
                _ => None,
            })
            .collect(),
        _ => None,
    }) {
        let (exact, prefixes): (Vec<_>, Vec<_>) = keys.into_iter().partition(|(e, _)| *e);
        return IndexKeys::Paths {
            exact: exact.into_iter().map(|(_, v)| v).collect(),
            prefixes: prefixes.into_iter().map(|(_, v)| v).collect(),
        };
    }
    if let Some(keys) = from_key(rule, |c| match (&c.attr, c.negate) {
        (Attr::SourceIp(s), false) => Some(s.nets.to_vec()),
        _ => None,
    }) {
        return IndexKeys::SourceNets(keys);
    }
    if let Some(keys) = to_key(rule, |c| match (&c.attr, c.negate) {
        (Attr::Port(p), false) => Some(p.to_vec()),
        _ => None,
    }) {
        return IndexKeys::Ports(keys);
    }
    IndexKeys::Always
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn principal_alias_expansion() {
        let bundle = s(&["td1", "cluster.local"]);
        assert_eq!(
            expand_principals(&s(&["cluster.local/ns/a/sa/b"]), &bundle),
            s(&["td1/ns/a/sa/b", "cluster.local/ns/a/sa/b"])
        );
        let bundle = s(&["new-td", "old-td", "some-trustdomain"]);
        assert_eq!(
            expand_principals(
                &s(&["*", "*/ns/foo/sa/all-td", "*-td/ns/foo/sa/prefix-td"]),
                &bundle
            ),
            s(&[
                "*",
                "*/ns/foo/sa/all-td",
                "*-td/ns/foo/sa/prefix-td",
                "some-trustdomain/ns/foo/sa/prefix-td"
            ])
        );
        let bundle = s(&["td1", "foobar"]);
        assert_eq!(
            expand_principals(&s(&["*bar/ns/foo/sa/p"]), &bundle),
            s(&["td1/ns/foo/sa/p", "*bar/ns/foo/sa/p"])
        );
        // Unknown trust domains stay as written; the literal cluster.local always expands.
        let bundle = s(&["td1"]);
        assert_eq!(
            expand_principals(&s(&["other/ns/a/sa/b"]), &bundle),
            s(&["other/ns/a/sa/b"])
        );
        assert_eq!(
            expand_principals(&s(&["cluster.local/ns/a/sa/b"]), &bundle),
            s(&["td1/ns/a/sa/b"])
        );
    }

    #[test]
    fn trust_domain_expansion() {
        let bundle = s(&["td1", "td2"]);
        assert_eq!(
            expand_trust_domains(&s(&["td2", "x"]), &bundle),
            s(&["td1", "td2", "x"])
        );
    }
}
