//! palisade-envoy: what istiod generates for an Envoy sidecar. Palisade's per-workload config
//! ([`WorkloadConfig`], what the control plane already computes and pushes to its own sidecar)
//! translated into Envoy's typed resources (`envoy-types` protos, end to end). Pure: no I/O.
//!
//! - [`inbound`]: the workload's inbound listeners (filter chains by effective mTLS mode, HTTP
//!   connection manager or TCP proxy) and the clusters to the application.
//! - [`outbound`]: the application's HTTP proxy listener and TCP upstreams, clusters per
//!   destination with auto mTLS per endpoint.
//! - [`rbac`]: AuthorizationPolicy to Envoy RBAC (HTTP and network filters), as istiod's
//!   `pilot/pkg/security/authz/builder` and `model` generate it.
//! - [`jwt`]: RequestAuthentication to `jwt_authn` (before the RBAC filters), as istiod's
//!   `pilot/pkg/security/authn` builds it.
//! - [`json`]: Envoy's config-dump JSON of the resources this crate emits.
//! - [`bootstrap`]: an Envoy sidecar's bootstrap: ADS to the control plane over mutual TLS,
//!   certificates over SDS from the workload's agent.
//!
//! What is not translated yet (CUSTOM / `ext_authz`, `jwksUri` rules without keys resolved
//! inline, the outbound side) is refused with a [`TranslateError`] naming the resource and
//! field, never dropped: a silently missing rule would let traffic through that Palisade's
//! sidecar refuses.

pub mod bootstrap;
pub mod inbound;
pub mod json;
pub mod jwt;
pub mod outbound;
pub mod rbac;
pub mod tls;

pub use inbound::{EnvoyResources, translate_inbound};
pub use palisade_policy::workload_config::WorkloadConfig;

/// Why a workload's config could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The input holds something this translator does not produce yet; `what` names the
    /// resource (`AuthorizationPolicy ns/name`) and field.
    #[error("{what}: {field}: not translated for Envoy yet ({reason})")]
    NotTranslated {
        what: String,
        field: String,
        reason: String,
    },
    /// The input is invalid (the control plane validates first, so this is unexpected).
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl TranslateError {
    pub(crate) fn not_translated(what: &str, field: &str, reason: &str) -> Self {
        TranslateError::NotTranslated {
            what: what.to_owned(),
            field: field.to_owned(),
            reason: reason.to_owned(),
        }
    }

    pub(crate) fn invalid(what: &str, reason: impl Into<String>) -> Self {
        TranslateError::Invalid {
            what: what.to_owned(),
            reason: reason.into(),
        }
    }
}
