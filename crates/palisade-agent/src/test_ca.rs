//! A throwaway CA for unit tests: real certificates with chosen lifetimes.

use std::time::Duration;

use palisade_identity::{CertificateDer, PrivateKeyDer, Svid};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::PrivatePkcs8KeyDer;
use time::OffsetDateTime;

use crate::source::Issued;

pub(crate) struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) root: CertificateDer<'static>,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap().der().clone();
        Self {
            issuer: Issuer::new(params, key),
            root,
        }
    }

    /// A certificate for `id` valid from a minute ago for `ttl` from now.
    pub(crate) fn issue(&self, id: &str, ttl: Duration) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + ttl;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Issued {
            svid: Svid::new(vec![cert.der().clone()], key_der).unwrap(),
            roots: vec![self.root.clone()],
        }
    }
}
