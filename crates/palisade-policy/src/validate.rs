//! Validation of the API types: Istio's admission-webhook rules (facts sheet sections 1-4), each
//! problem reported with the field path it concerns. Pure functions over parsed resources; the
//! loader adds the file, document and resource name.

use std::net::IpAddr;

use crate::api::*;
use crate::mesh::MeshConfig;

/// Whether a finding stops the load or is only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One validation finding: where (a field path such as `spec.rules[0].from[0].source`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldIssue {
    pub severity: Severity,
    pub path: String,
    pub reason: String,
}

/// Collects findings while walking a resource.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub issues: Vec<FieldIssue>,
}

impl Findings {
    fn error(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.issues.push(FieldIssue {
            severity: Severity::Error,
            path: path.into(),
            reason: reason.into(),
        });
    }
    fn warn(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.issues.push(FieldIssue {
            severity: Severity::Warning,
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// Maximum number of rules in one AuthorizationPolicy.
pub const MAX_AUTHZ_RULES: usize = 512;
/// Maximum number of JWT rules in one RequestAuthentication.
pub const MAX_JWT_RULES: usize = 4096;
/// Maximum length of a `jwksUri`.
pub const MAX_JWKS_URI_LEN: usize = 2048;
/// Maximum number of `serviceAccounts` values (Istio's bound on config size).
pub const MAX_SERVICE_ACCOUNTS: usize = 16;

/// Validates object metadata shared by every kind.
fn validate_metadata(meta: &ObjectMeta, f: &mut Findings) {
    if meta.name.is_empty() {
        f.error("metadata.name", "must be set");
    } else if let Err(e) = check_dns_subdomain(&meta.name) {
        f.error("metadata.name", e);
    }
    if let Some(ns) = &meta.namespace
        && let Err(e) = check_dns_label(ns)
    {
        f.error("metadata.namespace", e);
    }
    for (k, v) in &meta.labels {
        if let Err(e) = check_label(k, v) {
            f.error(format!("metadata.labels[{k}]"), e);
        }
    }
    if let Some(ts) = &meta.creation_timestamp
        && parse_timestamp(ts).is_none()
    {
        f.error(
            "metadata.creationTimestamp",
            format!("{ts:?} is not an RFC 3339 timestamp (e.g. 2024-01-02T03:04:05Z)"),
        );
    }
}

/// Parses an RFC 3339 timestamp into Unix nanoseconds (for ordering).
pub fn parse_timestamp(ts: &str) -> Option<i128> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("{s:?} must be 1-63 characters"));
    }
    check_dns_chars(s)
}

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    check_dns_chars(s)
}

fn check_dns_chars(s: &str) -> Result<(), String> {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok_chars && ends_ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"
        ))
    }
}

fn check_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty label key".into());
    }
    let valid = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    };
    if !valid(key) || key.len() > 317 {
        return Err(format!("invalid label key {key:?}"));
    }
    if value.len() > 63
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!("invalid label value {value:?}"));
    }
    Ok(())
}

fn validate_selector(sel: &Option<WorkloadSelector>, path: &str, f: &mut Findings) {
    let Some(sel) = sel else { return };
    for (k, v) in &sel.match_labels {
        let p = format!("{path}.matchLabels[{k}]");
        if k.is_empty() {
            f.error(
                &p,
                format!("empty key is not supported in selector: \"{k}={v}\""),
            );
        }
        if k.contains('*') || v.contains('*') {
            f.error(
                &p,
                format!("wildcard is not supported in selector: \"{k}={v}\""),
            );
        }
    }
    if sel.match_labels.is_empty() {
        f.warn(
            format!("{path}.matchLabels"),
            "workload selector specified without labels: the policy applies to the whole namespace",
        );
    }
}

fn validate_target_ref(r: &PolicyTargetReference, path: &str, f: &mut Findings) {
    if r.name.is_empty() {
        f.error(format!("{path}.name"), "targetRef name must be set");
    }
    if r.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
        f.error(
            format!("{path}.namespace"),
            "must not be set: cross-namespace references are not supported",
        );
    }
    let group = if r.group.is_empty() {
        "core"
    } else {
        r.group.as_str()
    };
    let allowed = matches!(
        (group, r.kind.as_str()),
        ("core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway")
            | ("gateway.networking.k8s.io", "GatewayClass")
    );
    if !allowed {
        f.error(
            format!("{path}.kind"),
            format!(
                "targetRef must be a Service, networking.istio.io ServiceEntry, or gateway.networking.k8s.io Gateway/GatewayClass, not {}/{}",
                r.group, r.kind
            ),
        );
    }
}

fn validate_one_of_target(
    selector: &Option<WorkloadSelector>,
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    f: &mut Findings,
) {
    let set = usize::from(selector.is_some())
        + usize::from(target_ref.is_some())
        + usize::from(!target_refs.is_empty());
    if set > 1 {
        f.error(
            "spec",
            "only one of selector, targetRef or targetRefs may be set",
        );
    }
    validate_selector(selector, "spec.selector", f);
    if let Some(r) = target_ref {
        validate_target_ref(r, "spec.targetRef", f);
    }
    for (i, r) in target_refs.iter().enumerate() {
        validate_target_ref(r, &format!("spec.targetRefs[{i}]"), f);
    }
}

fn validate_dry_run(meta: &ObjectMeta, action: Option<AuthzAction>, f: &mut Findings) {
    let Some(v) = meta.annotations.get(DRY_RUN_ANNOTATION) else {
        return;
    };
    let path = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
    match action {
        None => f.error(path, "only AuthorizationPolicy supports this annotation"),
        Some(AuthzAction::Allow | AuthzAction::Deny) => {
            if parse_go_bool(v).is_none() {
                f.error(path, format!("invalid value {v:?}: expected true or false"));
            }
        }
        Some(a) => f.error(
            path,
            format!("dry-run is only supported for ALLOW and DENY policies, not {a}"),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// AuthorizationPolicy
// ---------------------------------------------------------------------------------------------

pub(crate) fn validate_authorization_policy(
    p: &AuthorizationPolicy,
    mesh: &MeshConfig,
    f: &mut Findings,
) {
    validate_metadata(&p.metadata, f);
    let spec = &p.spec;
    let action = p.action();
    validate_dry_run(&p.metadata, Some(action), f);
    validate_one_of_target(&spec.selector, &spec.target_ref, &spec.target_refs, f);

    let no_rules = spec.rules.as_ref().is_none_or(|r| r.is_empty());
    match action {
        AuthzAction::Custom => {
            if no_rules {
                f.error(
                    "spec.rules",
                    "CUSTOM action without rules is meaningless as it never triggers; add an empty rule `{}` to trigger it for every request",
                );
            }
            match &spec.provider {
                Some(pr) if !pr.name.is_empty() => {
                    if !mesh.extension_providers.iter().any(|e| e.name == pr.name) {
                        f.error(
                            "spec.provider.name",
                            format!(
                                "extension provider {:?} is not defined in mesh.yaml extensionProviders",
                                pr.name
                            ),
                        );
                    }
                }
                _ => f.error(
                    "spec.provider.name",
                    "must not be empty for a CUSTOM policy",
                ),
            }
        }
        AuthzAction::Deny => {
            if no_rules {
                f.error(
                    "spec.rules",
                    "DENY action without rules is meaningless as it never triggers; add an empty rule `{}` to deny every request",
                );
            }
        }
        AuthzAction::Allow | AuthzAction::Audit => {}
    }
    if spec.provider.is_some() && action != AuthzAction::Custom {
        f.error(
            "spec.provider",
            format!("provider must not be set with a non-CUSTOM action ({action})"),
        );
    }
    let rules = spec.rules.as_deref().unwrap_or_default();
    if rules.len() > MAX_AUTHZ_RULES {
        f.error(
            "spec.rules",
            format!(
                "{} rules; at most {MAX_AUTHZ_RULES} are allowed",
                rules.len()
            ),
        );
    }
    for (i, rule) in rules.iter().enumerate() {
        validate_rule(rule, i, action, f);
    }
}

fn validate_rule(rule: &Rule, i: usize, action: AuthzAction, f: &mut Findings) {
    let rp = format!("spec.rules[{i}]");
    let mut from_exists = false;
    let mut to_exists = false;
    let mut tcp_in_from = false;
    let mut tcp_in_to = false;
    if let Some(from) = &rule.from {
        if from.is_empty() {
            f.error(
                format!("{rp}.from"),
                "must not be empty (omit it to match any source)",
            );
        }
        for (j, entry) in from.iter().enumerate() {
            let sp = format!("{rp}.from[{j}].source");
            let Some(src) = &entry.source else {
                f.error(sp, "must be set");
                continue;
            };
            from_exists = true;
            validate_source(src, &sp, action, f);
            if !(src.principals.is_empty()
                && src.not_principals.is_empty()
                && src.namespaces.is_empty()
                && src.not_namespaces.is_empty()
                && src.ip_blocks.is_empty()
                && src.not_ip_blocks.is_empty()
                && src.remote_ip_blocks.is_empty()
                && src.not_remote_ip_blocks.is_empty()
                && src.service_accounts.is_empty()
                && src.not_service_accounts.is_empty()
                && src.trust_domains.is_empty()
                && src.not_trust_domains.is_empty())
            {
                tcp_in_from = true;
            }
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            f.error(
                format!("{rp}.to"),
                "must not be empty (omit it to match any operation)",
            );
        }
        for (j, entry) in to.iter().enumerate() {
            let op_path = format!("{rp}.to[{j}].operation");
            let Some(op) = &entry.operation else {
                f.error(op_path, "must be set");
                continue;
            };
            to_exists = true;
            validate_operation(op, &op_path, f);
            if !op.ports.is_empty() || !op.not_ports.is_empty() {
                tcp_in_to = true;
            }
        }
    }
    for (j, cond) in rule.when.iter().flatten().enumerate() {
        validate_condition(cond, &format!("{rp}.when[{j}]"), action, f);
    }
    if action == AuthzAction::Deny
        && ((from_exists && !to_exists && !tcp_in_from) || (to_exists && !tcp_in_to))
    {
        f.warn(
            rp,
            "this DENY rule uses only HTTP attributes, so it denies all traffic to TCP ports of the workloads it applies to; name the ports explicitly",
        );
    }
}

fn check_values(values: &[String], path: &str, f: &mut Findings) {
    for (k, v) in values.iter().enumerate() {
        if v.is_empty() {
            f.error(format!("{path}[{k}]"), "empty value not allowed");
        }
    }
}

fn check_ips(values: &[String], path: &str, f: &mut Findings) {
    for (k, v) in values.iter().enumerate() {
        if v.is_empty() {
            f.error(format!("{path}[{k}]"), "empty value not allowed");
        } else if let Err(e) = parse_ip_or_cidr(v) {
            f.error(format!("{path}[{k}]"), e);
        }
    }
}

/// Parses `1.2.3.4` or `1.2.3.0/24` (host bits are masked, as Envoy does).
pub fn parse_ip_or_cidr(v: &str) -> Result<ipnet::IpNet, String> {
    if v.contains('/') {
        v.parse::<ipnet::IpNet>()
            .map(|n| n.trunc())
            .map_err(|e| format!("bad CIDR range {v:?}: {e}"))
    } else {
        v.parse::<IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| format!("bad IP address {v:?}"))
    }
}

fn check_ports(values: &[String], path: &str, f: &mut Findings) {
    for (k, v) in values.iter().enumerate() {
        if v.is_empty() {
            f.error(format!("{path}[{k}]"), "empty value not allowed");
        } else if parse_port(v).is_none() {
            f.error(
                format!("{path}[{k}]"),
                format!("bad port {v:?}: expected 0-65535"),
            );
        }
    }
}

/// Parses a decimal port number 0-65535.
pub fn parse_port(v: &str) -> Option<u16> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u16>().ok()
}

fn check_wildcards(values: &[String], path: &str, f: &mut Findings) {
    for (k, v) in values.iter().enumerate() {
        let p = format!("{path}[{k}]");
        if v.is_empty() {
            f.error(p, "empty value not allowed");
            continue;
        }
        let count = v.matches('*').count();
        if count > 1 {
            f.error(p, format!("at most one wildcard is allowed: {v:?}"));
        } else if count == 1 && v != "*" && !v.starts_with('*') && !v.ends_with('*') {
            f.error(
                p,
                format!("wildcard is only allowed at the start or end: {v:?}"),
            );
        }
    }
}

fn check_trust_domains(values: &[String], path: &str, f: &mut Findings) {
    check_wildcards(values, path, f);
    for (k, v) in values.iter().enumerate() {
        if v.contains('/') {
            f.error(
                format!("{path}[{k}]"),
                format!("trust domain must not contain '/': {v:?}"),
            );
        }
    }
}

fn check_service_accounts(values: &[String], path: &str, f: &mut Findings) {
    if values.len() > MAX_SERVICE_ACCOUNTS {
        f.error(
            path,
            format!("may not have more than {MAX_SERVICE_ACCOUNTS} values"),
        );
    }
    for (k, v) in values.iter().enumerate() {
        let p = format!("{path}[{k}]");
        if v.is_empty() {
            f.error(p, "empty value not allowed");
        } else if v.contains('*') {
            f.error(p, format!("wildcard not allowed: {v:?}"));
        } else if v.len() > 320 {
            f.error(p, "value cannot exceed 320 characters");
        } else {
            match v.split_once('/') {
                None => {}
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {}
                Some(_) => f.error(
                    p,
                    format!("expected 'serviceAccount' or 'namespace/serviceAccount', found {v:?}"),
                ),
            }
        }
    }
}

fn validate_source(src: &Source, sp: &str, action: AuthzAction, f: &mut Findings) {
    if src.is_empty() {
        f.error(sp, "must not be empty (omit `from` to match any source)");
    }
    if (!src.principals.is_empty()
        || !src.not_principals.is_empty()
        || !src.namespaces.is_empty()
        || !src.not_namespaces.is_empty())
        && (!src.service_accounts.is_empty() || !src.not_service_accounts.is_empty())
    {
        f.error(
            sp,
            "cannot set serviceAccounts together with namespaces or principals",
        );
    }
    check_values(&src.principals, &format!("{sp}.principals"), f);
    check_values(&src.not_principals, &format!("{sp}.notPrincipals"), f);
    check_values(
        &src.request_principals,
        &format!("{sp}.requestPrincipals"),
        f,
    );
    check_values(
        &src.not_request_principals,
        &format!("{sp}.notRequestPrincipals"),
        f,
    );
    check_values(&src.namespaces, &format!("{sp}.namespaces"), f);
    check_values(&src.not_namespaces, &format!("{sp}.notNamespaces"), f);
    check_ips(&src.ip_blocks, &format!("{sp}.ipBlocks"), f);
    check_ips(&src.not_ip_blocks, &format!("{sp}.notIpBlocks"), f);
    check_ips(&src.remote_ip_blocks, &format!("{sp}.remoteIpBlocks"), f);
    check_ips(
        &src.not_remote_ip_blocks,
        &format!("{sp}.notRemoteIpBlocks"),
        f,
    );
    check_service_accounts(&src.service_accounts, &format!("{sp}.serviceAccounts"), f);
    check_service_accounts(
        &src.not_service_accounts,
        &format!("{sp}.notServiceAccounts"),
        f,
    );
    check_trust_domains(&src.trust_domains, &format!("{sp}.trustDomains"), f);
    check_trust_domains(&src.not_trust_domains, &format!("{sp}.notTrustDomains"), f);
    if action == AuthzAction::Custom {
        let unsupported: [(&str, bool); 10] = [
            ("namespaces", !src.namespaces.is_empty()),
            ("notNamespaces", !src.not_namespaces.is_empty()),
            ("serviceAccounts", !src.service_accounts.is_empty()),
            ("notServiceAccounts", !src.not_service_accounts.is_empty()),
            ("trustDomains", !src.trust_domains.is_empty()),
            ("notTrustDomains", !src.not_trust_domains.is_empty()),
            ("principals", !src.principals.is_empty()),
            ("notPrincipals", !src.not_principals.is_empty()),
            ("requestPrincipals", !src.request_principals.is_empty()),
            (
                "notRequestPrincipals",
                !src.not_request_principals.is_empty(),
            ),
        ];
        for (name, set) in unsupported {
            if set {
                f.error(
                    format!("{sp}.{name}"),
                    "not supported with the CUSTOM action (the external authorizer runs before authentication)",
                );
            }
        }
    }
}

fn validate_operation(op: &Operation, path: &str, f: &mut Findings) {
    if op.is_empty() {
        f.error(path, "must not be empty (omit `to` to match any operation)");
    }
    check_values(&op.hosts, &format!("{path}.hosts"), f);
    check_values(&op.not_hosts, &format!("{path}.notHosts"), f);
    check_values(&op.methods, &format!("{path}.methods"), f);
    check_values(&op.not_methods, &format!("{path}.notMethods"), f);
    check_ports(&op.ports, &format!("{path}.ports"), f);
    check_ports(&op.not_ports, &format!("{path}.notPorts"), f);
    for (name, list) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
        for (k, v) in list.iter().enumerate() {
            let p = format!("{path}.{name}[{k}]");
            if v.is_empty() {
                f.error(p, "empty value not allowed");
            } else if let Err(e) = check_path_template(v) {
                f.error(p, e);
            }
        }
    }
}

/// Path template rules: `{*}` and `{**}` as whole segments, nothing after `{**}` but literals,
/// no other braces, literals limited to RFC 3986 pchars.
pub fn check_path_template(path: &str) -> Result<(), String> {
    let is_template = path.contains("{*}") || path.contains("{**}");
    let mut seen_any = false;
    for glob in path.trim_matches('/').split('/') {
        match glob {
            "{*}" | "{**}" if seen_any => {
                return Err(format!(
                    "invalid path template {path:?}: {{**}} must be the last operator"
                ));
            }
            "{*}" => continue,
            "{**}" => {
                seen_any = true;
                continue;
            }
            _ => {}
        }
        if glob.contains(['{', '}']) {
            return Err(format!(
                "invalid path template {path:?}: '{{' or '}}' outside a {{*}} or {{**}} segment"
            ));
        }
        if is_template && !glob.bytes().all(is_pchar_byte) {
            return Err(format!(
                "invalid path template {path:?}: segment {glob:?} has characters outside RFC 3986 pchar"
            ));
        }
    }
    Ok(())
}

/// RFC 3986 pchar (with `%` for escapes), as Envoy's URI templates accept.
pub(crate) fn is_pchar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'+'
                | b','
                | b';'
                | b':'
                | b'@'
                | b'='
        )
}

/// The `when` keys Palisade understands, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WhenKey {
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    SourceTrustDomain,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// Claim path, `request.auth.claims[a][b]` is `["a", "b"]`.
    RequestClaim(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
    /// `experimental.envoy.filters.<filter>[<key>]`: Envoy filter metadata.
    EnvoyFilter {
        filter: String,
        key: String,
    },
}

impl WhenKey {
    /// True for attributes that only exist on HTTP requests.
    pub fn http_only(&self) -> bool {
        matches!(
            self,
            WhenKey::RequestHeader(_)
                | WhenKey::RequestPrincipal
                | WhenKey::RequestAudiences
                | WhenKey::RequestPresenter
                | WhenKey::RequestClaim(_)
        )
    }
}

/// Parses a `when` key, with Istio's error messages for retired or unknown attributes.
pub fn parse_when_key(key: &str) -> Result<WhenKey, String> {
    let bracket = |prefix: &str| -> Result<String, String> {
        let rest = &key[prefix.len()..];
        match rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            Some(inner) if !inner.is_empty() && !inner.contains(['[', ']']) => Ok(inner.to_owned()),
            _ => Err(format!(
                "bad key {key:?}: should have the form {prefix}[name]"
            )),
        }
    };
    Ok(match key {
        "source.ip" => WhenKey::SourceIp,
        "remote.ip" => WhenKey::RemoteIp,
        "source.namespace" => WhenKey::SourceNamespace,
        "source.principal" => WhenKey::SourcePrincipal,
        "source.serviceAccount" => WhenKey::SourceServiceAccount,
        "source.trustDomain" => WhenKey::SourceTrustDomain,
        "request.auth.principal" => WhenKey::RequestPrincipal,
        "request.auth.audiences" => WhenKey::RequestAudiences,
        "request.auth.presenter" => WhenKey::RequestPresenter,
        "destination.ip" => WhenKey::DestinationIp,
        "destination.port" => WhenKey::DestinationPort,
        "connection.sni" => WhenKey::ConnectionSni,
        "destination.namespace" => {
            return Err(format!(
                "attribute {key} is replaced by the metadata.namespace"
            ));
        }
        "destination.name" | "destination.user" => {
            return Err(format!(
                "deprecated attribute {key}: only supported in v1alpha1"
            ));
        }
        k if k.starts_with("request.headers") => {
            WhenKey::RequestHeader(bracket("request.headers")?)
        }
        k if k.starts_with("request.auth.claims") => {
            let rest = &k["request.auth.claims".len()..];
            let mut claims = Vec::new();
            let mut r = rest;
            while !r.is_empty() {
                let Some(inner) = r.strip_prefix('[') else {
                    return Err(format!(
                        "bad key {key:?}: should have the form request.auth.claims[a][b]"
                    ));
                };
                let Some(end) = inner.find(']') else {
                    return Err(format!("bad key {key:?}: unclosed '['"));
                };
                let name = &inner[..end];
                if name.is_empty() || name.contains('[') {
                    return Err(format!("bad key {key:?}: empty or malformed claim name"));
                }
                claims.push(name.to_owned());
                r = &inner[end + 1..];
            }
            if claims.is_empty() {
                return Err(format!(
                    "bad key {key:?}: should have the form request.auth.claims[name]"
                ));
            }
            WhenKey::RequestClaim(claims)
        }
        k if k.starts_with("destination.labels") => {
            return Err(format!(
                "attribute {key} is replaced by the workload selector"
            ));
        }
        k if k.starts_with("experimental.envoy.filters.") => {
            let body = &k["experimental.".len()..];
            match body.split_once('[') {
                Some((filter, rest)) if filter.len() > "envoy.filters.".len() => {
                    match rest.strip_suffix(']') {
                        Some(inner) if !inner.is_empty() => WhenKey::EnvoyFilter {
                            filter: filter.to_owned(),
                            key: inner.to_owned(),
                        },
                        _ => return Err(format!("bad key {key:?}: should have the form a[b]")),
                    }
                }
                _ => return Err(format!("bad key {key:?}: should have the form a[b]")),
            }
        }
        _ => return Err(format!("unknown attribute {key:?}")),
    })
}

fn validate_condition(cond: &Condition, path: &str, action: AuthzAction, f: &mut Findings) {
    if cond.key.is_empty() {
        f.error(format!("{path}.key"), "must not be empty");
        return;
    }
    if cond.values.is_empty() && cond.not_values.is_empty() {
        f.error(
            path,
            format!(
                "at least one of values or notValues must be set for key {}",
                cond.key
            ),
        );
        return;
    }
    let key = match parse_when_key(&cond.key) {
        Ok(k) => k,
        Err(e) => {
            f.error(format!("{path}.key"), e);
            return;
        }
    };
    for (name, list) in [("values", &cond.values), ("notValues", &cond.not_values)] {
        let p = format!("{path}.{name}");
        match key {
            WhenKey::SourceIp | WhenKey::RemoteIp | WhenKey::DestinationIp => {
                check_ips(list, &p, f)
            }
            WhenKey::DestinationPort => check_ports(list, &p, f),
            WhenKey::SourceServiceAccount => check_service_accounts(list, &p, f),
            WhenKey::SourceTrustDomain => check_trust_domains(list, &p, f),
            _ => check_values(list, &p, f),
        }
    }
    if action == AuthzAction::Custom
        && matches!(
            key,
            WhenKey::SourceNamespace
                | WhenKey::SourceServiceAccount
                | WhenKey::SourceTrustDomain
                | WhenKey::SourcePrincipal
                | WhenKey::RequestPrincipal
                | WhenKey::RequestAudiences
                | WhenKey::RequestPresenter
                | WhenKey::RequestClaim(_)
        )
    {
        f.error(
            format!("{path}.key"),
            format!("{} is not supported with the CUSTOM action", cond.key),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication, RequestAuthentication
// ---------------------------------------------------------------------------------------------

pub(crate) fn validate_peer_authentication(p: &PeerAuthentication, f: &mut Findings) {
    validate_metadata(&p.metadata, f);
    validate_dry_run(&p.metadata, None, f);
    let spec = &p.spec;
    let empty_selector = spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if let Some(ports) = &spec.port_level_mtls {
        if empty_selector && !ports.is_empty() {
            f.error(
                "spec.portLevelMtls",
                "mesh- and namespace-wide PeerAuthentications cannot have port-level mTLS: add a selector",
            );
        }
        if ports.is_empty() {
            f.error("spec.portLevelMtls", "if set, must have at least one port");
        }
        for port in ports.keys() {
            match port.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) && port.bytes().all(|b| b.is_ascii_digit()) => {}
                _ => f.error(
                    format!("spec.portLevelMtls[{port}]"),
                    "port must be a number in 1..65535",
                ),
            }
        }
    }
    validate_selector(&spec.selector, "spec.selector", f);
}

pub(crate) fn validate_request_authentication(p: &RequestAuthentication, f: &mut Findings) {
    validate_metadata(&p.metadata, f);
    validate_dry_run(&p.metadata, None, f);
    let spec = &p.spec;
    validate_one_of_target(&spec.selector, &spec.target_ref, &spec.target_refs, f);
    if spec.jwt_rules.len() > MAX_JWT_RULES {
        f.error(
            "spec.jwtRules",
            format!(
                "{} rules; at most {MAX_JWT_RULES} are allowed",
                spec.jwt_rules.len()
            ),
        );
    }
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        validate_jwt_rule(rule, &format!("spec.jwtRules[{i}]"), f);
    }
}

fn validate_jwt_rule(rule: &JwtRule, path: &str, f: &mut Findings) {
    for (k, a) in rule.audiences.iter().enumerate() {
        if a.is_empty() {
            f.error(
                format!("{path}.audiences[{k}]"),
                "audience must be a non-empty string",
            );
        }
    }
    if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
        f.error(format!("{path}.issuer"), "issuer or jwksUri must be set");
    }
    if !rule.jwks_uri.is_empty() {
        let p = format!("{path}.jwksUri");
        if rule.jwks_uri.len() > MAX_JWKS_URI_LEN {
            f.error(&p, format!("longer than {MAX_JWKS_URI_LEN} characters"));
        }
        if let Err(e) = check_http_uri(&rule.jwks_uri) {
            f.error(&p, e);
        }
    }
    if !rule.jwks.is_empty() {
        if !rule.jwks_uri.is_empty() {
            f.error(
                format!("{path}.jwks"),
                "only one of jwks and jwksUri may be set",
            );
        }
        match serde_json::from_str::<serde_json::Value>(&rule.jwks) {
            Ok(v) if v.get("keys").is_some_and(|k| k.is_array()) => {}
            Ok(_) => f.error(
                format!("{path}.jwks"),
                "jwks must be a JSON object with a \"keys\" array",
            ),
            Err(e) => f.error(format!("{path}.jwks"), format!("jwks parse error: {e}")),
        }
    }
    for (k, h) in rule.from_headers.iter().enumerate() {
        if h.name.is_empty() {
            f.error(
                format!("{path}.fromHeaders[{k}].name"),
                "header name must be a non-empty string",
            );
        } else if !is_token(&h.name) {
            f.error(
                format!("{path}.fromHeaders[{k}].name"),
                format!("{:?} is not a valid header name", h.name),
            );
        }
    }
    for (k, q) in rule.from_params.iter().enumerate() {
        if q.is_empty() {
            f.error(
                format!("{path}.fromParams[{k}]"),
                "query parameter name must be a non-empty string",
            );
        }
    }
    for (k, c) in rule.from_cookies.iter().enumerate() {
        if c.is_empty() {
            f.error(
                format!("{path}.fromCookies[{k}]"),
                "cookie name must be a non-empty string",
            );
        }
    }
    for (k, o) in rule.output_claim_to_headers.iter().enumerate() {
        let p = format!("{path}.outputClaimToHeaders[{k}]");
        if o.header.is_empty() || o.claim.is_empty() {
            f.error(p, "header and claim must be non-empty strings");
        } else if !is_token(&o.header) {
            f.error(
                format!("{p}.header"),
                format!("{:?} is not a valid header name", o.header),
            );
        }
    }
    if !rule.output_payload_to_header.is_empty() && !is_token(&rule.output_payload_to_header) {
        f.error(
            format!("{path}.outputPayloadToHeader"),
            format!(
                "{:?} is not a valid header name",
                rule.output_payload_to_header
            ),
        );
    }
    if let Some(t) = &rule.timeout
        && let Err(e) = parse_duration(t)
    {
        f.error(format!("{path}.timeout"), e);
    }
    for (k, c) in rule.space_delimited_claims.iter().enumerate() {
        if c.is_empty() {
            f.error(
                format!("{path}.spaceDelimitedClaims[{k}]"),
                "claim name must be a non-empty string",
            );
        }
    }
}

/// An HTTP token (header names, methods): RFC 9110 tchar.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn check_http_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| format!("URI {uri:?}: scheme must be http or https"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("URI {uri:?} has no host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("URI {uri:?} has an invalid port"));
    }
    Ok(())
}

/// Parses a protobuf/Go-style duration such as `5s`, `0.5s`, `100ms`, `1m30s`, `1h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 5s, 500ms, 1m");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

// ---------------------------------------------------------------------------------------------
// WorkloadEntry, ServiceEntry
// ---------------------------------------------------------------------------------------------

pub(crate) fn validate_workload_entry(w: &WorkloadEntry, f: &mut Findings) {
    validate_metadata(&w.metadata, f);
    validate_dry_run(&w.metadata, None, f);
    let spec = &w.spec;
    if !spec.address.is_empty()
        && spec.address.parse::<IpAddr>().is_err()
        && check_dns_subdomain(&spec.address.to_ascii_lowercase()).is_err()
    {
        f.error(
            "spec.address",
            format!(
                "{:?} is neither an IP address nor a host name",
                spec.address
            ),
        );
    }
    for (name, port) in &spec.ports {
        if name.is_empty() {
            f.error("spec.ports", "port name must not be empty");
        }
        if !(1..=65535).contains(port) {
            f.error(
                format!("spec.ports[{name}]"),
                format!("port {port} is not in 1..65535"),
            );
        }
    }
    for (k, v) in &spec.labels {
        if let Err(e) = check_label(k, v) {
            f.error(format!("spec.labels[{k}]"), e);
        }
    }
    if !spec.service_account.is_empty()
        && let Err(e) = check_dns_subdomain(&spec.service_account)
    {
        f.error("spec.serviceAccount", e);
    }
}

pub(crate) fn validate_service_entry(s: &ServiceEntry, f: &mut Findings) {
    validate_metadata(&s.metadata, f);
    validate_dry_run(&s.metadata, None, f);
    let spec = &s.spec;
    if spec.hosts.is_empty() {
        f.error("spec.hosts", "must have at least one host");
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        let h2 = h.strip_prefix("*.").unwrap_or(h);
        if h.is_empty() || (h != "*" && check_dns_subdomain(&h2.to_ascii_lowercase()).is_err()) {
            f.error(
                format!("spec.hosts[{i}]"),
                format!("{h:?} is not a valid host name"),
            );
        }
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        if parse_ip_or_cidr(a).is_err() {
            f.error(
                format!("spec.addresses[{i}]"),
                format!("{a:?} is not an IP address or CIDR"),
            );
        }
    }
    for (i, p) in spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&p.number) {
            f.error(
                format!("spec.ports[{i}].number"),
                format!("port {} is not in 1..65535", p.number),
            );
        }
        if let Some(t) = p.target_port
            && !(1..=65535).contains(&t)
        {
            f.error(
                format!("spec.ports[{i}].targetPort"),
                format!("port {t} is not in 1..65535"),
            );
        }
    }
    if let Some(sel) = &spec.workload_selector {
        for (k, v) in &sel.labels {
            if let Err(e) = check_label(k, v) {
                f.error(format!("spec.workloadSelector.labels[{k}]"), e);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MeshConfig
// ---------------------------------------------------------------------------------------------

pub(crate) fn validate_mesh(m: &MeshConfig, f: &mut Findings) {
    let check_td = |td: &str| -> Result<(), String> {
        if td.is_empty() {
            return Err("must not be empty".into());
        }
        if td.contains('/') || td.contains(':') || td.contains('*') {
            return Err(format!("{td:?}: a trust domain has no '/', ':' or '*'"));
        }
        check_dns_subdomain(&td.to_ascii_lowercase())
    };
    if let Err(e) = check_td(&m.trust_domain) {
        f.error("trustDomain", e);
    }
    for (i, a) in m.trust_domain_aliases.iter().enumerate() {
        if let Err(e) = check_td(a) {
            f.error(format!("trustDomainAliases[{i}]"), e);
        }
    }
    if let Err(e) = check_dns_label(&m.root_namespace) {
        f.error("rootNamespace", e);
    }
    if let Some(v) = m
        .mesh_mtls
        .as_ref()
        .and_then(|x| x.min_protocol_version.as_deref())
        && crate::mesh::MinProtocolVersion::from_config(v).is_none()
    {
        f.error(
            "meshMTLS.minProtocolVersion",
            format!(
                "{v:?} is not a TLS version the mesh can require: expected TLSV1_2 or TLSV1_3 (TLS_AUTO means TLSV1_2; TLS 1.3 is the highest)"
            ),
        );
    }
    if let Some(v) = m
        .outbound_traffic_policy
        .as_ref()
        .and_then(|p| p.mode.as_deref())
        && crate::mesh::OutboundTrafficMode::from_config(v).is_none()
    {
        f.error(
            "outboundTrafficPolicy.mode",
            format!("{v:?} is not an outbound traffic policy: expected ALLOW_ANY or REGISTRY_ONLY"),
        );
    }
    if let Some(n) = m
        .path_normalization
        .as_ref()
        .and_then(|p| p.normalization.as_deref())
        && crate::normalize::PathNormalization::from_config(n).is_none()
    {
        f.error(
            "pathNormalization.normalization",
            format!(
                "{n:?}: expected DEFAULT, NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"
            ),
        );
    }
    if let Some(j) = &m.jwks_resolver {
        validate_jwks_resolver(j, f);
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in m.extension_providers.iter().enumerate() {
        let path = format!("extensionProviders[{i}]");
        if p.name.is_empty() {
            f.error(format!("{path}.name"), "must not be empty");
        } else if !seen.insert(p.name.as_str()) {
            f.error(
                format!("{path}.name"),
                format!("duplicate provider name {:?}", p.name),
            );
        }
        let (service, port, timeout) = match (&p.envoy_ext_authz_grpc, &p.envoy_ext_authz_http) {
            (Some(g), None) => (&g.service, g.port, &g.timeout),
            (None, Some(h)) => (&h.service, h.port, &h.timeout),
            _ => {
                f.error(
                    &path,
                    "exactly one of envoyExtAuthzGrpc or envoyExtAuthzHttp must be set",
                );
                continue;
            }
        };
        if service.is_empty() {
            f.error(format!("{path}.service"), "must not be empty");
        }
        if !(1..=65535).contains(&port) {
            f.error(
                format!("{path}.port"),
                format!("port {port} is not in 1..65535"),
            );
        }
        if let Some(t) = timeout
            && let Err(e) = parse_duration(t)
        {
            f.error(format!("{path}.timeout"), e);
        }
        if let Some(h) = &p.envoy_ext_authz_http {
            if let Some(prefix) = &h.path_prefix
                && !prefix.starts_with('/')
            {
                f.error(
                    format!("{path}.envoyExtAuthzHttp.pathPrefix"),
                    "must start with '/'",
                );
            }
            if let Some(s) = &h.status_on_error
                && s.parse::<u16>().map_or(true, |c| !(100..=599).contains(&c))
            {
                f.error(
                    format!("{path}.envoyExtAuthzHttp.statusOnError"),
                    format!("{s:?} is not an HTTP status"),
                );
            }
        }
    }
    for (i, t) in m.ca_token_issuers.iter().enumerate() {
        let path = format!("caTokenIssuers[{i}]");
        if t.issuer.is_empty() {
            f.error(format!("{path}.issuer"), "must not be empty");
        }
        let sources = usize::from(t.jwks_file.is_some())
            + usize::from(t.jwks_uri.is_some())
            + usize::from(t.jwks.is_some());
        if sources > 1 {
            f.error(&path, "at most one of jwksFile, jwksUri, jwks may be set");
        }
        if let Some(u) = &t.jwks_uri
            && let Err(e) = check_http_uri(u)
        {
            f.error(format!("{path}.jwksUri"), e);
        }
    }
}

/// Validates a MeshConfig on its own (e.g. for other crates that read `mesh.yaml`).
/// `jwksResolver`: durations greater than zero, retries that never shrink.
fn validate_jwks_resolver(j: &crate::mesh::JwksResolverConfig, f: &mut Findings) {
    let mut check = |field: &str, v: &Option<String>| -> Option<std::time::Duration> {
        let v = v.as_deref()?;
        match parse_duration(v) {
            Ok(d) if d.is_zero() => {
                f.error(format!("jwksResolver.{field}"), "must be greater than 0");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                f.error(format!("jwksResolver.{field}"), e);
                None
            }
        }
    };
    check("refreshInterval", &j.refresh_interval);
    check("evictUnusedAfter", &j.evict_unused_after);
    let initial = check("retryInitialInterval", &j.retry_initial_interval);
    let max = check("retryMaxInterval", &j.retry_max_interval);
    // Only a set initial interval can exceed the maximum (the defaults are in order).
    if let (Some(initial), Some(text)) = (initial, j.retry_initial_interval.as_deref()) {
        let (limit, limit_text) = match (max, j.retry_max_interval.as_deref()) {
            (Some(m), Some(t)) => (m, t.to_owned()),
            _ => (
                crate::mesh::DEFAULT_JWKS_RETRY_MAX,
                format!(
                    "{} by default",
                    short_duration(crate::mesh::DEFAULT_JWKS_RETRY_MAX)
                ),
            ),
        };
        if initial > limit {
            f.error(
                "jwksResolver.retryInitialInterval",
                format!("{text} is longer than retryMaxInterval ({limit_text})"),
            );
        }
    }
}

/// `1h`, `20m`, `90s`: a whole duration in its largest exact unit.
fn short_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

pub fn mesh_config_issues(m: &MeshConfig) -> Vec<FieldIssue> {
    let mut f = Findings::default();
    validate_mesh(m, &mut f);
    f.issues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates() {
        assert!(check_path_template("/{*}/foo/{**}").is_ok());
        assert!(check_path_template("/{**}/path/template").is_ok());
        assert!(check_path_template("/{**}/{*}").is_err());
        assert!(check_path_template("/{foo}/x").is_err());
        assert!(check_path_template("/a b/{*}").is_err());
        assert!(check_path_template("/exact").is_ok());
    }

    #[test]
    fn when_keys() {
        assert_eq!(
            parse_when_key("request.auth.claims[a][b]"),
            Ok(WhenKey::RequestClaim(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse_when_key("request.headers[X-A]"),
            Ok(WhenKey::RequestHeader("X-A".into()))
        );
        assert!(parse_when_key("request.headers[]").is_err());
        assert!(parse_when_key("destination.labels[app]").is_err());
        assert!(parse_when_key("source.foo").is_err());
        assert!(matches!(
            parse_when_key("experimental.envoy.filters.a.b[c]"),
            Ok(WhenKey::EnvoyFilter { .. })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(std::time::Duration::from_secs(5)));
        assert_eq!(
            parse_duration("1m30s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
    }
}
