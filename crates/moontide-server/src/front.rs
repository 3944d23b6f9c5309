//! The data plane's HTTP/1.1 front: every accepted connection starts here. It reads
//! request heads itself and proxies requests for plain gateway routes (an upstream target,
//! no plugins) straight from its read buffer to a pooled upstream connection and the
//! answer straight back, the way nginx's proxy module does; at the first request it does
//! not take, it hands the connection — with the bytes it has read — to hyper
//! (`dataplane::serve_connection`) for the rest of the connection's life.
//!
//! Why: with hyper's server in front, a proxied request cost ~2× nginx's CPU (BENCHMARKS.md,
//! "Gateway"): request and response header maps built and dropped, an `http::Request` and
//! `Response`, a service future per request, the body as a stream of frames. Here a
//! request is parsed in place (`httparse`, headers as slices of the read buffer), routed
//! without copying, written upstream with one `write`, and the response head rewritten
//! into one buffer that usually carries the whole body too: one `write` back.
//!
//! What the front takes (everything else goes to hyper, which serves it as before):
//! HTTP/1.1 requests in origin form with exactly one `Host`, not `CONNECT`, with a path
//! that normalises (`moontide_gateway::path`; the front routes and forwards the normal
//! form, as the hyper path does), with no body or a `Content-Length` one within the body
//! limit, no `Expect` and no upgrade, whose route is a gateway route to an upstream with
//! no plugins. So functions, plugins, `/fn/`, the probes, HTTP/1.0, HTTP/2 (its
//! preface does not parse as HTTP/1.1), chunked uploads, WebSockets and malformed
//! requests all see hyper's behaviour.
//!
//! Semantics match the hyper path's (`gateway::proxy` does both): the same retries, node
//! health, breaker and metrics, the same request rewriting, the same `x-request-id` on
//! the response and the same JSON errors. The response keeps the upstream's framing:
//! a `Content-Length` body is relayed by length, a chunked one is relayed as it came
//! (the decoder only finds its end), one delimited by the upstream closing is relayed
//! and then the client connection is closed. `read` is the longest wait for each next
//! piece of the body, as on the hyper path.
//!
//! Client timeouts (`edge::ClientTimeouts`, `serve --header-timeout`/`--body-timeout`): a
//! request head must arrive whole within the head timeout (30 s) of the wait for it
//! starting (idle keep-alive time included, as hyper's `header_read_timeout`); after the
//! head, each next piece of the body within the body timeout (60 s, nginx's
//! `client_body_timeout`), else it is answered `408 body_timeout` and closed (a head that
//! does not arrive is closed without an answer, as hyper does). The connection's
//! [`ConnGuard`] (`edge::conn_limits`) goes with it to hyper, so it is counted until the
//! socket is dropped.
//!
//! Graceful shutdown: an idle connection closes at once; a connection in the middle of a
//! request finishes it, answering with `Connection: close`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode};
use hyper_util::server::graceful::Watcher;
use moontide_gateway::router::Headers;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::dataplane::{self, Worker, is_sane_request_id};
use crate::edge::conn_limits::ConnGuard;
use crate::errors::ApiError;
use crate::gateway::client::{self, Pooled};
use crate::gateway::config::RouteTarget;
use crate::gateway::http1::{
    ChunkStep, ChunkedDecoder, Framing, MAX_HEAD_BYTES, MAX_HEADERS, RequestHead, format_usize,
    put_header,
};
use crate::gateway::proxy::{Downstream, Exchange, Upstream};

/// Most bytes copied into the response head's buffer from the body so that both go out in
/// one write; a larger first piece is written after the head.
const COALESCE_BODY: usize = 16 * 1024;

/// Starts serving an accepted connection on this thread.
pub fn serve_connection(
    worker: &Rc<Worker>,
    stream: TcpStream,
    remote: SocketAddr,
    guard: ConnGuard,
    watcher: Watcher,
    stop: watch::Receiver<()>,
) {
    let worker = worker.clone();
    tokio::task::spawn_local(async move {
        let peer_ip: Arc<str> = Arc::from(remote.ip().to_string());
        let mut front = Front {
            stream,
            input: BytesMut::with_capacity(4096),
            exchange: Exchange::default(),
            output: Vec::with_capacity(1024),
            stop,
        };
        loop {
            match front.serve_one(&worker, &peer_ip).await {
                Next::Again => {}
                Next::Close => return,
                Next::ToHyper => {
                    let io = Rewind {
                        read: front.input,
                        stream: front.stream,
                    };
                    dataplane::serve_connection(&worker, io, peer_ip, watcher, guard);
                    return;
                }
            }
        }
    });
}

/// What a connection does after a request.
enum Next {
    /// Read the next request.
    Again,
    Close,
    /// Hand the connection (and what has been read of it) to hyper.
    ToHyper,
}

/// One client connection's state in the front.
struct Front {
    stream: TcpStream,
    /// Bytes read from the client and not yet used.
    input: BytesMut,
    exchange: Exchange,
    /// The response head (and often the body) being written to the client.
    output: Vec<u8>,
    /// Changes when the worker shuts down.
    stop: watch::Receiver<()>,
}

/// A request head parsed in place, as the proxy reads it.
struct FrontRequest<'b> {
    method: Method,
    /// The target with its path in normal form (`moontide_gateway::path`): borrowed from
    /// the read buffer when the client sent it so, as nearly every client does.
    target: Cow<'b, str>,
    headers: &'b [httparse::Header<'b>],
}

impl RequestHead for FrontRequest<'_> {
    fn method(&self) -> &Method {
        &self.method
    }

    fn target(&self) -> &str {
        &self.target
    }

    fn header_lines(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|h| (h.name, h.value))
    }
}

/// The router's view of parsed headers.
struct HeaderLines<'a, 'b>(&'a [httparse::Header<'b>]);

impl Headers for HeaderLines<'_, '_> {
    fn any_value(&self, name: &http::HeaderName, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.0
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name.as_str()))
            .any(|h| test(h.value))
    }
}

/// What the client's headers say about framing and the connection.
#[derive(Default)]
struct ClientHeaders {
    content_length: Option<usize>,
    /// Something the front leaves to hyper: a transfer coding, `Expect`, an upgrade, a
    /// bad or repeated `Content-Length`, or not exactly one `Host` (hyper answers `400`).
    unusual: bool,
    close: bool,
}

impl ClientHeaders {
    fn read(headers: &[httparse::Header<'_>]) -> ClientHeaders {
        let mut seen = ClientHeaders::default();
        let mut hosts = 0;
        for header in headers {
            let name = header.name.as_bytes();
            if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let length = std::str::from_utf8(header.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok());
                match (length, seen.content_length) {
                    (Some(n), None) => seen.content_length = Some(n),
                    _ => seen.unusual = true,
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
            {
                seen.unusual = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in header.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        seen.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        seen.unusual = true;
                    }
                }
            }
        }
        if hosts != 1 {
            seen.unusual = true;
        }
        seen
    }
}

impl Front {
    /// Reads one request and serves it, or decides that hyper should.
    async fn serve_one(&mut self, worker: &Rc<Worker>, peer_ip: &Arc<str>) -> Next {
        let timeouts = worker.timeouts();
        let head_deadline = tokio::time::Instant::now() + timeouts.head;
        let mut waiting_for_body = false;
        loop {
            let Front {
                stream,
                input,
                exchange,
                output,
                stop,
            } = self;
            if !input.is_empty() {
                let mut storage = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
                    MAX_HEADERS];
                let mut request = httparse::Request::new(&mut []);
                let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
                    &mut request,
                    input,
                    &mut storage,
                );
                match parsed {
                    Ok(httparse::Status::Complete(head_len)) => {
                        if request.version != Some(1) {
                            return Next::ToHyper;
                        }
                        let client = ClientHeaders::read(request.headers);
                        if client.unusual {
                            return Next::ToHyper;
                        }
                        let body_len = client.content_length.unwrap_or(0);
                        if body_len > worker.max_body_bytes() {
                            return Next::ToHyper;
                        }
                        if input.len() >= head_len + body_len {
                            let (Some(method), Some(target)) = (request.method, request.path)
                            else {
                                return Next::ToHyper;
                            };
                            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                                return Next::ToHyper;
                            };
                            if method == Method::CONNECT {
                                // Refused on the hyper path (no route tunnels).
                                return Next::ToHyper;
                            }
                            // A refused path is answered on the hyper path, which
                            // normalises by the same function.
                            let Some(target) = normal_target(target) else {
                                return Next::ToHyper;
                            };
                            let head = FrontRequest {
                                method,
                                target,
                                headers: request.headers,
                            };
                            let body = &input[head_len..head_len + body_len];
                            let next = proxy(
                                worker,
                                peer_ip,
                                &head,
                                body,
                                client.close,
                                stop,
                                stream,
                                exchange,
                                output,
                            )
                            .await;
                            if matches!(next, Next::Again) {
                                input.advance(head_len + body_len);
                            }
                            return next;
                        }
                        waiting_for_body = true;
                    }
                    Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD_BYTES => {
                        return Next::ToHyper;
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Next::ToHyper,
                }
            }
            // More of the request is needed.
            let idle = input.is_empty();
            let deadline = if waiting_for_body {
                tokio::time::Instant::now() + timeouts.body
            } else {
                head_deadline
            };
            tokio::select! {
                biased;
                read = client::read_some(stream, input) => match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep_until(deadline) => {
                    if waiting_for_body {
                        // As on the hyper path: the client is told before it is closed.
                        let error = ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            "body_timeout",
                            format!(
                                "no more of the request body arrived within {} ms",
                                timeouts.body.as_millis()
                            ),
                        );
                        let request_id = worker.new_request_id();
                        answer_error(stream, output, &error, &request_id, true).await;
                    }
                    return Next::Close;
                }
                _ = stop.changed(), if idle => return Next::Close,
            }
        }
    }
}

/// `target` with its path in normal form (the query as sent); `None` if the path is refused.
fn normal_target(target: &str) -> Option<Cow<'_, str>> {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    match moontide_gateway::path::normalize(path).ok()? {
        Cow::Borrowed(_) => Some(Cow::Borrowed(target)),
        Cow::Owned(mut normal) => {
            if let Some(query) = query {
                normal.push('?');
                normal.push_str(query);
            }
            Some(Cow::Owned(normal))
        }
    }
}

/// Routes a parsed request; proxies it if its route is a plain upstream route. The
/// answer closes the connection if the client asked (`client_close`) or the worker is
/// stopping by the time the answer is written.
#[allow(clippy::too_many_arguments)]
async fn proxy(
    worker: &Rc<Worker>,
    peer_ip: &Arc<str>,
    request: &FrontRequest<'_>,
    body: &[u8],
    client_close: bool,
    stop: &watch::Receiver<()>,
    stream: &mut TcpStream,
    exchange: &mut Exchange,
    output: &mut Vec<u8>,
) -> Next {
    let path = request.path();
    if !path.starts_with('/') || path.starts_with("/fn/") || path == "/healthz" || path == "/readyz"
    {
        return Next::ToHyper;
    }
    let Some(upstream) = route(worker, request) else {
        return Next::ToHyper;
    };
    let request_id = request
        .header("x-request-id")
        .filter(|given| is_sane_request_id(given));
    let new_id;
    let request_id = match request_id {
        Some(given) => given,
        None => {
            new_id = worker.new_request_id();
            &new_id[..]
        }
    };
    let downstream = Downstream {
        client_ip: peer_ip,
        scheme: "http",
        upgrade: None,
    };
    let forwarded = worker
        .upstreams()
        .forward(&upstream, request, body, &downstream, exchange)
        .await;
    let close = client_close || stop.has_changed().unwrap_or(true);
    let connection = match forwarded {
        Ok(connection) if exchange.head.status != 101 => connection,
        Ok(_) => {
            let error = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream",
                "the upstream switched protocols for a request that did not ask to",
            );
            return answer_error(stream, output, &error, request_id, close).await;
        }
        Err(error) => {
            let error = ApiError::new(error.status(), "upstream", error.message());
            return answer_error(stream, output, &error, request_id, close).await;
        }
    };
    let read_timeout = Duration::from_millis(upstream.config.read_timeout_ms);
    relay(
        stream,
        connection,
        exchange,
        output,
        request_id,
        close,
        read_timeout,
    )
    .await
}

/// The upstream of `request`'s route, when the route is a plain upstream route.
fn route(worker: &Worker, request: &FrontRequest<'_>) -> Option<Arc<Upstream>> {
    let snapshot = worker.current_snapshot();
    let host = request
        .header("host")
        .and_then(|host| std::str::from_utf8(host).ok());
    let found = snapshot
        .gateway
        .router
        .find(&moontide_gateway::router::Request {
            host,
            method: &request.method,
            path: request.path(),
            query: request.query(),
            headers: &HeaderLines(request.headers),
        })?;
    let route = found.value;
    match &route.target {
        RouteTarget::Upstream(name) if route.plugins.is_empty() => {
            snapshot.gateway.upstreams.get(name.as_str()).cloned()
        }
        _ => None,
    }
}

/// Writes a JSON error answer (as `ApiError::to_response` makes it) to the client.
async fn answer_error(
    stream: &mut TcpStream,
    output: &mut Vec<u8>,
    error: &ApiError,
    request_id: &[u8],
    close: bool,
) -> Next {
    let body = error.body();
    output.clear();
    put_status_line(
        output,
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or("").as_bytes(),
    );
    put_header(output, b"content-type", b"application/json");
    if error.status == StatusCode::SERVICE_UNAVAILABLE {
        put_header(output, b"retry-after", b"1");
    }
    let mut digits = [0; 20];
    put_header(
        output,
        b"content-length",
        format_usize(&mut digits, body.len()),
    );
    put_header(output, b"x-request-id", request_id);
    if close {
        put_header(output, b"connection", b"close");
    }
    output.extend_from_slice(b"\r\n");
    output.extend_from_slice(&body);
    match stream.write_all(output).await {
        Ok(()) if !close => Next::Again,
        _ => Next::Close,
    }
}

fn put_status_line(output: &mut Vec<u8>, status: u16, reason: &[u8]) {
    output.extend_from_slice(b"HTTP/1.1 ");
    let mut digits = [0; 20];
    output.extend_from_slice(format_usize(&mut digits, status as usize));
    output.push(b' ');
    output.extend_from_slice(reason);
    output.extend_from_slice(b"\r\n");
}

/// Where the relay of a response body is.
enum Relay {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

impl Relay {
    /// How much of `data` (the next bytes from the upstream) belongs to the body, and
    /// whether the body ends there.
    fn take(&mut self, data: &[u8]) -> Result<(usize, bool), ()> {
        match self {
            Relay::Length(remaining) => {
                let n = (*remaining).min(data.len() as u64);
                *remaining -= n;
                let done = *remaining == 0;
                if done {
                    *self = Relay::Done;
                }
                Ok((n as usize, done))
            }
            Relay::Chunked(decoder) => {
                let mut at = 0;
                loop {
                    match decoder.step(&data[at..]).map_err(|_| ())? {
                        ChunkStep::NeedMore => return Ok((data.len(), false)),
                        ChunkStep::Data { end, .. } => at += end,
                        ChunkStep::End { used } => {
                            *self = Relay::Done;
                            return Ok((at + used, true));
                        }
                    }
                }
            }
            Relay::UntilClose => Ok((data.len(), false)),
            Relay::Done => Ok((0, true)),
        }
    }
}

/// Sends the upstream's answer (head in `exchange`) to the client and relays its body;
/// gives the upstream connection back to its pool when the body was read to its end.
async fn relay(
    stream: &mut TcpStream,
    connection: Pooled,
    exchange: &mut Exchange,
    output: &mut Vec<u8>,
    request_id: &[u8],
    close: bool,
    read_timeout: Duration,
) -> Next {
    let head = &exchange.head;
    let raw = &exchange.response[..head.len];
    let mut relay = match head.framing {
        Framing::Empty => Relay::Done,
        Framing::Length(n) => Relay::Length(n),
        Framing::Chunked => Relay::Chunked(ChunkedDecoder::default()),
        Framing::UntilClose => Relay::UntilClose,
    };
    let close = close || matches!(relay, Relay::UntilClose);
    output.clear();
    put_status_line(output, head.status, &raw[head.reason.clone()]);
    for (name, value) in head.end_to_end(raw) {
        if !name.eq_ignore_ascii_case(b"x-request-id") {
            put_header(output, name, value);
        }
    }
    put_header(output, b"x-request-id", request_id);
    if matches!(relay, Relay::Chunked(_)) {
        // The body goes on as it came, so its codings do too (`gzip, chunked` stays so).
        for span in &head.headers {
            if raw[span.name.clone()].eq_ignore_ascii_case(b"transfer-encoding") {
                put_header(output, b"transfer-encoding", &raw[span.value.clone()]);
            }
        }
    }
    if close {
        put_header(output, b"connection", b"close");
    }
    output.extend_from_slice(b"\r\n");
    let keep_alive = head.keep_alive;
    let head_len = head.len;

    // The body bytes that came with the head.
    let Ok((taken, mut done)) = relay.take(&exchange.response[head_len..]) else {
        return Next::Close;
    };
    let leftover = exchange.response.len() - head_len - taken;
    let first = &exchange.response[head_len..head_len + taken];
    let written = if first.len() <= COALESCE_BODY {
        output.extend_from_slice(first);
        stream.write_all(output).await
    } else {
        match stream.write_all(output).await {
            Ok(()) => stream.write_all(first).await,
            Err(error) => Err(error),
        }
    };
    if written.is_err() {
        return Next::Close;
    }
    let mut connection = connection;
    let mut leftover = leftover;
    while !done {
        exchange.response.clear();
        let read = tokio::time::timeout(
            read_timeout,
            client::read_some(connection.stream(), &mut exchange.response),
        )
        .await;
        let n = match read {
            Ok(Ok(n)) => n,
            // A timeout or a broken upstream mid-body: the client's response cannot be
            // completed, so its connection closes too.
            _ => return Next::Close,
        };
        if n == 0 {
            if matches!(relay, Relay::UntilClose) {
                break;
            }
            return Next::Close;
        }
        let Ok((taken, end)) = relay.take(&exchange.response) else {
            return Next::Close;
        };
        done = end;
        leftover = exchange.response.len() - taken;
        if stream.write_all(&exchange.response[..taken]).await.is_err() {
            return Next::Close;
        }
    }
    connection.release(keep_alive && leftover == 0 && matches!(relay, Relay::Done));
    if close { Next::Close } else { Next::Again }
}

/// A client connection handed to hyper: the bytes the front read first, then the socket.
struct Rewind {
    read: BytesMut,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
