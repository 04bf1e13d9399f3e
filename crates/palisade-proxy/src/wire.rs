//! The proxy's reading of the control plane's `palisade.config.v1.WorkloadConfig` resource (a
//! JSON document in the `Any` body; see `palisade-control`'s `wire` module for the writer). The
//! two sides only share the wire format; a round-trip test keeps them in step.

use std::collections::BTreeMap;

use palisade_policy::MeshConfig;
use palisade_policy::api::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WorkloadEntry};
use serde::{Deserialize, Serialize};

/// The type URL the proxy subscribes to.
pub const WORKLOAD_CONFIG_TYPE_URL: &str = "type.googleapis.com/palisade.config.v1.WorkloadConfig";

/// One workload's config as pushed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadConfig {
    pub workload: String,
    pub mesh: MeshConfig,
    pub workload_entry: WorkloadEntry,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    #[serde(default)]
    pub request_authentications: Vec<RequestAuthentication>,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    pub destinations: Vec<Destination>,
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A workload the proxy may send to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub key: String,
    pub namespace: String,
    pub address: String,
    pub service_account: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    pub sidecar: bool,
    #[serde(default)]
    pub plaintext_ports: Vec<u16>,
}

/// ServiceEntry hosts and the destinations behind them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    #[serde(default)]
    pub target_port: Option<u32>,
    #[serde(default)]
    pub protocol: String,
}
