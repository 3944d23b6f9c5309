//! HTTP/1.1 message framing for the gateway's own upstream client and the data plane's
//! proxy fast path: parsing response heads, deciding how long a body is (RFC 9112 §6.3),
//! the chunked decoder, hop-by-hop headers, and writing the request head a proxy sends.
//!
//! Parsing is `httparse`'s (the parser hyper uses); what is here is what a proxy adds on
//! top of it. Nothing here does I/O: functions take and fill byte buffers, so the framing
//! rules are unit-tested without sockets.
//!
//! Header positions are kept as byte spans into the buffer the head was read into, so a
//! parsed head borrows nothing and costs no allocation once its span list has grown to
//! the largest head seen on the connection.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::Method;

/// Most header lines accepted in one head (hyper's default is 100 too).
pub const MAX_HEADERS: usize = 100;

/// Largest head (status or request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Longest chunk-extension or trailer section accepted in a chunked body, in bytes.
const MAX_CHUNK_METADATA: usize = 16 * 1024;

/// Why a message could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("malformed HTTP head: {0}")]
    Head(httparse::Error),
    #[error("HTTP head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("malformed chunked body")]
    Chunked,
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to `HEAD`, a `1xx`, `204` or `304`, or `Content-Length: 0`.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the connection closes (a response with neither length nor
    /// chunking).
    UntilClose,
}

/// A header line's name and value, as byte ranges into the buffer its head was parsed
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSpan {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// A response head parsed from the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// The reason phrase, as a range into the buffer.
    pub reason: Range<usize>,
    /// Length of the head in the buffer (status line, headers, blank line).
    pub len: usize,
    pub headers: Vec<HeaderSpan>,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response's body.
    pub keep_alive: bool,
    /// The response has `Transfer-Encoding`: its `Content-Length`, if any, is void and a
    /// proxy must not pass it on (RFC 9112 §6.3 item 3).
    pub transfer_encoding: bool,
    /// Its `Connection` names headers beyond `close`, `keep-alive` and `upgrade` (which
    /// are hop-by-hop anyway): those are hop-by-hop too.
    connection_names_more: bool,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            status: 0,
            reason: 0..0,
            len: 0,
            headers: Vec::new(),
            framing: Framing::Empty,
            keep_alive: false,
            transfer_encoding: false,
            connection_names_more: false,
        }
    }
}

impl ResponseHead {
    /// Parses a response head at the start of `buffer` into `self` (reusing its span
    /// list). `Ok(false)`: the head is not complete yet. `head_request`: the response
    /// answers a `HEAD`, so it has no body whatever its headers say.
    pub fn parse(&mut self, buffer: &[u8], head_request: bool) -> Result<bool, FramingError> {
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buffer,
            &mut storage,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buffer.len() >= MAX_HEAD_BYTES => {
                return Err(FramingError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err(FramingError::HeadTooLarge),
            Err(error) => return Err(FramingError::Head(error)),
        };
        if len > MAX_HEAD_BYTES {
            return Err(FramingError::HeadTooLarge);
        }
        let status = response.code.unwrap_or(0);
        let minor_version = response.version.unwrap_or(0);
        self.status = status;
        self.reason = span_of(buffer, response.reason.unwrap_or("").as_bytes());
        self.len = len;
        self.headers.clear();
        let mut connection = ConnectionTokens::default();
        let mut length = BodyLength::default();
        for header in response.headers.iter() {
            self.headers.push(HeaderSpan {
                name: span_of(buffer, header.name.as_bytes()),
                value: span_of(buffer, header.value),
            });
            length.see(header.name, header.value)?;
            connection.see(header.name, header.value);
        }
        self.framing =
            if head_request || (100..200).contains(&status) || matches!(status, 204 | 304) {
                Framing::Empty
            } else {
                length.framing(true)
            };
        self.transfer_encoding = length.transfer_encoding;
        self.connection_names_more = connection.other;
        self.keep_alive = connection.keep_alive(minor_version)
            && self.framing != Framing::UntilClose
            && !(length.chunked && length.content_length.is_some());
        Ok(true)
    }

    /// The header lines a proxy passes on, as (name, value) from `raw` (the buffer the
    /// head was parsed from): all but hop-by-hop ones (and those its `Connection` names),
    /// and but a `Content-Length` that `Transfer-Encoding` overrides (passing both on is
    /// how responses get smuggled).
    pub fn end_to_end<'b>(&'b self, raw: &'b [u8]) -> impl Iterator<Item = (&'b [u8], &'b [u8])> {
        self.headers
            .iter()
            .map(|h| (&raw[h.name.clone()], &raw[h.value.clone()]))
            .filter(move |(name, _)| {
                !(is_hop_by_hop(name)
                    || (self.transfer_encoding && name.eq_ignore_ascii_case(b"content-length"))
                    || (self.connection_names_more && self.connection_names(raw, name)))
            })
    }

    /// Whether one of the head's `Connection` headers names `name`.
    fn connection_names(&self, raw: &[u8], name: &[u8]) -> bool {
        self.headers
            .iter()
            .filter(|h| raw[h.name.clone()].eq_ignore_ascii_case(b"connection"))
            .flat_map(|h| raw[h.value.clone()].split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    }

    /// The value of the first header called `name` (ASCII case-insensitive).
    pub fn header<'b>(&self, buffer: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.headers
            .iter()
            .find(|h| buffer[h.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| &buffer[h.value.clone()])
    }
}

/// The byte range `part` occupies in `buffer` (`part` is a sub-slice of it).
fn span_of(buffer: &[u8], part: &[u8]) -> Range<usize> {
    if part.is_empty() {
        return 0..0;
    }
    let start = part.as_ptr() as usize - buffer.as_ptr() as usize;
    start..start + part.len()
}

/// What `Content-Length` and `Transfer-Encoding` headers said.
#[derive(Default)]
struct BodyLength {
    content_length: Option<u64>,
    /// `Transfer-Encoding` was present.
    transfer_encoding: bool,
    /// Its last coding is `chunked`.
    chunked: bool,
}

impl BodyLength {
    fn see(&mut self, name: &str, value: &[u8]) -> Result<(), FramingError> {
        if name.eq_ignore_ascii_case("content-length") {
            // `Content-Length: 5, 5` and repeated equal lines are one length; anything
            // else that disagrees is an error (RFC 9112 §6.3 item 5).
            for part in value.split(|&b| b == b',') {
                let digits = part.trim_ascii();
                if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit)
                {
                    return Err(FramingError::ContentLength);
                }
                let n: u64 = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or(FramingError::ContentLength)?;
                match self.content_length {
                    Some(seen) if seen != n => return Err(FramingError::ContentLength),
                    _ => self.content_length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.transfer_encoding = true;
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            self.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
        Ok(())
    }

    /// The framing these headers give a message with a body. `response`: a response
    /// without length or chunking runs until the connection closes (a request's would
    /// have no body).
    fn framing(&self, response: bool) -> Framing {
        if self.transfer_encoding {
            // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3 item 3).
            if self.chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            }
        } else {
            match self.content_length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None if response => Framing::UntilClose,
                None => Framing::Empty,
            }
        }
    }
}

/// What `Connection` headers said about keeping the connection.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    /// A token other than `close`, `keep-alive` and `upgrade`: a header name.
    other: bool,
}

impl ConnectionTokens {
    fn see(&mut self, name: &str, value: &[u8]) {
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"upgrade") {
                    self.other = true;
                }
            }
        }
    }

    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked to.
    fn keep_alive(&self, minor_version: u8) -> bool {
        !self.close && (minor_version >= 1 || self.keep_alive)
    }
}

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus the
/// framing and the non-standard `Proxy-Connection`: a proxy never forwards them as they
/// are.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a `Connection` header value names `name` (making it hop-by-hop too).
pub fn connection_names(connection_values: &[&[u8]], name: &[u8]) -> bool {
    connection_values
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size (`digits` read so far).
    Size {
        digits: u8,
    },
    /// Whitespace after the size, before an extension or the line end.
    SizeSpace,
    /// Inside a chunk extension (ignored).
    Extension,
    /// Expecting the `\n` after the size line's `\r`.
    SizeLf,
    /// In a chunk's data.
    Data,
    /// Expecting the `\r` after a chunk's data.
    DataCr,
    /// Expecting the `\n` after a chunk's data.
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// Expecting the `\n` ending a trailer line.
    TrailerLf,
    /// Expecting the `\n` ending the body.
    EndLf,
    Done,
}

/// What one [`ChunkedDecoder::step`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStep {
    /// The whole input was framing; more input is needed.
    NeedMore,
    /// `input[start..end]` is body data; the first `end` bytes are used up.
    Data { start: usize, end: usize },
    /// The body ended; the first `used` bytes of the input belong to it.
    End { used: usize },
}

/// A `Transfer-Encoding: chunked` decoder that works on whatever bytes have arrived:
/// it can hand out the data (for a body given to hyper) or only find where the body ends
/// (for a body relayed as it is).
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Data left in the current chunk.
    remaining: u64,
    /// Extension and trailer bytes seen (bounded).
    metadata: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size { digits: 0 },
            remaining: 0,
            metadata: 0,
        }
    }
}

impl ChunkedDecoder {
    /// Whether the final chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Reads framing from the start of `input` until data or the end of the body.
    pub fn step(&mut self, input: &[u8]) -> Result<ChunkStep, FramingError> {
        if self.state == ChunkState::Done {
            return Ok(ChunkStep::End { used: 0 });
        }
        let mut at = 0;
        while at < input.len() {
            if self.state == ChunkState::Data {
                let n =
                    (input.len() - at).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = ChunkState::DataCr;
                }
                return Ok(ChunkStep::Data {
                    start: at,
                    end: at + n,
                });
            }
            let byte = input[at];
            at += 1;
            self.state = match (self.state, byte) {
                (ChunkState::Size { digits }, _) if byte.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err(FramingError::Chunked);
                    }
                    let value = (byte as char).to_digit(16).unwrap_or(0) as u64;
                    self.remaining = self.remaining * 16 + value;
                    ChunkState::Size { digits: digits + 1 }
                }
                (ChunkState::Size { digits: 0 }, _) => {
                    return Err(FramingError::Chunked);
                }
                (ChunkState::Size { .. } | ChunkState::SizeSpace, b' ' | b'\t') => {
                    ChunkState::SizeSpace
                }
                (ChunkState::Size { .. } | ChunkState::SizeSpace, b';') => ChunkState::Extension,
                (
                    ChunkState::Size { .. } | ChunkState::SizeSpace | ChunkState::Extension,
                    b'\r',
                ) => ChunkState::SizeLf,
                (ChunkState::Extension, b'\n') => return Err(FramingError::Chunked),
                (ChunkState::Extension, _) => {
                    self.note_metadata()?;
                    ChunkState::Extension
                }
                (ChunkState::SizeLf, b'\n') if self.remaining == 0 => ChunkState::TrailerStart,
                (ChunkState::SizeLf, b'\n') => ChunkState::Data,
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => ChunkState::Size { digits: 0 },
                (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                (ChunkState::Trailer, b'\r') => ChunkState::TrailerLf,
                (ChunkState::TrailerStart | ChunkState::Trailer, b'\n') => {
                    return Err(FramingError::Chunked);
                }
                (ChunkState::TrailerStart | ChunkState::Trailer, _) => {
                    self.note_metadata()?;
                    ChunkState::Trailer
                }
                (ChunkState::TrailerLf, b'\n') => ChunkState::TrailerStart,
                (ChunkState::EndLf, b'\n') => {
                    self.state = ChunkState::Done;
                    return Ok(ChunkStep::End { used: at });
                }
                _ => return Err(FramingError::Chunked),
            };
        }
        Ok(ChunkStep::NeedMore)
    }

    fn note_metadata(&mut self) -> Result<(), FramingError> {
        self.metadata += 1;
        if self.metadata > MAX_CHUNK_METADATA {
            return Err(FramingError::Chunked);
        }
        Ok(())
    }
}

/// The parts of a client's request a proxy reads: implemented by hyper's request parts
/// and by the data plane's own parsed heads, so that both send the same thing upstream.
pub trait RequestHead {
    fn method(&self) -> &Method;
    /// The origin-form target: path and query as the client sent them.
    fn target(&self) -> &str;
    /// Every header line, in order: name (any case) and value.
    fn header_lines(&self) -> impl Iterator<Item = (&str, &[u8])>;

    fn path(&self) -> &str {
        let target = self.target();
        target.split_once('?').map_or(target, |(path, _)| path)
    }

    fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, query)| query)
    }

    /// The first value of header `name` (ASCII case-insensitive).
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_lines()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The host the client asked for: its `Host` header.
    fn client_host(&self) -> Option<&[u8]> {
        self.header("host")
    }
}

impl RequestHead for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn target(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    fn header_lines(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))
    }

    /// The authority of an absolute-form target (or HTTP/2's `:authority`), which wins
    /// over the `Host` header (RFC 9112 §3.2.2), else the `Host` header.
    fn client_host(&self) -> Option<&[u8]> {
        self.uri
            .authority()
            .map(|a| a.as_str().as_bytes())
            .or_else(|| self.headers.get(http::header::HOST).map(|v| v.as_bytes()))
    }
}

/// How the proxy rewrites a request for a node (see `gateway::proxy`'s module doc).
pub struct Forwarding<'a> {
    /// The `Host` to send; `None` keeps none.
    pub host: Option<&'a [u8]>,
    /// The client's own `Host` (sent as `X-Forwarded-Host`).
    pub client_host: Option<&'a [u8]>,
    pub client_ip: &'a str,
    pub scheme: &'a str,
    /// The protocol of an upgrade request, forwarded with `Connection: upgrade`.
    pub upgrade: Option<&'a [u8]>,
    /// Length of the body that follows the head.
    pub body_len: usize,
}

/// Writes the head a proxy sends for `request` into `out`: the request line, the
/// client's headers without hop-by-hop ones (and those its `Connection` names), its own
/// `Host`, `X-Forwarded-*`, `Expect` and `Content-Length`, then the proxy's own.
pub fn write_request_head<R: RequestHead>(out: &mut Vec<u8>, request: &R, forwarding: &Forwarding) {
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = forwarding.host {
        put_header(out, b"host", host);
    }
    // Headers the client's `Connection` names are hop-by-hop too; nearly every request
    // has none, so they are only collected when there are.
    let mut named: Vec<&[u8]> = Vec::new();
    for (name, value) in request.header_lines() {
        if name.eq_ignore_ascii_case("connection") {
            named.push(value);
        }
    }
    let mut forwarded_for_seen = false;
    for (name, value) in request.header_lines() {
        let lower = name.as_bytes();
        if is_hop_by_hop(lower)
            || lower.eq_ignore_ascii_case(b"host")
            || lower.eq_ignore_ascii_case(b"content-length")
            || lower.eq_ignore_ascii_case(b"expect")
            || lower.eq_ignore_ascii_case(b"x-forwarded-proto")
            || lower.eq_ignore_ascii_case(b"x-forwarded-host")
            || (!named.is_empty() && connection_names(&named, lower))
        {
            continue;
        }
        if lower.eq_ignore_ascii_case(b"x-forwarded-for") {
            // Every earlier hop's address, then the client's, on one line.
            if !forwarded_for_seen {
                forwarded_for_seen = true;
                out.extend_from_slice(b"x-forwarded-for: ");
                let mut first = true;
                for (n, v) in request.header_lines() {
                    if n.eq_ignore_ascii_case("x-forwarded-for") {
                        if !first {
                            out.extend_from_slice(b", ");
                        }
                        out.extend_from_slice(v);
                        first = false;
                    }
                }
                out.extend_from_slice(b", ");
                out.extend_from_slice(forwarding.client_ip.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        put_header(out, lower, value);
    }
    if !forwarded_for_seen {
        put_header(out, b"x-forwarded-for", forwarding.client_ip.as_bytes());
    }
    put_header(out, b"x-forwarded-proto", forwarding.scheme.as_bytes());
    if let Some(host) = forwarding.client_host {
        put_header(out, b"x-forwarded-host", host);
    }
    if let Some(protocol) = forwarding.upgrade {
        put_header(out, b"upgrade", protocol);
        put_header(out, b"connection", b"upgrade");
    }
    let method = request.method();
    if forwarding.body_len > 0
        || *method == Method::POST
        || *method == Method::PUT
        || *method == Method::PATCH
    {
        out.extend_from_slice(b"content-length: ");
        let mut digits = [0; 20];
        out.extend_from_slice(format_usize(&mut digits, forwarding.body_len));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one `name: value` line.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `buffer`.
pub fn format_usize(buffer: &mut [u8; 20], mut n: usize) -> &[u8] {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buffer[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> Result<Option<ResponseHead>, FramingError> {
        let mut parsed = ResponseHead::default();
        Ok(parsed
            .parse(raw.as_bytes(), head_request)?
            .then_some(parsed))
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let cases: &[(&str, bool, Framing, bool)] = &[
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
                false,
                Framing::Length(3),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                Framing::UntilClose,
                false,
            ),
            // Transfer-Encoding wins over Content-Length; such a connection is not reused.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Framing::UntilClose, false),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
                true,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                false,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                false,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n",
                false,
                Framing::Length(1),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\ncontent-length: 7\r\n\r\n",
                false,
                Framing::Length(7),
                true,
            ),
        ];
        for (raw, head_request, framing, keep_alive) in cases {
            let parsed = head(raw, *head_request).unwrap().unwrap();
            assert_eq!(parsed.framing, *framing, "{raw:?}");
            assert_eq!(parsed.keep_alive, *keep_alive, "{raw:?}");
            assert_eq!(parsed.len, raw.len());
        }
    }

    #[test]
    fn bad_lengths_and_heads_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
        ] {
            assert_eq!(
                head(raw, false),
                Err(FramingError::ContentLength),
                "{raw:?}"
            );
        }
        assert!(matches!(
            head("HTTP/9 nope\r\n\r\n", false),
            Err(FramingError::Head(_))
        ));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&huge, false), Err(FramingError::HeadTooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(head(&many, false), Err(FramingError::HeadTooLarge));
    }

    #[test]
    fn a_partial_head_asks_for_more_and_spans_point_into_the_buffer() {
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-le", false), Ok(None));
        let raw = "HTTP/1.1 404 Not Here\r\nX-A: one\r\ncontent-length: 0\r\n\r\nrest";
        let parsed = head(raw, false).unwrap().unwrap();
        assert_eq!(parsed.status, 404);
        assert_eq!(&raw[parsed.reason.clone()], "Not Here");
        assert_eq!(&raw[parsed.headers[0].name.clone()], "X-A");
        assert_eq!(&raw[parsed.headers[0].value.clone()], "one");
        assert_eq!(parsed.header(raw.as_bytes(), "x-a"), Some(&b"one"[..]));
        assert_eq!(&raw[parsed.len..], "rest");
    }

    #[test]
    fn a_proxy_passes_on_only_end_to_end_headers() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
                   Keep-Alive: timeout=5\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\
                   X-Kept: 2\r\n\r\n";
        let parsed = head(raw, false).unwrap().unwrap();
        let passed: Vec<(&[u8], &[u8])> = parsed.end_to_end(raw.as_bytes()).collect();
        assert_eq!(passed, vec![(&b"X-Kept"[..], &b"2"[..])]);
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 9\r\n\r\n";
        let parsed = head(raw, false).unwrap().unwrap();
        let passed: Vec<(&[u8], &[u8])> = parsed.end_to_end(raw.as_bytes()).collect();
        assert_eq!(passed, vec![(&b"Content-Length"[..], &b"9"[..])]);
    }

    /// Decodes `input` fed in pieces of `piece` bytes; returns the data and the bytes
    /// after the body.
    fn decode_in_pieces(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize), FramingError> {
        let mut decoder = ChunkedDecoder::default();
        let mut data = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.step(&pending)? {
                ChunkStep::Data { start, end } => {
                    data.extend_from_slice(&pending[start..end]);
                    pending.drain(..end);
                }
                ChunkStep::End { used } => {
                    pending.drain(..used);
                    return Ok((data, pending.len() + input.len() - fed));
                }
                ChunkStep::NeedMore => {
                    pending.clear();
                    if fed == input.len() {
                        return Err(FramingError::Chunked);
                    }
                    let next = (fed + piece).min(input.len());
                    pending.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces() {
        let body = b"5\r\nhello\r\nA;ext=1\r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, 1000] {
            let (data, after) = decode_in_pieces(body, piece).unwrap();
            assert_eq!(data, b"hello, world!!!", "piece {piece}");
            // What follows the body is left for the next message.
            assert_eq!(after, 4, "piece {piece}");
        }
        let (data, _) = decode_in_pieces(b"0\r\n\r\n", 1).unwrap();
        assert!(data.is_empty());
        let (data, _) = decode_in_pieces(b"00003 \t;a=b\r\nabc\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!(data, b"abc");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nbad\n\r\n",
            b"1234567890abcdef0\r\n",
            b";ext\r\n",
        ] {
            assert_eq!(
                decode_in_pieces(bad, 3),
                Err(FramingError::Chunked),
                "{bad:?}"
            );
        }
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_METADATA + 1));
        assert_eq!(
            decode_in_pieces(long_extension.as_bytes(), 4096),
            Err(FramingError::Chunked)
        );
    }

    struct Head {
        method: Method,
        target: &'static str,
        headers: Vec<(&'static str, &'static str)>,
    }

    impl RequestHead for Head {
        fn method(&self) -> &Method {
            &self.method
        }
        fn target(&self) -> &str {
            self.target
        }
        fn header_lines(&self) -> impl Iterator<Item = (&str, &[u8])> {
            self.headers.iter().map(|(n, v)| (*n, v.as_bytes()))
        }
    }

    #[test]
    fn the_request_head_drops_hop_by_hop_and_adds_forwarding() {
        let request = Head {
            method: Method::GET,
            target: "/a/b?x=1",
            headers: vec![
                ("Host", "client.example"),
                ("Connection", "keep-alive, X-Secret"),
                ("X-Secret", "hop"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("Accept", "*/*"),
                ("x-forwarded-for", "10.0.0.2"),
                ("X-Forwarded-Proto", "https"),
                ("Expect", "100-continue"),
                ("Content-Length", "99"),
            ],
        };
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &request,
            &Forwarding {
                host: Some(b"node:80"),
                client_host: Some(b"client.example"),
                client_ip: "127.0.0.9",
                scheme: "http",
                upgrade: None,
                body_len: 0,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a/b?x=1 HTTP/1.1\r\n\
             host: node:80\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.9\r\n\
             Accept: */*\r\n\
             x-forwarded-proto: http\r\n\
             x-forwarded-host: client.example\r\n\r\n"
        );
        assert_eq!(request.path(), "/a/b");
        assert_eq!(request.query(), Some("x=1"));
    }

    #[test]
    fn bodies_and_upgrades_are_announced() {
        let request = Head {
            method: Method::POST,
            target: "/",
            headers: vec![],
        };
        let mut out = Vec::new();
        let mut forwarding = Forwarding {
            host: None,
            client_host: None,
            client_ip: "::1",
            scheme: "http",
            upgrade: None,
            body_len: 0,
        };
        write_request_head(&mut out, &request, &forwarding);
        assert!(out.ends_with(b"x-forwarded-proto: http\r\ncontent-length: 0\r\n\r\n"));
        out.clear();
        forwarding.body_len = 1234;
        forwarding.upgrade = Some(b"websocket");
        write_request_head(&mut out, &request, &forwarding);
        assert!(out.ends_with(
            b"upgrade: websocket\r\nconnection: upgrade\r\ncontent-length: 1234\r\n\r\n"
        ));
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut buffer = [0; 20];
        assert_eq!(format_usize(&mut buffer, 0), b"0");
        assert_eq!(format_usize(&mut buffer, 1_234_567), b"1234567");
        assert_eq!(
            format_usize(&mut buffer, usize::MAX),
            usize::MAX.to_string().as_bytes()
        );
    }
}
