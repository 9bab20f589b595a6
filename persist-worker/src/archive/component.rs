//! `persist-worker archive` as a component of the stream runner: on every partition
//! stream, the archiver's own durable consumer ([`CONSUMER`], acks "all"), created anew
//! past what the archive holds, feeding a [`Gatherer`] whose sink is the archive
//! ([`ArchiveSink`]).
//!
//! Records of erased data are dropped before each put, under the same lock the workers
//! write under ([`crate::store::privacy::filter`]): an erasure waits for a put in
//! progress, and every object written after its entry exists leaves its records out. A
//! record the archiver cannot check (its company has erasures and the key is missing or
//! another) can be neither archived nor left out — the objects tile the stream — so the
//! object waits, and the stream's trouble says why. Hence the archiver needs Postgres (and
//! `ERASURE_KEY_FILE` once anything was erased).
//!
//! Run one archiver per deployment (one replica, replaced rather than rolled): two would
//! each take part of the stream into overlapping objects (nothing lost, but the tiling no
//! longer shows gaps).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, consumer::DeliverPolicy};
use callcap::partitions::Found;
use callcap::shutdown::Shutdown;
use callcap::subjects::Lane;
use chrono::Utc;
use futures::future::BoxFuture;
use futures::StreamExt;
use sqlx::PgPool;

use super::gather::{Ack, Gatherer, Incoming, Limits, Object, Sink, Written};
use super::{compress, Archive};
use crate::config::ArchiveRunArgs;
use crate::health::ConsumerHealth;
use crate::privacy::Policy;
use crate::runner::{Component, Spec};

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

/// The archive component.
pub struct Archiving {
    pub js: jetstream::Context,
    pub archive: Archive,
    pub sink: Arc<ArchiveSink>,
    pub args: ArchiveRunArgs,
    pub retry_max: Duration,
}

impl Archiving {
    /// The archive component for `archive`, checking erasures in `pool` with `policy`
    /// (retention does not apply: the bucket's lifecycle rules govern the archive).
    pub fn new(
        js: jetstream::Context,
        archive: Archive,
        pool: PgPool,
        policy: Policy,
        args: ArchiveRunArgs,
        retry_max: Duration,
    ) -> Self {
        let policy = Policy {
            retention_days: None,
            ..policy
        };
        let sink = Arc::new(ArchiveSink {
            archive: archive.clone(),
            pool,
            policy,
        });
        Archiving {
            js,
            archive,
            sink,
            args,
            retry_max,
        }
    }

    /// Where to resume on `stream`: past what the consumer acked and what the archive
    /// holds (an object written just before a crash, its ack lost).
    async fn position(&self, stream: &str) -> anyhow::Result<u64> {
        let handle = self.js.get_stream(stream).await?;
        let acked = match handle.consumer_info(CONSUMER).await {
            Ok(info) => info.ack_floor.stream_sequence,
            Err(e) if crate::guard::is_not_found(&e) => 0,
            Err(e) => return Err(e.into()),
        };
        let held = self
            .archive
            .last_object(stream)
            .await?
            .map_or(0, |o| o.last);
        Ok(acked.max(held))
    }
}

impl Component for Archiving {
    fn what(&self) -> &'static str {
        "a stream's archiver"
    }

    fn lanes(&self, _found: &Found) -> Vec<Option<Lane>> {
        vec![None]
    }

    fn spec<'a>(
        &'a self,
        found: &'a Found,
        _lane: Option<Lane>,
    ) -> BoxFuture<'a, anyhow::Result<Spec>> {
        Box::pin(async move {
            let position = self.position(&found.partition.stream_name()).await?;
            // Created anew from there: what a previous run had in hand unacked would
            // otherwise come back only after the ack wait, behind newer messages, and an
            // object must hold its range in order.
            Ok(Spec {
                consumer: CONSUMER,
                wanted: Some(consumer_config(&self.args)),
                fresh_from: Some(position + 1),
            })
        })
    }

    fn serve(
        &self,
        consumer: jetstream::consumer::PullConsumer,
        health: Arc<ConsumerHealth>,
        shutdown: Shutdown,
    ) -> BoxFuture<'static, anyhow::Result<()>> {
        let name = health.partition().stream_name();
        // The consumer was created to deliver right after the position it resumes from.
        let position = match consumer.cached_info().config.deliver_policy {
            DeliverPolicy::ByStartSequence { start_sequence } => start_sequence.saturating_sub(1),
            _ => 0,
        };
        let limits = Limits {
            records: self.args.object_records as usize,
            bytes: self.args.object_bytes as usize,
            linger: Duration::from_secs(self.args.linger_secs),
            retry_max: self.retry_max,
        };
        let gatherer = Gatherer::new(
            &name,
            position,
            limits,
            self.sink.clone() as Arc<dyn Sink>,
            health,
            shutdown.clone(),
        );
        let lag = tokio::spawn(watch_lag(
            self.js.clone(),
            name.clone(),
            self.args.check(),
            shutdown.clone(),
        ));
        Box::pin(async move {
            tracing::info!(stream = %name, position, "archiving from the sequence after this");
            read(consumer, gatherer, &shutdown).await;
            lag.abort();
            Ok(())
        })
    }
}

/// A JetStream message's ack, confirmed by the server.
struct JetStreamAck(jetstream::Message);

impl Ack for JetStreamAck {
    fn ack(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.double_ack().await.map_err(|e| e.to_string()) })
    }
}

/// Feeds the gatherer from the consumer until `shutdown`, reopening the pull when it
/// ends or fails.
async fn read(
    consumer: jetstream::consumer::PullConsumer,
    mut gatherer: Gatherer,
    shutdown: &Shutdown,
) {
    loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(1_000)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "pulling from the archiver's consumer; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.triggered() => return gatherer.drain().await,
                }
            }
        };
        loop {
            let next = tokio::select! {
                // The object in hand is dropped unacked: its messages come again.
                () = shutdown.triggered() => return gatherer.drain().await,
                next = tokio::time::timeout(gatherer.wait(), messages.next()) => next,
            };
            let going = match next {
                Err(_) => gatherer.idle().await,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "reading the archiver's consumer");
                    true
                }
                Ok(Some(Ok(m))) => match m.info() {
                    Ok(info) => {
                        let incoming = Incoming {
                            seq: info.stream_sequence,
                            subject: m.subject.to_string(),
                            time: info.published,
                            payload: m.payload.clone(),
                            ack: Arc::new(JetStreamAck(m)),
                        };
                        gatherer.take(incoming).await
                    }
                    Err(_) => true,
                },
            };
            if !going {
                return gatherer.drain().await;
            }
        }
    }
}

/// The archive as the gatherer's sink: erased records left out (checked under the
/// erasure lock, held across the put), compressed, put once.
pub struct ArchiveSink {
    archive: Archive,
    pool: PgPool,
    policy: Policy,
}

impl Sink for ArchiveSink {
    fn write<'a>(
        &'a self,
        stream: &'a str,
        o: &'a Object,
    ) -> BoxFuture<'a, anyhow::Result<Written>> {
        Box::pin(async move {
            let path = self.archive.object_path(stream, o.day, o.first, o.last);
            let mut tx = self
                .pool
                .begin()
                .await
                .context("Postgres (erasures are checked before archiving)")?;
            let filtered = crate::store::privacy::filter(&mut tx, &self.policy, &o.rows, &[])
                .await
                .context("checking erasures")?;
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
            let records = kept.len() as u64;
            let bytes = compress(kept).context("compressing")?;
            let size = bytes.len() as u64;
            let put = self
                .archive
                .put_new(&path, bytes)
                .await
                .with_context(|| format!("putting {path}"))?;
            // Only the lock was wanted: the counters of dropped records are the workers'.
            tx.rollback().await.ok();
            Ok(Written {
                put,
                bytes: size,
                records,
            })
        })
    }
}

/// How far behind the archiver is, every `every`: the age of the oldest message it has
/// not acked (0 when none), and the stream's age limit, so that an alert can tell when
/// records are about to expire from the stream unarchived.
async fn watch_lag(js: jetstream::Context, name: String, every: Duration, shutdown: Shutdown) {
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
            () = shutdown.triggered() => return,
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
