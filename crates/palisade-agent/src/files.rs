//! Optional copies of the certificates on disk (`--write-certs DIR`), for tools that want files:
//! `cert-chain.pem`, `key.pem` (mode 0600) and `root-cert.pem`, rewritten atomically on every
//! rotation. Off by default: the key then never leaves memory.

use std::path::{Path, PathBuf};

use palisade_identity::FileMode;
use palisade_identity::pem::write_file_atomic;
use tokio::task::JoinHandle;

use crate::manager::{SecretState, SecretWatch};

/// Writes the current certificate files into `dir`.
pub fn write_state(dir: &Path, state: &SecretState) -> Result<(), palisade_identity::PemError> {
    if let Some(svid) = &state.svid {
        write_file_atomic(
            &dir.join("key.pem"),
            svid.private_key_pem().as_bytes(),
            FileMode::Secret,
        )?;
        write_file_atomic(
            &dir.join("cert-chain.pem"),
            svid.chain_pem().as_bytes(),
            FileMode::Public,
        )?;
    }
    if !state.roots.is_empty() {
        let roots = palisade_identity::pem::certs_to_pem(&state.roots);
        write_file_atomic(
            &dir.join("root-cert.pem"),
            roots.as_bytes(),
            FileMode::Public,
        )?;
    }
    Ok(())
}

/// Rewrites the files whenever the served certificate changes.
pub fn spawn_writer(dir: PathBuf, mut state: SecretWatch) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut written_serial = None;
        loop {
            let current = state.borrow_and_update().clone();
            let serial = current.svid.as_ref().map(|s| s.leaf_info().serial.clone());
            if serial != written_serial {
                match write_state(&dir, &current) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "certificate files written");
                        written_serial = serial;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot write certificate files"),
                }
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    use super::*;
    use crate::manager::CertStatus;
    use crate::test_ca::TestCa;

    #[test]
    fn writes_chain_key_and_roots_with_the_key_private() {
        let ca = TestCa::new();
        let issued = ca.issue("spiffe://cluster.local/ns/a/sa/b", Duration::from_secs(60));
        let state = SecretState {
            svid: Some(issued.svid.clone()),
            roots: vec![ca.root.clone()],
            status: CertStatus::Active,
            next_attempt: None,
            last_error: None,
            consecutive_failures: 0,
            issued: 1,
        };
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &state).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("cert-chain.pem"), issued.svid.chain_pem());
        assert_eq!(read("key.pem"), issued.svid.private_key_pem());
        assert_eq!(
            read("root-cert.pem"),
            palisade_identity::pem::certs_to_pem(&state.roots)
        );
        let mode = std::fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
