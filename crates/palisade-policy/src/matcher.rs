//! Precompiled value matchers: Istio's string forms (`abc` exact, `abc*` prefix, `*abc` suffix,
//! `*` presence), path templates (`{*}`, `{**}`), CIDR sets and port sets, plus the parsing of peer
//! principals (`<td>/ns/<ns>/sa/<sa>`). Everything here is built once at compile time and matched
//! per request without allocating.

use std::net::IpAddr;

use crate::validate::is_pchar_byte;

/// One Istio string pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrPattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*`: any non-empty value.
    Presence,
}

impl StrPattern {
    /// Istio's reading of a policy value. `*` alone is presence; a leading `*` is a suffix match,
    /// a trailing `*` a prefix match; anything else (even with `*` inside) is exact.
    pub fn parse(v: &str) -> StrPattern {
        if v == "*" {
            StrPattern::Presence
        } else if let Some(s) = v.strip_prefix('*') {
            StrPattern::Suffix(s.into())
        } else if let Some(p) = v.strip_suffix('*') {
            StrPattern::Prefix(p.into())
        } else {
            StrPattern::Exact(v.into())
        }
    }

    fn lowercased(self) -> StrPattern {
        match self {
            StrPattern::Exact(s) => StrPattern::Exact(s.to_ascii_lowercase().into()),
            StrPattern::Prefix(s) => StrPattern::Prefix(s.to_ascii_lowercase().into()),
            StrPattern::Suffix(s) => StrPattern::Suffix(s.to_ascii_lowercase().into()),
            StrPattern::Presence => StrPattern::Presence,
        }
    }

    #[inline]
    pub fn matches(&self, v: &str, ignore_case: bool) -> bool {
        match self {
            StrPattern::Presence => !v.is_empty(),
            StrPattern::Exact(e) => {
                if ignore_case {
                    v.eq_ignore_ascii_case(e)
                } else {
                    v == &**e
                }
            }
            StrPattern::Prefix(p) => {
                v.len() >= p.len() && {
                    let head = &v.as_bytes()[..p.len()];
                    if ignore_case {
                        head.eq_ignore_ascii_case(p.as_bytes())
                    } else {
                        head == p.as_bytes()
                    }
                }
            }
            StrPattern::Suffix(s) => {
                v.len() >= s.len() && {
                    let tail = &v.as_bytes()[v.len() - s.len()..];
                    if ignore_case {
                        tail.eq_ignore_ascii_case(s.as_bytes())
                    } else {
                        tail == s.as_bytes()
                    }
                }
            }
        }
    }
}

/// A list of patterns; matches when any pattern does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrSet {
    pub patterns: Box<[StrPattern]>,
    pub ignore_case: bool,
}

impl StrSet {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a String>, ignore_case: bool) -> StrSet {
        StrSet {
            patterns: values
                .into_iter()
                .map(|v| {
                    let p = StrPattern::parse(v);
                    if ignore_case { p.lowercased() } else { p }
                })
                .collect(),
            ignore_case,
        }
    }

    #[inline]
    pub fn matches(&self, v: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(v, self.ignore_case))
    }

    /// The exact values, when every pattern is exact (index keys).
    pub fn exact_values(&self) -> Option<Vec<&str>> {
        self.patterns
            .iter()
            .map(|p| match p {
                StrPattern::Exact(e) => Some(&**e),
                _ => None,
            })
            .collect()
    }
}

/// One compiled path value: a string pattern or a URI template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Str(StrPattern),
    Template(PathTemplate),
}

impl PathPattern {
    pub fn parse(v: &str) -> PathPattern {
        if v.contains("{*}") || v.contains("{**}") {
            PathPattern::Template(PathTemplate::parse(v))
        } else {
            PathPattern::Str(StrPattern::parse(v))
        }
    }

    #[inline]
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Str(s) => s.matches(path, false),
            PathPattern::Template(t) => t.matches(path),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplateToken {
    Literal(Box<str>),
    /// `{*}`: one path segment of one or more pchars.
    One,
    /// `{**}`: zero or more pchars or slashes; only literals follow it.
    Any,
}

/// An Envoy URI template as Istio writes it: `/api/{*}/items/{**}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    tokens: Box<[TemplateToken]>,
}

impl PathTemplate {
    /// Splits a validated template into literals and operators.
    pub fn parse(v: &str) -> PathTemplate {
        let mut tokens = Vec::new();
        let mut rest = v;
        while !rest.is_empty() {
            let next_one = rest.find("{*}");
            let next_any = rest.find("{**}");
            let (pos, tok, len) = match (next_one, next_any) {
                (Some(a), Some(b)) if a < b => (a, TemplateToken::One, 3),
                (_, Some(b)) => (b, TemplateToken::Any, 4),
                (Some(a), None) => (a, TemplateToken::One, 3),
                (None, None) => (rest.len(), TemplateToken::Literal("".into()), 0),
            };
            if pos > 0 {
                tokens.push(TemplateToken::Literal(rest[..pos].into()));
            }
            if len == 0 {
                break;
            }
            tokens.push(tok);
            rest = &rest[pos + len..];
        }
        PathTemplate {
            tokens: tokens.into(),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut rest = path;
        for (i, tok) in self.tokens.iter().enumerate() {
            match tok {
                TemplateToken::Literal(l) => match rest.strip_prefix(&**l) {
                    Some(r) => rest = r,
                    None => return false,
                },
                TemplateToken::One => {
                    let end = rest.find('/').unwrap_or(rest.len());
                    if end == 0 || !rest.as_bytes()[..end].iter().all(|b| is_pchar_byte(*b)) {
                        return false;
                    }
                    rest = &rest[end..];
                }
                TemplateToken::Any => {
                    // Only literals follow `{**}`: they must end the path.
                    let mut suffix_len = 0;
                    for t in &self.tokens[i + 1..] {
                        match t {
                            TemplateToken::Literal(l) => suffix_len += l.len(),
                            _ => return false,
                        }
                    }
                    if rest.len() < suffix_len {
                        return false;
                    }
                    let (middle, tail) = rest.split_at(rest.len() - suffix_len);
                    let mut t = tail;
                    for tok in &self.tokens[i + 1..] {
                        if let TemplateToken::Literal(l) = tok {
                            match t.strip_prefix(&**l) {
                                Some(r) => t = r,
                                None => return false,
                            }
                        }
                    }
                    return middle.bytes().all(|b| b == b'/' || is_pchar_byte(b));
                }
            }
        }
        rest.is_empty()
    }
}

/// A set of CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    pub nets: Box<[ipnet::IpNet]>,
}

impl IpSet {
    /// Values were validated by the loader; unparsable ones are dropped defensively.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a String>) -> IpSet {
        IpSet {
            nets: values
                .into_iter()
                .filter_map(|v| crate::validate::parse_ip_or_cidr(v).ok())
                .collect(),
        }
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses are compared as IPv4 (what a dual-stack listener reports).
#[inline]
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The parts of a peer principal `<td>/ns/<ns>/sa/<sa>` (the `spiffe://` scheme removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity<'a> {
    pub principal: &'a str,
    pub trust_domain: &'a str,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
}

impl<'a> PeerIdentity<'a> {
    /// Parses a principal; accepts `spiffe://` URIs too. Never fails: a principal that does not
    /// follow the SPIFFE layout simply has no namespace or service account.
    pub fn parse(principal: &'a str) -> PeerIdentity<'a> {
        let principal = principal.strip_prefix("spiffe://").unwrap_or(principal);
        let trust_domain = principal.split('/').next().unwrap_or_default();
        let mut namespace = None;
        let mut service_account = None;
        let mut parts = principal.split('/').skip(1);
        while let Some(p) = parts.next() {
            match p {
                "ns" if namespace.is_none() => namespace = parts.next(),
                "sa" if namespace.is_some() && service_account.is_none() => {
                    service_account = parts.next()
                }
                _ => {}
            }
        }
        PeerIdentity {
            principal,
            trust_domain,
            namespace,
            service_account,
        }
    }
}

/// A `requestPrincipals` value, split as Istio does at the last `/` into issuer and subject parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPrincipalPattern {
    iss: IssSub,
    sub: IssSub,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum IssSub {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl IssSub {
    fn matches(&self, v: Option<&str>) -> bool {
        let Some(v) = v else { return false };
        match self {
            IssSub::Any => !v.is_empty(),
            IssSub::Exact(e) => v == &**e,
            IssSub::Prefix(p) => v.starts_with(&**p),
            IssSub::Suffix(s) => v.ends_with(&**s),
        }
    }
}

impl RequestPrincipalPattern {
    pub fn parse(value: &str) -> RequestPrincipalPattern {
        use IssSub::*;
        let split = value.rfind('/').map(|i| (&value[..i], &value[i + 1..]));
        let (iss, sub) = if value == "*" {
            (Any, Any)
        } else if let Some(rest) = value.strip_prefix('*') {
            match split {
                Some((iss, sub)) => (
                    if iss == "*" {
                        Any
                    } else {
                        Suffix(iss.trim_start_matches('*').into())
                    },
                    Exact(sub.into()),
                ),
                None => (Any, Suffix(rest.into())),
            }
        } else if let Some(rest) = value.strip_suffix('*') {
            match split {
                Some((iss, sub)) => (
                    Exact(iss.into()),
                    if sub == "*" {
                        Any
                    } else {
                        Prefix(sub.trim_end_matches('*').into())
                    },
                ),
                None => (Prefix(rest.into()), Any),
            }
        } else {
            match split {
                Some((iss, sub)) => (Exact(iss.into()), Exact(sub.into())),
                None => (Exact(value.into()), Exact("".into())),
            }
        };
        RequestPrincipalPattern { iss, sub }
    }

    #[inline]
    pub fn matches(&self, iss: Option<&str>, sub: Option<&str>) -> bool {
        self.iss.matches(iss) && self.sub.matches(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let s = StrSet::new(&["a".to_string(), "b*".into(), "*c".into()], false);
        assert!(s.matches("a") && s.matches("bx") && s.matches("xc"));
        assert!(!s.matches("A") && !s.matches("x"));
        let h = StrSet::new(&["Example.COM".to_string(), "*.Suffix.com".into()], true);
        assert!(h.matches("example.com") && h.matches("A.SUFFIX.com"));
        assert!(!h.matches("example.com:80"));
        let p = StrSet::new(&["*".to_string()], false);
        assert!(p.matches("x") && !p.matches(""));
    }

    #[test]
    fn templates() {
        let t = PathTemplate::parse("/path/template/{*}");
        assert!(t.matches("/path/template/x"));
        assert!(!t.matches("/path/template/x/y"));
        assert!(!t.matches("/path/template/"));
        let t = PathTemplate::parse("/{**}/path/template");
        assert!(t.matches("/a/b/path/template"));
        assert!(t.matches("//path/template"));
        assert!(!t.matches("/path/template"));
        let t = PathTemplate::parse("/{*}/foo/{**}");
        assert!(t.matches("/x/foo/"));
        assert!(t.matches("/x/foo/a/b"));
        assert!(!t.matches("/x/bar/a"));
    }

    #[test]
    fn request_principals() {
        let m = |p: &str, iss: &str, sub: &str| {
            RequestPrincipalPattern::parse(p).matches(Some(iss), Some(sub))
        };
        assert!(m("https://a.com/alice", "https://a.com", "alice"));
        assert!(!m("https://a.com/alice", "https://a.com", "bob"));
        assert!(m("https://a.com/*", "https://a.com", "bob"));
        assert!(m("*", "x", "y"));
        assert!(m("*-suffix", "x", "a-suffix"));
        assert!(m("iss-prefix*", "iss-prefix-1", "y"));
        assert!(m("*/alice", "any", "alice"));
        assert!(!RequestPrincipalPattern::parse("*").matches(Some("x"), None));
    }

    #[test]
    fn peer_identity() {
        let p = PeerIdentity::parse("spiffe://td/ns/prod/sa/web");
        assert_eq!(p.principal, "td/ns/prod/sa/web");
        assert_eq!(
            (p.trust_domain, p.namespace, p.service_account),
            ("td", Some("prod"), Some("web"))
        );
        let q = PeerIdentity::parse("weird");
        assert_eq!((q.trust_domain, q.namespace), ("weird", None));
    }
}
