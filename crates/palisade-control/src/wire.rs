//! The wire form of a workload's config: the xDS resource
//! `type.googleapis.com/palisade.config.v1.WorkloadConfig`.
//!
//! The `Any` body is the JSON document below (UTF-8), not protobuf: the policy inputs are
//! Istio's own resources, whose natural encoding is their JSON/YAML form, and the proxy compiles
//! them with the same `palisade-policy` code as every other consumer. Only Palisade proxies ask
//! for this type; Envoy sidecars never see it.
//!
//! The proxy (`palisade-proxy`) has its own reading of this document; the two are kept in step
//! by an end-to-end test and a round-trip test in the proxy crate.

use std::collections::BTreeMap;

use envoy_types::pb::google::protobuf::Any;
use palisade_policy::MeshConfig;
use palisade_policy::api::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WorkloadEntry};
use serde::{Deserialize, Serialize};

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
    /// Packs the JSON document into an `Any` of [`WORKLOAD_CONFIG_TYPE_URL`].
    pub fn to_any(&self) -> Result<Any, serde_json::Error> {
        Ok(Any {
            type_url: WORKLOAD_CONFIG_TYPE_URL.to_owned(),
            value: serde_json::to_vec(self)?,
        })
    }

    /// Reads a packed config.
    pub fn from_any(any: &Any) -> Result<Self, String> {
        if any.type_url != WORKLOAD_CONFIG_TYPE_URL {
            return Err(format!("unexpected resource type {:?}", any.type_url));
        }
        serde_json::from_slice(&any.value).map_err(|e| e.to_string())
    }
}
