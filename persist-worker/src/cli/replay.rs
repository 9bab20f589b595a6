//! `persist-worker replay`: re-apply a window of the stream through the normal write path.
//!
//! Reads with an ephemeral ordered consumer (no acks, nothing shared with the durable
//! consumer), so it can run beside live workers. The upsert's merge rules make it safe:
//! an old message never regresses a newer row, and a redelivered one changes nothing.
//!
//! With `--from-archive`, each stream's window is read from the archive's objects first
//! and continues in the stream right after the last archived sequence; a range held by
//! neither (expired from the stream before it was archived) is reported as a gap.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use callcap::shutdown::Shutdown;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::config::ReplayArgs;

/// How long a read may bring nothing before the end of its window: then the replay
/// fails (a stall is never taken for the end).
const STALL: Duration = Duration::from_secs(30);
use crate::write::{decode, write_reliably};
use tracing::Instrument as _;

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
    /// Of `messages`, those read from the archive.
    pub from_archive: u64,
    /// Sequence ranges held by neither the archive nor the stream: (stream, first, last).
    pub gaps: Vec<(String, u64, u64)>,
    /// Archived objects that could not be read (fetched, decompressed within the bound,
    /// parsed), with why: their records were not replayed.
    pub unreadable: Vec<String>,
    /// Archived entries not taken, with why (a sequence its object or stream does not
    /// vouch for).
    pub refused: Vec<String>,
    /// False when interrupted before the end.
    pub completed: bool,
}

impl ReplaySummary {
    /// Whether the replay did all it was asked: not interrupted, no archived object
    /// unreadable, no archived entry refused.
    pub fn is_whole(&self) -> bool {
        self.completed && self.unreadable.is_empty() && self.refused.is_empty()
    }

    fn add(&mut self, one: ReplaySummary) {
        self.completed &= one.completed;
        self.messages += one.messages;
        self.from_archive += one.from_archive;
        self.rows_changed += one.rows_changed;
        self.dead_letters += one.dead_letters;
        self.gaps.extend(one.gaps);
        self.unreadable.extend(one.unreadable);
        self.refused.extend(one.refused);
        self.first_seq = match (self.first_seq, one.first_seq) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seq = self.last_seq.max(one.last_seq);
    }

    fn saw(&mut self, seq: u64) {
        self.first_seq = Some(self.first_seq.map_or(seq, |f| f.min(seq)));
        self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
    }
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
        )?;
        if self.from_archive > 0 {
            write!(f, "; {} of them from the archive", self.from_archive)?;
        }
        for (stream, a, b) in &self.gaps {
            write!(
                f,
                "\nGAP: {stream} sequences {a}..={b} are in neither the archive nor the stream"
            )?;
        }
        for why in &self.unreadable {
            write!(f, "\nUNREADABLE: {why}: its records were not replayed")?;
        }
        for why in &self.refused {
            write!(f, "\nREFUSED: {why}")?;
        }
        Ok(())
    }
}

/// Replays the window `args` describes.
///
/// # Errors
/// When the stream cannot be read.
pub async fn run(
    js: &jetstream::Context,
    archive: Option<&crate::archive::Archive>,
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    args: &ReplayArgs,
    retry_max: Duration,
    cancel: &Shutdown,
) -> Result<ReplaySummary, async_nats::Error> {
    // Every partition stream, oldest layout first (sealed ones too: they hold the
    // records from before a layout change). With --company, only the stream its records
    // went to in each layout.
    let mut summary = ReplaySummary {
        completed: true,
        ..ReplaySummary::default()
    };
    let found = callcap::partitions::list(js).await?;
    let wanted = |p: callcap::partitions::Partition| {
        args.company.is_none_or(|c| {
            callcap::partitions::Layout {
                epoch: p.epoch,
                count: p.count,
            }
            .partition_of(c)
                == p
        })
    };
    if let Some(archive) = archive {
        let streams = (
            &found[..],
            &wanted as &dyn Fn(callcap::partitions::Partition) -> bool,
        );
        let ctx = (pool, policy, retry_max, cancel);
        from_archive(js, archive, streams, ctx, args, &mut summary).await?;
        return Ok(summary);
    }
    for f in found {
        if !wanted(f.partition) {
            continue;
        }
        let one = replay_stream(js, f.partition, (pool, policy), args, retry_max, cancel).await?;
        summary.add(one);
        if cancel.is_triggered() {
            summary.completed = false;
            break;
        }
    }
    Ok(summary)
}

/// Replays the archive's streams (some may be gone from NATS: drained older layouts) and
/// the live ones, in layout order: each from the archive, then from its stream right
/// after the archive's last sequence.
async fn from_archive(
    js: &jetstream::Context,
    archive: &crate::archive::Archive,
    (found, wanted): (
        &[callcap::partitions::Found],
        &dyn Fn(callcap::partitions::Partition) -> bool,
    ),
    (pool, policy, retry_max, cancel): (&PgPool, &crate::privacy::Policy, Duration, &Shutdown),
    args: &ReplayArgs,
    summary: &mut ReplaySummary,
) -> Result<(), async_nats::Error> {
    let mut names: Vec<String> = archive.streams().await.map_err(|e| format!("{e:#}"))?;
    for f in found {
        names.push(f.partition.stream_name());
    }
    let order = |n: &String| {
        found
            .iter()
            .find(|f| f.partition.stream_name() == *n)
            .map(|f| (f.partition.epoch, f.partition.index))
    };
    names.sort_by(|a, b| order(a).cmp(&order(b)).then_with(|| a.cmp(b)));
    names.dedup();
    for name in names {
        let live = found.iter().find(|f| f.partition.stream_name() == name);
        if live.is_some_and(|f| !wanted(f.partition)) {
            continue;
        }
        // What the live stream holds bounds what its archive may name.
        let stream_last = match live {
            Some(_) => Some(
                js.get_stream(&name)
                    .await?
                    .info()
                    .await?
                    .state
                    .last_sequence,
            ),
            None => None,
        };
        let (one, last) = replay_archived(
            archive,
            (&name, stream_last),
            (pool, policy),
            args,
            retry_max,
            cancel,
        )
        .await?;
        summary.add(one);
        if cancel.is_triggered() {
            summary.completed = false;
            break;
        }
        let Some(f) = live else { continue };
        // The stream from right after the archive's last sequence: no gap, no overlap.
        let mut rest = args.clone();
        if let Some(last) = last {
            rest.from_seq = Some(last + 1);
            rest.since = None;
            let state = js.get_stream(&name).await?.info().await?.state.clone();
            if state.first_sequence > last + 1 && state.last_sequence > last {
                summary
                    .gaps
                    .push((name.clone(), last + 1, state.first_sequence - 1));
            }
        }
        let one = replay_stream(js, f.partition, (pool, policy), &rest, retry_max, cancel).await?;
        summary.add(one);
        if cancel.is_triggered() {
            summary.completed = false;
            break;
        }
    }
    Ok(())
}

/// Replays the window of one stream held in the archive: the summary, and the last
/// sequence the archive covers in the window (where the stream takes over).
async fn replay_archived(
    archive: &crate::archive::Archive,
    (stream, stream_last): (&str, Option<u64>),
    (pool, policy): (&PgPool, &crate::privacy::Policy),
    args: &ReplayArgs,
    retry_max: Duration,
    cancel: &Shutdown,
) -> Result<(ReplaySummary, Option<u64>), async_nats::Error> {
    let mut summary = ReplaySummary {
        completed: true,
        ..ReplaySummary::default()
    };
    let objects = archive
        .objects(stream, args.since, args.until)
        .await
        .map_err(|e| format!("{e:#}"))?;
    if objects.is_empty() {
        return Ok((summary, None));
    }
    let bar = progress_bar(
        args.quiet,
        "{elapsed_precise} {prefix} [{wide_bar}] {pos}/{len} objects {msg} ETA {eta}",
    );
    bar.set_prefix(stream.to_owned());
    bar.set_length(objects.len() as u64);
    let started = Instant::now();
    let company = args.company.map(|c| format!(".{c}"));
    let mut prev: Option<u64> = None;
    let (mut rows, mut dead) = (Vec::new(), Vec::new());
    let ctx = (pool, policy, retry_max, cancel);
    for o in &objects {
        if cancel.is_triggered() {
            summary.completed = false;
            break;
        }
        if let Some(p) = prev {
            if o.first > p + 1 {
                summary.gaps.push((stream.to_owned(), p + 1, o.first - 1));
            }
        }
        prev = Some(prev.map_or(o.last, |p| p.max(o.last)));
        // One bad object does not stop the replay: it is reported, and the others read.
        let read = match archive.read_checked(o, stream_last).await {
            Ok(read) => read,
            Err(e) => {
                summary.unreadable.push(format!("{e:#}"));
                bar.inc(1);
                continue;
            }
        };
        summary.refused.extend(read.refused);
        for e in read.entries {
            if args.since.is_some_and(|s| e.time < s)
                || args.until.is_some_and(|u| e.time > u)
                || company
                    .as_ref()
                    .is_some_and(|c| !e.subject.ends_with(c.as_str()))
            {
                continue;
            }
            summary.saw(e.seq);
            summary.messages += 1;
            summary.from_archive += 1;
            match crate::write::decode_message(e.seq, &e.subject, &e.payload()) {
                Ok(row) => rows.push(row),
                Err(d) => dead.push(d),
            }
            if rows.len() + dead.len() >= args.batch_size as usize {
                write_archived(ctx, (&mut rows, &mut dead), &mut summary).await?;
            }
        }
        bar.inc(1);
        bar.set_message(format!("{} msgs", summary.messages));
    }
    write_archived(ctx, (&mut rows, &mut dead), &mut summary).await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        stream,
        objects = objects.len(),
        messages = summary.messages,
        rows_changed = summary.rows_changed,
        rate_per_sec = (summary.messages as f64 / secs) as u64,
        "replay from the archive finished"
    );
    // Interrupted: the stream must not take over past what was applied.
    Ok((summary.clone(), prev.filter(|_| summary.completed)))
}

/// Writes archived records gathered so far.
async fn write_archived(
    (pool, policy, retry_max, cancel): (&PgPool, &crate::privacy::Policy, Duration, &Shutdown),
    (rows, dead): (
        &mut Vec<crate::store::Row>,
        &mut Vec<crate::store::DeadLetter>,
    ),
    summary: &mut ReplaySummary,
) -> Result<(), async_nats::Error> {
    if rows.is_empty() && dead.is_empty() {
        return Ok(());
    }
    // An archived record kept no trace context: each starts a trace of its own.
    let span = callcap::otel_span!(
        "replay batch",
        messages = (rows.len() + dead.len()) as i64,
        archive = true
    );
    let records = span.in_scope(|| crate::write::record_spans(rows, "replay"));
    let stats = write_reliably(pool, policy, rows, dead, retry_max, cancel, || async {})
        .instrument(span)
        .await
        .map_err(|_| "replay interrupted while the database was unavailable")?;
    drop(records);
    summary.rows_changed += stats.rows_changed;
    summary.dead_letters += stats.dead_letters;
    rows.clear();
    dead.clear();
    Ok(())
}

/// Where a stream's replay ends: its last sequence when the replay started, or `--until`.
struct Window<'a> {
    stream: String,
    end_seq: u64,
    args: &'a ReplayArgs,
}

/// Reads `messages` to the end of the window and applies them in batches. The end is the
/// last message the consumer had pending, never a pause: a stall (a broker paused or
/// partitioned) is an error that leaves the replay incomplete.
async fn read_window(
    js: &jetstream::Context,
    mut messages: pull::Ordered,
    window: &Window<'_>,
    (pool, policy): (&PgPool, &crate::privacy::Policy),
    (retry_max, cancel): (Duration, &Shutdown),
    bar: &ProgressBar,
    summary: &mut ReplaySummary,
) -> Result<(), async_nats::Error> {
    let batch = window.args.batch_size as usize;
    let mut pending: Vec<jetstream::Message> = Vec::with_capacity(batch);
    loop {
        let next = tokio::select! {
            () = cancel.triggered() => break,
            next = tokio::time::timeout(STALL, messages.next()) => next,
        };
        let msg = match next {
            Err(_) => {
                return Err(format!(
                    "stream {}: no message for {} s before the end of the window (sequence {}): stalled; run the replay again",
                    window.stream,
                    STALL.as_secs(),
                    window.end_seq
                )
                .into())
            }
            Ok(None) => {
                return Err(format!(
                    "stream {}: the read ended before the end of the window",
                    window.stream
                )
                .into())
            }
            Ok(Some(msg)) => msg?,
        };
        let info = msg.info()?;
        let (seq, remaining, published) = (info.stream_sequence, info.pending, info.published);
        if seq > window.end_seq || window.args.until.is_some_and(|u| published > u) {
            summary.completed = true;
            break;
        }
        if bar.length().is_none() {
            bar.set_length(remaining + 1);
        }
        pending.push(msg);
        let last = remaining == 0 || seq == window.end_seq;
        if pending.len() >= batch || last {
            apply(
                js,
                (pool, policy),
                &mut pending,
                summary,
                (retry_max, cancel),
                bar,
            )
            .await?;
        }
        if last {
            summary.completed = true;
            break;
        }
    }
    if !pending.is_empty() && !cancel.is_triggered() {
        apply(
            js,
            (pool, policy),
            &mut pending,
            summary,
            (retry_max, cancel),
            bar,
        )
        .await?;
    }
    Ok(())
}

/// Replays the window of one partition stream.
async fn replay_stream(
    js: &jetstream::Context,
    partition: callcap::partitions::Partition,
    (pool, policy): (&PgPool, &crate::privacy::Policy),
    args: &ReplayArgs,
    retry_max: Duration,
    cancel: &Shutdown,
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
    if consumer.cached_info().num_pending == 0 {
        summary.completed = true;
        return Ok(summary);
    }
    let messages = consumer.messages().await?;
    let bar = progress_bar(
        args.quiet,
        "{elapsed_precise} [{wide_bar}] {pos}/{len} msgs {per_sec} ETA {eta}",
    );
    let started = Instant::now();
    let window = Window {
        stream: partition.stream_name(),
        end_seq,
        args,
    };
    read_window(
        js,
        messages,
        &window,
        (pool, policy),
        (retry_max, cancel),
        &bar,
        &mut summary,
    )
    .await?;
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
    (retry_max, cancel): (Duration, &Shutdown),
    bar: &ProgressBar,
) -> Result<(), async_nats::Error> {
    let span = callcap::otel_span!("replay batch", messages = pending.len() as i64);
    let decoded = decode(pending);
    let records = span.in_scope(|| crate::write::record_spans(&decoded.rows, "replay"));
    let stats = write_reliably(
        pool,
        policy,
        &decoded.rows,
        &decoded.dead,
        retry_max,
        cancel,
        || async {},
    )
    .instrument(span)
    .await
    .map_err(|_| "replay interrupted while the database was unavailable")?;
    drop(records);
    for s in pending
        .iter()
        .filter_map(|m| m.info().ok().map(|i| i.stream_sequence))
    {
        summary.saw(s);
    }
    if !stats.erased.is_empty() {
        if let Some(stream) = pending
            .first()
            .and_then(|m| m.info().ok())
            .map(|i| i.stream.to_owned())
        {
            crate::write::delete_messages(js, &stream, &stats.erased).await;
        }
    }
    summary.messages += pending.len() as u64;
    summary.rows_changed += stats.rows_changed;
    summary.dead_letters += stats.dead_letters;
    bar.inc(pending.len() as u64);
    pending.clear();
    Ok(())
}

fn progress_bar(quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::no_length();
    bar.set_style(
        ProgressStyle::with_template(template).expect("the progress templates are valid literals"),
    );
    bar
}
