//! `persist-worker archive`: copies every partition stream into the archive.
//!
//! Each stream is read through the archiver's own durable consumer ([`CONSUMER`], acks
//! "all": acking a message acks every one before it). Messages gather into an object
//! until it holds `ARCHIVE_OBJECT_RECORDS` records or `ARCHIVE_OBJECT_BYTES` bytes, has
//! been open `ARCHIVE_LINGER_SECS`, or the day changes. The object is then written once
//! (`If-None-Match: *`) and only after the store has it is its last message acked. The
//! next object gathers while one is written (two in hand at most); acks go in order.
//!
//! Nothing is lost and nothing archived twice across a crash:
//! - a crash before the put loses only the object in hand: its messages were not acked
//!   and come again;
//! - a crash after the put and before the ack: at start the archiver reads the highest
//!   sequence the archive holds ([`Archive::last_object`]) and skips (and acks) what it
//!   covers; a put that finds the very name already there counts as done;
//! - each object starts right after the previous one's last sequence, so the objects
//!   tile the stream and a gap would show.
//!
//! Records of erased data are dropped before the put, under the same lock the workers
//! write under ([`crate::store::privacy::filter`]): an erasure waits for a put in
//! progress, and every object written after its entry exists leaves its records out.
//! Hence the archiver needs Postgres (and `ERASURE_KEY_FILE` once anything was erased).
//!
//! Run one archiver per deployment (one replica, replaced rather than rolled): two would
//! each take part of the stream into overlapping objects (nothing lost, but the tiling
//! above no longer shows gaps).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use chrono::{NaiveDate, Utc};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{compress, Archive, Entry, Put};
use crate::config::ArchiveRunArgs;
use crate::privacy::Policy;
use crate::store::Row;

/// The archiver's durable consumer, on every partition stream.
pub const CONSUMER: &str = "callcap-archiver";

/// The archiver's consumer definition.
pub fn consumer_config(args: &ArchiveRunArgs) -> pull::Config {
    pull::Config {
        durable_name: Some(CONSUMER.to_owned()),
        description: Some("persist-worker archive: copies the stream to object storage".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::All,
        // An object is acked when written: at most the linger plus the put later.
        ack_wait: Duration::from_secs(args.linger_secs + 120),
        // Never give up on a message: an object store outage is waited out.
        max_deliver: -1,
        // Room for a whole object in hand, and the next pull.
        max_ack_pending: i64::from(args.object_records) + 1_000,
        ..Default::default()
    }
}

/// What one stream's archiving looks like from outside (metrics, readiness).
#[derive(Debug, Default)]
pub struct StreamState {
    /// Highest sequence archived (acked).
    pub position: AtomicU64,
    /// Whether the last attempt to write an object failed.
    pub failing: AtomicBool,
    /// The last failure, for the logs and /readyz.
    pub last_error: Mutex<Option<String>>,
}

/// Everything the archiver serves, by stream.
#[derive(Clone, Default)]
struct Served(Arc<Mutex<HashMap<String, Arc<StreamState>>>>);

/// An object being gathered.
struct Open {
    first: u64,
    last: u64,
    day: NaiveDate,
    opened: Instant,
    bytes: usize,
    lines: Vec<(u64, Vec<u8>)>,
    /// The messages that decode as envelopes, to check against erasures.
    rows: Vec<Row>,
    /// The message to ack once written (acks every one before it too).
    last_msg: jetstream::Message,
}

/// Runs the archiver until `cancel` fires.
///
/// # Errors
/// When the ops address cannot be bound or NATS cannot be reached.
pub async fn run(
    cli: &crate::config::Cli,
    archive: Archive,
    args: &ArchiveRunArgs,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let policy = Policy::from_args(&cli.privacy)?;
    // The archive keeps what the stream held; RETENTION_DAYS governs the database (the
    // bucket's lifecycle rules govern the archive).
    let policy = Policy {
        key: policy.key,
        retention_days: None,
    };
    let pool = crate::store::pool(&cli.db.database_url, 2).context("parsing DATABASE_URL")?;
    let client = cli
        .nats
        .connect("persist-worker archive", callcap::config::Role::Worker)
        .await
        .context("connecting to NATS")?;
    let listener = tokio::net::TcpListener::bind(cli.run.metrics_addr)
        .await
        .with_context(|| format!("binding METRICS_ADDR {}", cli.run.metrics_addr))?;
    let served = Served::default();
    let ops = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state((client.clone(), served.clone(), metrics));
    let ops_cancel = cancel.clone();
    tokio::spawn(async move {
        let served =
            axum::serve(listener, ops).with_graceful_shutdown(ops_cancel.cancelled_owned());
        if let Err(e) = served.await {
            tracing::error!(error = %e, "ops endpoint failed");
        }
    });
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cli.nats.nats_request_timeout_ms))
        .build(client);
    tracing::info!(archive = archive.url(), "archiving");
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = HashSet::new();
    loop {
        match callcap::partitions::list(&js).await {
            Ok(found) => {
                for f in found {
                    let name = f.partition.stream_name();
                    if !started.insert(name.clone()) {
                        continue;
                    }
                    let state = Arc::new(StreamState::default());
                    served
                        .0
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(name.clone(), state.clone());
                    let (js, archive, pool, policy, args, cancel, retry_max) = (
                        js.clone(),
                        archive.clone(),
                        pool.clone(),
                        policy.clone(),
                        args.clone(),
                        cancel.clone(),
                        cli.run.retry_max(),
                    );
                    tasks.spawn(async move {
                        let lag = tokio::spawn(watch_lag(
                            js.clone(),
                            name.clone(),
                            args.check(),
                            cancel.clone(),
                        ));
                        let one = Stream {
                            js,
                            archive,
                            pool,
                            policy,
                            args,
                            name: name.clone(),
                            state,
                            retry_max,
                        };
                        let r = one.run(&cancel).await;
                        lag.abort();
                        r.with_context(|| format!("archiving stream {name}"))
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing the partition streams; retrying"),
        }
        if crate::supervise(&mut tasks, args.check(), &cancel, "a stream's archiver")
            .await?
            .is_break()
        {
            break;
        }
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!("archiver stopped");
    Ok(())
}

/// One stream's archiving.
#[derive(Clone)]
struct Stream {
    js: jetstream::Context,
    archive: Archive,
    pool: PgPool,
    policy: Policy,
    args: ArchiveRunArgs,
    name: String,
    state: Arc<StreamState>,
    retry_max: Duration,
}

impl Stream {
    /// Runs `op` until it succeeds, pausing with capped backoff (and counting the failure)
    /// between attempts; `None` when cancelled first.
    async fn until_ok<T, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        mut op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut pause = Duration::from_millis(200);
        loop {
            match op().await {
                Ok(v) => {
                    self.state.failing.store(false, Ordering::Relaxed);
                    return Some(v);
                }
                Err(e) => {
                    metrics::counter!("archive_errors_total", "stream" => self.name.clone())
                        .increment(1);
                    self.state.failing.store(true, Ordering::Relaxed);
                    *self
                        .state
                        .last_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(format!("{what}: {e:#}"));
                    tracing::warn!(
                        stream = %self.name,
                        error = format!("{e:#}"),
                        retry_in_ms = pause.as_millis() as u64,
                        "{what} failed; the stream keeps the records meanwhile"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = cancel.cancelled() => return None,
                    }
                    pause = (pause * 2).min(self.retry_max);
                }
            }
        }
    }

    async fn run(&self, cancel: &CancellationToken) -> anyhow::Result<()> {
        // Where to resume: past what the consumer acked and what the archive holds (an
        // object written just before a crash, its ack lost). The consumer is then made
        // anew from there: what the previous run had in hand unacked would otherwise come
        // back only after the ack wait, behind newer messages, and an object must hold
        // its range in order.
        let Some((consumer, position)) = self
            .until_ok("opening the archiver's consumer", cancel, || async {
                let stream = self.js.get_stream(&self.name).await?;
                let acked = match stream.consumer_info(CONSUMER).await {
                    Ok(info) => info.ack_floor.stream_sequence,
                    Err(e) if e.to_string().contains("not found") => 0,
                    Err(e) => return Err(e.into()),
                };
                let held = self
                    .archive
                    .last_object(&self.name)
                    .await?
                    .map_or(0, |o| o.last);
                let position = acked.max(held);
                if let Err(e) = stream.delete_consumer(CONSUMER).await {
                    if !e.to_string().contains("not found") {
                        return Err(e.into());
                    }
                }
                let mut config = consumer_config(&self.args);
                if position > 0 {
                    config.deliver_policy = DeliverPolicy::ByStartSequence {
                        start_sequence: position + 1,
                    };
                }
                Ok((stream.create_consumer(config).await?, position))
            })
            .await
        else {
            return Ok(());
        };
        // (acked, covered): the last sequence written and acked, and the last handed to be
        // written (an object is written while the next one gathers).
        let mut marks = (position, position);
        let mut writing: Option<tokio::task::JoinHandle<Option<u64>>> = None;
        self.state.position.store(position, Ordering::Relaxed);
        metrics::gauge!("archive_position", "stream" => self.name.clone()).set(position as f64);
        tracing::info!(
            stream = %self.name,
            position,
            "archiving from the sequence after this"
        );
        let mut messages = None;
        let mut open: Option<Open> = None;
        loop {
            if messages.is_none() {
                match consumer
                    .stream()
                    .max_messages_per_batch(1_000)
                    .messages()
                    .await
                {
                    Ok(m) => messages = Some(m),
                    Err(e) => {
                        tracing::warn!(stream = %self.name, error = %e, "pulling from the archiver's consumer; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            () = cancel.cancelled() => return Self::drain(writing).await,
                        }
                    }
                }
            }
            let Some(stream) = messages.as_mut() else {
                continue;
            };
            let linger = Duration::from_secs(self.args.linger_secs);
            let wait = open.as_ref().map_or(Duration::from_secs(1), |o| {
                linger.saturating_sub(o.opened.elapsed())
            });
            let next = tokio::select! {
                // The object in hand is dropped unacked: its messages come again.
                () = cancel.cancelled() => return Self::drain(writing).await,
                next = tokio::time::timeout(wait, stream.next()) => next,
            };
            let msg = match next {
                Err(_) => {
                    if open.as_ref().is_some_and(|o| o.opened.elapsed() >= linger)
                        && !self
                            .hand_over(open.take(), &mut writing, &mut marks, cancel)
                            .await
                    {
                        return Self::drain(writing).await;
                    }
                    continue;
                }
                Ok(None) => {
                    messages = None;
                    continue;
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(stream = %self.name, error = %e, "reading the archiver's consumer");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            let Ok(info) = msg.info() else { continue };
            let (seq, time) = (info.stream_sequence, info.published);
            let (acked, covered) = marks;
            if seq <= acked {
                // Archived and acked already (a redelivery): acked again, harmlessly.
                if let Err(e) = msg.ack().await {
                    tracing::debug!(error = %e, "acking an archived message");
                }
                continue;
            }
            if seq <= covered || open.as_ref().is_some_and(|o| seq <= o.last) {
                // A redelivery of a message being written or in hand (the store was
                // slow): never acked here, its object's ack covers it.
                continue;
            }
            let day = time.date_naive();
            if open.as_ref().is_some_and(|o| o.day != day)
                && !self
                    .hand_over(open.take(), &mut writing, &mut marks, cancel)
                    .await
            {
                return Self::drain(writing).await;
            }
            let o = open.get_or_insert_with(|| Open {
                // Right after the previous object: the objects tile the stream.
                first: if marks.1 == 0 { seq } else { marks.1 + 1 },
                last: seq,
                day,
                opened: Instant::now(),
                bytes: 0,
                lines: Vec::with_capacity(self.args.object_records.min(16_384) as usize),
                rows: Vec::with_capacity(self.args.object_records.min(16_384) as usize),
                last_msg: msg.clone(),
            });
            // Decoded only to check erasures (the replay checks everything else); what
            // does not decode as an envelope names no record to match, as for the workers.
            let line = match callcap::Envelope::decode(&msg.payload) {
                Ok(envelope) => {
                    o.rows.push(Row { seq, envelope });
                    Entry::line_of_json(seq, &msg.subject, time, &msg.payload)
                }
                Err(_) => Entry::new(seq, &msg.subject, time, &msg.payload).line(),
            };
            o.bytes += line.len();
            o.lines.push((seq, line));
            o.last = seq;
            o.last_msg = msg;
            let full = o.lines.len() >= self.args.object_records as usize
                || o.bytes >= self.args.object_bytes as usize;
            if full
                && !self
                    .hand_over(open.take(), &mut writing, &mut marks, cancel)
                    .await
            {
                return Self::drain(writing).await;
            }
        }
    }

    /// Hands an object over to be written while the next one gathers, once the one before
    /// it is written and acked (in order: acking a message acks every one before it).
    /// False when cancelled.
    async fn hand_over(
        &self,
        open: Option<Open>,
        writing: &mut Option<tokio::task::JoinHandle<Option<u64>>>,
        (acked, covered): &mut (u64, u64),
        cancel: &CancellationToken,
    ) -> bool {
        let Some(o) = open else { return true };
        if let Some(previous) = writing.take() {
            match previous.await {
                Ok(Some(p)) => *acked = p,
                _ => return false,
            }
        }
        *covered = o.last;
        let (me, cancel) = (self.clone(), cancel.clone());
        *writing = Some(tokio::spawn(
            async move { me.flush(Some(o), &cancel).await },
        ));
        true
    }

    /// Lets the object being written finish its attempt (and its ack) before stopping.
    async fn drain(writing: Option<tokio::task::JoinHandle<Option<u64>>>) -> anyhow::Result<()> {
        if let Some(w) = writing {
            let _ = w.await;
        }
        Ok(())
    }

    /// Writes the object (until the store takes it), then acks it: the new position.
    /// `None` when cancelled before it was written.
    async fn flush(&self, open: Option<Open>, cancel: &CancellationToken) -> Option<u64> {
        let o = open?;
        let path = self.archive.object_path(&self.name, o.day, o.first, o.last);
        let started = Instant::now();
        let (put, size, kept) = self
            .until_ok("writing an archive object", cancel, || {
                self.write(&o, &path)
            })
            .await?;
        // The ack confirmed by the server; lost, the position read at the next start
        // (the archive's last object) covers it.
        for attempt in 0..3 {
            match o.last_msg.double_ack().await {
                Ok(()) => break,
                Err(e) if attempt == 2 => {
                    tracing::warn!(stream = %self.name, error = %e, "acking an archived object; it is skipped at the next start")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let stream = self.name.clone();
        if put == Put::Created {
            metrics::counter!("archive_objects_total", "stream" => stream.clone()).increment(1);
            metrics::counter!("archive_records_total", "stream" => stream.clone()).increment(kept);
            metrics::counter!("archive_bytes_total", "stream" => stream.clone()).increment(size);
        }
        metrics::histogram!("archive_put_duration_seconds").record(started.elapsed().as_secs_f64());
        metrics::gauge!("archive_position", "stream" => stream).set(o.last as f64);
        self.state.position.store(o.last, Ordering::Relaxed);
        tracing::debug!(stream = %self.name, object = %path, records = kept, bytes = size, ?put, "archived");
        Some(o.last)
    }

    /// One attempt: drop erased records (holding the erasure lock), compress, put.
    async fn write(
        &self,
        o: &Open,
        path: &object_store::path::Path,
    ) -> anyhow::Result<(Put, u64, u64)> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("Postgres (erasures are checked before archiving)")?;
        let filtered = crate::store::privacy::filter(&mut tx, &self.policy, &o.rows, &[])
            .await
            .context("checking erasures")?;
        // A record that cannot be checked can be neither archived (it may be erased) nor
        // left out (it may not be, and the objects tile the stream): the object waits.
        if let Some(why) = &filtered.hold {
            anyhow::bail!("checking erasures: {why}");
        }
        let erased: HashSet<u64> = filtered.erased.iter().copied().collect();
        let kept: Vec<&[u8]> = o
            .lines
            .iter()
            .filter(|(s, _)| !erased.contains(s))
            .map(|(_, l)| l.as_slice())
            .collect();
        let n = kept.len() as u64;
        let bytes = compress(kept).context("compressing")?;
        let size = bytes.len() as u64;
        let put = self
            .archive
            .put_new(path, bytes)
            .await
            .with_context(|| format!("putting {path}"))?;
        // Only the lock was wanted: the counters of dropped records are the workers'.
        tx.rollback().await.ok();
        Ok((put, size, n))
    }
}

/// How far behind the archiver is, every `every`: the age of the oldest message it has
/// not acked (0 when none), and the stream's age limit, so that an alert can tell when
/// records are about to expire from the stream unarchived.
async fn watch_lag(
    js: jetstream::Context,
    name: String,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        let read = async {
            let mut stream = js.get_stream(&name).await?;
            let max_age = stream.info().await?.config.max_age;
            let info = stream.consumer_info(CONSUMER).await?;
            let age = if info.num_pending + info.num_ack_pending as u64 == 0 {
                0.0
            } else {
                oldest_after(&stream, info.ack_floor.stream_sequence).await
            };
            Ok::<_, async_nats::Error>((age, max_age))
        };
        match read.await {
            Ok((age, max_age)) => {
                metrics::gauge!("archive_oldest_unarchived_age_seconds", "stream" => name.clone())
                    .set(age);
                metrics::gauge!("archive_stream_max_age_seconds", "stream" => name.clone())
                    .set(max_age.as_secs_f64());
            }
            Err(e) => tracing::debug!(stream = name, error = %e, "reading the archiver's lag"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Age in seconds of the first message after `floor` still in the stream (messages
/// deleted meanwhile are stepped over).
async fn oldest_after(stream: &jetstream::stream::Stream, floor: u64) -> f64 {
    let first = stream.cached_info().state.first_sequence.max(floor + 1);
    for seq in first..first + 100 {
        if let Ok(m) = stream.get_raw_message(seq).await {
            return (Utc::now() - m.time).num_milliseconds().max(0) as f64 / 1000.0;
        }
    }
    0.0
}

type OpsState = (async_nats::Client, Served, Option<PrometheusHandle>);

async fn readyz(State((nats, served, _)): State<OpsState>) -> (StatusCode, String) {
    let nats_ok = nats.connection_state() == async_nats::connection::State::Connected;
    let mut lines = format!("nats: {}\n", if nats_ok { "ok" } else { "unavailable" });
    let mut ok = nats_ok;
    let all = served
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut names: Vec<_> = all.keys().cloned().collect();
    names.sort();
    for name in names {
        let s = &all[&name];
        let failing = s.failing.load(Ordering::Relaxed);
        ok &= !failing;
        let error = s
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        lines.push_str(&format!(
            "stream {name}: {} (archived through sequence {})\n",
            if failing {
                format!("failing: {}", error.unwrap_or_default())
            } else {
                "ok".to_owned()
            },
            s.position.load(Ordering::Relaxed)
        ));
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, lines)
}

async fn render(State((_, _, metrics)): State<OpsState>) -> (StatusCode, String) {
    match metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".into(),
        ),
    }
}

/// Registers the archiver's metrics' `# HELP` text.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "archive_objects_total",
        "Archive objects written, by stream"
    );
    metrics::describe_counter!(
        "archive_records_total",
        "Stream messages written to archive objects, by stream"
    );
    metrics::describe_counter!(
        "archive_bytes_total",
        metrics::Unit::Bytes,
        "Compressed bytes written to the archive, by stream"
    );
    metrics::describe_counter!("archive_errors_total", "Failed attempts to write an archive object (object store or Postgres unavailable; retried), by stream");
    metrics::describe_gauge!(
        "archive_position",
        "Highest stream sequence archived, by stream"
    );
    metrics::describe_gauge!(
        "archive_oldest_unarchived_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest message not yet archived (0: caught up), by stream"
    );
    metrics::describe_gauge!("archive_stream_max_age_seconds", metrics::Unit::Seconds, "The stream's age limit (STREAM_MAX_AGE_SECS): older messages leave the stream, archived or not");
    metrics::describe_histogram!(
        "archive_put_duration_seconds",
        metrics::Unit::Seconds,
        "Time to write one archive object, retries included"
    );
}
