//! The merge upsert: a batch of rows (and its dead letters) in one transaction, with
//! set-based statements (`INSERT … SELECT FROM UNNEST`), never a statement per row. The
//! merge rules of DESIGN.md live in the upsert's `ON CONFLICT` clause, so live
//! consumption, replay and dead-letter redrive share them:
//! - a newer message (higher stream sequence) wins field by field, but a field it lacks
//!   keeps the stored value;
//! - an older message (arriving late) only fills fields still empty;
//! - a terminal `call_status` is never replaced by a lifecycle one;
//! - a redelivered message (same sequence), or an older one with nothing to add, changes
//!   nothing (not even `stored_at`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use callcap::CallRecord;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tracing::Instrument as _;
use uuid::Uuid;

use super::dead::{insert_dead_letters, DeadLetter};
use super::{Row, StoreError, WriteStats};

/// Writes a batch — rows and dead letters — in one transaction, less the records that
/// are erased or past retention ([`super::privacy::filter`]).
///
/// # Errors
/// [`StoreError::Permanent`] when some row is refused (the caller then isolates it),
/// [`StoreError::Transient`] when the database is unavailable.
pub async fn write_batch(
    pool: &PgPool,
    policy: &crate::privacy::Policy,
    rows: &[Row],
    dead: &[DeadLetter],
) -> Result<WriteStats, StoreError> {
    let mut tx = pool.begin().await?;
    let upsert = callcap::otel_span!(
        "upsert",
        rows = rows.len() as i64,
        dead_letters = dead.len() as i64
    );
    let stats = upsert_all(&mut tx, policy, rows, dead)
        .instrument(upsert)
        .await?;
    tx.commit()
        .instrument(callcap::otel_span!("commit"))
        .await?;
    Ok(stats)
}

/// The statements of [`write_batch`], inside its transaction.
async fn upsert_all(
    tx: &mut Transaction<'static, Postgres>,
    policy: &crate::privacy::Policy,
    rows: &[Row],
    dead: &[DeadLetter],
) -> Result<WriteStats, StoreError> {
    let mut stats = WriteStats::default();
    // Erased and expired records go no further: not stored, not dead-lettered.
    let filtered = super::privacy::filter(tx, policy, rows, dead).await?;
    stats.erased = filtered.erased;
    stats.expired = filtered.expired;
    stats.held = filtered.held;
    stats.hold = filtered.hold;
    let (rows, foreign) = split_foreign(tx, &filtered.rows).await?;
    if !rows.is_empty() {
        upsert_parents(tx, &rows).await?;
        for round in rounds(&rows) {
            stats.rows_changed += upsert_calls(tx, &round).await?;
        }
    }
    stats.dead_letters = insert_dead_letters(tx, &filtered.dead).await?;
    stats.dead_letters += insert_dead_letters(tx, &foreign).await?;
    Ok(stats)
}

/// Separates the rows whose `call_history_id` already belongs to another company — in the
/// table, or to an earlier message of this batch — from the rest, as dead letters.
///
/// Ids are derived from the company (see `callcap::identity`), so a genuine record never
/// meets another company's id; one that does was forged or corrupted, and writing it would
/// overwrite another company's call. The upsert also refuses such an update (`WHERE
/// t.company_id = EXCLUDED.company_id`) for the race where two workers insert one id at once.
async fn split_foreign<'a>(
    tx: &mut Transaction<'_, Postgres>,
    rows: &'a [Row],
) -> Result<(Cow<'a, [Row]>, Vec<DeadLetter>), StoreError> {
    if rows.is_empty() {
        return Ok((Cow::Borrowed(rows), Vec::new()));
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.envelope.call_history_id).collect();
    let mut owner: HashMap<Uuid, Uuid> =
        sqlx::query_as("SELECT id, company_id FROM call_history WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    let mut ordered: Vec<&Row> = rows.iter().collect();
    ordered.sort_by_key(|r| r.seq);
    let mut refused = std::collections::HashSet::new();
    let mut foreign = Vec::new();
    for row in ordered {
        let company = row.envelope.record.company_id;
        let id = row.envelope.call_history_id;
        if *owner.entry(id).or_insert(company) != company {
            refused.insert(row.seq);
            foreign.push(DeadLetter {
                seq: row.seq,
                subject: row.subject.clone(),
                reason: format!(
                    "call_history_id {id} belongs to another company; a record may not overwrite another company's call"
                ),
                payload: row.envelope.encode(),
            });
        }
    }
    if foreign.is_empty() {
        return Ok((Cow::Borrowed(rows), foreign));
    }
    let kept = rows
        .iter()
        .filter(|r| !refused.contains(&r.seq))
        .cloned()
        .collect();
    Ok((Cow::Owned(kept), foreign))
}

/// Splits a batch so that no round holds the same id twice (one `INSERT … ON CONFLICT`
/// cannot touch a row twice). Round k holds each id's k-th message in sequence order, so
/// applying rounds in order is applying messages in stream order. Each round is sorted by
/// id: concurrent workers then lock rows in the same order and cannot deadlock.
fn rounds(rows: &[Row]) -> Vec<Vec<&Row>> {
    let mut by_id: HashMap<Uuid, Vec<&Row>> = HashMap::new();
    for r in rows {
        by_id.entry(r.envelope.call_history_id).or_default().push(r);
    }
    let mut rounds: Vec<Vec<&Row>> = Vec::new();
    for (_, mut versions) in by_id {
        versions.sort_by_key(|r| r.seq);
        for (k, r) in versions.into_iter().enumerate() {
            if rounds.len() <= k {
                rounds.push(Vec::new());
            }
            rounds[k].push(r);
        }
    }
    for round in &mut rounds {
        round.sort_by_key(|r| r.envelope.call_history_id);
    }
    rounds
}

/// Makes sure every company, lead and employee a call points at exists.
async fn upsert_parents(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[Row],
) -> Result<(), StoreError> {
    let mut companies: Vec<Uuid> = rows.iter().map(|r| r.envelope.record.company_id).collect();
    companies.sort_unstable();
    companies.dedup();
    sqlx::query(
        "INSERT INTO companies (id) SELECT * FROM UNNEST($1::uuid[]) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&companies)
    .execute(&mut **tx)
    .await?;
    for (table, pick) in [
        (
            "leads",
            (|r: &CallRecord| r.lead_id) as fn(&CallRecord) -> Option<Uuid>,
        ),
        ("employees", |r: &CallRecord| r.employee_id),
    ] {
        let pairs: BTreeMap<Uuid, Uuid> = rows
            .iter()
            .filter_map(|r| pick(&r.envelope.record).map(|id| (id, r.envelope.record.company_id)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let (ids, owners): (Vec<Uuid>, Vec<Uuid>) = pairs.into_iter().unzip();
        let sql = format!(
            "INSERT INTO {table} (id, company_id) SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) ON CONFLICT (id) DO NOTHING"
        );
        sqlx::query(&sql)
            .bind(&ids)
            .bind(&owners)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Columns merged by the plain rule: newer wins when present, older fills gaps.
const MERGED_COLUMNS: [&str; 17] = [
    "lead_id",
    "employee_id",
    "outcome",
    "notes",
    "caller_number",
    "recipient_number",
    "duration_seconds",
    "recording_url",
    "start_time",
    "end_time",
    "next_follow_up",
    "next_follow_up_time",
    "auto_call_followup",
    "call_details",
    "key_id",
    "external_call_id",
    "external_system",
];

const TERMINAL: &str = "('completed', 'busy', 'no-answer', 'failed', 'canceled')";

fn upsert_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let newer = "EXCLUDED.stream_seq > t.stream_seq";
        let mut set: Vec<String> = MERGED_COLUMNS
            .iter()
            .map(|c| {
                format!(
                    "{c} = CASE WHEN {newer} THEN COALESCE(EXCLUDED.{c}, t.{c}) ELSE COALESCE(t.{c}, EXCLUDED.{c}) END"
                )
            })
            .collect();
        set.push(format!(
            "call_status = CASE \
               WHEN EXCLUDED.call_status IS NULL THEN t.call_status \
               WHEN t.call_status IS NULL THEN EXCLUDED.call_status \
               WHEN t.call_status IN {TERMINAL} AND EXCLUDED.call_status NOT IN {TERMINAL} THEN t.call_status \
               WHEN EXCLUDED.call_status IN {TERMINAL} AND t.call_status NOT IN {TERMINAL} THEN EXCLUDED.call_status \
               WHEN {newer} THEN EXCLUDED.call_status ELSE t.call_status END"
        ));
        set.push(format!(
            "call_date = CASE \
               WHEN EXCLUDED.call_date_given AND (NOT t.call_date_given OR {newer}) THEN EXCLUDED.call_date \
               WHEN NOT EXCLUDED.call_date_given AND NOT t.call_date_given THEN LEAST(t.call_date, EXCLUDED.call_date) \
               ELSE t.call_date END"
        ));
        set.push("call_date_given = t.call_date_given OR EXCLUDED.call_date_given".into());
        set.push("received_at = LEAST(t.received_at, EXCLUDED.received_at)".into());
        set.push("stream_seq = GREATEST(t.stream_seq, EXCLUDED.stream_seq)".into());
        set.push("stored_at = now()".into());
        // A newer message always applies; an older one only when it has something to add,
        // so replaying history over current rows rewrites nothing.
        let mut fills: Vec<String> = MERGED_COLUMNS
            .iter()
            .map(|c| format!("(t.{c} IS NULL AND EXCLUDED.{c} IS NOT NULL)"))
            .collect();
        fills.push("(t.call_status IS NULL AND EXCLUDED.call_status IS NOT NULL)".into());
        fills.push(format!(
            "(EXCLUDED.call_status IN {TERMINAL} AND t.call_status NOT IN {TERMINAL})"
        ));
        fills.push("(EXCLUDED.call_date_given AND NOT t.call_date_given)".into());
        fills.push(
            "(NOT EXCLUDED.call_date_given AND NOT t.call_date_given AND EXCLUDED.call_date < t.call_date)".into(),
        );
        fills.push("EXCLUDED.received_at < t.received_at".into());
        let applies = format!(
            "t.company_id = EXCLUDED.company_id AND ({newer} OR (EXCLUDED.stream_seq < t.stream_seq AND ({})))",
            fills.join(" OR ")
        );
        let upsert = format!(
            "INSERT INTO call_history AS t (id, company_id, lead_id, employee_id, outcome, notes, call_date, \
               call_date_given, caller_number, recipient_number, duration_seconds, recording_url, call_status, \
               start_time, end_time, external_call_id, external_system, next_follow_up, next_follow_up_time, \
               auto_call_followup, call_details, received_at, stream_seq, key_id) \
             SELECT id, company_id, lead_id, employee_id, outcome, notes, COALESCE(call_date, received_at), \
               call_date IS NOT NULL, caller_number, recipient_number, duration_seconds, recording_url, call_status, \
               start_time, end_time, external_call_id, external_system, next_follow_up, next_follow_up_time, \
               auto_call_followup, call_details, received_at, stream_seq, key_id \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::timestamptz[], \
               $8::text[], $9::text[], $10::int4[], $11::text[], $12::text[], $13::timestamptz[], $14::timestamptz[], \
               $15::text[], $16::text[], $17::date[], $18::time[], $19::bool[], $20::jsonb[], $21::timestamptz[], \
               $22::int8[], $23::text[]) \
             AS u(id, company_id, lead_id, employee_id, outcome, notes, call_date, caller_number, recipient_number, \
               duration_seconds, recording_url, call_status, start_time, end_time, external_call_id, external_system, \
               next_follow_up, next_follow_up_time, auto_call_followup, call_details, received_at, stream_seq, key_id) \
             ON CONFLICT (id) DO UPDATE SET {} \
             WHERE {applies} \
             RETURNING t.id, t.company_id, t.lead_id, t.employee_id, t.next_follow_up, t.next_follow_up_time, \
               t.auto_call_followup",
            set.join(", ")
        );
        // `follow_ups` follows the rows this statement changed, in the same statement: a
        // row the merge left alone keeps its follow-up as it was. Sorted by id like the
        // upsert, so concurrent writers lock follow-ups in the same order.
        format!(
            "WITH changed AS ({upsert}), \
             gone AS (DELETE FROM follow_ups f USING changed c \
               WHERE f.call_id = c.id AND c.auto_call_followup IS NOT TRUE), \
             due AS (INSERT INTO follow_ups (call_id, company_id, lead_id, employee_id, due_date, due_time) \
               SELECT id, company_id, lead_id, employee_id, next_follow_up, next_follow_up_time \
               FROM changed WHERE auto_call_followup ORDER BY id \
               ON CONFLICT (call_id) DO UPDATE SET lead_id = EXCLUDED.lead_id, employee_id = EXCLUDED.employee_id, \
                 due_date = EXCLUDED.due_date, due_time = EXCLUDED.due_time, updated_at = now() \
               WHERE (follow_ups.lead_id, follow_ups.employee_id, follow_ups.due_date, follow_ups.due_time) \
                 IS DISTINCT FROM (EXCLUDED.lead_id, EXCLUDED.employee_id, EXCLUDED.due_date, EXCLUDED.due_time)) \
             SELECT count(*) FROM changed"
        )
    })
}

/// Column arrays for one round.
#[derive(Default)]
struct Columns {
    id: Vec<Uuid>,
    company_id: Vec<Uuid>,
    lead_id: Vec<Option<Uuid>>,
    employee_id: Vec<Option<Uuid>>,
    outcome: Vec<Option<&'static str>>,
    notes: Vec<Option<String>>,
    call_date: Vec<Option<DateTime<Utc>>>,
    caller_number: Vec<Option<String>>,
    recipient_number: Vec<Option<String>>,
    duration_seconds: Vec<Option<i32>>,
    recording_url: Vec<Option<String>>,
    call_status: Vec<Option<&'static str>>,
    start_time: Vec<Option<DateTime<Utc>>>,
    end_time: Vec<Option<DateTime<Utc>>>,
    external_call_id: Vec<Option<String>>,
    external_system: Vec<Option<String>>,
    next_follow_up: Vec<Option<NaiveDate>>,
    next_follow_up_time: Vec<Option<NaiveTime>>,
    auto_call_followup: Vec<Option<bool>>,
    call_details: Vec<Option<serde_json::Value>>,
    received_at: Vec<DateTime<Utc>>,
    stream_seq: Vec<i64>,
    key_id: Vec<Option<String>>,
}

impl Columns {
    fn push(&mut self, row: &Row) {
        let e = &row.envelope;
        let r = &e.record;
        self.id.push(e.call_history_id);
        self.company_id.push(r.company_id);
        self.lead_id.push(r.lead_id);
        self.employee_id.push(r.employee_id);
        self.outcome.push(r.outcome.map(|o| o.as_str()));
        self.notes.push(r.notes.clone());
        self.call_date.push(r.call_date);
        self.caller_number.push(r.caller_number.clone());
        self.recipient_number.push(r.recipient_number.clone());
        self.duration_seconds.push(r.duration_seconds);
        self.recording_url.push(r.recording_url.clone());
        self.call_status.push(r.call_status.map(|s| s.as_str()));
        self.start_time.push(r.start_time);
        self.end_time.push(r.end_time);
        self.external_call_id.push(r.external_call_id.clone());
        self.external_system.push(r.external_system.clone());
        self.next_follow_up.push(r.next_follow_up);
        self.next_follow_up_time.push(r.next_follow_up_time);
        self.auto_call_followup.push(r.auto_call_followup);
        self.call_details
            .push(r.call_details.clone().map(serde_json::Value::Object));
        self.received_at.push(e.received_at);
        // Stream sequences fit i64 for 292 years of a million messages a second.
        self.stream_seq
            .push(i64::try_from(row.seq).unwrap_or(i64::MAX));
        self.key_id.push(Some(e.key_id.clone()));
    }
}

async fn upsert_calls(
    tx: &mut Transaction<'_, Postgres>,
    round: &[&Row],
) -> Result<u64, StoreError> {
    let mut c = Columns::default();
    for row in round {
        c.push(row);
    }
    let changed: i64 = sqlx::query_scalar(upsert_sql())
        .bind(&c.id)
        .bind(&c.company_id)
        .bind(&c.lead_id)
        .bind(&c.employee_id)
        .bind(&c.outcome)
        .bind(&c.notes)
        .bind(&c.call_date)
        .bind(&c.caller_number)
        .bind(&c.recipient_number)
        .bind(&c.duration_seconds)
        .bind(&c.recording_url)
        .bind(&c.call_status)
        .bind(&c.start_time)
        .bind(&c.end_time)
        .bind(&c.external_call_id)
        .bind(&c.external_system)
        .bind(&c.next_follow_up)
        .bind(&c.next_follow_up_time)
        .bind(&c.auto_call_followup)
        .bind(&c.call_details)
        .bind(&c.received_at)
        .bind(&c.stream_seq)
        .bind(&c.key_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(u64::try_from(changed).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use callcap::Envelope;

    fn row(id: u128, seq: u64) -> Row {
        Row {
            seq,
            subject: callcap::subjects::ingest_subject(Uuid::from_u128(99)),
            trace: None,
            envelope: Envelope::new(
                Uuid::from_u128(id),
                Utc::now(),
                "k1".into(),
                None,
                CallRecord::new(Uuid::from_u128(99)),
            ),
        }
    }

    #[test]
    fn rounds_apply_each_calls_messages_in_stream_order_and_never_touch_a_row_twice() {
        let rows = vec![
            row(2, 10),
            row(1, 12),
            row(2, 5),
            row(3, 7),
            row(2, 20),
            row(1, 3),
        ];
        let rounds = rounds(&rows);
        let seen: Vec<Vec<(u128, u64)>> = rounds
            .iter()
            .map(|r| {
                r.iter()
                    .map(|row| (row.envelope.call_history_id.as_u128(), row.seq))
                    .collect()
            })
            .collect();
        // Round k holds each id's k-th message by sequence, sorted by id (lock order).
        assert_eq!(
            seen,
            vec![
                vec![(1, 3), (2, 5), (3, 7)],
                vec![(1, 12), (2, 10)],
                vec![(2, 20)],
            ]
        );
    }
}
