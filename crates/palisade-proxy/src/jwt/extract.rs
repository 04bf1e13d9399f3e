//! Where tokens are looked for: `fromHeaders` (with a prefix), `fromParams`, `fromCookies`; with
//! none configured, Istio's defaults `Authorization: Bearer <t>` and the query parameter
//! `access_token`.
//!
//! Every token at every location is returned, because every one of them must verify: a request
//! with a good token and a bad one must not reach an app that might read the bad one. Where
//! Envoy reads only one value (a repeated query parameter or cookie) this returns them all, so
//! none can slip through unverified.

use std::borrow::Cow;

use http::HeaderMap;
use http::header::HeaderName;

/// One place a rule takes its token from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

impl Location {
    /// Istio's defaults when a rule names no location.
    pub fn defaults() -> Vec<Location> {
        vec![
            Location::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".to_owned(),
            },
            Location::Param("access_token".to_owned()),
        ]
    }

    /// Envoy's extraction order: header locations (by name and prefix), then query parameters,
    /// then cookies (each by name). It decides which token's claims make the request identity.
    pub(crate) fn order_key(&self) -> (u8, String) {
        match self {
            Location::Header { name, prefix } => (0, format!("{}{prefix}", name.as_str())),
            Location::Param(p) => (1, p.clone()),
            Location::Cookie(c) => (2, c.clone()),
        }
    }

    /// Every token at this location.
    ///
    /// A header's values are joined with `,` (as Envoy reads a repeated header) and the token is
    /// what follows the first occurrence of the prefix: two `Authorization` headers therefore make
    /// one malformed token, refused, rather than one checked and one passed on unchecked. A query
    /// parameter present with an empty value is a (malformed) token, as in Envoy.
    pub fn find_all<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Vec<Cow<'a, str>> {
        match self {
            Location::Header { name, prefix } => {
                let mut values = headers.get_all(name).iter();
                let Some(first) = values.next() else {
                    return Vec::new();
                };
                let joined: Cow<'a, str> = if values.next().is_none() {
                    String::from_utf8_lossy(first.as_bytes())
                } else {
                    let all: Vec<Cow<'_, str>> = headers
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()))
                        .collect();
                    Cow::Owned(all.join(","))
                };
                let Some(pos) = joined.find(prefix.as_str()) else {
                    return Vec::new();
                };
                let start = pos + prefix.len();
                let token = match joined {
                    Cow::Borrowed(s) => Cow::Borrowed(s[start..].trim()),
                    Cow::Owned(s) => Cow::Owned(s[start..].trim().to_owned()),
                };
                if token.is_empty() {
                    Vec::new()
                } else {
                    vec![token]
                }
            }
            Location::Param(p) => query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k) == p.as_str()).then(|| percent_decode(v))
                })
                .collect(),
            Location::Cookie(c) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    let v = v.trim_matches('"');
                    (k == c && !v.is_empty()).then_some(Cow::Borrowed(v))
                })
                .collect(),
        }
    }

    /// Removes this location's tokens from the request. Returns the new query string when it
    /// changed (the caller rebuilds the URI).
    pub fn strip(&self, headers: &mut HeaderMap, query: Option<&str>) -> Option<String> {
        match self {
            // Envoy removes the whole header, every value of it.
            Location::Header { name, .. } => {
                headers.remove(name);
                None
            }
            Location::Param(name) => {
                let q = query?;
                let kept: Vec<&str> = q
                    .split('&')
                    .filter(|kv| {
                        percent_decode(kv.split_once('=').map_or(*kv, |(k, _)| k)) != name.as_str()
                    })
                    .collect();
                let new = kept.join("&");
                (new != q).then_some(new)
            }
            // Only the named cookie goes: the others carry the app's own state.
            Location::Cookie(name) => {
                let old: Vec<Vec<u8>> = headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect();
                if old.is_empty() {
                    return None;
                }
                headers.remove(http::header::COOKIE);
                for raw in old {
                    let Ok(s) = std::str::from_utf8(&raw) else {
                        continue;
                    };
                    let kept: Vec<&str> = s
                        .split(';')
                        .map(str::trim)
                        .filter(|pair| {
                            !pair.is_empty()
                                && pair.split_once('=').map_or(*pair, |(k, _)| k) != name.as_str()
                        })
                        .collect();
                    if kept.is_empty() {
                        continue;
                    }
                    if let Ok(v) = http::HeaderValue::from_str(&kept.join("; ")) {
                        headers.append(http::header::COOKIE, v);
                    }
                }
                None
            }
        }
    }
}

/// `%XX` decoding (as Envoy decodes query parameters); anything malformed stays as it is.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n: &str, p: &str) -> Location {
        Location::Header {
            name: HeaderName::from_bytes(n.as_bytes()).unwrap(),
            prefix: p.to_owned(),
        }
    }

    #[test]
    fn finds_every_token_where_configured() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        h.insert("x-jwt", "Token t1".parse().unwrap());
        h.append("x-two", "Bearer a.a.a".parse().unwrap());
        h.append("x-two", "Bearer b.b.b".parse().unwrap());
        h.insert("x-basic", "Basic xyz, Bearer c.c.c".parse().unwrap());
        h.append("cookie", "a=1; session=c1.c2.c3; b=2".parse().unwrap());
        h.append("cookie", "session=c4.c5.c6".parse().unwrap());
        let q = Some("x=1&access_token=q1.q2.q3&y=2&access_token=q4.q5.q6&e=&access%5Ftoken=q7");
        let cases: Vec<(Location, Option<&str>, Vec<&str>)> = vec![
            (header("authorization", "Bearer "), q, vec!["abc.def.ghi"]),
            (header("authorization", "bearer "), q, vec![]),
            (header("x-jwt", "Token "), q, vec!["t1"]),
            (header("x-jwt", ""), q, vec!["Token t1"]),
            (header("x-missing", ""), q, vec![]),
            // Two values: one malformed token, never one checked and one ignored.
            (header("x-two", "Bearer "), q, vec!["a.a.a,Bearer b.b.b"]),
            // The prefix anywhere in the value, as Envoy looks for it.
            (header("x-basic", "Bearer "), q, vec!["c.c.c"]),
            (
                Location::Param("access_token".into()),
                q,
                vec!["q1.q2.q3", "q4.q5.q6", "q7"],
            ),
            (Location::Param("e".into()), q, vec![""]),
            (Location::Param("access_token".into()), None, vec![]),
            (Location::Param("token".into()), q, vec![]),
            (
                Location::Cookie("session".into()),
                q,
                vec!["c1.c2.c3", "c4.c5.c6"],
            ),
            (Location::Cookie("nope".into()), q, vec![]),
        ];
        for (loc, query, want) in cases {
            assert_eq!(loc.find_all(&h, query), want, "{loc:?}");
        }
    }

    #[test]
    fn strips_every_occurrence() {
        let mut h = HeaderMap::new();
        h.append("authorization", "Bearer a".parse().unwrap());
        h.append("authorization", "Bearer b".parse().unwrap());
        h.append("cookie", "a=1; session=s1; b=2".parse().unwrap());
        h.append("cookie", "session=s2".parse().unwrap());
        assert_eq!(header("authorization", "Bearer ").strip(&mut h, None), None);
        assert!(h.get("authorization").is_none());
        assert_eq!(Location::Cookie("session".into()).strip(&mut h, None), None);
        let cookies: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
        let p = Location::Param("access_token".into());
        let cases = [
            ("a=1&access_token=x&b=2&access_token=y", Some("a=1&b=2")),
            ("access_token=x", Some("")),
            ("access%5Ftoken=x&c", Some("c")),
            ("a=1", None),
        ];
        for (q, want) in cases {
            assert_eq!(p.strip(&mut h, Some(q)).as_deref(), want, "{q}");
        }
    }
}
