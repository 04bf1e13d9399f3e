//! The control plane's config-side metrics (prometheus-client), served on its admin port next to
//! the CA's `palisade_ca_*` (see [`crate::admin`]):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `palisade_control_config_pushes_total` | counter | config responses sent to proxies over ADS |
//! | `palisade_control_config_nacks_total` | counter | responses a proxy rejected (NACK) |
//! | `palisade_control_connected_proxies` | gauge | open ADS streams |
//! | `palisade_control_jwks_fetches_total{result}` | counter | JWKS fetches, `result="success"` or `"failure"` |
//! | `palisade_control_envoy_translation_errors_total` | counter | Envoy configs that could not be generated (not pushed; the Envoy keeps its last good config) |

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use palisade_xds::{RequestKind, RequestOutcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// The config side's metrics. Cheap to clone (each metric is shared); unregistered ones still
/// count, they are just not scraped.
#[derive(Debug, Clone, Default)]
pub struct ControlMetrics {
    pub config_pushes: Counter,
    pub config_nacks: Counter,
    pub connected_proxies: Gauge,
    pub jwks_fetches: Family<ResultLabel, Counter>,
    pub envoy_translation_errors: Counter,
}

impl ControlMetrics {
    /// New metrics, registered under `palisade_control_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("palisade_control");
        sub.register(
            "config_pushes",
            "Config responses sent to proxies over ADS",
            m.config_pushes.clone(),
        );
        sub.register(
            "config_nacks",
            "Config responses a proxy rejected (xDS NACK)",
            m.config_nacks.clone(),
        );
        sub.register(
            "connected_proxies",
            "Proxies with an open ADS stream",
            m.connected_proxies.clone(),
        );
        sub.register(
            "jwks_fetches",
            "JWKS fetches for RequestAuthentication rules, by result",
            m.jwks_fetches.clone(),
        );
        sub.register(
            "envoy_translation_errors",
            "Envoy configs that could not be generated from the mesh config (not pushed)",
            m.envoy_translation_errors.clone(),
        );
        m
    }

    /// Counts one JWKS fetch.
    pub fn jwks_fetched(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.jwks_fetches
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The JWKS fetches counted so far with this result.
    pub fn jwks_fetch_count(&self, ok: bool) -> u64 {
        let result = if ok { "success" } else { "failure" };
        self.jwks_fetches
            .get_or_create(&ResultLabel { result })
            .get()
    }
}

/// Counts pushes, NACKs and open streams of the ADS server.
impl palisade_xds::StreamObserver for ControlMetrics {
    fn on_open(&self, _stream: u64) {
        self.connected_proxies.inc();
    }

    fn on_request(&self, _stream: u64, _type_url: &str, outcome: &RequestOutcome) {
        if matches!(outcome.kind, RequestKind::Nack { .. }) {
            self.config_nacks.inc();
        }
    }

    fn on_response(&self, _stream: u64, _resp: &DiscoveryResponse) {
        self.config_pushes.inc();
    }

    fn on_close(&self, _stream: u64, _error: Option<&tonic::Status>) {
        self.connected_proxies.dec();
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use palisade_xds::StreamObserver as _;

    use super::*;

    #[test]
    fn observer_counts_pushes_nacks_and_streams() {
        let mut registry = Registry::default();
        let m = ControlMetrics::register(&mut registry);
        m.on_open(1);
        m.on_open(2);
        m.on_response(1, &DiscoveryResponse::default());
        let nack = RequestOutcome {
            kind: RequestKind::Nack {
                kept_version: "1".into(),
                message: "bad".into(),
            },
            names_changed: false,
        };
        m.on_request(1, "t", &nack);
        let ack = RequestOutcome {
            kind: RequestKind::Ack {
                version: "1".into(),
            },
            names_changed: false,
        };
        m.on_request(1, "t", &ack);
        m.on_close(2, None);
        m.jwks_fetched(true);
        m.jwks_fetched(false);
        m.jwks_fetched(false);
        let text = render(&registry);
        for line in [
            "palisade_control_config_pushes_total 1",
            "palisade_control_config_nacks_total 1",
            "palisade_control_connected_proxies 1",
            "palisade_control_jwks_fetches_total{result=\"success\"} 1",
            "palisade_control_jwks_fetches_total{result=\"failure\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
    }
}
