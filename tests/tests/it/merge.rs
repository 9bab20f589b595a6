//! The merge rules of DESIGN.md, each on its own, against real Postgres through the same
//! write path the worker, replay and redrive use.

use callcap::{CallRecord, CallStatus, Envelope};
use callcap_tests::db::TestDb;
use chrono::{DateTime, TimeZone, Utc};
use persist_worker::store::{write_batch, Row};
use uuid::Uuid;

fn t(h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 11, 25, h, 0, 0).unwrap()
}

fn record(company: Uuid) -> CallRecord {
    let mut r = CallRecord::new(company);
    r.external_call_id = Some("CALL-1".into());
    r.external_system = Some("Dialer".into());
    r
}

fn row(seq: u64, record: CallRecord) -> Row {
    let id = callcap::identity::call_history_id(&record, None).id;
    Row {
        seq,
        subject: callcap::subjects::ingest_subject(record.company_id),
        trace: None,
        envelope: Envelope::new(
            id,
            t(12) + chrono::Duration::seconds(seq as i64),
            "k1".into(),
            None,
            record,
        ),
    }
}

async fn stored(db: &TestDb, id: Uuid) -> sqlx::postgres::PgRow {
    sqlx::query("SELECT * FROM call_history WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("the call is stored")
}

fn col<T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &sqlx::postgres::PgRow,
    name: &str,
) -> T {
    sqlx::Row::get(row, name)
}

#[tokio::test]
async fn a_later_message_wins_and_an_absent_field_keeps_its_value() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let mut v1 = record(c);
    v1.notes = Some("first".into());
    v1.caller_number = Some("+1555".into());
    let mut v2 = record(c);
    v2.notes = Some("second".into());
    let id = row(1, v1.clone()).envelope.call_history_id;
    write_batch(&db.pool, &Default::default(), &[row(1, v1)], &[])
        .await
        .unwrap();
    write_batch(&db.pool, &Default::default(), &[row(2, v2)], &[])
        .await
        .unwrap();
    let r = stored(&db, id).await;
    assert_eq!(col::<String>(&r, "notes"), "second");
    assert_eq!(
        col::<String>(&r, "caller_number"),
        "+1555",
        "absent field must not erase"
    );
    assert_eq!(col::<i64>(&r, "stream_seq"), 2);
    assert_eq!(db.count_calls().await, 1);
}

#[tokio::test]
async fn an_older_message_never_overwrites_a_newer_one_but_fills_gaps() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let mut old = record(c);
    old.notes = Some("old".into());
    old.recording_url = Some("https://x.example/1.mp3".into());
    let mut new = record(c);
    new.notes = Some("new".into());
    let id = row(5, new.clone()).envelope.call_history_id;
    write_batch(&db.pool, &Default::default(), &[row(5, new)], &[])
        .await
        .unwrap();
    write_batch(&db.pool, &Default::default(), &[row(3, old)], &[])
        .await
        .unwrap();
    let r = stored(&db, id).await;
    assert_eq!(col::<String>(&r, "notes"), "new");
    assert_eq!(
        col::<String>(&r, "recording_url"),
        "https://x.example/1.mp3"
    );
    assert_eq!(col::<i64>(&r, "stream_seq"), 5);
}

#[tokio::test]
async fn a_terminal_status_is_never_replaced_by_a_lifecycle_one() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let with = |s: CallStatus| {
        let mut r = record(c);
        r.call_status = Some(s);
        r
    };
    let id = row(1, with(CallStatus::Ringing)).envelope.call_history_id;
    // In order: ringing, completed, then a late in-progress.
    write_batch(
        &db.pool,
        &Default::default(),
        &[row(1, with(CallStatus::Ringing))],
        &[],
    )
    .await
    .unwrap();
    write_batch(
        &db.pool,
        &Default::default(),
        &[row(2, with(CallStatus::Completed))],
        &[],
    )
    .await
    .unwrap();
    write_batch(
        &db.pool,
        &Default::default(),
        &[row(3, with(CallStatus::InProgress))],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        col::<String>(&stored(&db, id).await, "call_status"),
        "completed"
    );
    // A newer terminal status does replace a terminal one (a correction).
    write_batch(
        &db.pool,
        &Default::default(),
        &[row(4, with(CallStatus::Failed))],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        col::<String>(&stored(&db, id).await, "call_status"),
        "failed"
    );

    // Out of order: the terminal status arrives first, the lifecycle one late.
    let c2 = Uuid::new_v4();
    let mut done = CallRecord::new(c2);
    done.external_call_id = Some("X".into());
    done.call_status = Some(CallStatus::Busy);
    let mut ringing = done.clone();
    ringing.call_status = Some(CallStatus::Ringing);
    let id2 = row(10, done.clone()).envelope.call_history_id;
    write_batch(&db.pool, &Default::default(), &[row(10, done)], &[])
        .await
        .unwrap();
    write_batch(&db.pool, &Default::default(), &[row(9, ringing)], &[])
        .await
        .unwrap();
    assert_eq!(
        col::<String>(&stored(&db, id2).await, "call_status"),
        "busy"
    );
}

#[tokio::test]
async fn a_redelivered_message_changes_nothing() {
    let db = TestDb::create().await;
    let mut r = record(Uuid::new_v4());
    r.notes = Some("n".into());
    let first = write_batch(&db.pool, &Default::default(), &[row(7, r.clone())], &[])
        .await
        .unwrap();
    assert_eq!(first.rows_changed, 1);
    let again = write_batch(&db.pool, &Default::default(), &[row(7, r)], &[])
        .await
        .unwrap();
    assert_eq!(again.rows_changed, 0);
}

#[tokio::test]
async fn calls_without_an_external_id_are_never_merged() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let anon = CallRecord::new(c);
    let a = callcap::identity::call_history_id(&anon, None).id;
    let b = callcap::identity::call_history_id(&anon, None).id;
    let rows = [
        Row {
            seq: 1,
            subject: callcap::subjects::ingest_subject(c),
            trace: None,
            envelope: Envelope::new(a, t(1), "k".into(), None, anon.clone()),
        },
        Row {
            seq: 2,
            subject: callcap::subjects::ingest_subject(c),
            trace: None,
            envelope: Envelope::new(b, t(1), "k".into(), None, anon),
        },
    ];
    write_batch(&db.pool, &Default::default(), &rows, &[])
        .await
        .unwrap();
    assert_eq!(db.count_calls().await, 2);
}

#[tokio::test]
async fn call_date_defaults_to_receipt_and_only_a_sent_one_replaces_it() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let first = row(1, record(c));
    let id = first.envelope.call_history_id;
    let received = first.envelope.received_at;
    write_batch(&db.pool, &Default::default(), &[first], &[])
        .await
        .unwrap();
    assert_eq!(
        col::<DateTime<Utc>>(&stored(&db, id).await, "call_date"),
        received
    );
    // A resend without call_date keeps the first receipt time.
    write_batch(&db.pool, &Default::default(), &[row(2, record(c))], &[])
        .await
        .unwrap();
    assert_eq!(
        col::<DateTime<Utc>>(&stored(&db, id).await, "call_date"),
        received
    );
    // One that carries call_date sets it; later ones without it keep it.
    let mut dated = record(c);
    dated.call_date = Some(t(9));
    write_batch(&db.pool, &Default::default(), &[row(3, dated)], &[])
        .await
        .unwrap();
    write_batch(&db.pool, &Default::default(), &[row(4, record(c))], &[])
        .await
        .unwrap();
    assert_eq!(
        col::<DateTime<Utc>>(&stored(&db, id).await, "call_date"),
        t(9)
    );
}

#[tokio::test]
async fn several_versions_in_one_batch_apply_in_stream_order() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let mut v1 = record(c);
    v1.notes = Some("v1".into());
    v1.duration_seconds = Some(10);
    let mut v2 = record(c);
    v2.notes = Some("v2".into());
    let mut v3 = record(c);
    v3.call_status = Some(CallStatus::Completed);
    let id = row(1, v1.clone()).envelope.call_history_id;
    // Handed over out of order on purpose.
    write_batch(
        &db.pool,
        &Default::default(),
        &[row(3, v3), row(1, v1), row(2, v2)],
        &[],
    )
    .await
    .unwrap();
    let r = stored(&db, id).await;
    assert_eq!(col::<String>(&r, "notes"), "v2");
    assert_eq!(col::<i32>(&r, "duration_seconds"), 10);
    assert_eq!(col::<String>(&r, "call_status"), "completed");
    assert_eq!(col::<i64>(&r, "stream_seq"), 3);
}

#[tokio::test]
async fn follow_ups_track_auto_call_followup_and_parents_are_created() {
    let db = TestDb::create().await;
    let c = Uuid::new_v4();
    let mut r = record(c);
    r.lead_id = Some(Uuid::new_v4());
    r.employee_id = Some(Uuid::new_v4());
    r.auto_call_followup = Some(true);
    r.next_follow_up = chrono::NaiveDate::from_ymd_opt(2025, 11, 27);
    let id = row(1, r.clone()).envelope.call_history_id;
    write_batch(&db.pool, &Default::default(), &[row(1, r.clone())], &[])
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM follow_ups WHERE call_id = $1 AND due_date = '2025-11-27'",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
    for table in ["companies", "leads", "employees"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "{table}");
    }
    r.auto_call_followup = Some(false);
    write_batch(&db.pool, &Default::default(), &[row(2, r)], &[])
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM follow_ups")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_dead_letter_whose_reason_quotes_a_nul_is_still_recorded() {
    let db = TestDb::create().await;
    let dead = persist_worker::store::DeadLetter {
        seq: 42,
        subject: "calls.ingest.x".into(),
        reason: "invalid value \"a\u{0}b\"".into(),
        payload: b"a\x00b".to_vec(),
    };
    let n = persist_worker::store::record_dead_letters(&db.pool, &[dead])
        .await
        .unwrap();
    assert_eq!(n, 1);
    let rows = persist_worker::store::dead_letters(&db.pool, false, 10)
        .await
        .unwrap();
    assert_eq!(
        rows[0].payload, b"a\x00b",
        "the raw payload is kept byte for byte"
    );
    assert!(rows[0].reason.contains("a\u{fffd}b"));
}
