//! The HTTP surface: routes, middleware, the OpenAPI document and the operational
//! endpoints (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`).
//!
//! What handlers share is [`crate::state`]'s; record handling is [`crate::ingest`]'s
//! (with [`crate::extract`] for who is calling and the body); serving connections is
//! [`crate::server`]'s.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::predicate::SizeAbove;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::{OpenApi, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::ingest;
use crate::publish::PublishStats;
pub use crate::state::AppState;

/// The OpenAPI document of every route.
#[derive(OpenApi)]
#[openapi(
    info(title = "Call Capture API", description = "Submit call records from dialers and telephony systems."),
    paths(
        ingest::create_call, ingest::create_call_legacy, ingest::create_batch,
        crate::callbacks::signed, crate::callbacks::tokened,
        healthz, readyz, metrics_text, openapi_json, crate::status::status_page
    ),
    components(schemas(
        callcap::CallRecord, callcap::Outcome, callcap::CallStatus, callcap::FieldError,
        crate::answers::Created, crate::answers::CreatedData, crate::answers::BatchResponse, crate::answers::BatchItem,
        ErrorBody, Readiness, PublishStats, crate::body::ContentEncoding
    )),
    tags((name = "calls", description = "Call records"), (name = "callbacks", description = "Telephony providers' call status callbacks"), (name = "ops", description = "Operations")),
    modifiers(&AcceptsUnknownFields, &OptionalContentEncoding)
)]
pub struct ApiDoc;

/// The request headers' rules as the server applies them: `Content-Encoding` is declared
/// with the values the server takes (not nullable: `null` is no encoding) and is optional
/// (an uncompressed body sends none); `Idempotency-Key` is 1 to 255 visible ASCII
/// characters.
struct OptionalContentEncoding;

impl utoipa::Modify for OptionalContentEncoding {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::Required;
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.post, &mut item.get].into_iter().flatten() {
                for param in op.parameters.iter_mut().flatten() {
                    if param.name == "Content-Encoding" {
                        param.required = Required::False;
                    }
                    if param.name == "Idempotency-Key" {
                        param.schema = Some(
                            utoipa::openapi::ObjectBuilder::new()
                                .schema_type(utoipa::openapi::schema::Type::String)
                                .pattern(Some(r"^[!-~]{1,255}$"))
                                .into(),
                        );
                    }
                }
            }
        }
    }
}

/// `CallRecord` derives `deny_unknown_fields` for the stream envelope (the worker refuses
/// what it does not know), which utoipa renders as `additionalProperties: false`. The
/// HTTP API validates a JSON object and ignores unknown fields (the API document's
/// clients send more than it lists), so the request schema says so.
struct AcceptsUnknownFields;

impl utoipa::Modify for AcceptsUnknownFields {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{AdditionalProperties, Schema};
        use utoipa::openapi::RefOr;
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        if let Some(RefOr::T(Schema::Object(record))) = components.schemas.get_mut("CallRecord") {
            record.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(true)));
        }
    }
}

/// The router with all routes and middleware.
pub fn app(state: AppState) -> Router {
    let request_id = header::HeaderName::from_static("x-request-id");
    Router::new()
        .route("/v1/calls", post(ingest::create_call))
        .route("/functions/v1/webhook-call-capture", post(ingest::create_call_legacy))
        .route("/v1/calls/batch", post(ingest::create_batch))
        .route("/v1/callbacks/{connector}", post(crate::callbacks::signed))
        .route("/v1/callbacks/{connector}/{token}", post(crate::callbacks::tokened))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .route("/status", get(crate::status::status_page))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(enforce_head_limits))
        .layer(middleware::from_fn(record_metrics))
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(drop_unusable_request_id))
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let rid = req
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            let path = req.uri().path();
                            if matches!(path, "/healthz" | "/readyz" | "/metrics" | "/status") {
                                // Probes and scrapes: no trace of their own every few
                                // seconds, and nothing logged inside them at INFO.
                                if callcap::traces::enabled() {
                                    return tracing::Span::none();
                                }
                                return tracing::debug_span!("request", method = %req.method(), path = %path, request_id = %rid);
                            }
                            let span = tracing::info_span!("request", method = %req.method(), path = %loggable_path(path), request_id = %rid, trace_id = tracing::field::Empty);
                            // The dialer's W3C trace context: continued when traces are
                            // on, its trace id logged either way.
                            let parent = callcap::traces::TraceContext::from_headers(|name| {
                                req.headers().get(name).and_then(|v| v.to_str().ok())
                            });
                            callcap::traces::adopt(&span, parent.as_ref());
                            span
                        })
                        // Failures are logged once, with their cause, by ApiError.
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(request_id))
                // Accept-Encoding honoured where it pays: batch answers (a result per record)
                // and /metrics; small answers go as they are.
                .layer(
                    CompressionLayer::new()
                        .gzip(true)
                        .zstd(true)
                        .compress_when(SizeAbove::new(1024)),
                )
                // A bug must cost one request a 500, not the connection or the process.
                .layer(CatchPanicLayer::custom(|_panic: Box<dyn std::any::Any + Send>| {
                    ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
                })),
        )
        .with_state(state)
}

/// The request path as logged: an Exotel connector URL's token (its last segment) is
/// replaced, so the logs never hold a credential.
fn loggable_path(path: &str) -> std::borrow::Cow<'_, str> {
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() == 5 && path.starts_with("/v1/callbacks/") {
        std::borrow::Cow::Owned(format!("/v1/callbacks/{}/<token>", segments[3]))
    } else {
        std::borrow::Cow::Borrowed(path)
    }
}

/// Longest request URI answered by the router; longer gets 414 with the JSON error body.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most bytes of request headers (names and values) answered by the router; more gets 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Most request headers answered by the router; more gets 431. hyper's own limits sit
/// above these (see `server`), so these answers carry the API's JSON body and a request id.
pub const MAX_HEADERS: usize = 100;

/// Registers the `# HELP` text of the HTTP metrics (call once the recorder is in).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_requests_total",
        "HTTP requests answered, by route, method (a closed set; others are OTHER) and status"
    );
    metrics::describe_histogram!(
        "gateway_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from receiving a request to its answer, by route"
    );
    metrics::describe_counter!(
        "gateway_refused_total",
        "Requests answered with an error, by reason (unauthorized, invalid_field, body_too_large, …)"
    );
    metrics::counter!("gateway_refused_total", "reason" => "unauthorized").absolute(0);
}

/// Drops an `x-request-id` that is empty, longer than 128 bytes or not visible ASCII, so
/// that the next layer generates one: a request id is copied into the logs and into every
/// record of a batch in the stream, and must not carry unbounded or hostile bytes there.
///
/// It also notes how many header fields the client sent ([`SentHeaders`]), before a request
/// id is added, for the header count limit.
async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let sent = SentHeaders(req.headers().len());
    req.extensions_mut().insert(sent);
    let usable = req
        .headers()
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().is_ok_and(callcap::envelope::valid_request_id))
        .collect::<Vec<_>>();
    if usable.len() > 1 || usable.first() == Some(&false) {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// The number of header fields as the client sent them (the request id layer may add one).
#[derive(Debug, Clone, Copy)]
struct SentHeaders(usize);

/// Answers an over-long URI with 414 and too many or too large headers with 431.
async fn enforce_head_limits(req: Request, next: Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        return ApiError::UriTooLong {
            limit: MAX_URI_BYTES,
        }
        .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    let count = req
        .extensions()
        .get::<SentHeaders>()
        .map_or(headers.len(), |s| s.0);
    if count > MAX_HEADERS {
        return ApiError::TooManyHeaders {
            count,
            limit: MAX_HEADERS,
        }
        .into_response();
    }
    if bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
        }
        .into_response();
    }
    next.run(req).await
}

/// The `method` label: the standard methods by name, anything else as `OTHER`, so a
/// client inventing methods cannot grow `/metrics` without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

/// Counts requests by route and status and times them.
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    crate::status::record_request(response.status());
    let status = response.status().as_u16().to_string();
    metrics::counter!("gateway_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("gateway_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// What `/readyz` reports.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub nats: String,
    pub keys_loaded: bool,
    pub keys: usize,
    /// The provider connectors have been read (their callbacks get 503 until then).
    pub connectors_loaded: bool,
    pub connectors: usize,
    /// JetStream's fsync mode as reported at start: `always` means a 201 survives a
    /// power loss of the NATS node.
    pub fsync: String,
    /// What this gateway has published: batches (group commit), records, fallbacks.
    pub publish: PublishStats,
}

/// Readiness: NATS connected, stream reachable, key and connector caches loaded.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Ready to accept records", body = Readiness),
    (status = 503, description = "Not ready", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let nats = state.publisher.check_ready().await;
    let keys_loaded = state.keys.is_loaded();
    let connectors_loaded = state.connectors.is_loaded();
    let ready = nats.is_ok() && keys_loaded && connectors_loaded;
    let body = Readiness {
        ready,
        nats: nats.err().map_or_else(|| "ok".into(), |e| e.to_string()),
        keys_loaded,
        keys: state.keys.len(),
        connectors_loaded,
        connectors: state.connectors.len(),
        fsync: state.fsync_mode.clone(),
        publish: state.publisher.stats(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Keeps the `gateway_ready` gauge (1 ready, 0 not: the `/readyz` check) current every
/// 5 seconds, so an alert can see a gateway that is up but cannot take records; and
/// `gateway_overflow_companies` with it.
pub async fn report_readiness(state: AppState) {
    metrics::describe_gauge!(
        "gateway_ready",
        "1 when the gateway can take records (NATS reachable, API keys and connectors loaded), else 0"
    );
    loop {
        let ready = state.keys.is_loaded()
            && state.connectors.is_loaded()
            && state.publisher.check_ready().await.is_ok();
        metrics::gauge!("gateway_ready").set(if ready { 1.0 } else { 0.0 });
        state.lanes.report(std::time::Instant::now());
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}

/// Prometheus metrics in text format.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "OpenAPI 3.1 document")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
