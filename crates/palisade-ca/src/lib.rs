//! Palisade's certificate authority: the signing key (self-signed root or plug-in intermediate),
//! service-account tokens (issuer and authenticator), CSR checks, leaf issuance, and the Istio CA
//! gRPC service and client.
//!
//! # API summary
//!
//! Client side (the agent, `palisade cert request`), in [`client`]:
//! - `CaClient::connect(addr, root_pem, CaClientOptions) -> Result<CaClient, CaClientError>`:
//!   TLS verified against the mesh root and the CA's SPIFFE ID
//!   (`spiffe://<td>/ns/istio-system/sa/palisade-controlplane`, any trust domain unless
//!   `options.trust_domain` is set). `options.client_cert: Some(CertSource)` renews by
//!   certificate.
//! - `CaClient::create_certificate(csr_pem, Some(token), ttl: Option<Duration>, cluster_id)
//!   -> Result<Vec<String>, CaClientError>`: the PEM chain, leaf first, root last. A refusal is
//!   `CaClientError::Refused { code, message }` (`err.code()` gives the gRPC code).
//! - `CaClient::server_identity()`: the CA's verified SPIFFE ID (its trust domain is the mesh's).
//! - `token::peek_service_account(token) -> (ns, sa)`: unverified, to build the CSR's SPIFFE ID.
//!
//! Server side (the control plane, `palisade up`), in [`server`], [`token`], [`authority`]:
//! - `CaServer::prepare(CaOptions, &mut metrics::Registry)` loads or creates the keys in the
//!   state dir and writes `root-cert.pem`; `CaServer::serve(listener, shutdown)` serves gRPC
//!   over TLS.
//! - `TokenIssuer::load_or_create(state_dir)?.issue(ns, sa, &["istio-ca".into()], ttl)`: the
//!   control plane's service-account tokens.
//! - `Authority::issue(csr_pem, &caller, ttl_secs) -> Issued`: in-process CSR check and signing.
//! - `metrics::CaMetrics`: `palisade_ca_certificates_issued_total`,
//!   `palisade_ca_requests_refused_total{reason}`, `palisade_ca_sign_duration_seconds`,
//!   `palisade_ca_tls_handshake_failures_total`,
//!   `palisade_ca_signing_cert_expiry_seconds{cert, serial}`.
//! - [`validity`]: the CA's own chain against the clock. `check_chain` (signing refused outside
//!   it: `IssueError::SigningCert`), `ExpiryWatch` (the 30-day warning, logged and as the
//!   gauge), `describe_chain` over `<state>/ca-chain.pem` (what `palisade ca status` reads).

pub mod authority;
pub mod client;
pub mod csr;
pub mod jwks;
pub mod metrics;
pub mod server;
pub mod signer;
pub mod token;
pub mod validity;

/// Generated from `proto/istio/v1/auth/ca.proto` (package `istio.v1.auth`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("istio.v1.auth");
}

pub use authority::{Authority, IssuancePolicy, IssueError, Issued};
pub use client::{CaClient, CaClientError, CaClientOptions};
pub use server::{CONTROL_PLANE_PATH, CaError, CaOptions, CaServer, DEFAULT_LISTEN};
pub use signer::{CA_CHAIN_FILE, CaKeyType, ROOT_CERT_FILE, Signer};
pub use token::{ISTIO_CA_AUDIENCE, TokenAuthenticator, TokenError, TokenIssuer};
