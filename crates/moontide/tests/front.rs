//! The data plane's HTTP/1.1 front (`moontide-server/src/front.rs`) over real loopback
//! sockets, seen byte for byte: the client is a raw TCP connection writing exact request
//! bytes and parsing exact responses, and most backends are raw TCP servers answering
//! with exact bytes (pieces written with pauses between them), so that framing mistakes —
//! a body cut short or run on, a chunked end missed, a connection kept or closed when it
//! should not be, a hop-by-hop header passed on — show.
//!
//! Every node runs one worker (`--workers 1`), so that "one upstream connection" is exact.

mod common;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Node;
use common::raw_http::{Conn, Request, Response, WAIT, find, header};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout};

/// Pause between the pieces a backend (or client) writes, so that they arrive apart.
const PIECE_PAUSE: Duration = Duration::from_millis(15);

// ---------------------------------------------------------------------------------------
// Raw backends.
// ---------------------------------------------------------------------------------------

type Seen = Arc<Mutex<Vec<Request>>>;

/// A raw TCP backend: its address, the connections it accepted, the requests it read.
struct Backend {
    address: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: Seen,
}

impl Backend {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

/// Starts a backend running `handler` on each accepted connection (with its index, from
/// 0, and where to record requests).
async fn backend<F, Fut>(handler: F) -> Backend
where
    F: Fn(Conn, usize, Seen) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen: Seen = Arc::default();
    let (counter, record) = (accepted.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let index = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(Conn::new(stream), index, record.clone()));
        }
    });
    Backend {
        address,
        accepted,
        seen,
    }
}

/// What a backend writes for a request: pieces, written with [`PIECE_PAUSE`] between.
type Answer = fn(&Request) -> Vec<Vec<u8>>;

/// A keep-alive backend answering every request on a connection with `answer`.
async fn keep_alive_backend(answer: Answer) -> Backend {
    backend(move |conn, _, seen| serve_requests(conn, seen, answer)).await
}

/// Answers requests on `conn` until the peer closes.
async fn serve_requests(mut conn: Conn, seen: Seen, answer: Answer) {
    while let Ok(Some(request)) = conn.request().await {
        let pieces = answer(&request);
        seen.lock().unwrap().push(request);
        if write_pieces(&mut conn.stream, &pieces).await.is_err() {
            return;
        }
    }
}

async fn write_pieces(stream: &mut TcpStream, pieces: &[Vec<u8>]) -> io::Result<()> {
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            sleep(PIECE_PAUSE).await;
        }
        stream.write_all(piece).await?;
    }
    Ok(())
}

/// A `200` with a `Content-Length` body, in one piece.
fn ok(body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// `len` bytes that do not repeat with any short period (so that a lost, doubled or
/// reordered piece shows).
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 997 + seed) % 251) as u8)
        .collect()
}

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------
// The node.
// ---------------------------------------------------------------------------------------

/// A one-worker node.
fn node() -> Node {
    Node::start_with(&["--workers", "1"])
}

/// Makes upstream `name` (one node, `address`, plus the fields of `extra`) and the
/// route `/{name}/*` to it.
async fn route_to(node: &Node, name: &str, address: SocketAddr, extra: Value) {
    let mut upstream = json!({"nodes": [{"address": address.to_string()}]});
    if let Value::Object(extra) = extra {
        for (field, value) in extra {
            upstream[field.as_str()] = value;
        }
    }
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            &format!("/v1/upstreams/{name}"),
            Some(upstream),
        )
        .await;
    assert!(matches!(status, 200 | 201), "upstream {name}: {body}");
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            &format!("/v1/routes/{name}"),
            Some(json!({"path": format!("/{name}/*"), "upstream": name})),
        )
        .await;
    assert!(matches!(status, 200 | 201), "route {name}: {body}");
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: front.test\r\n\r\n")
}

fn is_new_request_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------

/// Catches: a `Content-Length` body cut at the first read or at 16 KiB (the coalescing
/// limit), run on, or reordered; the upstream's own `x-request-id` passed on (or doubled);
/// a client's id not echoed, an insane one echoed, or no id made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_bodies_arrive_exact_with_a_request_id() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        if request.target == "/t/big" {
            let body = pattern(200 * 1024, 1);
            let mut first = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                  x-request-id: from-upstream\r\ncontent-length: 204800\r\n\r\n"
                .to_vec();
            first.extend_from_slice(&body[..1000]);
            let mut pieces = vec![first];
            pieces.extend(body[1000..].chunks(40 * 1024).map(<[u8]>::to_vec));
            pieces
        } else {
            vec![ok(b"small")]
        }
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client
        .send("GET /t/big HTTP/1.1\r\nHost: front.test\r\nX-Request-Id: client-id-42\r\n\r\n")
        .await;
    let response = client.proxied().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("204800"));
    assert_eq!(response.body.len(), 200 * 1024);
    assert!(
        response.body == pattern(200 * 1024, 1),
        "the 200 KiB body differs"
    );
    assert_eq!(response.all("x-request-id"), ["client-id-42"]);

    client.send(get("/t/small")).await;
    let response = client.proxied().await;
    assert_eq!(response.text(), "small");
    let ids = response.all("x-request-id");
    assert_eq!(ids.len(), 1, "{:?}", response.headers);
    assert!(is_new_request_id(ids[0]), "{ids:?}");
    let first_new = ids[0].to_string();

    // An id with a space in it is not sane: a new one is made.
    client
        .send("GET /t/small HTTP/1.1\r\nHost: front.test\r\nX-Request-Id: bad id\r\n\r\n")
        .await;
    let response = client.proxied().await;
    let ids = response.all("x-request-id");
    assert_eq!(ids.len(), 1, "{:?}", response.headers);
    assert!(is_new_request_id(ids[0]), "{ids:?}");
    assert_ne!(ids[0], first_new, "each request gets its own id");

    client.send(get("/t/big")).await;
    let response = client.proxied().await;
    assert!(response.body == pattern(200 * 1024, 1));
    let ids = response.all("x-request-id");
    assert!(ids.len() == 1 && is_new_request_id(ids[0]), "{ids:?}");
    client.expect_quiet().await;
}

/// Catches: a chunked body whose end the decoder misses (the client waits forever, or
/// the trailer and final CRLF are lost or leak into the next response), extensions or
/// trailers mangled, the upstream connection not reused after a chunked body, and the
/// client connection not kept after one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_is_relayed_and_the_connection_kept() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        if request.target != "/t/chunked" {
            return vec![ok(b"after")];
        }
        let big = pattern(20_000, 2);
        let mut third = b"4E20\r\n".to_vec();
        third.extend_from_slice(&big);
        third.extend_from_slice(b"\r\n");
        vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\
              content-type: text/plain\r\n\r\n5\r\nhel"
                .to_vec(),
            b"lo\r\n7;ext=\"v\"\r\n, world\r".to_vec(),
            b"\n".to_vec(),
            third,
            b"0\r\nX-Checksum: 1234\r".to_vec(),
            b"\n\r\n".to_vec(),
        ]
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client.send(get("/t/chunked")).await;
    let response = client.proxied().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.header("content-length"), None);
    let mut expected = b"hello, world".to_vec();
    expected.extend_from_slice(&pattern(20_000, 2));
    assert!(
        response.body == expected,
        "decoded body differs: {} bytes",
        response.body.len()
    );
    // Relayed as it came: the extension and the trailer are still there.
    assert!(
        find(&response.wire_body, b"7;ext=\"v\"\r\n").is_some(),
        "{:?}",
        String::from_utf8_lossy(&response.wire_body[..40])
    );
    assert_eq!(
        response.trailers,
        [("x-checksum".to_string(), "1234".to_string())]
    );

    // Keep-alive after a chunked body, on both sides.
    client.send(get("/t/after")).await;
    let response = client.proxied().await;
    assert_eq!((response.status, response.text().as_str()), (200, "after"));
    client.send(get("/t/chunked")).await;
    assert!(client.proxied().await.body == expected);
    client.expect_quiet().await;
    assert_eq!(
        backend.accepted(),
        1,
        "the upstream connection is reused once the chunked body's end is found"
    );
}

/// Catches: a close-delimited body cut short (e.g. relayed only up to the first read) or
/// a client connection left open after one (the client could never find the body's end),
/// and a missing `connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_response_is_relayed_then_the_connection_closes() {
    let body = pattern(50_000, 3);
    let backend = backend(|mut conn, _, seen| async move {
        let Ok(Some(request)) = conn.request().await else {
            return;
        };
        seen.lock().unwrap().push(request);
        let body = pattern(50_000, 3);
        let mut first = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec();
        first.extend_from_slice(&body[..100]);
        let pieces = [first, body[100..30_000].to_vec(), body[30_000..].to_vec()];
        let _ = write_pieces(&mut conn.stream, &pieces).await;
        let _ = conn.stream.shutdown().await;
    })
    .await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client.send(get("/t/stream")).await;
    // The body runs until the front closes: `response` waits for the close.
    let response = client.proxied().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.header("content-length"), None);
    assert_eq!(response.header("transfer-encoding"), None);
    assert_eq!(response.body.len(), body.len());
    assert!(response.body == body, "the close-delimited body differs");
    // A further request gets nothing: the connection is closed.
    let _ = client.stream.write_all(get("/t/stream").as_bytes()).await;
    client.expect_closed().await;
}

/// Catches: a HEAD response waited on (or relayed) as if it had the body its
/// `Content-Length` announces, the length header dropped, and bodiless 204/304 answers
/// mis-framed — each would hang or corrupt the next response on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_bodiless_responses_have_no_body() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1234\r\n\r\n";
        match (request.method.as_str(), request.target.as_str()) {
            ("HEAD", _) => vec![head.to_vec()],
            (_, "/t/empty") => vec![b"HTTP/1.1 204 No Content\r\nx-kind: empty\r\n\r\n".to_vec()],
            (_, "/t/same") => {
                vec![b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n".to_vec()]
            }
            _ => {
                let mut out = head.to_vec();
                out.extend_from_slice(&pattern(1234, 4));
                vec![out]
            }
        }
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client
        .send("HEAD /t/doc HTTP/1.1\r\nHost: front.test\r\n\r\n")
        .await;
    let response = client.proxied_head().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("1234"));
    client.expect_quiet().await;

    client.send(get("/t/doc")).await;
    let response = client.proxied().await;
    assert!(response.body == pattern(1234, 4));

    // The same, and the bodiless statuses, pipelined.
    client
        .send(format!(
            "HEAD /t/doc HTTP/1.1\r\nHost: front.test\r\n\r\n{}{}{}{}",
            get("/t/empty"),
            get("/t/doc"),
            get("/t/same"),
            get("/t/doc")
        ))
        .await;
    let response = client.proxied_head().await;
    assert_eq!(
        (response.status, response.header("content-length")),
        (200, Some("1234"))
    );
    let response = client.proxied().await;
    assert_eq!(
        (response.status, response.header("x-kind")),
        (204, Some("empty"))
    );
    assert!(client.proxied().await.body == pattern(1234, 4));
    let response = client.proxied().await;
    assert_eq!(
        (response.status, response.header("etag")),
        (304, Some("\"v1\""))
    );
    assert!(client.proxied().await.body == pattern(1234, 4));
    client.expect_quiet().await;
    assert_eq!(backend.accepted(), 1);
}

/// Catches: a request body proxied before all of it arrived (or with bytes lost between
/// reads), the wrong `Content-Length` upstream, the read buffer advanced by the wrong
/// amount after a body (breaking the next request), a head split across reads misparsed,
/// and an interim `100 Continue` from the upstream passed to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_reaches_the_upstream_exact() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        let summary = format!("{} {:016x}", request.body.len(), fnv(&request.body));
        vec![
            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
            ok(summary.as_bytes()),
        ]
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    let body = pattern(100_000, 5);
    let mut first =
        b"POST /t/upload HTTP/1.1\r\nHost: front.test\r\nContent-Type: application/octet-stream\r\n\
          Content-Length: 100000\r\n\r\n"
            .to_vec();
    first.extend_from_slice(&body[..30_000]);
    client.send(&first).await;
    sleep(Duration::from_millis(150)).await;
    client.send(&body[30_000..]).await;
    let response = client.proxied().await;
    assert_eq!(
        response.status, 200,
        "no interim response reaches the client"
    );
    assert_eq!(response.text(), format!("100000 {:016x}", fnv(&body)));
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let upload = &seen[0];
    assert_eq!(
        (upload.method.as_str(), upload.target.as_str()),
        ("POST", "/t/upload")
    );
    let lengths: Vec<&str> = upload
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(lengths, ["100000"]);
    assert_eq!(
        upload.header("content-type"),
        Some("application/octet-stream")
    );

    // A head split mid-line and a body in two more writes, on the same connection.
    client
        .send("POST /t/upload HTTP/1.1\r\nHost: front.test\r\nConte")
        .await;
    sleep(Duration::from_millis(50)).await;
    client.send("nt-Length: 3\r\n\r\nab").await;
    sleep(Duration::from_millis(50)).await;
    client.send("c").await;
    let response = client.proxied().await;
    assert_eq!(response.text(), format!("3 {:016x}", fnv(b"abc")));
    client.expect_quiet().await;
}

/// Catches: pipelined requests lost, answered out of order, or answered with bytes of the
/// next one's response (the read buffer not advanced right), across the three framings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_get_their_responses_in_order() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        match request.target.as_str() {
            "/t/one" => vec![ok(b"one")],
            "/t/two" => vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nt\r\n".to_vec(),
                b"2\r\nwo\r\n0\r\n\r\n".to_vec(),
            ],
            _ => vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nth".to_vec(),
                b"ree".to_vec(),
            ],
        }
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client
        .send(format!(
            "{}{}GET /t/three HTTP/1.1\r\nHost: front.test\r\nX-Request-Id: third\r\n\r\n",
            get("/t/one"),
            get("/t/two")
        ))
        .await;
    let bodies = [
        client.proxied().await,
        client.proxied().await,
        client.proxied().await,
    ];
    let texts: Vec<String> = bodies.iter().map(Response::text).collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert_eq!(bodies[2].header("x-request-id"), Some("third"));
    client.expect_quiet().await;
    let targets: Vec<String> = backend.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/t/one", "/t/two", "/t/three"]);
}

/// Catches: the handover to hyper losing or duplicating the bytes the front had read (a
/// request after a proxied one, or a chunked upload whose start the front read), and
/// hyper not serving functions, `/fn/`, probes and proxying on the handed-over connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_handed_to_hyper_with_what_was_read() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        let text = format!(
            "{} {} body={}",
            request.method,
            request.target,
            String::from_utf8_lossy(&request.body)
        );
        vec![ok(text.as_bytes())]
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    node.deploy(
        "hi",
        "return function(event, ctx) return \"hi\" end",
        json!({}),
    )
    .await;
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            "/v1/routes/fr",
            Some(json!({"path": "/fr", "function": "hi"})),
        )
        .await;
    assert!(matches!(status, 200 | 201), "{body}");

    let mut client = Conn::to(&node).await;
    client.send(get("/t/a")).await;
    assert_eq!(client.proxied().await.text(), "GET /t/a body=");
    client.send(get("/fr")).await;
    let response = client.response().await;
    assert_eq!((response.status, response.text().as_str()), (200, "hi"));
    client.send(get("/fn/hi")).await;
    let response = client.response().await;
    assert_eq!((response.status, response.text().as_str()), (200, "hi"));
    assert!(response.header("x-request-id").is_some());
    client.send(get("/healthz")).await;
    let response = client.response().await;
    assert_eq!((response.status, response.text().as_str()), (200, "ok\n"));
    // Proxying again, now by hyper: the connection is hyper's for the rest of its life.
    client.send(get("/t/b")).await;
    let response = client.response().await;
    assert_eq!(response.text(), "GET /t/b body=");
    assert!(!response.served_by_front(), "{response:?}");
    assert!(response.header("x-request-id").is_some());
    client.expect_quiet().await;

    // A proxied request and the start of a chunked upload in one write: the front
    // proxies the first and hands the connection over with the upload's first bytes.
    let mut client = Conn::to(&node).await;
    client
        .send(format!(
            "{}POST /t/c HTTP/1.1\r\nHost: front.test\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n",
            get("/t/a")
        ))
        .await;
    assert_eq!(client.proxied().await.text(), "GET /t/a body=");
    sleep(Duration::from_millis(100)).await;
    client
        .send(format!("6\r\n world\r\n0\r\n\r\n{}", get("/fn/hi")))
        .await;
    let response = client.response().await;
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "POST /t/c body=hello world")
    );
    assert!(!response.served_by_front(), "{response:?}");
    assert_eq!(client.response().await.text(), "hi");
    client.expect_quiet().await;
}

/// Catches: upstream connections not pooled (one per request, or per client connection),
/// and hop-by-hop headers passed on either way: the client's `Connection`-named header,
/// `Keep-Alive`, `TE`, `Proxy-Authorization` upstream; the backend's `Connection`-named
/// header, `Keep-Alive`, `Proxy-Authenticate`, `Upgrade`, `Connection` to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_hop_by_hop_headers_dropped() {
    fn answer(_: &Request) -> Vec<Vec<u8>> {
        vec![
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Backend-Hop\r\nX-Backend-Hop: secret\r\n\
              Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\n\
              X-End: kept\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        ]
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client
        .send(
            "GET /t/0 HTTP/1.1\r\nHost: front.test\r\nConnection: X-Secret, keep-alive\r\n\
             X-Secret: v\r\nKeep-Alive: timeout=1\r\nTE: trailers\r\n\
             Proxy-Authorization: Basic Zm9v\r\nX-Normal: yes\r\n\r\n",
        )
        .await;
    let response = client.proxied().await;
    assert_eq!((response.status, response.text().as_str()), (200, "ok"));
    for hop in [
        "x-backend-hop",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
        "connection",
        "transfer-encoding",
    ] {
        assert_eq!(
            response.header(hop),
            None,
            "{hop} reached the client: {:?}",
            response.headers
        );
    }
    assert_eq!(response.header("x-end"), Some("kept"));
    assert_eq!(response.header("content-length"), Some("2"));
    let upstream = &backend.seen()[0];
    for hop in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert_eq!(
            upstream.header(hop),
            None,
            "{hop} reached the upstream: {:?}",
            upstream.headers
        );
    }
    assert_eq!(upstream.header("x-normal"), Some("yes"));

    // 49 more: 24 on this connection, 25 on new client connections.
    for i in 1..25 {
        client.send(get(&format!("/t/{i}"))).await;
        assert_eq!(client.proxied().await.text(), "ok");
    }
    for i in 25..50 {
        let mut other = Conn::to(&node).await;
        other.send(get(&format!("/t/{i}"))).await;
        assert_eq!(other.proxied().await.text(), "ok");
    }
    assert_eq!(backend.seen().len(), 50);
    assert_eq!(
        backend.accepted(),
        1,
        "50 sequential requests share one keep-alive upstream connection"
    );
}

/// Catches: a pooled connection the node closed being used anyway and its failure
/// answered as a 502, both when the close came while it was idle and when it raced the
/// request (the node read the request, then closed without answering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pooled_connection_is_replaced() {
    // Closes its first connection 50 ms after answering the first request on it.
    let closes_idle = backend(|mut conn, index, seen| async move {
        if index > 0 {
            return serve_requests(conn, seen, |_| vec![ok(b"fresh")]).await;
        }
        if let Ok(Some(request)) = conn.request().await {
            seen.lock().unwrap().push(request);
            let _ = conn.stream.write_all(&ok(b"first")).await;
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Reads the second request on its first connection, then closes without an answer.
    let closes_racing = backend(|mut conn, index, seen| async move {
        if index > 0 {
            return serve_requests(conn, seen, |_| vec![ok(b"fresh")]).await;
        }
        if let Ok(Some(request)) = conn.request().await {
            seen.lock().unwrap().push(request);
            let _ = conn.stream.write_all(&ok(b"first")).await;
            let _ = conn.request().await;
        }
    })
    .await;
    let node = node();
    route_to(&node, "idle", closes_idle.address, json!({})).await;
    route_to(&node, "race", closes_racing.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client.send(get("/idle/1")).await;
    assert_eq!(client.proxied().await.text(), "first");
    sleep(Duration::from_millis(300)).await;
    client.send(get("/idle/2")).await;
    let response = client.proxied().await;
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "fresh"),
        "{response:?}"
    );
    assert_eq!(closes_idle.accepted(), 2);

    client.send(get("/race/1")).await;
    assert_eq!(client.proxied().await.text(), "first");
    client.send(get("/race/2")).await;
    let response = client.proxied().await;
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "fresh"),
        "{response:?}"
    );
    assert_eq!(closes_racing.accepted(), 2);
    client.expect_quiet().await;
}

/// Catches: a client left hanging on a body the upstream stopped sending (no read timeout
/// mid-body, or the connection kept open after it), and the stalled upstream connection
/// given back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stalling_mid_body_closes_the_client_connection() {
    let backend = backend(|mut conn, index, seen| async move {
        if index > 0 {
            return serve_requests(conn, seen, |_| vec![ok(b"fine")]).await;
        }
        if let Ok(Some(request)) = conn.request().await {
            seen.lock().unwrap().push(request);
            let mut out = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n".to_vec();
            out.extend_from_slice(&pattern(50_000, 6));
            let _ = conn.stream.write_all(&out).await;
            // Stall, holding the connection open.
            sleep(Duration::from_secs(20)).await;
        }
    })
    .await;
    let node = node();
    route_to(
        &node,
        "t",
        backend.address,
        json!({"timeouts": {"read": "300ms"}}),
    )
    .await;
    let mut client = Conn::to(&node).await;

    client.send(get("/t/stall")).await;
    let (status_line, headers) = timeout(WAIT, client.head())
        .await
        .expect("a response head within the wait")
        .expect("a response head")
        .expect("a response head");
    assert_eq!(status_line, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "content-length"), Some("100000"));
    assert_eq!(header(&headers, "date"), None, "the front serves it");
    let read = timeout(WAIT, client.exact(100_000))
        .await
        .expect("the client connection closes instead of hanging");
    let error = read.expect_err("the body cannot be complete");
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    assert_eq!(client.buf.len(), 50_000, "the half that was sent arrives");

    let mut client = Conn::to(&node).await;
    client.send(get("/t/next")).await;
    let response = client.proxied().await;
    assert_eq!((response.status, response.text().as_str()), (200, "fine"));
    assert_eq!(
        backend.accepted(),
        2,
        "the stalled connection is not reused"
    );
}

/// Catches: a client's `Connection: close` ignored (no `connection: close`, connection
/// left open) or passed upstream (closing the pooled upstream connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_close_is_honoured() {
    let backend = keep_alive_backend(|_| vec![ok(b"bye")]).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client
        .send("GET /t/x HTTP/1.1\r\nHost: front.test\r\nConnection: close\r\n\r\n")
        .await;
    let response = client.proxied().await;
    assert_eq!((response.status, response.text().as_str()), (200, "bye"));
    assert_eq!(response.header("connection"), Some("close"));
    client.expect_closed().await;
    assert_eq!(backend.seen()[0].header("connection"), None);

    // The upstream connection stayed pooled; a keep-alive client gets no close.
    let mut client = Conn::to(&node).await;
    client.send(get("/t/y")).await;
    let response = client.proxied().await;
    assert_eq!(response.text(), "bye");
    assert_eq!(response.header("connection"), None);
    client.send(get("/t/z")).await;
    assert_eq!(client.proxied().await.text(), "bye");
    client.expect_quiet().await;
    assert_eq!(backend.accepted(), 1);
}

/// Catches: a `101` to a request that did not ask to upgrade relayed to the client (or
/// its connection bridged), instead of a JSON 502; and the client connection lost after
/// such an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_switching_protocols_is_a_502() {
    fn answer(request: &Request) -> Vec<Vec<u8>> {
        if request.target == "/t/switch" {
            vec![
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                    .to_vec(),
            ]
        } else {
            vec![ok(b"ok")]
        }
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client
        .send("GET /t/switch HTTP/1.1\r\nHost: front.test\r\nX-Request-Id: sw-1\r\n\r\n")
        .await;
    let response = client.proxied().await;
    assert_eq!(response.status, 502, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("x-request-id"), Some("sw-1"));
    assert_eq!(response.header("upgrade"), None);
    let error: Value = serde_json::from_slice(&response.body).expect("a JSON error");
    assert_eq!(error["error"]["code"], "upstream", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("switched protocols")),
        "{error}"
    );

    client.send(get("/t/ok")).await;
    let response = client.proxied().await;
    assert_eq!((response.status, response.text().as_str()), (200, "ok"));
    client.expect_quiet().await;
}

/// Catches: a response framed by both `Transfer-Encoding: chunked` and `Content-Length`
/// relayed with both (RFC 9112 §6.1: a sender MUST NOT send `Content-Length` with
/// `Transfer-Encoding`; §6.3 item 3: an intermediary forwarding such a message MUST first
/// remove the `Content-Length`). A client or next hop that trusts the length desyncs —
/// the response-splitting shape of request smuggling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_wins_over_content_length_and_the_length_is_dropped() {
    fn answer(_: &Request) -> Vec<Vec<u8>> {
        vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
              b\r\nhello world\r\n0\r\n\r\n"
                .to_vec(),
        ]
    }
    let backend = keep_alive_backend(answer).await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut client = Conn::to(&node).await;

    client.send(get("/t/both")).await;
    let response = client.proxied().await;
    assert_eq!(response.text(), "hello world", "chunked framing wins");
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        response.header("content-length"),
        None,
        "Content-Length relayed next to Transfer-Encoding: {:?}",
        response.headers
    );

    // The same answer on the hyper path (a route with a plugin): hyper frames what it
    // sends by the headers it is given, so a kept length would cut the body short.
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            "/v1/plugins/noop",
            Some(json!({"source": "return { access = function(req, ctx) end }"})),
        )
        .await;
    assert!(matches!(status, 200 | 201), "plugin: {body}");
    let (status, body) = node
        .admin_json(
            reqwest::Method::PUT,
            "/v1/routes/viahyper",
            Some(json!({"path": "/h/*", "upstream": "t", "plugins": [{"name": "noop"}]})),
        )
        .await;
    assert!(matches!(status, 200 | 201), "route: {body}");
    let mut client = Conn::to(&node).await;
    client.send(get("/h/both")).await;
    let response = client.response().await;
    assert!(
        !response.served_by_front(),
        "a plugin route is hyper's: {response:?}"
    );
    assert_eq!(response.text(), "hello world", "{response:?}");
    assert_eq!(response.header("content-length"), None, "{response:?}");
}

/// Catches: a shutdown that cuts a proxied request the front is serving, leaves an idle
/// front connection open (the worker would wait out its grace period for it), or answers
/// the last request without `connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_finishes_the_request_in_flight_and_closes_idle_connections() {
    let backend = backend(|mut conn, _, seen| async move {
        while let Ok(Some(request)) = conn.request().await {
            if request.target.contains("slow") {
                sleep(Duration::from_millis(700)).await;
            }
            seen.lock().unwrap().push(request);
            if conn.stream.write_all(&ok(b"done")).await.is_err() {
                return;
            }
        }
    })
    .await;
    let node = node();
    route_to(&node, "t", backend.address, json!({})).await;
    let mut idle = Conn::to(&node).await;
    idle.send(get("/t/fast")).await;
    assert_eq!(idle.proxied().await.text(), "done");
    let mut busy = Conn::to(&node).await;
    busy.send(get("/t/slow")).await;
    sleep(Duration::from_millis(200)).await;
    node.sigterm();

    idle.expect_closed().await;
    let response = busy.proxied().await;
    assert_eq!((response.status, response.text().as_str()), (200, "done"));
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    busy.expect_closed().await;
    let mut node = node;
    let status = tokio::task::spawn_blocking(move || node.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
