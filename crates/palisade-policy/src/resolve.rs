//! Scope resolution: which PeerAuthentication, RequestAuthentication and AuthorizationPolicy
//! resources apply to one workload (namespace + labels), and what they add up to: the effective
//! mTLS mode per port with the policy that set it, the combined JWT rules, and the authorization
//! policies by action. Facts sheet sections 1-3.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::api::*;
use crate::snapshot::{MeshSnapshot, Sourced};
use crate::validate::parse_timestamp;

/// The workload being resolved.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadRef<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Where an mTLS mode came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsLevel {
    /// Nothing set it: PERMISSIVE.
    Default,
    Mesh,
    Namespace,
    Workload,
    Port,
}

/// An effective mTLS mode (never UNSET) and the PeerAuthentication that decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeSource {
    pub mode: MtlsMode,
    pub level: MtlsLevel,
    /// `namespace/name` of the deciding PeerAuthentication, `None` for the default.
    pub policy: Option<String>,
}

impl ModeSource {
    /// "STRICT (PeerAuthentication prod/default, namespace level)".
    pub fn describe(&self) -> String {
        match &self.policy {
            Some(p) => format!(
                "{} (PeerAuthentication {p}, {} level)",
                self.mode,
                level_name(self.level)
            ),
            None => format!("{} (default: no PeerAuthentication sets a mode)", self.mode),
        }
    }
}

fn level_name(l: MtlsLevel) -> &'static str {
    match l {
        MtlsLevel::Default => "default",
        MtlsLevel::Mesh => "mesh",
        MtlsLevel::Namespace => "namespace",
        MtlsLevel::Workload => "workload",
        MtlsLevel::Port => "port",
    }
}

/// A resource that was considered and ignored, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub kind: Kind,
    /// `namespace/name`.
    pub policy: String,
    pub reason: String,
}

/// The mTLS resolution of one workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MtlsResolution {
    /// The workload-level mode (ports without a port-level setting use it).
    pub workload: ModeSource,
    /// Port-level modes from the workload's PeerAuthentication.
    pub ports: BTreeMap<u16, ModeSource>,
}

impl MtlsResolution {
    /// The mode for a destination (workload) port.
    pub fn for_port(&self, port: u16) -> &ModeSource {
        self.ports.get(&port).unwrap_or(&self.workload)
    }
}

/// One JWT rule with the RequestAuthentication it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedJwtRule {
    /// `namespace/name` of the RequestAuthentication.
    pub policy: String,
    pub rule: JwtRule,
}

/// How an AuthorizationPolicy reaches the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyScope {
    /// Root namespace, no selector: every workload.
    Mesh,
    /// Root namespace with a selector: matching workloads in every namespace.
    MeshSelector,
    /// The workload's namespace, no selector.
    Namespace,
    /// The workload's namespace with a matching selector.
    Workload,
}

/// An AuthorizationPolicy that applies to the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedPolicy {
    pub policy: Arc<AuthorizationPolicy>,
    pub scope: PolicyScope,
    pub dry_run: bool,
}

impl AppliedPolicy {
    pub fn action(&self) -> AuthzAction {
        self.policy.action()
    }
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.policy.metadata.namespace(),
            self.policy.metadata.name
        )
    }
}

/// Everything that applies to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPolicies {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub mtls: MtlsResolution,
    /// The combined JWT rules of every applicable RequestAuthentication.
    pub jwt_rules: Vec<ResolvedJwtRule>,
    /// `namespace/name` of every applicable RequestAuthentication.
    pub request_authentications: Vec<String>,
    /// Applicable AuthorizationPolicies, CUSTOM first, then DENY, ALLOW, AUDIT; by name within.
    pub authorization: Vec<AppliedPolicy>,
    /// Resources in scope that do not take effect, and why.
    pub ignored: Vec<Ignored>,
}

impl ResolvedPolicies {
    /// Applicable policies with one action (dry-run ones included).
    pub fn by_action(&self, action: AuthzAction) -> impl Iterator<Item = &AppliedPolicy> {
        self.authorization
            .iter()
            .filter(move |p| p.action() == action)
    }
}

fn selector_is_empty(sel: &Option<WorkloadSelector>) -> bool {
    sel.as_ref().is_none_or(|s| s.match_labels.is_empty())
}

fn has_target_ref(
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
) -> bool {
    target_ref.is_some() || !target_refs.is_empty()
}

/// Istio's tie-break for several policies at one level: oldest, then name, then namespace.
fn age_key(meta: &ObjectMeta) -> (i128, String, String) {
    (
        meta.creation_timestamp
            .as_deref()
            .and_then(parse_timestamp)
            .unwrap_or(i128::MIN),
        meta.name.clone(),
        meta.namespace().to_owned(),
    )
}

fn key_of(meta: &ObjectMeta) -> String {
    format!("{}/{}", meta.namespace(), meta.name)
}

impl MeshSnapshot {
    /// Resolves the WorkloadEntry `namespace/name`; `None` when it does not exist.
    pub fn resolve_workload(&self, key: &str) -> Option<ResolvedPolicies> {
        let w = self.workload(key)?;
        let spec_labels = &w.resource.spec.labels;
        Some(self.resolve(WorkloadRef {
            namespace: w.resource.metadata.namespace(),
            labels: spec_labels,
        }))
    }

    /// Resolves what applies to a workload with this namespace and these labels.
    pub fn resolve(&self, w: WorkloadRef<'_>) -> ResolvedPolicies {
        let root = self.mesh.root_namespace.as_str();
        let mut ignored = Vec::new();
        let mtls = self.resolve_mtls(w, root, &mut ignored);

        let mut jwt_rules = Vec::new();
        let mut request_authentications = Vec::new();
        let mut ra: Vec<&Sourced<RequestAuthentication>> = self
            .request_authentications
            .iter()
            .filter(|r| {
                let ns = r.resource.metadata.namespace();
                ns == root || ns == w.namespace
            })
            .collect();
        ra.sort_by_key(|r| {
            (
                r.resource.metadata.namespace() != root,
                key_of(&r.resource.metadata),
            )
        });
        for r in ra {
            let spec = &r.resource.spec;
            if has_target_ref(&spec.target_ref, &spec.target_refs) {
                ignored.push(Ignored {
                    kind: Kind::RequestAuthentication,
                    policy: key_of(&r.resource.metadata),
                    reason: "targetRef policies apply to waypoints and gateways, not to sidecar workloads".into(),
                });
                continue;
            }
            let applies = selector_is_empty(&spec.selector)
                || spec.selector.as_ref().is_some_and(|s| s.matches(w.labels));
            if !applies {
                continue;
            }
            let key = key_of(&r.resource.metadata);
            for rule in &spec.jwt_rules {
                jwt_rules.push(ResolvedJwtRule {
                    policy: key.clone(),
                    rule: rule.clone(),
                });
            }
            request_authentications.push(key);
        }

        let mut authorization = Vec::new();
        for p in &self.authorization_policies {
            let meta = &p.resource.metadata;
            let ns = meta.namespace();
            if ns != root && ns != w.namespace {
                continue;
            }
            let spec = &p.resource.spec;
            let empty_sel = selector_is_empty(&spec.selector);
            let selected = empty_sel || spec.selector.as_ref().is_some_and(|s| s.matches(w.labels));
            if !selected {
                continue;
            }
            if has_target_ref(&spec.target_ref, &spec.target_refs) {
                ignored.push(Ignored {
                    kind: Kind::AuthorizationPolicy,
                    policy: key_of(meta),
                    reason: "targetRef policies apply to waypoints and gateways, not to sidecar workloads".into(),
                });
                continue;
            }
            let scope = match (ns == root, empty_sel) {
                (true, true) => PolicyScope::Mesh,
                (true, false) => PolicyScope::MeshSelector,
                (false, true) => PolicyScope::Namespace,
                (false, false) => PolicyScope::Workload,
            };
            authorization.push(AppliedPolicy {
                dry_run: p.resource.is_dry_run(),
                policy: p.resource.clone(),
                scope,
            });
        }
        let action_rank = |a: AuthzAction| match a {
            AuthzAction::Custom => 0,
            AuthzAction::Deny => 1,
            AuthzAction::Allow => 2,
            AuthzAction::Audit => 3,
        };
        authorization.sort_by_key(|p| (action_rank(p.action()), key_of(&p.policy.metadata)));

        ResolvedPolicies {
            namespace: w.namespace.to_owned(),
            labels: w.labels.clone(),
            mtls,
            jwt_rules,
            request_authentications,
            authorization,
            ignored,
        }
    }

    fn resolve_mtls(
        &self,
        w: WorkloadRef<'_>,
        root: &str,
        ignored: &mut Vec<Ignored>,
    ) -> MtlsResolution {
        let mut mesh_level = Vec::new();
        let mut ns_level = Vec::new();
        let mut wl_level = Vec::new();
        for p in &self.peer_authentications {
            let meta = &p.resource.metadata;
            let ns = meta.namespace();
            let empty_sel = selector_is_empty(&p.resource.spec.selector);
            if ns == root {
                if empty_sel {
                    mesh_level.push(&p.resource);
                } else if p
                    .resource
                    .spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| s.matches(w.labels))
                {
                    ignored.push(Ignored {
                        kind: Kind::PeerAuthentication,
                        policy: key_of(meta),
                        reason: format!(
                            "a PeerAuthentication with a selector in the root namespace ({root}) is ignored; move it to the workload's namespace"
                        ),
                    });
                }
            } else if ns == w.namespace {
                if empty_sel {
                    ns_level.push(&p.resource);
                } else if p
                    .resource
                    .spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| s.matches(w.labels))
                {
                    wl_level.push(&p.resource);
                }
            }
        }
        let mut pick = |mut list: Vec<&Arc<PeerAuthentication>>,
                        level: &str|
         -> Option<Arc<PeerAuthentication>> {
            list.sort_by_key(|p| age_key(&p.metadata));
            let winner = list.first().map(|p| (*p).clone());
            if let Some(win) = &winner {
                for other in list.iter().skip(1) {
                    ignored.push(Ignored {
                        kind: Kind::PeerAuthentication,
                        policy: key_of(&other.metadata),
                        reason: format!(
                            "several {level}-level PeerAuthentications apply; the oldest, {}, wins",
                            key_of(&win.metadata)
                        ),
                    });
                }
            }
            winner
        };
        let mesh_pa = pick(mesh_level, "mesh");
        let ns_pa = pick(ns_level, "namespace");
        let wl_pa = pick(wl_level, "workload");

        let mut workload = ModeSource {
            mode: MtlsMode::Permissive,
            level: MtlsLevel::Default,
            policy: None,
        };
        for (pa, level) in [
            (&mesh_pa, MtlsLevel::Mesh),
            (&ns_pa, MtlsLevel::Namespace),
            (&wl_pa, MtlsLevel::Workload),
        ] {
            if let Some(pa) = pa {
                let mode = pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
                if mode != MtlsMode::Unset {
                    workload = ModeSource {
                        mode,
                        level,
                        policy: Some(key_of(&pa.metadata)),
                    };
                }
            }
        }
        let mut ports = BTreeMap::new();
        if let Some(pa) = &wl_pa {
            for (port, m) in pa.spec.port_level_mtls.iter().flatten() {
                let Ok(port) = port.parse::<u16>() else {
                    continue;
                };
                let source = if m.mode == MtlsMode::Unset {
                    workload.clone()
                } else {
                    ModeSource {
                        mode: m.mode,
                        level: MtlsLevel::Port,
                        policy: Some(key_of(&pa.metadata)),
                    }
                };
                ports.insert(port, source);
            }
        }
        MtlsResolution { workload, ports }
    }
}
