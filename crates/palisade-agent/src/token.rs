//! The workload's service-account token: read from its file on every request (projected tokens
//! are rotated by the kubelet), and read for the identity it claims.
//!
//! The agent cannot verify the token (only the CA holds the issuer's keys); it only decodes the
//! claims (with `palisade_ca::token::peek_service_account`) to know which SPIFFE ID to put in
//! its CSR. The CA checks the signature and refuses a
//! CSR whose identity differs from the token's, so a wrong reading here fails safe.

use std::path::{Path, PathBuf};

use palisade_identity::{SpiffeId, TrustDomain};

/// Reading or interpreting the token failed; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read (missing, unreadable, a directory...).
    #[error("cannot read token file {path}: {cause}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is empty (a projected token not written yet).
    #[error("token file {path} is empty")]
    Empty {
        /// The token file.
        path: PathBuf,
    },
    /// The content is not a service-account JWT.
    #[error("token file {path} does not hold a usable service-account token: {reason}")]
    Invalid {
        /// The token file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The namespace or service account does not form a valid SPIFFE ID.
    #[error("token in {path} names an invalid identity: {reason}")]
    BadIdentity {
        /// The token file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A token as read from its file, with the identity it claims.
#[derive(Clone)]
pub struct Token {
    /// The compact JWT, as sent in `authorization: Bearer`.
    pub jwt: String,
    /// The claimed namespace.
    pub namespace: String,
    /// The claimed service account.
    pub service_account: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The JWT is a credential: never log it.
        f.debug_struct("Token")
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// The SPIFFE ID this token stands for in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, String> {
        SpiffeId::for_service_account(trust_domain.clone(), &self.namespace, &self.service_account)
            .map_err(|e| e.to_string())
    }
}

/// Where the token lives.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// The token at `path` (not read yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file now and decodes the claimed identity.
    pub fn read(&self) -> Result<Token, TokenError> {
        let raw = std::fs::read_to_string(&self.path).map_err(|cause| TokenError::Read {
            path: self.path.clone(),
            cause,
        })?;
        self.parse(raw.trim())
    }

    /// Like [`TokenFile::read`], and also builds the SPIFFE ID in `trust_domain`.
    pub fn read_identity(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<(Token, SpiffeId), TokenError> {
        let token = self.read()?;
        let id = token
            .spiffe_id(trust_domain)
            .map_err(|reason| TokenError::BadIdentity {
                path: self.path.clone(),
                reason,
            })?;
        Ok((token, id))
    }

    fn parse(&self, jwt: &str) -> Result<Token, TokenError> {
        if jwt.is_empty() {
            return Err(TokenError::Empty {
                path: self.path.clone(),
            });
        }
        let (namespace, service_account) =
            palisade_ca::token::peek_service_account(jwt).map_err(|e| TokenError::Invalid {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Token {
            jwt: jwt.to_owned(),
            namespace,
            service_account,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine as _;

    fn jwt(payload: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.{}",
            enc(r#"{"alg":"ES256"}"#),
            enc(payload),
            enc("sig")
        )
    }

    #[test]
    fn identity_from_claims() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let table: &[(&str, Result<&str, &str>)] = &[
            (
                r#"{"kubernetes.io":{"namespace":"demo","serviceaccount":{"name":"client","uid":"1"}},"sub":"system:serviceaccount:demo:client"}"#,
                Ok("spiffe://cluster.local/ns/demo/sa/client"),
            ),
            (
                r#"{"kubernetes.io":{"namespace":"demo","serviceaccount":{"name":"client"}}}"#,
                Ok("spiffe://cluster.local/ns/demo/sa/client"),
            ),
            (
                r#"{"kubernetes.io":{"namespace":"demo","serviceaccount":{"name":"client"}},"sub":"system:serviceaccount:x:y"}"#,
                Err("usable service-account token"),
            ),
            (
                r#"{"sub":"system:serviceaccount:demo:server"}"#,
                Ok("spiffe://cluster.local/ns/demo/sa/server"),
            ),
            (
                r#"{"kubernetes.io":{"namespace":"demo"},"sub":"system:serviceaccount:a:b"}"#,
                Ok("spiffe://cluster.local/ns/a/sa/b"),
            ),
            (r#"{"sub":"alice"}"#, Err("usable service-account token")),
            (r#"[1]"#, Err("usable service-account token")),
        ];
        for (payload, want) in table {
            std::fs::write(&path, format!("{}\n", jwt(payload))).unwrap();
            let got = TokenFile::new(&path).read_identity(&td);
            match (got, want) {
                (Ok((_, id)), Ok(want)) => assert_eq!(id.to_string(), *want, "{payload}"),
                (Err(e), Err(want)) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{payload}: {msg}");
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                }
                (got, want) => panic!("{payload}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "not a token").unwrap();
        let table: &[(&Path, &str)] = &[
            (&missing, "cannot read token file"),
            (dir.path(), "cannot read token file"),
            (&empty, "is empty"),
            (&garbage, "usable service-account token"),
        ];
        for (path, want) in table {
            let msg = TokenFile::new(*path).read().unwrap_err().to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn debug_hides_the_jwt() {
        let t = Token {
            jwt: "secret.jwt.value".into(),
            namespace: "n".into(),
            service_account: "s".into(),
        };
        assert!(!format!("{t:?}").contains("secret"));
    }
}
