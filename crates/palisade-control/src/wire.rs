//! Palisade's own xDS resource: the [`WorkloadConfig`] document (defined in `palisade-policy`,
//! shared with the proxy that reads it) packed into an `Any` of [`WORKLOAD_CONFIG_TYPE_URL`].
//! Only Palisade proxies ask for this type; Envoy sidecars never see it.

use envoy_types::pb::google::protobuf::Any;
pub use palisade_policy::workload_config::{
    Destination, Service, ServicePort, WORKLOAD_CONFIG_TYPE_URL, WorkloadConfig,
};

/// Packs a config into an `Any` of [`WORKLOAD_CONFIG_TYPE_URL`].
pub fn to_any(config: &WorkloadConfig) -> Result<Any, serde_json::Error> {
    Ok(Any {
        type_url: WORKLOAD_CONFIG_TYPE_URL.to_owned(),
        value: config.to_json()?,
    })
}

/// Reads a packed config.
pub fn from_any(any: &Any) -> Result<WorkloadConfig, String> {
    if any.type_url != WORKLOAD_CONFIG_TYPE_URL {
        return Err(format!("unexpected resource type {:?}", any.type_url));
    }
    WorkloadConfig::from_json(&any.value).map_err(|e| e.to_string())
}
