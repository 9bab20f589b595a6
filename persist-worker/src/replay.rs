//! `persist-worker replay`: re-apply a window of the stream through the normal write path.
//!
//! Reads with an ephemeral ordered consumer (no acks, nothing shared with the durable
//! consumer), so it can run beside live workers. The upsert's merge rules make it safe:
//! an old message never regresses a newer row, and a redelivered one changes nothing.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::ReplayArgs;
use crate::write::{decode, write_reliably};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Stream messages read and applied.
    pub messages: u64,
    /// Rows inserted or changed.
    pub rows_changed: u64,
    /// Messages recorded as dead letters.
    pub dead_letters: u64,
    /// First and last stream sequence applied.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// False when interrupted before the end.
    pub completed: bool,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let range = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!("sequences {a}..={b}"),
            _ => "no messages".to_owned(),
        };
        write!(
            f,
            "replay {}: {} messages ({range}), {} rows inserted or changed, {} dead letters",
            if self.completed {
                "complete"
            } else {
                "interrupted"
            },
            self.messages,
            self.rows_changed,
            self.dead_letters
        )
    }
}

/// Replays the window `args` describes.
///
/// # Errors
/// When the stream cannot be read.
pub async fn run(
    js: &jetstream::Context,
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    args: &ReplayArgs,
    retry_max: Duration,
    cancel: &CancellationToken,
) -> Result<ReplaySummary, async_nats::Error> {
    // Every partition stream, oldest layout first (sealed ones too: they hold the
    // records from before a layout change). With --company, only the stream its records
    // went to in each layout.
    let mut summary = ReplaySummary {
        completed: true,
        ..ReplaySummary::default()
    };
    for f in callcap::partitions::list(js).await? {
        let p = f.partition;
        if let Some(c) = args.company {
            let layout = callcap::partitions::Layout {
                epoch: p.epoch,
                count: p.count,
            };
            if layout.partition_of(c) != p {
                continue;
            }
        }
        let one = replay_stream(js, p, (pool, policy), args, retry_max, cancel).await?;
        summary.completed &= one.completed;
        summary.messages += one.messages;
        summary.rows_changed += one.rows_changed;
        summary.dead_letters += one.dead_letters;
        summary.first_seq = match (summary.first_seq, one.first_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        summary.last_seq = summary.last_seq.max(one.last_seq);
        if cancel.is_cancelled() {
            summary.completed = false;
            break;
        }
    }
    Ok(summary)
}

/// Replays the window of one partition stream.
async fn replay_stream(
    js: &jetstream::Context,
    partition: callcap::partitions::Partition,
    (pool, policy): (&PgPool, &crate::privacy::Policy),
    args: &ReplayArgs,
    retry_max: Duration,
    cancel: &CancellationToken,
) -> Result<ReplaySummary, async_nats::Error> {
    let mut stream = js.get_stream(partition.stream_name()).await?;
    let state = stream.info().await?.state.clone();
    let mut summary = ReplaySummary::default();
    // The end is fixed when the replay starts: records arriving meanwhile are the live
    // workers' business.
    let end_seq = state.last_sequence;
    let deliver_policy = match (args.from_seq, args.since) {
        (Some(seq), _) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(state.first_sequence).max(1),
        },
        (None, Some(since)) => DeliverPolicy::ByStartTime { start_time: since },
        (None, None) => DeliverPolicy::All,
    };
    if state.messages == 0 || args.from_seq.is_some_and(|s| s > end_seq) {
        summary.completed = true;
        return Ok(summary);
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy,
            filter_subject: args
                .company
                .map(|c| partition.company_filter(c))
                .unwrap_or_default(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let bar = progress_bar(args.quiet);
    let started = Instant::now();
    let batch = args.batch_size as usize;
    let mut pending: Vec<jetstream::Message> = Vec::with_capacity(batch);
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => break,
            // An idle stream past the window means there is nothing more to read.
            next = tokio::time::timeout(Duration::from_secs(5), messages.next()) => next,
        };
        let msg = match next {
            Err(_) | Ok(None) => {
                summary.completed = true;
                break;
            }
            Ok(Some(msg)) => msg?,
        };
        let info = msg.info()?;
        let (seq, remaining, published) = (info.stream_sequence, info.pending, info.published);
        if seq > end_seq || args.until.is_some_and(|u| published > u) {
            summary.completed = true;
            break;
        }
        if bar.length().is_none() {
            bar.set_length(remaining + 1);
        }
        pending.push(msg);
        let last = remaining == 0 || seq == end_seq;
        if pending.len() >= batch || last {
            apply(
                js,
                (pool, policy),
                &mut pending,
                &mut summary,
                (retry_max, cancel),
                &bar,
            )
            .await?;
        }
        if last {
            summary.completed = true;
            break;
        }
    }
    if !pending.is_empty() && !cancel.is_cancelled() {
        apply(
            js,
            (pool, policy),
            &mut pending,
            &mut summary,
            (retry_max, cancel),
            &bar,
        )
        .await?;
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        messages = summary.messages,
        rows_changed = summary.rows_changed,
        rate_per_sec = (summary.messages as f64 / secs) as u64,
        "replay finished"
    );
    Ok(summary)
}

async fn apply(
    js: &jetstream::Context,
    (pool, policy): (&PgPool, &crate::privacy::Policy),
    pending: &mut Vec<jetstream::Message>,
    summary: &mut ReplaySummary,
    (retry_max, cancel): (Duration, &CancellationToken),
    bar: &ProgressBar,
) -> Result<(), async_nats::Error> {
    let decoded = decode(pending);
    let stats = write_reliably(
        pool,
        policy,
        &decoded.rows,
        &decoded.dead,
        retry_max,
        cancel,
        || async {},
    )
    .await
    .map_err(|_| "replay interrupted while the database was unavailable")?;
    let seqs = pending
        .iter()
        .filter_map(|m| m.info().ok().map(|i| i.stream_sequence));
    for s in seqs {
        summary.first_seq = Some(summary.first_seq.map_or(s, |f| f.min(s)));
        summary.last_seq = Some(summary.last_seq.map_or(s, |l| l.max(s)));
    }
    if !stats.erased.is_empty() {
        if let Some(stream) = pending
            .first()
            .and_then(|m| m.info().ok())
            .map(|i| i.stream.to_owned())
        {
            crate::erase::delete_messages(js, &stream, &stats.erased).await;
        }
    }
    summary.messages += pending.len() as u64;
    summary.rows_changed += stats.rows_changed;
    summary.dead_letters += stats.dead_letters;
    bar.inc(pending.len() as u64);
    pending.clear();
    Ok(())
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::no_length();
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} msgs {per_sec} ETA {eta}",
        )
        .expect("the progress template is a valid literal"),
    );
    bar
}
