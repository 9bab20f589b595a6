//! `RETENTION_DAYS`: stored calls older than the period (by call date) deleted in small
//! batches, each its own short transaction, with a pause between them so that ingestion
//! never waits behind a long delete. Every worker runs it; `SKIP LOCKED` keeps them off
//! each other's batches. Writes drop records older than the period too
//! ([`crate::store::privacy::filter`]), so a replay does not bring them back.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Calls deleted per transaction.
pub const BATCH: i64 = 500;
/// Pause between two batches while there is more to delete.
pub const PAUSE: Duration = Duration::from_millis(200);
/// How often a worker looks for expired calls once there are none.
pub const EVERY: Duration = Duration::from_secs(60);

/// Deletes expired calls until `cancel` fires.
pub async fn run(pool: PgPool, days: u32, cancel: CancellationToken) {
    tracing::info!(days, "retention: deleting calls older than {days} days");
    loop {
        let before = chrono::Utc::now() - chrono::Duration::days(i64::from(days));
        let wait = match crate::store::privacy::expire_calls(&pool, before, BATCH).await {
            Ok(n) => {
                metrics::counter!("worker_rows_expired_total").increment(n);
                if n > 0 {
                    tracing::info!(deleted = n, "retention: expired calls deleted");
                }
                if n as i64 == BATCH {
                    PAUSE
                } else {
                    EVERY
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: deleting expired calls failed; retrying later");
                EVERY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
    }
}
