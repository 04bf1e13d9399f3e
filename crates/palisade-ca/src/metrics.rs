//! CA metrics (prometheus-client): certificates issued, requests refused by reason, signing
//! latency, failed TLS handshakes on the CA port, and the time left on the CA's own certificates.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
/// Re-exported so callers need not depend on prometheus-client to hold the registry.
pub use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Labels of `palisade_ca_signing_cert_expiry_seconds`: which certificate of the CA's chain.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `root` or `intermediate`.
    pub cert: String,
    /// Lowercase hex, to tell several roots or intermediates apart.
    pub serial: String,
}

/// The CA's metrics. Cheap to clone (each metric is shared).
#[derive(Debug, Clone)]
pub struct CaMetrics {
    pub issued: Counter,
    pub refused: Family<ReasonLabel, Counter>,
    /// CSR check plus signing, in seconds.
    pub sign_seconds: Histogram,
    pub handshake_failures: Counter,
    /// Seconds until notAfter of each certificate of the CA's chain (negative once expired).
    pub signing_cert_expiry: Family<CertLabels, Gauge>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self {
            issued: Counter::default(),
            refused: Family::default(),
            // 25 µs .. ~0.8 s
            sign_seconds: Histogram::new(exponential_buckets(0.000_025, 2.0, 16)),
            handshake_failures: Counter::default(),
            signing_cert_expiry: Family::default(),
        }
    }
}

impl CaMetrics {
    /// New metrics, registered under `palisade_ca_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("palisade_ca");
        sub.register(
            "certificates_issued",
            "Workload certificates issued",
            m.issued.clone(),
        );
        sub.register(
            "requests_refused",
            "Certificate requests refused, by reason",
            m.refused.clone(),
        );
        sub.register(
            "sign_duration_seconds",
            "Time to check a CSR and sign the certificate",
            m.sign_seconds.clone(),
        );
        sub.register(
            "tls_handshake_failures",
            "Connections to the CA port that failed the TLS handshake",
            m.handshake_failures.clone(),
        );
        sub.register(
            "signing_cert_expiry_seconds",
            "Seconds until notAfter of each certificate of the CA's chain (negative once expired)",
            m.signing_cert_expiry.clone(),
        );
        m
    }

    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The refusals counted so far for `reason`.
    pub fn refused_count(&self, reason: &str) -> u64 {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .get()
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
