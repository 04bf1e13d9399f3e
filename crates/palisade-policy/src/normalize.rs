//! Request path normalization before path matching, as MeshConfig `pathNormalization` selects:
//! BASE (the default: decode unreserved escapes, `\` to `/`, resolve `.` and `..` per RFC 3986),
//! MERGE_SLASHES (BASE, then `//` to `/`), DECODE_AND_MERGE_SLASHES (decode `%2F` and `%5C` first)
//! and NONE. Hostile input (`%00`, control or non-ASCII bytes, bad escapes, fragments, paths that
//! are not absolute) is rejected with a typed error: the proxy answers 400 and authorization never
//! sees it. The query is always removed: policies match the path only.
//!
//! The result is idempotent: normalizing a normalized path returns it unchanged.

use std::borrow::Cow;

/// The normalization applied to request paths.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// No normalization at all (only the query is removed).
    None,
    /// RFC 3986 normalization plus `\` to `/` (Istio's DEFAULT).
    #[default]
    Base,
    /// BASE, then consecutive slashes merged.
    MergeSlashes,
    /// `%2F`/`%5C` decoded, then MERGE_SLASHES.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// Parses MeshConfig's `pathNormalization.normalization` value.
    pub fn from_config(v: &str) -> Option<Self> {
        Some(match v {
            "DEFAULT" | "BASE" => PathNormalization::Base,
            "NONE" => PathNormalization::None,
            "MERGE_SLASHES" => PathNormalization::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => PathNormalization::DecodeAndMergeSlashes,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

/// Why a request path is rejected (HTTP 400) before authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} does not start with '/'")]
    NotAbsolute(String),
    #[error("path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("path contains a control, space or non-ASCII byte 0x{0:02x}")]
    BadByte(u8),
    #[error("path contains a malformed percent escape")]
    BadEscape,
    #[error("path contains a fragment ('#')")]
    Fragment,
}

/// Splits off the query and normalizes the path. Borrows when nothing changes.
pub fn normalize_path(raw: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    let path = match raw.find('?') {
        Some(i) => &raw[..i],
        None => raw,
    };
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(truncate(path)));
    }
    let bytes = path.as_bytes();
    let mut needs_work = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            0..=0x20 | 0x7f..=0xff => return Err(PathError::BadByte(b)),
            b'#' => return Err(PathError::Fragment),
            b'%' => {
                let (Some(h), Some(l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(PathError::BadEscape);
                };
                let (Some(h), Some(l)) = (hex(*h), hex(*l)) else {
                    return Err(PathError::BadEscape);
                };
                if h == 0 && l == 0 {
                    return Err(PathError::EncodedNul);
                }
                needs_work = true;
                i += 3;
                continue;
            }
            b'\\' => needs_work = true,
            b'/' => {
                // `//`, `/.` may need work; everything else is already canonical.
                if matches!(bytes.get(i + 1), Some(b'/' | b'.')) {
                    needs_work = true;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if mode == PathNormalization::None || !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(normalize_owned(path, mode)))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// The slow path; `path` has been checked (ASCII, escapes well-formed, no `%00`).
fn normalize_owned(path: &str, mode: PathNormalization) -> String {
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    let merge = matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    );
    // 1. Decode unreserved escapes (and %2F/%5C in DECODE mode); `\` becomes `/`.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let v = hex(bytes[i + 1]).unwrap_or(0) * 16 + hex(bytes[i + 2]).unwrap_or(0);
            if is_unreserved(v) {
                decoded.push(char::from(v));
                i += 3;
                continue;
            }
            if decode_slashes && (v == b'/' || v == b'\\') {
                decoded.push('/');
                i += 3;
                continue;
            }
            decoded.push_str(&path[i..i + 3]);
            i += 3;
            continue;
        }
        decoded.push(if b == b'\\' { '/' } else { char::from(b) });
        i += 1;
    }
    // 2. Remove dot segments (RFC 3986 section 5.2.4) on whole segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (idx, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if idx == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if idx == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    // 3. Merge slashes.
    if merge && result.contains("//") {
        let mut merged = String::with_capacity(result.len());
        let mut prev_slash = false;
        for c in result.chars() {
            if c == '/' {
                if !prev_slash {
                    merged.push(c);
                }
                prev_slash = true;
            } else {
                merged.push(c);
                prev_slash = false;
            }
        }
        result = merged;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    #[test]
    fn table() {
        let cases: &[(&str, PathNormalization, Result<&str, PathError>)] = &[
            ("/a/b", Base, Ok("/a/b")),
            ("/a/b?x=/../c", Base, Ok("/a/b")),
            ("/a/./b", Base, Ok("/a/b")),
            ("/a/../b", Base, Ok("/b")),
            ("/../../b", Base, Ok("/b")),
            ("/a/b/..", Base, Ok("/a/")),
            ("/a/b/.", Base, Ok("/a/b/")),
            ("/a/%2e%2e/b", Base, Ok("/b")),
            ("/a/%2E%2e/b", Base, Ok("/b")),
            ("/%61dmin", Base, Ok("/admin")),
            ("/a\\..\\admin", Base, Ok("/admin")),
            ("/a//b", Base, Ok("/a//b")),
            ("/a//b", MergeSlashes, Ok("/a/b")),
            ("/a%2Fb", Base, Ok("/a%2Fb")),
            ("/a%2fb", MergeSlashes, Ok("/a%2fb")),
            ("/a%2F..%2Fadmin", DecodeAndMergeSlashes, Ok("/admin")),
            ("/a%5C..%5Cadmin", DecodeAndMergeSlashes, Ok("/admin")),
            ("/a/../b", None, Ok("/a/../b")),
            ("/a%00b", Base, Err(PathError::EncodedNul)),
            ("/a%00b", None, Err(PathError::EncodedNul)),
            ("/a%zz", Base, Err(PathError::BadEscape)),
            ("/a%2", Base, Err(PathError::BadEscape)),
            ("/a b", Base, Err(PathError::BadByte(b' '))),
            ("/a#b", Base, Err(PathError::Fragment)),
            ("a/b", Base, Err(PathError::NotAbsolute("a/b".into()))),
            ("", Base, Err(PathError::Empty)),
            ("?x", Base, Err(PathError::Empty)),
            ("/é", Base, Err(PathError::BadByte(0xc3))),
            ("/%252e%252e/admin", Base, Ok("/%252e%252e/admin")),
        ];
        for (input, mode, want) in cases {
            let got = normalize_path(input, *mode).map(|c| c.into_owned());
            assert_eq!(got, want.clone().map(str::to_owned), "{input:?} {mode:?}");
        }
    }
}
