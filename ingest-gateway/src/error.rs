//! Every error the HTTP API can answer, and its one mapping to a status and JSON body.
//!
//! Bodies keep the API document's shape `{"error": "<reason phrase>", "message": "…"}`,
//! plus `details` (per-field) for validation errors. Each failure is logged once, here.
//! The `match` in [`ApiError::status`] has no `_` arm, so a new case must be mapped.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use callcap::{FieldError, ValidationError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::publish::PublishError;

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Invalid or missing API key")]
    Unauthorized,
    #[error("this API key may only write records for its own company")]
    Forbidden,
    #[error("{0}")]
    Validation(ValidationError),
    #[error("{0}")]
    BadRequest(String),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error(
        "Content-Encoding {0:?} is not supported; send gzip, deflate, zstd or an uncompressed body"
    )]
    UnsupportedEncoding(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    TooManyRecords(String),
    #[error("the body needs {needed} bytes of memory to read, more than one request may use ({limit}); send fewer or smaller records per request")]
    BodyTooCostly { needed: usize, limit: usize },
    #[error("{cause}; retry shortly")]
    MemoryBusy {
        retry_after_secs: u64,
        cause: crate::budget::Exhausted,
    },
    #[error("request body was not received in time")]
    RequestTimeout,
    #[error("rate limit exceeded for this API key; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the gateway is at its limit of publishes in flight; retry shortly")]
    Overloaded { retry_after_secs: u64 },
    #[error("the record could not be stored right now; retry shortly")]
    Unavailable {
        retry_after_secs: u64,
        #[source]
        source: PublishError,
    },
    #[error("the gateway is starting and has not loaded its API keys yet; retry shortly")]
    NotReady { retry_after_secs: u64 },
    #[error("request URI is longer than the limit of {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("request headers are larger than the limit of {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("request has {count} header fields; at most {limit} are allowed")]
    TooManyHeaders { count: usize, limit: usize },
    #[error("callback refused: {0}")]
    CallbackUnauthorized(&'static str),
    #[error("callback refused: {0}")]
    CallbackForbidden(&'static str),
    #[error("this connector cannot check callbacks on this gateway right now; retry shortly")]
    ConnectorUnusable { retry_after_secs: u64 },
    #[error("no such route")]
    NotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The API document's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The HTTP reason phrase, e.g. `Bad Request`.
    pub error: String,
    /// A human sentence; for validation errors it names the field.
    pub message: String,
    /// Per-field errors, for validation failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldError>>,
}

impl ApiError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized | ApiError::CallbackUnauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::CallbackForbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Validation(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::PayloadTooLarge { .. }
            | ApiError::TooManyRecords(_)
            | ApiError::BodyTooCostly { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. }
            | ApiError::MemoryBusy { .. }
            | ApiError::Unavailable { .. }
            | ApiError::ConnectorUnusable { .. }
            | ApiError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge { .. } | ApiError::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds the client should wait before retrying, for the errors where a retry is
    /// the right move.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs }
            | ApiError::Overloaded { retry_after_secs }
            | ApiError::MemoryBusy {
                retry_after_secs, ..
            }
            | ApiError::NotReady { retry_after_secs }
            | ApiError::ConnectorUnusable { retry_after_secs }
            | ApiError::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// The JSON body. A 500 says nothing of its cause: that goes to the log.
    pub fn body(&self) -> ErrorBody {
        let status = self.status();
        let message = match self {
            ApiError::Internal(_) => "An unexpected error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        };
        let details = match self {
            ApiError::Validation(v) => Some(v.errors.clone()),
            _ => None,
        };
        ErrorBody {
            error: status.canonical_reason().unwrap_or("Error").to_owned(),
            message,
            details,
        }
    }

    /// Why the request was refused, from a closed set: the `reason` label of
    /// `gateway_refused_total` and the field of the refusal log line. No `_` arm.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden_company",
            ApiError::Validation(_) => "invalid_field",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::UnsupportedEncoding(_) => "unsupported_encoding",
            ApiError::PayloadTooLarge { .. } => "body_too_large",
            ApiError::TooManyRecords(_) => "too_many_records",
            ApiError::BodyTooCostly { .. } => "body_too_costly",
            ApiError::MemoryBusy { .. } => "memory_busy",
            ApiError::RequestTimeout => "body_timeout",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable { source, .. } => match source {
                PublishError::Timeout(_) => "publish_timeout",
                PublishError::NoLeader(_) => "publish_no_leader",
                PublishError::StreamFull(_) => "publish_stream_full",
                PublishError::Refused(_) => "publish_refused",
                // Not retryable: answered 413, never as Unavailable.
                PublishError::TooLarge => "publish_too_large",
            },
            ApiError::NotReady { .. } => "not_ready",
            ApiError::UriTooLong { .. } => "uri_too_long",
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
            ApiError::TooManyHeaders { .. } => "too_many_headers",
            ApiError::CallbackUnauthorized(_) => "callback_unauthorized",
            ApiError::CallbackForbidden(_) => "callback_forbidden",
            ApiError::ConnectorUnusable { .. } => "connector_unusable",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }

    fn log(&self) {
        let reason = self.reason();
        metrics::counter!("gateway_refused_total", "reason" => reason).increment(1);
        // A flood of refusals (a misconfigured dialer, a scan) must not flood the log: one
        // line per reason per 10 seconds, with how many were refused since the last one.
        // The line carries the reason and message, never the key or the body.
        if let Some(suppressed) = REFUSAL_LOG.admit(reason) {
            tracing::info!(reason, status = %self.status(), error = %self, suppressed, "request refused");
        }
        match self {
            ApiError::Internal(e) => tracing::error!(error = ?e, "internal error"),
            ApiError::Unavailable { source, .. } => {
                tracing::warn!(kind = source.kind(), error = %source, "publish failed; answered 503")
            }
            ApiError::Overloaded { .. } => {
                tracing::warn!("in-flight publish limit reached; answered 503")
            }
            ApiError::MemoryBusy { cause, .. } => {
                tracing::warn!(%cause, "request body memory budget in use; answered 503")
            }
            _ => {}
        }
    }
}

/// At most one log line per key (a refusal's reason, or a connector and reason) per
/// [`RefusalLog::EVERY`]. Keys must come from a bounded set: an entry is kept per key.
pub struct RefusalLog<K> {
    last: std::sync::Mutex<std::collections::HashMap<K, (std::time::Instant, u64)>>,
}

static REFUSAL_LOG: std::sync::LazyLock<RefusalLog<&'static str>> =
    std::sync::LazyLock::new(RefusalLog::default);

impl<K> Default for RefusalLog<K> {
    fn default() -> Self {
        RefusalLog {
            last: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq> RefusalLog<K> {
    /// How often a key may be logged.
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// `Some(suppressed since the last line)` when a line may be written now.
    pub fn admit(&self, reason: K) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match last.get_mut(&reason) {
            Some((at, suppressed)) if now.duration_since(*at) < Self::EVERY => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Validation(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_shapes_are_kept() {
        let b = serde_json::to_value(ApiError::Unauthorized.body()).unwrap();
        assert_eq!(
            b,
            serde_json::json!({"error": "Unauthorized", "message": "Invalid or missing API key"})
        );
        let v = ValidationError::field("company_id", "company_id is required");
        let b = serde_json::to_value(ApiError::Validation(v).body()).unwrap();
        assert_eq!(b["error"], "Bad Request");
        assert_eq!(b["message"], "company_id is required");
        assert_eq!(b["details"][0]["field"], "company_id");
    }

    #[test]
    fn internal_errors_are_opaque() {
        let e = ApiError::Internal(anyhow::anyhow!("secret detail"));
        let b = e.body();
        assert_eq!(b.error, "Internal Server Error");
        assert!(!b.message.contains("secret"));
    }

    #[test]
    fn retryable_answers_carry_retry_after() {
        let r = ApiError::Overloaded {
            retry_after_secs: 2,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = ApiError::Unauthorized.into_response();
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
