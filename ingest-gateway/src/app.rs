//! The HTTP surface: shared state, routes, middleware, and the operational endpoints
//! (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`).
//!
//! Record handling is [`crate::ingest`]'s; serving connections is [`crate::server`]'s.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::{OpenApi, ToSchema};

use crate::auth::KeyCache;
use crate::config::ServeArgs;
use crate::error::{ApiError, ErrorBody};
use crate::ingest;
use crate::publish::{PublishStats, Publisher};
use crate::ratelimit::RateLimiter;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    /// Where accepted records go.
    pub publisher: Arc<dyn Publisher>,
    /// API keys, kept current by the KV watch.
    pub keys: Arc<KeyCache>,
    /// Limits and timeouts.
    pub serve: ServeArgs,
    /// Budget of publishes awaiting an ack; exhausted means 503.
    pub inflight: Arc<Semaphore>,
    /// Per-key rate limit, when configured.
    pub rate_limiter: Option<RateLimiter>,
    /// Renders `/metrics`; `None` where no recorder is installed (library tests).
    pub metrics: Option<PrometheusHandle>,
    /// The JetStream fsync mode the server reported at start (`always`, …).
    pub fsync_mode: String,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Builds the state from its parts and the serve settings.
    pub fn new(
        publisher: Arc<dyn Publisher>,
        keys: Arc<KeyCache>,
        serve: ServeArgs,
        metrics: Option<PrometheusHandle>,
        fsync_mode: String,
    ) -> Self {
        let rate_limiter = (serve.rate_limit_per_sec > 0.0)
            .then(|| RateLimiter::new(serve.rate_limit_per_sec, serve.rate_limit_burst));
        AppState(Arc::new(Shared {
            publisher,
            keys,
            inflight: Arc::new(Semaphore::new(serve.max_in_flight_publishes as usize)),
            rate_limiter,
            metrics,
            serve,
            fsync_mode,
        }))
    }
}

/// The OpenAPI document of every route.
#[derive(OpenApi)]
#[openapi(
    info(title = "Call Capture API", description = "Submit call records from dialers and telephony systems."),
    paths(
        ingest::create_call, ingest::create_call_legacy, ingest::create_batch,
        healthz, readyz, metrics_text, openapi_json
    ),
    components(schemas(
        callcap::CallRecord, callcap::Outcome, callcap::CallStatus, callcap::FieldError,
        ingest::Created, ingest::CreatedData, ingest::BatchResponse, ingest::BatchItem,
        ErrorBody, Readiness, PublishStats
    )),
    tags((name = "calls", description = "Call records"), (name = "ops", description = "Operations"))
)]
pub struct ApiDoc;

/// The router with all routes and middleware.
pub fn app(state: AppState) -> Router {
    let request_id = header::HeaderName::from_static("x-request-id");
    Router::new()
        .route("/v1/calls", post(ingest::create_call))
        .route("/functions/v1/webhook-call-capture", post(ingest::create_call_legacy))
        .route("/v1/calls/batch", post(ingest::create_batch))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(record_metrics))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let rid = req
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %rid)
                        })
                        // Failures are logged once, with their cause, by ApiError.
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(request_id))
                // A bug must cost one request a 500, not the connection or the process.
                .layer(CatchPanicLayer::custom(|_panic: Box<dyn std::any::Any + Send>| {
                    ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
                })),
        )
        .with_state(state)
}

/// Counts requests by route and status and times them.
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
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
    /// JetStream's fsync mode as reported at start: `always` means a 201 survives a
    /// power loss of the NATS node.
    pub fsync: String,
    /// What this gateway has published: batches (group commit), records, fallbacks.
    pub publish: PublishStats,
}

/// Readiness: NATS connected, stream reachable, key cache loaded.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Ready to accept records", body = Readiness),
    (status = 503, description = "Not ready", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let nats = state.publisher.check_ready().await;
    let keys_loaded = state.keys.is_loaded();
    let ready = nats.is_ok() && keys_loaded;
    let body = Readiness {
        ready,
        nats: nats.err().unwrap_or_else(|| "ok".into()),
        keys_loaded,
        keys: state.keys.len(),
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
/// 5 seconds, so an alert can see a gateway that is up but cannot take records.
pub async fn report_readiness(state: AppState) {
    metrics::describe_gauge!(
        "gateway_ready",
        "1 when the gateway can take records (NATS reachable, API keys loaded), else 0"
    );
    loop {
        let ready = state.keys.is_loaded() && state.publisher.check_ready().await.is_ok();
        metrics::gauge!("gateway_ready").set(if ready { 1.0 } else { 0.0 });
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
