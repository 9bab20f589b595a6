//! The consumer loop: pull a batch, write it in one transaction, ack after commit.
//!
//! Crash before the ack means redelivery, never loss; redelivery is harmless because the
//! upsert is idempotent. While Postgres is unavailable the loop holds its batch, keeps it
//! alive with progress acks and retries with backoff — an outage does not spend
//! deliveries. A message that can never be stored is dead-lettered and acked without
//! holding up the rest of its batch. A record whose company has erasures this worker
//! cannot check (no `ERASURE_KEY_FILE`, or another key than the erasures') is held —
//! neither stored nor acked, kept alive with progress acks and retried — while the
//! batch's other records, and every other company's, are stored (`Held`). On shutdown
//! it stops pulling, finishes (or hands back) the batch in hand and what it holds, and
//! returns.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, message::AckKind};
use callcap::partitions::Partition;
use callcap::shutdown::Shutdown;
use callcap::subjects::Lane;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::RunArgs;
use crate::health::ConsumerHealth;
use crate::runner::{Component, Spec};
use crate::write::{decode, write_reliably, Abandoned, Decoded};

/// Records stored (0) and dead-lettered (1) by this worker, per second over the last
/// minute: what the status page shows.
static THROUGHPUT: std::sync::LazyLock<callcap::recent::Window<2>> =
    std::sync::LazyLock::new(callcap::recent::Window::default);

/// This worker's stored and dead-lettered records per second over the last minute.
pub fn throughput() -> &'static callcap::recent::Window<2> {
    &THROUGHPUT
}

/// Records stored and dead-lettered by this worker since start.
static TOTALS: [std::sync::atomic::AtomicU64; 2] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 2];

/// This worker's stored and dead-lettered records since start (for the last hour's chart).
pub fn totals() -> [u64; 2] {
    std::array::from_fn(|i| TOTALS[i].load(std::sync::atomic::Ordering::Relaxed))
}

fn record_batch(stored: u64, dead_letters: u64) {
    THROUGHPUT.add(0, stored);
    THROUGHPUT.add(1, dead_letters);
    TOTALS[0].fetch_add(stored, std::sync::atomic::Ordering::Relaxed);
    TOTALS[1].fetch_add(dead_letters, std::sync::atomic::Ordering::Relaxed);
}

/// The durable consumer definition of a lane on a partition stream, shared by every
/// worker serving it.
pub fn consumer_config(args: &RunArgs, lane: Lane, partition: Partition) -> pull::Config {
    let wait = args.ack_wait();
    pull::Config {
        durable_name: Some(lane.consumer_name().to_owned()),
        description: Some(format!("Call Capture persist workers, {lane} lane")),
        filter_subject: partition.filter(lane),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: wait,
        max_deliver: args.max_deliver,
        // Redeliveries after a worker died back off: ack_wait, then 2x, 4x, 8x.
        backoff: vec![wait, wait * 2, wait * 4, wait * 8],
        max_ack_pending: args.max_ack_pending,
        // The server's default, written out so the guard can compare it.
        max_waiting: 512,
        ..Default::default()
    }
}

/// The records component: every lane this worker serves (`LANES`), on every partition
/// stream, each lane writing on its own connections so that a backlog in one never
/// waits for the other's pool.
pub struct Records {
    pub lanes: Vec<Lane>,
    pub pools: std::collections::HashMap<Lane, PgPool>,
    pub policy: crate::privacy::Policy,
    pub args: RunArgs,
}

impl Component for Records {
    fn what(&self) -> &'static str {
        "a lane's consumer"
    }

    fn lanes(&self, _found: &callcap::partitions::Found) -> Vec<Option<Lane>> {
        self.lanes.iter().copied().map(Some).collect()
    }

    fn spec<'a>(
        &'a self,
        found: &'a callcap::partitions::Found,
        lane: Option<Lane>,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<Spec>> {
        Box::pin(async move {
            let lane = lane.ok_or_else(|| anyhow::anyhow!("the records are served by lane"))?;
            // A stream from before lanes has no subjects for the overflow lane: nothing
            // can arrive there until `setup` adds them (the gateways keep every record
            // in the main lane meanwhile).
            let carried = found.subjects.contains(&found.partition.filter(lane));
            Ok(Spec {
                consumer: lane.consumer_name(),
                wanted: carried.then(|| consumer_config(&self.args, lane, found.partition)),
                fresh_from: None,
            })
        })
    }

    fn serve(
        &self,
        consumer: jetstream::consumer::PullConsumer,
        health: std::sync::Arc<ConsumerHealth>,
        shutdown: Shutdown,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<()>> {
        let lane = health.lane().unwrap_or(Lane::Main);
        let (policy, args) = (self.policy.clone(), self.args.clone());
        let pool = self.pools.get(&lane).cloned();
        Box::pin(async move {
            let pool = pool.ok_or_else(|| anyhow::anyhow!("no pool for the {lane} lane"))?;
            run(consumer, &health, pool, policy, args, shutdown)
                .await
                .map_err(|e| anyhow::anyhow!("the {lane} lane's consumer failed: {e}"))
        })
    }
}

/// Registers the `# HELP` text of the worker's metrics and starts its counters at 0 (a
/// series that first appears at 1 shows no increase to Prometheus: the first dead letter
/// or database error would not fire its alert).
pub fn describe_metrics() {
    let counters = [
        (
            "worker_messages_total",
            "Stream messages handled (stored, merged or dead-lettered) and acked",
        ),
        (
            "worker_rows_written_total",
            "Rows inserted or changed in Postgres",
        ),
        (
            "worker_dead_letters_total",
            "Messages moved to the dead-letter table instead of stored",
        ),
        (
            "worker_redeliveries_total",
            "Messages delivered more than once (a worker died or was slow before its ack)",
        ),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
        for lane in Lane::ALL {
            metrics::counter!(name, "lane" => lane.as_str()).absolute(0);
        }
    }
    metrics::describe_counter!(
        "worker_records_dropped_total",
        "Records not stored by reason: erased (a matching erasure; deleted from the stream) or expired (older than RETENTION_DAYS)"
    );
    for lane in Lane::ALL {
        for reason in ["erased", "expired"] {
            metrics::counter!("worker_records_dropped_total", "lane" => lane.as_str(), "reason" => reason)
                .absolute(0);
        }
    }
    metrics::describe_counter!(
        "worker_messages_erased_total",
        "Stream messages deleted (payload overwritten) because they held erased data"
    );
    metrics::counter!("worker_messages_erased_total").absolute(0);
    metrics::describe_counter!(
        "worker_rows_expired_total",
        "Stored calls deleted by RETENTION_DAYS"
    );
    metrics::counter!("worker_rows_expired_total").absolute(0);
    // Not a lane's: the database is shared.
    metrics::describe_counter!(
        "worker_db_errors_total",
        "Failed database transactions (retried with backoff; nothing is acked)"
    );
    metrics::counter!("worker_db_errors_total").absolute(0);
    metrics::describe_counter!(
        "worker_consumer_repairs_total",
        "Times the durable consumer was found missing or changed and recreated as defined, by reason"
    );
    for reason in ["missing", "changed"] {
        for lane in Lane::ALL {
            metrics::counter!("worker_consumer_repairs_total", "lane" => lane.as_str(), "reason" => reason)
                .absolute(0);
        }
    }
    metrics::describe_gauge!(
        "worker_consumer_pending",
        "Records of a lane not yet delivered to any worker (the backlog KEDA scales on), by lane"
    );
    metrics::describe_gauge!(
        "worker_consumer_ack_pending",
        "Records delivered to a worker and not yet acked (being stored)"
    );
    metrics::describe_histogram!(
        "worker_batch_size",
        "Messages per batch written in one transaction"
    );
    metrics::describe_histogram!(
        "worker_batch_duration_seconds",
        metrics::Unit::Seconds,
        "Time to write a batch: transaction and acks"
    );
}

/// Consumes until `cancel` fires.
///
/// Batches fill from the pull stream until `batch_size` messages or `batch_linger_ms`
/// after the first one, whichever comes first: full transactions under load, a few
/// milliseconds of added latency when idle.
///
/// Up to `batches_in_flight` batches are written at once, each in its own transaction on
/// its own connection, while the next one is pulled and decoded: the database's commit
/// and the worker's decoding overlap instead of taking turns. Stream order matters only
/// per call id (the merge rules), so a batch that shares an id with one still being
/// written waits for it: for every call, messages are applied in stream order.
///
/// # Errors
/// When the durable consumer cannot be created or its message stream opened.
pub async fn run(
    consumer: jetstream::consumer::PullConsumer,
    health: &std::sync::Arc<ConsumerHealth>,
    pool: PgPool,
    policy: crate::privacy::Policy,
    args: RunArgs,
    cancel: Shutdown,
) -> Result<(), async_nats::Error> {
    let lane = health.lane().unwrap_or(Lane::Main);
    tracing::info!(
        consumer = lane.consumer_name(),
        batch_size = args.batch_size,
        batches_in_flight = args.batches_in_flight,
        "consuming"
    );
    let batch = args.batch_size as usize;
    let mut writing = InFlight::default();
    let mut reopened = health.reopened();
    let held = Held::default();
    let tending = tokio::spawn(held.clone().tend(
        health.clone(),
        pool.clone(),
        policy.clone(),
        args.clone(),
        cancel.clone(),
    ));
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
                () = cancel.triggered() => {
                    writing.drain().await;
                    hand_back_prefetched(&mut messages).await;
                    let _ = tending.await;
                    return Ok(());
                }
                // The guard recreated the consumer: pull from the new one.
                _ = reopened.changed() => None,
                next = messages.next() => next,
            };
            let Some(first) = first else { break };
            // With traces on: the batch transaction's span, with pull, decode, upsert,
            // commit and ack under it; each record's own span links to it.
            let span = callcap::otel_span!(
                "write batch",
                lane = lane.as_str(),
                messages = tracing::field::Empty
            );
            let msgs = fill(first, &mut messages, batch, args.batch_linger())
                .instrument(callcap::otel_span!(parent: &span, "pull"))
                .await;
            if msgs.is_empty() {
                continue;
            }
            span.record("messages", msgs.len() as i64);
            let started = Instant::now();
            let decoded = {
                let _decode = callcap::otel_span!(parent: &span, "decode").entered();
                decode(&msgs)
            };
            let ids: HashSet<Uuid> = decoded
                .rows
                .iter()
                .map(|r| r.envelope.call_history_id)
                .collect();
            // Room for this batch: fewer than `batches_in_flight` writing, none of them
            // with one of its calls.
            let stopped = writing
                .wait_for_room(args.batches_in_flight as usize, &ids)
                .await;
            if stopped {
                nak_all(&msgs).await;
                writing.drain().await;
                hand_back_prefetched(&mut messages).await;
                let _ = tending.await;
                return Ok(());
            }
            let (pool, policy, args, cancel, held) = (
                pool.clone(),
                policy.clone(),
                args.clone(),
                cancel.clone(),
                held.clone(),
            );
            let task = tokio::spawn(async move {
                let batch = Batch {
                    msgs,
                    decoded,
                    started,
                };
                handle(lane, &pool, &policy, &args, &cancel, batch, &held)
                    .instrument(span)
                    .await
            });
            writing.batches.push_back((ids, task));
        }
        tracing::warn!("pull stream ended; reopening");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A batch: `first`, then what the pull brings until `batch` messages or `linger` after
/// the first, whichever comes first.
async fn fill<S>(
    first: Result<jetstream::Message, pull::MessagesError>,
    messages: &mut S,
    batch: usize,
    linger: Duration,
) -> Vec<jetstream::Message>
where
    S: futures::Stream<Item = Result<jetstream::Message, pull::MessagesError>> + Unpin,
{
    let mut msgs: Vec<jetstream::Message> = Vec::with_capacity(batch);
    msgs.extend(usable(first));
    let linger = tokio::time::sleep(linger);
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
    msgs
}

/// One batch's write task.
type Write = JoinHandle<Result<(), Abandoned>>;

/// Batches being written, oldest first, with the call ids each one holds.
#[derive(Default)]
struct InFlight {
    batches: VecDeque<(HashSet<Uuid>, Write)>,
}

impl InFlight {
    /// Waits until fewer than `limit` batches are being written and none of them holds
    /// one of `ids`. Returns true when a write was abandoned for shutdown.
    async fn wait_for_room(&mut self, limit: usize, ids: &HashSet<Uuid>) -> bool {
        let mut stopped = false;
        loop {
            // Finished writes leave first, whatever their place.
            let mut still = VecDeque::with_capacity(self.batches.len());
            for (held, task) in self.batches.drain(..) {
                if task.is_finished() {
                    stopped |= Self::outcome(task).await;
                } else {
                    still.push_back((held, task));
                }
            }
            self.batches = still;
            let blocking = self
                .batches
                .iter()
                .position(|(held, _)| !held.is_disjoint(ids));
            let full = self.batches.len() >= limit.max(1);
            let wait_for = match (blocking, full) {
                (Some(i), _) => i,
                (None, true) => 0,
                (None, false) => return stopped,
            };
            if wait_for > 0 {
                // Keep the order of the writes ahead of the one waited for.
                let (held, task) = self.batches.remove(wait_for).expect("index in range");
                stopped |= Self::outcome(task).await;
                drop(held);
            } else if let Some((_, task)) = self.batches.pop_front() {
                stopped |= Self::outcome(task).await;
            }
        }
    }

    /// Waits for every write in flight.
    async fn drain(&mut self) {
        while let Some((_, task)) = self.batches.pop_front() {
            Self::outcome(task).await;
        }
    }

    async fn outcome(task: Write) -> bool {
        match task.await {
            Ok(Ok(())) => false,
            Ok(Err(Abandoned::Shutdown)) => true,
            Err(e) => {
                // A panic in a write: its messages were not acked and will be redelivered.
                tracing::error!(error = %e, "a batch write failed unexpectedly");
                false
            }
        }
    }
}

async fn nak_all(msgs: &[jetstream::Message]) {
    for m in msgs {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}

/// A message, or `None` after logging a pull-stream error (missed heartbeats and the
/// like: the stream recovers by itself).
fn usable(m: Result<jetstream::Message, pull::MessagesError>) -> Option<jetstream::Message> {
    m.map_err(|e| tracing::warn!(error = %e, "pull stream error"))
        .ok()
}

/// One pulled batch: its messages, decoded, and when it was pulled.
struct Batch {
    msgs: Vec<jetstream::Message>,
    decoded: Decoded,
    started: Instant,
}

/// Writes `decoded` until stored (retrying while Postgres is away), telling JetStream the
/// batch's messages are still being worked on so their ack wait does not run out.
async fn write_keeping_alive(
    msgs: &[jetstream::Message],
    decoded: &Decoded,
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    args: &RunArgs,
    cancel: &Shutdown,
) -> Result<crate::store::WriteStats, Abandoned> {
    let keep_alive = || async {
        for m in msgs {
            let _ = m.ack_with(AckKind::Progress).await;
        }
    };
    write_reliably(
        pool,
        policy,
        &decoded.rows,
        &decoded.dead,
        args.retry_max(),
        cancel,
        keep_alive,
    )
    .await
}

/// Writes one decoded batch and acks it, less the records held ([`Held`]); on shutdown
/// without a write, hands it back. Messages dropped as erased are deleted from the stream
/// (a dialer resending an erased record, or one in flight when the erasure was made).
async fn handle(
    lane: Lane,
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    args: &RunArgs,
    cancel: &Shutdown,
    batch: Batch,
    held: &Held,
) -> Result<(), Abandoned> {
    let Batch {
        msgs,
        decoded,
        started,
    } = batch;
    let records = crate::write::record_spans(&decoded.rows, "consume");
    let written = write_keeping_alive(&msgs, &decoded, pool, policy, args, cancel).await;
    match written {
        Ok(stats) => {
            let (msgs, holding) = held.take_out(msgs, &stats);
            // Ack strictly after commit. A lost ack means a harmless redelivery.
            let ack = callcap::otel_span!("ack", messages = msgs.len() as i64);
            let acks = futures::future::join_all(msgs.iter().map(|m| m.ack()))
                .instrument(ack)
                .await;
            log_records(&decoded.rows, &stats);
            drop(records);
            let failed = acks.iter().filter(|a| a.is_err()).count();
            if failed > 0 {
                tracing::warn!(
                    failed,
                    "some acks not sent; those messages will be redelivered"
                );
            }
            if !stats.erased.is_empty() {
                delete_erased(&msgs, &stats.erased).await;
            }
            let lane = lane.as_str();
            metrics::counter!("worker_records_dropped_total", "lane" => lane, "reason" => "erased")
                .increment(stats.erased.len() as u64);
            metrics::counter!("worker_records_dropped_total", "lane" => lane, "reason" => "expired")
                .increment(stats.expired);
            metrics::counter!("worker_messages_total", "lane" => lane).increment(msgs.len() as u64);
            record_batch(
                (decoded.rows.len() as u64).saturating_sub(holding),
                stats.dead_letters,
            );
            metrics::counter!("worker_rows_written_total", "lane" => lane)
                .increment(stats.rows_changed);
            metrics::counter!("worker_dead_letters_total", "lane" => lane)
                .increment(stats.dead_letters);
            metrics::histogram!("worker_batch_size", "lane" => lane).record(msgs.len() as f64);
            metrics::histogram!("worker_batch_duration_seconds", "lane" => lane)
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
            nak_all(&msgs).await;
            Err(Abandoned::Shutdown)
        }
    }
}

/// One DEBUG line per record with what became of it, its request id and trace id: what
/// an operator greps for when following one call (`RUST_LOG=persist_worker=debug`).
fn log_records(rows: &[crate::store::Row], stats: &crate::store::WriteStats) {
    for row in rows {
        let outcome = if stats.erased.contains(&row.seq) {
            "erased"
        } else if stats.held.contains(&row.seq) {
            "held"
        } else if stats.refused.contains(&row.seq) {
            "dead-lettered"
        } else {
            "stored"
        };
        tracing::debug!(
            seq = row.seq,
            call_history_id = %row.envelope.call_history_id,
            request_id = row.envelope.request_id.as_deref().unwrap_or(""),
            trace_id = row.trace.as_ref().map_or("", |t| t.trace_id()),
            outcome,
            "record written"
        );
    }
}

/// Deletes the messages with these stream sequences from their stream.
async fn delete_erased(msgs: &[jetstream::Message], erased: &[u64]) {
    let mut by_stream: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut context = None;
    for m in msgs {
        if let Ok(info) = m.info() {
            if erased.contains(&info.stream_sequence) {
                by_stream
                    .entry(info.stream.to_owned())
                    .or_default()
                    .push(info.stream_sequence);
                context.get_or_insert_with(|| m.context.clone());
            }
        }
    }
    if let Some(js) = context {
        for (stream, seqs) in by_stream {
            crate::write::delete_messages(&js, &stream, &seqs).await;
        }
    }
}

/// The records a consume loop holds: their company has erasures this worker cannot check
/// (no `ERASURE_KEY_FILE`, or a key other than the erasures'), so they are neither stored
/// (they may be erased) nor acknowledged (they may not be). They are kept alive with
/// progress acks (which spend no delivery), retried, and handed back on shutdown, while
/// the lane goes on for every other company. Held records count against the consumer's
/// `MAX_ACK_PENDING`: once that many are held the lane waits for everyone, and nothing
/// is lost either way.
#[derive(Clone, Default)]
struct Held(std::sync::Arc<std::sync::Mutex<HeldState>>);

#[derive(Default)]
struct HeldState {
    msgs: Vec<jetstream::Message>,
    why: Option<crate::privacy::Uncheckable>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the messages `stats` says were held; the rest, to acknowledge, and how many
    /// were held.
    fn take_out(
        &self,
        msgs: Vec<jetstream::Message>,
        stats: &crate::store::WriteStats,
    ) -> (Vec<jetstream::Message>, u64) {
        if stats.held.is_empty() {
            return (msgs, 0);
        }
        let held: HashSet<u64> = stats.held.iter().copied().collect();
        let (keep, ack): (Vec<_>, Vec<_>) = msgs
            .into_iter()
            .partition(|m| m.info().is_ok_and(|i| held.contains(&i.stream_sequence)));
        let n = keep.len() as u64;
        let mut state = self.lock();
        if state.why.as_ref() != stats.hold.as_ref() {
            if let Some(why) = &stats.hold {
                tracing::error!(
                    cause = %why,
                    "holding the records of companies with erasures: they cannot be checked here. \
                     Other companies' records are stored meanwhile; give this worker the erasures' ERASURE_KEY_FILE"
                );
            }
        }
        state.msgs.extend(keep);
        state.why = stats.hold.clone().or(state.why.take());
        (ack, n)
    }

    /// Keeps the held messages alive, retries them, reports them on the consumer's
    /// health, and hands them back when `cancel` fires.
    async fn tend(
        self,
        health: std::sync::Arc<ConsumerHealth>,
        pool: PgPool,
        policy: crate::privacy::Policy,
        args: RunArgs,
        cancel: Shutdown,
    ) {
        // Well inside the ack wait, so a held message is never redelivered meanwhile.
        let keep_alive = (args.ack_wait() / 3).max(Duration::from_millis(200));
        let retry_every = Duration::from_secs(30).min(args.ack_wait() * 2);
        let mut last_retry = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(keep_alive) => {}
                () = cancel.triggered() => break,
            }
            let msgs = std::mem::take(&mut self.lock().msgs);
            if msgs.is_empty() {
                health.set_holding(None);
                continue;
            }
            let msgs = if last_retry.elapsed() >= retry_every {
                last_retry = Instant::now();
                self.retry(msgs, &pool, &policy, &args, &cancel).await
            } else {
                for m in &msgs {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
                msgs
            };
            let mut state = self.lock();
            state.msgs.extend(msgs);
            let n = state.msgs.len() as u64;
            health.set_holding(state.why.clone().filter(|_| n > 0).map(|why| (n, why)));
        }
        let msgs = std::mem::take(&mut self.lock().msgs);
        nak_all(&msgs).await;
        health.set_holding(None);
    }

    /// Writes held messages again: those stored now are acknowledged, the rest returned
    /// (kept alive).
    async fn retry(
        &self,
        msgs: Vec<jetstream::Message>,
        pool: &PgPool,
        policy: &crate::privacy::Policy,
        args: &RunArgs,
        cancel: &Shutdown,
    ) -> Vec<jetstream::Message> {
        let decoded = decode(&msgs);
        let written = write_keeping_alive(&msgs, &decoded, pool, policy, args, cancel).await;
        match written {
            Ok(stats) => {
                let held: HashSet<u64> = stats.held.iter().copied().collect();
                let (still, done): (Vec<_>, Vec<_>) = msgs
                    .into_iter()
                    .partition(|m| m.info().is_ok_and(|i| held.contains(&i.stream_sequence)));
                for m in &done {
                    let _ = m.ack().await;
                }
                if !stats.erased.is_empty() {
                    delete_erased(&done, &stats.erased).await;
                }
                if stats.held.is_empty() {
                    self.lock().why = None;
                }
                still
            }
            Err(Abandoned::Shutdown) => msgs,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn ids(ns: &[u128]) -> HashSet<Uuid> {
        ns.iter().map(|n| Uuid::from_u128(*n)).collect()
    }

    /// A write that finishes after `ms`, logging its name when it does.
    fn write(
        name: &'static str,
        ms: u64,
        log: &Arc<Mutex<Vec<&'static str>>>,
    ) -> JoinHandle<Result<(), Abandoned>> {
        let log = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            log.lock().unwrap().push(name);
            Ok(())
        })
    }

    #[tokio::test]
    async fn a_batch_sharing_a_call_waits_for_the_write_holding_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut writing = InFlight::default();
        writing
            .batches
            .push_back((ids(&[1, 2]), write("slow", 300, &log)));
        writing
            .batches
            .push_back((ids(&[3]), write("fast", 10, &log)));
        // Disjoint from both and below the limit: starts at once.
        assert!(!writing.wait_for_room(3, &ids(&[4])).await);
        assert!(log.lock().unwrap().is_empty());
        // Holds call 2: waits until the write holding it has committed.
        assert!(!writing.wait_for_room(3, &ids(&[2, 5])).await);
        assert!(log.lock().unwrap().contains(&"slow"));
        assert!(writing
            .batches
            .iter()
            .all(|(held, _)| !held.contains(&Uuid::from_u128(2))));
    }

    #[tokio::test]
    async fn at_the_limit_the_oldest_write_is_waited_for() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut writing = InFlight::default();
        writing
            .batches
            .push_back((ids(&[1]), write("first", 200, &log)));
        writing
            .batches
            .push_back((ids(&[2]), write("second", 400, &log)));
        assert!(!writing.wait_for_room(2, &ids(&[3])).await);
        assert_eq!(*log.lock().unwrap(), ["first"]);
        assert_eq!(writing.batches.len(), 1);
        // A write abandoned for shutdown is reported.
        writing
            .batches
            .push_back((ids(&[4]), tokio::spawn(async { Err(Abandoned::Shutdown) })));
        assert!(writing.wait_for_room(1, &ids(&[4])).await);
    }
}
