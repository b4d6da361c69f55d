//! OAuth answers as RFC 6749 spells them: JSON, never cached, errors as
//! `{"error", "error_description"}`. Shared by the pairing and the app
//! consent endpoints.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

/// An OAuth JSON answer, never cached (RFC 6749 section 5.1).
pub fn oauth_json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// An OAuth error (RFC 6749 section 5.2).
pub fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    oauth_json(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}
