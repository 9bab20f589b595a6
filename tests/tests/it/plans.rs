//! Plans that cannot go stale: a deployment's first records arrive while `call_history`
//! is almost empty, then real traffic grows it. Whatever the worker's statements were
//! planned for on the first day, its writes on a grown table must go through the indexes,
//! never a sequential scan per batch (one scan per batch over a large table is what made
//! a fresh deployment drain at a tenth of its speed).
//!
//! Autovacuum is switched off on the test's tables, so no `ANALYZE` comes by to heal a
//! stale plan while the test runs, and the database forces generic plans, so each
//! statement keeps the plan made on the empty table: what is measured is whether the
//! worker's statements can go stale at all. Sequential scans are read from
//! `pg_stat_user_tables`, for every table a write touches.

use std::time::Duration;

use callcap::{CallRecord, CallStatus, Envelope};
use callcap_tests::db::TestDb;
use callcap_tests::eventually;
use chrono::{NaiveDate, Utc};
use persist_worker::store::{self, DeadLetter, Row};
use sqlx::PgPool;
use uuid::Uuid;

/// Every table a worker's write touches.
const TABLES: [&str; 6] = [
    "call_history",
    "follow_ups",
    "dead_letters",
    "companies",
    "leads",
    "employees",
];

/// Rows the table holds before the burst.
const GROWN_TO: i64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    seq_scan: i64,
    n_tup_ins: i64,
    n_tup_upd: i64,
}

async fn counters(pool: &PgPool, table: &str) -> Counters {
    // A fresh snapshot each time: statistics are read once per transaction otherwise.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let (seq_scan, n_tup_ins, n_tup_upd): (i64, i64, i64) = sqlx::query_as(
        "SELECT seq_scan, n_tup_ins, n_tup_upd FROM pg_stat_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    Counters {
        seq_scan,
        n_tup_ins,
        n_tup_upd,
    }
}

fn row(seq: u64, id: Uuid, company: Uuid, follow_up: bool) -> Row {
    let mut r = CallRecord::new(company);
    r.lead_id = Some(Uuid::new_v4());
    r.employee_id = Some(Uuid::new_v4());
    r.call_status = Some(CallStatus::Completed);
    r.notes = Some(format!("message {seq}"));
    if follow_up {
        r.auto_call_followup = Some(true);
        r.next_follow_up = NaiveDate::from_ymd_opt(2026, 12, 24);
    } else {
        r.auto_call_followup = Some(false);
    }
    Row {
        seq,
        subject: callcap::subjects::ingest_subject(company),
        trace: None,
        envelope: Envelope::new(id, Utc::now(), "k1".into(), None, r),
    }
}

fn dead(seq: u64) -> DeadLetter {
    DeadLetter {
        seq,
        subject: "calls.ingest.test".into(),
        reason: "test".into(),
        payload: b"{}".to_vec(),
    }
}

#[tokio::test]
async fn a_worker_whose_statements_were_planned_on_an_empty_table_writes_a_grown_one_through_its_indexes(
) {
    let db = TestDb::create().await;
    for t in TABLES {
        sqlx::query(&format!("ALTER TABLE {t} SET (autovacuum_enabled = false)"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    // The worst case: every prepared statement keeps the plan made at its first
    // execution (Postgres' default switches to that generic plan after five).
    sqlx::query(&format!(
        "ALTER DATABASE \"{}\" SET plan_cache_mode = force_generic_plan",
        db.name
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // The worker's own pool, one connection: every statement it prepares lives in one
    // session, as on a worker that has been up since the first day.
    let worker = store::pool(&db.url, 1).unwrap();
    let company = Uuid::new_v4();
    let other = Uuid::new_v4();

    // Day one: a trickle, one record a batch, on an empty table (more executions than
    // the five after which Postgres may switch a prepared statement to a generic plan).
    let mut seq = 0;
    let mut first = Vec::new();
    for i in 0..12 {
        seq += 1;
        let id = Uuid::new_v4();
        first.push(id);
        let mut rows = vec![row(seq, id, company, i % 2 == 0)];
        if i == 5 {
            // Another company's record carrying this company's id: refused by the
            // foreign-id check into a dead letter.
            seq += 1;
            rows.push(row(seq, first[0], other, false));
        }
        seq += 1;
        store::write_batch(&worker, &Default::default(), &rows, &[dead(seq)])
            .await
            .unwrap();
    }
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        dead_letters, 13,
        "12 recorded with the batches, 1 foreign id"
    );

    // Then real traffic: the table grows to 100k rows (and as many follow-ups), on
    // another connection, with no ANALYZE.
    sqlx::query(
        "INSERT INTO call_history (id, company_id, call_date, call_date_given, received_at, \
           stream_seq, auto_call_followup, next_follow_up) \
         SELECT gen_random_uuid(), $1, now(), true, now(), 1000000 + g, true, DATE '2026-12-24' \
         FROM generate_series(1, $2) g",
    )
    .bind(company)
    .bind(GROWN_TO)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO follow_ups (call_id, company_id, due_date) \
         SELECT id, company_id, next_follow_up FROM call_history WHERE stream_seq > 1000000",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let existing: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM call_history WHERE stream_seq > 1000000 ORDER BY stream_seq LIMIT 250",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();

    // Every session's statistics so far are flushed before the baseline is taken
    // (a backend flushes when idle, within ~10 s).
    eventually(
        Duration::from_secs(30),
        "the trickle's and the load's statistics",
        || async {
            let c = counters(&db.pool, "call_history").await;
            (c.n_tup_ins >= GROWN_TO + 12).then_some(())
        },
    )
    .await;
    let mut baseline = Vec::new();
    for t in TABLES {
        baseline.push(counters(&db.pool, t).await);
    }

    // The burst: 250 updates of grown rows (half of them dropping their follow-up) and
    // 250 new calls, with a foreign id and a dead letter, through the same session.
    let mut rows = Vec::new();
    for (i, id) in existing.iter().enumerate() {
        seq += 1;
        rows.push(row(seq, *id, company, i % 2 == 0));
    }
    for i in 0..250 {
        seq += 1;
        rows.push(row(seq, Uuid::new_v4(), company, i % 2 == 0));
    }
    seq += 1;
    rows.push(row(seq, existing[0], other, false));
    let stats = store::write_batch(&worker, &Default::default(), &rows, &[dead(seq + 1)])
        .await
        .unwrap();
    assert_eq!(stats.rows_changed, 500);
    assert_eq!(stats.dead_letters, 2);

    // Wait until the worker's session has flushed this write's statistics, then compare.
    let ch = baseline[0];
    eventually(
        Duration::from_secs(30),
        "the burst's statistics",
        || async {
            let c = counters(&db.pool, "call_history").await;
            (c.n_tup_ins >= ch.n_tup_ins + 250 && c.n_tup_upd >= ch.n_tup_upd + 250).then_some(())
        },
    )
    .await;
    let mut scanned = Vec::new();
    for (t, b) in TABLES.iter().zip(&baseline) {
        let now = counters(&db.pool, t).await;
        if now.seq_scan != b.seq_scan {
            scanned.push(format!(
                "{t}: {} sequential scans",
                now.seq_scan - b.seq_scan
            ));
        }
    }
    assert!(
        scanned.is_empty(),
        "the worker's write on a grown table scanned whole tables: {scanned:?}"
    );
}
