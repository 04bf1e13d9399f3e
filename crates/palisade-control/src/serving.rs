//! The ADS serving certificate: issued by the control plane's own CA for its SPIFFE identity,
//! and re-issued at half its remaining lifetime, as workloads rotate theirs. Listeners take it
//! from an [`SvidResolver`], so each new handshake gets the current certificate while open
//! streams keep theirs: proxies reconnect against a valid certificate whatever the rotation did.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use palisade_ca::Authority;
use palisade_identity::{KeyType, SpiffeId, Svid, SvidResolver};
use tokio::task::JoinHandle;

/// Default lifetime of the ADS serving certificate.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The soonest a rotation or retry happens: a certificate that the CA can only issue already
/// near its end (the root expiring) must not turn rotation into a busy loop.
const MIN_DELAY: Duration = Duration::from_secs(1);

/// Issuing the serving certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error("ADS serving certificate: key: {0}")]
    Key(#[from] palisade_identity::KeyError),
    #[error("ADS serving certificate: {0}")]
    Issue(#[from] palisade_ca::IssueError),
    #[error("ADS serving certificate: {0}")]
    Tls(#[from] palisade_identity::TlsError),
}

/// A fresh key and a certificate for `identity` valid for `ttl` (whole seconds, at least one).
pub fn issue(
    authority: &Authority,
    identity: &SpiffeId,
    ttl: Duration,
) -> Result<Svid, ServingCertError> {
    let key = palisade_identity::generate_key_and_csr(identity, KeyType::EcdsaP256)?;
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let issued = authority.issue(&key.csr_pem, identity, secs)?;
    Ok(Svid::new(issued.chain, key.key.der)?)
}

/// When to replace `svid`: half of what is left of its validity, from now.
pub fn rotation_delay(svid: &Svid, now: SystemTime) -> Duration {
    let not_after: SystemTime = svid.not_after().into();
    let left = not_after.duration_since(now).unwrap_or_default();
    (left / 2).max(MIN_DELAY)
}

/// Issues the serving certificate and keeps it fresh: the resolver to serve from, and the
/// rotation task (abort it to stop).
pub fn start(
    authority: Arc<Authority>,
    identity: SpiffeId,
    ttl: Duration,
) -> Result<(Arc<SvidResolver>, JoinHandle<()>), ServingCertError> {
    let first = issue(&authority, &identity, ttl)?;
    tracing::info!(
        serial = %first.leaf_info().serial,
        not_after = %first.not_after(),
        "ADS serving certificate issued"
    );
    let resolver = SvidResolver::new(&first);
    let task = tokio::spawn(rotate(
        authority,
        identity,
        ttl,
        Arc::clone(&resolver),
        first,
    ));
    Ok((resolver, task))
}

async fn rotate(
    authority: Arc<Authority>,
    identity: SpiffeId,
    ttl: Duration,
    resolver: Arc<SvidResolver>,
    mut current: Svid,
) {
    let mut delay = rotation_delay(&current, SystemTime::now());
    loop {
        tokio::time::sleep(delay).await;
        match issue(&authority, &identity, ttl) {
            Ok(svid) => {
                resolver.update(&svid);
                tracing::info!(
                    serial = %svid.leaf_info().serial,
                    not_after = %svid.not_after(),
                    "ADS serving certificate rotated"
                );
                delay = rotation_delay(&svid, SystemTime::now());
                current = svid;
            }
            Err(e) => {
                // Retry well before the current certificate ends: a quarter of what is left.
                let left: SystemTime = current.not_after().into();
                let left = left.duration_since(SystemTime::now()).unwrap_or_default();
                delay = (left / 4).clamp(MIN_DELAY, Duration::from_secs(60));
                tracing::error!(error = %e, retry_in = ?delay, "ADS serving certificate rotation failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(dir: &std::path::Path) -> Arc<Authority> {
        let td = palisade_identity::TrustDomain::new("cluster.local").unwrap();
        let signer =
            palisade_ca::Signer::load_or_create_root(dir, &td, palisade_ca::CaKeyType::EcdsaP256)
                .unwrap();
        Arc::new(Authority::new(
            signer,
            palisade_ca::IssuancePolicy::default(),
        ))
    }

    fn identity() -> SpiffeId {
        SpiffeId::new(
            palisade_identity::TrustDomain::new("cluster.local").unwrap(),
            palisade_ca::CONTROL_PLANE_PATH,
        )
        .unwrap()
    }

    #[test]
    fn rotates_at_half_of_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let svid = issue(
            &authority(dir.path()),
            &identity(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let now = SystemTime::now();
        // NotBefore is backdated (clock skew); the delay counts from now, not from NotBefore.
        let d = rotation_delay(&svid, now);
        assert!(
            (Duration::from_secs(1790)..=Duration::from_secs(1800)).contains(&d),
            "{d:?}"
        );
        // Past its end: retry soon, never in a busy loop.
        let later = now + Duration::from_secs(7200);
        assert_eq!(rotation_delay(&svid, later), MIN_DELAY);
    }

    #[tokio::test]
    async fn the_resolver_serves_a_new_certificate_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (resolver, task) =
            start(authority(dir.path()), identity(), Duration::from_secs(2)).unwrap();
        let serial = |r: &SvidResolver| {
            let key = rustls::client::ResolvesClientCert::resolve(r, &[], &[]).unwrap();
            palisade_identity::inspect_chain(&key.cert).unwrap()[0]
                .serial
                .clone()
        };
        let first = serial(&resolver);
        // Real time: the rotation is due after one second (half of two).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while serial(&resolver) == first {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no rotation within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
    }
}
