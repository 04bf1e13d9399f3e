//! `palisade analyze`: mistakes that load fine but do not do what their author meant. Each
//! warning has a stable code, the resource, where it was read, and a message that says what
//! happens and what to do.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::*;
use crate::error::Origin;
use crate::snapshot::MeshSnapshot;
use crate::validate::{WhenKey, parse_when_key};

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Stable identifier, e.g. `http-fields-on-tcp`.
    pub code: &'static str,
    /// `Kind ns/name`.
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.origin {
            Some(o) => write!(
                f,
                "[{}] {}: {}: {}",
                self.code, o, self.resource, self.message
            ),
            None => write!(f, "[{}] {}: {}", self.code, self.resource, self.message),
        }
    }
}

/// Istio's protocol selection by port name (see [`crate::PortProtocol`]).
fn port_is_http(name: &str) -> bool {
    crate::PortProtocol::from_port_name(name).is_http()
}

/// What the mesh's path normalization leaves to the application, for a `paths` value: the
/// mode's name, request paths the value does not match as the proxy normalizes them, the path
/// an application that normalizes further serves for them, and which applications do. `None`
/// when the mode leaves nothing to the application.
fn normalization_gap(
    mode: crate::PathNormalization,
    path: &str,
) -> Option<(&'static str, String, String, &'static str)> {
    use crate::PathNormalization as N;
    // Suffix and presence patterns do not depend on what comes before the last segment.
    if path.starts_with('*') || !path.starts_with('/') {
        return None;
    }
    let bare = path.trim_start_matches('/').trim_end_matches('*');
    let deeper = if bare.is_empty() || bare.ends_with('/') {
        format!("{bare}x")
    } else {
        bare.to_owned()
    };
    let served = format!("/{deeper}");
    let encoded = deeper.split_once('/').map(|(a, b)| format!("/{a}%2F{b}"));
    let merged = format!("//{deeper}");
    let (name, examples, who) = match mode {
        N::None => (
            "NONE",
            format!("/./{deeper} or /x/..{served}"),
            "applications that resolve dot segments, merge slashes or decode escapes",
        ),
        N::Base => (
            "BASE",
            match &encoded {
                Some(e) => format!("{merged} or {e}"),
                None => merged,
            },
            "applications that merge slashes or decode %2F",
        ),
        N::MergeSlashes => ("MERGE_SLASHES", encoded?, "applications that decode %2F"),
        N::DecodeAndMergeSlashes => return None,
    };
    Some((name, examples, served, who))
}

/// HTTP-only fields used by a rule, as `from[0].source.requestPrincipals`-style paths.
fn http_only_fields(rule: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    for (j, f) in rule.from.iter().flatten().enumerate() {
        if let Some(s) = &f.source {
            if !s.request_principals.is_empty() {
                out.push(format!("from[{j}].source.requestPrincipals"));
            }
            if !s.not_request_principals.is_empty() {
                out.push(format!("from[{j}].source.notRequestPrincipals"));
            }
        }
    }
    for (j, t) in rule.to.iter().flatten().enumerate() {
        if let Some(o) = &t.operation {
            for (name, v) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                if !v.is_empty() {
                    out.push(format!("to[{j}].operation.{name}"));
                }
            }
        }
    }
    for (j, c) in rule.when.iter().flatten().enumerate() {
        if parse_when_key(&c.key).is_ok_and(|k| k.http_only()) {
            out.push(format!("when[{j}] {}", c.key));
        }
    }
    out
}

/// The ports a rule is limited to (`to[].operation.ports` in every entry), if any.
fn rule_ports(rule: &Rule) -> Option<Vec<u16>> {
    let to = rule.to.as_ref()?;
    let mut ports = Vec::new();
    for t in to {
        let o = t.operation.as_ref()?;
        if o.ports.is_empty() {
            return None;
        }
        ports.extend(
            o.ports
                .iter()
                .filter_map(|p| crate::validate::parse_port(p)),
        );
    }
    Some(ports)
}

/// True when every constraint of the rule is HTTP-only (on TCP it matches everything).
fn only_http(rule: &Rule) -> bool {
    if http_only_fields(rule).is_empty() {
        return false;
    }
    let from_tcp = rule.from.iter().flatten().any(|f| {
        f.source.as_ref().is_some_and(|s| {
            let mut s = s.clone();
            s.request_principals.clear();
            s.not_request_principals.clear();
            !s.is_empty()
        })
    });
    let to_tcp = rule.to.iter().flatten().any(|t| {
        t.operation
            .as_ref()
            .is_some_and(|o| !o.ports.is_empty() || !o.not_ports.is_empty())
    });
    let when_tcp = rule
        .when
        .iter()
        .flatten()
        .any(|c| parse_when_key(&c.key).is_ok_and(|k| !k.http_only()));
    !(from_tcp || to_tcp || when_tcp)
}

fn principal_values(rule: &Rule) -> Vec<&String> {
    let mut v = Vec::new();
    for f in rule.from.iter().flatten() {
        if let Some(s) = &f.source {
            v.extend(s.principals.iter().chain(&s.not_principals));
        }
    }
    for c in rule.when.iter().flatten() {
        if c.key == "source.principal" {
            v.extend(c.values.iter().chain(&c.not_values));
        }
    }
    v
}

/// Checks that can never hold: `*` in the middle (read as an exact value), or a field whose
/// `not*` list holds `*` next to a positive list (needs the value present and absent at once).
fn never_matching(rule: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    let mid_star = |v: &str| {
        let inner = v.trim_start_matches('*').trim_end_matches('*');
        inner.contains('*')
    };
    for (j, f) in rule.from.iter().flatten().enumerate() {
        let Some(s) = &f.source else { continue };
        for (name, pos, neg) in [
            ("principals", &s.principals, &s.not_principals),
            ("namespaces", &s.namespaces, &s.not_namespaces),
            (
                "requestPrincipals",
                &s.request_principals,
                &s.not_request_principals,
            ),
        ] {
            for v in pos.iter().chain(neg) {
                if mid_star(v) && !v.starts_with('*') {
                    out.push(format!(
                        "from[{j}].source.{name} value {v:?} has '*' in the middle, which Istio compares literally"
                    ));
                }
            }
            if !pos.is_empty() && neg.iter().any(|v| v == "*") {
                out.push(format!(
                    "from[{j}].source: {name} is required while not{} contains \"*\"",
                    capitalize(name)
                ));
            }
        }
    }
    for (j, t) in rule.to.iter().flatten().enumerate() {
        let Some(o) = &t.operation else { continue };
        for (name, pos, neg) in [
            ("hosts", &o.hosts, &o.not_hosts),
            ("methods", &o.methods, &o.not_methods),
            ("paths", &o.paths, &o.not_paths),
        ] {
            if !pos.is_empty() && neg.iter().any(|v| v == "*") {
                out.push(format!(
                    "to[{j}].operation: {name} is required while not{} contains \"*\"",
                    capitalize(name)
                ));
            }
        }
    }
    for (j, c) in rule.when.iter().flatten().enumerate() {
        if !c.values.is_empty() && c.not_values.iter().any(|v| v == "*") {
            out.push(format!(
                "when[{j}] {}: values are required while notValues contains \"*\"",
                c.key
            ));
        }
    }
    out
}

/// The plaintext `http://` URL a rule's keys are fetched from, if they are: its `jwksUri`, or
/// the OIDC discovery document of an `http://` issuer when it names no `jwksUri`. Inline keys
/// are never fetched. The control plane warns with the same test.
pub fn plaintext_jwks_url(rule: &JwtRule) -> Option<String> {
    let is_http = |u: &str| {
        u.get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    };
    if !rule.jwks.is_empty() {
        None
    } else if !rule.jwks_uri.is_empty() {
        is_http(&rule.jwks_uri).then(|| rule.jwks_uri.clone())
    } else if is_http(&rule.issuer) {
        Some(format!(
            "{}/.well-known/openid-configuration",
            rule.issuer.trim_end_matches('/')
        ))
    } else {
        None
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// Analyzes a snapshot; an empty result means nothing to report.
pub fn analyze(snapshot: &MeshSnapshot) -> Vec<Warning> {
    let mut out = Vec::new();
    let mesh = &snapshot.mesh;
    let root = mesh.root_namespace.as_str();
    let bundle = mesh.trust_domain_bundle();

    // Webhook warnings other than the ones re-derived below.
    for w in &snapshot.warnings {
        if w.reason.contains("uses only HTTP attributes") {
            continue;
        }
        out.push(Warning {
            code: "webhook",
            resource: w.resource.clone().unwrap_or_default(),
            origin: w.document.map(|d| Origin {
                file: w.file.clone(),
                document: d,
                line: w.line.unwrap_or(1),
            }),
            message: format!("{}: {}", w.field.clone().unwrap_or_default(), w.reason),
        });
    }

    // PeerAuthentication: root-namespace selectors and several policies at one level.
    let mut mesh_level = Vec::new();
    let mut ns_level: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for p in &snapshot.peer_authentications {
        let meta = &p.resource.metadata;
        let ns = meta.namespace();
        let key = format!("{ns}/{}", meta.name);
        let empty = p
            .resource
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty());
        if ns == root && !empty {
            out.push(Warning {
                code: "root-namespace-selector",
                resource: format!("PeerAuthentication {key}"),
                origin: Some(p.origin.clone()),
                message: format!(
                    "a PeerAuthentication with a selector in the root namespace ({root}) is ignored; put it in the namespace of the workloads it selects"
                ),
            });
        } else if ns == root {
            mesh_level.push(key);
        } else if empty {
            ns_level.entry(ns).or_default().push(key);
        }
    }
    if mesh_level.len() > 1 {
        out.push(Warning {
            code: "multiple-peer-authentications",
            resource: format!("PeerAuthentication {}", mesh_level.join(", ")),
            origin: None,
            message: "several mesh-wide PeerAuthentications: only the oldest applies, the others are ignored".into(),
        });
    }
    for (ns, list) in &ns_level {
        if list.len() > 1 {
            out.push(Warning {
                code: "multiple-peer-authentications",
                resource: format!("PeerAuthentication {}", list.join(", ")),
                origin: None,
                message: format!(
                    "several namespace-wide PeerAuthentications in {ns}: only the oldest applies"
                ),
            });
        }
    }

    // RequestAuthentication: keys fetched over plaintext HTTP.
    for ra in &snapshot.request_authentications {
        let meta = &ra.resource.metadata;
        let key = format!("{}/{}", meta.namespace(), meta.name);
        for (i, rule) in ra.resource.spec.jwt_rules.iter().enumerate() {
            if let Some(url) = plaintext_jwks_url(rule) {
                out.push(Warning {
                    code: "jwks-over-plaintext",
                    resource: format!("RequestAuthentication {key}"),
                    origin: Some(ra.origin.clone()),
                    message: format!(
                        "jwtRules[{i}] (issuer {:?}) gets its signing keys over plain HTTP ({url}): anyone on the network path can swap the keys and mint tokens this workload accepts; serve the JWKS (and OIDC discovery) over https",
                        rule.issuer
                    ),
                });
            }
        }
    }

    // Per workload: several workload-level PeerAuthentications, deny-all ALLOW, HTTP fields on TCP ports.
    for w in &snapshot.workload_entries {
        let we = &w.resource;
        let key = we.key();
        let resolved = snapshot.resolve(crate::resolve::WorkloadRef {
            namespace: we.metadata.namespace(),
            labels: &we.spec.labels,
        });
        let wl_pas: Vec<String> =
            snapshot
                .peer_authentications
                .iter()
                .filter(|p| {
                    let m = &p.resource.metadata;
                    m.namespace() == we.metadata.namespace()
                        && m.namespace() != root
                        && p.resource.spec.selector.as_ref().is_some_and(|s| {
                            !s.match_labels.is_empty() && s.matches(&we.spec.labels)
                        })
                })
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.resource.metadata.namespace(),
                        p.resource.metadata.name
                    )
                })
                .collect();
        if wl_pas.len() > 1 {
            out.push(Warning {
                code: "multiple-peer-authentications",
                resource: format!("WorkloadEntry {key}"),
                origin: Some(w.origin.clone()),
                message: format!(
                    "PeerAuthentications {} all select this workload: only the oldest applies",
                    wl_pas.join(", ")
                ),
            });
        }
        let tcp_ports: Vec<String> = we
            .spec
            .ports
            .iter()
            .filter(|(name, _)| !port_is_http(name))
            .map(|(name, port)| format!("{port} ({name})"))
            .collect();
        let tcp_numbers: Vec<u16> = we
            .spec
            .ports
            .iter()
            .filter(|(name, _)| !port_is_http(name))
            .filter_map(|(_, p)| u16::try_from(*p).ok())
            .collect();
        let enforced_allow: Vec<_> = resolved
            .by_action(AuthzAction::Allow)
            .filter(|p| !p.dry_run)
            .collect();
        if !enforced_allow.is_empty()
            && enforced_allow
                .iter()
                .all(|p| p.policy.spec.rules.as_ref().is_none_or(Vec::is_empty))
        {
            out.push(Warning {
                code: "allow-nothing",
                resource: format!("WorkloadEntry {key}"),
                origin: Some(w.origin.clone()),
                message: format!(
                    "every ALLOW policy on this workload ({}) has no rules, so it denies every request",
                    enforced_allow.iter().map(|p| p.key()).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        for applied in &resolved.authorization {
            let p = &applied.policy;
            let pkey = applied.key();
            for (i, rule) in p.spec.rules.iter().flatten().enumerate() {
                let fields = http_only_fields(rule);
                // A DENY rule made only of HTTP fields gets the stronger `deny-http-only` warning.
                if fields.is_empty()
                    || tcp_numbers.is_empty()
                    || (p.action() == AuthzAction::Deny && only_http(rule))
                {
                    continue;
                }
                let limited = rule_ports(rule);
                let affected: Vec<&String> = tcp_ports
                    .iter()
                    .zip(&tcp_numbers)
                    .filter(|(_, n)| limited.as_ref().is_none_or(|l| l.contains(n)))
                    .map(|(s, _)| s)
                    .collect();
                if affected.is_empty() {
                    continue;
                }
                let effect = match p.action() {
                    AuthzAction::Allow => {
                        "on TCP traffic the whole rule is skipped (it never matches)"
                    }
                    _ => {
                        "on TCP traffic these constraints are dropped, so the rule matches more widely"
                    }
                };
                out.push(Warning {
                    code: "http-fields-on-tcp",
                    resource: format!("AuthorizationPolicy {pkey}"),
                    origin: origin_of(snapshot, p),
                    message: format!(
                        "rule[{i}] uses HTTP-only fields ({}) and applies to workload {key} ports that may carry TCP: {}; {effect}. Limit the rule with to.operation.ports or name the ports http-*",
                        fields.join(", "),
                        affected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            // Istio installs ext_authz on TCP filter chains for gRPC providers only: with an HTTP
            // provider, TCP connections are decided by DENY/ALLOW alone, which users do not expect.
            let http_provider = p.spec.provider.as_ref().and_then(|pr| {
                mesh.extension_providers.iter().find(|e| {
                    e.name == pr.name
                        && e.envoy_ext_authz_http.is_some()
                        && e.envoy_ext_authz_grpc.is_none()
                })
            });
            if p.action() == AuthzAction::Custom
                && let Some(provider) = http_provider
            {
                let rules = p.spec.rules.as_deref().unwrap_or_default();
                let affected: Vec<&String> = tcp_ports
                    .iter()
                    .zip(&tcp_numbers)
                    .filter(|(_, n)| {
                        rules
                            .iter()
                            .any(|r| rule_ports(r).is_none_or(|l| l.contains(n)))
                    })
                    .map(|(s, _)| s)
                    .collect();
                if !affected.is_empty() {
                    out.push(Warning {
                        code: "custom-http-provider-on-tcp",
                        resource: format!("AuthorizationPolicy {pkey}"),
                        origin: origin_of(snapshot, p),
                        message: format!(
                            "provider {:?} is an envoyExtAuthzHttp provider and this CUSTOM policy applies to workload {key} ports that may carry TCP: {}; as in Istio, TCP connections are never sent to an HTTP provider, so DENY/ALLOW alone decide them. Use an envoyExtAuthzGrpc provider to authorize TCP connections (one Check per connection)",
                            provider.name,
                            affected.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
            }
            let has_request_principals = p.spec.rules.iter().flatten().any(|r| {
                http_only_fields(r)
                    .iter()
                    .any(|f| f.contains("equestPrincipals") || f.contains("request.auth"))
            });
            if has_request_principals
                && resolved.jwt_rules.is_empty()
                && p.action() != AuthzAction::Custom
            {
                out.push(Warning {
                    code: "never-matches",
                    resource: format!("AuthorizationPolicy {pkey}"),
                    origin: origin_of(snapshot, p),
                    message: format!(
                        "uses request principals or JWT claims, but no RequestAuthentication applies to workload {key}: tokens are ignored there, so those conditions never hold"
                    ),
                });
            }
        }
    }

    // Per policy checks.
    for sp in &snapshot.authorization_policies {
        let p = &sp.resource;
        let key = format!("{}/{}", p.metadata.namespace(), p.metadata.name);
        let resource = format!("AuthorizationPolicy {key}");
        let warn = |code: &'static str, message: String| Warning {
            code,
            resource: resource.clone(),
            origin: Some(sp.origin.clone()),
            message,
        };
        if p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty() {
            out.push(warn(
                "target-ref-ignored",
                "targetRef policies apply to waypoints and gateways; Palisade sidecars ignore this policy".into(),
            ));
        }
        let rules = p.spec.rules.as_deref().unwrap_or_default();
        if p.action() == AuthzAction::Allow && rules.is_empty() && !p.is_dry_run() {
            out.push(warn(
                "allow-nothing",
                "ALLOW policy without rules: it matches nothing, so every workload it applies to denies all requests not allowed by another ALLOW policy".into(),
            ));
        }
        // A DENY on paths (or an ALLOW that excepts paths) protects only as far as the proxy's
        // normalization reaches: what it leaves alone, the application may still resolve.
        let mode = mesh.path_normalization_mode();
        let (field, guards): (&str, fn(&Operation) -> &[String]) = match p.action() {
            AuthzAction::Deny => ("paths", |o| &o.paths),
            AuthzAction::Allow => ("notPaths", |o| &o.not_paths),
            _ => ("", |_| &[]),
        };
        for (i, rule) in rules.iter().enumerate() {
            let gap = rule
                .to
                .iter()
                .flatten()
                .filter_map(|t| t.operation.as_ref())
                .flat_map(guards)
                .find_map(|path| Some((path, normalization_gap(mode, path)?)));
            if let Some((path, (name, examples, served, who))) = gap {
                out.push(warn(
                    "path-normalization",
                    format!(
                        "rule[{i}] protects {field} {path:?} with pathNormalization {name}: a request for {examples} is not matched, yet {who} serve it as {served}; set meshConfig pathNormalization.normalization to DECODE_AND_MERGE_SLASHES, or make sure every application normalizes no further than the mesh"
                    ),
                ));
            }
        }
        for (i, rule) in rules.iter().enumerate() {
            if p.action() == AuthzAction::Deny && only_http(rule) {
                out.push(warn(
                    "deny-http-only",
                    format!(
                        "rule[{i}] of this DENY policy uses only HTTP fields ({}): on TCP connections they are dropped and the rule denies every connection; add to.operation.ports",
                        http_only_fields(rule).join(", ")
                    ),
                ));
            }
            for v in principal_values(rule) {
                let parts: Vec<&str> = v.split('/').collect();
                if parts.len() == 5 && !parts[0].contains('*') {
                    let td = parts[0];
                    if !bundle.iter().any(|b| b == td) && td != crate::mesh::DEFAULT_TRUST_DOMAIN {
                        out.push(warn(
                            "unknown-trust-domain",
                            format!(
                                "rule[{i}] principal {v:?} is in trust domain {td:?}, which is neither the mesh trust domain nor an alias ({}): it only matches peers of another trust domain",
                                bundle.join(", ")
                            ),
                        ));
                    }
                }
            }
            for n in never_matching(rule) {
                out.push(warn(
                    "never-matches",
                    format!("rule[{i}] can never match: {n}"),
                ));
            }
            for (j, c) in rule.when.iter().flatten().enumerate() {
                if matches!(parse_when_key(&c.key), Ok(WhenKey::EnvoyFilter { .. })) {
                    out.push(warn(
                        "never-matches",
                        format!("rule[{i}] when[{j}] {}: Envoy filter metadata does not exist in Palisade's proxy; values never match (notValues always do)", c.key),
                    ));
                }
            }
        }
        // A selector that selects nothing (only meaningful when the directory has workloads).
        if let Some(sel) = &p.spec.selector
            && !sel.match_labels.is_empty()
            && !snapshot.workload_entries.is_empty()
        {
            let ns = p.metadata.namespace();
            let any = snapshot.workload_entries.iter().any(|w| {
                (ns == root || w.resource.metadata.namespace() == ns)
                    && sel.matches(&w.resource.spec.labels)
            });
            if !any {
                out.push(warn(
                    "selects-nothing",
                    "the selector matches no WorkloadEntry in the mesh directory".into(),
                ));
            }
        }
    }
    out
}

fn origin_of(snapshot: &MeshSnapshot, p: &AuthorizationPolicy) -> Option<Origin> {
    snapshot
        .authorization_policies
        .iter()
        .find(|s| {
            s.resource.metadata.name == p.metadata.name
                && s.resource.metadata.namespace() == p.metadata.namespace()
        })
        .map(|s| s.origin.clone())
}
