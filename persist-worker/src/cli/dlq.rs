//! `persist-worker dlq`: list and re-drive dead letters.
//!
//! A re-drive decodes the stored payload and writes it through the normal upsert with its
//! original stream sequence, so the merge rules hold as if it had never failed.

use std::io::Write;
use tracing::Instrument as _;

use callcap::Envelope;
use sqlx::PgPool;

use crate::store::{self, DeadLetterRow, Row, StoreError};

/// Prints dead letters as a table.
///
/// # Errors
/// When the database cannot be read or the output written.
pub async fn list(
    pool: &PgPool,
    include_redriven: bool,
    limit: i64,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rows = store::dead_letters(pool, include_redriven, limit).await?;
    writeln!(
        out,
        "{:>8} {:>12} {:<21} {:<21} REASON",
        "ID", "STREAM_SEQ", "FAILED_AT", "REDRIVEN_AT"
    )?;
    for r in &rows {
        let reason: String = r.reason.chars().take(120).collect();
        writeln!(
            out,
            "{:>8} {:>12} {:<21} {:<21} {}",
            r.id,
            r.stream_seq,
            r.failed_at.format("%Y-%m-%dT%H:%M:%SZ"),
            r.redriven_at.map_or("-".to_owned(), |t| t
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()),
            reason
        )?;
    }
    writeln!(out, "{} dead letter(s)", rows.len())?;
    Ok(())
}

/// Counts of a re-drive.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RedriveSummary {
    pub stored: u64,
    pub still_failing: u64,
}

/// Re-drives the given dead letters (all pending ones when `ids` is `None`).
///
/// # Errors
/// When the database is unavailable.
pub async fn redrive(
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    ids: Option<&[i64]>,
    out: &mut impl Write,
) -> anyhow::Result<RedriveSummary> {
    let rows = match ids {
        Some(ids) => store::dead_letters_by_id(pool, ids).await?,
        None => store::dead_letters(pool, false, i64::MAX).await?,
    };
    let mut summary = RedriveSummary::default();
    for dl in rows {
        match redrive_one(pool, policy, &dl).await {
            Ok(()) => {
                store::mark_dead_letter(pool, dl.id, None).await?;
                summary.stored += 1;
                writeln!(out, "{}: stored", dl.id)?;
            }
            Err(reason) => {
                let reason = reason.to_string();
                store::mark_dead_letter(pool, dl.id, Some(&reason)).await?;
                summary.still_failing += 1;
                writeln!(out, "{}: still failing: {reason}", dl.id)?;
            }
        }
    }
    writeln!(
        out,
        "{} stored, {} still failing",
        summary.stored, summary.still_failing
    )?;
    Ok(summary)
}

/// Why a dead letter could not be stored again.
#[derive(Debug, thiserror::Error)]
enum RedriveError {
    /// Still not something the gateway could have published.
    #[error("{0}")]
    Undecodable(#[from] callcap::envelope::DecodeError),
    /// Postgres refuses the data.
    #[error("{0}")]
    Refused(StoreError),
    /// Postgres is unavailable.
    #[error("{0} (try again later)")]
    Unavailable(StoreError),
}

async fn redrive_one(
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    dl: &DeadLetterRow,
) -> Result<(), RedriveError> {
    let envelope = Envelope::decode_checked(&dl.subject, &dl.payload)?;
    let row = Row {
        seq: u64::try_from(dl.stream_seq).unwrap_or(0),
        subject: dl.subject.clone(),
        trace: None,
        envelope,
    };
    // A dead letter keeps no trace context: a redrive starts a trace of its own, whose
    // span names the record's call and request ids.
    let span = callcap::otel_span!("redrive", dead_letter = dl.id);
    let rows = [row];
    let records = span.in_scope(|| crate::write::record_spans(&rows, "redrive"));
    let written = store::write_batch(pool, policy, &rows, &[])
        .instrument(span)
        .await;
    drop(records);
    match written {
        Ok(_) => Ok(()),
        Err(e @ StoreError::Permanent(_)) => Err(RedriveError::Refused(e)),
        Err(e @ StoreError::Transient(_)) => Err(RedriveError::Unavailable(e)),
    }
}
