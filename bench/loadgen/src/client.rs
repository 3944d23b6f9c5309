//! A minimal HTTP/1.1 keep-alive client: one target (host, port, path), a pool of
//! connections that grows on demand up to a cap, one GET per call.
//!
//! Built for a single-threaded runtime (`Rc`/`RefCell`, tasks spawned with
//! `spawn_local`). A call holds a connection for the whole exchange, so a call that finds
//! every connection busy and the pool at its cap waits for one; the caller's timeout
//! covers that wait. A call cancelled mid-exchange (timeout) drops its connection, because
//! HTTP/1.1 cannot abandon one response and go on with the next.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Where the requests go: a plain `http://` URL, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value (`host:port` as written in the URL).
    pub host: String,
    pub path: String,
}

impl Target {
    /// Parses and resolves `http://host:port/path?query`.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL '{url}'"))?;
        if uri.scheme_str() != Some("http") {
            bail!("'{url}': only http:// URLs are supported");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("'{url}': no host"))?
            .clone();
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("cannot resolve '{}'", authority.host()))?
            .next()
            .with_context(|| format!("'{}' resolves to no address", authority.host()))?;
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        Ok(Target {
            addr,
            host: authority.as_str().to_string(),
            path,
        })
    }
}

/// The pool. Cheap to share as `Rc<Pool>`.
pub struct Pool {
    target: Target,
    idle: RefCell<Vec<SendRequest<Empty<Bytes>>>>,
    /// One permit per connection in use; `max` permits in all.
    in_use: Semaphore,
    open: Rc<Cell<usize>>,
    peak_open: Cell<usize>,
    opened: Cell<u64>,
}

/// Connection counts for the summary.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PoolStats {
    /// Connections opened over the run.
    pub opened: u64,
    /// Most connections open at once.
    pub peak_open: usize,
}

impl Pool {
    pub fn new(target: Target, max_connections: usize) -> Pool {
        Pool {
            target,
            idle: RefCell::new(Vec::new()),
            in_use: Semaphore::new(max_connections.max(1)),
            open: Rc::new(Cell::new(0)),
            peak_open: Cell::new(0),
            opened: Cell::new(0),
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            opened: self.opened.get(),
            peak_open: self.peak_open.get(),
        }
    }

    /// Opens one connection and parks it in the pool (a reachability check that sends
    /// no request).
    pub async fn warm(&self) -> anyhow::Result<()> {
        let sender = self.connect().await?;
        self.idle.borrow_mut().push(sender);
        Ok(())
    }

    /// One GET of the target path; the status and the whole body.
    pub async fn get(&self) -> anyhow::Result<(StatusCode, Bytes)> {
        let _permit = self.in_use.acquire().await.context("pool closed")?;
        let mut sender = self.checkout().await?;
        let request = Request::get(self.target.path.as_str())
            .header(header::HOST, self.target.host.as_str())
            .body(Empty::<Bytes>::new())
            .context("building the request")?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !sender.is_closed() {
            self.idle.borrow_mut().push(sender);
        }
        Ok((status, body))
    }

    /// A ready connection: an idle one if any still works, else a new one.
    async fn checkout(&self) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        loop {
            let Some(mut sender) = self.idle.borrow_mut().pop() else {
                break;
            };
            if sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        let stream = TcpStream::connect(self.target.addr)
            .await
            .with_context(|| format!("connecting to {}", self.target.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        self.opened.set(self.opened.get() + 1);
        let open = Rc::clone(&self.open);
        open.set(open.get() + 1);
        self.peak_open.set(self.peak_open.get().max(open.get()));
        tokio::task::spawn_local(async move {
            // Ends when the server closes, or when the last `SendRequest` is dropped.
            let _ = connection.await;
            open.set(open.get() - 1);
        });
        Ok(sender)
    }
}
