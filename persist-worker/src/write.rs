//! The write policy: stream messages decoded (what cannot be becomes a dead letter) and
//! written until stored — database outages waited out with backoff while the caller keeps
//! its messages alive, a batch refused for its data split so that only the guilty rows are
//! dead-lettered — and the messages of erased records deleted from their stream. The
//! consume loop, `replay` and `erase` all go through it.

use std::time::Duration;

use async_nats::jetstream;
use callcap::shutdown::Shutdown;
use callcap::Envelope;
use futures::StreamExt as _;
use sqlx::PgPool;

use crate::store::{self, DeadLetter, Row, StoreError, WriteStats};

/// Decoded contents of one pulled batch.
pub struct Decoded {
    pub rows: Vec<Row>,
    pub dead: Vec<DeadLetter>,
}

/// Decodes stream messages; what cannot be decoded becomes a dead letter.
pub fn decode(msgs: &[jetstream::Message]) -> Decoded {
    let mut rows = Vec::with_capacity(msgs.len());
    let mut dead = Vec::new();
    for m in msgs {
        let (seq, delivered) = m
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 1));
        if delivered > 1 {
            let lane =
                callcap::subjects::Lane::of_subject(&m.subject).map_or("main", |(l, _)| l.as_str());
            metrics::counter!("worker_redeliveries_total", "lane" => lane).increment(1);
        }
        match decode_message(seq, &m.subject, &m.payload) {
            Ok(mut row) => {
                row.trace = callcap::traces::TraceContext::from_nats(m.headers.as_ref());
                rows.push(row);
            }
            Err(d) => dead.push(d),
        }
    }
    Decoded { rows, dead }
}

/// Decodes one stream message (from the stream or the archive): the row to store, or
/// the dead letter saying why it cannot be.
///
/// # Errors
/// The dead letter, when the payload is not a valid envelope for its subject.
pub fn decode_message(seq: u64, subject: &str, payload: &[u8]) -> Result<Row, DeadLetter> {
    match Envelope::decode_checked(subject, payload) {
        Ok(envelope) => Ok(Row {
            seq,
            subject: subject.to_owned(),
            trace: None,
            envelope,
        }),
        Err(e) => Err(DeadLetter {
            seq,
            subject: subject.to_owned(),
            reason: e.to_string(),
            payload: payload.to_vec(),
        }),
    }
}

/// One span per record being written (with traces on; none otherwise): the record's own
/// trace continued from its message's `traceparent` (the gateway's publish span), linked
/// to the batch transaction it is written in (the current span). `via` says which path
/// wrote it: `consume`, `replay` or `redrive`. Dropping the spans ends them: hold them
/// until the records are acknowledged.
pub fn record_spans(rows: &[Row], via: &'static str) -> Vec<tracing::Span> {
    if !callcap::traces::enabled() {
        return Vec::new();
    }
    let batch = callcap::traces::carried(&tracing::Span::current(), None);
    rows.iter()
        .map(|row| {
            let span = tracing::info_span!(
                parent: None,
                "store record",
                via,
                call_history_id = %row.envelope.call_history_id,
                company_id = %row.envelope.record.company_id,
                request_id = row.envelope.request_id.as_deref().unwrap_or(""),
                stream_seq = row.seq as i64,
                trace_id = tracing::field::Empty
            );
            callcap::traces::adopt(&span, row.trace.as_ref());
            if let Some(batch) = &batch {
                callcap::traces::link(&span, batch);
            }
            span
        })
        .collect()
}

/// What [`delete_messages`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Deleted now, or found already gone.
    pub deleted: u64,
    /// Still in the stream: the delete failed (logged; `erase --resume` retries).
    pub failed: u64,
}

/// Deletes requests in flight at once: the server applies them one by one, but each
/// answer's round trip (and its fsync under `sync_interval: always`) overlaps the next.
const DELETES_IN_FLIGHT: usize = 64;

/// Deletes stream messages by sequence; JetStream overwrites a deleted message's payload
/// (its message delete without `no_erase`). A message already gone (deleted by a worker,
/// or never there: JetStream's codes 10037 and 10043) counts as deleted.
pub async fn delete_messages(js: &jetstream::Context, stream: &str, seqs: &[u64]) -> Deleted {
    delete_messages_with(js, stream, seqs, DELETES_IN_FLIGHT).await
}

/// [`delete_messages`] with `in_flight` requests at once (the benchmark compares them).
pub async fn delete_messages_with(
    js: &jetstream::Context,
    stream: &str,
    seqs: &[u64],
    in_flight: usize,
) -> Deleted {
    let mut out = Deleted::default();
    let Ok(handle) = js.get_stream_no_info(stream).await else {
        out.failed = seqs.len() as u64;
        return out;
    };
    let handle = &handle;
    let mut results = futures::stream::iter(seqs.iter().copied())
        .map(|seq| async move { (seq, handle.delete_message(seq).await) })
        .buffer_unordered(in_flight.max(1));
    while let Some((seq, result)) = futures::StreamExt::next(&mut results).await {
        match result {
            Ok(_) => out.deleted += 1,
            Err(e) if already_gone(&e) => out.deleted += 1,
            Err(e) => {
                out.failed += 1;
                tracing::warn!(stream, seq, error = %e, "an erased message could not be deleted from the stream; `erase --resume` deletes it");
            }
        }
    }
    metrics::counter!("worker_messages_erased_total").increment(out.deleted);
    out
}

/// Whether a delete failed because the message is not there (JetStream's error codes,
/// not its wording, which changed between server versions).
fn already_gone(e: &async_nats::jetstream::stream::DeleteMessageError) -> bool {
    use async_nats::jetstream::stream::DeleteMessageErrorKind;
    use async_nats::jetstream::ErrorCode;
    matches!(
        e.kind(),
        DeleteMessageErrorKind::JetStream(js)
            if js.error_code() == ErrorCode::NO_MESSAGE_FOUND
                || js.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
    )
}

/// Why a write gave up without storing.
#[derive(Debug, PartialEq, Eq)]
pub enum Abandoned {
    /// Shutdown was requested while Postgres was unavailable.
    Shutdown,
}

/// Runs `op` until it succeeds or is refused for its data (returned as the inner `Err`),
/// waiting out database outages with capped exponential backoff. `keep_alive` runs before
/// each pause (progress acks keep held messages from being redelivered).
///
/// # Errors
/// [`Abandoned::Shutdown`] when `cancel` fires while the database is still unavailable.
async fn until_stored<T, Op, OpFut, K, KFut>(
    what: &str,
    retry_max: Duration,
    cancel: &Shutdown,
    keep_alive: &mut K,
    mut op: Op,
) -> Result<Result<T, StoreError>, Abandoned>
where
    Op: FnMut() -> OpFut,
    OpFut: std::future::Future<Output = Result<T, StoreError>>,
    K: FnMut() -> KFut,
    KFut: std::future::Future<Output = ()>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(Ok(v)),
            Err(e @ StoreError::Permanent(_)) => return Ok(Err(e)),
            Err(e @ StoreError::Transient(_)) => {
                metrics::counter!("worker_db_errors_total").increment(1);
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "database unavailable while {what}; holding");
                keep_alive().await;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cancel.triggered() => return Err(Abandoned::Shutdown),
                }
                pause = (pause * 2).min(retry_max);
            }
        }
    }
}

/// Writes rows and dead letters, waiting out database outages; a batch refused for its
/// data is split so that only the guilty rows become dead letters.
///
/// # Errors
/// [`Abandoned::Shutdown`] when `cancel` fires while still unable to write.
pub async fn write_reliably<K, KFut>(
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    rows: &[Row],
    dead: &[DeadLetter],
    retry_max: Duration,
    cancel: &Shutdown,
    mut keep_alive: K,
) -> Result<WriteStats, Abandoned>
where
    K: FnMut() -> KFut,
    KFut: std::future::Future<Output = ()>,
{
    let batch = until_stored(
        "writing a batch",
        retry_max,
        cancel,
        &mut keep_alive,
        || store::write_batch(pool, policy, rows, dead),
    )
    .await?;
    let e = match batch {
        Ok(stats) => return Ok(stats),
        Err(e) => e,
    };
    tracing::warn!(error = %e, rows = rows.len(), "batch refused; isolating the rows at fault");
    let mut total = WriteStats::default();
    let mut guilty: Vec<DeadLetter> = dead.to_vec();
    for row in rows {
        let one = until_stored("isolating rows", retry_max, cancel, &mut keep_alive, || {
            store::write_batch(pool, policy, std::slice::from_ref(row), &[])
        })
        .await?;
        match one {
            Ok(s) => total.add(s),
            Err(e) => {
                tracing::warn!(
                    seq = row.seq,
                    call_history_id = %row.envelope.call_history_id,
                    request_id = row.envelope.request_id.as_deref().unwrap_or(""),
                    trace_id = row.trace.as_ref().map_or("", |t| t.trace_id()),
                    error = %e,
                    "record refused by the database; dead-lettered"
                );
                total.refused.push(row.seq);
                guilty.push(DeadLetter {
                    seq: row.seq,
                    subject: row.subject.clone(),
                    reason: format!("refused by the database: {e}"),
                    payload: row.envelope.encode(),
                });
            }
        }
    }
    let recorded = until_stored(
        "recording dead letters",
        retry_max,
        cancel,
        &mut keep_alive,
        // Through the write path: erased records never become dead letters.
        || store::write_batch(pool, policy, &[], &guilty),
    )
    .await?;
    match recorded {
        Ok(s) => total.add(s),
        // Dead letters are sanitized to fit; if Postgres still refuses them, holding the
        // batch forever would stop the consumer, so log loudly and move on.
        Err(e) => {
            tracing::error!(error = %e, count = guilty.len(), "dead letters could not be recorded")
        }
    }
    Ok(total)
}
