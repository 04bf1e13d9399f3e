//! The per-workload config document the control plane pushes to Palisade proxies (xDS type
//! `type.googleapis.com/palisade.config.v1.WorkloadConfig`, carried as JSON in the `Any` body).
//!
//! It holds the policy inputs uncompiled (Istio's own resources, whose natural encoding is their
//! JSON/YAML form) so that the proxy compiles them with the same code as every other consumer,
//! plus the routing data the proxy needs for its outbound side. One definition, shared by the
//! writer (`palisade-control`) and the reader (`palisade-proxy`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{
    AuthorizationPolicy, PeerAuthentication, RequestAuthentication, Resource, WorkloadEntry,
};
use crate::error::LoadErrors;
use crate::mesh::MeshConfig;
use crate::snapshot::MeshSnapshot;

/// The type URL of [`WorkloadConfig`] resources.
pub const WORKLOAD_CONFIG_TYPE_URL: &str = "type.googleapis.com/palisade.config.v1.WorkloadConfig";

/// Everything one proxy needs: its policies (uncompiled: the proxy compiles) and its destinations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadConfig {
    /// `namespace/name` of the WorkloadEntry.
    pub workload: String,
    pub mesh: MeshConfig,
    /// The workload's own entry (address, ports, labels, annotations, service account).
    pub workload_entry: WorkloadEntry,
    /// Policies of the workload's namespace and of the root namespace (resolution picks from
    /// these).
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    #[serde(default)]
    pub request_authentications: Vec<RequestAuthentication>,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Every workload of the mesh, as a destination.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// ServiceEntry hosts and the destinations behind them.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A workload this proxy may send to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub address: String,
    pub service_account: String,
    /// Port name to port number.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Whether a sidecar stands beside it (auto mTLS sends mutual TLS to it).
    pub sidecar: bool,
    /// Ports whose effective PeerAuthentication mode is DISABLE: auto mTLS sends plaintext there.
    #[serde(default)]
    pub plaintext_ports: Vec<u16>,
}

/// A ServiceEntry as routing data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// `namespace/name` of the ServiceEntry.
    pub name: String,
    pub hosts: Vec<String>,
    /// The ServiceEntry's `addresses` (virtual IPs): a captured connection to one of them is
    /// routed as a connection to the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The virtual IPs the control plane allocated (from 240.240.0.0/16) to the hosts of a
    /// ServiceEntry that declares no `addresses`, by host: the sidecar's mesh DNS answers the
    /// host with it, and a captured connection to it is routed as one to a declared address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub auto_addresses: BTreeMap<String, std::net::Ipv4Addr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Keys of the destinations its `workloadSelector` selects (same namespace).
    #[serde(default)]
    pub endpoints: Vec<String>,
}

/// A service port and the workload port it maps to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    /// The workload port; `number` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

impl WorkloadConfig {
    /// The JSON body of the xDS resource.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Reads a JSON body.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The workload's own entry and the policies pushed with it as a validated snapshot, from
    /// which to resolve or compile this workload (what every consumer of a push does first: the
    /// sidecar, and the Envoy translator).
    pub fn snapshot(&self) -> Result<MeshSnapshot, LoadErrors> {
        let mut resources = Vec::with_capacity(
            1 + self.peer_authentications.len()
                + self.request_authentications.len()
                + self.authorization_policies.len(),
        );
        resources.push(Resource::WorkloadEntry(self.workload_entry.clone()));
        resources.extend(
            self.peer_authentications
                .iter()
                .cloned()
                .map(Resource::PeerAuthentication),
        );
        resources.extend(
            self.request_authentications
                .iter()
                .cloned()
                .map(Resource::RequestAuthentication),
        );
        resources.extend(
            self.authorization_policies
                .iter()
                .cloned()
                .map(Resource::AuthorizationPolicy),
        );
        MeshSnapshot::from_resources(self.mesh.clone(), resources)
    }
}

/// Member of an empty key set the control plane pushes for a JWKS it could not fetch yet; its
/// value is the reason. Proxies refuse that rule's tokens (fail closed).
pub const JWKS_FETCH_ERROR_MEMBER: &str = "x-palisade-fetch-error";

/// What an admin dump prints in place of a secret (the string Envoy's config dump uses).
pub const REDACTED: &str = "[redacted]";

/// JWK members that say which key it is without giving the key away.
const JWK_DESCRIPTIVE_MEMBERS: &[&str] = &["kid", "kty", "alg", "use", "key_ops", "crv"];

impl WorkloadConfig {
    /// A copy fit for an admin endpoint: key material replaced by [`REDACTED`]. Inline JWKS
    /// keep each key's descriptive members (`kid`, `kty`, `alg`, `use`, `key_ops`, `crv`) so a
    /// reader can still tell which keys a rule holds, but every other member (RSA/EC public
    /// values, `oct` HMAC secrets, any private part, certificates) is redacted; so are the
    /// mesh's inline CA token issuer keys and the values of ext_authz
    /// `includeAdditionalHeadersInCheck` (static credentials sent to the authorizer).
    pub fn redacted(&self) -> Self {
        let mut out = self.clone();
        for ra in &mut out.request_authentications {
            for rule in &mut ra.spec.jwt_rules {
                if !rule.jwks.is_empty() {
                    rule.jwks = redact_jwks(&rule.jwks);
                }
            }
        }
        for issuer in &mut out.mesh.ca_token_issuers {
            if let Some(jwks) = &mut issuer.jwks {
                *jwks = redact_jwks(jwks);
            }
        }
        for provider in &mut out.mesh.extension_providers {
            if let Some(http) = &mut provider.envoy_ext_authz_http {
                for value in http.include_additional_headers_in_check.values_mut() {
                    REDACTED.clone_into(value);
                }
            }
        }
        out
    }
}

/// A JWKS document with every key's material redacted; a document that is not a JWKS object is
/// redacted whole (it could be anything, including a bare secret).
pub fn redact_jwks(jwks: &str) -> String {
    let Ok(serde_json::Value::Object(mut doc)) = serde_json::from_str::<serde_json::Value>(jwks)
    else {
        return REDACTED.to_owned();
    };
    for (member, value) in &mut doc {
        match (member.as_str(), value) {
            ("keys", serde_json::Value::Array(keys)) => {
                for key in keys {
                    redact_jwk(key);
                }
            }
            // The control plane's fetch-error marker is a reason, not a key; keep it.
            (JWKS_FETCH_ERROR_MEMBER, _) => {}
            (_, v) => *v = serde_json::Value::String(REDACTED.to_owned()),
        }
    }
    serde_json::Value::Object(doc).to_string()
}

fn redact_jwk(key: &mut serde_json::Value) {
    let serde_json::Value::Object(members) = key else {
        *key = serde_json::Value::String(REDACTED.to_owned());
        return;
    };
    for (name, value) in members.iter_mut() {
        if !JWK_DESCRIPTIVE_MEMBERS.contains(&name.as_str()) {
            *value = serde_json::Value::String(REDACTED.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn config(jwks: &str) -> WorkloadConfig {
        let doc = serde_json::json!({
            "workload": "shop/web",
            "mesh": {
                "trustDomain": "cluster.local",
                "caTokenIssuers": [{"issuer": "https://idp", "jwks": r#"{"keys":[{"kty":"EC","kid":"ca","crv":"P-256","x":"CAX","y":"CAY"}]}"#}],
                "extensionProviders": [{"name": "authz", "envoyExtAuthzHttp": {
                    "service": "authz.svc", "port": 8000,
                    "includeAdditionalHeadersInCheck": {"x-api-key": "hunter2"}
                }}]
            },
            "workloadEntry": {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": "web", "namespace": "shop"}, "spec": {"address": "127.0.0.1"}},
            "requestAuthentications": [{"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                "metadata": {"name": "jwt", "namespace": "shop"},
                "spec": {"jwtRules": [{"issuer": "https://idp", "jwksUri": "https://idp/keys", "jwks": jwks}]}}]
        });
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn redaction_hides_key_material_and_keeps_what_identifies_keys() {
        let cases: &[(&str, &str, &[&str], &[&str])] = &[
            (
                "RSA and HMAC keys",
                r#"{"keys":[{"kty":"RSA","kid":"r1","alg":"RS256","use":"sig","n":"MODULUS","e":"AQAB"},{"kty":"oct","kid":"h1","alg":"HS256","k":"SECRETBYTES"}]}"#,
                &[
                    "\"kid\":\"r1\"",
                    "\"kid\":\"h1\"",
                    "\"alg\":\"HS256\"",
                    "\"n\":\"[redacted]\"",
                    "\"k\":\"[redacted]\"",
                ],
                &["MODULUS", "AQAB", "SECRETBYTES"],
            ),
            (
                "EC private key",
                r#"{"keys":[{"kty":"EC","kid":"e1","crv":"P-256","x":"XX","y":"YY","d":"PRIVATE"}]}"#,
                &["\"crv\":\"P-256\"", "\"d\":\"[redacted]\""],
                &["PRIVATE", "\"XX\"", "\"YY\""],
            ),
            (
                "fetch error marker",
                r#"{"keys":[],"x-palisade-fetch-error":"connection refused"}"#,
                &["connection refused"],
                &[],
            ),
            (
                "not JSON",
                "raw-secret-bytes",
                &["[redacted]"],
                &["raw-secret-bytes"],
            ),
            (
                "unknown top-level member",
                r#"{"keys":[],"extra":"S3CR3T"}"#,
                &["[redacted]"],
                &["S3CR3T"],
            ),
        ];
        for (name, input, present, absent) in cases {
            let original = config(input);
            let red = original.redacted();
            let rule = &red.request_authentications[0].spec.jwt_rules[0];
            for p in *present {
                assert!(
                    rule.jwks.contains(p),
                    "{name}: {p:?} missing from {}",
                    rule.jwks
                );
            }
            for a in *absent {
                assert!(
                    !rule.jwks.contains(a),
                    "{name}: {a:?} left in {}",
                    rule.jwks
                );
            }
            assert_eq!(
                (rule.issuer.as_str(), rule.jwks_uri.as_str()),
                ("https://idp", "https://idp/keys"),
                "{name}"
            );
            let all = serde_json::to_string(&red).unwrap();
            assert!(!all.contains("hunter2") && !all.contains("CAX"), "{all}");
            assert!(
                all.contains("x-api-key") && all.contains(r#"\"kid\":\"ca\""#),
                "{all}"
            );
            // The original is untouched: the proxy enforces with it.
            assert_eq!(
                original.request_authentications[0].spec.jwt_rules[0].jwks,
                *input
            );
        }
    }
}
