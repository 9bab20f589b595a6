//! `RETENTION_DAYS`: stored calls older than the period (by the earlier of their call date
//! and their receipt: a call dated in the future still expires), and dead letters
//! recorded before it (they hold the payloads), deleted in small
//! batches, each its own short transaction, with a pause between them so that ingestion
//! never waits behind a long delete. Every worker runs it; `SKIP LOCKED` keeps them off
//! each other's batches. Writes drop records older than the period too
//! ([`crate::store::privacy::filter`]), so a replay does not bring them back.

use std::time::Duration;

use callcap::shutdown::Shutdown;
use sqlx::PgPool;

/// Calls deleted per transaction.
pub const BATCH: i64 = 500;
/// Pause between two batches while there is more to delete.
pub const PAUSE: Duration = Duration::from_millis(200);
/// How often a worker looks for expired calls once there are none.
pub const EVERY: Duration = Duration::from_secs(60);

/// Deletes expired calls until `cancel` fires.
pub async fn run(pool: PgPool, days: u32, cancel: Shutdown) {
    tracing::info!(
        days,
        "retention: deleting calls and dead letters older than {days} days"
    );
    loop {
        let before = chrono::Utc::now() - chrono::Duration::days(i64::from(days));
        let deleted = async {
            let calls = crate::store::privacy::expire_calls(&pool, before, BATCH).await?;
            let dead = crate::store::privacy::expire_dead_letters(&pool, before, BATCH).await?;
            Ok::<_, crate::store::StoreError>((calls, dead))
        };
        let wait = match deleted.await {
            Ok((calls, dead)) => {
                metrics::counter!("worker_rows_expired_total").increment(calls);
                if calls > 0 || dead > 0 {
                    tracing::info!(
                        calls,
                        dead_letters = dead,
                        "retention: expired rows deleted"
                    );
                }
                // A full batch of either: more to delete, after a short pause.
                if calls as i64 == BATCH || dead as i64 == BATCH {
                    PAUSE
                } else {
                    EVERY
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: deleting expired rows failed; retrying later");
                EVERY
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.triggered() => return,
        }
    }
}
