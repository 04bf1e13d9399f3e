//! The mesh DNS counter, registered in the sidecar's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    /// `mesh` (answered from the mesh config), `forwarded` (relayed from an upstream
    /// resolver), `failed` (no upstream answered: SERVFAIL, or nothing for an unreadable query).
    pub result: &'static str,
}

/// `palisade_dns_requests_total{protocol, result}`.
#[derive(Debug, Clone, Default)]
pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
}

impl DnsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "palisade_dns_requests",
            "DNS queries the sidecar received, by protocol and by how they were answered",
            self.requests.clone(),
        );
    }

    pub(crate) fn count(&self, protocol: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&DnsLabels { protocol, result })
            .inc();
    }
}
