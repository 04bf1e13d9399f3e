//! Certificate inspection with x509-parser: SANs, SPIFFE ID, validity, serial, issuer, key usages
//! and key algorithm, for one certificate ([`CertInfo`]) or a chain.

use std::fmt;
use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate cannot be inspected or does not carry a usable SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("certificate has trailing data after its DER encoding")]
    TrailingData,
    #[error("certificate extensions are invalid: {0}")]
    Extensions(String),
    #[error("certificate has no URI SAN (no SPIFFE ID)")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X.509 SVID has exactly one")]
    SeveralUriSans(usize),
    #[error("certificate URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
    #[error("empty certificate chain")]
    EmptyChain,
}

/// A public key's algorithm and size, as far as Palisade cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    /// Any other named curve, by OID.
    EcdsaOther(String),
    Rsa {
        bits: usize,
    },
    /// Anything else, by algorithm OID.
    Other(String),
}

impl KeyAlgorithm {
    /// Classifies a DER `SubjectPublicKeyInfo`.
    pub fn from_spki_der(spki: &[u8]) -> Result<Self, CertError> {
        let (_, spki) =
            SubjectPublicKeyInfo::from_der(spki).map_err(|e| CertError::Parse(e.to_string()))?;
        Ok(Self::from_spki(&spki))
    }

    /// Classifies a parsed `SubjectPublicKeyInfo`.
    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Self {
        let alg = &spki.algorithm;
        if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
            let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
            return Self::Rsa { bits };
        }
        if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            return match alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
                Some(oid) if oid == OID_EC_P256 => Self::EcdsaP256,
                Some(oid) if oid == OID_NIST_EC_P384 => Self::EcdsaP384,
                Some(oid) => Self::EcdsaOther(oid.to_id_string()),
                None => Self::EcdsaOther("no curve".to_owned()),
            };
        }
        Self::Other(alg.algorithm.to_id_string())
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EcdsaP256 => f.write_str("ECDSA P-256"),
            Self::EcdsaP384 => f.write_str("ECDSA P-384"),
            Self::EcdsaOther(curve) => write!(f, "ECDSA curve {curve}"),
            Self::Rsa { bits } => write!(f, "RSA {bits}"),
            Self::Other(oid) => write!(f, "key algorithm {oid}"),
        }
    }
}

/// What one certificate says, in plain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Serial number as lowercase hex, without leading zero bytes.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    /// SAN entries of any other kind (e-mail, directory name, other name...).
    pub other_sans: usize,
    pub san_critical: bool,
    pub is_ca: bool,
    pub key_usage: KeyUsage,
    pub server_auth: bool,
    pub client_auth: bool,
    pub key_algorithm: KeyAlgorithm,
    /// Whether subject and issuer names are byte-identical (a self-issued certificate).
    pub self_issued: bool,
}

/// The key-usage bits Palisade looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub digital_signature: bool,
    pub key_encipherment: bool,
    pub key_cert_sign: bool,
    pub crl_sign: bool,
}

impl CertInfo {
    /// Inspects one DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, CertError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertError::TrailingData);
        }
        Self::from_parsed(&cert)
    }

    fn from_parsed(cert: &X509Certificate<'_>) -> Result<Self, CertError> {
        let ext_err = |e: x509_parser::error::X509Error| CertError::Extensions(e.to_string());
        let mut info = Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: Self::serial_hex(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            uri_sans: Vec::new(),
            dns_sans: Vec::new(),
            ip_sans: Vec::new(),
            other_sans: 0,
            san_critical: false,
            is_ca: false,
            key_usage: KeyUsage::default(),
            server_auth: false,
            client_auth: false,
            key_algorithm: KeyAlgorithm::from_spki(cert.public_key()),
            self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
        };
        if let Some(san) = cert.subject_alternative_name().map_err(ext_err)? {
            info.san_critical = san.critical;
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => info.uri_sans.push((*u).to_owned()),
                    GeneralName::DNSName(d) => info.dns_sans.push((*d).to_owned()),
                    GeneralName::IPAddress(bytes) => match ip_from_bytes(bytes) {
                        Some(ip) => info.ip_sans.push(ip),
                        None => info.other_sans += 1,
                    },
                    _ => info.other_sans += 1,
                }
            }
        }
        if let Some(bc) = cert.basic_constraints().map_err(ext_err)? {
            info.is_ca = bc.value.ca;
        }
        if let Some(ku) = cert.key_usage().map_err(ext_err)? {
            info.key_usage = KeyUsage {
                digital_signature: ku.value.digital_signature(),
                key_encipherment: ku.value.key_encipherment(),
                key_cert_sign: ku.value.key_cert_sign(),
                crl_sign: ku.value.crl_sign(),
            };
        }
        if let Some(eku) = cert.extended_key_usage().map_err(ext_err)? {
            info.server_auth = eku.value.server_auth || eku.value.any;
            info.client_auth = eku.value.client_auth || eku.value.any;
        }
        Ok(info)
    }

    /// The X.509-SVID identity: exactly one URI SAN, and it must be a valid SPIFFE ID.
    pub fn spiffe_id(&self) -> Result<SpiffeId, CertError> {
        match self.uri_sans.as_slice() {
            [] => Err(CertError::NoSpiffeId),
            [one] => Ok(SpiffeId::parse(one)?),
            many => Err(CertError::SeveralUriSans(many.len())),
        }
    }

    /// A serial number's hex form: lowercase, without the DER sign-padding zero bytes.
    pub fn serial_hex(bytes: &[u8]) -> String {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        hex(&bytes[start..])
    }

    /// Whether `at` lies within `[not_before, not_after]`.
    pub fn is_valid_at(&self, at: OffsetDateTime) -> bool {
        self.not_before <= at && at <= self.not_after
    }

    /// `not_after - not_before`.
    pub fn lifetime(&self) -> time::Duration {
        self.not_after - self.not_before
    }
}

/// The SPIFFE ID of a DER certificate (an X.509-SVID has exactly one URI SAN).
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, CertError> {
    CertInfo::parse(der)?.spiffe_id()
}

/// Inspects every certificate of a chain, leaf first.
pub fn inspect_chain(chain: &[CertificateDer<'_>]) -> Result<Vec<CertInfo>, CertError> {
    if chain.is_empty() {
        return Err(CertError::EmptyChain);
    }
    chain.iter().map(|c| CertInfo::parse(c)).collect()
}

/// The earliest `not_after` of a chain: the chain stops being usable then.
pub fn chain_not_after(chain: &[CertificateDer<'_>]) -> Result<OffsetDateTime, CertError> {
    inspect_chain(chain)?
        .iter()
        .map(|c| c.not_after)
        .min()
        .ok_or(CertError::EmptyChain)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };

    fn leaf(sans: Vec<SanType>) -> (CertificateParams, KeyPair) {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = sans;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(vec![0x01, 0xab].into());
        (p, KeyPair::generate().unwrap())
    }

    #[test]
    fn inspects_a_spiffe_leaf() {
        let (p, key) = leaf(vec![SanType::URI(
            "spiffe://cluster.local/ns/default/sa/web"
                .try_into()
                .unwrap(),
        )]);
        let cert = p.self_signed(&key).unwrap();
        let info = CertInfo::parse(cert.der()).unwrap();
        assert_eq!(
            info.spiffe_id().unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert!(
            info.san_critical,
            "SAN is critical when the subject is empty"
        );
        assert_eq!(info.serial, "01ab");
        assert!(info.server_auth && info.client_auth);
        assert!(info.key_usage.digital_signature && info.key_usage.key_encipherment);
        assert!(!info.is_ca);
        assert_eq!(info.key_algorithm, KeyAlgorithm::EcdsaP256);
        assert_eq!(info.subject, "");
    }

    #[test]
    fn spiffe_id_rules() {
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let cases: Vec<(Vec<SanType>, Result<&str, CertError>)> = vec![
            (vec![], Err(CertError::NoSpiffeId)),
            (
                vec![SanType::DnsName("a.test".try_into().unwrap())],
                Err(CertError::NoSpiffeId),
            ),
            (
                vec![uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/c/sa/d")],
                Err(CertError::SeveralUriSans(2)),
            ),
            (
                vec![uri("https://td/ns/a")],
                Err(CertError::BadSpiffeId(SpiffeIdError::WrongScheme)),
            ),
            (
                vec![uri("spiffe://td/ns/a/sa/b")],
                Ok("spiffe://td/ns/a/sa/b"),
            ),
        ];
        for (sans, want) in cases {
            let (p, key) = leaf(sans.clone());
            let cert = p.self_signed(&key).unwrap();
            let got = spiffe_id_of(cert.der()).map(|id| id.to_string());
            assert_eq!(got, want.map(str::to_owned), "{sans:?}");
        }
    }

    #[test]
    fn ca_and_rsa_key() {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, "td");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let info = CertInfo::parse(p.self_signed(&key).unwrap().der()).unwrap();
        assert!(info.is_ca && info.key_usage.key_cert_sign && info.self_issued);
        assert_eq!(info.key_algorithm, KeyAlgorithm::Rsa { bits: 2048 });
        assert!(info.subject.contains("O=td"), "{}", info.subject);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [&b""[..], b"\x30\x03\x02\x01", b"not a cert at all"] {
            assert!(CertInfo::parse(input).is_err());
        }
        assert_eq!(inspect_chain(&[]), Err(CertError::EmptyChain));
    }
}
