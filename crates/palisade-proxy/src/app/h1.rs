//! HTTP/1.1 on the wire to the application (RFC 9112): the request head the proxy writes, the
//! response head it reads, and how each body is framed. Pure: bytes in, values or bytes out;
//! the I/O is in [`super`] and [`super::body`].

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// The largest response head (and trailer section) accepted; Envoy's default limit on headers is
/// 60 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields in one response head or trailer section.
pub const MAX_HEADERS: usize = 128;
/// A chunk-size line (hex size plus extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;

/// What is wrong with what the application sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("invalid content-length")]
    ContentLength,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnexpectedUpgrade,
}

/// How a request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes (`content-length`).
    Length(u64),
    /// `transfer-encoding: chunked`: the length is not known up front (an HTTP/2 client's body).
    Chunked,
}

/// Picks the request body's framing: the client's `content-length` when it sent one, else the
/// body's exact size when known, else chunked.
pub fn request_framing(
    headers: &HeaderMap,
    end_stream: bool,
    exact: Option<u64>,
) -> Result<RequestFraming, WireError> {
    if headers.contains_key(CONTENT_LENGTH) {
        return content_length(headers).map(RequestFraming::Length);
    }
    Ok(match (end_stream, exact) {
        (true, _) | (false, Some(0)) => RequestFraming::Empty,
        (false, Some(n)) => RequestFraming::Length(n),
        (false, None) => RequestFraming::Chunked,
    })
}

/// Writes `METHOD path HTTP/1.1`, the headers, and the framing header `framing` needs into
/// `out`. A client's `transfer-encoding` never passes: the proxy frames the body itself.
pub fn encode_head(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    framing: RequestFraming,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Length(n) if !headers.contains_key(CONTENT_LENGTH) => {
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        // RFC 9110 section 8.6: a request whose method gives content a meaning says so even
        // when it has none.
        RequestFraming::Empty
            if !headers.contains_key(CONTENT_LENGTH)
                && matches!(*method, Method::POST | Method::PUT | Method::PATCH) =>
        {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// One chunk's framing: `{size:x}\r\n` before the data (the caller adds `\r\n` after it).
pub fn chunk_header(len: usize) -> Vec<u8> {
    format!("{len:x}\r\n").into_bytes()
}

/// The last chunk and the trailer section.
pub fn last_chunk(trailers: Option<&HeaderMap>) -> Vec<u8> {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// Bytes of the head on the wire.
    pub len: usize,
}

/// Parses a response head at the start of `buf`: `None` while it is incomplete.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(WireError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::TooManyHeaders),
        Err(e) => return Err(WireError::Head(httparse_reason(e))),
    };
    if len > MAX_HEAD_BYTES {
        return Err(WireError::HeadTooLarge);
    }
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(WireError::Head("invalid status code"))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    Ok(Some(ResponseHead {
        status,
        version,
        headers: header_map(resp.headers)?,
        len,
    }))
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, WireError> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| WireError::Head("invalid header name"))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| WireError::Head("invalid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status line",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "not HTTP/1.x",
    }
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the application closes the connection.
    UntilClose,
}

/// The framing of the body that follows `head`, the answer to a `method` request.
pub fn response_framing(
    method: &Method,
    head: &ResponseHead,
) -> Result<ResponseFraming, WireError> {
    let s = head.status;
    if *method == Method::HEAD
        || s.is_informational()
        || s == StatusCode::NO_CONTENT
        || s == StatusCode::NOT_MODIFIED
    {
        return Ok(ResponseFraming::Empty);
    }
    if head.headers.contains_key(TRANSFER_ENCODING) {
        // Chunked only when it is the last coding; anything else runs until close.
        let last = tokens(&head.headers, &TRANSFER_ENCODING).last();
        return Ok(if last.is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::UntilClose
        });
    }
    if head.headers.contains_key(CONTENT_LENGTH) {
        return Ok(match content_length(&head.headers)? {
            0 => ResponseFraming::Empty,
            n => ResponseFraming::Length(n),
        });
    }
    Ok(ResponseFraming::UntilClose)
}

/// Whether the connection may carry another request after this response.
pub fn keep_alive(head: &ResponseHead, framing: ResponseFraming) -> bool {
    let mut conn = tokens(&head.headers, &CONNECTION);
    let persistent = match head.version {
        Version::HTTP_11 => !conn.any(|t| t.eq_ignore_ascii_case("close")),
        _ => conn.any(|t| t.eq_ignore_ascii_case("keep-alive")),
    };
    // Both framings at once: the message is suspect (RFC 9112 section 6.3, item 3).
    let ambiguous =
        head.headers.contains_key(TRANSFER_ENCODING) && head.headers.contains_key(CONTENT_LENGTH);
    persistent && !ambiguous && framing != ResponseFraming::UntilClose
}

/// The comma-separated tokens of every `name` field.
fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// `content-length`: every value (and list member) the same decimal number.
fn content_length(headers: &HeaderMap) -> Result<u64, WireError> {
    let mut found = None;
    for t in tokens(headers, &CONTENT_LENGTH) {
        if t.is_empty() || t.len() > 19 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WireError::ContentLength);
        }
        let n: u64 = t.parse().map_err(|_| WireError::ContentLength)?;
        if found.is_some_and(|f| f != n) {
            return Err(WireError::ContentLength);
        }
        found = Some(n);
    }
    found.ok_or(WireError::ContentLength)
}

/// The next piece of a response body taken off the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed from the connection.
    NeedMore,
}

/// Takes a response body off the read buffer as its framing says.
#[derive(Debug)]
pub enum BodyDecoder {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl BodyDecoder {
    pub fn new(framing: ResponseFraming) -> Self {
        match framing {
            ResponseFraming::Empty => BodyDecoder::Length(0),
            ResponseFraming::Length(n) => BodyDecoder::Length(n),
            ResponseFraming::Chunked => BodyDecoder::Chunked(ChunkedDecoder::default()),
            ResponseFraming::UntilClose => BodyDecoder::UntilClose,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        match self {
            BodyDecoder::Length(0) => Ok(Decoded::End),
            BodyDecoder::Length(_) | BodyDecoder::UntilClose if buf.is_empty() => {
                Ok(Decoded::NeedMore)
            }
            BodyDecoder::Length(rest) => {
                let n = usize::try_from(*rest).map_or(buf.len(), |r| r.min(buf.len()));
                *rest -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            BodyDecoder::UntilClose => Ok(Decoded::Data(buf.split().freeze())),
            BodyDecoder::Chunked(c) => c.decode(buf),
        }
    }

    /// Whether the connection closing here ends the body (an until-close body, or nothing left
    /// to read) rather than truncating it.
    pub fn ends_at_eof(&self) -> bool {
        matches!(self, BodyDecoder::UntilClose | BodyDecoder::Length(0))
    }

    /// Bytes still expected, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            BodyDecoder::Length(n) => Some(*n),
            _ => None,
        }
    }
}

/// `transfer-encoding: chunked` (RFC 9112 section 7.1): sizes, data, the trailer section.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = line_end(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(rest) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(rest).map_or(buf.len(), |r| r.min(buf.len()));
                    let rest = rest - n as u64;
                    self.state = if rest == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(rest)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((n, fields))) => {
                            let trailers = header_map(fields)
                                .map_err(|_| WireError::Chunked("invalid trailer field"))?;
                            buf.advance(n);
                            self.state = ChunkState::Done;
                            if !trailers.is_empty() {
                                return Ok(Decoded::Trailers(trailers));
                            }
                        }
                        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                            return Err(WireError::Chunked("trailer section too large"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(httparse::Error::TooManyHeaders) => {
                            return Err(WireError::TooManyHeaders);
                        }
                        Err(_) => return Err(WireError::Chunked("invalid trailer section")),
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// The index of the CRLF ending the first line of `buf`, if it is there.
fn line_end(buf: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    match buf.iter().take(max + 2).position(|&b| b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(WireError::Chunked("bare LF in chunk-size line")),
        None if buf.len() > max => Err(WireError::Chunked("chunk-size line too long")),
        None => Ok(None),
    }
}

/// `1a3f` or `1a3f;name=value` (extensions ignored), hex, at most 16 digits.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = size.trim_ascii_end();
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(WireError::Chunked("invalid chunk size"));
    }
    let text = std::str::from_utf8(size).map_err(|_| WireError::Chunked("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| WireError::Chunked("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn head(raw: &str) -> ResponseHead {
        parse_response_head(raw.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn request_heads() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("svc"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let cases: [(Method, RequestFraming, &str); 5] = [
            (
                Method::GET,
                RequestFraming::Empty,
                "GET /p?q=1 HTTP/1.1\r\nhost: svc\r\n\r\n",
            ),
            (
                Method::POST,
                RequestFraming::Empty,
                "POST /p?q=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n",
            ),
            (
                Method::PUT,
                RequestFraming::Length(5),
                "PUT /p?q=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\n\r\n",
            ),
            (
                Method::POST,
                RequestFraming::Chunked,
                "POST /p?q=1 HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            (
                Method::DELETE,
                RequestFraming::Empty,
                "DELETE /p?q=1 HTTP/1.1\r\nhost: svc\r\n\r\n",
            ),
        ];
        for (method, framing, want) in cases {
            let mut out = Vec::new();
            encode_head(&method, "/p?q=1", &h, framing, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                want,
                "{method} {framing:?}"
            );
        }
    }

    #[test]
    fn request_framing_rules() {
        let mut cl = HeaderMap::new();
        cl.insert("content-length", HeaderValue::from_static("7"));
        let mut bad = HeaderMap::new();
        bad.insert("content-length", HeaderValue::from_static("7x"));
        let none = HeaderMap::new();
        let cases = [
            (&cl, false, None, Ok(RequestFraming::Length(7))),
            (&bad, false, None, Err(WireError::ContentLength)),
            (&none, true, None, Ok(RequestFraming::Empty)),
            (&none, false, Some(0), Ok(RequestFraming::Empty)),
            (&none, false, Some(12), Ok(RequestFraming::Length(12))),
            (&none, false, None, Ok(RequestFraming::Chunked)),
        ];
        for (h, end, exact, want) in cases {
            assert_eq!(
                request_framing(h, end, exact),
                want,
                "{h:?} {end} {exact:?}"
            );
        }
    }

    #[test]
    fn response_framings() {
        use ResponseFraming::*;
        let cases: [(Method, &str, Result<ResponseFraming, WireError>, bool); 14] = [
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Ok(Length(5)),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Ok(Empty),
                true,
            ),
            (
                Method::HEAD,
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Ok(Empty),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 204 No Content\r\n\r\n",
                Ok(Empty),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                Ok(Empty),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Ok(Chunked),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                Ok(Chunked),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Ok(UntilClose),
                false,
            ),
            // Both: transfer-encoding wins, and the connection is not reused.
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                Ok(Chunked),
                false,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\n\r\n",
                Ok(UntilClose),
                false,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n",
                Ok(Length(4)),
                true,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n",
                Err(WireError::ContentLength),
                false,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                Err(WireError::ContentLength),
                false,
            ),
            (
                Method::GET,
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Ok(Length(1)),
                false,
            ),
        ];
        for (method, raw, want, reuse) in cases {
            let h = head(raw);
            let got = response_framing(&method, &h);
            assert_eq!(got, want, "{method} {raw:?}");
            if let Ok(f) = got {
                assert_eq!(keep_alive(&h, f), reuse, "keep-alive of {raw:?}");
            }
        }
        // HTTP/1.0 keeps the connection only when asked to.
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n");
        assert!(!keep_alive(&h, Length(1)));
        let h = head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n");
        assert!(keep_alive(&h, Length(1)));
    }

    #[test]
    fn response_heads() {
        assert!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nserver: x\r\n")
                .unwrap()
                .is_none()
        );
        let h = head("HTTP/1.1 503 Busy\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody");
        assert_eq!(h.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.len, 37);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        let bad: [(&[u8], WireError); 4] = [
            (b"SSH-2.0-OpenSSH\r\n\r\n", WireError::Head("not HTTP/1.x")),
            (
                b"HTTP/1.1 2000 OK\r\n\r\n",
                WireError::Head("invalid status line"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                WireError::Head("invalid header name"),
            ),
            (&[b'x'; MAX_HEAD_BYTES], WireError::Head("not HTTP/1.x")),
        ];
        for (raw, want) in bad {
            assert_eq!(
                parse_response_head(raw).unwrap_err(),
                want,
                "{:?}",
                &raw[..raw.len().min(40)]
            );
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("h{i}: v\r\n"))
            .collect();
        assert_eq!(
            parse_response_head(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()).unwrap_err(),
            WireError::TooManyHeaders
        );
        let long: String = (0..100).map(|i| format!("h: {i:0>700}\r\n")).collect();
        assert_eq!(
            parse_response_head(format!("HTTP/1.1 200 OK\r\n{long}").as_bytes()).unwrap_err(),
            WireError::HeadTooLarge
        );
    }

    /// Feeds `wire` to a chunked decoder in pieces of `step` bytes; returns the data and
    /// trailers, or the error.
    fn decode_chunked(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), WireError> {
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers)),
                Decoded::NeedMore => {
                    if fed == wire.len() {
                        return Err(WireError::Chunked("truncated (test)"));
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies() {
        let ok: [(&str, &str, usize); 4] = [
            ("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "hello world", 0),
            ("A;ext=1\r\n0123456789\r\n0\r\n\r\n", "0123456789", 0),
            (
                "3  \r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n",
                "abc",
                2,
            ),
            ("0\r\n\r\n", "", 0),
        ];
        for (wire, want, ntrailers) in ok {
            for step in [1, 2, 7, 1000] {
                let (data, trailers) = decode_chunked(wire.as_bytes(), step).unwrap();
                assert_eq!(
                    String::from_utf8(data).unwrap(),
                    want,
                    "{wire:?} step {step}"
                );
                assert_eq!(trailers.map_or(0, |t| t.len()), ntrailers, "{wire:?}");
            }
        }
        let bad: [(&str, &str); 7] = [
            ("z\r\n", "invalid chunk size"),
            ("\r\n", "invalid chunk size"),
            ("\n", "bare LF in chunk-size line"),
            ("5\nhello", "bare LF in chunk-size line"),
            ("3\r\nabcX\r\n", "chunk data not followed by CRLF"),
            ("11111111111111111\r\n", "invalid chunk size"),
            ("0\r\nbad trailer\r\n\r\n", "invalid trailer section"),
        ];
        for (wire, reason) in bad {
            assert_eq!(
                decode_chunked(wire.as_bytes(), 3),
                Err(WireError::Chunked(reason)),
                "{wire:?}"
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 10));
        assert_eq!(
            decode_chunked(long.as_bytes(), 100_000),
            Err(WireError::Chunked("chunk-size line too long"))
        );
    }

    #[test]
    fn length_and_until_close_bodies() {
        let mut buf = BytesMut::from(&b"abcdefXYZ"[..]);
        let mut d = BodyDecoder::new(ResponseFraming::Length(6));
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"abcdef")))
        );
        assert_eq!(d.decode(&mut buf), Ok(Decoded::End));
        assert_eq!(
            &buf[..],
            b"XYZ",
            "bytes past the body stay for the caller to see"
        );
        let mut d = BodyDecoder::new(ResponseFraming::UntilClose);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"XYZ")))
        );
        assert_eq!(d.decode(&mut buf), Ok(Decoded::NeedMore));
        assert!(d.ends_at_eof());
        assert!(!BodyDecoder::new(ResponseFraming::Length(3)).ends_at_eof());
    }

    proptest! {
        /// Any body chunked in any sizes and fed in any piece size decodes to itself.
        #[test]
        fn chunked_round_trip(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            sizes in proptest::collection::vec(1usize..300, 1..20),
            step in 1usize..64,
        ) {
            let mut wire = Vec::new();
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].min(rest.len());
                wire.extend_from_slice(&chunk_header(n));
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            let mut t = HeaderMap::new();
            t.insert("x-sum", HeaderValue::from(data.len()));
            wire.extend_from_slice(&last_chunk(Some(&t)));
            let (got, trailers) = decode_chunked(&wire, step).unwrap();
            prop_assert_eq!(got, data);
            prop_assert_eq!(trailers, Some(t));
        }

        /// Arbitrary bytes never panic the head parser or the chunked decoder.
        #[test]
        fn no_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_response_head(&bytes);
            let _ = decode_chunked(&bytes, 5);
        }
    }
}
