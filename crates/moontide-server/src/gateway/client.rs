//! The gateway's HTTP/1.1 client for upstream nodes: keep-alive connections pooled per
//! node on each worker thread, one exchange per request (the head and body written in one
//! `write`, the response head read and parsed), and the response body read by its framing
//! either as an `http_body::Body` ([`UpstreamBody`], for responses hyper sends on) or by the
//! data plane's own relay.
//!
//! Why not hyper's client: `hyper_util`'s pooled client sends every request through a
//! channel to a task per connection and back (pool checkout, an mpsc hop, a oneshot, a
//! body channel) — measured at a third of the proxy's user time (BENCHMARKS.md,
//! "Gateway"). A proxy owns both ends, so a pooled `TcpStream` read and written on the
//! request's own task is all it needs, as in nginx's upstream module.
//!
//! - **Pool** ([`NodePool`]): idle connections of one node, most recently used first (so
//!   the rest age out), at most `keepalive.max_idle`, none older than
//!   `keepalive.idle_timeout`. A connection is checked out only if it has seen neither
//!   bytes nor a close while idle; tokio's readiness makes that check free unless the
//!   node did send something.
//! - **Reuse**: a connection goes back to the pool only when its response was read to the
//!   end, nothing followed it, and neither side asked to close.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::http1::{ChunkStep, ChunkedDecoder, Framing, FramingError, ResponseHead};

/// Bytes asked of the kernel per read (grown to this when a buffer runs low).
const READ_CHUNK: usize = 16 * 1024;

/// Idle keep-alive connections to one node, on one worker thread.
pub struct NodePool {
    idle: RefCell<Vec<IdleConnection>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct IdleConnection {
    stream: TcpStream,
    since: Instant,
}

impl NodePool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Rc<NodePool> {
        Rc::new(NodePool {
            idle: RefCell::new(Vec::new()),
            max_idle,
            idle_timeout,
        })
    }

    /// The most recently used idle connection that is still open and quiet.
    fn checkout(&self, now: Instant) -> Option<TcpStream> {
        let mut idle = self.idle.borrow_mut();
        while let Some(connection) = idle.pop() {
            if now.saturating_duration_since(connection.since) >= self.idle_timeout {
                // The rest were put back earlier still.
                idle.clear();
                return None;
            }
            if is_quiet(&connection.stream) {
                return Some(connection.stream);
            }
        }
        None
    }

    fn checkin(&self, stream: TcpStream, now: Instant) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.max_idle {
            idle.push(IdleConnection { stream, since: now });
        }
    }

    /// Closes the connections idle for longer than the timeout.
    pub fn sweep(&self, now: Instant) {
        self.idle
            .borrow_mut()
            .retain(|c| now.saturating_duration_since(c.since) < self.idle_timeout);
    }
}

/// Whether an idle connection has seen neither data nor a close. After a response read
/// to its end the socket is known drained, so this makes no system call unless the node
/// sent something since.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// A connection taken from a node's pool (or new), given back with [`Pooled::release`].
pub struct Pooled {
    stream: Option<TcpStream>,
    pool: Rc<NodePool>,
    /// It came from the pool (so it may have been closed by the node meanwhile).
    pub reused: bool,
}

impl Pooled {
    pub fn stream(&mut self) -> &mut TcpStream {
        self.stream
            .as_mut()
            .expect("a pooled connection is used only until released")
    }

    /// Puts the connection back for the next request if `reusable`; else closes it.
    pub fn release(mut self, reusable: bool) {
        if let Some(stream) = self.stream.take()
            && reusable
        {
            self.pool.checkin(stream, Instant::now());
        }
    }

    /// Takes the stream out of the pool's care (an upgraded connection).
    pub fn into_stream(mut self) -> TcpStream {
        self.stream
            .take()
            .expect("a pooled connection is used only until released")
    }
}

/// Takes an idle connection of `pool`, or connects to `address` within `timeout`.
pub async fn connection(
    pool: &Rc<NodePool>,
    address: &str,
    timeout: Duration,
) -> io::Result<Pooled> {
    if let Some(stream) = pool.checkout(Instant::now()) {
        return Ok(Pooled {
            stream: Some(stream),
            pool: pool.clone(),
            reused: true,
        });
    }
    let stream = connect(address, timeout).await?;
    Ok(Pooled {
        stream: Some(stream),
        pool: pool.clone(),
        reused: false,
    })
}

/// Opens a TCP connection to `address` (`ip:port`, or `host:port`, resolved by the
/// system's resolver) within `timeout`, with Nagle off.
pub async fn connect(address: &str, timeout: Duration) -> io::Result<TcpStream> {
    let connecting = async {
        match address.parse::<SocketAddr>() {
            Ok(socket) => TcpStream::connect(socket).await,
            Err(_) => TcpStream::connect(address).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Why an exchange got no response head.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection failed or closed; `answered`: some of the response had arrived.
    #[error("{error}")]
    Io { error: io::Error, answered: bool },
    /// The node's answer is not HTTP/1.1 the proxy can frame.
    #[error("{0}")]
    Framing(#[from] FramingError),
}

impl ExchangeError {
    /// The connection closed (or reset) before any of the response came: on a reused
    /// connection, the node most likely closed it while it was idle.
    pub fn closed_before_answer(&self) -> bool {
        matches!(
            self,
            ExchangeError::Io {
                answered: false,
                ..
            }
        )
    }
}

/// Reads once from `stream` into `buffer`'s spare room (grown as needed). `Ok(0)`: the
/// peer closed.
pub async fn read_some(stream: &mut TcpStream, buffer: &mut BytesMut) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    if buffer.capacity() - buffer.len() < READ_CHUNK / 4 {
        buffer.reserve(READ_CHUNK);
    }
    stream.read_buf(buffer).await
}

/// Writes `request` (head and body) and reads the response head into `head`, skipping
/// interim `1xx` answers other than `101`. On return `buffer` starts with the final head
/// (`head.len` bytes), followed by whatever of the body has arrived.
pub async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buffer: &mut BytesMut,
    head: &mut ResponseHead,
    head_request: bool,
) -> Result<(), ExchangeError> {
    stream
        .write_all(request)
        .await
        .map_err(|error| ExchangeError::Io {
            error,
            answered: false,
        })?;
    buffer.clear();
    loop {
        if !buffer.is_empty() && head.parse(buffer, head_request)? {
            if (100..200).contains(&head.status) && head.status != 101 {
                buffer.advance(head.len);
                continue;
            }
            return Ok(());
        }
        let answered = !buffer.is_empty();
        match read_some(stream, buffer).await {
            Ok(0) => {
                return Err(ExchangeError::Io {
                    error: io::ErrorKind::UnexpectedEof.into(),
                    answered,
                });
            }
            Ok(_) => {}
            Err(error) => return Err(ExchangeError::Io { error, answered }),
        }
    }
}

/// The response to hand to hyper: status and end-to-end headers of `head` (whose bytes
/// start `buffer`), with a body that reads the rest from `connection`. A `101` keeps its
/// `Upgrade` and gets `Connection: upgrade`; its body is empty and the connection is
/// taken with [`UpstreamBody::take_upgraded`].
pub fn into_response(
    mut buffer: BytesMut,
    head: &ResponseHead,
    connection: Pooled,
    read_timeout: Duration,
) -> Response<UpstreamBody> {
    let raw = &buffer[..head.len];
    let mut headers = HeaderMap::with_capacity(head.headers.len() + 2);
    for (name, value) in head.end_to_end(raw) {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let switched = head.status == 101;
    if switched {
        if let Some(protocol) = head
            .header(raw, "upgrade")
            .and_then(|v| HeaderValue::from_bytes(v).ok())
        {
            headers.insert(http::header::UPGRADE, protocol);
        }
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    let status = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    buffer.advance(head.len);
    let state = if switched {
        BodyState::Upgraded
    } else {
        match head.framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => BodyState::UntilClose,
        }
    };
    let mut body = UpstreamBody {
        connection: Some(connection),
        buffer,
        state,
        keep_alive: head.keep_alive,
        read_timeout,
        timer: None,
    };
    if matches!(body.state, BodyState::Done) {
        body.finish();
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Where an upstream body is.
enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    /// A `101`: the connection belongs to the upgrade.
    Upgraded,
    Done,
}

/// An upstream response's body, read from its connection as hyper asks for it, with
/// `read_timeout` as the longest wait for each next piece (nginx's
/// `proxy_read_timeout`). Read to its end, the connection goes back to its pool; dropped
/// before, it is closed.
pub struct UpstreamBody {
    connection: Option<Pooled>,
    buffer: BytesMut,
    state: BodyState,
    keep_alive: bool,
    read_timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl UpstreamBody {
    /// The connection of a `101` answer and the bytes the node sent after its head.
    pub fn take_upgraded(&mut self) -> Option<(TcpStream, Bytes)> {
        if !matches!(self.state, BodyState::Upgraded) {
            return None;
        }
        self.state = BodyState::Done;
        let stream = self.connection.take()?.into_stream();
        Some((stream, std::mem::take(&mut self.buffer).freeze()))
    }

    /// The body ended: the connection is reused if nothing is left over.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        self.timer = None;
        if let Some(connection) = self.connection.take() {
            connection.release(self.keep_alive && self.buffer.is_empty());
        }
    }

    /// Body bytes already buffered, as the next frame (or `None` when none is ready).
    fn buffered_frame(&mut self) -> Result<Option<Bytes>, io::Error> {
        loop {
            if self.buffer.is_empty() {
                return Ok(None);
            }
            match &mut self.state {
                BodyState::Length(remaining) => {
                    let n = (*remaining).min(self.buffer.len() as u64) as usize;
                    let data = self.buffer.split_to(n).freeze();
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.finish();
                    }
                    return Ok(Some(data));
                }
                BodyState::Chunked(decoder) => match decoder.step(&self.buffer) {
                    Ok(ChunkStep::NeedMore) => self.buffer.clear(),
                    Ok(ChunkStep::Data { start, end }) => {
                        self.buffer.advance(start);
                        return Ok(Some(self.buffer.split_to(end - start).freeze()));
                    }
                    Ok(ChunkStep::End { used }) => {
                        self.buffer.advance(used);
                        self.finish();
                        return Ok(None);
                    }
                    Err(error) => return Err(io::Error::new(io::ErrorKind::InvalidData, error)),
                },
                BodyState::UntilClose => return Ok(Some(self.buffer.split().freeze())),
                BodyState::Upgraded | BodyState::Done => return Ok(None),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.buffered_frame()? {
                this.timer = None;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if matches!(this.state, BodyState::Done | BodyState::Upgraded) {
                return Poll::Ready(None);
            }
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            if this.buffer.capacity() - this.buffer.len() < READ_CHUNK / 4 {
                this.buffer.reserve(READ_CHUNK);
            }
            let read =
                tokio_util::io::poll_read_buf(Pin::new(connection.stream()), cx, &mut this.buffer);
            match read {
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, BodyState::UntilClose) {
                        this.keep_alive = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                    this.connection = None;
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the body's end",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => {
                    this.connection = None;
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Pending => {
                    let timeout = this.read_timeout;
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(timer.as_mut().poll(cx));
                    this.connection = None;
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the upstream sent no more of the body within the read timeout",
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done | BodyState::Upgraded)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done | BodyState::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
