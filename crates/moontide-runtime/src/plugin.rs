//! Plugins: Lua code that runs at a gateway route's request phases, in the same sandbox
//! and under the same limits as functions (one [`Instance`] per state; only what `main.lua`
//! returns differs).
//!
//! A plugin's `main.lua` returns a table whose keys are phase names and whose values are
//! functions; any subset of the five phases, at least one:
//!
//! ```lua
//! local M = {}
//! function M.rewrite(req, ctx) end          -- change the request
//! function M.access(req, ctx) end           -- allow, or end the request with a response
//! function M.header_filter(res, ctx) end    -- change the status and headers
//! function M.body_filter(res, ctx) end      -- change the whole body
//! function M.log(req, res, ctx) end         -- after the response is on its way
//! return M
//! ```
//!
//! - `req` ([`PluginRequest`]): `method`, `path` (as received, percent-encoded), `query`
//!   (name → string; the last of repeated names), `headers` (lower-cased name → string;
//!   repeats joined with `", "`), `body` (string, maybe empty), `client_ip`, `params` (the
//!   route's path parameters). In `rewrite` and `access` every field but `client_ip` may
//!   be changed in place; the changes are what the next plugin and the target see. A
//!   header left as it was keeps all its original values (e.g. several `Cookie` lines).
//! - `rewrite`/`access` return `nil` to go on, or a response table (`{statusCode,
//!   headers, body}`, as a function's result) to end the request with it.
//! - `res` ([`PluginResponse`]): `status`, `headers` (changeable in both filters) and, in
//!   `body_filter`, `body`: the *whole* body as one string (the gateway buffers it), not
//!   one call per chunk. In `log`, `res.body` is there only if the body was buffered.
//! - `ctx` ([`PluginCtx`]): one table per request and plugin, shared by all the plugin's
//!   phases of that request (like `ngx.ctx`), with `conf` (the route's config object for
//!   this plugin), `plugin_name`, `route`, `request_id`, `log`, `env`, `remaining_ms`.
//!   Each phase call has its own deadline (`remaining_ms` is for the running phase).
//!
//! Return values of the filters and `log` are ignored.
//!
//! What a phase returns or sets is tenant output, under the function contract's rules
//! ([`crate::contract`]): a response `rewrite`/`access` ends the request with is converted
//! like a function's result; headers a phase sets in `req.headers`/`res.headers` are
//! counted against the output caps before they are copied (lines left as they were are
//! not); framing headers ([`FRAMING_HEADERS`]) stay exactly as they were whatever a phase
//! does, with one warning line when it tried; `res.status` may stay what it was (a 101
//! included) or become another status in 200-599; a new `res.body` or `req.body` is capped
//! like a response body.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use mlua::{Function, Lua, LuaString, Table, Value};

use crate::contract::{
    self, Dropped, FRAMING_HEADERS, HeaderBudget, HttpResponse, OutputError, framing_header,
    header_name,
};
use crate::instance::{CallError, Entry, Instance, classify, copy_table};
use crate::limits::Limits;
use crate::modules::json;

/// A request phase, in the order phases run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Rewrite,
    Access,
    HeaderFilter,
    BodyFilter,
    Log,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Rewrite,
        Phase::Access,
        Phase::HeaderFilter,
        Phase::BodyFilter,
        Phase::Log,
    ];

    /// The name of the phase's key in the plugin's table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::HeaderFilter => "header_filter",
            Phase::BodyFilter => "body_filter",
            Phase::Log => "log",
        }
    }

    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|phase| phase.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

const PHASE_LIST: &str = "rewrite, access, header_filter, body_filter, log";

/// The set of phases a plugin defines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phases(u8);

impl Phases {
    pub fn has(self, phase: Phase) -> bool {
        self.0 & (1 << phase.index()) != 0
    }

    pub fn insert(&mut self, phase: Phase) {
        self.0 |= 1 << phase.index();
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The phase names, in phase order.
    pub fn names(self) -> Vec<&'static str> {
        Phase::ALL
            .into_iter()
            .filter(|phase| self.has(*phase))
            .map(Phase::name)
            .collect()
    }

    /// From phase names (unknown names are ignored).
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Phases {
        let mut phases = Phases::default();
        for phase in names.into_iter().filter_map(Phase::from_name) {
            phases.insert(phase);
        }
        phases
    }
}

/// The phase functions a plugin's init returned.
pub(crate) struct PluginPhases {
    functions: [Option<Function>; 5],
}

impl PluginPhases {
    /// Checks what a plugin's `main.lua` returned: a table of phase name → function.
    pub(crate) fn from_value(value: Value) -> Result<PluginPhases, String> {
        let table = match value {
            Value::Table(table) => table,
            other => {
                return Err(format!(
                    "a plugin's main.lua must return a table of phase functions ({PHASE_LIST}), \
                     got {}",
                    json::lua_type_name(&other)
                ));
            }
        };
        let mut functions: [Option<Function>; 5] = Default::default();
        for pair in table.pairs::<Value, Value>() {
            let (key, value) = pair.map_err(|e| e.to_string())?;
            let name = match &key {
                Value::String(name) => name.to_string_lossy(),
                other => {
                    return Err(format!(
                        "the plugin table has a {} key; its keys must be phase names ({PHASE_LIST})",
                        json::lua_type_name(other)
                    ));
                }
            };
            let Some(phase) = Phase::from_name(&name) else {
                return Err(format!(
                    "unknown phase '{name}' in the plugin table; the phases are {PHASE_LIST}"
                ));
            };
            let Value::Function(function) = value else {
                return Err(format!(
                    "phase '{name}' must be a function, got {}",
                    json::lua_type_name(&value)
                ));
            };
            functions[phase.index()] = Some(function);
        }
        if functions.iter().all(Option::is_none) {
            return Err(format!(
                "the plugin table defines no phase; give at least one of {PHASE_LIST}"
            ));
        }
        Ok(PluginPhases { functions })
    }

    fn phases(&self) -> Phases {
        let mut phases = Phases::default();
        for phase in Phase::ALL {
            if self.functions[phase.index()].is_some() {
                phases.insert(phase);
            }
        }
        phases
    }

    fn get(&self, phase: Phase) -> Option<&Function> {
        self.functions[phase.index()].as_ref()
    }
}

/// The request as plugins see and change it.
#[derive(Debug, Clone)]
pub struct PluginRequest {
    pub method: Method,
    /// As received (percent-encoded).
    pub path: String,
    /// The raw query string, without `?`.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub client_ip: String,
    /// The route's path parameters.
    pub params: Vec<(String, String)>,
}

impl PluginRequest {
    /// `path?query`, as a URI's path and query.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(query) if !query.is_empty() => format!("{}?{query}", self.path),
            _ => self.path.clone(),
        }
    }
}

/// The response as filters see and change it.
#[derive(Debug, Clone)]
pub struct PluginResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The whole body, when the gateway buffered it (a `body_filter` runs on the route, or
    /// the response was made by the gateway or a function).
    pub body: Option<Bytes>,
}

/// One plugin's `ctx` for one request: lives in the plugin's instance as long as the
/// request holds its share of that instance.
pub struct PluginCtx(Table);

/// What a plugin's `ctx` says about the request.
pub struct CtxInfo<'a> {
    pub plugin_name: &'a str,
    pub route: &'a str,
    pub request_id: &'a str,
    /// The route's config object for this plugin (`ctx.conf`; an empty table if none).
    pub conf: Option<&'a serde_json::Value>,
}

impl Instance {
    /// The phases this instance's plugin defines (none for a function).
    pub fn phases(&self) -> Phases {
        match &self.entry {
            Entry::Plugin(phases) => phases.phases(),
            Entry::Handler(_) => Phases::default(),
        }
    }

    /// A fresh `ctx` for one request of this plugin.
    pub fn plugin_ctx(&self, info: &CtxInfo<'_>) -> Result<PluginCtx, CallError> {
        let lua = &self.lua;
        let build = || -> mlua::Result<Table> {
            let ctx = copy_table(lua, &self.ctx_template)?;
            ctx.raw_set("plugin_name", info.plugin_name)?;
            ctx.raw_set("route", info.route)?;
            ctx.raw_set("request_id", info.request_id)?;
            let conf = match info.conf {
                Some(conf) => json::json_to_lua(lua, conf)?,
                None => Value::Table(lua.create_table()?),
            };
            ctx.raw_set("conf", conf)?;
            Ok(ctx)
        };
        build().map(PluginCtx).map_err(|e| classify(&e))
    }

    /// Runs `rewrite` or `access`: applies the plugin's changes to `request`; `Some` is the
    /// response the plugin ended the request with. A phase the plugin lacks does nothing.
    pub async fn request_phase(
        &self,
        phase: Phase,
        ctx: &PluginCtx,
        request: &mut PluginRequest,
        request_id: &str,
    ) -> Result<Option<HttpResponse>, CallError> {
        let Some(function) = self.phase_function(phase) else {
            return Ok(None);
        };
        let table = request_table(&self.lua, request).map_err(|e| classify(&e))?;
        let args = (table.clone(), ctx.0.clone());
        let deadline = self.deadline_from_now();
        let value = self
            .run(move || function.call_async::<Value>(args), request_id)
            .await?;
        let dropped = apply_request(&table, request, &self.limits)
            .map_err(|error| self.bad_result(error.within(phase.name())))?;
        self.warn_dropped(dropped, phase, "req.headers");
        match value {
            Value::Nil => Ok(None),
            Value::Table(ref response)
                if response
                    .raw_get::<Value>("statusCode")
                    .is_ok_and(|v| !v.is_nil()) =>
            {
                let converted = self
                    .converting_output(deadline, |check_limits| {
                        contract::http_response(value, &self.limits, check_limits)
                    })?
                    .map_err(|error| error.within(phase.name()));
                self.converted(converted, phase.name()).map(Some)
            }
            other => Err(self.bad_result(format!(
                "{} must return nil (go on) or a response table with statusCode, got {}",
                phase.name(),
                json::lua_type_name(&other)
            ))),
        }
    }

    /// Runs `header_filter` or `body_filter` on `response`.
    pub async fn filter_phase(
        &self,
        phase: Phase,
        ctx: &PluginCtx,
        response: &mut PluginResponse,
        request_id: &str,
    ) -> Result<(), CallError> {
        let Some(function) = self.phase_function(phase) else {
            return Ok(());
        };
        let table = response_table(&self.lua, response).map_err(|e| classify(&e))?;
        let args = (table.clone(), ctx.0.clone());
        self.run(move || function.call_async::<Value>(args), request_id)
            .await?;
        let dropped = apply_response(&table, response, &self.limits)
            .map_err(|error| self.bad_result(error.within(phase.name())))?;
        self.warn_dropped(dropped, phase, "res.headers");
        Ok(())
    }

    /// One warning line when a phase's changes to framing headers were dropped.
    fn warn_dropped(&self, dropped: Dropped, phase: Phase, what: &str) {
        if !dropped.is_empty() {
            let context = format!("{}: {what}", phase.name());
            self.emit_log
                .emit(crate::LogLevel::Warn, &dropped.warning(&context));
        }
    }

    /// Runs `log` with the request as it went on and the response as it went out.
    pub async fn log_phase(
        &self,
        ctx: &PluginCtx,
        request: &PluginRequest,
        response: &PluginResponse,
        request_id: &str,
    ) -> Result<(), CallError> {
        let Some(function) = self.phase_function(Phase::Log) else {
            return Ok(());
        };
        let req = request_table(&self.lua, request).map_err(|e| classify(&e))?;
        let res = response_table(&self.lua, response).map_err(|e| classify(&e))?;
        let args = (req, res, ctx.0.clone());
        self.run(move || function.call_async::<Value>(args), request_id)
            .await
            .map(drop)
    }

    fn phase_function(&self, phase: Phase) -> Option<Function> {
        match &self.entry {
            Entry::Plugin(phases) => phases.get(phase).cloned(),
            Entry::Handler(_) => None,
        }
    }
}

fn headers_table(lua: &Lua, headers: &HeaderMap) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, headers.keys_len())?;
    for name in headers.keys() {
        table.raw_set(name.as_str(), lua.create_string(joined(headers, name))?)?;
    }
    Ok(table)
}

/// Every value of `name`, as text, joined with `", "`.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, value) in headers.get_all(name).iter().enumerate() {
        if index > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(&contract::header_text(value));
    }
    out
}

fn request_table(lua: &Lua, request: &PluginRequest) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 8)?;
    table.raw_set("method", request.method.as_str())?;
    table.raw_set("path", request.path.as_str())?;
    let query = lua.create_table()?;
    if let Some(raw) = &request.query {
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            query.raw_set(lua.create_string(&*name)?, lua.create_string(&*value)?)?;
        }
    }
    table.raw_set("query", query)?;
    table.raw_set("headers", headers_table(lua, &request.headers)?)?;
    table.raw_set("body", lua.create_string(&request.body)?)?;
    table.raw_set("client_ip", request.client_ip.as_str())?;
    let params = lua.create_table_with_capacity(0, request.params.len())?;
    for (name, value) in &request.params {
        params.raw_set(name.as_str(), value.as_str())?;
    }
    table.raw_set("params", params)?;
    Ok(table)
}

fn response_table(lua: &Lua, response: &PluginResponse) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, 3)?;
    table.raw_set("status", response.status.as_u16())?;
    table.raw_set("headers", headers_table(lua, &response.headers)?)?;
    if let Some(body) = &response.body {
        table.raw_set("body", lua.create_string(body)?)?;
    }
    Ok(table)
}

fn field(table: &Table, name: &str) -> Result<Value, String> {
    table.raw_get::<Value>(name).map_err(|e| e.to_string())
}

/// A string field (borrowed from Lua, not copied), or a number as text; `None` when nil.
fn text(value: &Value, what: &str) -> Result<Option<Text>, OutputError> {
    let owned = |text: String| Ok(Some(Text::Owned(text.into_bytes())));
    match value {
        Value::Nil => Ok(None),
        Value::String(s) => Ok(Some(Text::Lua(s.as_bytes()))),
        Value::Integer(i) => owned(i.to_string()),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => owned((*n as i64).to_string()),
        Value::Number(n) => owned(n.to_string()),
        other => Err(OutputError::Invalid(format!(
            "{what} must be a string, got {}",
            json::lua_type_name(other)
        ))),
    }
}

/// Text read from a Lua value: a Lua string's bytes in place, or a number's digits.
enum Text {
    Lua(mlua::BorrowedBytes),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Text {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Text::Lua(bytes) => bytes,
            Text::Owned(bytes) => bytes,
        }
    }
}

/// `value` as a table, `None` for nil; anything else is an error naming `what`.
fn optional_table<'v>(value: &'v Value, what: &str) -> Result<Option<&'v Table>, OutputError> {
    match value {
        Value::Nil => Ok(None),
        Value::Table(table) => Ok(Some(table)),
        other => Err(OutputError::Invalid(format!(
            "{what} must be a table, got {}",
            json::lua_type_name(other)
        ))),
    }
}

fn string_map(value: &Value, what: &str) -> Result<Vec<(String, String)>, OutputError> {
    let Some(table) = optional_table(value, what)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in table.pairs::<LuaString, Value>() {
        let (name, value) = pair.map_err(|e| format!("{what}: {e}"))?;
        let name = name
            .to_str()
            .map_err(|_| format!("{what}: names must be UTF-8"))?;
        let value = text(&value, &format!("{what}.{}", &*name))?;
        let value = std::str::from_utf8(value.as_deref().unwrap_or_default())
            .map_err(|_| format!("{what}.{}: must be UTF-8", &*name))?
            .to_string();
        out.push((name.to_string(), value));
    }
    out.sort();
    Ok(out)
}

/// Reads headers back from Lua. A name whose text is unchanged keeps all its original
/// values (several `Cookie` lines stay several); names left out are removed. What the
/// phase *sets* is counted against the output caps before it is copied (lines kept as they
/// were are not: they were bounded when they were parsed), and when a name is given twice
/// in different cases, a changed value wins over an unchanged one and the first changed
/// one wins over the rest. [`FRAMING_HEADERS`] stay exactly as they were: the returned
/// set names those the phase tried to change or add.
fn read_headers(
    value: &Value,
    original: &HeaderMap,
    what: &'static str,
    limits: &Limits,
) -> Result<(HeaderMap, Dropped), OutputError> {
    let mut out = HeaderMap::new();
    let mut dropped = Dropped::default();
    if let Some(table) = optional_table(value, what)? {
        read_header_table(table, original, limits, &mut out, &mut dropped)
            .map_err(|error| error.within(what))?;
    }
    // Framing headers are the node's: exactly the original ones, whatever the phase did.
    for name in FRAMING_HEADERS {
        out.remove(name);
        for original_value in original.get_all(name) {
            out.append(HeaderName::from_static(name), original_value.clone());
        }
    }
    Ok((out, dropped))
}

/// [`read_headers`]'s walk of the table.
fn read_header_table(
    table: &Table,
    original: &HeaderMap,
    limits: &Limits,
    out: &mut HeaderMap,
    dropped: &mut Dropped,
) -> Result<(), OutputError> {
    let mut budget = HeaderBudget::new(limits);
    let mut changed: Vec<HeaderName> = Vec::new();
    for pair in table.pairs::<LuaString, Value>() {
        let (name, value) = pair.map_err(|e| e.to_string())?;
        let name = header_name(&name.as_bytes(), &budget)?;
        let Some(value) = text(&value, name.as_str())? else {
            continue;
        };
        let unchanged = original.contains_key(&name) && joined(original, &name) == *value;
        if unchanged {
            if !out.contains_key(&name) {
                for original_value in original.get_all(&name) {
                    out.append(name.clone(), original_value.clone());
                }
            } else {
                budget.entry()?;
            }
            continue;
        }
        budget.entry()?;
        if let Some(index) = framing_header(name.as_str().as_bytes()) {
            dropped.insert(index);
            continue;
        }
        if changed.contains(&name) {
            continue;
        }
        budget.line(name.as_str().as_bytes(), value.len())?;
        let value = HeaderValue::from_bytes(&value).map_err(|_| {
            OutputError::Invalid(format!(
                "invalid value for header '{name}': CR, LF, NUL and other control characters \
                 are not allowed"
            ))
        })?;
        out.insert(name.clone(), value);
        changed.push(name);
    }
    Ok(())
}

/// Most bytes of a path and query a plugin may set (a request line the node would accept
/// from an upstream's head; see [`Limits::response_head_bytes`]).
fn path_cap(limits: &Limits) -> usize {
    limits.response_head_bytes
}

fn apply_request(
    table: &Table,
    request: &mut PluginRequest,
    limits: &Limits,
) -> Result<Dropped, OutputError> {
    let method = text(&field(table, "method")?, "req.method")?.ok_or("req.method is nil")?;
    if *method != *request.method.as_str().as_bytes() {
        if method.len() > 64 {
            return Err("req.method is longer than 64 bytes".into());
        }
        request.method = Method::from_bytes(&method).map_err(|_| "req.method is not a method")?;
    }
    let path = text(&field(table, "path")?, "req.path")?.ok_or("req.path is nil")?;
    if path.len() > path_cap(limits).max(request.path.len()) {
        return Err(format!("req.path is longer than {} bytes", path_cap(limits)).into());
    }
    let path = std::str::from_utf8(&path)
        .map_err(|_| "req.path must be UTF-8")?
        .to_string();
    if !path.starts_with('/') {
        return Err(format!("req.path must start with '/', got '{path}'").into());
    }
    let query = string_map(&field(table, "query")?, "req.query")?;
    let mut original: Vec<(String, String)> = request
        .query
        .as_deref()
        .map(|raw| {
            let mut last = std::collections::BTreeMap::new();
            for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
                last.insert(name.into_owned(), value.into_owned());
            }
            last.into_iter().collect()
        })
        .unwrap_or_default();
    original.sort();
    let query = if query == original {
        request.query.take()
    } else if query.is_empty() {
        None
    } else {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &query {
            serializer.append_pair(name, value);
        }
        Some(serializer.finish())
    };
    let candidate = match &query {
        Some(query) => format!("{path}?{query}"),
        None => path.clone(),
    };
    let original_len = request.path.len() + request.query.as_deref().map_or(0, str::len);
    if candidate.len() > path_cap(limits).max(original_len + 1) {
        return Err(format!(
            "req.path and req.query are longer than {} bytes",
            path_cap(limits)
        )
        .into());
    }
    http::uri::PathAndQuery::try_from(candidate.as_str())
        .map_err(|_| format!("req.path '{path}' is not a valid URI path"))?;
    request.path = path;
    request.query = query;
    let (headers, dropped) = read_headers(
        &field(table, "headers")?,
        &request.headers,
        "req.headers",
        limits,
    )?;
    request.headers = headers;
    request.body = match text(&field(table, "body")?, "req.body")? {
        // The body may stay as large as it came; a new one is capped like a response's.
        Some(body) if body.len() > limits.response_body_bytes.max(request.body.len()) => {
            return Err(OutputError::BodyTooLarge {
                limit: limits.response_body_bytes,
            }
            .within("req.body"));
        }
        Some(body) if *body == *request.body => request.body.clone(),
        Some(body) => Bytes::copy_from_slice(&body),
        None => Bytes::new(),
    };
    request.params = string_map(&field(table, "params")?, "req.params")?;
    Ok(dropped)
}

/// Applies a filter's changes. The status may stay what it was (a `101` of a WebSocket
/// route included) or become another in 200-599; framing headers stay the node's.
fn apply_response(
    table: &Table,
    response: &mut PluginResponse,
    limits: &Limits,
) -> Result<Dropped, OutputError> {
    let status = match field(table, "status")? {
        Value::Integer(code) => code as f64,
        Value::Number(code) => code,
        other => {
            return Err(OutputError::Invalid(format!(
                "res.status must be a number, got {}",
                json::lua_type_name(&other)
            )));
        }
    };
    if status != f64::from(response.status.as_u16()) {
        response.status = contract::tenant_status(status, "res.status")?;
    }
    let (headers, dropped) = read_headers(
        &field(table, "headers")?,
        &response.headers,
        "res.headers",
        limits,
    )?;
    response.headers = headers;
    if let Some(original) = &response.body {
        let body = text(&field(table, "body")?, "res.body")?;
        let body = body.as_deref().unwrap_or_default();
        if body.len() > limits.response_body_bytes.max(original.len()) {
            return Err(OutputError::BodyTooLarge {
                limit: limits.response_body_bytes,
            }
            .within("res.body"));
        }
        if *body != **original {
            response.body = Some(Bytes::copy_from_slice(body));
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::{
        Engine, EngineConfig, FunctionSource, InstanceError, InstanceSpec, Limits, LogLevel,
        LogSink, UnitKind, compile,
    };

    struct Discard;
    impl LogSink for Discard {
        fn log(&self, _: LogLevel, _: &str, _: &str) {}
    }

    async fn plugin(source: &str, limits: Limits) -> Result<Instance, InstanceError> {
        let engine = Engine::new(&EngineConfig::default()).unwrap();
        let compiled = Arc::new(compile(&FunctionSource::single(source)).unwrap());
        let spec = InstanceSpec {
            function_name: Arc::from("p"),
            version: 1,
            limits,
            env: Arc::new(BTreeMap::new()),
            log: Arc::new(Discard),
            kind: UnitKind::Plugin,
            egress: crate::FunctionEgress::none(),
        };
        Instance::new(&engine, &compiled, &spec).await
    }

    fn request() -> PluginRequest {
        let mut headers = HeaderMap::new();
        headers.append("cookie", HeaderValue::from_static("a=1"));
        headers.append("cookie", HeaderValue::from_static("b=2"));
        headers.insert("x-drop", HeaderValue::from_static("1"));
        PluginRequest {
            method: Method::GET,
            path: "/a".into(),
            query: Some("x=1&y=2".into()),
            headers,
            body: Bytes::from_static(b"hi"),
            client_ip: "127.0.0.1".into(),
            params: vec![("id".into(), "7".into())],
        }
    }

    #[tokio::test]
    async fn the_returned_table_is_checked() {
        for (source, expected) in [
            ("return 1", "must return a table"),
            ("return {}", "defines no phase"),
            ("return { acess = function() end }", "unknown phase 'acess'"),
            (
                "return { log = 'x' }",
                "phase 'log' must be a function, got string",
            ),
            ("return { function() end }", "number key"),
        ] {
            match plugin(source, Limits::default()).await {
                Err(InstanceError::BadPlugin(message)) => {
                    assert!(message.contains(expected), "{source}: {message}")
                }
                Err(other) => panic!("{source}: {other}"),
                Ok(_) => panic!("{source} must be refused"),
            }
        }
        let ok = plugin(
            "return { access = function() end, log = function() end }",
            Limits::default(),
        )
        .await
        .unwrap();
        assert_eq!(ok.phases().names(), ["access", "log"]);
    }

    #[tokio::test]
    async fn request_changes_are_applied_and_untouched_headers_keep_their_values() {
        let instance = plugin(
            "return { rewrite = function(req, ctx)
                req.path = '/b/' .. req.params.id
                req.query.y = nil
                req.query.z = 'a b'
                req.headers['x-drop'] = nil
                req.headers['X-New'] = ctx.conf.tag
                req.body = req.body .. '!'
                req.method = 'POST'
              end }",
            Limits::default(),
        )
        .await
        .unwrap();
        let conf = serde_json::json!({"tag": "t1"});
        let ctx = instance
            .plugin_ctx(&CtxInfo {
                plugin_name: "p",
                route: "r",
                request_id: "q",
                conf: Some(&conf),
            })
            .unwrap();
        let mut req = request();
        let ended = instance
            .request_phase(Phase::Rewrite, &ctx, &mut req, "q")
            .await
            .unwrap();
        assert!(ended.is_none());
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path_and_query(), "/b/7?x=1&z=a+b");
        assert_eq!(req.body, "hi!");
        let cookies: Vec<_> = req.headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(req.headers.get("x-drop").is_none());
        assert_eq!(req.headers["x-new"], "t1");
        // An unchanged query keeps its raw text.
        let instance = plugin("return { access = function() end }", Limits::default())
            .await
            .unwrap();
        let ctx = instance
            .plugin_ctx(&CtxInfo {
                plugin_name: "p",
                route: "r",
                request_id: "q",
                conf: None,
            })
            .unwrap();
        let mut req = request();
        req.query = Some("y=2&x=1".into());
        instance
            .request_phase(Phase::Access, &ctx, &mut req, "q")
            .await
            .unwrap();
        assert_eq!(req.query.as_deref(), Some("y=2&x=1"));
    }

    #[tokio::test]
    async fn access_may_end_the_request_and_bad_returns_are_errors() {
        let instance = plugin(
            "return { access = function(req)
                if req.headers.authorization == nil then
                  return { statusCode = 401, body = 'no' }
                end
                if req.headers['x-bad'] then return 42 end
              end }",
            Limits::default(),
        )
        .await
        .unwrap();
        let ctx = instance
            .plugin_ctx(&CtxInfo {
                plugin_name: "p",
                route: "r",
                request_id: "q",
                conf: None,
            })
            .unwrap();
        let mut req = request();
        let ended = instance
            .request_phase(Phase::Access, &ctx, &mut req, "q")
            .await
            .unwrap()
            .expect("ended");
        assert_eq!(ended.status, 401);
        assert_eq!(ended.body, "no");
        req.headers
            .insert("authorization", HeaderValue::from_static("x"));
        assert!(
            instance
                .request_phase(Phase::Access, &ctx, &mut req, "q")
                .await
                .unwrap()
                .is_none()
        );
        req.headers.insert("x-bad", HeaderValue::from_static("1"));
        let error = instance
            .request_phase(Phase::Access, &ctx, &mut req, "q")
            .await
            .unwrap_err();
        assert!(
            matches!(error, CallError::BadResult(ref m) if m.to_string().contains("got number"))
        );
    }

    #[tokio::test]
    async fn filters_change_the_response_and_ctx_lives_across_phases() {
        let instance = plugin(
            "return {
               access = function(req, ctx) ctx.seen = (ctx.seen or 0) + 1 end,
               header_filter = function(res, ctx) res.status = 201 res.headers['x-seen'] = ctx.seen end,
               body_filter = function(res, ctx) res.body = string.upper(res.body) end,
             }",
            Limits::default(),
        )
        .await
        .unwrap();
        let info = CtxInfo {
            plugin_name: "p",
            route: "r",
            request_id: "q",
            conf: None,
        };
        let ctx = instance.plugin_ctx(&info).unwrap();
        let mut req = request();
        instance
            .request_phase(Phase::Access, &ctx, &mut req, "q")
            .await
            .unwrap();
        let mut res = PluginResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Some(Bytes::from_static(b"abc")),
        };
        instance
            .filter_phase(Phase::HeaderFilter, &ctx, &mut res, "q")
            .await
            .unwrap();
        instance
            .filter_phase(Phase::BodyFilter, &ctx, &mut res, "q")
            .await
            .unwrap();
        assert_eq!(res.status, 201);
        assert_eq!(res.headers["x-seen"], "1");
        assert_eq!(res.body.as_deref(), Some(&b"ABC"[..]));
        // A new request's ctx starts empty.
        let fresh = instance.plugin_ctx(&info).unwrap();
        let mut res = PluginResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: None,
        };
        instance
            .filter_phase(Phase::HeaderFilter, &fresh, &mut res, "q")
            .await
            .unwrap();
        assert!(res.headers.get("x-seen").is_none());
    }

    #[tokio::test]
    async fn a_runaway_phase_times_out() {
        let limits = Limits {
            timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        let instance = plugin(
            "return { access = function() while true do end end }",
            limits,
        )
        .await
        .unwrap();
        let ctx = instance
            .plugin_ctx(&CtxInfo {
                plugin_name: "p",
                route: "r",
                request_id: "q",
                conf: None,
            })
            .unwrap();
        let error = instance
            .request_phase(Phase::Access, &ctx, &mut request(), "q")
            .await
            .unwrap_err();
        assert_eq!(error, CallError::Timeout);
        assert!(instance.is_broken());
    }

    fn ctx(instance: &Instance) -> PluginCtx {
        instance
            .plugin_ctx(&CtxInfo {
                plugin_name: "p",
                route: "r",
                request_id: "q",
                conf: None,
            })
            .unwrap()
    }

    fn upstream_response(status: StatusCode) -> PluginResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-length", HeaderValue::from_static("12"));
        headers.insert("x-upstream", HeaderValue::from_static("1"));
        if status == StatusCode::SWITCHING_PROTOCOLS {
            headers.insert("upgrade", HeaderValue::from_static("websocket"));
            headers.insert("connection", HeaderValue::from_static("upgrade"));
        }
        PluginResponse {
            status,
            headers,
            body: None,
        }
    }

    /// A header_filter that set `content-length: 0` on a proxied body made the node send
    /// the body as a second response; `res.status = 101` switched protocols.
    #[tokio::test]
    async fn filters_cannot_change_framing_or_set_a_1xx_status() {
        let instance = plugin(
            "return { header_filter = function(res)
                if res.headers['x-status'] then res.status = tonumber(res.headers['x-status']) return end
                res.headers['content-length'] = '0'
                res.headers['Transfer-Encoding'] = 'chunked'
                res.headers['connection'] = 'close'
                res.headers['x-added'] = 'yes'
              end }",
            Limits::default(),
        )
        .await
        .unwrap();
        let ctx = ctx(&instance);
        let mut res = upstream_response(StatusCode::OK);
        instance
            .filter_phase(Phase::HeaderFilter, &ctx, &mut res, "q")
            .await
            .unwrap();
        assert_eq!(res.headers["content-length"], "12", "the node's framing");
        assert!(res.headers.get("transfer-encoding").is_none());
        assert!(res.headers.get("connection").is_none());
        assert_eq!(res.headers["x-added"], "yes");
        assert_eq!(res.headers["x-upstream"], "1");
        for status in ["101", "100", "199", "600", "0"] {
            let mut res = upstream_response(StatusCode::OK);
            res.headers
                .insert("x-status", HeaderValue::from_str(status).unwrap());
            let error = instance
                .filter_phase(Phase::HeaderFilter, &ctx, &mut res, "q")
                .await
                .unwrap_err();
            assert_eq!(error.kind(), "result", "{status}");
            assert!(
                error.to_string().contains("header_filter: res.status"),
                "{error}"
            );
        }
        // The status a response already has stays allowed (a WebSocket route's 101), and
        // so do its upgrade headers.
        let mut res = upstream_response(StatusCode::SWITCHING_PROTOCOLS);
        res.headers
            .insert("x-status", HeaderValue::from_static("101"));
        instance
            .filter_phase(Phase::HeaderFilter, &ctx, &mut res, "q")
            .await
            .unwrap();
        assert_eq!(res.status, 101);
        assert_eq!(res.headers["upgrade"], "websocket");
        assert_eq!(res.headers["connection"], "upgrade");
    }

    #[tokio::test]
    async fn what_a_phase_sets_is_capped_before_it_is_copied() {
        let instance = plugin(
            "return {
               access = function(req)
                 if req.headers['x-flood'] then
                   for i = 1, 100000 do req.headers['x-h' .. i] = 'v' end
                 elseif req.headers['x-long'] then
                   req.headers['x-long'] = string.rep('v', 9000)
                 elseif req.headers['x-crlf'] then
                   req.headers['x-crlf'] = 'a\\r\\nx-injected: 1'
                 elseif req.headers['x-body'] then
                   req.body = string.rep('b', 7 * 1024 * 1024)
                 elseif req.headers['x-path'] then
                   req.path = '/' .. string.rep('p', 70000)
                 elseif req.headers['x-respond'] then
                   local h = {} for i = 1, 100000 do h['x-h' .. i] = 'v' end
                   return { statusCode = 200, headers = h }
                 end
               end,
               body_filter = function(res) res.body = string.rep('b', 7 * 1024 * 1024) end,
             }",
            Limits::default(),
        )
        .await
        .unwrap();
        let ctx = ctx(&instance);
        for (header, kind) in [
            ("x-flood", "output_header_count"),
            ("x-long", "output_header_line"),
            ("x-crlf", "result"),
            ("x-body", "output_body"),
            ("x-path", "result"),
            ("x-respond", "output_header_count"),
        ] {
            let mut req = request();
            req.headers.insert(header, HeaderValue::from_static("1"));
            let error = instance
                .request_phase(Phase::Access, &ctx, &mut req, "q")
                .await
                .unwrap_err();
            assert_eq!(error.kind(), kind, "{header}: {error}");
            assert!(error.to_string().contains("access: "), "{error}");
        }
        // Headers the request came with do not count: only what the phase sets.
        let mut req = request();
        for i in 0..150 {
            req.headers.insert(
                HeaderName::try_from(format!("x-c{i}")).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(
            instance
                .request_phase(Phase::Access, &ctx, &mut req, "q")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(req.headers.len(), 153);
        let mut res = PluginResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Some(Bytes::from_static(b"abc")),
        };
        let error = instance
            .filter_phase(Phase::BodyFilter, &ctx, &mut res, "q")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), "output_body");
    }

    /// A name given twice in different cases: a change wins over the unchanged original.
    #[tokio::test]
    async fn a_changed_header_wins_over_its_unchanged_case_variant() {
        let instance = plugin(
            "return { rewrite = function(req)
                req.headers['COOKIE'] = 'c=3'
                req.headers['Cookie'] = req.headers.cookie
              end }",
            Limits::default(),
        )
        .await
        .unwrap();
        let ctx = ctx(&instance);
        let mut req = request();
        instance
            .request_phase(Phase::Rewrite, &ctx, &mut req, "q")
            .await
            .unwrap();
        let cookies: Vec<_> = req.headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["c=3"]);
    }
}
