//! Tenant output to the wire: an arbitrary Lua result table (statuses, header names and
//! values including framing headers, CR/LF/NUL, floods of up to 100 000 headers,
//! `multiValueHeaders`, bodies, base64 flags) goes through the real conversion
//! (`moontide_runtime::contract::http_response`) and the real writing: the data plane's
//! `function_response` / JSON error, `set_request_id`, and hyper's server built by
//! `dataplane::connection_builder`, over an in-memory connection. The client pipelines the
//! request and a second one on the same keep-alive connection.
//!
//! Properties, for any result:
//! - nothing panics (conversion, hyper, the glue);
//! - a status outside 200-599 is never accepted; an accepted result has no framing header,
//!   at most 100 header lines of its own and a body within the cap;
//! - the bytes on the wire are exactly two well-framed HTTP/1.1 responses: the answer
//!   (the result as converted, or a JSON 500; one `x-request-id`, the node's; one
//!   `Content-Length` that is the body's length, none for 204/304; no `Transfer-Encoding`,
//!   `Connection` or other hop-by-hop header) and then the second request's own answer —
//!   nothing forged in between, nothing swallowed, nothing after.
#![no_main]

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use mlua::{Lua, Value};
use moontide_runtime::contract::{self, FRAMING_HEADERS};
use moontide_runtime::modules::json;
use moontide_runtime::{HttpResponse, Limits};
use moontide_server::dataplane::{connection_builder, function_response, set_request_id};
use moontide_server::errors::ApiError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Arbitrary, Debug)]
enum Status {
    Common(u8),
    Integer(i64),
    Float(f64),
    Text(String),
}

const COMMON_STATUSES: [i64; 14] = [
    100, 101, 102, 103, 199, 200, 201, 204, 205, 304, 404, 599, 600, 0,
];

#[derive(Arbitrary, Debug)]
enum Name {
    /// One of the framing headers, in a case chosen by the bits.
    Framing(u8, u32),
    Known(u8),
    Raw(Vec<u8>),
}

const KNOWN_NAMES: [&str; 8] = [
    "set-cookie",
    "content-type",
    "x-request-id",
    "date",
    "server",
    "location",
    "x-a",
    "X-A",
];

#[derive(Arbitrary, Debug)]
enum Text {
    Raw(Vec<u8>),
    /// A value that tries to split the response.
    Split(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    Table,
}

#[derive(Arbitrary, Debug)]
struct Flood {
    count: u32,
    /// Up to 100 000 entries; else up to 300 (around the 100-line cap, and fast).
    huge: bool,
    multi: bool,
    name: Name,
    value_len: u16,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Absent,
    Text(Vec<u8>),
    /// The body is itself an HTTP response.
    Forged(u16),
    Base64Of(Vec<u8>),
    RawBase64(String),
    /// Around the 6 MiB cap.
    Large(u16),
    Json(Vec<(String, String)>),
    Number(f64),
    Bool(bool),
}

#[derive(Arbitrary, Debug)]
enum Shape {
    Proxy,
    /// A plain string result (200 text/plain).
    Plain(Vec<u8>),
    Nil,
    /// A table without `statusCode` (200 JSON).
    Data(Vec<(String, i32)>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    shape: Shape,
    status: Option<Status>,
    headers: Vec<(Name, Text)>,
    multi: Vec<(Name, Vec<Text>)>,
    flood: Option<Flood>,
    body: Body,
    base64: Option<bool>,
    head_request: bool,
}

const LARGE_BASE: usize = (6 << 20) - 512;

fn name_bytes(name: &Name) -> Vec<u8> {
    match name {
        Name::Framing(index, case) => FRAMING_HEADERS[*index as usize % FRAMING_HEADERS.len()]
            .bytes()
            .enumerate()
            .map(|(i, b)| {
                if case & (1 << (i % 32)) != 0 {
                    b.to_ascii_uppercase()
                } else {
                    b
                }
            })
            .collect(),
        Name::Known(index) => KNOWN_NAMES[*index as usize % KNOWN_NAMES.len()]
            .as_bytes()
            .to_vec(),
        Name::Raw(bytes) => bytes.clone(),
    }
}

fn text_value(lua: &Lua, text: &Text) -> mlua::Result<Value> {
    Ok(match text {
        Text::Raw(bytes) => Value::String(lua.create_string(bytes)?),
        Text::Split(rest) => Value::String(lua.create_string(format!(
            "a\r\nSet-Cookie: forged=1\r\nContent-Length: 0\r\n\r\n{rest}"
        ))?),
        Text::Integer(i) => Value::Integer(*i),
        Text::Float(f) => Value::Number(*f),
        Text::Bool(b) => Value::Boolean(*b),
        Text::Table => Value::Table(lua.create_table()?),
    })
}

fn forged(len: u16) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nSet-Cookie: session=stolen\r\nContent-Length: {len}\r\n\r\n{}",
        "f".repeat(len as usize % 64)
    )
}

/// The result table as a handler would return it.
fn result(lua: &Lua, input: &Input) -> mlua::Result<Value> {
    match &input.shape {
        Shape::Plain(text) => return Ok(Value::String(lua.create_string(text)?)),
        Shape::Nil => return Ok(Value::Nil),
        Shape::Data(pairs) => {
            let table = lua.create_table()?;
            for (key, value) in pairs {
                table.raw_set(key.as_str(), *value)?;
            }
            return Ok(Value::Table(table));
        }
        Shape::Proxy => {}
    }
    let table = lua.create_table()?;
    let status = match &input.status {
        None | Some(Status::Common(_)) => {
            let index = match &input.status {
                Some(Status::Common(i)) => *i as usize,
                _ => 5,
            };
            Value::Integer(COMMON_STATUSES[index % COMMON_STATUSES.len()])
        }
        Some(Status::Integer(i)) => Value::Integer(*i),
        Some(Status::Float(f)) => Value::Number(*f),
        Some(Status::Text(text)) => Value::String(lua.create_string(text)?),
    };
    table.raw_set("statusCode", status)?;
    let headers = lua.create_table()?;
    for (name, text) in &input.headers {
        headers.raw_set(lua.create_string(name_bytes(name))?, text_value(lua, text)?)?;
    }
    let multi = lua.create_table()?;
    for (name, texts) in &input.multi {
        let list = lua.create_table()?;
        for (i, text) in texts.iter().enumerate() {
            list.raw_set(i + 1, text_value(lua, text)?)?;
        }
        multi.raw_set(lua.create_string(name_bytes(name))?, list)?;
    }
    if let Some(flood) = &input.flood {
        let count = flood.count as usize % if flood.huge { 100_001 } else { 300 };
        let value = lua.create_string("v".repeat(flood.value_len as usize % 9000))?;
        let prefix = name_bytes(&flood.name);
        if flood.multi {
            let list = lua.create_table_with_capacity(count, 0)?;
            for i in 1..=count {
                list.raw_set(i, &value)?;
            }
            multi.raw_set(lua.create_string(&prefix)?, list)?;
        } else {
            for i in 0..count {
                let mut name = prefix.clone();
                name.extend_from_slice(i.to_string().as_bytes());
                headers.raw_set(lua.create_string(&name)?, &value)?;
            }
        }
    }
    table.raw_set("headers", headers)?;
    table.raw_set("multiValueHeaders", multi)?;
    let body = match &input.body {
        Body::Absent => Value::Nil,
        Body::Text(bytes) => Value::String(lua.create_string(bytes)?),
        Body::Forged(len) => Value::String(lua.create_string(forged(*len))?),
        Body::Base64Of(bytes) => {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            Value::String(lua.create_string(encoded)?)
        }
        Body::RawBase64(text) => Value::String(lua.create_string(text)?),
        Body::Large(extra) => {
            Value::String(lua.create_string(vec![b'x'; LARGE_BASE + *extra as usize % 1024])?)
        }
        Body::Json(pairs) => {
            let body = lua.create_table()?;
            for (key, value) in pairs {
                body.raw_set(key.as_str(), value.as_str())?;
            }
            Value::Table(body)
        }
        Body::Number(n) => Value::Number(*n),
        Body::Bool(b) => Value::Boolean(*b),
    };
    table.raw_set("body", body)?;
    if let Some(flag) = input.base64 {
        table.raw_set("isBase64Encoded", flag)?;
    }
    Ok(Value::Table(table))
}

/// One response as parsed off the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Wire {
    fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// Parses one response at the start of `bytes`: `Ok(None)` if more bytes are needed.
/// Framing must be a single `Content-Length` (none on 204/304; at most one on a `HEAD`
/// answer, which has no body); anything else is a finding.
fn parse(bytes: &[u8], head_request: bool) -> Option<(Wire, usize)> {
    let mut storage = vec![httparse::EMPTY_HEADER; 512];
    let mut response = httparse::Response::new(&mut storage);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(error) => panic!(
            "not an HTTP response ({error}): {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
        ),
    };
    assert_eq!(response.version, Some(1), "HTTP/1.1");
    let status = response.code.expect("a status");
    let headers: Vec<(String, Vec<u8>)> = response
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let wire = Wire {
        status,
        headers,
        body: Vec::new(),
    };
    for name in FRAMING_HEADERS.iter().filter(|n| **n != "content-length") {
        assert!(wire.all(name).is_empty(), "{name} on the wire: {wire:?}");
    }
    let lengths = wire.all("content-length");
    let length = if matches!(status, 204 | 304) {
        assert!(lengths.is_empty(), "content-length on a {status}");
        0
    } else if head_request {
        // The length a GET would have, or none (hyper leaves out a zero one); no body.
        assert!(lengths.len() <= 1, "one content-length: {:?}", wire.headers);
        0
    } else {
        assert_eq!(lengths.len(), 1, "one content-length: {:?}", wire.headers);
        let length: usize = std::str::from_utf8(lengths[0])
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("a decimal content-length");
        length
    };
    if bytes.len() < head_len + length {
        return None;
    }
    let body = bytes[head_len..head_len + length].to_vec();
    Some((Wire { body, ..wire }, head_len + length))
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    lua: Lua,
    limits: Limits,
}

thread_local! {
    static HARNESS: Harness = Harness {
        runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        lua: Lua::new(),
        limits: Limits::default(),
    };
}

/// The data plane's answer to a failed call (`dataplane::call_failure`, without the
/// function's metrics).
fn failure(request_id: &str, kind: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "function_error",
        format!("function failed; see `moontide logs f` for request {request_id}"),
    )
    .with_details(serde_json::json!({"request_id": request_id, "function": "f", "kind": kind}))
}

fn sentinel() -> HttpResponse {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-sentinel", HeaderValue::from_static("1"));
    HttpResponse {
        status: StatusCode::OK,
        headers,
        body: Bytes::from_static(b"sentinel"),
    }
}

/// Serves two pipelined requests with the data plane's hyper builder over an in-memory
/// connection; returns every byte the server wrote until it closed.
async fn exchange(first: http::Response<http_body_util::Full<Bytes>>, head: bool) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(1 << 16);
    let answers = Rc::new(RefCell::new(vec![function_response(sentinel()), first]));
    let ids = Rc::new(RefCell::new(vec!["sentinel-id", "fuzz-id"]));
    let service = hyper::service::service_fn(move |_request| {
        let mut response = answers.borrow_mut().pop().expect("two requests only");
        let id = ids.borrow_mut().pop().unwrap();
        set_request_id(&mut response, Some(HeaderValue::from_static(id)));
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = connection_builder()
        .serve_connection_with_upgrades(TokioIo::new(server), service)
        .into_owned();
    let served = tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    let (mut read, mut write) = tokio::io::split(client);
    let method = if head { "HEAD" } else { "GET" };
    let requests =
        format!("{method} / HTTP/1.1\r\nhost: f\r\n\r\nGET /2 HTTP/1.1\r\nhost: f\r\n\r\n");
    write.write_all(requests.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let both = async {
        loop {
            if let Some((_, used)) = parse(&out, head)
                && parse(&out[used..], false).is_some()
            {
                return;
            }
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => panic!(
                    "the connection ended before both answers: {:?}",
                    String::from_utf8_lossy(&out[..out.len().min(512)])
                ),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), both)
        .await
        .expect("both answers within 10 s");
    // Close the client side: the server must have nothing more to say.
    write.shutdown().await.unwrap();
    let rest = async {
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), rest)
        .await
        .expect("the server closes");
    let _ = served.await;
    out
}

fuzz_target!(|input: Input| {
    HARNESS.with(|harness| {
        let value = result(&harness.lua, &input).expect("the table is built");
        let converted = contract::http_response(value, &harness.limits, &json::no_limits);
        // Conversion-level properties.
        if let (Shape::Proxy, Some(Status::Integer(code))) = (&input.shape, &input.status)
            && !(200..=599).contains(code)
        {
            assert!(converted.is_err(), "status {code} was accepted");
        }
        let expected = match &converted {
            Ok(converted) => {
                let response = &converted.response;
                assert!((200..=599).contains(&response.status.as_u16()));
                assert!(response.body.len() <= harness.limits.response_body_bytes);
                let own = response
                    .headers
                    .keys()
                    .filter(|name| *name != http::header::CONTENT_TYPE)
                    .map(|name| response.headers.get_all(name).iter().count())
                    .sum::<usize>();
                assert!(own <= harness.limits.response_headers, "{own} header lines");
                for name in response.headers.keys() {
                    assert!(
                        contract::framing_header(name.as_str().as_bytes()).is_none(),
                        "{name} kept"
                    );
                }
                Ok(response.clone())
            }
            Err(error) => Err(error.kind()),
        };
        let first = match &expected {
            Ok(response) => function_response(response.clone()),
            Err(kind) => failure("fuzz-id", kind).to_response(),
        };
        let out = harness.runtime.block_on(async {
            tokio::task::LocalSet::new()
                .run_until(exchange(first, input.head_request))
                .await
        });

        // Exactly the answer, then the sentinel, then nothing.
        let (answer, used) = parse(&out, input.head_request)
            .unwrap_or_else(|| panic!("an incomplete first answer: {} bytes", out.len()));
        let (second, used_second) =
            parse(&out[used..], false).unwrap_or_else(|| panic!("no second answer"));
        assert_eq!(
            used + used_second,
            out.len(),
            "bytes after the second answer"
        );
        assert_eq!(second.status, 200);
        assert_eq!(
            second.body, b"sentinel",
            "the second answer is the second request's"
        );
        assert_eq!(second.all("x-sentinel"), [b"1"]);
        assert_eq!(second.all("x-request-id"), [b"sentinel-id"]);
        assert!(answer.all("x-sentinel").is_empty());
        assert_eq!(answer.all("x-request-id"), [b"fuzz-id"], "{answer:?}");
        match &expected {
            Ok(response) => {
                assert_eq!(answer.status, response.status.as_u16());
                let no_body = input.head_request || matches!(answer.status, 204 | 304);
                if !no_body {
                    assert_eq!(answer.body, response.body, "the body, byte for byte");
                    assert_eq!(
                        answer.all("content-length"),
                        [response.body.len().to_string().as_bytes()]
                    );
                }
                for name in response.headers.keys() {
                    if name == "x-request-id" {
                        continue;
                    }
                    let sent: Vec<&[u8]> = response
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| v.as_bytes())
                        .collect();
                    assert_eq!(answer.all(name.as_str()), sent, "{name}");
                }
            }
            Err(kind) => {
                assert_eq!(answer.status, 500);
                if !input.head_request {
                    let body: serde_json::Value =
                        serde_json::from_slice(&answer.body).expect("a JSON error");
                    assert_eq!(body["error"]["details"]["kind"], *kind);
                    assert_eq!(body["error"]["details"]["request_id"], "fuzz-id");
                }
            }
        }
    });
});
