//! HTTP/1.1 request framing checked as strictly as Envoy's codec, on the downstream bytes before
//! hyper parses them. hyper resolves some ambiguities silently (it drops `Content-Length` next to
//! `Transfer-Encoding`, folds repeated equal `Content-Length`s into one), so its caller cannot see
//! that a request was ambiguous, and a front proxy that read it differently could smuggle a
//! second request past policy. Here such a request is refused:
//!
//! - `Content-Length` and `Transfer-Encoding` together: 400;
//! - more than one `Content-Length` (even equal), or one that is not a number: 400;
//! - a transfer coding other than `chunked`: 501 (RFC 9112 section 6.1);
//! - a malformed chunk (size, extension, missing CRLF) or trailer section: 400.
//!
//! [`Framing`] is the pure state machine (it follows every message's body to find the next
//! head); [`FramingGuard`] applies it to a stream. A message whose error is seen in the same read
//! as its head never reaches hyper, so the application receives nothing of it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Why a request's framing is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Where the refused message starts, counted from the first byte ever fed.
    pub message_start: u64,
    pub status: StatusCode,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size; `digits` so far, `value`, then whitespace/extension.
    Size {
        digits: u8,
        value: u64,
    },
    SizeWs {
        value: u64,
    },
    Ext {
        value: u64,
        len: usize,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: bytes of the current line.
    Trailer {
        line: usize,
    },
    TrailerLf {
        empty: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a head (leading empty lines included).
    Head,
    Length(u64),
    Chunked(Chunk),
    /// No more checking: hyper takes it from here (a head too large or unparsable for us, which
    /// hyper refuses itself, ending the connection). A `CONNECT` is checked as a bodiless
    /// request: the proxy tunnels nothing, so what follows it is read as HTTP and checked too.
    Off,
}

/// The framing state of one HTTP/1.1 connection's downstream bytes.
#[derive(Debug)]
pub struct Framing {
    state: State,
    head: Vec<u8>,
    max_head: usize,
    /// Bytes fed so far, and where the current message started.
    fed: u64,
    message_start: u64,
}

const MAX_CHUNK_EXT: usize = 4096;
const MAX_TRAILER_LINE: usize = 16 * 1024;

fn reject(start: u64, status: StatusCode, reason: &'static str) -> Rejection {
    Rejection {
        message_start: start,
        status,
        reason,
    }
}

impl Framing {
    /// `max_head`: past this many bytes a head is left to hyper (which answers 431).
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            max_head,
            fed: 0,
            message_start: 0,
        }
    }

    /// The bytes of a head not complete yet (held back by [`FramingGuard`]: nothing can act on
    /// half a head, and holding it lets a refused head be answered before any of it is read).
    pub fn pending_head_len(&self) -> usize {
        if self.state == State::Head {
            self.head.len()
        } else {
            0
        }
    }

    /// Follows `data`; `Err` at the first message whose framing is refused.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Rejection> {
        let base = self.fed;
        self.fed += data.len() as u64;
        let mut i = 0;
        while i < data.len() {
            match self.state.clone() {
                State::Off => return Ok(()),
                State::Head => {
                    if self.head.is_empty() {
                        self.message_start = base + i as u64;
                        // The usual case: the whole head is in this read, checked in place.
                        if let Some(end) = find_head_end(&data[i..], 0) {
                            let start = self.message_start;
                            self.state = self
                                .on_head(&data[i..i + end])
                                .map_err(|(status, reason)| reject(start, status, reason))?;
                            i += end;
                            continue;
                        }
                    }
                    // A head split across reads: collected until it is complete.
                    let before = self.head.len();
                    self.head.extend_from_slice(&data[i..]);
                    match find_head_end(&self.head, before.saturating_sub(3)) {
                        Some(end) => {
                            i += end - before;
                            let head = std::mem::take(&mut self.head);
                            let start = self.message_start;
                            self.state = self
                                .on_head(&head[..end])
                                .map_err(|(status, reason)| reject(start, status, reason))?;
                        }
                        None => {
                            if self.head.len() > self.max_head {
                                self.state = State::Off;
                                self.head = Vec::new();
                            }
                            return Ok(());
                        }
                    }
                }
                State::Length(n) => {
                    let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunked(Chunk::Data(n)) => {
                    let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    });
                }
                State::Chunked(c) => {
                    let start = self.message_start;
                    let next = chunk_step(c, data[i])
                        .map_err(|reason| reject(start, StatusCode::BAD_REQUEST, reason))?;
                    i += 1;
                    self.state = next;
                }
            }
        }
        Ok(())
    }

    /// Checks a complete head; the state for its body.
    fn on_head(&self, head: &[u8]) -> Result<State, (StatusCode, &'static str)> {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        // What we cannot parse, hyper refuses (400/431) itself.
        let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
            return Ok(State::Off);
        };
        let mut lengths = 0;
        let mut length = None;
        let mut codings: Vec<String> = Vec::new();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok());
                if length.is_none() {
                    return Err((StatusCode::BAD_REQUEST, "invalid Content-Length"));
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let v = std::str::from_utf8(h.value)
                    .map_err(|_| (StatusCode::BAD_REQUEST, "invalid Transfer-Encoding"))?;
                codings.extend(
                    v.split(',')
                        .map(|c| c.trim().to_ascii_lowercase())
                        .filter(|c| !c.is_empty()),
                );
            }
        }
        if lengths > 1 {
            return Err((StatusCode::BAD_REQUEST, "more than one Content-Length"));
        }
        let has_te = req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
        if has_te {
            if lengths > 0 {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            if codings.iter().any(|c| c != "chunked") {
                return Err((StatusCode::NOT_IMPLEMENTED, "unsupported transfer coding"));
            }
            if codings.len() != 1 {
                return Err((StatusCode::BAD_REQUEST, "invalid Transfer-Encoding"));
            }
            return Ok(State::Chunked(Chunk::Size {
                digits: 0,
                value: 0,
            }));
        }
        Ok(match length {
            Some(n) if n > 0 => State::Length(n),
            _ => State::Head,
        })
    }
}

/// The end (exclusive) of the head in `buf`, searching from `from`: the first CRLF CRLF after
/// any leading empty lines.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let lead = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let from = from.max(lead);
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

fn hex(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

/// One byte of the chunked coding (RFC 9112 section 7.1), strict as Envoy: CRLF line ends.
fn chunk_step(c: Chunk, b: u8) -> Result<State, &'static str> {
    let next = match c {
        Chunk::Size { digits, value } => match (hex(b), b) {
            (Some(d), _) => {
                if digits >= 16 {
                    return Err("chunk size too large");
                }
                Chunk::Size {
                    digits: digits + 1,
                    value: value * 16 + d,
                }
            }
            (None, _) if digits == 0 => return Err("malformed chunk size"),
            (None, b' ' | b'\t') => Chunk::SizeWs { value },
            (None, b';') => Chunk::Ext { value, len: 0 },
            (None, b'\r') => Chunk::SizeLf { value },
            _ => return Err("malformed chunk size"),
        },
        Chunk::SizeWs { value } => match b {
            b' ' | b'\t' => Chunk::SizeWs { value },
            b';' => Chunk::Ext { value, len: 0 },
            b'\r' => Chunk::SizeLf { value },
            _ => return Err("malformed chunk size"),
        },
        Chunk::Ext { value, len } => match b {
            b'\r' => Chunk::SizeLf { value },
            b'\t' | b' '..=b'~' | 0x80..=0xff if len < MAX_CHUNK_EXT => Chunk::Ext {
                value,
                len: len + 1,
            },
            _ => return Err("malformed chunk extension"),
        },
        Chunk::SizeLf { value } => match (b, value) {
            (b'\n', 0) => Chunk::Trailer { line: 0 },
            (b'\n', n) => Chunk::Data(n),
            _ => return Err("chunk size line not ended by CRLF"),
        },
        // Bulk data is consumed by `Framing::feed`; byte by byte it is the same.
        Chunk::Data(n) if n > 1 => Chunk::Data(n - 1),
        Chunk::Data(_) => Chunk::DataCr,
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            _ => return Err("chunk data not followed by CRLF"),
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size {
                digits: 0,
                value: 0,
            },
            _ => return Err("chunk data not followed by CRLF"),
        },
        Chunk::Trailer { line } => match b {
            b'\r' => Chunk::TrailerLf { empty: line == 0 },
            b'\n' => return Err("trailer line not ended by CRLF"),
            _ if line >= MAX_TRAILER_LINE => return Err("trailer line too long"),
            _ => Chunk::Trailer { line: line + 1 },
        },
        Chunk::TrailerLf { empty } => match (b, empty) {
            (b'\n', true) => return Ok(State::Head),
            (b'\n', false) => Chunk::Trailer { line: 0 },
            _ => return Err("trailer line not ended by CRLF"),
        },
    };
    Ok(State::Chunked(next))
}

/// A stream whose downstream bytes are checked by [`Framing`] before the reader sees them.
/// The bytes of an incomplete head are held back until the head is complete, so a refused head
/// is never read at all; on a refusal the guard hands on the messages before it, then answers
/// the client itself (`400`/`501`, `Connection: close`) and ends the stream. A body found
/// malformed after its head was handed on fails the stream instead (the reader stops there).
/// Complete reads go straight into the reader's buffer: no copy in the common case.
#[derive(Debug)]
pub struct FramingGuard<S> {
    inner: S,
    framing: Framing,
    /// Bytes read from `inner` and not handed on; the first `ready` of them may be.
    pending: Vec<u8>,
    ready: usize,
    /// Bytes handed on so far.
    released: u64,
    /// The refusal to write before ending the stream, and how much of it is written.
    refusal: Option<(Vec<u8>, usize)>,
    broken: bool,
    done: bool,
}

impl<S> FramingGuard<S> {
    pub fn new(inner: S, max_head: usize) -> Self {
        Self {
            inner,
            framing: Framing::new(max_head),
            pending: Vec::new(),
            ready: 0,
            released: 0,
            refusal: None,
            broken: false,
            done: false,
        }
    }

    /// The stream and the bytes read from it and not handed on yet, for a connection that stops
    /// being HTTP (an upgrade the application accepted): what follows is no longer HTTP to check.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.inner, self.pending)
    }

    /// Decides what to do about a refusal: answer it (its message was not handed on), or fail.
    /// Returns how many of the unreleased bytes precede the refused message.
    fn refuse(&mut self, r: &Rejection) -> Option<usize> {
        tracing::info!(target: "palisade::rbac", status = r.status.as_u16(), reason = r.reason, "request refused before authorization: HTTP/1.1 framing");
        match r.message_start.checked_sub(self.released) {
            Some(before) => {
                self.refusal = Some((refusal_bytes(r), 0));
                usize::try_from(before).ok()
            }
            None => {
                self.broken = true;
                None
            }
        }
    }
}

fn refusal_bytes(r: &Rejection) -> Vec<u8> {
    let reason = r.status.canonical_reason().unwrap_or("Bad Request");
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}",
        r.status.as_u16(),
        reason.len()
    )
    .into_bytes()
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                this.ready -= n;
                this.released += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.broken {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "request framing refused mid-message",
                )));
            }
            if let Some((bytes, written)) = &mut this.refusal {
                while *written < bytes.len() {
                    let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]))?;
                    if n == 0 {
                        break;
                    }
                    *written += n;
                }
                ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
                this.refusal = None;
                this.done = true;
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            if this.pending.is_empty() {
                // Straight into the reader's buffer.
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                let n = buf.filled().len() - before;
                if n == 0 {
                    return Poll::Ready(Ok(()));
                }
                let verdict = this.framing.feed(&buf.filled()[before..]);
                let keep = match verdict {
                    Ok(()) => n - this.framing.pending_head_len().min(n),
                    Err(r) => this.refuse(&r).unwrap_or(0).min(n),
                };
                if this.refusal.is_none() && !this.broken && keep < n {
                    this.pending
                        .extend_from_slice(&buf.filled()[before + keep..before + n]);
                }
                buf.set_filled(before + keep);
                this.released += keep as u64;
                if keep > 0 {
                    return Poll::Ready(Ok(()));
                }
            } else {
                let mut chunk = [0u8; 8192];
                let mut rb = ReadBuf::new(&mut chunk);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                let data = rb.filled();
                if data.is_empty() {
                    // The client ended inside a head: the reader sees it end there.
                    this.ready = this.pending.len();
                    this.done = true;
                    continue;
                }
                this.pending.extend_from_slice(data);
                match this.framing.feed(data) {
                    Ok(()) => {
                        this.ready = this.pending.len() - this.framing.pending_head_len();
                    }
                    Err(r) => {
                        let before = this.refuse(&r).unwrap_or(0).min(this.pending.len());
                        this.pending.truncate(before);
                        this.ready = before;
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn check(input: &[u8]) -> Result<(), (u64, u16)> {
        let mut f = Framing::new(64 * 1024);
        f.feed(input)
            .map_err(|r| (r.message_start, r.status.as_u16()))
    }

    #[test]
    fn framing_table() {
        let ok: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n5;a=b\r\nhello\r\nA \r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for input in ok {
            assert_eq!(check(input), Ok(()), "{:?}", String::from_utf8_lossy(input));
        }
        // (input, offset of the refused message, status)
        let bad: &[(&[u8], u64, u16)] = &[
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 0, 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", 0, 400),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 0, 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0, 501),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", 0, 400),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx\n", 0, 400),
            // What follows a CONNECT (answered 400: nothing is tunnelled) is still checked.
            (b"CONNECT a:443 HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 26, 400),
            (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 28, 400),
        ];
        for (input, at, status) in bad {
            assert_eq!(
                check(input),
                Err((*at, *status)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn an_error_in_a_later_read_names_where_its_message_started() {
        let mut f = Framing::new(64 * 1024);
        f.feed(
            b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
        )
        .unwrap();
        assert_eq!(f.pending_head_len(), 0);
        let r = f.feed(b"llo\r\nq\r\n").unwrap_err();
        assert_eq!(r.message_start, 18);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    /// Through the guard, a refused request gets the guard's own answer and nothing of it is
    /// read; the requests before it are read as sent.
    #[tokio::test]
    async fn guard_answers_the_refused_request_and_hides_it() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(4096);
        let mut guard = FramingGuard::new(server, 64 * 1024);
        client
            .write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST /bad HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        guard.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
        drop(guard);
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 501 Not Implemented\r\n"),
            "{answer}"
        );
        assert!(answer.contains("connection: close"), "{answer}");
    }

    proptest! {
        /// Any split of a stream into reads gives the same verdict as one read.
        #[test]
        fn verdict_does_not_depend_on_read_boundaries(cuts in proptest::collection::vec(0usize..200, 0..6), which in 0usize..4) {
            let streams: [&[u8]; 4] = [
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nt: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcdGET / HTTP/1.1\r\nHost: a\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            ];
            let input = streams[which];
            let whole = Framing::new(1 << 16).feed(input).map_err(|r| r.status);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
            points.sort_unstable();
            let mut f = Framing::new(1 << 16);
            let mut last = 0;
            let mut got = Ok(());
            for p in points.into_iter().chain([input.len()]) {
                if let Err(r) = f.feed(&input[last..p]) {
                    got = Err(r.status);
                    break;
                }
                last = p;
            }
            prop_assert_eq!(got, whole);
        }
    }
}
