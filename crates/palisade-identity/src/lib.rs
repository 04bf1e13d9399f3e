//! SPIFFE identities and the certificate material every Palisade component shares.
//!
//! # API summary (used by the CA, the agent and the proxy)
//!
//! - [`spiffe`]: `SpiffeId::parse`, `parse_workload`, `for_service_account(td, ns, sa)`,
//!   `workload() -> Option<(ns, sa)>`, `principal()` (`<td>/ns/<ns>/sa/<sa>`); `Display` gives
//!   the URI. `TrustDomain::new(name)`.
//! - [`bundle`]: `TrustBundle::new(td, roots)`, `from_pem(td, pem)`, `with_aliases(..)`,
//!   `accepts(&id)`, `roots_pem()`, `root_store()`.
//! - [`pem`]: `parse_certs`, `parse_private_key`, `parse_csr`, `certs_to_pem`,
//!   `private_key_to_pem`, `csr_to_pem`, `read_certs(path)`, `read_private_key(path)`,
//!   `write_file_atomic(path, bytes, FileMode::Secret)`, `create_file_exclusive`.
//! - [`cert`]: `CertInfo::parse(der)` (URI/DNS/IP SANs, serial hex, validity, issuer, subject, CA
//!   flag, key usages, EKUs, `KeyAlgorithm`), `CertInfo::spiffe_id()`, `spiffe_id_of(der)`,
//!   `inspect_chain(chain)`, `chain_not_after(chain)`.
//! - [`keys`]: `KeyType` (`EcdsaP256` default, `EcdsaP384`, `Rsa2048`; parses `ecdsa-p256`,
//!   `ecdsa-p384`, `rsa-2048`), `generate_key_and_csr(&id, key_type) -> KeyAndCsr { key:
//!   GeneratedKey { der, pem, .. }, csr, csr_pem }`, `generate_key`, `csr_for_key`.
//! - [`tls`]: `Svid::new(chain, key)` / `Svid::from_pem(chain_pem, key_pem)` (checks the SPIFFE ID
//!   and that the key matches; `spiffe_id()`, `not_after()`, `chain_pem()`, `certified_key()`);
//!   `SvidResolver` (swap the served SVID on rotation); `SpiffeServerVerifier` with
//!   `ServerIdentity::{OneOf, TrustDomain, Path, PathInAnyTrustDomain}`; `SpiffeClientVerifier`
//!   with `ClientAuth::{Required, Optional}`; `server_config(cert, &bundle, ClientAuth)`;
//!   `client_config(Option<CertSource>, &bundle, ServerIdentity)`; `peer_spiffe_id(certs)`;
//!   `crypto_provider()` (aws-lc-rs; TLS 1.3 preferred, 1.2 minimum).
//!
//! Nothing here does networking or knows about policy.

pub mod bundle;
pub mod cert;
pub mod keys;
pub mod pem;
pub mod spiffe;
pub mod tls;

pub use bundle::{BundleError, TrustBundle};
pub use cert::{CertError, CertInfo, KeyAlgorithm, chain_not_after, inspect_chain, spiffe_id_of};
pub use keys::{
    GeneratedKey, KeyAndCsr, KeyError, KeyType, csr_for_key, generate_key, generate_key_and_csr,
};
pub use pem::{FileMode, PemError};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{
    CertSource, ClientAuth, MinTlsVersion, ServerIdentity, SpiffeClientVerifier,
    SpiffeServerVerifier, Svid, SvidResolver, TlsError, client_config, crypto_provider,
    peer_spiffe_id, server_config, server_config_min,
};

/// Re-exported so callers name the same versions of the DER types.
pub use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
