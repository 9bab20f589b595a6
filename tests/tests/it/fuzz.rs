//! Fuzzing the record parser and validator (proptest; cargo-fuzz needs a nightly
//! toolchain this project does not use). Inputs: every file of `tests/fuzz-corpus/`
//! (the hostile probe's findings and other edge cases, kept as regressions) and
//! generated bodies mixing valid values with hostile ones for every field.
//!
//! Asserted for each input: parsing and validating never panics; an accepted record
//! passes the worker's own check of the envelope the gateway would publish; and once
//! stored by the worker's write path, the row reads back exactly as validated.

use std::cell::RefCell;

use callcap::identity::call_history_id;
use callcap::subjects::ingest_subject;
use callcap::{CallRecord, Envelope};
use callcap_tests::db::TestDb;
use persist_worker::store::{self, Row};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// The columns compared with the validated record (the last: `call_details` equal as jsonb).
type StoredFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::NaiveDate>,
    Option<chrono::NaiveTime>,
    Option<String>,
    Option<String>,
    bool,
);

const COMPANY: &str = "123e4567-e89b-12d3-a456-426614174000";

/// Strings that have broken parsers: controls, separators, NUL, CR LF, odd Unicode,
/// empty, long.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,40}",
        Just(String::new()),
        Just("a\u{1f}b".to_owned()),
        Just("line\r\nInjected: 1".to_owned()),
        Just("nul\u{0}".to_owned()),
        Just("\u{85}\u{2028}\u{feff}".to_owned()),
        Just("😀".repeat(30)),
        "x{200,300}",
    ]
}

fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            0u32..=9999,
            1u32..=12,
            1u32..=28,
            0u32..24,
            0u32..60,
            0u32..60,
            0u32..1_000_000_000,
            -14i32..=14
        )
            .prop_map(|(y, mo, d, h, mi, s, ns, off)| {
                let sign = if off < 0 { '-' } else { '+' };
                format!(
                    "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ns:09}{sign}{:02}:00",
                    off.abs()
                )
            }),
        // The edges of the year range with the widest offsets: instants past 9999 or
        // before 0000 in UTC (the second probe's 201s that were never stored).
        (
            prop_oneof![Just(0u32), Just(9999)],
            prop_oneof![Just("01-01"), Just("12-31")],
            prop_oneof![
                Just("00:00:00"),
                Just("23:59:59"),
                Just("23:59:60"),
                Just("23:59:59.999999")
            ],
            prop_oneof![
                Just("Z"),
                Just("-23:59"),
                Just("+23:59"),
                Just("-05:00"),
                Just("+00:01")
            ],
        )
            .prop_map(|(y, md, hms, off)| format!("{y:04}-{md}T{hms}{off}")),
        Just("2025-11-25T10:30:00Z".to_owned()),
        hostile_string(),
    ]
}

/// JSON values nested up to a few levels, with edge numbers and strings.
fn details_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        hostile_string().prop_map(Value::from),
        Just(Value::Null),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![4 => "[a-z_]{1,8}".boxed(), 1 => hostile_string().boxed()],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly a valid value, sometimes a hostile one: enough accepted records reach the
/// store, and every rule still meets hostile input.
fn mostly<S: Strategy<Value = Value> + 'static>(valid: S) -> BoxedStrategy<Value> {
    prop_oneof![6 => valid, 1 => hostile_string().prop_map(Value::from)].boxed()
}

/// A request body: each field absent, valid, or hostile.
fn body() -> impl Strategy<Value = Value> {
    let field = |s: BoxedStrategy<Value>| proptest::option::weighted(0.5, s);
    let first = (
        field(mostly(
            any::<u128>().prop_map(|n| Value::from(Uuid::from_u128(n).to_string())),
        )),
        field(mostly(prop_oneof![
            Just(json!("interested")),
            Just(json!("callback")),
            Just(json!("no-answer"))
        ])),
        field(mostly(
            any::<String>()
                .prop_filter("no NUL", |s| !s.contains('\0'))
                .prop_map(Value::from),
        )),
        field(mostly(timestamp().prop_map(Value::from))),
        field(mostly(timestamp().prop_map(Value::from))),
        field(mostly(
            prop_oneof![4 => (0i64..1_000_000).prop_map(Value::from), 1 => any::<i64>().prop_map(Value::from), 1 => Just(json!(1.5))],
        )),
    );
    let second = (
        field(mostly(prop_oneof![Just(json!("https://rec.example.com/a.mp3")), "https?://[a-zA-Z0-9.]{1,20}(/[a-zA-Z0-9./ %?#:@-]{0,40})?".prop_map(Value::from)])),
        field(mostly(prop_oneof![Just(json!("completed")), Just(json!("ringing")), Just(json!("in-progress"))])),
        field(mostly("[ -~]{1,40}".prop_map(Value::from))),
        field(mostly("[ -~]{1,20}".prop_map(Value::from))),
        field(mostly("[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])".prop_map(Value::from))),
        field(mostly("[01][0-9]:[0-5][0-9]:[0-5][0-9]".prop_map(Value::from))),
        field(mostly(any::<bool>().prop_map(Value::from))),
        field(prop_oneof![4 => details_value().prop_filter("an object", Value::is_object), 1 => details_value()].boxed()),
    );
    (first, second).prop_map(
        |(
            (lead, outcome, notes, start, end, duration),
            (url, status, ext_id, ext_sys, date, time, auto, details),
        )| {
            let mut m = Map::new();
            m.insert("company_id".into(), Value::from(COMPANY));
            for (k, v) in [
                ("lead_id", lead),
                ("outcome", outcome),
                ("notes", notes),
                ("start_time", start),
                ("end_time", end),
                ("duration_seconds", duration),
                ("recording_url", url),
                ("call_status", status),
                ("external_call_id", ext_id),
                ("external_system", ext_sys),
                ("next_follow_up", date),
                ("next_follow_up_time", time),
                ("auto_call_followup", auto),
                ("call_details", details),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        },
    )
}

/// Parses and validates one body as the gateway does; an accepted record must pass the
/// worker's check of the envelope the gateway would build.
fn check(bytes: &[u8]) -> Result<Option<CallRecord>, String> {
    let outcome = std::panic::catch_unwind(|| {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        callcap::validate(&value).ok()
    })
    .map_err(|_| format!("panicked on {}", String::from_utf8_lossy(bytes)))?;
    let Some(record) = outcome else {
        return Ok(None);
    };
    let id = call_history_id(&record, None).id;
    let envelope = Envelope::new(
        id,
        chrono::Utc::now(),
        "kfuzz".into(),
        Some("rid".into()),
        record.clone(),
    );
    Envelope::decode_checked(&ingest_subject(record.company_id), &envelope.encode())
        .map_err(|e| format!("accepted but the worker refuses it ({e}): {record:?}"))?;
    Ok(Some(record))
}

#[tokio::test]
async fn accepted_records_are_storable_and_read_back_as_validated() {
    let mut accepted = Vec::new();
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "the corpus is in {}", corpus.display());
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        if let Some(r) = check(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display())) {
            accepted.push(r);
        }
    }
    let generated = RefCell::new(Vec::new());
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&body(), |body| {
            let bytes = serde_json::to_vec(&body).unwrap();
            match check(&bytes) {
                Ok(Some(r)) => generated.borrow_mut().push(r),
                Ok(None) => {}
                Err(e) => return Err(TestCaseError::fail(e)),
            }
            Ok(())
        })
        .unwrap();
    let generated = generated.into_inner();
    assert!(generated.len() > cases as usize / 20, "only {} of {cases} generated bodies were accepted: the generator is too hostile to reach the store", generated.len());
    accepted.extend(generated);

    // Stored through the worker's write path; every row reads back as validated.
    let db = TestDb::create().await;
    let received_at = chrono::Utc::now();
    let mut rows = Vec::new();
    for (seq, record) in accepted.iter().enumerate() {
        // One row per record: distinct ids even where two records share an external id.
        let id = Uuid::now_v7();
        let envelope = Envelope::new(id, received_at, "kfuzz".into(), None, record.clone());
        rows.push(Row {
            seq: seq as u64 + 1,
            subject: callcap::subjects::ingest_subject(record.company_id),
            trace: None,
            envelope,
        });
    }
    for chunk in rows.chunks(500) {
        let mut unique = std::collections::HashSet::new();
        let chunk: Vec<Row> = chunk
            .iter()
            .filter(|r| {
                unique.insert((
                    r.envelope.record.external_system.clone(),
                    r.envelope.record.external_call_id.clone(),
                )) || r.envelope.record.external_call_id.is_none()
            })
            .cloned()
            .collect();
        store::write_batch(&db.pool, &Default::default(), &chunk, &[])
            .await
            .unwrap_or_else(|e| panic!("an accepted record was refused by the database: {e}"));
    }
    let mut compared = 0;
    for row in &rows {
        let r = &row.envelope.record;
        let found: Option<StoredFields> = sqlx::query_as(
            "SELECT notes, recording_url, caller_number, duration_seconds, start_time, end_time, next_follow_up, \
             next_follow_up_time, external_call_id, external_system, call_details IS NOT DISTINCT FROM $2::jsonb \
             FROM call_history WHERE id = $1",
        )
        .bind(row.envelope.call_history_id)
        .bind(r.call_details.clone().map(Value::Object))
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        let Some(found) = found else { continue }; // an external id already stored above
        compared += 1;
        let expected = (
            r.notes.clone(),
            r.recording_url.clone(),
            r.caller_number.clone(),
            r.duration_seconds,
            r.start_time,
            r.end_time,
            r.next_follow_up,
            r.next_follow_up_time,
            r.external_call_id.clone(),
            r.external_system.clone(),
            true,
        );
        assert_eq!(
            found, expected,
            "stored row differs from the validated record {r:?}"
        );
    }
    assert!(compared > 100, "only {compared} rows compared");
    println!(
        "fuzz: {} corpus files, {} accepted records stored and read back",
        files.len(),
        compared
    );
}
