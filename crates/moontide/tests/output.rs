//! Tenant output over real sockets (issue 13 §3): whatever a function or a plugin returns,
//! a keep-alive connection gets exactly one well-framed response per request. Framing and
//! connection headers from tenant code are dropped (the node frames the body itself, and
//! says so once per call in the function log); statuses outside 200-599, header floods and
//! oversized header lines are clean `500`s with the request id, their reason in the log.
//!
//! Responses are read over a raw `TcpStream` and parsed strictly (one `Content-Length`, no
//! `Transfer-Encoding`, exactly that many body bytes, nothing left over), so a forged or
//! swallowed response cannot go unnoticed the way a forgiving client would let it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Node;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Names lowercased, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A data-plane error: `status`, JSON `code` and `details.kind`, and the request id in
    /// both the header and the body. Returns the id.
    fn expect_error(&self, status: u16, code: &str, kind: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["details"]["kind"], kind, "{body}");
        let id = self
            .header("x-request-id")
            .expect("x-request-id")
            .to_string();
        assert_eq!(
            body["error"]["details"]["request_id"],
            id.as_str(),
            "{body}"
        );
        id
    }
}

/// A raw client connection, kept alive across requests.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Headers only the node may decide.
const FRAMING: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Conn {
    async fn to(node: &Node) -> Conn {
        let address = node.data.trim_start_matches("http://");
        let stream = TcpStream::connect(address).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn get(&mut self, path: &str) -> Answer {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await.unwrap();
        self.response(path).await
    }

    async fn fill(&mut self, what: &str) {
        let mut chunk = [0u8; 65536];
        let read = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 20 s"));
        match read {
            Ok(0) | Err(_) => panic!(
                "{what}: the node closed the connection (read so far: {:?})",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
        }
    }

    /// Reads exactly one response: a head, one `Content-Length` and that many bytes.
    async fn response(&mut self, what: &str) -> Answer {
        let head_len = loop {
            let mut headers = [httparse::EMPTY_HEADER; 256];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => break len,
                Ok(httparse::Status::Partial) => self.fill(what).await,
                Err(error) => panic!(
                    "{what}: not an HTTP response ({error}): {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut response = httparse::Response::new(&mut headers);
        response.parse(&self.buf).unwrap();
        let status = response.code.unwrap();
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let lengths: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(
            !headers.iter().any(|(n, _)| n == "transfer-encoding"),
            "{what}: {headers:?}"
        );
        let length: usize = if matches!(status, 204 | 304) {
            assert!(lengths.is_empty(), "{what}: {headers:?}");
            0
        } else {
            assert_eq!(lengths.len(), 1, "{what}: one content-length: {headers:?}");
            lengths[0].parse().expect("a decimal content-length")
        };
        while self.buf.len() < head_len + length {
            self.fill(what).await;
        }
        let body = self.buf[head_len..head_len + length].to_vec();
        self.buf.drain(..head_len + length);
        assert!(
            self.buf.is_empty(),
            "{what}: bytes after the response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        Answer {
            status,
            headers,
            body,
        }
    }

    /// Nothing more comes: no second response hides behind the last one.
    async fn expect_quiet(&mut self) {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(300), self.stream.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("the node closed a keep-alive connection"),
            Ok(read) => panic!(
                "unexpected bytes: {:?}",
                read.map(|n| String::from_utf8_lossy(&chunk[..n]).into_owned())
            ),
        }
    }
}

/// Waits (bounded) until `lines()` has a line containing `needle`; returns them all.
async fn wait_for_line<F, Fut>(lines: F, needle: &str) -> Vec<String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    for _ in 0..200 {
        let seen = lines().await;
        if seen.iter().any(|line| line.contains(needle)) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no log line with {needle:?} in {:?}", lines().await);
}

/// A response body that is itself an HTTP response, with a cookie of its own.
const FORGED: &str =
    "HTTP/1.1 200 OK\r\nSet-Cookie: session=stolen\r\nContent-Length: 6\r\n\r\nforged";

#[tokio::test]
async fn a_function_cannot_set_the_framing_of_its_response() {
    let node = Node::start();
    node.deploy(
        "forge",
        r#"
        local forged = "HTTP/1.1 200 OK\r\nSet-Cookie: session=stolen\r\nContent-Length: 6\r\n\r\nforged"
        return function(event)
          local q = event.queryStringParameters or {}
          if q.ok then return "ok" end
          if q.multi then
            return { statusCode = 200, body = forged,
                     multiValueHeaders = { ["Content-Length"] = { "0", "0" },
                                           ["x-kept"] = { "a", "b" } } }
          end
          return { statusCode = 200, body = forged,
                   headers = { ["Content-Length"] = q.cl or "0", ["Transfer-Encoding"] = q.te,
                               ["Connection"] = q.conn, ["keep-alive"] = "timeout=1",
                               upgrade = "h2c", te = "trailers", trailer = "x-t",
                               ["proxy-connection"] = "close", ["x-kept"] = "yes" } }
        end
        "#,
        json!({}),
    )
    .await;
    let mut conn = Conn::to(&node).await;
    let mut ids = Vec::new();
    for query in [
        "",
        "?cl=100000",
        "?cl=3",
        "?te=chunked",
        "?conn=close",
        "?multi=1",
    ] {
        let answer = conn.get(&format!("/fn/forge{query}")).await;
        assert_eq!(answer.status, 200, "{query}: {answer:?}");
        assert_eq!(answer.body, FORGED.as_bytes(), "{query}");
        assert_eq!(
            answer.header("content-length"),
            Some(FORGED.len().to_string().as_str())
        );
        assert!(answer.header("set-cookie").is_none(), "{query}");
        for name in FRAMING.iter().filter(|n| **n != "content-length") {
            assert!(
                answer.header(name).is_none(),
                "{query}: {name} in {answer:?}"
            );
        }
        if query == "?multi=1" {
            assert_eq!(answer.all("x-kept"), ["a", "b"]);
        } else {
            assert_eq!(answer.all("x-kept"), ["yes"]);
        }
        ids.push(answer.header("x-request-id").unwrap().to_string());
    }
    // The connection still serves (a tenant's `Connection: close` was not the node's).
    let answer = conn.get("/fn/forge?ok=1").await;
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ok"[..]));
    conn.expect_quiet().await;

    // One warning line per call, naming what was dropped.
    let lines = wait_for_line(|| node.log_messages("forge"), "dropped").await;
    let warnings: Vec<&String> = lines.iter().filter(|l| l.contains("dropped")).collect();
    assert_eq!(warnings.len(), ids.len(), "{lines:?}");
    for expected in [
        "result: dropped content-length, keep-alive, proxy-connection, te, trailer, upgrade (",
        "result: dropped connection, content-length, keep-alive, proxy-connection, te, trailer, \
         upgrade (",
        "result: dropped content-length, keep-alive, proxy-connection, te, trailer, \
         transfer-encoding, upgrade (",
        "result: dropped content-length (",
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(expected)),
            "{expected} in {warnings:?}"
        );
    }
}

/// Each function returns one kind of oversized header set; each answer is a clean 500
/// carrying the request id, and the connection goes on.
#[tokio::test]
async fn header_floods_and_oversized_headers_are_clean_errors() {
    let node = Node::start();
    let cases = [
        // 100 000 headers: the http crate's map panics past 32 768.
        (
            "flood",
            "local h = {} for i = 1, 100000 do h['x-h' .. i] = 'v' end
             return { statusCode = 200, headers = h }",
            "output_header_count",
            "more than 100 header lines",
        ),
        (
            "multiflood",
            "local v = {} for i = 1, 50000 do v[i] = 'v' end
             return { statusCode = 200, multiValueHeaders = { ['x-a'] = v } }",
            "output_header_count",
            "more than 100 header lines",
        ),
        (
            "longline",
            "return { statusCode = 200, headers = { ['x-long'] = string.rep('v', 9000) } }",
            "output_header_line",
            "header 'x-long' is 9006 bytes",
        ),
        (
            "heavy",
            "local h = {} for i = 1, 100 do h['x-h' .. i] = string.rep('v', 1000) end
             return { statusCode = 200, headers = h }",
            "output_header_bytes",
            "headers are more than 65536 bytes together",
        ),
        (
            "crlf",
            "return { statusCode = 200, headers = { ['x-a'] = 'a\\r\\nset-cookie: evil=1' } }",
            "result",
            "invalid value for header 'x-a'",
        ),
        (
            "badname",
            "return { statusCode = 200, headers = { ['x a\\r\\n'] = 'v' } }",
            "result",
            "invalid header name 'x a\\r\\n'",
        ),
    ];
    for (name, body, _, _) in &cases {
        let source = format!(
            "return function(event)
               if event.queryStringParameters then return 'ok' end
               {body}
             end"
        );
        node.deploy(name, &source, json!({})).await;
    }
    let mut conn = Conn::to(&node).await;
    for (name, _, kind, reason) in &cases {
        let answer = conn.get(&format!("/fn/{name}")).await;
        let id = answer.expect_error(500, "function_error", kind);
        assert!(answer.header("x-h1").is_none() && answer.header("x-a").is_none());
        let again = conn.get(&format!("/fn/{name}?ok=1")).await;
        assert_eq!((again.status, again.body.as_slice()), (200, &b"ok"[..]));
        let lines = wait_for_line(|| node.log_messages(name), reason).await;
        assert!(
            lines
                .iter()
                .any(|l| l.contains("call failed: invalid result") && l.contains(reason)),
            "{name} ({id}): {lines:?}"
        );
    }
    conn.expect_quiet().await;
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(
            &metrics,
            r#"moontide_function_errors_total{function="flood",kind="output_header_count"}"#
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn statuses_outside_200_to_599_are_bad_results() {
    let node = Node::start();
    node.deploy(
        "status",
        "return function(event)
           local s = event.queryStringParameters.s
           return { statusCode = tonumber(s) or s, body = 'status ' .. s }
         end",
        json!({}),
    )
    .await;
    let mut conn = Conn::to(&node).await;
    for status in [
        "100", "101", "103", "199", "0", "-200", "600", "1000", "200.5",
    ] {
        let answer = conn.get(&format!("/fn/status?s={status}")).await;
        answer.expect_error(500, "function_error", "result");
        let lines = wait_for_line(
            || node.log_messages("status"),
            &format!("statusCode {status} is not allowed"),
        )
        .await;
        assert!(!lines.is_empty());
    }
    for status in [200, 204, 299, 404, 599] {
        let answer = conn.get(&format!("/fn/status?s={status}")).await;
        assert_eq!(answer.status, status);
    }
    conn.expect_quiet().await;
}

/// An upstream that answers every request with `backend body`.
async fn backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "backend body" });
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// A plugin on a proxied route: its `header_filter` cannot reframe the upstream's body,
/// and statuses or header floods it returns are clean `plugin_error`s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_forge_framing_or_statuses() {
    let node = Node::start();
    let address = backend().await;
    let plugin = r#"
      local P = {}
      function P.access(req, ctx)
        ctx.fs = req.query.fs
        if req.query.s then return { statusCode = tonumber(req.query.s), body = 'x' } end
        if req.query.flood then
          local h = {} for i = 1, 100000 do h['x-h' .. i] = 'v' end
          return { statusCode = 200, headers = h, body = 'x' }
        end
        if req.query.reqflood then
          for i = 1, 100000 do req.headers['x-h' .. i] = 'v' end
        end
        if req.query.forge then
          return { statusCode = 200, headers = { ['content-length'] = '0' }, body = 'plugin body' }
        end
      end
      function P.header_filter(res, ctx)
        if ctx.fs then res.status = tonumber(ctx.fs) return end
        res.headers['content-length'] = '0'
        res.headers['transfer-encoding'] = 'chunked'
        res.headers['connection'] = 'close'
        res.headers['x-added'] = '1'
      end
      return P
    "#;
    let put = |path: &'static str, body: Value| {
        let node = &node;
        async move {
            let (status, answer) = node
                .admin_json(reqwest::Method::PUT, path, Some(body))
                .await;
            assert!(status == 201 || status == 200, "{path}: {answer}");
        }
    };
    put("/v1/plugins/forge", json!({"source": plugin})).await;
    put(
        "/v1/upstreams/api",
        json!({"nodes": [{"address": address.to_string()}]}),
    )
    .await;
    put(
        "/v1/routes/api",
        json!({"path": "/api/*", "upstream": "api", "plugins": [{"name": "forge"}]}),
    )
    .await;

    let mut conn = Conn::to(&node).await;
    for _ in 0..2 {
        let answer = conn.get("/api/x").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.body, b"backend body");
        assert_eq!(answer.header("content-length"), Some("12"));
        assert_eq!(answer.header("x-added"), Some("1"));
        assert!(answer.header("connection").is_none());
    }
    // A response the plugin ends the request with is framed by the node too.
    let answer = conn.get("/api/x?forge=1").await;
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (200, &b"plugin body"[..])
    );
    for (query, phase, kind) in [
        ("s=101", "access", "result"),
        ("s=100", "access", "result"),
        ("s=700", "access", "result"),
        ("flood=1", "access", "output_header_count"),
        ("reqflood=1", "access", "output_header_count"),
        ("fs=101", "header_filter", "result"),
        ("fs=99", "header_filter", "result"),
    ] {
        let answer = conn.get(&format!("/api/x?{query}")).await;
        answer.expect_error(500, "plugin_error", kind);
        assert_eq!(answer.json()["error"]["details"]["phase"], phase, "{query}");
    }
    conn.expect_quiet().await;
    let lines = wait_for_line(
        || node.plugin_log_messages("forge"),
        "res.status 101 is not allowed",
    )
    .await;
    assert!(
        lines.iter().any(|l| l.contains(
            "header_filter: res.headers: dropped connection, content-length, transfer-encoding"
        )),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("access: more than 100 header lines")),
        "{lines:?}"
    );
}
