//! Errors as HTTP responses, in one place at the edge (STYLE.md rule 6): every error the
//! admin API or the data plane returns is `{"error": {"code", "message", "details"}}` with
//! the matching status.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::api::FieldError;

/// An error bound for a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: serde_json::Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: json!({}),
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> ApiError {
        self.details = details;
        self
    }

    /// 400 listing every field error; `details.path` names the first offending field.
    pub fn invalid(errors: Vec<FieldError>) -> ApiError {
        let first = errors
            .first()
            .cloned()
            .unwrap_or_else(|| FieldError::new("", "invalid request"));
        let message = if first.path.is_empty() {
            first.message.clone()
        } else {
            format!("{}: {}", first.path, first.message)
        };
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message).with_details(json!({
            "path": first.path,
            "errors": errors,
        }))
    }

    pub fn not_found(what: &str, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} '{name}' does not exist"),
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}})
                .to_string(),
        )
    }

    /// As a plain `http` response (data plane).
    pub fn to_response(&self) -> http::Response<http_body_util::Full<Bytes>> {
        let mut response = http::Response::new(http_body_util::Full::new(self.body()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let mut response = axum::response::Response::new(axum::body::Body::from(self.body()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<moontide_store::StoreError> for ApiError {
    fn from(error: moontide_store::StoreError) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            error.to_string(),
        )
    }
}
