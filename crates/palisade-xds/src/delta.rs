//! Incremental ("delta") xDS, server side: `DeltaAggregatedResources` over the same
//! [`Snapshot`]s as the state-of-the-world stream ([`crate::stream`]).
//!
//! The rules, from the xDS protocol:
//! - The first request of a type opens its subscription; its `initial_resource_versions` say
//!   what the client already holds (after a reconnect), so only what differs is sent. No names subscribed on the first request (or `*`) is a wildcard
//!   subscription: every resource of the type.
//! - `resource_names_subscribe` / `_unsubscribe` change the subscription in any request.
//! - A response carries only the resources whose version differs from what the client holds,
//!   and the names of subscribed resources that no longer exist (`removed_resources`).
//! - With a nonce, no `error_detail` is an ACK; `error_detail` is a NACK: the client keeps what
//!   it had, and the same content is not sent again (only a later change is).
//!
//! Each resource's version is its [`crate::VersionedResource::version`]; the response's
//! `system_version_info` is the type's version, as in state of the world.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::server::{RequestKind, RequestOutcome};
use crate::snapshot::Snapshot;
use crate::stream::{StreamObserver, StreamOptions};

/// The responses of one delta stream.
pub type DeltaResponseStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

static DELTA_STREAM_IDS: AtomicU64 = AtomicU64::new(1 << 32);

/// One type's subscription on one delta stream.
#[derive(Debug, Default)]
struct DeltaTypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds (or is evaluating): name to version.
    known: BTreeMap<String, String>,
    last_nonce: Option<String>,
    /// A response is owed even when nothing differs (the first answer of a subscription).
    owed: bool,
}

impl DeltaTypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// The response this state owes for `snapshot`, if any.
    fn next_response(
        &mut self,
        type_url: &str,
        snapshot: &Snapshot,
        nonce: String,
    ) -> Option<DeltaDiscoveryResponse> {
        let published = snapshot.get_type(type_url);
        let mut resources = Vec::new();
        if let Some(t) = published {
            for (name, r) in &t.resources {
                if !self.wants(name) {
                    continue;
                }
                let version = r.version.to_string();
                if self.known.get(name) != Some(&version) {
                    resources.push(Resource {
                        name: name.clone(),
                        version: version.clone(),
                        resource: Some(r.body.clone()),
                        ..Default::default()
                    });
                }
            }
        }
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|n| published.is_none_or(|t| !t.resources.contains_key(*n)))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() {
            // An owed first answer waits until the type exists at all (see the state-of-the-
            // world rule in `crate::server`): an empty answer would make Envoy go live empty.
            if !(self.owed && published.is_some()) {
                return None;
            }
        }
        for r in &resources {
            self.known.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            self.known.remove(n);
        }
        self.owed = false;
        self.last_nonce = Some(nonce.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: snapshot.type_version(type_url),
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

/// Serves one delta xDS stream until the client goes away or breaks the protocol. `options`
/// says which types may be subscribed (names are not restricted here; an ADS server that must
/// restrict them checks the subscription itself).
pub fn serve_delta_stream<S>(
    requests: S,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    options: Arc<StreamOptions>,
    observer: Arc<dyn StreamObserver>,
) -> DeltaResponseStream
where
    S: Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let id = DELTA_STREAM_IDS.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        observer.on_open(id);
        let mut driver = DeltaDriver {
            id,
            options,
            observer: Arc::clone(&observer),
            states: BTreeMap::new(),
            sent_versions: BTreeMap::new(),
            nonce: 0,
            tx,
        };
        let end = driver.run(Box::pin(requests), snapshots).await;
        observer.on_close(id, end.as_ref());
    });
    ReceiverStream::new(rx)
}

struct DeltaDriver {
    id: u64,
    options: Arc<StreamOptions>,
    observer: Arc<dyn StreamObserver>,
    states: BTreeMap<String, DeltaTypeState>,
    /// The system version of the latest response of each type (what an ACK accepts).
    sent_versions: BTreeMap<String, String>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

struct Gone;

impl DeltaDriver {
    async fn run(
        &mut self,
        mut requests: std::pin::Pin<
            Box<dyn Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Send>,
        >,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Option<Status> {
        let mut watching = true;
        loop {
            tokio::select! {
                req = requests.next() => match req {
                    None | Some(Err(_)) => return None,
                    Some(Ok(req)) => match self.on_request(&req) {
                        Ok(type_url) => {
                            let snap = snapshots.borrow_and_update().clone();
                            if self.flush(&snap, Some(&type_url)).await.is_err() {
                                return None;
                            }
                        }
                        Err(status) => {
                            tracing::warn!(stream = self.id, %status, "refusing delta xDS request");
                            let _ = self.tx.send(Err(status.clone())).await;
                            return Some(status);
                        }
                    },
                },
                changed = snapshots.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    let snap = snapshots.borrow_and_update().clone();
                    if self.flush(&snap, None).await.is_err() {
                        return None;
                    }
                }
                () = self.tx.closed() => return None,
            }
        }
    }

    fn on_request(&mut self, req: &DeltaDiscoveryRequest) -> Result<String, Status> {
        if !self.options.serves(&req.type_url) {
            return Err(Status::invalid_argument(format!(
                "type URL {:?} is not served here",
                req.type_url
            )));
        }
        let type_url = req.type_url.clone();
        let acked_version = self.nonce_version(&type_url);
        let first = !self.states.contains_key(&type_url);
        let state = self.states.entry(type_url.clone()).or_default();
        let subscribe = req.resource_names_subscribe.iter().filter(|n| *n != "*");
        if req.resource_names_subscribe.iter().any(|n| n == "*")
            || (first && req.resource_names_subscribe.is_empty())
        {
            state.wildcard = true;
        }
        if req.resource_names_unsubscribe.iter().any(|n| n == "*") {
            state.wildcard = false;
        }
        state.names.extend(subscribe.cloned());
        for n in &req.resource_names_unsubscribe {
            state.names.remove(n);
            state.known.remove(n);
        }
        let kind = if first {
            // A subscription: what the client says it holds (after a reconnect) is what it has.
            state.known = req
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            state.owed = true;
            RequestKind::Initial {
                client_version: String::new(),
            }
        } else if req.response_nonce.is_empty()
            || state.last_nonce.as_deref() != Some(req.response_nonce.as_str())
        {
            // A subscription change without an answer, or an answer to an older response.
            RequestKind::Stale {
                nonce: req.response_nonce.clone(),
            }
        } else if let Some(e) = &req.error_detail {
            RequestKind::Nack {
                kept_version: String::new(),
                message: e.message.clone(),
            }
        } else {
            RequestKind::Ack {
                version: acked_version,
            }
        };
        if !req.resource_names_subscribe.is_empty() {
            // New names are owed an answer (absent ones as removed, if the client holds them).
            state.owed = true;
        }
        if let RequestKind::Nack { message, .. } = &kind {
            tracing::warn!(stream = self.id, %type_url, %message, "delta xDS NACK: the client rejected our response");
        }
        self.observer.on_request(
            self.id,
            &type_url,
            &RequestOutcome {
                kind,
                names_changed: !req.resource_names_subscribe.is_empty()
                    || !req.resource_names_unsubscribe.is_empty(),
            },
        );
        Ok(type_url)
    }

    /// The system version of the latest response of a type (what an ACK accepts).
    fn nonce_version(&self, type_url: &str) -> String {
        self.sent_versions
            .get(type_url)
            .cloned()
            .unwrap_or_default()
    }

    async fn flush(&mut self, snap: &Snapshot, only: Option<&str>) -> Result<(), Gone> {
        let mut out = Vec::new();
        for (type_url, state) in &mut self.states {
            if only.is_some_and(|t| t != type_url) {
                continue;
            }
            let nonce = (self.nonce + 1).to_string();
            if let Some(resp) = state.next_response(type_url, snap, nonce) {
                self.nonce += 1;
                out.push(resp);
            }
        }
        for resp in out {
            self.sent_versions
                .insert(resp.type_url.clone(), resp.system_version_info.clone());
            tracing::debug!(
                stream = self.id, type_url = %resp.type_url, version = %resp.system_version_info,
                nonce = %resp.nonce, resources = resp.resources.len(),
                removed = resp.removed_resources.len(), "delta xDS push"
            );
            // Observers see the push as a state-of-the-world summary (type, version, nonce).
            self.observer.on_response(
                self.id,
                &DiscoveryResponse {
                    version_info: resp.system_version_info.clone(),
                    type_url: resp.type_url.clone(),
                    nonce: resp.nonce.clone(),
                    ..Default::default()
                },
            );
            self.tx.send(Ok(resp)).await.map_err(|_| Gone)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::google::protobuf::Any;

    use super::*;
    use crate::snapshot::SnapshotCache;
    use crate::stream::{NamePolicy, NoObserver};

    const T: &str = "type.example/T";

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: T.into(),
            value: v.to_vec(),
        }
    }

    struct Client {
        tx: mpsc::Sender<Result<DeltaDiscoveryRequest, Status>>,
        rx: DeltaResponseStream,
    }

    impl Client {
        fn open(cache: &SnapshotCache) -> Self {
            let (tx, req_rx) = mpsc::channel(8);
            let options = Arc::new(
                StreamOptions::new()
                    .serve(T, NamePolicy::Any)
                    .allow_wildcard(true),
            );
            let rx = serve_delta_stream(
                ReceiverStream::new(req_rx),
                cache.subscribe(),
                options,
                Arc::new(NoObserver),
            );
            Self { tx, rx }
        }

        async fn send(&self, req: DeltaDiscoveryRequest) {
            self.tx.send(Ok(req)).await.unwrap();
        }

        async fn next(&mut self) -> DeltaDiscoveryResponse {
            tokio::time::timeout(Duration::from_secs(5), self.rx.next())
                .await
                .expect("a response within 5 s")
                .expect("stream open")
                .expect("no error")
        }

        async fn ack(&self, resp: &DeltaDiscoveryResponse) {
            self.send(DeltaDiscoveryRequest {
                type_url: T.into(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await;
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[tokio::test]
    async fn wildcard_gets_everything_then_only_what_changes() {
        let cache = SnapshotCache::new();
        cache.set(T, "a", any(b"1"));
        cache.set(T, "b", any(b"1"));
        let mut c = Client::open(&cache);
        c.send(DeltaDiscoveryRequest {
            type_url: T.into(),
            ..Default::default()
        })
        .await;
        let r = c.next().await;
        assert_eq!(names(&r), ["a", "b"]);
        c.ack(&r).await;
        cache.set(T, "b", any(b"2"));
        let r = c.next().await;
        assert_eq!(names(&r), ["b"], "only the changed resource");
        assert!(r.removed_resources.is_empty());
        c.ack(&r).await;
        cache.apply([crate::Change::Remove {
            type_url: T.into(),
            name: "a".into(),
        }]);
        let r = c.next().await;
        assert!(r.resources.is_empty());
        assert_eq!(r.removed_resources, ["a"]);
    }

    #[tokio::test]
    async fn a_reconnecting_client_gets_only_what_it_lacks_and_named_subscriptions_hold() {
        let cache = SnapshotCache::new();
        cache.set(T, "a", any(b"1"));
        cache.set(T, "b", any(b"1"));
        let held = cache.current().get(T, "a").unwrap().version.to_string();
        let mut c = Client::open(&cache);
        c.send(DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_subscribe: vec!["a".into(), "b".into()],
            initial_resource_versions: [("a".to_owned(), held)].into(),
            ..Default::default()
        })
        .await;
        assert_eq!(names(&c.next().await), ["b"]);
        // Unsubscribed names are not pushed any more.
        c.send(DeltaDiscoveryRequest {
            type_url: T.into(),
            resource_names_unsubscribe: vec!["b".into()],
            ..Default::default()
        })
        .await;
        cache.set(T, "b", any(b"2"));
        cache.set(T, "a", any(b"2"));
        assert_eq!(names(&c.next().await), ["a"]);
    }

    #[tokio::test]
    async fn a_nack_is_not_answered_with_the_same_content() {
        let cache = SnapshotCache::new();
        cache.set(T, "a", any(b"1"));
        let mut c = Client::open(&cache);
        c.send(DeltaDiscoveryRequest {
            type_url: T.into(),
            ..Default::default()
        })
        .await;
        let r = c.next().await;
        c.send(DeltaDiscoveryRequest {
            type_url: T.into(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
        // The next response is the next change, not the rejected content again.
        cache.set(T, "a", any(b"2"));
        let next = c.next().await;
        assert_eq!(names(&next), ["a"]);
        assert_eq!(next.resources[0].resource, Some(any(b"2")));
    }
}
