//! The CA's signing identity: a self-signed root kept in the state directory (created on first
//! start, reused after), or a plug-in intermediate CA from a directory. Either way it can sign
//! leaves and knows the chain to hand back (intermediates, then roots).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use palisade_identity::pem::{self as pemio, FileMode};
use palisade_identity::{CertInfo, CertificateDer, KeyAlgorithm, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::FromDer;

use crate::validity::{CertRole, ChainCert};

/// File names in the state directory.
pub const STATE_CA_KEY: &str = "ca-key.pem";
pub const STATE_CA_CERT: &str = "ca-cert.pem";
/// The mesh root bundle every workload trusts (written on each start).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The CA's own chain, signing certificate first and roots last (written on each start, for
/// `palisade ca status`).
pub const CA_CHAIN_FILE: &str = "ca-chain.pem";

/// Lifetime of the self-signed root.
pub const ROOT_LIFETIME: Duration = Duration::days(3650);

/// Errors loading, creating or using the CA key.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("{0}")]
    Pem(#[from] pemio::PemError),
    #[error("{path}: {reason}")]
    BadFile { path: String, reason: String },
    #[error("plug-in CA directory {dir}: {reason}")]
    Plugin { dir: String, reason: String },
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("unknown CA key type {0:?}; expected ecdsa-p256 or rsa-2048")]
    UnknownKeyType(String),
}

/// The algorithm of a newly created self-signed root key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CaKeyType {
    #[default]
    EcdsaP256,
    Rsa2048,
}

impl CaKeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Rsa2048 => "rsa-2048",
        }
    }
}

impl FromStr for CaKeyType {
    type Err = SignerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ecdsa-p256" => Ok(Self::EcdsaP256),
            "rsa-2048" => Ok(Self::Rsa2048),
            other => Err(SignerError::UnknownKeyType(other.to_owned())),
        }
    }
}

/// Where the signing key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerSource {
    /// Self-signed root in the state directory; `created` on this start or reused.
    SelfSigned { created: bool },
    /// Plug-in intermediate CA directory.
    Plugin { dir: PathBuf },
}

/// A CA key with its certificate: signs leaves.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates to append after the leaf: the CA's own certificate when it is an
    /// intermediate, further intermediates, and the roots last.
    chain_after_leaf: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    /// Earliest expiry along the chain: no leaf may outlive it.
    not_after: OffsetDateTime,
    /// Validity facts of `chain_after_leaf`, checked before every signature.
    chain_certs: Vec<ChainCert>,
    key_algorithm: KeyAlgorithm,
    source: SignerSource,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("source", &self.source)
            .field("key_algorithm", &self.key_algorithm)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the self-signed root from `state_dir`, or creates it (key type `key_type`, O = trust
    /// domain, 10 years). An existing root is reused whatever `key_type` says.
    pub fn load_or_create_root(
        state_dir: &Path,
        trust_domain: &TrustDomain,
        key_type: CaKeyType,
    ) -> Result<Self, SignerError> {
        let key_path = state_dir.join(STATE_CA_KEY);
        let cert_path = state_dir.join(STATE_CA_CERT);
        let mut created = false;
        if !key_path.exists() {
            let alg = match key_type {
                CaKeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                CaKeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            };
            let key =
                KeyPair::generate_for(alg).map_err(|e| SignerError::Generate(e.to_string()))?;
            // Another process may be creating it at the same moment: first one wins.
            created = pemio::create_file_exclusive(
                &key_path,
                key.serialize_pem().as_bytes(),
                FileMode::Secret,
            )?;
        }
        let key = load_key(&key_path)?;
        if !cert_path.exists() {
            let cert = self_signed_root(&key, trust_domain)?;
            pemio::create_file_exclusive(
                &cert_path,
                pemio::cert_to_pem(&cert).as_bytes(),
                FileMode::Public,
            )?;
        }
        let certs = pemio::read_certs(&cert_path)?;
        let [root] = certs.as_slice() else {
            return Err(bad_file(&cert_path, "expected exactly one certificate"));
        };
        check_key_matches(&key, root, &cert_path)?;
        let info = CertInfo::parse(root).map_err(|e| bad_file(&cert_path, e))?;
        if !info.is_ca {
            return Err(bad_file(&cert_path, "not a CA certificate"));
        }
        let issuer = Issuer::from_ca_cert_der(root, key)
            .map_err(|e| bad_file(&cert_path, format!("unusable as issuer: {e}")))?;
        Ok(Self {
            issuer,
            chain_after_leaf: vec![root.clone()],
            roots: vec![root.clone()],
            not_after: info.not_after,
            chain_certs: vec![ChainCert::from_info(&info, CertRole::Root)],
            key_algorithm: info.key_algorithm,
            source: SignerSource::SelfSigned { created },
        })
    }

    /// Loads a plug-in CA directory: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` and optionally
    /// `cert-chain.pem` (or `tls.crt`, `tls.key`, `ca.crt`). Palisade then signs as that
    /// intermediate; every link of the chain up to a root is checked.
    pub fn load_plugin(dir: &Path) -> Result<Self, SignerError> {
        let plugin_err = |reason: String| SignerError::Plugin {
            dir: dir.display().to_string(),
            reason,
        };
        let pick = |a: &str, b: &str| -> Option<PathBuf> {
            [a, b].into_iter().map(|n| dir.join(n)).find(|p| p.exists())
        };
        let cert_path = pick("ca-cert.pem", "tls.crt")
            .ok_or_else(|| plugin_err("missing ca-cert.pem (or tls.crt)".to_owned()))?;
        let key_path = pick("ca-key.pem", "tls.key")
            .ok_or_else(|| plugin_err("missing ca-key.pem (or tls.key)".to_owned()))?;
        let root_path = pick("root-cert.pem", "ca.crt")
            .ok_or_else(|| plugin_err("missing root-cert.pem (or ca.crt)".to_owned()))?;
        let ca_certs = pemio::read_certs(&cert_path)?;
        let roots = pemio::read_certs(&root_path)?;
        let key = load_key(&key_path)?;
        let ca_cert = ca_certs
            .first()
            .cloned()
            .ok_or_else(|| plugin_err("empty CA certificate".to_owned()))?;
        check_key_matches(&key, &ca_cert, &cert_path)?;

        // The chain after our own certificate: cert-chain.pem (or the rest of ca-cert.pem),
        // without our certificate and without the roots, which always go last.
        let chain_file = dir.join("cert-chain.pem");
        let listed = if chain_file.exists() {
            pemio::read_certs(&chain_file)?
        } else {
            ca_certs.clone()
        };
        let mut chain_after_leaf = vec![ca_cert.clone()];
        for c in listed {
            if c != ca_cert && !roots.contains(&c) && !chain_after_leaf.contains(&c) {
                chain_after_leaf.push(c);
            }
        }
        verify_links(&chain_after_leaf, &roots).map_err(plugin_err)?;
        let info = CertInfo::parse(&ca_cert).map_err(|e| plugin_err(e.to_string()))?;
        if !info.is_ca {
            return Err(plugin_err(
                "ca-cert.pem is not a CA certificate (basicConstraints CA:false)".to_owned(),
            ));
        }
        let mut not_after = info.not_after;
        let mut chain_certs = Vec::with_capacity(chain_after_leaf.len() + roots.len());
        for (n, c) in chain_after_leaf.iter().chain(&roots).enumerate() {
            let i = CertInfo::parse(c).map_err(|e| plugin_err(e.to_string()))?;
            not_after = not_after.min(i.not_after);
            let role = if n >= chain_after_leaf.len() {
                CertRole::Root
            } else {
                CertRole::Intermediate
            };
            chain_certs.push(ChainCert::from_info(&i, role));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)
            .map_err(|e| plugin_err(format!("ca-cert.pem unusable as issuer: {e}")))?;
        chain_after_leaf.extend(roots.iter().cloned());
        Ok(Self {
            issuer,
            chain_after_leaf,
            roots,
            not_after,
            chain_certs,
            key_algorithm: info.key_algorithm,
            source: SignerSource::Plugin {
                dir: dir.to_path_buf(),
            },
        })
    }

    /// Writes the root bundle to `<state_dir>/root-cert.pem`.
    pub fn write_root_bundle(&self, state_dir: &Path) -> Result<PathBuf, SignerError> {
        let path = state_dir.join(ROOT_CERT_FILE);
        pemio::write_file_atomic(
            &path,
            pemio::certs_to_pem(&self.roots).as_bytes(),
            FileMode::Public,
        )?;
        Ok(path)
    }

    /// Writes the CA's chain (signing certificate first, roots last) to
    /// `<state_dir>/ca-chain.pem`, where `palisade ca status` reads it.
    pub fn write_chain(&self, state_dir: &Path) -> Result<PathBuf, SignerError> {
        let path = state_dir.join(CA_CHAIN_FILE);
        pemio::write_file_atomic(
            &path,
            pemio::certs_to_pem(&self.chain_after_leaf).as_bytes(),
            FileMode::Public,
        )?;
        Ok(path)
    }

    /// The validity facts of the CA's chain: signing certificate first, roots last.
    pub fn chain_certs(&self) -> &[ChainCert] {
        &self.chain_certs
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// What follows a leaf in a response: intermediates, then the roots.
    pub fn chain_after_leaf(&self) -> &[CertificateDer<'static>] {
        &self.chain_after_leaf
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub fn key_algorithm(&self) -> &KeyAlgorithm {
        &self.key_algorithm
    }

    pub fn source(&self) -> &SignerSource {
        &self.source
    }

    /// Signs `params` for `public_key` with the CA key.
    pub fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<CertificateDer<'static>, SignerError> {
        params
            .signed_by(public_key, &self.issuer)
            .map(|c| c.der().clone())
            .map_err(|e| SignerError::Sign(e.to_string()))
    }
}

/// A positive random 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Never all zero: a zero serial is invalid.
    if bytes.iter().all(|b| *b == 0) {
        bytes[15] = 1;
    }
    SerialNumber::from_slice(&bytes)
}

fn self_signed_root(
    key: &KeyPair,
    trust_domain: &TrustDomain,
) -> Result<CertificateDer<'static>, SignerError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(2);
    p.not_after = now + ROOT_LIFETIME;
    p.serial_number = Some(random_serial());
    p.self_signed(key)
        .map(|c| c.der().clone())
        .map_err(|e| SignerError::Generate(e.to_string()))
}

fn load_key(path: &Path) -> Result<KeyPair, SignerError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_file(path, e))?;
    KeyPair::from_pem(&text).map_err(|e| bad_file(path, format!("unusable private key: {e}")))
}

fn check_key_matches(
    key: &KeyPair,
    cert: &CertificateDer<'_>,
    path: &Path,
) -> Result<(), SignerError> {
    let (_, parsed) =
        x509_parser::certificate::X509Certificate::from_der(cert).map_err(|e| bad_file(path, e))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad_file(
            path,
            "the private key does not belong to this certificate",
        ));
    }
    Ok(())
}

/// Checks each certificate is signed by the next one and the last by one of the roots.
fn verify_links(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) -> Result<(), String> {
    fn parse<'a>(
        c: &'a CertificateDer<'_>,
    ) -> Result<x509_parser::certificate::X509Certificate<'a>, String> {
        x509_parser::certificate::X509Certificate::from_der(c)
            .map(|(_, x)| x)
            .map_err(|e| e.to_string())
    }
    let parsed_roots = roots.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    let parsed = chain.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    for (i, cert) in parsed.iter().enumerate() {
        let ok = match parsed.get(i + 1) {
            Some(next) => cert.verify_signature(Some(next.public_key())).is_ok(),
            None => parsed_roots
                .iter()
                .any(|r| cert.verify_signature(Some(r.public_key())).is_ok()),
        };
        if !ok {
            return Err(format!(
                "certificate {} ({}) is not signed by {}",
                i,
                cert.subject(),
                if i + 1 < parsed.len() {
                    "the next certificate of the chain"
                } else {
                    "any root in root-cert.pem"
                }
            ));
        }
    }
    Ok(())
}

fn bad_file(path: &Path, reason: impl ToString) -> SignerError {
    SignerError::BadFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}
