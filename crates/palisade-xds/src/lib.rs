//! The xDS protocol, state of the world (SotW) and incremental (delta), independent of what the
//! resources mean.
//!
//! - [`snapshot`]: versioned resources a server offers, published to every stream.
//! - [`server`]: per-stream, per-type server state: initial/ACK/NACK/stale classification,
//!   subscriptions, and when a response is owed.
//! - [`stream`]: drives one server stream (SDS `StreamSecrets` or ADS) over a snapshot.
//! - [`delta`]: drives one incremental (delta) xDS stream over the same snapshots.
//! - [`client`]: the client side: ACK/NACK requests for received responses.
//!
//! Wire types are Envoy's (`envoy.service.discovery.v3`), from `envoy-types`; resources are
//! carried as `envoy_types`' own `google.protobuf.Any` (build them with
//! `envoy_types::util::pack_any`).

pub mod client;
pub mod delta;
pub mod server;
pub mod snapshot;
pub mod stream;

pub use client::ClientTypeState;
pub use delta::{DeltaResponseStream, serve_delta_stream};
pub use server::{RequestKind, RequestOutcome, ServerTypeState};
pub use snapshot::{Change, Snapshot, SnapshotCache, TypeResources, VersionedResource};
pub use stream::{
    NamePolicy, NoObserver, ResponseStream, StreamObserver, StreamOptions, serve_stream,
};
