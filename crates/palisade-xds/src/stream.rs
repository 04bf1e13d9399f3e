//! A state-of-the-world xDS server stream: reads `DiscoveryRequest`s, watches the snapshot, and
//! writes `DiscoveryResponse`s. One function serves a single-type API (SDS's `StreamSecrets`)
//! and aggregated ADS alike; the caller's gRPC service only hands over the request stream.
//!
//! Per stream and type it keeps a [`ServerTypeState`]; nonces are unique within the stream.
//! Every open stream watches the same snapshot, so a change reaches all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::server::{RequestKind, RequestOutcome, ServerTypeState};
use crate::snapshot::Snapshot;

/// Which names of a type may be subscribed to.
#[derive(Debug, Clone)]
pub enum NamePolicy {
    /// Any name; absent ones are waited for (they may appear later).
    Any,
    /// Only these names (they may still be absent for a while, e.g. before the first
    /// certificate); any other name ends the stream with `NOT_FOUND` naming it.
    Known(BTreeSet<String>),
}

/// What a stream serves.
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    types: BTreeMap<String, NamePolicy>,
    /// Wildcard (empty names) subscriptions allowed? SDS requires names.
    allow_wildcard: bool,
}

impl StreamOptions {
    /// Serves nothing yet; add types with [`StreamOptions::serve`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `type_url` with the given name policy.
    pub fn serve(mut self, type_url: impl Into<String>, names: NamePolicy) -> Self {
        self.types.insert(type_url.into(), names);
        self
    }

    /// Accept subscriptions without names (all resources of the type).
    pub fn allow_wildcard(mut self, allow: bool) -> Self {
        self.allow_wildcard = allow;
        self
    }

    /// Whether `type_url` is served.
    pub(crate) fn serves(&self, type_url: &str) -> bool {
        self.types.contains_key(type_url)
    }

    /// Finds the type a request is for. An empty `type_url` is accepted when exactly one type
    /// is served (single-type APIs), as the type is then implied by the method.
    fn resolve_type(&self, req: &DiscoveryRequest) -> Result<String, Status> {
        if req.type_url.is_empty() {
            let mut it = self.types.keys();
            return match (it.next(), it.next()) {
                (Some(only), None) => Ok(only.clone()),
                _ => Err(Status::invalid_argument(
                    "DiscoveryRequest without type_url on a stream that serves several types",
                )),
            };
        }
        if self.types.contains_key(&req.type_url) {
            Ok(req.type_url.clone())
        } else {
            let served: Vec<&str> = self.types.keys().map(String::as_str).collect();
            Err(Status::invalid_argument(format!(
                "type URL {:?} is not served here (served: {})",
                req.type_url,
                served.join(", ")
            )))
        }
    }

    fn check_names(&self, type_url: &str, req: &DiscoveryRequest) -> Result<(), Status> {
        if req.resource_names.is_empty() && !self.allow_wildcard {
            return Err(Status::invalid_argument(format!(
                "subscription to {type_url} must name its resources"
            )));
        }
        if let Some(NamePolicy::Known(known)) = self.types.get(type_url)
            && let Some(unknown) = req.resource_names.iter().find(|n| !known.contains(*n))
        {
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            return Err(Status::not_found(format!(
                "unknown resource name {unknown:?} for {type_url}; this server offers: {}",
                known.join(", ")
            )));
        }
        Ok(())
    }
}

/// Hooks for metrics and logs; every method has a no-op default.
pub trait StreamObserver: Send + Sync + 'static {
    /// A stream opened.
    fn on_open(&self, _stream: u64) {}
    /// A request was classified.
    fn on_request(&self, _stream: u64, _type_url: &str, _outcome: &RequestOutcome) {}
    /// A response was sent.
    fn on_response(&self, _stream: u64, _resp: &DiscoveryResponse) {}
    /// The stream ended; `error` is the status sent to the client, if any.
    fn on_close(&self, _stream: u64, _error: Option<&Status>) {}
}

/// An observer that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl StreamObserver for NoObserver {}

/// The responses of one stream, as tonic's server-streaming return type wants them.
pub type ResponseStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

static STREAM_IDS: AtomicU64 = AtomicU64::new(1);

/// Serves one xDS stream until the client goes away or breaks the protocol.
///
/// Spawns a task on the current tokio runtime; the returned stream ends when it does.
pub fn serve_stream<S>(
    requests: S,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    options: Arc<StreamOptions>,
    observer: Arc<dyn StreamObserver>,
) -> ResponseStream
where
    S: Stream<Item = Result<DiscoveryRequest, Status>> + Send + 'static,
{
    // A small buffer: responses are whole snapshots, a slow client only delays its own stream.
    let (tx, rx) = mpsc::channel(4);
    let id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        observer.on_open(id);
        let end = Driver {
            id,
            options,
            observer: observer.clone(),
            states: BTreeMap::new(),
            nonce: 0,
            tx,
        }
        .run(Box::pin(requests), snapshots)
        .await;
        observer.on_close(id, end.as_ref());
    });
    ReceiverStream::new(rx)
}

struct Driver {
    id: u64,
    options: Arc<StreamOptions>,
    observer: Arc<dyn StreamObserver>,
    states: BTreeMap<String, ServerTypeState>,
    nonce: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

/// Why the driver loop ended early: the client is gone (nothing to tell it).
struct Gone;

impl Driver {
    /// Returns the error sent to the client, if the stream ended on one.
    async fn run(
        mut self,
        mut requests: Pin<Box<dyn Stream<Item = Result<DiscoveryRequest, Status>> + Send>>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Option<Status> {
        let mut watching = true;
        loop {
            tokio::select! {
                req = requests.next() => match req {
                    None => {
                        tracing::debug!(stream = self.id, "xDS client closed the stream");
                        return None;
                    }
                    Some(Err(status)) => {
                        tracing::debug!(stream = self.id, %status, "xDS request stream failed");
                        return None;
                    }
                    Some(Ok(req)) => {
                        match self.on_request(&req) {
                            Ok(type_url) => {
                                let snap = snapshots.borrow_and_update().clone();
                                if self.flush(&snap, Some(&type_url)).await.is_err() {
                                    return None;
                                }
                            }
                            Err(status) => {
                                tracing::warn!(stream = self.id, %status, "refusing xDS request");
                                // The client may be gone already; the status is the last word.
                                let _ = self.tx.send(Err(status.clone())).await;
                                return Some(status);
                            }
                        }
                    }
                },
                changed = snapshots.changed(), if watching => {
                    if changed.is_err() {
                        // The publisher is gone: keep serving what was sent, push nothing new.
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

    fn on_request(&mut self, req: &DiscoveryRequest) -> Result<String, Status> {
        let type_url = self.options.resolve_type(req)?;
        let state = self
            .states
            .entry(type_url.clone())
            .or_insert_with(|| ServerTypeState::new(type_url.clone()));
        // Stale requests are ignored whole, so their names are not checked either.
        if !state.is_stale(req) {
            self.options.check_names(&type_url, req)?;
        }
        let outcome = state.on_request(req);
        match &outcome.kind {
            RequestKind::Initial { client_version } => tracing::debug!(
                stream = self.id, %type_url, names = ?req.resource_names, %client_version,
                "xDS subscribe"
            ),
            RequestKind::Ack { version } => {
                tracing::debug!(stream = self.id, %type_url, %version, "xDS ACK")
            }
            RequestKind::Nack {
                kept_version,
                message,
            } => tracing::warn!(
                stream = self.id, %type_url, %kept_version, %message,
                "xDS NACK: the client rejected our response"
            ),
            RequestKind::Stale { nonce } => {
                tracing::debug!(stream = self.id, %type_url, %nonce, "stale xDS request ignored")
            }
        }
        self.observer.on_request(self.id, &type_url, &outcome);
        Ok(type_url)
    }

    /// Sends what is owed for one type (after a request) or for all types (after a change).
    async fn flush(&mut self, snap: &Snapshot, only: Option<&str>) -> Result<(), Gone> {
        let mut out = Vec::new();
        for (type_url, state) in &mut self.states {
            if only.is_some_and(|t| t != type_url) {
                continue;
            }
            let nonce = (self.nonce + 1).to_string();
            if let Some(resp) = state.next_response(snap, nonce) {
                self.nonce += 1;
                out.push(resp);
            }
        }
        for resp in out {
            tracing::debug!(
                stream = self.id, type_url = %resp.type_url, version = %resp.version_info,
                nonce = %resp.nonce, resources = resp.resources.len(), "xDS push"
            );
            self.observer.on_response(self.id, &resp);
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
    use crate::client::ClientTypeState;
    use crate::snapshot::SnapshotCache;

    const T: &str = "type.example/T";

    fn any(v: &[u8]) -> Any {
        Any {
            type_url: T.into(),
            value: v.to_vec(),
        }
    }

    fn options() -> Arc<StreamOptions> {
        Arc::new(StreamOptions::new().serve(
            T,
            NamePolicy::Known(["a".to_string(), "b".to_string()].into()),
        ))
    }

    struct Client {
        tx: mpsc::Sender<Result<DiscoveryRequest, Status>>,
        rx: ResponseStream,
        state: ClientTypeState,
    }

    impl Client {
        fn open(cache: &SnapshotCache, names: &[&str]) -> Self {
            let (tx, req_rx) = mpsc::channel(8);
            let rx = serve_stream(
                ReceiverStream::new(req_rx),
                cache.subscribe(),
                options(),
                Arc::new(NoObserver),
            );
            let state = ClientTypeState::new(T, names.iter().map(|s| s.to_string()));
            Self { tx, rx, state }
        }

        async fn send(&self, req: DiscoveryRequest) {
            self.tx.send(Ok(req)).await.unwrap();
        }

        async fn next(&mut self) -> Result<DiscoveryResponse, Status> {
            tokio::time::timeout(Duration::from_secs(5), self.rx.next())
                .await
                .expect("a response within 5 s")
                .expect("stream open")
        }

        async fn nothing_within(&mut self, ms: u64) {
            let got = tokio::time::timeout(Duration::from_millis(ms), self.rx.next()).await;
            assert!(got.is_err(), "unexpected message: {got:?}");
        }
    }

    #[tokio::test]
    async fn every_open_stream_is_pushed_on_change() {
        let cache = SnapshotCache::new();
        cache.set(T, "a", any(b"1"));
        let mut clients = vec![Client::open(&cache, &["a"]), Client::open(&cache, &["a"])];
        for c in &mut clients {
            let first = c.state.initial_request();
            c.send(first).await;
            let r = c.next().await.unwrap();
            assert_eq!(r.resources, vec![any(b"1")]);
            let ack = c.state.answer(&r, Ok(()));
            c.send(ack).await;
            c.nothing_within(50).await;
        }
        cache.set(T, "a", any(b"2"));
        for c in &mut clients {
            let r = c.next().await.unwrap();
            assert_eq!(r.resources, vec![any(b"2")]);
            assert_eq!(r.version_info, cache.current().type_version(T));
        }
        // A change to a resource nobody subscribed to pushes nothing.
        cache.set(T, "b", any(b"x"));
        for c in &mut clients {
            c.nothing_within(50).await;
        }
    }

    #[tokio::test]
    async fn waits_for_a_known_resource_that_is_not_there_yet() {
        let cache = SnapshotCache::new();
        let mut c = Client::open(&cache, &["a"]);
        let first = c.state.initial_request();
        c.send(first).await;
        c.nothing_within(50).await;
        cache.set(T, "a", any(b"1"));
        let r = c.next().await.unwrap();
        assert_eq!(r.resources, vec![any(b"1")]);
    }

    #[tokio::test]
    async fn nack_is_not_answered_with_the_same_content() {
        let cache = SnapshotCache::new();
        cache.set(T, "a", any(b"1"));
        let mut c = Client::open(&cache, &["a"]);
        let first = c.state.initial_request();
        c.send(first).await;
        let r = c.next().await.unwrap();
        let nack = c.state.answer(&r, Err("cannot load".into()));
        assert!(nack.error_detail.is_some());
        c.send(nack).await;
        c.nothing_within(50).await;
        cache.set(T, "a", any(b"2"));
        assert_eq!(c.next().await.unwrap().resources, vec![any(b"2")]);
    }

    #[tokio::test]
    async fn protocol_errors_end_the_stream_with_a_clear_status() {
        let table: &[(&str, &[&str], tonic::Code, &str)] = &[
            (T, &["nope"], tonic::Code::NotFound, "\"nope\""),
            (T, &[], tonic::Code::InvalidArgument, "must name"),
            (
                "type.example/Other",
                &["a"],
                tonic::Code::InvalidArgument,
                "type.example/Other",
            ),
        ];
        for &(type_url, names, code, needle) in table {
            let cache = SnapshotCache::new();
            let mut c = Client::open(&cache, names);
            let mut first = c.state.initial_request();
            first.type_url = type_url.into();
            c.send(first).await;
            let err = c.next().await.unwrap_err();
            assert_eq!(err.code(), code, "{type_url} {names:?}");
            assert!(err.message().contains(needle), "{}", err.message());
            let end = tokio::time::timeout(Duration::from_secs(5), c.rx.next())
                .await
                .unwrap();
            assert!(end.is_none(), "stream ends after the error");
        }
    }

    #[tokio::test]
    async fn empty_type_url_means_the_only_served_type() {
        let cache = SnapshotCache::new();
        cache.set(T, "b", any(b"1"));
        let mut c = Client::open(&cache, &["b"]);
        let mut first = c.state.initial_request();
        first.type_url.clear();
        c.send(first).await;
        let r = c.next().await.unwrap();
        assert_eq!(r.type_url, T);
    }
}
