//! Where a token is looked for: `fromHeaders` (with an exact prefix), `fromParams`,
//! `fromCookies`; with none configured, Istio's defaults `Authorization: Bearer <t>` then the
//! query parameter `access_token`.

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

    /// The token at this location, if any.
    pub fn find<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
        match self {
            Location::Header { name, prefix } => headers.get_all(name).iter().find_map(|v| {
                let s = v.to_str().ok()?;
                let t = s.strip_prefix(prefix.as_str())?.trim();
                (!t.is_empty()).then_some(t)
            }),
            Location::Param(p) => query?.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                // Tokens are base64url and dots: percent-encoding never appears in a valid one.
                (k == p && !v.is_empty()).then_some(v)
            }),
            Location::Cookie(c) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    let v = v.trim_matches('"');
                    (k == c && !v.is_empty()).then_some(v)
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tokens_where_configured() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        h.insert("x-jwt", "Token t1".parse().unwrap());
        h.insert("cookie", "a=1; session=c1.c2.c3; b=2".parse().unwrap());
        let q = Some("x=1&access_token=q1.q2.q3&y=2");
        let header = |n: &str, p: &str| Location::Header {
            name: HeaderName::from_bytes(n.as_bytes()).unwrap(),
            prefix: p.to_owned(),
        };
        let cases: Vec<(Location, Option<&str>, Option<&str>)> = vec![
            (header("authorization", "Bearer "), q, Some("abc.def.ghi")),
            (header("authorization", "bearer "), q, None),
            (header("x-jwt", "Token "), q, Some("t1")),
            (header("x-jwt", ""), q, Some("Token t1")),
            (header("x-missing", ""), q, None),
            (Location::Param("access_token".into()), q, Some("q1.q2.q3")),
            (Location::Param("access_token".into()), None, None),
            (Location::Param("token".into()), q, None),
            (Location::Cookie("session".into()), q, Some("c1.c2.c3")),
            (Location::Cookie("nope".into()), q, None),
        ];
        for (loc, query, want) in cases {
            assert_eq!(loc.find(&h, query), want, "{loc:?}");
        }
    }
}
