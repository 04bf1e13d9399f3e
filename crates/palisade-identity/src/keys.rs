//! Workload key generation and CSR building (rcgen on aws-lc-rs). A CSR carries only what an
//! X.509-SVID needs: an empty subject and the SPIFFE ID as the one URI SAN. The CA decides the rest.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::spiffe::SpiffeId;

/// Key generation or CSR building failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("CSR building failed: {0}")]
    Csr(String),
    #[error("unknown key type {0:?}; expected ecdsa-p256, ecdsa-p384 or rsa-2048")]
    UnknownKeyType(String),
}

/// The workload key algorithms Palisade generates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
}

impl KeyType {
    pub const ALL: [KeyType; 3] = [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048];

    /// The command-line name: `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
        }
    }

    fn signature_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| KeyError::UnknownKeyType(s.to_owned()))
    }
}

/// A private key in PKCS#8, with its PEM form.
pub struct GeneratedKey {
    pub key_type: KeyType,
    pub der: PrivateKeyDer<'static>,
    pub pem: String,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

/// A fresh key and a CSR for `id`, signed by that key.
#[derive(Debug)]
pub struct KeyAndCsr {
    pub key: GeneratedKey,
    pub csr: CertificateSigningRequestDer<'static>,
    pub csr_pem: String,
}

/// Generates a private key of the given type (PKCS#8).
pub fn generate_key(key_type: KeyType) -> Result<GeneratedKey, KeyError> {
    let pair = generate_pair(key_type)?;
    Ok(to_generated(key_type, &pair))
}

fn generate_pair(key_type: KeyType) -> Result<rcgen::KeyPair, KeyError> {
    rcgen::KeyPair::generate_for(key_type.signature_algorithm())
        .map_err(|e| KeyError::Generate(e.to_string()))
}

fn to_generated(key_type: KeyType, pair: &rcgen::KeyPair) -> GeneratedKey {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()));
    GeneratedKey {
        key_type,
        der,
        pem: pair.serialize_pem(),
    }
}

/// Generates a key of `key_type` and a CSR asking for `id` (empty subject, one URI SAN).
pub fn generate_key_and_csr(id: &SpiffeId, key_type: KeyType) -> Result<KeyAndCsr, KeyError> {
    let pair = generate_pair(key_type)?;
    let csr = build_csr(id, &pair)?;
    Ok(KeyAndCsr {
        key: to_generated(key_type, &pair),
        csr_pem: crate::pem::csr_to_pem(&csr),
        csr,
    })
}

/// Builds a CSR for `id` signed with an existing PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn csr_for_key(id: &SpiffeId, key_pem: &str) -> Result<KeyAndCsr, KeyError> {
    let pair = rcgen::KeyPair::from_pem(key_pem).map_err(|e| KeyError::Csr(e.to_string()))?;
    let key_type = if pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
        KeyType::EcdsaP256
    } else if pair.is_compatible(&rcgen::PKCS_ECDSA_P384_SHA384) {
        KeyType::EcdsaP384
    } else if pair.is_compatible(&rcgen::PKCS_RSA_SHA256) {
        KeyType::Rsa2048
    } else {
        return Err(KeyError::Csr("unsupported key algorithm".to_owned()));
    };
    let csr = build_csr(id, &pair)?;
    Ok(KeyAndCsr {
        key: to_generated(key_type, &pair),
        csr_pem: crate::pem::csr_to_pem(&csr),
        csr,
    })
}

fn build_csr(
    id: &SpiffeId,
    pair: &rcgen::KeyPair,
) -> Result<CertificateSigningRequestDer<'static>, KeyError> {
    let mut params = rcgen::CertificateParams::default();
    // rcgen's default subject has a placeholder CN; an SVID request has an empty subject.
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|e| KeyError::Csr(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(pair)
        .map_err(|e| KeyError::Csr(e.to_string()))?;
    Ok(csr.der().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    #[test]
    fn csr_has_only_the_spiffe_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        for key_type in KeyType::ALL {
            let out = generate_key_and_csr(&id, key_type).unwrap();
            let (_, csr) = X509CertificationRequest::from_der(&out.csr).unwrap();
            csr.verify_signature().unwrap();
            assert!(
                csr.certification_request_info.subject.as_raw().len() <= 2,
                "empty subject"
            );
            let sans: Vec<String> = csr
                .requested_extensions()
                .unwrap()
                .filter_map(|e| match e {
                    ParsedExtension::SubjectAlternativeName(san) => Some(san),
                    _ => None,
                })
                .flat_map(|san| san.general_names.iter())
                .map(|n| match n {
                    GeneralName::URI(u) => u.to_string(),
                    other => format!("{other:?}"),
                })
                .collect();
            assert_eq!(sans, vec![id.to_string()], "{key_type}");
            let alg = crate::cert::KeyAlgorithm::from_spki_der(
                csr.certification_request_info.subject_pki.raw,
            )
            .unwrap();
            let want = match key_type {
                KeyType::EcdsaP256 => crate::cert::KeyAlgorithm::EcdsaP256,
                KeyType::EcdsaP384 => crate::cert::KeyAlgorithm::EcdsaP384,
                KeyType::Rsa2048 => crate::cert::KeyAlgorithm::Rsa { bits: 2048 },
            };
            assert_eq!(alg, want);
            // The PEM forms parse back to the same bytes.
            assert_eq!(
                crate::pem::parse_csr(out.csr_pem.as_bytes()).unwrap(),
                out.csr
            );
            let key = crate::pem::parse_private_key(out.key.pem.as_bytes()).unwrap();
            assert_eq!(key.secret_der(), out.key.der.secret_der());
        }
    }

    #[test]
    fn csr_for_existing_key() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let first = generate_key_and_csr(&id, KeyType::EcdsaP384).unwrap();
        let again = csr_for_key(&id, &first.key.pem).unwrap();
        assert_eq!(again.key.key_type, KeyType::EcdsaP384);
        assert_eq!(again.key.der.secret_der(), first.key.der.secret_der());
    }

    #[test]
    fn key_type_names() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>().unwrap(), k);
        }
        assert!("rsa-1024".parse::<KeyType>().is_err());
        assert_eq!(KeyType::default(), KeyType::EcdsaP256);
    }
}
