//! `palisade describe workload`: the effective security configuration of one workload (mTLS mode
//! per port with the policy that set it, JWT issuers, authorization policies by action, ignored
//! resources), as a serializable value and as a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::api::{AuthzAction, MtlsMode};
use crate::resolve::{Ignored, MtlsLevel, PolicyScope};
use crate::snapshot::MeshSnapshot;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDescription {
    /// `namespace/name`.
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    /// `<td>/ns/<ns>/sa/<sa>`: the principal peers see.
    pub principal: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// ServiceEntry hosts that select this workload.
    pub services: Vec<String>,
    pub mtls: MtlsDescription,
    pub jwt: Vec<JwtIssuer>,
    pub authorization: AuthorizationDescription,
    pub ignored: Vec<Ignored>,
    /// What the configuration adds up to, in words.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MtlsDescription {
    pub mode: MtlsMode,
    pub level: MtlsLevel,
    pub policy: Option<String>,
    pub ports: Vec<PortMode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMode {
    pub port: u16,
    /// The WorkloadEntry port name, when the port is declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub mode: MtlsMode,
    pub level: MtlsLevel,
    pub policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtIssuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwks_uri: String,
    pub inline_jwks: bool,
    /// `namespace/name` of the RequestAuthentication.
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationDescription {
    pub custom: Vec<PolicyDescription>,
    pub deny: Vec<PolicyDescription>,
    pub allow: Vec<PolicyDescription>,
    pub audit: Vec<PolicyDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDescription {
    /// `namespace/name`.
    pub name: String,
    /// `ns[<ns>]-policy[<name>]`.
    pub id: String,
    pub scope: PolicyScope,
    pub rules: usize,
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Describes the WorkloadEntry `namespace/name`; `None` when it does not exist.
pub fn describe_workload(snapshot: &MeshSnapshot, key: &str) -> Option<WorkloadDescription> {
    let w = snapshot.workload(key)?;
    let we = &w.resource;
    let resolved = snapshot.resolve_workload(key)?;
    let namespace = we.metadata.namespace().to_owned();
    let services = snapshot
        .service_entries
        .iter()
        .filter(|s| {
            let ns = s.resource.metadata.namespace();
            ns == namespace
                && s.resource
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|sel| {
                        sel.labels
                            .iter()
                            .all(|(k, v)| we.spec.labels.get(k) == Some(v))
                    })
        })
        .flat_map(|s| s.resource.spec.hosts.clone())
        .collect();

    let mut ports: BTreeMap<u16, Option<String>> = BTreeMap::new();
    for (name, port) in &we.spec.ports {
        if let Ok(p) = u16::try_from(*port) {
            ports.insert(p, Some(name.clone()));
        }
    }
    for p in resolved.mtls.ports.keys() {
        ports.entry(*p).or_insert(None);
    }
    let port_modes = ports
        .into_iter()
        .map(|(port, name)| {
            let m = resolved.mtls.for_port(port);
            PortMode {
                port,
                name,
                mode: m.mode,
                level: m.level,
                policy: m.policy.clone(),
            }
        })
        .collect();
    let mtls = MtlsDescription {
        mode: resolved.mtls.workload.mode,
        level: resolved.mtls.workload.level,
        policy: resolved.mtls.workload.policy.clone(),
        ports: port_modes,
    };
    let jwt = resolved
        .jwt_rules
        .iter()
        .map(|r| JwtIssuer {
            issuer: r.rule.issuer.clone(),
            audiences: r.rule.audiences.clone(),
            jwks_uri: r.rule.jwks_uri.clone(),
            inline_jwks: !r.rule.jwks.is_empty(),
            policy: r.policy.clone(),
        })
        .collect::<Vec<_>>();
    let describe = |action: AuthzAction| -> Vec<PolicyDescription> {
        resolved
            .by_action(action)
            .map(|p| PolicyDescription {
                name: p.key(),
                id: format!(
                    "ns[{}]-policy[{}]",
                    p.policy.metadata.namespace(),
                    p.policy.metadata.name
                ),
                scope: p.scope,
                rules: p.policy.spec.rules.as_ref().map_or(0, Vec::len),
                dry_run: p.dry_run,
                provider: p.policy.spec.provider.as_ref().map(|x| x.name.clone()),
            })
            .collect()
    };
    let authorization = AuthorizationDescription {
        custom: describe(AuthzAction::Custom),
        deny: describe(AuthzAction::Deny),
        allow: describe(AuthzAction::Allow),
        audit: describe(AuthzAction::Audit),
    };
    let mut notes = Vec::new();
    let enforced_allow: Vec<&PolicyDescription> =
        authorization.allow.iter().filter(|p| !p.dry_run).collect();
    if enforced_allow.is_empty() {
        notes.push(
            "no enforced ALLOW policy: requests that no DENY or CUSTOM policy stops are allowed"
                .into(),
        );
    } else {
        notes.push(format!(
            "{} enforced ALLOW {}: requests that match none of them are denied",
            enforced_allow.len(),
            if enforced_allow.len() == 1 {
                "policy"
            } else {
                "policies"
            }
        ));
        for p in enforced_allow.iter().filter(|p| p.rules == 0) {
            notes.push(format!("ALLOW policy {} has no rules: it allows nothing (deny-all unless another ALLOW matches)", p.name));
        }
    }
    if !jwt.is_empty() {
        notes.push(
            "RequestAuthentication rejects invalid tokens only: requests without a token pass with no request principal".into(),
        );
    }
    if mtls.ports.iter().any(|p| p.mode == MtlsMode::Permissive)
        || mtls.mode == MtlsMode::Permissive
    {
        notes.push(
            "PERMISSIVE ports accept plaintext: principal-based rules never match plaintext peers"
                .into(),
        );
    }
    let td = snapshot.mesh.trust_domain.clone();
    Some(WorkloadDescription {
        workload: key.to_owned(),
        principal: format!("{td}/ns/{namespace}/sa/{}", we.service_account()),
        namespace,
        service_account: we.service_account().to_owned(),
        address: we.spec.address.clone(),
        labels: we.spec.labels.clone(),
        services,
        mtls,
        jwt,
        authorization,
        ignored: resolved.ignored,
        notes,
    })
}

fn level(l: MtlsLevel) -> &'static str {
    match l {
        MtlsLevel::Default => "default",
        MtlsLevel::Mesh => "mesh",
        MtlsLevel::Namespace => "namespace",
        MtlsLevel::Workload => "workload",
        MtlsLevel::Port => "port",
    }
}

impl WorkloadDescription {
    /// The human-readable form.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Workload:        {}", self.workload);
        let _ = writeln!(s, "Principal:       {}", self.principal);
        if !self.address.is_empty() {
            let _ = writeln!(s, "Address:         {}", self.address);
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "Labels:          {}", labels.join(","));
        if !self.services.is_empty() {
            let _ = writeln!(s, "Services:        {}", self.services.join(", "));
        }
        let _ = writeln!(
            s,
            "mTLS:            {} ({} level{})",
            self.mtls.mode,
            level(self.mtls.level),
            self.mtls
                .policy
                .as_ref()
                .map(|p| format!(", PeerAuthentication {p}"))
                .unwrap_or_default()
        );
        if !self.mtls.ports.is_empty() {
            let _ = writeln!(
                s,
                "\nPORT    NAME             MODE        LEVEL      POLICY"
            );
            for p in &self.mtls.ports {
                let _ = writeln!(
                    s,
                    "{:<7} {:<16} {:<11} {:<10} {}",
                    p.port,
                    p.name.as_deref().unwrap_or("-"),
                    p.mode.as_str(),
                    level(p.level),
                    p.policy.as_deref().unwrap_or("-")
                );
            }
        }
        let _ = writeln!(s);
        if self.jwt.is_empty() {
            let _ = writeln!(s, "JWT issuers:     none (tokens are not inspected)");
        } else {
            let _ = writeln!(
                s,
                "ISSUER                                   AUDIENCES              REQUESTAUTHENTICATION"
            );
            for j in &self.jwt {
                let aud = if j.audiences.is_empty() {
                    "-".to_owned()
                } else {
                    j.audiences.join(",")
                };
                let _ = writeln!(
                    s,
                    "{:<40} {:<22} {}",
                    if j.issuer.is_empty() { "-" } else { &j.issuer },
                    aud,
                    j.policy
                );
            }
        }
        let _ = writeln!(
            s,
            "\nACTION   AUTHORIZATIONPOLICY                       SCOPE         RULES  DRY-RUN"
        );
        let a = &self.authorization;
        let mut any = false;
        for (action, list) in [
            ("CUSTOM", &a.custom),
            ("DENY", &a.deny),
            ("ALLOW", &a.allow),
            ("AUDIT", &a.audit),
        ] {
            for p in list {
                any = true;
                let scope = match p.scope {
                    PolicyScope::Mesh => "mesh",
                    PolicyScope::MeshSelector => "mesh+selector",
                    PolicyScope::Namespace => "namespace",
                    PolicyScope::Workload => "workload",
                };
                let name = match &p.provider {
                    Some(pr) => format!("{} -> {pr}", p.name),
                    None => p.name.clone(),
                };
                let _ = writeln!(
                    s,
                    "{:<8} {:<41} {:<13} {:<6} {}",
                    action,
                    name,
                    scope,
                    p.rules,
                    if p.dry_run { "yes" } else { "no" }
                );
            }
        }
        if !any {
            let _ = writeln!(s, "(none)");
        }
        if !self.ignored.is_empty() {
            let _ = writeln!(s, "\nIgnored:");
            for i in &self.ignored {
                let _ = writeln!(s, "  {} {}: {}", i.kind, i.policy, i.reason);
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nNotes:");
            for n in &self.notes {
                let _ = writeln!(s, "  - {n}");
            }
        }
        s
    }
}
