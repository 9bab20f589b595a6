//! `persist-worker erase`: a caller's data removed from the database, the dead letters,
//! the stream and the archive, with an entry (keyed hashes) that keeps it from being
//! stored again.
//!
//! Order, so that nothing escapes while gateways and workers run:
//! 1. the entry is added ([`crate::store::privacy::add_erasure`]), after every write in progress
//!    and before any later one: from then on every write drops matching records, and the
//!    workers delete such messages from the stream;
//! 2. matching rows are deleted (calls with their follow-ups, then leads or the company);
//! 3. matching dead letters are deleted;
//! 4. matching stream messages are deleted, JetStream overwriting their payload — every
//!    partition stream read to its last sequence (a stall is an error, never the end);
//! 5. with an archive (ARCHIVE_URL), every archived object holding a match is rewritten
//!    without it: the archiver checks erasures under the same lock before each put, so
//!    an object written after step 1 never holds a match, and one written before is
//!    listed here;
//! 6. the entry is marked complete, with the counts — or, when a stream stalled or an
//!    object could not be read or rewritten, left incomplete with the reason, and the
//!    command fails saying so.
//!
//! Each step is idempotent: a run killed halfway is completed by running it again (or
//! `--resume`, which needs no identifier: rows and messages are matched by their hashes).
//! What "holds the erased data" means is [`crate::privacy::Matcher`]'s one rule.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::EraseArgs;
use crate::privacy::{ErasureKey, Kind, Matcher, Policy, Subject};
use crate::store::privacy::{self as db, Erasure};

/// Rows or dead letters read per page.
const PAGE: i64 = 500;

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
    /// Why the erasure is not complete (a stalled stream, an unreadable object), if so.
    pub incomplete: Vec<String>,
}

/// What the operator asked to erase: the entry's subject, the other written forms of its
/// identifier, the identifier as typed (to find it in what is not an envelope) and, for
/// a number, what is and is not covered.
struct Request {
    subject: Subject,
    forms: Vec<Subject>,
    needle: Option<String>,
    covered: Vec<String>,
    uncovered: Vec<String>,
}

/// Runs `erase` as `args` asks, printing what was removed from where (never the
/// identifier).
///
/// # Errors
/// Without an erasure key, with a key other than the entries', when NATS or Postgres
/// fail, or when an erasure could not be completed (it is left pending with the reason:
/// run it again, or `--resume`).
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
    let mut work: Vec<(Erasure, Option<Request>)> = Vec::new();
    if args.resume {
        for e in db::pending_erasures(pool).await? {
            work.push((e, None));
        }
        if work.is_empty() {
            writeln!(out, "no interrupted erasure to complete")?;
        }
    } else {
        let company = args.company.context("--company is required")?;
        let countries = countries(js, company, &args.country).await?;
        let request = request_of(args, &countries)?;
        let entry = db::add_erasure(pool, key, company, &request.subject, &request.forms).await?;
        work.push((entry, Some(request)));
    }
    let stall = Duration::from_secs(args.stall_secs);
    let mut all = Vec::new();
    for (entry, request) in work {
        if entry.key_fingerprint != key.fingerprint() {
            bail!(
                "erasure {} was hashed with key {}, but ERASURE_KEY_FILE holds key {}",
                entry.id,
                entry.key_fingerprint,
                key.fingerprint()
            );
        }
        let needle = request.as_ref().and_then(|r| r.needle.as_deref());
        let mut removed = complete(js, pool, key, &entry, needle, stall, args.quiet).await?;
        if let Some(archive) = archive {
            erase_in_archive(archive, key, (&entry, needle), args.quiet, &mut removed).await?;
        }
        if removed.incomplete.is_empty() {
            db::complete_erasure(
                pool,
                entry.id,
                removed.calls,
                removed.dead_letters,
                removed.messages,
            )
            .await?;
        } else {
            db::leave_incomplete(
                pool,
                entry.id,
                &removed.incomplete.join("; "),
                removed.calls,
                removed.dead_letters,
                removed.messages,
            )
            .await?;
        }
        report(out, &entry, request.as_ref(), &removed, archive)?;
        all.push(removed);
    }
    writeln!(
        out,
        "kept: a keyed hash per erasure (erasures table) and counts; records matching it are dropped from now on"
    )?;
    let incomplete = all.iter().filter(|r| !r.incomplete.is_empty()).count();
    if incomplete > 0 {
        bail!(
            "{incomplete} erasure(s) not complete (see above); they stay pending: run `persist-worker erase --resume`"
        );
    }
    Ok(all)
}

/// Prints what one erasure removed, where, and what it could not.
fn report(
    out: &mut impl Write,
    entry: &Erasure,
    request: Option<&Request>,
    removed: &Removed,
    archive: Option<&crate::archive::Archive>,
) -> std::io::Result<()> {
    let state = if removed.incomplete.is_empty() {
        "complete"
    } else {
        "NOT complete"
    };
    writeln!(
        out,
        "erasure {} ({} of company {}) {state}:",
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
    if let Some(r) = request.filter(|_| entry.kind == Kind::Phone) {
        writeln!(
            out,
            "  matched: the number written {}; with any separators, tel: or full-width digits; as caller, \
             recipient or in call_details' number fields (From, To, Caller, Called, ForwardedFrom, …, *number, *phone)",
            r.covered.join(", or ")
        )?;
        for u in &r.uncovered {
            writeln!(out, "  not matched: {u}")?;
        }
        writeln!(
            out,
            "  not searched: notes and nested call_details values (erase such calls with --call or --external-call-id)"
        )?;
        if removed.calls == 0 && removed.messages == 0 {
            writeln!(out, "  nothing stored matched it in any of these forms")?;
        }
    }
    for (stream, left) in &removed.sealed {
        writeln!(
            out,
            "  sealed stream {stream}: {left} matching message(s) left: JetStream refuses deletes on a sealed stream; \
             they are never stored again, and go when the drained stream is deleted (`nats stream rm {stream}`)"
        )?;
    }
    for why in &removed.incomplete {
        writeln!(out, "  NOT DONE: {why}")?;
    }
    Ok(())
}

/// The countries whose domestic forms a number erasure of `company` covers: those given,
/// else those of the company's provider connectors (read from their bucket; the admin
/// identity may).
async fn countries(
    js: &jetstream::Context,
    company: Uuid,
    given: &[String],
) -> anyhow::Result<Vec<callcap::phone::Country>> {
    let mut out = Vec::new();
    for iso in given {
        let c = callcap::phone::country(iso).with_context(|| {
            format!(
                "--country {iso:?} is not one this build knows; known: {}",
                callcap::phone::COUNTRIES
                    .iter()
                    .map(|c| c.iso)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        out.push(c);
    }
    if !out.is_empty() {
        return Ok(out);
    }
    // Best effort: no bucket (no connectors ever made) means no country.
    let Ok(store) = js.get_key_value(callcap::subjects::CONNECTORS_BUCKET).await else {
        return Ok(out);
    };
    let Ok(mut keys) = store.keys().await else {
        return Ok(out);
    };
    while let Some(Ok(k)) = keys.next().await {
        let Ok(Some(value)) = store.get(&k).await else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&value) else {
            continue;
        };
        let of_company = record["company_id"].as_str() == Some(&company.to_string());
        if let (true, Some(c)) = (
            of_company,
            record["country"].as_str().and_then(callcap::phone::country),
        ) {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// The entry `args` asks for.
fn request_of(args: &EraseArgs, countries: &[callcap::phone::Country]) -> anyhow::Result<Request> {
    let plain = |subject: Subject, needle: Option<String>| Request {
        subject,
        forms: Vec::new(),
        needle,
        covered: Vec::new(),
        uncovered: Vec::new(),
    };
    Ok(if let Some(p) = &args.phone {
        let p = p.trim();
        if p.is_empty() || p.chars().count() > 64 {
            bail!("--phone must be a number of 1 to 64 characters");
        }
        let forms = callcap::phone::erasure_forms(p, countries);
        let mut keys = forms.keys.into_iter();
        let first = keys.next().context("--phone names no number")?;
        Request {
            subject: Subject::Phone(first.clone()),
            forms: keys.map(Subject::Phone).collect(),
            needle: Some(first),
            covered: forms.covered,
            uncovered: forms.uncovered,
        }
    } else if let Some(l) = args.lead {
        plain(Subject::Lead(l), Some(l.to_string()))
    } else if let Some(id) = &args.external_call_id {
        plain(
            Subject::External {
                id: id.clone(),
                system: args.external_system.clone(),
            },
            Some(id.clone()),
        )
    } else if let Some(c) = args.call {
        plain(Subject::Call(c), Some(c.to_string()))
    } else if args.all {
        plain(Subject::Company, None)
    } else {
        bail!("give one of --phone, --lead, --external-call-id, --call, --all or --resume")
    })
}

async fn complete(
    js: &jetstream::Context,
    pool: &PgPool,
    key: &ErasureKey,
    entry: &Erasure,
    needle: Option<&str>,
    stall: Duration,
    quiet: bool,
) -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    let company = entry.company_id;
    let matcher = entry.matcher();

    // Rows: the company's calls, matched by hash.
    let mut after = None;
    let mut leads = HashSet::new();
    loop {
        let page = db::company_calls(pool, company, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        let doomed: Vec<Uuid> = page
            .iter()
            .filter(|c| matcher.matches(key, company, &c.identifiers()))
            .map(|c| {
                if entry.kind == Kind::Lead {
                    leads.extend(c.lead_id);
                }
                c.id
            })
            .collect();
        if !doomed.is_empty() {
            removed.calls += db::delete_calls(pool, company, &doomed).await?;
        }
    }
    if entry.kind == Kind::Lead {
        if let Some(l) = needle.and_then(|n| n.parse::<Uuid>().ok()) {
            leads.insert(l);
        }
    }
    for lead in leads {
        removed.parents += db::delete_parents(pool, company, Some(lead), false).await?;
    }
    if entry.kind == Kind::Company {
        removed.parents += db::delete_parents(pool, company, None, true).await?;
    }

    // Dead letters: decoded and matched, or (undecodable) by their subject's company and
    // the identifier as typed.
    let mut after = 0;
    loop {
        let page = db::dead_letter_payloads(pool, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.0;
        let doomed: Vec<i64> = page
            .iter()
            .filter(|(_, subject, payload)| matcher.holds(key, needle, subject, payload))
            .map(|(id, _, _)| *id)
            .collect();
        if !doomed.is_empty() {
            removed.dead_letters += db::delete_dead_letters(pool, &doomed).await?;
        }
    }

    // The stream: every partition stream read to its end (a record can sit on another
    // company's subject: forged or misrouted), matched and deleted.
    for found in callcap::partitions::list(js)
        .await
        .map_err(|e| anyhow::anyhow!("listing the streams: {e}"))?
    {
        let name = found.partition.stream_name();
        match erase_in_stream(js, &name, key, (&matcher, needle), stall, quiet).await {
            Ok((deleted, left, not_deleted)) => {
                removed.messages += deleted;
                if left > 0 {
                    removed.sealed.push((name.clone(), left));
                }
                if not_deleted > 0 {
                    removed.incomplete.push(format!(
                        "stream {name}: {not_deleted} matching message(s) could not be deleted"
                    ));
                }
            }
            Err(e) => removed.incomplete.push(format!("stream {name}: {e:#}")),
        }
    }
    Ok(removed)
}

/// Rewrites every archived object holding a match without it (every object of every
/// stream is read: a record can sit on another company's subject). An object that cannot
/// be read or rewritten is reported in `removed.incomplete`, and the others are still
/// cleaned.
///
/// # Errors
/// When the archive cannot be listed.
async fn erase_in_archive(
    archive: &crate::archive::Archive,
    key: &ErasureKey,
    (entry, needle): (&Erasure, Option<&str>),
    quiet: bool,
    removed: &mut Removed,
) -> anyhow::Result<()> {
    let matcher = entry.matcher();
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
    for o in &objects {
        let rewrite = async {
            let entries = archive.read(o).await?;
            let before = entries.len();
            let kept: Vec<Vec<u8>> = entries
                .iter()
                .filter(|e| !matcher.holds(key, needle, &e.subject, &e.payload()))
                .map(crate::archive::Entry::line)
                .collect();
            if kept.len() < before {
                let bytes = crate::archive::compress(kept.iter().map(Vec::as_slice))?;
                archive
                    .replace(&o.path, bytes)
                    .await
                    .with_context(|| format!("rewriting {}", o.path))?;
            }
            anyhow::Ok(before - kept.len())
        };
        match rewrite.await {
            Ok(0) => {}
            Ok(n) => {
                removed.archived += n as u64;
                removed.archive_objects += 1;
            }
            Err(e) => removed
                .incomplete
                .push(format!("archived object {}: {e:#}", o.path)),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Deletes the messages that match from one partition stream: (deleted, left in place
/// because the stream is sealed, matching but not deletable).
///
/// # Errors
/// When the stream cannot be read to its last sequence: a read that brings nothing for
/// `stall` before the end is an error, never taken for the end.
async fn erase_in_stream(
    js: &jetstream::Context,
    name: &str,
    key: &ErasureKey,
    (matcher, needle): (&Matcher, Option<&str>),
    stall: Duration,
    quiet: bool,
) -> anyhow::Result<(u64, u64, u64)> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("opening stream {name}"))?;
    let info = stream.info().await?;
    let (state, sealed) = (info.state.clone(), info.config.sealed);
    if state.messages == 0 {
        return Ok((0, 0, 0));
    }
    let end_seq = state.last_sequence;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(state.messages);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{wide_bar}] {pos}/{len} msgs {per_sec} ETA {eta}",
            )
            .expect("the progress template is a valid literal"),
        );
        bar.set_prefix(name.to_owned());
        bar
    };
    let mut messages = consumer.messages().await?;
    let mut doomed = Vec::new();
    let mut read_to = 0;
    loop {
        let msg = match tokio::time::timeout(stall, messages.next()).await {
            Err(_) => bail!(
                "no message for {} s after sequence {read_to}, before the stream's end ({end_seq}): stalled",
                stall.as_secs()
            ),
            Ok(None) => bail!("the read ended after sequence {read_to}, before the stream's end ({end_seq})"),
            Ok(Some(m)) => m.map_err(|e| anyhow::anyhow!("reading: {e}"))?,
        };
        let info = msg.info().map_err(|e| anyhow::anyhow!("reading: {e}"))?;
        let (seq, remaining) = (info.stream_sequence, info.pending);
        read_to = seq;
        bar.inc(1);
        if matcher.holds(key, needle, &msg.subject, &msg.payload) {
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
        return Ok((0, doomed.len() as u64, 0));
    }
    let deleted = crate::write::delete_messages(js, name, &doomed).await;
    Ok((deleted.deleted, 0, deleted.failed))
}
