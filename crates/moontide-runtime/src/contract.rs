//! The function contract of DESIGN.md §1: how an HTTP request becomes the handler's
//! `event` (the AWS API Gateway proxy event, v1) and how the handler's return value becomes
//! an HTTP response or a direct-invocation result.
//!
//! Result rules: a table with `statusCode` is a response (`headers`, `multiValueHeaders`,
//! `body`, `isBase64Encoded`); a string is `200 text/plain`; any other table (or number,
//! boolean) is `200` JSON of that value; `nil` is `204`.
//!
//! Output rules (ARCHITECTURE.md, "Output is capped" and "Tenant output never decides
//! framing"): the status is 200-599; [`FRAMING_HEADERS`] are dropped (the node frames the
//! body) and reported in [`Converted::dropped`]; header names must be tokens and values
//! free of CR, LF and NUL; `multiValueHeaders` wins over `headers` for a name. Every cap
//! in [`Limits`] is checked *before* what it guards is copied out of Lua — header lines are
//! counted before each insert ([`HeaderBudget`]), a body's length before its copy, JSON
//! as it grows — and each has its own [`OutputError`] kind. No value reaches a panic: the
//! fuzz target `fuzz/fuzz_targets/http_output.rs` checks it down to the wire.

use base64::Engine as _;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use mlua::{Lua, LuaString, Table, Value};

use crate::limits::Limits;
use crate::modules::json::{self, LimitCheck};

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

/// Headers that frame a message or belong to one connection (RFC 9110 §7.6.1, RFC 9112 §6,
/// plus the non-standard `Proxy-Connection`). The node decides them — hyper computes the
/// length of the body it is given — never tenant code: a result's are dropped (with one
/// warning line in the function log), and a plugin's filter cannot change a response's.
pub const FRAMING_HEADERS: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The index of `name` in [`FRAMING_HEADERS`] (ASCII case-insensitive).
pub fn framing_header(name: &[u8]) -> Option<usize> {
    FRAMING_HEADERS
        .iter()
        .position(|framing| framing.as_bytes().eq_ignore_ascii_case(name))
}

/// The framing headers dropped from one result (a set of [`FRAMING_HEADERS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped(u8);

impl Dropped {
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn insert(&mut self, index: usize) {
        self.0 |= 1 << index;
    }

    /// The dropped names, in [`FRAMING_HEADERS`] order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        FRAMING_HEADERS
            .iter()
            .enumerate()
            .filter(move |(index, _)| self.0 & (1 << index) != 0)
            .map(|(_, name)| *name)
    }

    /// The warning written to the function log when some were dropped.
    pub fn warning(self, what: &str) -> String {
        let names: Vec<&str> = self.names().collect();
        format!(
            "{what}: dropped {} (framing and connection headers belong to the node, which \
             sets them from the body it sends)",
            names.join(", ")
        )
    }
}

/// A result as a response, and the framing headers dropped from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub response: HttpResponse,
    pub dropped: Dropped,
}

/// Why a result cannot become a response. Every output cap has its own kind
/// ([`OutputError::kind`]); each is checked before the bytes it guards are copied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// Not a valid result: a wrong type, a status outside 200-599, a header name or value
    /// HTTP cannot carry (CR, LF, NUL, a name that is not a token), a body that is not
    /// base64 when `isBase64Encoded` says it is, a body JSON cannot encode.
    #[error("{0}")]
    Invalid(String),
    /// More header lines than the cap.
    #[error("more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    /// Header tables with more entries than the node will look at.
    #[error("the result's header tables have more than {limit} entries")]
    TooManyHeaderEntries { limit: usize },
    /// One header line (name and value) longer than the cap.
    #[error("header {name} is {bytes} bytes (name and value); the limit is {limit}")]
    HeaderTooLong {
        name: String,
        bytes: usize,
        limit: usize,
    },
    /// All header lines together longer than the cap.
    #[error("headers are more than {limit} bytes together")]
    HeadersTooLarge { limit: usize },
    /// A response body (or a direct invocation's JSON result) longer than the cap.
    #[error("body is more than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// One of the above, in a part of the output `what` names (a plugin phase).
    #[error("{what}: {error}")]
    In {
        what: &'static str,
        error: Box<OutputError>,
    },
}

impl OutputError {
    /// Every kind, as [`OutputError::kind`] names them.
    pub const KINDS: [&'static str; 5] = [
        "result",
        "output_header_count",
        "output_header_line",
        "output_header_bytes",
        "output_body",
    ];

    /// The label used in logs and in `moontide_function_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            OutputError::Invalid(_) => "result",
            OutputError::TooManyHeaders { .. } | OutputError::TooManyHeaderEntries { .. } => {
                "output_header_count"
            }
            OutputError::HeaderTooLong { .. } => "output_header_line",
            OutputError::HeadersTooLarge { .. } => "output_header_bytes",
            OutputError::BodyTooLarge { .. } => "output_body",
            OutputError::In { error, .. } => error.kind(),
        }
    }

    /// This error, as met in `what` (e.g. a plugin phase).
    pub fn within(self, what: &'static str) -> OutputError {
        OutputError::In {
            what,
            error: Box::new(self),
        }
    }
}

impl From<String> for OutputError {
    fn from(message: String) -> OutputError {
        OutputError::Invalid(message)
    }
}

impl From<&str> for OutputError {
    fn from(message: &str) -> OutputError {
        OutputError::Invalid(message.to_string())
    }
}

/// A name as it may be shown in a message: quoted, control characters escaped, cut.
pub(crate) fn shown(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(&name[..name.len().min(64)]);
    let cut = if name.len() > 64 { "…" } else { "" };
    format!("'{}{cut}'", text.escape_debug())
}

/// Counts header lines and their bytes against the output caps, before each line is
/// copied: lines ≤ `response_headers`, each line (name + value) ≤ `response_header_bytes`,
/// all lines (`name: value\r\n`) ≤ `response_head_bytes`. Entries looked at (kept, dropped
/// or superseded) are bounded too, so a table of 100 000 headers costs the node a few
/// hundred steps, not 100 000.
pub(crate) struct HeaderBudget<'l> {
    limits: &'l Limits,
    lines: usize,
    bytes: usize,
    entries: usize,
}

impl<'l> HeaderBudget<'l> {
    pub(crate) fn new(limits: &'l Limits) -> HeaderBudget<'l> {
        HeaderBudget {
            limits,
            lines: 0,
            bytes: 0,
            entries: 0,
        }
    }

    /// Most entries looked at: every header given twice (`headers` and
    /// `multiValueHeaders`, as ported Lambda code often does) and then some.
    fn max_entries(&self) -> usize {
        self.limits.response_headers.saturating_mul(4)
    }

    /// One more table entry looked at.
    pub(crate) fn entry(&mut self) -> Result<(), OutputError> {
        self.entries += 1;
        if self.entries > self.max_entries() {
            return Err(OutputError::TooManyHeaderEntries {
                limit: self.max_entries(),
            });
        }
        Ok(())
    }

    /// A name about to be parsed: no longer than a line may be.
    pub(crate) fn name(&self, name: &[u8]) -> Result<(), OutputError> {
        self.check_line(name, 0)
    }

    fn check_line(&self, name: &[u8], value_len: usize) -> Result<(), OutputError> {
        let bytes = name.len().saturating_add(value_len);
        if bytes > self.limits.response_header_bytes {
            return Err(OutputError::HeaderTooLong {
                name: shown(name),
                bytes,
                limit: self.limits.response_header_bytes,
            });
        }
        Ok(())
    }

    /// One more line of `name` with a value of `value_len` bytes.
    pub(crate) fn line(&mut self, name: &[u8], value_len: usize) -> Result<(), OutputError> {
        self.check_line(name, value_len)?;
        if self.lines >= self.limits.response_headers {
            return Err(OutputError::TooManyHeaders {
                limit: self.limits.response_headers,
            });
        }
        let bytes = self.bytes + name.len() + value_len + 4;
        if bytes > self.limits.response_head_bytes {
            return Err(OutputError::HeadersTooLarge {
                limit: self.limits.response_head_bytes,
            });
        }
        self.lines += 1;
        self.bytes = bytes;
        Ok(())
    }
}

/// A response status given by tenant code: an integer in 200-599. 1xx belong to the
/// node's protocol handling (`100 Continue`, `101 Switching Protocols`): hyper would answer
/// a bare 500 for most, and send a 101 to a client that never asked to upgrade.
pub(crate) fn tenant_status(code: f64, what: &str) -> Result<StatusCode, OutputError> {
    if code.fract() != 0.0 || !(200.0..=599.0).contains(&code) {
        return Err(OutputError::Invalid(format!(
            "{what} {code} is not allowed: a status must be 200-599 (1xx statuses belong to \
             the node)"
        )));
    }
    StatusCode::from_u16(code as u16).map_err(|e| OutputError::Invalid(e.to_string()))
}

/// Converts a handler's return value to an HTTP response, within the output caps, with
/// [`FRAMING_HEADERS`] dropped. A table body is encoded under `check_limits` (the call's
/// deadline, which the interrupt no longer watches: see [`json::encode_value_within`]); an
/// error from it ends the conversion as [`OutputError::Invalid`], and the caller, whose
/// check recorded the limit it broke, reports that limit instead. Public for the fuzz
/// target (`fuzz/`).
pub fn http_response(
    value: Value,
    limits: &Limits,
    check_limits: LimitCheck<'_>,
) -> Result<Converted, OutputError> {
    match value {
        Value::Nil => Ok(Converted {
            response: HttpResponse {
                status: StatusCode::NO_CONTENT,
                headers: HeaderMap::new(),
                body: Bytes::new(),
            },
            dropped: Dropped::default(),
        }),
        Value::String(text) => {
            let text = text.as_bytes();
            if text.len() > limits.response_body_bytes {
                return Err(OutputError::BodyTooLarge {
                    limit: limits.response_body_bytes,
                });
            }
            let mut headers = HeaderMap::with_capacity(1);
            headers.insert(CONTENT_TYPE, TEXT_PLAIN.clone());
            Ok(Converted {
                response: HttpResponse {
                    status: StatusCode::OK,
                    headers,
                    body: Bytes::copy_from_slice(&text),
                },
                dropped: Dropped::default(),
            })
        }
        Value::Table(table)
            if table.raw_get::<Value>("statusCode").map_err(lua_err)? != Value::Nil =>
        {
            proxy_response(&table, limits, check_limits)
        }
        other => {
            let body = json_body(&other, limits, check_limits)?;
            let mut headers = HeaderMap::with_capacity(1);
            headers.insert(CONTENT_TYPE, APPLICATION_JSON.clone());
            Ok(Converted {
                response: HttpResponse {
                    status: StatusCode::OK,
                    headers,
                    body: Bytes::from(body),
                },
                dropped: Dropped::default(),
            })
        }
    }
}

/// `value` as JSON within the body cap.
fn json_body(
    value: &Value,
    limits: &Limits,
    check_limits: LimitCheck<'_>,
) -> Result<Vec<u8>, OutputError> {
    let mut body = Vec::with_capacity(64);
    match json::encode_value_within(
        value,
        &mut body,
        limits.response_body_bytes,
        Some(check_limits),
    ) {
        Ok(()) => Ok(body),
        Err(json::JsonError::TooLarge) => Err(OutputError::BodyTooLarge {
            limit: limits.response_body_bytes,
        }),
        Err(error) => Err(OutputError::Invalid(format!("body: {error}"))),
    }
}

fn lua_err(error: mlua::Error) -> OutputError {
    OutputError::Invalid(error.to_string())
}

/// `{statusCode, headers, multiValueHeaders, body, isBase64Encoded}` → response.
fn proxy_response(
    table: &Table,
    limits: &Limits,
    check_limits: LimitCheck<'_>,
) -> Result<Converted, OutputError> {
    let status = match table.raw_get::<Value>("statusCode").map_err(lua_err)? {
        Value::Integer(code) => code as f64,
        Value::Number(code) => code,
        Value::String(text) => text
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .ok_or("statusCode must be a number")?,
        other => {
            return Err(OutputError::Invalid(format!(
                "statusCode must be a number, got {}",
                other.type_name()
            )));
        }
    };
    let status = tenant_status(status, "statusCode")?;

    // multiValueHeaders first: a name it gives wins over the same name in `headers`.
    let mut headers = HeaderMap::new();
    let mut budget = HeaderBudget::new(limits);
    let mut dropped = Dropped::default();
    match table
        .raw_get::<Value>("multiValueHeaders")
        .map_err(lua_err)?
    {
        Value::Nil => {}
        Value::Table(map) => {
            for pair in map.pairs::<LuaString, Value>() {
                let (name, values) =
                    pair.map_err(|e| OutputError::Invalid(format!("multiValueHeaders: {e}")))?;
                budget.entry()?;
                let name = name.as_bytes();
                if let Some(index) = framing_header(&name) {
                    dropped.insert(index);
                    continue;
                }
                let name = header_name(&name, &budget)?;
                let Value::Table(values) = values else {
                    return Err(OutputError::Invalid(format!(
                        "multiValueHeaders.{name} must be a list"
                    )));
                };
                for value in values.sequence_values::<Value>() {
                    let value = value.map_err(lua_err)?;
                    let value = header_value(&name, &value, &mut budget)?;
                    headers.append(name.clone(), value);
                }
            }
        }
        other => {
            return Err(OutputError::Invalid(format!(
                "multiValueHeaders must be a table, got {}",
                other.type_name()
            )));
        }
    }
    match table.raw_get::<Value>("headers").map_err(lua_err)? {
        Value::Nil => {}
        Value::Table(map) => {
            for pair in map.pairs::<LuaString, Value>() {
                let (name, value) =
                    pair.map_err(|e| OutputError::Invalid(format!("headers: {e}")))?;
                budget.entry()?;
                let name = name.as_bytes();
                if let Some(index) = framing_header(&name) {
                    dropped.insert(index);
                    continue;
                }
                let name = header_name(&name, &budget)?;
                // Given in multiValueHeaders, or twice here in different cases ("X-A" and
                // "x-a"; `pairs` order decides which): the first one stays.
                if headers.contains_key(&name) {
                    continue;
                }
                let value = header_value(&name, &value, &mut budget)?;
                headers.insert(name, value);
            }
        }
        other => {
            return Err(OutputError::Invalid(format!(
                "headers must be a table, got {}",
                other.type_name()
            )));
        }
    }

    let base64 = matches!(
        table.raw_get::<Value>("isBase64Encoded").map_err(lua_err)?,
        Value::Boolean(true)
    );
    let limit = limits.response_body_bytes;
    let too_large = OutputError::BodyTooLarge { limit };
    let body = match table.raw_get::<Value>("body").map_err(lua_err)? {
        Value::Nil => Bytes::new(),
        Value::String(text) if base64 => {
            let text = text.as_bytes();
            // 4 base64 characters are 3 bytes: refuse before decoding what cannot fit.
            if (text.len() / 4).saturating_mul(3) > limit.saturating_add(3) {
                return Err(too_large);
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(&*text)
                .map_err(|e| OutputError::Invalid(format!("body is not valid base64: {e}")))?;
            if decoded.len() > limit {
                return Err(too_large);
            }
            Bytes::from(decoded)
        }
        Value::String(text) => {
            let text = text.as_bytes();
            if text.len() > limit {
                return Err(too_large);
            }
            Bytes::copy_from_slice(&text)
        }
        value @ (Value::Number(_) | Value::Integer(_) | Value::Boolean(_) | Value::Table(_)) => {
            let body = json_body(&value, limits, check_limits)?;
            if let Value::Table(_) = value {
                headers
                    .entry(CONTENT_TYPE)
                    .or_insert(APPLICATION_JSON.clone());
            }
            Bytes::from(body)
        }
        other => {
            return Err(OutputError::Invalid(format!(
                "body must be a string, got {}",
                other.type_name()
            )));
        }
    };
    if !body.is_empty() {
        headers.entry(CONTENT_TYPE).or_insert(TEXT_PLAIN.clone());
    }
    Ok(Converted {
        response: HttpResponse {
            status,
            headers,
            body,
        },
        dropped,
    })
}

/// A header name given by tenant code: a token (RFC 9110 §5.6.2), lower-cased.
pub(crate) fn header_name(
    name: &[u8],
    budget: &HeaderBudget<'_>,
) -> Result<HeaderName, OutputError> {
    budget.name(name)?;
    HeaderName::from_bytes(name).map_err(|_| {
        OutputError::Invalid(format!(
            "invalid header name {}: a name is a token (letters, digits and \
             !#$%&'*+-.^_`|~), without spaces, colons, CR, LF or NUL",
            shown(name)
        ))
    })
}

/// A header value given by tenant code (a string, or a number or boolean as text), counted
/// in `budget` before it is copied.
pub(crate) fn header_value(
    name: &HeaderName,
    value: &Value,
    budget: &mut HeaderBudget<'_>,
) -> Result<HeaderValue, OutputError> {
    let invalid = || {
        OutputError::Invalid(format!(
            "invalid value for header '{name}': CR, LF, NUL and other control characters \
             are not allowed"
        ))
    };
    let text = match value {
        Value::String(s) => {
            let bytes = s.as_bytes();
            budget.line(name.as_str().as_bytes(), bytes.len())?;
            return HeaderValue::from_bytes(&bytes).map_err(|_| invalid());
        }
        Value::Integer(i) => i.to_string(),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => (*n as i64).to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => {
            return Err(OutputError::Invalid(format!(
                "header '{name}' must be a string, got {}",
                other.type_name()
            )));
        }
    };
    budget.line(name.as_str().as_bytes(), text.len())?;
    HeaderValue::from_str(&text).map_err(|_| invalid())
}

/// Keys of a proxy result, in the order a reader expects them.
const RESULT_KEY_ORDER: [&str; 5] = [
    "statusCode",
    "headers",
    "multiValueHeaders",
    "body",
    "isBase64Encoded",
];

/// A direct invocation's result as JSON text, at most `limit` bytes. A proxy-shaped result
/// keeps its natural key order (`statusCode` first), so `moontide invoke` prints
/// `{"statusCode":200,"body":"Hello, Ada!"}`; everything else is JSON with sorted keys.
/// Encoded under `check_limits`, as [`http_response`] is.
pub(crate) fn direct_result_json(
    value: &Value,
    limit: usize,
    check_limits: LimitCheck<'_>,
) -> Result<Vec<u8>, OutputError> {
    let too_large = |error: json::JsonError| match error {
        json::JsonError::TooLarge => OutputError::BodyTooLarge { limit },
        other => OutputError::Invalid(other.to_string()),
    };
    let mut out = Vec::with_capacity(64);
    if let Value::Table(table) = value
        && table.raw_get::<Value>("statusCode").map_err(lua_err)? != Value::Nil
        && table.raw_len() == 0
    {
        let mut rest: Vec<(LuaString, Value)> = Vec::new();
        for pair in table.pairs::<Value, Value>() {
            let (key, v) = pair.map_err(lua_err)?;
            match key {
                Value::String(key) => {
                    let known = RESULT_KEY_ORDER
                        .iter()
                        .any(|k| k.as_bytes() == &*key.as_bytes());
                    if !known {
                        rest.push((key, v));
                    }
                }
                other => {
                    return Err(OutputError::Invalid(format!(
                        "cannot encode a table key of type {}",
                        other.type_name()
                    )));
                }
            }
        }
        rest.sort_by_key(|(key, _)| key.as_bytes());
        out.push(b'{');
        let mut first = true;
        let mut known = Vec::with_capacity(RESULT_KEY_ORDER.len());
        for key in RESULT_KEY_ORDER {
            let v = table.raw_get::<Value>(key).map_err(lua_err)?;
            if v != Value::Nil {
                known.push((key, v));
            }
        }
        let known = known.into_iter().map(|(key, v)| (Err(key), v));
        let rest = rest.into_iter().map(|(key, v)| (Ok(key), v));
        for (key, v) in known.chain(rest) {
            if !first {
                out.push(b',');
            }
            first = false;
            match key {
                // The known keys need no escaping.
                Err(known) => {
                    out.push(b'"');
                    out.extend_from_slice(known.as_bytes());
                    out.push(b'"');
                }
                Ok(key) => {
                    let room = limit.saturating_sub(out.len());
                    json::encode_value_within(&Value::String(key), &mut out, room, None)
                        .map_err(too_large)?;
                }
            }
            out.push(b':');
            let room = limit.saturating_sub(out.len());
            json::encode_value_within(&v, &mut out, room, Some(check_limits)).map_err(too_large)?;
        }
        out.push(b'}');
        if out.len() > limit {
            return Err(OutputError::BodyTooLarge { limit });
        }
        return Ok(out);
    }
    json::encode_value_within(value, &mut out, limit, Some(check_limits)).map_err(too_large)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::json::no_limits;

    fn convert(source: &str) -> Result<Converted, OutputError> {
        convert_with(source, &Limits::default())
    }

    fn convert_with(source: &str, limits: &Limits) -> Result<Converted, OutputError> {
        let lua = Lua::new();
        let value: Value = lua.load(source).eval().expect("the result evaluates");
        http_response(value, limits, &no_limits)
    }

    fn kind(result: Result<Converted, OutputError>) -> &'static str {
        match result {
            Ok(converted) => panic!("accepted: {:?}", converted.response),
            Err(error) => error.kind(),
        }
    }

    /// 100 000 headers used to panic the worker inside `HeaderMap` (its maximum is 32 768
    /// entries); the cap was checked only after inserting them all.
    #[test]
    fn a_header_flood_is_refused_before_it_is_copied() {
        for source in [
            "local h = {} for i = 1, 100000 do h['x-h' .. i] = 'v' end
             return { statusCode = 200, headers = h }",
            "local v = {} for i = 1, 100000 do v[i] = 'v' end
             return { statusCode = 200, multiValueHeaders = { ['x-a'] = v } }",
            "local m = {} for i = 1, 40000 do m['x-h' .. i] = { 'a', 'b' } end
             return { statusCode = 200, multiValueHeaders = m }",
        ] {
            let error = convert(source).unwrap_err();
            assert_eq!(error, OutputError::TooManyHeaders { limit: 100 });
            assert_eq!(error.kind(), "output_header_count");
        }
        // Entries that are dropped or superseded are bounded too: case variants of a
        // framing header, of a name multiValueHeaders gives.
        let variants = "local function variant(name, i)
               local out = {}
               for c = 1, #name do
                 local ch = name:sub(c, c)
                 if bit32.extract(i, (c - 1) % 20) == 1 then ch = ch:upper() end
                 out[c] = ch
               end
               return table.concat(out)
             end";
        for (name, multi) in [
            ("transfer-encoding", "{}"),
            ("x-abcdefghijklmnop", "{ 'v' }"),
        ] {
            let source = format!(
                "{variants}
                 local h = {{}} for i = 0, 5000 do h[variant('{name}', i)] = 'v' end
                 return {{ statusCode = 200, headers = h,
                          multiValueHeaders = {{ ['{name}'] = {multi} }} }}"
            );
            assert_eq!(
                convert(&source).unwrap_err(),
                OutputError::TooManyHeaderEntries { limit: 400 }
            );
        }
        // At the cap: fine.
        let converted = convert(
            "local h = {} for i = 1, 100 do h['x-h' .. i] = 'v' end
             return { statusCode = 200, headers = h }",
        )
        .unwrap();
        assert_eq!(converted.response.headers.len(), 100);
    }

    #[test]
    fn framing_headers_are_dropped_and_named() {
        let converted = convert(
            "return { statusCode = 200, body = 'HTTP/1.1 200 OK\\r\\n\\r\\n',
                      headers = { ['Content-Length'] = 0, ['Transfer-Encoding'] = 'chunked',
                                  Connection = 'close', ['Keep-Alive'] = 'timeout=5',
                                  Upgrade = 'h2c', TE = 'trailers', Trailer = 'x-t',
                                  ['Proxy-Connection'] = 'close', ['x-ok'] = 'yes' },
                      multiValueHeaders = { ['content-length'] = { '1', '2' } } }",
        )
        .unwrap();
        let names: Vec<&str> = converted
            .response
            .headers
            .keys()
            .map(|n| n.as_str())
            .collect();
        assert_eq!(names, ["x-ok", "content-type"]);
        assert_eq!(
            converted.dropped.names().collect::<Vec<_>>(),
            FRAMING_HEADERS
        );
        assert!(
            converted
                .dropped
                .warning("result")
                .starts_with("result: dropped connection, content-length, keep-alive, ")
        );
        let clean = convert("return { statusCode = 200, headers = { ['x-a'] = '1' } }").unwrap();
        assert!(clean.dropped.is_empty());
    }

    /// 100/199 answered a bare 500 without the request id (hyper's answer to a 1xx), 101
    /// switched protocols on a request that never asked to.
    #[test]
    fn statuses_must_be_200_to_599() {
        for status in [
            "100", "101", "103", "199", "0", "-1", "600", "1e300", "200.5", "0/0", "1/0", "'101'",
        ] {
            let result = convert(&format!("return {{ statusCode = {status} }}"));
            match result {
                Err(OutputError::Invalid(message)) => {
                    assert!(message.contains("is not allowed"), "{status}: {message}")
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        for (status, expected) in [("200", 200), ("599", 599), ("' 404 '", 404), ("204.0", 204)] {
            let converted = convert(&format!("return {{ statusCode = {status} }}")).unwrap();
            assert_eq!(converted.response.status, expected);
        }
        assert_eq!(
            kind(convert("return { statusCode = 'abc' }")),
            "result",
            "a string that is not a number"
        );
    }

    #[test]
    fn header_names_and_values_http_cannot_carry_are_errors() {
        for headers in [
            "{ ['x-a'] = 'a\\r\\nset-cookie: evil=1' }",
            "{ ['x-a'] = 'a\\nb' }",
            "{ ['x-a'] = 'a\\0b' }",
            "{ ['x-a'] = 'a\\127' }",
            "{ ['x a'] = 'v' }",
            "{ ['x-a:'] = 'v' }",
            "{ ['x-a\\r\\n'] = 'v' }",
            "{ [''] = 'v' }",
            "{ ['x-\\0'] = 'v' }",
            "{ ['x-a'] = {} }",
            "{ ['x-a'] = true and function() end }",
        ] {
            let source = format!("return {{ statusCode = 200, headers = {headers} }}");
            assert_eq!(kind(convert(&source)), "result", "{headers}");
            let source = format!(
                "local h = {headers} local m = {{}}
                 for k, v in pairs(h) do m[k] = {{ v }} end
                 return {{ statusCode = 200, multiValueHeaders = m }}"
            );
            assert_eq!(kind(convert(&source)), "result", "multi {headers}");
        }
        // Names are shown escaped in the message.
        let error =
            convert("return { statusCode = 200, headers = { ['x a\\r\\n'] = 'v' } }").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("invalid header name 'x a\\r\\n'"),
            "{error}"
        );
        // Numbers and booleans are text; obs-text bytes (>= 0x80) are allowed.
        let converted = convert(
            "return { statusCode = 200, headers = { ['x-n'] = 42, ['x-b'] = false,
                                                    ['x-l'] = 'caf\\233' } }",
        )
        .unwrap();
        assert_eq!(converted.response.headers["x-n"], "42");
        assert_eq!(converted.response.headers["x-b"], "false");
        assert_eq!(converted.response.headers["x-l"].as_bytes(), b"caf\xe9");
    }

    #[test]
    fn one_line_and_all_lines_are_capped() {
        assert_eq!(
            convert(
                "return { statusCode = 200, headers = { ['x-long'] = string.rep('v', 9000) } }"
            )
            .unwrap_err(),
            OutputError::HeaderTooLong {
                name: "'x-long'".into(),
                bytes: 9006,
                limit: 8192
            }
        );
        // A name alone can be too long (before it is parsed).
        let long_name =
            convert("return { statusCode = 200, headers = { [string.rep('n', 70000)] = 'v' } }");
        assert_eq!(kind(long_name), "output_header_line");
        assert_eq!(
            kind(convert(
                "local h = {} for i = 1, 100 do h['x-h' .. i] = string.rep('v', 1000) end
                 return { statusCode = 200, headers = h }"
            )),
            "output_header_bytes"
        );
        // 8 KiB lines: fine one by one, and 7 of them fit in 64 KiB.
        let converted = convert(
            "local h = {} for i = 1, 7 do h['x-h' .. i] = string.rep('v', 8000) end
             return { statusCode = 200, headers = h }",
        )
        .unwrap();
        assert_eq!(converted.response.headers.len(), 7);
    }

    #[test]
    fn multi_value_headers_win_and_are_counted_once() {
        let converted = convert(
            "return { statusCode = 200, headers = { ['x-a'] = '1', ['x-b'] = '1' },
                      multiValueHeaders = { ['X-A'] = { '2', '3' } } }",
        )
        .unwrap();
        let values: Vec<_> = converted.response.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["2", "3"]);
        assert_eq!(converted.response.headers["x-b"], "1");
        // Ported Lambda code often gives every header in both tables.
        let converted = convert(
            "local h, m = {}, {}
             for i = 1, 90 do h['x-h' .. i] = 'v' m['x-h' .. i] = { 'v' } end
             return { statusCode = 200, headers = h, multiValueHeaders = m }",
        )
        .unwrap();
        assert_eq!(converted.response.headers.len(), 90);
    }

    #[test]
    fn bodies_are_capped_before_they_are_copied() {
        let limits = Limits {
            response_body_bytes: 1024,
            ..Limits::default()
        };
        let too_large = OutputError::BodyTooLarge { limit: 1024 };
        for source in [
            "return string.rep('x', 1025)",
            "return { statusCode = 200, body = string.rep('x', 1025) }",
            // 1368 base64 characters are 1026 bytes.
            "return { statusCode = 200, isBase64Encoded = true,
                      body = string.rep('QUFB', 342) }",
            // Refused before decoding: far more than the cap.
            "return { statusCode = 200, isBase64Encoded = true,
                      body = string.rep('QUFB', 100000) }",
            "return { statusCode = 200, body = { string.rep('x', 2000) } }",
            // Escaping makes JSON longer than its string: refused as it grows.
            "return { statusCode = 200, body = { string.rep('\\1', 300) } }",
            "return { data = string.rep('x', 2000) }",
            "local t = {} for i = 1, 1000 do t[i] = i end return t",
        ] {
            assert_eq!(
                convert_with(source, &limits).unwrap_err(),
                too_large,
                "{source}"
            );
        }
        let fits = convert_with(
            "return { statusCode = 200, isBase64Encoded = true, body = string.rep('QUFB', 341) }",
            &limits,
        )
        .unwrap();
        assert_eq!(fits.response.body.len(), 1023);
        assert_eq!(
            kind(convert(
                "return { statusCode = 200, isBase64Encoded = true, body = 'not base64!' }"
            )),
            "result"
        );
    }

    #[test]
    fn direct_results_are_capped() {
        let lua = Lua::new();
        let eval = |source: &str| lua.load(source).eval::<Value>().unwrap();
        let value = eval("return { statusCode = 200, body = 'hi', extra = 1 }");
        assert_eq!(
            direct_result_json(&value, 1024, &no_limits).unwrap(),
            br#"{"statusCode":200,"body":"hi","extra":1}"#
        );
        assert_eq!(
            direct_result_json(&value, 20, &no_limits).unwrap_err(),
            OutputError::BodyTooLarge { limit: 20 }
        );
        let value = eval("return { statusCode = 200, [string.rep('\\1', 100)] = 1 }");
        assert_eq!(
            direct_result_json(&value, 300, &no_limits).unwrap_err(),
            OutputError::BodyTooLarge { limit: 300 }
        );
        let value = eval("return { a = string.rep('x', 100) }");
        assert_eq!(
            direct_result_json(&value, 50, &no_limits).unwrap_err(),
            OutputError::BodyTooLarge { limit: 50 }
        );
        assert_eq!(
            direct_result_json(&eval("return function() end"), 50, &no_limits)
                .unwrap_err()
                .kind(),
            "result"
        );
    }
}
