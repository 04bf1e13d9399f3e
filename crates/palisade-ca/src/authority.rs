//! Leaf issuance: from a checked CSR and an authenticated caller to an X.509-SVID, exactly as
//! istiod issues them (random 128-bit serial, NotBefore now - 2 min, TTL default 24 h and max
//! 90 d, clamped to the CA's own expiry, digitalSignature + keyEncipherment, serverAuth +
//! clientAuth, CA:false, critical URI SAN, empty subject).
//!
//! Before every signature the CA's chain is checked against the clock: while the signing
//! certificate (or any certificate above it) is expired or not yet valid, nothing is signed and
//! the refusal names that certificate ([`crate::validity`]). A leaf never outlives the chain:
//! its notAfter is capped (not refused) at the earliest notAfter of the CA's chain; istiod 1.30
//! caps at its signing certificate's notAfter the same way.

use std::time::{Duration, Instant};

use palisade_identity::{CertificateDer, SpiffeId};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::csr::{CheckedCsr, CsrError};
use crate::signer::{Signer, SignerError, random_serial};
use crate::validity::ValidityError;

/// Default workload certificate lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a caller may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// How far NotBefore is backdated to absorb clock skew.
pub const BACKDATE: Duration = Duration::from_secs(120);

/// Issuance policy.
#[derive(Debug, Clone)]
pub struct IssuancePolicy {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL,
            max_ttl: MAX_TTL,
        }
    }
}

/// Why issuance failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("requested TTL {requested}s is greater than the max allowed TTL {max}s")]
    TtlTooLong { requested: i64, max: u64 },
    /// A certificate of the CA's chain is expired or not yet valid: the CA signs nothing.
    #[error("the CA cannot sign: {0}")]
    SigningCert(#[from] ValidityError),
    #[error("signing failed: {0}")]
    Sign(#[from] SignerError),
    #[error("identity {0} cannot be written into a certificate")]
    BadSan(String),
}

impl IssueError {
    /// The `reason` label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Csr(e) => e.reason(),
            Self::TtlTooLong { .. } => "ttl",
            Self::SigningCert(_) => "ca_cert_validity",
            Self::Sign(_) | Self::BadSan(_) => "internal",
        }
    }

    /// Whether the caller sent something wrong (InvalidArgument) rather than the CA failing
    /// (Internal).
    pub fn is_caller_error(&self) -> bool {
        matches!(self, Self::Csr(_) | Self::TtlTooLong { .. })
    }
}

/// An issued certificate with its chain.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, intermediates, roots last.
    pub chain: Vec<CertificateDer<'static>>,
    pub identity: SpiffeId,
    /// Serial as lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Time spent checking the CSR and signing.
    pub sign_duration: Duration,
}

impl Issued {
    /// The chain as one PEM string per certificate (the wire form of `cert_chain`).
    pub fn chain_pem(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(palisade_identity::pem::cert_to_pem)
            .collect()
    }
}

/// The certificate authority: a signer plus the issuance policy.
#[derive(Debug)]
pub struct Authority {
    signer: Signer,
    policy: IssuancePolicy,
}

impl Authority {
    pub fn new(signer: Signer, policy: IssuancePolicy) -> Self {
        Self { signer, policy }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn policy(&self) -> &IssuancePolicy {
        &self.policy
    }

    /// The TTL to issue for a requested `validity_duration` (seconds; <= 0 means default).
    pub fn effective_ttl(&self, requested_secs: i64) -> Result<Duration, IssueError> {
        if requested_secs <= 0 {
            return Ok(self.policy.default_ttl);
        }
        let requested = Duration::from_secs(requested_secs.unsigned_abs());
        if requested > self.policy.max_ttl {
            return Err(IssueError::TtlTooLong {
                requested: requested_secs,
                max: self.policy.max_ttl.as_secs(),
            });
        }
        Ok(requested)
    }

    /// Checks `csr_pem` and signs a leaf for `caller`, the authenticated identity.
    pub fn issue(
        &self,
        csr_pem: &str,
        caller: &SpiffeId,
        requested_ttl_secs: i64,
    ) -> Result<Issued, IssueError> {
        let started = Instant::now();
        let ttl = self.effective_ttl(requested_ttl_secs)?;
        let csr = CheckedCsr::parse_pem(csr_pem)?;
        csr.require_identity(caller)?;
        self.sign_checked(&csr, caller, ttl, started)
    }

    /// Signs an already checked CSR for `identity` (used for the CA's own serving certificate).
    pub fn sign_checked(
        &self,
        csr: &CheckedCsr,
        identity: &SpiffeId,
        ttl: Duration,
        started: Instant,
    ) -> Result<Issued, IssueError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki)
            .map_err(|e| CsrError::WeakKey(e.to_string()))?;
        self.sign_for_key(&public_key, identity, ttl, &[], started)
    }

    /// Signs a leaf for `public_key` with `identity` as its URI SAN, plus `extra_sans` (only for
    /// the CA's own serving certificate: workloads never get extra SANs).
    pub(crate) fn sign_for_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
        extra_sans: &[SanType],
        started: Instant,
    ) -> Result<Issued, IssueError> {
        // Certificates hold whole seconds; so do the times reported and logged.
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(OffsetDateTime::now_utc());
        crate::validity::check_chain(self.signer.chain_certs(), now)?;
        let not_before = now - BACKDATE;
        // Capped, not refused (istiod 1.30 does the same): a leaf that outlived the chain would
        // fail verification after the CA certificate expires anyway.
        let not_after = (now + ttl).min(self.signer.not_after());

        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(identity.to_string())
            .map_err(|_| IssueError::BadSan(identity.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.subject_alt_names.extend(extra_sans.iter().cloned());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let serial = random_serial();
        let serial_hex = palisade_identity::cert::CertInfo::serial_hex(serial.as_ref());
        p.serial_number = Some(serial);

        let leaf = self.signer.sign(&p, public_key)?;
        let mut chain = Vec::with_capacity(1 + self.signer.chain_after_leaf().len());
        chain.push(leaf);
        chain.extend(self.signer.chain_after_leaf().iter().cloned());
        Ok(Issued {
            chain,
            identity: identity.clone(),
            serial: serial_hex,
            not_before,
            not_after,
            sign_duration: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::{CaKeyType, SignerSource};
    use palisade_identity::{CertInfo, KeyType, TrustDomain};
    use rcgen::{BasicConstraints, DnType, Issuer, KeyPair};
    use std::path::Path;

    const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn id() -> SpiffeId {
        SpiffeId::parse(ID).unwrap()
    }

    fn csr() -> String {
        palisade_identity::generate_key_and_csr(&id(), KeyType::EcdsaP256)
            .unwrap()
            .csr_pem
    }

    fn ca_params(org: &str, lifetime: time::Duration) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, org);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + lifetime;
        p
    }

    /// A plug-in CA directory: root -> intermediate, intermediate lifetime as given.
    fn plugin_dir(dir: &Path, intermediate_lifetime: time::Duration) {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("Plug-in Root", time::Duration::days(3650));
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let mut int_params = ca_params("Plug-in Intermediate", intermediate_lifetime);
        int_params.use_authority_key_identifier_extension = true;
        let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
        std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
        std::fs::write(
            dir.join("cert-chain.pem"),
            format!("{}{}", int.pem(), root.pem()),
        )
        .unwrap();
    }

    fn self_signed(dir: &Path) -> Authority {
        let signer = Signer::load_or_create_root(dir, &td(), CaKeyType::EcdsaP256).unwrap();
        Authority::new(signer, IssuancePolicy::default())
    }

    #[test]
    fn leaf_matches_the_facts_sheet() {
        let dir = tempfile::tempdir().unwrap();
        let ca = self_signed(dir.path());
        let before = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let issued = ca.issue(&csr(), &id(), 0).unwrap();
        assert_eq!(issued.chain.len(), 2, "leaf then root");
        let leaf = CertInfo::parse(&issued.chain[0]).unwrap();
        assert_eq!(leaf.spiffe_id().unwrap(), id());
        assert_eq!(leaf.uri_sans, vec![ID.to_owned()]);
        assert!(leaf.dns_sans.is_empty() && leaf.ip_sans.is_empty());
        assert!(leaf.san_critical);
        assert_eq!(leaf.subject, "");
        assert!(!leaf.is_ca);
        assert!(leaf.key_usage.digital_signature && leaf.key_usage.key_encipherment);
        assert!(!leaf.key_usage.key_cert_sign);
        assert!(leaf.server_auth && leaf.client_auth);
        assert_eq!(leaf.serial, issued.serial);
        assert!(leaf.serial.len() >= 30, "128-bit serial: {}", leaf.serial);
        let backdate = before - leaf.not_before;
        assert!(
            (time::Duration::seconds(119)..=time::Duration::seconds(121)).contains(&backdate),
            "{backdate}"
        );
        assert_eq!(
            leaf.lifetime(),
            time::Duration::hours(24) + time::Duration::minutes(2)
        );
        let root = CertInfo::parse(&issued.chain[1]).unwrap();
        assert!(root.is_ca && root.self_issued);
        assert_eq!(root.subject, "O=cluster.local");
        assert_eq!(leaf.issuer, root.subject);
        // Serials differ between issuances.
        let again = ca.issue(&csr(), &id(), 0).unwrap();
        assert_ne!(again.serial, issued.serial);
    }

    #[test]
    fn ttl_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ca = self_signed(dir.path());
        let day = 86_400;
        let cases: [(i64, Result<i64, &str>); 6] = [
            (0, Ok(day)),
            (-5, Ok(day)),
            (3600, Ok(3600)),
            (90 * day, Ok(90 * day)),
            (90 * day + 1, Err("ttl")),
            (i64::MAX, Err("ttl")),
        ];
        for (requested, want) in cases {
            match (ca.issue(&csr(), &id(), requested), want) {
                (Ok(issued), Ok(secs)) => {
                    assert_eq!(
                        issued.not_after - issued.not_before,
                        time::Duration::seconds(secs + 120),
                        "{requested}"
                    );
                }
                (Err(e), Err(reason)) => {
                    assert_eq!(e.reason(), reason, "{requested}");
                    assert!(e.is_caller_error());
                }
                (got, want) => panic!("{requested}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn root_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Signer::load_or_create_root(dir.path(), &td(), CaKeyType::Rsa2048).unwrap();
        assert_eq!(first.source(), &SignerSource::SelfSigned { created: true });
        assert_eq!(
            first.key_algorithm(),
            &palisade_identity::KeyAlgorithm::Rsa { bits: 2048 }
        );
        let root = CertInfo::parse(&first.roots()[0]).unwrap();
        let lifetime = root.not_after - root.not_before;
        assert!(lifetime >= time::Duration::days(3650), "{lifetime}");
        // A restart asking for another key type keeps the existing root.
        let second = Signer::load_or_create_root(dir.path(), &td(), CaKeyType::EcdsaP256).unwrap();
        assert_eq!(
            second.source(),
            &SignerSource::SelfSigned { created: false }
        );
        assert_eq!(second.roots(), first.roots());
        let path = second.write_root_bundle(dir.path()).unwrap();
        let written = palisade_identity::pem::read_certs(&path).unwrap();
        assert_eq!(written, first.roots());
    }

    #[test]
    fn plugin_ca_signs_as_intermediate_and_clamps_ttl() {
        let dir = tempfile::tempdir().unwrap();
        plugin_dir(dir.path(), time::Duration::hours(2));
        let signer = Signer::load_plugin(dir.path()).unwrap();
        let ca = Authority::new(signer, IssuancePolicy::default());
        let issued = ca.issue(&csr(), &id(), 0).unwrap();
        let infos = palisade_identity::inspect_chain(&issued.chain).unwrap();
        assert_eq!(infos.len(), 3, "leaf, intermediate, root");
        assert_eq!(infos[0].issuer, "O=Plug-in Intermediate");
        assert_eq!(infos[1].subject, "O=Plug-in Intermediate");
        assert_eq!(infos[2].subject, "O=Plug-in Root");
        // The 24 h default is clamped to the intermediate's expiry.
        assert_eq!(infos[0].not_after, infos[1].not_after);
        assert!(infos[0].not_after < OffsetDateTime::now_utc() + time::Duration::hours(3));
    }

    /// A plug-in CA directory whose intermediate is valid from `now + nb` to `now + na`, under
    /// a root valid from `now + root_nb` to `now + root_na`.
    fn plugin_dir_valid(
        dir: &Path,
        (nb, na): (time::Duration, time::Duration),
        (root_nb, root_na): (time::Duration, time::Duration),
    ) {
        let now = OffsetDateTime::now_utc();
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = ca_params("Plug-in Root", time::Duration::days(1));
        root_params.not_before = now + root_nb;
        root_params.not_after = now + root_na;
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate().unwrap();
        let mut int_params = ca_params("Plug-in Intermediate", time::Duration::days(1));
        int_params.not_before = now + nb;
        int_params.not_after = now + na;
        int_params.use_authority_key_identifier_extension = true;
        let int = int_params.signed_by(&int_key, &root_issuer).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
        std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    }

    /// Signing against the validity of the CA's chain: refused outside it (naming the
    /// certificate), allowed within it, and a leaf never outlives the intermediate.
    #[test]
    fn signing_follows_the_validity_of_the_ca_chain() {
        let d = time::Duration::days;
        let ten_years = (d(-1), d(3650));
        // (name, intermediate validity, root validity, requested TTL (s), expected)
        enum Want {
            /// Issued with this lifetime after notBefore's 2-minute backdate (None: capped at
            /// the intermediate's notAfter).
            Issued(Option<time::Duration>),
            Refused(&'static str, &'static str),
        }
        let cases = [
            (
                "valid",
                (d(-1), d(365)),
                ten_years,
                0,
                Want::Issued(Some(time::Duration::hours(24))),
            ),
            (
                "expired intermediate",
                (d(-30), d(-1)),
                ten_years,
                0,
                Want::Refused("intermediate", "has expired"),
            ),
            (
                "intermediate not yet valid",
                (d(1), d(365)),
                ten_years,
                0,
                Want::Refused("intermediate", "is not yet valid"),
            ),
            (
                "expired root",
                (d(-1), d(365)),
                (d(-3650), d(-1)),
                0,
                Want::Refused("root", "has expired"),
            ),
            (
                "intermediate within 30 days signs",
                (d(-1), d(10)),
                ten_years,
                0,
                Want::Issued(Some(time::Duration::hours(24))),
            ),
            (
                "a 30-day leaf under a 10-day intermediate is capped",
                (d(-1), d(10)),
                ten_years,
                30 * 86_400,
                Want::Issued(None),
            ),
        ];
        for (name, int_validity, root_validity, ttl, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            plugin_dir_valid(dir.path(), int_validity, root_validity);
            let signer = Signer::load_plugin(dir.path()).unwrap();
            let intermediate = CertInfo::parse(&signer.chain_after_leaf()[0]).unwrap();
            let ca = Authority::new(signer, IssuancePolicy::default());
            match (ca.issue(&csr(), &id(), ttl), want) {
                (Ok(issued), Want::Issued(lifetime)) => {
                    let leaf = CertInfo::parse(&issued.chain[0]).unwrap();
                    assert!(leaf.not_after <= intermediate.not_after, "{name}");
                    match lifetime {
                        Some(l) => {
                            assert_eq!(leaf.not_after - leaf.not_before, l + BACKDATE, "{name}")
                        }
                        None => assert_eq!(leaf.not_after, intermediate.not_after, "{name}"),
                    }
                }
                (Err(e), Want::Refused(role, word)) => {
                    assert!(matches!(e, IssueError::SigningCert(_)), "{name}: {e:?}");
                    assert_eq!(e.reason(), "ca_cert_validity", "{name}");
                    assert!(!e.is_caller_error(), "{name}");
                    let text = e.to_string();
                    let subject = if role == "root" {
                        "O=Plug-in Root"
                    } else {
                        "O=Plug-in Intermediate"
                    };
                    for part in [
                        role,
                        word,
                        subject,
                        "serial",
                        "notBefore",
                        "notAfter",
                        "now",
                    ] {
                        assert!(text.contains(part), "{name}: {text:?} lacks {part:?}");
                    }
                }
                (got, _) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn an_expired_self_signed_root_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = ca_params("cluster.local", time::Duration::days(1));
        p.not_before = OffsetDateTime::now_utc() - time::Duration::days(3650);
        p.not_after = OffsetDateTime::now_utc() - time::Duration::seconds(5);
        let root = p.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), root.pem()).unwrap();
        let ca = self_signed(dir.path());
        let err = ca.issue(&csr(), &id(), 0).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("the CA's root certificate"), "{text}");
        assert!(text.contains("has expired"), "{text}");
        // The chain written for `palisade ca status` names it the same way.
        let path = ca.signer().write_chain(dir.path()).unwrap();
        let chain = palisade_identity::pem::read_certs(&path).unwrap();
        let described = crate::validity::describe_chain(&chain, ca.signer().roots()).unwrap();
        assert_eq!(described, ca.signer().chain_certs());
        assert_eq!(described[0].role, crate::validity::CertRole::Root);
    }

    #[test]
    fn broken_plugin_dirs_are_refused() {
        type Breaker = fn(&Path);
        let cases: [(&str, Breaker); 4] = [
            ("missing key", |d| {
                std::fs::remove_file(d.join("ca-key.pem")).unwrap()
            }),
            ("key of another certificate", |d| {
                std::fs::write(
                    d.join("ca-key.pem"),
                    KeyPair::generate().unwrap().serialize_pem(),
                )
                .unwrap()
            }),
            ("foreign root", |d| {
                let k = KeyPair::generate().unwrap();
                let other = ca_params("Other", time::Duration::days(1))
                    .self_signed(&k)
                    .unwrap();
                std::fs::write(d.join("root-cert.pem"), other.pem()).unwrap();
                std::fs::remove_file(d.join("cert-chain.pem")).unwrap();
            }),
            ("garbage certificate", |d| {
                std::fs::write(d.join("ca-cert.pem"), "not pem").unwrap()
            }),
        ];
        for (name, breakit) in cases {
            let dir = tempfile::tempdir().unwrap();
            plugin_dir(dir.path(), time::Duration::days(30));
            breakit(dir.path());
            let err = Signer::load_plugin(dir.path()).unwrap_err();
            assert!(!err.to_string().is_empty(), "{name}");
        }
    }
}
