//! A raw HTTP/1.x connection for tests that must see bytes exactly: the client writes
//! exact request bytes and parses exact responses (framing checked, chunked bodies decoded
//! with their wire bytes and trailers kept), and raw backends read exact requests with it.
//! Used by `front.rs` (the front, byte for byte) and `edge.rs` (paths and heads on both
//! request paths).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::Node;

/// Longest wait for anything the node should do promptly (generous: never a timing
/// assertion, only a bound so that a wrong node fails instead of hanging).
pub const WAIT: Duration = Duration::from_secs(5);

/// A TCP stream with a read buffer that keeps what follows each message for the next.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

/// A response as the client read it.
#[derive(Debug)]
pub struct Response {
    /// `HTTP/1.1`, or `HTTP/1.0` for an HTTP/1.0 request hyper answered.
    pub version: String,
    pub status: u16,
    /// Names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// The body with any chunked framing removed.
    pub body: Vec<u8>,
    /// The body bytes as they came on the wire (chunked framing included).
    pub wire_body: Vec<u8>,
    /// The trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether the front wrote this response rather than hyper: hyper adds a `date`
    /// header to every response, the front adds none (and the raw backends send none).
    pub fn served_by_front(&self) -> bool {
        self.header("date").is_none()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The node's JSON error code (`{"error": {"code": ...}}`).
    pub fn error_code(&self) -> String {
        let body: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not a JSON error: {self:?}"));
        body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not the JSON error shape: {self:?}"))
            .to_string()
    }
}

/// A request as a backend read it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn eof(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// A new client connection to `node`'s data plane.
    pub async fn to(node: &Node) -> Conn {
        let address = node.data.trim_start_matches("http://");
        Conn::new(
            TcpStream::connect(address)
                .await
                .expect("connect to the data plane"),
        )
    }

    /// A connection that hyper serves: its first request (`/healthz`, for `host`) is one
    /// the front always hands over, and a handed-over connection stays with hyper.
    pub async fn held_by_hyper(node: &Node, host: &str) -> Conn {
        let mut conn = Conn::to(node).await;
        let response = conn
            .exchange(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n"))
            .await;
        assert_eq!(response.status, 200, "{response:?}");
        conn
    }

    /// Sends one request and reads its response.
    pub async fn exchange(&mut self, request: impl AsRef<[u8]>) -> Response {
        self.send(request).await;
        self.response().await
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .await
            .expect("write to the peer");
    }

    /// Reads what is there into the buffer; 0 at end of file.
    pub async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// One CRLF-terminated line, without its CRLF.
    pub async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                let line = self.buf[..at].to_vec();
                self.buf.drain(..at + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(eof(format!(
                    "closed inside a line: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )));
            }
        }
    }

    /// A message head: its first line and its headers. `None`: the peer closed before
    /// sending any byte of it.
    pub async fn head(&mut self) -> io::Result<Option<(String, Vec<(String, String)>)>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8(self.buf[..at].to_vec())
                    .map_err(|_| invalid("a head that is not UTF-8".into()))?;
                self.buf.drain(..at + 4);
                let mut lines = head.split("\r\n");
                let first = lines.next().unwrap_or_default().to_string();
                let mut headers = Vec::new();
                for line in lines {
                    let (name, value) = line
                        .split_once(':')
                        .ok_or_else(|| invalid(format!("a header line without ':': {line:?}")))?;
                    if name.is_empty() || name.trim() != name {
                        return Err(invalid(format!("a bad header name: {line:?}")));
                    }
                    headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
                }
                return Ok(Some((first, headers)));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(eof(format!(
                        "closed inside a head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )))
                };
            }
        }
    }

    /// Exactly `n` bytes.
    pub async fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(eof(format!(
                    "closed after {} of {n} body bytes",
                    self.buf.len()
                )));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything until the peer closes.
    pub async fn until_close(&mut self) -> io::Result<Vec<u8>> {
        while self.fill().await? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// A chunked body: (decoded data, wire bytes, trailers).
    pub async fn chunked(&mut self) -> io::Result<(Vec<u8>, Vec<u8>, Vec<(String, String)>)> {
        let mut data = Vec::new();
        let mut wire = Vec::new();
        let mut trailers = Vec::new();
        loop {
            let line = self.line().await?;
            wire.extend_from_slice(&line);
            wire.extend_from_slice(b"\r\n");
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "a bad chunk size line: {:?}",
                        String::from_utf8_lossy(&line)
                    ))
                })?;
            if size == 0 {
                loop {
                    let line = self.line().await?;
                    wire.extend_from_slice(&line);
                    wire.extend_from_slice(b"\r\n");
                    if line.is_empty() {
                        return Ok((data, wire, trailers));
                    }
                    let line = String::from_utf8_lossy(&line).into_owned();
                    let (name, value) = line
                        .split_once(':')
                        .ok_or_else(|| invalid(format!("a bad trailer line: {line:?}")))?;
                    trailers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                }
            }
            let chunk = self.exact(size + 2).await?;
            if !chunk.ends_with(b"\r\n") {
                return Err(invalid(format!(
                    "chunk data of {size} bytes not followed by CRLF"
                )));
            }
            wire.extend_from_slice(&chunk);
            data.extend_from_slice(&chunk[..size]);
        }
    }

    /// One response, its body read by its framing (`head_request`: it answers a HEAD).
    pub async fn try_response(&mut self, head_request: bool) -> io::Result<Response> {
        let (status_line, headers) = self
            .head()
            .await?
            .ok_or_else(|| eof("closed before a response".into()))?;
        let version = match status_line.split(' ').next() {
            Some(version @ ("HTTP/1.1" | "HTTP/1.0")) => version.to_string(),
            _ => return Err(invalid(format!("a bad status line: {status_line:?}"))),
        };
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid(format!("a bad status line: {status_line:?}")))?;
        let mut response = Response {
            version,
            status,
            headers,
            body: Vec::new(),
            wire_body: Vec::new(),
            trailers: Vec::new(),
        };
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(response);
        }
        if let Some(coding) = response.header("transfer-encoding") {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(invalid(format!("transfer-encoding {coding:?}")));
            }
            let (data, wire, trailers) = self.chunked().await?;
            response.body = data;
            response.wire_body = wire;
            response.trailers = trailers;
        } else if let Some(length) = response.header("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| invalid(format!("content-length {length:?}")))?;
            response.body = self.exact(length).await?;
            response.wire_body = response.body.clone();
        } else {
            response.body = self.until_close().await?;
            response.wire_body = response.body.clone();
        }
        Ok(response)
    }

    /// The next response, whole, within [`WAIT`].
    pub async fn response(&mut self) -> Response {
        timeout(WAIT, self.try_response(false))
            .await
            .expect("a response within the wait")
            .expect("a whole response")
    }

    /// The next response, to a HEAD request.
    pub async fn head_response(&mut self) -> Response {
        timeout(WAIT, self.try_response(true))
            .await
            .expect("a response within the wait")
            .expect("a whole response")
    }

    /// The next response, which the front must have written itself (not handed to hyper).
    pub async fn proxied(&mut self) -> Response {
        let response = self.response().await;
        assert!(response.served_by_front(), "hyper served it: {response:?}");
        assert_eq!(response.version, "HTTP/1.1", "{response:?}");
        response
    }

    /// The next response, to a HEAD request, written by the front.
    pub async fn proxied_head(&mut self) -> Response {
        let response = self.head_response().await;
        assert!(response.served_by_front(), "hyper served it: {response:?}");
        assert_eq!(response.version, "HTTP/1.1", "{response:?}");
        response
    }

    /// Expects the peer to close the connection with nothing more sent.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "bytes after the last response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let read = timeout(WAIT, self.fill())
            .await
            .expect("the connection closes within the wait");
        match read {
            Ok(0) => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
            Ok(_) => panic!(
                "bytes where the connection should close: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Err(error) => panic!("reading for the close: {error}"),
        }
    }

    /// Expects no byte to arrive for a while (nothing sent after a response's end).
    pub async fn expect_quiet(&mut self) {
        assert!(
            self.buf.is_empty(),
            "bytes after the last response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        if let Ok(read) = timeout(Duration::from_millis(200), self.fill()).await {
            panic!(
                "expected nothing more, read {read:?}: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// One request (a backend's view); `None` when the peer closed between requests.
    /// Bodies come with a `Content-Length` (the proxy always sends one).
    pub async fn request(&mut self) -> io::Result<Option<Request>> {
        let Some((line, headers)) = self.head().await? else {
            return Ok(None);
        };
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        if parts.next() != Some("HTTP/1.1") {
            return Err(invalid(format!("a bad request line: {line:?}")));
        }
        if header(&headers, "transfer-encoding").is_some() {
            return Err(invalid("a chunked request body upstream".into()));
        }
        let length = match header(&headers, "content-length") {
            Some(length) => length
                .parse()
                .map_err(|_| invalid(format!("content-length {length:?}")))?,
            None => 0,
        };
        let body = self.exact(length).await?;
        Ok(Some(Request {
            method,
            target,
            headers,
            body,
        }))
    }
}
