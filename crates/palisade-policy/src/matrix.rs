//! The reachability matrix of `palisade authz matrix`: for every source (each WorkloadEntry
//! identity, extra identities, and "no identity"), every destination workload and each of its
//! ports, whether a request can be allowed, under which conditions and by which rules.
//!
//! This module owns the symbolic reading of compiled policies. It never samples requests: for one
//! source and one destination it splits every compiled rule into the part the source decides
//! (peer principal, namespace, service account, trust domain; destination port and address) and
//! the part the request decides (method, path, host, headers, JWT, source IP, SNI), which becomes
//! the rule's condition. A candidate ALLOW rule is then confirmed by a *witness*: a request built
//! from the rule's own constants (a fresh value where it is silent), steering away from the
//! constants of the DENY rules that could match, and decided by the real engine
//! ([`CompiledPolicy::evaluate`]). A grant is listed only with a witness the engine allows, so
//! "can be allowed" is never claimed without proof; "denied" means no witness was found, which is
//! exact when the search was exhaustive over its representative values (see [`Outcome::exhaustive`]).
//!
//! Sources that no check of a destination's policies tells apart share one analysis, so the cost
//! follows the number of distinct situations, not sources times destinations. Pure: no I/O.
//!
//! Limits (where exactness is not guaranteed):
//! - The witness search tries representative values, not every value: for a string field the
//!   constants of the rules involved (wildcards filled with a fresh value), prefix and suffix
//!   combined, and a fresh value; for an IP field the first and last host of each CIDR, the
//!   addresses just outside it, and a few addresses outside the usual ranges; for a JWT, tokens of
//!   the configured issuers with the subjects, audiences, presenters and claims the rules name.
//!   At most 8 values per field, 16 `from` x `to` alternatives per rule and 512 engine
//!   decisions per alternative; a cut sets
//!   `exhaustive: false`. So a grant is always real, but a `denied` cell whose only way in needs
//!   a value outside these representatives (or past the bounds) would be missed.
//! - `always` is claimed only when an ALLOW rule (or the absence of ALLOW policies) admits every
//!   request and no DENY or CUSTOM rule can match at all; a DENY rule whose conditions no request
//!   can meet (a path that normalization always rewrites) still makes the cell `conditional`.
//! - A request whose JWT the RequestAuthentication rejects is refused before authorization; the
//!   classes here are requests with no token or an accepted one.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use serde_json::Value;

use crate::api::{AuthzAction, MtlsMode, WorkloadEntry};
use crate::compile::{Attr, Check, CompileError, CompiledPolicy, CompiledRule, Engine, SkipReason};
use crate::eval::check_matches;
use crate::matcher::{PeerIdentity, canonical_ip, service_account_matches};
use crate::protocol::PortProtocol;
use crate::request::{HeaderValues, HttpSpec, RequestSpec, SourceSpec};
use crate::snapshot::MeshSnapshot;

/// Why a matrix cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    #[error("--identity {value:?}: {reason}")]
    Identity { value: String, reason: String },
    #[error("WorkloadEntry {workload} ({origin}): {source}")]
    Compile {
        workload: String,
        origin: String,
        #[source]
        source: CompileError,
    },
}

/// What to compute beyond the mesh directory.
#[derive(Debug, Clone, Default)]
pub struct MatrixOptions {
    /// Extra callers, as SPIFFE IDs (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub identities: Vec<String>,
}

/// Whether requests of one class (source, destination, port) can be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Every request of the class is allowed (a request whose JWT RequestAuthentication rejects
    /// excepted).
    Always,
    /// Some requests are allowed: see the grants and restrictions.
    Conditional,
    /// No request of the class can be allowed.
    Denied,
}

impl Reachability {
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Always => "always",
            Reachability::Conditional => "conditional",
            Reachability::Denied => "denied",
        }
    }
}

/// Where a source comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The identity of one or more WorkloadEntries.
    Workload,
    /// Given with `--identity`.
    Extra,
    /// A plaintext peer: no identity.
    Plaintext,
}

/// One caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatrixSource {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`, or `none` for a plaintext peer.
    pub id: String,
    pub kind: SourceKind,
    /// The WorkloadEntries (`namespace/name`) that run as this identity.
    pub workloads: Vec<String>,
}

impl MatrixSource {
    /// The peer principal the engine sees, `None` for a plaintext peer.
    pub fn principal(&self) -> Option<&str> {
        match self.kind {
            SourceKind::Plaintext => None,
            _ => Some(&self.id),
        }
    }
}

/// How a destination port's traffic is read, which decides the rules that apply (Istio applies
/// ALLOW rules with HTTP-only fields to HTTP traffic only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficClass {
    Http,
    Tcp,
    /// Undeclared port: the sidecar sniffs, so both HTTP requests and TCP connections arrive.
    Sniffed,
}

/// One destination workload port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatrixDestination {
    /// `namespace/name` of the WorkloadEntry.
    pub workload: String,
    pub port: u16,
    pub port_name: String,
    pub traffic: TrafficClass,
    pub mtls_mode: MtlsMode,
    /// The mode and the PeerAuthentication that set it.
    pub mtls: String,
}

/// An ALLOW rule (or the default allow when no ALLOW policy applies) that admits some requests of
/// the class, with a request it admits that the engine allows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// `ns/name rule[N]`, or `default` when no ALLOW policy applies.
    pub rule: String,
    /// Only with a sniffed port: `http` or `tcp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficClass>,
    /// What the request must carry (empty: nothing); the rule's fields as written.
    pub conditions: Vec<String>,
    /// A request the engine allows; `source.principal` is filled per source by
    /// [`Matrix::witness`].
    pub witness: RequestSpec,
    /// Dry-run policies that would deny the witness (not enforced).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run_would_deny: Vec<String>,
}

/// A DENY rule that can match some requests of the class, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Restriction {
    pub rule: String,
    pub conditions: Vec<String>,
}

/// The analysis of one class of requests; several cells may share it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub reachability: Reachability,
    /// One line: why.
    pub reason: String,
    /// The deciding policy of a denied cell, `ns/name rule[N]` or `ns/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub grants: Vec<Grant>,
    pub restrictions: Vec<Restriction>,
    /// CUSTOM policies that can match: their external authorizer decides too.
    pub custom: Vec<String>,
    /// Dry-run policies on the destination, `ns/name (ACTION)`: never enforced.
    pub dry_run: Vec<String>,
    /// False when the witness search hit its bounds: a rule may then admit requests that no
    /// witness shows (the grants listed are still proven).
    pub exhaustive: bool,
}

/// The whole matrix: every source against every destination port.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub sources: Vec<MatrixSource>,
    pub destinations: Vec<MatrixDestination>,
    pub outcomes: Vec<Outcome>,
    /// Outcome index per (destination, source), destination-major.
    cells: Vec<u32>,
}

/// One cell, borrowed from the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Cell<'m> {
    pub source: &'m MatrixSource,
    pub destination: &'m MatrixDestination,
    pub outcome: &'m Outcome,
}

impl Matrix {
    /// The cell of source `s` and destination `d` (indexes into `sources` and `destinations`).
    pub fn cell(&self, s: usize, d: usize) -> Option<Cell<'_>> {
        let idx = *self.cells.get(d * self.sources.len() + s)?;
        Some(Cell {
            source: self.sources.get(s)?,
            destination: self.destinations.get(d)?,
            outcome: self.outcomes.get(idx as usize)?,
        })
    }

    /// Every cell, by destination then source.
    pub fn cells(&self) -> impl Iterator<Item = Cell<'_>> {
        (0..self.destinations.len())
            .flat_map(move |d| (0..self.sources.len()).filter_map(move |s| self.cell(s, d)))
    }

    /// The cell of a source id (`spiffe://...` or `none`), workload and port.
    pub fn find(&self, source: &str, workload: &str, port: u16) -> Option<Cell<'_>> {
        let s = self.sources.iter().position(|x| x.id == source)?;
        let d = self
            .destinations
            .iter()
            .position(|x| x.workload == workload && x.port == port)?;
        self.cell(s, d)
    }

    /// The witness of a grant as a complete request from this cell's source.
    pub fn witness(cell: &Cell<'_>, grant: &Grant) -> RequestSpec {
        let mut w = grant.witness.clone();
        let principal = cell.source.principal().map(str::to_owned);
        match &mut w.source {
            Some(s) => s.principal = principal,
            None => {
                w.source = Some(SourceSpec {
                    principal,
                    ip: None,
                })
            }
        }
        w
    }

    /// Computes the matrix of a mesh.
    pub fn compute(
        snapshot: &MeshSnapshot,
        options: &MatrixOptions,
    ) -> Result<Matrix, MatrixError> {
        let sources = collect_sources(snapshot, options)?;
        let mut memo = IdentityMemo::new(&sources);
        let mut destinations = Vec::new();
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut cells = Vec::new();
        let mut workloads: Vec<_> = snapshot.workload_entries.iter().collect();
        workloads.sort_by_key(|w| w.resource.key());
        for w in workloads {
            let key = w.resource.key();
            let compiled =
                snapshot
                    .compile_workload(&key)
                    .map_err(|source| MatrixError::Compile {
                        workload: key.clone(),
                        origin: w.origin.to_string(),
                        source,
                    })?;
            let mut ports: Vec<(u16, &str)> = w
                .resource
                .spec
                .ports
                .iter()
                .filter_map(|(name, n)| Some((u16::try_from(*n).ok()?, name.as_str())))
                .collect();
            ports.sort();
            ports.dedup_by_key(|p| p.0);
            for (port, port_name) in ports {
                let traffic = match declared_protocol(snapshot, &w.resource, port_name, port) {
                    p if p.is_http() => TrafficClass::Http,
                    p if p.is_opaque() => TrafficClass::Tcp,
                    _ => TrafficClass::Sniffed,
                };
                let mode = compiled.mtls().for_port(port);
                destinations.push(MatrixDestination {
                    workload: key.clone(),
                    port,
                    port_name: port_name.to_owned(),
                    traffic,
                    mtls_mode: mode.mode,
                    mtls: mode.describe(),
                });
                let analyzer = Analyzer::new(&compiled, &w.resource, port, traffic);
                let columns = memo.columns(&analyzer);
                let mut by_signature: HashMap<Vec<u64>, u32> = HashMap::new();
                let mut sig = Vec::new();
                for (i, s) in sources.iter().enumerate() {
                    memo.signature(&columns, analyzer.mode, i, &mut sig);
                    let idx = match by_signature.get(&sig) {
                        Some(i) => *i,
                        None => {
                            outcomes.push(analyzer.analyze(s.principal()));
                            let i = (outcomes.len() - 1) as u32;
                            by_signature.insert(sig.clone(), i);
                            i
                        }
                    };
                    cells.push(idx);
                }
            }
        }
        Ok(Matrix {
            sources,
            destinations,
            outcomes,
            cells,
        })
    }
}

fn collect_sources(
    snapshot: &MeshSnapshot,
    options: &MatrixOptions,
) -> Result<Vec<MatrixSource>, MatrixError> {
    let td = &snapshot.mesh.trust_domain;
    let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in &snapshot.workload_entries {
        let r = &w.resource;
        let id = format!(
            "spiffe://{td}/ns/{}/sa/{}",
            r.metadata.namespace(),
            r.service_account()
        );
        by_id.entry(id).or_default().push(r.key());
    }
    let mut sources: Vec<MatrixSource> = by_id
        .into_iter()
        .map(|(id, mut workloads)| {
            workloads.sort();
            MatrixSource {
                id,
                kind: SourceKind::Workload,
                workloads,
            }
        })
        .collect();
    for value in &options.identities {
        let bad = |reason: &str| MatrixError::Identity {
            value: value.clone(),
            reason: reason.to_owned(),
        };
        let rest = value
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("expected a SPIFFE ID, spiffe://<trust domain>/ns/<ns>/sa/<sa>"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("a SPIFFE ID needs a path after the trust domain"))?;
        if td.is_empty() || path.is_empty() || value.chars().any(char::is_whitespace) {
            return Err(bad(
                "expected spiffe://<trust domain>/<path> without spaces, e.g. spiffe://cluster.local/ns/dev/sa/client",
            ));
        }
        if !sources.iter().any(|s| s.id == *value) {
            sources.push(MatrixSource {
                id: value.clone(),
                kind: SourceKind::Extra,
                workloads: Vec::new(),
            });
        }
    }
    sources.push(MatrixSource {
        id: "none".into(),
        kind: SourceKind::Plaintext,
        workloads: Vec::new(),
    });
    Ok(sources)
}

/// Identity checks decided once per source for the whole mesh: the same compiled check (a
/// namespace-wide DENY seen by every workload of the namespace) is evaluated once, keyed by its
/// compiled form; a destination's signature of a source is then a gather of bits.
struct IdentityMemo<'s> {
    peers: Vec<Option<PeerIdentity<'s>>>,
    index: HashMap<String, usize>,
    /// Per distinct check: whether it holds for each source.
    columns: Vec<Vec<bool>>,
}

impl<'s> IdentityMemo<'s> {
    fn new(sources: &'s [MatrixSource]) -> IdentityMemo<'s> {
        IdentityMemo {
            peers: sources
                .iter()
                .map(|s| {
                    s.principal()
                        .filter(|p| !p.is_empty())
                        .map(PeerIdentity::parse)
                })
                .collect(),
            index: HashMap::new(),
            columns: Vec::new(),
        }
    }

    /// The distinct columns a destination reads.
    fn columns(&mut self, a: &Analyzer<'_>) -> Vec<usize> {
        let mut out: Vec<usize> = a
            .identity_checks
            .iter()
            .map(|k| {
                let key = format!("{:?}", k.attr);
                match self.index.get(&key) {
                    Some(i) => *i,
                    None => {
                        let col = self
                            .peers
                            .iter()
                            .map(|p| identity_matches(&k.attr, p.as_ref()))
                            .collect();
                        self.columns.push(col);
                        self.index.insert(key, self.columns.len() - 1);
                        self.columns.len() - 1
                    }
                }
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Sources with equal signatures are decided alike by every rule of the destination.
    fn signature(&self, columns: &[usize], mode: MtlsMode, source: usize, out: &mut Vec<u64>) {
        out.clear();
        // DISABLE ignores the caller's identity: every source looks like a plaintext one.
        let peer = mode != MtlsMode::Disable && self.peers.get(source).is_some_and(Option::is_some);
        let mut bits =
            [peer].into_iter().chain(columns.iter().map(|&c| {
                peer && self.columns.get(c).and_then(|col| col.get(source)) == Some(&true)
            }));
        loop {
            let mut word = 0u64;
            let mut n = 0;
            for b in bits.by_ref().take(64) {
                word |= u64::from(b) << n;
                n += 1;
            }
            if n == 0 {
                break;
            }
            out.push(word);
        }
    }
}

/// A ServiceEntry that selects the workload and targets the port with a `protocol` decides, else
/// the port name (as the sidecar reads its inbound ports).
fn declared_protocol(
    snapshot: &MeshSnapshot,
    w: &WorkloadEntry,
    name: &str,
    port: u16,
) -> PortProtocol {
    let ns = w.metadata.namespace();
    snapshot
        .service_entries
        .iter()
        .map(|s| &s.resource)
        .filter(|se| {
            se.metadata.namespace() == ns
                && se.spec.workload_selector.as_ref().is_some_and(|sel| {
                    !sel.labels.is_empty()
                        && sel
                            .labels
                            .iter()
                            .all(|(k, v)| w.spec.labels.get(k) == Some(v))
                })
        })
        .flat_map(|se| &se.spec.ports)
        .filter(|p| p.target_port.unwrap_or(p.number) == u32::from(port))
        .find_map(|p| PortProtocol::parse(&p.protocol))
        .unwrap_or_else(|| PortProtocol::from_port_name(name))
}

// ---------------------------------------------------------------------------------------------
// Per destination port: rules split into the source's part and the request's part
// ---------------------------------------------------------------------------------------------

/// A part of a request that a witness chooses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Slot {
    Method,
    Path,
    Host,
    /// Lowercase header name (other than the pseudo-headers above).
    Header(Box<str>),
    SourceIp,
    RemoteIp,
    Sni,
    /// The validated token: request principal, claims, audiences, presenter.
    Jwt,
}

/// A check the request decides, with the clause it sits in (`from[0]`, `to[1]`, `when`).
#[derive(Debug, Clone)]
struct Free<'c> {
    label: &'c str,
    check: &'c Check,
    slot: Slot,
}

/// One way a rule can match: the checks the request must pass (none: every request).
type Alternative<'c> = Vec<Free<'c>>;

/// What one check depends on.
enum Dependence {
    Fixed(bool),
    Request(Slot),
}

/// A rule's alternatives over the request, for one source.
struct RuleView<'c> {
    rule: &'c CompiledRule,
    alts: Vec<Alternative<'c>>,
    /// Alternatives beyond the cap were dropped (from x to products can grow).
    capped: bool,
}

/// Alternatives of one rule (`from` x `to` clauses) looked at.
const MAX_ALTERNATIVES: usize = 16;
/// Values tried per request field.
const MAX_CANDIDATES: usize = 8;
/// Engine decisions per alternative.
const SEARCH_BUDGET: usize = 512;
/// The value a rule is silent about: matches no constant a policy is likely to hold.
const FRESH: &str = "witness";

struct Analyzer<'c> {
    compiled: &'c CompiledPolicy,
    workload: &'c WorkloadEntry,
    port: u16,
    traffic: TrafficClass,
    mode: MtlsMode,
    /// Every check the peer identity decides (signature of a source).
    identity_checks: Vec<&'c Check>,
}

impl<'c> Analyzer<'c> {
    fn new(
        compiled: &'c CompiledPolicy,
        workload: &'c WorkloadEntry,
        port: u16,
        traffic: TrafficClass,
    ) -> Analyzer<'c> {
        let mut identity_checks = Vec::new();
        // The TCP rules are the HTTP rules, some skipped and some with HTTP fields dropped: the
        // HTTP engine holds every identity check.
        {
            let engine = &compiled.http;
            for set in [
                &engine.custom,
                &engine.deny,
                &engine.allow,
                &engine.dry_allow,
                &engine.dry_deny,
            ] {
                for r in &set.rules {
                    let clauses = r.from.iter().chain(r.to.iter()).chain([&r.when]);
                    for c in clauses {
                        identity_checks.extend(c.checks.iter().filter(|k| {
                            matches!(
                                k.attr,
                                Attr::Principal(_)
                                    | Attr::Namespace(_)
                                    | Attr::ServiceAccount(_)
                                    | Attr::TrustDomain(_)
                            )
                        }));
                    }
                }
            }
        }
        Analyzer {
            compiled,
            workload,
            port,
            traffic,
            mode: compiled.mtls().for_port(port).mode,
            identity_checks,
        }
    }

    /// The peer the engine sees: DISABLE ignores the client's identity.
    fn effective_peer<'p>(&self, principal: Option<&'p str>) -> Option<PeerIdentity<'p>> {
        if self.mode == MtlsMode::Disable {
            return None;
        }
        principal.filter(|p| !p.is_empty()).map(PeerIdentity::parse)
    }

    fn dependence(&self, k: &Check, peer: Option<&PeerIdentity<'_>>, http: bool) -> Dependence {
        let fixed = |b: bool| Dependence::Fixed(b != k.negate);
        let jwt = http && !self.compiled.jwt_rules.is_empty();
        match &k.attr {
            Attr::Principal(_)
            | Attr::Namespace(_)
            | Attr::ServiceAccount(_)
            | Attr::TrustDomain(_) => fixed(identity_matches(&k.attr, peer)),
            Attr::Port(ports) => fixed(ports.contains(&self.port)),
            Attr::DestIp(set) => fixed(
                self.compiled
                    .workload_ip
                    .map(canonical_ip)
                    .is_some_and(|ip| set.contains(ip)),
            ),
            Attr::EnvoyFilter => fixed(false),
            Attr::Host(_) | Attr::Method(_) | Attr::Path(_) | Attr::Header(..) if !http => {
                fixed(false)
            }
            // Without a RequestAuthentication the proxy ignores tokens: no request principal.
            Attr::RequestPrincipal(_)
            | Attr::Claim(..)
            | Attr::Audiences(_)
            | Attr::Presenter(_)
                if !jwt =>
            {
                fixed(false)
            }
            other => match slot_of(other) {
                Some(s) => Dependence::Request(s),
                None => fixed(false),
            },
        }
    }

    fn rule_view(
        &self,
        r: &'c CompiledRule,
        peer: Option<&PeerIdentity<'_>>,
        http: bool,
    ) -> RuleView<'c> {
        let mut view = RuleView {
            rule: r,
            alts: Vec::new(),
            capped: false,
        };
        if r.never {
            return view;
        }
        let clause_alts = |clauses: &'c [crate::compile::Clause]| -> Option<Vec<Alternative<'c>>> {
            if clauses.is_empty() {
                return Some(vec![Vec::new()]);
            }
            let alts: Vec<Alternative<'c>> = clauses
                .iter()
                .filter_map(|c| self.clause_free(c, peer, http))
                .collect();
            (!alts.is_empty()).then_some(alts)
        };
        let Some(from) = clause_alts(&r.from) else {
            return view;
        };
        let Some(to) = clause_alts(&r.to) else {
            return view;
        };
        let Some(when) = self.clause_free(&r.when, peer, http) else {
            return view;
        };
        'outer: for f in &from {
            for t in &to {
                if view.alts.len() == MAX_ALTERNATIVES {
                    view.capped = true;
                    break 'outer;
                }
                let mut alt: Alternative<'c> = f.clone();
                alt.extend(t.iter().cloned());
                alt.extend(when.iter().cloned());
                view.alts.push(alt);
            }
        }
        // An unconditional alternative makes the others redundant.
        if let Some(i) = view.alts.iter().position(Vec::is_empty) {
            view.alts = vec![view.alts.swap_remove(i)];
        }
        view
    }

    /// The request-side checks of a clause, `None` when the source or destination fails it.
    fn clause_free(
        &self,
        c: &'c crate::compile::Clause,
        peer: Option<&PeerIdentity<'_>>,
        http: bool,
    ) -> Option<Alternative<'c>> {
        let mut out = Vec::new();
        for k in c.checks.iter() {
            match self.dependence(k, peer, http) {
                Dependence::Fixed(true) => {}
                Dependence::Fixed(false) => return None,
                Dependence::Request(slot) => {
                    out.push(Free {
                        label: &c.label,
                        check: k,
                        slot,
                    });
                }
            }
        }
        Some(out)
    }

    fn rule_label(&self, r: &CompiledRule) -> String {
        match self.compiled.policies.get(r.policy as usize) {
            Some(p) => format!("{}/{} rule[{}]", p.namespace, p.name, r.rule),
            None => r.id.to_string(),
        }
    }

    fn policy_label(&self, idx: u32) -> String {
        self.compiled
            .policies
            .get(idx as usize)
            .map_or_else(String::new, |p| format!("{}/{}", p.namespace, p.name))
    }

    fn analyze(&self, principal: Option<&str>) -> Outcome {
        let dry_run: Vec<String> = self
            .compiled
            .policies
            .iter()
            .filter(|p| p.dry_run)
            .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.action))
            .collect();
        let peer = self.effective_peer(principal);
        if self.mode == MtlsMode::Strict && peer.is_none() {
            let m = self.compiled.mtls().for_port(self.port);
            return Outcome {
                reachability: Reachability::Denied,
                reason: format!(
                    "port {} requires mTLS: {}; a plaintext peer is refused before authorization",
                    self.port,
                    m.describe()
                ),
                policy: m.policy.as_ref().map(|p| format!("PeerAuthentication {p}")),
                grants: Vec::new(),
                restrictions: Vec::new(),
                custom: Vec::new(),
                dry_run,
                exhaustive: true,
            };
        }
        let mut outcome = match self.traffic {
            TrafficClass::Http => self.analyze_class(principal, peer.as_ref(), true, None),
            TrafficClass::Tcp => self.analyze_class(principal, peer.as_ref(), false, None),
            TrafficClass::Sniffed => {
                let h =
                    self.analyze_class(principal, peer.as_ref(), true, Some(TrafficClass::Http));
                let t =
                    self.analyze_class(principal, peer.as_ref(), false, Some(TrafficClass::Tcp));
                merge_sniffed(h, t)
            }
        };
        if self.mode == MtlsMode::Disable && principal.is_some() {
            outcome.reason.push_str(&format!(
                "; port {} is DISABLE: the sidecar does not verify the caller, so its identity does not count",
                self.port
            ));
        }
        outcome.dry_run = dry_run;
        outcome
    }

    /// One traffic class (HTTP requests or TCP connections).
    fn analyze_class(
        &self,
        principal: Option<&str>,
        peer: Option<&PeerIdentity<'_>>,
        http: bool,
        tag: Option<TrafficClass>,
    ) -> Outcome {
        let engine: &'c Engine = if http {
            &self.compiled.http
        } else {
            &self.compiled.tcp
        };
        let views = |rules: &'c [CompiledRule]| -> Vec<RuleView<'c>> {
            rules
                .iter()
                .map(|r| self.rule_view(r, peer, http))
                .filter(|v| !v.alts.is_empty())
                .collect()
        };
        let custom = views(&engine.custom.rules);
        let deny = views(&engine.deny.rules);
        let allow = views(&engine.allow.rules);
        let mut exhaustive = !deny.iter().chain(&allow).any(|v| v.capped);
        let custom_names: Vec<String> = custom
            .iter()
            .map(|v| {
                let p = self.compiled.policies.get(v.rule.policy as usize);
                let provider = p
                    .and_then(|p| p.provider)
                    .and_then(|i| self.compiled.providers.get(i))
                    .map_or_else(String::new, |n| format!(" (provider {n:?})"));
                let cond = describe_alts(&v.alts);
                format!("{}{provider}{cond}", self.rule_label(v.rule))
            })
            .collect();
        let restrictions: Vec<Restriction> = deny
            .iter()
            .flat_map(|v| {
                v.alts.iter().map(|a| Restriction {
                    rule: self.rule_label(v.rule),
                    conditions: a.iter().map(describe_free).collect(),
                })
            })
            .collect();
        let mut outcome = Outcome {
            reachability: Reachability::Denied,
            reason: String::new(),
            policy: None,
            grants: Vec::new(),
            restrictions,
            custom: custom_names,
            dry_run: Vec::new(),
            exhaustive: true,
        };
        if let Some(v) = deny.iter().find(|v| v.alts.iter().any(Vec::is_empty)) {
            outcome.reason = format!(
                "DENY {} matches every {} from this source",
                self.rule_label(v.rule),
                if http { "request" } else { "connection" }
            );
            outcome.policy = Some(self.rule_label(v.rule));
            outcome.restrictions.clear();
            return outcome;
        }
        let deny_alts: Vec<&Alternative<'c>> = deny.iter().flat_map(|v| v.alts.iter()).collect();
        let search = Search {
            analyzer: self,
            principal,
            http,
            deny: &deny_alts,
        };
        let enforced_allow = self.compiled.enforced_allow > 0;
        let mut unconditional_grant = false;
        if !enforced_allow {
            let (found, complete) = search.witness(&Vec::new());
            exhaustive &= complete;
            if let Some((spec, dry)) = found {
                unconditional_grant = true;
                outcome.grants.push(Grant {
                    rule: "default".into(),
                    traffic: tag,
                    conditions: Vec::new(),
                    witness: spec,
                    dry_run_would_deny: dry,
                });
            }
        } else {
            for v in &allow {
                for alt in &v.alts {
                    let (found, complete) = search.witness(alt);
                    exhaustive &= complete;
                    if let Some((spec, dry)) = found {
                        unconditional_grant |= alt.is_empty();
                        outcome.grants.push(Grant {
                            rule: self.rule_label(v.rule),
                            traffic: tag,
                            conditions: alt.iter().map(describe_free).collect(),
                            witness: spec,
                            dry_run_would_deny: dry,
                        });
                    }
                }
            }
        }
        outcome.exhaustive = exhaustive;
        let what = if http { "request" } else { "connection" };
        if outcome.grants.is_empty() {
            outcome.reachability = Reachability::Denied;
            let (reason, policy) = self.denied_reason(engine, &allow, &deny, enforced_allow, what);
            outcome.reason = reason;
            outcome.policy = policy;
            if !exhaustive {
                outcome
                    .reason
                    .push_str(" (the witness search hit its bounds: not proven exhaustively)");
            }
            return outcome;
        }
        let always = unconditional_grant && deny_alts.is_empty() && outcome.custom.is_empty();
        let jwt_note = if http && !self.compiled.jwt_rules.is_empty() {
            " (a request whose JWT RequestAuthentication rejects is refused first)"
        } else {
            ""
        };
        if always {
            outcome.reachability = Reachability::Always;
            outcome.reason = if enforced_allow {
                format!(
                    "every {what} allowed by ALLOW {}{jwt_note}",
                    outcome.grants[0].rule
                )
            } else {
                format!(
                    "every {what} allowed: no ALLOW policy applies and no DENY rule can match{jwt_note}"
                )
            };
            return outcome;
        }
        outcome.reachability = Reachability::Conditional;
        let mut reason = if enforced_allow {
            // One clause per grant, the first few: "R when A and B; or S".
            let shown: Vec<String> = outcome
                .grants
                .iter()
                .take(3)
                .map(|g| {
                    if g.conditions.is_empty() {
                        g.rule.clone()
                    } else {
                        format!("{} when {}", g.rule, g.conditions.join(" and "))
                    }
                })
                .collect();
            let more = outcome.grants.len().saturating_sub(shown.len());
            let mut r = format!("allowed by ALLOW {}", shown.join("; or "));
            if more > 0 {
                r.push_str(&format!("; or {more} more"));
            }
            r
        } else {
            "allowed by default (no ALLOW policy applies)".to_owned()
        };
        if !outcome.restrictions.is_empty() {
            let mut rules: Vec<&str> = outcome
                .restrictions
                .iter()
                .map(|r| r.rule.as_str())
                .collect();
            rules.dedup();
            reason.push_str(&format!("; except what DENY {} matches", rules.join(", ")));
        }
        if !outcome.custom.is_empty() {
            reason.push_str(&format!(
                "; depends on the external authorizer of CUSTOM {}",
                outcome.custom.join(", ")
            ));
        }
        outcome.reason = reason;
        outcome
    }

    fn denied_reason(
        &self,
        engine: &Engine,
        allow: &[RuleView<'c>],
        deny: &[RuleView<'c>],
        enforced_allow: bool,
        what: &str,
    ) -> (String, Option<String>) {
        let enforced: Vec<&crate::compile::PolicyInfo> = self
            .compiled
            .policies
            .iter()
            .filter(|p| p.action == AuthzAction::Allow && !p.dry_run)
            .collect();
        if enforced_allow && allow.is_empty() {
            if enforced.iter().all(|p| p.rule_count == 0) {
                let names: Vec<String> = enforced
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect();
                return (
                    format!(
                        "ALLOW {} has no rules: it matches nothing, so the workload denies everything",
                        names.join(", ")
                    ),
                    names.first().cloned(),
                );
            }
            let names: Vec<String> = enforced
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            let mut reason = format!(
                "no ALLOW rule admits this source (ALLOW {} {})",
                names.join(", "),
                if names.len() == 1 { "applies" } else { "apply" }
            );
            let skipped = engine
                .skipped
                .iter()
                .filter(|s| matches!(s.reason, SkipReason::HttpFields(_)))
                .filter(|s| {
                    self.compiled
                        .policies
                        .get(s.policy as usize)
                        .is_some_and(|p| p.action == AuthzAction::Allow && !p.dry_run)
                })
                .count();
            if skipped > 0 {
                reason.push_str(&format!(
                    "; {skipped} ALLOW {} HTTP-only fields and never match{} a TCP connection",
                    if skipped == 1 {
                        "rule uses"
                    } else {
                        "rules use"
                    },
                    if skipped == 1 { "es" } else { "" }
                ));
            }
            return (reason, None);
        }
        let mut rules: Vec<String> = deny.iter().map(|v| self.rule_label(v.rule)).collect();
        rules.dedup();
        let policy = deny.first().map(|v| self.policy_label(v.rule.policy));
        if rules.is_empty() {
            (
                format!("no {what} passes: every candidate the ALLOW rules admit is refused"),
                None,
            )
        } else {
            (
                format!(
                    "every {what} the {} admit{} is denied by DENY {}",
                    if enforced_allow {
                        "ALLOW rules"
                    } else {
                        "default (no ALLOW policy)"
                    },
                    if enforced_allow { "" } else { "s" },
                    rules.join(", ")
                ),
                policy,
            )
        }
    }
}

fn merge_sniffed(h: Outcome, t: Outcome) -> Outcome {
    use Reachability::*;
    let reachability = match (h.reachability, t.reachability) {
        (Always, Always) => Always,
        (Denied, Denied) => Denied,
        _ => Conditional,
    };
    let reason = if h.reason == t.reason {
        h.reason.clone()
    } else {
        format!("HTTP: {}; TCP: {}", h.reason, t.reason)
    };
    let mut custom = h.custom;
    for c in t.custom {
        if !custom.contains(&c) {
            custom.push(c);
        }
    }
    let mut restrictions = h.restrictions;
    for r in t.restrictions {
        if !restrictions.contains(&r) {
            restrictions.push(r);
        }
    }
    Outcome {
        reachability,
        reason,
        policy: h.policy.or(t.policy),
        grants: h.grants.into_iter().chain(t.grants).collect(),
        restrictions,
        custom,
        dry_run: Vec::new(),
        exhaustive: h.exhaustive && t.exhaustive,
    }
}

fn identity_matches(a: &Attr, peer: Option<&PeerIdentity<'_>>) -> bool {
    let Some(x) = peer else { return false };
    match a {
        Attr::Principal(s) => s.matches(x.principal),
        Attr::Namespace(pats) => pats.iter().any(|n| n.matches(x)),
        Attr::ServiceAccount(list) => list
            .iter()
            .any(|(ns, sa)| service_account_matches(x, ns, sa)),
        Attr::TrustDomain(s) => s.matches(x.trust_domain),
        _ => false,
    }
}

fn slot_of(a: &Attr) -> Option<Slot> {
    Some(match a {
        Attr::Method(_) => Slot::Method,
        Attr::Path(_) => Slot::Path,
        Attr::Host(_) => Slot::Host,
        Attr::Header(name, _) => match &**name {
            ":method" => Slot::Method,
            ":path" => Slot::Path,
            ":authority" | "host" => Slot::Host,
            n => Slot::Header(n.into()),
        },
        Attr::SourceIp(_) => Slot::SourceIp,
        Attr::RemoteIp(_) => Slot::RemoteIp,
        Attr::Sni(_) => Slot::Sni,
        Attr::RequestPrincipal(_) | Attr::Claim(..) | Attr::Audiences(_) | Attr::Presenter(_) => {
            Slot::Jwt
        }
        _ => return None,
    })
}

fn list(values: &[String]) -> String {
    let shown: Vec<String> = values.iter().take(8).map(|v| format!("{v:?}")).collect();
    if values.len() > 8 {
        format!("[{}, ... {} more]", shown.join(", "), values.len() - 8)
    } else {
        format!("[{}]", shown.join(", "))
    }
}

/// `to[0].operation.methods ["GET"]`, `request.headers[x-a] values ["1"]`: the field as written.
fn describe_free(f: &Free<'_>) -> String {
    if f.label == "when" {
        format!("{} {}", f.check.field, list(&f.check.values))
    } else {
        format!("{}.{} {}", f.label, f.check.field, list(&f.check.values))
    }
}

fn describe_alts(alts: &[Alternative<'_>]) -> String {
    let parts: Vec<String> = alts
        .iter()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.iter()
                .map(describe_free)
                .collect::<Vec<_>>()
                .join(" and ")
        })
        .collect();
    if parts.is_empty() || parts.len() < alts.len() {
        String::new()
    } else {
        format!(" when {}", parts.join(" or "))
    }
}

// ---------------------------------------------------------------------------------------------
// Witness search
// ---------------------------------------------------------------------------------------------

/// A value for one slot.
#[derive(Debug, Clone, PartialEq)]
enum Pick {
    Text(String),
    /// Absent or present (headers, SNI).
    Maybe(Option<String>),
    Ip(IpAddr),
    /// `None`: the remote IP is the source IP.
    MaybeIp(Option<IpAddr>),
    Token(Option<Value>),
}

/// The request being built.
#[derive(Debug, Clone)]
struct Draft {
    method: String,
    path: String,
    host: String,
    headers: BTreeMap<String, String>,
    source_ip: IpAddr,
    remote_ip: Option<IpAddr>,
    sni: Option<String>,
    jwt: Option<Value>,
}

impl Draft {
    fn apply(&mut self, slot: &Slot, pick: &Pick) {
        match (slot, pick) {
            (Slot::Method, Pick::Text(v)) => self.method = v.clone(),
            (Slot::Path, Pick::Text(v)) => self.path = v.clone(),
            (Slot::Host, Pick::Text(v)) => self.host = v.clone(),
            (Slot::Header(n), Pick::Maybe(v)) => match v {
                Some(v) => {
                    self.headers.insert(n.to_string(), v.clone());
                }
                None => {
                    self.headers.remove(&**n);
                }
            },
            (Slot::SourceIp, Pick::Ip(ip)) => self.source_ip = *ip,
            (Slot::RemoteIp, Pick::MaybeIp(ip)) => self.remote_ip = *ip,
            (Slot::Sni, Pick::Maybe(v)) => self.sni = v.clone(),
            (Slot::Jwt, Pick::Token(v)) => self.jwt = v.clone(),
            _ => {}
        }
    }

    fn spec(&self, workload: &str, port: u16, principal: Option<&str>, http: bool) -> RequestSpec {
        RequestSpec {
            workload: workload.to_owned(),
            port,
            destination_ip: None,
            source: Some(SourceSpec {
                principal: principal.map(str::to_owned),
                ip: Some(self.source_ip),
            }),
            remote_ip: self.remote_ip,
            sni: self.sni.clone(),
            http: http.then(|| HttpSpec {
                method: self.method.clone(),
                path: self.path.clone(),
                host: self.host.clone(),
                headers: self
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), HeaderValues::One(v.clone())))
                    .collect(),
            }),
            jwt: if http { self.jwt.clone() } else { None },
        }
    }
}

/// IPs outside the usual policy ranges, tried when a request must avoid a CIDR.
const OUTSIDE_IPS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
    IpAddr::V4(Ipv4Addr::new(10, 99, 0, 10)),
    IpAddr::V4(Ipv4Addr::new(172, 31, 0, 10)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10)),
];

/// A witness the engine allows (its source principal removed, filled per cell) and the dry-run
/// policies that would deny it.
type Found = (RequestSpec, Vec<String>);

struct Search<'s, 'c> {
    analyzer: &'s Analyzer<'c>,
    principal: Option<&'s str>,
    http: bool,
    deny: &'s [&'s Alternative<'c>],
}

impl<'s, 'c> Search<'s, 'c> {
    fn base(&self) -> Draft {
        let w = &self.analyzer.workload;
        Draft {
            method: "GET".into(),
            path: "/".into(),
            host: format!("{}.{}.svc", w.metadata.name, w.metadata.namespace()),
            headers: BTreeMap::new(),
            source_ip: OUTSIDE_IPS[0],
            remote_ip: None,
            sni: None,
            jwt: None,
        }
    }

    /// A request that passes `alt` and the engine allows: `(witness, dry-run denials)`, and
    /// whether the search was complete (no candidate list cut, budget not exhausted).
    fn witness(&self, alt: &Alternative<'c>) -> (Option<Found>, bool) {
        // The slots that matter: the rule's own, and those of the DENY rules to avoid.
        let mut slots: Vec<&Slot> = alt.iter().map(|f| &f.slot).collect();
        for d in self.deny {
            slots.extend(d.iter().map(|f| &f.slot));
        }
        slots.sort();
        slots.dedup();
        let mut complete = true;
        let mut lists: Vec<(&Slot, Vec<Pick>)> = Vec::new();
        for slot in slots {
            let (picks, cut) = self.candidates(slot, alt);
            complete &= !cut;
            if picks.is_empty() {
                return (None, complete);
            }
            lists.push((slot, picks));
        }
        let mut budget = SEARCH_BUDGET;
        let mut draft = self.base();
        let found = self.dfs(&lists, 0, &mut draft, &mut budget);
        if found.is_none() && budget == 0 {
            complete = false;
        }
        (found, complete)
    }

    fn dfs(
        &self,
        lists: &[(&Slot, Vec<Pick>)],
        i: usize,
        draft: &mut Draft,
        budget: &mut usize,
    ) -> Option<Found> {
        if *budget == 0 {
            return None;
        }
        let Some((slot, picks)) = lists.get(i) else {
            *budget -= 1;
            return self.confirm(draft);
        };
        for p in picks {
            let saved = draft.clone();
            draft.apply(slot, p);
            if let Some(found) = self.dfs(lists, i + 1, draft, budget) {
                return Some(found);
            }
            *draft = saved;
            if *budget == 0 {
                return None;
            }
        }
        None
    }

    /// The engine's word on the draft.
    fn confirm(&self, draft: &Draft) -> Option<Found> {
        let a = self.analyzer;
        let key = a.workload.key();
        let spec = draft.spec(&key, a.port, self.principal, self.http);
        let ctx = spec.context();
        let v = a.compiled.evaluate(&ctx).ok()?;
        if !v.allowed {
            return None;
        }
        let dry: Vec<String> = v
            .dry_run
            .iter()
            .filter(|d| !d.would_allow)
            .map(|d| policy_key(d.policy))
            .collect();
        let mut witness = spec;
        if let Some(s) = &mut witness.source {
            s.principal = None;
        }
        Some((witness, dry))
    }

    /// Values for one slot that pass every check of `alt` on it, the ones escaping most DENY
    /// alternatives first; and whether the list was cut.
    fn candidates(&self, slot: &Slot, alt: &Alternative<'c>) -> (Vec<Pick>, bool) {
        let mine: Vec<&Check> = alt
            .iter()
            .filter(|f| &f.slot == slot)
            .map(|f| f.check)
            .collect();
        let theirs: Vec<Vec<&Check>> = self
            .deny
            .iter()
            .map(|d| {
                d.iter()
                    .filter(|f| &f.slot == slot)
                    .map(|f| f.check)
                    .collect::<Vec<_>>()
            })
            .filter(|v: &Vec<&Check>| !v.is_empty())
            .collect();
        let mut raws: Vec<&str> = Vec::new();
        for k in mine.iter().chain(theirs.iter().flatten()) {
            raws.extend(k.values.iter().map(String::as_str));
        }
        let mut picks = self.generate(slot, &raws, &mine, &theirs);
        picks.retain(|p| mine.iter().all(|k| self.probe(slot, p, k)));
        // Escaping a DENY alternative takes one failing check: count the alternatives escaped.
        let mut scored: Vec<(usize, Pick)> = picks
            .into_iter()
            .map(|p| {
                let escaped = theirs
                    .iter()
                    .filter(|checks| checks.iter().any(|k| !self.probe(slot, &p, k)))
                    .count();
                (escaped, p)
            })
            .collect();
        scored.sort_by_key(|s| std::cmp::Reverse(s.0));
        let mut out: Vec<Pick> = Vec::new();
        for (_, p) in scored {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        let cut = out.len() > MAX_CANDIDATES;
        out.truncate(MAX_CANDIDATES);
        (out, cut)
    }

    /// Whether `k` holds for a request that differs from the base only in `slot`.
    fn probe(&self, slot: &Slot, pick: &Pick, k: &Check) -> bool {
        let a = self.analyzer;
        let mut d = self.base();
        d.apply(slot, pick);
        let spec = d.spec("", a.port, None, true);
        let ctx = spec.context();
        let Ok((mut p, _)) = a.compiled.prepare(&ctx) else {
            return false;
        };
        if let Some(claims) = &spec.jwt {
            p.jwt = Some(claims);
            p.iss = claims.get("iss").and_then(Value::as_str);
            p.sub = claims.get("sub").and_then(Value::as_str);
        }
        check_matches(k, &p)
    }

    fn generate(
        &self,
        slot: &Slot,
        raws: &[&str],
        mine: &[&Check],
        theirs: &[Vec<&Check>],
    ) -> Vec<Pick> {
        match slot {
            Slot::Method => text_candidates("GET", "WITNESS", "", raws)
                .into_iter()
                .map(Pick::Text)
                .collect(),
            Slot::Path => text_candidates("/", FRESH, "/", raws)
                .into_iter()
                .filter(|p| p.starts_with('/'))
                .map(Pick::Text)
                .collect(),
            Slot::Host => text_candidates(&self.base().host, FRESH, "", raws)
                .into_iter()
                .map(Pick::Text)
                .collect(),
            Slot::Header(_) | Slot::Sni => {
                let mut v = vec![Pick::Maybe(None)];
                v.extend(
                    text_candidates(FRESH, FRESH, "", raws)
                        .into_iter()
                        .map(|s| Pick::Maybe(Some(s))),
                );
                v
            }
            Slot::SourceIp => ip_candidates(raws).into_iter().map(Pick::Ip).collect(),
            Slot::RemoteIp => std::iter::once(Pick::MaybeIp(None))
                .chain(
                    ip_candidates(raws)
                        .into_iter()
                        .map(|ip| Pick::MaybeIp(Some(ip))),
                )
                .collect(),
            Slot::Jwt => self.jwt_candidates(mine, theirs),
        }
    }

    /// Tokens an accepted issuer could sign: no token, and for each issuer the subjects,
    /// audiences, presenters and claims the checks name (or fresh ones).
    fn jwt_candidates(&self, mine: &[&Check], theirs: &[Vec<&Check>]) -> Vec<Pick> {
        let rules = &self.analyzer.compiled.jwt_rules;
        let mut out = vec![Pick::Token(None)];
        let mut issuers: Vec<String> = Vec::new();
        let mut subs: Vec<String> = vec![FRESH.into()];
        let mut auds: Vec<String> = Vec::new();
        let mut azps: Vec<String> = Vec::new();
        let mut claims: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        let all = mine.iter().chain(theirs.iter().flatten());
        for k in all {
            for raw in k.values.iter() {
                match &k.attr {
                    Attr::RequestPrincipal(_) => match raw.rsplit_once('/') {
                        Some((i, s)) => {
                            issuers.push(fill(i, FRESH));
                            subs.push(fill(s, FRESH));
                        }
                        None => {
                            issuers.push(fill(raw, FRESH));
                            subs.push(fill(raw, FRESH));
                        }
                    },
                    Attr::Audiences(_) => auds.push(fill(raw, FRESH)),
                    Attr::Presenter(_) => azps.push(fill(raw, FRESH)),
                    Attr::Claim(path, _) => {
                        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                        match claims.iter_mut().find(|(p, _)| *p == path) {
                            Some((_, v)) => v.push(fill(raw, FRESH)),
                            None => claims.push((path, vec![fill(raw, FRESH)])),
                        }
                    }
                    _ => {}
                }
            }
        }
        // Only configured issuers pass authentication; an issuer-less rule accepts any.
        let mut accepted: Vec<(String, Option<String>)> = Vec::new();
        for r in rules {
            let aud = r.rule.audiences.first().cloned();
            if r.rule.issuer.is_empty() {
                for i in issuers.iter().chain([&"https://issuer.witness".to_owned()]) {
                    accepted.push((i.clone(), aud.clone()));
                }
            } else {
                accepted.push((r.rule.issuer.clone(), aud));
            }
        }
        accepted.dedup();
        subs.dedup();
        let aud_choices: Vec<Option<&String>> = std::iter::once(None)
            .chain(auds.iter().map(Some))
            .take(4)
            .collect();
        let azp_choices: Vec<Option<&String>> = std::iter::once(None)
            .chain(azps.iter().map(Some))
            .take(3)
            .collect();
        for (iss, base_aud) in accepted.iter().take(4) {
            for sub in subs.iter().take(6) {
                for aud in &aud_choices {
                    for azp in &azp_choices {
                        for fresh_claims in [false, true] {
                            let mut c = serde_json::Map::new();
                            c.insert("iss".into(), Value::String(iss.clone()));
                            c.insert("sub".into(), Value::String(sub.clone()));
                            let mut a: Vec<Value> = Vec::new();
                            if let Some(b) = base_aud {
                                a.push(Value::String(b.clone()));
                            }
                            if let Some(x) = aud {
                                a.push(Value::String((*x).clone()));
                            }
                            if !a.is_empty() {
                                c.insert("aud".into(), Value::Array(a));
                            }
                            if let Some(x) = azp {
                                c.insert("azp".into(), Value::String((*x).clone()));
                            }
                            for (path, values) in &claims {
                                let v = if fresh_claims {
                                    FRESH.to_owned()
                                } else {
                                    values.first().cloned().unwrap_or_else(|| FRESH.into())
                                };
                                insert_claim(&mut c, path, v);
                            }
                            out.push(Pick::Token(Some(Value::Object(c))));
                        }
                    }
                }
            }
        }
        out
    }
}

fn insert_claim(obj: &mut serde_json::Map<String, Value>, path: &[String], v: String) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for seg in parents {
        let entry = cur
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(serde_json::Map::new());
        }
        match entry {
            Value::Object(m) => cur = m,
            _ => return,
        }
    }
    cur.insert(last.clone(), Value::String(v));
}

/// An Istio string value turned into one value it matches: `*` a fresh value, `abc*` `abc` and
/// a fresh tail, `*abc` a fresh head and `abc`, a path template with fresh segments.
fn fill(raw: &str, fresh: &str) -> String {
    if raw == "*" {
        fresh.to_owned()
    } else if raw.contains("{*}") || raw.contains("{**}") {
        raw.replace("{**}", fresh).replace("{*}", fresh)
    } else if let Some(s) = raw.strip_prefix('*') {
        format!("{fresh}{s}")
    } else if let Some(p) = raw.strip_suffix('*') {
        format!("{p}{fresh}")
    } else {
        raw.to_owned()
    }
}

/// Representative values of a string slot: the default, each constant filled in, prefix and
/// suffix combined (a value can match a prefix and a suffix at once), and a fresh value.
/// `lead` starts a fresh value (paths start with `/`).
fn text_candidates(default: &str, fresh: &str, lead: &str, raws: &[&str]) -> Vec<String> {
    let mut out = vec![default.to_owned()];
    let fresh_full = format!("{lead}{fresh}");
    let mut prefixes = vec![lead.to_owned()];
    let mut suffixes = vec![String::new()];
    for raw in raws {
        if *raw == "*" {
            out.push(fresh_full.clone());
        } else if raw.contains("{*}") || raw.contains("{**}") {
            out.push(fill(raw, fresh));
        } else if let Some(s) = raw.strip_prefix('*') {
            out.push(format!("{fresh_full}{s}"));
            suffixes.push(s.to_owned());
        } else if let Some(p) = raw.strip_suffix('*') {
            out.push(format!("{p}{fresh}"));
            prefixes.push(p.to_owned());
        } else {
            out.push((*raw).to_owned());
        }
    }
    for p in prefixes.iter().take(8) {
        for s in suffixes.iter().take(8) {
            let p = if p.is_empty() { lead } else { p.as_str() };
            out.push(format!("{p}{fresh}{s}"));
        }
    }
    out.push(fresh_full);
    out.dedup();
    out
}

/// Addresses inside each CIDR (first and last host) and outside the usual ranges.
fn ip_candidates(raws: &[&str]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for raw in raws {
        let Ok(net) = crate::validate::parse_ip_or_cidr(raw) else {
            continue;
        };
        let first = net.network();
        let last = net.broadcast();
        out.push(
            step(first, 1)
                .filter(|ip| net.contains(ip))
                .unwrap_or(first),
        );
        out.push(step(last, -1).filter(|ip| net.contains(ip)).unwrap_or(last));
        // Just outside, for a request that must avoid this block.
        if let Some(ip) = step(last, 1) {
            out.push(ip);
        }
        if let Some(ip) = step(first, -1) {
            out.push(ip);
        }
    }
    out.extend(OUTSIDE_IPS);
    let mut seen = Vec::new();
    out.retain(|ip| {
        let keep = !seen.contains(ip);
        seen.push(*ip);
        keep
    });
    out
}

fn step(ip: IpAddr, by: i8) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) => {
            let n = u32::from(v4);
            let n = if by > 0 {
                n.checked_add(1)?
            } else {
                n.checked_sub(1)?
            };
            Some(IpAddr::V4(Ipv4Addr::from(n)))
        }
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            let n = if by > 0 {
                n.checked_add(1)?
            } else {
                n.checked_sub(1)?
            };
            Some(IpAddr::V6(Ipv6Addr::from(n)))
        }
    }
}

/// `ns[a]-policy[b]` or `ns[a]-policy[b]-rule[2]` as `a/b` (`a/b rule[2]`).
fn policy_key(id: &str) -> String {
    let inner = |s: &str, start: &str| -> Option<String> {
        let i = s.find(start)? + start.len();
        let j = s[i..].find(']')?;
        Some(s[i..i + j].to_owned())
    };
    match (inner(id, "ns["), inner(id, "-policy[")) {
        (Some(ns), Some(name)) => match inner(id, "-rule[") {
            Some(r) => format!("{ns}/{name} rule[{r}]"),
            None => format!("{ns}/{name}"),
        },
        _ => id.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// The JSON document of `palisade authz matrix --output json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatrixDocument<'m> {
    pub sources: &'m [MatrixSource],
    pub destinations: &'m [MatrixDestination],
    pub cells: Vec<CellDocument<'m>>,
}

/// One cell of the JSON document.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CellDocument<'m> {
    /// Source id: `spiffe://...` or `none`.
    pub source: &'m str,
    pub workload: &'m str,
    pub port: u16,
    pub verdict: Reachability,
    pub reason: &'m str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<&'m str>,
    pub grants: Vec<Grant>,
    pub restrictions: &'m [Restriction],
    pub custom: &'m [String],
    pub dry_run: &'m [String],
    pub exhaustive: bool,
}

impl Matrix {
    /// The JSON document (witnesses carry each cell's source principal).
    pub fn document(&self) -> MatrixDocument<'_> {
        MatrixDocument {
            sources: &self.sources,
            destinations: &self.destinations,
            cells: self
                .cells()
                .map(|c| CellDocument {
                    source: &c.source.id,
                    workload: &c.destination.workload,
                    port: c.destination.port,
                    verdict: c.outcome.reachability,
                    reason: &c.outcome.reason,
                    policy: c.outcome.policy.as_deref(),
                    grants: c
                        .outcome
                        .grants
                        .iter()
                        .map(|g| Grant {
                            witness: Matrix::witness(&c, g),
                            ..g.clone()
                        })
                        .collect(),
                    restrictions: &c.outcome.restrictions,
                    custom: &c.outcome.custom,
                    dry_run: &c.outcome.dry_run,
                    exhaustive: c.outcome.exhaustive,
                })
                .collect(),
        }
    }

    /// One line per cell: source, destination port, verdict, short reason.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let src_w = self
            .sources
            .iter()
            .map(|x| x.id.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let dst: Vec<String> = self
            .destinations
            .iter()
            .map(|d| format!("{}:{}", d.workload, d.port))
            .collect();
        let dst_w = dst.iter().map(String::len).max().unwrap_or(11).max(11);
        let _ = writeln!(
            s,
            "{:<src_w$}  {:<dst_w$}  {:<11}  REASON",
            "SOURCE", "DESTINATION", "VERDICT"
        );
        for c in self.cells() {
            let d = format!("{}:{}", c.destination.workload, c.destination.port);
            let mut reason = c.outcome.reason.clone();
            if !c.outcome.dry_run.is_empty() {
                reason.push_str(&format!(
                    " [dry run, not enforced: {}]",
                    c.outcome.dry_run.join(", ")
                ));
            }
            let _ = writeln!(
                s,
                "{:<src_w$}  {:<dst_w$}  {:<11}  {}",
                c.source.id,
                d,
                c.outcome.reachability.as_str(),
                reason
            );
        }
        s
    }

    /// Graphviz: workloads (and callers without a workload) as nodes, an edge per caller and
    /// destination that can be allowed, labelled with its ports (`?` marks conditional ones);
    /// always-allowed edges solid, conditional ones dashed.
    pub fn to_dot(&self) -> String {
        let mut s = String::from(
            "digraph palisade_authz_matrix {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
        let mut nodes: Vec<String> = self
            .destinations
            .iter()
            .map(|d| d.workload.clone())
            .collect();
        for src in &self.sources {
            nodes.extend(src.workloads.iter().cloned());
        }
        nodes.sort();
        nodes.dedup();
        for n in &nodes {
            let _ = writeln!(s, "  {};", quote(n));
        }
        for src in &self.sources {
            if src.workloads.is_empty() {
                let label = match src.kind {
                    SourceKind::Plaintext => "no identity (plaintext)".to_owned(),
                    _ => src.id.clone(),
                };
                let _ = writeln!(
                    s,
                    "  {} [shape=ellipse, style=dashed, label={}];",
                    quote(&src.id),
                    quote(&label)
                );
            }
        }
        // (from node, to workload) -> (ports, all always)
        let mut edges: BTreeMap<(String, String), (Vec<String>, bool)> = BTreeMap::new();
        for c in self.cells() {
            let r = c.outcome.reachability;
            if r == Reachability::Denied {
                continue;
            }
            let port = match r {
                Reachability::Always => c.destination.port.to_string(),
                _ => format!("{}?", c.destination.port),
            };
            let froms: Vec<String> = if c.source.workloads.is_empty() {
                vec![c.source.id.clone()]
            } else {
                c.source.workloads.clone()
            };
            for f in froms {
                let e = edges
                    .entry((f, c.destination.workload.clone()))
                    .or_insert_with(|| (Vec::new(), true));
                if !e.0.contains(&port) {
                    e.0.push(port.clone());
                }
                e.1 &= r == Reachability::Always;
            }
        }
        for ((from, to), (ports, always)) in &edges {
            let _ = writeln!(
                s,
                "  {} -> {} [label={}{}];",
                quote(from),
                quote(to),
                quote(&ports.join(",")),
                if *always { "" } else { ", style=dashed" }
            );
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
mod tests;
