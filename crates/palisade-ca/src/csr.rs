//! CSR checks. Only two things in a CSR are used: the public key (after the CSR's signature
//! proves possession of it) and the requested SPIFFE ID, which must be the caller's own. Every
//! other wish (subject, CA flag, key usages, validity) is ignored: the CA decides those.

use palisade_identity::{KeyAlgorithm, SpiffeId};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest CSR accepted, in bytes of PEM.
pub const MAX_CSR_PEM_LEN: usize = 64 * 1024;

/// Why a CSR is refused. All of these map to gRPC InvalidArgument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is larger than {MAX_CSR_PEM_LEN} bytes")]
    TooLarge,
    #[error("CSR is not PEM: {0}")]
    NotPem(String),
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR signature is invalid")]
    BadSignature,
    #[error(
        "CSR key {0} is not allowed: use ECDSA P-256, ECDSA P-384 or RSA of at least {MIN_RSA_BITS} bits"
    )]
    WeakKey(String),
    #[error("CSR asks for a DNS name ({0}): workload certificates carry only the SPIFFE ID")]
    DnsSan(String),
    #[error("CSR asks for an IP address SAN ({0}): workload certificates carry only the SPIFFE ID")]
    IpSan(String),
    #[error("CSR asks for an unsupported SAN type: {0}")]
    OtherSan(String),
    #[error("CSR has no URI SAN: it must ask for the caller's SPIFFE ID")]
    NoIdentity,
    #[error("CSR asks for several URI SANs ({0}): it must ask for exactly the caller's SPIFFE ID")]
    SeveralIdentities(usize),
    #[error("CSR URI SAN {0:?} is not a valid SPIFFE ID")]
    BadIdentity(String),
    #[error("CSR asks for identity {requested} but the caller is {caller}")]
    IdentityMismatch { requested: String, caller: String },
}

impl CsrError {
    /// The `reason` label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge | Self::NotPem(_) | Self::Malformed(_) => "csr_malformed",
            Self::BadSignature => "csr_signature",
            Self::WeakKey(_) => "csr_key",
            Self::DnsSan(_) | Self::IpSan(_) | Self::OtherSan(_) => "csr_extra_san",
            Self::NoIdentity | Self::SeveralIdentities(_) | Self::BadIdentity(_) => "csr_identity",
            Self::IdentityMismatch { .. } => "csr_identity_mismatch",
        }
    }
}

/// A CSR whose signature, key and SANs passed the checks.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// DER SubjectPublicKeyInfo of the requester's key.
    pub spki: Vec<u8>,
    pub key_algorithm: KeyAlgorithm,
    pub requested_id: SpiffeId,
}

impl CheckedCsr {
    /// Parses and checks a PEM CSR (signature, key strength, SANs). The requested identity still
    /// has to be compared with the caller: see [`CheckedCsr::require_identity`].
    pub fn parse_pem(pem: &str) -> Result<Self, CsrError> {
        if pem.len() > MAX_CSR_PEM_LEN {
            return Err(CsrError::TooLarge);
        }
        let der = palisade_identity::pem::parse_csr(pem.as_bytes())
            .map_err(|e| CsrError::NotPem(e.to_string()))?;
        Self::parse_der(der.as_ref())
    }

    /// Like [`CheckedCsr::parse_pem`], from DER.
    pub fn parse_der(der: &[u8]) -> Result<Self, CsrError> {
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed("trailing data".to_owned()));
        }
        let info = &csr.certification_request_info;
        let key_algorithm = KeyAlgorithm::from_spki(&info.subject_pki);
        match key_algorithm {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {}
            KeyAlgorithm::Rsa { bits } if bits >= MIN_RSA_BITS => {}
            ref other => return Err(CsrError::WeakKey(other.to_string())),
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

        let mut uris = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            let ParsedExtension::SubjectAlternativeName(san) = ext else {
                // Key usages, basic constraints and the like are ignored, never copied.
                continue;
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(*u),
                    GeneralName::DNSName(d) => return Err(CsrError::DnsSan((*d).to_owned())),
                    GeneralName::IPAddress(ip) => {
                        return Err(CsrError::IpSan(format!("{ip:02x?}")));
                    }
                    other => return Err(CsrError::OtherSan(format!("{other:?}"))),
                }
            }
        }
        let requested_id = match uris.as_slice() {
            [] => return Err(CsrError::NoIdentity),
            [one] => SpiffeId::parse(one).map_err(|_| CsrError::BadIdentity((*one).to_owned()))?,
            many => return Err(CsrError::SeveralIdentities(many.len())),
        };
        Ok(Self {
            spki: info.subject_pki.raw.to_vec(),
            key_algorithm,
            requested_id,
        })
    }

    /// Refuses a CSR that asks for anything but the caller's own identity.
    pub fn require_identity(&self, caller: &SpiffeId) -> Result<(), CsrError> {
        if &self.requested_id != caller {
            return Err(CsrError::IdentityMismatch {
                requested: self.requested_id.to_string(),
                caller: caller.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_identity::KeyType;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn csr_with(sans: Vec<SanType>, key: &KeyPair) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    /// Flips one bit in the signature (the last byte of the DER).
    fn corrupt_signature(pem: &str) -> String {
        let mut der = palisade_identity::pem::parse_csr(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        palisade_identity::pem::encode("CERTIFICATE REQUEST", &der)
    }

    #[test]
    fn csr_table() {
        let p256 = KeyPair::generate().unwrap();
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let good = csr_with(vec![uri(ID)], &p256);
        let cases: Vec<(&str, String, Result<(), &str>)> = vec![
            ("good P-256", good.clone(), Ok(())),
            (
                "good P-384",
                palisade_identity::generate_key_and_csr(
                    &SpiffeId::parse(ID).unwrap(),
                    KeyType::EcdsaP384,
                )
                .unwrap()
                .csr_pem,
                Ok(()),
            ),
            (
                "good RSA-2048",
                palisade_identity::generate_key_and_csr(
                    &SpiffeId::parse(ID).unwrap(),
                    KeyType::Rsa2048,
                )
                .unwrap()
                .csr_pem,
                Ok(()),
            ),
            (
                "bad signature",
                corrupt_signature(&good),
                Err("csr_signature"),
            ),
            (
                "extra DNS SAN",
                csr_with(
                    vec![uri(ID), SanType::DnsName("web.example".try_into().unwrap())],
                    &p256,
                ),
                Err("csr_extra_san"),
            ),
            (
                "IP SAN",
                csr_with(
                    vec![uri(ID), SanType::IpAddress([10, 0, 0, 1].into())],
                    &p256,
                ),
                Err("csr_extra_san"),
            ),
            ("no SAN", csr_with(vec![], &p256), Err("csr_identity")),
            (
                "two URIs",
                csr_with(
                    vec![uri(ID), uri("spiffe://cluster.local/ns/x/sa/y")],
                    &p256,
                ),
                Err("csr_identity"),
            ),
            (
                "non-SPIFFE URI",
                csr_with(vec![uri("https://cluster.local/ns/x")], &p256),
                Err("csr_identity"),
            ),
            (
                "RSA-1024",
                include_str!("../testdata/rsa1024.csr.pem").to_owned(),
                Err("csr_key"),
            ),
            (
                "P-521",
                include_str!("../testdata/p521.csr.pem").to_owned(),
                Err("csr_key"),
            ),
            ("Ed25519", csr_with(vec![uri(ID)], &ed), Err("csr_key")),
            (
                "random bytes",
                "\u{1}\u{2}garbage\u{ff}".to_owned(),
                Err("csr_malformed"),
            ),
            (
                "PEM of garbage",
                palisade_identity::pem::encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
                Err("csr_malformed"),
            ),
            (
                "too large",
                "A".repeat(MAX_CSR_PEM_LEN + 1),
                Err("csr_malformed"),
            ),
        ];
        for (name, pem, want) in cases {
            let got = CheckedCsr::parse_pem(&pem);
            match (got, want) {
                (Ok(csr), Ok(())) => assert_eq!(csr.requested_id.to_string(), ID, "{name}"),
                (Err(e), Err(reason)) => assert_eq!(e.reason(), reason, "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn identity_must_be_the_callers() {
        let key = KeyPair::generate().unwrap();
        let csr = CheckedCsr::parse_pem(&csr_with(vec![uri(ID)], &key)).unwrap();
        csr.require_identity(&SpiffeId::parse(ID).unwrap()).unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/other/sa/web").unwrap();
        let err = csr.require_identity(&other).unwrap_err();
        assert_eq!(err.reason(), "csr_identity_mismatch");
        assert!(err.to_string().contains("ns/other"), "{err}");
    }
}
