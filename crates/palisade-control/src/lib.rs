//! The control plane's config side: it watches a mesh directory, validates every change with
//! `palisade-policy`, computes each workload's config and pushes it to proxies over ADS.
//!
//! - [`wire`]: Palisade's own xDS resource, [`wire::WORKLOAD_CONFIG_TYPE_URL`]
//!   (`palisade.config.v1.WorkloadConfig`), one per workload, named `namespace/name`.
//! - [`compute`]: the per-workload config from a validated [`palisade_policy::MeshSnapshot`]:
//!   the workload's own entry, the policies in its namespace and the root namespace, and the
//!   destinations it may call (address, service account, sidecar or not, plaintext ports).
//! - [`watch`]: [`watch::ConfigWatcher`] reloads the directory on change (`notify`), keeps the
//!   last good snapshot when an edit is invalid (every error logged and published on a status
//!   channel), and publishes the resources into a [`palisade_xds::SnapshotCache`].
//! - [`ads`]: [`ads::AdsServer`], `AggregatedDiscoveryService/StreamAggregatedResources` over
//!   mutual TLS: a proxy only gets the config of workloads whose namespace and service account
//!   are those of its certificate.
//! - [`envoy`]: Envoy sidecars on the same ADS port: the node names the workload, its config is
//!   translated into listeners and clusters (`palisade-envoy`) and pushed when it changes.
//! - [`proxies`]: the connected proxies and how far each has got (pushed, ACKed, NACKed),
//!   served on the admin endpoint's `/debug/syncz`.
//! - [`serving`]: the ADS serving certificate, re-issued by the control plane's CA at half-life.
//! - [`metrics`], [`admin`]: the config side's Prometheus metrics and the admin endpoint that
//!   serves them (with the CA's) on `/metrics`.

pub mod admin;
pub mod ads;
pub mod compute;
pub mod envoy;
pub mod jwks;
pub mod metrics;
pub mod proxies;
pub mod serving;
pub mod watch;
pub mod wire;

pub use admin::AdminServer;
pub use ads::{AdsError, AdsServer};
pub use compute::{workload_config, workload_resources};
pub use metrics::ControlMetrics;
pub use proxies::{ProxyKind, ProxyRegistry, ProxySync};
pub use watch::{ConfigStatus, ConfigWatcher, WatchError};
pub use wire::{WORKLOAD_CONFIG_TYPE_URL, WorkloadConfig};
