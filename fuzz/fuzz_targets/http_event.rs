//! Event building for the HTTP trigger, through a real instance: an arbitrary request is
//! turned into the Lambda-style event, a handler echoes the event back as JSON, and the
//! echo must carry the request faithfully.
//!
//! Properties: building the event never panics or fails for a request hyper could have
//! accepted; `httpMethod`, `path`, the body (base64 when it is not UTF-8) and every header
//! value survive; the response the handler returns is accepted.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use moontide_runtime::{
    Engine, EngineConfig, FunctionSource, HttpRequest, Instance, InstanceSpec, Limits, LogLevel,
    LogSink, UnitKind, compile,
};

#[derive(Arbitrary, Debug)]
struct Request {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    proxy: String,
}

struct Discard;
impl LogSink for Discard {
    fn log(&self, _: LogLevel, _: &str, _: &str) {}
}

const ECHO: &str = r#"
local json = require("json")
return function(event)
  return { statusCode = 200, body = json.encode(event) }
end
"#;

struct Harness {
    runtime: tokio::runtime::Runtime,
    instance: std::cell::RefCell<Instance>,
}

thread_local! {
    static HARNESS: Harness = {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = Engine::new(&EngineConfig::default()).unwrap();
        let compiled = Arc::new(compile(&FunctionSource::single(ECHO)).unwrap());
        let spec = InstanceSpec {
            function_name: Arc::from("echo"),
            version: 1,
            limits: Limits::default(),
            env: Arc::new(BTreeMap::new()),
            log: Arc::new(Discard),
            kind: UnitKind::Function,
        };
        let instance = runtime.block_on(Instance::new(&engine, &compiled, &spec)).unwrap();
        Harness { runtime, instance: std::cell::RefCell::new(instance) }
    };
}

fuzz_target!(|input: Request| {
    // Only what hyper would hand us: a valid method token and header names/values.
    if http::Method::from_bytes(input.method.as_bytes()).is_err() || input.path.is_empty() {
        return;
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let parameters = [("proxy", input.proxy.as_str())];
    let request = HttpRequest {
        method: &input.method,
        path: &input.path,
        query: input.query.as_deref(),
        headers: &headers,
        body: &input.body,
        source_ip: "127.0.0.1",
        request_id: "fuzz",
        request_time_epoch_ms: 0,
        resource: "/fn/{name}/{proxy+}",
        path_parameters: if input.proxy.is_empty() {
            &[]
        } else {
            &parameters
        },
        protocol: "HTTP/1.1",
    };
    HARNESS.with(|harness| {
        let mut instance = harness.instance.borrow_mut();
        let response = harness
            .runtime
            .block_on(instance.invoke_http(&request))
            .unwrap_or_else(|error| panic!("echo failed: {error}"));
        assert_eq!(response.status, 200);
        let event: serde_json::Value =
            serde_json::from_slice(&response.body).expect("the echo is JSON");
        assert_eq!(event["httpMethod"], input.method.as_str());
        assert_eq!(event["path"], input.path.as_str());
        let body = match std::str::from_utf8(&input.body) {
            _ if input.body.is_empty() => None,
            Ok(text) => Some(text.to_string()),
            Err(_) => None,
        };
        if let Some(text) = body {
            assert_eq!(event["isBase64Encoded"], false);
            assert_eq!(event["body"], text.as_str());
        }
        for (name, value) in headers.iter() {
            if let Ok(text) = value.to_str() {
                let seen = &event["multiValueHeaders"][name.as_str()];
                assert!(
                    seen.as_array()
                        .is_some_and(|values| values.iter().any(|v| v == text)),
                    "header {name}: {text:?} missing from {seen}"
                );
            }
        }
    });
});
