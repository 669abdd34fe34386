//! Errors: what clients get (a status and a JSON body), and what stops the server from starting.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A failed request: the status and a one-line message, sent as
/// `{"error": {"message", "type", "code"}}` (OpenAI's shape, which A1111 clients also read).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable machine-readable code (`invalid_request`, `queue_full`, ...).
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn body(&self) -> serde_json::Value {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} is not a loopback address: give --api-key KEY (clients send `Authorization: Bearer KEY`), \
         or --insecure-no-auth to serve anyone who can reach it"
    )]
    Unauthenticated(String),
    #[error("the model did not load: {0}")]
    Model(String),
    #[error("--cors-origin {0:?} is not an origin (scheme://host[:port], or * for any)")]
    CorsOrigin(String),
    #[error("the API key is empty: give a key, or none for a loopback address")]
    EmptyApiKey,
    #[error("--lora-dir {0}: {1}")]
    LoraDir(std::path::PathBuf, String),
    #[error("{0}")]
    Runtime(String),
}
