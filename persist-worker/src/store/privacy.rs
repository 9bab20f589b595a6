//! Erasure and retention in the database: the erasure entries every write checks, the
//! deletions `persist-worker erase` and retention make, and the counters of what was
//! removed (never an identifier).
//!
//! A write and an erasure are ordered by an advisory lock: every write transaction holds
//! it shared from its first statement, an erasure takes it exclusively to add its entry.
//! So a write either committed before the entry existed (its row is then deleted by the
//! erasure, which deletes after adding the entry) or sees the entry and drops the record.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use chrono::Utc;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{DeadLetter, Row, StoreError};
use crate::privacy::{
    subject_company, Identifiers, Kind, Matcher, Policy, Subject, Uncheckable, SCHEME,
};

/// The advisory lock key ordering writes and erasures ("callcap erase").
pub const ERASE_LOCK: i64 = 0x6361_6c6c_6572_6173;

/// A batch's rows and dead letters after erasure and retention.
pub struct Filtered<'a> {
    pub rows: Cow<'a, [Row]>,
    /// The dead letters less those holding an erased record (a forged or misrouted
    /// envelope is dead-lettered with its payload: it must not keep erased data), and
    /// those that are no envelope on the subject of a company with erasures with their
    /// payload withheld (it cannot be checked).
    pub dead: Cow<'a, [DeadLetter]>,
    /// Stream sequences of the messages dropped as erased (to delete from the stream).
    pub erased: Vec<u64>,
    /// Records dropped as older than the retention period.
    pub expired: u64,
    /// Stream sequences of the messages held: their company has erasures this process
    /// cannot check ([`Uncheckable`]). Neither stored nor to be acknowledged.
    pub held: Vec<u64>,
    /// Why they are held.
    pub hold: Option<Uncheckable>,
}

/// One company's erasures as a write checks them.
enum Check {
    /// Its records are matched against these.
    Match(Matcher),
    /// Its records cannot be checked here.
    Hold(Uncheckable),
}

/// The erasures of `companies` (those that have any), as each company's [`Check`].
async fn checks(
    tx: &mut Transaction<'_, Postgres>,
    policy: &Policy,
    companies: &[Uuid],
) -> Result<HashMap<Uuid, Check>, StoreError> {
    if companies.is_empty() {
        return Ok(HashMap::new());
    }
    let entries: Vec<Entry> = sqlx::query_as(
        "SELECT company_id, kind, hash, forms, key_fingerprint, scheme FROM erasures WHERE company_id = ANY($1)",
    )
    .bind(companies)
    .fetch_all(&mut **tx)
    .await?;
    let mut by_company: HashMap<Uuid, Vec<Entry>> = HashMap::new();
    for e in entries {
        by_company.entry(e.company_id).or_default().push(e);
    }
    Ok(by_company
        .into_iter()
        .map(|(company, entries)| {
            let check = match &policy.key {
                None => Check::Hold(Uncheckable::NoKey),
                Some(key) => match entries
                    .iter()
                    .find(|e| e.key_fingerprint != key.fingerprint())
                {
                    Some(other) => Check::Hold(Uncheckable::OtherKey {
                        entries: other.key_fingerprint.clone(),
                        ours: key.fingerprint().to_owned(),
                    }),
                    None => {
                        let legacy = entries
                            .iter()
                            .any(|e| e.scheme < SCHEME && e.kind == Kind::Phone);
                        let whole = entries.iter().any(|e| e.kind == Kind::Company);
                        Check::Match(Matcher::new(
                            company,
                            entries
                                .into_iter()
                                .flat_map(|e| std::iter::once(e.hash).chain(e.forms)),
                            legacy,
                            whole,
                        ))
                    }
                },
            };
            (company, check)
        })
        .collect())
}

/// An erasure entry as a write reads it.
#[derive(sqlx::FromRow)]
struct Entry {
    company_id: Uuid,
    #[sqlx(try_from = "String")]
    kind: Kind,
    hash: Vec<u8>,
    forms: Vec<Vec<u8>>,
    key_fingerprint: String,
    scheme: i16,
}

/// Takes the write side of [`ERASE_LOCK`] and drops the rows that are erased or past
/// retention; holds those of companies whose erasures this process cannot check.
///
/// # Errors
/// [`StoreError::Transient`] when the database is unavailable.
pub async fn filter<'a>(
    tx: &mut Transaction<'_, Postgres>,
    policy: &Policy,
    rows: &'a [Row],
    dead: &'a [DeadLetter],
) -> Result<Filtered<'a>, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(ERASE_LOCK)
        .execute(&mut **tx)
        .await?;
    // A dead letter that still decodes (wrong subject, broken rule) names its company;
    // one that does not, its subject does.
    let dead_envelopes: Vec<Option<callcap::Envelope>> = dead
        .iter()
        .map(|d| callcap::Envelope::decode(&d.payload).ok())
        .collect();
    let of_dead = dead
        .iter()
        .zip(&dead_envelopes)
        .filter_map(|(d, e)| match e {
            Some(e) => Some(e.record.company_id),
            None => subject_company(&d.subject),
        });
    let companies: HashSet<Uuid> = rows
        .iter()
        .map(|r| r.envelope.record.company_id)
        .chain(of_dead)
        .collect();
    let companies: Vec<Uuid> = companies.into_iter().collect();
    let checks = checks(tx, policy, &companies).await?;
    let keep_since = policy.keep_since(Utc::now());
    let mut out = Filtered {
        rows: Cow::Borrowed(rows),
        dead: Cow::Borrowed(dead),
        erased: Vec::new(),
        expired: 0,
        held: Vec::new(),
        hold: None,
    };
    if checks.is_empty() && keep_since.is_none() {
        return Ok(out);
    }
    // What becomes of one call of `company`: `None` to keep it.
    let verdict = |company: Uuid, ids: Identifiers<'_>, seq: u64, out: &mut Filtered<'_>| match (
        checks.get(&company),
        &policy.key,
    ) {
        (None, _) => false,
        (Some(Check::Hold(why)), _) => {
            out.held.push(seq);
            out.hold.get_or_insert_with(|| why.clone());
            true
        }
        (Some(Check::Match(m)), Some(key)) if m.matches(key, company, &ids) => {
            out.erased.push(seq);
            true
        }
        (Some(Check::Match(_)), _) => false,
    };
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows {
        let e = &row.envelope;
        // The earlier of the call's date and its receipt: a date in the future does not
        // keep a record past retention.
        let retained_from = e
            .record
            .call_date
            .map_or(e.received_at, |d| d.min(e.received_at));
        if keep_since.is_some_and(|t| retained_from < t) {
            out.expired += 1;
            continue;
        }
        let ids = Identifiers::of_record(e.call_history_id, &e.record);
        if !verdict(e.record.company_id, ids, row.seq, &mut out) {
            kept.push(row.clone());
        }
    }
    let mut kept_dead = Vec::with_capacity(dead.len());
    for (d, envelope) in dead.iter().zip(&dead_envelopes) {
        match envelope {
            Some(e) => {
                let ids = Identifiers::of_record(e.call_history_id, &e.record);
                if !verdict(e.record.company_id, ids, d.seq, &mut out) {
                    kept_dead.push(d.clone());
                }
            }
            None => kept_dead.push(undecodable(d, &checks)),
        }
    }
    count(tx, "records_dropped_erased", out.erased.len() as u64).await?;
    count(tx, "records_dropped_expired", out.expired).await?;
    out.rows = Cow::Owned(kept);
    out.dead = Cow::Owned(kept_dead);
    Ok(out)
}

/// A dead letter that is no envelope: nothing in it can be checked against hashes. On the
/// subject of a company with erasures it is kept without its payload, never with
/// identifiers an erasure may name.
fn undecodable(d: &DeadLetter, checks: &HashMap<Uuid, Check>) -> DeadLetter {
    match subject_company(&d.subject).filter(|c| checks.contains_key(c)) {
        Some(_) => DeadLetter {
            reason: format!(
                "{} (payload of {} bytes withheld: not an envelope, on the subject of a company with erasures)",
                d.reason,
                d.payload.len()
            ),
            payload: Vec::new(),
            ..d.clone()
        },
        None => d.clone(),
    }
}

/// Adds `n` to a counter of `privacy_counters`.
async fn count(tx: &mut Transaction<'_, Postgres>, name: &str, n: u64) -> Result<(), StoreError> {
    if n > 0 {
        sqlx::query(
            "INSERT INTO privacy_counters (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = privacy_counters.value + EXCLUDED.value",
        )
        .bind(name)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The counters, by name (status page, metrics).
///
/// # Errors
/// When the database is unavailable.
pub async fn counters(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT name, value FROM privacy_counters ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

/// An erasure entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Erasure {
    pub id: i64,
    pub company_id: Uuid,
    #[sqlx(try_from = "String")]
    pub kind: Kind,
    pub hash: Vec<u8>,
    /// The hashes of the identifier's other written forms (a number's domestic forms).
    pub forms: Vec<Vec<u8>>,
    pub key_fingerprint: String,
    /// How the hashes were made ([`crate::privacy::SCHEME`]).
    pub scheme: i16,
    pub completed_at: Option<chrono::DateTime<Utc>>,
    /// Why the last run did not complete it.
    pub incomplete_reason: Option<String>,
}

impl Erasure {
    /// The rule matching what this one entry erases.
    pub fn matcher(&self) -> Matcher {
        Matcher::new(
            self.company_id,
            std::iter::once(self.hash.clone()).chain(self.forms.iter().cloned()),
            self.scheme < SCHEME && self.kind == Kind::Phone,
            self.kind == Kind::Company,
        )
    }
}

/// The columns of [`Erasure`].
const ERASURE_COLUMNS: &str =
    "id, company_id, kind, hash, forms, key_fingerprint, scheme, completed_at, incomplete_reason";

/// Adds the entry for `subject` of `company` (or finds the one an earlier run added),
/// with `forms`, the other written forms of its identifier, ordered after every write in
/// progress ([`ERASE_LOCK`]).
///
/// # Errors
/// When the database is unavailable.
pub async fn add_erasure(
    pool: &PgPool,
    key: &crate::privacy::ErasureKey,
    company: Uuid,
    subject: &Subject,
    forms: &[Subject],
) -> Result<Erasure, StoreError> {
    let hash = subject.hash(key, company);
    let forms: Vec<Vec<u8>> = forms.iter().map(|f| f.hash(key, company)).collect();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ERASE_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO erasures (company_id, kind, hash, forms, key_fingerprint, scheme) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (hash) DO UPDATE SET completed_at = NULL, \
         forms = ARRAY(SELECT DISTINCT unnest(erasures.forms || EXCLUDED.forms))",
    )
    .bind(company)
    .bind(subject.kind().as_str())
    .bind(&hash)
    .bind(&forms)
    .bind(key.fingerprint())
    .bind(SCHEME)
    .execute(&mut *tx)
    .await?;
    let entry = sqlx::query_as(&format!(
        "SELECT {ERASURE_COLUMNS} FROM erasures WHERE hash = $1"
    ))
    .bind(&hash)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(entry)
}

/// How the erasure entries' keys compare with `key`: `None` when this process can check
/// every entry, else why not (for `/readyz`, the log, and the commands that refuse to
/// write what they cannot check).
///
/// # Errors
/// When the database is unavailable.
pub async fn key_state(
    pool: &PgPool,
    key: Option<&crate::privacy::ErasureKey>,
) -> Result<Option<Uncheckable>, StoreError> {
    let fingerprints: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT key_fingerprint FROM erasures")
            .fetch_all(pool)
            .await?;
    Ok(match (key, fingerprints.first()) {
        (_, None) => None,
        (None, Some(_)) => Some(Uncheckable::NoKey),
        (Some(k), _) => fingerprints
            .iter()
            .find(|f| *f != k.fingerprint())
            .map(|f| Uncheckable::OtherKey {
                entries: f.clone(),
                ours: k.fingerprint().to_owned(),
            }),
    })
}

/// Erasures not completed yet (an interrupted `erase`).
///
/// # Errors
/// When the database is unavailable.
pub async fn pending_erasures(pool: &PgPool) -> Result<Vec<Erasure>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ERASURE_COLUMNS} FROM erasures WHERE completed_at IS NULL ORDER BY id"
    ))
    .fetch_all(pool)
    .await?)
}

/// Records an erasure as complete, with what it removed.
///
/// # Errors
/// When the database is unavailable.
pub async fn complete_erasure(
    pool: &PgPool,
    id: i64,
    rows: u64,
    dead_letters: u64,
    messages: u64,
) -> Result<(), StoreError> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE erasures SET completed_at = now(), incomplete_reason = NULL, rows_deleted = rows_deleted + $2, \
         dead_letters_deleted = dead_letters_deleted + $3, messages_deleted = messages_deleted + $4 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(n(rows))
    .bind(n(dead_letters))
    .bind(n(messages))
    .execute(&mut *tx)
    .await?;
    count(&mut tx, "erasures", 1).await?;
    count(&mut tx, "rows_erased", rows).await?;
    count(&mut tx, "dead_letters_erased", dead_letters).await?;
    count(&mut tx, "messages_erased", messages).await?;
    tx.commit().await?;
    Ok(())
}

/// Records why an erasure could not be completed (it stays pending for `--resume`), with
/// what it removed so far.
///
/// # Errors
/// When the database is unavailable.
pub async fn leave_incomplete(
    pool: &PgPool,
    id: i64,
    reason: &str,
    rows: u64,
    dead_letters: u64,
    messages: u64,
) -> Result<(), StoreError> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE erasures SET completed_at = NULL, incomplete_reason = $2, rows_deleted = rows_deleted + $3, \
         dead_letters_deleted = dead_letters_deleted + $4, messages_deleted = messages_deleted + $5 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .bind(n(rows))
    .bind(n(dead_letters))
    .bind(n(messages))
    .execute(pool)
    .await?;
    Ok(())
}

/// A stored call as erasure matches it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallKeys {
    pub id: Uuid,
    pub lead_id: Option<Uuid>,
    pub caller_number: Option<String>,
    pub recipient_number: Option<String>,
    pub external_call_id: Option<String>,
    pub external_system: Option<String>,
    pub call_details: Option<serde_json::Value>,
}

impl CallKeys {
    /// What the call is erased by.
    pub fn identifiers(&self) -> Identifiers<'_> {
        let mut numbers: Vec<&str> = [
            self.caller_number.as_deref(),
            self.recipient_number.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        numbers.extend(crate::privacy::detail_numbers(
            self.call_details
                .as_ref()
                .and_then(serde_json::Value::as_object),
        ));
        Identifiers {
            call: self.id,
            lead: self.lead_id,
            external_call_id: self.external_call_id.as_deref(),
            external_system: self.external_system.as_deref(),
            numbers,
        }
    }
}

/// A page of a company's calls, by id after `after`.
///
/// # Errors
/// When the database is unavailable.
pub async fn company_calls(
    pool: &PgPool,
    company: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<CallKeys>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, lead_id, caller_number, recipient_number, external_call_id, external_system, call_details \
         FROM call_history WHERE company_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3",
    )
    .bind(company)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes calls (their follow-ups with them, `ON DELETE CASCADE`); the number deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn delete_calls(pool: &PgPool, company: Uuid, ids: &[Uuid]) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM call_history WHERE company_id = $1 AND id = ANY($2)")
            .bind(company)
            .bind(ids)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Deletes a lead, or a whole company's leads, employees and the company, once its calls
/// are gone; the number of rows deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn delete_parents(
    pool: &PgPool,
    company: Uuid,
    lead: Option<Uuid>,
    whole_company: bool,
) -> Result<u64, StoreError> {
    let mut n = 0;
    if let Some(lead) = lead {
        n += sqlx::query("DELETE FROM leads WHERE company_id = $1 AND id = $2")
            .bind(company)
            .bind(lead)
            .execute(pool)
            .await?
            .rows_affected();
    }
    if whole_company {
        let mut tx = pool.begin().await?;
        for sql in [
            "DELETE FROM follow_ups WHERE company_id = $1",
            "DELETE FROM leads WHERE company_id = $1",
            "DELETE FROM employees WHERE company_id = $1",
            "DELETE FROM companies WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM call_history WHERE company_id = $1)",
        ] {
            n += sqlx::query(sql).bind(company).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
    }
    Ok(n)
}

/// A page of dead letters, by id after `after`: (id, subject, payload).
///
/// # Errors
/// When the database is unavailable.
pub async fn dead_letter_payloads(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, String, Vec<u8>)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, subject, payload FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Deletes dead letters by id.
///
/// # Errors
/// When the database is unavailable.
pub async fn delete_dead_letters(pool: &PgPool, ids: &[i64]) -> Result<u64, StoreError> {
    Ok(sqlx::query("DELETE FROM dead_letters WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Deletes up to `limit` dead letters recorded before `before` (retention: they hold
/// the payloads); the number deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn expire_dead_letters(
    pool: &PgPool,
    before: chrono::DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    expire(
        pool,
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE failed_at < $1 \
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
        "dead_letters_expired",
        before,
        limit,
    )
    .await
}

/// Deletes up to `limit` calls older than `before` (retention), by the earlier of their
/// call date and their receipt; the number deleted.
///
/// # Errors
/// When the database is unavailable.
pub async fn expire_calls(
    pool: &PgPool,
    before: chrono::DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    expire(
        pool,
        "DELETE FROM call_history WHERE id IN (SELECT id FROM call_history \
         WHERE LEAST(call_date, received_at) < $1 \
         ORDER BY LEAST(call_date, received_at) LIMIT $2 FOR UPDATE SKIP LOCKED)",
        "rows_expired",
        before,
        limit,
    )
    .await
}

/// Runs one retention delete (`$1` the cut-off, `$2` the batch) and counts it under
/// `counter`, in one short transaction.
async fn expire(
    pool: &PgPool,
    sql: &'static str,
    counter: &str,
    before: chrono::DateTime<Utc>,
    limit: i64,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(sql)
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    count(&mut tx, counter, n).await?;
    tx.commit().await?;
    Ok(n)
}
