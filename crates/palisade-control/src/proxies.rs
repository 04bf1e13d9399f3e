//! Who is connected over ADS and how far each proxy has got: per stream, the proxy's kind
//! (Palisade's sidecar or Envoy), its workload and identity, and per resource type the version
//! last pushed, the version last ACKed and the last NACK with the proxy's own error detail. For
//! Envoy streams, also the last config that could not be translated (it is never pushed).
//!
//! Served as JSON on the admin endpoint's `/debug/syncz` (istiod's name for the same view) and
//! shown by `palisade status`. A [`StreamStatus`] is each stream's [`StreamObserver`]: it keeps
//! its entry up to date and forwards to the metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use palisade_xds::{RequestKind, RequestOutcome, StreamObserver};
use serde::{Deserialize, Serialize};

/// Which proxy is on the other end of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    /// Palisade's sidecar (`palisade.config.v1.WorkloadConfig`).
    Palisade,
    /// An Envoy sidecar (listeners and clusters).
    Envoy,
}

/// One resource type on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSync {
    /// The version of the latest response sent.
    pub pushed_version: Option<String>,
    /// The version the proxy last accepted.
    pub acked_version: Option<String>,
    /// The proxy's error detail of its latest rejection, cleared by the next ACK.
    pub last_nack: Option<String>,
    /// Responses sent.
    pub pushes: u64,
    /// Responses rejected.
    pub nacks: u64,
}

/// One connected proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySync {
    /// The stream's id (unique in this control plane's lifetime).
    pub stream: u64,
    pub kind: ProxyKind,
    /// The WorkloadEntry it serves, `namespace/name`.
    pub workload: String,
    /// The SPIFFE ID of its client certificate.
    pub identity: String,
    /// Its address, when known.
    pub remote: Option<String>,
    /// Unix seconds.
    pub connected_since: u64,
    /// By type URL.
    pub types: BTreeMap<String, TypeSync>,
    /// The latest input that could not be translated for this proxy (Envoy only): it keeps
    /// the last good config until the input is fixed.
    pub translate_error: Option<String>,
}

impl ProxySync {
    /// Whether every type the proxy subscribed to has ACKed what was last pushed.
    pub fn in_sync(&self) -> bool {
        self.translate_error.is_none()
            && self.types.values().all(|t| {
                t.last_nack.is_none()
                    && t.pushed_version.is_some()
                    && t.pushed_version == t.acked_version
            })
    }
}

/// The registry of connected proxies; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ProxyRegistry {
    inner: Arc<Mutex<BTreeMap<u64, ProxySync>>>,
}

static NEXT_ENTRY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ProxyRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream; the returned observer updates its entry and removes it on close.
    pub fn register(
        &self,
        kind: ProxyKind,
        workload: &str,
        identity: &str,
        remote: Option<String>,
        forward: Arc<dyn StreamObserver>,
    ) -> Arc<StreamStatus> {
        let entry = NEXT_ENTRY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let connected_since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.lock().insert(
            entry,
            ProxySync {
                stream: entry,
                kind,
                workload: workload.to_owned(),
                identity: identity.to_owned(),
                remote,
                connected_since,
                types: BTreeMap::new(),
                translate_error: None,
            },
        );
        Arc::new(StreamStatus {
            registry: self.clone(),
            entry,
            forward,
        })
    }

    /// Every connected proxy, by stream.
    pub fn list(&self) -> Vec<ProxySync> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxySync>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, entry: u64, f: impl FnOnce(&mut ProxySync)) {
        if let Some(p) = self.lock().get_mut(&entry) {
            f(p);
        }
    }
}

/// One stream's entry in the registry, and its observer.
pub struct StreamStatus {
    registry: ProxyRegistry,
    entry: u64,
    forward: Arc<dyn StreamObserver>,
}

impl std::fmt::Debug for StreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamStatus")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

impl StreamStatus {
    /// Records (or, with `None`, clears) an input that could not be translated.
    pub fn set_translate_error(&self, error: Option<String>) {
        self.registry
            .update(self.entry, |p| p.translate_error = error);
    }
}

impl StreamObserver for StreamStatus {
    fn on_open(&self, stream: u64) {
        self.forward.on_open(stream);
    }

    fn on_request(&self, stream: u64, type_url: &str, outcome: &RequestOutcome) {
        self.registry.update(self.entry, |p| {
            let t = p.types.entry(type_url.to_owned()).or_default();
            match &outcome.kind {
                RequestKind::Ack { version } => {
                    t.acked_version = Some(version.clone());
                    t.last_nack = None;
                }
                RequestKind::Nack { message, .. } => {
                    t.last_nack = Some(message.clone());
                    t.nacks += 1;
                }
                RequestKind::Initial { .. } | RequestKind::Stale { .. } => {}
            }
        });
        if let RequestKind::Nack {
            kept_version,
            message,
        } = &outcome.kind
        {
            let workload = self
                .registry
                .lock()
                .get(&self.entry)
                .map(|p| p.workload.clone())
                .unwrap_or_default();
            tracing::warn!(
                %workload, %type_url, %kept_version, detail = %message,
                "a proxy rejected its config (NACK); it keeps running the version it had"
            );
        }
        self.forward.on_request(stream, type_url, outcome);
    }

    fn on_response(&self, stream: u64, resp: &DiscoveryResponse) {
        self.registry.update(self.entry, |p| {
            let t = p.types.entry(resp.type_url.clone()).or_default();
            t.pushed_version = Some(resp.version_info.clone());
            t.pushes += 1;
        });
        self.forward.on_response(stream, resp);
    }

    fn on_close(&self, stream: u64, error: Option<&tonic::Status>) {
        self.registry.lock().remove(&self.entry);
        self.forward.on_close(stream, error);
    }
}

#[cfg(test)]
mod tests {
    use palisade_xds::NoObserver;

    use super::*;

    fn outcome(kind: RequestKind) -> RequestOutcome {
        RequestOutcome {
            kind,
            names_changed: false,
        }
    }

    #[test]
    fn tracks_pushes_acks_and_nacks_until_the_stream_closes() {
        let reg = ProxyRegistry::new();
        let s = reg.register(
            ProxyKind::Envoy,
            "demo/a",
            "spiffe://td/ns/demo/sa/a",
            None,
            Arc::new(NoObserver),
        );
        s.on_open(7);
        let resp = DiscoveryResponse {
            type_url: "L".into(),
            version_info: "3".into(),
            ..Default::default()
        };
        s.on_response(7, &resp);
        assert!(!reg.list()[0].in_sync(), "pushed, not yet ACKed");
        s.on_request(
            7,
            "L",
            &outcome(RequestKind::Nack {
                kept_version: "".into(),
                message: "bad listener".into(),
            }),
        );
        let p = &reg.list()[0];
        assert_eq!(p.types["L"].last_nack.as_deref(), Some("bad listener"));
        assert!(!p.in_sync());
        s.on_request(
            7,
            "L",
            &outcome(RequestKind::Ack {
                version: "3".into(),
            }),
        );
        let p = &reg.list()[0];
        assert!(p.in_sync(), "{p:?}");
        assert_eq!(p.types["L"].nacks, 1);
        s.set_translate_error(Some("AuthorizationPolicy x: not translated".into()));
        assert!(!reg.list()[0].in_sync());
        s.on_close(7, None);
        assert!(reg.list().is_empty());
    }
}
