//! SPIFFE identifiers: [`TrustDomain`] and [`SpiffeId`], parsed strictly at the edge.
//!
//! Rules (SPIFFE ID specification): scheme exactly `spiffe`; trust domain made of lowercase
//! letters, digits, `.`, `-` and `_` (at most 255 bytes, no port, no user info); path segments
//! made of letters, digits, `.`, `-` and `_`, never empty, never `.` or `..`; no trailing slash,
//! query or fragment; the whole ID at most 2048 bytes. Istio's workload form is
//! `spiffe://<td>/ns/<namespace>/sa/<service-account>`; [`SpiffeId::workload`] recognises it.

use std::fmt;
use std::str::FromStr;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Maximum length of a trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Maximum length of a whole SPIFFE ID, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// Why a string is not a valid trust domain or SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "trust domain contains {0:?}: only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar(char),
    #[error("path segment is empty (double or trailing slash)")]
    EmptySegment,
    #[error("path segment \".\" or \"..\" is not allowed")]
    DotSegment,
    #[error("path contains {0:?}: only letters, digits, '.', '-' and '_' are allowed")]
    BadPathChar(char),
    #[error("SPIFFE ID must not have a query or fragment")]
    QueryOrFragment,
    #[error(
        "not a workload identity of the form spiffe://<td>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkload,
}

/// A validated SPIFFE trust domain name, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        if let Some(c) = name.chars().find(|c| !is_trust_domain_char(*c)) {
            if c == '?' || c == '#' {
                return Err(SpiffeIdError::QueryOrFragment);
            }
            return Err(SpiffeIdError::BadTrustDomainChar(c));
        }
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself: `spiffe://<td>`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID: trust domain plus a (possibly empty) path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://<td>[/<path>]` strictly.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }

    /// Parses a SPIFFE ID that must be of Istio's workload form `/ns/<ns>/sa/<sa>`.
    pub fn parse_workload(s: &str) -> Result<Self, SpiffeIdError> {
        let id = Self::parse(s)?;
        if id.workload().is_none() {
            return Err(SpiffeIdError::NotWorkload);
        }
        Ok(id)
    }

    /// Builds `spiffe://<td><path>`; `path` is empty or starts with `/`.
    pub fn new(trust_domain: TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        validate_path(path)?;
        let id = Self {
            trust_domain,
            path: path.to_owned(),
        };
        if id.to_string().len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    /// Istio's workload identity `spiffe://<td>/ns/<namespace>/sa/<service_account>`. Each name
    /// must be a single valid path segment, so a name can never smuggle in extra segments.
    pub fn for_service_account(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        Self::new(
            trust_domain,
            &format!("/ns/{namespace}/sa/{service_account}"),
        )
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path segments (none for a trust-domain ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').skip(1)
    }

    /// `(namespace, service_account)` when the path is exactly `/ns/<ns>/sa/<sa>`.
    pub fn workload(&self) -> Option<(&str, &str)> {
        let mut it = self.segments();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        self.workload().map(|(ns, _)| ns)
    }

    pub fn service_account(&self) -> Option<&str> {
        self.workload().map(|(_, sa)| sa)
    }

    /// The Istio principal string: the ID without the `spiffe://` prefix (`<td>/ns/<ns>/sa/<sa>`).
    pub fn principal(&self) -> String {
        format!("{}{}", self.trust_domain, self.path)
    }

    /// The same path in another trust domain (used to expand trust-domain aliases).
    pub fn with_trust_domain(&self, trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            path: self.path.clone(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::EmptySegment);
    };
    rest.split('/').try_for_each(validate_segment)
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment);
    }
    if let Some(c) = segment.chars().find(|c| !is_path_char(*c)) {
        if c == '?' || c == '#' {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        return Err(SpiffeIdError::BadPathChar(c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_table() {
        use SpiffeIdError as E;
        type Want = Result<(&'static str, &'static str), SpiffeIdError>;
        let cases: &[(&str, Want)] = &[
            (
                "spiffe://cluster.local/ns/default/sa/web",
                Ok(("cluster.local", "/ns/default/sa/web")),
            ),
            ("spiffe://example.org", Ok(("example.org", ""))),
            (
                "spiffe://td_1-x.y/a/B/c.d-e_f",
                Ok(("td_1-x.y", "/a/B/c.d-e_f")),
            ),
            ("", Err(E::Empty)),
            ("http://cluster.local/ns/a/sa/b", Err(E::WrongScheme)),
            ("SPIFFE://cluster.local/ns/a/sa/b", Err(E::WrongScheme)),
            ("spiffe:/cluster.local", Err(E::WrongScheme)),
            ("spiffe://", Err(E::MissingTrustDomain)),
            ("spiffe:///ns/a", Err(E::MissingTrustDomain)),
            (
                "spiffe://Cluster.local/ns/a",
                Err(E::BadTrustDomainChar('C')),
            ),
            (
                "spiffe://cluster.local:8080/ns/a",
                Err(E::BadTrustDomainChar(':')),
            ),
            (
                "spiffe://user@cluster.local/ns/a",
                Err(E::BadTrustDomainChar('@')),
            ),
            ("spiffe://cluster.local/", Err(E::EmptySegment)),
            ("spiffe://cluster.local/ns//sa/b", Err(E::EmptySegment)),
            ("spiffe://cluster.local/ns/a/sa/b/", Err(E::EmptySegment)),
            ("spiffe://cluster.local/ns/./sa/b", Err(E::DotSegment)),
            ("spiffe://cluster.local/ns/../sa/b", Err(E::DotSegment)),
            (
                "spiffe://cluster.local/ns/a%2F/sa/b",
                Err(E::BadPathChar('%')),
            ),
            ("spiffe://cluster.local/ns/a b", Err(E::BadPathChar(' '))),
            ("spiffe://cluster.local/ns/a?x=1", Err(E::QueryOrFragment)),
            ("spiffe://cluster.local/ns/a#frag", Err(E::QueryOrFragment)),
            ("spiffe://cluster.local?x", Err(E::QueryOrFragment)),
        ];
        for (input, want) in cases {
            let got = SpiffeId::parse(input);
            match (got, want) {
                (Ok(id), Ok((td, path))) => {
                    assert_eq!(id.trust_domain().as_str(), *td, "{input}");
                    assert_eq!(id.path(), *path, "{input}");
                    assert_eq!(id.to_string(), *input, "round trip of {input}");
                }
                (Err(e), Err(w)) => assert_eq!(&e, w, "{input}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn too_long_inputs() {
        let td = "a".repeat(256);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td}")),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
        let path = "/x".repeat(1100);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://td{path}")),
            Err(SpiffeIdError::TooLong)
        );
    }

    #[test]
    fn workload_form() {
        let cases = [
            (
                "spiffe://cluster.local/ns/default/sa/web",
                Some(("default", "web")),
            ),
            ("spiffe://cluster.local/ns/default/sa", None),
            ("spiffe://cluster.local/ns/default/sa/web/extra", None),
            ("spiffe://cluster.local/sa/web/ns/default", None),
            ("spiffe://cluster.local", None),
        ];
        for (input, want) in cases {
            let id = SpiffeId::parse(input).unwrap();
            assert_eq!(id.workload(), want, "{input}");
            assert_eq!(
                SpiffeId::parse_workload(input).is_ok(),
                want.is_some(),
                "{input}"
            );
        }
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert_eq!(id.principal(), "td/ns/a/sa/b");
        assert_eq!(id.namespace(), Some("a"));
        assert_eq!(id.service_account(), Some("b"));
    }

    #[test]
    fn for_service_account_refuses_injection() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let ok = SpiffeId::for_service_account(td.clone(), "default", "web").unwrap();
        assert_eq!(ok.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for (ns, sa) in [
            ("a/sa/b", "c"),
            ("", "c"),
            ("a", ".."),
            ("a", "b/c"),
            ("a b", "c"),
        ] {
            assert!(
                SpiffeId::for_service_account(td.clone(), ns, sa).is_err(),
                "{ns:?} {sa:?} must be refused"
            );
        }
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,20}".prop_filter("no dot segments", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn round_trip(td in "[a-z0-9._-]{1,40}", segs in proptest::collection::vec(segment(), 0..6)) {
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let text = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&text).unwrap();
            prop_assert_eq!(id.to_string(), text.clone());
            prop_assert_eq!(id.segments().collect::<Vec<_>>(), segs.iter().map(String::as_str).collect::<Vec<_>>());
            let again = SpiffeId::new(id.trust_domain().clone(), id.path()).unwrap();
            prop_assert_eq!(again, id);
        }

        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = SpiffeId::parse(&s);
            let _ = SpiffeId::parse(&format!("spiffe://{s}"));
        }

        #[test]
        fn workload_round_trip(ns in segment(), sa in segment()) {
            let td = TrustDomain::new("cluster.local").unwrap();
            let id = SpiffeId::for_service_account(td, &ns, &sa).unwrap();
            let parsed = SpiffeId::parse_workload(&id.to_string()).unwrap();
            prop_assert_eq!(parsed.workload(), Some((ns.as_str(), sa.as_str())));
        }
    }
}
