//! Precompiled value matchers: Istio's string forms (`abc` exact, `abc*` prefix, `*abc` suffix,
//! `*` presence), path templates (`{*}`, `{**}`), CIDR sets and port sets, plus the parsing of peer
//! principals (`<td>/ns/<ns>/sa/<sa>`) and istiod's namespace and service-account regexes.
//! Everything here is built once at compile time and matched per request without allocating.

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

/// A peer principal (the `spiffe://` scheme removed) and, when it has the canonical form
/// `<td>/ns/<ns>/sa/<sa>`, its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity<'a> {
    pub principal: &'a str,
    pub trust_domain: &'a str,
    /// Set only for the canonical form: explanations name it. Matching never reads it; it follows
    /// the regexes istiod generates (see [`NamespacePattern`], [`service_account_matches`]).
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
}

impl<'a> PeerIdentity<'a> {
    /// Parses a principal; accepts `spiffe://` URIs too. Never fails: a principal of another form
    /// simply has no named namespace or service account.
    pub fn parse(principal: &'a str) -> PeerIdentity<'a> {
        let principal = principal.strip_prefix("spiffe://").unwrap_or(principal);
        let trust_domain = principal.split('/').next().unwrap_or_default();
        let mut parts = principal.split('/');
        let (namespace, service_account) = match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                (Some(ns), Some(sa))
            }
            _ => (None, None),
        };
        PeerIdentity {
            principal,
            trust_domain,
            namespace,
            service_account,
        }
    }

    /// What follows each `/ns/` of the URI SAN `spiffe://<principal>` (overlapping occurrences
    /// included), with whether at least one character of the principal precedes that `/ns/`.
    /// These are the places where istiod's namespace and service-account regexes can anchor.
    fn after_ns(&self) -> impl Iterator<Item = (bool, &'a str)> + use<'a> {
        let p = self.principal;
        // The scheme's last `/` can start the marker: `spiffe://ns/prod/...`.
        let at_scheme = p.strip_prefix("ns/").map(|rest| (false, rest));
        let mut from = 0;
        let inner = std::iter::from_fn(move || {
            let i = from + p.get(from..)?.find("/ns/")?;
            // `/` is one byte, so `i + 1` is a char boundary; stepping by one finds overlaps.
            from = i + 1;
            Some((i > 0, &p[i + 4..]))
        });
        at_scheme.into_iter().chain(inner)
    }

    /// The namespaces an exact `namespaces` value (no `*`, no `/`) can match for this principal:
    /// the segment after each `/ns/` that a `/` closes. The rule index looks rules up by them.
    pub fn namespace_keys(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.after_ns()
            .filter_map(|(_, rest)| rest.split_once('/').map(|(ns, _)| ns))
    }
}

/// A `namespaces` / `notNamespaces` / `source.namespace` value as istiod compiles it: the regex
/// `.*/ns/<value>/.*`, every `*` in the value becoming `.*`, which Envoy matches against the whole
/// URI SAN `spiffe://<principal>`. So `cluster.local/ns/prod` is not in namespace `prod` (no `/`
/// after it) while `cluster.local/ns/prod/sa/a/b` is. The value's other characters are literal:
/// Kubernetes namespace names hold no regex syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePattern {
    /// The literal pieces between the value's `*`s.
    pieces: Box<[Box<str>]>,
    /// The last piece followed by `/`: it must be found whole, overlaps included.
    last_slash: Box<str>,
}

impl NamespacePattern {
    pub fn parse(v: &str) -> NamespacePattern {
        let pieces: Box<[Box<str>]> = v.split('*').map(Into::into).collect();
        let last = v.rsplit('*').next().unwrap_or_default();
        NamespacePattern {
            pieces,
            last_slash: format!("{last}/").into(),
        }
    }

    /// The namespace itself when the value has no `*` and no `/` (an index key).
    pub fn exact(&self) -> Option<&str> {
        match &*self.pieces {
            [one] if !one.contains('/') => Some(one),
            _ => None,
        }
    }

    pub fn matches(&self, peer: &PeerIdentity<'_>) -> bool {
        // RE2's `.` does not match a line break, so Envoy's `.*` never spans one.
        !peer.principal.contains('\n')
            && peer.after_ns().any(|(_, rest)| self.matches_after_ns(rest))
    }

    /// `<p0>.*<p1>.* ... <pn>/.*` anchored at the start of `rest`: the first piece is a prefix,
    /// then each piece is taken at its leftmost place (which leaves the most room for the rest).
    fn matches_after_ns(&self, rest: &str) -> bool {
        let [first, middle @ .., _last] = &*self.pieces else {
            return rest.starts_with(&*self.last_slash);
        };
        let Some(mut tail) = rest.strip_prefix(&**first) else {
            return false;
        };
        for piece in middle {
            match tail.find(&**piece) {
                Some(i) => tail = &tail[i + piece.len()..],
                None => return false,
            }
        }
        tail.contains(&*self.last_slash)
    }
}

/// A `serviceAccounts` / `source.serviceAccount` value `(ns, sa)` as istiod compiles it: the
/// regex `spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?` over the whole URI SAN, values taken
/// literally (Istio quotes them). A bare `<td>/ns/<ns>` or an empty account never matches;
/// `<td>/ns/<ns>/sa/<sa>/<more>` does.
pub fn service_account_matches(peer: &PeerIdentity<'_>, ns: &str, sa: &str) -> bool {
    if peer.principal.contains('\n') {
        return false;
    }
    peer.after_ns().any(|(has_td, rest)| {
        let Some(r) = rest.strip_prefix(ns).and_then(|r| r.strip_prefix('/')) else {
            return false;
        };
        // `(.+/|)`: `sa/` starts `r`, or follows a `/` that is not `r`'s first character.
        let mut starts = std::iter::once(0).chain(
            r.match_indices('/')
                .filter(|&(j, _)| j > 0)
                .map(|(j, _)| j + 1),
        );
        has_td
            && starts.any(|k| {
                r[k..]
                    .strip_prefix("sa/")
                    .and_then(|t| t.strip_prefix(sa))
                    .is_some_and(|t| t.is_empty() || (t.starts_with('/') && t.len() > 1))
            })
    })
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
        // Only the canonical form has named parts.
        for odd in [
            "td/ns/prod",
            "td/ns/prod/sa/",
            "td/ns/prod/sa/a/b",
            "td/ns//sa/x",
            "/ns/p/sa/x",
        ] {
            let p = PeerIdentity::parse(odd);
            assert_eq!((p.namespace, p.service_account), (None, None), "{odd}");
        }
    }

    /// Each case is what Envoy's full-string RE2 match of istiod's regex answers.
    #[test]
    fn namespace_patterns_follow_istiod_regex() {
        let m = |v: &str, p: &str| NamespacePattern::parse(v).matches(&PeerIdentity::parse(p));
        // `.*/ns/prod/.*`
        assert!(m("prod", "spiffe://cluster.local/ns/prod/sa/web"));
        assert!(m("prod", "cluster.local/ns/prod/sa/"));
        assert!(m("prod", "cluster.local/ns/prod/sa/a/b"));
        assert!(m("prod", "cluster.local/ns/prod/"));
        assert!(m("prod", "other.td/ns/prod/sa/x"));
        assert!(m("prod", "td/ns/dev/sa/x/ns/prod/y"));
        assert!(m("x", "ns/x/y"), "the scheme's `/` starts `/ns/`");
        assert!(!m("prod", "cluster.local/ns/prod"));
        assert!(!m("prod", "cluster.local/ns/production/sa/x"));
        assert!(!m("prod", "cluster.local/ns//sa/x"));
        assert!(!m("prod", "cluster.local/ns/prod\n/sa/x"));
        // `.*/ns/.*/.*` matches an empty namespace too.
        assert!(m("*", "cluster.local/ns//sa/x"));
        assert!(!m("*", "cluster.local/ns/prod"));
        // `.*/ns/team-.*/.*` and `.*/ns/.*-prod/.*`: `.*` may span `/`.
        assert!(m("team-*", "td/ns/team-a/sa/x"));
        assert!(!m("team-*", "td/ns/team-a"));
        assert!(m("*-prod", "td/ns/shop-prod/sa/x"));
        assert!(m("*-prod", "td/ns/a/b-prod/c"));
        assert!(!m("*-prod", "td/ns/shop-prod"));
        // `.*/ns/a.*b/.*`, and overlapping occurrences.
        assert!(m("a*b", "td/ns/axxb/sa/x"));
        assert!(!m("a*b", "td/ns/axx/sa/x"));
        assert!(m("*aa", "td/ns/aaa/sa/x"));
        assert!(m("ns", "td/ns/ns/sa/x"));
        assert!(
            m("sa", "td/ns/ns/sa/x"),
            "`/ns/` inside `/ns/ns/` anchors too"
        );
        assert_eq!(NamespacePattern::parse("prod").exact(), Some("prod"));
        assert_eq!(NamespacePattern::parse("pr*").exact(), None);
        assert_eq!(NamespacePattern::parse("a/b").exact(), None);
        let keys: Vec<_> = PeerIdentity::parse("td/ns/ns/sa/x/ns/q")
            .namespace_keys()
            .collect();
        assert_eq!(keys, ["ns", "sa"]);
    }

    #[test]
    fn service_accounts_follow_istiod_regex() {
        let m = |p: &str| service_account_matches(&PeerIdentity::parse(p), "prod", "web");
        // `spiffe://.+/ns/prod/(.+/|)sa/web(/.+)?`
        assert!(m("cluster.local/ns/prod/sa/web"));
        assert!(m("other.td/ns/prod/sa/web"));
        assert!(m("cluster.local/ns/prod/sa/web/extra"));
        assert!(m("cluster.local/ns/prod/k/v/sa/web"));
        assert!(!m("cluster.local/ns/prod/sa/web/"));
        assert!(!m("cluster.local/ns/prod/sa/web2"));
        assert!(!m("cluster.local/ns/prod/sa/"));
        assert!(!m("cluster.local/ns/prod"));
        assert!(!m("cluster.local/ns//sa/web"));
        assert!(
            !m("cluster.local/ns/prod//sa/web"),
            "`(.+/|)` needs a character before `/`"
        );
        assert!(!m("/ns/prod/sa/web"), "`.+` needs a trust domain");
        assert!(!m("ns/prod/sa/web"));
        assert!(!m("cluster.local/ns/prod/sa/web\n"));
    }
}
