//! palisade-policy: Istio's security API (types, validation, resolution, pure evaluation).
//!
//! The flow another crate follows:
//! 1. [`load_dir`] (or [`MeshSnapshot::from_sources`] / [`MeshSnapshot::from_resources`]) gives a
//!    validated [`MeshSnapshot`], or [`LoadErrors`] naming every problem.
//! 2. [`MeshSnapshot::resolve_workload`] / [`MeshSnapshot::resolve`] gives the
//!    [`ResolvedPolicies`] of one workload (mTLS per port, JWT rules, authorization policies).
//! 3. [`CompiledPolicy::compile`] (or [`MeshSnapshot::compile_workload`]) precompiles them.
//! 4. [`CompiledPolicy::evaluate`] decides one [`RequestContext`] fast ([`Verdict`]);
//!    [`CompiledPolicy::explain`] returns an explained [`Decision`].
//!
//! No I/O except [`load`], no async, no TLS.

pub mod analyze;
pub mod api;
pub mod compile;
pub mod describe;
pub mod error;
pub mod eval;
mod index;
pub mod load;
pub mod matcher;
pub mod matrix;
pub mod mesh;
pub mod normalize;
pub mod protocol;
pub mod request;
pub mod resolve;
pub mod snapshot;
pub mod validate;
pub mod workload_config;

pub use api::{AuthzAction, Kind, MtlsMode, Resource};
pub use compile::{CompileError, CompiledPolicy, PolicyInfo};
pub use error::{LoadError, LoadErrors, Origin};
pub use eval::{
    Decision, DecisionAction, DryRunResult, HeaderLookup, HttpAttributes, ReasonCode,
    RequestContext, RequestError, TraceEntry, TraceStep, Verdict,
};
pub use load::load_dir;
pub use matrix::{Matrix, MatrixError, MatrixOptions, Reachability};
pub use mesh::{MeshConfig, OutboundTrafficMode};
pub use normalize::{PathError, PathNormalization, normalize_path};
pub use protocol::PortProtocol;
pub use request::{RequestSpec, RequestSpecError};
pub use resolve::{ModeSource, MtlsLevel, PolicyScope, ResolvedPolicies, WorkloadRef};
pub use snapshot::{MeshSnapshot, Sourced};

/// Why `authz check` could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("workload {0:?} is not a WorkloadEntry in the mesh directory")]
    UnknownWorkload(String),
    #[error("request rejected before authorization (HTTP 400): {0}")]
    Request(#[from] RequestError),
    #[error(transparent)]
    Compile(#[from] CompileError),
}

impl MeshSnapshot {
    /// Resolves and compiles the WorkloadEntry `namespace/name`.
    pub fn compile_workload(&self, key: &str) -> Result<CompiledPolicy, CompileError> {
        let w = self
            .workload(key)
            .ok_or_else(|| CompileError::UnknownWorkload(key.to_owned()))?;
        let resolved = self
            .resolve_workload(key)
            .ok_or_else(|| CompileError::UnknownWorkload(key.to_owned()))?;
        CompiledPolicy::compile(&resolved, &self.mesh, Some(&w.resource))
    }

    /// Decides and explains a request described by a [`RequestSpec`].
    pub fn check(&self, spec: &RequestSpec) -> Result<Decision, CheckError> {
        if self.workload(&spec.workload).is_none() {
            return Err(CheckError::UnknownWorkload(spec.workload.clone()));
        }
        let compiled = self.compile_workload(&spec.workload)?;
        Ok(compiled.explain(&spec.context())?)
    }
}
