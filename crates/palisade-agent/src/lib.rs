//! The workload agent: it creates the workload's private key, gets it certified by the CA,
//! keeps the certificate fresh, and hands it to the proxy over Envoy's Secret Discovery Service.
//!
//! - [`agent`]: [`Agent::start`] wires everything below (what `palisade agent` runs).
//! - [`token`]: the service-account token file (re-read on every request) and its identity.
//! - [`source`]: the [`CertificateSource`] trait the secret manager draws certificates from;
//!   [`ca::CaSource`] is the real one (fresh key + CSR + Istio CA call each time).
//! - [`manager`]: rotation at half-life, backoff on failure, state on a `watch` channel.
//! - [`sds`]: `SecretDiscoveryService/StreamSecrets` on a Unix socket (`default`, `ROOTCA`).
//! - [`admin`]: `/certs` JSON, Prometheus metrics, readiness; [`report`] is the `/certs` model
//!   and the `proxy-config secret` table.
//! - [`files`]: optional certificate files (off by default: the key stays in memory).
//!
//! # Consuming the certificate
//!
//! In process, a proxy holds a [`SecretWatch`] (`Agent::secrets()` or `SecretHandle::subscribe()`)
//! and, on every change, installs `state.svid` (a `palisade_identity::Svid`) into its
//! `SvidResolver` and `state.roots` into its trust bundle:
//!
//! ```text
//! let mut rx = agent.secrets();
//! loop {
//!     if let Some(svid) = &rx.borrow_and_update().svid { resolver.update(svid); }
//!     if rx.changed().await.is_err() { break; }
//! }
//! ```
//!
//! Out of process, Envoy (or a palisade proxy using `palisade_xds::ClientTypeState`) streams
//! `default` and `ROOTCA` from the SDS socket; every rotation is pushed on every open stream.

pub mod admin;
pub mod agent;
pub mod ca;
pub mod files;
pub mod manager;
pub mod metrics;
pub mod report;
pub mod sds;
pub mod source;
pub mod token;

#[cfg(test)]
mod test_ca;

pub use agent::{Agent, AgentConfig, AgentError};
pub use ca::{CaSource, CaSourceConfig};
pub use manager::{CertStatus, ManagerConfig, SecretHandle, SecretState, SecretWatch};
pub use metrics::AgentMetrics;
pub use report::CertsReport;
pub use source::{CertificateSource, FetchError, Issued};
pub use token::{Token, TokenError, TokenFile};
