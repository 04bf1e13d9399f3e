//! The agent's Prometheus metrics (served by the admin endpoint).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of failure counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// See [`crate::source::FetchError::reason`].
    pub reason: String,
}

/// Everything the agent counts. Cheap to clone (all handles).
#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    /// Unix time at which the served certificate expires.
    pub cert_expiry_timestamp: Gauge<f64, AtomicU64>,
    /// Unix time of the next planned renewal.
    pub next_rotation_timestamp: Gauge<f64, AtomicU64>,
    /// Certificates obtained (the first one included).
    pub certs_issued: Counter,
    /// Served certificates replaced by a new one.
    pub rotations: Counter,
    /// Failed attempts to get a certificate, by reason.
    pub failures: Family<ReasonLabel, Counter>,
    /// Open SDS streams.
    pub sds_streams: Gauge,
    /// SDS responses sent.
    pub sds_pushes: Counter,
    /// SDS responses the proxy rejected.
    pub sds_nacks: Counter,
}

impl AgentMetrics {
    /// Registers every metric in `registry` (names prefixed `palisade_agent_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("palisade_agent");
        r.register(
            "cert_expiry_timestamp_seconds",
            "Unix time at which the served workload certificate expires",
            self.cert_expiry_timestamp.clone(),
        );
        r.register(
            "next_rotation_timestamp_seconds",
            "Unix time of the next planned certificate renewal",
            self.next_rotation_timestamp.clone(),
        );
        r.register(
            "certs_issued",
            "Workload certificates obtained from the CA",
            self.certs_issued.clone(),
        );
        r.register(
            "cert_rotations",
            "Served workload certificates replaced by a renewed one",
            self.rotations.clone(),
        );
        r.register(
            "cert_failures",
            "Failed attempts to obtain a workload certificate, by reason",
            self.failures.clone(),
        );
        r.register("sds_streams", "Open SDS streams", self.sds_streams.clone());
        r.register(
            "sds_pushes",
            "SDS responses sent to proxies",
            self.sds_pushes.clone(),
        );
        r.register(
            "sds_nacks",
            "SDS responses rejected by proxies",
            self.sds_nacks.clone(),
        );
    }

    /// Counts one failure.
    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
}
