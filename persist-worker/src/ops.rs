//! The worker's operational HTTP endpoints on `METRICS_ADDR`: `/metrics`, `/readyz`,
//! `/healthz`. Nothing here touches records.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

/// What the endpoints look at.
#[derive(Clone)]
pub struct OpsState {
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub metrics: Option<PrometheusHandle>,
}

/// The ops router.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<OpsState>) -> (StatusCode, String) {
    let nats_ok = s.nats.connection_state() == async_nats::connection::State::Connected;
    let db = tokio::time::timeout(Duration::from_secs(2), crate::store::ping(&s.pool)).await;
    let db_ok = matches!(db, Ok(Ok(())));
    let status = if nats_ok && db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("nats: {}\npostgres: {}\n", ok(nats_ok), ok(db_ok)),
    )
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "unavailable"
    }
}

async fn metrics(State(s): State<OpsState>) -> (StatusCode, String) {
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".into(),
        ),
    }
}
