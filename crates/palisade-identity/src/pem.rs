//! PEM reading (rustls-pki-types' `PemObject`) and writing, plus file helpers that keep private
//! keys private (mode 0600) and replace files atomically.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

/// PEM decoding or file errors.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{what}: invalid PEM: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("no {0} found in PEM input")]
    Missing(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// All certificates in a PEM document, in order. Other sections are skipped.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Invalid {
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM document.
pub fn parse_private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Missing("PRIVATE KEY"),
        e => PemError::Invalid {
            what: "private key",
            reason: e.to_string(),
        },
    })
}

/// The first certificate signing request in a PEM document.
pub fn parse_csr(pem: &[u8]) -> Result<CertificateSigningRequestDer<'static>, PemError> {
    CertificateSigningRequestDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Missing("CERTIFICATE REQUEST"),
        e => PemError::Invalid {
            what: "certificate request",
            reason: e.to_string(),
        },
    })
}

/// Encodes one PEM block with the given label (`CERTIFICATE`, `PRIVATE KEY`, ...).
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// One `CERTIFICATE` block.
pub fn cert_to_pem(cert: &CertificateDer<'_>) -> String {
    encode("CERTIFICATE", cert)
}

/// Concatenated `CERTIFICATE` blocks, in order.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| cert_to_pem(c)).collect()
}

/// The private key with the label of its encoding.
pub fn private_key_to_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    encode(label, key.secret_der())
}

/// One `CERTIFICATE REQUEST` block.
pub fn csr_to_pem(csr: &CertificateSigningRequestDer<'_>) -> String {
    encode("CERTIFICATE REQUEST", csr.as_ref())
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads all certificates of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    parse_certs(&read_file(path)?).map_err(|e| with_path(e, path))
}

/// Reads the private key of a PEM file.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    parse_private_key(&read_file(path)?).map_err(|e| with_path(e, path))
}

fn with_path(e: PemError, path: &Path) -> PemError {
    match e {
        PemError::Io { .. } => e,
        other => PemError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
        },
    }
}

/// Whether a file holds a secret: secrets are created with mode 0600.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileMode {
    Public,
    Secret,
}

/// Writes `contents` to `path` atomically (temporary file in the same directory, then rename),
/// creating the parent directory if needed.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: FileMode) -> Result<(), PemError> {
    let io_err = |source| PemError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = temp_path(path);
    create_parent(path).map_err(io_err)?;
    let result = write_new(&tmp, contents, mode).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// Creates `path` with `contents` only if it does not exist yet; returns `false` when another
/// writer got there first. Concurrent creators never see a half-written file.
pub fn create_file_exclusive(
    path: &Path,
    contents: &[u8],
    mode: FileMode,
) -> Result<bool, PemError> {
    let io_err = |source| PemError::Io {
        path: path.display().to_string(),
        source,
    };
    create_parent(path).map_err(io_err)?;
    let tmp = temp_path(path);
    write_new(&tmp, contents, mode).map_err(io_err)?;
    // A hard link fails when the target exists: an atomic create-if-absent.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

fn temp_path(path: &Path) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    path.with_file_name(name)
}

fn write_new(path: &Path, contents: &[u8], mode: FileMode) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match mode {
            FileMode::Public => 0o644,
            FileMode::Secret => 0o600,
        });
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_pem_round_trip() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = certs_to_pem(&[cert.der().clone(), cert.der().clone()]);
        let back = parse_certs(pem.as_bytes()).unwrap();
        assert_eq!(back, vec![cert.der().clone(), cert.der().clone()]);
        // Our encoder and rcgen's agree on the bytes.
        assert_eq!(parse_certs(cert.pem().as_bytes()).unwrap()[0], back[0]);
    }

    #[test]
    fn key_pem_round_trip() {
        let key = rcgen::KeyPair::generate().unwrap();
        let parsed = parse_private_key(key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(parsed.secret_der(), key.serialized_der());
        let again = parse_private_key(private_key_to_pem(&parsed).as_bytes()).unwrap();
        assert_eq!(again.secret_der(), key.serialized_der());
    }

    #[test]
    fn errors_name_what_is_missing() {
        assert!(matches!(parse_certs(b"hello"), Err(PemError::Missing(_))));
        assert!(matches!(parse_private_key(b""), Err(PemError::Missing(_))));
        assert!(matches!(parse_csr(b"junk"), Err(PemError::Missing(_))));
        let bad = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_certs(bad.as_bytes()),
            Err(PemError::Invalid { .. })
        ));
    }

    #[test]
    fn exclusive_create_and_atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/key.pem");
        assert!(create_file_exclusive(&p, b"one", FileMode::Secret).unwrap());
        assert!(!create_file_exclusive(&p, b"two", FileMode::Secret).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        write_file_atomic(&p, b"three", FileMode::Public).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
