//! The per-workload config document the control plane pushes to Palisade proxies (xDS type
//! `type.googleapis.com/palisade.config.v1.WorkloadConfig`, carried as JSON in the `Any` body).
//!
//! It holds the policy inputs uncompiled (Istio's own resources, whose natural encoding is their
//! JSON/YAML form) so that the proxy compiles them with the same code as every other consumer,
//! plus the routing data the proxy needs for its outbound side. One definition, shared by the
//! writer (`palisade-control`) and the reader (`palisade-proxy`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WorkloadEntry};
use crate::mesh::MeshConfig;

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
}
