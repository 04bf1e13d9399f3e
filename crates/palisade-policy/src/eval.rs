//! Evaluation of one request against a [`CompiledPolicy`]: mTLS requirement, then CUSTOM, JWT
//! authentication, DENY, ALLOW (Istio's filter order), with AUDIT and dry-run policies recorded but
//! never enforced.
//!
//! Two entry points share one algorithm: [`CompiledPolicy::evaluate`] is the per-request fast
//! path (borrowed inputs, indexed candidate rules, no allocation in the common case) and returns a
//! [`Verdict`]; [`CompiledPolicy::explain`] returns an owned, serializable [`Decision`] with a
//! reason and a trace of every policy considered, for operators.

use std::borrow::Cow;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::Value;

use crate::api::{AuthzAction, MtlsMode};
use crate::compile::{
    Attr, Check, Clause, CompiledPolicy, CompiledRule, Engine, RuleSet, SkipReason,
};
use crate::index::{Candidates, IndexQuery};
use crate::matcher::{PeerIdentity, canonical_ip, service_account_matches};
use crate::normalize::{PathError, normalize_path};

/// Header access for evaluation. Names are given in lowercase; implementations compare
/// case-insensitively and report every value of a repeated header in order.
pub trait HeaderLookup {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str));
}

impl<'a> HeaderLookup for [(&'a str, &'a str)] {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.eq_ignore_ascii_case(name) {
                out(v);
            }
        }
    }
}

impl<'a, const N: usize> HeaderLookup for [(&'a str, &'a str); N] {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        self[..].get_all(name, out)
    }
}

impl<'a> HeaderLookup for Vec<(&'a str, &'a str)> {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        self[..].get_all(name, out)
    }
}

impl HeaderLookup for Vec<(String, String)> {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        self[..].get_all(name, out)
    }
}

impl HeaderLookup for [(String, String)] {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.eq_ignore_ascii_case(name) {
                out(v);
            }
        }
    }
}

impl HeaderLookup for std::collections::BTreeMap<String, String> {
    fn get_all<'s>(&'s self, name: &str, out: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.eq_ignore_ascii_case(name) {
                out(v);
            }
        }
    }
}

/// No headers.
pub struct NoHeaders;

impl HeaderLookup for NoHeaders {
    fn get_all<'s>(&'s self, _: &str, _: &mut dyn FnMut(&'s str)) {}
}

/// The HTTP part of a request.
#[derive(Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// The request target as received (`:path`), query included.
    pub path: &'a str,
    /// `:authority` / `Host`, port included when the client sent one.
    pub host: &'a str,
    pub headers: &'a dyn HeaderLookup,
}

impl std::fmt::Debug for HttpAttributes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAttributes")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// What a proxy knows about one request (or TCP connection), borrowed from its own buffers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestContext<'a> {
    /// Destination (workload) port.
    pub port: u16,
    /// Destination IP; defaults to the workload's address.
    pub destination_ip: Option<IpAddr>,
    /// Direct peer IP.
    pub source_ip: Option<IpAddr>,
    /// Original client IP; defaults to `source_ip`.
    pub remote_ip: Option<IpAddr>,
    /// Verified peer principal `<td>/ns/<ns>/sa/<sa>` (or its `spiffe://` URI); `None` = plaintext.
    pub peer_principal: Option<&'a str>,
    pub sni: Option<&'a str>,
    /// `None` for a TCP connection.
    pub http: Option<HttpAttributes<'a>>,
    /// Claims of the request's already-validated JWT.
    pub jwt: Option<&'a Value>,
}

/// Why a request is rejected (HTTP 400) before any policy is evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad request path: {0}")]
    Path(#[from] PathError),
    #[error("bad request method {0:?}: methods are uppercase HTTP tokens")]
    Method(String),
}

/// The step that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DecisionAction {
    /// An ALLOW policy matched.
    Allow,
    /// A DENY policy matched.
    Deny,
    /// A CUSTOM policy matched and nothing else decided: the external authorizer decides.
    Custom,
    /// The port requires mTLS and the connection is plaintext.
    Mtls,
    /// No policy decided: allowed when no ALLOW policy applies, denied when some do.
    Default,
    /// JWT authentication rejected the request (issuer not configured or audience not allowed).
    Jwt,
}

impl DecisionAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionAction::Allow => "ALLOW",
            DecisionAction::Deny => "DENY",
            DecisionAction::Custom => "CUSTOM",
            DecisionAction::Mtls => "MTLS",
            DecisionAction::Default => "DEFAULT",
            DecisionAction::Jwt => "JWT",
        }
    }
}

/// A machine-readable reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    MtlsRequired,
    /// HTTP 401: no RequestAuthentication rule accepts the token's issuer.
    JwtIssuerNotConfigured,
    /// HTTP 403: the token's audiences are not allowed.
    JwtAudienceNotAllowed,
    DeniedByPolicy,
    AllowedByPolicy,
    /// No enforced ALLOW policy applies.
    AllowedNoAllowPolicies,
    /// A CUSTOM provider decides; no other policy denies.
    AllowedPendingCustom,
    /// ALLOW policies apply and none matched.
    DeniedNoAllowMatch,
}

/// The result of one dry-run policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunVerdict<'c> {
    /// `ns[<ns>]-policy[<name>]`.
    pub policy: &'c str,
    /// The matching rule's id.
    pub rule: Option<&'c str>,
    /// Whether the request would be allowed if this policy were enforced.
    pub would_allow: bool,
}

/// The fast-path result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'c> {
    pub allowed: bool,
    pub action: DecisionAction,
    /// The deciding rule's id `ns[<ns>]-policy[<name>]-rule[<i>]`.
    pub policy: Option<&'c str>,
    pub reason: ReasonCode,
    pub mtls_mode: MtlsMode,
    /// Extension providers a matching CUSTOM policy asks (`allowed` assumes they allow).
    pub custom: Vec<&'c str>,
    /// The first matching AUDIT rule: the request is marked for audit logging.
    pub audit: Option<&'c str>,
    pub dry_run: Vec<DryRunVerdict<'c>>,
}

/// A request prepared once: normalized path, parsed peer, accepted token.
pub(crate) struct Prepared<'a> {
    pub port: u16,
    pub peer: Option<PeerIdentity<'a>>,
    /// The peer was present but ignored (port in DISABLE mode).
    pub peer_ignored: bool,
    pub source_ip: Option<IpAddr>,
    pub remote_ip: Option<IpAddr>,
    pub dest_ip: Option<IpAddr>,
    pub sni: Option<&'a str>,
    pub http: Option<HttpAttributes<'a>>,
    pub path: Cow<'a, str>,
    pub jwt: Option<&'a Value>,
    pub iss: Option<&'a str>,
    pub sub: Option<&'a str>,
    pub space_delimited: &'a [String],
}

/// Authentication failures of the JWT step.
enum JwtOutcome<'a> {
    Accepted,
    Ignored,
    Absent,
    IssuerNotConfigured(&'a str),
    AudienceNotAllowed(usize),
}

fn valid_method(m: &str) -> bool {
    crate::validate::is_token(m) && !m.bytes().any(|b| b.is_ascii_lowercase())
}

impl CompiledPolicy {
    fn engine(&self, http: bool) -> &Engine {
        if http { &self.http } else { &self.tcp }
    }

    pub(crate) fn prepare<'a>(
        &'a self,
        req: &'a RequestContext<'a>,
    ) -> Result<(Prepared<'a>, MtlsMode), RequestError> {
        let mode = self.mtls.for_port(req.port).mode;
        let raw_peer = req.peer_principal.filter(|p| !p.is_empty());
        let (peer, peer_ignored) = if mode == MtlsMode::Disable {
            (None, raw_peer.is_some())
        } else {
            (raw_peer.map(PeerIdentity::parse), false)
        };
        let mut path = Cow::Borrowed("");
        if let Some(h) = &req.http {
            if !valid_method(h.method) {
                return Err(RequestError::Method(h.method.chars().take(32).collect()));
            }
            // `CONNECT` targets an authority and has no path (Envoy's `:path` is absent).
            if !(h.path.is_empty() && h.method == "CONNECT") {
                path = normalize_path(h.path, self.normalization)?;
            }
        }
        let source_ip = req.source_ip.map(canonical_ip);
        Ok((
            Prepared {
                port: req.port,
                peer,
                peer_ignored,
                source_ip,
                remote_ip: req.remote_ip.map(canonical_ip).or(source_ip),
                dest_ip: req.destination_ip.or(self.workload_ip).map(canonical_ip),
                sni: req.sni,
                http: req.http,
                path,
                jwt: None,
                iss: None,
                sub: None,
                space_delimited: &self.space_delimited_claims,
            },
            mode,
        ))
    }

    /// The JWT step: whether the token is used, ignored, or rejected.
    fn authenticate<'a>(
        &'a self,
        req: &'a RequestContext<'a>,
        p: &mut Prepared<'a>,
    ) -> JwtOutcome<'a> {
        let (Some(claims), true) = (req.jwt, p.http.is_some()) else {
            return JwtOutcome::Absent;
        };
        if self.jwt_rules.is_empty() {
            // Without a RequestAuthentication the proxy does not look at tokens at all.
            return JwtOutcome::Ignored;
        }
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let mut first_audience_failure = None;
        let mut issuer_known = false;
        for (i, r) in self.jwt_rules.iter().enumerate() {
            if !(r.rule.issuer.is_empty() || r.rule.issuer == iss) {
                continue;
            }
            issuer_known = true;
            if r.rule.audiences.is_empty()
                || audiences(claims).any(|a| r.rule.audiences.iter().any(|x| x == a))
            {
                p.jwt = Some(claims);
                p.iss = claims.get("iss").and_then(Value::as_str);
                p.sub = claims.get("sub").and_then(Value::as_str);
                return JwtOutcome::Accepted;
            }
            first_audience_failure.get_or_insert(i);
        }
        match (issuer_known, first_audience_failure) {
            (true, Some(i)) => JwtOutcome::AudienceNotAllowed(i),
            _ => JwtOutcome::IssuerNotConfigured(iss),
        }
    }

    /// Decides one request. Fast path: indexed candidates, borrowed output.
    pub fn evaluate<'c>(
        &'c self,
        req: &'c RequestContext<'c>,
    ) -> Result<Verdict<'c>, RequestError> {
        self.decide(req, true)
    }

    /// [`Self::evaluate`] without the index: every rule is checked. For tests that the index never
    /// changes a decision.
    #[doc(hidden)]
    pub fn evaluate_unindexed<'c>(
        &'c self,
        req: &'c RequestContext<'c>,
    ) -> Result<Verdict<'c>, RequestError> {
        self.decide(req, false)
    }

    fn decide<'c>(
        &'c self,
        req: &'c RequestContext<'c>,
        indexed: bool,
    ) -> Result<Verdict<'c>, RequestError> {
        let (mut p, mode) = self.prepare(req)?;
        let mut v = Verdict {
            allowed: false,
            action: DecisionAction::Default,
            policy: None,
            reason: ReasonCode::DeniedNoAllowMatch,
            mtls_mode: mode,
            custom: Vec::new(),
            audit: None,
            dry_run: Vec::new(),
        };
        if mode == MtlsMode::Strict && p.peer.is_none() {
            v.action = DecisionAction::Mtls;
            v.reason = ReasonCode::MtlsRequired;
            return Ok(v);
        }
        let engine = self.engine(p.http.is_some());
        let mut cands = Candidates::new();

        // CUSTOM: every matching policy's provider is asked.
        let mut custom_rule = None;
        if !engine.custom.rules.is_empty() {
            for_each_match(&engine.custom, &p, indexed, &mut cands, |r| {
                custom_rule.get_or_insert(&*r.id);
                if let Some(prov) = self.policies[r.policy as usize].provider {
                    let name = self.providers[prov].as_str();
                    if !v.custom.contains(&name) {
                        v.custom.push(name);
                    }
                }
                true
            });
        }

        match self.authenticate(req, &mut p) {
            JwtOutcome::IssuerNotConfigured(_) => {
                v.action = DecisionAction::Jwt;
                v.reason = ReasonCode::JwtIssuerNotConfigured;
                return Ok(v);
            }
            JwtOutcome::AudienceNotAllowed(_) => {
                v.action = DecisionAction::Jwt;
                v.reason = ReasonCode::JwtAudienceNotAllowed;
                return Ok(v);
            }
            JwtOutcome::Accepted | JwtOutcome::Ignored | JwtOutcome::Absent => {}
        }

        v.audit = first_match(&engine.audit, &p, indexed, &mut cands).map(|r| &*r.id);
        let deny = first_match(&engine.deny, &p, indexed, &mut cands);
        let mut enforced_allow_match = None;
        if let Some(r) = deny {
            v.action = DecisionAction::Deny;
            v.policy = Some(&r.id);
            v.reason = ReasonCode::DeniedByPolicy;
        } else if self.enforced_allow == 0 {
            v.allowed = true;
            if let Some(id) = custom_rule {
                v.action = DecisionAction::Custom;
                v.policy = Some(id);
                v.reason = ReasonCode::AllowedPendingCustom;
            } else {
                v.action = DecisionAction::Default;
                v.reason = ReasonCode::AllowedNoAllowPolicies;
            }
        } else if let Some(r) = first_match(&engine.allow, &p, indexed, &mut cands) {
            enforced_allow_match = Some(r);
            v.allowed = true;
            v.action = DecisionAction::Allow;
            v.policy = Some(&r.id);
            v.reason = ReasonCode::AllowedByPolicy;
        } else {
            v.action = DecisionAction::Default;
            v.reason = ReasonCode::DeniedNoAllowMatch;
        }

        if self.has_dry_run {
            let passed_deny = deny.is_none();
            self.dry_runs(
                engine,
                &p,
                passed_deny,
                enforced_allow_match.is_some(),
                v.allowed,
                &mut v.dry_run,
            );
        }
        Ok(v)
    }

    /// One entry per applicable dry-run policy: would the request be allowed if it were enforced?
    fn dry_runs<'c>(
        &'c self,
        engine: &'c Engine,
        p: &Prepared<'_>,
        passed_deny: bool,
        enforced_allow_matched: bool,
        allowed: bool,
        out: &mut Vec<DryRunVerdict<'c>>,
    ) {
        for (pidx, info) in self.policies.iter().enumerate() {
            if !info.dry_run {
                continue;
            }
            let set = match info.action {
                AuthzAction::Allow => &engine.dry_allow,
                AuthzAction::Deny => &engine.dry_deny,
                _ => continue,
            };
            let matched = set
                .rules
                .iter()
                .find(|r| r.policy as usize == pidx && rule_matches(r, p))
                .map(|r| &*r.id);
            let would_allow = match info.action {
                AuthzAction::Deny => allowed && matched.is_none(),
                // Enforcing an ALLOW policy makes ALLOW policies exist: only a match (this one or
                // an enforced one) allows.
                _ => passed_deny && (matched.is_some() || enforced_allow_matched),
            };
            out.push(DryRunVerdict {
                policy: self.policy_labels_get(pidx),
                rule: matched,
                would_allow,
            });
        }
    }

    fn policy_labels_get(&self, pidx: usize) -> &str {
        self.policies.get(pidx).map_or("", |p| p.id.as_str())
    }
}

fn audiences(claims: &Value) -> impl Iterator<Item = &str> {
    let aud = claims.get("aud");
    let single = aud.and_then(Value::as_str);
    let list = aud
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    single.into_iter().chain(list)
}

fn candidates_for(set: &RuleSet, p: &Prepared<'_>, cands: &mut Candidates) {
    cands.clear();
    let q = IndexQuery {
        peer: p.peer,
        path: p.http.map(|_| &*p.path),
        source_ip: p.source_ip,
        port: p.port,
    };
    set.index.candidates(&q, cands);
}

/// The matching rule with the smallest id.
#[inline]
fn first_match<'s>(
    set: &'s RuleSet,
    p: &Prepared<'_>,
    indexed: bool,
    cands: &mut Candidates,
) -> Option<&'s CompiledRule> {
    if set.rules.is_empty() {
        return None;
    }
    if !indexed {
        return set.rules.iter().find(|r| rule_matches(r, p));
    }
    candidates_for(set, p, cands);
    cands
        .as_slice()
        .iter()
        .map(|&i| &set.rules[i as usize])
        .find(|r| rule_matches(r, p))
}

/// Calls `f` for each matching rule in id order while it returns true.
fn for_each_match<'s>(
    set: &'s RuleSet,
    p: &Prepared<'_>,
    indexed: bool,
    cands: &mut Candidates,
    mut f: impl FnMut(&'s CompiledRule) -> bool,
) {
    if indexed {
        candidates_for(set, p, cands);
        for &i in cands.as_slice() {
            let r = &set.rules[i as usize];
            if rule_matches(r, p) && !f(r) {
                return;
            }
        }
    } else {
        for r in &set.rules {
            if rule_matches(r, p) && !f(r) {
                return;
            }
        }
    }
}

#[inline]
pub(crate) fn rule_matches(r: &CompiledRule, p: &Prepared<'_>) -> bool {
    !r.never
        && (r.from.is_empty() || r.from.iter().any(|c| clause_matches(c, p)))
        && (r.to.is_empty() || r.to.iter().any(|c| clause_matches(c, p)))
        && clause_matches(&r.when, p)
}

#[inline]
fn clause_matches(c: &Clause, p: &Prepared<'_>) -> bool {
    c.checks.iter().all(|k| check_matches(k, p))
}

#[inline]
pub(crate) fn check_matches(k: &Check, p: &Prepared<'_>) -> bool {
    attr_matches(&k.attr, p) != k.negate
}

fn attr_matches(a: &Attr, p: &Prepared<'_>) -> bool {
    match a {
        Attr::Principal(s) => p.peer.is_some_and(|x| s.matches(x.principal)),
        Attr::RequestPrincipal(pats) => {
            p.jwt.is_some() && pats.iter().any(|pt| pt.matches(p.iss, p.sub))
        }
        Attr::Namespace(pats) => p.peer.is_some_and(|x| pats.iter().any(|n| n.matches(&x))),
        Attr::ServiceAccount(list) => p.peer.is_some_and(|x| {
            list.iter()
                .any(|(ns, sa)| service_account_matches(&x, ns, sa))
        }),
        Attr::TrustDomain(s) => p.peer.is_some_and(|x| s.matches(x.trust_domain)),
        Attr::SourceIp(set) => p.source_ip.is_some_and(|ip| set.contains(ip)),
        Attr::RemoteIp(set) => p.remote_ip.is_some_and(|ip| set.contains(ip)),
        Attr::DestIp(set) => p.dest_ip.is_some_and(|ip| set.contains(ip)),
        Attr::Port(ports) => ports.contains(&p.port),
        Attr::Host(s) => p.http.is_some_and(|h| s.matches(h.host)),
        Attr::Method(s) => p.http.is_some_and(|h| s.matches(h.method)),
        // An absent path (`CONNECT`) matches no path pattern, as Envoy's `url_path` on a
        // request without `:path`; `notPaths` then holds.
        Attr::Path(ps) => {
            p.http.is_some() && !p.path.is_empty() && ps.iter().any(|x| x.matches(&p.path))
        }
        Attr::Header(name, s) => header_matches(p, name, s),
        Attr::Claim(path, s) => claim_matches(p, path, s),
        Attr::Audiences(s) => p.jwt.is_some_and(|c| audiences(c).any(|a| s.matches(a))),
        Attr::Presenter(s) => p
            .jwt
            .and_then(|c| c.get("azp"))
            .and_then(Value::as_str)
            .is_some_and(|a| s.matches(a)),
        Attr::Sni(s) => p.sni.is_some_and(|x| s.matches(x)),
        Attr::EnvoyFilter => false,
    }
}

/// The value of a header as Envoy's matcher sees it: repeated headers joined with `,`.
fn header_value<'a>(p: &'a Prepared<'_>, name: &str) -> Option<Cow<'a, str>> {
    let h = p.http.as_ref()?;
    match name {
        ":method" => return Some(Cow::Borrowed(h.method)),
        ":path" => return Some(Cow::Borrowed(h.path)),
        ":authority" | "host" => return Some(Cow::Borrowed(h.host)),
        _ => {}
    }
    let mut first: Option<&'a str> = None;
    let mut joined: Option<String> = None;
    h.headers
        .get_all(name, &mut |v| match (&mut joined, first) {
            (Some(j), _) => {
                j.push(',');
                j.push_str(v);
            }
            (None, Some(f)) => joined = Some(format!("{f},{v}")),
            (None, None) => first = Some(v),
        });
    match joined {
        Some(j) => Some(Cow::Owned(j)),
        None => first.map(Cow::Borrowed),
    }
}

fn header_matches(p: &Prepared<'_>, name: &str, s: &crate::matcher::StrSet) -> bool {
    match header_value(p, name) {
        // `*` on a header is Envoy's present match: an empty value counts.
        Some(v) => {
            s.matches(&v)
                || s.patterns
                    .iter()
                    .any(|x| matches!(x, crate::matcher::StrPattern::Presence))
        }
        None => false,
    }
}

fn claim_matches(p: &Prepared<'_>, path: &[Box<str>], s: &crate::matcher::StrSet) -> bool {
    let Some(mut v) = p.jwt else { return false };
    for seg in path {
        match v.get(&**seg) {
            Some(x) => v = x,
            None => return false,
        }
    }
    let split = path.len() == 1 && p.space_delimited.iter().any(|c| *c == *path[0]);
    match v {
        Value::String(x) if split => x.split(' ').any(|part| s.matches(part)) || s.matches(x),
        Value::String(x) => s.matches(x),
        Value::Array(items) => items.iter().filter_map(Value::as_str).any(|x| s.matches(x)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Explanation
// ---------------------------------------------------------------------------------------------

/// One dry-run result in a [`Decision`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunResult {
    /// The matching rule id, or `ns[<ns>]-policy[<name>]` when no rule matched.
    pub policy: String,
    pub would_allow: bool,
    pub matched: bool,
}

/// The step of a trace entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TraceStep {
    Mtls,
    Custom,
    Jwt,
    Deny,
    Allow,
    Audit,
}

/// One line of the explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceEntry {
    pub step: TraceStep,
    /// `ns[<ns>]-policy[<name>]` for policy steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<bool>,
    /// The matching rule's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// What happened: the first field that failed in each rule, or why the step passed.
    pub detail: String,
}

/// The explained decision; serializes to the JSON of `palisade authz check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub allowed: bool,
    pub action: DecisionAction,
    pub policy: Option<String>,
    pub reason: String,
    pub mtls_mode: MtlsMode,
    pub custom: Vec<String>,
    pub dry_run: Vec<DryRunResult>,
    pub audit: bool,
    pub trace: Vec<TraceEntry>,
}

fn list(values: &[String]) -> String {
    let shown: Vec<String> = values.iter().take(8).map(|v| format!("{v:?}")).collect();
    if values.len() > 8 {
        format!("[{}, ... {} more]", shown.join(", "), values.len() - 8)
    } else {
        format!("[{}]", shown.join(", "))
    }
}

impl CompiledPolicy {
    /// Decides one request and explains why: the reason, and for every policy considered whether
    /// it matched and, if not, the first field that failed in each rule.
    pub fn explain(&self, req: &RequestContext<'_>) -> Result<Decision, RequestError> {
        let verdict = self.evaluate(req)?;
        let (mut p, mode) = self.prepare(req)?;
        let jwt = self.authenticate(req, &mut p);
        let port_mode = self.mtls.for_port(req.port);
        let mut trace = Vec::new();

        // mTLS
        let mtls_detail = match (mode, p.peer, p.peer_ignored) {
            (MtlsMode::Strict, None, _) => format!(
                "port {} requires mTLS: {}; the connection is plaintext, so it is rejected before authorization",
                req.port,
                port_mode.describe()
            ),
            (_, Some(peer), _) => format!(
                "mTLS peer {:?}; port {} mode {}",
                peer.principal,
                req.port,
                port_mode.describe()
            ),
            (_, None, true) => format!(
                "port {} mode {}: the sidecar does not terminate mTLS here, so the peer identity is unknown",
                req.port,
                port_mode.describe()
            ),
            (_, None, false) => format!(
                "plaintext connection (no peer identity); port {} mode {}",
                req.port,
                port_mode.describe()
            ),
        };
        trace.push(TraceEntry {
            step: TraceStep::Mtls,
            policy: None,
            dry_run: false,
            matched: None,
            rule: None,
            detail: mtls_detail,
        });
        if verdict.action == DecisionAction::Mtls {
            return Ok(self.decision(&verdict, req, &p, &jwt, trace));
        }
        let http = p.http.is_some();
        let engine = self.engine(http);

        self.trace_policies(AuthzAction::Custom, engine, &p, &mut trace);

        let jwt_detail = match &jwt {
            JwtOutcome::Absent if http && !self.jwt_rules.is_empty() => {
                "no JWT: a request without a token passes authentication with no request principal".to_owned()
            }
            JwtOutcome::Absent if http => "no JWT and no RequestAuthentication".to_owned(),
            JwtOutcome::Absent => "TCP connection: no request authentication".to_owned(),
            JwtOutcome::Ignored => "a JWT is present but no RequestAuthentication applies to this workload, so the token is ignored and the request has no request principal".to_owned(),
            JwtOutcome::Accepted => match (p.iss, p.sub) {
                (Some(i), Some(s)) => format!("JWT accepted: request principal \"{i}/{s}\""),
                (Some(i), None) => format!("JWT from {i:?} accepted, but it has no sub claim, so there is no request principal"),
                _ => "JWT accepted".to_owned(),
            },
            JwtOutcome::IssuerNotConfigured(iss) => format!(
                "JWT issuer {iss:?} is not accepted by the RequestAuthentication rules on this workload (accepted: {}): \"Jwt issuer is not configured\", HTTP 401",
                list(&self.jwt_rules.iter().map(|r| r.rule.issuer.clone()).collect::<Vec<_>>())
            ),
            JwtOutcome::AudienceNotAllowed(i) => {
                let r = &self.jwt_rules[*i];
                format!(
                    "JWT audiences {} match none of {} required by RequestAuthentication {}: HTTP 403",
                    list(&req.jwt.map(|c| audiences(c).map(str::to_owned).collect::<Vec<_>>()).unwrap_or_default()),
                    list(&r.rule.audiences),
                    r.policy
                )
            }
        };
        if http {
            trace.push(TraceEntry {
                step: TraceStep::Jwt,
                policy: None,
                dry_run: false,
                matched: None,
                rule: None,
                detail: jwt_detail,
            });
        }
        if verdict.action == DecisionAction::Jwt {
            return Ok(self.decision(&verdict, req, &p, &jwt, trace));
        }
        self.trace_policies(AuthzAction::Deny, engine, &p, &mut trace);
        self.trace_policies(AuthzAction::Allow, engine, &p, &mut trace);
        self.trace_policies(AuthzAction::Audit, engine, &p, &mut trace);
        Ok(self.decision(&verdict, req, &p, &jwt, trace))
    }

    fn trace_policies(
        &self,
        action: AuthzAction,
        engine: &Engine,
        p: &Prepared<'_>,
        trace: &mut Vec<TraceEntry>,
    ) {
        let step = match action {
            AuthzAction::Custom => TraceStep::Custom,
            AuthzAction::Deny => TraceStep::Deny,
            AuthzAction::Allow => TraceStep::Allow,
            AuthzAction::Audit => TraceStep::Audit,
        };
        for (pidx, info) in self.policies.iter().enumerate() {
            if info.action != action {
                continue;
            }
            let sets: &[&RuleSet] = match (action, info.dry_run) {
                (AuthzAction::Custom, _) => &[&engine.custom],
                (AuthzAction::Deny, false) => &[&engine.deny],
                (AuthzAction::Deny, true) => &[&engine.dry_deny],
                (AuthzAction::Allow, false) => &[&engine.allow],
                (AuthzAction::Allow, true) => &[&engine.dry_allow],
                (AuthzAction::Audit, _) => &[&engine.audit],
            };
            let mut rules: Vec<&CompiledRule> = sets
                .iter()
                .flat_map(|s| s.rules.iter())
                .filter(|r| r.policy as usize == pidx)
                .collect();
            rules.sort_by_key(|r| r.rule);
            let matched = rules
                .iter()
                .filter(|r| rule_matches(r, p))
                .min_by(|a, b| a.id.cmp(&b.id));
            let mut notes = Vec::new();
            if let Some(prov) = info.provider {
                notes.push(format!("provider {:?}", self.providers[prov]));
            }
            let skipped: Vec<String> = engine
                .skipped
                .iter()
                .filter(|s| s.policy as usize == pidx)
                .map(|s| match &s.reason {
                    SkipReason::HttpFields(fields) => format!(
                        "{} skipped on this TCP connection: it uses HTTP-only fields ({})",
                        short_rule(&s.id),
                        fields.join(", ")
                    ),
                    SkipReason::HttpProvider => format!(
                        "{} not applied on this TCP connection: its provider is an envoyExtAuthzHttp provider, and Istio asks only envoyExtAuthzGrpc providers about TCP connections",
                        short_rule(&s.id)
                    ),
                })
                .collect();
            let detail = match matched {
                Some(r) => {
                    let mut d = format!("matched {}", short_rule(&r.id));
                    if !r.dropped.is_empty() {
                        d.push_str(&format!(
                            "; on this TCP connection its HTTP-only constraints were ignored ({}), so it matches more widely (fail safe)",
                            r.dropped.join(", ")
                        ));
                    }
                    d
                }
                None if info.rule_count == 0 => match action {
                    AuthzAction::Allow => "no rules: matches nothing (an ALLOW policy without rules makes the workload deny-all)".to_owned(),
                    _ => "no rules: matches nothing".to_owned(),
                },
                None => {
                    let mut parts: Vec<String> = rules
                        .iter()
                        .filter_map(|r| rule_failure(r, p).map(|f| format!("{}: {f}", short_rule(&r.id))))
                        .collect();
                    parts.extend(skipped.iter().cloned());
                    if parts.is_empty() {
                        "no rule applies".to_owned()
                    } else {
                        format!("no rule matched: {}", parts.join("; "))
                    }
                }
            };
            let detail = if notes.is_empty() {
                detail
            } else {
                format!("{detail} ({})", notes.join(", "))
            };
            trace.push(TraceEntry {
                step,
                policy: Some(info.label()),
                dry_run: info.dry_run,
                matched: Some(matched.is_some()),
                rule: matched.map(|r| r.id.to_string()),
                detail,
            });
        }
    }

    fn decision(
        &self,
        v: &Verdict<'_>,
        req: &RequestContext<'_>,
        p: &Prepared<'_>,
        jwt: &JwtOutcome<'_>,
        trace: Vec<TraceEntry>,
    ) -> Decision {
        let policy_name = |id: &str| -> String {
            // ns[a]-policy[b]-rule[2] -> "a/b rule 2"
            let ns = between(id, "ns[", "]-policy[");
            let name = between(id, "]-policy[", "]-rule[");
            let rule = between(id, "]-rule[", "]");
            format!("{ns}/{name} (rule {rule})")
        };
        let port_mode = self.mtls.for_port(req.port);
        let mut reason = match v.reason {
            ReasonCode::MtlsRequired => format!(
                "port {} requires mTLS: {}; the connection is plaintext (no client certificate), so it is refused before authorization",
                req.port,
                port_mode.describe()
            ),
            ReasonCode::JwtIssuerNotConfigured => {
                let iss = match jwt {
                    JwtOutcome::IssuerNotConfigured(i) => *i,
                    _ => "",
                };
                format!(
                    "the JWT issuer {iss:?} is not accepted by any RequestAuthentication rule on this workload (Jwt issuer is not configured): rejected with HTTP 401 before authorization"
                )
            }
            ReasonCode::JwtAudienceNotAllowed => {
                "the JWT audiences are not allowed by the RequestAuthentication rule for its issuer: rejected with HTTP 403 before authorization".to_owned()
            }
            ReasonCode::DeniedByPolicy => format!("denied by DENY policy {}", v.policy.map(policy_name).unwrap_or_default()),
            ReasonCode::AllowedByPolicy => format!("allowed by ALLOW policy {}", v.policy.map(policy_name).unwrap_or_default()),
            ReasonCode::AllowedNoAllowPolicies => {
                let mut r = "no ALLOW policy applies to this workload, so the request is allowed by default".to_owned();
                if self.policies.iter().any(|x| x.action == AuthzAction::Allow && x.dry_run) {
                    r.push_str(" (dry-run ALLOW policies do not count)");
                }
                r
            }
            ReasonCode::AllowedPendingCustom => format!(
                "CUSTOM policy {} sends the {} to {}; no other policy denies it, so it is allowed if the provider allows",
                v.policy.map(policy_name).unwrap_or_default(),
                if p.http.is_some() {
                    "request"
                } else {
                    "connection (one check when it opens, as Envoy's network ext_authz filter)"
                },
                list(&v.custom.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            ),
            ReasonCode::DeniedNoAllowMatch => {
                let n = self.enforced_allow;
                let mut r = format!(
                    "{n} ALLOW {} to this workload and none matched, so the request is denied (Envoy logs \"RBAC: access denied\", matched policy none)",
                    if n == 1 { "policy applies" } else { "policies apply" }
                );
                let empty: Vec<String> = self
                    .policies
                    .iter()
                    .filter(|x| x.action == AuthzAction::Allow && !x.dry_run && x.rule_count == 0)
                    .map(|x| format!("{}/{}", x.namespace, x.name))
                    .collect();
                if !empty.is_empty() {
                    r.push_str(&format!(
                        "; ALLOW {} {} no rules: an ALLOW policy without rules matches nothing and makes the workload deny-all",
                        if empty.len() == 1 { "policy" } else { "policies" },
                        empty.join(", "),
                    ));
                }
                let misses: Vec<String> = trace
                    .iter()
                    .filter(|t| t.step == TraceStep::Allow && !t.dry_run && t.matched == Some(false))
                    .map(|t| format!("{}: {}", t.policy.as_deref().unwrap_or_default(), t.detail))
                    .collect();
                if !misses.is_empty() && misses.len() <= 3 {
                    r.push_str(&format!("; {}", misses.join("; ")));
                }
                if p.http.is_none() {
                    let skipped = &self.tcp.skipped;
                    let allow_skipped: Vec<&str> = skipped
                        .iter()
                        .filter(|s| {
                            let i = &self.policies[s.policy as usize];
                            i.action == AuthzAction::Allow && !i.dry_run
                        })
                        .map(|s| s.id.as_str())
                        .collect();
                    if !allow_skipped.is_empty() {
                        r.push_str(&format!(
                            "; this is a TCP connection and {} ALLOW {} skipped because {} HTTP-only fields (hosts, methods, paths, requestPrincipals, request.headers, request.auth.*) that TCP traffic never has",
                            allow_skipped.len(),
                            if allow_skipped.len() == 1 { "rule was" } else { "rules were" },
                            if allow_skipped.len() == 1 { "it uses" } else { "they use" },
                        ));
                    }
                }
                r
            }
        };
        if v.allowed
            && p.http.is_some()
            && req.jwt.is_none()
            && !self.jwt_rules.is_empty()
            && v.reason != ReasonCode::AllowedByPolicy
        {
            reason.push_str(
                "; note: the request carries no JWT, and RequestAuthentication only rejects invalid tokens: require one with an ALLOW rule on requestPrincipals: [\"*\"]",
            );
        }
        if matches!(jwt, JwtOutcome::Ignored) && v.reason == ReasonCode::DeniedNoAllowMatch {
            reason.push_str("; the request's JWT was ignored because no RequestAuthentication applies to this workload");
        }
        if let Some(id) = v.policy
            && v.action == DecisionAction::Deny
            && p.http.is_none()
            && let Some(r) = self.tcp.deny.rules.iter().find(|r| *r.id == *id)
            && !r.dropped.is_empty()
        {
            reason.push_str(&format!(
                "; this is a TCP connection, so the rule's HTTP-only constraints ({}) were ignored and it matches more widely (fail safe)",
                r.dropped.join(", ")
            ));
        }
        Decision {
            allowed: v.allowed,
            action: v.action,
            policy: v.policy.map(str::to_owned),
            reason,
            mtls_mode: v.mtls_mode,
            custom: v.custom.iter().map(|s| (*s).to_owned()).collect(),
            dry_run: v
                .dry_run
                .iter()
                .map(|d| DryRunResult {
                    policy: d.rule.unwrap_or(d.policy).to_owned(),
                    would_allow: d.would_allow,
                    matched: d.rule.is_some(),
                })
                .collect(),
            audit: v.audit.is_some(),
            trace,
        }
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let Some(i) = s.find(start) else { return "" };
    let rest = &s[i + start.len()..];
    match rest.find(end) {
        Some(j) => &rest[..j],
        None => rest,
    }
}

fn short_rule(id: &str) -> &str {
    id.rfind("-rule[").map_or(id, |i| &id[i + 1..])
}

/// The first field that fails in a rule, or `None` when it matches.
fn rule_failure(r: &CompiledRule, p: &Prepared<'_>) -> Option<String> {
    if r.never {
        return Some("the policy has no rules, so it matches nothing".into());
    }
    if !r.from.is_empty() && !r.from.iter().any(|c| clause_matches(c, p)) {
        let why: Vec<String> = r.from.iter().filter_map(|c| clause_failure(c, p)).collect();
        return Some(why.join(" | "));
    }
    if !r.to.is_empty() && !r.to.iter().any(|c| clause_matches(c, p)) {
        let why: Vec<String> = r.to.iter().filter_map(|c| clause_failure(c, p)).collect();
        return Some(why.join(" | "));
    }
    clause_failure(&r.when, p)
}

fn clause_failure(c: &Clause, p: &Prepared<'_>) -> Option<String> {
    let k = c.checks.iter().find(|k| !check_matches(k, p))?;
    let field = if c.label.as_ref() == "when" {
        k.field.to_string()
    } else {
        format!("{}.{}", c.label, k.field)
    };
    let actual = describe_actual(&k.attr, p);
    let mut s = if k.negate {
        format!("{field}: {actual} matches {}", list(&k.values))
    } else {
        format!("{field}: {actual} matches none of {}", list(&k.values))
    };
    if let (Attr::Host(_), false, Some(h)) = (&k.attr, k.negate, p.http)
        && let Some((name, _port)) = h.host.rsplit_once(':')
        && k.values.iter().any(|v| v.eq_ignore_ascii_case(name))
    {
        s.push_str(&format!(
            " (hosts are compared with the whole Host header, port included: add {:?} or \"{name}:*\")",
            h.host
        ));
    }
    Some(s)
}

fn describe_actual(a: &Attr, p: &Prepared<'_>) -> String {
    let peer_missing = || {
        if p.peer_ignored {
            "no peer identity (the port's mTLS mode is DISABLE)".to_owned()
        } else {
            "no peer identity (plaintext connection; principal fields need mTLS)".to_owned()
        }
    };
    let opt_ip = |what: &str, ip: Option<IpAddr>| match ip {
        Some(ip) => format!("{what} {ip}"),
        None => format!("no {what}"),
    };
    match a {
        Attr::Principal(_) => p.peer.map_or_else(peer_missing, |x| format!("peer principal {:?}", x.principal)),
        Attr::Namespace(_) => p.peer.map_or_else(peer_missing, |x| match x.namespace {
            Some(ns) => format!("peer namespace {ns:?}"),
            // Not `<td>/ns/<ns>/sa/<sa>`: say which regex decides, since it is not a plain compare.
            None => format!(
                "peer principal {:?} (not <td>/ns/<ns>/sa/<sa>; a namespace matches as Istio's regex \".*/ns/<namespace>/.*\")",
                x.principal
            ),
        }),
        Attr::ServiceAccount(_) => p.peer.map_or_else(peer_missing, |x| match (x.namespace, x.service_account) {
            (Some(ns), Some(sa)) => format!("peer service account \"{ns}/{sa}\""),
            _ => format!(
                "peer principal {:?} (not <td>/ns/<ns>/sa/<sa>; a service account matches as Istio's regex \"spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?\")",
                x.principal
            ),
        }),
        Attr::TrustDomain(_) => p.peer.map_or_else(peer_missing, |x| format!("peer trust domain {:?}", x.trust_domain)),
        Attr::RequestPrincipal(_) => match (p.jwt, p.iss, p.sub) {
            (None, _, _) => "no request principal (no accepted JWT: a request without a token passes authentication but has no identity)".to_owned(),
            (Some(_), Some(i), Some(s)) => format!("request principal \"{i}/{s}\""),
            (Some(_), _, None) => "no request principal (the JWT has no sub claim)".to_owned(),
            (Some(_), None, Some(_)) => "no request principal (the JWT has no iss claim)".to_owned(),
        },
        Attr::SourceIp(_) => opt_ip("source IP", p.source_ip),
        Attr::RemoteIp(_) => opt_ip("remote IP", p.remote_ip),
        Attr::DestIp(_) => opt_ip("destination IP", p.dest_ip),
        Attr::Port(_) => format!("destination port {}", p.port),
        Attr::Host(_) => p.http.map_or("no host (TCP)".into(), |h| format!("host {:?}", h.host)),
        Attr::Method(_) => p.http.map_or("no method (TCP)".into(), |h| format!("method {:?}", h.method)),
        Attr::Path(_) => match p.http {
            None => "no path (TCP)".into(),
            Some(_) if p.path.is_empty() => "no path (CONNECT)".into(),
            Some(h) => {
                let raw = h.path.split('?').next().unwrap_or_default();
                if raw == p.path {
                    format!("path {:?}", p.path)
                } else {
                    format!("normalized path {:?} (from {:?})", p.path, h.path)
                }
            }
        },
        Attr::Header(name, _) => match header_value(p, name) {
            Some(v) => format!("header {name} = {v:?}"),
            None => format!("header {name} absent"),
        },
        Attr::Claim(path, _) => {
            let name: Vec<&str> = path.iter().map(|s| &**s).collect();
            let mut v = p.jwt;
            for seg in path.iter() {
                v = v.and_then(|x| x.get(&**seg));
            }
            match (p.jwt, v) {
                (None, _) => "no JWT claims (no accepted token)".to_owned(),
                (Some(_), None) => format!("claim {} absent", name.join(".")),
                (Some(_), Some(x)) => format!("claim {} = {x}", name.join(".")),
            }
        }
        Attr::Audiences(_) => match p.jwt {
            None => "no JWT audiences (no accepted token)".to_owned(),
            Some(c) => format!("JWT audiences {}", list(&audiences(c).map(str::to_owned).collect::<Vec<_>>())),
        },
        Attr::Presenter(_) => match p.jwt.and_then(|c| c.get("azp")) {
            Some(v) => format!("JWT presenter {v}"),
            None => "no JWT presenter (azp)".to_owned(),
        },
        Attr::Sni(_) => p.sni.map_or("no SNI".into(), |s| format!("SNI {s:?}")),
        Attr::EnvoyFilter => "Envoy filter metadata (never present in Palisade)".into(),
    }
}

impl Decision {
    /// The human-readable form of `palisade authz check`.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let verdict = if self.allowed { "allowed" } else { "denied" };
        let _ = writeln!(s, "DECISION:  {} ({verdict})", self.action.as_str());
        let _ = writeln!(s, "POLICY:    {}", self.policy.as_deref().unwrap_or("none"));
        let _ = writeln!(s, "REASON:    {}", self.reason);
        let _ = writeln!(s, "MTLS:      {}", self.mtls_mode);
        if !self.custom.is_empty() {
            let _ = writeln!(
                s,
                "CUSTOM:    {} (allowed assumes they allow)",
                self.custom.join(", ")
            );
        }
        let _ = writeln!(s, "AUDIT:     {}", if self.audit { "yes" } else { "no" });
        for d in &self.dry_run {
            let _ = writeln!(
                s,
                "DRY-RUN:   {} would {}",
                d.policy,
                if d.would_allow { "allow" } else { "deny" }
            );
        }
        let _ = writeln!(
            s,
            "\n{:<7} {:<48} {:<8} DETAIL",
            "STEP", "POLICY", "MATCHED"
        );
        for t in &self.trace {
            let step = match t.step {
                TraceStep::Mtls => "MTLS",
                TraceStep::Custom => "CUSTOM",
                TraceStep::Jwt => "JWT",
                TraceStep::Deny => "DENY",
                TraceStep::Allow => "ALLOW",
                TraceStep::Audit => "AUDIT",
            };
            let mut policy = t.policy.clone().unwrap_or_else(|| "-".into());
            if t.dry_run {
                policy.push_str(" (dry-run)");
            }
            let matched = match t.matched {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            let _ = writeln!(s, "{step:<7} {policy:<48} {matched:<8} {}", t.detail);
        }
        s
    }
}
