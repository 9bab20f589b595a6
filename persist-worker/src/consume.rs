//! The consumer loop: pull a batch, write it in one transaction, ack after commit.
//!
//! Crash before the ack means redelivery, never loss; redelivery is harmless because the
//! upsert is idempotent. While Postgres is unavailable the loop holds its batch, keeps it
//! alive with progress acks and retries with backoff — an outage does not spend
//! deliveries. A message that can never be stored is dead-lettered and acked without
//! holding up the rest of its batch. On shutdown it stops pulling, finishes (or hands
//! back) the batch in hand, and returns.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, message::AckKind, stream::Stream};
use callcap::subjects::CONSUMER_NAME;
use callcap::Envelope;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RunArgs;
use crate::store::{self, DeadLetter, Row, StoreError, WriteStats};

/// The durable consumer definition shared by every worker.
pub fn consumer_config(args: &RunArgs) -> pull::Config {
    let wait = args.ack_wait();
    pull::Config {
        durable_name: Some(CONSUMER_NAME.to_owned()),
        description: Some("Call Capture persist workers".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: wait,
        max_deliver: args.max_deliver,
        // Redeliveries after a worker died back off: ack_wait, then 2x, 4x, 8x.
        backoff: vec![wait, wait * 2, wait * 4, wait * 8],
        max_ack_pending: args.max_ack_pending,
        ..Default::default()
    }
}

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
            metrics::counter!("worker_redeliveries_total").increment(1);
        }
        match Envelope::decode_checked(&m.subject, &m.payload) {
            Ok(envelope) => rows.push(Row { seq, envelope }),
            Err(e) => dead.push(DeadLetter {
                seq,
                subject: m.subject.to_string(),
                reason: e.to_string(),
                payload: m.payload.to_vec(),
            }),
        }
    }
    Decoded { rows, dead }
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
    cancel: &CancellationToken,
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
                    () = cancel.cancelled() => return Err(Abandoned::Shutdown),
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
    rows: &[Row],
    dead: &[DeadLetter],
    retry_max: Duration,
    cancel: &CancellationToken,
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
        || store::write_batch(pool, rows, dead),
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
            store::write_batch(pool, std::slice::from_ref(row), &[])
        })
        .await?;
        match one {
            Ok(s) => total.rows_changed += s.rows_changed,
            Err(e) => guilty.push(DeadLetter {
                seq: row.seq,
                subject: callcap::subjects::ingest_subject(row.envelope.record.company_id),
                reason: format!("refused by the database: {e}"),
                payload: row.envelope.encode(),
            }),
        }
    }
    let recorded = until_stored(
        "recording dead letters",
        retry_max,
        cancel,
        &mut keep_alive,
        || store::record_dead_letters(pool, &guilty),
    )
    .await?;
    match recorded {
        Ok(n) => total.dead_letters += n,
        // Dead letters are sanitized to fit; if Postgres still refuses them, holding the
        // batch forever would stop the consumer, so log loudly and move on.
        Err(e) => {
            tracing::error!(error = %e, count = guilty.len(), "dead letters could not be recorded")
        }
    }
    Ok(total)
}

/// Consumes until `cancel` fires.
///
/// Batches fill from the pull stream until `batch_size` messages or `batch_linger_ms`
/// after the first one, whichever comes first: full transactions under load, a few
/// milliseconds of added latency when idle.
///
/// # Errors
/// When the durable consumer cannot be created or its message stream opened.
pub async fn run(
    stream: Stream,
    pool: PgPool,
    args: RunArgs,
    cancel: CancellationToken,
) -> Result<(), async_nats::Error> {
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(CONSUMER_NAME, consumer_config(&args))
        .await?;
    tracing::info!(
        consumer = CONSUMER_NAME,
        batch_size = args.batch_size,
        "consuming"
    );
    let batch = args.batch_size as usize;
    loop {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        loop {
            let first = tokio::select! {
                () = cancel.cancelled() => {
                    hand_back_prefetched(&mut messages).await;
                    return Ok(());
                }
                next = messages.next() => next,
            };
            let Some(first) = first else { break };
            let mut msgs: Vec<jetstream::Message> = Vec::with_capacity(batch);
            msgs.extend(usable(first));
            let linger = tokio::time::sleep(args.batch_linger());
            tokio::pin!(linger);
            while msgs.len() < batch {
                tokio::select! {
                    biased;
                    next = messages.next() => match next {
                        Some(m) => msgs.extend(usable(m)),
                        None => break,
                    },
                    () = &mut linger => break,
                }
            }
            if msgs.is_empty() {
                continue;
            }
            if handle(&pool, &args, &cancel, msgs).await == Err(Abandoned::Shutdown) {
                hand_back_prefetched(&mut messages).await;
                return Ok(());
            }
        }
        tracing::warn!("pull stream ended; reopening");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A message, or `None` after logging a pull-stream error (missed heartbeats and the
/// like: the stream recovers by itself).
fn usable(m: Result<jetstream::Message, pull::MessagesError>) -> Option<jetstream::Message> {
    m.map_err(|e| tracing::warn!(error = %e, "pull stream error"))
        .ok()
}

/// Writes one batch and acks it; on shutdown without a write, hands it back.
async fn handle(
    pool: &PgPool,
    args: &RunArgs,
    cancel: &CancellationToken,
    msgs: Vec<jetstream::Message>,
) -> Result<(), Abandoned> {
    let started = Instant::now();
    let decoded = decode(&msgs);
    let keep_alive = || async {
        for m in &msgs {
            let _ = m.ack_with(AckKind::Progress).await;
        }
    };
    let written = write_reliably(
        pool,
        &decoded.rows,
        &decoded.dead,
        args.retry_max(),
        cancel,
        keep_alive,
    )
    .await;
    match written {
        Ok(stats) => {
            // Ack strictly after commit. A lost ack means a harmless redelivery.
            let acks = futures::future::join_all(msgs.iter().map(|m| m.ack())).await;
            let failed = acks.iter().filter(|a| a.is_err()).count();
            if failed > 0 {
                tracing::warn!(
                    failed,
                    "some acks not sent; those messages will be redelivered"
                );
            }
            metrics::counter!("worker_messages_total").increment(msgs.len() as u64);
            crate::ops::record_batch(decoded.rows.len() as u64, stats.dead_letters);
            metrics::counter!("worker_rows_written_total").increment(stats.rows_changed);
            metrics::counter!("worker_dead_letters_total").increment(stats.dead_letters);
            metrics::histogram!("worker_batch_size").record(msgs.len() as f64);
            metrics::histogram!("worker_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(
                messages = msgs.len(),
                rows = stats.rows_changed,
                dead = stats.dead_letters,
                "batch stored"
            );
            Ok(())
        }
        Err(Abandoned::Shutdown) => {
            for m in &msgs {
                let _ = m.ack_with(AckKind::Nak(None)).await;
            }
            Err(Abandoned::Shutdown)
        }
    }
}

/// Naks messages already pulled but not started, so another worker takes them now
/// rather than after the ack wait.
async fn hand_back_prefetched<S>(messages: &mut S)
where
    S: futures::Stream<Item = Result<jetstream::Message, pull::MessagesError>> + Unpin,
{
    while let Some(Some(m)) = messages.next().now_or_never() {
        if let Ok(m) = m {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
    }
}
