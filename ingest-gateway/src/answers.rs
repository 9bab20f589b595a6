//! What the record routes answer: the 201 body of the API document, the batch's result
//! per record, and the refusals as OpenAPI lists them (one list per kind of route; the
//! bodies themselves are [`ApiError`]'s).

use callcap::{CallRecord, FieldError};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};

/// The API document's 201 body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    /// Always `true`.
    pub success: bool,
    /// `Call record created successfully`.
    pub message: String,
    pub data: CreatedData,
}

/// The id of the stored record and when it was accepted.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedData {
    /// Stable for a given `external_call_id` (or `Idempotency-Key`): a retry gets the same id.
    pub call_history_id: Uuid,
    /// When the gateway accepted the record (RFC 3339, milliseconds, UTC).
    pub created_at: String,
}

/// The batch body's answer: one result per submitted record, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    /// True when every record was accepted.
    pub success: bool,
    pub message: String,
    pub accepted: usize,
    pub rejected: usize,
    pub results: Vec<BatchItem>,
}

/// The result of one record of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    /// Position in the submitted `calls` array.
    pub index: usize,
    /// The status this record would have had on its own (201, 400, 403, 503).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_history_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldError>>,
}

/// The refusals of the single-record routes, as OpenAPI lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Documents the answers for OpenAPI; `ApiError` builds them.
pub enum RecordRefusals {
    /// Malformed JSON or a field breaks a rule
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Invalid or missing API key
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// company_id is not the key's company
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Body not received in time
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// Body too large, or it would take more memory to read than one request may use
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Content-Type is not application/json, or an unsupported Content-Encoding
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Rate limit exceeded; see Retry-After
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// Cannot queue right now, the gateway's memory for request bodies is in use, or the gateway is starting; retry after Retry-After
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The refusals of the batch route (a record of another company is refused in its item,
/// not as the answer), as OpenAPI lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Documents the answers for OpenAPI; `ApiError` builds them.
pub enum BatchRefusals {
    /// Malformed JSON, no `calls` array, or an Idempotency-Key header (give each record an external_call_id instead)
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Invalid or missing API key
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Body not received in time
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// Too many records or too many bytes, or it would take more memory to read than one request may use
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Content-Type is not application/json, or an unsupported Content-Encoding
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Rate limit exceeded; see Retry-After
    #[response(status = 429)]
    RateLimited(ErrorBody),
    /// At the in-flight limit, the gateway's memory for request bodies is in use, or the gateway is starting; retry after Retry-After
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

pub const CREATED_MESSAGE: &str = "Call record created successfully";

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The batch request body.
#[derive(ToSchema)]
#[allow(dead_code)] // Documents the body's shape for OpenAPI; the handler reads JSON values.
pub struct BatchRequestDoc {
    /// The records, each shaped like a single `POST /v1/calls` body.
    calls: Vec<CallRecord>,
}

pub fn item_ok(index: usize, id: Uuid, received_at: DateTime<Utc>) -> BatchItem {
    BatchItem {
        index,
        status: 201,
        call_history_id: Some(id),
        created_at: Some(timestamp(received_at)),
        error: None,
        message: None,
        details: None,
    }
}

pub fn item_err(index: usize, e: &ApiError) -> BatchItem {
    let body = e.body();
    BatchItem {
        index,
        status: e.status().as_u16(),
        call_history_id: None,
        created_at: None,
        error: Some(body.error),
        message: Some(body.message),
        details: body.details,
    }
}
