//! Group commit: records from concurrent requests are coalesced into JetStream atomic
//! batches, so that under `sync_interval: always` (a 201 that survives power loss) one
//! fsync covers a whole batch instead of one record.
//!
//! One committer task owns the order of the stream. It takes records as they come:
//! - when no batch is in flight, what has arrived goes out at once (no added latency when
//!   idle: a lone record is a plain publish);
//! - while batches are in flight, arriving records gather into the next batch, which is
//!   sent when an in-flight batch's ack returns, when it reaches the batch cap, or when
//!   its first record has waited the linger bound — whichever comes first, and only while
//!   fewer than the in-flight limit are out;
//! - each record keeps its own `Nats-Msg-Id`; each waiting request completes with its own
//!   stream sequence, derived from the batch ack (records of a batch are stored at
//!   consecutive sequences, in arrival order).
//!
//! Failures: a batch the server refuses because it holds a `Nats-Msg-Id` it has already
//! stored (a client's retry) is published again record by record, so the retried record
//! gets its original sequence and the others are stored. A batch without an ack in time,
//! or refused for any other reason, fails every record in it (503 + Retry-After upstream):
//! never a 201 for a record whose batch was not acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use callcap::partitions::Partition;

use tracing::Instrument as _;

use super::wire::{Message, PendingReply, Reply, Transport, Wire, ERR_BATCH_DUPLICATE_MSG_ID};
use super::{NotReady, Outbound, Outcomes, PublishError, PublishStats, Publisher, Receipt};

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    records: AtomicU64,
    fallbacks: AtomicU64,
    retries: AtomicU64,
}

/// How records are grouped.
#[derive(Debug, Clone)]
pub struct GroupCommitConfig {
    /// Most records in one atomic batch (the server's `limits.batch.max_msgs`, 1,000 by
    /// default).
    pub max_batch_records: usize,
    /// Most batches awaiting their ack at once. Every gateway's batches count against the
    /// server's `max_inflight_per_stream` (50 by default).
    pub max_batches_in_flight: usize,
    /// Longest a record waits for its batch to fill while other batches are in flight.
    pub linger: Duration,
    /// Longest wait for a batch's ack; the records then fail with a timeout.
    pub ack_timeout: Duration,
}

struct Job {
    records: Vec<Message>,
    done: oneshot::Sender<Outcomes>,
    /// When the job was queued (for the linger bound).
    queued: Instant,
}

/// The group-commit publisher: handlers hand records to the committer task through a
/// bounded queue and wait for their outcomes.
pub struct GroupCommit {
    /// The partition stream every record goes to: its subjects are this one's.
    partition: Partition,
    queue: mpsc::Sender<Job>,
    wire: Arc<Wire>,
    js: jetstream::Context,
    config: GroupCommitConfig,
    counters: Arc<Counters>,
}

impl GroupCommit {
    /// Starts the committer on `client` for the first layout's single stream, `CALLS`.
    ///
    /// # Errors
    /// When the reply inbox cannot be subscribed.
    pub async fn start(
        client: async_nats::Client,
        config: GroupCommitConfig,
    ) -> Result<Self, async_nats::SubscribeError> {
        Self::start_for(client, config, Partition::LEGACY).await
    }

    /// A publisher for one partition stream: every record handed to it goes to that
    /// stream, on the partition's subject of its lane and company (an atomic batch is
    /// one stream's).
    pub async fn start_for(
        client: async_nats::Client,
        config: GroupCommitConfig,
        partition: Partition,
    ) -> Result<Self, async_nats::SubscribeError> {
        let wire = Arc::new(Wire::new(client.clone()).await?);
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client);
        // The queue only smooths hand-over: the gateway's in-flight budget bounds how many
        // records wait in total.
        let (queue, rx) = mpsc::channel(1024);
        let counters = Arc::new(Counters::default());
        tokio::spawn(committer(
            rx,
            wire.clone() as Arc<dyn Transport>,
            config.clone(),
            counters.clone(),
        ));
        Ok(GroupCommit {
            queue,
            wire,
            js,
            config,
            counters,
            partition,
        })
    }

    /// The JetStream context on the same connection (stream set-up at start).
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        self.wire.client()
    }
}

impl Publisher for GroupCommit {
    fn publish(&self, records: Vec<Outbound>) -> BoxFuture<'_, Outcomes> {
        let records: Vec<Message> = records
            .into_iter()
            .map(|r| Message {
                subject: self.partition.subject(r.lane, r.company),
                msg_id: r.msg_id,
                payload: r.payload,
                trace: r.trace,
            })
            .collect();
        Box::pin(async move {
            let total = records.len();
            let deadline = tokio::time::Instant::now() + self.config.ack_timeout;
            // Jobs are queued in order, so a request's records keep their order in the
            // stream; each job fits one batch.
            let mut waiting = Vec::new();
            let mut records = records.into_iter().peekable();
            while records.peek().is_some() {
                let chunk: Vec<Message> = records
                    .by_ref()
                    .take(self.config.max_batch_records)
                    .collect();
                let n = chunk.len();
                let (done, rx) = oneshot::channel();
                let job = Job {
                    records: chunk,
                    done,
                    queued: Instant::now(),
                };
                let queued = tokio::time::timeout_at(deadline, self.queue.send(job)).await;
                waiting.push((n, queued.is_ok_and(|r| r.is_ok()).then_some(rx)));
            }
            let mut outcomes = Vec::with_capacity(total);
            for (n, rx) in waiting {
                let got = match rx {
                    Some(rx) => tokio::time::timeout_at(deadline, rx).await.ok(),
                    None => None,
                };
                match got {
                    Some(Ok(o)) => outcomes.extend(o),
                    _ => outcomes.extend((0..n).map(|_| {
                        Err(PublishError::Timeout(format!(
                            "not acknowledged within {} ms",
                            self.config.ack_timeout.as_millis()
                        )))
                    })),
                }
            }
            outcomes
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), NotReady>> {
        Box::pin(async move {
            if self.client().connection_state() != async_nats::connection::State::Connected {
                return Err(NotReady::Disconnected);
            }
            let stream = self.partition.stream_name();
            tokio::time::timeout(self.config.ack_timeout, self.js.get_stream(&stream))
                .await
                .map_err(|_| NotReady::NoAnswer)?
                .map_err(|e| NotReady::StreamUnreachable {
                    stream,
                    reason: e.to_string(),
                })?;
            Ok(())
        })
    }

    fn stats(&self) -> PublishStats {
        PublishStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            records: self.counters.records.load(Ordering::Relaxed),
            fallbacks: self.counters.fallbacks.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
        }
    }
}

/// A batch being gathered or in flight: its distinct messages, and for each waiting job
/// the message index of each of its records.
#[derive(Default)]
struct Batch {
    messages: Vec<Message>,
    by_msg_id: HashMap<String, usize>,
    waiters: Vec<(oneshot::Sender<Outcomes>, Vec<usize>)>,
    first_queued: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Adds `job` if it fits under `cap`; hands it back otherwise.
    fn offer(&mut self, job: Job, cap: usize) -> Option<Job> {
        if !self.messages.is_empty() && self.messages.len() + job.records.len() > cap {
            return Some(job);
        }
        if job.done.is_closed() {
            // The request is gone (client hung up, or it gave up waiting): publishing it
            // would store a record nobody got a 201 for. Its retry will come.
            return None;
        }
        self.first_queued.get_or_insert(job.queued);
        let slots = job
            .records
            .into_iter()
            .map(|record| {
                // The same record twice in one batch (two concurrent identical POSTs)
                // would make the server refuse the whole batch: both get one message.
                *self
                    .by_msg_id
                    .entry(record.msg_id.clone())
                    .or_insert_with(|| {
                        self.messages.push(record);
                        self.messages.len() - 1
                    })
            })
            .collect();
        self.waiters.push((job.done, slots));
        None
    }

    /// Completes every waiting job from the per-message outcomes.
    fn resolve(self, per_message: &[Result<Receipt, PublishError>]) {
        for (done, slots) in self.waiters {
            let _ = done.send(slots.iter().map(|&i| per_message[i].clone()).collect());
        }
    }

    fn fail(self, e: &PublishError) {
        let all: Vec<_> = self.messages.iter().map(|_| Err(e.clone())).collect();
        self.resolve(&all);
    }
}

async fn committer(
    mut rx: mpsc::Receiver<Job>,
    wire: Arc<dyn Transport>,
    config: GroupCommitConfig,
    counters: Arc<Counters>,
) {
    let cap = config.max_batch_records.max(1);
    let mut in_flight: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
    let mut next = Batch::default();
    let mut carry: Option<Job> = None;
    let mut closed = false;
    loop {
        if let Some(job) = carry.take() {
            carry = next.offer(job, cap);
        }
        // Take everything already queued, without waiting.
        while carry.is_none() && !closed {
            match rx.try_recv() {
                Ok(job) => carry = next.offer(job, cap),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        let full = carry.is_some() || next.messages.len() >= cap;
        let linger_at = next.first_queued.map(|t| t + config.linger);
        let lingered = linger_at.is_some_and(|t| Instant::now() >= t);
        let slot_free = in_flight.len() < config.max_batches_in_flight;
        if !next.is_empty() && slot_free && (in_flight.is_empty() || full || lingered) {
            let batch = std::mem::take(&mut next);
            if let Some(waiting) = send(&wire, batch, config.ack_timeout, &counters).await {
                in_flight.push(waiting);
            }
            continue;
        }
        if closed && next.is_empty() && carry.is_none() && in_flight.is_empty() {
            return;
        }
        let waiting_on_acks = !in_flight.is_empty();
        let linger_sleep = async {
            match linger_at {
                Some(t) if slot_free && waiting_on_acks => {
                    tokio::time::sleep_until(t.into()).await;
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            job = rx.recv(), if !closed && !full => match job {
                Some(job) => carry = next.offer(job, cap),
                None => closed = true,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            () = linger_sleep => {}
        }
    }
}

/// Hands the batch to the connection, in order, and returns the wait for its ack (which
/// completes the batch's jobs); `None` when sending failed and the jobs are already done.
async fn send(
    wire: &Arc<dyn Transport>,
    batch: Batch,
    ack_timeout: Duration,
    counters: &Arc<Counters>,
) -> Option<BoxFuture<'static, ()>> {
    if batch.messages.is_empty() {
        return None;
    }
    let started = Instant::now();
    // With traces on: the atomic batch's own span, linked to every record's publish span
    // (a record's trace shows the batch it went in; the batch shows whose records).
    let span = callcap::otel_span!(
        "atomic batch",
        records = batch.messages.len() as i64,
        last_seq = tracing::field::Empty
    );
    if callcap::traces::enabled() {
        for m in &batch.messages {
            if let Some(trace) = &m.trace {
                callcap::traces::link(&span, trace);
            }
        }
    }
    let sent = match tokio::time::timeout(
        ack_timeout,
        send_messages(&**wire, &batch.messages).instrument(span.clone()),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(PublishError::Timeout(
            "NATS did not take the batch in time".into(),
        )),
    };
    let pending = match sent {
        Ok(p) => p,
        Err(e) => {
            batch.fail(&e);
            return None;
        }
    };
    metrics::histogram!("gateway_publish_batch_records").record(batch.messages.len() as f64);
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters
        .records
        .fetch_add(batch.messages.len() as u64, Ordering::Relaxed);
    let wire = wire.clone();
    let counters = counters.clone();
    Some(Box::pin(
        async move {
            let per_message =
                await_batch(&*wire, &batch.messages, pending, ack_timeout, &counters).await;
            let took = started.elapsed().as_secs_f64();
            metrics::histogram!("gateway_publish_duration_seconds").record(took);
            super::record_latency(took);
            if let Some(Ok(last)) = per_message.last() {
                tracing::Span::current().record("last_seq", last.seq as i64);
            }
            batch.resolve(&per_message);
        }
        .instrument(span),
    ))
}

/// Hands `messages` to the connection: one plain publish, or one atomic batch.
async fn send_messages(
    wire: &dyn Transport,
    messages: &[Message],
) -> Result<PendingReply, PublishError> {
    if let [one] = messages {
        wire.send_single(one).await
    } else {
        let refs: Vec<&Message> = messages.iter().collect();
        wire.send_atomic(&refs).await
    }
}

/// Longest wait for one attempt's reply before the same records are sent again (a reply
/// sent while the connection was moving to another server is lost).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Waits for the reply to a sent batch. A reply that means "not now" — no stream leader
/// (an election), a batch cut short by a leader change, too many batches in flight, or no
/// answer at all — is met by sending the same records again, with the same
/// `Nats-Msg-Id`s (a first attempt that was stored after all makes the next one a 10201,
/// answered from the dedup), until the deadline. So a short election costs latency, not
/// a 503.
async fn reply_by(
    wire: &dyn Transport,
    messages: &[Message],
    mut pending: PendingReply,
    deadline: Instant,
    counters: &Counters,
) -> Result<Reply, PublishError> {
    let mut backoff = Duration::from_millis(25);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = pending.wait(left.min(ATTEMPT_TIMEOUT)).await;
        let transient = match &outcome {
            Ok(reply) => reply.is_transient(),
            Err(PublishError::Timeout(_)) => true,
            Err(_) => false,
        };
        if !transient || Instant::now() + backoff >= deadline {
            return outcome;
        }
        tracing::debug!(
            ?outcome,
            records = messages.len(),
            "publish not taken yet; sending again"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(400));
        metrics::counter!("gateway_publish_retries_total").increment(1);
        counters.retries.fetch_add(1, Ordering::Relaxed);
        pending = send_messages(wire, messages).await?;
    }
}

/// The outcome of each message of a sent batch.
async fn await_batch(
    wire: &dyn Transport,
    messages: &[Message],
    pending: PendingReply,
    ack_timeout: Duration,
    counters: &Counters,
) -> Vec<Result<Receipt, PublishError>> {
    let n = messages.len() as u64;
    let all = |r: Result<Receipt, PublishError>| messages.iter().map(|_| r.clone()).collect();
    let deadline = Instant::now() + ack_timeout;
    match reply_by(wire, messages, pending, deadline, counters).await {
        Err(e) => all(Err(e)),
        Ok(Reply::Ack {
            seq,
            count,
            duplicate,
        }) if n == 1 => {
            debug_assert_eq!(count, 1);
            vec![Ok(Receipt { seq, duplicate })]
        }
        Ok(Reply::Ack { seq, count, .. }) if count == n && seq >= n => (0..n)
            .map(|i| {
                Ok(Receipt {
                    seq: seq - n + 1 + i,
                    duplicate: false,
                })
            })
            .collect(),
        Ok(Reply::Error { err_code, .. }) if err_code == ERR_BATCH_DUPLICATE_MSG_ID && n > 1 => {
            metrics::counter!("gateway_publish_batch_fallbacks_total").increment(1);
            counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                records = n,
                "batch holds an already stored record; publishing its records one by one"
            );
            one_by_one(wire, messages, ack_timeout).await
        }
        Ok(reply @ Reply::Ack { .. }) => all(Err(PublishError::Refused(format!(
            "batch ack does not match the batch of {n}: {reply:?}"
        )))),
        Ok(reply) => all(Err(reply
            .into_error()
            .expect("every reply but an ack is an error"))),
    }
}

/// Publishes each message on its own (all sent first, then the acks awaited together).
async fn one_by_one(
    wire: &dyn Transport,
    messages: &[Message],
    ack_timeout: Duration,
) -> Vec<Result<Receipt, PublishError>> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        pending.push(wire.send_single(m).await);
    }
    futures::future::join_all(pending.into_iter().map(|p| async move {
        match p?.wait(ack_timeout).await? {
            Reply::Ack { seq, duplicate, .. } => Ok(Receipt { seq, duplicate }),
            other => Err(other
                .into_error()
                .expect("every reply but an ack is an error")),
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(msg_id: &str) -> Message {
        Message {
            subject: "calls.ingest.x".into(),
            msg_id: msg_id.into(),
            payload: Bytes::from_static(b"{}"),
            trace: None,
        }
    }

    fn job(ids: &[&str]) -> (Job, oneshot::Receiver<Outcomes>) {
        let (done, rx) = oneshot::channel();
        let job = Job {
            records: ids.iter().map(|id| record(id)).collect(),
            done,
            queued: Instant::now(),
        };
        (job, rx)
    }

    fn receipt(seq: u64) -> Result<Receipt, PublishError> {
        Ok(Receipt {
            seq,
            duplicate: false,
        })
    }

    #[test]
    fn a_batch_takes_jobs_whole_up_to_its_cap_and_hands_back_the_one_that_does_not_fit() {
        let mut batch = Batch::default();
        let (a, _ra) = job(&["a1", "a2"]);
        let (b, _rb) = job(&["b1", "b2"]);
        let (c, _rc) = job(&["c1"]);
        assert!(batch.offer(a, 4).is_none());
        assert!(batch.offer(b, 4).is_none());
        let back = batch
            .offer(c, 4)
            .expect("a fifth record does not fit a cap of 4");
        assert_eq!(back.records.len(), 1);
        assert_eq!(batch.messages.len(), 4);
        // A job larger than the cap still goes, alone, into an empty batch.
        let mut empty = Batch::default();
        let (big, _rbig) = job(&["1", "2", "3", "4", "5"]);
        assert!(empty.offer(big, 4).is_none());
        assert_eq!(empty.messages.len(), 5);
    }

    #[test]
    fn the_same_record_twice_is_one_message_and_both_waiters_get_its_outcome() {
        let mut batch = Batch::default();
        let (a, ra) = job(&["same", "a2"]);
        let (b, rb) = job(&["same"]);
        assert!(batch.offer(a, 10).is_none());
        assert!(batch.offer(b, 10).is_none());
        assert_eq!(batch.messages.len(), 2, "one message per msg id");
        batch.resolve(&[receipt(7), receipt(8)]);
        let a_out = ra.blocking_recv().unwrap();
        let b_out = rb.blocking_recv().unwrap();
        assert_eq!(
            a_out
                .iter()
                .map(|r| r.clone().unwrap().seq)
                .collect::<Vec<_>>(),
            [7, 8]
        );
        assert_eq!(b_out[0].clone().unwrap().seq, 7);
    }

    #[test]
    fn a_request_that_is_gone_is_not_published() {
        let mut batch = Batch::default();
        let (a, ra) = job(&["gone"]);
        drop(ra);
        assert!(batch.offer(a, 10).is_none());
        assert!(batch.messages.is_empty() && batch.is_empty());
    }

    #[test]
    fn a_failed_batch_fails_every_record_of_every_waiter() {
        let mut batch = Batch::default();
        let (a, ra) = job(&["a1", "a2"]);
        let (b, rb) = job(&["b1"]);
        batch.offer(a, 10);
        batch.offer(b, 10);
        batch.fail(&PublishError::Timeout("no ack".into()));
        for out in [ra.blocking_recv().unwrap(), rb.blocking_recv().unwrap()] {
            assert!(out
                .iter()
                .all(|r| matches!(r, Err(PublishError::Timeout(_)))));
        }
    }

    // ---- the committer, over a scripted transport ----

    type Sends = Arc<std::sync::Mutex<Vec<(Instant, Vec<String>)>>>;
    type Answer = Box<dyn Fn(usize, &[String]) -> Option<(Duration, Reply)> + Send + Sync>;

    /// Records each send (its msg ids, when) and answers the n-th as scripted; `None`
    /// never answers.
    struct ScriptedTransport {
        sends: Sends,
        answer: Answer,
        unanswered: std::sync::Mutex<Vec<oneshot::Sender<Reply>>>,
    }

    impl ScriptedTransport {
        fn pending(&self, ids: Vec<String>) -> PendingReply {
            let n = {
                let mut sends = self.sends.lock().unwrap();
                sends.push((Instant::now(), ids.clone()));
                sends.len() - 1
            };
            let (tx, rx) = oneshot::channel();
            match (self.answer)(n, &ids) {
                Some((delay, reply)) => {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = tx.send(reply);
                    });
                }
                None => self.unanswered.lock().unwrap().push(tx),
            }
            PendingReply::from_channel(rx)
        }
    }

    impl Transport for ScriptedTransport {
        fn send_single<'a>(
            &'a self,
            record: &'a Message,
        ) -> BoxFuture<'a, Result<PendingReply, PublishError>> {
            let pending = self.pending(vec![record.msg_id.clone()]);
            Box::pin(async move { Ok(pending) })
        }

        fn send_atomic<'a>(
            &'a self,
            records: &'a [&'a Message],
        ) -> BoxFuture<'a, Result<PendingReply, PublishError>> {
            let pending = self.pending(records.iter().map(|r| r.msg_id.clone()).collect());
            Box::pin(async move { Ok(pending) })
        }
    }

    /// Acks every send after `delay`, at consecutive sequences.
    fn acking(delay: Duration) -> Answer {
        let seq = std::sync::atomic::AtomicU64::new(0);
        Box::new(move |_, ids| {
            let n = ids.len() as u64;
            let last = seq.fetch_add(n, Ordering::Relaxed) + n;
            Some((
                delay,
                Reply::Ack {
                    seq: last,
                    count: n,
                    duplicate: false,
                },
            ))
        })
    }

    fn config(in_flight: usize, linger_ms: u64, ack_timeout_ms: u64) -> GroupCommitConfig {
        GroupCommitConfig {
            max_batch_records: 1000,
            max_batches_in_flight: in_flight,
            linger: Duration::from_millis(linger_ms),
            ack_timeout: Duration::from_millis(ack_timeout_ms),
        }
    }

    fn start(
        answer: Answer,
        config: GroupCommitConfig,
    ) -> (mpsc::Sender<Job>, Arc<Counters>, Sends) {
        let sends: Sends = Arc::default();
        let transport = ScriptedTransport {
            sends: sends.clone(),
            answer,
            unanswered: std::sync::Mutex::default(),
        };
        let (queue, rx) = mpsc::channel(1024);
        let counters = Arc::new(Counters::default());
        tokio::spawn(committer(rx, Arc::new(transport), config, counters.clone()));
        (queue, counters, sends)
    }

    fn publish(queue: &mpsc::Sender<Job>, ids: &[&str]) -> tokio::task::JoinHandle<Outcomes> {
        let (job, rx) = job(ids);
        let queue = queue.clone();
        tokio::spawn(async move {
            queue.send(job).await.unwrap();
            rx.await.unwrap()
        })
    }

    fn sent(sends: &Sends) -> Vec<Vec<String>> {
        sends
            .lock()
            .unwrap()
            .iter()
            .map(|(_, ids)| ids.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_lone_record_leaves_at_once_and_those_arriving_meanwhile_leave_together_after_its_ack(
    ) {
        let (queue, _, sends) = start(acking(Duration::from_millis(80)), config(1, 10, 5_000));
        let first = publish(&queue, &["r0"]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let rest: Vec<_> = (1..=5)
            .map(|i| publish(&queue, &[["r1", "r2", "r3", "r4", "r5"][i - 1]]))
            .collect();
        assert!(first.await.unwrap()[0].is_ok());
        for r in rest {
            assert!(r.await.unwrap()[0].is_ok());
        }
        let log = sends.lock().unwrap().clone();
        assert_eq!(log.len(), 2, "{:?}", sent(&sends));
        assert_eq!(log[0].1, ["r0"]);
        assert_eq!(log[1].1.len(), 5, "the five gathered into one batch");
        assert!(
            log[1].0 - log[0].0 >= Duration::from_millis(70),
            "the batch waited for the ack in flight (one allowed)"
        );
    }

    #[tokio::test]
    async fn with_room_for_another_batch_a_lingering_one_leaves_before_the_ack() {
        // An ack after 700 ms (below the 1 s after which a send is retried).
        let (queue, _, sends) = start(acking(Duration::from_millis(700)), config(2, 20, 10_000));
        let first = publish(&queue, &["r0"]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (a, b) = (publish(&queue, &["r1"]), publish(&queue, &["r2"]));
        for r in [first, a, b] {
            assert!(r.await.unwrap()[0].is_ok());
        }
        let log = sends.lock().unwrap().clone();
        assert_eq!(log.len(), 2, "{:?}", sent(&sends));
        assert_eq!(log[1].1.len(), 2);
        let gap = log[1].0 - log[0].0;
        assert!(
            gap >= Duration::from_millis(20) && gap < Duration::from_millis(500),
            "left after lingering, not after the first ack (700 ms): {gap:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_refused_for_a_stored_record_is_published_one_by_one() {
        let seq = std::sync::atomic::AtomicU64::new(0);
        let answer: Answer = Box::new(move |_, ids| {
            Some((
                Duration::ZERO,
                if ids.len() > 1 {
                    Reply::Error {
                        code: 400,
                        err_code: ERR_BATCH_DUPLICATE_MSG_ID,
                        description: "duplicate message id".into(),
                    }
                } else {
                    Reply::Ack {
                        seq: seq.fetch_add(1, Ordering::Relaxed) + 1,
                        count: 1,
                        duplicate: ids[0] == "stored",
                    }
                },
            ))
        });
        let (queue, counters, sends) = start(answer, config(1, 10, 5_000));
        let out = publish(&queue, &["a", "stored", "c"]).await.unwrap();
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        assert!(out[1].as_ref().unwrap().duplicate);
        assert_eq!(
            sent(&sends),
            vec![
                vec!["a", "stored", "c"],
                vec!["a"],
                vec!["stored"],
                vec!["c"]
            ]
        );
        assert_eq!(counters.fallbacks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_transient_refusal_is_resent_until_the_deadline_then_fails_with_its_kind() {
        let answer: Answer = Box::new(|_, _| {
            Some((
                Duration::ZERO,
                Reply::Error {
                    code: 503,
                    err_code: 0,
                    description: "no responders (election)".into(),
                },
            ))
        });
        let (queue, counters, sends) = start(answer, config(1, 10, 400));
        let started = Instant::now();
        let out = publish(&queue, &["r"]).await.unwrap();
        let took = started.elapsed();
        assert!(matches!(out[0], Err(PublishError::NoLeader(_))), "{out:?}");
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert!(counters.retries.load(Ordering::Relaxed) >= 2);
        assert!(sent(&sends).len() >= 3, "the same record sent again");
    }

    #[tokio::test]
    async fn no_reply_at_all_is_a_timeout_at_the_deadline() {
        let (queue, _, _) = start(Box::new(|_, _| None), config(1, 10, 300));
        let started = Instant::now();
        let out = publish(&queue, &["r"]).await.unwrap();
        assert!(matches!(out[0], Err(PublishError::Timeout(_))), "{out:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }
}
