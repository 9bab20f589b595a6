//! `persist-worker erase`: a caller's data removed from the database, the dead letters
//! and the stream, with an entry (a keyed hash) that keeps it from being stored again.
//!
//! Order, so that nothing escapes while gateways and workers run:
//! 1. the entry is added ([`store::privacy::add_erasure`]), after every write in progress
//!    and before any later one: from then on every write drops matching records, and the
//!    workers delete such messages from the stream;
//! 2. matching rows are deleted (calls with their follow-ups, then leads or the company);
//! 3. matching dead letters are deleted;
//! 4. matching stream messages are deleted, JetStream overwriting their payload;
//! 5. with an archive (ARCHIVE_URL), every archived object holding a match is rewritten
//!    without it: the archiver checks erasures under the same lock before each put, so
//!    an object written after step 1 never holds a match, and one written before is
//!    listed here;
//! 6. the entry is marked complete, with the counts.
//!
//! Each step is idempotent: a run killed halfway is completed by running it again (or
//! `--resume`, which needs no identifier: rows and messages are matched by their hashes).

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use callcap::Envelope;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::EraseArgs;
use crate::privacy::{hashes, ErasureKey, Identifiers, Policy, Subject};
use crate::store::privacy::{self as db, Erasure};

/// Rows or dead letters read per page.
const PAGE: i64 = 500;

/// Deletes stream messages by sequence; JetStream overwrites a deleted message's payload
/// (its message delete without `no_erase`). A message already gone counts as deleted.
/// The number deleted.
pub async fn delete_messages(js: &jetstream::Context, stream: &str, seqs: &[u64]) -> u64 {
    let Ok(handle) = js.get_stream_no_info(stream).await else {
        return 0;
    };
    let mut n = 0;
    for &seq in seqs {
        match handle.delete_message(seq).await {
            Ok(_) => n += 1,
            Err(e) if e.to_string().contains("no message found") => {}
            Err(e) => {
                tracing::warn!(stream, seq, error = %e, "an erased message could not be deleted from the stream; `erase --resume` deletes it")
            }
        }
    }
    metrics::counter!("worker_messages_erased_total").increment(n);
    n
}

/// What one erasure removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    pub calls: u64,
    pub parents: u64,
    pub dead_letters: u64,
    pub messages: u64,
    /// Records removed from archived objects, and the objects rewritten.
    pub archived: u64,
    pub archive_objects: u64,
    /// Matching messages left in sealed partition streams (JetStream refuses deletes
    /// there), by stream.
    pub sealed: Vec<(String, u64)>,
}

/// Runs `erase` as `args` asks, printing what was removed from where (never the
/// identifier).
///
/// # Errors
/// Without an erasure key, with a key other than the entries', or when NATS or Postgres
/// fail (run it again: it resumes).
pub async fn run(
    js: &jetstream::Context,
    archive: Option<&crate::archive::Archive>,
    pool: &PgPool,
    policy: &Policy,
    args: &EraseArgs,
    out: &mut impl Write,
) -> anyhow::Result<Vec<Removed>> {
    let key = policy.key.as_deref().context(
        "erase needs ERASURE_KEY_FILE (the key the workers hash erased identifiers with)",
    )?;
    let mut work: Vec<(Erasure, Option<String>)> = Vec::new();
    if args.resume {
        for e in db::pending_erasures(pool).await? {
            work.push((e, None));
        }
        if work.is_empty() {
            writeln!(out, "no interrupted erasure to complete")?;
        }
    } else {
        let company = args.company.context("--company is required")?;
        let (subject, needle) = subject_of(args)?;
        let entry = db::add_erasure(pool, key, company, &subject).await?;
        work.push((entry, needle));
    }
    let mut all = Vec::new();
    for (entry, needle) in work {
        if entry.key_fingerprint != key.fingerprint() {
            bail!(
                "erasure {} was hashed with key {}, but ERASURE_KEY_FILE holds key {}",
                entry.id,
                entry.key_fingerprint,
                key.fingerprint()
            );
        }
        let mut removed = complete(js, pool, key, &entry, needle.as_deref(), args.quiet).await?;
        if let Some(archive) = archive {
            (removed.archived, removed.archive_objects) =
                erase_in_archive(archive, key, (&entry, needle.as_deref()), args.quiet).await?;
        }
        db::complete_erasure(
            pool,
            entry.id,
            removed.calls,
            removed.dead_letters,
            removed.messages,
        )
        .await?;
        writeln!(
            out,
            "erasure {} ({} of company {}) complete:",
            entry.id, entry.kind, entry.company_id
        )?;
        writeln!(
            out,
            "  postgres: {} call(s) with their follow-ups, {} lead/employee/company row(s)",
            removed.calls, removed.parents
        )?;
        writeln!(out, "  dead letters: {}", removed.dead_letters)?;
        writeln!(
            out,
            "  stream: {} message(s) deleted, payloads overwritten",
            removed.messages
        )?;
        if let Some(archive) = archive {
            writeln!(
                out,
                "  archive {}: {} record(s) removed, {} object(s) rewritten",
                archive.url(),
                removed.archived,
                removed.archive_objects
            )?;
        }
        if entry.kind == "phone" && removed.calls == 0 && removed.messages == 0 {
            writeln!(
                out,
                "  no stored call or message has this number as written (separators aside): a number stored \
                 in another form (e.g. +919876543210 and 09876543210) is another erasure; run it for that form too"
            )?;
        }
        for (stream, left) in &removed.sealed {
            writeln!(
                out,
                "  sealed stream {stream}: {left} matching message(s) left: JetStream refuses deletes on a sealed stream; \
                 they are never stored again, and go when the drained stream is deleted (`nats stream rm {stream}`)"
            )?;
        }
        all.push(removed);
    }
    writeln!(
        out,
        "kept: a keyed hash per erasure (erasures table) and counts; records matching it are dropped from now on"
    )?;
    Ok(all)
}

/// The subject `args` names, and the identifier as text (to find it in dead letters
/// that cannot be decoded).
fn subject_of(args: &EraseArgs) -> anyhow::Result<(Subject, Option<String>)> {
    Ok(if let Some(p) = &args.phone {
        let n = crate::privacy::normalize_phone(p);
        if n.is_empty() || n.len() > 64 {
            bail!("--phone must be a number of 1 to 64 characters");
        }
        (Subject::Phone(n.clone()), Some(n))
    } else if let Some(l) = args.lead {
        (Subject::Lead(l), Some(l.to_string()))
    } else if let Some(id) = &args.external_call_id {
        (
            Subject::External {
                id: id.clone(),
                system: args.external_system.clone(),
            },
            Some(id.clone()),
        )
    } else if let Some(c) = args.call {
        (Subject::Call(c), Some(c.to_string()))
    } else if args.all {
        (Subject::Company, None)
    } else {
        bail!("give one of --phone, --lead, --external-call-id, --call, --all or --resume")
    })
}

fn matches(key: &ErasureKey, entry: &Erasure, company: uuid::Uuid, ids: Identifiers<'_>) -> bool {
    company == entry.company_id && hashes(key, company, ids).contains(&entry.hash)
}

async fn complete(
    js: &jetstream::Context,
    pool: &PgPool,
    key: &ErasureKey,
    entry: &Erasure,
    needle: Option<&str>,
    quiet: bool,
) -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    let company = entry.company_id;

    // Rows: the company's calls, matched by hash.
    let mut after = None;
    let mut leads = HashSet::new();
    loop {
        let page = db::company_calls(pool, company, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        let doomed: Vec<Uuid> = page
            .iter()
            .filter(|c| {
                matches(
                    key,
                    entry,
                    company,
                    Identifiers {
                        call: c.id,
                        lead: c.lead_id,
                        external_call_id: c.external_call_id.as_deref(),
                        external_system: c.external_system.as_deref(),
                        numbers: [c.caller_number.as_deref(), c.recipient_number.as_deref()],
                    },
                )
            })
            .map(|c| {
                if entry.kind == "lead" {
                    leads.extend(c.lead_id);
                }
                c.id
            })
            .collect();
        if !doomed.is_empty() {
            removed.calls += db::delete_calls(pool, company, &doomed).await?;
        }
    }
    if entry.kind == "lead" {
        if let Some(l) = needle.and_then(|n| n.parse::<Uuid>().ok()) {
            leads.insert(l);
        }
    }
    for lead in leads {
        removed.parents += db::delete_parents(pool, company, Some(lead), false).await?;
    }
    if entry.kind == "company" {
        removed.parents += db::delete_parents(pool, company, None, true).await?;
    }

    // Dead letters: decoded and matched, or (undecodable) searched for the identifier.
    let mut after = 0;
    loop {
        let page = db::dead_letter_payloads(pool, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.0;
        let doomed: Vec<i64> = page
            .iter()
            .filter(|(_, payload)| match Envelope::decode(payload) {
                Ok(e) => matches(
                    key,
                    entry,
                    e.record.company_id,
                    Identifiers::of_record(e.call_history_id, &e.record),
                ),
                Err(_) => {
                    let text = String::from_utf8_lossy(payload);
                    text.contains(&company.to_string())
                        && (entry.kind == "company" || needle.is_some_and(|n| text.contains(n)))
                }
            })
            .map(|(id, _)| *id)
            .collect();
        if !doomed.is_empty() {
            removed.dead_letters += db::delete_dead_letters(pool, &doomed).await?;
        }
    }

    // The stream: every partition stream read whole (a record can sit on another
    // company's subject: forged or misrouted), matched and deleted.
    for found in callcap::partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("listing the streams: {e}"))?
    {
        let (deleted, left) =
            erase_in_stream(js, found.partition, key, (entry, needle), quiet).await?;
        removed.messages += deleted;
        if left > 0 {
            removed.sealed.push((found.partition.stream_name(), left));
        }
    }
    Ok(removed)
}

/// Whether a stream message (or an archived one) holds what `entry` erases.
fn holds(
    key: &ErasureKey,
    (entry, needle): (&Erasure, Option<&str>),
    subject: &str,
    payload: &[u8],
) -> bool {
    match Envelope::decode(payload) {
        Ok(e) => matches(
            key,
            entry,
            e.record.company_id,
            Identifiers::of_record(e.call_history_id, &e.record),
        ),
        // Not an envelope: erased when on the company's subject with the company, or when
        // it holds the identifier as typed.
        Err(_) => {
            let company = entry.company_id.to_string();
            subject.ends_with(company.as_str())
                && (entry.kind == "company"
                    || needle.is_some_and(|n| String::from_utf8_lossy(payload).contains(n)))
        }
    }
}

/// Rewrites every archived object holding a match without it: (records removed,
/// objects rewritten). Every object of every stream is read (a record can sit on another
/// company's subject).
async fn erase_in_archive(
    archive: &crate::archive::Archive,
    key: &ErasureKey,
    (entry, needle): (&Erasure, Option<&str>),
    quiet: bool,
) -> anyhow::Result<(u64, u64)> {
    let mut objects = Vec::new();
    for stream in archive.streams().await? {
        objects.extend(archive.objects(&stream, None, None).await?);
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(objects.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("archive [{wide_bar}] {pos}/{len} objects ETA {eta}")
                .expect("the progress template is a valid literal"),
        );
        bar
    };
    let (mut records, mut rewritten) = (0, 0);
    for o in &objects {
        let entries = archive.read(o).await?;
        let before = entries.len();
        let kept: Vec<Vec<u8>> = entries
            .iter()
            .filter(|e| !holds(key, (entry, needle), &e.subject, &e.payload()))
            .map(crate::archive::Entry::line)
            .collect();
        if kept.len() < before {
            let bytes = crate::archive::compress(kept.iter().map(Vec::as_slice))?;
            archive
                .replace(&o.path, bytes)
                .await
                .with_context(|| format!("rewriting {}", o.path))?;
            records += (before - kept.len()) as u64;
            rewritten += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((records, rewritten))
}

/// Deletes the messages that match `entry` from one partition stream: (deleted, left in
/// place because the stream is sealed).
async fn erase_in_stream(
    js: &jetstream::Context,
    partition: callcap::partitions::Partition,
    key: &ErasureKey,
    (entry, needle): (&Erasure, Option<&str>),
    quiet: bool,
) -> anyhow::Result<(u64, u64)> {
    let name = partition.stream_name();
    let mut stream = js
        .get_stream(&name)
        .await
        .with_context(|| format!("opening stream {name}"))?;
    let info = stream.info().await?;
    let (state, sealed) = (info.state.clone(), info.config.sealed);
    if state.messages == 0 {
        return Ok((0, 0));
    }
    let end_seq = state.last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::no_length();
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{wide_bar}] {pos}/{len} msgs {per_sec} ETA {eta}",
            )
            .expect("the progress template is a valid literal"),
        );
        bar.set_prefix(name.clone());
        bar
    };
    let mut doomed = Vec::new();
    loop {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        let msg = msg.map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?;
        let info = msg
            .info()
            .map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?;
        let (seq, remaining) = (info.stream_sequence, info.pending);
        if bar.length().is_none() {
            bar.set_length(remaining + 1);
        }
        bar.inc(1);
        let hit = holds(key, (entry, needle), &msg.subject, &msg.payload);
        if hit {
            doomed.push(seq);
        }
        if remaining == 0 || seq >= end_seq {
            break;
        }
    }
    bar.finish_and_clear();
    if sealed {
        // A sealed stream (an older partition layout) refuses every delete; what it holds
        // is never stored again (every write drops it) and goes with the stream.
        return Ok((0, doomed.len() as u64));
    }
    Ok((delete_messages(js, &name, &doomed).await, 0))
}
