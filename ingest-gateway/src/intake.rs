//! The intake every record handler shares once a record is valid and its caller known:
//! the in-flight budget (503), the lane, the record's id and stream message, the publish
//! and its ack (503). [`crate::ingest`] (API keys) and [`crate::callbacks`] (provider
//! connectors) both end here, so neither reaches into the other.

use bytes::Bytes;
use callcap::identity::{self, CallId};
use callcap::subjects::Lane;
use callcap::{CallRecord, Envelope};
use chrono::{DateTime, Utc};

use axum::http::HeaderMap;
use callcap::traces::TraceContext;
use tracing::Instrument as _;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::publish::{Outbound, PublishError, Receipt};
use crate::state::AppState;

/// Where a request came from, as its records carry it: its `x-request-id` and the
/// dialer's W3C trace context.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub request_id: Option<String>,
    pub trace: Option<TraceContext>,
}

impl Origin {
    /// The request's origin, read from its headers.
    pub fn of(headers: &HeaderMap) -> Self {
        Origin {
            request_id: request_id(headers),
            trace: TraceContext::from_headers(|name| {
                headers.get(name).and_then(|v| v.to_str().ok())
            }),
        }
    }
}

/// The span a request's records are published in (with traces on), and the trace
/// context their messages carry: that span's, or the dialer's with traces off.
pub fn publish_span(origin: &Origin, records: usize) -> (tracing::Span, Option<TraceContext>) {
    let span = callcap::otel_span!(
        "publish",
        records = records as i64,
        stream_seq = tracing::field::Empty,
        duplicate = tracing::field::Empty
    );
    let trace = callcap::traces::carried(&span, origin.trace.as_ref());
    (span, trace)
}

/// Publishes one valid record of `principal` and waits for its ack: the record's id and
/// the stream's receipt.
///
/// # Errors
/// 503 when the gateway is at `MAX_IN_FLIGHT_PUBLISHES` or the publish is not
/// acknowledged in time; 413 when the message is larger than the stream takes.
pub async fn publish_one(
    state: &AppState,
    principal: &Principal,
    record: CallRecord,
    idem: Option<&str>,
    origin: &Origin,
    received_at: DateTime<Utc>,
) -> Result<(CallId, Receipt), ApiError> {
    let permit = state
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| overloaded(state))?;
    let lane = state
        .lanes
        .route(principal.company_id, 1, std::time::Instant::now());
    let (span, trace) = publish_span(origin, 1);
    let (id, outbound) = prepare(
        record,
        principal,
        lane,
        idem,
        (origin.request_id.clone(), trace),
        received_at,
    );
    let outcome = state
        .publisher
        .publish(vec![outbound])
        .instrument(span.clone())
        .await
        .pop();
    drop(permit);
    let receipt = outcome
        .expect("the publisher answers one outcome per record")
        .map_err(|e| unavailable(state, e))?;
    span.record("stream_seq", receipt.seq as i64);
    span.record("duplicate", receipt.duplicate);
    Ok((id, receipt))
}

/// The answer when the in-flight budget is spent.
pub fn overloaded(state: &AppState) -> ApiError {
    ApiError::Overloaded {
        retry_after_secs: u64::from(state.serve.retry_after_secs),
    }
}

/// Derives the record's id and builds its stream message, carrying the request id and
/// the trace context given.
pub fn prepare(
    record: CallRecord,
    principal: &Principal,
    lane: Lane,
    idem: Option<&str>,
    (request_id, trace): (Option<String>, Option<TraceContext>),
    received_at: DateTime<Utc>,
) -> (CallId, Outbound) {
    let id = identity::call_history_id(&record, idem);
    let company = record.company_id;
    let envelope = Envelope::new(
        id.id,
        received_at,
        principal.key_id.clone(),
        request_id,
        record,
    );
    // The record is serialized once: the dedup id hashes the bytes the envelope carries.
    let (record_json, payload) = envelope.encode_with_record();
    (
        id,
        Outbound {
            company,
            lane,
            msg_id: identity::msg_id_of(id.id, &record_json),
            payload: Bytes::from(payload),
            trace,
        },
    )
}

/// The answer to a publish that failed: 503 + Retry-After when a retry may succeed, 413
/// for a message larger than the stream takes.
pub fn unavailable(state: &AppState, e: PublishError) -> ApiError {
    if e.is_retryable() {
        ApiError::Unavailable {
            retry_after_secs: u64::from(state.serve.retry_after_secs),
            source: e,
        }
    } else {
        ApiError::PayloadTooLarge {
            limit: callcap::subjects::MAX_MESSAGE_BYTES as usize,
        }
    }
}

/// The request id to copy into the envelope. The middleware has already replaced an
/// unbounded one with a generated id; checked again here because it lands in the stream.
pub fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| callcap::envelope::valid_request_id(id))
        .map(str::to_owned)
}
