//! The ingest handlers: one record (`POST /v1/calls` and the legacy webhook path) and a
//! batch (`POST /v1/calls/batch`).
//!
//! Order of checks: key (401), rate limit (429), content type (415), body size, time and
//! memory (413, 408, 503; [`crate::body`]), JSON (400), fields (400), company scope (403),
//! in-flight budget (503), publish and ack (503). Only an acknowledged publish gets 201.
//! The body's memory reservation is held until the answer is built.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use callcap::identity::{self, CallId};
use callcap::validate::Incoming;
use callcap::{CallRecord, ValidationError};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::Instrument as _;

use crate::answers::{
    item_err, item_ok, timestamp, BatchItem, BatchRefusals, BatchRequestDoc, BatchResponse,
    Created, CreatedData, RecordRefusals, CREATED_MESSAGE,
};
use crate::auth::Principal;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::extract::{BatchText, Caller, RateHeaders, RecordText};
use crate::intake;
use crate::publish::Outbound;
use crate::state::AppState;

/// Store one call record.
#[utoipa::path(
    post, path = "/v1/calls", tag = "calls",
    request_body(content = CallRecord, content_type = "application/json"),
    params(
        ("x-api-key" = String, Header, description = "Your API key"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries of a record without external_call_id return the same id"),
        ("Content-Encoding" = crate::body::ContentEncoding, Header, description = "gzip, deflate or zstd (others: 415); the size limits apply to the decompressed body"),
    ),
    responses(
        (status = 201, description = "Accepted and durably queued", body = Created),
        RecordRefusals,
    )
)]
pub async fn create_call(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RecordText(body): RecordText,
) -> Result<(StatusCode, RateHeaders, Json<Created>), ApiError> {
    let principal = &caller.principal;
    let bytes = &body.text;
    let record = {
        let _validate = callcap::otel_span!("validate").entered();
        let record = match serde_json::from_slice::<Incoming>(bytes) {
            Ok(incoming) => incoming.validate()?,
            // Not a well-formed object: the parsed value names what is wrong.
            Err(_) => callcap::validate(&parse_json(bytes)?)?,
        };
        check_company(principal, &record)?;
        record
    };
    let idem = idempotency_key(&headers)?;
    let received_at = Utc::now();
    let (id, receipt) = intake::publish_one(
        &state,
        principal,
        record,
        idem.as_deref(),
        &intake::Origin::of(&headers),
        received_at,
    )
    .await?;
    tracing::debug!(call_history_id = %id.id, seq = receipt.seq, duplicate = receipt.duplicate, "record accepted");
    let created = Created {
        success: true,
        message: CREATED_MESSAGE.to_owned(),
        data: CreatedData {
            call_history_id: id.id,
            created_at: timestamp(received_at),
        },
    };
    Ok((StatusCode::CREATED, caller.rate, Json(created)))
}

/// Same as `POST /v1/calls`: the path of the API document, so existing integrations only
/// change the host.
#[utoipa::path(
    post, path = "/functions/v1/webhook-call-capture", tag = "calls",
    request_body(content = CallRecord, content_type = "application/json"),
    params(
        ("x-api-key" = String, Header, description = "Your API key"),
        ("Content-Encoding" = crate::body::ContentEncoding, Header, description = "gzip, deflate or zstd (others: 415); the size limits apply to the decompressed body"),
    ),
    responses(
        (status = 201, description = "Accepted and durably queued", body = Created),
        RecordRefusals,
    )
)]
pub async fn create_call_legacy(
    state: State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: RecordText,
) -> Result<(StatusCode, RateHeaders, Json<Created>), ApiError> {
    create_call(state, caller, headers, body).await
}

/// Store up to the configured number of records (1,000 by default) in one request.
///
/// Each record is validated on its own; valid ones are published, invalid ones reported.
/// 201 when every record was accepted, 207 otherwise (see each item's `status`);
/// `Retry-After` is set when any item got 503, and only those items need resending.
#[utoipa::path(
    post, path = "/v1/calls/batch", tag = "calls",
    request_body(content = BatchRequestDoc, content_type = "application/json"),
    params(
        ("x-api-key" = String, Header, description = "Your API key"),
        ("Content-Encoding" = crate::body::ContentEncoding, Header, description = "gzip, deflate or zstd (others: 415); the size limits apply to the decompressed body"),
    ),
    responses(
        (status = 201, description = "Every record accepted", body = BatchResponse),
        (status = 207, description = "Some records refused; see each item", body = BatchResponse),
        BatchRefusals,
    )
)]
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    BatchText(body): BatchText,
) -> Result<Response, ApiError> {
    let (status, response) = batch(&state, &caller.principal, &headers, &body).await?;
    let retry = response.results.iter().any(|r| r.status == 503);
    let mut resp = (status, caller.rate, Json(response)).into_response();
    if retry {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(state.serve.retry_after_secs),
        );
    }
    Ok(resp)
}

/// A batch body as the handler reads it: `calls` (each item read straight into
/// [`Incoming`]); other keys skipped. Only an object with a `calls` array of objects
/// deserializes; anything else is read again as a value to report what is wrong.
struct BatchBody {
    calls: Vec<Incoming>,
}

impl<'de> serde::Deserialize<'de> for BatchBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = BatchBody;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with a `calls` array")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<BatchBody, A::Error> {
                let mut calls = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "calls" {
                        calls = Some(map.next_value::<Vec<Incoming>>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                calls
                    .map(|calls| BatchBody { calls })
                    .ok_or_else(|| serde::de::Error::missing_field("calls"))
            }
        }
        deserializer.deserialize_map(ObjectOnly)
    }
}

/// Validates, scopes and publishes a batch's records; the answer's status and body.
async fn batch(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    body: &JsonBody,
) -> Result<(StatusCode, BatchResponse), ApiError> {
    if headers.contains_key("idempotency-key") {
        return Err(ApiError::Validation(ValidationError::field(
            "Idempotency-Key",
            "Idempotency-Key applies to one record and is not taken on /v1/calls/batch; give each record an external_call_id so that a resent batch updates instead of duplicating",
        )));
    }
    let bytes = &body.text;
    let calls: Vec<Result<Incoming, ValidationError>> =
        match serde_json::from_slice::<BatchBody>(bytes) {
            Ok(body) => body.calls.into_iter().map(Ok).collect(),
            // Not well-formed, or some item is not an object: read it as a value to say which.
            Err(_) => {
                let value = parse_json(bytes)?;
                let Some(Value::Array(calls)) = value.get("calls") else {
                    return Err(ApiError::BadRequest(
                        "body must be an object with a `calls` array".into(),
                    ));
                };
                calls
                    .iter()
                    .map(|call| match call {
                        Value::Object(obj) => Ok(Incoming::from_object(obj)),
                        other => match callcap::validate(other) {
                            Err(e) => Err(e),
                            Ok(_) => unreachable!("only an object validates"),
                        },
                    })
                    .collect()
            }
        };
    let max = state.serve.max_batch_records as usize;
    if calls.len() > max {
        return Err(ApiError::TooManyRecords(format!(
            "calls must hold at most {max} records (got {})",
            calls.len()
        )));
    }
    let received_at = Utc::now();
    let origin = intake::Origin::of(headers);
    let validating = callcap::otel_span!("validate", records = calls.len() as i64);
    let validating = validating.enter();
    // Every record of a request is its key's company's: one lane for the request, sized
    // by its records.
    let lane = state
        .lanes
        .route(principal.company_id, calls.len(), std::time::Instant::now());
    // `None` marks a valid record whose publish outcome is not known yet.
    let mut results: Vec<Option<BatchItem>> = Vec::with_capacity(calls.len());
    let mut valid: Vec<(usize, CallId, Outbound)> = Vec::new();
    for (index, call) in calls.into_iter().enumerate() {
        let checked = call
            .and_then(Incoming::validate)
            .map_err(ApiError::from)
            .and_then(|r| check_company(principal, &r).map(|()| r));
        match checked {
            Ok(record) => {
                let (id, out) = intake::prepare(
                    record,
                    principal,
                    lane,
                    None,
                    (origin.request_id.clone(), None),
                    received_at,
                );
                valid.push((index, id, out));
                results.push(None);
            }
            Err(e) => results.push(Some(item_err(index, &e))),
        }
    }
    drop(validating);
    if !valid.is_empty() {
        // Every record of the request carries the one publish span's context.
        let (span, trace) = intake::publish_span(&origin, valid.len());
        for (_, _, out) in &mut valid {
            out.trace.clone_from(&trace);
        }
        let permits = state
            .inflight
            .clone()
            .try_acquire_many_owned(u32::try_from(valid.len()).unwrap_or(u32::MAX))
            .map_err(|_| intake::overloaded(state))?;
        publish_all(state, valid, &mut results, received_at)
            .instrument(span)
            .await;
        drop(permits);
    }
    let results: Vec<BatchItem> = results
        .into_iter()
        .map(|r| r.expect("publish_all fills the item of every valid record"))
        .collect();
    let accepted = results.iter().filter(|r| r.status == 201).count();
    let rejected = results.len() - accepted;
    let all = rejected == 0;
    Ok((
        if all {
            StatusCode::CREATED
        } else {
            StatusCode::MULTI_STATUS
        },
        BatchResponse {
            success: all,
            message: format!("{accepted} of {} call records created", results.len()),
            accepted,
            rejected,
            results,
        },
    ))
}

/// Publishes the valid records in order (the stream keeps the batch's order; the
/// publisher groups them into atomic batches) and writes each outcome into its item.
async fn publish_all(
    state: &AppState,
    valid: Vec<(usize, CallId, Outbound)>,
    results: &mut [Option<BatchItem>],
    received_at: DateTime<Utc>,
) {
    let (slots, records): (Vec<(usize, CallId)>, Vec<Outbound>) = valid
        .into_iter()
        .map(|(index, id, out)| ((index, id), out))
        .unzip();
    let outcomes = state.publisher.publish(records).await;
    for ((index, id), outcome) in slots.into_iter().zip(outcomes) {
        results[index] = Some(match outcome {
            Ok(_) => item_ok(index, id.id, received_at),
            Err(e) => item_err(index, &intake::unavailable(state, e)),
        });
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("Malformed JSON: {e}")))
}

fn check_company(principal: &Principal, record: &CallRecord) -> Result<(), ApiError> {
    if record.company_id == principal.company_id {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if identity::valid_idempotency_key(k) => Ok(Some(k.to_owned())),
        _ => Err(ApiError::Validation(callcap::ValidationError::field(
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ))),
    }
}

#[cfg(test)]
#[path = "ingest_tests.rs"]
mod tests;
