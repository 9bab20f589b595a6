//! The handlers' extractors: who is calling ([`Caller`]: API key, then rate limit) and
//! the request body ([`RecordText`], [`BatchText`]: content type, encoding, size, time and
//! memory, see [`crate::body`]). A handler's arguments say what it needs; its body is the
//! behaviour. Each rejection is an [`ApiError`], answered in the API's JSON shape.
//!
//! Order, as the API has always checked: key (401 or 503 while keys load), rate limit
//! (429), then the body (415, 413, 408, 400, 503). Axum runs the parts extractors before
//! the body's, so [`Caller`] leaves the key id in the request's extensions for the body's
//! memory share.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::response::{IntoResponseParts, ResponseParts};

use crate::auth::Principal;
use crate::body::{self, JsonBody};
use crate::error::ApiError;
use crate::ratelimit::Decision;
use crate::state::AppState;

/// The authenticated caller and its rate-limit standing.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// `RateLimit-Limit` and `RateLimit-Remaining`, when a rate limit is configured.
    pub rate: RateHeaders,
}

/// The rate-limit headers of a successful answer (none when no limit is configured).
#[derive(Debug, Clone, Copy, Default)]
pub struct RateHeaders(Option<(u64, u64)>);

impl IntoResponseParts for RateHeaders {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        if let Some((limit, remaining)) = self.0 {
            let h = res.headers_mut();
            h.insert("ratelimit-limit", HeaderValue::from(limit));
            h.insert("ratelimit-remaining", HeaderValue::from(remaining));
        }
        Ok(res)
    }
}

/// The key id of the caller, left for the body extractor.
#[derive(Debug, Clone)]
struct CallerKey(String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Until the whole key bucket is read, an unknown key may be a valid one not read
        // yet: 503 + Retry-After (try again), never 401 (which clients treat as final).
        if !state.keys.is_loaded() {
            return Err(ApiError::NotReady {
                retry_after_secs: u64::from(state.serve.retry_after_secs),
            });
        }
        let principal = {
            let _auth = callcap::otel_span!("auth", key_id = tracing::field::Empty).entered();
            let principal = parts
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .and_then(|k| state.keys.authenticate(k.trim(), chrono::Utc::now()))
                .ok_or(ApiError::Unauthorized)?;
            tracing::Span::current().record("key_id", principal.key_id.as_str());
            principal
        };
        let rate = match &state.rate_limiter {
            None => RateHeaders(None),
            Some(rl) => match rl.check(&principal.key_id, std::time::Instant::now()) {
                Decision::Allow { remaining } => RateHeaders(Some((rl.limit(), remaining))),
                Decision::Deny { retry_after } => {
                    return Err(ApiError::RateLimited {
                        retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
                    })
                }
            },
        };
        parts.extensions.insert(CallerKey(principal.key_id.clone()));
        Ok(Caller { principal, rate })
    }
}

/// A single record's body, within `MAX_BODY_BYTES`.
pub struct RecordText(pub JsonBody);

/// A batch's body, within `MAX_BATCH_BYTES`.
pub struct BatchText(pub JsonBody);

impl FromRequest<AppState> for RecordText {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read(req, state, state.serve.max_body_bytes)
            .await
            .map(RecordText)
    }
}

impl FromRequest<AppState> for BatchText {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        read(req, state, state.serve.max_batch_bytes)
            .await
            .map(BatchText)
    }
}

async fn read(req: Request, state: &AppState, limit: u32) -> Result<JsonBody, ApiError> {
    let (parts, body) = req.into_parts();
    let key = parts.extensions.get::<CallerKey>().ok_or_else(|| {
        ApiError::Internal(anyhow::anyhow!(
            "a body extractor ran without Caller before it: the memory share has no key"
        ))
    })?;
    body::read_json(
        &state.bodies,
        &key.0,
        &parts.headers,
        body,
        limit as usize,
        state.serve.body_timeout(),
        u64::from(state.serve.retry_after_secs),
    )
    .await
}
