//! Erasure and retention in the database: the erasure entries every write checks, the
//! deletions `persist-worker erase` and retention make, and the counters of what was
//! removed (never an identifier).
//!
//! A write and an erasure are ordered by an advisory lock: every write transaction holds
//! it shared from its first statement, an erasure takes it exclusively to add its entry.
//! So a write either committed before the entry existed (its row is then deleted by the
//! erasure, which deletes after adding the entry) or sees the entry and drops the record.

use std::borrow::Cow;
use std::collections::HashSet;

use chrono::Utc;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{DeadLetter, Row, StoreError};
use crate::privacy::{record_hashes, Policy, Subject};

/// The advisory lock key ordering writes and erasures ("callcap erase").
pub const ERASE_LOCK: i64 = 0x6361_6c6c_6572_6173;

/// A batch's rows and dead letters after erasure and retention.
pub struct Filtered<'a> {
    pub rows: Cow<'a, [Row]>,
    /// The dead letters less those holding an erased record (a forged or misrouted
    /// envelope is dead-lettered with its payload: it must not keep erased data).
    pub dead: Cow<'a, [DeadLetter]>,
    /// Stream sequences of the messages dropped as erased (to delete from the stream).
    pub erased: Vec<u64>,
    /// Records dropped as older than the retention period.
    pub expired: u64,
}

/// Takes the write side of [`ERASE_LOCK`] and drops the rows that are erased or past
/// retention.
///
/// # Errors
/// [`StoreError::Transient`] when the database is unavailable, or when a company of the
/// batch has erasures and this process has no erasure key (held, not stored: the key
/// must be given).
pub async fn filter<'a>(
    tx: &mut Transaction<'_, Postgres>,
    policy: &Policy,
    rows: &'a [Row],
    dead: &'a [DeadLetter],
) -> Result<Filtered<'a>, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(ERASE_LOCK)
        .execute(&mut **tx)
        .await?;
    // A dead letter that still decodes (wrong subject, broken rule) names its company.
    let dead_envelopes: Vec<Option<callcap::Envelope>> = dead
        .iter()
        .map(|d| callcap::Envelope::decode(&d.payload).ok())
        .collect();
    let companies: Vec<Uuid> = rows
        .iter()
        .map(|r| r.envelope.record.company_id)
        .chain(dead_envelopes.iter().flatten().map(|e| e.record.company_id))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let hashes: Vec<Vec<u8>> = if companies.is_empty() {
        Vec::new()
    } else {
        sqlx::query_scalar("SELECT hash FROM erasures WHERE company_id = ANY($1)")
            .bind(&companies)
            .fetch_all(&mut **tx)
            .await?
    };
    let keep_since = policy.keep_since(Utc::now());
    if hashes.is_empty() && keep_since.is_none() {
        return Ok(Filtered {
            rows: Cow::Borrowed(rows),
            dead: Cow::Borrowed(dead),
            erased: Vec::new(),
            expired: 0,
        });
    }
    let erased_set: HashSet<Vec<u8>> = hashes.into_iter().collect();
    let key = match (&policy.key, erased_set.is_empty()) {
        (Some(k), _) => Some(k.clone()),
        (None, true) => None,
        (None, false) => {
            tracing::error!(
                "records of a company with erasures cannot be checked: ERASURE_KEY_FILE is not set; holding them"
            );
            return Err(StoreError::Transient(sqlx::Error::Configuration(
                "erasures exist but ERASURE_KEY_FILE is not set".into(),
            )));
        }
    };
    let mut kept = Vec::with_capacity(rows.len());
    let mut erased = Vec::new();
    let mut expired = 0u64;
    for row in rows {
        let e = &row.envelope;
        let call_date = e.record.call_date.unwrap_or(e.received_at);
        if keep_since.is_some_and(|t| call_date < t) {
            expired += 1;
            continue;
        }
        if let Some(key) = &key {
            if record_hashes(key, e.call_history_id, &e.record)
                .iter()
                .any(|h| erased_set.contains(h))
            {
                erased.push(row.seq);
                continue;
            }
        }
        kept.push(row.clone());
    }
    let mut kept_dead = Vec::with_capacity(dead.len());
    for (d, envelope) in dead.iter().zip(&dead_envelopes) {
        if let (Some(key), Some(e)) = (&key, envelope) {
            if record_hashes(key, e.call_history_id, &e.record)
                .iter()
                .any(|h| erased_set.contains(h))
            {
                erased.push(d.seq);
                continue;
            }
        }
        kept_dead.push(d.clone());
    }
    count(tx, "records_dropped_erased", erased.len() as u64).await?;
    count(tx, "records_dropped_expired", expired).await?;
    Ok(Filtered {
        rows: Cow::Owned(kept),
        dead: Cow::Owned(kept_dead),
        erased,
        expired,
    })
}

/// Adds `n` to a counter of `privacy_counters`.
async fn count(tx: &mut Transaction<'_, Postgres>, name: &str, n: u64) -> Result<(), StoreError> {
    if n > 0 {
        sqlx::query(
            "INSERT INTO privacy_counters (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = privacy_counters.value + EXCLUDED.value",
        )
        .bind(name)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The counters, by name (status page, metrics).
///
/// # Errors
/// When the database is unavailable.
pub async fn counters(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT name, value FROM privacy_counters ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

/// An erasure entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Erasure {
    pub id: i64,
    pub company_id: Uuid,
    pub kind: String,
    pub hash: Vec<u8>,
    pub key_fingerprint: String,
    pub completed_at: Option<chrono::DateTime<Utc>>,
}

/// Adds the entry for `subject` of `company` (or finds the one an earlier run added),
/// ordered after every write in progress ([`ERASE_LOCK`]).
///
/// # Errors
/// When the database is unavailable.
pub async fn add_erasure(
    pool: &PgPool,
    key: &crate::privacy::ErasureKey,
    company: Uuid,
    subject: &Subject,
) -> Result<Erasure, StoreError> {
    let hash = subject.hash(key, company);
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ERASE_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO erasures (company_id, kind, hash, key_fingerprint) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (hash) DO UPDATE SET completed_at = NULL",
    )
    .bind(company)
    .bind(subject.kind())
    .bind(&hash)
    .bind(key.fingerprint())
    .execute(&mut *tx)
    .await?;
    let entry = sqlx::query_as(
        "SELECT id, company_id, kind, hash, key_fingerprint, completed_at FROM erasures WHERE hash = $1",
    )
    .bind(&hash)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(entry)
}

/// Erasures not completed yet (an interrupted `erase`).
///
/// # Errors
/// When the database is unavailable.
pub async fn pending_erasures(pool: &PgPool) -> Result<Vec<Erasure>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, company_id, kind, hash, key_fingerprint, completed_at FROM erasures \
         WHERE completed_at IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await?)
}

/// Records an erasure as complete, with what it removed.
///
/// # Errors
/// When the database is unavailable.
pub async fn complete_erasure(
    pool: &PgPool,
    id: i64,
    rows: u64,
    dead_letters: u64,
    messages: u64,
) -> Result<(), StoreError> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE erasures SET completed_at = now(), rows_deleted = rows_deleted + $2, \
         dead_letters_deleted = dead_letters_deleted + $3, messages_deleted = messages_deleted + $4 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(n(rows))
    .bind(n(dead_letters))
    .bind(n(messages))
    .execute(&mut *tx)
    .await?;
    count(&mut tx, "erasures", 1).await?;
    count(&mut tx, "rows_erased", rows).await?;
    count(&mut tx, "dead_letters_erased", dead_letters).await?;
    count(&mut tx, "messages_erased", messages).await?;
    tx.commit().await?;
    Ok(())
}

/// A stored call as erasure matches it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallKeys {
    pub id: Uuid,
    pub lead_id: Option<Uuid>,
    pub caller_number: Option<String>,
    pub recipient_number: Option<String>,
    pub external_call_id: Option<String>,
    pub external_system: Option<String>,
}

/// A page of a company's calls, by id after `after`.
///
/// # Errors
/// When the database is unavailable.
pub async fn company_calls(
    pool: &PgPool,
    company: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<CallKeys>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, lead_id, caller_number, recipient_number, external_call_id, external_system \
         FROM call_history WHERE company_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3",
    )
    .bind(company)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes calls (their follow-ups with them, `ON DELETE CASCADE`); the number deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn delete_calls(pool: &PgPool, company: Uuid, ids: &[Uuid]) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM call_history WHERE company_id = $1 AND id = ANY($2)")
            .bind(company)
            .bind(ids)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Deletes a lead, or a whole company's leads, employees and the company, once its calls
/// are gone; the number of rows deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn delete_parents(
    pool: &PgPool,
    company: Uuid,
    lead: Option<Uuid>,
    whole_company: bool,
) -> Result<u64, StoreError> {
    let mut n = 0;
    if let Some(lead) = lead {
        n += sqlx::query("DELETE FROM leads WHERE company_id = $1 AND id = $2")
            .bind(company)
            .bind(lead)
            .execute(pool)
            .await?
            .rows_affected();
    }
    if whole_company {
        let mut tx = pool.begin().await?;
        for sql in [
            "DELETE FROM follow_ups WHERE company_id = $1",
            "DELETE FROM leads WHERE company_id = $1",
            "DELETE FROM employees WHERE company_id = $1",
            "DELETE FROM companies WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM call_history WHERE company_id = $1)",
        ] {
            n += sqlx::query(sql).bind(company).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
    }
    Ok(n)
}

/// A page of dead letters, by id after `after`: (id, payload).
///
/// # Errors
/// When the database is unavailable.
pub async fn dead_letter_payloads(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT id, payload FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?,
    )
}

/// Deletes dead letters by id.
///
/// # Errors
/// When the database is unavailable.
pub async fn delete_dead_letters(pool: &PgPool, ids: &[i64]) -> Result<u64, StoreError> {
    Ok(sqlx::query("DELETE FROM dead_letters WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Deletes up to `limit` dead letters recorded before `before` (retention: they hold
/// the payloads); the number deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn expire_dead_letters(
    pool: &PgPool,
    before: chrono::DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    expire(
        pool,
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE failed_at < $1 \
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
        "dead_letters_expired",
        before,
        limit,
    )
    .await
}

/// Deletes up to `limit` calls older than `before` (retention); the number deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn expire_calls(
    pool: &PgPool,
    before: chrono::DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    expire(
        pool,
        "DELETE FROM call_history WHERE id IN (SELECT id FROM call_history WHERE call_date < $1 \
         ORDER BY call_date LIMIT $2 FOR UPDATE SKIP LOCKED)",
        "rows_expired",
        before,
        limit,
    )
    .await
}

/// Runs one retention delete (`$1` the cut-off, `$2` the batch) and counts it under
/// `counter`, in one short transaction.
async fn expire(
    pool: &PgPool,
    sql: &'static str,
    counter: &str,
    before: chrono::DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(sql)
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    count(&mut tx, counter, n).await?;
    tx.commit().await?;
    Ok(n)
}
