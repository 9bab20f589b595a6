//! `persist-worker trace`: where one call's record is, in one answer an operator can paste
//! into a ticket — on which stream and sequence and whether a worker has it (pending,
//! delivered, acked), stored (the row's `stored_at`, its status), dead-lettered (why),
//! erased (when), archived (which object).
//!
//! It reads and never writes: an ordered consumer over the company's subjects of every
//! partition stream (the envelopes' `call_history_id` compared, nothing decoded further
//! unless it matches), the durable consumers' ack floors, the row, the dead letters whose
//! payload names the call, the erasures (by keyed hash, with `ERASURE_KEY_FILE`), and the
//! archive objects covering the sequences found.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use callcap::partitions::{partition_index, Found};
use callcap::subjects::Lane;
use callcap::Envelope;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::archive::Archive;
use crate::privacy::{self, ErasureKey, Identifiers};

/// Longest wait for the next message of a scan before it is reported as cut short.
const STALL: Duration = Duration::from_secs(10);

/// What is asked: a company's call, by `call_history_id`, or by external id (and system).
#[derive(Debug, Clone)]
pub struct Query {
    pub company: Uuid,
    pub call: Uuid,
    pub external_call_id: Option<String>,
    pub external_system: Option<String>,
}

/// One message of the call in a stream, and what the lane's consumer has done with it.
#[derive(Debug, Clone, Serialize)]
pub struct InStream {
    pub stream: String,
    pub seq: u64,
    pub subject: String,
    pub lane: String,
    pub published: DateTime<Utc>,
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    /// `acked`, `delivered, not acked yet`, `pending` or `no consumer`.
    pub state: String,
    pub consumer: String,
    /// For `pending`: the lane's messages not yet delivered to any worker (its backlog).
    pub lane_pending: Option<u64>,
}

/// The row, when stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Stored {
    pub stored_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub call_status: Option<String>,
    pub outcome: Option<String>,
    pub stream_seq: i64,
    pub external_call_id: Option<String>,
    pub external_system: Option<String>,
}

/// A dead letter holding the call.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Dead {
    pub id: i64,
    pub stream_seq: i64,
    pub subject: String,
    pub reason: String,
    pub failed_at: DateTime<Utc>,
    pub redriven_at: Option<DateTime<Utc>>,
}

/// An erasure the call falls under.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Erased {
    pub kind: String,
    pub requested_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub incomplete_reason: Option<String>,
}

/// How much of a stream was read for the company.
#[derive(Debug, Clone, Serialize)]
pub struct Scanned {
    pub stream: String,
    pub messages: u64,
    /// Why the scan stopped before the stream's end, if it did.
    pub cut_short: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub company_id: Uuid,
    pub call_history_id: Uuid,
    pub external_call_id: Option<String>,
    /// One sentence: where the record is.
    pub verdict: String,
    pub in_stream: Vec<InStream>,
    pub stored: Option<Stored>,
    pub dead_letters: Vec<Dead>,
    pub erased: Vec<Erased>,
    /// Why the erasures could not be checked, when they could not.
    pub erasures_unchecked: Option<String>,
    /// Archive objects holding the call (`None`: no `ARCHIVE_URL`).
    pub archived: Option<Vec<String>>,
    pub scanned: Vec<Scanned>,
}

impl Report {
    /// Whether the record was found anywhere.
    pub fn found(&self) -> bool {
        !self.in_stream.is_empty()
            || self.stored.is_some()
            || !self.dead_letters.is_empty()
            || !self.erased.is_empty()
            || self.archived.as_ref().is_some_and(|a| !a.is_empty())
    }
}

#[derive(serde::Deserialize)]
struct IdProbe {
    call_history_id: Uuid,
}

/// Finds the call everywhere it can be.
///
/// # Errors
/// NATS, Postgres or the archive unavailable.
pub async fn run(
    js: &jetstream::Context,
    pool: &PgPool,
    archive: Option<&Archive>,
    key: Option<&ErasureKey>,
    q: &Query,
) -> anyhow::Result<Report> {
    let found = callcap::partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("listing the partition streams: {e}"))?;
    let mut in_stream = Vec::new();
    let mut envelopes = Vec::new();
    let mut scanned = Vec::new();
    for f in &found {
        let (hits, s) = scan(js, f, q).await?;
        for (hit, env) in hits {
            in_stream.push(hit);
            envelopes.extend(env);
        }
        if let Some(s) = s {
            scanned.push(s);
        }
    }
    let stored: Option<Stored> = sqlx::query_as(
        "SELECT stored_at, received_at, call_status, outcome, stream_seq, external_call_id, external_system \
         FROM call_history WHERE id = $1 AND company_id = $2",
    )
    .bind(q.call)
    .bind(q.company)
    .fetch_optional(pool)
    .await?;
    let dead_letters: Vec<Dead> = sqlx::query_as(
        "SELECT id, stream_seq, subject, reason, failed_at, redriven_at FROM dead_letters \
         WHERE position(convert_to($1, 'UTF8') in payload) > 0 ORDER BY id",
    )
    .bind(q.call.to_string())
    .fetch_all(pool)
    .await?;
    let dead_payloads: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT subject, payload FROM dead_letters WHERE position(convert_to($1, 'UTF8') in payload) > 0",
    )
    .bind(q.call.to_string())
    .fetch_all(pool)
    .await?;
    envelopes.extend(
        dead_payloads
            .iter()
            .filter_map(|(subject, payload)| Envelope::decode_checked(subject, payload).ok()),
    );
    let (erased, erasures_unchecked) = erasures(pool, key, q, &envelopes).await?;
    let archived = match archive {
        Some(a) => Some(archived(a, &found, q, &in_stream, stored.as_ref()).await?),
        None => None,
    };
    let mut report = Report {
        company_id: q.company,
        call_history_id: q.call,
        external_call_id: q.external_call_id.clone().or_else(|| {
            stored
                .as_ref()
                .and_then(|s| s.external_call_id.clone())
                .or_else(|| {
                    envelopes
                        .first()
                        .and_then(|e| e.record.external_call_id.clone())
                })
        }),
        verdict: String::new(),
        in_stream,
        stored,
        dead_letters,
        erased,
        erasures_unchecked,
        archived,
        scanned,
    };
    report.verdict = verdict(&report);
    Ok(report)
}

/// Reads the company's messages of one partition stream up to its last sequence at the
/// start; the call's messages, with their envelopes.
async fn scan(
    js: &jetstream::Context,
    found: &Found,
    q: &Query,
) -> anyhow::Result<(Vec<(InStream, Option<Envelope>)>, Option<Scanned>)> {
    let name = found.partition.stream_name();
    if found.last_sequence == 0 {
        return Ok((Vec::new(), None));
    }
    let stream = js.get_stream(&name).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            filter_subject: found.partition.company_filter(q.company),
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0 {
        return Ok((Vec::new(), None));
    }
    let mut messages = consumer.messages().await?;
    let mut hits = Vec::new();
    let mut count = 0u64;
    let mut cut_short = None;
    loop {
        let msg = match tokio::time::timeout(STALL, messages.next()).await {
            Err(_) => {
                cut_short = Some(format!("no message for {} s", STALL.as_secs()));
                break;
            }
            Ok(None) => {
                cut_short = Some("the read ended early".to_owned());
                break;
            }
            Ok(Some(m)) => m.map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?,
        };
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (seq, pending, published) = (info.stream_sequence, info.pending, info.published);
        count += 1;
        let ours = serde_json::from_slice::<IdProbe>(&msg.payload)
            .is_ok_and(|p| p.call_history_id == q.call);
        if ours {
            let envelope = Envelope::decode_checked(&msg.subject, &msg.payload).ok();
            let lane = Lane::of_subject(&msg.subject).map_or(Lane::Main, |(l, _)| l);
            let (state, lane_pending) = consumer_state(js, &name, lane, seq).await;
            hits.push((
                InStream {
                    stream: name.clone(),
                    seq,
                    subject: msg.subject.to_string(),
                    lane: lane.as_str().to_owned(),
                    published,
                    request_id: envelope.as_ref().and_then(|e| e.request_id.clone()),
                    traceparent: callcap::traces::TraceContext::from_nats(msg.headers.as_ref())
                        .map(|t| t.traceparent().to_owned()),
                    state,
                    consumer: lane.consumer_name().to_owned(),
                    lane_pending,
                },
                envelope,
            ));
        }
        if pending == 0 || seq >= found.last_sequence {
            break;
        }
    }
    Ok((
        hits,
        Some(Scanned {
            stream: name,
            messages: count,
            cut_short,
        }),
    ))
}

/// What the lane's durable consumer has done with `seq`.
async fn consumer_state(
    js: &jetstream::Context,
    stream: &str,
    lane: Lane,
    seq: u64,
) -> (String, Option<u64>) {
    let info = match js.get_stream(stream).await {
        Ok(s) => s.consumer_info(lane.consumer_name()).await.ok(),
        Err(_) => None,
    };
    let Some(info) = info else {
        return (
            "no consumer (no worker has served this lane of this stream)".into(),
            None,
        );
    };
    if seq <= info.ack_floor.stream_sequence {
        ("acked".into(), None)
    } else if seq > info.delivered.stream_sequence {
        (
            "pending: not yet delivered to a worker".into(),
            Some(info.num_pending),
        )
    } else {
        (
            "delivered, not acked yet: being written, held, or waiting for redelivery".into(),
            None,
        )
    }
}

/// The erasures the call falls under: by its ids as asked, and by every identifier of
/// the envelopes found (numbers, lead).
async fn erasures(
    pool: &PgPool,
    key: Option<&ErasureKey>,
    q: &Query,
    envelopes: &[Envelope],
) -> anyhow::Result<(Vec<Erased>, Option<String>)> {
    let (count, fingerprints): (i64, Vec<String>) = sqlx::query_as(
        "SELECT count(*), coalesce(array_agg(DISTINCT key_fingerprint), '{}') FROM erasures WHERE company_id = $1",
    )
    .bind(q.company)
    .fetch_one(pool)
    .await?;
    if count == 0 {
        return Ok((Vec::new(), None));
    }
    let Some(key) = key else {
        return Ok((
            Vec::new(),
            Some(format!(
                "{count} erasure(s) of this company not checked: give ERASURE_KEY_FILE"
            )),
        ));
    };
    let unchecked = fingerprints
        .iter()
        .any(|f| f != key.fingerprint())
        .then(|| {
            format!(
                "some erasures were made with another key (fingerprints {}; this one is {})",
                fingerprints.join(", "),
                key.fingerprint()
            )
        });
    let asked = Identifiers {
        call: q.call,
        lead: None,
        external_call_id: q.external_call_id.as_deref(),
        external_system: q.external_system.as_deref(),
        numbers: Vec::new(),
    };
    let mut hashes = privacy::hashes(key, q.company, &asked, true);
    for e in envelopes {
        hashes.extend(privacy::hashes(
            key,
            q.company,
            &Identifiers::of_record(e.call_history_id, &e.record),
            true,
        ));
    }
    let erased: Vec<Erased> = sqlx::query_as(
        "SELECT kind, requested_at, completed_at, incomplete_reason FROM erasures \
         WHERE company_id = $1 AND hash = ANY($2) ORDER BY id",
    )
    .bind(q.company)
    .bind(&hashes)
    .fetch_all(pool)
    .await?;
    Ok((erased, unchecked))
}

/// The archive objects holding the call: for each message found, the object of its
/// stream covering its sequence; for a stored row whose message has left the stream, the
/// objects of the company's partition streams around its receipt. Each is read to see
/// that the call is in it.
async fn archived(
    archive: &Archive,
    found: &[Found],
    q: &Query,
    in_stream: &[InStream],
    stored: Option<&Stored>,
) -> anyhow::Result<Vec<String>> {
    let mut candidates: Vec<(String, u64, DateTime<Utc>)> = in_stream
        .iter()
        .map(|h| (h.stream.clone(), h.seq, h.published))
        .collect();
    if let (true, Some(row)) = (candidates.is_empty(), stored) {
        for f in found {
            let p = f.partition;
            if p.count == 0 || partition_index(q.company, p.count) == p.index {
                candidates.push((
                    p.stream_name(),
                    u64::try_from(row.stream_seq).unwrap_or(0),
                    row.received_at,
                ));
            }
        }
    }
    let mut out = Vec::new();
    for (stream, seq, at) in candidates {
        let objects = archive
            .objects(
                &stream,
                Some(at - chrono::Duration::minutes(5)),
                Some(at + chrono::Duration::days(1)),
            )
            .await?;
        for o in objects.iter().filter(|o| o.first <= seq && seq <= o.last) {
            let entries = archive.read(o).await?;
            let holds = entries.iter().any(|e| {
                e.seq == seq
                    && serde_json::from_slice::<IdProbe>(&e.payload())
                        .is_ok_and(|p| p.call_history_id == q.call)
            });
            if holds && !out.contains(&o.path.to_string()) {
                out.push(o.path.to_string());
            }
        }
    }
    Ok(out)
}

fn verdict(r: &Report) -> String {
    let at = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if let Some(s) = &r.stored {
        let erased = if r.erased.iter().any(|e| e.completed_at.is_none()) {
            " (an erasure of it is in progress)"
        } else {
            ""
        };
        return format!(
            "stored: row written {} (call_status {}, outcome {}) from stream sequence {}{erased}",
            at(&s.stored_at),
            s.call_status.as_deref().unwrap_or("none"),
            s.outcome.as_deref().unwrap_or("none"),
            s.stream_seq
        );
    }
    if let Some(e) = r.erased.first() {
        return match &e.completed_at {
            Some(done) => format!(
                "erased: an erasure by {} requested {} and completed {} deleted it, and keeps it out",
                e.kind,
                at(&e.requested_at),
                at(done)
            ),
            None => format!(
                "erased: an erasure by {} requested {} is not complete{}; it keeps the record out",
                e.kind,
                at(&e.requested_at),
                e.incomplete_reason
                    .as_deref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            ),
        };
    }
    if let Some(d) = r.dead_letters.iter().find(|d| d.redriven_at.is_none()) {
        return format!(
            "dead-lettered {}: {} (after fixing the cause: persist-worker dlq redrive {})",
            at(&d.failed_at),
            d.reason,
            d.id
        );
    }
    if let Some(h) = r.in_stream.last() {
        let backlog = h
            .lane_pending
            .map(|n| {
                format!(
                    " (the {} lane has {n} message(s) not yet delivered)",
                    h.lane
                )
            })
            .unwrap_or_default();
        return format!(
            "accepted, not stored yet: {} sequence {} is {}{backlog}",
            h.stream, h.seq, h.state
        );
    }
    if r.archived.as_ref().is_some_and(|a| !a.is_empty()) {
        return "archived only: not in the streams nor in the database (persist-worker replay --from-archive brings it back)".into();
    }
    let scanned: u64 = r.scanned.iter().map(|s| s.messages).sum();
    format!(
        "not found: not in the streams ({scanned} message(s) of the company read), not stored, not dead-lettered{}{}",
        if r.erasures_unchecked.is_some() {
            ", erasures not checked"
        } else {
            ", not erased"
        },
        if r.archived.is_none() {
            "; no ARCHIVE_URL to look in the archive"
        } else {
            ", not archived"
        }
    )
}

/// Writes the report for people.
///
/// # Errors
/// When the output cannot be written.
pub fn write_text(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let at = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    writeln!(
        out,
        "call {} of company {}{}",
        r.call_history_id,
        r.company_id,
        r.external_call_id
            .as_deref()
            .map(|e| format!(" (external_call_id {e})"))
            .unwrap_or_default()
    )?;
    writeln!(out, "verdict:      {}", r.verdict)?;
    if r.in_stream.is_empty() {
        writeln!(out, "stream:       not in any partition stream")?;
    }
    for h in &r.in_stream {
        writeln!(
            out,
            "stream:       {} seq {} ({} lane, published {}): {} [consumer {}]{}{}",
            h.stream,
            h.seq,
            h.lane,
            at(&h.published),
            h.state,
            h.consumer,
            h.request_id
                .as_deref()
                .map(|r| format!(" request_id {r}"))
                .unwrap_or_default(),
            h.traceparent
                .as_deref()
                .map(|t| format!(" traceparent {t}"))
                .unwrap_or_default()
        )?;
    }
    match &r.stored {
        Some(s) => writeln!(
            out,
            "stored:       stored_at {}, received_at {}, call_status {}, outcome {}, stream_seq {}",
            at(&s.stored_at),
            at(&s.received_at),
            s.call_status.as_deref().unwrap_or("none"),
            s.outcome.as_deref().unwrap_or("none"),
            s.stream_seq
        )?,
        None => writeln!(out, "stored:       no row")?,
    }
    if r.dead_letters.is_empty() {
        writeln!(out, "dead letters: none")?;
    }
    for d in &r.dead_letters {
        writeln!(
            out,
            "dead letter:  id {} (stream seq {}, {}) failed {}: {}{}",
            d.id,
            d.stream_seq,
            d.subject,
            at(&d.failed_at),
            d.reason,
            d.redriven_at
                .map(|t| format!("; re-driven {}", at(&t)))
                .unwrap_or_default()
        )?;
    }
    match (&r.erasures_unchecked, r.erased.is_empty()) {
        (Some(why), true) => writeln!(out, "erased:       unknown: {why}")?,
        (None, true) => writeln!(out, "erased:       no erasure matches")?,
        (why, false) => {
            for e in &r.erased {
                writeln!(
                    out,
                    "erased:       by {} requested {}, {}",
                    e.kind,
                    at(&e.requested_at),
                    e.completed_at.map_or_else(
                        || format!(
                            "not complete{}",
                            e.incomplete_reason
                                .as_deref()
                                .map(|w| format!(": {w}"))
                                .unwrap_or_default()
                        ),
                        |t| format!("completed {}", at(&t))
                    )
                )?;
            }
            if let Some(why) = why {
                writeln!(out, "              also: {why}")?;
            }
        }
    }
    match &r.archived {
        None => writeln!(out, "archived:     not looked for (no ARCHIVE_URL)")?,
        Some(a) if a.is_empty() => writeln!(out, "archived:     in no archive object")?,
        Some(a) => {
            for o in a {
                writeln!(out, "archived:     {o}")?;
            }
        }
    }
    for s in &r.scanned {
        writeln!(
            out,
            "read:         {}: {} message(s) of the company{}",
            s.stream,
            s.messages,
            s.cut_short
                .as_deref()
                .map(|w| format!(" — cut short: {w}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}
