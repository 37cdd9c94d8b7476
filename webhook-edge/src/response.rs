//! Every answer the edge gives, and the one mapping from an error to its HTTP status.
//! Bodies are small JSON for humans: `{"success":true}` or
//! `{"success":false,"error":"…"}`.
//!
//! Every error but [`EdgeError::Unauthorized`] and [`EdgeError::Unavailable`] is found
//! before the body is authenticated. After authentication the only answer but 200 is 503
//! ([`EdgeError::Unavailable`]), so Coinflow retries; the body limit (413) is the one
//! refusal of a body's bytes, and it applies before a signature can be checked.

use bytes::Bytes;
use http::header::{ALLOW, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::auth::AuthError;

/// The response body type of every edge route.
pub type Body = Full<Bytes>;

/// Why a delivery was not acked with 200.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Wrong path.
    #[error("no route; POST webhooks to the configured path")]
    NotFound,
    /// Not a POST.
    #[error("method not allowed; use POST")]
    MethodNotAllowed,
    /// Not `application/json`.
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    /// Over the body limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The client stopped sending its body.
    #[error("timed out reading the body")]
    BodyTimeout,
    /// The body could not be read (client went away).
    #[error("could not read the body")]
    BodyRead,
    /// Authentication failed.
    #[error("unauthorized: {0}")]
    Unauthorized(AuthError),
    /// Fulfillment did not ack in time, is down, or failed: Coinflow should retry.
    #[error("fulfillment unavailable; retry later")]
    Unavailable,
    /// Too many requests in flight.
    #[error("overloaded; retry later")]
    Overloaded,
}

impl EdgeError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response, with `Retry-After` on 503 and `Allow` on 405.
    pub fn into_response(self, retry_after_secs: u64) -> Response<Body> {
        let mut response = json(
            self.status(),
            &serde_json::json!({
                "success": false,
                "error": self.to_string(),
            }),
        );
        let headers = response.headers_mut();
        match self {
            Self::Unavailable | Self::Overloaded => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            Self::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("POST"));
            }
            _ => {}
        }
        response
    }
}

pub use coinflow_shared::http_server::json;

/// `200 {"success":true}`.
pub fn success() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "success": true }))
}
