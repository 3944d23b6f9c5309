//! The `http` module: a non-blocking outbound HTTP client. The calling Lua coroutine
//! yields while the request is in flight, so the instance waits without holding a thread.
//!
//! Lua API:
//! - `http.request{url=, method="GET", headers={}, body=nil, timeout_ms=30000}` →
//!   `{status=, headers={lower-case name = value}, body=}` or `nil, err`
//! - `http.get(url [, opts])`, `http.post(url, body [, opts])`: shorthands.
//!
//! Only `http` and `https` URLs; response bodies above the function's cap are an error.
//! Destinations obey the function's egress policy ([`crate::egress`]): a refused call
//! returns `nil, "egress to 127.0.0.1:9080 denied by policy: admin_listener (...)"`,
//! writes that line to the function's log (warn) and is reported to the engine's
//! observer (the server counts it in `moontide_egress_denied_total`). Redirects are
//! followed (at most 10), each hop checked again.
//!
//! Request headers are capped like a response's (`Limits::response_headers` lines,
//! `response_header_bytes` per line, `response_head_bytes` in all), checked before each
//! is copied out of Lua.

use std::rc::Rc;
use std::time::Duration;

use mlua::{Lua, Table, Value};

use crate::contract::HeaderBudget;
use crate::egress::{self, Denied, Outbound};
use crate::limits::Limits;

/// Told of every call the egress policy refused (logs and counts it).
pub type OnDenied = Rc<dyn Fn(&Denied)>;

/// Longest an outbound request may take unless `timeout_ms` says otherwise (the call's
/// own deadline still bounds it).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A response as read: status, headers, body.
type ResponseParts = (u16, Vec<(String, Vec<u8>)>, Vec<u8>);

/// One outbound request, copied out of Lua before the call yields.
struct Request {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
    timeout: Duration,
}

fn parse_request(
    url: String,
    opts: Option<Table>,
    body: Option<Vec<u8>>,
    limits: &Limits,
) -> Result<Request, String> {
    let url = reqwest::Url::parse(&url).map_err(|e| format!("invalid url '{url}': {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("unsupported url scheme '{}'", url.scheme()));
    }
    let mut request = Request {
        method: reqwest::Method::GET,
        url,
        headers: Vec::new(),
        body,
        timeout: DEFAULT_TIMEOUT,
    };
    let Some(opts) = opts else {
        return Ok(request);
    };
    let field = |name: &str| opts.raw_get::<Value>(name).map_err(|e| e.to_string());
    match field("method")? {
        Value::Nil => {}
        Value::String(s) => {
            request.method = reqwest::Method::from_bytes(&s.as_bytes().to_ascii_uppercase())
                .map_err(|_| "invalid method".to_string())?;
        }
        other => {
            return Err(format!(
                "method must be a string, got {}",
                other.type_name()
            ));
        }
    }
    match field("headers")? {
        Value::Nil => {}
        Value::Table(headers) => {
            let mut budget = HeaderBudget::new(limits);
            for pair in headers.pairs::<mlua::LuaString, Value>() {
                let (name, value) = pair.map_err(|e| format!("headers: {e}"))?;
                let value_len = match &value {
                    Value::String(s) => s.as_bytes().len(),
                    _ => 32,
                };
                budget
                    .line(&name.as_bytes(), value_len)
                    .map_err(|e| format!("headers: {e}"))?;
                let value = match value {
                    Value::String(s) => s.as_bytes().to_vec(),
                    Value::Number(n) => n.to_string().into_bytes(),
                    Value::Integer(i) => i.to_string().into_bytes(),
                    Value::Boolean(b) => b.to_string().into_bytes(),
                    other => {
                        return Err(format!(
                            "header values must be strings, got {}",
                            other.type_name()
                        ));
                    }
                };
                request.headers.push((name.to_string_lossy(), value));
            }
        }
        other => {
            return Err(format!(
                "headers must be a table, got {}",
                other.type_name()
            ));
        }
    }
    match field("body")? {
        Value::Nil => {}
        // `http.post(url, body, opts)`: the positional body wins over `opts.body`.
        Value::String(_) if request.body.is_some() => {}
        Value::String(s) => request.body = Some(s.as_bytes().to_vec()),
        other => return Err(format!("body must be a string, got {}", other.type_name())),
    }
    match field("timeout_ms")? {
        Value::Nil => {}
        Value::Number(n) if n > 0.0 => request.timeout = Duration::from_secs_f64(n / 1000.0),
        Value::Integer(n) if n > 0 => request.timeout = Duration::from_millis(n as u64),
        _ => return Err("timeout_ms must be a positive number".to_string()),
    }
    Ok(request)
}

/// Why an outbound call failed.
enum Failure {
    Denied(Denied),
    Other(String),
}

impl Failure {
    fn from_reqwest(error: &reqwest::Error) -> Failure {
        match egress::find_denied(error) {
            Some(denied) => {
                let mut denied = denied.clone();
                // Refused at resolution: the resolver is not told the port. The error's
                // URL is the request's first one (not a redirect hop's): take its port
                // only if it names the host that was refused.
                if denied.port.is_none()
                    && let Some(url) = error.url()
                    && url.host_str() == denied.host.as_deref()
                {
                    denied.port = url.port_or_known_default();
                }
                Failure::Denied(denied)
            }
            None => Failure::Other(describe(error)),
        }
    }
}

async fn perform(
    client: &reqwest::Client,
    request: Request,
    body_cap: usize,
) -> Result<ResponseParts, Failure> {
    let mut builder = client
        .request(request.method, request.url)
        .timeout(request.timeout);
    for (name, value) in request.headers {
        builder = builder.header(name, value);
    }
    if let Some(body) = request.body {
        builder = builder.body(body);
    }
    let mut response = builder
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(&e))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failure::from_reqwest(&e))?
    {
        if body.len() + chunk.len() > body_cap {
            return Err(Failure::Other(format!(
                "response body is larger than {body_cap} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, headers, body))
}

fn describe(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn response_table(lua: &Lua, (status, headers, body): ResponseParts) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 3)?;
    table.raw_set("status", status)?;
    let header_table = lua.create_table_with_capacity(0, headers.len())?;
    for (name, value) in headers {
        // Repeated headers are joined as HTTP allows (`, `).
        let joined = match header_table.raw_get::<Option<mlua::LuaString>>(name.as_str())? {
            Some(previous) => {
                let mut bytes = previous.as_bytes().to_vec();
                bytes.extend_from_slice(b", ");
                bytes.extend_from_slice(&value);
                bytes
            }
            None => value,
        };
        header_table.raw_set(name, lua.create_string(&joined)?)?;
    }
    table.raw_set("headers", header_table)?;
    table.raw_set("body", lua.create_string(&body)?)?;
    Ok(table)
}

/// Builds the `http` module table over the function's outbound client; `on_denied` is
/// told of every call its egress policy refuses.
pub fn module(
    lua: &Lua,
    outbound: Outbound,
    limits: Limits,
    on_denied: OnDenied,
) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 3)?;
    let body_cap = limits.http_body_bytes;

    let run = move |lua: Lua, parsed: Result<Request, String>| {
        let outbound = outbound.clone();
        let on_denied = on_denied.clone();
        async move {
            let result = match parsed {
                Err(message) => Err(Failure::Other(message)),
                // An IP-literal URL is never resolved: check it in full before anything.
                Ok(request) => match outbound.policy().check_url(&request.url) {
                    Err(denied) => Err(Failure::Denied(denied)),
                    Ok(()) => perform(outbound.client(), request, body_cap).await,
                },
            };
            match result {
                Ok(parts) => Ok((Value::Table(response_table(&lua, parts)?), None)),
                Err(Failure::Denied(denied)) => {
                    on_denied(&denied);
                    Ok((Value::Nil, Some(denied.to_string())))
                }
                Err(Failure::Other(message)) => Ok((Value::Nil, Some(message))),
            }
        }
    };
    let run = Rc::new(run);

    let request_run = run.clone();
    table.raw_set(
        "request",
        lua.create_async_function(move |lua, opts: Table| {
            let parsed = opts
                .raw_get::<Option<String>>("url")
                .map_err(|e| e.to_string())
                .and_then(|url| url.ok_or_else(|| "url is required".to_string()))
                .and_then(|url| parse_request(url, Some(opts), None, &limits));
            request_run(lua, parsed)
        })?,
    )?;
    let get_run = run.clone();
    table.raw_set(
        "get",
        lua.create_async_function(move |lua, (url, opts): (String, Option<Table>)| {
            let parsed = parse_request(url, opts, None, &limits);
            get_run(lua, parsed)
        })?,
    )?;
    table.raw_set(
        "post",
        lua.create_async_function(
            move |lua, (url, body, opts): (String, mlua::LuaString, Option<Table>)| {
                let parsed = parse_request(url, opts, Some(body.as_bytes().to_vec()), &limits).map(
                    |mut r| {
                        if r.method == reqwest::Method::GET {
                            r.method = reqwest::Method::POST;
                        }
                        r
                    },
                );
                run(lua, parsed)
            },
        )?,
    )?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 000 outbound headers used to reach reqwest's `HeaderMap` (which panics past
    /// 32 768 entries) after being copied out of Lua.
    #[test]
    fn outbound_headers_are_capped_before_they_are_copied() {
        let lua = Lua::new();
        let limits = Limits::default();
        for (source, expected) in [
            (
                "local h = {} for i = 1, 100000 do h['x-h' .. i] = 'v' end return { headers = h }",
                "headers: more than 100 header lines",
            ),
            (
                "return { headers = { ['x-long'] = string.rep('v', 9000) } }",
                "headers: header 'x-long' is 9006 bytes",
            ),
        ] {
            let opts: Table = lua.load(source).eval().unwrap();
            let error = parse_request("http://127.0.0.1/".into(), Some(opts), None, &limits)
                .err()
                .expect("refused");
            assert!(error.starts_with(expected), "{error}");
        }
        let opts: Table = lua
            .load("return { headers = { ['x-a'] = '1', ['x-b'] = 2 } }")
            .eval()
            .unwrap();
        let Ok(request) = parse_request("http://127.0.0.1/".into(), Some(opts), None, &limits)
        else {
            panic!("refused");
        };
        assert_eq!(request.headers.len(), 2);
    }
}
