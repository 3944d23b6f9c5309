//! The function contract of DESIGN.md §1: how an HTTP request becomes the handler's
//! `event` (the AWS API Gateway proxy event, v1) and how the handler's return value becomes
//! an HTTP response or a direct-invocation result.
//!
//! Result rules: a table with `statusCode` is a response (`headers`, `multiValueHeaders`,
//! `body`, `isBase64Encoded`); a string is `200 text/plain`; any other table (or number,
//! boolean) is `200` JSON of that value; `nil` is `204`.

use base64::Engine as _;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use mlua::{Lua, LuaString, Table, Value};

use crate::limits::Limits;
use crate::modules::json;

/// The parts of an HTTP request a handler sees. Borrowed: building the event copies what
/// it needs into the Lua state.
#[derive(Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The request path, percent-encoded as received.
    pub path: &'a str,
    /// The raw query string (without `?`), if any.
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub source_ip: &'a str,
    pub request_id: &'a str,
    /// Milliseconds since the Unix epoch when the request arrived.
    pub request_time_epoch_ms: u64,
    /// The route that matched, e.g. `/fn/{name}` (the event's `resource`).
    pub resource: &'a str,
    /// Parameters captured by the route (e.g. `proxy` for the rest of the path).
    pub path_parameters: &'a [(&'a str, &'a str)],
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: &'a str,
}

/// A handler's response.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The event's constant keys, interned once per instance: setting a field then pushes a
/// reference instead of hashing and interning the key again on every request.
pub(crate) struct EventKeys {
    resource: LuaString,
    path: LuaString,
    http_method: LuaString,
    headers: LuaString,
    multi_value_headers: LuaString,
    query: LuaString,
    multi_value_query: LuaString,
    path_parameters: LuaString,
    body: LuaString,
    is_base64: LuaString,
    request_context: LuaString,
    request_id: LuaString,
    request_time_epoch: LuaString,
    resource_path: LuaString,
    protocol: LuaString,
    stage: LuaString,
    default_stage: LuaString,
    identity: LuaString,
    source_ip: LuaString,
    user_agent: LuaString,
}

impl EventKeys {
    pub(crate) fn new(lua: &Lua) -> mlua::Result<EventKeys> {
        let key = |text: &str| lua.create_string(text);
        Ok(EventKeys {
            resource: key("resource")?,
            path: key("path")?,
            http_method: key("httpMethod")?,
            headers: key("headers")?,
            multi_value_headers: key("multiValueHeaders")?,
            query: key("queryStringParameters")?,
            multi_value_query: key("multiValueQueryStringParameters")?,
            path_parameters: key("pathParameters")?,
            body: key("body")?,
            is_base64: key("isBase64Encoded")?,
            request_context: key("requestContext")?,
            request_id: key("requestId")?,
            request_time_epoch: key("requestTimeEpoch")?,
            resource_path: key("resourcePath")?,
            protocol: key("protocol")?,
            stage: key("stage")?,
            default_stage: key("$default")?,
            identity: key("identity")?,
            source_ip: key("sourceIp")?,
            user_agent: key("userAgent")?,
        })
    }
}

/// A header value as UTF-8 text: as is when it is UTF-8 (what clients send in practice),
/// else read as ISO-8859-1 (HTTP's historical charset for `obs-text` bytes), which maps
/// every byte to one character and loses nothing. Event strings are always valid UTF-8,
/// so `json.encode(event)` cannot fail on a client's header bytes (found by fuzzing).
pub(crate) fn header_text(value: &HeaderValue) -> std::borrow::Cow<'_, [u8]> {
    let bytes = value.as_bytes();
    if std::str::from_utf8(bytes).is_ok() {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let latin1: String = bytes.iter().map(|&b| char::from(b)).collect();
    std::borrow::Cow::Owned(latin1.into_bytes())
}

/// Builds the proxy event table for one request.
pub(crate) fn http_event(
    lua: &Lua,
    keys: &EventKeys,
    request: &HttpRequest<'_>,
) -> mlua::Result<Table> {
    let event = lua.create_table_with_capacity(0, 12)?;
    event.raw_set(&keys.resource, request.resource)?;
    event.raw_set(&keys.path, request.path)?;
    event.raw_set(&keys.http_method, request.method)?;

    // headers: one value per name (repeats joined with ", "), multiValueHeaders: all.
    let header_count = request.headers.keys_len();
    let headers = lua.create_table_with_capacity(0, header_count)?;
    let multi_headers = lua.create_table_with_capacity(0, header_count)?;
    for name in request.headers.keys() {
        let name_key = lua.create_string(name.as_str())?;
        let mut values = request.headers.get_all(name).iter();
        let first = lua.create_string(values.next().map(header_text).unwrap_or_default())?;
        let all = lua.create_table_with_capacity(1, 0)?;
        all.raw_seti(1, &first)?;
        let mut joined: Option<Vec<u8>> = None;
        for (index, value) in values.enumerate() {
            let text = header_text(value);
            all.raw_seti(index + 2, lua.create_string(&*text)?)?;
            let buffer = joined.get_or_insert_with(|| first.as_bytes().to_vec());
            buffer.extend_from_slice(b", ");
            buffer.extend_from_slice(&text);
        }
        match joined {
            Some(bytes) => headers.raw_set(&name_key, lua.create_string(&bytes)?)?,
            None => headers.raw_set(&name_key, first)?,
        }
        multi_headers.raw_set(name_key, all)?;
    }
    event.raw_set(&keys.headers, headers)?;
    event.raw_set(&keys.multi_value_headers, multi_headers)?;

    // Query string: absent (nil) when there is none, as API Gateway does.
    if let Some(query) = request.query.filter(|q| !q.is_empty()) {
        let single = lua.create_table()?;
        let multi = lua.create_table()?;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let key = lua.create_string(&*key)?;
            let value = lua.create_string(&*value)?;
            single.raw_set(&key, &value)?;
            let list = match multi.raw_get::<Option<Table>>(&key)? {
                Some(list) => list,
                None => {
                    let list = lua.create_table()?;
                    multi.raw_set(&key, &list)?;
                    list
                }
            };
            list.raw_seti(list.raw_len() + 1, value)?;
        }
        event.raw_set(&keys.query, single)?;
        event.raw_set(&keys.multi_value_query, multi)?;
    }

    if !request.path_parameters.is_empty() {
        let params = lua.create_table_with_capacity(0, request.path_parameters.len())?;
        for (key, value) in request.path_parameters {
            params.raw_set(*key, *value)?;
        }
        event.raw_set(&keys.path_parameters, params)?;
    }

    // Text bodies as is; anything that is not UTF-8 is base64, as API Gateway does.
    if !request.body.is_empty() {
        match std::str::from_utf8(request.body) {
            Ok(text) => {
                event.raw_set(&keys.body, text)?;
                event.raw_set(&keys.is_base64, false)?;
            }
            Err(_) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(request.body);
                event.raw_set(&keys.body, encoded)?;
                event.raw_set(&keys.is_base64, true)?;
            }
        }
    } else {
        event.raw_set(&keys.is_base64, false)?;
    }

    let context = lua.create_table_with_capacity(0, 8)?;
    context.raw_set(&keys.request_id, request.request_id)?;
    context.raw_set(
        &keys.request_time_epoch,
        request.request_time_epoch_ms as f64,
    )?;
    context.raw_set(&keys.http_method, request.method)?;
    context.raw_set(&keys.path, request.path)?;
    context.raw_set(&keys.resource_path, request.resource)?;
    context.raw_set(&keys.protocol, request.protocol)?;
    context.raw_set(&keys.stage, &keys.default_stage)?;
    let identity = lua.create_table_with_capacity(0, 2)?;
    identity.raw_set(&keys.source_ip, request.source_ip)?;
    if let Some(agent) = request.headers.get(http::header::USER_AGENT) {
        identity.raw_set(&keys.user_agent, lua.create_string(&*header_text(agent))?)?;
    }
    context.raw_set(&keys.identity, identity)?;
    event.raw_set(&keys.request_context, context)?;
    Ok(event)
}

/// Converts a handler's return value to an HTTP response, within the output caps.
pub(crate) fn http_response(value: Value, limits: &Limits) -> Result<HttpResponse, String> {
    let response = to_response(value)?;
    if response.body.len() > limits.response_body_bytes {
        return Err(format!(
            "response body is {} bytes; the limit is {}",
            response.body.len(),
            limits.response_body_bytes
        ));
    }
    if response.headers.len() > limits.response_headers {
        return Err(format!(
            "{} response headers; the limit is {}",
            response.headers.len(),
            limits.response_headers
        ));
    }
    if let Some((name, _)) = response
        .headers
        .iter()
        .find(|(_, value)| value.len() > limits.response_header_bytes)
    {
        return Err(format!(
            "response header '{name}' is longer than {} bytes",
            limits.response_header_bytes
        ));
    }
    Ok(response)
}

fn to_response(value: Value) -> Result<HttpResponse, String> {
    match value {
        Value::Nil => Ok(HttpResponse {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }),
        Value::String(text) => {
            let mut headers = HeaderMap::with_capacity(1);
            headers.insert(CONTENT_TYPE, TEXT_PLAIN.clone());
            Ok(HttpResponse {
                status: StatusCode::OK,
                headers,
                body: Bytes::copy_from_slice(&text.as_bytes()),
            })
        }
        Value::Table(table)
            if table.raw_get::<Value>("statusCode").map_err(lua_err)? != Value::Nil =>
        {
            proxy_response(&table)
        }
        other => {
            let mut body = Vec::with_capacity(64);
            json::encode_value(&other, &mut body).map_err(|e| e.to_string())?;
            let mut headers = HeaderMap::with_capacity(1);
            headers.insert(CONTENT_TYPE, APPLICATION_JSON.clone());
            Ok(HttpResponse {
                status: StatusCode::OK,
                headers,
                body: Bytes::from(body),
            })
        }
    }
}

fn lua_err(error: mlua::Error) -> String {
    error.to_string()
}

/// `{statusCode, headers, multiValueHeaders, body, isBase64Encoded}` → response.
fn proxy_response(table: &Table) -> Result<HttpResponse, String> {
    let status = match table.raw_get::<Value>("statusCode").map_err(lua_err)? {
        Value::Integer(code) => code as f64,
        Value::Number(code) => code,
        Value::String(text) => text
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .ok_or("statusCode must be a number")?,
        other => {
            return Err(format!(
                "statusCode must be a number, got {}",
                other.type_name()
            ));
        }
    };
    if status.fract() != 0.0 || !(100.0..=599.0).contains(&status) {
        return Err(format!(
            "statusCode {status} is not an HTTP status (100-599)"
        ));
    }
    let status = StatusCode::from_u16(status as u16).map_err(|e| e.to_string())?;

    let mut headers = HeaderMap::new();
    match table.raw_get::<Value>("headers").map_err(lua_err)? {
        Value::Nil => {}
        Value::Table(map) => {
            for pair in map.pairs::<mlua::LuaString, Value>() {
                let (name, value) = pair.map_err(|e| format!("headers: {e}"))?;
                let name = header_name(&name)?;
                headers.insert(name.clone(), header_value(&name, &value)?);
            }
        }
        other => {
            return Err(format!(
                "headers must be a table, got {}",
                other.type_name()
            ));
        }
    }
    match table
        .raw_get::<Value>("multiValueHeaders")
        .map_err(lua_err)?
    {
        Value::Nil => {}
        Value::Table(map) => {
            for pair in map.pairs::<mlua::LuaString, Value>() {
                let (name, values) = pair.map_err(|e| format!("multiValueHeaders: {e}"))?;
                let name = header_name(&name)?;
                let Value::Table(values) = values else {
                    return Err(format!("multiValueHeaders.{name} must be a list"));
                };
                headers.remove(&name);
                for value in values.sequence_values::<Value>() {
                    let value = value.map_err(lua_err)?;
                    headers.append(name.clone(), header_value(&name, &value)?);
                }
            }
        }
        other => {
            return Err(format!(
                "multiValueHeaders must be a table, got {}",
                other.type_name()
            ));
        }
    }

    let base64 = matches!(
        table.raw_get::<Value>("isBase64Encoded").map_err(lua_err)?,
        Value::Boolean(true)
    );
    let body = match table.raw_get::<Value>("body").map_err(lua_err)? {
        Value::Nil => Bytes::new(),
        Value::String(text) if base64 => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(&*text.as_bytes())
                .map_err(|e| format!("body is not valid base64: {e}"))?,
        ),
        Value::String(text) => Bytes::copy_from_slice(&text.as_bytes()),
        Value::Number(_) | Value::Integer(_) | Value::Boolean(_) | Value::Table(_) => {
            let value = table.raw_get::<Value>("body").map_err(lua_err)?;
            let mut body = Vec::new();
            json::encode_value(&value, &mut body).map_err(|e| format!("body: {e}"))?;
            if let Value::Table(_) = value {
                headers
                    .entry(CONTENT_TYPE)
                    .or_insert(APPLICATION_JSON.clone());
            }
            Bytes::from(body)
        }
        other => return Err(format!("body must be a string, got {}", other.type_name())),
    };
    if !body.is_empty() {
        headers.entry(CONTENT_TYPE).or_insert(TEXT_PLAIN.clone());
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn header_name(name: &mlua::LuaString) -> Result<HeaderName, String> {
    HeaderName::from_bytes(&name.as_bytes())
        .map_err(|_| format!("invalid header name '{}'", name.to_string_lossy()))
}

fn header_value(name: &HeaderName, value: &Value) -> Result<HeaderValue, String> {
    let text = match value {
        Value::String(s) => {
            return HeaderValue::from_bytes(&s.as_bytes())
                .map_err(|_| format!("invalid value for header '{name}'"));
        }
        Value::Integer(i) => i.to_string(),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => (*n as i64).to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => {
            return Err(format!(
                "header '{name}' must be a string, got {}",
                other.type_name()
            ));
        }
    };
    HeaderValue::from_str(&text).map_err(|_| format!("invalid value for header '{name}'"))
}

/// Keys of a proxy result, in the order a reader expects them.
const RESULT_KEY_ORDER: [&str; 5] = [
    "statusCode",
    "headers",
    "multiValueHeaders",
    "body",
    "isBase64Encoded",
];

/// A direct invocation's result as JSON text. A proxy-shaped result keeps its natural key
/// order (`statusCode` first), so `moontide invoke` prints
/// `{"statusCode":200,"body":"Hello, Ada!"}`; everything else is JSON with sorted keys.
pub(crate) fn direct_result_json(value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64);
    if let Value::Table(table) = value
        && table.raw_get::<Value>("statusCode").map_err(lua_err)? != Value::Nil
        && table.raw_len() == 0
    {
        let mut rest: Vec<(String, Value)> = Vec::new();
        for pair in table.pairs::<Value, Value>() {
            let (key, v) = pair.map_err(lua_err)?;
            match key {
                Value::String(key) => {
                    let key = key.to_str().map_err(lua_err)?.to_string();
                    if !RESULT_KEY_ORDER.contains(&key.as_str()) {
                        rest.push((key, v));
                    }
                }
                other => {
                    return Err(format!(
                        "cannot encode a table key of type {}",
                        other.type_name()
                    ));
                }
            }
        }
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        out.push(b'{');
        let mut first = true;
        let known = RESULT_KEY_ORDER
            .iter()
            .map(|key| table.raw_get::<Value>(*key).map(|v| (key.to_string(), v)))
            .collect::<mlua::Result<Vec<_>>>()
            .map_err(lua_err)?;
        for (key, v) in known
            .into_iter()
            .filter(|(_, v)| *v != Value::Nil)
            .chain(rest)
        {
            if !first {
                out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut out, &key).map_err(|e| e.to_string())?;
            out.push(b':');
            json::encode_value(&v, &mut out).map_err(|e| e.to_string())?;
        }
        out.push(b'}');
        return Ok(out);
    }
    json::encode_value(value, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}
