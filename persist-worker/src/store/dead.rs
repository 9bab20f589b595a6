//! Dead letters: stream messages that can never be stored, kept with the reason and the
//! raw payload until redriven.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use super::StoreError;

/// A stream message that can never be stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: u64,
    pub subject: String,
    pub reason: String,
    pub payload: Vec<u8>,
}

pub(super) async fn insert_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    dead: &[DeadLetter],
) -> Result<u64, StoreError> {
    let mut n = 0;
    for d in dead {
        n += sqlx::query(
            "INSERT INTO dead_letters (stream_seq, subject, reason, payload) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_seq, subject) DO UPDATE SET reason = EXCLUDED.reason, failed_at = now(), redriven_at = NULL",
        )
        .bind(i64::try_from(d.seq).unwrap_or(i64::MAX))
        .bind(d.subject.replace('\0', "\u{fffd}"))
        // Error texts can quote the offending input; Postgres text cannot hold NUL.
        .bind(d.reason.replace('\0', "\u{fffd}"))
        .bind(&d.payload)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    Ok(n)
}

/// Records dead letters in their own transaction.
///
/// # Errors
/// [`StoreError::Transient`] when the database is unavailable.
pub async fn record_dead_letters(pool: &PgPool, dead: &[DeadLetter]) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let n = insert_dead_letters(&mut tx, dead).await?;
    tx.commit().await?;
    Ok(n)
}

/// A row of `dead_letters`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub stream_seq: i64,
    pub subject: String,
    pub reason: String,
    pub payload: Vec<u8>,
    pub failed_at: DateTime<Utc>,
    pub redriven_at: Option<DateTime<Utc>>,
}

/// How many dead letters wait for redrive, and the newest `limit` of them (when, why).
///
/// # Errors
/// When the database is unavailable.
pub async fn recent_dead_letters(
    pool: &PgPool,
    limit: i64,
) -> Result<(i64, Vec<(DateTime<Utc>, String)>), StoreError> {
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE redriven_at IS NULL")
            .fetch_one(pool)
            .await?;
    let recent = sqlx::query_as(
        "SELECT failed_at, reason FROM dead_letters WHERE redriven_at IS NULL ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok((total, recent))
}

/// Dead letters not yet redriven (all of them with `include_redriven`), oldest first.
///
/// # Errors
/// When the query fails.
pub async fn dead_letters(
    pool: &PgPool,
    include_redriven: bool,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, stream_seq, subject, reason, payload, failed_at, redriven_at FROM dead_letters \
         WHERE $1 OR redriven_at IS NULL ORDER BY id LIMIT $2",
    )
    .bind(include_redriven)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Dead letters by id.
///
/// # Errors
/// When the query fails.
pub async fn dead_letters_by_id(
    pool: &PgPool,
    ids: &[i64],
) -> Result<Vec<DeadLetterRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, stream_seq, subject, reason, payload, failed_at, redriven_at FROM dead_letters \
         WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Marks a dead letter as redriven, or records why the redrive failed.
///
/// # Errors
/// When the update fails.
pub async fn mark_dead_letter(
    pool: &PgPool,
    id: i64,
    failure: Option<&str>,
) -> Result<(), StoreError> {
    match failure {
        None => {
            sqlx::query("UPDATE dead_letters SET redriven_at = now() WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?
        }
        Some(reason) => {
            sqlx::query("UPDATE dead_letters SET reason = $2, failed_at = now() WHERE id = $1")
                .bind(id)
                .bind(reason)
                .execute(pool)
                .await?
        }
    };
    Ok(())
}
