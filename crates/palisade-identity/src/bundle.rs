//! The trust bundle: the mesh's trust domain, its aliases, and the root certificates that anchor
//! every SVID. Istio's bundle is `[trustDomain] + trustDomainAliases`; peers from any of them are
//! accepted, chained to the same roots.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::pem::PemError;
use crate::spiffe::{SpiffeId, TrustDomain};

/// A trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle has no root certificate")]
    NoRoots,
    #[error("root certificate {index} is not a usable trust anchor: {reason}")]
    BadRoot { index: usize, reason: String },
    #[error(transparent)]
    Pem(#[from] PemError),
}

/// Trust domain, aliases and root certificates. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    aliases: Vec<TrustDomain>,
    roots: Arc<[CertificateDer<'static>]>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// A bundle for `trust_domain` anchored at `roots` (at least one).
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::NoRoots);
        }
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            store.add(root.clone()).map_err(|e| BundleError::BadRoot {
                index,
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            trust_domain,
            aliases: Vec::new(),
            roots: roots.into(),
            store: Arc::new(store),
        })
    }

    /// A bundle from PEM root certificates.
    pub fn from_pem(trust_domain: TrustDomain, roots_pem: &[u8]) -> Result<Self, BundleError> {
        Self::new(trust_domain, crate::pem::parse_certs(roots_pem)?)
    }

    /// Adds trust-domain aliases (duplicates and the trust domain itself are ignored).
    pub fn with_aliases(mut self, aliases: impl IntoIterator<Item = TrustDomain>) -> Self {
        for alias in aliases {
            if alias != self.trust_domain && !self.aliases.contains(&alias) {
                self.aliases.push(alias);
            }
        }
        self
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn aliases(&self) -> &[TrustDomain] {
        &self.aliases
    }

    /// The trust domain first, then each alias.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        std::iter::once(&self.trust_domain).chain(self.aliases.iter())
    }

    /// Whether `td` is the trust domain or one of its aliases.
    pub fn accepts_trust_domain(&self, td: &TrustDomain) -> bool {
        self.trust_domains().any(|t| t == td)
    }

    /// Whether `id` belongs to the trust domain or one of its aliases.
    pub fn accepts(&self, id: &SpiffeId) -> bool {
        self.accepts_trust_domain(id.trust_domain())
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as concatenated PEM (what `root-cert.pem` holds).
    pub fn roots_pem(&self) -> String {
        crate::pem::certs_to_pem(&self.roots)
    }

    /// The roots as a rustls store (shared, not copied).
    pub fn root_store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn aliases_and_membership() {
        let td = |s: &str| TrustDomain::new(s).unwrap();
        let b = TrustBundle::new(td("a.local"), vec![root()])
            .unwrap()
            .with_aliases([td("b.local"), td("a.local"), td("b.local"), td("c.local")]);
        assert_eq!(
            b.trust_domains().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["a.local", "b.local", "c.local"]
        );
        let cases = [
            ("spiffe://a.local/ns/x/sa/y", true),
            ("spiffe://c.local/ns/x/sa/y", true),
            ("spiffe://d.local/ns/x/sa/y", false),
            ("spiffe://a.local.evil/ns/x/sa/y", false),
        ];
        for (id, want) in cases {
            assert_eq!(b.accepts(&SpiffeId::parse(id).unwrap()), want, "{id}");
        }
    }

    #[test]
    fn roots_are_required_and_round_trip_through_pem() {
        let td = TrustDomain::new("td").unwrap();
        assert!(matches!(
            TrustBundle::new(td.clone(), vec![]),
            Err(BundleError::NoRoots)
        ));
        let b = TrustBundle::new(td.clone(), vec![root(), root()]).unwrap();
        let again = TrustBundle::from_pem(td, b.roots_pem().as_bytes()).unwrap();
        assert_eq!(again.roots(), b.roots());
        assert_eq!(again.root_store().len(), 2);
    }
}
